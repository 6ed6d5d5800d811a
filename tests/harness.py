"""Running the model from outside, shared by the tests and the benchmarks (bench/ imports this; never the reverse).

`run_state` starts Model.load() in a fresh process with an empty Inductor directory of its own, as a new replica
starts, and returns what it did as JSON: the cold-start benchmark and the cache and GPU tests read the same report.

    python -m tests.harness STATE WORKDIR   # the child process itself: prints one JSON line
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from starlette.requests import Request

# Model.predict's second argument when it is called outside the server: a request declaring no body.
NO_BODY = Request({"type": "http", "headers": []})

LAUNCHED_AT = "COLD_START_LAUNCHED_AT"  # the parent's clock when it started the child
EVERY_SIZE = "COLD_START_EVERY_SIZE"  # set: the child also serves every aspect ratio, not only the static sizes
PROFILE = "COLD_START_PROFILE"  # a file path: the child runs under cProfile and writes its statistics there
MEMORY_CAP = "COLD_START_MEMORY_CAP_GIB"  # the child's GPU memory is capped to this, as a smaller card's would be
# JSON of CompileSettings fields a process compiles with, e.g. {"vae": false}: the VAE decoder's CPU compile is the
# slowest, and tests of the blocks' graphs leave it out. tests/fault_injection/sitecustomize.py applies it in every
# process started with `with_fault_injection`.
COMPILE_OVERRIDES = "HARNESS_COMPILE_SETTINGS"
FAULT_INJECTION = Path(__file__).resolve().parent / "fault_injection"


def with_fault_injection(env: Mapping[str, str]) -> dict[str, str]:
    """`env` with tests/fault_injection first on PYTHONPATH: its sitecustomize then applies the faults and compile
    overrides that `env` names, and does nothing otherwise."""
    path = os.pathsep.join(filter(None, [str(FAULT_INJECTION), env.get("PYTHONPATH", os.environ.get("PYTHONPATH"))]))
    return {**env, "PYTHONPATH": path}


@dataclass(frozen=True)
class CardProfile:
    """How a smaller card is stood in for on a larger GPU: the memory it leaves one process, and the most the
    allocator may reserve there (the rest is headroom for fragmentation, the CUDA context and libraries)."""

    cap_gib: float
    limit_gib: float


CARD_PROFILES = {
    "L4": CardProfile(cap_gib=22.0, limit_gib=18.0),
    "A10G": CardProfile(cap_gib=22.0, limit_gib=18.0),
    "H100_40GB": CardProfile(cap_gib=38.0, limit_gib=36.0),
}


def cap_memory(gib: float) -> None:
    """Leave this process only `gib` of the GPU, as a smaller card would: the caching allocator refuses to reserve
    beyond the fraction."""
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("a memory cap needs a CUDA GPU")
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, gib * 2**30 / total))


def log_to_stderr() -> None:
    """In a child process: load()'s progress goes to stderr, which the parent streams."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)


def b10_transfer_env(scratch: Path) -> dict[str, str]:
    """b10-transfer on, with `scratch` (it must sit under /app, /tmp or /cache) as its work directory and its
    free-space floors lowered: its defaults ask for about 100 GB free on b10fs and 4 GB locally."""
    return {
        "BASETEN_FS_ENABLED": "1",
        "LOCAL_WORK_DIR": str(scratch),
        "MIN_B10FS_SPACE_MB": "1",
        "MAX_CONCURRENT_SAVES": "1",
        "MIN_LOCAL_SPACE_MB": "1",
    }


def child(state: str, workdir: Path) -> dict:
    """Runs inside the fresh process: load, then prove no request compiles, and report."""
    # Only what the server imports before load() (model.model imports torch): load() imports the engine's modules
    # beside the cache restore.
    import torch

    from model.model import Model
    from model.settings import Settings, config_metadata

    mega_file = workdir / "mega.bin"
    mega_load_s = 0.0
    if state == "mega-hit":
        started = time.perf_counter()
        torch.compiler.load_cache_artifacts(mega_file.read_bytes())
        mega_load_s = time.perf_counter() - started

    if MEMORY_CAP in os.environ:
        cap_memory(float(os.environ[MEMORY_CAP]))
    model = Model(config={"model_metadata": config_metadata()})
    if state == "miss" and os.environ.get("FLUX_CACHE_BACKEND") == "b10-transfer":
        _forget_b10_archives(Settings.from_sources())
    started = time.perf_counter()
    model.load()
    load_s = time.perf_counter() - started

    import numpy as np
    from PIL import Image

    from model.coldstart import WARMUP_RUNS, CompileCounters, warm_up
    from model.schema import GenerateRequest

    engine = model._engine
    report = model.cold_start
    result = {
        "state": state,
        "backend": report.backend,
        "load_s": round(load_s, 2),
        "imports_s": round(report.imports_s, 2),
        "weights_s": round(report.weights_s, 2),
        # Everything load() did beyond what eager serving needs too (the engine's imports, the weights): the restore
        # that those did not hide, compile, warm-up, save.
        "added_to_load_s": round(load_s - report.imports_s - report.weights_s, 2),
    }
    if LAUNCHED_AT in os.environ:
        # From the process's launch: the interpreter, the imports (what a server does before load()) and load().
        result["launch_to_ready_s"] = round(time.time() - float(os.environ[LAUNCHED_AT]), 2)
    if state == "eager":
        # The same warm-up, eagerly (one run per shape: nothing compiles): the baseline of the compile overhead.
        eager = warm_up(engine, WARMUP_RUNS)
        result["compile_warmup_s"] = round(sum(eager.seconds_per_shape.values()), 2)
        result["warmup_per_shape_s"] = eager.seconds_per_shape
        result["warmup_runs_per_shape"] = eager.runs_per_shape
    else:
        result.update(
            compile_warmup_s=round(report.compile_warmup_s, 2),
            warmup_per_shape_s=report.warmup.seconds_per_shape,
            warmup_runs_per_shape=report.warmup.runs_per_shape,
            restore_s=round(report.restore_s + mega_load_s, 2),
            restore_total_s=round(report.restore.seconds, 2) if report.restore else None,
            save_s=round(report.save_s, 2),
            restore=report.restore.outcome.value if report.restore else None,
            save=report.save.outcome.value if report.save else None,
            new_graphs=report.warmup.compiled.fxgraph_misses,
            cached_graphs=report.warmup.compiled.fxgraph_hits,
            precompiled=report.warmup.compiled.precompiled,
            precompiled_loaded=report.warmup.compiled.precompiled_loaded,
            cache_bytes=report.cache_bytes,
            archive_bytes=report.save.size_bytes if report.save else None,
            eager_fallback=report.eager_fallback_reason,
            dynamic_check=report.dynamic_check,
        )
    if state == "mega-miss":
        started = time.perf_counter()
        artifacts = torch.compiler.save_cache_artifacts()
        if artifacts is not None:
            mega_file.write_bytes(artifacts[0])
        result["save_s"] = round(time.perf_counter() - started, 2)
        result["cache_bytes"] = mega_file.stat().st_size if mega_file.exists() else 0

    # A request at every served size after warm-up must compile nothing, and give a real image.
    before = CompileCounters.now()
    latencies, images = {}, {}
    sizes = list(engine.resolutions)
    if os.environ.get(EVERY_SIZE):
        sizes += [r for r in engine.sizes.aspect_ratios.values() if r not in sizes]
    for resolution in sizes:
        request = GenerateRequest(prompt="after warm-up", width=resolution.width, height=resolution.height, seed=1)
        started = time.perf_counter()
        response = engine.generate(request)
        latencies[str(resolution)] = round(time.perf_counter() - started, 3)
        # NaNs decode to a uniform image, so a spread of pixel values shows the output is finite.
        image = Image.open(io.BytesIO(base64.b64decode(response.data)))
        pixels = np.asarray(image, dtype=np.float32)
        images[str(resolution)] = {
            "size": [pixels.shape[1], pixels.shape[0]],
            "pixel_std": round(float(pixels.std()), 2),
            "sha256": hashlib.sha256(pixels.tobytes()).hexdigest()[:16],
            "jpeg_sha256": hashlib.sha256(response.data.encode()).hexdigest()[:16],
        }
    result["graphs_compiled_after_warmup"] = (CompileCounters.now() - before).graphs
    if torch.cuda.is_available():
        result["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
    result["request_s"] = latencies
    result["images"] = images
    return result


def _forget_b10_archives(settings) -> None:
    """A miss must find nothing: remove what an earlier run stored for this fingerprint."""
    import shutil

    from model.artifacts import CompileArtifacts
    from model.cache import B10TransferCache
    from model.precision import gpu_facts

    facts = settings.resolved(gpu_facts()).fingerprint_facts()
    shutil.rmtree(B10TransferCache(CompileArtifacts.here(facts)).directory, ignore_errors=True)


def run_state(
    state: str,
    workdir: Path,
    env: dict[str, str],
    backend: str = "local",
    replica: int = 0,
    every_size: bool = False,
    profile: Path | None = None,
) -> dict:
    """Start a fresh process for one state, with an empty inductor directory of its own: another `replica` of a
    state gets another one, as a new replica restoring the same cache. `every_size` also serves every aspect ratio;
    with `profile` the process runs under cProfile and writes its statistics there."""
    inductor = workdir / f"inductor-{state}-{backend}{f'-{replica}' if replica else ''}"
    state_env = with_fault_injection(
        {
            **os.environ,
            **env,
            "TORCHINDUCTOR_CACHE_DIR": str(inductor),
            "FLUX_CACHE_DIR": str(workdir / "cache"),
            "FLUX_CACHE_BACKEND": backend if state in ("miss", "hit") else "none",
            "FLUX_COMPILE": "0" if state == "eager" else "1",
            LAUNCHED_AT: str(time.time()),
            **({EVERY_SIZE: "1"} if every_size else {}),
            **({PROFILE: str(profile)} if profile else {}),
        }
    )
    command = [sys.executable, "-m", "tests.harness", state, str(workdir)]
    # The child's logs stream to this process's stderr as they happen: a run cut short keeps its progress.
    output = subprocess.run(command, env=state_env, stdout=subprocess.PIPE, text=True, check=False)
    lines = [line for line in output.stdout.splitlines() if line.startswith("{")]
    if output.returncode != 0 or not lines:
        raise RuntimeError(f"state {state} failed with exit code {output.returncode}; its log is on stderr")
    return json.loads(lines[-1])


def same_bytes(miss: dict, hits: list[dict]) -> dict:
    """Whether every hit served the miss's JPEG bytes at each size, and the sizes where one did not."""
    differing = sorted(
        {size for hit in hits for size, image in hit["images"].items() if image != miss["images"].get(size)}
    )
    return {"hits_serve_the_miss_bytes": not differing, "sizes_differing": differing}


def _profiled_child(state: str, workdir: Path, profile: Path) -> dict:
    """`child` under cProfile, the imports it makes included; the statistics go to `profile`, and the 40 entries
    with the most cumulative time to `profile`.txt."""
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    result = profiler.runcall(child, state, workdir)
    profiler.dump_stats(profile)
    with open(f"{profile}.txt", "w") as text:
        pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(40)
    return result


if __name__ == "__main__":
    log_to_stderr()
    state, workdir = sys.argv[1], Path(sys.argv[2])
    profile = os.environ.get(PROFILE)
    result = _profiled_child(state, workdir, Path(profile)) if profile else child(state, workdir)
    print(json.dumps(result), flush=True)
