"""A real HTTP server on loopback that serves LoRA files the way the web does, including the ways it fails."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class _Handler(BaseHTTPRequestHandler):
    root: Path
    seen: list[tuple[str, str | None]]

    def log_message(self, *args: object) -> None:  # quiet
        pass

    def do_GET(self) -> None:  # noqa: N802 (the standard library's name)
        self.seen.append((self.path, self.headers.get("Authorization")))
        if self.path.startswith("/redirect/"):  # /redirect/<name> -> /files/<name>
            self._answer(302, b"", {"Location": "/files/" + self.path.removeprefix("/redirect/")})
        elif self.path.startswith("/redirect-to/"):  # /redirect-to/<absolute URL>
            self._answer(302, b"", {"Location": self.path.removeprefix("/redirect-to/")})
        elif self.path == "/slow":
            self.send_response(200)
            self.send_header("Content-Length", "1000000")
            self.end_headers()
            for _ in range(100):
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.1)
        elif self.path.startswith("/files/") and (self.root / self.path.removeprefix("/files/")).is_file():
            self._answer(200, (self.root / self.path.removeprefix("/files/")).read_bytes())
        elif self.path.startswith("/hub/"):  # a Hugging Face endpoint: /hub/<repo>/resolve/main/<file>, /hub/api/...
            self._hub(self.path.removeprefix("/hub"))
        else:
            self._answer(404, b"not found")

    def _hub(self, path: str) -> None:
        if path.startswith("/api/models/"):
            repo = path.removeprefix("/api/models/")
            files = sorted(p.name for p in (self.root / repo).glob("*")) if (self.root / repo).is_dir() else None
            if files is None:
                self._answer(404, b"{}")
            else:
                self._answer(200, json.dumps({"siblings": [{"rfilename": name} for name in files]}).encode())
            return
        repo_and_file = path.lstrip("/").replace("/resolve/main/", "/")
        target = self.root / repo_and_file
        self._answer(200, target.read_bytes()) if target.is_file() else self._answer(404, b"not found")

    def _answer(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@contextmanager
def serving(root: Path) -> Iterator[tuple[str, list[tuple[str, str | None]]]]:
    """Serve `root` on a free loopback port; yields the base URL and the (path, Authorization) of each request."""
    seen: list[tuple[str, str | None]] = []
    handler = type("Handler", (_Handler,), {"root": root, "seen": seen})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()


if __name__ == "__main__":  # serve a directory for a local `make serve` with LoRA: python -m tests.lora_server DIR
    import sys

    with serving(Path(sys.argv[1])) as (base, _):
        print(f"serving {sys.argv[1]} at {base}/files/", flush=True)
        threading.Event().wait()
