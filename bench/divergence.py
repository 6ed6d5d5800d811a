"""Where two processes serving the same request first disagree: one digest per module output, compared in order.

    python -m bench.divergence --model full-random --processes 3                # a miss, then hits of its cache
    python -m bench.divergence --model full-random --processes 3 --config eager

Each process loads the model (the first fills a local compile cache, the later ones restore it), serves one
request three times (the last with every precompiled function loaded from its file), and records a digest of
every tensor that the text encoders, each transformer block call and the VAE's decoder return, in call order,
then of the JPEG, whether the later requests matched the first in every entry, then of the Triton
configurations Inductor chose by timing candidates. The parent prints each process's record against the first
one's: the first entry that differs names the module and the call where the outputs part, and so the kernel to
look at. Each process also reports what its autotune cache did (AutotuneCacheTrace): files saved, files
overwritten with another choice, and lookups that used, refused or found no saved choice, by phase.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench import config_env, log_to_stderr

REQUEST = {"prompt": "a lighthouse on a cliff at dusk", "seed": 7}
# Each process's later requests against its first: entries of its record, reported beside the comparison.
SELF_CHECKS = ("second_request", "loaded_from_files")
# Entries each process reports that are not outputs to compare: they differ between a miss and a hit by design.
REPORTED = ("autotune_cache", "kernel_choices", "kernel_choices_apart_on_reload")


def digest(value: Any) -> str:
    """The bytes of every tensor in `value` (a tensor, a tuple or list of them, or a transformers output), hashed."""
    import torch

    if hasattr(value, "to_tuple"):
        value = value.to_tuple()
    tensors = [value] if isinstance(value, torch.Tensor) else [v for v in value if isinstance(v, torch.Tensor)]
    hasher = hashlib.sha256()
    for tensor in tensors:
        hasher.update(tensor.detach().contiguous().view(torch.uint8).cpu().numpy().tobytes())
    return hasher.hexdigest()[:16]


@contextmanager
def recorded_outputs(pipe: Any) -> Iterator[list[tuple[str, str]]]:
    """Yield a list that gains (module name, digest) for each call of the recorded modules, in call order."""
    from model.compat import compiled_call, repeated_block_names, set_compiled_call

    record: list[tuple[str, str]] = []
    repeated = repeated_block_names(pipe.transformer)
    modules = {f"transformer.{n}": m for n, m in pipe.transformer.named_modules() if type(m).__name__ in repeated}
    modules |= {"t5": pipe.text_encoder_2, "clip": pipe.text_encoder, "vae.decoder": pipe.vae.decoder}
    restore: list[Callable[[], None]] = []
    for name, module in modules.items():
        compiled = compiled_call(module)
        if compiled is None:  # eager: a hook sees the output
            handle = module.register_forward_hook(lambda _m, _a, out, name=name: record.append((name, digest(out))))
            restore.append(handle.remove)
        else:  # compiled: wrap the compiled function from outside, so its graph stays as it is

            def call(*args: Any, name: str = name, compiled: Callable[..., Any] = compiled, **kwargs: Any) -> Any:
                out = compiled(*args, **kwargs)
                record.append((name, digest(out)))
                return out

            set_compiled_call(module, call)
            restore.append(lambda module=module, compiled=compiled: set_compiled_call(module, compiled))
    try:
        yield record
    finally:
        for undo in restore:
            undo()


def child(size: str) -> list[tuple[str, str]]:
    from bench import NO_BODY
    from model.model import Model
    from model.resolutions import Resolution
    from model.schema import GenerateRequest
    from model.settings import config_metadata

    trace = AutotuneCacheTrace()
    model = Model(config={"model_metadata": config_metadata()})
    with trace.phase("load"):
        model.load()
    resolution = Resolution.parse(size)
    request = GenerateRequest(**REQUEST, width=resolution.width, height=resolution.height)
    records = []
    served: dict[str, list[str]] = {}
    # Twice: a process that disagrees with itself has a kernel that is not deterministic within one process. A miss,
    # which runs functions it never loaded from a file, once more with every precompiled function loaded from its
    # file, as a hit runs them: if it then disagrees with itself, what it saved differs from what it ran.
    restore = model.cold_start.restore if model.cold_start else None
    missed = restore is not None and restore.outcome.value == "miss"
    for reload in (False, False, True) if missed else (False, False):
        if reload:
            forget_precompiled_functions()
        with recorded_outputs(model._engine.pipe) as record, trace.phase("reloaded" if reload else "requests"):
            response = model.predict(request, NO_BODY)
        records.append([*record, ("jpeg", hashlib.sha256(response.data.encode()).hexdigest()[:16])])
        if len(records) == 1:  # once: the second request runs the same kernels
            served = kernel_choices()
    # After a reload the live kernels are those loaded from files, and those of the first run not yet freed.
    reloaded = kernel_choices() if missed else {}
    checks = []
    for name, other in zip(SELF_CHECKS, records[1:], strict=False):
        again = first_difference(records[0], other)
        checks.append((name, "same" if again["identical"] else f"differs from {again['first']}#{again['call']}"))
    return [
        *records[0],
        *checks,
        ("autotune_cache", json.dumps(trace.summary())),
        ("kernel_choices", json.dumps(served)),
        ("kernel_choices_apart_on_reload", json.dumps(choosing_apart(served, reloaded) if missed else None)),
        autotune_choices(),
    ]


def kernel_choices() -> dict[str, list[str]]:
    """Kernel file name and kind -> the launch configurations its live kernels run with: two processes whose
    kernels of one source run other configurations can part there, as a reduction's configuration sets the order
    its sums run in. Found among live objects, since kernels compiled in worker processes arrive unpickled."""
    import gc

    try:
        from torch._inductor.runtime.triton_heuristics import CachingAutotuner
    except ImportError:
        return {}
    chosen: dict[str, set[str]] = {}
    for kernel in gc.get_objects():
        if not isinstance(kernel, CachingAutotuner) or len(getattr(kernel, "launchers", None) or ()) != 1:
            continue
        config = kernel.launchers[0].config
        kind = str(getattr(kernel, "heuristic_type", "?")).rsplit(".", 1)[-1].lower()
        name = f"{Path(getattr(kernel, 'filename', None) or '?').stem} {kind}"
        chosen.setdefault(name, set()).add(f"{sorted(config.kwargs.items())} w{config.num_warps} s{config.num_stages}")
    return {name: sorted(configs) for name, configs in chosen.items()}


class AutotuneCacheTrace:
    """Every save and lookup of Inductor's local autotune cache (the `.best_config` files), by phase of the process:
    a file saved twice with different contents was overwritten by another kernel of the same source, and a lookup
    that finds a file and still returns nothing times its kernel again (its candidate list differs)."""

    def __init__(self) -> None:
        self.current = "import"
        self.saves: dict[str, set[str]] = {}
        self.lookups: dict[str, dict[str, int]] = {}
        try:
            from torch._inductor.runtime.autotune_cache import AutotuneCache
        except ImportError:
            return
        trace = self
        save, read_best = AutotuneCache.save, AutotuneCache.read_best

        # Named as the originals: a compiled function saves its kernels' save hook by the method's name.
        @functools.wraps(save)
        def traced_save(cache: Any, config: Any, *args: Any, **kwargs: Any) -> Any:
            path = cache.local_cache[1] if cache.local_cache else "remote"
            trace.saves.setdefault(path, set()).add(
                repr(sorted(getattr(config, "kwargs", {}).items())) + f" w{getattr(config, 'num_warps', '?')}"
            )
            return save(cache, config, *args, **kwargs)

        @functools.wraps(read_best)
        def traced_read_best(cache: Any, *args: Any, **kwargs: Any) -> Any:
            found = read_best(cache, *args, **kwargs)
            path = cache.local_cache[1] if cache.local_cache else ""
            outcome = "used" if found is not None else ("refused" if path and os.path.exists(path) else "absent")
            counts = trace.lookups.setdefault(trace.current, {})
            counts[outcome] = counts.get(outcome, 0) + 1
            return found

        AutotuneCache.save, AutotuneCache.read_best = traced_save, traced_read_best

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self.current = name
        try:
            yield
        finally:
            self.current = "between"

    def summary(self) -> dict:
        rewritten = sorted(Path(path).name for path, configs in self.saves.items() if len(configs) > 1)
        return {"files_saved": len(self.saves), "rewritten": rewritten, "lookups": self.lookups}


def forget_precompiled_functions() -> None:
    """Make every precompiled region load its functions from their files at its next call."""
    import gc

    from model.precompile import PrecompiledRegion

    for region in gc.get_objects():
        if isinstance(region, PrecompiledRegion):
            region._functions.clear()


def autotune_choices() -> tuple[str, str]:
    """The Triton configurations Inductor chose by timing candidates, as this process's cache holds them: two
    processes that chose differently compute some reductions in another order."""
    from model.compat import inductor_cache_dir

    root = inductor_cache_dir()
    files = sorted(root.rglob("*.best_config"))
    hasher = hashlib.sha256()
    for path in files:
        hasher.update(str(path.relative_to(root)).encode() + path.read_bytes())
    return ("autotune_choices", f"{len(files)} files {hasher.hexdigest()[:16]}")


def first_difference(reference: list[list[str]], other: list[list[str]]) -> dict:
    """The first entry where `other` parts from `reference`, and how many entries differ in all."""
    differing = [i for i, (a, b) in enumerate(zip(reference, other, strict=False)) if a != b]
    if len(reference) != len(other):
        differing.append(min(len(reference), len(other)))
    if not differing:
        return {"identical": True, "entries": len(reference)}
    first = differing[0]
    name = reference[first][0] if first < len(reference) else other[first][0]
    call = sum(1 for entry in reference[:first] if entry[0] == name)
    # The entries that differ, each as name#call, so that one line shows whether the parting spreads or stays put.
    labels = [f"{entry[0]}#{sum(1 for e in reference[:i] if e[0] == entry[0])}" for i, entry in enumerate(reference)]
    named = [labels[i] for i in differing if i < len(labels)]
    return {
        "identical": False,
        "first": name,
        "call": call,
        "index": first,
        "differing": len(differing),
        "differing_entries": named[:40],
    }


def choosing_apart(first: dict[str, list[str]], other: dict[str, list[str]] | None = None) -> dict:
    """Kernels of one file that run different configurations: within one record (`other` None: live kernels of one
    source with two choices) or between two (a file whose choices in `first` are not those in `other`)."""
    if other is None:
        apart = [name for name, configs in first.items() if len(set(configs)) > 1]
    else:
        apart = [name for name in first.keys() & other.keys() if set(first[name]) != set(other[name])]
    kinds: dict[str, int] = {}
    for name in apart:
        kind = name.rsplit(" ", 1)[-1]
        kinds[kind] = kinds.get(kind, 0) + 1
    examples = {name: (first[name], (other or {}).get(name)) for name in sorted(apart)[:6]}
    return {"count": len(apart), "by_kind": kinds, "examples": examples}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="full-random")
    parser.add_argument("--processes", type=int, default=3)
    parser.add_argument("--config", default="default", help="a named configuration of bench.CONFIGS")
    parser.add_argument("--resolutions", default="1024x1024", help="the served sizes; the request asks for the first")
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        log_to_stderr()
        print(json.dumps(child(args.resolutions.split(",")[0])), flush=True)
        return

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="divergence-"))
    env = {
        **os.environ,
        **config_env(args.config),
        "FLUX_MODEL_SOURCE": args.model,
        "FLUX_RESOLUTIONS": args.resolutions,
        "FLUX_CACHE_BACKEND": "local",
        "FLUX_CACHE_DIR": str(workdir / "cache"),
        # Every request repeats one prompt: each must run the text encoders to be recorded.
        "FLUX_PROMPT_CACHE_MB": "0",
    }
    records: list[list[list[str]]] = []
    choices: list[dict[str, list[str]]] = []
    for index in range(args.processes):
        # Each process gets an empty Inductor directory: what it reuses comes from the cache, as on a new replica.
        process_env = {**env, "TORCHINDUCTOR_CACHE_DIR": str(workdir / f"inductor-{index}")}
        done = subprocess.run(
            [sys.executable, "-m", "bench.divergence", "--child", "--resolutions", args.resolutions],
            env=process_env,
            stdout=subprocess.PIPE,
            text=True,
            check=True,
        )
        record = json.loads(done.stdout.splitlines()[-1])
        records.append([entry for entry in record if entry[0] not in REPORTED])
        choices.append(next(json.loads(value) for name, value in record if name == "kernel_choices"))
        report = {"process": index, "entries": len(records[-1]), "autotune_choices": record[-1][1]}
        report |= {name: value for name, value in record if name in SELF_CHECKS}
        report |= {name: json.loads(value) for name, value in record if name == "autotune_cache"}
        report["kernels"] = len(choices[-1])
        report["kernels_with_two_choices"] = choosing_apart(choices[-1])
        report["kernels_choosing_apart_on_reload"] = json.loads(dict(record)["kernel_choices_apart_on_reload"])
        if index:
            report |= first_difference(records[0], records[-1])
            report["kernels_choosing_unlike_first"] = choosing_apart(choices[0], choices[-1])
        print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
