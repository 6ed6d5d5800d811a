"""The prompt-embedding cache: bounded, least recently used first out, never another prompt's embeddings."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from model.engine import FluxEngine, Job
from model.prompt_cache import PromptEmbeddingCache, PromptKey
from model.resolutions import Resolution

MB = 2**20


def entry(megabytes: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros(megabytes * MB, dtype=torch.uint8), torch.zeros(0)


def key(prompt: str, prompt2: str | None = None, text_length: int = 256, max_tokens: int = 256) -> PromptKey:
    return PromptKey(prompt, prompt2, text_length, max_tokens)


def test_the_least_recently_used_entry_leaves_first_and_the_budget_holds() -> None:
    cache = PromptEmbeddingCache(3 * MB)
    for name in "abc":
        cache.put(key(name), entry(1))
    assert cache.get(key("a")) is not None  # a is now the most recently used
    cache.put(key("d"), entry(1))
    assert cache.get(key("b")) is None and cache.get(key("a")) is not None
    assert cache.bytes_used == 3 * MB and len(cache) == 3


def test_a_budget_of_zero_keeps_nothing() -> None:
    cache = PromptEmbeddingCache(0)
    cache.put(key("a"), entry(1))
    assert cache.get(key("a")) is None and cache.bytes_used == 0


def test_every_field_of_the_key_tells_entries_apart() -> None:
    cache = PromptEmbeddingCache(10 * MB)
    keys = [key("a"), key("a", prompt2="a"), key("a", text_length=512), key("a", max_tokens=77), key("a ")]
    for index, each in enumerate(keys):
        cache.put(each, (torch.full((1,), index), torch.zeros(0)))
    assert [int(cache.get(each)[0]) for each in keys] == list(range(len(keys)))


def test_threads_sharing_it_keep_it_consistent() -> None:
    cache = PromptEmbeddingCache(8 * MB)

    def hammer(worker: int) -> None:
        for index in range(200):
            cache.put(key(f"{worker}-{index % 13}"), entry(1))
            cache.get(key(f"{(worker + 1) % 4}-{index % 13}"))

    threads = [threading.Thread(target=hammer, args=(worker,)) for worker in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert cache.bytes_used == len(cache) * MB <= 8 * MB


def job(prompt: str, seed: int) -> Job:
    return Job(prompt, None, Resolution(512, 512), seed, 2, 256, 256)


@pytest.fixture
def counted(engine: FluxEngine, monkeypatch: pytest.MonkeyPatch) -> tuple[FluxEngine, list[str]]:
    """The tiny engine with a cache, counting the calls of its T5 encoder."""
    calls: list[str] = []
    t5 = engine.pipe.text_encoder_2
    real = t5.forward
    monkeypatch.setattr(t5, "forward", lambda *a, **k: (calls.append("t5"), real(*a, **k))[1])
    monkeypatch.setattr(engine, "prompt_cache", PromptEmbeddingCache(16 * MB))
    return engine, calls


def test_a_repeated_prompt_with_a_new_seed_skips_the_text_encoders(counted: tuple[FluxEngine, list[str]]) -> None:
    engine, calls = counted
    engine.run(job("a red bicycle", seed=1))
    engine.run(job("a red bicycle", seed=2))
    assert calls == ["t5"]


def test_cached_embeddings_give_the_same_image_and_never_another_prompts(
    counted: tuple[FluxEngine, list[str]],
) -> None:
    engine, calls = counted
    [first] = engine.run(job("a red bicycle", seed=1))
    [other] = engine.run(job("a blue boat", seed=1))
    [again] = engine.run(job("a red bicycle", seed=1))
    assert calls == ["t5", "t5"]
    assert np.array_equal(np.asarray(again), np.asarray(first))
    assert not np.array_equal(np.asarray(other), np.asarray(first))
    # The same request without the cache: the cached path changed no pixel.
    engine.prompt_cache = PromptEmbeddingCache(0)
    [fresh] = engine.run(job("a red bicycle", seed=1))
    assert np.array_equal(np.asarray(fresh), np.asarray(first))
