"""Prompt cache: keep the KV caches of recent generations and reuse the longest common prefix,
so the next turn of a chat only processes its new tokens.

Entries are taken out while a generation uses them (a KV cache is mutated in place) and put back
afterwards; bounded by entry count and bytes, least recently used out first.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Optional


@dataclass
class _Entry:
    tokens: list[int]  # exactly the tokens the cache holds
    cache: list[Any]
    nbytes: int


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _offset(cache: list[Any]) -> int:
    return int(getattr(cache[0], "offset", 0)) if cache else 0


def _nbytes(cache: list[Any]) -> int:
    return sum(int(getattr(c, "nbytes", 0) or 0) for c in cache)


class PromptCache:
    """An LRU of KV caches keyed by the token sequence each holds."""

    def __init__(self, max_entries: int = 4, max_bytes: int = 512 << 20, min_reuse: int = 8) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.min_reuse = min_reuse
        self._entries: "OrderedDict[int, _Entry]" = OrderedDict()
        self._next = 0
        self.hits = 0
        self.misses = 0

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self._entries.values())

    def take(self, prompt: list[int]) -> tuple[Optional[list[Any]], int]:
        """Remove and return the cache sharing the longest prefix with `prompt`, trimmed to that
        prefix, and the number of prompt tokens it covers; (None, 0) when nothing is worth it."""
        from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

        best_key, best_len = None, 0
        for key, entry in self._entries.items():
            n = common_prefix(entry.tokens, prompt)
            if n > best_len:
                best_key, best_len = key, n
        best_len = min(best_len, len(prompt) - 1)  # at least one token must be processed
        if best_key is None or best_len < self.min_reuse:
            self.misses += 1
            return None, 0
        entry = self._entries[best_key]
        excess = len(entry.tokens) - best_len
        if excess and not can_trim_prompt_cache(entry.cache):
            self.misses += 1
            return None, 0
        del self._entries[best_key]
        if excess:
            trim_prompt_cache(entry.cache, excess)
        self.hits += 1
        return entry.cache, best_len

    def put(self, tokens: list[int], cache: list[Any]) -> None:
        """Keep `cache`, which holds the first `offset` of `tokens`."""
        held = _offset(cache)
        if held <= 0 or held > len(tokens):
            return
        entry = _Entry(tokens[:held], cache, _nbytes(cache))
        if entry.nbytes > self.max_bytes:
            return
        # A cache whose tokens are a prefix of the new one's is now redundant.
        for key in [k for k, e in self._entries.items() if common_prefix(e.tokens, entry.tokens) == len(e.tokens)]:
            del self._entries[key]
        self._entries[self._next] = entry
        self._next += 1
        while len(self._entries) > self.max_entries or self.nbytes > self.max_bytes:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()
