"""On a CUDA GPU: the same request gives the same JPEG bytes on every replica, a cache miss and two hits of it.

The full-size architecture (random weights), config.yaml's served sizes and every aspect ratio, in bf16 and fp8.
The CPU suite checks the same on the tiny model (tests/test_compile_cache.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.harness import run_state, same_bytes

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.parametrize("precision", ["bf16", "fp8"])
def test_a_miss_and_two_hits_serve_the_same_bytes_at_every_size(precision: str, tmp_path: Path) -> None:
    env = {"FLUX_MODEL_SOURCE": "full-random", "FLUX_PRECISION": precision}
    miss = run_state("miss", tmp_path, env, every_size=True)
    hits = [run_state("hit", tmp_path, env, replica=replica, every_size=True) for replica in (1, 2)]
    assert [hit["restore"] for hit in hits] == ["hit", "hit"]
    assert len(miss["images"]) >= 11, "the static sizes and every aspect ratio"
    assert same_bytes(miss, hits) == {"hits_serve_the_miss_bytes": True, "sizes_differing": []}
