"""What one configuration's compiled artifacts are called and where they live: the one owner of both facts.

The cache key (a fingerprint of everything that shapes the compiled code), Inductor's directory, and the
functions compiled ahead of time inside it. The cache backends archive and restore `inductor_dir` under `key`;
model.precompile saves its functions in `precompiled_dir`, so every archive carries them.
"""

from __future__ import annotations

import hashlib
import json
import platform
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from model.compat import inductor_cache_dir

PRECOMPILED_SUBDIRECTORY = "precompiled"


def fingerprint(facts: Mapping[str, Any]) -> str:
    """A short hash of everything that shapes the compiled artifacts, plus the library versions and the device."""
    versions = {}
    for package in ("torch", "diffusers", "transformers", "triton"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu-{platform.machine()}"
    payload = {**facts, "versions": versions, "python": platform.python_version(), "device": device}
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()
    return digest[:16]


@dataclass(frozen=True)
class CompileArtifacts:
    inductor_dir: Path
    key: str

    @classmethod
    def here(cls, facts: Mapping[str, Any]) -> CompileArtifacts:
        """This process's Inductor directory, keyed by the fingerprint of `facts`."""
        return cls(inductor_cache_dir(), fingerprint(facts))

    @property
    def precompiled_dir(self) -> Path:
        """Per key: a function saved for other switches would run its own graph unchecked (its module guards are
        not saved)."""
        return self.inductor_dir / PRECOMPILED_SUBDIRECTORY / self.key
