"""Faults in load(), each injected into a real Truss server: it becomes ready and serves, or, for
missing weights, never reports ready and logs why."""

from __future__ import annotations

import io
import json
import os
import subprocess
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from model.artifacts import fingerprint
from model.cache import ARCHIVE_NAME
from model.precision import gpu_facts
from model.random_flux import build_random_pipeline
from model.settings import Settings
from tests.conftest import RunningServer, decode_jpeg, start_server
from tests.harness import COMPILE_OVERRIDES, with_fault_injection
from tests.truss_server import PREDICT_PATH, READY_PATH, build_app, free_port, start, stop, wait_ready

pytestmark = pytest.mark.slow

# One small shape and no VAE compile keep a from-scratch compile short on a CPU.
COMPILED = {
    "FLUX_COMPILE": "1",
    "FLUX_RESOLUTIONS": "256x256",
    "FLUX_TEXT_LENGTHS": "256",
    "FLUX_COMPILE_ANY_SIZE": "0",
    "FLUX_MODEL_SOURCE": "tiny",
    COMPILE_OVERRIDES: json.dumps({"vae": False}),
}
BODY = {"prompt": "a lighthouse", "width": 256, "height": 256, "seed": 3}


def compiled_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return with_fault_injection(
        {
            **COMPILED,
            "FLUX_CACHE_BACKEND": "local",
            "FLUX_CACHE_DIR": str(tmp_path / "cache"),
            "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"),
            **extra,
        }
    )


def archive_path(env: dict[str, str]) -> Path:
    """Where the server will look for its archive: the same fingerprint the server computes."""
    settings = Settings.from_sources(environ=env)
    facts = settings.resolved(gpu_facts()).fingerprint_facts()
    return Path(env["FLUX_CACHE_DIR"]) / fingerprint(facts) / ARCHIVE_NAME


def assert_serves(server: RunningServer) -> None:
    response = requests.post(server.url(PREDICT_PATH), json=BODY, timeout=300)
    assert response.status_code == 200, response.text
    assert decode_jpeg(response.json()["data"]).size == (256, 256)


def fake_archive() -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for index in range(20):
            data = os.urandom(4096)
            info = tarfile.TarInfo(f"fxgraph/entry-{index}")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[Path]:
    """A 320 KiB filesystem: room for a small archive, none for the one a save writes."""
    mount_point = tmp_path / "full-disk"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=320k", "tmpfs", str(mount_point)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({mounted.stderr.strip()}); the unit tests cover ENOSPC")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_corrupt_archive_and_a_full_disk_on_save(tmp_path: Path, full_disk: Path) -> None:
    env = compiled_env(tmp_path, FLUX_CACHE_DIR=str(full_disk / "cache"))
    archive = archive_path(env)
    archive.parent.mkdir(parents=True)
    archive.write_bytes(os.urandom(200_000))
    for server in start_server(tmp_path / "build", env):
        assert_serves(server)
        log = server.log()
        assert "compile cache restore: error" in log
        assert "compile cache save: error" in log and "No space left on device" in log
        assert "COMPILE FAILED" not in log, "the compiled model serves"
    assert archive.stat().st_size == 200_000 and not list(archive.parent.glob(".inductor-*"))


def test_truncated_archive(tmp_path: Path) -> None:
    env = compiled_env(tmp_path)
    archive = archive_path(env)
    archive.parent.mkdir(parents=True)
    data = fake_archive()
    archive.write_bytes(data[: len(data) // 3])
    for server in start_server(tmp_path / "build", env):
        assert_serves(server)
        assert "compile cache restore: error" in server.log()
        assert "compile cache save: saved" in server.log(), "a good archive replaces the broken one"


def test_unreadable_cache_directory(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the cache directory should be")
    env = compiled_env(tmp_path, FLUX_CACHE_DIR=str(blocker / "cache"))
    for server in start_server(tmp_path / "build", env):
        assert_serves(server)
        assert "compile cache save: error" in server.log()


def test_b10fs_unavailable(tmp_path: Path) -> None:
    env = compiled_env(tmp_path, FLUX_CACHE_BACKEND="b10-transfer", BASETEN_FS_ENABLED="0")
    for server in start_server(tmp_path / "build", env):
        assert_serves(server)
        log = server.log()
        assert "compile cache restore: error" in log and "returned ERROR" in log


def test_torch_compile_raising_serves_eager(tmp_path: Path) -> None:
    env = compiled_env(tmp_path, INJECT_COMPILE_FAILURE="1")
    for server in start_server(tmp_path / "build", env):
        assert_serves(server)
        assert "COMPILE FAILED, serving EAGER" in server.log()
        assert "injected failure: torch.compile raised" in server.log()


def test_an_unknown_precision_stops_the_start_and_names_the_setting(tmp_path: Path) -> None:
    app = build_app(tmp_path / "build")
    port = free_port()
    log_path = tmp_path / "server.log"
    process = start(app, port, {**compiled_env(tmp_path), "FLUX_PRECISION": "fp4"}, log_path)
    expected = "precision='fp4' (from FLUX_PRECISION)"
    try:
        deadline = time.monotonic() + 120
        while expected not in log_path.read_text(errors="replace"):
            assert time.monotonic() < deadline, log_path.read_text(errors="replace")[-3000:]
            time.sleep(0.5)
        try:
            status = requests.get(f"http://127.0.0.1:{port}{READY_PATH}", timeout=5).status_code
        except requests.ConnectionError:
            status = None  # a server that exited is not ready either
        assert status != 200
    finally:
        stop(process)


def test_missing_weights_directory_never_becomes_ready(tmp_path: Path) -> None:
    missing = tmp_path / "weights-that-are-not-there"
    app = build_app(tmp_path / "build")
    port = free_port()
    log_path = tmp_path / "server.log"
    process = start(app, port, {"FLUX_MODEL_SOURCE": str(missing), "FLUX_COMPILE": "0"}, log_path)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and "Failed to load model" not in log_path.read_text(errors="replace"):
            time.sleep(0.5)
        time.sleep(3)  # past truss's retry
        for _ in range(5):
            try:
                status = requests.get(f"http://127.0.0.1:{port}{READY_PATH}", timeout=5).status_code
            except requests.ConnectionError:
                status = None  # a server that exited is not ready either
            assert status != 200
            time.sleep(0.5)
        log = log_path.read_text(errors="replace")
        assert str(missing) in log and "neither 'hf', an offline spec, nor a directory" in log
    finally:
        stop(process)


def test_load_retried_after_a_failure_becomes_ready(tmp_path: Path) -> None:
    weights = tmp_path / "weights"
    app = build_app(tmp_path / "build")
    port = free_port()
    log_path = tmp_path / "server.log"
    env = {"FLUX_MODEL_SOURCE": str(weights), "FLUX_COMPILE": "0", "NUM_LOAD_RETRIES_TRUSS": "60"}
    process = start(app, port, env, log_path)
    try:
        deadline = time.monotonic() + 120
        while "Failed to load model" not in log_path.read_text(errors="replace"):
            assert time.monotonic() < deadline and process.poll() is None
            time.sleep(0.2)
        # The weights arrive after the first attempt failed, atomically, as a volume mount would.
        staging = tmp_path / "staging"
        build_random_pipeline("tiny").save_pretrained(staging)
        staging.rename(weights)
        assert_serves_when_ready(port, process)
    finally:
        stop(process)


def assert_serves_when_ready(port: int, process: subprocess.Popen[bytes]) -> None:
    assert wait_ready(port, process, timeout_s=120)
    response = requests.post(
        f"http://127.0.0.1:{port}{PREDICT_PATH}", json={**BODY, "width": 1024, "height": 1024}, timeout=120
    )
    assert response.status_code == 200, response.text
    assert json.loads(response.text)["seed"] == BODY["seed"]
