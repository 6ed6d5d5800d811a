"""The real torch.compile and the real cache backends, in fresh processes: a miss, then real hits.

Runs the cold-start benchmark's own states, so the test and BENCHMARKS.md measure the same thing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

from model.coldstart import DYNAMIC_AREA_LADDER
from tests.harness import COMPILE_OVERRIDES, run_state

pytestmark = pytest.mark.slow

# Small sizes keep a CPU compile short. The dynamic-shape graph has its own tests (test_dynamic_sizes.py): here it
# would only double every compile.
ENV = {
    "FLUX_MODEL_SOURCE": "tiny",
    "FLUX_TEXT_LENGTHS": "256",
    "FLUX_COMPILE_ANY_SIZE": "0",
}
# Two served sizes prove that no size recompiles.
SIZES = ["256x256", "512x256"]


# Functions compiled per served shape: the two block kinds and the VAE decoder.
REGIONS_PER_SHAPE = 3


class MissThenHit(NamedTuple):
    miss: dict
    hit: dict
    sizes: list[str]


@pytest.fixture(scope="module")
def miss_then_hit(tmp_path_factory: pytest.TempPathFactory) -> MissThenHit:
    workdir: Path = tmp_path_factory.mktemp("cold-start")
    env = {**ENV, "FLUX_RESOLUTIONS": ",".join(SIZES)}
    return MissThenHit(run_state("miss", workdir, env), run_state("hit", workdir, env), SIZES)


def compiled_regions(state: dict) -> int:
    """Graphs Inductor compiled, or functions compiled ahead of time."""
    return state["new_graphs"] + state["precompiled"]


def test_miss_compiles_and_saves(miss_then_hit: MissThenHit) -> None:
    miss = miss_then_hit.miss
    assert miss["restore"] == "miss"
    # One graph per served shape for each repeated block kind and for the VAE decode where it compiles, however many
    # blocks.
    assert compiled_regions(miss) == REGIONS_PER_SHAPE * len(miss_then_hit.sizes)
    assert miss["save"] == "saved" and miss["cache_bytes"] > 0
    assert miss["eager_fallback"] is None


def test_hit_restores_and_skips_the_compile_work(miss_then_hit: MissThenHit) -> None:
    miss, hit = miss_then_hit.miss, miss_then_hit.hit
    assert hit["restore"] == "hit"
    assert compiled_regions(hit) == 0, "everything came from the restored cache"
    assert hit["cached_graphs"] + hit["precompiled_loaded"] == compiled_regions(miss)
    assert hit["save"] is None, "nothing new was compiled, so nothing is saved"
    assert hit["compile_warmup_s"] < 0.5 * miss["compile_warmup_s"], (hit, miss)


def test_only_shapes_that_compiled_run_their_warm_up_twice(miss_then_hit: MissThenHit) -> None:
    miss, hit, sizes = miss_then_hit.miss, miss_then_hit.hit, miss_then_hit.sizes
    shapes = {f"{size}@256" for size in sizes}
    # On a GPU, image-to-image once per size, compiling nothing of its own (on a CPU it is not warmed up).
    image_to_image = dict.fromkeys((f"{size}@image" for size in sizes), 1) if torch.cuda.is_available() else {}
    assert miss["warmup_runs_per_shape"] == dict.fromkeys(shapes, 2) | image_to_image, "a compiled shape runs twice"
    assert hit["warmup_runs_per_shape"] == dict.fromkeys(shapes, 1) | image_to_image, "a hit compiled nothing"


def test_a_hit_serves_the_same_images(miss_then_hit: MissThenHit) -> None:
    miss, hit = miss_then_hit.miss, miss_then_hit.hit
    assert hit["images"] == miss["images"]


def test_no_request_compiles_after_warm_up(miss_then_hit: MissThenHit) -> None:
    for state in (miss_then_hit.miss, miss_then_hit.hit):
        assert set(state["request_s"]) == set(miss_then_hit.sizes)
        assert state["graphs_compiled_after_warmup"] == 0, state


# --- the dynamic-shape graph beside the static ones -------------------------------------------------

# The transformer's blocks only: the decoder's graphs take longest to compile on a CPU and would add nothing here.
DYNAMIC_ENV = {
    **ENV,
    "FLUX_RESOLUTIONS": "256x256",
    "FLUX_COMPILE_ANY_SIZE": "1",
    COMPILE_OVERRIDES: json.dumps({"vae": False}),
}


@pytest.fixture(scope="module")
def dynamic_miss_then_hit(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict]:
    workdir: Path = tmp_path_factory.mktemp("cold-start-dynamic")
    return run_state("miss", workdir, DYNAMIC_ENV), run_state("hit", workdir, DYNAMIC_ENV)


def test_a_hit_restores_the_dynamic_graph_as_the_miss_compiled_it(dynamic_miss_then_hit: tuple[dict, dict]) -> None:
    miss, hit = dynamic_miss_then_hit
    assert compiled_regions(miss) > 2, "the miss compiled the dynamic graph beside the two static block kinds"
    # A hit that lacked the miss's dynamic graph, or traced a different one, would compile it (and its transpose).
    assert (hit["restore"], compiled_regions(hit), hit["save"]) == ("hit", 0, None), hit
    assert hit["precompiled_loaded"] + hit["cached_graphs"] == compiled_regions(miss)
    assert set(hit["warmup_runs_per_shape"].values()) == {1}, hit["warmup_runs_per_shape"]
    assert hit["images"] == miss["images"]


def test_only_a_miss_runs_the_area_ladder_and_the_unseen_size_check(dynamic_miss_then_hit: tuple[dict, dict]) -> None:
    miss, hit = dynamic_miss_then_hit
    ladder = {f"{size}@256" for size in DYNAMIC_AREA_LADDER} & set(miss["warmup_runs_per_shape"])
    assert ladder and miss["dynamic_check"] == "passed"
    # The hit loaded every function the ladder compiled (the test above) without running it.
    assert not ladder & set(hit["warmup_runs_per_shape"]), hit["warmup_runs_per_shape"]
    assert hit["dynamic_check"].startswith("not run"), hit["dynamic_check"]
