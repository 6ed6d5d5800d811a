"""Typed serving settings: config.yaml's model_metadata, overridden by FLUX_* environment variables.

One place reads both, so every other module takes typed settings and never looks at os.environ.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from model.compile import CompileSettings
from model.optimize import Optimizations
from model.resolutions import ResolutionRegistry

ENV_PREFIX = "FLUX_"
# The package's own config.yaml: the one source of the served sizes and every other default.
CONFIG_PATH = Path(__file__).resolve().parent.parent / "config.yaml"
DEFAULT_LOCAL_CACHE_DIR = Path.home() / ".cache" / "flux-schnell-truss" / "compile"


def config_metadata(path: Path = CONFIG_PATH) -> dict[str, Any]:
    """model_metadata of a Truss config file, for code that runs outside the Truss server."""
    return yaml.safe_load(path.read_text())["model_metadata"]


def _as_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in {"1", "true", "yes", "on"}:
        return True
    if text in {"0", "false", "no", "off"}:
        return False
    raise ValueError(f"{value!r} is not a boolean")


def _as_list(value: Any) -> list[str]:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return [str(item) for item in value]


@dataclass(frozen=True)
class CacheSettings:
    # "auto": b10-transfer on Baseten's cache volume, the local directory elsewhere (model.cache).
    backend: str = "auto"
    local_dir: Path = DEFAULT_LOCAL_CACHE_DIR


@dataclass(frozen=True)
class Settings:
    repo_id: str
    # "hf" loads weights_path when mounted, else repo_id from the hub; "tiny" and "full-random"
    # build an offline architecture (model.random_flux); anything else is a local directory.
    model_source: str
    weights_path: Path | None
    resolutions: ResolutionRegistry
    text_lengths: tuple[int, ...]
    compile: CompileSettings
    optimizations: Optimizations
    cache: CacheSettings

    @classmethod
    def from_sources(
        cls, metadata: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
    ) -> Settings:
        """Merge model_metadata (config.yaml's when None) with FLUX_* environment variables; the environment wins."""
        meta = dict(config_metadata() if metadata is None else metadata)
        env = os.environ if environ is None else environ

        def pick(key: str, default: Any = None) -> Any:
            return env.get(ENV_PREFIX + key.upper(), meta.get(key, default))

        weights_path = pick("weights_path")
        compile_defaults, opt_defaults, cache_defaults = CompileSettings(), Optimizations(), CacheSettings()
        fp8 = _as_bool(pick("fp8", opt_defaults.fp8))
        return cls(
            repo_id=str(pick("repo_id")),
            model_source=str(pick("model_source", "hf")),
            weights_path=Path(weights_path) if weights_path else None,
            resolutions=ResolutionRegistry.parse(_as_list(pick("resolutions"))),
            text_lengths=tuple(sorted({int(n) for n in _as_list(pick("text_lengths"))})),
            compile=CompileSettings(
                enabled=_as_bool(pick("compile", compile_defaults.enabled)),
                mode=str(pick("compile_mode", compile_defaults.mode)),
                regional=_as_bool(pick("compile_regional", compile_defaults.regional)),
                compile_vae=_as_bool(pick("compile_vae", compile_defaults.compile_vae)),
                dynamic=_as_bool(pick("compile_dynamic", compile_defaults.dynamic)),
                shared_block_layout=_as_bool(pick("compile_shared_block_layout", compile_defaults.shared_block_layout)),
                # fp8 was measured on the GPU with Dynamo's own compile; its quantized weights have never gone
                # through a precompiled function, so fp8 keeps the measured path.
                precompile=_as_bool(pick("compile_precompile", compile_defaults.precompile)) and not fp8,
                warmup_runs=int(pick("warmup_runs", compile_defaults.warmup_runs)),
            ),
            optimizations=Optimizations(
                fuse_qkv=_as_bool(pick("fuse_qkv", opt_defaults.fuse_qkv)),
                vae_channels_last=_as_bool(pick("vae_channels_last", opt_defaults.vae_channels_last)),
                attention_backend=pick("attention_backend", opt_defaults.attention_backend) or None,
                fp8=fp8,
            ),
            cache=CacheSettings(
                backend=str(pick("cache_backend", cache_defaults.backend)),
                local_dir=Path(pick("cache_dir", cache_defaults.local_dir)),
            ),
        )

    def fingerprint_facts(self) -> dict[str, Any]:
        """What shapes the compiled artifacts, for the cache key."""
        return {
            "model": self.repo_id if self.model_source == "hf" else self.model_source,
            "compile": {k: v for k, v in vars(self.compile).items() if k != "warmup_runs"},
            "optimizations": vars(self.optimizations),
            "resolutions": [str(r) for r in self.resolutions],
            "text_lengths": list(self.text_lengths),
        }
