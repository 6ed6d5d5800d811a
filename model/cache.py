"""Compile-cache backends behind one small interface: b10-transfer, legacy b10-tcache, a local directory, none.

Every backend archives TorchInductor's cache directory, which holds the compiled graphs and their
kernels: restoring it lets Inductor skip code generation and the C++/Triton compiles. Measured on
the tiny model, a restored directory made a hit 5x faster than torch's Mega-Cache (BENCHMARKS.md).

No backend ever raises: every failure is logged and reported as an outcome, and load() compiles
from scratch and serves.
"""

from __future__ import annotations

import enum
import hashlib
import importlib
import importlib.util
import json
import logging
import os
import platform
import shutil
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger(__name__)

B10FS_ROOT = Path("/cache/model")  # Baseten's shared cache volume; b10-transfer requires its paths under it
B10FS_CACHE_SUBDIR = "compile_cache"
B10_TRANSFER_MAX_MB = 1024  # b10-transfer's default MAX_CACHE_SIZE_MB: larger archives are refused
ARCHIVE_NAME = "inductor.tar"


class Outcome(enum.Enum):
    HIT = "hit"  # artifacts restored into the inductor directory
    PRESENT = "present"  # the inductor directory already had artifacts (a retried load)
    MISS = "miss"  # nothing stored for this fingerprint yet
    SAVED = "saved"
    EXISTS = "exists"  # a save found an archive for this fingerprint already stored
    DISABLED = "disabled"
    ERROR = "error"


@dataclass(frozen=True)
class CacheResult:
    outcome: Outcome
    detail: str = ""
    seconds: float = 0.0
    size_bytes: int = 0


class CompileCache(Protocol):
    name: str

    def restore(self) -> CacheResult: ...

    def save(self) -> CacheResult: ...


def inductor_cache_dir() -> Path:
    """Where TorchInductor reads and writes its cache (TORCHINDUCTOR_CACHE_DIR, else its default)."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return Path(cache_dir())


def directory_size(path: Path) -> int:
    if not path.is_dir():
        return 0
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def redundant_kernel_dir(inductor_dir: Path) -> Path | None:
    """Triton's directory under the inductor cache when it duplicates what the FX-graph entries hold, else None.

    With bundle_triton_into_fx_graph_cache (on by default), every FX-graph entry carries its Triton kernels and
    a cache hit writes them back to this directory, so archiving it stores each kernel twice.
    """
    from torch._inductor.triton_bundler import TritonBundler

    kernels = inductor_dir / "triton"
    return kernels if TritonBundler.is_enabled() and kernels.is_dir() else None


def archived_bytes(inductor_dir: Path) -> int:
    """The bytes of the inductor directory that a save archives: all of it but the redundant kernel copies."""
    kernels = redundant_kernel_dir(inductor_dir)
    return directory_size(inductor_dir) - (directory_size(kernels) if kernels else 0)


@contextmanager
def redundant_kernels_set_aside(inductor_dir: Path) -> Iterator[None]:
    """Move the redundant kernel copies out of the inductor directory while a backend archives it.

    Every backend archives the whole directory (b10-transfer offers no filter); moving within one file
    system is instant, and the copies come back afterwards, whatever the save did.
    """
    kernels = redundant_kernel_dir(inductor_dir)
    if kernels is None:
        yield
        return
    aside = Path(tempfile.mkdtemp(prefix=".kernels-", dir=inductor_dir.parent))
    os.replace(kernels, aside / kernels.name)
    try:
        yield
    finally:
        os.replace(aside / kernels.name, kernels)
        aside.rmdir()


def _has_artifacts(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def fingerprint(facts: Mapping[str, Any]) -> str:
    """A short hash of everything that shapes the compiled artifacts, plus the library versions."""
    versions = {}
    for package in ("torch", "diffusers", "transformers", "triton"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu-{platform.machine()}"
    payload = {**facts, "versions": versions, "python": platform.python_version(), "device": device}
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()
    return digest[:16]


class NoCache:
    name = "none"

    def restore(self) -> CacheResult:
        return CacheResult(Outcome.DISABLED, "compile cache disabled")

    def save(self) -> CacheResult:
        return CacheResult(Outcome.DISABLED, "compile cache disabled")


class LocalDirectoryCache:
    """One tar archive of the inductor directory per fingerprint, written atomically (temp file, then rename)."""

    name = "local"

    def __init__(self, root: Path, key: str, inductor_dir: Path | None = None) -> None:
        self.archive = root / key / ARCHIVE_NAME
        self._inductor_dir = inductor_dir

    @property
    def inductor_dir(self) -> Path:
        return self._inductor_dir or inductor_cache_dir()

    def restore(self) -> CacheResult:
        started = time.perf_counter()
        target = self.inductor_dir
        try:
            if not self.archive.is_file():
                return CacheResult(Outcome.MISS, f"no archive at {self.archive}")
            if _has_artifacts(target):
                return CacheResult(Outcome.PRESENT, f"{target} already holds artifacts")
            size = self.archive.stat().st_size
            _extract_atomically(self.archive, target)
        except Exception as exc:  # a corrupt archive or an unreadable directory must not stop the server
            return CacheResult(Outcome.ERROR, f"restore from {self.archive} failed: {exc!r}")
        return CacheResult(Outcome.HIT, f"restored {self.archive}", time.perf_counter() - started, size)

    def save(self) -> CacheResult:
        started = time.perf_counter()
        source = self.inductor_dir
        if not _has_artifacts(source):
            return CacheResult(Outcome.ERROR, f"nothing to save in {source}")
        temporary: Path | None = None
        try:
            self.archive.parent.mkdir(parents=True, exist_ok=True)
            handle, name = tempfile.mkstemp(prefix=".inductor-", suffix=".tar.partial", dir=self.archive.parent)
            temporary = Path(name)
            with os.fdopen(handle, "wb") as raw, tarfile.open(fileobj=raw, mode="w") as archive:
                archive.add(source, arcname=".")
                raw.flush()
                os.fsync(raw.fileno())
            os.replace(temporary, self.archive)
            temporary = None
        except Exception as exc:  # a full disk or an unwritable directory: keep serving
            return CacheResult(Outcome.ERROR, f"save to {self.archive} failed: {exc!r}")
        finally:
            if temporary is not None:
                temporary.unlink(missing_ok=True)
        size = self.archive.stat().st_size
        return CacheResult(Outcome.SAVED, f"saved {self.archive}", time.perf_counter() - started, size)


def _extract_atomically(archive_path: Path, target: Path) -> None:
    """Extract next to `target`, then move the entries in: a broken archive leaves `target` untouched."""
    target.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".restore-", dir=target.parent))
    try:
        with tarfile.open(archive_path, mode="r") as archive:
            archive.extractall(staging, filter="data")
        for entry in staging.iterdir():
            os.replace(entry, target / entry.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextmanager
def _environment(values: Mapping[str, str]) -> Iterator[None]:
    """Set environment variables for the duration of a call; b10-transfer reads its settings from them."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class B10TransferCache:
    """Baseten's b10-transfer. Its calls return OperationStatus, whose members are all truthy, so each is mapped.

    b10-transfer keys archives only by GPU and CUDA version and skips a save when an archive exists,
    so every fingerprint gets its own B10FS_CACHE_DIR: a changed config starts a fresh archive.
    """

    name = "b10-transfer"

    # load_compile_cache() status -> what load() does next (the README's table).
    RESTORE_OUTCOMES = {"SUCCESS": Outcome.HIT, "SKIPPED": Outcome.PRESENT, "DOES_NOT_EXIST": Outcome.MISS}
    # save_compile_cache() status -> outcome. SKIPPED: an archive for this fingerprint exists, or nothing to save.
    SAVE_OUTCOMES = {"SUCCESS": Outcome.SAVED, "SKIPPED": Outcome.EXISTS}

    def __init__(self, key: str, root: Path = B10FS_ROOT) -> None:
        self.directory = root / B10FS_CACHE_SUBDIR / key

    def _call(
        self, function_name: str, outcomes: Mapping[str, Outcome], before: Callable[[], None] | None = None
    ) -> CacheResult:
        started = time.perf_counter()
        try:
            module = importlib.import_module("b10_transfer")
            if before is not None:
                before()
            with _environment({"B10FS_CACHE_DIR": str(self.directory)}):
                status = getattr(module, function_name)()
        except Exception as exc:  # b10fs unavailable, permissions, or a bug in the library: keep serving
            return CacheResult(Outcome.ERROR, f"b10-transfer {function_name} raised {exc!r}")
        status_name = getattr(status, "name", str(status))
        outcome = outcomes.get(status_name, Outcome.ERROR)
        return CacheResult(
            outcome, f"b10-transfer {function_name} returned {status_name}", time.perf_counter() - started
        )

    def _prepare_save(self) -> None:
        """Create this fingerprint's directory, and warn when the archive would exceed b10-transfer's cap."""
        self.directory.mkdir(parents=True, exist_ok=True)
        size_mb = directory_size(inductor_cache_dir()) / 2**20
        limit = int(os.environ.get("MAX_CACHE_SIZE_MB", B10_TRANSFER_MAX_MB))
        if size_mb > limit:
            log.warning(
                "inductor cache is %.0f MB, over b10-transfer's %d MB limit: the save will fail", size_mb, limit
            )

    def restore(self) -> CacheResult:
        return self._call("load_compile_cache", self.RESTORE_OUTCOMES)

    def save(self) -> CacheResult:
        return self._call("save_compile_cache", self.SAVE_OUTCOMES, before=self._prepare_save)


class LegacyTcacheCache:
    """b10-tcache, b10-transfer's predecessor, where the calls return a bool."""

    name = "b10-tcache"

    def _call(self, function_name: str, success: Outcome, failure: Outcome) -> CacheResult:
        started = time.perf_counter()
        try:
            ok = getattr(importlib.import_module("b10_tcache"), function_name)()
        except Exception as exc:
            return CacheResult(Outcome.ERROR, f"b10-tcache {function_name} raised {exc!r}")
        if type(ok) is not bool:
            return CacheResult(Outcome.ERROR, f"b10-tcache {function_name} returned {ok!r}, not a bool")
        return CacheResult(
            success if ok else failure, f"b10-tcache {function_name} returned {ok}", time.perf_counter() - started
        )

    def restore(self) -> CacheResult:
        return self._call("load_compile_cache", Outcome.HIT, Outcome.MISS)

    def save(self) -> CacheResult:
        return self._call("save_compile_cache", Outcome.SAVED, Outcome.ERROR)


BACKENDS = ("auto", "b10-transfer", "b10-tcache", "local", "none")


def on_baseten_cache_volume() -> bool:
    """Baseten sets BASETEN_FS_ENABLED=1 where b10fs is mounted; b10-transfer refuses to work without it."""
    return os.environ.get("BASETEN_FS_ENABLED") == "1"


def choose_backend(name: str, key: str, local_root: Path) -> CompileCache:
    """The named backend; "auto" is b10-transfer on Baseten's cache volume and the local directory elsewhere."""
    if name == "auto":
        if on_baseten_cache_volume():
            if importlib.util.find_spec("b10_transfer"):
                name = "b10-transfer"
            elif importlib.util.find_spec("b10_tcache"):
                name = "b10-tcache"
            else:
                name = "local"
        else:
            name = "local"
    if name == "b10-transfer":
        return B10TransferCache(key)
    if name == "b10-tcache":
        return LegacyTcacheCache()
    if name == "local":
        return LocalDirectoryCache(local_root, key)
    if name == "none":
        return NoCache()
    raise ValueError(f"unknown cache backend {name!r}; choose one of {', '.join(BACKENDS)}")
