"""Phase timing attached from outside: the engine keeps no timing, and the timer leaves no trace."""

from __future__ import annotations

from bench.phases import PHASES, timed_phases
from model.engine import FluxEngine
from model.schema import GenerateRequest

REQUEST = GenerateRequest(prompt="a harbour at night", width=1216, height=832, seed=21)


def test_each_request_gets_every_phase_and_the_engine_is_unchanged_afterwards(engine: FluxEngine) -> None:
    untimed = engine.generate(REQUEST).data
    with timed_phases(engine) as phases:
        timed = [engine.generate(REQUEST).data for _ in range(2)]
    assert timed == [untimed, untimed], "timing changes no output"
    assert len(phases) == 2
    for request in phases:
        assert set(request) == set(PHASES.values()) and all(seconds > 0 for seconds in request.values())
    assert not set(PHASES) & set(vars(engine)), "the wrappers are gone with the block"
    assert not [name for name in vars(engine) if "time" in name or name == "sync"], "the engine keeps no timing"


def test_a_request_for_several_images_is_one_record(engine: FluxEngine) -> None:
    request = GenerateRequest(prompt="a harbour at night", width=256, height=256, seed=21, num_outputs=3)
    with timed_phases(engine) as phases:
        engine.generate(request)
    [record] = phases
    assert set(record) == set(PHASES.values()) and all(seconds > 0 for seconds in record.values())
