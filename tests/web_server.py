"""A real HTTP server on loopback that serves files (LoRA adapters) and takes uploads (output URLs) the way the web
and object storage do, including the ways they fail."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit


class _Handler(BaseHTTPRequestHandler):
    root: Path
    seen: list[tuple[str, str | None]]
    uploads: dict[str, tuple[str, bytes]]  # path -> (Content-Type, body)
    attempts: dict[str, int]

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

    def do_PUT(self) -> None:  # noqa: N802 (the standard library's name)
        """/put/<name> stores; /put-403/... refuses as an expired signature; /put-flaky/... fails once with 503;
        /put-slow/... answers after 1.5 s."""
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.attempts[self.path] = self.attempts.get(self.path, 0) + 1
        if self.path.startswith("/put-403/"):
            self._answer(403, b"<Error><Code>AccessDenied</Code></Error>")
            return
        if self.path.startswith("/put-flaky/") and self.attempts[self.path] == 1:
            self._answer(503, b"slow down")
            return
        if self.path.startswith("/put-slow/"):
            time.sleep(1.5)
        self.uploads[self.path] = (self.headers.get("Content-Type", ""), body)
        # Kept as a file too, as a bucket would: <root>/uploads/<name>.
        name = Path(urlsplit(self.path).path).name
        (self.root / "uploads").mkdir(exist_ok=True)
        (self.root / "uploads" / name).write_bytes(body)
        self._answer(200, b"")

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
        try:
            self.send_response(status)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up waiting, as tests of timeouts do
            pass


@contextmanager
def serving(root: Path) -> Iterator[tuple[str, list[tuple[str, str | None]]]]:
    """Serve `root` on a free loopback port; yields the base URL and the (path, Authorization) of each GET."""
    with web_server(root) as state:
        yield state.base, state.seen


@dataclass
class WebServer:
    base: str
    seen: list[tuple[str, str | None]]  # (path, Authorization) of each GET
    uploads: dict[str, tuple[str, bytes]]  # path -> (Content-Type, body) of each PUT that succeeded
    attempts: dict[str, int]  # PUTs per path


@contextmanager
def web_server(root: Path, port: int = 0) -> Iterator[WebServer]:
    """Serve `root` on a loopback port (by default a free one)."""
    state = WebServer("", [], {}, {})
    handler = type(
        "Handler", (_Handler,), {"root": root, "seen": state.seen, "uploads": state.uploads, "attempts": state.attempts}
    )
    server = ThreadingHTTPServer(("127.0.0.1", port), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


if __name__ == "__main__":  # for a local `make serve`: python -m tests.web_server DIR [PORT, default 8081]
    import sys

    with web_server(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 8081) as running:
        print(
            f"serving {sys.argv[1]} at {running.base}/files/, storing PUTs to {running.base}/put/NAME in "
            f"{sys.argv[1]}/uploads",
            flush=True,
        )
        threading.Event().wait()
