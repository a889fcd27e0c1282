"""Hybrid and recurrent models in the prompt cache, and MoE models on the CPU, on tiny random-weight
models of the real architectures (tests/tiny_families.py).

A hybrid model's recurrent layers can't be cut back, so its cache entries are snapshots that
resume at exactly the tokens they hold (engine/generation/prompt_cache.py): the same prompt again
and the next turn of a conversation resume there, in memory and from disk, with the tokens a cold
run (and mlx-lm's own generation) gives.
"""
from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.process import Server
from tests.tiny_families import write_tiny

HYBRID = "tiny-qwen3-5"
MOE = {"tiny-qwen3-moe": "qwen3_moe", "tiny-gpt-oss": "gpt_oss", "tiny-glm4-moe": "glm4_moe"}
TURN1 = [{"role": "system", "content": "You are a terse assistant who answers every question in one line."},
         {"role": "user", "content": "Name three rivers of Europe and the seas they flow into."}]


@pytest.fixture(scope="module")
def models(tmp_path_factory, default_model_dir: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    folders = {HYBRID: write_tiny(root / HYBRID, "qwen3_5", default_model_dir),
               "tiny-nemotron-h": write_tiny(root / "tiny-nemotron-h", "nemotron_h", default_model_dir)}
    folders.update({name: write_tiny(root / name, kind, default_model_dir) for name, kind in MOE.items()})
    return folders


def _runner(folder: Path):
    from engine.generation.text import TextRunner
    from engine.models.memory import MemoryGate
    from engine.models.probe import probe

    return TextRunner.load(folder.name, probe(folder), "float32", MemoryGate(), batch=True)


def _run(runner, ids, max_tokens: int = 10) -> tuple[list[int], int]:
    """(the generated token ids, cached prompt tokens) of a greedy generation of `ids`, or of a
    planned request (a Prepared: its own budget)."""
    from engine.request import Finished, Prepared, SamplingParams

    prepared = ids if isinstance(ids, Prepared) else None
    prompt = prepared.prompt if prepared is not None else ids
    tokens: list[int] = []
    original = runner.prompt_cache.put

    def put(all_tokens, cache, prompt_len=None, **kwargs):  # what was generated: the tail of the final entry
        if prompt_len is not None:
            tokens[:] = all_tokens[len(prompt):]
        return original(all_tokens, cache, prompt_len, **kwargs)

    runner.prompt_cache.put = put
    try:
        events = list(runner.run(prepared, lambda: False) if prepared is not None else
                      runner.generate(ids, max_tokens, SamplingParams(temperature=0), lambda: False))
    finally:
        del runner.prompt_cache.put
    done = [e for e in events if isinstance(e, Finished)][0]
    assert done.completion_tokens == len(tokens) > 0
    return tokens, done.cached_tokens


@pytest.fixture(scope="module")
def hybrid(models):
    return _runner(models[HYBRID])


def _reference(folder: Path, ids: list[int], max_tokens: int) -> list[int]:
    """mlx-lm's own greedy tokens for `ids`, no cache of ours anywhere."""
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.generate import generate_step
    from mlx_lm.sample_utils import make_sampler

    model, _ = load(str(folder))
    steps = generate_step(mx.array(ids), model, max_tokens=max_tokens, sampler=make_sampler(0.0))
    return [int(t) for t, _ in steps]


def test_the_next_turn_resumes_from_a_snapshot_with_a_cold_runs_tokens(hybrid, models):
    from engine.request import ChatMessage

    cache = hybrid.prompt_cache
    cache.clear()
    ids1 = hybrid.encode_chat([ChatMessage(m["role"], m["content"]) for m in TURN1])
    first, cached = _run(hybrid, ids1)
    assert cached == 0
    assert first == _reference(models[HYBRID], ids1, 10)
    turn2 = TURN1 + [{"role": "assistant", "content": hybrid.tokenizer.decode(first)},
                     {"role": "user", "content": "And their lengths?"}]
    ids2 = hybrid.encode_chat([ChatMessage(m["role"], m["content"]) for m in turn2])
    warm, cached = _run(hybrid, ids2)
    assert cached >= len(ids1) - 1  # at least the first turn's prompt, read once
    cache.clear()
    cold, none = _run(hybrid, ids2)
    assert none == 0 and warm == cold == _reference(models[HYBRID], ids2, 10)


# Qwen3.5's way: the generation prompt opens `<think>`, the history renders an answer without it.
THINK_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}")


def test_a_template_that_rewrites_the_answer_resumes_where_the_history_ended(models, tmp_path):
    """The next turn can't resume at the end of the last prompt (it opened `<think>`, which the
    history drops): the snapshot where the history ended and the generation prompt began serves it."""
    import json
    import shutil

    from engine.generation.budget import BudgetPolicy
    from engine.request import ChatMessage, Conversation, SamplingParams

    folder = tmp_path / "tiny-qwen3-5-think"
    shutil.copytree(models[HYBRID], folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": THINK_TEMPLATE}))
    runner = _runner(folder)

    def plan(messages):
        conv = Conversation(folder.name, [ChatMessage(m["role"], m["content"]) for m in messages],
                            SamplingParams(temperature=0, max_tokens=6))
        return runner.plan(conv, BudgetPolicy())

    first = plan(TURN1)
    history = first.resume_at[0]
    assert runner.tokenizer.decode(first.prompt[history:]) == "<|im_start|>assistant\n<think>\n"
    _, cached = _run(runner, first)
    assert cached == 0
    second = plan(TURN1 + [{"role": "assistant", "content": "The Danube."}, {"role": "user", "content": "More?"}])
    assert second.prompt[:history] == first.prompt[:history] and second.prompt[:len(first.prompt) - 1] != first.prompt[:-1]
    warm, cached = _run(runner, second)
    assert cached == history
    runner.prompt_cache.clear()
    cold, none = _run(runner, second)
    assert none == 0 and warm == cold == _reference(folder, second.prompt, 6)


def test_the_same_prompt_again_resumes_at_its_last_token(hybrid):
    hybrid.prompt_cache.clear()
    ids = hybrid.encode_text("The quick brown fox jumps over the lazy dog and runs far away.")
    first, _ = _run(hybrid, ids)
    again, cached = _run(hybrid, ids)
    assert cached == len(ids) - 1 and again == first


def test_a_prompt_that_sends_the_answer_back_resumes_at_the_answers_end(hybrid, models):
    hybrid.prompt_cache.clear()
    ids = hybrid.encode_text("Steps of the agent, one after another, each one on its own line:")
    first, _ = _run(hybrid, ids)
    following = ids + first + hybrid.encode_text(" then the next step")
    warm, cached = _run(hybrid, following)
    assert cached >= len(ids) + len(first) - 1
    hybrid.prompt_cache.clear()
    cold, _ = _run(hybrid, following)
    assert warm == cold == _reference(models[HYBRID], following, 10)


def test_a_snapshot_is_copied_and_a_partial_match_is_no_match(hybrid):
    """A recurrent state can't be cut back: a prompt that shares only part of a snapshot reads
    everything itself, and a snapshot that was used stays for the next taker."""
    cache = hybrid.prompt_cache
    cache.clear()
    ids = hybrid.encode_text("One two three four five six seven eight nine ten eleven twelve.")
    _run(hybrid, ids)
    entries = len(cache._entries)
    assert entries == 2  # the prompt's end and the answer's end
    other = ids[:-3] + hybrid.encode_text(" thirteen fourteen fifteen")
    _, cached = _run(hybrid, other)
    assert cached == 0
    _, cached = _run(hybrid, ids)
    _, again = _run(hybrid, ids)
    assert cached == again == len(ids) - 1


def test_snapshots_on_disk_survive_a_new_cache(hybrid, tmp_path):
    from engine.generation.prompt_cache import PromptCache
    from engine.generation.prompt_files import kv_shape
    from engine.generation.prompt_store import PromptStore

    ids = hybrid.encode_text("A long enough prompt for the disk: " + "alpha beta gamma delta " * 6)
    shape = kv_shape(hybrid.model)
    hybrid.prompt_cache = PromptCache()
    hybrid.prompt_cache.disk = PromptStore(tmp_path, "tiny-hybrid", 1 << 30, shape)
    first, _ = _run(hybrid, ids)
    hybrid.prompt_cache.disk.flush()
    assert len(list(tmp_path.rglob("*.safetensors"))) == 2
    hybrid.prompt_cache = PromptCache()  # a restart: only the disk is left
    hybrid.prompt_cache.disk = PromptStore(tmp_path, "tiny-hybrid", 1 << 30, shape)
    again, cached = _run(hybrid, ids)
    assert cached == len(ids) - 1 and again == first
    hybrid.prompt_cache = PromptCache()


def test_the_snapshot_file_holds_each_layer_as_it_was(hybrid, tmp_path):
    import mlx.core as mx
    from mlx_lm.models.cache import ArraysCache, KVCache, make_prompt_cache

    from engine.generation.prompt_files import kv_shape
    from engine.generation.prompt_store import PromptStore

    ids = list(range(100, 140))
    cache = make_prompt_cache(hybrid.model)
    hybrid.model(mx.array(ids)[None], cache=cache)
    store = PromptStore(tmp_path, "x", 1 << 30, kv_shape(hybrid.model))
    store.save(ids, cache)
    store.flush()
    name, n = store.best(ids + [7])
    assert n == len(ids) and store.best(ids[:-1] + [7]) == (name, 0)  # a snapshot serves all of it or nothing
    tokens, loaded = store.load(name)
    assert tokens == ids and [type(c) for c in loaded] == [type(c) for c in cache]
    for a, b in zip(loaded, cache):
        mine, theirs = (list(c.cache) if isinstance(c, ArraysCache) else [c.keys, c.values] for c in (a, b))
        assert len(mine) == len(theirs) and any(isinstance(c, ArraysCache) for c in loaded)
        for x, y in zip(mine, theirs):
            assert x.dtype == y.dtype and mx.array_equal(x, y[..., :len(ids), :] if isinstance(b, KVCache) else y)


# --- end to end through HTTP --------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(models, tmp_path_factory):
    dirs = [a for folder in models.values() for a in ("--model-dir", str(folder))]
    cache_dir = tmp_path_factory.mktemp("pc")
    s = Server([*dirs, "--model", str(models[HYBRID]), "--max-models", "1", "--embedding-model", "none",
                "--audio-model", "none", "--prompt-cache-dir", str(cache_dir)])
    s.cache_dir = cache_dir
    yield s
    s.stop()


def _chat(server: Server, model: str, messages: list[dict], max_tokens: int = 8) -> dict:
    r = httpx.post(server.url + "/v1/chat/completions", timeout=120,
                   json={"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()


def _reference_text(folder: Path, messages: list[dict], max_tokens: int) -> str:
    from mlx_lm import generate, load
    from mlx_lm.sample_utils import make_sampler

    model, tokenizer = load(str(folder))
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    return generate(model, tokenizer, ids, max_tokens=max_tokens, sampler=make_sampler(0.0))


def test_http_a_hybrid_models_second_turn_is_cached_and_exact(server, models):
    first = _chat(server, HYBRID, TURN1)
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    turn2 = TURN1 + [{"role": "assistant", "content": first["choices"][0]["message"]["content"]},
                     {"role": "user", "content": "And their lengths?"}]
    second = _chat(server, HYBRID, turn2)
    cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached >= first["usage"]["prompt_tokens"] - 1
    assert second["choices"][0]["message"]["content"] == _reference_text(models[HYBRID], turn2, 8)
    again = _chat(server, HYBRID, turn2)  # the identical request: all but the last token
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == second["usage"]["prompt_tokens"] - 1
    assert again["choices"][0]["message"]["content"] == second["choices"][0]["message"]["content"]


def test_http_a_restarted_server_resumes_a_hybrid_conversation_from_disk(server, models):
    import time

    messages = [{"role": "user", "content": "Write one line about the sea, then one about the sky, please."}]
    before = len(list(server.cache_dir.rglob("*.safetensors")))
    first = _chat(server, HYBRID, messages)
    deadline = time.monotonic() + 60  # the files are written by a thread of their own, after the answer
    while len(list(server.cache_dir.rglob("*.safetensors"))) < before + 3 and time.monotonic() < deadline:
        time.sleep(0.1)  # the history's end, the prompt's end, the answer's end
    turn2 = messages + [{"role": "assistant", "content": first["choices"][0]["message"]["content"]},
                        {"role": "user", "content": "Again."}]
    other = Server(["--model", str(models[HYBRID]), "--embedding-model", "none", "--audio-model", "none",
                    "--prompt-cache-dir", str(server.cache_dir)])  # a new process: only the disk is shared
    try:
        second = _chat(other, HYBRID, turn2)
    finally:
        other.stop()
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] >= first["usage"]["prompt_tokens"] - 1
    assert second["choices"][0]["message"]["content"] == _reference_text(models[HYBRID], turn2, 8)


@pytest.mark.parametrize("name", sorted(MOE))
def test_http_moe_models_answer_on_the_cpu_as_mlx_lm_does(server, models, name):
    out = _chat(server, name, TURN1)
    assert out["choices"][0]["message"]["content"] == _reference_text(models[name], TURN1, 8)
    again = _chat(server, name, TURN1)  # and the prompt cache serves them (gpt-oss: its windows by mask)
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == out["usage"]["prompt_tokens"] - 1
    assert again["choices"][0]["message"]["content"] == out["choices"][0]["message"]["content"]
    health = httpx.get(server.url + "/health", timeout=30).json()
    assert health["model"] == name
    assert health["decode"].startswith("mlx (numpy step: architecture")  # says why the numpy step isn't used


def test_http_moe_models_batch_concurrent_streams(server, models):
    from concurrent.futures import ThreadPoolExecutor

    name = "tiny-qwen3-moe"
    prompts = [[{"role": "user", "content": f"Count to {n}."}] for n in (3, 5, 7)]
    with ThreadPoolExecutor(3) as pool:
        outs = list(pool.map(lambda m: _chat(server, name, m), prompts))
    for messages, out in zip(prompts, outs):
        assert out["choices"][0]["message"]["content"] == _reference_text(models[name], messages, 8)
