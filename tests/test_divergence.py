"""bench.divergence: the digests of every module output, and the first place two records part."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench.divergence import first_difference, recorded_outputs
from model.engine import FluxEngine, Job
from model.resolutions import Resolution

ROOT = Path(__file__).resolve().parent.parent


def job(seed: int) -> Job:
    return Job("a red bicycle", None, Resolution(512, 512), seed, 2, 256, 256)


def record(engine: FluxEngine, seed: int) -> list[list[str]]:
    with recorded_outputs(engine.pipe) as entries:
        engine.run(job(seed))
    return [list(entry) for entry in entries]


def test_the_same_request_records_the_same_digests(engine: FluxEngine) -> None:
    first = record(engine, seed=1)
    names = [name for name, _ in first]
    assert names[:2] == ["clip", "t5"] and names[-1] == "vae.decoder"
    # Two steps: every block is called twice.
    assert names.count("transformer.transformer_blocks.0") == 2
    assert first_difference(first, record(engine, seed=1)) == {"identical": True, "entries": len(first)}


def test_another_seed_parts_at_the_first_block_after_the_text_encoders(engine: FluxEngine) -> None:
    found = first_difference(record(engine, seed=1), record(engine, seed=2))
    assert not found["identical"]
    assert (found["first"], found["call"], found["index"]) == ("transformer.transformer_blocks.0", 0, 2)


def test_the_recording_leaves_the_modules_as_they_were(engine: FluxEngine) -> None:
    record(engine, seed=1)
    for component in (engine.pipe.transformer, engine.pipe.text_encoder, engine.pipe.text_encoder_2, engine.pipe.vae):
        assert not any(module._forward_hooks for module in component.modules())


def test_fresh_eager_processes_agree(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "bench.divergence", "--model", "tiny", "--processes", "2", "--config", "eager"]
    command += ["--resolutions", "512x512", "--workdir", str(tmp_path)]
    done = subprocess.run(command, cwd=ROOT, stdout=subprocess.PIPE, text=True, check=True)
    reports = [json.loads(line) for line in done.stdout.splitlines()]
    assert reports[1]["identical"] and reports[1]["entries"] == reports[0]["entries"] > 3
