"""LoRA adapters per request, swapped into fixed slots of the compiled transformer.

load() gives every linear layer of the transformer one PEFT LoRA layer (through diffusers' `add_adapter`) of rank
`max_loras` x `max_lora_rank`, all zero, before anything compiles: the compiled functions, the cache key and the
warm-up all include it. Slot i is its down projection's rows and its up projection's columns from
i x max_lora_rank on. A request's adapters are then copied into those tensors in place, so a swap never changes a
shape, a dtype or a Python attribute that a compiled function guards on, and compiles nothing.

The slots share one layer because each LoRA layer adds two matmuls and a full-size output to every linear layer,
whatever its rank: two slots as layers of their own cost 19-20% of p50 at 1024x1024 on an H200, as one layer 10%
(BENCHMARKS.md).

The layer's scaling stays 1.0: an adapter's own alpha / rank and the request's scale are folded into its up
projection when it is prepared. A slot a request does not use is zero, and a zero slot adds exactly 0.0, so the
bytes of a request depend on its own adapters only, never on what ran before it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

ADAPTER_NAME = "slots"  # the one PEFT adapter that holds every slot
# diffusers' FLUX LoRA keys, after its conversion of other formats: "transformer.<module>.lora_A.weight" and
# "transformer.<module>.lora_B.weight"; keys of the text encoders start with these.
TRANSFORMER_PREFIX = "transformer."
TEXT_ENCODER_PREFIXES = ("text_encoder.", "text_encoder_2.")
DOWN, UP, ALPHA = ".lora_A.weight", ".lora_B.weight", ".alpha"


class AdapterError(ValueError):
    """An adapter this deployment cannot apply; the message says why (the caller names the request's field)."""


@dataclass(frozen=True)
class PreparedAdapter:
    """An adapter checked against the slots, per module: (down (rank x in), up (out x rank) with its alpha / rank
    folded in), in the slots' dtype, on the host. `rank` is its largest. The request's scale is applied when a slot
    is written, so one prepared adapter serves every scale."""

    layers: Mapping[str, tuple[torch.Tensor, torch.Tensor]]
    rank: int

    @property
    def nbytes(self) -> int:
        return sum(down.nbytes + up.nbytes for down, up in self.layers.values())


def adapted_layers(transformer: torch.nn.Module) -> list[str]:
    """Every linear layer of the transformer, by name: what published FLUX adapters target (attention, feed-forward,
    the single blocks' projections, the norms' linears) and the few outside the blocks."""
    return [
        name
        for name, module in transformer.named_modules()
        # PEFT's own layers (a wrapped layer's base_layer, its lora_A and lora_B) are not targets themselves.
        if isinstance(module, torch.nn.Linear) and not any(part in name for part in (".base_layer", ".lora_"))
    ]


def prepare(
    state_dict: Mapping[str, torch.Tensor],
    alphas: Mapping[str, float] | None,
    layers: Mapping[str, tuple[int, int]],
    max_rank: int,
    dtype: torch.dtype,
) -> PreparedAdapter:
    """Check a converted state dict (diffusers' keys) against the slots' `layers` ({name: (in, out)}) and fold its
    alpha / rank into each up projection. Raises AdapterError naming what does not fit."""
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
        if down.dim() != 2 or up.dim() != 2 or down.shape[1] != in_features or up.shape != (out_features, rank):
            raise AdapterError(
                f"layer {name!r} has LoRA matrices of shapes {tuple(down.shape)} and {tuple(up.shape)}; that layer "
                f"takes {in_features} and gives {out_features} features"
            )
        if rank > max_rank:
            raise AdapterError(f"its rank is {rank}, above this deployment's max_lora_rank of {max_rank}")
        largest = max(largest, rank)
        alpha = alphas.get(name, rank)
        up_scaled = up.to(torch.float32) * (alpha / rank)
        if not (torch.isfinite(down).all() and torch.isfinite(up_scaled).all()):
            raise AdapterError(f"layer {name!r} holds values that are not finite")
        prepared[name] = (down.to(dtype).contiguous(), up_scaled.to(dtype).contiguous())
    return PreparedAdapter(prepared, largest)


class LoraSlots:
    """The transformer's LoRA slots, and which adapter each holds."""

    def __init__(self, transformer: torch.nn.Module, count: int, rank: int) -> None:
        # Imported here: PEFT is needed only where LoRA is on.
        from peft import LoraConfig

        self.count = count
        self.rank = rank
        targets = adapted_layers(transformer)
        self.layers = {
            name: (module.in_features, module.out_features)
            for name, module in transformer.named_modules()
            if name in set(targets)
        }
        # alpha = rank: a scaling of exactly 1.0, which no swap changes (see the module's docstring).
        config = LoraConfig(r=count * rank, lora_alpha=count * rank, target_modules=targets, init_lora_weights=False)
        transformer.add_adapter(config, adapter_name=ADAPTER_NAME)
        transformer.set_adapters([ADAPTER_NAME])
        self._weights = {
            name: (module.lora_A[ADAPTER_NAME].weight, module.lora_B[ADAPTER_NAME].weight)
            for name, module in ((name, transformer.get_submodule(name)) for name in self.layers)
        }
        self.dtype = next(iter(self._weights.values()))[0].dtype
        # What each slot holds: None for zeros, else an identity of the adapter and its scale.
        self._held: list[object | None] = [object()] * count  # unknown until cleared
        self.clear()
        log.info("LoRA: %d slots of rank %d on %d linear layers", count, rank, len(self.layers))

    @torch.no_grad()
    def _write(self, index: int, adapter: PreparedAdapter | None, scale: float = 1.0) -> None:
        start = index * self.rank
        for name, (down_weight, up_weight) in self._weights.items():
            down_slot, up_slot = down_weight[start : start + self.rank], up_weight[:, start : start + self.rank]
            down_slot.zero_()
            up_slot.zero_()
            if adapter is not None and name in adapter.layers:
                down, up = adapter.layers[name]
                rank = down.shape[0]
                down_slot[:rank].copy_(down)
                up_slot[:, :rank].copy_(up)
                if scale != 1.0:
                    up_slot.mul_(scale)

    def clear(self) -> None:
        """Every slot to zero: the transformer computes what it computes without LoRA."""
        for index in range(self.count):
            self._write(index, None)
            self._held[index] = None

    def apply(self, adapters: Sequence[tuple[Hashable, PreparedAdapter, float]]) -> None:
        """Hold `adapters` ((identity, prepared, scale)) in the first slots, in order, and zeros in the others.

        A slot already holding the same identity at the same scale is left as it is. If a copy fails, every slot is
        cleared before the error propagates, so the next request never finds an adapter half applied.
        """
        if len(adapters) > self.count:
            raise AdapterError(f"{len(adapters)} adapters for {self.count} slots")
        wanted = [*adapters, *[None] * (self.count - len(adapters))]
        try:
            for index, entry in enumerate(wanted):
                held = None if entry is None else (entry[0], entry[2])
                if self._held[index] == held:
                    continue
                self._held[index] = object()  # unknown while it is being written
                if entry is None or entry[2] == 0:  # zeros, not -0.0s: the bytes of a request without it
                    self._write(index, None)
                else:
                    self._write(index, entry[1], entry[2])
                self._held[index] = held
        except BaseException:
            self.clear()
            raise


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
