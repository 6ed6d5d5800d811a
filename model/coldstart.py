"""load()'s sequence once the compile cache's restore has started (model.restore): load the weights, compile,
warm up every served shape, check that a size never warmed up compiles nothing, save when new, capture the text
encoders.

While the weights load, a thread joins the restore and, on a hit, reads every precompiled function from its file;
`prepare` joins that thread before compiling.

Neither the cache nor the compiler can fail a deployment: cache problems are logged and cost a
compile from scratch; a compile or warm-up failure falls back to eager with a loud log.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future
from dataclasses import astuple, dataclass, field, replace
from pathlib import Path

import torch
from diffusers import FluxPipeline
from PIL import Image

from model import precompile
from model.adapters import AdapterStore
from model.artifacts import CompileArtifacts
from model.cache import (
    CacheResult,
    CompileCache,
    Outcome,
    archived_bytes,
    set_aside_what_a_hit_never_reads,
)
from model.compat import compile_counts
from model.compile import compile_pipeline
from model.engine import FluxEngine, Job
from model.lora import LoraMerger
from model.optimize import block_hook, configure_process, optimize, text_encoder_hook
from model.pipeline import load_pipeline
from model.prompt_cache import PromptEmbeddingCache
from model.repaint import ImageInputs
from model.resolutions import Resolution
from model.restore import PendingRestore, joined, on_a_thread
from model.settings import LORA_DIR, CompileSettings, Settings
from model.text_graphs import capture_text_encoders

log = logging.getLogger(__name__)


WARMUP_PROMPT = "a warm-up prompt that exercises the text encoders"
# Every denoising step calls the transformer with the same shapes, so one step compiles and checks the same
# graphs as four; the 57 block calls inside it already reuse each block graph. Fewer steps, shorter load().
WARMUP_STEPS = 1
# Up to two runs per shape: the first compiles, the second proves that no guard fails on reuse. A shape whose first
# run compiled nothing new (a cache hit) runs once: its code passed that check when it was compiled, and second runs
# were a measurable part of a hit's load() (BENCHMARKS.md).
WARMUP_RUNS = 2
# Candidates for the size that compiles the dynamic-shape graph: the first without a static graph is taken. Each is
# non-square, so Dynamo gives width and height their own symbols, and its token count (width/16 * height/16) is
# neither text length, so no image dimension is tied to the text's.
DYNAMIC_WARMUP_SIZES = (Resolution(1152, 640), Resolution(896, 512), Resolution(640, 384))
# The convolutions pick their kernel by the size of their input (on a CPU, several thresholds between the
# smallest and the largest sizes), and Dynamo guards on each choice: sizes whose area roughly doubles from one to
# the next, from the smallest allowed to the largest, compile the graph of each range. Each non-square, with a
# token count that is neither text length, as above.
DYNAMIC_AREA_LADDER = (
    Resolution(272, 256),
    Resolution(384, 256),
    Resolution(512, 352),
    Resolution(720, 480),
    Resolution(1024, 688),
    Resolution(1440, 960),
    Resolution(1536, 1296),
)
# Then a size never warmed up must run at every text length without compiling anything: load() runs it with
# compiling forbidden and reports the outcome (`ColdStartReport.dynamic_check`).
DYNAMIC_CHECK_SIZE = Resolution(1008, 784)


@dataclass
class CompileCounters:
    """Dynamo and Inductor counters; differences between two snapshots tell what a phase compiled."""

    graphs: int
    fxgraph_misses: int
    fxgraph_hits: int
    precompiled: int = 0  # functions compiled ahead of time and saved (model.precompile)
    precompiled_loaded: int = 0
    eager_calls: int = 0  # region calls no precompiled function accepted, run eagerly

    @classmethod
    def now(cls) -> CompileCounters:
        return cls(
            **compile_counts(),
            precompiled=precompile.COUNTERS["compiled"],
            precompiled_loaded=precompile.COUNTERS["loaded"],
            eager_calls=precompile.COUNTERS["eager_calls"],
        )

    def __sub__(self, other: CompileCounters) -> CompileCounters:
        return CompileCounters(*(a - b for a, b in zip(astuple(self), astuple(other), strict=True)))

    def __add__(self, other: CompileCounters) -> CompileCounters:
        return CompileCounters(*(a + b for a, b in zip(astuple(self), astuple(other), strict=True)))

    @property
    def compiled_new(self) -> bool:
        """Of a difference: Inductor produced a graph it did not find in its cache, or a region was precompiled."""
        return self.fxgraph_misses > 0 or self.precompiled > 0


@dataclass
class WarmupReport:
    seconds_per_shape: dict[str, float] = field(default_factory=dict)
    compiled: CompileCounters = field(default_factory=lambda: CompileCounters(0, 0, 0))
    runs_per_shape: dict[str, int] = field(default_factory=dict)

    @property
    def compiled_new(self) -> bool:
        """True when the warm-up compiled something the cache did not have: the cache is worth saving."""
        return self.compiled.compiled_new

    def extend(self, later: WarmupReport) -> None:
        """Add what a later warm-up of other shapes did."""
        self.seconds_per_shape.update(later.seconds_per_shape)
        self.runs_per_shape.update(later.runs_per_shape)
        self.compiled = self.compiled + later.compiled


@dataclass
class ColdStartReport:
    """What load() did and how long each phase took; bench/cold_start.py prints it."""

    backend: str
    restore: CacheResult | None = None
    save: CacheResult | None = None
    compiled: bool = False
    eager_fallback_reason: str | None = None
    # load() before the weights (the GPU's facts, the restore's start, the engine's imports on a process's first
    # load()), and the weights: what serving eagerly needs too.
    imports_s: float = 0.0
    weights_s: float = 0.0
    # The part of the restore and its read-ahead that load() waited for after the weights were in; restore.seconds
    # is all of the restore.
    restore_s: float = 0.0
    compile_warmup_s: float = 0.0
    save_s: float = 0.0
    warmup: WarmupReport = field(default_factory=WarmupReport)
    # "passed", why a size never warmed up would have compiled, or why it was not run (a hit); None when there is
    # no dynamic-shape graph.
    dynamic_check: str | None = None
    cache_bytes: int = 0


def _logged(action: str, result: CacheResult) -> CacheResult:
    level = logging.WARNING if result.outcome is Outcome.ERROR else logging.INFO
    log.log(level, "compile cache %s: %s (%s, %.1f s)", action, result.outcome.value, result.detail, result.seconds)
    return result


def load_engine(
    settings: Settings, hf_token: str | None, restore: PendingRestore
) -> tuple[FluxEngine, ColdStartReport]:
    """The weights, the optimizations, then `prepare`, then the text encoders' CUDA graphs: a serving engine."""
    started = time.perf_counter()
    restoring = _preloaded_after(restore)
    configure_process()
    pipe = load_pipeline(
        settings,
        hf_token=hf_token,
        on_block=block_hook(settings.precision),
        on_text_encoder=text_encoder_hook(settings.text_encoder_precision),
    )
    optimize(pipe)
    prompt_cache = PromptEmbeddingCache(settings.prompt_cache_mb * 2**20)
    lora, adapters = _lora(pipe, settings, hf_token)
    engine = FluxEngine(
        pipe,
        settings.resolutions,
        settings.text_lengths,
        settings.sizes,
        prompt_cache,
        lora,
        adapters,
        settings.allow_private_urls,
    )
    weights_s = time.perf_counter() - started
    if restoring is not None:
        _encode_warmup_prompts(engine)
    report = prepare(engine, settings.compile_settings, restore.cache, restore.artifacts, restoring)
    report.weights_s = weights_s
    # After the warm-up, so that the encoders are captured as they serve.
    engine.text_encoders = capture_text_encoders(pipe, settings.text_lengths)
    return engine, report


def _encode_warmup_prompts(engine: FluxEngine) -> None:
    """The warm-up prompt's text embeddings at every text length, into the prompt cache, while the restore's read-ahead
    finishes: the GPU's first use of its matmul libraries then happens off the path to ready, not in the first shape's
    warm-up (about 0.8 s longer than the next shape's on a hit, BENCHMARKS.md)."""
    started = time.perf_counter()
    with torch.inference_mode():
        for text_length in engine.text_lengths:
            engine.encode_text(_warmup_job(DYNAMIC_CHECK_SIZE, text_length))  # embeddings do not depend on size
    log.info("encoded the warm-up prompt in %.1f s", time.perf_counter() - started)


def _lora(
    pipe: FluxPipeline, settings: Settings, hf_token: str | None
) -> tuple[LoraMerger | None, AdapterStore | None]:
    """What merges adapters into the transformer (its copy of the pristine weights taken now, as they loaded), and
    the adapters' store; neither where max_loras is 0."""
    if not settings.max_loras:
        return None, None
    lora = LoraMerger(pipe.transformer, settings.max_loras, block_hook(settings.precision))
    store = AdapterStore(
        lora.layers,
        settings.max_lora_rank,
        lora.dtype,
        LORA_DIR,
        settings.lora_disk_mb * 2**20,
        settings.lora_presets,
        settings.allow_private_urls,
        hf_token,
    )
    return lora, store


def _preloaded_after(restore: PendingRestore) -> Future[CacheResult] | None:
    """The restore, then, on a hit, every precompiled function it brought read from its file, while the weights load.

    Reading one runs the Python that Inductor generated for it and loads its kernels: a hit's first run of each
    shape spent most of its time there (BENCHMARKS.md). Started only now, after the engine's imports, so that two
    threads never import the same modules at once.
    """
    if restore.future is None:
        return None
    restoring, directory = restore.future, restore.artifacts.precompiled_dir
    device = torch.cuda.current_device() if torch.cuda.is_available() else None

    def then_preload() -> CacheResult:
        result = joined(restoring)
        if result.outcome is not Outcome.HIT:
            return result
        started = time.perf_counter()
        try:
            if device is not None:
                torch.cuda.set_device(device)  # the kernels load into the serving device's context
            # Under the mode the engine serves in: a function read outside it builds guards for tensors outside
            # inference mode, and refuses every call (one compiled for any size then compiles again).
            with torch.inference_mode():
                count = precompile.preload(directory)
        except Exception as exc:  # the restore still hit: each function is read at its first call instead
            log.warning("reading the precompiled functions ahead failed, each is read when first called: %r", exc)
        else:
            seconds = time.perf_counter() - started
            log.info("read %d precompiled functions in %.1f s, beside the weights", count, seconds)
        return result

    return on_a_thread(then_preload, "precompiled-preload")


def prepare(
    engine: FluxEngine,
    compile_settings: CompileSettings,
    cache: CompileCache,
    artifacts: CompileArtifacts,
    restoring: Future[CacheResult] | None = None,
) -> ColdStartReport:
    """Restore (or join `restoring`), compile, warm up and save; returns what happened. The engine serves in every
    outcome.

    `artifacts` names the Inductor directory and the cache key of this configuration (model.artifacts).
    """
    report = ColdStartReport(backend=cache.name)
    if not compile_settings.enabled:
        log.info("torch.compile disabled: serving eager")
        return report

    started = time.perf_counter()
    report.restore = _logged("restore", joined(restoring) if restoring is not None else cache.restore())
    report.restore_s = time.perf_counter() - started

    started = time.perf_counter()
    undo = None
    try:
        undo = compile_pipeline(engine.pipe, compile_settings, shapes=len(engine.shapes()), artifacts=artifacts)
        dynamic = dynamic_warmup_shapes(engine) if compile_settings.any_size else []
        report.warmup = warm_up(engine, WARMUP_RUNS, dynamic[:2])
        if report.warmup.compiled_new and dynamic:
            # The ladder and the check exist for what was just compiled. When the cache held every function, both
            # ran in the process that compiled them, and every size range's functions are loaded already
            # (model.precompile loads all of a signature's): running them again only cost a hit 2 s (BENCHMARKS.md).
            report.warmup.extend(warm_up(engine, WARMUP_RUNS, dynamic[2:], static=False))
            report.dynamic_check = check_a_size_never_warmed_up(engine)
        elif dynamic:
            report.dynamic_check = "not run: every function came from the cache, checked when it was compiled"
        if torch.cuda.is_available():  # a CPU loads nothing lazily: there it only cost each start 4-5 s (tiny)
            report.warmup.extend(warm_up_image_to_image(engine))
        report.compiled = True
        # From here on a request never compiles: a graph whose guards fail runs eagerly instead (model.graph_route
        # makes every served size find one).
        torch.compiler.set_stance("eager_on_recompile")
    except Exception as exc:
        log.exception("COMPILE FAILED, serving EAGER (slower) instead: %r", exc)
        report.eager_fallback_reason = repr(exc)
        if undo is not None:
            undo()
        return report
    finally:
        report.compile_warmup_s = time.perf_counter() - started

    log.log(
        logging.WARNING if (report.dynamic_check or "").startswith("FAILED") else logging.INFO,
        "compile and warm-up took %.1f s; new graphs compiled: %d, functions precompiled: %d, calls run eagerly: %d; "
        "a size never warmed up: %s",
        report.compile_warmup_s,
        report.warmup.compiled.fxgraph_misses,
        report.warmup.compiled.precompiled,
        report.warmup.compiled.eager_calls,
        report.dynamic_check or "no dynamic-shape graph",
    )
    if report.warmup.compiled_new:
        started = time.perf_counter()
        report.save = _save(cache, artifacts.inductor_dir)
        report.save_s = time.perf_counter() - started
    report.cache_bytes = _archived_bytes(artifacts.inductor_dir)
    return report


def _save(cache: CompileCache, inductor_dir: Path) -> CacheResult:
    """Save without what a hit never reads; a failure to move it aside costs the save, never the deployment."""
    saved: CacheResult | None = None
    try:
        with set_aside_what_a_hit_never_reads(inductor_dir):
            saved = _logged("save", cache.save())
    except Exception as exc:
        if saved is None:
            # Saving with the copies in place would archive every kernel twice (BENCHMARKS.md has the sizes), which
            # can pass b10-transfer's size limit: skip the save instead.
            return _logged("save", CacheResult(Outcome.ERROR, f"could not set aside what a hit never reads: {exc!r}"))
        # Only this process's own copies are at stake: compiled entries carry their kernels, and a hit rewrites them.
        log.warning("compile cache: could not move what was set aside back: %r", exc)
    return saved


def _archived_bytes(inductor_dir: Path) -> int:
    """The size of what a save archives, for the report; 0 when the directory cannot be measured."""
    try:
        return archived_bytes(inductor_dir)
    except Exception as exc:  # e.g. files vanishing during the walk: only a figure in the report is lost
        log.warning("compile cache: could not measure the inductor directory: %r", exc)
        return 0


def dynamic_warmup_shapes(engine: FluxEngine) -> list[tuple[Resolution, int]]:
    """The shapes that compile and check the dynamic-shape graph, in order.

    A size without a static graph at the first text length (its first run compiles the dynamic graph), the same
    size turned the other way at the last text length (every size-dependent dimension differs: a guard that
    specialized on one of them compiles again here, at load, not on a request), then a ladder of areas for the
    kernels the convolutions pick by size. `check_a_size_never_warmed_up` then runs a size none of them is.
    """
    first, last = engine.text_lengths[0], engine.text_lengths[-1]

    def servable(size: Resolution) -> bool:
        return engine.sizes.bounds.problem(size.width, size.height) is None and not engine.is_static(size)

    size = next((r for r in DYNAMIC_WARMUP_SIZES if servable(r) and servable(r.transposed())), None)
    if size is None:
        log.warning("no dynamic warm-up size fits this deployment's bounds: the dynamic-shape graph is not warmed up")
        return []
    ladder = [(r, first) for r in DYNAMIC_AREA_LADDER]
    shapes = [(size, first), (size.transposed(), last), *ladder]
    return [(r, n) for r, n in shapes if servable(r)]


def check_a_size_never_warmed_up(engine: FluxEngine) -> str:
    """Run DYNAMIC_CHECK_SIZE at every text length with compiling forbidden: "passed", or what would have compiled.

    A failure costs nothing but the log line: after load() such a size runs eagerly, never compiling on a request.
    """
    size = DYNAMIC_CHECK_SIZE
    if engine.sizes.bounds.problem(size.width, size.height) is not None or engine.is_static(size):
        return f"not run ({size} is not served by the dynamic-shape graph here)"
    for text_length in engine.text_lengths:
        try:
            with torch.compiler.set_stance("fail_on_recompile"):
                engine.run(_warmup_job(size, text_length))
        except Exception as exc:
            return f"FAILED: {size} at text length {text_length} would have compiled ({exc!r:.300})"
    return "passed"


def warm_up(
    engine: FluxEngine,
    runs_per_shape: int,
    dynamic_shapes: list[tuple[Resolution, int]] | None = None,
    static: bool = True,
) -> WarmupReport:
    """Run every served resolution at every compiled text length (with `static`), then `dynamic_shapes`, logging
    progress.

    A shape runs `runs_per_shape` times when its first run compiled something new, and once otherwise.
    """
    shapes = [*(engine.shapes() if static else []), *(dynamic_shapes or [])]
    report = WarmupReport()
    before = CompileCounters.now()
    for index, (resolution, text_length) in enumerate(shapes, start=1):
        started = time.perf_counter()
        before_shape = CompileCounters.now()
        engine.run(_warmup_job(resolution, text_length))
        runs = runs_per_shape if (CompileCounters.now() - before_shape).compiled_new else 1
        for _ in range(runs - 1):
            engine.run(_warmup_job(resolution, text_length))
        seconds = time.perf_counter() - started
        shape = f"{resolution}@{text_length}"
        report.seconds_per_shape[shape] = round(seconds, 3)
        report.runs_per_shape[shape] = runs
        log.info(
            "warm-up %s, text %d: %d of %d in %.1f s (%d run%s)",
            resolution,
            text_length,
            index,
            len(shapes),
            seconds,
            runs,
            "" if runs == 1 else "s",
        )
    report.compiled = CompileCounters.now() - before
    return report


def warm_up_image_to_image(engine: FluxEngine) -> WarmupReport:
    """Image-to-image once per static size. Its steps run the compiled transformer as text-to-image ones do, and
    compile nothing (tests/test_dynamic_sizes.py, inpainting too); this runs the VAE's encoder, which is not compiled,
    at each size before a request does. Inpainting encodes with the same encoder at the same sizes."""
    report = WarmupReport()
    before = CompileCounters.now()
    for resolution in engine.resolutions:
        started = time.perf_counter()
        grey = Image.new("RGB", (resolution.width, resolution.height), (128, 128, 128))
        job = replace(_warmup_job(resolution, engine.text_lengths[0]), strength=1.0)
        engine.run(job, (), ImageInputs(grey, None, "warm-up", None))
        shape = f"{resolution}@image"
        report.seconds_per_shape[shape] = round(time.perf_counter() - started, 3)
        report.runs_per_shape[shape] = 1
    report.compiled = CompileCounters.now() - before
    log.info(
        "warm-up of image-to-image at %d sizes: %.1f s", len(engine.resolutions), sum(report.seconds_per_shape.values())
    )
    return report


def _warmup_job(resolution: Resolution, text_length: int) -> Job:
    return Job(
        prompt=WARMUP_PROMPT,
        prompt2=None,
        resolution=resolution,
        seed=0,
        steps=WARMUP_STEPS,
        max_tokens=text_length,
        text_length=text_length,
    )
