"""The compile cache's restore, started first in load() on a thread of its own.

It needs only the cache key, not the weights or the engine's imports (diffusers, transformers), so model.model
starts it before importing them: the archive's copy and extraction, which hold no Python lock, run beside those
imports and the weights, and load() waits only for what is left of it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from model.artifacts import CompileArtifacts
from model.cache import CacheResult, CompileCache, Outcome, choose_backend
from model.settings import Settings

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class PendingRestore:
    """The compile cache of one configuration, and its restore running on a thread (None: nothing to compile)."""

    cache: CompileCache
    artifacts: CompileArtifacts
    future: Future[CacheResult] | None


def begin_restore(settings: Settings) -> PendingRestore:
    """Start restoring the compile cache of `settings` (resolved for this GPU) on a thread."""
    artifacts = CompileArtifacts.here(settings.fingerprint_facts())
    cache = choose_backend(settings.cache_backend, artifacts, settings.cache_dir)
    if not settings.compile_settings.enabled:
        return PendingRestore(cache, artifacts, None)
    log.info("compile cache restore started (%s), alongside the imports and the weights", cache.name)
    # Whatever the restore reads from the process (b10-transfer: its environment) is set here, on this thread,
    # before the restore's thread starts: setenv racing getenv in native code on the weights' thread is not safe.
    return PendingRestore(cache, artifacts, on_a_thread(cache.prepared_restore(), "compile-cache-restore"))


def on_a_thread(work: Callable[[], T], name: str) -> Future[T]:
    """`work` running on a thread of its own, which ends with it."""
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
    future = executor.submit(work)
    executor.shutdown(wait=False)
    return future


def joined(restoring: Future[CacheResult]) -> CacheResult:
    """The restore's outcome, once it is done."""
    try:
        return restoring.result()
    except Exception as exc:  # backends report failures as outcomes; anything else still only costs a compile
        return CacheResult(Outcome.ERROR, f"restore raised {exc!r}")
