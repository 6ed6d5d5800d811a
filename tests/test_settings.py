"""Settings: each declared once, parsed with errors that name the setting, conflicts settled in one logged step."""

from __future__ import annotations

import logging
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import yaml

from bench import CONFIGS, config_env
from model.cache import BACKENDS
from model.resolutions import Resolution
from model.settings import (
    CONFIG_PATH,
    PLATFORM_METADATA_KEYS,
    CompileSettings,
    Settings,
    SettingsError,
    config_metadata,
    declarations,
    env_for,
    settings_table,
)

ROOT = Path(__file__).resolve().parent.parent


def test_importing_the_settings_imports_no_torch() -> None:
    # A fresh interpreter: this one has long imported torch through the other tests.
    probe = "import model.settings, sys; print(sorted(m for m in ('torch', 'diffusers', 'PIL') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_the_cache_key_facts_of_config_yaml_are_pinned() -> None:
    # A change here changes every deployment's cache key: each replica would start with a miss.
    assert Settings.from_sources(environ={}).resolved(None).fingerprint_facts() == {
        "model": "black-forest-labs/FLUX.1-schnell",
        "compile": {
            "enabled": True,
            "mode": "default",
            "regional": True,
            "compile_vae": True,
            "text_encoders": False,
            "dynamic": False,
            "any_size": True,
            "shared_block_layout": True,
            "precompile": True,
            "deterministic": False,
            "scale_rblock": False,
        },
        # `precision` replaced the `fp8` switch (False here); `text_encoder_precision` and the two memory switches
        # joined later, then `vae_compiled_nchw` and `compile_deterministic`, then `fp8_scaling`, then
        # `compile_scale_rblock`: each change changed the key once.
        # Both `auto`s are decided first.
        "optimizations": {
            "fuse_qkv": False,
            "vae_channels_last": False,
            "expandable_segments": True,
            "vae_inplace_silu": True,
            "vae_compiled_nchw": False,
            "attention_backend": None,
            "precision": "bf16",
            "fp8_scaling": "row",
            "text_encoder_precision": "bf16",
        },
        "resolutions": ["1024x1024", "1216x832", "896x1152"],
        "text_lengths": [256, 512],
    }


def test_the_environment_wins_over_model_metadata_which_wins_over_the_default() -> None:
    meta = {"resolutions": ["1024x1024"], "text_lengths": [512, 256, 256], "compile_mode": "max-autotune"}
    assert Settings.from_sources(meta, environ={}).compile.mode == "max-autotune"
    settings = Settings.from_sources(meta, environ={"FLUX_COMPILE_MODE": "reduce-overhead"})
    assert settings.compile.mode == "reduce-overhead"
    assert settings.compile.regional is CompileSettings().regional  # neither source gave it
    assert settings.text_lengths == (256, 512)


@pytest.mark.parametrize(
    ("environ", "named"),
    [
        ({"FLUX_COMPILE": "maybe"}, "compile='maybe' (from FLUX_COMPILE)"),
        ({"FLUX_WARMUP_RUNS": "two"}, "warmup_runs='two' (from FLUX_WARMUP_RUNS)"),
        ({"FLUX_COMPILE_MODE": "fastest"}, "compile_mode='fastest' (from FLUX_COMPILE_MODE)"),
        ({"FLUX_CACHE_BACKEND": "s3"}, "cache_backend='s3' (from FLUX_CACHE_BACKEND)"),
        ({"FLUX_RESOLUTIONS": "1024"}, "resolutions='1024' (from FLUX_RESOLUTIONS)"),
    ],
)
def test_a_bad_value_is_refused_naming_the_setting_its_value_and_its_source(environ: dict, named: str) -> None:
    with pytest.raises(SettingsError) as raised:
        Settings.from_sources(environ=environ)
    assert named in str(raised.value)


def test_a_bad_metadata_value_names_model_metadata() -> None:
    with pytest.raises(SettingsError, match=r"compile_vae='sometimes' \(from model_metadata\)"):
        Settings.from_sources({**config_metadata(), "compile_vae": "sometimes"}, environ={})


def test_a_missing_required_setting_is_named() -> None:
    with pytest.raises(SettingsError, match=r"resolutions \(not given\)"):
        Settings.from_sources({"text_lengths": [256]}, environ={})


def test_an_unknown_model_metadata_key_is_refused_by_name() -> None:
    with pytest.raises(SettingsError, match="unknown model_metadata key 'compile_precompil'"):
        Settings.from_sources({**config_metadata(), "compile_precompil": False}, environ={})


def test_config_yaml_holds_only_settings_and_keys_truss_reads() -> None:
    meta = yaml.safe_load(CONFIG_PATH.read_text())["model_metadata"]
    assert set(meta) - PLATFORM_METADATA_KEYS <= set(declarations())
    assert "example_model_input" in meta


def test_an_unknown_flux_variable_warns(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="model.settings"):
        Settings.from_sources(environ={"FLUX_COMPIL": "0"})
    assert "FLUX_COMPIL is not a setting" in caplog.text


@pytest.mark.parametrize(
    ("environ", "winner"),
    [
        ({"FLUX_PRECISION": "fp8"}, "precision is fp8"),
        ({"FLUX_PRECISION": "int8", "FLUX_COMPILE": "0"}, "precision is int8"),
        ({"FLUX_COMPILE_REGIONAL": "0"}, "compile_regional is False"),
    ],
)
def test_a_conflict_turns_precompile_off_with_a_warning_naming_both(
    environ: dict, winner: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="model.settings"):
        settings = Settings.from_sources(environ=environ)
    assert not settings.compile.precompile
    [record] = [r for r in caplog.records if r.name == "model.settings"]
    assert record.levelno == logging.WARNING
    assert record.getMessage().startswith(f"compile_precompile turned off because {winner}")


def test_int8_serves_eager_with_a_warning_naming_both(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="model.settings"):
        settings = Settings.from_sources(environ={"FLUX_PRECISION": "int8", "FLUX_COMPILE_PRECOMPILE": "0"})
    assert not settings.compile.enabled
    assert "compile turned off because precision is int8" in caplog.text


def test_the_rest_of_a_conflicting_configuration_is_kept() -> None:
    settings = Settings.from_sources(environ={"FLUX_PRECISION": "fp8", "FLUX_COMPILE_REGIONAL": "0"})
    assert settings.optimizations.precision == "fp8"
    assert not settings.compile.regional and not settings.compile.precompile


def test_no_conflict_no_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="model.settings"):
        Settings.from_sources(environ={})
        Settings.from_sources(environ={"FLUX_PRECISION": "fp8", "FLUX_COMPILE_PRECOMPILE": "0"})
        Settings.from_sources(environ=config_env("whole"))
    assert not [r for r in caplog.records if r.name == "model.settings"]


def test_each_setting_is_declared_once_with_a_one_line_meaning() -> None:
    declared = declarations()
    for key, declaration in declared.items():
        assert declaration.env == "FLUX_" + key.upper()
        assert declaration.meaning and "\n" not in declaration.meaning
    # Every field of every group is a declared setting: nothing is read from anywhere else.
    settings = Settings.from_sources(environ={})
    group_fields = {
        (group, f.name)
        for group in ("sizes", "compile", "optimizations", "cache")
        for f in fields(getattr(settings, group))
    }
    assert group_fields == {d.path for d in declared.values() if len(d.path) == 2}


def test_the_readme_settings_table_is_the_declarations() -> None:
    readme = (ROOT / "README.md").read_text()
    assert settings_table() in readme, "regenerate README's table with model.settings.settings_table()"
    for declaration in declarations().values():
        assert f"| `{declaration.key}` | `{declaration.env}` |" in readme


def test_cache_backends_are_the_declared_choices() -> None:
    assert "auto" in BACKENDS and "local" in BACKENDS and "none" in BACKENDS
    assert Settings.from_sources(environ={"FLUX_CACHE_BACKEND": "none"}).cache.backend == "none"


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_bench_configuration_is_a_valid_set_of_settings(name: str) -> None:
    env = config_env(name)
    assert all(variable.startswith("FLUX_") for variable in env)
    Settings.from_sources(environ=env)


def test_bench_configurations_keep_their_environment() -> None:
    assert config_env("eager") == {"FLUX_COMPILE": "0"}
    assert config_env("sdpa") == {"FLUX_ATTENTION_BACKEND": ""}
    assert config_env("whole+fp8") == {
        "FLUX_COMPILE_REGIONAL": "0",
        "FLUX_COMPILE_PRECOMPILE": "0",
        "FLUX_PRECISION": "fp8",
    }
    assert Settings.from_sources(environ=config_env("sdpa")).optimizations.attention_backend is None


def test_overrides_by_an_unknown_name_or_a_bad_value_are_refused() -> None:
    with pytest.raises(SettingsError, match="unknown setting 'compile_regionl'"):
        env_for(compile_regionl=False)
    with pytest.raises(SettingsError, match="compile_mode"):
        env_for(compile_mode="fastest")


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
    ratios = Settings.from_sources(environ=environ).sizes.aspect_ratios
    assert list(ratios.items()) == [
        ("3:2", Resolution(1216, 832)),
        ("1:1", Resolution(1024, 1024)),
        ("2:3", Resolution(832, 1216)),
    ]
    assert list(Settings.from_sources(environ={}).sizes.aspect_ratios)[:3] == ["21:9", "16:9", "3:2"]
