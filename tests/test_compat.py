"""Every private internal the package reaches (model/compat.py), against the pinned versions.

An upgrade of torch, diffusers or b10-transfer that moves one of them fails here, by name.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from model import compat
from model.engine import FluxEngine

ROOT = Path(__file__).resolve().parent.parent


def test_inductor_cache_dir_follows_its_environment_variable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    assert compat.inductor_cache_dir() == tmp_path / "inductor"


def test_inductor_cache_dir_is_inductors_own_default_without_importing_inductor() -> None:
    """The cache key, which the restore waits for, must not pay for Inductor's import (model.compat)."""
    probe = (
        "import sys; from model.compat import inductor_cache_dir; print(inductor_cache_dir());"
        "print('torch._inductor' in sys.modules);"
        "from torch._inductor.runtime.cache_dir_utils import default_cache_dir; print(default_cache_dir())"
    )
    environment = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    printed = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, env=environment, cwd=ROOT
    ).stdout.split()
    assert printed == [printed[2], "False", printed[2]]


def test_triton_kernel_bundling_reads_inductors_switch() -> None:
    from torch._inductor import config

    for bundled in (True, False):
        with config.patch(bundle_triton_into_fx_graph_cache=bundled):
            assert compat.triton_kernels_bundled() is bundled


def test_compile_counts_see_a_compile() -> None:
    before = compat.compile_counts()
    assert set(before) == {"graphs", "fxgraph_misses", "fxgraph_hits"}
    torch.compile(lambda x: x * 2 + 1, backend="eager")(torch.ones(3))
    assert compat.compile_counts()["graphs"] == before["graphs"] + 1


def test_recompile_limits_only_rise() -> None:
    config = torch._dynamo.config
    with config.patch(recompile_limit=8, accumulated_recompile_limit=256):
        compat.allow_recompiles(12)
        assert (config.recompile_limit, config.accumulated_recompile_limit) == (12, 256)
        compat.allow_recompiles(4)
        assert config.recompile_limit == 12, "a smaller request never lowers the limit"
        compat.allow_recompiles(100)
        assert (config.recompile_limit, config.accumulated_recompile_limit) == (100, 400)


def test_repeated_blocks_and_latent_unpacking_of_the_pipeline(engine: FluxEngine) -> None:
    pipe = engine.pipe
    assert compat.repeated_block_names(pipe.transformer) == {"FluxTransformerBlock", "FluxSingleTransformerBlock"}
    height, width = 256, 512
    channels = pipe.transformer.config.in_channels  # packed: 4x the VAE's latent channels
    patches = (height // pipe.vae_scale_factor // 2) * (width // pipe.vae_scale_factor // 2)
    unpacked = compat.unpack_latents(pipe, torch.zeros(1, patches, channels), height, width)
    assert unpacked.shape == (1, channels // 4, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)


def test_mode_options_and_aot_compile() -> None:
    assert compat.inductor_mode_options("default") == {}
    assert compat.inductor_mode_options("max-autotune")["max_autotune"] is True
    with compat.aot_compile_enabled():
        assert hasattr(torch.compile(lambda x: x + 1), "aot_compile")


def test_b10_transfers_own_reading_of_baseten_fs_enabled(monkeypatch: pytest.MonkeyPatch) -> None:
    from b10_transfer.utils import CacheValidationError

    monkeypatch.setenv("BASETEN_FS_ENABLED", "True")
    assert compat.b10fs_enabled_by_b10_transfer() is True
    monkeypatch.setenv("BASETEN_FS_ENABLED", "0")
    assert compat.b10fs_enabled_by_b10_transfer() is False
    monkeypatch.setenv("BASETEN_FS_ENABLED", "yes")
    with pytest.raises(CacheValidationError):
        compat.b10fs_enabled_by_b10_transfer()


def test_the_allocator_settings_are_set_without_a_deprecation_warning() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compat.set_cuda_allocator_settings("expandable_segments:True")


def test_the_compile_stance_is_read_back() -> None:
    assert compat.compile_stance() == "default"
    with torch.compiler.set_stance("eager_on_recompile"):
        assert compat.compile_stance() == "eager_on_recompile"


def test_floats_are_specialized_only_inside_the_block() -> None:
    config = torch._dynamo.config
    before = config.specialize_float
    with compat.specialized_floats():
        assert config.specialize_float is True
    with compat.specialized_floats(False):
        assert config.specialize_float is before
    assert config.specialize_float is before


def test_guards_on_the_inputs_are_kept_and_none_on_what_the_module_holds() -> None:
    """Guard names start with the argument they are rooted at; the filter must read them on this torch."""
    decisions: dict[str, bool] = {}

    def keep(entries: list) -> list[bool]:
        kept = compat.keep_input_guards(entries, owner="module", shapes=False)
        decisions.update(
            {entry.name: k for entry, k in zip(entries, kept, strict=True) if k or "TENSOR" in entry.guard_type}
        )
        return kept

    def forward(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        return module(x)

    torch.compile(forward, backend="eager", options={"guard_filter_fn": keep})(torch.nn.Linear(4, 4), torch.ones(2, 4))
    kept = {name for name, k in decisions.items() if k}
    assert len(kept) == 1 and kept.pop().replace("L['x']", "x") == "x"
    assert any("weight" in name for name, k in decisions.items() if not k), decisions
