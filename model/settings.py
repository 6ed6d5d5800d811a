"""Every setting a deployer touches, declared once: its type, default and meaning.

config.yaml's `model_metadata` sets them and `FLUX_<KEY>` environment variables override it; the declared default
fills in the rest. pydantic-settings reads both (`Settings.from_sources`), and this is the one module that does, so
every other module takes the typed values and never looks at os.environ. Plain data: no torch import.
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

from model.precision import (
    GpuFacts,
    PrecisionSetting,
    TextEncoderPrecisionSetting,
    choose_precision,
    choose_text_encoder_precision,
)
from model.resolutions import (
    ABSOLUTE_MAX_SIDE,
    DEFAULT_ASPECT_RATIOS,
    DEFAULT_BOUNDS,
    MEGAPIXEL_TOLERANCE,
    RATIO_TOLERANCE,
    SIDE_MULTIPLE,
    AspectRatios,
    ResolutionRegistry,
    ServedSizes,
    SizeBounds,
)

log = logging.getLogger(__name__)

ENV_PREFIX = "FLUX_"
# The package's own config.yaml: the one source of the served sizes and every other deployed value.
CONFIG_PATH = Path(__file__).resolve().parent.parent / "config.yaml"
DEFAULT_LOCAL_CACHE_DIR = Path.home() / ".cache" / "flux-schnell-truss" / "compile"
# model_metadata keys that Truss and Baseten read for themselves: allowed beside the settings, never parsed here.
PLATFORM_METADATA_KEYS = frozenset({"example_model_input", "tags", "avatar_url", "cover_image_url"})

# "auto": b10-transfer on Baseten's cache volume, the local directory elsewhere (model.cache).
CacheBackend = Literal["auto", "b10-transfer", "local", "none"]


def _comma_separated(value: Any) -> Any:
    """An environment variable holds a list as "a,b"; YAML gives a real list."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


# NoDecode: pydantic-settings would read a list-like variable as JSON; ours are "a,b" (and NAME=WxH for ratios).
Resolutions = Annotated[ResolutionRegistry, NoDecode, BeforeValidator(ResolutionRegistry.coerce)]
AspectRatioRegistry = Annotated[AspectRatios, NoDecode, BeforeValidator(AspectRatios.coerce)]
TextLengths = Annotated[
    tuple[int, ...], NoDecode, BeforeValidator(_comma_separated), AfterValidator(lambda v: tuple(sorted(set(v))))
]
Side = Annotated[int, Field(ge=SIDE_MULTIPLE, le=ABSOLUTE_MAX_SIDE)]
OptionalPath = Annotated[Path | None, BeforeValidator(lambda v: None if v == "" else v)]


@dataclass(frozen=True)
class CompileSettings:
    """What load() compiles (model.compile, model.coldstart): decided from the settings, never set on its own."""

    enabled: bool = True
    # Sizes without a static graph share one dynamic-shape graph, compiled and warmed up at load; off, they run eager.
    any_size: bool = True
    # Compiled regions saved as files, so that a hit skips Dynamo (model.precompile); bf16 only (see `resolved`).
    precompile: bool = True
    # The VAE's decoder is always compiled when serving; tests that check only the transformer's graphs leave it out,
    # as its compile is the slowest on a CPU.
    vae: bool = True


class SettingsError(ValueError):
    """A setting that cannot be used as given: the message names the setting, the value and its source."""


class _ModelMetadata(PydanticBaseSettingsSource):
    """config.yaml's `model_metadata` as a settings source, below the environment."""

    def __init__(self, settings_cls: type[BaseSettings], metadata: Mapping[str, Any]) -> None:
        super().__init__(settings_cls)
        self.metadata = {k: v for k, v in metadata.items() if k not in PLATFORM_METADATA_KEYS}

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:  # unused: __call__ answers
        return self.metadata.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        # Every key, known or not: extra="forbid" refuses a misspelt one by name.
        return dict(self.metadata)


# The sources of the Settings being built: from_sources hands them to settings_customise_sources.
_SOURCES: ContextVar[tuple[Mapping[str, Any], Mapping[str, str] | None]] = ContextVar("settings_sources")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="forbid", frozen=True, arbitrary_types_allowed=True, protected_namespaces=()
    )

    repo_id: str = Field("black-forest-labs/FLUX.1-schnell", description="the Hugging Face repo the weights come from")
    # "tiny" and "full-random" build an offline architecture with random weights (model.random_flux).
    model_source: str = Field(
        "hf",
        description="`hf`: the weights mount, else `repo_id` from the hub; `tiny` or `full-random`: an offline "
        "architecture; else a local diffusers directory",
    )
    weights_path: OptionalPath = Field(None, description="where config.yaml's `weights:` mounts the repo")
    resolutions: Resolutions = Field(
        description="the `WIDTHxHEIGHT`s compiled as static graphs and warmed up at load; any other size within "
        "`min_side`, `max_side` and `max_megapixels` is served by one graph not specialised to it"
    )
    text_lengths: TextLengths = Field(
        description="T5 sequence lengths compiled for each size; a request's length rounds up to one"
    )
    min_side: Side = Field(DEFAULT_BOUNDS.min_side, description="the smallest width or height a request may ask for")
    max_side: Side = Field(DEFAULT_BOUNDS.max_side, description="the largest width or height a request may ask for")
    max_megapixels: float = Field(
        DEFAULT_BOUNDS.max_megapixels,
        gt=0,
        allow_inf_nan=False,
        description="the largest width x height a request may ask for, in megapixels",
    )
    aspect_ratios: AspectRatioRegistry = Field(
        DEFAULT_ASPECT_RATIOS,
        description="each `aspect_ratio` a request may name, with its `WIDTHxHEIGHT`: about one megapixel (within "
        f"{MEGAPIXEL_TOLERANCE:.0%}), its sides in the named ratio (within {RATIO_TOLERANCE:.0%})",
    )
    compile: bool = Field(True, description="`false` serves eager: a short start, slower requests")
    compile_any_size: bool = Field(
        True,
        description="compile and warm up one dynamic-shape graph for every size without a static graph; off, those "
        "sizes run eager and load() is shorter",
    )
    precision: PrecisionSetting = Field(
        "auto",
        description="the transformer's precision; `auto` picks by the GPU load() finds (README's GPU table)",
    )
    text_encoder_precision: TextEncoderPrecisionSetting = Field(
        "auto",
        description="the T5 encoder's weights: `int8` halves their 9.5 GB, `int4` (CUDA only) quarters them; `auto` "
        "picks int4 beside an fp8 or int8 transformer on a card too small for bf16, else bf16",
    )
    # A prompt's embeddings take 2 MB (256 tokens) or 4 MB (512) on the GPU: 256 MB keeps the last 64 or more.
    prompt_cache_mb: pydantic.NonNegativeInt = Field(
        256,
        description="GPU memory for the embeddings of recent prompts: a repeated prompt skips both text encoders; "
        "0 turns the cache off",
    )
    cache_backend: CacheBackend = Field(
        "auto",
        description="where the compile cache lives between starts: `auto` picks b10-transfer where Baseten's cache "
        "volume is enabled, the local directory elsewhere",
    )
    cache_dir: Path = Field(DEFAULT_LOCAL_CACHE_DIR, description="where the local backend keeps its archives")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        metadata, environ = _SOURCES.get(({}, None))
        if environ is not None and isinstance(env_settings, EnvSettingsSource):
            env_settings.env_vars = {k.lower(): v for k, v in environ.items()}
        return init_settings, env_settings, _ModelMetadata(settings_cls, metadata)

    @pydantic.model_validator(mode="after")
    def _sizes_inside_the_bounds(self) -> Settings:
        if self.min_side > self.max_side:
            raise ValueError(f"min_side={self.min_side} is more than max_side={self.max_side}")
        entries = {
            **{f"resolutions {r}": r for r in self.resolutions},
            **{f"aspect_ratios {n}={r}": r for n, r in self.aspect_ratios.items()},
        }
        for label, size in entries.items():
            if problem := self.bounds.problem(size.width, size.height):
                raise ValueError(f"{label} is outside the size bounds: {problem[0]} {problem[1]}")
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
    def bounds(self) -> SizeBounds:
        return SizeBounds(self.min_side, self.max_side, self.max_megapixels)

    @property
    def sizes(self) -> ServedSizes:
        return ServedSizes(self.bounds, self.aspect_ratios)

    @property
    def compile_settings(self) -> CompileSettings:
        """What load() compiles, of settings `resolved` for a GPU."""
        # Measured on an H200 (BENCHMARKS.md): saving a precompiled function pickles its guards with a meta copy of
        # every guarded tensor (torch.empty_like), which torchao's Float8Tensor weights do not implement.
        return CompileSettings(self.compile, self.compile_any_size, precompile=self.precision not in ("fp8", "int8"))

    def resolved(self, gpu: GpuFacts | None) -> Settings:
        """These settings with both `auto` precisions decided for `gpu`, each choice logged with its reason."""
        chosen, reason = choose_precision(self.precision, gpu)
        log.info("precision %s: %s", chosen, reason)
        text_chosen, text_reason = choose_text_encoder_precision(self.text_encoder_precision, chosen, gpu)
        log.info("text_encoder_precision %s: %s", text_chosen, text_reason)
        compile_on = self.compile
        if compile_on and chosen == "int8":
            # Measured on an H200 (BENCHMARKS.md): 158 s and 136 s for the first two shapes against about 20 s in bf16.
            log.warning(
                "compile turned off because precision is int8: Inductor compiles its weight-only matmuls for "
                "over two minutes per served shape, so int8 serves eager"
            )
            compile_on = False
        return self.model_copy(
            update={"precision": chosen, "text_encoder_precision": text_chosen, "compile": compile_on}
        )

    def fingerprint_facts(self) -> dict[str, Any]:
        """What shapes the compiled artifacts, for the cache key: of settings `resolved` for a GPU."""
        if "auto" in (self.precision, self.text_encoder_precision):
            # "auto" names no precision: a key made of it would match no server's.
            raise ValueError("the cache key needs a decided precision: use settings.resolved(gpu_facts()) first")
        return {
            "model": self.repo_id if self.model_source == "hf" else self.model_source,
            "compile_any_size": self.compile_any_size,
            "precision": self.precision,
            "text_encoder_precision": self.text_encoder_precision,
            "resolutions": [str(r) for r in self.resolutions],
            "text_lengths": list(self.text_lengths),
        }


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


def _warn_of_stray_variables(environ: Mapping[str, str]) -> None:
    # The environment is shared with everything else in the container, so a stray name only warns.
    known = {ENV_PREFIX + key.upper() for key in Settings.model_fields}
    for name in sorted(n for n in environ if n.upper().startswith(ENV_PREFIX) and n.upper() not in known):
        log.warning("%s is not a setting and is ignored; the settings are %s", name, ", ".join(sorted(known)))


def config_metadata(path: Path = CONFIG_PATH) -> dict[str, Any]:
    """model_metadata of a Truss config file, for code that runs outside the Truss server."""
    return yaml.safe_load(path.read_text())["model_metadata"]


def env_for(**overrides: Any) -> dict[str, str]:
    """FLUX_* environment variables for the given settings by key, checked as the server will read them."""
    env = {ENV_PREFIX + key.upper(): _env_value(value) for key, value in overrides.items()}
    Settings.from_sources(environ=env)  # a bad key or value fails here, not in a child process
    return env


def _env_value(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, list | tuple):
        return ",".join(str(item) for item in value)
    return str(value)
