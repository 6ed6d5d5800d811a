"""The `precision` setting: its `auto` rule for every GPU Baseten offers, and each precision serving."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from model.model import Model
from model.precision import (
    CARDS,
    SMALL_CARD_MEGAPIXELS,
    GpuFacts,
    choose_precision,
    choose_text_encoder_precision,
)
from model.schema import GenerateRequest
from model.settings import Settings, SettingsError, config_metadata
from tests.conftest import TINY_EAGER, decode_jpeg
from tests.harness import NO_BODY

# What `auto` must pick on each card, from the facts the card reports (model.precision.CARDS).
EXPECTED = {"L4": "fp8", "A10G": "int8", "H100_40GB": "bf16", "H100": "bf16", "H200": "bf16", "B200": "bf16"}


def test_every_card_has_an_expected_precision() -> None:
    assert set(EXPECTED) == set(CARDS)


@pytest.mark.parametrize("card", EXPECTED)
def test_auto_picks_by_the_cards_memory_and_compute_capability(card: str) -> None:
    facts = CARDS[card]
    chosen, reason = choose_precision("auto", facts)
    assert chosen == EXPECTED[card]
    assert f"{facts.memory_gib:.1f} GiB" in reason, "the reason names the fact it rests on"


def test_auto_without_a_gpu_is_bf16() -> None:
    assert choose_precision("auto", None)[0] == "bf16"


def test_a_card_smaller_than_any_measured_one_gets_int8_and_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="model.precision"):
        assert choose_precision("auto", GpuFacts("Tesla T4", 14.6, (7, 5)))[0] == "int8"
    assert "less than any card this package was measured on" in caplog.text


@pytest.mark.parametrize("explicit", ["bf16", "fp8", "int8"])
def test_an_explicit_precision_is_kept(explicit: str) -> None:
    assert choose_precision(explicit, CARDS["A10G"]) == (explicit, "set explicitly")


def test_explicit_bf16_on_a_small_card_warns_with_the_expected_peak(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="model.precision"):
        choose_precision("bf16", CARDS["L4"])
    assert "33.8 GiB" in caplog.text and "22.0 GiB" in caplog.text


def test_an_unknown_precision_lists_the_valid_ones() -> None:
    with pytest.raises(SettingsError) as raised:
        Settings.from_sources(environ={"FLUX_PRECISION": "fp4"})
    for valid in ("'auto'", "'bf16'", "'fp8'", "'int8'"):
        assert valid in str(raised.value)


def test_resolving_auto_changes_the_cache_key_and_the_largest_size(caplog: pytest.LogCaptureFixture) -> None:
    settings = Settings.from_sources(environ={})
    on_h100 = settings.resolved(CARDS["H100"])
    with caplog.at_level(logging.INFO):
        on_l4 = settings.resolved(CARDS["L4"])
    assert (on_h100.precision, on_l4.precision) == ("bf16", "fp8")
    assert on_h100.fingerprint_facts() != on_l4.fingerprint_facts()
    assert "precision fp8:" in caplog.text
    assert (on_h100.max_megapixels, on_l4.max_megapixels) == (2.0, SMALL_CARD_MEGAPIXELS)
    assert "max_megapixels 1.2: 22.0 GiB" in caplog.text
    assert on_l4.bounds.problem(1536, 1296) is not None and on_h100.bounds.problem(1536, 1296) is None
    assert all(on_l4.bounds.problem(r.width, r.height) is None for r in on_l4.aspect_ratios.values())
    explicit = Settings.from_sources(environ={"FLUX_MAX_MEGAPIXELS": "2"}).resolved(CARDS["L4"])
    assert explicit.max_megapixels == 2.0, "an explicit value is kept"


@pytest.mark.parametrize(("transformer", "expected"), [("bf16", "bf16"), ("fp8", "int4"), ("int8", "int4")])
def test_auto_quantizes_t5_beside_a_quantized_transformer_on_a_small_card(transformer: str, expected: str) -> None:
    assert choose_text_encoder_precision("auto", transformer, CARDS["L4"])[0] == expected


@pytest.mark.parametrize("card", ["H100", "H200", "B200"])
def test_auto_keeps_t5_in_bf16_where_the_card_holds_it_beside_an_explicit_fp8(card: str) -> None:
    chosen, reason = choose_text_encoder_precision("auto", "fp8", CARDS[card])
    assert chosen == "bf16", reason
    resolved = Settings.from_sources(environ={"FLUX_PRECISION": "fp8"}).resolved(CARDS[card])
    assert (resolved.precision, resolved.text_encoder_precision) == ("fp8", "bf16")


def test_every_card_that_auto_quantizes_also_quantizes_t5() -> None:
    for card in CARDS.values():
        resolved = Settings.from_sources(environ={}).resolved(card)
        quantized = resolved.precision != "bf16"
        assert (resolved.text_encoder_precision != "bf16") == quantized, card.name


def test_auto_quantizes_t5_to_int8_without_a_gpu() -> None:
    assert choose_text_encoder_precision("auto", "int8", None)[0] == "int8"


@pytest.mark.parametrize("explicit", ["bf16", "int8", "int4"])
def test_an_explicit_text_encoder_precision_is_kept(explicit: str) -> None:
    for transformer in ("bf16", "fp8", "int8"):
        assert choose_text_encoder_precision(explicit, transformer, CARDS["A10G"]) == (explicit, "set explicitly")


def test_the_text_encoders_precision_is_part_of_the_cache_key(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO):
        quantized = Settings.from_sources(environ={}).resolved(CARDS["L4"])
    plain = Settings.from_sources(environ={"FLUX_TEXT_ENCODER_PRECISION": "bf16"}).resolved(CARDS["L4"])
    assert quantized.text_encoder_precision == "int4"
    assert "text_encoder_precision int4: the transformer is fp8" in caplog.text
    assert quantized.fingerprint_facts() != plain.fingerprint_facts()
    with pytest.raises(ValueError, match="decided precision"):
        Settings.from_sources(environ={"FLUX_PRECISION": "fp8"}).fingerprint_facts()


def test_int8_serves_on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in {**TINY_EAGER, "FLUX_PRECISION": "int8"}.items():
        monkeypatch.setenv(key, value)
    model = Model(config={"model_metadata": config_metadata()})
    model.load()
    linear = model._engine.pipe.transformer.transformer_blocks[0].attn.to_q
    assert type(linear.weight).__name__ == "Int8Tensor", "the transformer's linears hold int8 weights"
    t5_linear = model._engine.pipe.text_encoder_2.encoder.block[0].layer[0].SelfAttention.q
    assert type(t5_linear.weight).__name__ == "Int8Tensor", "auto quantizes T5 with a quantized transformer"
    request = GenerateRequest(prompt="a lighthouse", width=1216, height=832, seed=4)
    image = np.asarray(decode_jpeg(model.predict(request, NO_BODY).data), dtype=np.float32)
    assert image.shape == (832, 1216, 3) and image.std() > 1, "a real image, not a flat one"
