"""LoRA adapters per request, merged into the transformer's weights.

A request's adapters are added into the weights of the linear layers they adapt: the pristine weight plus
scale x up x down of each adapter, in fp32, rounded once to the weight's dtype (a quantized weight is dequantized
first and quantized again as load() quantized it). The layers they leave go back to their pristine weights, which
load() copies once: on the GPU where they fit with room to serve, else in host memory. Every merge starts from
the pristine weights, in the request's order, so a request's bytes depend on its own adapters only, never on what
ran before it, and a request without adapters serves the bytes of a deployment without LoRA.

The compiled functions read the weights in place, so a swap changes no shape, dtype or attribute that a compiled
function guards on: it compiles nothing, and the graph is the one served without LoRA. LoRA layers beside every
linear layer (hot-swap slots, diffusers' and PEFT's way) cost every request 10% of p50 at 1024x1024 on an H200,
with no adapter in them; a merge costs each swap instead (BENCHMARKS.md, docs/lora.md).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

import torch

from model.blocks import BlockHook

log = logging.getLogger(__name__)

# diffusers' FLUX LoRA keys, after its conversion of other formats: "transformer.<module>.lora_A.weight" and
# "transformer.<module>.lora_B.weight"; keys of the text encoders start with these.
TRANSFORMER_PREFIX = "transformer."
TEXT_ENCODER_PREFIXES = ("text_encoder.", "text_encoder_2.")
DOWN, UP, ALPHA = ".lora_A.weight", ".lora_B.weight", ".alpha"


class AdapterError(ValueError):
    """An adapter this deployment cannot apply; the message says why (the caller names the request's field)."""


@dataclass(frozen=True)
class PreparedAdapter:
    """An adapter checked against the transformer's layers, per module: (down (rank x in), up (out x rank), its
    alpha / rank), the matrices in the weights' dtype, on the host. `rank` is its largest. alpha / rank and the
    request's scale are applied when it is merged, so one prepared adapter serves every scale."""

    layers: Mapping[str, tuple[torch.Tensor, torch.Tensor, float]]
    rank: int

    @property
    def nbytes(self) -> int:
        return sum(down.nbytes + up.nbytes for down, up, _ in self.layers.values())


def adapted_layers(transformer: torch.nn.Module) -> list[str]:
    """Every linear layer of the transformer, by name: what published FLUX adapters target (attention, feed-forward,
    the single blocks' projections, the norms' linears) and the few outside the blocks."""
    return [name for name, module in transformer.named_modules() if isinstance(module, torch.nn.Linear)]


def prepare(
    state_dict: Mapping[str, torch.Tensor],
    alphas: Mapping[str, float] | None,
    layers: Mapping[str, tuple[int, int]],
    max_rank: int,
    dtype: torch.dtype,
) -> PreparedAdapter:
    """Check a converted state dict (diffusers' keys) against the transformer's `layers` ({name: (in, out)}) and
    fold its alpha / rank into each up projection. Raises AdapterError naming what does not fit."""
    text_keys = [key for key in state_dict if key.startswith(TEXT_ENCODER_PREFIXES)]
    if text_keys:
        raise AdapterError(
            f"it adapts the text encoders ({text_keys[0]}, {len(text_keys)} keys); only the transformer's layers "
            "can be swapped per request"
        )
    downs = {key.removeprefix(TRANSFORMER_PREFIX).removesuffix(DOWN): key for key in state_dict if key.endswith(DOWN)}
    ups = {key.removeprefix(TRANSFORMER_PREFIX).removesuffix(UP): key for key in state_dict if key.endswith(UP)}
    # Alphas a conversion left among the weights count as the network alphas they are.
    alphas = {**network_alphas({k: v for k, v in state_dict.items() if k.endswith(ALPHA)}), **(alphas or {})}
    unknown = sorted(
        set(state_dict) - set(downs.values()) - set(ups.values()) - {k for k in state_dict if k.endswith(ALPHA)}
    )
    if unknown:
        raise AdapterError(f"it has keys that are not LoRA weights of a FLUX transformer, e.g. {unknown[0]!r}")
    if downs.keys() != ups.keys():
        missing = sorted(downs.keys() ^ ups.keys())[0]
        raise AdapterError(f"layer {missing!r} has only one of its two LoRA matrices")
    foreign = sorted(name for name in downs if name not in layers)
    if foreign:
        raise AdapterError(
            f"{len(foreign)} of its {len(downs)} layers are not layers of FLUX.1's transformer, e.g. {foreign[0]!r}: "
            "is it an adapter for another model?"
        )
    if not downs:
        raise AdapterError("it holds no LoRA weights")
    prepared = {}
    largest = 0
    for name in sorted(downs):
        down, up = state_dict[downs[name]], state_dict[ups[name]]
        in_features, out_features = layers[name]
        rank = down.shape[0]
        if (
            down.dim() != 2
            or up.dim() != 2
            or rank == 0
            or down.shape[1] != in_features
            or up.shape != (out_features, rank)
        ):
            raise AdapterError(
                f"layer {name!r} has LoRA matrices of shapes {tuple(down.shape)} and {tuple(up.shape)}; that layer "
                f"takes {in_features} and gives {out_features} features"
            )
        if rank > max_rank:
            raise AdapterError(f"its rank is {rank}, above this deployment's max_lora_rank of {max_rank}")
        largest = max(largest, rank)
        ratio = alphas.get(name, rank) / rank
        down, up = _host_copy(down, dtype), _host_copy(up, dtype)
        # Checked as merged: in `dtype`, where a value past its range has become infinite, and times alpha / rank in
        # fp32. A NaN fails the comparisons too.
        if not (_largest_magnitude(down) <= FP32_MAX and _largest_magnitude(up) * abs(ratio) <= FP32_MAX):
            raise AdapterError(f"layer {name!r} holds values that are not finite")
        prepared[name] = (down, up, ratio)
    return PreparedAdapter(prepared, largest)


class LoraMerger:
    """Adapters merged into the transformer's linear weights, and which ones they hold now."""

    def __init__(self, transformer: torch.nn.Module, max_adapters: int, requantize: BlockHook | None = None) -> None:
        self.max_adapters = max_adapters
        self._requantize = requantize
        self._modules: dict[str, torch.nn.Linear] = {
            name: transformer.get_submodule(name) for name in adapted_layers(transformer)
        }
        self.layers = {name: (m.in_features, m.out_features) for name, m in self._modules.items()}
        self.dtype = next(iter(self._modules.values())).weight.dtype  # a quantized weight reports its bf16 one
        pristine_bytes = sum(_nbytes(m.weight) for m in self._modules.values())
        home = _pristine_home(next(iter(self._modules.values())).weight.device, pristine_bytes)
        with torch.no_grad():
            self._pristine = {
                name: {
                    part: _host_copy(t) if home.type == "cpu" else t.detach().clone()
                    for part, t in _parts(m.weight).items()
                }
                for name, m in self._modules.items()
            }
        # Identities and scales of the adapters merged now, in order; None while the weights are not known.
        self._held: tuple[tuple[Hashable, float], ...] | None = ()
        self._touched: set[str] = set()
        log.info(
            "LoRA: up to %d adapters merged into %d linear layers; their pristine weights (%.1f GiB) on %s",
            max_adapters,
            len(self._modules),
            pristine_bytes / 2**30,
            home,
        )

    def apply(self, adapters: Sequence[tuple[Hashable, PreparedAdapter, float]]) -> None:
        """Merge `adapters` ((identity, prepared, scale)) into the weights, in order, from the pristine weights.

        The same identities at the same scales as now change nothing. An adapter at scale 0 is left out, so the
        weights are those of the request without it. If anything fails, every layer goes back to its pristine weights
        before the error propagates, so the next request never finds an adapter half applied.
        """
        if len(adapters) > self.max_adapters:
            raise AdapterError(f"{len(adapters)} adapters for at most {self.max_adapters}")
        merged = [(identity, adapter, scale) for identity, adapter, scale in adapters if scale != 0]
        held = tuple((identity, scale) for identity, _, scale in merged)
        if held == self._held:
            return
        touched = {name for _, adapter, _ in merged for name in adapter.layers}
        try:
            self._held = None
            for name in sorted(self._touched | touched):
                self._restore(name)
                if name in touched:
                    self._merge(
                        name, [(adapter.layers[name], scale) for _, adapter, scale in merged if name in adapter.layers]
                    )
            self._held, self._touched = held, touched
        except BaseException:
            self.clear()
            raise

    def clear(self) -> None:
        """Every adapted layer back to its pristine weights: the transformer computes what it computes without LoRA."""
        for name in sorted(self._touched if self._held is not None else self._modules):
            self._restore(name)
        self._held, self._touched = (), set()

    @torch.no_grad()
    def _restore(self, name: str) -> None:
        live = _parts(self._modules[name].weight)
        for part, tensor in self._pristine[name].items():
            live[part].copy_(tensor, non_blocking=True)

    @torch.no_grad()
    def _merge(self, name: str, deltas: Sequence[tuple[tuple[torch.Tensor, torch.Tensor, float], float]]) -> None:
        """The layer's pristine weight (just restored) plus every delta, in fp32, rounded once to the weight's dtype;
        a quantized weight is dequantized first and quantized again by load()'s rule."""
        module = self._modules[name]
        weight = module.weight
        parts = _parts(weight)
        rowwise_fp8 = _rowwise_fp8(parts, module.out_features)
        if rowwise_fp8:
            total = parts["qdata"].to(torch.float32).mul_(parts["scale"])
        else:
            total = (weight.dequantize() if _is_subclass(weight) else weight).to(torch.float32)
        for (down, up, ratio), scale in deltas:
            on_device = [t.to(total.device, non_blocking=True).to(torch.float32) for t in (up, down)]
            total.addmm_(*on_device, alpha=scale * ratio)
        if rowwise_fp8:
            _quantize_rowwise_fp8(total, parts["qdata"], parts["scale"])
        elif not _is_subclass(weight):
            weight.copy_(total)
        else:
            self._requantize_through_hook(name, total, parts)

    def _requantize_through_hook(self, name: str, total: torch.Tensor, parts: dict[str, torch.Tensor]) -> None:
        """Quantize `total` again the way load() quantized the layer, through load()'s own hook (int8's weights)."""
        if self._requantize is None:
            raise AdapterError(f"layer {name!r} holds quantized weights this deployment cannot quantize again")
        module = self._modules[name]
        scratch = torch.nn.Linear(module.in_features, module.out_features, bias=False, device="meta")
        scratch.weight = torch.nn.Parameter(total.to(self.dtype), requires_grad=False)
        self._requantize(scratch)
        fresh = _parts(scratch.weight)
        for part, tensor in parts.items():
            tensor.copy_(fresh[part])


FP8_MAX = torch.finfo(torch.float8_e4m3fn).max
FP32_MAX = torch.finfo(torch.float32).max


def _rowwise_fp8(parts: Mapping[str, torch.Tensor], out_features: int) -> bool:
    """Whether a weight is load()'s fp8: float8 values and one float32 scale per output row (torchao's PerRow)."""
    return (
        parts.keys() == {"qdata", "scale"}
        and parts["qdata"].dtype == torch.float8_e4m3fn
        and parts["scale"].dtype == torch.float32
        and parts["scale"].shape == (out_features, 1)
    )


def _quantize_rowwise_fp8(total: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor) -> None:
    """Write fp32 `total` into a per-row fp8 weight in place, by torchao's rule for PerRow weights (scale = the
    row's largest magnitude / the format's largest value): torchao's bytes for the fp32 sum (tests/test_lora.py).
    Here rather than through torchao's quantize_ on a scratch layer: that rounds the sum to bf16 first and takes six
    elementwise passes and a module's set-up per layer, the bulk of an fp8 swap's time (BENCHMARKS.md)."""
    # The infinity norm reads each row once; abs().amax() would write a full-size copy first. A row of zeros keeps
    # a tiny scale instead of dividing 0 by 0.
    row_max = torch.linalg.vector_norm(total, ord=math.inf, dim=1, keepdim=True)
    new_scale = row_max.clamp_(min=torch.finfo(torch.float32).tiny).div_(FP8_MAX)
    # |total / new_scale| <= FP8_MAX within fp32 rounding, which the cast's round-to-nearest brings back to FP8_MAX.
    qdata.copy_(total.div_(new_scale))
    scale.copy_(new_scale)


def _host_copy(tensor: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A contiguous copy in host memory, written once: page-locked where there is a GPU, which copies it back at
    full speed and without a host sync."""
    copy = torch.empty(tensor.shape, dtype=dtype or tensor.dtype, pin_memory=torch.cuda.is_available())
    return copy.copy_(tensor)


def _largest_magnitude(tensor: torch.Tensor) -> float:
    """max |value|, NaN where there is one. aminmax reads the tensor once, vectorised: on a CPU, a 50M-element bf16
    tensor took 3 ms, against 70 ms for the infinity norm and 150 ms for isfinite().all()."""
    low, high = torch.aminmax(tensor)
    return float(torch.maximum(-low, high))


def _is_subclass(weight: torch.Tensor) -> bool:
    return type(weight) not in (torch.Tensor, torch.nn.Parameter)


def _parts(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """The plain tensors that hold a weight: itself, or a quantized tensor's inner ones (torchao's `qdata`, `scale`)."""
    if not _is_subclass(weight):
        return {"": weight.data}
    names, _ = weight.__tensor_flatten__()
    return {part: getattr(weight, part) for part in names}


def _nbytes(weight: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in _parts(weight).values())


# Left free on the GPU beside the pristine weights: serving's peak above the weights (bf16 peaked 33.8 GiB with
# 31.4 GiB of weights, the 2-megapixel decode above that) plus the 4 GiB headroom rule, with room to spare.
GPU_RESERVE_BYTES = 8 * 2**30


def _pristine_home(device: torch.device, nbytes: int) -> torch.device:
    """The GPU where the pristine weights fit with room to serve (a restore then copies at the GPU's bandwidth), else
    host memory."""
    if device.type == "cuda" and _free_gpu_bytes(device) >= nbytes + GPU_RESERVE_BYTES:
        return device
    return torch.device("cpu")


def _free_gpu_bytes(device: torch.device) -> int:
    """What this process may still take of the GPU: the device's free memory, within a per-process memory fraction
    where one is set (a smaller card stood in for)."""
    free, total = torch.cuda.mem_get_info(device)
    allowed = int(total * torch.cuda.get_per_process_memory_fraction(device)) - torch.cuda.memory_reserved(device)
    return min(free, allowed)


def network_alphas(alphas: Mapping[str, torch.Tensor | float] | None) -> dict[str, float]:
    """diffusers' network alphas ("transformer.<module>.alpha" or "<module>.alpha") by module name."""
    out = {}
    for key, value in (alphas or {}).items():
        name = key.removeprefix(TRANSFORMER_PREFIX).removesuffix(ALPHA)
        number = float(value.item() if isinstance(value, torch.Tensor) else value)
        if not math.isfinite(number):
            raise AdapterError(f"the alpha of {name!r} is not finite")
        out[name] = number
    return out
