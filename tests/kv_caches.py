"""Random mlx-lm KV caches for the prompt cache's tests (tests/test_hostile_cache_*.py)."""
from __future__ import annotations


def random_kv(tokens: int, layers: int = 2, seed: int = 0) -> list:
    """`layers` KVCaches holding `tokens` random keys and values (2 heads of 64), seeded."""
    import mlx.core as mx
    from mlx_lm.models.cache import KVCache

    mx.random.seed(seed)
    cache = []
    for _ in range(layers):
        c = KVCache()
        c.update_and_fetch(mx.random.normal((1, 2, tokens, 64)), mx.random.normal((1, 2, tokens, 64)))
        cache.append(c)
    return cache
