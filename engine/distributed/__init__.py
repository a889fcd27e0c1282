"""Serving one model across several processes (and hosts) with MLX's distributed runtime.

World size 1 is the ordinary engine. With N ranks, every rank holds a shard of the model
(mlx-lm's tensor parallel `Model.shard` or pipeline `model.pipeline`); rank 0 serves HTTP and
decides everything that changes which collectives run — which stream starts (with its prompt,
limits and an explicit seed), which stream takes its next step, which ends (finished, stopped,
cancelled) and shutdown — and broadcasts each decision before acting on it. The other ranks
(`follow`) repeat exactly those steps on their shard, so the collectives inside the forward
passes always pair up. Decisions travel as pickled commands through two `all_sum`s (length,
then bytes), rank 0 contributing the data and the others zeros, as mlx_lm.server does.

A collective with a dead peer raises at once ("[ring] connection to a peer was lost"): rank 0
then marks the group failed (503 for new requests, an error event for running streams) and the
supervisor (engine/distributed/supervisor.py) restarts every rank: a group can't be rebuilt in-process.
"""
from __future__ import annotations

import logging
import pickle
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import mlx.core as mx
import numpy as np

from engine.errors import EngineError, InvalidRequest, Unsupported
from engine.generation.prompt_cache import CacheSettings

log = logging.getLogger("openmlx.engine")
SHARD_MODES = ("auto", "tensor", "pipeline")


class GroupFailed(EngineError):
    """A rank of the distributed group died: the server answers 503 until it is restarted."""

    status = 503
    type = "server_error"
    code = "rank_failed"

    def __init__(self, reason: str) -> None:
        super().__init__(f"A rank of the distributed model failed ({reason}); the server is restarting all ranks. "
                         "Retry shortly.", headers={"Retry-After": "15"})


@dataclass(frozen=True)
class ShardPlan:
    mode: str  # "tensor" | "pipeline"
    world_size: int


def plan_shards(folder: Path, world_size: int, requested: str = "auto") -> ShardPlan:
    """How `folder`'s model splits over `world_size` ranks, checked before anything starts:
    tensor parallel needs `Model.shard` and heads / kv heads divisible by the world size;
    pipeline needs `model.pipeline`, the weight index file and a layer per rank. Raises
    Unsupported naming the reason (e.g. SmolLM2-135M: 9 heads can't split over 2 ranks)."""
    from mlx_lm.utils import load_model

    if requested not in SHARD_MODES:
        raise Unsupported(f"--shard must be one of {', '.join(SHARD_MODES)}.")
    from engine.models.probe import probe

    config = probe(folder).config
    model, _ = load_model(folder, lazy=True, strict=False)  # structure only: no weights are read
    heads = int(config.get("num_attention_heads", 0))
    kv_heads = int(config.get("num_key_value_heads", heads) or heads)
    layers = int(config.get("num_hidden_layers", 0))
    problems: dict[str, str] = {}
    if not hasattr(model, "shard"):
        problems["tensor"] = f"architecture '{config.get('model_type')}' has no tensor-parallel sharding in mlx-lm"
    elif heads % world_size or kv_heads % world_size:
        problems["tensor"] = (f"its {heads} attention heads and {kv_heads} key/value heads don't divide by "
                              f"{world_size} ranks")
    if not (hasattr(model, "model") and hasattr(model.model, "pipeline")):
        problems["pipeline"] = f"architecture '{config.get('model_type')}' has no pipeline sharding in mlx-lm"
    elif not (folder / "model.safetensors.index.json").is_file():
        problems["pipeline"] = "pipeline sharding needs model.safetensors.index.json"
    elif layers < world_size:
        problems["pipeline"] = f"its {layers} layers can't give each of {world_size} ranks one"
    modes = ["tensor", "pipeline"] if requested == "auto" else [requested]
    for mode in modes:
        if mode not in problems:
            return ShardPlan(mode, world_size)
    reasons = "; ".join(f"{m}: {problems[m]}" for m in modes)
    raise Unsupported(f"The model in {folder} can't be split over {world_size} ranks ({reasons}).", param="model")


def init_group(backend: str = "ring") -> Any:
    """This process's group, from the environment `mlx.launch` (or the supervisor) set."""
    return mx.distributed.init(strict=True, backend=backend)


def sharded_load(folder: Path, plan: ShardPlan, group: Any) -> tuple[Any, Any]:
    """Load this rank's shard through mlx-lm (ends with a collective: all ranks must call it)."""
    from mlx_lm.utils import sharded_load as lm_sharded_load

    if plan.mode == "tensor":
        return lm_sharded_load(str(folder), tensor_group=group)
    return lm_sharded_load(str(folder), pipeline_group=group)


class Lockstep:
    """Rank 0's decisions, broadcast to every rank in order."""

    def __init__(self, group: Any) -> None:
        self.group = group
        self.rank = group.rank()
        self.size = group.size()
        self.failed: Optional[str] = None

    def _all_sum(self, values: np.ndarray) -> np.ndarray:
        # On mlx-lm's generation stream: the model's own collectives run there, often still in
        # flight (the next token is computed ahead); on one stream, every rank executes its
        # collectives in the order it issued them, so they pair up.
        from mlx_lm.generate import generation_stream

        out = mx.distributed.all_sum(mx.array(values), group=self.group, stream=generation_stream)
        mx.eval(out)
        return np.array(out)

    def _exchange(self, payload: Optional[bytes]) -> bytes:
        if self.failed:
            raise GroupFailed(self.failed)
        try:
            n = int(self._all_sum(np.array([len(payload) if payload is not None else 0], dtype=np.int32))[0])
            data = np.zeros(n, dtype=np.int32)
            if payload is not None:
                data[:] = np.frombuffer(payload, dtype=np.uint8)
            return self._all_sum(data).astype(np.uint8).tobytes()
        except RuntimeError as e:  # a peer is gone
            self.fail(str(e))
            raise GroupFailed(self.failed or str(e)) from e

    def fail(self, reason: str) -> None:
        if not self.failed:
            log.error("distributed group failed: %s", reason)
            self.failed = reason

    def command(self, *cmd: Any) -> None:
        """Rank 0: tell every rank what happens next (then do it)."""
        self._exchange(pickle.dumps(cmd))

    def receive(self) -> tuple:
        """Other ranks: the next decision."""
        return pickle.loads(self._exchange(None))


def peer_lost(error: Exception) -> bool:
    """A collective failed because another rank is gone (the ring backend says so)."""
    return "[ring]" in str(error) or "peer" in str(error)


def with_seed(params: Any) -> Any:
    """Sampling must agree on every rank: an unseeded request gets a seed rank 0 chose."""
    return params if params.seed is not None else replace(params, seed=random.getrandbits(63))


def lockstep_stream(lock: Lockstep, uid: int, start: tuple, make: Callable[[], Iterator[Any]],
                    cancelled: Callable[[], bool]) -> Iterator[Any]:
    """Rank 0's side of one stream: announce it, then each step before taking it, then its end.
    A client that leaves is noticed here, between steps, never inside one: inside, rank 0 would
    stop a step short of the others."""
    lock.command("start", uid, *start)
    gen = make()
    try:
        while not cancelled():
            lock.command("step", uid)
            try:
                event = next(gen)
            except StopIteration:
                return
            except RuntimeError as e:
                if peer_lost(e):
                    lock.fail(str(e))
                    raise GroupFailed(str(e)) from e
                raise
            yield event
    finally:
        gen.close()
        if not lock.failed:
            try:
                lock.command("end", uid)
            except GroupFailed:
                pass


def follow(lock: Lockstep, runner: Any) -> int:
    """A rank other than 0: repeat rank 0's steps until it says stop. Returns an exit status."""
    streams: dict[int, Iterator[Any]] = {}
    log.info("rank %d of %d following", lock.rank, lock.size)
    while True:
        try:
            cmd = lock.receive()
        except GroupFailed:
            return 3
        kind = cmd[0]
        if kind == "start":
            _, uid, prompt, max_tokens, params, raw_text, held, scope = cmd
            mine = runner.prompt_cache.peek(prompt, scope)
            if mine != held:
                # This rank would start from a different cached prefix than rank 0, read a
                # different number of prompt tokens, and the ranks' passes would no longer match
                # (a hang in a collective). Stop instead: the supervisor restarts every rank, and
                # the caches start empty and alike.
                log.error("rank %d's prompt cache holds %d tokens of a new prompt where rank 0's holds %d: "
                          "the ranks have diverged; stopping so that the group restarts", lock.rank, mine, held)
                return 3
            streams[uid] = runner.generate(prompt, max_tokens, params, lambda: False, keep_leading_space=raw_text,
                                           scope=scope)
        elif kind == "step":
            gen = streams.get(cmd[1])
            if gen is not None:
                try:
                    next(gen)
                except StopIteration:
                    streams.pop(cmd[1], None)
                except GroupFailed:
                    return 3
                except RuntimeError as e:
                    if peer_lost(e):
                        return 3
                    log.exception("step failed on rank %d", lock.rank)  # rank 0 fails the same way
                    streams.pop(cmd[1], None)
        elif kind == "end":
            gen = streams.pop(cmd[1], None)
            if gen is not None:
                gen.close()
        elif kind == "shutdown":
            for gen in streams.values():
                gen.close()
            return 0


def sharded_runner(model_id: str, probe: Any, plan: ShardPlan, group: Any, gate: Any, cache: CacheSettings) -> Any:
    """This rank's shard as a TextRunner (weights as shipped; the memory gate counts a share).
    `cache`: the prompt cache's CacheSettings, the same on every rank."""
    from engine.models.memory import MemoryEstimate
    from engine.generation.text import TextRunner
    from engine.models.weights import KV_HEADROOM_TOKENS, kv_bytes_per_token

    config = probe.config
    need = MemoryEstimate(probe.size_bytes // plan.world_size,
                          KV_HEADROOM_TOKENS * kv_bytes_per_token(config) // plan.world_size)
    warnings = tuple(gate.check(model_id, need))
    model, tokenizer = sharded_load(probe.path, plan, group)
    context = probe.context_length or int(getattr(tokenizer, "model_max_length", 0) or 4096)
    runner = TextRunner(model_id, model, tokenizer, config, probe, "keep", context, need, warnings)
    # Ranks repeat rank 0's steps one for one: a wait for another stream's prefill, bounded by
    # each rank's own clock, could take a different number of steps on each.
    runner.in_flight.max_wait_s = 0.0
    cache.apply(runner.prompt_cache)
    # Entries count the whole model's bytes per token on every rank, so that all ranks keep,
    # quantize and drop the same entries (a pipeline shard holds an uneven share of each).
    itemsize = {"float16": 2, "bfloat16": 2}.get(str(config.get("torch_dtype") or config.get("dtype") or ""), 4)
    runner.prompt_cache.token_bytes = kv_bytes_per_token(config, itemsize)
    runner.prompt_cache.token_itemsize = itemsize
    return runner


@dataclass
class Rank:
    """This process's place in a group: its shard of the model and the lockstep channel."""

    runner: Any
    plan: ShardPlan
    lockstep: "Lockstep"


def join_group(model_id: str, folder: Path, world_size: int, shard: str, backend: str, gate: Any,
               cache: CacheSettings) -> Rank:
    """Every rank, 0 included: check the model can run and split, join the group, load this
    rank's shard (a collective: all ranks call it). `cache`: the prompt cache's CacheSettings."""
    from engine.models.policy import decide_runnable
    from engine.models.probe import probe

    p = probe(folder)
    decide_runnable(model_id, p).raise_if_blocked()
    plan = plan_shards(folder, world_size, shard)
    group = init_group(backend)
    return Rank(sharded_runner(model_id, p, plan, group, gate, cache), plan, Lockstep(group))


class LockstepRunner:
    """Rank 0's runner: its shard's runner, with every stream announced to the other ranks and
    each step taken only after they were told (engine/runners.py's interface)."""

    def __init__(self, runner: Any, lock: "Lockstep") -> None:
        self.runner = runner
        self.lock = lock
        self._ids = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.runner, name)

    def plan(self, *args: Any, **kwargs: Any) -> Any:
        return replace(self.runner.plan(*args, **kwargs), runner=self)

    def plan_completion(self, *args: Any, **kwargs: Any) -> Any:
        return replace(self.runner.plan_completion(*args, **kwargs), runner=self)

    def share_prefill(self, prepared: Any, score_top: Optional[int] = None) -> Iterator[Any]:
        """Each rank prefills as it runs the stream: nothing is shared across ranks here."""
        if score_top is not None:
            raise InvalidRequest("Prompt log probabilities (echo with logprobs) are not supported for a model "
                                 "split over ranks.", param="echo")
        return prepared
        yield  # a generator, as every runner's share_prefill (engine/runners.py)

    def run(self, prepared: Any, cancelled: Callable[[], bool]) -> Iterator[Any]:
        if prepared.max_tokens == 0:  # score only: no step for the other ranks to repeat
            yield from self.runner.run(prepared, cancelled)
            return
        params = with_seed(prepared.params)  # sampling must agree on every rank
        self._ids += 1
        # What rank 0's prompt cache holds of the prompt: each rank checks its own holds the same.
        scope = prepared.cache.key  # each rank keeps the same entries, in the same scopes
        held = self.runner.prompt_cache.peek(prepared.prompt, scope)
        start = (prepared.prompt, prepared.max_tokens, params, prepared.raw_text, held, scope)
        yield from lockstep_stream(self.lock, self._ids, start, lambda: self.runner.generate(
            prepared.prompt, prepared.max_tokens, params, lambda: False, keep_leading_space=prepared.raw_text,
            scope=scope), cancelled)
