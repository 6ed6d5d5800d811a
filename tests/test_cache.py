"""Compile-cache backends: round trips, the b10-transfer status table, every fault, injected, and a partial hit
through the real b10-transfer with the real compiler."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import tarfile
import threading
import time
import types
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from b10_transfer import OperationStatus

from model.artifacts import CompileArtifacts, fingerprint
from model.cache import (
    B10TransferCache,
    LocalDirectoryCache,
    NoCache,
    Outcome,
    archived_bytes,
    choose_backend,
    set_aside_what_a_hit_never_reads,
)
from model.settings import Settings

# The inductor directory of tests that never read it.
INDUCTOR = Path("/tmp/unused-inductor")


def fill_with(directory: Path, files: dict[str, bytes]) -> dict[str, bytes]:
    for name, content in files.items():
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_bytes(content)
    return files


def fill(directory: Path) -> dict[str, bytes]:
    """A stand-in inductor directory: nested files of known content."""
    return fill_with(directory, {"fxgraph/ab/entry": b"graph" * 100, "cpp/k.so": os.urandom(2048), "top.json": b"{}"})


def contents(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in directory.rglob("*") if p.is_file()}


@pytest.fixture
def inductor(tmp_path: Path) -> Path:
    path = tmp_path / "inductor"
    path.mkdir()
    return path


def local(tmp_path: Path, inductor: Path, key: str = "k1") -> LocalDirectoryCache:
    return LocalDirectoryCache(tmp_path / "store", CompileArtifacts(inductor, key))


# --- the local directory -------------------------------------------------------------------------


def test_local_miss_save_then_hit_restores_every_file(tmp_path: Path, inductor: Path) -> None:
    files = fill(inductor)
    cache = local(tmp_path, inductor)
    assert cache.restore().outcome is Outcome.MISS
    saved = cache.save()
    assert saved.outcome is Outcome.SAVED and saved.size_bytes > 0
    assert not list(cache.archive.parent.glob(".inductor-*")), "no temporary file is left behind"
    assert cache.restore().outcome is Outcome.PRESENT, "a retried load keeps the artifacts it has"

    fresh = tmp_path / "fresh-inductor"
    restored = LocalDirectoryCache(tmp_path / "store", CompileArtifacts(fresh, "k1")).restore()
    assert restored.outcome is Outcome.HIT
    assert contents(fresh) == files


@pytest.mark.parametrize("bundled", [True, False])
def test_an_archive_leaves_out_only_what_a_hit_never_reads(tmp_path: Path, inductor: Path, bundled: bool) -> None:
    from torch._inductor import config

    files = fill_with(inductor, {"precompiled/key/Block.forward-1.bin": os.urandom(2048), "ab/kernel.so": b"so"})
    kernels = fill_with(inductor, {"triton/0/HASH/kernel.cubin": os.urandom(4096)})
    graph_entries = fill_with(inductor, {"aotautograd/ab/entry": os.urandom(1024), "fxgraph/cd/entry": b"g"})
    cache = local(tmp_path, inductor)
    with config.patch(bundle_triton_into_fx_graph_cache=bundled):
        with set_aside_what_a_hit_never_reads(inductor):
            assert cache.save().outcome is Outcome.SAVED
        archived = archived_bytes(inductor)
    assert contents(inductor) == files | kernels | graph_entries, "everything is back after the save"

    fresh = tmp_path / "fresh-inductor"
    assert LocalDirectoryCache(tmp_path / "store", CompileArtifacts(fresh, "k1")).restore().outcome is Outcome.HIT
    expected = files | ({} if bundled else kernels)
    assert contents(fresh) == expected
    assert archived == sum(map(len, contents(fresh).values()))
    assert not list(tmp_path.glob(".set-aside-*")), "nothing is left beside the inductor directory"


def test_what_was_set_aside_comes_back_when_the_save_raises(inductor: Path) -> None:
    from torch._inductor import config

    fill_with(inductor, {"triton/0/HASH/kernel.cubin": b"k", "aotautograd/ab/entry": b"a"})
    with (
        config.patch(bundle_triton_into_fx_graph_cache=True),
        pytest.raises(OSError),
        set_aside_what_a_hit_never_reads(inductor),
    ):
        assert not (inductor / "triton").exists() and not (inductor / "aotautograd").exists()
        raise OSError(errno.ENOSPC, "No space left on device")
    assert contents(inductor) == {"triton/0/HASH/kernel.cubin": b"k", "aotautograd/ab/entry": b"a"}


def test_local_miss_when_nothing_stored(tmp_path: Path, inductor: Path) -> None:
    assert local(tmp_path, inductor).restore().outcome is Outcome.MISS


def test_fingerprints_do_not_share_archives(tmp_path: Path, inductor: Path) -> None:
    fill(inductor)
    local(tmp_path, inductor, "k1").save()
    assert local(tmp_path, tmp_path / "other", "k2").restore().outcome is Outcome.MISS


def test_fingerprint_tracks_what_shapes_the_artifacts() -> None:
    base = Settings.from_sources(environ={"FLUX_MODEL_SOURCE": "tiny"}).resolved(None)
    key = fingerprint(base.fingerprint_facts())
    assert key == fingerprint(base.fingerprint_facts())
    changed = [
        base.model_copy(update={"precision": "fp8"}),
        base.model_copy(update={"compile_any_size": False}),
        base.model_copy(update={"text_lengths": (256,)}),
        base.model_copy(update={"model_source": "full-random"}),
        Settings.from_sources(environ={"FLUX_MODEL_SOURCE": "tiny", "FLUX_RESOLUTIONS": "1024x1024"}).resolved(None),
    ]
    assert len({key, *(fingerprint(s.fingerprint_facts()) for s in changed)}) == len(changed) + 1
    # What only shapes requests, not the compiled code, stays out of the key.
    assert fingerprint(base.model_copy(update={"prompt_cache_mb": 0}).fingerprint_facts()) == key


@pytest.mark.parametrize("damage", ["corrupt", "truncated", "empty"])
def test_damaged_archive_is_an_error_and_leaves_the_directory_clean(
    tmp_path: Path, inductor: Path, damage: str
) -> None:
    fill(inductor)
    cache = local(tmp_path, inductor)
    cache.save()
    data = cache.archive.read_bytes()
    damaged = {"corrupt": os.urandom(len(data)), "truncated": data[: len(data) // 2], "empty": b""}[damage]
    cache.archive.write_bytes(damaged)
    fresh = tmp_path / "fresh"
    result = LocalDirectoryCache(tmp_path / "store", CompileArtifacts(fresh, "k1")).restore()
    assert result.outcome is Outcome.ERROR, result
    assert not fresh.exists() or not any(fresh.iterdir()), "a failed restore must not leave partial artifacts"


def test_unreadable_cache_directory_is_an_error(tmp_path: Path, inductor: Path) -> None:
    # A file where the store's directory should be: reads and writes fail even as root.
    blocker = tmp_path / "store"
    blocker.write_text("not a directory")
    fill(inductor)
    cache = local(tmp_path, inductor)
    assert cache.save().outcome is Outcome.ERROR
    cache.archive = blocker / "k1" / "inductor.tar"
    assert cache.restore().outcome is Outcome.MISS


def test_restore_into_an_unwritable_location_is_an_error(tmp_path: Path, inductor: Path) -> None:
    fill(inductor)
    local(tmp_path, inductor).save()
    blocked_parent = tmp_path / "file"
    blocked_parent.write_text("x")
    result = LocalDirectoryCache(tmp_path / "store", CompileArtifacts(blocked_parent / "inductor", "k1")).restore()
    assert result.outcome is Outcome.ERROR


def test_full_disk_on_save_is_an_error_and_keeps_the_old_archive(
    tmp_path: Path, inductor: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fill(inductor)
    cache = local(tmp_path, inductor)
    cache.save()
    before = cache.archive.read_bytes()

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tarfile.TarFile, "add", disk_full)
    result = cache.save()
    assert result.outcome is Outcome.ERROR and "No space left" in result.detail
    assert cache.archive.read_bytes() == before
    assert not list(cache.archive.parent.glob(".inductor-*"))


def test_saving_an_empty_directory_is_an_error(tmp_path: Path, inductor: Path) -> None:
    assert local(tmp_path, inductor).save().outcome is Outcome.ERROR


def test_no_cache_does_nothing() -> None:
    assert NoCache().restore().outcome is Outcome.DISABLED
    assert NoCache().save().outcome is Outcome.DISABLED


# --- b10-transfer: the status table ---------------------------------------------------------------


def fake_module(monkeypatch: pytest.MonkeyPatch, name: str, load: object, save: object) -> types.SimpleNamespace:
    """Inject a module whose two calls return (or raise) what the test says, recording B10FS_CACHE_DIR."""
    seen = types.SimpleNamespace(dirs=[])

    def call(result: object):
        def function():
            seen.dirs.append(os.environ.get("B10FS_CACHE_DIR"))
            if isinstance(result, Exception):
                raise result
            return result

        return function

    module = types.ModuleType(name)
    module.load_compile_cache = call(load)
    module.save_compile_cache = call(save)
    monkeypatch.setitem(sys.modules, name, module)
    return seen


RESTORE_TABLE = {
    OperationStatus.SUCCESS: Outcome.HIT,
    OperationStatus.SKIPPED: Outcome.PRESENT,
    OperationStatus.DOES_NOT_EXIST: Outcome.MISS,
    OperationStatus.ERROR: Outcome.ERROR,
}
SAVE_TABLE = {
    OperationStatus.SUCCESS: Outcome.SAVED,
    OperationStatus.SKIPPED: Outcome.EXISTS,
    OperationStatus.DOES_NOT_EXIST: Outcome.ERROR,
    OperationStatus.ERROR: Outcome.ERROR,
}


def test_every_status_is_truthy_which_is_why_they_are_mapped() -> None:
    assert all(bool(status) for status in OperationStatus)
    assert set(RESTORE_TABLE) == set(OperationStatus) == set(SAVE_TABLE)


@pytest.mark.parametrize("status", list(OperationStatus))
def test_b10_transfer_status_table(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, status: OperationStatus) -> None:
    seen = fake_module(monkeypatch, "b10_transfer", load=status, save=status)
    monkeypatch.setenv("B10FS_CACHE_DIR", "/cache/model/untouched")
    cache = B10TransferCache(CompileArtifacts(INDUCTOR, "feedc0de"), root=tmp_path)
    assert cache.restore().outcome is RESTORE_TABLE[status]
    assert cache.save().outcome is SAVE_TABLE[status]
    first_generation = tmp_path / "compile_cache" / "feedc0de" / "generation-0"
    assert seen.dirs == [str(first_generation)] * 2, "each fingerprint has its own directory"


class RecordingEnviron(dict):
    """os.environ's stand-in: which threads wrote to it."""

    def __init__(self, values: dict[str, str]) -> None:
        super().__init__(values)
        self.writers: list[str] = []

    def __setitem__(self, key: str, value: str) -> None:
        self.writers.append(threading.current_thread().name)
        super().__setitem__(key, value)


def test_the_restore_thread_never_writes_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # setenv racing getenv in native code (the weights load meanwhile) is not safe: the restore's thread only reads.
    environ = RecordingEnviron(dict(os.environ))
    monkeypatch.setattr(os, "environ", environ)
    seen = fake_module(monkeypatch, "b10_transfer", load=OperationStatus.SUCCESS, save=OperationStatus.SUCCESS)
    cache = B10TransferCache(CompileArtifacts(INDUCTOR, "feedc0de"), root=tmp_path)
    restore = cache.prepared_restore()
    with ThreadPoolExecutor(1, thread_name_prefix="restore") as pool:
        assert pool.submit(restore).result().outcome is Outcome.HIT
    assert environ.writers and all(name == threading.current_thread().name for name in environ.writers)
    assert seen.dirs == [str(tmp_path / "compile_cache" / "feedc0de" / "generation-0")]


def test_b10_transfer_raising_is_an_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake_module(monkeypatch, "b10_transfer", load=OSError("b10fs unavailable"), save=RuntimeError("boom"))
    cache = B10TransferCache(CompileArtifacts(INDUCTOR, "k"), root=tmp_path)
    assert cache.restore().outcome is Outcome.ERROR
    assert cache.save().outcome is Outcome.ERROR


# --- choosing a backend ---------------------------------------------------------------------------


# b10-transfer's own reading of BASETEN_FS_ENABLED (b10_transfer.utils): on, off, or refused with an error.
B10FS_SPELLINGS = {
    "1": "on",
    "true": "on",
    "True": "on",
    "0": "off",
    "false": "off",
    "False": "off",
    "": "off",
    None: "off",
    "yes": "refused",
    "TRUE": "refused",
    "on": "refused",
    " 1": "refused",
    "2": "refused",
}


def set_b10fs_enabled(monkeypatch: pytest.MonkeyPatch, value: str | None) -> None:
    if value is None:
        monkeypatch.delenv("BASETEN_FS_ENABLED", raising=False)
    else:
        monkeypatch.setenv("BASETEN_FS_ENABLED", value)


@pytest.mark.parametrize(("value", "reading"), B10FS_SPELLINGS.items())
def test_auto_reads_baseten_fs_enabled_as_b10_transfer_does(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture, value: str | None, reading: str
) -> None:
    set_b10fs_enabled(monkeypatch, value)
    with caplog.at_level("INFO", logger="model.cache"):
        backend = choose_backend("auto", CompileArtifacts(INDUCTOR, "k"), tmp_path)
    assert isinstance(backend, B10TransferCache if reading == "on" else LocalDirectoryCache)
    (record,) = [r for r in caplog.records if "compile cache backend" in r.getMessage()]
    assert repr(value) in record.getMessage(), "the log names the value it decided on"
    assert record.levelname == ("WARNING" if reading == "refused" else "INFO")


def test_the_spelling_table_is_b10_transfers_own(monkeypatch: pytest.MonkeyPatch) -> None:
    from b10_transfer.utils import CacheValidationError

    from model.compat import b10fs_enabled_by_b10_transfer

    for value, reading in B10FS_SPELLINGS.items():
        set_b10fs_enabled(monkeypatch, value)
        if reading == "refused":
            with pytest.raises(CacheValidationError):
                b10fs_enabled_by_b10_transfer()
        else:
            assert b10fs_enabled_by_b10_transfer() is (reading == "on"), value


def test_auto_without_b10_transfer_installed_warns(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("BASETEN_FS_ENABLED", "1")
    monkeypatch.setitem(sys.modules, "b10_transfer.utils", None)  # makes the import fail
    with caplog.at_level("INFO", logger="model.cache"):
        assert isinstance(choose_backend("auto", CompileArtifacts(INDUCTOR, "k"), tmp_path), LocalDirectoryCache)
    assert "b10-transfer is not installed" in caplog.text and "WARNING" in [r.levelname for r in caplog.records]


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("b10-transfer", B10TransferCache),
        ("local", LocalDirectoryCache),
        ("none", NoCache),
    ],
)
def test_a_setting_overrides_the_choice(tmp_path: Path, name: str, kind: type) -> None:
    assert isinstance(choose_backend(name, CompileArtifacts(INDUCTOR, "k"), tmp_path), kind)


def test_unknown_backend_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown cache backend"):
        choose_backend("redis", CompileArtifacts(INDUCTOR, "k"), tmp_path)


# --- the real b10-transfer, against a local directory under /cache/model ---------------------------


def test_real_b10_transfer_round_trip(b10fs: types.SimpleNamespace) -> None:
    import shutil

    b10fs.inductor.mkdir()
    files = fill(b10fs.inductor)
    cache = B10TransferCache(CompileArtifacts(b10fs.inductor, "roundtrip"), root=b10fs.root)
    assert cache.restore().outcome is Outcome.MISS
    saved = cache.save()
    assert saved.outcome is Outcome.SAVED and saved.size_bytes > 0, "the real, compressed archive size is reported"
    assert cache.stored_generations() == [0]
    assert cache.restore().outcome is Outcome.PRESENT, "a non-empty inductor directory is left alone"

    shutil.rmtree(b10fs.inductor)
    assert cache.restore().outcome is Outcome.HIT
    assert contents(b10fs.inductor) == files
    # Another fingerprint has its own archive: a changed config is never blocked by a stale one.
    assert (
        B10TransferCache(CompileArtifacts(b10fs.inductor, "other-config"), root=b10fs.root).save().outcome
        is Outcome.SAVED
    )


def test_real_b10_transfer_saves_what_a_hit_compiled_as_a_new_generation(b10fs: types.SimpleNamespace) -> None:
    import shutil

    b10fs.inductor.mkdir()
    first = fill(b10fs.inductor)
    cache = B10TransferCache(CompileArtifacts(b10fs.inductor, "generations"), root=b10fs.root)
    assert cache.save().outcome is Outcome.SAVED

    # A later start restores it, compiles one more graph and saves: b10-transfer alone would answer SKIPPED.
    shutil.rmtree(b10fs.inductor)
    assert cache.restore().outcome is Outcome.HIT
    added = fill_with(b10fs.inductor, {"fxgraph/cd/new-entry": b"a graph the first archive lacked"})
    assert cache.save().outcome is Outcome.SAVED
    assert cache.stored_generations() == [1, 0]

    shutil.rmtree(b10fs.inductor)
    assert cache.restore().outcome is Outcome.HIT
    assert contents(b10fs.inductor) == first | added, "the next start restores the newest generation"

    fill_with(b10fs.inductor, {"fxgraph/ef/third": b"x"})
    assert cache.save().outcome is Outcome.SAVED
    # Generation 0 was superseded moments ago: a replica that started its restore before may still be copying it.
    assert cache.stored_generations() == [2, 1, 0], "a generation superseded moments ago stays"

    # Once its successors have been there longer than any restore takes, nobody can still be reading it.
    for generation in (1, 2):
        archive = next(cache.generation_dir(generation).glob("*.tar.gz"))
        aged = time.time() - B10TransferCache.READERS_GONE_AFTER_S - 60
        os.utime(archive, (aged, aged))
    fill_with(b10fs.inductor, {"fxgraph/ef/fourth": b"y"})
    assert cache.save().outcome is Outcome.SAVED
    assert cache.stored_generations() == [3, 2], "only the newest two generations stay once nobody reads the rest"
    assert not cache.generation_dir(0).exists() and not cache.generation_dir(1).exists()


def test_pruning_keeps_a_generation_a_restore_may_still_be_reading(tmp_path: Path) -> None:
    # Without b10-transfer: generations as it leaves them, one complete archive each.
    from b10_transfer.constants import CACHE_FILE_EXTENSION, CACHE_LATEST_SUFFIX

    cache = B10TransferCache(CompileArtifacts(INDUCTOR, "prune"), root=tmp_path)
    now = time.time()
    for generation, age_s in ((0, 7200.0), (1, 30.0), (2, 0.0)):
        archive = cache.generation_dir(generation) / f"key{CACHE_LATEST_SUFFIX}{CACHE_FILE_EXTENSION}"
        archive.parent.mkdir(parents=True)
        archive.write_bytes(b"archive")
        os.utime(archive, (now - age_s, now - age_s))
    cache._drop_unread_generations(oldest_kept=2)
    # Generation 0's successor was stored 30 s ago: a replica may have picked 0 just before and still be copying it.
    assert cache.stored_generations() == [2, 1, 0]
    os.utime(next(cache.generation_dir(1).iterdir()), (now - 7200, now - 7200))
    cache._drop_unread_generations(oldest_kept=2)
    assert cache.stored_generations() == [2, 1]


def test_real_b10_transfer_skips_a_generation_another_replica_stored(b10fs: types.SimpleNamespace) -> None:
    b10fs.inductor.mkdir()
    fill(b10fs.inductor)
    cache = B10TransferCache(CompileArtifacts(b10fs.inductor, "race"), root=b10fs.root)
    real_stored = cache.stored_generations
    # Both replicas looked before either saved; the second finds the first's archive in place.
    cache.stored_generations = lambda: []
    assert cache.save().outcome is Outcome.SAVED
    assert cache.save().outcome is Outcome.EXISTS
    assert real_stored() == [0]


@pytest.mark.parametrize(("value", "reading"), B10FS_SPELLINGS.items())
def test_real_b10_transfer_works_exactly_where_auto_picks_it(
    b10fs: types.SimpleNamespace, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, value: str | None, reading: str
) -> None:
    set_b10fs_enabled(monkeypatch, value)
    picked = choose_backend("auto", CompileArtifacts(b10fs.inductor, "spelling"), tmp_path)
    outcome = B10TransferCache(CompileArtifacts(b10fs.inductor, "spelling"), root=b10fs.root).restore().outcome
    assert isinstance(picked, B10TransferCache) is (outcome is not Outcome.ERROR), (value, outcome)


# --- a partial hit through the real b10-transfer ---------------------------------------------------

# No VAE compile keeps each start's compile short on a CPU.
PARTIAL_ENV = {
    "FLUX_TEXT_LENGTHS": "256",
    "FLUX_COMPILE_ANY_SIZE": "0",
}


def start(resolutions: str, key: str, b10fs_root: str) -> dict:
    """One cold start in this fresh process: load()'s sequence for `resolutions`, under a fixed cache key.

    The key stays the same while the served set grows, as when an archive lacks a graph its configuration needs.
    """
    from model.artifacts import CompileArtifacts
    from model.cache import B10TransferCache
    from model.coldstart import prepare
    from model.compat import inductor_cache_dir
    from model.engine import FluxEngine
    from model.pipeline import load_pipeline
    from model.settings import CompileSettings, Settings

    settings = Settings.from_sources(
        environ={"FLUX_MODEL_SOURCE": "tiny", **PARTIAL_ENV, "FLUX_RESOLUTIONS": resolutions}
    )
    engine = FluxEngine(load_pipeline(settings, device="cpu"), settings.resolutions, settings.text_lengths)
    artifacts = CompileArtifacts(inductor_cache_dir(), key)
    cache = B10TransferCache(artifacts, root=Path(b10fs_root))
    # Without the VAE, whose CPU compile is the slowest and adds nothing to what this checks.
    report = prepare(engine, CompileSettings(vae=False, any_size=False), cache, artifacts)
    return {
        "restore": report.restore.outcome.value,
        "save": report.save.outcome.value if report.save else None,
        "precompiled": report.warmup.compiled.precompiled,
        "precompiled_loaded": report.warmup.compiled.precompiled_loaded,
        "generations": cache.stored_generations(),
    }


def start_in_a_fresh_process(resolutions: str, b10fs: types.SimpleNamespace) -> dict:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": f"/tmp/inductor-partial-{uuid.uuid4().hex[:12]}"}
    code = "import json, sys; from tests.test_cache import start; print(json.dumps(start(*sys.argv[1:])))"
    output = subprocess.run(
        [sys.executable, "-c", code, resolutions, "partial", str(b10fs.root)],
        env=env,
        cwd=Path(__file__).resolve().parent.parent,
        stdout=subprocess.PIPE,
        text=True,
        check=True,
    )
    return json.loads(output.stdout.splitlines()[-1])


@pytest.mark.slow
def test_a_partial_hit_reaches_the_volume_and_the_next_start_compiles_nothing(
    b10fs: types.SimpleNamespace,
) -> None:
    first = start_in_a_fresh_process("256x256", b10fs)
    assert (first["restore"], first["save"], first["generations"]) == ("miss", "saved", [0])

    # The archive lacks 512x256: this start restores it, compiles only the missing shape, and saves it.
    second = start_in_a_fresh_process("256x256,512x256", b10fs)
    assert second["restore"] == "hit"
    assert second["precompiled_loaded"] == first["precompiled"] > 0, "256x256 came from the archive"
    assert second["precompiled"] == first["precompiled"], "only 512x256's regions were compiled"
    assert second["save"] == "saved", "b10-transfer alone would have answered SKIPPED"
    assert second["generations"] == [1, 0]

    third = start_in_a_fresh_process("256x256,512x256", b10fs)
    assert third["restore"] == "hit"
    assert third["precompiled"] == 0, "every shape came from the newest generation"
    assert third["precompiled_loaded"] == first["precompiled"] + second["precompiled"]
    assert third["save"] is None
