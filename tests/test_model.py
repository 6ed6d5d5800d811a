"""The Truss adapter: config and secrets in __init__, 400s from predict."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from diffusers import FluxPipeline
from fastapi import HTTPException

from model.model import Model
from model.random_flux import build_random_pipeline
from model.schema import GenerateRequest
from model.settings import config_metadata
from tests.conftest import TINY_EAGER, LogRecorder
from tests.harness import NO_BODY

FAKE_TOKEN = "hf_FAKE_token_that_must_never_be_logged_1234"


class SecretNotFound(Exception):
    """Stands in for truss's own, raised on any access to an unset secret."""


class UnsetSecrets:
    def __getitem__(self, name: str) -> str:
        raise SecretNotFound(name)


@pytest.fixture
def tiny_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in TINY_EAGER.items():
        monkeypatch.setenv(key, value)


def _model(secrets: object) -> Model:
    return Model(config={"model_metadata": config_metadata()}, secrets=secrets)


@pytest.mark.parametrize("secrets", [None, {}, {"hf_access_token": None}, {"hf_access_token": ""}, UnsetSecrets()])
def test_missing_token_is_fine_for_a_public_repo(secrets: object) -> None:
    assert _model(secrets)._hf_token is None


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A diffusers folder, so that load() takes the from_pretrained branch that real weights take."""
    path = tmp_path_factory.mktemp("weights") / "flux-tiny"
    build_random_pipeline("tiny").save_pretrained(path)
    return path


def test_token_reaches_from_pretrained_and_no_log(
    monkeypatch: pytest.MonkeyPatch,
    saved_tiny: Path,
    all_logs: LogRecorder,
    capfd: pytest.CaptureFixture[str],
    recwarn: pytest.WarningsRecorder,
) -> None:
    monkeypatch.setenv("FLUX_MODEL_SOURCE", str(saved_tiny))
    monkeypatch.setenv("FLUX_COMPILE", "0")
    real_from_pretrained = FluxPipeline.from_pretrained
    calls: list[tuple[tuple, dict]] = []

    def spy(*args, **kwargs) -> FluxPipeline:
        calls.append((args, kwargs))
        return real_from_pretrained(*args, **kwargs)

    monkeypatch.setattr(FluxPipeline, "from_pretrained", spy)
    model = _model({"hf_access_token": FAKE_TOKEN})
    model.load()
    model.predict(GenerateRequest(prompt="x", seed=1, width=1216, height=832), NO_BODY)
    assert [(args, kwargs["token"]) for args, kwargs in calls] == [((str(saved_tiny),), FAKE_TOKEN)]
    out, err = capfd.readouterr()
    warned = "\n".join(str(warning.message) for warning in recwarn)
    logged = all_logs.text()
    assert "loading pipeline from local path" in logged, "the records of load() were captured"
    for text in (logged, out, err, warned):
        assert FAKE_TOKEN not in text
        assert base64.b64encode(FAKE_TOKEN.encode()).decode() not in text


@pytest.mark.parametrize(
    ("request_fields", "detail"),
    [
        ({"width": 1000, "height": 512}, "width: 1000 is not allowed"),
        # The deployment's own registry, not the declared default, which has 16:9.
        ({"aspect_ratio": "16:9"}, "aspect_ratio: '16:9' is not one of 3:2, 1:1 on this deployment"),
    ],
)
def test_a_size_the_deployment_refuses_is_a_400(
    tiny_env: None, monkeypatch: pytest.MonkeyPatch, request_fields: dict, detail: str
) -> None:
    monkeypatch.setenv("FLUX_ASPECT_RATIOS", "1:1=1024x1024,3:2=1216x832")
    model = _model(None)
    model.load()
    with pytest.raises(HTTPException) as info:
        model.predict(GenerateRequest(prompt="x", **request_fields), NO_BODY)
    assert info.value.status_code == 400
    assert info.value.detail.startswith(detail)
