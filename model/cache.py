"""Compile-cache backends behind one small interface: b10-transfer, a local directory, none.

Every backend archives TorchInductor's cache directory, which holds the compiled graphs and their
kernels: restoring it lets Inductor skip code generation and the C++/Triton compiles. Measured on
the tiny model, a restored directory made a hit 5x faster than torch's Mega-Cache (BENCHMARKS.md).

No backend ever raises: every failure is logged and reported as an outcome, and load() compiles
from scratch and serves.
"""

from __future__ import annotations

import enum
import importlib
import logging
import os
import shutil
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol, get_args

from model.artifacts import CompileArtifacts
from model.compat import b10fs_enabled_by_b10_transfer, triton_kernels_bundled
from model.settings import CacheBackend

log = logging.getLogger(__name__)

B10FS_ROOT = Path("/cache/model")  # Baseten's shared cache volume; b10-transfer requires its paths under it
B10FS_CACHE_SUBDIR = "compile_cache"
GENERATION_PREFIX = "generation-"
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

    def prepared_restore(self) -> Callable[[], CacheResult]:
        """Set up on the calling thread whatever the restore reads from the process, and return the restore itself,
        which may then run on another thread."""
        ...

    def restore(self) -> CacheResult: ...

    def save(self) -> CacheResult: ...


def directory_size(path: Path) -> int:
    if not path.is_dir():
        return 0
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def unread_on_a_hit(inductor_dir: Path) -> list[Path]:
    """Directories under the inductor cache that a cache hit never reads, so an archive need not carry them.

    - triton/: with bundle_triton_into_fx_graph_cache (on by default) every compiled entry carries its Triton
      kernels, and a hit writes them back here, so archiving it stores each kernel twice.
    - aotautograd/ and fxgraph/: a hit loads each region's saved function (model.precompile), which carries its own
      compiled code, and never looks these entries up: they were close to half of the archive (BENCHMARKS.md).
    """
    names = (["triton"] if triton_kernels_bundled() else []) + ["aotautograd", "fxgraph"]
    return [inductor_dir / name for name in names if (inductor_dir / name).is_dir()]


def archived_bytes(inductor_dir: Path) -> int:
    """The bytes of the inductor directory that a save archives: all of it but what a hit never reads."""
    unread = unread_on_a_hit(inductor_dir)
    return directory_size(inductor_dir) - sum(directory_size(path) for path in unread)


@contextmanager
def set_aside_what_a_hit_never_reads(inductor_dir: Path) -> Iterator[None]:
    """Move what a hit never reads out of the inductor directory while a backend archives it.

    Every backend archives the whole directory (b10-transfer offers no filter); moving within one file
    system is instant, and everything comes back afterwards, whatever the save did.
    """
    unread = unread_on_a_hit(inductor_dir)
    if not unread:
        yield
        return
    aside = Path(tempfile.mkdtemp(prefix=".set-aside-", dir=inductor_dir.parent))
    moved: list[Path] = []
    try:
        for path in unread:
            os.replace(path, aside / path.name)
            moved.append(path)
        yield
    finally:
        for path in moved:
            os.replace(aside / path.name, path)
        aside.rmdir()


def _has_artifacts(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


class NoCache:
    name = "none"

    def prepared_restore(self) -> Callable[[], CacheResult]:
        return self.restore

    def restore(self) -> CacheResult:
        return CacheResult(Outcome.DISABLED, "compile cache disabled")

    def save(self) -> CacheResult:
        return CacheResult(Outcome.DISABLED, "compile cache disabled")


class LocalDirectoryCache:
    """One tar archive of the inductor directory per fingerprint, written atomically (temp file, then rename)."""

    name = "local"

    def __init__(self, root: Path, artifacts: CompileArtifacts) -> None:
        self.archive = root / artifacts.key / ARCHIVE_NAME
        self.inductor_dir = artifacts.inductor_dir

    def prepared_restore(self) -> Callable[[], CacheResult]:
        return self.restore

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


class B10TransferCache:
    """Baseten's b10-transfer. Its calls return OperationStatus, whose members are all truthy, so each is mapped.

    b10-transfer keys an archive only by GPU and CUDA version, and skips a save when that archive exists. So every
    fingerprint gets its own directory (a changed config starts afresh), and inside it numbered generations: a save
    always writes the generation after the newest stored one. A hit that still compiled something new therefore
    reaches the volume instead of being skipped, and every later start restores the fuller archive.
    """

    name = "b10-transfer"

    # load_compile_cache() status -> what load() does next (the README's table).
    RESTORE_OUTCOMES = {"SUCCESS": Outcome.HIT, "SKIPPED": Outcome.PRESENT, "DOES_NOT_EXIST": Outcome.MISS}
    # save_compile_cache() status -> outcome. SKIPPED: another replica stored this generation first.
    SAVE_OUTCOMES = {"SUCCESS": Outcome.SAVED, "SKIPPED": Outcome.EXISTS}
    # A save keeps the generation before its own, and any older one superseded less than this long ago: a replica
    # picks the newest generation when its restore starts and copies it out in seconds (1.8 s for 24 MB on an H200's
    # host, BENCHMARKS.md), so a generation nobody has picked for this long has no reader left.
    KEPT_GENERATIONS = 2
    READERS_GONE_AFTER_S = 3600.0

    def __init__(self, artifacts: CompileArtifacts, root: Path = B10FS_ROOT) -> None:
        # b10-transfer itself archives TORCHINDUCTOR_CACHE_DIR, which is where artifacts.inductor_dir comes from.
        self.artifacts = artifacts
        self.directory = root / B10FS_CACHE_SUBDIR / artifacts.key

    def generation_dir(self, generation: int) -> Path:
        return self.directory / f"{GENERATION_PREFIX}{generation}"

    def _generation_dirs(self) -> dict[int, Path]:
        """Every generation's directory by its number, whether or not it holds an archive yet."""
        try:
            entries = list(self.directory.iterdir())
        except OSError:
            return {}
        numbers = {entry: entry.name.removeprefix(GENERATION_PREFIX) for entry in entries}
        return {
            int(number): entry
            for entry, number in numbers.items()
            if entry.name.startswith(GENERATION_PREFIX) and number.isdigit()
        }

    def stored_generations(self) -> list[int]:
        """Generations holding a complete archive, newest first (b10-transfer renames an archive into place last)."""
        stored = [number for number, path in self._generation_dirs().items() if _b10_archive(path) is not None]
        return sorted(stored, reverse=True)

    @staticmethod
    def _point_b10_transfer_at(directory: Path) -> None:
        """b10-transfer reads its directory from B10FS_CACHE_DIR when called, and takes no argument for it.

        Set from the thread that starts the restore, before the restore's thread exists (`prepared_restore`), and
        from load()'s own thread for the save, when no other thread of this package runs.
        """
        os.environ["B10FS_CACHE_DIR"] = str(directory)

    def _call(self, function_name: str, outcomes: Mapping[str, Outcome], directory: Path) -> CacheResult:
        """Call b10-transfer, which must already be pointed at `directory`."""
        started = time.perf_counter()
        try:
            status = getattr(importlib.import_module("b10_transfer"), function_name)()
        except Exception as exc:  # b10fs unavailable, permissions, or a bug in the library: keep serving
            return CacheResult(Outcome.ERROR, f"b10-transfer {function_name} raised {exc!r}")
        status_name = getattr(status, "name", str(status))
        outcome = outcomes.get(status_name, Outcome.ERROR)
        archive = _b10_archive(directory)
        return CacheResult(
            outcome,
            f"b10-transfer {function_name} returned {status_name} for {directory}",
            time.perf_counter() - started,
            archive.stat().st_size if archive is not None else 0,
        )

    def prepared_restore(self) -> Callable[[], CacheResult]:
        stored = self.stored_generations()
        directory = self.generation_dir(stored[0] if stored else 0)
        self._point_b10_transfer_at(directory)
        return lambda: self._call("load_compile_cache", self.RESTORE_OUTCOMES, directory)

    def restore(self) -> CacheResult:
        return self.prepared_restore()()

    def save(self) -> CacheResult:
        stored = self.stored_generations()
        generation = stored[0] + 1 if stored else 0
        directory = self.generation_dir(generation)
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            return CacheResult(Outcome.ERROR, f"could not create {directory}: {exc!r}")
        self._point_b10_transfer_at(directory)
        result = self._call("save_compile_cache", self.SAVE_OUTCOMES, directory)
        if result.outcome is Outcome.SAVED:
            self._drop_unread_generations(generation - self.KEPT_GENERATIONS + 1)
            _warn_near_b10_transfer_cap(result.size_bytes)
        elif result.outcome is Outcome.ERROR:
            # b10-transfer logs why on its own logger; the one cause this package can foresee is its size cap.
            uncompressed_mb = directory_size(self.artifacts.inductor_dir) / 2**20
            result = replace(
                result, detail=f"{result.detail} (inductor directory {uncompressed_mb:.0f} MB before compression)"
            )
        return result

    def _drop_unread_generations(self, oldest_kept: int) -> None:
        """Remove each generation before `oldest_kept` whose successor was stored over READERS_GONE_AFTER_S ago.

        A replica reads the generation that was newest when its restore began, so once a newer one exists a
        generation gains no readers; a restore still copying it out when it is removed would fail and cost that
        replica a compile. The wait outlasts any restore, so no reader is cut off; the next save removes the rest.
        """
        generations = self._generation_dirs()
        stored = {n: archive for n, path in generations.items() if (archive := _b10_archive(path)) is not None}
        now = time.time()
        for number, path in generations.items():
            successor = min((n for n in stored if n > number), default=None)
            if number >= oldest_kept or successor is None:
                continue
            try:
                superseded_s = now - stored[successor].stat().st_mtime
            except OSError:
                continue
            if superseded_s > self.READERS_GONE_AFTER_S:
                shutil.rmtree(path, ignore_errors=True)


def _b10_archive(directory: Path) -> Path | None:
    """The complete archive b10-transfer keeps in `directory`, if any (its name carries b10-transfer's own key)."""
    try:
        from b10_transfer.constants import CACHE_FILE_EXTENSION, CACHE_LATEST_SUFFIX
    except ImportError:
        return None
    return next(iter(sorted(directory.glob(f"*{CACHE_LATEST_SUFFIX}{CACHE_FILE_EXTENSION}"))), None)


def _warn_near_b10_transfer_cap(archive_bytes: int) -> None:
    """b10-transfer refuses a compressed archive over MAX_CACHE_SIZE_MB: say so before a growing cache reaches it."""
    try:
        from b10_transfer.config import config

        limit_mb = config.MAX_CACHE_SIZE_MB
    except Exception:  # an unreadable setting only costs the early warning
        return
    archive_mb = archive_bytes / 2**20
    if archive_mb > 0.8 * limit_mb:
        log.warning(
            "compile cache archive is %.0f MB, near b10-transfer's %d MB limit (MAX_CACHE_SIZE_MB) on archives",
            archive_mb,
            limit_mb,
        )


BACKENDS: tuple[str, ...] = get_args(CacheBackend)


@dataclass(frozen=True)
class B10fsCheck:
    enabled: bool
    reason: str
    # The environment asks for b10fs but b10-transfer cannot or will not use it: worth a warning.
    refused: bool = False


def b10fs_enabled() -> B10fsCheck:
    """Whether b10-transfer will work here, decided by b10-transfer's own check, and why.

    It accepts BASETEN_FS_ENABLED spelt "1", "true" or "True", treats "0", "false", "False" and "" as off, and
    refuses every other value. Deciding it any other way could pick the local directory where b10fs works, and a
    local directory does not survive a restart: every replica would pay the full miss.
    """
    value = os.environ.get("BASETEN_FS_ENABLED")
    try:
        enabled = b10fs_enabled_by_b10_transfer()
    except ImportError:
        return B10fsCheck(False, f"b10-transfer is not installed (BASETEN_FS_ENABLED={value!r})", refused=bool(value))
    except Exception as exc:  # b10-transfer raises on a value it does not recognise
        return B10fsCheck(False, f"b10-transfer refuses BASETEN_FS_ENABLED={value!r}: {exc}", refused=True)
    return B10fsCheck(enabled, f"b10-transfer reads BASETEN_FS_ENABLED={value!r} as {'on' if enabled else 'off'}")


def choose_backend(name: str, artifacts: CompileArtifacts, local_root: Path) -> CompileCache:
    """The named backend; "auto" is b10-transfer where b10-transfer says b10fs is on, the local directory elsewhere.

    The choice and its reason are logged: a silent fallback to the local directory turns every cold start into a miss.
    """
    if name == "auto":
        check = b10fs_enabled()
        name = "b10-transfer" if check.enabled else "local"
        log.log(
            logging.WARNING if check.refused else logging.INFO, "compile cache backend: %s (%s)", name, check.reason
        )
    else:
        log.info("compile cache backend: %s (cache_backend setting)", name)
    if name == "b10-transfer":
        return B10TransferCache(artifacts)
    if name == "local":
        return LocalDirectoryCache(local_root, artifacts)
    if name == "none":
        return NoCache()
    raise ValueError(f"unknown cache backend {name!r}; choose one of {', '.join(BACKENDS)}")
