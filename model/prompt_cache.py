"""A bounded LRU cache of prompt embeddings: a repeated prompt skips both text encoders.

FLUX.1-schnell's text encoders run once per request, and their time does not shrink with the four denoising steps:
on a quantized card T5 took longer than a denoising step (BENCHMARKS.md). The embeddings of a prompt are the same
for every seed and size, so they are kept, on the GPU where the transformer reads them, up to a byte budget.
The key holds the prompts themselves, not a hash, so a lookup can never return another prompt's embeddings.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import NamedTuple

import torch


class PromptKey(NamedTuple):
    prompt: str
    prompt2: str | None
    text_length: int  # the padded T5 length: the embeddings' shape
    max_tokens: int  # where the prompt was cut


Embeddings = tuple[torch.Tensor, torch.Tensor]


def _nbytes(embeddings: Embeddings) -> int:
    return sum(t.numel() * t.element_size() for t in embeddings)


class PromptEmbeddingCache:
    """Least recently used embeddings, within `budget_bytes`; safe to share between threads."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[PromptKey, Embeddings] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def bytes_used(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: PromptKey) -> Embeddings | None:
        with self._lock:
            found = self._entries.get(key)
            if found is not None:
                self._entries.move_to_end(key)
            return found

    def put(self, key: PromptKey, embeddings: Embeddings) -> None:
        size = _nbytes(embeddings)
        if size > self.budget_bytes:
            return  # also how a budget of 0 turns the cache off
        with self._lock:
            if key in self._entries:
                self._bytes -= _nbytes(self._entries.pop(key))
            self._entries[key] = embeddings
            self._bytes += size
            while self._bytes > self.budget_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= _nbytes(evicted)
