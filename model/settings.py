"""Typed serving settings: config.yaml's model_metadata, overridden by environment variables.

One place reads both, so every other module takes a `Settings` and never looks at os.environ.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from model.resolutions import ResolutionRegistry

ENV_PREFIX = "FLUX_"
# The package's own config.yaml: the one source of the served sizes and every other default.
CONFIG_PATH = Path(__file__).resolve().parent.parent / "config.yaml"


def config_metadata(path: Path = CONFIG_PATH) -> dict[str, Any]:
    """model_metadata of a Truss config file, for code that runs outside the Truss server."""
    return yaml.safe_load(path.read_text())["model_metadata"]


@dataclass(frozen=True)
class Settings:
    repo_id: str
    # "hf" loads weights_path when mounted, else repo_id from the hub; "tiny" and "full-random"
    # build an offline architecture (model.random_flux); anything else is a local directory.
    model_source: str
    weights_path: Path | None
    resolutions: ResolutionRegistry
    text_lengths: tuple[int, ...]

    @classmethod
    def from_sources(
        cls, metadata: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
    ) -> Settings:
        """Merge model_metadata (config.yaml's when None) with FLUX_* environment variables; the environment wins."""
        meta = dict(config_metadata() if metadata is None else metadata)
        env = os.environ if environ is None else environ

        def pick(key: str, default: Any = None) -> Any:
            return env.get(ENV_PREFIX + key.upper(), meta.get(key, default))

        resolutions = pick("resolutions")
        if isinstance(resolutions, str):
            resolutions = [part for part in resolutions.replace(" ", "").split(",") if part]
        text_lengths = pick("text_lengths")
        if isinstance(text_lengths, str):
            text_lengths = [int(part) for part in text_lengths.split(",") if part.strip()]
        weights_path = pick("weights_path")
        return cls(
            repo_id=str(pick("repo_id")),
            model_source=str(pick("model_source", "hf")),
            weights_path=Path(weights_path) if weights_path else None,
            resolutions=ResolutionRegistry.parse(resolutions),
            text_lengths=tuple(sorted({int(n) for n in text_lengths})),
        )
