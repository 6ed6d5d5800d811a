"""Regions compiled ahead of time: saved, loaded without tracing, shared across weights, and robust to bad files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model import precompile
from model.artifacts import CompileArtifacts
from model.compile import compile_pipeline
from model.engine import FluxEngine
from model.graph_route import dynamic_graph, route
from model.optimize import block_hook
from model.pipeline import load_pipeline
from model.precompile import input_signature, precompiled_regions
from model.resolutions import ResolutionRegistry
from model.schema import GenerateRequest
from model.settings import CompileSettings, Settings

pytestmark = pytest.mark.slow

KEY = "gates"
# Where the fp8 test runs: torch 2.11's CPU has no fp8 matmul, 2.13's does.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


class Gate(torch.nn.Module):
    """A stand-in block: a weight, a tensor input and a plain flag that changes the computation."""

    def __init__(self, seed: int, width: int = 8) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.linear = torch.nn.Linear(width, width)

    def forward(self, x: torch.Tensor, *, double: bool) -> torch.Tensor:
        y = torch.nn.functional.gelu(self.linear(x))
        return 2 * y if double else y


def precompile_modules(modules: list[torch.nn.Module], artifacts: CompileArtifacts, any_size: bool) -> None:
    """Route each module through its class's precompiled function, on both routes, as model.compile does."""
    regions = precompiled_regions(modules, artifacts, "default", any_size)
    for module in modules:
        route(module, regions[type(module)], regions[type(module)])


def eager(module: Gate, x: torch.Tensor, double: bool) -> torch.Tensor:
    return Gate.forward(module, x, double=double)


@pytest.fixture
def gates(tmp_path: Path) -> list[Gate]:
    modules = [Gate(seed).requires_grad_(False) for seed in (1, 2)]
    precompile_modules(modules, CompileArtifacts(tmp_path, KEY), any_size=False)
    return modules


def counters() -> dict[str, int]:
    return dict(precompile.COUNTERS)


@torch.inference_mode()
def test_one_function_per_signature_serves_every_module_of_the_class(gates: list[Gate], tmp_path: Path) -> None:
    x = torch.randn(4, 8)
    before = counters()
    for module in gates:
        torch.testing.assert_close(module(x, double=False), eager(module, x, False))
    assert counters()["compiled"] - before["compiled"] == 1, "the second module's weights are inputs, not constants"
    assert len(list(CompileArtifacts(tmp_path, KEY).precompiled_dir.glob("Gate.forward-*.bin"))) == 1

    # A plain argument and a new shape are new signatures, each with its own function.
    torch.testing.assert_close(gates[0](x, double=True), eager(gates[0], x, True))
    wide = torch.randn(6, 8)
    torch.testing.assert_close(gates[1](wide, double=False), eager(gates[1], wide, False))
    assert counters()["compiled"] - before["compiled"] == 3
    assert len(list(CompileArtifacts(tmp_path, KEY).precompiled_dir.glob("Gate.forward-*.bin"))) == 3


@torch.inference_mode()
def test_a_fresh_process_loads_instead_of_compiling(gates: list[Gate], tmp_path: Path) -> None:
    x = torch.randn(4, 8)
    expected = gates[0](x, double=False)
    torch._dynamo.reset()  # nothing traced survives, as in a new process

    restarted = Gate(1).requires_grad_(False)
    precompile_modules([restarted], CompileArtifacts(tmp_path, KEY), any_size=False)
    before = counters()
    torch.testing.assert_close(restarted(x, double=False), expected)
    assert counters()["loaded"] - before["loaded"] == 1
    assert counters()["compiled"] == before["compiled"]


@torch.inference_mode()
def test_functions_read_ahead_serve_their_first_call(gates: list[Gate], tmp_path: Path) -> None:
    x = torch.randn(4, 8)
    expected = gates[0](x, double=False)
    directory = CompileArtifacts(tmp_path, KEY).precompiled_dir
    (directory / "Gate.forward-damaged.bin").write_bytes(b"not a compiled function")
    torch._dynamo.reset()  # as in a new process

    assert precompile.preload(directory) == 1, "the damaged file is left for a first call that never comes"
    restarted = Gate(1).requires_grad_(False)
    precompile_modules([restarted], CompileArtifacts(tmp_path, KEY), any_size=False)
    before = counters()
    with torch.compiler.set_stance("fail_on_recompile"):
        torch.testing.assert_close(restarted(x, double=False), expected)
    assert counters()["loaded"] - before["loaded"] == 1
    assert not precompile._PRELOADED, "each function read ahead is taken by its first call"


@torch.inference_mode()
def test_a_damaged_file_is_compiled_again(gates: list[Gate], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    x = torch.randn(4, 8)
    gates[0](x, double=False)
    (saved,) = CompileArtifacts(tmp_path, KEY).precompiled_dir.glob("Gate.forward-*.bin")
    saved.write_bytes(b"not a compiled function")

    restarted = Gate(1).requires_grad_(False)
    precompile_modules([restarted], CompileArtifacts(tmp_path, KEY), any_size=False)
    before = counters()
    torch.testing.assert_close(restarted(x, double=False), eager(restarted, x, False))
    assert counters()["compiled"] - before["compiled"] == 1
    assert "unusable, compiling again" in caplog.text
    assert saved.read_bytes() != b"not a compiled function", "the good function replaced the damaged file"


def fp8_gates(monkeypatch: pytest.MonkeyPatch) -> list[Gate]:
    """Gates quantized by the product's own fp8 quantizer: torchao's Float8Tensor weights, and the `extra_repr`
    partial torchao attaches to each linear."""
    from torchao.quantization import quant_api

    # torchao refuses GPUs without fp8 matmuls, and every CPU; a CPU runs fp8 matmuls, slowly, which is enough here.
    monkeypatch.setattr(quant_api, "_check_hardware_support", lambda granularity: None)
    quantize = block_hook("fp8")
    assert quantize is not None
    modules = []
    for seed in (1, 2):
        module = Gate(seed, width=32).to(DEVICE, torch.bfloat16).requires_grad_(False)  # fp8 matmuls need 16 | width
        quantize(module)
        modules.append(module)
    assert type(modules[0].linear.weight).__name__ == "Float8Tensor"
    return modules


@torch.inference_mode()
def test_fp8_weights_precompile_and_load_like_bf16(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Saving a function used to pickle the module's quantized weights with its guards, which torchao cannot copy."""
    x = torch.randn(16, 32, dtype=torch.bfloat16, device=DEVICE)
    modules = fp8_gates(monkeypatch)
    precompile_modules(modules, CompileArtifacts(tmp_path, KEY), any_size=False)
    before = counters()
    expected = [module(x, double=False) for module in modules]
    assert counters()["compiled"] - before["compiled"] == 1, "one function serves both modules' fp8 weights"
    torch.testing.assert_close(expected[1], eager(modules[1], x, False), atol=0.1, rtol=0.05)

    torch._dynamo.reset()  # as in a new process
    restarted = fp8_gates(monkeypatch)
    precompile_modules(restarted, CompileArtifacts(tmp_path, KEY), any_size=False)
    before = counters()
    with torch.compiler.set_stance("fail_on_recompile"):
        assert all(torch.equal(m(x, double=False), e) for m, e in zip(restarted, expected, strict=True))
    assert counters()["loaded"] - before["loaded"] == 1


def test_inputs_it_cannot_key_are_refused() -> None:
    assert input_signature((torch.zeros(2, 3), {"flag": True, "scale": None})) == input_signature(
        (torch.ones(2, 3), {"scale": None, "flag": True})
    )
    with pytest.raises(TypeError, match="object"):
        input_signature(object())


def test_each_fingerprint_keeps_its_own_functions(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    pipe = load_pipeline(settings, device="cpu")
    engine = FluxEngine(pipe, ResolutionRegistry.parse(["256x256"]), [256])
    job = engine.job_for(GenerateRequest(prompt="a red bicycle", width=256, height=256, num_inference_steps=1))
    for key in ("first-fingerprint", "second-fingerprint"):
        before = counters()
        # Without the VAE, which compiles slowest on a CPU and would show nothing more here.
        artifacts = CompileArtifacts(tmp_path, key)
        undo = compile_pipeline(pipe, CompileSettings(vae=False), shapes=1, artifacts=artifacts)
        engine.run(job)
        undo()
        # The double block and the single block; nothing loaded from the other fingerprint.
        assert counters()["compiled"] - before["compiled"] == 2
        assert counters()["loaded"] == before["loaded"]
        assert len(list(artifacts.precompiled_dir.glob("*.bin"))) == 2


class SizeBranch(torch.nn.Module):
    """A stand-in whose code depends on its input's size, as the convolutions' kernel choice does: a shape guard."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)
        return y.relu() if x.shape[0] > 5 else y.sigmoid()


def any_size(module: torch.nn.Module, tmp_path: Path) -> None:
    precompile_modules([module], CompileArtifacts(tmp_path, KEY), any_size=True)


@torch.inference_mode()
def test_one_function_compiled_for_any_size_serves_sizes_it_never_saw(tmp_path: Path) -> None:
    module = Gate(1).requires_grad_(False)
    any_size(module, tmp_path)
    before = counters()
    for rows in (3, 4, 7, 12):
        x = torch.randn(rows, 8)
        torch.testing.assert_close(module(x, double=False), eager(module, x, False))
    assert counters()["compiled"] - before["compiled"] == 1
    assert len(list(CompileArtifacts(tmp_path, KEY).precompiled_dir.glob("Gate.forward.any_size-*.bin"))) == 1


@torch.inference_mode()
def test_a_size_its_guards_refuse_gets_its_own_function_and_both_are_restored(tmp_path: Path) -> None:
    module = SizeBranch().requires_grad_(False)
    any_size(module, tmp_path)
    small, large = torch.randn(3, 8), torch.randn(9, 8)
    before = counters()
    expected = [module(small), module(large), module(torch.randn(4, 8))]
    assert counters()["compiled"] - before["compiled"] == 2, "3 and 4 rows share one function, 9 rows needs another"
    torch.testing.assert_close(expected[1], SizeBranch.forward(module, large))

    torch._dynamo.reset()  # as in a new process
    restarted = SizeBranch().requires_grad_(False)
    any_size(restarted, tmp_path)
    before = counters()
    with torch.compiler.set_stance("fail_on_recompile"):
        torch.testing.assert_close(restarted(small), expected[0])
        torch.testing.assert_close(restarted(large), expected[1])
        restarted(torch.randn(20, 8))
    assert counters()["loaded"] - before["loaded"] == 2
    assert counters()["compiled"] == before["compiled"]


@torch.inference_mode()
def test_after_warm_up_an_input_nothing_was_compiled_for_runs_eagerly(
    gates: list[Gate], caplog: pytest.LogCaptureFixture
) -> None:
    x = torch.randn(4, 8)
    gates[0](x, double=False)
    before = counters()
    with torch.compiler.set_stance("eager_on_recompile"):
        for _ in range(5):  # a request calls each region dozens of times
            torch.testing.assert_close(gates[0](x, double=True), eager(gates[0], x, True))
    after = counters()
    assert after["eager_calls"] - before["eager_calls"] == 5, "every eager call is counted"
    assert {k: after[k] for k in ("compiled", "loaded")} == {k: before[k] for k in ("compiled", "loaded")}
    warnings = [r for r in caplog.records if "runs eagerly" in r.getMessage()]
    assert len(warnings) == 1, "logged once per input signature, not once per call"
    with torch.compiler.set_stance("fail_on_recompile"), pytest.raises(RuntimeError, match="compiling is off"):
        gates[0](torch.randn(5, 8), double=False)


@torch.inference_mode()
@pytest.mark.parametrize("dynamic", [False, True], ids=["static route", "dynamic route"])
def test_module_hooks_run_around_a_compiled_region_as_around_eager(gates: list[Gate], dynamic: bool) -> None:
    seen: list[str] = []
    gates[0].register_forward_pre_hook(lambda module, args: seen.append("pre"))
    gates[0].register_forward_hook(lambda module, args, output: seen.append("post"))
    with dynamic_graph(dynamic):
        gates[0](torch.randn(4, 8), double=False)
    assert seen == ["pre", "post"]
