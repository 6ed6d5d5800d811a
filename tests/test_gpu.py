"""On a CUDA GPU: the full-size architecture (random bf16 weights) compiles, serves and restarts from the cache.

The FLUX_* settings of the environment apply, e.g. FLUX_PRECISION=fp8 runs the same checks in fp8.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model.precision import CARDS
from model.resolutions import SIDE_MULTIPLE, Resolution
from model.settings import Settings
from tests.harness import CARD_PROFILES, run_state

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.fixture(scope="module")
def miss_then_hit(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict]:
    workdir: Path = tmp_path_factory.mktemp("gpu-cold-start")
    env = {"FLUX_MODEL_SOURCE": "full-random"}  # config.yaml's served sizes and text lengths
    return run_state("miss", workdir, env), run_state("hit", workdir, env)


def test_every_served_resolution_gives_a_finite_image_of_the_right_size(miss_then_hit: tuple[dict, dict]) -> None:
    for state in miss_then_hit:
        for size, image in state["images"].items():
            assert image["size"] == [int(side) for side in size.split("x")]
            assert image["pixel_std"] > 1.0, (size, image)


def test_no_recompile_after_warm_up(miss_then_hit: tuple[dict, dict]) -> None:
    for state in miss_then_hit:
        assert state["eager_fallback"] is None
        assert state["graphs_compiled_after_warmup"] == 0


def test_restart_hits_the_cache(miss_then_hit: tuple[dict, dict]) -> None:
    miss, hit = miss_then_hit
    assert miss["save"] == "saved"
    assert hit["restore"] == "hit" and hit["new_graphs"] == 0 and hit["precompiled"] == 0
    assert hit["compile_warmup_s"] < miss["compile_warmup_s"]


def largest_square(megapixels: float) -> Resolution:
    """The largest square size within `megapixels`: where the VAE decode's memory peaks."""
    side = int(math.sqrt(megapixels * 1e6)) // SIDE_MULTIPLE * SIDE_MULTIPLE
    return Resolution(side, side)


@pytest.mark.parametrize("card", sorted(CARD_PROFILES))
def test_a_smaller_card_serves_every_shape_within_its_headroom(card: str) -> None:
    """Under the card's memory cap and with what `auto` picks for it (precisions, max_megapixels), compiled and eager
    each load and serve every static size and the largest size allowed at every text length, with the allocator's
    peak reservation within the profile."""
    served = Settings.from_sources(environ={}).resolved(CARDS[card])
    static = [str(r) for r in served.resolutions]
    timed = [*static, str(largest_square(served.max_megapixels))]
    command = [
        sys.executable,
        "-m",
        "bench.latency",
        "--card",
        card,
        "--configs",
        "eager,uncompiled,default",
        "--resolutions",
        ",".join(timed),
        "--static-resolutions",
        ",".join(static),
        "--text-lengths",
        ",".join(str(n) for n in served.text_lengths),
        "--runs",
        "3",
    ]
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=False, cwd=ROOT)
    print(done.stdout)  # the figures, for BENCHMARKS.md
    results = {r["config"]: r for r in map(json.loads, done.stdout.splitlines()) if "config" in r}
    limit = CARD_PROFILES[card].limit_gib
    for name in ("uncompiled", "default"):
        result = results[name]
        assert "error" not in result, f"{name} failed on {card}: see the log"
        assert result["memory_cap_gib"] == CARD_PROFILES[card].cap_gib
        assert len(result["latency"]) == len(timed) * len(served.text_lengths)
        assert result["peak_reserved_gib"] <= limit, (name, result["peak_reserved_gib"], limit)
    assert results["default"]["compiled"] and results["default"]["eager_fallback"] is None
    assert not results["uncompiled"]["compiled"]


@pytest.mark.parametrize("shape", [(3072, 3072), (12288, 3072), (3072, 15360)])  # FLUX's linear layers' shapes
def test_an_fp8_merge_quantizes_as_torchao_does_on_the_gpu(shape: tuple[int, int]) -> None:
    """LoRA's fp8 merge quantizes per row with its own kernels: on the GPU too, the bytes are torchao's for the same
    fp32 weight, outliers included, and nothing rounds past fp8's range into NaN."""
    from torchao.quantization import Float8Tensor, PerRow

    from model.lora import _quantize_rowwise_fp8

    generator = torch.Generator("cuda").manual_seed(0)
    weight = torch.randn(shape, device="cuda", generator=generator) * 0.02
    weight[:, 0] *= 50
    expected = Float8Tensor.from_hp(weight, granularity=PerRow())
    qdata, scale = torch.empty_like(expected.qdata), torch.empty_like(expected.scale)
    _quantize_rowwise_fp8(weight.clone(), qdata, scale)
    assert torch.equal(qdata.view(torch.uint8), expected.qdata.view(torch.uint8))
    assert torch.equal(scale, expected.scale)
    assert not qdata.float().isnan().any()
