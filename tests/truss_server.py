"""The real Truss server, run from truss's own generated build context with plain python (no docker).

Shared by the end-to-end tests and `make serve`:
    python -m tests.truss_server [--port 8080] [--build-dir .build] [--install-only]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
READY_PATH = "/v1/models/model"
PREDICT_PATH = "/v1/models/model:predict"


def build_app(build_dir: Path, root: Path = ROOT) -> Path:
    """Generate the build context with truss's API and lay it out as the image's /app would be."""
    from truss.truss_handle.truss_handle import TrussHandle

    context = build_dir / "context"
    app = build_dir / "app"
    shutil.rmtree(context, ignore_errors=True)
    shutil.rmtree(app, ignore_errors=True)
    TrussHandle(root).docker_build_setup(context)
    # The Dockerfile copies server/ to /app, then model/ and config.yaml into it.
    shutil.copytree(context / "server", app)
    shutil.copytree(context / "model", app / "model")
    shutil.copy(context / "config.yaml", app / "config.yaml")
    return app


def install_server_requirements(app: Path, python: str = sys.executable) -> None:
    """Install the server's own dependencies; the model's are the project's, already installed."""
    subprocess.run(
        [python, "-m", "pip", "install", "-q", "-r", str(app / "requirements.txt"), "-c", str(app / "constraints.txt")],
        check=True,
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(
    app: Path,
    port: int,
    env: Mapping[str, str],
    log_path: Path | None = None,
    preexec_fn: Callable[[], None] | None = None,
) -> subprocess.Popen[bytes]:
    """Start `python main.py` in the app directory; stdout and stderr go to log_path (or through).

    `preexec_fn` runs in the child before the server starts, e.g. to set resource limits.
    """
    full_env = {**os.environ, "INFERENCE_SERVER_PORT": str(port), **env}
    output = log_path.open("wb") if log_path else None
    return subprocess.Popen(
        [sys.executable, "main.py"],
        cwd=app,
        env=full_env,
        stdout=output,
        stderr=subprocess.STDOUT if output else None,
        preexec_fn=preexec_fn,
    )


def wait_ready(port: int, process: subprocess.Popen[bytes], timeout_s: float) -> bool:
    """Poll the readiness route until 200; False if the process exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{READY_PATH}", timeout=5) as response:
                if response.status == 200:
                    return True
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    return False


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def curl_example(port: int) -> str:
    body = json.dumps({"prompt": "a watercolor painting of a fox in a misty forest", "seed": 42})
    return (
        f"curl -s -X POST http://127.0.0.1:{port}{PREDICT_PATH} -H 'Content-Type: application/json' \\\n"
        f"  -d '{body}' | python3 -c 'import base64,json,sys; "
        'open("out.jpg","wb").write(base64.b64decode(json.load(sys.stdin)["data"]))\' && echo wrote out.jpg'
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--build-dir", type=Path, default=ROOT / ".build")
    parser.add_argument("--install-only", action="store_true", help="install the server's requirements and exit")
    args = parser.parse_args()

    app = build_app(args.build_dir)
    if args.install_only:
        install_server_requirements(app)
        return
    # Eager unless asked: compiling the tiny model on a CPU takes minutes the first time (FLUX_COMPILE=1).
    env = {key: os.environ.get(key, default) for key, default in (("FLUX_MODEL_SOURCE", "tiny"), ("FLUX_COMPILE", "0"))}
    print(f"starting the Truss server from {app} with {env}", flush=True)
    process = start(app, args.port, env)
    try:
        if not wait_ready(args.port, process, timeout_s=3600):
            sys.exit(f"server exited with code {process.poll()} before it was ready")
        print(f"\nready on http://127.0.0.1:{args.port}; try:\n\n{curl_example(args.port)}\n", flush=True)
        process.wait()
    except KeyboardInterrupt:
        pass
    finally:
        stop(process)


if __name__ == "__main__":
    main()
