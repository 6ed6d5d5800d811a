"""The Truss adapter: config and secrets in __init__, 400s from predict."""

from __future__ import annotations

import logging

import pytest
from fastapi import HTTPException

from bench import NO_BODY
from model.model import Model
from model.schema import GenerateRequest
from model.settings import config_metadata
from tests.conftest import TINY_EAGER

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


def test_token_is_read_and_never_logged(tiny_env: None, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG):
        model = _model({"hf_access_token": FAKE_TOKEN})
        model.load()
        model.predict(GenerateRequest(prompt="x", seed=1, width=1216, height=832), NO_BODY)
    assert model._hf_token == FAKE_TOKEN
    assert FAKE_TOKEN not in caplog.text


def test_unserved_size_is_a_400(tiny_env: None) -> None:
    model = _model(None)
    model.load()
    with pytest.raises(HTTPException) as info:
        model.predict(GenerateRequest(prompt="x", width=512, height=512), NO_BODY)
    assert info.value.status_code == 400
    assert "width/height" in info.value.detail
