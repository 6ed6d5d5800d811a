"""Every serving setting, declared once: its type, default, model_metadata key, FLUX_<KEY> override and meaning.

config.yaml's model_metadata sets them and FLUX_* environment variables override it; the declared default fills in
the rest. This is the one module that reads either, so every other module takes the typed groups below and never
looks at os.environ. Plain data: importing it imports neither torch nor diffusers.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin, get_type_hints

import pydantic
import yaml
from pydantic import AfterValidator, BeforeValidator, ConfigDict

from model.precision import (
    GpuFacts,
    PrecisionSetting,
    TextEncoderPrecisionSetting,
    choose_precision,
    choose_text_encoder_precision,
)
from model.resolutions import (
    ABSOLUTE_MAX_SIDE,
    MEGAPIXEL_TOLERANCE,
    RATIO_TOLERANCE,
    SIDE_MULTIPLE,
    AspectRatios,
    ResolutionRegistry,
    SizeBounds,
)

log = logging.getLogger(__name__)

ENV_PREFIX = "FLUX_"
# The package's own config.yaml: the one source of the served sizes and every other deployed value.
CONFIG_PATH = Path(__file__).resolve().parent.parent / "config.yaml"
DEFAULT_LOCAL_CACHE_DIR = Path.home() / ".cache" / "flux-schnell-truss" / "compile"
# model_metadata keys that Truss and Baseten read for themselves: allowed beside the settings, never parsed here.
PLATFORM_METADATA_KEYS = frozenset({"example_model_input", "tags", "avatar_url", "cover_image_url"})

CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
# "auto": b10-transfer on Baseten's cache volume, the local directory elsewhere (model.cache).
CacheBackend = Literal["auto", "b10-transfer", "local", "none"]
Fp8Scaling = Literal["row", "tensor"]


def _comma_separated(value: Any) -> Any:
    """An environment variable holds a list as "a,b"; YAML gives a real list."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


def _empty_is_none(value: Any) -> Any:
    # FLUX_ATTENTION_BACKEND= (set, but empty) is how an environment says "none".
    return None if value == "" else value


def _parse_resolutions(value: Any) -> Any:
    if isinstance(value, ResolutionRegistry):
        return value
    return ResolutionRegistry.parse(str(text) for text in _comma_separated(value))


def _parse_aspect_ratios(value: Any) -> Any:
    if isinstance(value, AspectRatios):
        return value
    if not isinstance(value, Mapping | str):
        raise ValueError("must map each aspect ratio to WIDTHxHEIGHT")
    return AspectRatios.parse(value)


def _sorted_unique(values: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(sorted(set(values)))


Resolutions = Annotated[ResolutionRegistry, BeforeValidator(_parse_resolutions)]
AspectRatioRegistry = Annotated[AspectRatios, BeforeValidator(_parse_aspect_ratios)]
Side = Annotated[int, pydantic.Field(ge=SIDE_MULTIPLE, le=ABSOLUTE_MAX_SIDE)]
Megapixels = Annotated[float, pydantic.Field(gt=0, allow_inf_nan=False)]
TextLengths = Annotated[tuple[int, ...], BeforeValidator(_comma_separated), AfterValidator(_sorted_unique)]
OptionalPath = Annotated[Path | None, BeforeValidator(_empty_is_none)]
OptionalName = Annotated[str | None, BeforeValidator(_empty_is_none)]

_DECLARED = "setting"


def setting(key: str, default: Any = MISSING, *, meaning: str) -> Any:
    """Declare one setting: its model_metadata key (FLUX_<KEY> in the environment), its default and what it does.

    No default makes the setting required: config.yaml gives it. The field's annotation is its type.
    """
    return field(default=default, metadata={_DECLARED: (key, meaning)})


@dataclass(frozen=True)
class CompileSettings:
    """torch.compile of the transformer and the VAE decode, and the warm-up (model.compile)."""

    enabled: bool = setting("compile", True, meaning="`false` serves eager")
    # "default": max-autotune-no-cudagraphs denoised no faster and compiled far longer (BENCHMARKS.md).
    mode: CompileMode = setting("compile_mode", "default", meaning="the `torch.compile` mode")
    # Compiling one block of each repeated kind and reusing it for all 57 blocks compiles faster than the whole
    # transformer, at the same warm latency (BENCHMARKS.md).
    regional: bool = setting(
        "compile_regional", True, meaning="compile one block of each repeated kind instead of the whole transformer"
    )
    compile_vae: bool = setting("compile_vae", True, meaning="compile the VAE's decoder too")
    # The text encoders run eagerly, launch-bound: 31 ms of a request for a few ms of arithmetic (issue figures,
    # BENCHMARKS.md). Their shapes are static (CLIP's 77 tokens, T5's compiled text lengths).
    text_encoders: bool = setting(
        "compile_text_encoders",
        False,
        meaning="compile the T5 and CLIP encoders' repeated layers too, one static graph per text length",
    )
    # Every served shape is warmed up, so static graphs never recompile on the request path.
    dynamic: bool = setting(
        "compile_dynamic", False, meaning="one dynamic-shape graph for all sizes instead of one static graph per size"
    )
    # Sizes without a static graph of their own share one dynamic-shape graph, compiled and warmed up at load()
    # (model.compile, model.coldstart), so no request compiles; off, they run eager and load() is shorter.
    any_size: bool = setting(
        "compile_any_size",
        True,
        meaning="compile and warm up one dynamic-shape graph for every size without a static graph (`resolutions`); "
        "off, those sizes run eager",
    )
    # Up to two runs per shape: the first compiles, the second proves no guard fails on reuse. A shape whose
    # first run compiled nothing new (a cache hit) runs once: its code already passed that check when it was
    # compiled, and second runs were a measurable part of a hit's load() (BENCHMARKS.md).
    warmup_runs: int = setting(
        "warmup_runs", 2, meaning="most warm-up runs per served shape; a shape that compiled nothing new runs once"
    )
    # Hand the first single block its inputs in the layout every later single block gets, so that one graph
    # serves them all (model.compile): a graph fewer per served shape.
    shared_block_layout: bool = setting(
        "compile_shared_block_layout",
        True,
        meaning="give the first single block the later blocks' input layout: a graph fewer per size",
    )
    # Compile ahead of time and save each compiled region as a file (model.precompile): a cache hit then
    # loads functions instead of tracing every graph with Dynamo again (BENCHMARKS.md has the hit's figures).
    precompile: bool = setting(
        "compile_precompile",
        True,
        meaning="compile ahead of time and save the compiled functions with the cache, so a hit skips Dynamo's "
        "tracing (an experimental torch API); turned off, with a warning, without `compile_regional` or with a "
        "quantized `precision`",
    )

    # Inductor picks some kernels' configurations by timing candidates on their first run; a process that picks
    # another one sums in another order. On an H200 it cost 0.4% of kernel time and did not make a cache hit give
    # its miss's bytes: torch 2.11's deterministic mode still times the half-RBLOCK candidates (`scale_rblock`).
    deterministic: bool = setting(
        "compile_deterministic",
        False,
        meaning="Inductor's deterministic mode: no kernel configuration that changes numerics is chosen by timing",
    )

    # Inductor may give a reduction that is short of registers a second candidate with half its RBLOCK, timed
    # against the first on the kernel's first run. torch 2.11's cache does not hand that choice back
    # (pytorch/pytorch#189121): every process, a cache hit included, times the pair again, and near-tied timings
    # pick either, so replicas summed in other orders and served other bytes for one seed (BENCHMARKS.md, "why
    # replicas parted").
    scale_rblock: bool = setting(
        "compile_scale_rblock",
        False,
        meaning="let Inductor time a half-RBLOCK candidate for register-bound reductions in every process "
        "(`dynamic_scale_rblock`); on, replicas can serve other bytes for one seed",
    )

    @property
    def dynamic_graph(self) -> bool:
        """Whether load() compiles the dynamic-shape graph beside the static ones (model.compile)."""
        return self.any_size and not self.dynamic

    @property
    def only_precompiled(self) -> bool:
        """Whether every compiled function is saved as a file (model.precompile): only then does a hit never read
        Inductor's graph entries. The text encoders are Dynamo's own compile."""
        return self.precompile and not self.text_encoders


# Optimizations that act after the compiled regions and before the response (model.optimize).
OUTSIDE_THE_GRAPHS = ("postprocess_on_device", "text_encoder_cuda_graphs")


@dataclass(frozen=True)
class Optimizations:
    """Named optimization switches, applied in one place before compilation (model.optimize).

    BENCHMARKS.md has what each measured on an H200, and config.yaml turns on those that paid off.
    """

    # One matmul for Q, K and V instead of three: fewer, larger GEMMs and kernel launches.
    fuse_qkv: bool = setting("fuse_qkv", False, meaning="fuse the attention's Q, K and V projections into one matmul")
    # The VAE decoder is all convolutions; NHWC is the layout cuDNN's tensor-core kernels want.
    vae_channels_last: bool = setting(
        "vae_channels_last", False, meaning="run the VAE in the channels-last (NHWC) memory layout"
    )
    # The caching allocator keeps freed blocks for reuse at their size; weights quantized as they load and the
    # VAE's large activations then leave reserved memory in pieces none of them fits (3 GiB on an L4's cap,
    # BENCHMARKS.md). Expandable segments grow and shrink in place, so what is reserved stays near what is used.
    expandable_segments: bool = setting(
        "expandable_segments",
        True,
        meaning="CUDA's caching allocator grows its segments in place: reserved memory stays near the memory in use",
    )
    # nn.SiLU after each GroupNorm in the VAE decoder can overwrite the norm's output, which nothing reads again:
    # the same pixels, one full-resolution activation fewer. The eager decode's peak did not move, as it sits at
    # the residual add that follows (BENCHMARKS.md); kept because it costs nothing.
    vae_inplace_silu: bool = setting(
        "vae_inplace_silu", True, meaning="the VAE decoder's SiLU activations overwrite their input (same pixels)"
    )
    # The decode phase took 56 ms on an H200 for 34 ms of kernels (BENCHMARKS.md); part of the rest is the host
    # copying 4-byte floats and scaling them to 8 bits. Converting on the GPU gives the same bytes, and cut the
    # phase by a third on an H200 (BENCHMARKS.md).
    postprocess_on_device: bool = setting(
        "postprocess_on_device",
        True,
        meaning="convert the decoded image to 8 bits on the GPU, then copy it to the host (the same bytes)",
    )
    # The text phase took 31.8 ms on an H200 for 10.9 ms of kernels: the host launching T5's and CLIP's small kernels
    # one by one. Their shapes are static per text length, so one replay launches them all: 12.5 ms (BENCHMARKS.md).
    text_encoder_cuda_graphs: bool = setting(
        "text_encoder_cuda_graphs",
        True,
        meaning="capture the T5 and CLIP encoders in one CUDA graph per text length after the warm-up, and replay it "
        "(the same bytes; a GPU only)",
    )
    # Inductor turns convolutions channels-last when it expects a gain, and eager channels-last was slower. On an
    # H200 the convolutions took 13.4 ms either way and the decoder's other kernels grew in NCHW (BENCHMARKS.md).
    vae_compiled_nchw: bool = setting(
        "vae_compiled_nchw",
        False,
        meaning="keep the compiled VAE decoder's convolutions in eager's NCHW layout, where Inductor would choose "
        "channels-last",
    )
    # e.g. "_native_cudnn" (cuDNN's fused attention in SDPA) or "_native_flash"; None keeps SDPA's own choice.
    attention_backend: OptionalName = setting(
        "attention_backend", None, meaning="diffusers' attention backend, e.g. `_native_cudnn`; empty keeps SDPA's"
    )
    # The transformer's linears: bf16; fp8 (torchao dynamic row-wise float8 activations and weights: half the weight
    # bytes and twice the tensor-core rate on Hopper, at a small numerical cost, BENCHMARKS.md); or int8 weights
    # (torchao weight-only) for cards with too little memory for bf16 and no float8 tensor cores.
    precision: PrecisionSetting = setting(
        "precision",
        "auto",
        meaning="the transformer's precision; `auto` picks by the GPU load() finds (model/precision.py, README's "
        "GPU table)",
    )
    # fp8's activations are scaled per row (one amax per token) or per tensor (one per matmul input): per-tensor
    # scaling reduces less and runs cuBLAS's tensor-wise fp8 GEMM, per-row keeps an outlier token from flattening
    # every other token's range (BENCHMARKS.md has both on an H200).
    fp8_scaling: Fp8Scaling = setting(
        "fp8_scaling", "row", meaning="fp8's scale granularity for activations and weights: `row` or `tensor`"
    )
    # T5's weights are 9.5 GB in bf16: with a quantized transformer, the largest part left (model/precision.py).
    text_encoder_precision: TextEncoderPrecisionSetting = setting(
        "text_encoder_precision",
        "auto",
        meaning="the T5 encoder's weights: torchao weight-only `int8` halves their 9.5 GB, `int4` (CUDA only) "
        "quarters them; `auto` picks int4 on a GPU (int8 without) beside an fp8 or int8 transformer on a card too "
        "small for bf16's peak, else bf16",
    )

    def enabled(self) -> list[str]:
        """The switches that change the model: every one that is on, each precision other than bf16, and fp8's
        scaling with fp8."""
        return [
            name if value is True else f"{name}={value}"
            for name, value in vars(self).items()
            if value and value not in ("auto", "bf16") and (name != "fp8_scaling" or self.precision == "fp8")
        ]


@dataclass(frozen=True)
class CacheSettings:
    """Where the compile cache is kept between starts (model.cache)."""

    backend: CacheBackend = setting(
        "cache_backend",
        "auto",
        meaning="`auto` picks b10-transfer where b10-transfer's own check says Baseten's cache volume is enabled, "
        "the local directory elsewhere, and logs the choice with its reason",
    )
    local_dir: Path = setting(
        "cache_dir", DEFAULT_LOCAL_CACHE_DIR, meaning="where the local backend keeps its archives"
    )


# The sizes FLUX.1 services commonly offer (those of replicate's cog-flux): about one megapixel each, on the 16-grid.
DEFAULT_ASPECT_RATIOS = AspectRatios.parse(
    {
        "21:9": "1536x640",
        "16:9": "1344x768",
        "3:2": "1216x832",
        "4:3": "1152x896",
        "5:4": "1088x896",
        "1:1": "1024x1024",
        "4:5": "896x1088",
        "3:4": "896x1152",
        "2:3": "832x1216",
        "9:16": "768x1344",
        "9:21": "640x1536",
    }
)


@dataclass(frozen=True)
class SizeSettings:
    """Which sizes a request may ask for (model.engine); `resolutions` are the ones among them compiled statically.

    Every `resolutions` and `aspect_ratios` entry must lie inside the bounds: checked when the settings load.
    """

    min_side: Side = setting("min_side", 256, meaning="the smallest width or height a request may ask for")
    # 1536 is the longest side of the aspect-ratio registry; 2 megapixels bounds one image's memory and time.
    max_side: Side = setting("max_side", 1536, meaning="the largest width or height a request may ask for")
    max_megapixels: Megapixels = setting(
        "max_megapixels", 2.0, meaning="the largest width x height a request may ask for, in millions of pixels"
    )
    aspect_ratios: AspectRatioRegistry = setting(
        "aspect_ratios",
        DEFAULT_ASPECT_RATIOS,
        meaning="each `aspect_ratio` a request may name, with its `WIDTHxHEIGHT`: about one megapixel (within "
        f"{MEGAPIXEL_TOLERANCE:.0%}), its sides in the named ratio (within {RATIO_TOLERANCE:.0%})",
    )

    @property
    def bounds(self) -> SizeBounds:
        return SizeBounds(self.min_side, self.max_side, self.max_megapixels)


@dataclass(frozen=True, kw_only=True)
class Settings:
    repo_id: str = setting(
        "repo_id", "black-forest-labs/FLUX.1-schnell", meaning="the Hugging Face repo the weights come from"
    )
    # "hf" loads weights_path when mounted, else repo_id from the hub; "tiny" and "full-random"
    # build an offline architecture (model.random_flux); anything else is a local directory.
    model_source: str = setting(
        "model_source",
        "hf",
        meaning="`hf`: the weights mount, else `repo_id` from the hub; `tiny` or `full-random`: an offline "
        "architecture; else a local diffusers directory",
    )
    weights_path: OptionalPath = setting("weights_path", None, meaning="where config.yaml's `weights:` mounts the repo")
    resolutions: Resolutions = setting(
        "resolutions",
        meaning="the `WIDTHxHEIGHT`s compiled as static graphs and warmed up at load; any other size within "
        "`min_side`, `max_side` and `max_megapixels` is served by a graph not specialised to it",
    )
    text_lengths: TextLengths = setting(
        "text_lengths", meaning="T5 sequence lengths compiled for each size; a request's length rounds up to one"
    )
    # A prompt's embeddings take 2 MB (256 tokens) or 4 MB (512) on the GPU: 256 MB keeps the last 64 or more.
    prompt_cache_mb: pydantic.NonNegativeInt = setting(
        "prompt_cache_mb",
        256,
        meaning="GPU memory for the least recently used prompt embeddings: a repeated prompt, whatever its seed or "
        "size, skips both text encoders; 0 turns the cache off",
    )
    sizes: SizeSettings = field(default_factory=SizeSettings)
    compile: CompileSettings = field(default_factory=CompileSettings)
    optimizations: Optimizations = field(default_factory=Optimizations)
    cache: CacheSettings = field(default_factory=CacheSettings)

    @classmethod
    def from_sources(
        cls, metadata: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
    ) -> Settings:
        """Merge model_metadata (config.yaml's when None) with FLUX_* environment variables; the environment wins.

        Raises SettingsError naming each bad value and where it came from, or an unknown model_metadata key.
        """
        meta = dict(config_metadata() if metadata is None else metadata)
        env = os.environ if environ is None else environ
        return build(validate(read_sources(meta, env)))

    def resolved(self, gpu: GpuFacts | None) -> Settings:
        """These settings with `precision: auto` decided for `gpu`, and any conflict that brings settled and logged."""
        chosen, reason = choose_precision(self.optimizations.precision, gpu)
        log.info("precision %s: %s", chosen, reason)
        text_chosen, text_reason = choose_text_encoder_precision(self.optimizations.text_encoder_precision, chosen, gpu)
        log.info("text_encoder_precision %s: %s", text_chosen, text_reason)
        values = {d.key: functools.reduce(getattr, d.path, self) for d in declarations().values()}
        return build(settle({**values, "precision": chosen, "text_encoder_precision": text_chosen}))

    def fingerprint_facts(self) -> dict[str, Any]:
        """What shapes the compiled artifacts, for the cache key: of settings `resolved` for a GPU."""
        if "auto" in (self.optimizations.precision, self.optimizations.text_encoder_precision):
            # "auto" names no precision: a key made of it would match no server's.
            raise ValueError("the cache key needs a decided precision: use settings.resolved(gpu_facts()) first")
        return {
            "model": self.repo_id if self.model_source == "hf" else self.model_source,
            "compile": {k: v for k, v in vars(self.compile).items() if k != "warmup_runs"},
            # A switch that changes no compiled graph stays out of the key, so that trying it costs no miss.
            "optimizations": {k: v for k, v in vars(self.optimizations).items() if k not in OUTSIDE_THE_GRAPHS},
            "resolutions": [str(r) for r in self.resolutions],
            "text_lengths": list(self.text_lengths),
        }


class SettingsError(ValueError):
    """A setting that cannot be used as given: the message names the setting, the value and its source."""


@dataclass(frozen=True)
class Declaration:
    key: str
    meaning: str
    annotation: Any
    default: Any  # MISSING when config.yaml must give it
    # Where the value lands: ("compile", "mode") is settings.compile.mode; ("repo_id",) is settings.repo_id.
    path: tuple[str, ...]

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.key.upper()

    @property
    def required(self) -> bool:
        return self.default is MISSING


@functools.cache
def declarations() -> dict[str, Declaration]:
    """Every setting by its key, in declaration order, read from the `setting(...)` fields above."""
    found: dict[str, Declaration] = {}

    def walk(cls: type, path: tuple[str, ...]) -> None:
        hints = get_type_hints(cls, include_extras=True)
        for f in fields(cls):
            if _DECLARED in f.metadata:
                key, meaning = f.metadata[_DECLARED]
                if key in found:
                    raise TypeError(f"setting {key!r} is declared twice")
                found[key] = Declaration(key, meaning, hints[f.name], f.default, (*path, f.name))
            elif is_dataclass(hints[f.name]):
                walk(hints[f.name], (*path, f.name))

    walk(Settings, ())
    return found


@functools.cache
def _model() -> type[pydantic.BaseModel]:
    """The pydantic model that parses every setting by its key: one field per declaration."""
    config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True, protected_namespaces=())
    specs: dict[str, Any] = {
        d.key: (d.annotation, pydantic.Field(... if d.required else d.default, description=d.meaning))
        for d in declarations().values()
    }
    return pydantic.create_model("FluxSettings", __config__=config, **specs)


@dataclass(frozen=True)
class Raw:
    """Each given value by key, and where it came from (a FLUX_ variable or model_metadata)."""

    values: dict[str, Any]
    origins: dict[str, str]


def read_sources(metadata: Mapping[str, Any], environ: Mapping[str, str]) -> Raw:
    """The given values: the environment's over model_metadata's. Unknown metadata keys are refused by name."""
    declared = declarations()
    _refuse_unknown("model_metadata key", set(metadata) - PLATFORM_METADATA_KEYS, declared)
    values = {key: metadata[key] for key in declared if key in metadata}
    origins = dict.fromkeys(values, "model_metadata")
    for d in declared.values():
        if d.env in environ:
            values[d.key] = environ[d.env].strip()
            origins[d.key] = d.env
    known = {d.env for d in declared.values()}
    for name in sorted(n for n in environ if n.startswith(ENV_PREFIX) and n not in known):
        # The environment is shared with everything else in the container, so a stray name only warns.
        log.warning("%s is not a setting and is ignored; the settings are %s", name, ", ".join(sorted(known)))
    return Raw(values, origins)


def _refuse_unknown(what: str, keys: Iterable[str], declared: Mapping[str, Declaration]) -> None:
    if unknown := sorted(set(keys) - set(declared)):
        raise SettingsError(f"unknown {what} {', '.join(map(repr, unknown))}; the settings are: {', '.join(declared)}")


def validate(raw: Raw) -> dict[str, Any]:
    """Parse every value to its declared type, then settle the conflicts between switches."""
    try:
        parsed = _model().model_validate(raw.values)
    except pydantic.ValidationError as exc:
        problems = []
        for error in exc.errors():
            key = str(error["loc"][0]) if error["loc"] else "?"
            if key in raw.values:
                problems.append(f"{key}={raw.values[key]!r} (from {raw.origins[key]}): {error['msg']}")
            else:
                problems.append(f"{key} (not given): {error['msg']}")
        raise SettingsError("invalid settings:\n  " + "\n  ".join(problems)) from None
    values = dict(parsed)
    if problems := _sizes_outside_bounds(values, raw.origins):
        raise SettingsError("invalid settings:\n  " + "\n  ".join(problems))
    return settle(values)


def _sizes_outside_bounds(values: Mapping[str, Any], origins: Mapping[str, str]) -> list[str]:
    """Each size of `resolutions` and `aspect_ratios` that a request could not ask for, by name and source."""
    bounds = SizeBounds(values["min_side"], values["max_side"], values["max_megapixels"])
    if bounds.min_side > bounds.max_side:
        return [f"min_side={bounds.min_side} is more than max_side={bounds.max_side}"]
    sizes = {
        "resolutions": {str(r): r for r in values["resolutions"]},
        "aspect_ratios": {f"{name}={r}": r for name, r in values["aspect_ratios"].items()},
    }
    problems = []
    for key, entries in sizes.items():
        for label, size in entries.items():
            if problem := bounds.problem(size.width, size.height):
                field_name, rule = problem
                source = origins.get(key, "the default")
                problems.append(f"{key} {label} (from {source}) is outside the size bounds: {field_name} {rule}")
    return problems


@dataclass(frozen=True)
class Conflict:
    """Two switches that cannot both be on: `yields` is turned off while `wins` holds, with a warning."""

    yields: str
    wins: str
    holds: Callable[[Mapping[str, Any]], bool]
    reason: str


# The rule for every pair: the switch that cannot run in the other's company is turned off and a WARNING says so,
# naming both, rather than refusing to start: each of these is a supported configuration once the one is off.
CONFLICTS = (
    Conflict(
        yields="compile_precompile",
        wins="compile_regional",
        holds=lambda values: not values["compile_regional"],
        # The whole transformer's forward is wrapped by a diffusers decorator, which a saved function cannot name.
        reason="only the repeated blocks can be precompiled, so the whole transformer is compiled by Dynamo",
    ),
    Conflict(
        yields="compile_precompile",
        wins="precision",
        holds=lambda values: values["precision"] in ("fp8", "int8"),
        # Measured on an H200 (BENCHMARKS.md): saving the function pickles its guards with a meta copy of every
        # guarded tensor (torch.empty_like), which torchao's Float8Tensor weights do not implement.
        reason="a precompiled function cannot save guards on torchao's quantized weights (its Float8Tensor has no "
        "empty_like), so Dynamo compiles them",
    ),
    Conflict(
        yields="compile",
        wins="precision",
        holds=lambda values: values["precision"] == "int8",
        # Measured on an H200 (BENCHMARKS.md): 158 s and 136 s for the first two shapes against about 20 s in bf16.
        reason="Inductor compiles int8's weight-only matmuls for over two minutes per served shape, so int8 serves "
        "eager",
    ),
)


def settle(values: dict[str, Any]) -> dict[str, Any]:
    """The one place where one switch overrides another; each override is logged."""
    for conflict in CONFLICTS:
        if values[conflict.yields] and conflict.holds(values):
            values[conflict.yields] = False
            log.warning(
                "%s turned off because %s is %s: %s (set %s to false to silence this)",
                conflict.yields,
                conflict.wins,
                values[conflict.wins],
                conflict.reason,
                conflict.yields,
            )
    return values


def build(values: Mapping[str, Any]) -> Settings:
    """The grouped, typed settings from validated values by key."""
    groups: dict[str, dict[str, Any]] = {}
    top: dict[str, Any] = {}
    for d in declarations().values():
        if len(d.path) == 1:
            top[d.path[0]] = values[d.key]
        else:
            groups.setdefault(d.path[0], {})[d.path[1]] = values[d.key]
    hints = get_type_hints(Settings)
    return Settings(**top, **{name: hints[name](**group) for name, group in groups.items()})


def config_metadata(path: Path = CONFIG_PATH) -> dict[str, Any]:
    """model_metadata of a Truss config file, for code that runs outside the Truss server."""
    return yaml.safe_load(path.read_text())["model_metadata"]


def env_for(**overrides: Any) -> dict[str, str]:
    """FLUX_* environment variables for the given settings by key; an unknown key or a bad value raises."""
    declared = declarations()
    _refuse_unknown("setting", overrides, declared)
    env = {declared[key].env: _env_value(value) for key, value in overrides.items()}
    # Parse each as the server will, so a bad value fails where it is written rather than in a child process.
    problems = []
    for key, value in overrides.items():
        adapter = pydantic.TypeAdapter(declared[key].annotation, config=ConfigDict(arbitrary_types_allowed=True))
        try:
            adapter.validate_python(env[declared[key].env])
        except pydantic.ValidationError as exc:
            problems.append(f"{key}={value!r}: {exc.errors()[0]['msg']}")
    if problems:
        raise SettingsError("invalid overrides:\n  " + "\n  ".join(problems))
    return env


def _env_value(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if value is None:
        return ""
    if isinstance(value, list | tuple):
        return ",".join(str(item) for item in value)
    return str(value)


def _markdown_value(value: Any) -> str:
    if value is MISSING:
        return "required"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if value is None:
        return "none"
    if isinstance(value, Path) and value.is_relative_to(Path.home()):
        return f"`~/{value.relative_to(Path.home()).as_posix()}`"
    return f"`{value}`"


def _choices(annotation: Any) -> tuple[str, ...]:
    """The allowed values of a Literal-typed setting; () for any other type."""
    return get_args(annotation) if get_origin(annotation) is Literal else ()


def settings_table() -> str:
    """The README's settings table: one row per declaration."""
    rows = ["| key | environment | default | meaning |", "| --- | --- | --- | --- |"]
    for d in declarations().values():
        meaning = d.meaning
        if choices := _choices(d.annotation):
            meaning += f" (one of {', '.join(f'`{c}`' for c in choices)})"
        rows.append(f"| `{d.key}` | `{d.env}` | {_markdown_value(d.default)} | {meaning} |")
    return "\n".join(rows)
