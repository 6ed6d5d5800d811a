"""Settings: each declared once, read from model_metadata and FLUX_* variables, errors naming setting, value and
source."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic_core import PydanticUndefined

from model.cache import BACKENDS
from model.resolutions import AspectRatios, Resolution
from model.settings import (
    CONFIG_PATH,
    ENV_PREFIX,
    PLATFORM_METADATA_KEYS,
    Settings,
    SettingsError,
    config_metadata,
)

ROOT = Path(__file__).resolve().parent.parent


def test_importing_the_settings_imports_no_torch() -> None:
    # A fresh interpreter: this one has long imported torch through the other tests.
    probe = "import model.settings, sys; print(sorted(m for m in ('torch', 'diffusers', 'PIL') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


# What a deployer touches, and nothing more: the issue that cut the switches set the bound at 16; LoRA added its
# five (adapters, rank, presets, disk, private URLs), and input images the body limit.
MAX_SETTINGS = 22


def test_a_deployer_touches_at_most_twenty_two_settings() -> None:
    assert len(Settings.model_fields) <= MAX_SETTINGS


def test_the_cache_key_facts_of_config_yaml_are_pinned() -> None:
    # A change here changes every deployment's cache key: each replica would start with a miss.
    assert Settings.from_sources(environ={}).resolved(None).fingerprint_facts() == {
        "model": "black-forest-labs/FLUX.1-schnell",
        "compile_any_size": True,
        "precision": "bf16",  # `auto` is decided first
        "text_encoder_precision": "bf16",
        "resolutions": ["1024x1024", "1216x832", "896x1152"],
        "text_lengths": [256, 512],
    }


def test_the_environment_wins_over_model_metadata_which_wins_over_the_default() -> None:
    meta = {"resolutions": ["1024x1024"], "text_lengths": [512, 256, 256], "prompt_cache_mb": 64}
    assert Settings.from_sources(meta, environ={}).prompt_cache_mb == 64
    settings = Settings.from_sources(meta, environ={"FLUX_PROMPT_CACHE_MB": "32"})
    assert settings.prompt_cache_mb == 32
    assert settings.compile_any_size is True  # neither source gave it
    assert settings.text_lengths == (256, 512)


def test_the_process_environment_is_read_when_none_is_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLUX_PROMPT_CACHE_MB", "8")
    assert Settings.from_sources().prompt_cache_mb == 8


@pytest.mark.parametrize(
    ("environ", "named"),
    [
        ({"FLUX_COMPILE": "maybe"}, "compile='maybe' (from FLUX_COMPILE)"),
        ({"FLUX_PROMPT_CACHE_MB": "-1"}, "prompt_cache_mb='-1' (from FLUX_PROMPT_CACHE_MB)"),
        ({"FLUX_PRECISION": "fp4"}, "precision='fp4' (from FLUX_PRECISION)"),
        ({"FLUX_CACHE_BACKEND": "s3"}, "cache_backend='s3' (from FLUX_CACHE_BACKEND)"),
        ({"FLUX_RESOLUTIONS": "1024"}, "resolutions='1024' (from FLUX_RESOLUTIONS)"),
    ],
)
def test_a_bad_value_is_refused_naming_the_setting_its_value_and_its_source(environ: dict, named: str) -> None:
    with pytest.raises(SettingsError) as raised:
        Settings.from_sources(environ=environ)
    assert named in str(raised.value)


def test_a_bad_metadata_value_names_model_metadata() -> None:
    with pytest.raises(SettingsError, match=r"compile_any_size='sometimes' \(from model_metadata\)"):
        Settings.from_sources({**config_metadata(), "compile_any_size": "sometimes"}, environ={})


def test_a_missing_required_setting_is_named() -> None:
    with pytest.raises(SettingsError, match=r"resolutions \(not given\)"):
        Settings.from_sources({"text_lengths": [256]}, environ={})


def test_an_unknown_or_removed_model_metadata_key_is_refused_by_name() -> None:
    for key in ("compile_precompil", "fuse_qkv"):
        with pytest.raises(SettingsError, match=f"unknown model_metadata key '{key}'"):
            Settings.from_sources({**config_metadata(), key: False}, environ={})


def test_config_yaml_holds_only_settings_and_keys_truss_reads() -> None:
    meta = yaml.safe_load(CONFIG_PATH.read_text())["model_metadata"]
    assert set(meta) - PLATFORM_METADATA_KEYS <= set(Settings.model_fields)
    assert "example_model_input" in meta


def test_an_unknown_flux_variable_warns(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="model.settings"):
        Settings.from_sources(environ={"FLUX_COMPIL": "0"})
    assert "FLUX_COMPIL is not a setting" in caplog.text


def test_int8_serves_eager_with_a_warning_naming_both(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="model.settings"):
        settings = Settings.from_sources(environ={"FLUX_PRECISION": "int8"}).resolved(None)
    assert not settings.compile_settings.enabled
    assert "compile turned off because precision is int8" in caplog.text


def test_no_conflict_no_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="model.settings"):
        Settings.from_sources(environ={}).resolved(None)
        Settings.from_sources(environ={"FLUX_PRECISION": "fp8"})
    assert not [r for r in caplog.records if r.name == "model.settings" and r.levelno >= logging.WARNING]


def settings_table() -> str:
    """The README's settings table: one row per setting, from its declaration."""
    rows = ["| key | default | meaning |", "| --- | --- | --- |"]
    for key, info in Settings.model_fields.items():
        default = info.default_factory() if info.default_factory is not None else info.default
        if default is PydanticUndefined:
            shown = "required"
        elif isinstance(default, bool):
            shown = f"`{str(default).lower()}`"
        elif default is None or default == {}:
            shown = "none"
        elif isinstance(default, AspectRatios):
            shown = "the ratios above"
        elif isinstance(default, Path) and default.is_relative_to(Path.home()):
            shown = f"`~/{default.relative_to(Path.home()).as_posix()}`"
        else:
            shown = f"`{default}`"
        rows.append(f"| `{key}` | {shown} | {info.description} |")
    return "\n".join(rows)


def test_each_setting_has_a_one_line_meaning() -> None:
    for key, info in Settings.model_fields.items():
        assert info.description and "\n" not in info.description, key


def test_the_readme_settings_table_is_the_declarations() -> None:
    readme = (ROOT / "README.md").read_text()
    assert settings_table() in readme, "regenerate README's table with tests.test_settings.settings_table()"
    assert f"`{ENV_PREFIX}<KEY>`" in readme, "the table's keys are read from the environment as FLUX_<KEY>"


def test_cache_backends_are_the_declared_choices() -> None:
    assert "auto" in BACKENDS and "local" in BACKENDS and "none" in BACKENDS
    assert Settings.from_sources(environ={"FLUX_CACHE_BACKEND": "none"}).cache_backend == "none"


@pytest.mark.parametrize(
    ("environ", "named"),
    [
        ({"FLUX_ASPECT_RATIOS": "1:1=1000x1000"}, "aspect_ratios='1:1=1000x1000' (from FLUX_ASPECT_RATIOS)"),
        ({"FLUX_ASPECT_RATIOS": "1:1=512x512"}, "1:1=512x512 is 0.26 megapixels"),
        ({"FLUX_ASPECT_RATIOS": "16:9=768x1344"}, "16:9=768x1344 is 0.57 wide for 1 high, not 1.78"),
        ({"FLUX_ASPECT_RATIOS": "wide=1344x768"}, "'wide' is not of the form W:H"),
        ({"FLUX_ASPECT_RATIOS": "16:9"}, "not of the form NAME=WIDTHxHEIGHT"),
        (
            {"FLUX_MAX_SIDE": "1280"},
            "aspect_ratios 21:9=1536x640 (from model_metadata) is outside the size bounds: width 1536 is not allowed",
        ),
        (
            {"FLUX_RESOLUTIONS": "1536x1536"},
            "resolutions 1536x1536 (from FLUX_RESOLUTIONS) is outside the size bounds: width/height 1536x1536 is "
            "2.36 megapixels",
        ),
        ({"FLUX_MIN_SIDE": "2000"}, "min_side=2000 is more than max_side=1536"),
        ({"FLUX_MAX_SIDE": "8192"}, "max_side='8192' (from FLUX_MAX_SIDE)"),
        ({"FLUX_MAX_MEGAPIXELS": "0"}, "max_megapixels='0' (from FLUX_MAX_MEGAPIXELS)"),
    ],
)
def test_sizes_outside_the_grid_the_bounds_or_a_megapixel_stop_the_start(environ: dict, named: str) -> None:
    with pytest.raises(SettingsError) as raised:
        Settings.from_sources(environ=environ)
    assert named in str(raised.value)


def test_unquoted_aspect_ratios_in_yaml_are_refused_with_the_fix() -> None:
    # YAML 1.1 reads 16:9 as a base-60 number.
    ratios = yaml.safe_load("16:9: 1344x768")
    with pytest.raises(SettingsError, match="aspect ratio 969 is not a string such as '16:9': quote it in YAML"):
        Settings.from_sources({**config_metadata(), "aspect_ratios": ratios}, environ={})


def test_aspect_ratios_are_ordered_widest_first_whatever_their_source_order() -> None:
    environ = {"FLUX_ASPECT_RATIOS": "2:3=832x1216,1:1=1024x1024,3:2=1216x832"}
    ratios = Settings.from_sources(environ=environ).aspect_ratios
    assert list(ratios.items()) == [
        ("3:2", Resolution(1216, 832)),
        ("1:1", Resolution(1024, 1024)),
        ("2:3", Resolution(832, 1216)),
    ]
    assert list(Settings.from_sources(environ={}).aspect_ratios)[:3] == ["21:9", "16:9", "3:2"]
