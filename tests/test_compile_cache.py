"""The real torch.compile and the local cache, in fresh processes: a miss, then a real hit.

Runs the cold-start benchmark's own states, so the test and BENCHMARKS.md measure the same thing.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.cold_start import run_state

pytestmark = pytest.mark.slow

# Two served sizes prove that no size recompiles; small ones and one warm-up run keep a CPU compile short.
ENV = {
    "FLUX_MODEL_SOURCE": "tiny",
    "FLUX_RESOLUTIONS": "256x256,512x256",
    "FLUX_TEXT_LENGTHS": "256",
    "FLUX_WARMUP_RUNS": "1",
}


@pytest.fixture(scope="module")
def miss_then_hit(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict]:
    workdir: Path = tmp_path_factory.mktemp("cold-start")
    miss = run_state("miss", workdir, ENV)
    hit = run_state("hit", workdir, ENV)
    return miss, hit


def test_miss_compiles_and_saves(miss_then_hit: tuple[dict, dict]) -> None:
    miss, _ = miss_then_hit
    assert miss["restore"] == "miss"
    # One graph per served shape for each repeated block kind and for the VAE decode, however many blocks.
    assert miss["new_graphs"] == 3 * len(ENV["FLUX_RESOLUTIONS"].split(","))
    assert miss["save"] == "saved" and miss["cache_bytes"] > 0
    assert miss["eager_fallback"] is None


def test_hit_restores_and_skips_the_compile_work(miss_then_hit: tuple[dict, dict]) -> None:
    miss, hit = miss_then_hit
    assert hit["restore"] == "hit"
    assert hit["new_graphs"] == 0, "every graph came from the restored cache"
    assert hit["cached_graphs"] == miss["new_graphs"]
    assert hit["save"] is None, "nothing new was compiled, so nothing is saved"
    assert hit["compile_warmup_s"] < 0.5 * miss["compile_warmup_s"], (hit, miss)


def test_no_request_compiles_after_warm_up(miss_then_hit: tuple[dict, dict]) -> None:
    for state in miss_then_hit:
        assert set(state["request_s"]) == {"256x256", "512x256"}
        assert state["graphs_compiled_after_warmup"] == 0, state
