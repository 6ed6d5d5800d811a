from __future__ import annotations

import base64
import io
import logging
import os
import shutil
import subprocess
import types
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from torch._inductor import config as inductor_config

from model.engine import FluxEngine
from model.pipeline import load_pipeline
from model.settings import Settings

# Tests never reach the network: the hub libraries must fail fast instead of trying.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Scalar CPU kernels: Inductor generates and compiles them about a third faster than vectorized ones (the tiny model's
# blocks: 33 s against 51-53 s), and the tests check what is compiled, cached and served, not how fast a CPU runs it.
# A GPU's Triton kernels are not affected. For this process (whose Inductor config is read already) and every process
# the tests start.
os.environ.setdefault("TORCHINDUCTOR_VEC_ISA_OK", "0")
if os.environ["TORCHINDUCTOR_VEC_ISA_OK"] == "0":
    inductor_config.cpp.vec_isa_ok = False


# The tiny model, eager: compiling on a CPU takes minutes, so only the compile tests turn it on.
TINY_EAGER = {"FLUX_MODEL_SOURCE": "tiny", "FLUX_COMPILE": "0"}


@pytest.fixture(autouse=True)
def compile_stance_reset() -> Iterator[None]:
    """load() leaves torch.compile's stance at eager_on_recompile for serving; the next test compiles afresh."""
    yield
    torch.compiler.set_stance("default")


@pytest.fixture(autouse=True)
def attention_backend_reset() -> Iterator[None]:
    """diffusers' set_attention_backend also makes its backend the process's default, which every other pipeline
    then runs (an engine shared between tests would run the math backend after one test asked for it)."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    previous = _AttentionBackendRegistry._active_backend
    yield
    _AttentionBackendRegistry.set_active_backend(previous)


@pytest.fixture(scope="session")
def settings() -> Settings:
    """config.yaml's settings, on the embedded tiny model."""
    return Settings.from_sources(environ=TINY_EAGER)


def tiny_engine(settings: Settings) -> FluxEngine:
    """An engine of `settings` on the CPU, as a server of them builds it."""
    return FluxEngine(
        load_pipeline(settings, device="cpu"), settings.resolutions, settings.text_lengths, settings.sizes
    )


@pytest.fixture(scope="session")
def engine(settings: Settings) -> FluxEngine:
    return tiny_engine(settings)


def decode_image(data: str, output_format: str = "jpeg") -> Image.Image:
    """A response's base64 image, checked to be in `output_format` (a request's name for it)."""
    raw = base64.b64decode(data, validate=True)
    image = Image.open(io.BytesIO(raw))
    image.load()
    assert image.format == output_format.upper()
    return image


def decode_jpeg(data: str) -> Image.Image:
    return decode_image(data, "jpeg")


class LogRecorder(logging.Handler):
    """Keeps every record it is handed, formatted with its traceback."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))

    def text(self) -> str:
        return "\n".join(self.lines)


@pytest.fixture
def all_logs() -> Iterator[LogRecorder]:
    """Every record at DEBUG and above from every logger, including diffusers' and transformers', which do not
    propagate to the root logger (so caplog alone never sees them)."""
    recorder = LogRecorder()
    loggers = [logging.getLogger()]
    loggers += [item for item in logging.Logger.manager.loggerDict.values() if isinstance(item, logging.Logger)]
    levels = {logger: logger.level for logger in loggers}
    # A record stops at the first logger that does not propagate, so each is seen exactly once.
    listening = [logger for logger in loggers if logger is loggers[0] or not logger.propagate]
    for logger in loggers:
        logger.setLevel(logging.DEBUG)
    for logger in listening:
        logger.addHandler(recorder)
    try:
        yield recorder
    finally:
        for logger in listening:
            logger.removeHandler(recorder)
        for logger, level in levels.items():
            logger.setLevel(level)


@pytest.fixture
def tmp_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.chdir(tmp_path)
    yield tmp_path


class RunningServer:
    """A Truss server process started from the generated build context."""

    def __init__(self, port: int, log_path: Path, process: subprocess.Popen[bytes]) -> None:
        self.port = port
        self.log_path = log_path
        self.process = process
        self.base = f"http://127.0.0.1:{port}"

    def url(self, path: str) -> str:
        return self.base + path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_server(
    build_dir: Path, env: dict[str, str], ready_timeout_s: float = 600, **start_options: Any
) -> Iterator[RunningServer]:
    """Build the app, start it on a free port, yield once ready, and stop it afterwards."""
    from tests import truss_server

    app = truss_server.build_app(build_dir)
    port = truss_server.free_port()
    log_path = build_dir / "server.log"
    process = truss_server.start(app, port, {**TINY_EAGER, **env}, log_path, **start_options)
    try:
        if not truss_server.wait_ready(port, process, ready_timeout_s):
            raise RuntimeError(f"server never became ready:\n{log_path.read_text(errors='replace')[-4000:]}")
        yield RunningServer(port, log_path, process)
    finally:
        truss_server.stop(process)


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    yield from start_server(tmp_path_factory.mktemp("server"), {})


# The open server's LoRA limits: tests/test_lora.py writes adapters within them.
OPEN_SERVER_LORAS, OPEN_SERVER_LORA_RANK = 2, 8


@pytest.fixture(scope="session")
def open_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """The real Truss server as `FLUX_MAX_LORAS=2 FLUX_ALLOW_PRIVATE_URLS=1 make serve` starts it: LoRA on, and the
    loopback servers of the tests (adapters, input images, uploads) reachable."""
    env = {
        "FLUX_MAX_LORAS": str(OPEN_SERVER_LORAS),
        "FLUX_MAX_LORA_RANK": str(OPEN_SERVER_LORA_RANK),
        "FLUX_ALLOW_PRIVATE_URLS": "1",
        "HOME": str(tmp_path_factory.mktemp("home")),  # the adapters' disk cache lives under the home directory
    }
    yield from start_server(tmp_path_factory.mktemp("open-server"), env)


@pytest.fixture
def b10fs(monkeypatch: pytest.MonkeyPatch) -> Iterator[types.SimpleNamespace]:
    """The real b10-transfer against a fresh directory under /cache/model, as Baseten mounts b10fs there."""
    if os.geteuid() != 0:
        pytest.skip("b10-transfer's paths live under /cache/model, which needs root to create")
    from tests.harness import b10_transfer_env

    root = Path("/cache/model") / f"test-{uuid.uuid4().hex[:12]}"
    root.mkdir(parents=True)
    work = root / "work"  # its archives must be written under /app or /cache
    work.mkdir()
    inductor = Path("/tmp") / f"b10-inductor-{uuid.uuid4().hex[:12]}"
    # The same environment the cold-start benchmark gives it: on, this work directory, space floors lowered.
    for name, value in b10_transfer_env(work).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(inductor))
    try:
        yield types.SimpleNamespace(root=root, inductor=inductor)
    finally:
        for path in (root, work, inductor):
            shutil.rmtree(path, ignore_errors=True)
