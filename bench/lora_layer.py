"""What holding LoRA slots costs one denoising step, by formulation, from FLUX's own linear layers timed one by one.

`python -m bench.lora_layer --rank 128` times every distinct linear layer of the transformer at one size (its tokens,
in and out features), compiled as the served regions are (mode default, static shapes), for each formulation:

- `plain`: the layer without LoRA, the reference;
- `peft`: the layer plus up(down(x)), as PEFT's LoRA layer computes it (what model/lora.py serves);
- `folded_down`: one matmul of x by the weight with the down projection stacked under it, then the up projection
  of its last rows added: x is read once;
- `addmm`: the up projection accumulated into the layer's output by one addmm;
- `inplace`: the up projection accumulated into the layer's own output buffer (`addmm_`), no second output;
- `cat_k`: one matmul of [x, x.down] by [weight, up]: the up projection rides in the layer's own matmul, which
  writes its output once (bf16 only: the weight and the slot share one tensor).

Each layer's median is multiplied by how often a step runs it (19 double blocks, 38 single blocks), and the sum is
compared with `plain`'s. `merge_swap_ms` is the other way to hold an adapter: written into the weights at swap time
from a kept copy (every layer: copy back, then add up x down), which costs a swap and nothing per request. Prints one
JSON line. `--scale 16` divides every dimension by 16 to check the code on a CPU; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

HIDDEN, MLP, DOUBLE_BLOCKS, SINGLE_BLOCKS = 3072, 12288, 19, 38


@dataclass(frozen=True)
class Layer:
    name: str
    tokens: str  # "image", "text", "joint" (both streams, the single blocks) or "one" (the norms' modulation)
    in_features: int
    out_features: int
    per_step: int


LAYERS = (
    Layer("double: to_q, to_k, to_v, to_out.0", "image", HIDDEN, HIDDEN, 4 * DOUBLE_BLOCKS),
    Layer("double: ff.net.0.proj", "image", HIDDEN, MLP, DOUBLE_BLOCKS),
    Layer("double: ff.net.2", "image", MLP, HIDDEN, DOUBLE_BLOCKS),
    Layer("double: add_q/k/v_proj, to_add_out", "text", HIDDEN, HIDDEN, 4 * DOUBLE_BLOCKS),
    Layer("double: ff_context.net.0.proj", "text", HIDDEN, MLP, DOUBLE_BLOCKS),
    Layer("double: ff_context.net.2", "text", MLP, HIDDEN, DOUBLE_BLOCKS),
    Layer("double: norm1(_context).linear", "one", HIDDEN, 6 * HIDDEN, 2 * DOUBLE_BLOCKS),
    Layer("single: to_q, to_k, to_v", "joint", HIDDEN, HIDDEN, 3 * SINGLE_BLOCKS),
    Layer("single: proj_mlp", "joint", HIDDEN, MLP, SINGLE_BLOCKS),
    Layer("single: proj_out", "joint", HIDDEN + MLP, HIDDEN, SINGLE_BLOCKS),
    Layer("single: norm.linear", "one", HIDDEN, 3 * HIDDEN, SINGLE_BLOCKS),
)


def plain(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.linear(x, w, b)


def peft(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.linear(x, w, b) + F.linear(F.linear(x, down), up)


def folded_down(
    x: torch.Tensor, w_down: torch.Tensor, b: torch.Tensor, down: torch.Tensor, up: torch.Tensor
) -> torch.Tensor:
    both = F.linear(x, w_down)
    out_features = up.shape[0]
    return both[..., :out_features] + b + F.linear(both[..., out_features:], up)


def addmm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    flat = x.flatten(0, -2)
    return torch.addmm(F.linear(flat, w, b), F.linear(flat, down), up.t())


def inplace(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    flat = x.flatten(0, -2)
    return F.linear(flat, w, b).addmm_(F.linear(flat, down), up.t())


def cat_k(x: torch.Tensor, w_up: torch.Tensor, b: torch.Tensor, down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.linear(torch.cat([x, F.linear(x, down)], dim=-1), w_up, b)


FORMULATIONS: dict[str, Callable[..., torch.Tensor]] = {
    "plain": plain,
    "peft": peft,
    "folded_down": folded_down,
    "addmm": addmm,
    "inplace": inplace,
    "cat_k": cat_k,
}


def seconds(work: Callable[[], object], runs: int, device: torch.device) -> float:
    """The median of `runs` timings of `work`, after three untimed ones; to the GPU's end on CUDA."""
    for _ in range(3):
        work()
    times = []
    for _ in range(runs):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            work()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            started = time.perf_counter()
            work()
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def measure(width: int, height: int, text_length: int, rank: int, runs: int, scale: int) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16
    image_tokens = (width // 16) * (height // 16) // scale
    text_tokens = text_length // scale
    tokens = {"image": image_tokens, "text": text_tokens, "joint": image_tokens + text_tokens, "one": 1}
    step_s = dict.fromkeys(FORMULATIONS, 0.0)
    merge_s = 0.0
    per_layer = {}
    for layer in LAYERS:
        # Each layer's shapes compile afresh: past Dynamo's limit on recompiles a function would run eagerly.
        torch.compiler.reset()
        n_in, n_out, r = layer.in_features // scale, layer.out_features // scale, max(rank // scale, 1)
        x = torch.randn(1, tokens[layer.tokens], n_in, device=device, dtype=dtype)
        w = torch.randn(n_out, n_in, device=device, dtype=dtype) / n_in**0.5
        b = torch.randn(n_out, device=device, dtype=dtype)
        down = torch.randn(r, n_in, device=device, dtype=dtype) / n_in**0.5
        up = torch.randn(n_out, r, device=device, dtype=dtype) / r**0.5
        weights = {"folded_down": torch.cat([w, down]), "cat_k": torch.cat([w, up], dim=1)}
        figures = {}
        for name, function in FORMULATIONS.items():
            compiled = torch.compile(function, mode="default", dynamic=False)
            weight = weights.get(name, w)
            with torch.inference_mode():
                figures[name] = seconds(lambda: compiled(x, weight, b, down, up), runs, device)  # noqa: B023
            step_s[name] += figures[name] * layer.per_step
        kept = w.clone()

        def merge() -> None:
            w.copy_(kept)  # noqa: B023
            w.addmm_(up, down)  # noqa: B023

        merge_s += seconds(merge, runs, device) * layer.per_step
        per_layer[layer.name] = {name: round(s * 1e6, 1) for name, s in figures.items()}
    base = step_s["plain"]
    return {
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
        "size": f"{width}x{height}",
        "text_length": text_length,
        "rank": rank,
        "scale": scale,
        "step_ms": {name: round(s * 1e3, 2) for name, s in step_s.items()},
        "over_plain_ms": {name: round((s - base) * 1e3, 2) for name, s in step_s.items() if name != "plain"},
        "merge_swap_ms": round(merge_s * 1e3, 2),
        "per_layer_us": per_layer,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="1024x1024")
    parser.add_argument("--text-length", type=int, default=256)
    parser.add_argument("--rank", type=int, default=128, help="all slots together: max_loras x max_lora_rank")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--scale", type=int, default=1, help="divide every dimension (a CPU check of the code)")
    args = parser.parse_args()
    width, height = (int(side) for side in args.size.split("x"))
    print(json.dumps(measure(width, height, args.text_length, args.rank, args.runs, args.scale)), flush=True)


if __name__ == "__main__":
    main()
