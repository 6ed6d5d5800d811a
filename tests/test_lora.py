"""LoRA per request on the tiny model: adapters from a real local HTTP server, merged into the weights."""

from __future__ import annotations

import hashlib
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from diffusers import FluxPipeline
from safetensors.torch import save_file

from model import adapters as adapters_module
from model import precompile
from model.adapters import AdapterStore
from model.artifacts import CompileArtifacts
from model.compile import compile_pipeline
from model.engine import FluxEngine, InvalidRequest
from model.lora import LoraMerger, PreparedAdapter, prepare
from model.pipeline import load_pipeline
from model.resolutions import ResolutionRegistry
from model.schema import GenerateRequest
from model.settings import CompileSettings, Settings
from tests.conftest import OPEN_SERVER_LORA_RANK, OPEN_SERVER_LORAS, TINY_EAGER, RunningServer
from tests.lora_files import kohya_state_dict, peft_state_dict, write
from tests.test_server import predict
from tests.web_server import serving

MAX_ADAPTERS, RANK = OPEN_SERVER_LORAS, OPEN_SERVER_LORA_RANK  # the open server's, so its adapters fit both
BASE = {"prompt": "a lighthouse at dusk", "width": 256, "height": 256, "seed": 7, "num_inference_steps": 2}


@pytest.fixture(scope="module")
def files() -> Iterator[tuple[Path, str]]:
    """The adapters' directory, served over HTTP on loopback."""
    root = Path(tempfile.mkdtemp(prefix="loras-"))
    with serving(root) as (base, _):
        yield root, base


def _engine(root: Path, allow_private: bool = True, compiled: bool = False) -> FluxEngine:
    settings = Settings.from_sources(environ=TINY_EAGER)
    pipe = load_pipeline(settings, device="cpu")
    lora = LoraMerger(pipe.transformer, MAX_ADAPTERS)
    store = AdapterStore(lora.layers, RANK, lora.dtype, root / "cache", 1 << 30, {"fox": "owner/fox"}, allow_private)
    sizes = ResolutionRegistry.coerce(["256x256"])
    engine = FluxEngine(pipe, sizes, settings.text_lengths, settings.sizes, None, lora, store)
    if compiled:  # the transformer's blocks only: the VAE's CPU compile is the slow one, and holds no adapter
        compile_pipeline(pipe, CompileSettings(vae=False), 1, CompileArtifacts(root / "inductor", "lora"))
    return engine


@pytest.fixture(scope="module")
def served(files: tuple[Path, str]) -> tuple[FluxEngine, str, Path]:
    root, base = files
    engine = _engine(root)
    transformer = engine.pipe.transformer
    write(root / "peft.safetensors", peft_state_dict(engine.lora.layers, 4, seed=1))
    write(root / "other.safetensors", peft_state_dict(engine.lora.layers, 8, seed=2, only="single_transformer_blocks"))
    write(root / "kohya.safetensors", kohya_state_dict(transformer, 4, seed=3))
    return engine, base, root


def generate(engine: FluxEngine, **fields: object) -> tuple[str, list]:
    response = engine.generate(GenerateRequest(**{**BASE, **fields}))
    return response.data, response.loras


def test_an_adapter_changes_the_image_and_leaves_no_trace(served: tuple[FluxEngine, str, Path]) -> None:
    engine, base, root = served
    plain, listed = generate(engine)
    assert listed == []
    lora = {"url": f"{base}/files/peft.safetensors", "scale": 0.8}
    adapted, listed = generate(engine, loras=[lora])
    assert adapted != plain
    sha = hashlib.sha256((root / "peft.safetensors").read_bytes()).hexdigest()
    assert [(a.url, a.scale, a.sha256) for a in listed] == [(lora["url"], 0.8, sha)]
    assert generate(engine)[0] == plain, "a request without loras after one with them"
    assert generate(engine, loras=[{**lora, "scale": 0}])[0] == plain, "scale 0 is the request without it"
    other = {"url": f"{base}/files/other.safetensors"}
    both, _ = generate(engine, loras=[other, lora])
    assert both not in (plain, adapted)
    assert generate(engine, loras=[lora])[0] == adapted, "the same request, whatever ran before it"
    assert generate(engine, loras=[other, lora])[0] == both


def test_kohya_keys_are_converted(served: tuple[FluxEngine, str, Path]) -> None:
    engine, base, _ = served
    plain, _ = generate(engine)
    adapted, listed = generate(engine, loras=[{"url": f"{base}/files/kohya.safetensors"}])
    assert adapted != plain and len(listed) == 1


def test_a_redirect_is_followed_and_a_preset_names_a_hub_file(
    served: tuple[FluxEngine, str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    engine, base, root = served
    direct, _ = generate(engine, loras=[{"url": f"{base}/files/peft.safetensors"}])
    assert generate(engine, loras=[{"url": f"{base}/redirect/peft.safetensors"}])[0] == direct
    (root / "owner" / "fox").mkdir(parents=True, exist_ok=True)
    (root / "owner" / "fox" / "fox.safetensors").write_bytes((root / "peft.safetensors").read_bytes())
    monkeypatch.setattr(adapters_module, "HF_ENDPOINT", f"{base}/hub")
    for name in ("fox", "owner/fox", "owner/fox/fox.safetensors"):
        image, listed = generate(engine, loras=[{"url": name}])
        assert image == direct and listed[0].url == name


def _bad_files(root: Path, layers: dict) -> None:
    write(
        root / "sdxl.safetensors",
        {
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.ones(4, 8),
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.ones(8, 4),
        },
    )
    state = peft_state_dict(layers, 4, seed=4)
    key = next(k for k in state if k.endswith("lora_A.weight"))
    up, layer = key.replace("lora_A", "lora_B"), key.removesuffix(".lora_A.weight")
    write(root / "shape.safetensors", {**state, key: torch.ones(4, 3)})
    write(root / "rank.safetensors", peft_state_dict(layers, RANK * 2, seed=5))
    write(
        root / "text.safetensors",
        {**state, "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(4, 8)},
    )
    write(root / "nan.safetensors", {**state, key: torch.full_like(state[key], float("nan"))})
    write(root / "rank0.safetensors", {**state, key: state[key][:0], up: state[up][:, :0]})
    # Finite values, but alpha / rank x up is past float32's range (3.4e38).
    write(
        root / "alpha.safetensors",
        {**state, up: torch.full_like(state[up], 100.0), f"{layer}.alpha": torch.tensor(1e38)},
    )
    (root / "junk.safetensors").write_bytes(b"<html>not a file</html>")
    save_file({"x": torch.zeros(2, dtype=torch.int64)}, str(root / "ints.safetensors"))


@pytest.mark.parametrize(
    ("name", "field", "words"),
    [
        ("missing.safetensors", "loras[0].url", "404"),
        ("junk.safetensors", "loras[0].url", "not a safetensors file"),
        ("ints.safetensors", "loras[0].url", "not a float tensor"),
        ("sdxl.safetensors", "loras[0]", "no FLUX.1 layer"),
        ("shape.safetensors", "loras[0]", "shapes"),
        ("rank.safetensors", "loras[0]", f"rank is {RANK * 2}, above this deployment's max_lora_rank of {RANK}"),
        ("text.safetensors", "loras[0]", "text encoders"),
        ("nan.safetensors", "loras[0]", "not finite"),
        ("rank0.safetensors", "loras[0]", "shapes (0, "),
        ("alpha.safetensors", "loras[0]", "not finite"),
    ],
)
def test_a_bad_adapter_is_refused_by_field_and_leaves_clean_weights(
    served: tuple[FluxEngine, str, Path], name: str, field: str, words: str
) -> None:
    engine, base, root = served
    _bad_files(root, engine.lora.layers)
    plain, _ = generate(engine)
    generate(engine, loras=[{"url": f"{base}/files/peft.safetensors"}])
    with pytest.raises(InvalidRequest) as refused:
        generate(engine, loras=[{"url": f"{base}/files/peft.safetensors"}, {"url": f"{base}/files/{name}"}])
    assert refused.value.field_name == field.replace("[0]", "[1]")
    assert words in str(refused.value)
    assert generate(engine)[0] == plain


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("http://example.com/a.safetensors", "scheme must be https"),
        ("https://127.0.0.1/a.safetensors", "127.0.0.1, a private, loopback or reserved address"),
        ("https://localhost/a.safetensors", "loopback"),  # a name that resolves to loopback, not only a literal
        ("https://10.0.0.8/a.safetensors", "private"),
        ("https://user:pw@example.com/a.safetensors", "credentials"),
        ("not a url", "not an https URL"),
    ],
)
def test_private_addresses_and_other_schemes_are_refused(files: tuple[Path, str], url: str, words: str) -> None:
    engine = _engine(files[0], allow_private=False)
    with pytest.raises(InvalidRequest) as refused:
        generate(engine, loras=[{"url": url}])
    assert refused.value.field_name == "loras[0].url" and words in str(refused.value)


def test_a_redirect_to_a_private_address_is_refused(files: tuple[Path, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The first hop is checked as public (a stand-in for a public host's DNS answer); its redirect to loopback is
    refused, because every hop is checked."""
    root, base = files
    engine = _engine(root, allow_private=False)
    checked: list[str] = []
    real = adapters_module.fetch.__globals__["_checked_address"]

    def first_hop_public(host: str, port: int, allow_private: bool) -> str:
        checked.append(host)
        return "127.0.0.1" if len(checked) == 1 else real(host, port, allow_private)

    monkeypatch.setattr("model.remote._checked_address", first_hop_public)
    monkeypatch.setattr("model.remote._PinnedHTTPS", adapters_module.fetch.__globals__["_PinnedHTTP"])
    port = base.rsplit(":", 1)[1]
    with pytest.raises(InvalidRequest) as refused:
        generate(engine, loras=[{"url": f"https://files.test:{port}/redirect-to/https://localhost:{port}/files/x"}])
    assert refused.value.field_name == "loras[0].url" and "loopback" in str(refused.value)
    assert checked == ["files.test", "localhost"]


def test_an_unreachable_host_is_a_400(files: tuple[Path, str]) -> None:
    engine = _engine(files[0])
    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    with pytest.raises(InvalidRequest, match="could not be fetched from 127.0.0.1") as refused:
        generate(engine, loras=[{"url": f"http://127.0.0.1:{port}/a.safetensors"}])
    assert refused.value.field_name == "loras[0].url"


def test_a_slow_or_large_file_is_cut_off(files: tuple[Path, str], monkeypatch: pytest.MonkeyPatch) -> None:
    root, base = files
    engine = _engine(root)
    monkeypatch.setattr(
        engine.adapters,
        "policy",
        engine.adapters.policy.__class__(max_bytes=10_000_000, timeout_s=1, allow_private=True),
    )
    with pytest.raises(InvalidRequest, match="took over 1 s"):
        generate(engine, loras=[{"url": f"{base}/slow"}])
    monkeypatch.setattr(engine.adapters, "policy", engine.adapters.policy.__class__(max_bytes=1000, allow_private=True))
    write(root / "big.safetensors", peft_state_dict(engine.lora.layers, 4, seed=9))
    with pytest.raises(InvalidRequest, match="over the limit of 1000"):
        generate(engine, loras=[{"url": f"{base}/files/big.safetensors"}])


def test_loras_need_max_loras_and_fit_in_it(engine: FluxEngine, served: tuple[FluxEngine, str, Path]) -> None:
    with pytest.raises(InvalidRequest, match="set max_loras") as refused:
        engine.generate(GenerateRequest(**BASE, loras=[{"url": "owner/repo"}]))
    assert refused.value.field_name == "loras"
    with pytest.raises(InvalidRequest, match=f"3 adapters, over this deployment's max_loras of {MAX_ADAPTERS}"):
        generate(served[0], loras=[{"url": "owner/repo"}] * 3)


def test_swaps_compile_nothing_on_a_miss_or_a_hit(files: tuple[Path, str]) -> None:
    root, base = files
    lora = {"url": f"{base}/files/swap.safetensors", "scale": 1.5}
    served = []
    for state in ("miss", "hit"):  # the hit reads the functions the miss saved
        before = dict(precompile.COUNTERS)
        engine = _engine(root, compiled=True)
        write(root / "swap.safetensors", peft_state_dict(engine.lora.layers, 4, seed=11))
        plain, _ = generate(engine)  # the static graph: compiled or read
        counted = {key: precompile.COUNTERS[key] - before.get(key, 0) for key in ("compiled", "loaded")}
        assert counted["compiled" if state == "miss" else "loaded"] > 0 and (state == "miss" or not counted["compiled"])
        torch.compiler.set_stance("fail_on_recompile")
        adapted, _ = generate(engine, loras=[lora])
        assert adapted != plain
        assert generate(engine)[0] == plain
        assert generate(engine, loras=[lora])[0] == adapted
        torch.compiler.set_stance("default")
        served.append((plain, adapted))
    assert served[0] == served[1], "a hit serves the miss's bytes, with and without the adapter"


def test_files_are_kept_by_content_within_the_disk_budget(tmp_path: Path) -> None:
    layers = {"transformer_blocks.0.attn.to_q": (16, 16)}
    for name, seed in (("a", 1), ("b", 2)):
        write(tmp_path / f"{name}.safetensors", peft_state_dict(layers, 4, seed=seed))
    size = (tmp_path / "a.safetensors").stat().st_size
    with serving(tmp_path) as (base, seen):
        store = AdapterStore(layers, 8, torch.float32, tmp_path / "cache", size + size // 2, {}, True)
        sha_a, first = store.get(f"{base}/files/a.safetensors")
        assert sha_a == hashlib.sha256((tmp_path / "a.safetensors").read_bytes()).hexdigest()
        (tmp_path / "cache" / f"{sha_a}.safetensors").unlink()  # the host copy serves a repeat: no disk, no fetch
        assert store.get(f"{base}/files/a.safetensors") == (sha_a, first) and len(seen) == 1
        sha_b, _ = store.get(f"{base}/files/b.safetensors")
        write(tmp_path / "cache" / f"{sha_a}.safetensors", peft_state_dict(layers, 4, seed=1))
        store.get(f"{base}/files/b.safetensors")
        store._prepared.clear()  # a fresh process: only the disk remembers
        store.get(f"{base}/files/a.safetensors")
    kept = sorted(p.stem for p in (tmp_path / "cache").glob("*.safetensors"))
    assert kept == [sha_a], "b, least recently used, went past the budget; a, just read, stays"


@pytest.mark.slow
def test_over_http_an_adapter_is_applied_and_a_bad_one_is_a_400(
    open_server: RunningServer, served: tuple[FluxEngine, str, Path]
) -> None:
    _, base, root = served
    body = {**BASE, "width": 1024, "height": 1024}
    plain = predict(open_server, body).json()
    lora = {"url": f"{base}/files/peft.safetensors", "scale": 0.5}
    response = predict(open_server, {**body, "loras": [lora]})
    assert response.status_code == 200, response.text
    adapted = response.json()
    assert adapted["data"] != plain["data"]
    sha = hashlib.sha256((root / "peft.safetensors").read_bytes()).hexdigest()
    assert adapted["loras"] == [{**lora, "sha256": sha}]
    for bad, field in [
        ({"url": f"{base}/files/missing.safetensors"}, "loras[0].url"),
        ({"url": f"{base}/files/peft.safetensors", "scale": 4.5}, "scale"),
        ({"url": f"{base}/files/peft.safetensors", "weight": 1}, "weight"),
    ]:
        refused = predict(open_server, {**body, "loras": [bad]})
        assert refused.status_code == 400 and field in refused.text, refused.text
    assert predict(open_server, body).json()["data"] == plain["data"]


@pytest.mark.slow
def test_over_http_loras_on_a_deployment_without_lora_say_how_to_turn_them_on(server: RunningServer) -> None:
    refused = predict(server, {**BASE, "loras": [{"url": "owner/repo"}]})
    assert refused.status_code == 400 and "loras" in refused.text and "max_loras" in refused.text, refused.text


@torch.inference_mode()
def _transformer_output(transformer: torch.nn.Module) -> torch.Tensor:
    config, generator = transformer.config, torch.Generator().manual_seed(0)
    return transformer(
        hidden_states=torch.randn(1, 64, config.in_channels, generator=generator).bfloat16(),
        encoder_hidden_states=torch.randn(1, 16, config.joint_attention_dim, generator=generator).bfloat16(),
        pooled_projections=torch.randn(1, config.pooled_projection_dim, generator=generator).bfloat16(),
        timestep=torch.tensor([0.5], dtype=torch.bfloat16),
        img_ids=torch.zeros(64, 3),
        txt_ids=torch.zeros(16, 3),
        return_dict=False,
    )[0]


def _quantized(precision: str) -> tuple[FluxPipeline, LoraMerger, torch.Tensor, PreparedAdapter]:
    """The tiny pipeline with its transformer's blocks quantized as load() quantizes them, its merger, the first
    block's query weight, and a rank-4 adapter on every double block."""
    from model.optimize import block_hook

    pipe = load_pipeline(Settings.from_sources(environ=TINY_EAGER), device="cpu")
    transformer = pipe.transformer.to(torch.bfloat16)
    quantize = block_hook(precision)
    for block in [*transformer.transformer_blocks, *transformer.single_transformer_blocks]:
        quantize(block)
    lora = LoraMerger(transformer, 1, quantize)
    adapter = prepare(peft_state_dict(lora.layers, 4, seed=12), None, lora.layers, RANK, lora.dtype)
    return pipe, lora, transformer.transformer_blocks[0].attn.to_q.weight, adapter


def test_fp8_weights_take_adapters_compiled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Adapters merge into torchao's fp8 weights, quantized again by torchao's own rule from the fp32 sum, swapping
    compiles nothing, and clearing gives back the pristine fp8 weights bit for bit."""
    from torchao.quantization import Float8Tensor, PerRow, quant_api

    # torchao refuses every CPU; a CPU runs fp8 matmuls, slowly, which is enough here.
    monkeypatch.setattr(quant_api, "_check_hardware_support", lambda granularity: None)
    pipe, lora, weight, adapter = _quantized("fp8")
    transformer = pipe.transformer
    assert type(weight).__name__ == "Float8Tensor"
    pristine = weight.qdata.clone(), weight.scale.clone()
    compile_pipeline(pipe, CompileSettings(vae=False), 1, CompileArtifacts(tmp_path, "fp8"))
    plain = _transformer_output(transformer)
    torch.compiler.set_stance("fail_on_recompile")
    lora.apply([("a", adapter, 0.7)])
    assert type(weight).__name__ == "Float8Tensor" and not torch.equal(weight.qdata, pristine[0])
    down, up, ratio = adapter.layers["transformer_blocks.0.attn.to_q"]
    fp32_sum = (pristine[0].float() * pristine[1]).addmm(up.float(), down.float(), alpha=0.7 * ratio)
    expected = Float8Tensor.from_hp(fp32_sum, granularity=PerRow())
    assert torch.equal(weight.qdata.view(torch.uint8), expected.qdata.view(torch.uint8))
    assert torch.equal(weight.scale, expected.scale)
    adapted = _transformer_output(transformer)
    lora.apply([])
    assert not torch.equal(adapted, plain)
    assert torch.equal(weight.qdata, pristine[0]) and torch.equal(weight.scale, pristine[1])
    assert torch.equal(_transformer_output(transformer), plain)


def test_int8_weights_take_adapters_and_clear_back_bit_for_bit() -> None:
    """int8 (the A10G's precision) is quantized again through load()'s own torchao call: the merged weight is the
    fp32 sum within int8's rounding, and clearing gives back the pristine int8 weights bit for bit."""
    pipe, lora, weight, adapter = _quantized("int8")
    transformer = pipe.transformer
    assert type(weight).__name__ == "Int8Tensor"
    pristine = weight.qdata.clone(), weight.scale.clone()
    plain = _transformer_output(transformer)
    down, up, ratio = adapter.layers["transformer_blocks.0.attn.to_q"]
    fp32_sum = weight.dequantize().float().addmm(up.float(), down.float(), alpha=0.7 * ratio)
    lora.apply([("a", adapter, 0.7)])
    error = (weight.dequantize().float() - fp32_sum).abs()
    row_step = weight.scale.float().reshape(-1, 1)
    assert (error <= 0.5 * row_step + fp32_sum.abs() / 2**7).all()  # half an int8 step, and bf16's rounding
    assert not torch.equal(_transformer_output(transformer), plain)
    lora.apply([])
    assert torch.equal(weight.qdata, pristine[0]) and torch.equal(weight.scale, pristine[1])
    assert torch.equal(_transformer_output(transformer), plain)
