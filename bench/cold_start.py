"""Cold start: Model.load() in fresh processes, eager vs cache miss vs cache hit.

    python -m bench.cold_start                      # tiny model on the CPU, local-directory cache
    python -m bench.cold_start --model full-random  # full-size FLUX.1-schnell, random bf16 weights, on the GPU
    python -m bench.cold_start --model DIR          # weights from a saved pipeline (bench.weights writes one)
    python -m bench.cold_start --backend local,b10-transfer   # miss and hit through each backend in turn
    python -m bench.cold_start --mega               # also torch's Mega-Cache, for comparison
    python -m bench.cold_start --config dynamic     # a named configuration of bench.CONFIGS
    python -m bench.cold_start --model full-random --skip-eager --hits 2 --every-size   # same bytes on every replica

Each state runs in its own process with its own empty TorchInductor directory; "hit" restores
only what the cache backend saved during "miss". Prints one JSON line per state, then a summary
with the ratios hit/miss and (hit - eager)/(miss - eager) of the compile-and-warm-up time, and
what each backend's hit added to load() beyond the weights.

b10-transfer runs for real against b10fs's path on this machine (/cache/model, which needs root),
with its free-space floors lowered: its defaults ask for about 100 GB free.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from bench import config_env, log_to_stderr

BACKENDS = ("local", "b10-transfer")
LAUNCHED_AT = "COLD_START_LAUNCHED_AT"  # the parent's clock when it started the child
EVERY_SIZE = "COLD_START_EVERY_SIZE"  # set: the child also serves every aspect ratio, not only the static sizes
MEGA_STATES = ("mega-miss", "mega-hit")


def child(state: str, workdir: Path) -> dict:
    """Runs inside the fresh process: load, then prove no request compiles, and report."""
    import numpy as np
    import torch
    from PIL import Image

    from model.coldstart import CompileCounters, warm_up
    from model.model import Model
    from model.schema import GenerateRequest
    from model.settings import Settings, config_metadata

    mega_file = workdir / "mega.bin"
    mega_load_s = 0.0
    if state == "mega-hit":
        started = time.perf_counter()
        torch.compiler.load_cache_artifacts(mega_file.read_bytes())
        mega_load_s = time.perf_counter() - started

    model = Model(config={"model_metadata": config_metadata()})
    if state == "miss" and os.environ.get("FLUX_CACHE_BACKEND") == "b10-transfer":
        _forget_b10_archives(Settings.from_sources())
    started = time.perf_counter()
    model.load()
    load_s = time.perf_counter() - started
    engine = model._engine
    report = model.cold_start
    result = {
        "state": state,
        "backend": report.backend,
        "load_s": round(load_s, 2),
        "weights_s": round(report.weights_s, 2),
        # Everything load() did beyond the weights: the restore that the weights did not hide, compile, warm-up, save.
        "added_to_load_s": round(load_s - report.weights_s, 2),
    }
    if LAUNCHED_AT in os.environ:
        # From the process's launch: the interpreter, the imports (what a server does before load()) and load().
        result["launch_to_ready_s"] = round(time.time() - float(os.environ[LAUNCHED_AT]), 2)
    if state == "eager":
        # The same warm-up, eagerly (one run per shape: nothing compiles): the baseline of the compile overhead.
        eager = warm_up(engine, Settings.from_sources().compile.warmup_runs)
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


def _b10_scratch() -> Path:
    from model.cache import B10FS_ROOT

    scratch = B10FS_ROOT / f"bench-{uuid.uuid4().hex[:8]}"
    scratch.mkdir(parents=True, exist_ok=True)
    return scratch


def run_state(
    state: str, workdir: Path, env: dict[str, str], backend: str = "local", replica: int = 0, every_size: bool = False
) -> dict:
    """Start a fresh process for one state, with an empty inductor directory of its own: another `replica` of a
    state gets another one, as a new replica restoring the same cache. `every_size` also serves every aspect ratio."""
    inductor = workdir / f"inductor-{state}-{backend}{f'-{replica}' if replica else ''}"
    state_env = {
        **os.environ,
        **env,
        "TORCHINDUCTOR_CACHE_DIR": str(inductor),
        "FLUX_CACHE_DIR": str(workdir / "cache"),
        "FLUX_CACHE_BACKEND": backend if state in ("miss", "hit") else "none",
        "FLUX_COMPILE": "0" if state == "eager" else "1",
        LAUNCHED_AT: str(time.time()),
        **({EVERY_SIZE: "1"} if every_size else {}),
    }
    command = [sys.executable, "-m", "bench.cold_start", "--child", state, "--workdir", str(workdir)]
    # The child's logs stream to this process's stderr as they happen: a run cut short keeps its progress.
    output = subprocess.run(command, env=state_env, stdout=subprocess.PIPE, text=True, check=False)
    lines = [line for line in output.stdout.splitlines() if line.startswith("{")]
    if output.returncode != 0 or not lines:
        raise RuntimeError(f"state {state} failed with exit code {output.returncode}; its log is on stderr")
    return json.loads(lines[-1])


def summary(results: dict[str, dict], backend: str) -> dict:
    out: dict = {
        "state": "summary",
        "backend": backend,
        "cache_bytes": results["miss"].get("cache_bytes"),
        "archive_bytes": results["miss"].get("archive_bytes"),
        "hit_added_to_load_s": results["hit"]["added_to_load_s"],
        "miss_added_to_load_s": results["miss"]["added_to_load_s"],
    }
    miss, hit = results["miss"]["compile_warmup_s"], results["hit"]["compile_warmup_s"]
    out["hit_over_miss"] = round(hit / miss, 3)
    if "eager" in results:
        eager = results["eager"]["compile_warmup_s"]
        out["compile_overhead_hit_over_miss"] = round((hit - eager) / (miss - eager), 3)
    if "mega-hit" in results:
        out["mega_hit_over_archive_hit"] = round(results["mega-hit"]["compile_warmup_s"] / hit, 3)
    return out


def same_bytes(miss: dict, hits: list[dict]) -> dict:
    """Whether every hit served the miss's JPEG bytes at each size, and the sizes where one did not."""
    differing = sorted(
        {size for hit in hits for size, image in hit["images"].items() if image != miss["images"].get(size)}
    )
    return {"hits_serve_the_miss_bytes": not differing, "sizes_differing": differing}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="tiny, full-random, or a saved pipeline's directory")
    parser.add_argument("--backend", default="local", help=f"a comma-separated list of {BACKENDS}")
    parser.add_argument("--resolutions", help="override the served sizes, e.g. 1024x1024,1216x832")
    parser.add_argument("--text-lengths", help="override the compiled T5 lengths, e.g. 256")
    parser.add_argument("--mega", action="store_true", help="also measure torch's Mega-Cache")
    parser.add_argument("--config", default="default", help="a named configuration of bench.CONFIGS, e.g. dynamic")
    parser.add_argument("--skip-eager", action="store_true", help="measure miss and hit only")
    parser.add_argument(
        "--hits",
        type=int,
        default=1,
        help="hits after each miss, each a fresh replica; the summary says whether every hit served the miss's bytes",
    )
    parser.add_argument(
        "--every-size", action="store_true", help="serve every aspect ratio too, not only the static sizes"
    )
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        log_to_stderr()
        print(json.dumps(child(args.child, args.workdir)), flush=True)
        return

    if args.model in ("tiny", "full-random"):
        env = {"FLUX_MODEL_SOURCE": args.model}
    else:  # the weights-mount branch of the loader, as a deployment reads its `weights:` mount
        env = {"FLUX_MODEL_SOURCE": "hf", "FLUX_WEIGHTS_PATH": str(Path(args.model).resolve())}
    env.update(config_env(args.config))
    if args.resolutions:
        env["FLUX_RESOLUTIONS"] = args.resolutions
    if args.text_lengths:
        env["FLUX_TEXT_LENGTHS"] = args.text_lengths
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="cold-start-"))
    backends = args.backend.split(",")
    unknown = set(backends) - set(BACKENDS)
    if unknown:
        parser.error(f"unknown backend {', '.join(sorted(unknown))}; choose from {', '.join(BACKENDS)}")
    baseline = {}
    if not args.skip_eager:
        baseline["eager"] = run_state("eager", workdir, env)
        print(json.dumps(baseline["eager"]), flush=True)
    for backend in backends:
        backend_env = {**env, **(b10_transfer_env(_b10_scratch()) if backend == "b10-transfer" else {})}
        results = dict(baseline)
        results["miss"] = run_state("miss", workdir, backend_env, backend, every_size=args.every_size)
        print(json.dumps(results["miss"]), flush=True)
        hits = []
        for replica in range(args.hits):
            hits.append(run_state("hit", workdir, backend_env, backend, replica, args.every_size))
            print(json.dumps(hits[-1]), flush=True)
        results["hit"] = hits[0]
        for state in MEGA_STATES if args.mega and backend == "local" else ():
            results[state] = run_state(state, workdir, backend_env, backend)
            print(json.dumps(results[state]), flush=True)
        print(json.dumps(summary(results, backend) | same_bytes(results["miss"], hits)), flush=True)


if __name__ == "__main__":
    main()
