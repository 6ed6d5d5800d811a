"""Weights from real files: load() of a saved full-size pipeline, in fresh processes, as a deployment reads its mount.

    python -m bench.weights --dir /path/to/flux-files               # writes the files first when absent
    python -m bench.weights --dir /path/to/flux-files --states warm,cold

The files are the full-size FLUX.1-schnell architecture with random bf16 weights, written once with
save_pretrained (the Hugging Face repo's folder layout). Each state runs in its own process:
- "warm": the project's load(), eager, through the weights-mount branch (model_source hf + weights_path);
- "cold": the same after the files were dropped from the page cache;
- "reference-to-device": FluxPipeline.from_pretrained(dir, device_map="cuda"), diffusers' own loader;
- "reference-host-first": from_pretrained into host memory, then .to("cuda").
Prints one JSON line per state: seconds, GPU peak memory, and for load() a checked image.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench import log_to_stderr

STATES = ("warm", "cold", "reference-to-device", "reference-host-first")


def write_files(directory: Path) -> dict:
    """Build the full-size architecture with random weights on the GPU and save it as the repo lays it out."""
    import torch

    from model.random_flux import build_random_pipeline

    started = time.perf_counter()
    pipe = build_random_pipeline("full", device="cuda", dtype=torch.bfloat16)
    built_s = time.perf_counter() - started
    staging = directory.with_name(directory.name + ".partial")
    pipe.save_pretrained(staging)
    staging.rename(directory)  # a run cut short leaves no half-written folder behind
    size = sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())
    return {
        "state": "write",
        "build_s": round(built_s, 2),
        "write_s": round(time.perf_counter() - started, 2),
        "bytes": size,
    }


def drop_from_page_cache(directory: Path) -> str:
    """Evict the files' pages, so the next read comes from the disk; returns how."""
    subprocess.run(["sync"], check=False)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        return "drop_caches"
    except OSError:
        for path in directory.rglob("*"):
            if path.is_file():
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)
        return "posix_fadvise"


def child(state: str, directory: Path) -> dict:
    import numpy as np
    import torch

    if state == "write":
        return write_files(directory)
    result: dict = {"state": state}
    from diffusers import FluxPipeline

    from model.model import Model  # imported before the clock starts, as a server has imported it before load()

    torch.cuda.init()
    started = time.perf_counter()
    if state.startswith("reference"):
        if state == "reference-to-device":
            pipe = FluxPipeline.from_pretrained(directory, dtype=torch.bfloat16, device_map="cuda")
        else:
            pipe = FluxPipeline.from_pretrained(directory, dtype=torch.bfloat16).to("cuda")
        torch.cuda.synchronize()
        assert pipe.transformer.device.type == "cuda"
        result["weights_s"] = round(time.perf_counter() - started, 2)
    else:
        import base64
        import io

        from PIL import Image

        from model.schema import GenerateRequest
        from model.settings import config_metadata

        model = Model(config={"model_metadata": config_metadata()})
        model.load()
        result["load_s"] = round(time.perf_counter() - started, 2)
        result["weights_s"] = round(model.cold_start.weights_s, 2)
        response = model._engine.generate(GenerateRequest(prompt="real files", seed=1))
        pixels = np.asarray(Image.open(io.BytesIO(base64.b64decode(response.data))), dtype=np.float32)
        result["pixel_std"] = round(float(pixels.std()), 2)  # NaN weights would decode to a flat image
    result["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    result["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
    return result


def run_state(state: str, directory: Path, env: dict[str, str]) -> dict:
    state_env = {**os.environ, **env}
    if state == "cold":
        state_env["WEIGHTS_EVICTED_BY"] = drop_from_page_cache(directory)
    command = [sys.executable, "-m", "bench.weights", "--child", state, "--dir", str(directory)]
    output = subprocess.run(command, env=state_env, stdout=subprocess.PIPE, text=True, check=False)
    lines = [line for line in output.stdout.splitlines() if line.startswith("{")]
    if output.returncode != 0 or not lines:
        raise RuntimeError(f"state {state} failed with exit code {output.returncode}; its log is on stderr")
    result = json.loads(lines[-1])
    if state == "cold":
        result["evicted_by"] = state_env["WEIGHTS_EVICTED_BY"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, required=True, help="the saved pipeline; written first when absent")
    parser.add_argument("--states", default=",".join(STATES), help=f"a comma-separated subset of {STATES}")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()

    log_to_stderr()
    if args.child:
        print(json.dumps(child(args.child, args.dir)), flush=True)
        return
    if not (args.dir / "model_index.json").is_file():
        print(json.dumps(run_state("write", args.dir, {})), flush=True)
    # The weights-mount branch of the loader, eager: load() is then the weights and nothing else.
    env = {"FLUX_MODEL_SOURCE": "hf", "FLUX_WEIGHTS_PATH": str(args.dir), "FLUX_COMPILE": "0"}
    for state in args.states.split(","):
        print(json.dumps(run_state(state, args.dir, env)), flush=True)


if __name__ == "__main__":
    main()
