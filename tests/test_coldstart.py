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

from bench import NO_BODY
from model import coldstart
from model import compile as compile_module
from model import model as model_module
from model.artifacts import CompileArtifacts
from model.cache import B10TransferCache, CacheResult, NoCache, Outcome
from model.coldstart import CompileCounters, WarmupReport
from model.compat import compiled_call, set_compiled_call
from model.compile import compile_pipeline
from model.engine import FluxEngine
from model.model import Model
from model.pipeline import load_pipeline
from model.prompts import encode_prompts
from model.schema import GenerateRequest
from model.settings import CompileSettings, Settings, config_metadata
from tests.conftest import TINY_EAGER
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

    def warm(engine: FluxEngine, runs: int, dynamic_shapes: list | None = None) -> WarmupReport:
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
    eager_decode = fresh_engine.pipe.vae.decode

    def broken(*args, **kwargs):
        raise RuntimeError("warm-up failed")

    monkeypatch.setattr(coldstart, "warm_up", broken)
    report = coldstart.prepare(fresh_engine, CompileSettings(), NoCache(), ARTIFACTS)
    assert "warm-up failed" in report.eager_fallback_reason
    assert fresh_engine.pipe.vae.decode == eager_decode
    assert all(compiled_call(m) is None for m in fresh_engine.pipe.transformer.modules())
    assert fresh_engine.generate(REQUEST).data == engine.generate(REQUEST).data


def test_compile_wraps_blocks_and_decode(fresh_engine: FluxEngine) -> None:
    pipe = fresh_engine.pipe
    undo = compile_pipeline(pipe, CompileSettings(), shapes=6, artifacts=ARTIFACTS)
    compiled = [m for m in pipe.transformer.modules() if compiled_call(m) is not None]
    assert compiled and all(type(m).__name__.endswith("Block") for m in compiled)
    import torch

    assert torch._dynamo.config.recompile_limit >= 12, "every served shape fits under the recompile limit"
    undo()
    assert not [m for m in pipe.transformer.modules() if compiled_call(m) is not None]


@pytest.mark.parametrize("scale_rblock", [False, True])
def test_inductor_times_half_rblock_candidates_only_when_asked_and_undo_restores_it(
    fresh_engine: FluxEngine, scale_rblock: bool
) -> None:
    # Those candidates are timed again in every process, so replicas would pick other reduction orders for one seed.
    import torch._inductor.config as inductor

    before = inductor.dynamic_scale_rblock
    undo = compile_pipeline(fresh_engine.pipe, CompileSettings(scale_rblock=scale_rblock), 6, ARTIFACTS)
    try:
        assert inductor.dynamic_scale_rblock is scale_rblock
    finally:
        undo()
    assert inductor.dynamic_scale_rblock is before


def test_compiled_text_encoders_give_the_same_embeddings_and_undo_clears_them(fresh_engine: FluxEngine) -> None:
    import torch

    pipe = fresh_engine.pipe
    with torch.inference_mode():
        eager = [encode_prompts(pipe, "a red bicycle", None, n, n) for n in (256, 512)]
    settings = CompileSettings(text_encoders=True, precompile=False)
    undo = compile_pipeline(pipe, settings, shapes=2, artifacts=ARTIFACTS)
    layers = [m for m in [*pipe.text_encoder.modules(), *pipe.text_encoder_2.modules()] if compiled_call(m)]
    assert {type(m).__name__ for m in layers} == {"T5Block", "CLIPEncoderLayer"}
    try:
        with torch.inference_mode():
            compiled = [encode_prompts(pipe, "a red bicycle", None, n, n) for n in (256, 512)]
    finally:
        undo()
    for expected, got in zip(eager, compiled, strict=True):
        for a, b in zip(expected, got, strict=True):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)  # fused kernels sum in another order
    assert not any(compiled_call(m) for m in layers)


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

    monkeypatch.setattr("model.model.load_pipeline", flaky)


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


@pytest.mark.parametrize("precompile", [False, True], ids=["torch.compile", "precompile"])
def test_compile_raising_halfway_leaves_nothing_compiled(
    monkeypatch: pytest.MonkeyPatch,
    fresh_engine: FluxEngine,
    engine: FluxEngine,
    caplog: pytest.LogCaptureFixture,
    precompile: bool,
) -> None:
    pipe = fresh_engine.pipe
    eager_decode = pipe.vae.decode
    wrapped_before_the_failure: list[str] = []

    def fail_after_wrapping(*args, **kwargs) -> None:
        wrapped_before_the_failure.extend(
            name for name, m in pipe.transformer.named_modules() if compiled_call(m) is not None
        )
        raise RuntimeError("compiler failed halfway")

    if precompile:
        # Wrap the first half of the regions, as a failure in the middle of precompile_modules would leave them.
        def precompile_half(modules: list[torch.nn.Module], *args, **kwargs) -> None:
            for module in modules[: len(modules) // 2]:
                set_compiled_call(module, lambda *a, **k: pytest.fail("a compiled region ran after the undo"))
            fail_after_wrapping()

        monkeypatch.setattr(compile_module.precompile, "precompile_modules", precompile_half)
    else:
        # Every block and vae.decode are wrapped (lazily: nothing compiles) by the time the layout is shared.
        monkeypatch.setattr(compile_module, "_share_single_block_layout", fail_after_wrapping)

    report = coldstart.prepare(fresh_engine, CompileSettings(precompile=precompile), NoCache(), ARTIFACTS)
    assert wrapped_before_the_failure, "the fault came after some modules were wrapped"
    assert "compiler failed halfway" in report.eager_fallback_reason and not report.compiled
    assert "COMPILE FAILED, serving EAGER" in caplog.text
    assert [m for m in [*pipe.transformer.modules(), pipe.vae.decoder] if compiled_call(m) is not None] == []
    assert pipe.vae.decode == eager_decode
    assert fresh_engine.generate(REQUEST).data == engine.generate(REQUEST).data


class RecordingCache(NoCache):
    name = "recording"

    def __init__(self) -> None:
        self.saves = 0

    def save(self) -> CacheResult:
        self.saves += 1
        return CacheResult(Outcome.SAVED, "saved")


def _compiled_tiny_model(monkeypatch: pytest.MonkeyPatch, cache: RecordingCache) -> Model:
    """The tiny model with compile on, the compiler faked and a warm-up that compiled something new to save."""
    fake_compile(monkeypatch, new_graphs=1)
    monkeypatch.setattr("model.model.choose_backend", lambda *args, **kwargs: cache)
    for key, value in {**TINY_EAGER, "FLUX_COMPILE": "1"}.items():
        monkeypatch.setenv(key, value)
    return Model(config={"model_metadata": config_metadata()})


def _failing_move(when: str) -> Callable[[Path, bool], contextlib.AbstractContextManager[None]]:
    """A stand-in for set_aside_what_a_hit_never_reads whose move `aside` or `back` fails as a full disk would."""

    @contextlib.contextmanager
    def move(directory: Path, precompiled: bool) -> Iterator[None]:
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

    def vanished(directory: Path, precompiled: bool) -> int:
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
    restoring = coldstart.restore_in_background(Broken(), CompileSettings())
    report = coldstart.prepare(fresh_engine, CompileSettings(), Broken(), ARTIFACTS, restoring)
    assert report.restore.outcome is Outcome.ERROR and "backend bug" in report.restore.detail
    assert calls == ["compile", "warm_up"] and report.eager_fallback_reason is None


def test_the_restore_runs_while_the_weights_load(monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    restore_started, weights_loading = threading.Event(), threading.Event()

    class Slow(NoCache):
        def restore(self) -> CacheResult:
            restore_started.set()
            assert weights_loading.wait(timeout=30), "the weights never started while the restore ran"
            return CacheResult(Outcome.MISS, "nothing stored")

    real_load_pipeline = load_pipeline

    def load_pipeline_seeing_the_restore(*args, **kwargs):
        assert restore_started.wait(timeout=30), "the restore had not started before the weights"
        weights_loading.set()
        return real_load_pipeline(*args, **kwargs)

    fake_compile(monkeypatch, new_graphs=0)
    monkeypatch.setattr("model.model.choose_backend", lambda *args, **kwargs: Slow())
    monkeypatch.setattr("model.model.load_pipeline", load_pipeline_seeing_the_restore)
    for key, value in {**TINY_EAGER, "FLUX_COMPILE": "1"}.items():
        monkeypatch.setenv(key, value)
    model = Model(config={"model_metadata": config_metadata()})
    model.load()
    assert model.cold_start.restore.outcome is Outcome.MISS


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
