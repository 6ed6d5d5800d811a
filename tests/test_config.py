"""config.yaml: valid for truss, the single source of pins and served sizes, and buildable offline."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import yaml
from truss.base.truss_config import HealthChecks, TrussConfig

from model.precision import CARDS, SMALL_CARD_MEGAPIXELS
from model.schema import GenerateRequest
from model.settings import CONFIG_PATH, Settings
from tests.truss_server import ROOT, build_app

REQUIRED_PINS = {"torch", "diffusers", "transformers", "accelerate", "sentencepiece", "pillow", "b10-transfer"}


def _config() -> dict:
    return yaml.safe_load(CONFIG_PATH.read_text())


def _pins(requirements: list[str]) -> dict[str, str]:
    pins = {}
    for line in requirements:
        name, _, version = re.split(r"(==|>=)", line)
        pins[name.strip().lower()] = version.strip()
    return pins


def test_truss_validates_the_config() -> None:
    TrussConfig.from_yaml(CONFIG_PATH).validate_forbid_extra()


def test_config_carries_what_baseten_needs() -> None:
    config = _config()
    meta = config["model_metadata"]
    assert meta["repo_id"] == "black-forest-labs/FLUX.1-schnell"
    assert {"1024x1024", "1216x832", "896x1152"} <= set(meta["resolutions"])
    assert meta["example_model_input"]["prompt"]
    assert config["secrets"] == {"hf_access_token": None}
    assert config["resources"]["accelerator"]
    assert config["runtime"]["predict_concurrency"] >= 1
    mount = config["weights"][0]
    assert mount["source"].startswith("hf://black-forest-labs/FLUX.1-schnell")
    assert mount["mount_location"] == meta["weights_path"]


def test_requirements_are_pinned_exactly() -> None:
    requirements = _config()["requirements"]
    assert all("==" in line for line in requirements)
    assert set(_pins(requirements)) >= REQUIRED_PINS


def test_project_dependencies_match_the_deployed_pins() -> None:
    deployed = _pins(_config()["requirements"])
    project = _pins(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"])
    # For torch the deployed pin is the project's lower bound: development takes a newer CPU build.
    assert deployed == {name: project[name] for name in deployed}


def test_example_input_is_a_valid_request() -> None:
    settings = Settings.from_sources(environ={})
    request = GenerateRequest.model_validate(_config()["model_metadata"]["example_model_input"])
    assert any((r.width, r.height) == (request.width, request.height) for r in settings.resolutions)


def test_environment_overrides_metadata() -> None:
    settings = Settings.from_sources(environ={"FLUX_RESOLUTIONS": "512x512, 768x1024", "FLUX_TEXT_LENGTHS": "128"})
    assert [str(r) for r in settings.resolutions] == ["512x512", "768x1024"]
    assert settings.text_lengths == (128,)


def test_readme_table_lists_the_served_sizes() -> None:
    table = Settings.from_sources(environ={}).resolutions.markdown_table()
    assert table in (ROOT / "README.md").read_text()


def test_readme_states_the_size_rule_and_lists_the_aspect_ratios() -> None:
    sizes = Settings.from_sources(environ={}).resolved(CARDS["H200"]).sizes
    readme = (ROOT / "README.md").read_text()
    assert sizes.aspect_ratios.markdown_table() in readme, (
        "regenerate with settings.sizes.aspect_ratios.markdown_table()"
    )
    assert f"    {sizes.bounds}\n" in readme
    assert f"at most {SMALL_CARD_MEGAPIXELS:g} megapixels on 24 GB cards" in readme


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Truss's generated build context, laid out as the image's /app; generated once for the tests below."""
    directory = tmp_path_factory.mktemp("build")
    build_app(directory)
    return directory


def test_build_context_generates_offline(build_dir: Path) -> None:
    app = build_dir / "app"
    assert (app / "main.py").is_file()
    assert (app / "model" / "model.py").is_file()
    assert yaml.safe_load((app / "config.yaml").read_text())["model_metadata"] == _config()["model_metadata"]


def test_the_image_carries_bytecode_for_its_packages(build_dir: Path) -> None:
    dockerfile = (build_dir / "context" / "Dockerfile").read_text()
    install = dockerfile.index("requirements.txt")
    compile_bytecode = dockerfile.index("compileall")
    assert install < compile_bytecode, "bytecode is compiled after the packages are installed"


def _health_checks() -> HealthChecks:
    return TrussConfig.from_yaml(CONFIG_PATH).runtime.health_checks


def test_truss_parses_the_health_checks_within_baseten_bounds() -> None:
    checks = _health_checks()
    assert checks.startup_threshold_seconds is not None and 10 <= checks.startup_threshold_seconds <= 3000
    assert checks.stop_traffic_threshold_seconds is not None and 30 <= checks.stop_traffic_threshold_seconds <= 1800
    assert checks.restart_threshold_seconds is not None and 30 <= checks.restart_threshold_seconds <= 1800
    assert checks.restart_check_delay_seconds is not None and checks.restart_check_delay_seconds >= 0
    assert checks.restart_check_delay_seconds + checks.restart_threshold_seconds <= 1800
    assert checks.stop_traffic_threshold_seconds < checks.restart_threshold_seconds, "traffic stops before a restart"
