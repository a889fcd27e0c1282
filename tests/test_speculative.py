"""Speculative decoding (engine/generation/speculative.py): prompt lookup and a draft model give the plain
path's answers token for token, on the real default model; everything around generation
(logprobs, stop strings, penalties, grammars, seeds, the prompt cache, cancellation, concurrent
streams, metrics) keeps working with it."""
from __future__ import annotations

import json
import shutil

import httpx
import pytest

from conftest import MODEL, Server
from engine.generation.speculative import AdaptiveLength, PromptLookup

CODE = '''def fibonacci(n):
    if n < 2:
        return n
    return fibonacci(n - 1) + fibonacci(n - 2)


def main():
    for i in range(10):
        print(i, fibonacci(i))
'''
RECORD = '{"name": "Ada Lovelace", "born": 1815, "city": "London", "field": "mathematics"}'
PROMPTS = [
    "Repeat this code exactly:\n\n" + CODE,
    "Copy this JSON record, then say what field she worked in:\n" + RECORD,
    "Write a short story about a dragon who learns to bake bread.",
    "List the planets of the solar system in order.",
]


# --- the drafter, alone ------------------------------------------------------------------
def test_prompt_lookup_proposes_what_followed_the_latest_match():
    lookup = PromptLookup(max_n=3, min_n=2)
    history = [1, 2, 3, 4, 5, 9, 2, 3, 7, 8, 6, 2, 3]
    assert lookup.propose(history, 3) == [7, 8, 6]  # the latest "2 3" was followed by 7 8 6
    assert lookup.propose(history + [4], 2) == [5, 9]  # "2 3 4" occurred at the start, then 5 9
    assert lookup.propose([5, 6], 4) == []  # nothing repeats


def test_prompt_lookup_prefers_the_longest_ngram():
    history = [7, 1, 2, 50, 9, 9, 1, 2, 60, 3, 1, 2]
    assert PromptLookup(max_n=3, min_n=2).propose(history, 1) == [60]  # "1 2" latest
    history = [0, 1, 2, 50, 9, 3, 1, 2, 60, 0, 1, 2]
    assert PromptLookup(max_n=3, min_n=2).propose(history, 1) == [50]  # "0 1 2" beats "1 2"


def test_adaptive_length_grows_on_success_and_shrinks_on_misses():
    length = AdaptiveLength(8)
    length.update(8, 2)
    assert length.k == 7
    for _ in range(10):
        length.update(length.k, 0)
    assert length.k == 1
    length.update(1, 1)
    assert length.k == 3
    length.update(0, 0)  # nothing proposed: no change
    assert length.k == 3


# --- the real model, in process ------------------------------------------------------------
@pytest.fixture(scope="module")
def runner(default_model_dir):
    from engine.models.memory import MemoryGate
    from engine.models.probe import probe
    from engine.generation.text import TextRunner

    r = TextRunner.load("m", probe(default_model_dir), "float32", MemoryGate())
    yield r
    r.close()


def generate(runner, content, mode, max_tokens=60, **params):
    """(text, Finished, token logprobs) for one chat turn with speculation `mode`."""
    from engine.request import ChatMessage, Finished, SamplingParams, TextDelta
    from engine.generation.speculative import Speculation

    runner.speculation = Speculation(mode=mode, num_draft=8, draft_model=runner.speculation.draft_model)
    runner.prompt_cache.clear()
    prompt = runner.encode_chat([ChatMessage("user", content)])
    text, done, logprobs = "", None, []
    for ev in runner.generate(prompt, max_tokens, SamplingParams(**{"temperature": 0.0, **params}), lambda: False):
        if isinstance(ev, TextDelta):
            text += ev.text
            logprobs.extend(ev.logprobs)
        elif isinstance(ev, Finished):
            done = ev
    return text, done, logprobs


def test_greedy_text_is_identical_and_quotes_are_drafted(runner):
    for i, content in enumerate(PROMPTS):
        plain, plain_done, _ = generate(runner, content, "off")
        fast, done, _ = generate(runner, content, "ngram")
        assert fast == plain, content
        assert (done.completion_tokens, done.finish_reason) == (plain_done.completion_tokens, plain_done.finish_reason)
        assert plain_done.drafted == 0
        if i < 2:  # the answers that quote the prompt keep most guesses
            assert done.accepted >= 15, (done.accepted, done.drafted)


def test_seeded_sampling_is_identical(runner):
    for content in PROMPTS[:2]:
        params = {"temperature": 0.9, "top_p": 0.95, "seed": 1234}
        assert generate(runner, content, "ngram", **params)[0] == generate(runner, content, "off", **params)[0]
    # ...and the seed still matters.
    a = generate(runner, PROMPTS[2], "ngram", temperature=1.0, seed=1)[0]
    b = generate(runner, PROMPTS[2], "ngram", temperature=1.0, seed=2)[0]
    assert a != b


def test_logprobs_come_from_the_model(runner):
    _, _, plain = generate(runner, PROMPTS[0], "off", logprobs=True, top_logprobs=3)
    _, done, fast = generate(runner, PROMPTS[0], "ngram", logprobs=True, top_logprobs=3)
    assert done.accepted > 0 and len(fast) == len(plain)
    for a, b in zip(plain, fast):
        assert a.token == b.token and abs(a.logprob - b.logprob) < 1e-3
        assert [t for t, _ in a.top] == [t for t, _ in b.top]


def test_penalties_and_bias_are_applied_per_position(runner):
    params = {"presence_penalty": 0.8, "frequency_penalty": 0.6, "logit_bias": ((28, -5.0), (1, 2.0))}
    for content in PROMPTS[:2]:
        assert generate(runner, content, "ngram", **params)[0] == generate(runner, content, "off", **params)[0]


def test_stop_string_inside_a_draft_cuts_there(runner):
    plain, _, _ = generate(runner, PROMPTS[0], "off", stop=("range(",))
    fast, done, _ = generate(runner, PROMPTS[0], "ngram", stop=("range(",))
    assert fast == plain and "range(" not in fast and done.finish_reason == "stop"
    # The prompt cache holds exactly the tokens its entry says.
    entry = list(runner.prompt_cache._entries.values())[-1]
    assert entry.cache[0].offset == len(entry.tokens)


def test_grammar_constrained_output_is_identical(runner):
    from engine.constrained.structured import grammar_for

    schema = {"type": "object", "properties": {"name": {"type": "string"}, "born": {"type": "integer"}},
              "required": ["name", "born"], "additionalProperties": False}
    grammar = grammar_for({"type": "json_schema", "json_schema": {"name": "person", "schema": schema}})
    plain, _, _ = generate(runner, PROMPTS[1], "off", grammar=grammar)
    fast, done, _ = generate(runner, PROMPTS[1], "ngram", grammar=grammar)
    assert fast == plain and set(json.loads(fast)) == {"name", "born"}


def test_next_turn_uses_the_prompt_cache(runner):
    from engine.request import ChatMessage, Finished, SamplingParams, Started, TextDelta
    from engine.generation.speculative import Speculation

    runner.speculation = Speculation(mode="ngram")
    runner.prompt_cache.clear()
    messages = [ChatMessage("user", PROMPTS[0])]
    answer = ""
    for ev in runner.generate(runner.encode_chat(messages), 40, SamplingParams(temperature=0.0), lambda: False):
        if isinstance(ev, TextDelta):
            answer += ev.text
    turn = messages + [ChatMessage("assistant", answer), ChatMessage("user", "Now in one line?")]
    events = list(runner.generate(runner.encode_chat(turn), 5, SamplingParams(temperature=0.0), lambda: False))
    started = next(e for e in events if isinstance(e, Started))
    assert started.cached_tokens >= len(runner.encode_chat(messages)) + 30
    assert isinstance(events[-1], Finished)


class CountingModel:
    """The model, counting forward passes and the rows each was given."""

    def __init__(self, model):
        self.model, self.rows = model, []

    def __call__(self, inputs, *args, **kwargs):
        self.rows.append(inputs.shape[-1])
        return self.model(inputs, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.model, name)


@pytest.mark.parametrize("tail", ["short", "long"])
def test_a_short_prompt_tail_rides_with_the_first_pass(runner, monkeypatch, tail):
    """The next turn's few new tokens go in the same pass as the first token's (no separate
    1-row pass); a tail longer than MERGE_TAIL is prefilled first. Same text either way."""
    from engine.request import ChatMessage, SamplingParams, TextDelta
    from engine.generation.speculative import MERGE_TAIL, Speculation

    first = [ChatMessage("user", PROMPTS[3])]
    follow = "Now the moons of Mars?" if tail == "short" else "Now describe each one. " + "In detail. " * 40
    texts = {}
    for mode in ("off", "ngram"):
        runner.speculation = Speculation(mode=mode)
        runner.prompt_cache.clear()
        answer = "".join(e.text for e in runner.generate(runner.encode_chat(first), 12, SamplingParams(temperature=0.0),
                                                         lambda: False) if isinstance(e, TextDelta))
        counting = CountingModel(runner.solo or runner.model)  # a lone stream's passes call runner.solo
        monkeypatch.setattr(runner, "model", counting)
        monkeypatch.setattr(runner, "solo", counting)
        if runner.last_rows is not None:  # the merged pass goes through the backbone/head split
            split = runner.last_rows
            monkeypatch.setattr(runner, "last_rows", lambda inputs, cache, n: (counting.rows.append(inputs.shape[-1]),
                                                                               split(inputs, cache, n))[1])
        turn = runner.encode_chat(first + [ChatMessage("assistant", answer), ChatMessage("user", follow)])
        texts[mode] = "".join(e.text for e in runner.generate(turn, 6, SamplingParams(temperature=0.0), lambda: False)
                              if isinstance(e, TextDelta))
        monkeypatch.undo()
    new = len(turn) - len(runner.encode_chat(first)) - 12
    assert texts["ngram"] == texts["off"] and texts["off"]
    if tail == "short":
        assert 1 < new <= MERGE_TAIL and counting.rows[0] > new  # the tail and the last token, one pass
    else:
        assert new > MERGE_TAIL and counting.rows[1] <= 9  # prefilled, then a decode-sized pass


def test_cancelled_inside_a_pass_leaves_a_consistent_cache(runner):
    from engine.request import ChatMessage, Finished, SamplingParams, TextDelta
    from engine.generation.speculative import Speculation

    runner.speculation = Speculation(mode="ngram")
    runner.prompt_cache.clear()
    prompt = runner.encode_chat([ChatMessage("user", PROMPTS[0])])
    seen = []
    for ev in runner.generate(prompt, 80, SamplingParams(temperature=0.0), lambda: len(seen) >= 12):
        if isinstance(ev, TextDelta):
            seen.append(ev.text)
        if isinstance(ev, Finished):
            assert ev.finish_reason == "cancelled"
    entry = list(runner.prompt_cache._entries.values())[-1]
    assert entry.cache[0].offset == len(entry.tokens)
    # The cache is sound: the same request again from it gives the plain answer.
    again, _, _ = generate(runner, PROMPTS[0], "off")
    runner.speculation = Speculation(mode="ngram")
    reused = ""
    for ev in runner.generate(prompt, 60, SamplingParams(temperature=0.0), lambda: False):
        if isinstance(ev, TextDelta):
            reused += ev.text
    assert reused == again


def test_draft_model_gives_the_same_text(runner, default_model_dir, fixture_models):
    from engine.models.memory import MemoryGate

    try:
        runner.load_draft(str(default_model_dir), "float32", MemoryGate())  # itself: guesses nearly always right
        plain, _, _ = generate(runner, PROMPTS[2], "off")
        fast, done, _ = generate(runner, PROMPTS[2], "draft")
        assert fast == plain and done.accepted >= 0.8 * done.drafted > 0
        runner.load_draft(str(fixture_models["tiny"]), "float32", MemoryGate())  # random: mostly wrong
        fast, done, _ = generate(runner, PROMPTS[0], "draft")
        assert fast == generate(runner, PROMPTS[0], "off")[0] and done.drafted > 0
        params = {"temperature": 0.8, "seed": 7}
        assert generate(runner, PROMPTS[3], "draft", **params)[0] == generate(runner, PROMPTS[3], "off", **params)[0]
    finally:
        runner.speculation.draft_model = None


def test_draft_model_with_another_vocabulary_is_refused(runner, fixture_models, tmp_path):
    from engine.errors import Unsupported
    from engine.models.memory import MemoryGate

    other = tmp_path / "other-vocab"
    shutil.copytree(fixture_models["tiny"], other)
    tok = json.loads((other / "tokenizer.json").read_text())
    extra = dict(tok["added_tokens"][0], id=len(tok["model"]["vocab"]), content="<|not-in-the-model|>")
    tok["added_tokens"].append(extra)
    (other / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(Unsupported, match="tokenizer differs"):
        runner.load_draft(str(other), "float32", MemoryGate())
    assert runner.speculation.draft_model is None


# --- a server ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def servers(default_model_dir):
    on, off = Server([]), Server(["--speculative", "off"])
    yield on, off
    on.stop()
    off.stop()


def _stream_text(url, content, **extra):
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 60,
            "temperature": 0, "stream": True, **extra}
    text = ""
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                for c in json.loads(line[6:])["choices"]:
                    text += c["delta"].get("content") or ""
    return text


def test_server_streams_the_same_text_and_counts_drafts(servers):
    on, off = servers
    for content in PROMPTS[:3]:
        assert _stream_text(on.url, content) == _stream_text(off.url, content)
    metrics = httpx.get(on.url + "/metrics").text
    accepted = [float(line.split()[-1]) for line in metrics.splitlines()
                if line.startswith("openmlx_speculative_tokens_total") and 'kind="accepted"' in line]
    assert accepted and accepted[0] > 10
    assert "openmlx_speculative_tokens_total{" not in httpx.get(off.url + "/metrics").text


def test_concurrent_streams_with_speculation(servers):
    """A stream that starts alone speculates; those that join it are batched; all are exact."""
    import concurrent.futures

    on, off = servers
    expected = [_stream_text(off.url, c) for c in PROMPTS]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda c: _stream_text(on.url, c), PROMPTS))
    assert got == expected


def test_draft_mode_needs_a_draft_model():
    s = Server(["--speculative", "draft"], wait=False)
    assert s.proc.wait(timeout=60) != 0
    assert "--draft-model" in s.log()


def test_a_speculating_stream_joins_the_batch_when_others_start(default_model_dir):
    """Stream A speculates alone; B starts after A's fifth piece; A moves into B's batch with its
    cache, sampler and processors (which then still see A's whole history): both texts equal
    their plain answers, greedy, with penalties, and under a grammar."""
    from engine.models.memory import MemoryGate
    from engine.models.probe import probe
    from engine.request import ChatMessage, Finished, SamplingParams, TextDelta
    from engine.generation.speculative import Speculation
    from engine.constrained.structured import grammar_for
    from engine.generation.text import TextRunner

    r = TextRunner.load("m", probe(default_model_dir), "float32", MemoryGate(), batch=True)
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "born": {"type": "integer"}},
              "required": ["name", "born"]}
    cases = [{}, {"presence_penalty": 0.8, "frequency_penalty": 0.5},
             {"grammar": grammar_for({"type": "json_schema", "json_schema": {"name": "p", "schema": schema}})}]
    pa = r.encode_chat([ChatMessage("user", PROMPTS[1])])
    pb = r.encode_chat([ChatMessage("user", PROMPTS[2])])

    def text_of(events):
        return "".join(ev.text for ev in events if isinstance(ev, TextDelta))

    try:
        for params in cases:
            sp = SamplingParams(temperature=0.0, **params)
            r.speculation = Speculation(mode="off")
            r.prompt_cache.clear()
            plain = (text_of(r.generate(pa, 40, sp, lambda: False)), text_of(r.generate(pb, 40, sp, lambda: False)))
            r.speculation = Speculation(mode="ngram")
            r.prompt_cache.clear()
            streams = {"a": r.generate(pa, 40, sp, lambda: False)}
            texts = {"a": "", "b": ""}
            done_a, started_b = None, False
            steps_before = r.decoder.steps
            while streams:
                for name in list(streams):
                    ev = next(streams[name], None)
                    if ev is None:
                        del streams[name]
                    elif isinstance(ev, TextDelta):
                        texts[name] += ev.text
                    elif isinstance(ev, Finished) and name == "a":
                        done_a = ev
                if len(texts["a"]) > 12 and not started_b:
                    started_b = True
                    streams["b"] = r.generate(pb, 40, sp, lambda: False)
            assert (texts["a"], texts["b"]) == plain, params
            assert done_a.drafted > 0  # it speculated before B came
            assert r.decoder.peak >= 2 and r.decoder.steps > steps_before  # ...and then shared B's batch
    finally:
        r.close()


def test_long_prompt_prefilled_in_short_passes_gives_mlx_lm_s_answer(runner):
    """Prefill runs in 256-token passes (engine/generation/batching.py PREFILL_STEP, cheaper attention on
    this CPU); a 1,000-token prompt's greedy answer equals mlx-lm's with its 2,048-token passes,
    with speculation on and off, and with attention/SwiGLU in numpy (engine/cpu/cpu_math.py)."""
    import mlx.core as mx
    from mlx_lm import stream_generate

    from bench.workload import FILLER
    from engine.request import ChatMessage

    text = "Summarise this text. " + " ".join(f"Day {i}: " + FILLER for i in range(30))
    prompt = runner.encode_chat([ChatMessage("user", text)])
    assert len(prompt) > 1000
    from engine.cpu import cpu_math

    with cpu_math.disabled():  # the reference is mlx-lm's own math, MLX's attention included
        expected = "".join(r.text for r in stream_generate(runner.model, runner.tokenizer, mx.array(prompt),
                                                            max_tokens=30, prefill_step_size=2048))
    for mode in ("off", "ngram"):
        from engine.request import SamplingParams, TextDelta
        from engine.generation.speculative import Speculation

        runner.speculation = Speculation(mode=mode)
        runner.prompt_cache.clear()
        got = "".join(e.text for e in runner.generate(prompt, 30, SamplingParams(temperature=0.0), lambda: False)
                      if isinstance(e, TextDelta))
        assert got == expected, mode
