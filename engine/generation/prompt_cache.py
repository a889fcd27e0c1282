"""Prompt cache: keep the KV caches of recent generations and reuse the longest common prefix,
so the next turn of a chat only processes its new tokens.

A prompt that continues an entry takes it over (the generation extends it and puts it back).
So does the next turn of the same conversation, which holds the entry's whole prompt but not the
answer the model generated (the client sends its own copy of the answer, a tool call in its own
words, or a tool result instead): that tail is cut off, and nothing else would have used it.
A prompt that shares only part of an entry (another conversation with the same system prompt and
tools; a request arriving while another holds the same prefix) gets new caches over the shared
positions instead: MLX arrays are values, so the slices share memory until written, and the entry
stays for its own conversation's next turn. Bounded by entry count and bytes, least recently used
out first.

With `kv_bits` (`--kv-bits 8|4`), entries are quantized (mlx-lm's `QuantizedKVCache`) rather than
dropped when the bytes run out, least recently used first: float32 keys and values take 3.6x
(8 bits) or 6.4x (4 bits) less, so several times the histories stay. Recent entries stay exact
longest (the newest is quantized only once every other entry is) and cost nothing to reuse; a
quantized one is dequantized when taken (a plain `KVCache` again, so every stream kind runs as
without it) and carries a little drift on what it reused (bench/kv_bits.py).
The disk copy (`--prompt-cache-dir`) stays exact.

Hybrid and recurrent models (Qwen3.5/3.6, Qwen3-Next, Kimi Linear, Nemotron-H, granite-hybrid:
`ArraysCache` layers beside attention layers) and caches past their sliding window can't be cut
back: a recurrent state holds the whole history folded into one array. Such an entry is a
snapshot, resumable at exactly the tokens it holds: it serves a prompt it is a prefix of (with at
least one token left to read), is copied rather than taken (its arrays are shared until written),
and a longer snapshot never makes it redundant. A generation keeps three: where the history ends
and the generation prompt begins (the next turn resumes there when its template re-renders the
answer its own way, as Qwen3.5's drops the `<think>` its generation prompt opened), at the
prompt's last token (the same request again, a regenerated answer, an agent's next step whose
template keeps the turn as it was) and at the end of the answer (the next turn that sends the
answer back token for token). Each holds its own copy of the attention layers' keys and values.

Entries belong to a scope (engine/request.py `CacheScope.key`: the API key that made them, and the
request's `cache_salt`): a prompt reuses, waits for and replaces only its own scope's entries, in
memory and on disk, because `cached_tokens` tells a client how long a prefix it shares with an
entry. Memory and the byte bound are shared by all scopes.
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
    prompt_len: int  # how many of `tokens` were the prompt (the rest the model generated)
    offered: bool = False  # a prompt still being read (share): every taker gets a copy, none takes it over
    scope: str = ""  # CacheScope.key of the requests that made it: only they reuse it


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _offset(cache: list[Any]) -> int:
    """The tokens `cache` holds: the first layer that counts them (a recurrent layer doesn't)."""
    for c in cache:
        if hasattr(c, "offset"):
            return int(c.offset)
        if hasattr(c, "caches"):  # mlx-lm's CacheList (a recurrent and an attention cache in one layer)
            held = _offset(list(c.caches))
            if held:
                return held
    return 0


def _nbytes(cache: list[Any]) -> int:
    return sum(int(getattr(c, "nbytes", 0) or 0) for c in cache)


@dataclass(frozen=True)
class Hit:
    """What `PromptCache.take_hit` found: a cache holding `length` prompt tokens (None: nothing),
    and the disk file it was read from when it came from disk (a generation that fails on it
    drops it: `discard`)."""

    cache: Optional[list[Any]]
    length: int
    disk: Optional[str] = None


@dataclass(frozen=True)
class CacheSettings:
    """What a server's prompt cache may hold: --prompt-cache-bytes, --kv-bits, --kv-group-size."""

    max_bytes: int = 512 << 20
    kv_bits: Optional[int] = None
    kv_group_size: int = 64

    def apply(self, cache: "PromptCache") -> None:
        cache.max_bytes, cache.kv_bits, cache.kv_group_size = self.max_bytes, self.kv_bits, self.kv_group_size


class PromptCache:
    """An LRU of KV caches keyed by the token sequence each holds."""

    def __init__(self, max_entries: int = 16, max_bytes: int = CacheSettings.max_bytes, min_reuse: int = 8) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.min_reuse = min_reuse
        self._entries: "OrderedDict[int, _Entry]" = OrderedDict()
        self._next = 0
        self.hits = 0
        self.misses = 0
        self.disk: Any = None  # a PromptStore (engine/generation/prompt_store.py) with --prompt-cache-dir
        self.kv_bits: Optional[int] = None  # entries held quantized to this many bits (--kv-bits)
        self.kv_group_size = CacheSettings.kv_group_size
        # Set on a model split over ranks: an entry counts as its tokens times the whole model's
        # KV bytes per token (at `token_itemsize` bytes a value), not the bytes of this rank's
        # shard. Every rank must make the same keep/quantize/evict decisions (they repeat rank 0's
        # steps one for one), and a pipeline shard's share of the bytes differs from rank to rank.
        self.token_bytes: Optional[int] = None
        self.token_itemsize = 4

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self._entries.values())

    def take(self, prompt: list[int], scope: str = "") -> tuple[Optional[list[Any]], int]:
        """A cache holding the longest prefix `prompt` shares with an entry of `scope`, and the
        number of prompt tokens it covers; (None, 0) when nothing is worth it. An entry the prompt
        continues is handed over; one it shares only part of stays, and a copy of the part is
        returned."""
        hit = self.take_hit(prompt, scope)
        return hit.cache, hit.length

    def take_hit(self, prompt: list[int], scope: str = "") -> Hit:
        """`take`, saying whether the cache was read from disk."""
        cache, length, disk = self._take(prompt, scope)
        return Hit(cache, length, disk if cache is not None else None)

    def _take(self, prompt: list[int], scope: str) -> tuple[Optional[list[Any]], int, Optional[str]]:
        from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

        best_key, best_len, disk = None, 0, None
        for key, entry in self._entries.items():
            n = _usable(entry.tokens, entry.cache, prompt) if entry.scope == scope else 0
            if n > best_len:
                best_key, best_len = key, n
        if self.disk is not None:  # a longer prefix on disk (kept from before a restart) is read in
            name, on_disk = self.disk.best(prompt, scope)
            loaded = self.disk.load(name) if name is not None and on_disk >= best_len + self.min_reuse else None
            if loaded is not None:
                key = self._add(_Entry(loaded[0], loaded[1], self._cost(loaded[1]), len(loaded[0]), scope=scope))
                if key in self._entries:  # (not if it alone is over the byte bound)
                    best_key, best_len, disk = key, _usable(loaded[0], loaded[1], prompt), name
        best_len = min(best_len, len(prompt) - 1)  # at least one token must be processed
        if best_key is None or best_len < self.min_reuse:
            self.misses += 1
            return None, 0, None
        entry = self._entries[best_key]
        if not can_trim_prompt_cache(entry.cache):  # a snapshot: copied, it stays for the next taker
            copied = snapshot(entry.cache)
            if copied is None:
                self.misses += 1
                return None, 0, None
            self._entries.move_to_end(best_key)
            self.hits += 1
            return copied, best_len, disk
        excess = len(entry.tokens) - best_len
        # The conversation's next turn (it holds the entry's whole prompt) takes the entry over.
        continues = not entry.offered and best_len >= entry.prompt_len and can_trim_prompt_cache(entry.cache)
        if (excess or entry.offered) and not continues:
            shared = _prefix_copy(entry.cache, best_len)
            if shared is not None:
                self._entries.move_to_end(best_key)
                self.hits += 1
                return shared, best_len, disk
            if entry.offered:
                self.misses += 1
                return None, 0, None
        if excess and not can_trim_prompt_cache(entry.cache):
            self.misses += 1
            return None, 0, None
        del self._entries[best_key]
        if excess:
            trim_prompt_cache(entry.cache, excess)
        self.hits += 1
        if quantized_kv(entry.cache):  # handed out plain: every stream kind runs on a plain cache
            return _prefix_copy(entry.cache, best_len), best_len, disk
        return entry.cache, best_len, disk

    def discard(self, prompt: list[int], hit: Hit, scope: str = "") -> None:
        """A generation failed on what `hit` read from disk: that file goes, and so does every
        entry of `scope` made from it (holding its prefix of `prompt`), so nothing of it is reused
        or written again."""
        for key in [k for k, e in self._entries.items()
                    if e.scope == scope and common_prefix(e.tokens, prompt) >= hit.length]:
            del self._entries[key]
        if self.disk is not None and hit.disk is not None:
            self.disk.drop(hit.disk)

    def put(self, tokens: list[int], cache: list[Any], prompt_len: Optional[int] = None, scope: str = "") -> None:
        """Keep `cache`, which holds the first `offset` of `tokens`, for `scope`; the first
        `prompt_len` of them were the prompt (all of them when not given), the rest the model's
        answer."""
        held = _offset(cache)
        if held <= 0 or held > len(tokens):
            return
        cache = _compact(cache)
        entry = _Entry(tokens[:held], cache, self._cost(cache), min(held, prompt_len if prompt_len is not None else held),
                       scope=scope)
        if self.disk is not None:
            self.disk.save(entry.tokens, cache, scope)
        self._keep(entry)

    def share(self, tokens: list[int], cache: list[Any], scope: str = "") -> None:
        """Offer a prompt being prefilled to requests of `scope` that share its prefix: an entry
        over the first len(tokens) positions of `cache`, sharing its arrays (MLX copies on the
        next write), in memory only. The request's own entry replaces it when it ends."""
        shared = _prefix_copy(cache, len(tokens))
        if shared is None and not _trimmable(cache) and _offset(cache) == len(tokens):
            shared = snapshot(cache)  # a snapshot of exactly these tokens
        if shared is not None:
            self._keep(_Entry(list(tokens), shared, self._cost(shared), len(tokens), offered=True, scope=scope))

    def peek(self, prompt: list[int], scope: str = "") -> int:
        """The longest prefix of `prompt` an entry of `scope` in memory holds (nothing is taken)."""
        return max((_usable(e.tokens, e.cache, prompt) for e in list(self._entries.values()) if e.scope == scope),
                   default=0)

    def _keep(self, entry: _Entry) -> None:
        if not self._fits(entry):
            return
        # A cache of the same scope whose tokens are a prefix of the new one's is now redundant, if
        # the new one can be cut back to it (a snapshot can't: earlier snapshots stay, but for the
        # same tokens again or a prompt's passes offered while it was read).
        trimmable = _trimmable(entry.cache)
        for key in [k for k, e in self._entries.items()
                    if e.scope == entry.scope and common_prefix(e.tokens, entry.tokens) == len(e.tokens)
                    and (trimmable or e.offered or len(e.tokens) == len(entry.tokens))]:
            del self._entries[key]
        self._add(entry)

    def _cost(self, cache: list[Any]) -> int:
        """The bytes `cache` counts against max_bytes: its arrays', or with `token_bytes` its tokens
        times the whole model's bytes per token (quantized: packed values plus a scale and a bias
        per group, in the cache's dtype, as mx.quantize makes them)."""
        if self.token_bytes is None:
            return _nbytes(cache)
        tokens = _offset(cache)
        if quantized_kv(cache):
            bits, group, size = cache[0].bits, cache[0].group_size, self.token_itemsize
            return tokens * self.token_bytes * (bits * group + 16 * size) // (8 * size * group)
        return tokens * self.token_bytes

    def _fits(self, entry: _Entry) -> bool:
        """Whether `entry` alone is within the byte bound (quantized first if that makes it so)."""
        if entry.nbytes > self.max_bytes and not entry.offered:
            self._quantize(entry)
        return entry.nbytes <= self.max_bytes

    def _add(self, entry: _Entry) -> int:
        """Keep `entry`, making room for it; returns its key (not in the cache if it can't fit)."""
        if not self._fits(entry):
            self._next += 1
            return self._next - 1
        # Room is made before the entry counts, so the bytes never read over the bound (/health
        # reads them from another thread, and quantizing the others takes a while).
        # With --kv-bits the others are quantized first, least recently used first, then this one;
        # only then does anything go.
        while self._entries and self.nbytes + entry.nbytes > self.max_bytes:
            if not self._quantize_one() and (entry.offered or not self._quantize(entry)):
                self._entries.popitem(last=False)
        key = self._next
        self._entries[key] = entry
        self._next += 1
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return key

    def _quantize_one(self) -> bool:
        """Quantize the least recently used entry still held exactly; False when none can be."""
        for entry in self._entries.values():
            if not entry.offered and self._quantize(entry):
                return True
        return False

    def _quantize(self, entry: _Entry) -> bool:
        """Hold `entry` quantized to kv_bits (with --kv-bits; plain KV only)."""
        if self.kv_bits is None or not can_quantize(entry.cache, self.kv_group_size):
            return False
        import mlx.core as mx

        entry.cache = _quantized(entry.cache, self.kv_bits, self.kv_group_size)
        entry.nbytes = self._cost(entry.cache)
        mx.clear_cache()  # the exact arrays just freed go back to the system, not MLX's buffer cache
        return True

    def sizes(self) -> tuple[int, int, int, int]:
        """(entries, bytes in memory, bytes on disk, entries quantized): read from any thread
        (copies first)."""
        entries = list(self._entries.values())
        return (len(entries), sum(e.nbytes for e in entries), self.disk.nbytes if self.disk is not None else 0,
                sum(quantized_kv(e.cache) for e in entries))

    def clear(self) -> None:
        self._entries.clear()


def _trimmable(cache: list[Any]) -> bool:
    from mlx_lm.models.cache import can_trim_prompt_cache

    return can_trim_prompt_cache(cache)


def needs_snapshots(cache: list[Any]) -> bool:
    """Whether a model's cache has layers that can't always be cut back (recurrent states, sliding
    windows): its generations keep snapshots at the points a later prompt resumes from."""
    from mlx_lm.models.cache import KVCache

    return any(type(c) is not KVCache for c in cache)


def _usable(tokens: list[int], cache: list[Any], prompt: list[int]) -> int:
    """How many of `prompt`'s tokens an entry holding `tokens` can give: their common prefix for
    a cache that can be cut back; a snapshot's whole length or nothing (at least one token of the
    prompt must be left to read)."""
    if _trimmable(cache):
        return common_prefix(tokens, prompt)
    return len(tokens) if len(tokens) < len(prompt) and prompt[:len(tokens)] == tokens else 0


def snapshot(cache: list[Any]) -> Optional[list[Any]]:
    """A copy of `cache` as it is now, for a cache that can't be cut back (recurrent layers, a
    sliding window past its size): new cache objects over the same arrays (MLX arrays are values:
    writing the original replaces its arrays, never the copy's), so it costs nothing until the
    original is written. None for a cache kind it doesn't know."""
    import copy

    from mlx_lm.models.cache import ArraysCache, CacheList, KVCache, RotatingKVCache

    out: list[Any] = []
    for c in cache:
        if type(c) is KVCache:
            n = KVCache()
            if c.keys is not None:
                n.keys, n.values, n.offset = c.keys[..., :c.offset, :], c.values[..., :c.offset, :], c.offset
        elif isinstance(c, ArraysCache):
            n = copy.copy(c)
            n.cache = list(c.cache)  # the model replaces the list's items: the copy keeps its own
        elif type(c) is RotatingKVCache:
            n = copy.copy(c)
            if c.keys is not None:
                n.keys, n.values = c.keys[...], c.values[...]  # new objects: the original is written in place
        elif type(c) is CacheList:
            inner = snapshot(list(c.caches))
            if inner is None:
                return None
            n = CacheList(*inner)
        else:
            return None
        out.append(n)
    return out


def plain_kv(cache: list[Any]) -> bool:
    """Every layer a filled mlx-lm KVCache (not rotating, quantized or SSM): what can be cut,
    copied and written to disk by position."""
    from mlx_lm.models.cache import KVCache

    return bool(cache) and all(type(c) is KVCache and c.keys is not None for c in cache)


def _compact(cache: list[Any]) -> list[Any]:
    """KV caches holding their own arrays, exactly as long as what they hold. A stream's cache
    from the batch is a view into the whole batch's buffer (and a plain one has room to grow):
    kept as is, one entry would hold every stream's memory and the byte bound would count a
    fraction of it."""
    import mlx.core as mx
    from mlx_lm.models.cache import ArraysCache, KVCache

    if plain_kv(cache):
        layers = cache
    elif _trimmable(cache):
        return cache
    else:  # a snapshot: its attention layers compacted, its recurrent states copied out of the batch's
        layers = [c for c in cache if type(c) is KVCache and c.keys is not None]
        states = [c for c in cache if isinstance(c, ArraysCache)]
        for c in states:
            c.cache = [None if x is None else x + mx.zeros((), dtype=x.dtype) for x in c.cache]
            c.left_padding = c.lengths = None
        mx.eval([x for c in states for x in c.cache if x is not None])
    for c in layers:
        zero = mx.zeros((), dtype=c.keys.dtype)
        c.keys, c.values = c.keys[..., :c.offset, :] + zero, c.values[..., :c.offset, :] + zero
    mx.eval([x for c in layers for x in (c.keys, c.values)])
    return cache


def quantized_kv(cache: list[Any]) -> bool:
    """Every layer a filled mlx-lm QuantizedKVCache (keys and values as (packed, scales, biases))."""
    from mlx_lm.models.cache import QuantizedKVCache

    return bool(cache) and all(type(c) is QuantizedKVCache and c.keys is not None for c in cache)


def can_quantize(cache: list[Any], group_size: int) -> bool:
    """Plain KV whose key and value widths are whole groups (mx.quantize needs that)."""
    return plain_kv(cache) and all(c.keys.shape[-1] % group_size == 0 and c.values.shape[-1] % group_size == 0
                                   for c in cache)


def _quantized(cache: list[Any], bits: int, group_size: int) -> list[Any]:
    """The compacted plain `cache` as QuantizedKVCaches."""
    import mlx.core as mx

    out = [c.to_quantized(group_size=group_size, bits=bits) for c in cache]
    mx.eval([x for c in out for part in (c.keys, c.values) for x in part])
    return out


def _prefix_copy(cache: list[Any], length: int) -> Optional[list[Any]]:
    """New plain KV caches over the first `length` positions of `cache`: sharing its arrays until
    they are written, or dequantized from a quantized entry; None for cache kinds that can't be cut
    this way (rotating, SSM)."""
    import mlx.core as mx
    from mlx_lm.models.cache import KVCache

    quantized = quantized_kv(cache)
    if not (plain_kv(cache) or quantized) or any(c.offset < length for c in cache):
        return None
    copies = []
    for c in cache:
        n = KVCache()
        if quantized:
            n.keys, n.values = (mx.dequantize(*(x[..., :length, :] for x in part), group_size=c.group_size,
                                              bits=c.bits) for part in (c.keys, c.values))
        else:
            n.keys, n.values = c.keys[..., :length, :], c.values[..., :length, :]
        n.offset = length
        copies.append(n)
    return copies
