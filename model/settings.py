"""Every setting a deployer touches, declared once: its type, default and meaning.

config.yaml's `model_metadata` sets them and `FLUX_<KEY>` variables override it, both read by pydantic-settings
here and nowhere else: every other module takes the typed values. Plain data: no torch import.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import pydantic
import yaml
from pydantic import AfterValidator, BeforeValidator, Field
from pydantic_settings import BaseSettings, EnvSettingsSource, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

from model import precision as rules
from model import resolutions as sizes
from model.schema import MAX_LORAS

log = logging.getLogger(__name__)

ENV_PREFIX = "FLUX_"
# The package's config.yaml: the one source of the served sizes and every other deployed value.
CONFIG_PATH = Path(__file__).resolve().parent.parent / "config.yaml"
DEFAULT_LOCAL_CACHE_DIR = Path.home() / ".cache" / "flux-schnell-truss" / "compile"
LORA_DIR = DEFAULT_LOCAL_CACHE_DIR.parent / "loras"
# model_metadata keys that Truss and Baseten read for themselves: allowed beside the settings, never parsed here.
PLATFORM_METADATA_KEYS = frozenset({"example_model_input", "tags", "avatar_url", "cover_image_url"})

CacheBackend = Literal["auto", "b10-transfer", "local", "none"]


def _comma_separated(value: Any) -> Any:
    """An environment variable holds a list as "a,b"; YAML gives a real list."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


# NoDecode: pydantic-settings would read a list-like variable as JSON; ours are "a,b" (and NAME=WxH for ratios).
Resolutions = Annotated[sizes.ResolutionRegistry, NoDecode, BeforeValidator(sizes.ResolutionRegistry.coerce)]
AspectRatioRegistry = Annotated[sizes.AspectRatios, NoDecode, BeforeValidator(sizes.AspectRatios.coerce)]
TextLengths = Annotated[
    tuple[int, ...], NoDecode, BeforeValidator(_comma_separated), AfterValidator(lambda v: tuple(sorted(set(v))))
]
Side = Annotated[int, Field(ge=sizes.SIDE_MULTIPLE, le=sizes.ABSOLUTE_MAX_SIDE)]
Megapixels = Annotated[float, Field(gt=0, allow_inf_nan=False)]
BOUNDS = sizes.DEFAULT_BOUNDS
Source = PydanticBaseSettingsSource
OptionalPath = Annotated[Path | None, BeforeValidator(lambda v: None if v == "" else v)]


@dataclass(frozen=True)
class CompileSettings:
    """What load() compiles (model.compile, model.coldstart): decided from the settings, never set on its own."""

    enabled: bool = True
    any_size: bool = True  # one dynamic-shape graph for the sizes without a static one; else they run eager
    vae: bool = True  # always when serving; tests of the blocks' graphs leave out its slow CPU compile


class SettingsError(ValueError):
    """A setting that cannot be used as given: the message names the setting, the value and its source."""


class _ModelMetadata(Source):
    """config.yaml's `model_metadata` as a settings source, below the environment."""

    def __init__(self, settings_cls: type[BaseSettings], metadata: Mapping[str, Any]) -> None:
        super().__init__(settings_cls)
        self.metadata = {k: v for k, v in metadata.items() if k not in PLATFORM_METADATA_KEYS}

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:  # unused: __call__ answers
        return self.metadata.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self.metadata)  # unknown keys too: extra="forbid" refuses a misspelt one by name


# The sources of the Settings being built: from_sources hands them to settings_customise_sources.
_SOURCES: ContextVar[tuple[Mapping[str, Any], Mapping[str, str] | None]] = ContextVar("settings_sources")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="forbid", frozen=True, arbitrary_types_allowed=True, protected_namespaces=()
    )

    repo_id: str = Field("black-forest-labs/FLUX.1-schnell", description="the Hugging Face repo the weights come from")
    model_source: str = Field(
        "hf",
        description="`hf`: the weights mount, else `repo_id`; `tiny` or `full-random`: offline random weights; "
        "else a diffusers directory",
    )
    weights_path: OptionalPath = Field(None, description="where config.yaml's `weights:` mounts the repo")
    resolutions: Resolutions = Field(
        description="the `WIDTHxHEIGHT`s with static graphs of their own; other sizes share one"
    )
    text_lengths: TextLengths = Field(
        description="T5 lengths compiled for each size; a request's length rounds up to one"
    )
    min_side: Side = Field(BOUNDS.min_side, description="the smallest width or height")
    max_side: Side = Field(BOUNDS.max_side, description="the largest width or height")
    max_megapixels: Megapixels | Literal["auto"] = Field(
        "auto", description="the largest width x height, in megapixels: `auto` is 2, and 1.2 where bf16 does not fit"
    )
    aspect_ratios: AspectRatioRegistry = Field(
        sizes.DEFAULT_ASPECT_RATIOS,
        description=f"each `aspect_ratio` and its size: within {sizes.MEGAPIXEL_TOLERANCE:.0%} of a megapixel and "
        f"{sizes.RATIO_TOLERANCE:.0%} of the ratio",
    )
    compile: bool = Field(True, description="`false` serves eager: a short start, slower requests")
    compile_any_size: bool = Field(True, description="compile one dynamic-shape graph for the other sizes; off, eager")
    precision: rules.PrecisionSetting = Field(
        "auto", description="the transformer's: `auto` (by the GPU), `bf16`, `fp8`, `int8`"
    )
    text_encoder_precision: rules.TextEncoderPrecisionSetting = Field(
        "auto", description="T5's weights: `auto`, `bf16`, `int8`, `int4`; `auto` picks int4 where bf16 does not fit"
    )
    # A prompt's embeddings take 2 MB (256 tokens) or 4 MB (512) on the GPU: 256 MB keeps the last 64 or more.
    prompt_cache_mb: pydantic.NonNegativeInt = Field(
        256, description="GPU memory for recent prompts' embeddings; 0 is off"
    )
    cache_backend: CacheBackend = Field(
        "auto", description="the compile cache: `auto` (b10-transfer on Baseten), `b10-transfer`, `local`, `none`"
    )
    cache_dir: Path = Field(DEFAULT_LOCAL_CACHE_DIR, description="where the `local` cache keeps its archives")
    max_loras: int = Field(
        0,
        ge=0,
        le=MAX_LORAS,
        description="LoRA adapters a request may apply; 0 is off, and on keeps a copy of the weights",
    )
    max_lora_rank: int = Field(64, ge=1, le=512, description="the largest adapter rank; it caps a download's size")
    lora_presets: dict[str, str] = Field(
        default_factory=dict, description="names for adapters' URLs or Hugging Face references"
    )
    lora_disk_mb: pydantic.PositiveInt = Field(20_000, description="disk for downloaded adapters, least recent out")
    # Two 4000-character prompts of escaped astral characters are under 100 KB; a 2-megapixel PNG in base64 with
    # its mask is under 12 MB. URLs are the way for larger inputs, and for async requests (capped at 256 KiB).
    max_body_mb: pydantic.PositiveFloat = Field(
        12, description="the largest request body; one with an inline image must fit"
    )
    allow_private_urls: bool = Field(
        False, description="also fetch http and private or loopback addresses (local development)"
    )

    @classmethod
    def settings_customise_sources(
        cls, settings_cls: type[BaseSettings], init_settings: Source, env_settings: Source, **_: Source
    ) -> tuple[Source, ...]:
        metadata, environ = _SOURCES.get(({}, None))
        if environ is not None and isinstance(env_settings, EnvSettingsSource):
            env_settings.env_vars = {k.lower(): v for k, v in environ.items()}
        return init_settings, env_settings, _ModelMetadata(settings_cls, metadata)

    @pydantic.model_validator(mode="after")
    def _sizes_inside_the_bounds(self) -> Settings:
        if self.min_side > self.max_side:
            raise ValueError(f"min_side={self.min_side} is more than max_side={self.max_side}")
        labelled = {f"resolutions {r}": r for r in self.resolutions}
        labelled |= {f"aspect_ratios {n}={r}": r for n, r in self.aspect_ratios.items()}
        least = rules.SMALL_CARD_MEGAPIXELS if self.max_megapixels == "auto" else self.max_megapixels  # every card's
        if problem := sizes.SizeBounds(self.min_side, self.max_side, least).first_outside(labelled):
            raise ValueError(problem)
        return self

    @classmethod
    def from_sources(
        cls, metadata: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
    ) -> Settings:
        """model_metadata (config.yaml's when None) under FLUX_* variables (the process's when None).

        Raises SettingsError naming each bad value and where it came from, or an unknown model_metadata key.
        """
        meta = dict(config_metadata() if metadata is None else metadata)
        env = os.environ if environ is None else environ
        _warn_of_stray_variables(env)
        token = _SOURCES.set((meta, environ))
        try:
            return cls()
        except pydantic.ValidationError as exc:
            raise SettingsError(_explained(exc, meta, env)) from None
        finally:
            _SOURCES.reset(token)

    @property
    def bounds(self) -> sizes.SizeBounds:
        """Of settings `resolved` for a GPU; before, `auto` is what it is without a GPU."""
        return sizes.SizeBounds(self.min_side, self.max_side, rules.choose_max_megapixels(self.max_megapixels, None)[0])

    @property
    def sizes(self) -> sizes.ServedSizes:
        return sizes.ServedSizes(self.bounds, self.aspect_ratios)

    @property
    def compile_settings(self) -> CompileSettings:  # of settings `resolved` for a GPU
        return CompileSettings(self.compile, self.compile_any_size)

    def resolved(self, gpu: rules.GpuFacts | None) -> Settings:
        """These settings with every `auto` decided for `gpu`, each choice logged with its reason."""
        chosen, reason = rules.choose_precision(self.precision, gpu)
        decided = {
            "precision": (chosen, reason),
            "text_encoder_precision": rules.choose_text_encoder_precision(self.text_encoder_precision, chosen, gpu),
            "max_megapixels": rules.choose_max_megapixels(self.max_megapixels, gpu),
        }
        for key, (value, why) in decided.items():
            log.info("%s %s: %s", key, value, why)
        compiles, why_not = rules.compiles_at(chosen)
        if self.compile and not compiles:
            log.warning("compile turned off because precision is %s: %s", chosen, why_not)
        update = {key: value for key, (value, _) in decided.items()} | {"compile": self.compile and compiles}
        return self.model_copy(update=update)

    def fingerprint_facts(self) -> dict[str, Any]:
        """What shapes the compiled artifacts, for the cache key: of settings `resolved` for a GPU."""
        if "auto" in (self.precision, self.text_encoder_precision):
            # "auto" names no precision: a key made of it would match no server's.
            raise ValueError("the cache key needs a decided precision: use settings.resolved(gpu_facts()) first")
        facts: dict[str, Any] = {
            "model": self.repo_id if self.model_source == "hf" else self.model_source,
            "compile_any_size": self.compile_any_size,
            "precision": self.precision,
            "text_encoder_precision": self.text_encoder_precision,
            "resolutions": [str(r) for r in self.resolutions],
            "text_lengths": list(self.text_lengths),
        }
        return facts


def _source_of(key: str, metadata: Mapping[str, Any], environ: Mapping[str, str]) -> tuple[str, Any] | None:
    """Where a setting's value came from, and the value as given there; None when neither source gave it."""
    name = ENV_PREFIX + key.upper()
    for variable, value in environ.items():
        if variable.upper() == name:
            return variable, value
    return ("model_metadata", metadata[key]) if key in metadata else None


def _explained(exc: pydantic.ValidationError, metadata: Mapping[str, Any], environ: Mapping[str, str]) -> str:
    problems = []
    for error in exc.errors():
        key = str(error["loc"][0]) if error["loc"] else ""
        if error["type"] == "extra_forbidden":
            known = ", ".join(Settings.model_fields)
            problems.append(f"unknown model_metadata key {key!r}; the settings are: {known}")
        elif not key:  # a rule across settings: its message starts with the setting at fault
            message = error["msg"].removeprefix("Value error, ")
            named = message.split(" ", 1)[0]
            if named in Settings.model_fields and " is outside" in message:
                origin = source[0] if (source := _source_of(named, metadata, environ)) else "the default"
                message = message.replace(" is outside", f" (from {origin}) is outside", 1)
            problems.append(message)
        elif (source := _source_of(key, metadata, environ)) is None:
            problems.append(f"{key} (not given): {error['msg']}")
        else:
            problems.append(f"{key}={source[1]!r} (from {source[0]}): {error['msg']}")
    return "invalid settings:\n  " + "\n  ".join(problems)


def _warn_of_stray_variables(environ: Mapping[str, str]) -> None:  # the container's environment is shared: only warn
    known = {ENV_PREFIX + key.upper() for key in Settings.model_fields}
    for name in sorted(n for n in environ if n.upper().startswith(ENV_PREFIX) and n.upper() not in known):
        log.warning("%s is not a setting and is ignored; the settings are %s", name, ", ".join(sorted(known)))


def config_metadata(path: Path = CONFIG_PATH) -> dict[str, Any]:
    """model_metadata of a Truss config file, for code that runs outside the Truss server."""
    return yaml.safe_load(path.read_text())["model_metadata"]
