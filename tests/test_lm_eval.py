"""lm-evaluation-harness against a live server (issue 20), on small local JSON tasks (no dataset
download): `local-completions` scores multiple choice by loglikelihood (token-id prompts, echo,
logprobs), `local-chat-completions` generates until a stop string. The per-choice scores must equal
a direct mlx-lm forward pass over the same weights.

Slow (lm-eval's start-up and the quantized weights on a CPU): `pytest --run-slow tests/test_lm_eval.py`,
with `pip install "lm-eval[api]"` (the `eval` extra).
"""
from __future__ import annotations

import json
import math

import pytest

from conftest import MODEL, Server

pytestmark = pytest.mark.slow
lm_eval = pytest.importorskip("lm_eval")

ITEMS = [
    {"context": "The capital of France is", "choices": [" Paris", " London", " banana"], "answer": 0},
    {"context": "One, two, three, four,", "choices": [" seven", " five", " dog"], "answer": 1},
    {"context": "Monday, Tuesday, Wednesday,", "choices": [" apple", " March", " Thursday"], "answer": 2},
    {"context": "The opposite of hot is", "choices": [" cold", " car", " seven"], "answer": 0},
]
QUESTIONS = [{"question": "What is the capital of France? Answer with one word.", "answer": "Paris"},
             {"question": "What colour is the sky on a clear day? Answer with one word.", "answer": "Blue"}]


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    d = tmp_path_factory.mktemp("tasks")
    (d / "mc.jsonl").write_text("".join(json.dumps(i) + "\n" for i in ITEMS))
    (d / "gen.jsonl").write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    (d / "openmlx_mc.yaml").write_text(f"""task: openmlx_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {d / 'mc.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
""")
    (d / "openmlx_gen.yaml").write_text(f"""task: openmlx_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {d / 'gen.jsonl'}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
    ignore_case: true
    ignore_punctuation: true
""")
    return d


@pytest.fixture(scope="module")
def keep(default_model_dir):
    s = Server(["--cpu-dtype", "keep"])
    yield s
    s.stop()


def test_loglikelihood_scores_equal_mlx_lm(keep, tasks, default_model_dir):
    import mlx.core as mx
    from lm_eval.tasks import TaskManager
    from mlx_lm import load

    results = lm_eval.simple_evaluate(
        model="local-completions",
        model_args=f"model={MODEL},base_url={keep.url}/v1/completions,tokenizer={default_model_dir},"
                   "tokenizer_backend=huggingface,tokenized_requests=True,num_concurrent=1,max_retries=1",
        tasks=["openmlx_mc"], task_manager=TaskManager(include_path=str(tasks)), log_samples=True)
    assert results["results"]["openmlx_mc"]["acc,none"] == 1.0
    model, tokenizer = load(str(default_model_dir))
    samples = results["samples"]["openmlx_mc"]
    assert len(samples) == len(ITEMS)
    for sample in samples:
        item = sample["doc"]
        context = tokenizer.encode(item["context"])
        for choice, resp in zip(item["choices"], sample["resps"]):
            whole = tokenizer.encode(item["context"] + choice)
            logits = model(mx.array(whole)[None])[0].astype(mx.float32)
            logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            direct = sum(float(logp[i - 1, whole[i]].item()) for i in range(len(context), len(whole)))
            assert math.isclose(resp[0][0], direct, abs_tol=5e-3), (item["context"], choice, resp, direct)


def test_generate_until_through_chat_completions(keep, tasks):
    from lm_eval.tasks import TaskManager

    results = lm_eval.simple_evaluate(
        model="local-chat-completions",
        model_args=f"model={MODEL},base_url={keep.url}/v1/chat/completions,num_concurrent=1,max_retries=1",
        tasks=["openmlx_gen"], task_manager=TaskManager(include_path=str(tasks)), apply_chat_template=True,
        log_samples=True)
    samples = results["samples"]["openmlx_gen"]
    assert len(samples) == len(QUESTIONS) and all(s["resps"][0][0] for s in samples)
    assert "exact_match,none" in results["results"]["openmlx_gen"]
