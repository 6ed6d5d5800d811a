"""load()'s sequence: restore the compile cache, compile, warm up every served shape, save when new.

The restore needs only the cache key, not the weights, so it runs on a thread while the weights load
(`restore_in_background`), and `prepare` joins it before compiling.

Neither the cache nor the compiler can fail a deployment: cache problems are logged and cost a
compile from scratch; a compile or warm-up failure falls back to eager with a loud log.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from model.cache import (
    CacheResult,
    CompileCache,
    Outcome,
    archived_bytes,
    set_aside_what_a_hit_never_reads,
)
from model.compat import inductor_cache_dir
from model.compile import CompileSettings, WarmupReport, compile_pipeline, warm_up
from model.engine import FluxEngine

log = logging.getLogger(__name__)


@dataclass
class ColdStartReport:
    """What load() did and how long each phase took; bench/cold_start.py prints it."""

    backend: str
    restore: CacheResult | None = None
    save: CacheResult | None = None
    compiled: bool = False
    eager_fallback_reason: str | None = None
    weights_s: float = 0.0
    # The part of the restore that load() waited for after the weights were in; restore.seconds is all of it.
    restore_s: float = 0.0
    compile_warmup_s: float = 0.0
    save_s: float = 0.0
    warmup: WarmupReport = field(default_factory=WarmupReport)
    cache_bytes: int = 0


def _logged(action: str, result: CacheResult) -> CacheResult:
    level = logging.WARNING if result.outcome is Outcome.ERROR else logging.INFO
    log.log(level, "compile cache %s: %s (%s, %.1f s)", action, result.outcome.value, result.detail, result.seconds)
    return result


def restore_in_background(cache: CompileCache, compile_settings: CompileSettings) -> Future[CacheResult] | None:
    """Start restoring the compile cache on a thread; None when nothing will be compiled."""
    if not compile_settings.enabled:
        return None
    log.info("compile cache restore started (%s), alongside the weights", cache.name)
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="compile-cache-restore")
    restoring = executor.submit(cache.restore)
    executor.shutdown(wait=False)  # the thread ends with the restore
    return restoring


def _joined(restoring: Future[CacheResult]) -> CacheResult:
    try:
        return restoring.result()
    except Exception as exc:  # backends report failures as outcomes; anything else still only costs a compile
        return CacheResult(Outcome.ERROR, f"restore raised {exc!r}")


def prepare(
    engine: FluxEngine,
    compile_settings: CompileSettings,
    cache: CompileCache,
    key: str,
    restoring: Future[CacheResult] | None = None,
) -> ColdStartReport:
    """Restore (or join `restoring`), compile, warm up and save; returns what happened. The engine serves in every
    outcome.

    `key` is the fingerprint of what shapes the compiled artifacts (model.cache.fingerprint).
    """
    report = ColdStartReport(backend=cache.name)
    if not compile_settings.enabled:
        log.info("torch.compile disabled: serving eager")
        return report

    started = time.perf_counter()
    report.restore = _logged("restore", _joined(restoring) if restoring is not None else cache.restore())
    report.restore_s = time.perf_counter() - started

    started = time.perf_counter()
    undo = None
    try:
        undo = compile_pipeline(engine.pipe, compile_settings, shapes=len(engine.shapes()), key=key)
        report.warmup = warm_up(engine, compile_settings.warmup_runs)
        report.compiled = True
    except Exception as exc:
        log.exception("COMPILE FAILED, serving EAGER (slower) instead: %r", exc)
        report.eager_fallback_reason = repr(exc)
        if undo is not None:
            undo()
        return report
    finally:
        report.compile_warmup_s = time.perf_counter() - started

    log.info(
        "compile and warm-up took %.1f s; new graphs compiled: %d",
        report.compile_warmup_s,
        report.warmup.compiled.fxgraph_misses,
    )
    if report.warmup.compiled_new:
        started = time.perf_counter()
        report.save = _save(cache, compile_settings.precompile)
        report.save_s = time.perf_counter() - started
    report.cache_bytes = _archived_bytes(compile_settings.precompile)
    return report


def _save(cache: CompileCache, precompiled: bool) -> CacheResult:
    """Save without what a hit never reads; a failure to move it aside costs the save, never the deployment."""
    saved: CacheResult | None = None
    try:
        with set_aside_what_a_hit_never_reads(inductor_cache_dir(), precompiled):
            saved = _logged("save", cache.save())
    except Exception as exc:
        if saved is None:
            # Saving with the copies in place would archive every kernel twice (346 MB instead of 100 MB on an
            # H200, BENCHMARKS.md), which can pass b10-transfer's size limit: skip the save instead.
            return _logged("save", CacheResult(Outcome.ERROR, f"could not set aside what a hit never reads: {exc!r}"))
        # Only this process's own copies are at stake: compiled entries carry their kernels, and a hit rewrites them.
        log.warning("compile cache: could not move what was set aside back: %r", exc)
    return saved


def _archived_bytes(precompiled: bool) -> int:
    """The size of what a save archives, for the report; 0 when the directory cannot be measured."""
    try:
        return archived_bytes(inductor_cache_dir(), precompiled)
    except Exception as exc:  # e.g. files vanishing during the walk: only a figure in the report is lost
        log.warning("compile cache: could not measure the inductor directory: %r", exc)
        return 0
