"""load()'s sequence under every cache status and every injected compiler fault: it always serves."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from b10_transfer import OperationStatus

from model import coldstart
from model import compile as compile_module
from model import model as model_module
from model.artifacts import CompileArtifacts
from model.cache import B10TransferCache, CacheResult, NoCache, Outcome
from model.coldstart import CompileCounters, WarmupReport
from model.compile import compile_pipeline
from model.engine import FluxEngine
from model.graph_route import routed
from model.model import Model
from model.pipeline import load_pipeline
from model.restore import begin_restore
from model.schema import GenerateRequest
from model.settings import CompileSettings, Settings, config_metadata
from tests.conftest import TINY_EAGER
from tests.harness import NO_BODY
from tests.test_cache import fake_module

# Nothing compiles for real in these tests, so the directory stays empty.
ARTIFACTS = CompileArtifacts(Path("/tmp/coldstart-tests-inductor"), "k")
REQUEST = GenerateRequest(prompt="a harbour at night", width=1216, height=832, seed=21)


@pytest.fixture
def fresh_engine(settings: Settings) -> FluxEngine:
    return FluxEngine(load_pipeline(settings, device="cpu"), settings.resolutions, settings.text_lengths)


def fake_compile(monkeypatch: pytest.MonkeyPatch, new_graphs: int) -> list[str]:
    """Skip the real compiler (minutes on a CPU); warm-up reports `new_graphs` freshly compiled graphs."""
    calls: list[str] = []
    monkeypatch.setattr(coldstart, "compile_pipeline", lambda *args, **kwargs: (calls.append("compile"), None)[1])

    def warm(engine: FluxEngine, runs: int, dynamic_shapes: list | None = None, static: bool = True) -> WarmupReport:
        if static:  # the call that warms the served shapes; a second one warms more dynamic sizes
            calls.append("warm_up")
        return WarmupReport(
            {"1024x1024@256": 0.1}, CompileCounters(graphs=3, fxgraph_misses=new_graphs, fxgraph_hits=0)
        )

    monkeypatch.setattr(coldstart, "warm_up", warm)
    return calls


# What load() does for each b10-transfer load status, given whether the warm-up compiled anything new.
STATUS_TABLE = [
    (OperationStatus.SUCCESS, 0, Outcome.HIT, False),
    (OperationStatus.SUCCESS, 2, Outcome.HIT, True),  # a partial hit: save what is new
    (OperationStatus.SKIPPED, 0, Outcome.PRESENT, False),
    (OperationStatus.DOES_NOT_EXIST, 3, Outcome.MISS, True),
    (OperationStatus.ERROR, 3, Outcome.ERROR, True),  # b10fs broken: compile anyway, still try to save
]


@pytest.mark.parametrize(("status", "new_graphs", "restore", "saves"), STATUS_TABLE)
def test_load_status_table(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    fresh_engine: FluxEngine,
    status: OperationStatus,
    new_graphs: int,
    restore: Outcome,
    saves: bool,
) -> None:
    fake_module(monkeypatch, "b10_transfer", load=status, save=OperationStatus.SUCCESS)
    calls = fake_compile(monkeypatch, new_graphs)
    report = coldstart.prepare(fresh_engine, CompileSettings(), B10TransferCache(ARTIFACTS, root=tmp_path), ARTIFACTS)
    assert calls == ["compile", "warm_up"], "compile and warm-up run whatever the cache said"
    assert report.restore.outcome is restore
    assert (report.save is not None) is saves
    assert report.eager_fallback_reason is None


def test_compile_disabled_touches_no_cache(monkeypatch: pytest.MonkeyPatch, fresh_engine: FluxEngine) -> None:
    calls = fake_compile(monkeypatch, 0)
    report = coldstart.prepare(fresh_engine, CompileSettings(enabled=False), NoCache(), ARTIFACTS)
    assert calls == [] and report.restore is None and not report.compiled


def test_compile_raising_falls_back_to_eager(
    monkeypatch: pytest.MonkeyPatch, fresh_engine: FluxEngine, engine: FluxEngine, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError("inductor exploded")

    monkeypatch.setattr(coldstart, "compile_pipeline", broken)
    report = coldstart.prepare(fresh_engine, CompileSettings(), NoCache(), ARTIFACTS)
    assert "inductor exploded" in report.eager_fallback_reason
    assert "COMPILE FAILED, serving EAGER" in caplog.text
    assert fresh_engine.generate(REQUEST).data == engine.generate(REQUEST).data


def test_warm_up_raising_undoes_the_compile(
    monkeypatch: pytest.MonkeyPatch, fresh_engine: FluxEngine, engine: FluxEngine
) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError("warm-up failed")

    monkeypatch.setattr(coldstart, "warm_up", broken)
    pipe = fresh_engine.pipe
    report = coldstart.prepare(fresh_engine, CompileSettings(), NoCache(), ARTIFACTS)
    assert "warm-up failed" in report.eager_fallback_reason
    # Compiling routes the decoder (vae.decode itself is never replaced): the undo must have taken that back.
    assert not routed(pipe.vae.decoder)
    assert not any(routed(m) for m in pipe.transformer.modules())
    assert fresh_engine.generate(REQUEST).data == engine.generate(REQUEST).data


def test_compile_wraps_blocks_and_decode(fresh_engine: FluxEngine) -> None:
    pipe = fresh_engine.pipe
    undo = compile_pipeline(pipe, CompileSettings(), shapes=6, artifacts=ARTIFACTS)
    compiled = [m for m in pipe.transformer.modules() if routed(m)]
    assert compiled and all(type(m).__name__.endswith("Block") for m in compiled)
    assert routed(pipe.vae.decoder)
    assert torch._dynamo.config.recompile_limit >= 12, "every served shape fits under the recompile limit"
    undo()
    assert not [m for m in [*pipe.transformer.modules(), pipe.vae.decoder] if routed(m)]


def _tiny_model(monkeypatch: pytest.MonkeyPatch) -> Model:
    for key, value in TINY_EAGER.items():
        monkeypatch.setenv(key, value)
    return Model(config={"model_metadata": config_metadata()})


def test_load_is_idempotent(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _tiny_model(monkeypatch)
    model.load()
    engine = model._engine
    model.load()
    assert model._engine is engine


def _weights_fail_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The first load_pipeline call in load() fails, as an unmounted weights volume would; later ones load."""
    attempts = []

    def flaky(*args, **kwargs):
        attempts.append(1)
        if len(attempts) == 1:
            raise OSError("weights volume not mounted yet")
        return load_pipeline(*args, **kwargs)

    monkeypatch.setattr("model.coldstart.load_pipeline", flaky)


def test_load_retried_after_a_failure_serves(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _tiny_model(monkeypatch)
    _weights_fail_once(monkeypatch)
    with pytest.raises(OSError):
        model.load()
    with pytest.raises(RuntimeError, match="before load"):
        model.predict(REQUEST, NO_BODY)
    model.load()
    assert model.predict(REQUEST, NO_BODY).width == 1216


# --- faults outside the cache and the compiler ----------------------------------------------------


def test_compile_raising_halfway_leaves_nothing_compiled(
    monkeypatch: pytest.MonkeyPatch,
    fresh_engine: FluxEngine,
    engine: FluxEngine,
    caplog: pytest.LogCaptureFixture,
) -> None:
    pipe = fresh_engine.pipe
    routed_before_the_failure: list[torch.nn.Module] = []
    real_route = compile_module.route

    def route_half_then_fail(module: torch.nn.Module, *args, **kwargs) -> None:
        if len(routed_before_the_failure) == 1:
            raise RuntimeError("compiler failed halfway")
        real_route(module, *args, **kwargs)
        routed_before_the_failure.append(module)

    monkeypatch.setattr(compile_module, "route", route_half_then_fail)
    report = coldstart.prepare(fresh_engine, CompileSettings(), NoCache(), ARTIFACTS)
    assert routed_before_the_failure, "the fault came after some modules were routed"
    assert "compiler failed halfway" in report.eager_fallback_reason and not report.compiled
    assert "COMPILE FAILED, serving EAGER" in caplog.text
    assert [m for m in [*pipe.transformer.modules(), pipe.vae.decoder] if routed(m)] == []
    assert fresh_engine.generate(REQUEST).data == engine.generate(REQUEST).data


class RecordingCache(NoCache):
    name = "recording"

    def __init__(self) -> None:
        self.saves = 0

    def save(self) -> CacheResult:
        self.saves += 1
        return CacheResult(Outcome.SAVED, "saved")


def _compiled_tiny_model(monkeypatch: pytest.MonkeyPatch, cache: RecordingCache, new_graphs: int = 1) -> Model:
    """The tiny model with compile on, the compiler faked and a warm-up that compiled `new_graphs` (by default
    something new to save)."""
    fake_compile(monkeypatch, new_graphs=new_graphs)
    monkeypatch.setattr("model.restore.choose_backend", lambda *args, **kwargs: cache)
    for key, value in {**TINY_EAGER, "FLUX_COMPILE": "1"}.items():
        monkeypatch.setenv(key, value)
    return Model(config={"model_metadata": config_metadata()})


def _failing_move(when: str) -> Callable[[Path, bool], contextlib.AbstractContextManager[None]]:
    """A stand-in for set_aside_what_a_hit_never_reads whose move `aside` or `back` fails as a full disk would."""

    @contextlib.contextmanager
    def move(directory: Path) -> Iterator[None]:
        if when == "aside":
            raise OSError(28, "No space left on device")
        yield
        raise OSError(28, "No space left on device")

    return move


@pytest.mark.parametrize("when", ["aside", "back"])
def test_setting_aside_what_a_hit_never_reads_failing_still_serves(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, when: str
) -> None:
    cache = RecordingCache()
    model = _compiled_tiny_model(monkeypatch, cache)
    monkeypatch.setattr(coldstart, "set_aside_what_a_hit_never_reads", _failing_move(when))
    with caplog.at_level(logging.WARNING, logger="model.coldstart"):
        model.load()
    assert model.predict(REQUEST, NO_BODY).width == 1216
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("No space left on device" in message for message in warnings), warnings
    if when == "aside":
        assert cache.saves == 0, "an archive with every kernel twice could pass the backend's size limit"
        assert model.cold_start.save.outcome is Outcome.ERROR
    else:
        assert cache.saves == 1 and model.cold_start.save.outcome is Outcome.SAVED


def test_measuring_the_archive_failing_still_serves(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    model = _compiled_tiny_model(monkeypatch, RecordingCache())

    def vanished(directory: Path) -> int:
        raise FileNotFoundError(2, "No such file or directory", str(directory / "fxgraph" / "entry"))

    monkeypatch.setattr(coldstart, "archived_bytes", vanished)
    with caplog.at_level(logging.WARNING, logger="model.coldstart"):
        model.load()
    assert model.cold_start.cache_bytes == 0 and model.cold_start.save.outcome is Outcome.SAVED
    assert "could not measure the inductor directory" in caplog.text
    assert model.predict(REQUEST, NO_BODY).width == 1216


def test_a_hanging_nvidia_smi_does_not_stall_load(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fake = tmp_path / "bin" / "nvidia-smi"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\nexec sleep 60\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")
    monkeypatch.setattr(model_module, "NVIDIA_SMI_TIMEOUT_S", 0.5)
    model = _tiny_model(monkeypatch)
    started = time.monotonic()
    with caplog.at_level(logging.INFO, logger="model.model"):
        model.load()
    assert time.monotonic() - started < 30, "load() waited for the hanging nvidia-smi"
    assert "nvidia-smi gave no answer" in caplog.text and "timed out after 0.5 seconds" in caplog.text
    assert model.predict(REQUEST, NO_BODY).width == 1216


def test_a_restore_raising_on_its_thread_costs_only_a_compile(
    monkeypatch: pytest.MonkeyPatch, fresh_engine: FluxEngine
) -> None:
    class Broken(NoCache):
        def restore(self) -> CacheResult:
            raise RuntimeError("backend bug")

    calls = fake_compile(monkeypatch, new_graphs=1)
    monkeypatch.setattr("model.restore.choose_backend", lambda *args, **kwargs: Broken())
    restoring = begin_restore(Settings.from_sources(environ=TINY_EAGER).resolved(None))
    assert restoring.future is None, "nothing compiles, so nothing is restored"
    restoring = begin_restore(Settings.from_sources(environ={"FLUX_MODEL_SOURCE": "tiny"}).resolved(None))
    report = coldstart.prepare(fresh_engine, CompileSettings(), Broken(), ARTIFACTS, restoring.future)
    assert report.restore.outcome is Outcome.ERROR and "backend bug" in report.restore.detail
    assert calls == ["compile", "warm_up"] and report.eager_fallback_reason is None


def test_the_restore_runs_while_the_weights_load(monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    restore_started, weights_loading = threading.Event(), threading.Event()

    class Slow(RecordingCache):
        def restore(self) -> CacheResult:
            restore_started.set()
            assert weights_loading.wait(timeout=30), "the weights never started while the restore ran"
            return CacheResult(Outcome.MISS, "nothing stored")

    real_load_pipeline = load_pipeline

    def load_pipeline_seeing_the_restore(*args, **kwargs):
        assert restore_started.wait(timeout=30), "the restore had not started before the weights"
        weights_loading.set()
        return real_load_pipeline(*args, **kwargs)

    model = _compiled_tiny_model(monkeypatch, Slow(), new_graphs=0)
    monkeypatch.setattr("model.coldstart.load_pipeline", load_pipeline_seeing_the_restore)
    model.load()
    assert model.cold_start.restore.outcome is Outcome.MISS


def test_reading_ahead_failing_leaves_the_hit_a_hit(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    class Hit(RecordingCache):
        def restore(self) -> CacheResult:
            return CacheResult(Outcome.HIT, "restored")

    def broken(directory: Path) -> int:
        raise OSError("the disk went away")

    model = _compiled_tiny_model(monkeypatch, Hit(), new_graphs=0)
    monkeypatch.setattr("model.precompile.preload", broken)
    model.load()
    assert model.cold_start.restore.outcome is Outcome.HIT and model.cold_start.compiled
    assert "reading the precompiled functions ahead failed" in caplog.text
    assert model.predict(REQUEST, NO_BODY).width == 1216


def test_a_retried_load_joins_the_restore_the_failed_attempt_started(monkeypatch: pytest.MonkeyPatch) -> None:
    class CountingCache(RecordingCache):
        def __init__(self) -> None:
            super().__init__()
            self.restores = 0

        def restore(self) -> CacheResult:
            self.restores += 1
            return CacheResult(Outcome.HIT, "restored")

    cache = CountingCache()
    model = _compiled_tiny_model(monkeypatch, cache)
    _weights_fail_once(monkeypatch)
    with pytest.raises(OSError):
        model.load()
    model.load()
    assert cache.restores == 1, "two restores into one inductor directory would race"
    assert model.cold_start.restore.outcome is Outcome.HIT


def test_a_size_never_warmed_up_that_would_compile_is_reported(
    fresh_engine: FluxEngine, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    ran: list[int] = []

    def would_compile(job) -> None:
        ran.append(job.text_length)
        if job.text_length == fresh_engine.text_lengths[-1]:
            raise RuntimeError("Detected recompile when torch.compile stance is 'fail_on_recompile'")

    assert coldstart.check_a_size_never_warmed_up(fresh_engine) == "passed", "the eager tiny model compiles nothing"
    monkeypatch.setattr(fresh_engine, "run", would_compile)
    outcome = coldstart.check_a_size_never_warmed_up(fresh_engine)
    assert ran == list(fresh_engine.text_lengths), "every text length is checked"
    assert outcome.startswith(f"FAILED: 1008x784 at text length {fresh_engine.text_lengths[-1]} would have compiled")
