"""Warm latency of Model.predict per configuration, against eager in the same run.

    python -m bench.latency --configs eager,default,fp8 --resolutions 1024x1024 --runs 10
    python -m bench.latency --card L4 --configs eager,uncompiled,default   # as an L4 would; eager uncapped

Builds the model through the project's own loader (FLUX_MODEL_SOURCE, default full-random: the
full-size architecture with random bf16 weights on the GPU). Every configuration runs in a fresh
process and prints one JSON line: p50/p90 of end-to-end predict (base64 JPEG included) per
resolution, a per-phase breakdown, peak GPU memory over load and predict, host syncs in one
request, and the image's PSNR against eager on the same seed. A summary line gives the speedup
against eager and the fraction of the arithmetic floor reached.
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

from bench import card_env, config_env, psnr_db
from tests.harness import CARD_PROFILES, cap_memory, log_to_stderr

# The arithmetic floor at 1024x1024, 4 steps: about 69.5 TFLOP per transformer step at the H200's bf16 (or fp8)
# matmul rate, plus VAE and T5.
FLOOR_S = {"bf16": 0.37, "fp8": 0.23}


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


# Substrings of CUDA kernel names, in the order they are tried: what each kernel spends its time on. Inductor's
# kernels come first: their names list the ops they fuse, which can include attention or a matmul.
KERNEL_KINDS = (
    ("matmul", ("triton_tem",)),  # Inductor's matmul templates (max-autotune)
    ("triton (fused elementwise and norms)", ("triton_",)),
    ("attention", ("flash", "fmha", "attention", "sdpa")),
    ("convolution", ("conv", "fprop", "dgrad", "implicit")),
    ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "scaled_mm")),
)


def kernel_breakdown(run: Callable[[], object], top: int = 12) -> dict:
    """GPU time per kind of kernel over one call of `run`, from torch.profiler, and the kernels that take most."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    kernels = [
        (event.key, event.self_device_time_total / 1e3, event.count)
        for event in prof.key_averages()
        if event.self_device_time_total > 0
    ]
    by_kind: dict[str, float] = {}
    for kernel_name, ms, _ in kernels:
        lowered = kernel_name.lower()
        kind = next((k for k, needles in KERNEL_KINDS if any(n in lowered for n in needles)), "other")
        by_kind[kind] = by_kind.get(kind, 0.0) + ms
    kernels.sort(key=lambda k: -k[1])
    return {
        "gpu_busy_ms": round(sum(ms for _, ms, _ in kernels), 1),
        "ms_by_kind": {kind: round(ms, 1) for kind, ms in sorted(by_kind.items(), key=lambda kv: -kv[1])},
        "top_kernels": [{"name": n[:120], "ms": round(ms, 2), "calls": c} for n, ms, c in kernels[:top]],
    }


def kernels_by_phase(engine: object, job: object) -> dict[str, float]:
    """GPU kernel milliseconds of each phase of one single-image request, each phase profiled on its own."""
    import torch

    with torch.inference_mode():  # as the engine runs them: eager weights still require grad
        embeds, pooled = engine.encode_text(job)  # type: ignore[attr-defined]
        latents = engine.denoise(job, embeds, pooled, job.seed)  # type: ignore[attr-defined]
        phases: dict[str, Callable[[], object]] = {
            "text": lambda: engine.encode_text(job),  # type: ignore[attr-defined]
            "denoise": lambda: engine.denoise(job, embeds, pooled, job.seed),  # type: ignore[attr-defined]
            "decode": lambda: engine.decode(latents, job.resolution),  # type: ignore[attr-defined]
        }
        return {phase: kernel_breakdown(run, top=0)["gpu_busy_ms"] for phase, run in phases.items()}


# Stretches shorter than this between kernels are launch latency, not idle time worth a name.
MIN_GAP_US = 20.0


def idle_gaps(engine: object, run: Callable[[], object], top: int = 12) -> dict:
    """Where the GPU waits during one call of `run`: every stretch of at least MIN_GAP_US with no kernel or copy
    running, from the first phase's start to the last one's end, named by the phase (bench.phases.PHASES) and the
    innermost host operation running at its middle ("python" when the host was between operations), summed by
    phase and by operation."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from bench.phases import PHASES, annotated_phases

    torch.cuda.synchronize()
    with annotated_phases(engine), profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:  # type: ignore[arg-type]
        run()
        torch.cuda.synchronize()
    events = prof.events()
    # The GPU's own events: kernels, copies and fills; a record_function range appears there too, as an annotation.
    busy = sorted(
        (e.time_range.start, e.time_range.end)
        for e in events
        if e.device_type == DeviceType.CUDA and not e.is_user_annotation
    )
    phase_names = set(PHASES.values())
    phases = sorted(
        (e for e in events if e.device_type == DeviceType.CPU and e.name in phase_names),
        key=lambda e: e.time_range.start,
    )
    host = sorted(
        (e for e in events if e.device_type == DeviceType.CPU and e.name not in phase_names),
        key=lambda e: e.time_range.start,
    )
    starts = [e.time_range.start for e in host]

    def innermost(moment: float) -> str:
        # The latest-starting operation still running at `moment`; a few thousand back is far enough to look.
        index = bisect.bisect_right(starts, moment)
        for e in reversed(host[max(0, index - 2000) : index]):
            if e.time_range.end >= moment:
                return e.name
        return "python"

    by_phase: dict[str, float] = {}
    by_operation: dict[str, float] = {}

    def count(start: float, stop: float, phase: str) -> None:
        by_phase[phase] = by_phase.get(phase, 0.0) + (stop - start) / 1e3
        key = f"{phase}: {innermost(start + (stop - start) / 2)}"
        by_operation[key] = by_operation.get(key, 0.0) + (stop - start) / 1e3

    # From the first phase's start to the last one's end, so that a phase's head (the host's work before it
    # launches anything) and its tail (a copy to the host, PIL, the JPEG) count too.
    first = min((e.time_range.start for e in phases), default=busy[0][0] if busy else 0.0)
    last = max((e.time_range.end for e in phases), default=busy[-1][1] if busy else 0.0)
    end = first
    for start, stop in [*busy, (last, last)]:
        if start - end >= MIN_GAP_US:
            # A stretch that spans phases counts in each, by the host operation running in its own part.
            covered = end
            for e in phases:
                part_start, part_stop = max(end, e.time_range.start), min(start, e.time_range.end)
                if part_stop > part_start:
                    if part_start > covered:
                        count(covered, part_start, "between phases")
                    count(part_start, part_stop, e.name)
                    covered = part_stop
            if start > covered:
                count(covered, start, "between phases")
        end = max(end, stop)
    ordered = sorted(by_operation.items(), key=lambda kv: -kv[1])
    return {
        "idle_ms": round(sum(by_phase.values()), 1),
        "idle_ms_by_phase": {k: round(v, 1) for k, v in sorted(by_phase.items(), key=lambda kv: -kv[1])},
        "idle_ms_by_operation": {k: round(v, 2) for k, v in ordered[:top]},
    }


def batched_images(engine: object, job: object) -> list[object]:
    """All of a job's images from one batched pipeline call and one batched decode: what a batched num_outputs
    would run, for comparison with the engine's one image after another, on the graphs compiled for the batch
    (see several_images)."""
    import torch

    from model.schema import SCHNELL_GUIDANCE

    pipe = engine.pipe  # type: ignore[attr-defined]
    size = job.resolution  # type: ignore[attr-defined]
    with torch.inference_mode():
        embeds, pooled = engine.encode_text(job)  # type: ignore[attr-defined]
        packed = pipe(
            prompt_embeds=embeds,
            pooled_prompt_embeds=pooled,
            num_images_per_prompt=job.num_outputs,  # type: ignore[attr-defined]
            width=size.width,
            height=size.height,
            num_inference_steps=job.steps,  # type: ignore[attr-defined]
            guidance_scale=SCHNELL_GUIDANCE,
            generator=[torch.Generator("cpu").manual_seed(s) for s in job.seeds],  # type: ignore[attr-defined]
            output_type="latent",
            return_dict=False,
        )[0]
        return engine.decode_batch(packed, size)  # type: ignore[attr-defined]


def child(
    name: str,
    workdir: Path,
    resolutions: list[str],
    runs: int,
    text_lengths: list[int],
    profile_kernels: bool = False,
    memory_cap_gib: float | None = None,
    clients: int = 0,
    num_outputs: int = 1,
    lora_rank: int = 64,
    images: bool = False,
) -> dict:
    import numpy as np
    import torch

    from bench.phases import timed_phases
    from model.model import Model
    from model.resolutions import Resolution
    from model.schema import GenerateRequest
    from model.settings import config_metadata
    from tests.harness import NO_BODY

    cuda = torch.cuda.is_available()
    if memory_cap_gib is not None:
        cap_memory(memory_cap_gib)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    model = Model(config={"model_metadata": config_metadata()})
    model.load()
    result: dict = {"config": name, "load_s": round(time.perf_counter() - started, 1)}
    engine = model._engine
    report = model.cold_start
    result["compiled"] = report.compiled
    result["eager_fallback"] = report.eager_fallback_reason

    if cuda:
        result["peak_reserved_after_load_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
    per_shape = {}
    for text in resolutions:
        size = Resolution.parse(text)
        for length in text_lengths:
            request = GenerateRequest(
                prompt="a lighthouse on a cliff at dusk",
                width=size.width,
                height=size.height,
                seed=0,
                max_sequence_length=length,
            )
            times = []
            for _ in range(runs):
                t = time.perf_counter()
                model.predict(request, NO_BODY)  # returns after the JPEG is encoded: the GPU work is done
                times.append(time.perf_counter() - t)
            with timed_phases(engine) as phases:
                for _ in range(3):
                    model.predict(request, NO_BODY)
            # The first text length keeps the plain size as its key, as every earlier run reported it.
            key = text if length == text_lengths[0] else f"{text}@{length}"
            per_shape[key] = {
                "p50_s": round(statistics.median(times), 4),
                "p90_s": round(_percentile(times, 0.9), 4),
                "min_s": round(min(times), 4),
                "phases_s": {k: round(statistics.median(p[k] for p in phases), 4) for k in phases[0]},
            }
    result["latency"] = per_shape

    first = Resolution.parse(resolutions[0])
    first_request = GenerateRequest(
        prompt="a lighthouse on a cliff at dusk", width=first.width, height=first.height, seed=0
    )
    if profile_kernels and cuda:
        try:
            kernels = kernel_breakdown(lambda: model.predict(first_request, NO_BODY))
            # What no kernel covers: launches, host work and syncs between them.
            kernels["idle_ms"] = round(per_shape[resolutions[0]]["p50_s"] * 1e3 - kernels["gpu_busy_ms"], 1)
            kernels["gpu_busy_ms_by_phase"] = kernels_by_phase(engine, engine.job_for(first_request))
            kernels["gaps"] = idle_gaps(engine, lambda: model.predict(first_request, NO_BODY))
            result["kernels_one_request"] = kernels
        except Exception as exc:  # the latency figures above are worth keeping without the profile
            result["kernels_one_request"] = {"error": repr(exc)}
    if num_outputs > 1:
        result["num_outputs"] = several_images(model, first_request, num_outputs, max(runs, 3))
    if clients:
        result["saturation"] = saturation(model, first_request, clients)
    if engine.lora is not None:
        result["lora"] = lora_figures(model, first_request, workdir, lora_rank, max(runs, 3))
    if images:
        result["images_in_and_out"] = image_figures(model, first_request, workdir, max(runs, 3))
    job = engine.job_for(first_request)
    if cuda:
        torch.cuda.set_sync_debug_mode("warn")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        [image] = engine.run(job)
        pixels = np.asarray(image, dtype=np.float64)
    if cuda:
        torch.cuda.set_sync_debug_mode(0)
        result["host_syncs_per_image"] = sum("synchronizing" in str(w.message) for w in caught)
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        result["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
        if memory_cap_gib is not None:
            result["memory_cap_gib"] = memory_cap_gib
        # Last, as it resets the peaks read above: where in a request the memory goes.
        with timed_phases(engine, memory=True) as phases:
            model.predict(first_request, NO_BODY)
        result["peak_gib_by_phase"] = {k: v for k, v in phases[0].items() if k.endswith("_peak_gib")}
    result["prompt_cache_mb_used"] = round(engine.prompt_cache.bytes_used / 2**20, 1)
    # What the weights became, from the weights themselves: Parameter (bf16), Float8Tensor or Int8Tensor.
    result["weights"] = {
        "transformer": type(engine.pipe.transformer.transformer_blocks[0].attn.to_q.weight).__name__,
        "t5": type(engine.pipe.text_encoder_2.encoder.block[0].layer[0].SelfAttention.q.weight).__name__,
    }
    reference = workdir / "eager.npy"
    if name == "eager":
        np.save(reference, pixels)
    elif reference.exists():
        ref = np.load(reference)
        result["psnr_vs_eager_db"] = psnr_db(pixels, ref)
        result["max_abs_diff_vs_eager"] = int(np.abs(pixels - ref).max())
    return result


def lora_figures(model: object, request: object, workdir: Path, rank: int, runs: int) -> dict:
    """With LoRA on: what a swap costs and p50 with adapters, for adapters of `rank` on every layer, served from
    loopback. A swap is timed to the GPU's end: an adapter new to the replica (fetched, checked, prepared, then
    merged into the weights), one read again from the local disk (`runs` times, with its parts), and one from its
    host copy. Also what all of it compiled or ran eagerly, which must be nothing."""
    import torch

    from model.coldstart import CompileCounters
    from model.schema import LoraRequest
    from tests.harness import NO_BODY
    from tests.lora_files import peft_state_dict, write
    from tests.web_server import serving

    engine = model._engine  # type: ignore[attr-defined]
    lora, store = engine.lora, engine.adapters
    directory = workdir / "loras"
    directory.mkdir(exist_ok=True)
    names = [f"rank{rank}-{seed}.safetensors" for seed in range(3)]
    for seed, name in enumerate(names):
        if not (directory / name).exists():
            write(directory / name, peft_state_dict(lora.layers, rank, seed, only=""))

    def timed(work: Callable[[], object]) -> float:
        started = time.perf_counter()
        work()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter() - started

    def swap(url: str) -> None:
        sha, prepared = store.get(url)
        lora.apply([(sha, prepared, 1.0)])

    out: dict = {"rank": rank, "file_mb": round((directory / names[0]).stat().st_size / 2**20, 1)}
    before = CompileCounters.now()
    with serving(directory) as (base, _):
        urls = [f"{base}/files/{name}" for name in names]
        out["swap_new_adapter_s"] = round(timed(lambda: swap(urls[2])), 3)

        def from_disk() -> tuple[float, float]:
            """Read, check and prepare the adapter again, then merge it: as after its eviction from host memory, its
            file is on the local disk only, and the weights hold no adapter."""
            store._prepared.clear()
            lora.apply([])
            started = time.perf_counter()
            sha, prepared = store.get(urls[2])  # host work only: nothing to wait for on the GPU
            read = time.perf_counter() - started
            return read, timed(lambda: lora.apply([(sha, prepared, 1.0)]))

        # A replica's first downloads find no freed page-locked memory to reuse: this read stands in for them, with
        # another adapter of its size kept in host memory meanwhile.
        held = store.get(urls[2])
        read, merge = from_disk()
        out["swap_from_local_disk_new_host_memory_s"] = {"read_and_prepare": round(read, 3), "merge": round(merge, 3)}
        del held
        reads, merges = zip(*(from_disk() for _ in range(runs)), strict=True)
        out["swap_from_local_disk_s"] = [round(r + m, 3) for r, m in zip(reads, merges, strict=True)]
        out["swap_from_local_disk_parts_s"] = {
            "read_and_prepare": [round(r, 3) for r in reads],
            "merge": [round(m, 3) for m in merges],
        }
        for url in urls[:2]:
            store.get(url)
        swaps = [timed(lambda i=i: swap(urls[i % 2])) for i in range(runs)]
        out["swap_from_host_copy_p50_s"] = round(statistics.median(swaps), 4)
        lora.apply([])
        for count, label in ((1, "one"), (2, "two"))[: lora.max_adapters]:
            body = request.model_copy(update={"loras": [LoraRequest(url=url) for url in urls[:count]]})  # type: ignore[attr-defined]
            times = [timed(lambda body=body: model.predict(body, NO_BODY)) for _ in range(runs)]  # type: ignore[attr-defined]
            out[f"p50_{label}_adapter{'s' if count > 1 else ''}_s"] = round(statistics.median(times), 4)
        alternating = [
            request.model_copy(update={"loras": [LoraRequest(url=urls[i % 2])]})  # type: ignore[attr-defined]
            for i in range(runs)
        ]
        times = [timed(lambda body=body: model.predict(body, NO_BODY)) for body in alternating]  # type: ignore[attr-defined]
        out["p50_another_adapter_every_request_s"] = round(statistics.median(times), 4)
    compiled = CompileCounters.now() - before
    out["functions_compiled"] = compiled.graphs + compiled.precompiled
    out["calls_run_eagerly"] = compiled.eager_calls
    return out


def image_figures(model: object, request: object, workdir: Path, runs: int) -> dict:
    """p50 of image-to-image at strength 0.5 and 1.0 and of inpainting at the first size, the starting image
    inline, and the seconds to upload one image to a PUT server on loopback (output_urls)."""
    import base64
    import io

    from PIL import Image

    from tests.harness import NO_BODY
    from tests.web_server import web_server

    def p50(body: object) -> float:
        times = []
        for _ in range(runs):
            started = time.perf_counter()
            model.predict(body, NO_BODY)  # type: ignore[attr-defined]
            times.append(time.perf_counter() - started)
        return round(statistics.median(times), 4)

    width, height = request.width, request.height  # type: ignore[attr-defined]
    picture = Image.effect_noise((width, height), 64).convert("RGB")
    mask = Image.new("L", (width, height), 0)
    mask.paste(255, (width // 4, height // 4, 3 * width // 4, 3 * height // 4))

    def inline(image: Image.Image) -> str:
        buffer = io.BytesIO()
        image.save(buffer, "PNG")
        return base64.b64encode(buffer.getvalue()).decode()

    out: dict = {}
    for strength in (0.5, 1.0):
        out[f"p50_image_to_image_strength_{strength}_s"] = p50(
            request.model_copy(update={"image": inline(picture), "strength": strength})  # type: ignore[attr-defined]
        )
    out["p50_inpainting_s"] = p50(request.model_copy(update={"image": inline(picture), "mask": inline(mask)}))  # type: ignore[attr-defined]
    engine = model._engine  # type: ignore[attr-defined]
    previous, engine.allow_private_urls = engine.allow_private_urls, True  # the storage is on loopback
    try:
        with web_server(workdir) as storage:
            body = request.model_copy(update={"output_urls": [f"{storage.base}/put/out.jpg"]})  # type: ignore[attr-defined]
            out["p50_with_upload_s"] = p50(body)
    finally:
        engine.allow_private_urls = previous
    out["vae_encoder"] = encoder_figures(engine.pipe, width, height, runs)
    return out


def encoder_figures(pipe: object, width: int, height: int, runs: int) -> dict:
    """The VAE encoder at one size, eager against torch.compile (mode default, this size only): its p50 both ways,
    the compile's seconds and the largest difference in the latents: whether compiling it is worth a load() cost."""
    import torch

    vae = pipe.vae  # type: ignore[attr-defined]
    device = next(vae.parameters()).device
    pixels = torch.rand(1, 3, height, width, device=device, dtype=vae.dtype) * 2 - 1

    def timed(encode: Callable[[torch.Tensor], torch.Tensor]) -> tuple[float, torch.Tensor]:
        times = []
        for _ in range(runs):
            started = time.perf_counter()
            latents = encode(pixels)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
        return statistics.median(times), latents

    with torch.inference_mode():
        eager_s, eager_latents = timed(vae.encoder)
        compiled_encoder = torch.compile(vae.encoder, mode="default", dynamic=False)
        started = time.perf_counter()
        with torch.compiler.set_stance("default"):
            compiled_encoder(pixels)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            compile_s = time.perf_counter() - started
            compiled_s, compiled_latents = timed(compiled_encoder)
    return {
        "eager_p50_s": round(eager_s, 4),
        "compiled_p50_s": round(compiled_s, 4),
        "compile_s": round(compile_s, 1),
        "max_abs_diff": float((eager_latents.float() - compiled_latents.float()).abs().max()),
    }


def several_images(model: object, request: object, count: int, runs: int) -> dict:
    """Seconds for `count` images of one request: the engine's (one after another, this configuration's graphs)
    against one batched call (see batched_images), and the batched call's first image against the single one's."""
    import numpy as np
    import torch

    from model.coldstart import CompileCounters
    from tests.harness import NO_BODY

    engine = model._engine  # type: ignore[attr-defined]
    several = request.model_copy(update={"num_outputs": count})  # type: ignore[attr-defined]
    job = engine.job_for(several)
    before = CompileCounters.now()
    # Untimed, and allowed to compile the batch's own graphs, as a batched num_outputs would at load().
    with torch.compiler.set_stance("default"):
        batched = batched_images(engine, job)
    compiled = CompileCounters.now() - before
    compiled_for_batch = compiled.graphs + compiled.precompiled
    timings: dict[str, list[float]] = {"sequential": [], "batched": []}
    for _ in range(runs):
        started = time.perf_counter()
        model.predict(several, NO_BODY)  # type: ignore[attr-defined]
        timings["sequential"].append(time.perf_counter() - started)
        started = time.perf_counter()
        batched = batched_images(engine, job)
        engine.respond(job, batched)
        timings["batched"].append(time.perf_counter() - started)
    [first] = engine.run(engine.job_for(request))
    difference = np.abs(np.asarray(first, dtype=np.int16) - np.asarray(batched[0], dtype=np.int16))
    return {
        "count": count,
        **{f"{kind}_p50_s": round(statistics.median(values), 4) for kind, values in timings.items()},
        "batched_first_image_max_abs_diff": int(difference.max()),
        "functions_compiled_for_the_batch": compiled_for_batch,
    }


def saturation(model: object, request: object, clients: int, seconds: float = 30.0) -> dict:
    """Images per second with `clients` threads each sending the next request as soon as its last one returns.

    Truss calls a sync predict from a thread pool, up to runtime.predict_concurrency at once; this is the same
    call without the HTTP around it.
    """
    from concurrent.futures import ThreadPoolExecutor

    from tests.harness import NO_BODY

    done_at: list[float] = []
    latencies: list[float] = []
    stop = time.perf_counter() + seconds

    def client() -> None:
        while (now := time.perf_counter()) < stop:
            model.predict(request, NO_BODY)  # type: ignore[attr-defined]
            latencies.append(time.perf_counter() - now)
            done_at.append(time.perf_counter())

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for future in [pool.submit(client) for _ in range(clients)]:
            future.result()
    elapsed = max(done_at) - started
    return {
        "clients": clients,
        "images": len(done_at),
        "images_per_s": round(len(done_at) / elapsed, 3),
        "p50_latency_s": round(statistics.median(latencies), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="eager,default")
    parser.add_argument("--resolutions", default="1024x1024", help="the sizes timed")
    parser.add_argument(
        "--static-resolutions",
        help="the sizes with static graphs (default: every timed size); the others run on the dynamic-shape graph",
    )
    parser.add_argument(
        "--text-lengths", default="256", help="compiled T5 lengths; requests are timed at each, PSNR at the first"
    )
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--model", default="full-random")
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--profile", action="store_true", help="add GPU time per kind of kernel for one request")
    parser.add_argument(
        "--memory-cap",
        type=float,
        metavar="GIB",
        help="cap this GPU's memory to what a smaller card leaves (an L4 or A10G: 22; an H100_40GB: 38), for every "
        "configuration but the bf16 `eager` reference; the cap does not change what the `auto` precisions see, so "
        "name both in --configs (fp8+t5int4, int8+t5int4), or use --card",
    )
    parser.add_argument(
        "--card",
        choices=sorted(CARD_PROFILES),
        help="stand in for this card: its memory cap, and the precisions `auto` picks from its facts (the "
        "transformer's and T5's), for every configuration that names none (the `eager` reference stays uncapped bf16)",
    )
    parser.add_argument(
        "--clients", type=int, default=0, help="also measure images/s at saturation with this many concurrent callers"
    )
    parser.add_argument(
        "--num-outputs",
        type=int,
        default=1,
        help="also time a request for this many images at the first size, one after another and batched eagerly",
    )
    parser.add_argument(
        "--lora-rank", type=int, default=64, help="with LoRA on (e.g. the lora2 configuration): adapters' rank"
    )
    parser.add_argument(
        "--images", action="store_true", help="also time image-to-image, inpainting and an upload at the first size"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    resolutions = args.resolutions.split(",")
    if args.card:
        args.memory_cap = CARD_PROFILES[args.card].cap_gib
    text_lengths = [int(n) for n in args.text_lengths.split(",")]

    if args.child:
        log_to_stderr()
        print(
            json.dumps(
                child(
                    args.child,
                    args.workdir,
                    resolutions,
                    args.runs,
                    text_lengths,
                    args.profile,
                    args.memory_cap,
                    args.clients,
                    args.num_outputs,
                    args.lora_rank,
                    args.images,
                )
            ),
            flush=True,
        )
        return

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="latency-"))
    workdir.mkdir(parents=True, exist_ok=True)
    base_env = {
        **os.environ,
        "FLUX_MODEL_SOURCE": args.model,
        "FLUX_RESOLUTIONS": args.static_resolutions or args.resolutions,
        "FLUX_TEXT_LENGTHS": args.text_lengths,
        "FLUX_CACHE_BACKEND": "none",
        "TORCHINDUCTOR_CACHE_DIR": str(workdir / "inductor"),
        # Every timed request repeats one prompt: without this, all but the first would skip the text encoders.
        # The `prompt_cache` configuration measures the cache.
        "FLUX_PROMPT_CACHE_MB": "0",
    }
    stand_in = card_env(args.card) if args.card else {}
    results = {}
    for name in args.configs.split(","):
        command = [
            sys.executable,
            "-m",
            "bench.latency",
            "--child",
            name,
            "--workdir",
            str(workdir),
            "--resolutions",
            args.resolutions,
            "--runs",
            str(args.runs),
            "--text-lengths",
            args.text_lengths,
            "--clients",
            str(args.clients),
            "--num-outputs",
            str(args.num_outputs),
            "--lora-rank",
            str(args.lora_rank),
            *(["--images"] if args.images else []),
            *(["--profile"] if args.profile else []),
            # The bf16 eager reference runs uncapped: every capped configuration gets its PSNR against bf16.
            *(["--memory-cap", str(args.memory_cap)] if args.memory_cap is not None and name != "eager" else []),
        ]
        # The child's logs stream to stderr as they happen: a run cut short still shows how far it got.
        done = subprocess.run(
            command,
            env={**base_env, **({} if name == "eager" else stand_in), **config_env(name)},
            stdout=subprocess.PIPE,
            text=True,
            check=False,
        )
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode != 0 or not lines:
            print(json.dumps({"config": name, "error": f"exit code {done.returncode}; log on stderr"}), flush=True)
            continue
        results[name] = json.loads(lines[-1])
        print(lines[-1], flush=True)
    if "eager" in results:
        eager = results["eager"]["latency"]
        summary = {"state": "summary"}
        for name, result in results.items():
            for size, figures in result["latency"].items():
                entry = {
                    "p50_s": figures["p50_s"],
                    "speedup_vs_eager": round(eager[size]["p50_s"] / figures["p50_s"], 3),
                }
                if size == "1024x1024":
                    floor = FLOOR_S["fp8" if result["weights"]["transformer"] == "Float8Tensor" else "bf16"]
                    entry["floor_over_p50"] = round(floor / figures["p50_s"], 3)
                summary[f"{name}@{size}"] = entry
        print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
