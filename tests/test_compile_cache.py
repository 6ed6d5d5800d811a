"""The real torch.compile and the local cache, in fresh processes: a miss, then a real hit.

Runs the cold-start benchmark's own states, so the test and BENCHMARKS.md measure the same thing.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import config_env
from bench.cold_start import run_state

pytestmark = pytest.mark.slow

# Two served sizes prove that no size recompiles; small ones keep a CPU compile short.
ENV = {
    "FLUX_MODEL_SOURCE": "tiny",
    "FLUX_RESOLUTIONS": "256x256,512x256",
    "FLUX_TEXT_LENGTHS": "256",
    "FLUX_WARMUP_RUNS": "2",
}


@pytest.fixture(scope="module", params=["default", "no_precompile"])
def miss_then_hit(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict]:
    workdir: Path = tmp_path_factory.mktemp(f"cold-start-{request.param}")
    env = {**ENV, **config_env(request.param)}
    miss = run_state("miss", workdir, env)
    hit = run_state("hit", workdir, env)
    return miss, hit


def compiled_regions(state: dict) -> int:
    """Graphs Inductor compiled, or functions compiled ahead of time with compile_precompile."""
    return state["new_graphs"] + state["precompiled"]


def test_miss_compiles_and_saves(miss_then_hit: tuple[dict, dict]) -> None:
    miss, _ = miss_then_hit
    assert miss["restore"] == "miss"
    # One graph per served shape for each repeated block kind and for the VAE decode, however many blocks.
    assert compiled_regions(miss) == 3 * len(ENV["FLUX_RESOLUTIONS"].split(","))
    assert miss["save"] == "saved" and miss["cache_bytes"] > 0
    assert miss["eager_fallback"] is None


def test_hit_restores_and_skips_the_compile_work(miss_then_hit: tuple[dict, dict]) -> None:
    miss, hit = miss_then_hit
    assert hit["restore"] == "hit"
    assert compiled_regions(hit) == 0, "everything came from the restored cache"
    assert hit["cached_graphs"] + hit["precompiled_loaded"] == compiled_regions(miss)
    assert hit["save"] is None, "nothing new was compiled, so nothing is saved"
    assert hit["compile_warmup_s"] < 0.5 * miss["compile_warmup_s"], (hit, miss)


def test_only_shapes_that_compiled_run_their_warm_up_twice(miss_then_hit: tuple[dict, dict]) -> None:
    miss, hit = miss_then_hit
    shapes = {"256x256@256", "512x256@256"}
    assert miss["warmup_runs_per_shape"] == dict.fromkeys(shapes, 2), "each compiled shape is checked on reuse"
    assert hit["warmup_runs_per_shape"] == dict.fromkeys(shapes, 1), "a hit's shapes compiled nothing: one run"


def test_a_hit_serves_the_same_images(miss_then_hit: tuple[dict, dict]) -> None:
    miss, hit = miss_then_hit
    assert hit["images"] == miss["images"]


def test_no_request_compiles_after_warm_up(miss_then_hit: tuple[dict, dict]) -> None:
    for state in miss_then_hit:
        assert set(state["request_s"]) == {"256x256", "512x256"}
        assert state["graphs_compiled_after_warmup"] == 0, state
