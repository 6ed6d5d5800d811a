"""Cold start: Model.load() in fresh processes, eager vs cache miss vs cache hit.

    python -m bench.cold_start                      # tiny model on the CPU, local-directory cache
    python -m bench.cold_start --model full-random  # full-size FLUX.1-schnell, random bf16 weights, on the GPU
    python -m bench.cold_start --model DIR          # weights from a saved pipeline (bench.weights writes one)
    python -m bench.cold_start --backend local,b10-transfer   # miss and hit through each backend in turn
    python -m bench.cold_start --mega               # also torch's Mega-Cache, for comparison
    python -m bench.cold_start --config dynamic     # a named configuration of bench.CONFIGS
    python -m bench.cold_start --model full-random --skip-eager --hits 2 --every-size   # same bytes on every replica
    python -m bench.cold_start --model full-random --card L4 --skip-eager   # as an L4 would: its cap and `auto`s
    python -m bench.cold_start --profile DIR        # each hit also under cProfile: DIR/hit-N.prof and .prof.txt
    python -m bench.cold_start --compare-hit lora2  # one more hit with LoRA on, which the cache key leaves out

Each state runs in its own process with its own empty TorchInductor directory; "hit" restores
only what the cache backend saved during "miss". Prints one JSON line per state, then a summary
with the ratios hit/miss and (hit - eager)/(miss - eager) of the compile-and-warm-up time, and
what each backend's hit added to load() beyond the weights.

b10-transfer runs for real against b10fs's path on this machine (/cache/model, which needs root),
with its free-space floors lowered: its defaults ask for about 100 GB free.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import uuid
from pathlib import Path

from bench import card_env, config_env
from tests.harness import CARD_PROFILES, MEMORY_CAP, b10_transfer_env, run_state, same_bytes

BACKENDS = ("local", "b10-transfer")
MEGA_STATES = ("mega-miss", "mega-hit")


def _b10_scratch() -> Path:
    from model.cache import B10FS_ROOT

    scratch = B10FS_ROOT / f"bench-{uuid.uuid4().hex[:8]}"
    scratch.mkdir(parents=True, exist_ok=True)
    return scratch


def summary(results: dict[str, dict], backend: str) -> dict:
    out: dict = {
        "state": "summary",
        "backend": backend,
        "cache_bytes": results["miss"].get("cache_bytes"),
        "archive_bytes": results["miss"].get("archive_bytes"),
        "hit_added_to_load_s": results["hit"]["added_to_load_s"],
        "miss_added_to_load_s": results["miss"]["added_to_load_s"],
    }
    # A hit's first request at each size against the miss's, which ran with every kernel long loaded: the largest
    # ratio per hit says whether a hit left anything for the first request to load.
    out["first_request_over_miss"] = [
        round(max(hit["request_s"][size] / seconds for size, seconds in results["miss"]["request_s"].items()), 3)
        for hit in results["hits"]
    ]
    if "config" in results["hits"][-1]:
        out["compare_hit"] = {
            "config": results["hits"][-1]["config"],
            "added_to_load_s": results["hits"][-1]["added_to_load_s"],
        }
    miss, hit = results["miss"]["compile_warmup_s"], results["hit"]["compile_warmup_s"]
    out["hit_over_miss"] = round(hit / miss, 3)
    if "eager" in results:
        eager = results["eager"]["compile_warmup_s"]
        out["compile_overhead_hit_over_miss"] = round((hit - eager) / (miss - eager), 3)
    if "mega-hit" in results:
        out["mega_hit_over_archive_hit"] = round(results["mega-hit"]["compile_warmup_s"] / hit, 3)
    return out


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
    parser.add_argument(
        "--card",
        choices=sorted(CARD_PROFILES),
        help="stand in for this card: its memory cap, and what each `auto` picks on it (before --config)",
    )
    parser.add_argument(
        "--compare-hit",
        metavar="CONFIG",
        help="one more hit with this configuration over --config, for settings the cache key leaves out (lora2): "
        "what they add to a hit, and whether it still serves the miss's bytes",
    )
    parser.add_argument("--profile", type=Path, help="a directory: profile each hit there with cProfile")
    parser.add_argument("--workdir", type=Path)
    args = parser.parse_args()

    if args.model in ("tiny", "full-random"):
        env = {"FLUX_MODEL_SOURCE": args.model}
    else:  # the weights-mount branch of the loader, as a deployment reads its `weights:` mount
        env = {"FLUX_MODEL_SOURCE": "hf", "FLUX_WEIGHTS_PATH": str(Path(args.model).resolve())}
    if args.card:
        env.update(card_env(args.card), **{MEMORY_CAP: str(CARD_PROFILES[args.card].cap_gib)})
    env.update(config_env(args.config))
    if args.resolutions:
        env["FLUX_RESOLUTIONS"] = args.resolutions
    if args.text_lengths:
        env["FLUX_TEXT_LENGTHS"] = args.text_lengths
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="cold-start-"))
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
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
            profile = args.profile / f"hit-{backend}-{replica}.prof" if args.profile else None
            hits.append(run_state("hit", workdir, backend_env, backend, replica, args.every_size, profile))
            print(json.dumps(hits[-1]), flush=True)
        if args.compare_hit:
            compare_env = {**backend_env, **config_env(args.compare_hit)}
            hits.append(run_state("hit", workdir, compare_env, backend, args.hits, args.every_size))
            hits[-1]["config"] = args.compare_hit
            print(json.dumps(hits[-1]), flush=True)
        results["hit"], results["hits"] = hits[0], hits
        for state in MEGA_STATES if args.mega and backend == "local" else ():
            results[state] = run_state(state, workdir, backend_env, backend)
            print(json.dumps(results[state]), flush=True)
        print(json.dumps(summary(results, backend) | same_bytes(results["miss"], hits)), flush=True)


if __name__ == "__main__":
    main()
