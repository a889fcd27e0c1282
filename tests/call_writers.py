"""A tiny model that writes chosen texts in a model family's own format, for end-to-end tests of
tool calls and reasoning (no registry holds these families' weights; see shared/MODELS.md).

What it is: the family's real chat template (tests/data/templates/, from llama.cpp), the default
model's tokenizer (SmolLM2's byte-level BPE, on every test machine) with the family's markup added
as tokens (special where the family's tokenizer marks them special), and a 2-layer llama model
with random weights trained for a few seconds to answer each chosen prompt with its chosen text.

How it is trained cheaply: only the tokens the examples use matter, so a model over that small
vocabulary (plus one "any other token" class, its logit held at 0) is trained until greedy decoding
reproduces every continuation, then its rows are placed into a full-vocabulary model whose other
output rows are zero. The prompts are rendered exactly as the server renders them (transformers'
apply_chat_template with the same messages, tools and template arguments), so a server that renders
a different prompt gets noise back and the test fails.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

TEMPLATES = Path(__file__).parent / "data" / "templates"


@dataclass(frozen=True)
class Example:
    messages: list[dict[str, Any]]
    continuation: str  # what the model writes (its end-of-sequence token is added)
    tools: list[dict[str, Any]] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)  # chat-template arguments (enable_thinking...)


def build(folder: Path, default_model_dir: Path, template: str, added: Sequence[tuple[str, bool]],
          eos: Sequence[str], examples: Sequence[Example], hidden: int = 64, seed: int = 0,
          cache: Optional[Path] = None) -> Path:
    """Write the model folder and return it. `added`: (token text, special) pairs; `eos`: the
    end-of-sequence tokens (the first ends every continuation). `cache`: a folder where a model
    built from the same inputs (and this file) is kept and reused: training takes minutes on a
    busy CPU."""
    key = hashlib.sha256(json.dumps([template, (TEMPLATES / template).read_text(), list(added), list(eos),
                                     [vars(e) for e in examples], hidden, seed, Path(__file__).read_text(),
                                     (default_model_dir / "tokenizer.json").stat().st_size],
                                    sort_keys=True, default=str).encode()).hexdigest()[:16]
    kept = cache / key if cache is not None else None
    if kept is not None and (kept / "config.json").is_file():
        shutil.copytree(kept, folder, dirs_exist_ok=True)
        return folder
    _train(folder, default_model_dir, template, added, eos, examples, hidden, seed)
    if kept is not None:
        shutil.copytree(folder, kept.with_suffix(".tmp"), dirs_exist_ok=True)
        os.replace(kept.with_suffix(".tmp"), kept)
    return folder


def _train(folder: Path, default_model_dir: Path, template: str, added: Sequence[tuple[str, bool]],
           eos: Sequence[str], examples: Sequence[Example], hidden: int, seed: int) -> None:
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama
    from tokenizers import AddedToken, Tokenizer
    from transformers import AutoTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer.from_file(str(default_model_dir / "tokenizer.json"))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, s in added if s])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t, s in added if not s])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": (TEMPLATES / template).read_text(),
        "eos_token": eos[0], "bos_token": None, "pad_token": eos[0], "model_max_length": 4096,
        "clean_up_tokenization_spaces": False}))
    hf = AutoTokenizer.from_pretrained(str(folder))
    eos_ids = [hf.convert_tokens_to_ids(t) for t in eos]
    sequences = []
    for ex in examples:
        prompt = hf.apply_chat_template(ex.messages, tools=ex.tools or None, add_generation_prompt=True,
                                        tokenize=True, return_dict=False, **ex.kwargs)
        prompt = list(prompt["input_ids"] if isinstance(prompt, dict) else prompt)
        answer = hf.encode(ex.continuation, add_special_tokens=False) + [eos_ids[0]]
        sequences.append((prompt, answer))
    vocab = sorted({t for p, a in sequences for t in p + a})
    sub = {t: i for i, t in enumerate(vocab)}
    other = len(vocab)  # the class standing for every token outside the examples (logit 0)

    def args(v: int) -> Any:
        return llama.ModelArgs(model_type="llama", hidden_size=hidden, num_hidden_layers=2, intermediate_size=2 * hidden,
                               num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=v,
                               tie_word_embeddings=False, rope_theta=10000.0, max_position_embeddings=4096)

    mx.random.seed(seed)
    small = llama.Model(args(other + 1))
    inputs = [mx.array([sub[t] for t in (p + a)[:-1]]) for p, a in sequences]
    targets = [mx.array([sub[t] for t in (p + a)[1:]]) for p, a in sequences]
    starts = [len(p) - 1 for p, _ in sequences]  # the first position whose target is the answer

    def loss_fn(model: Any) -> mx.array:
        total = mx.array(0.0)
        for x, y, s in zip(inputs, targets, starts):
            logits = model(x[None])[0]
            logits = mx.concatenate([logits[:, :other], mx.zeros((logits.shape[0], 1))], axis=1)
            ce = nn.losses.cross_entropy(logits, y)
            total = total + ce[s:].mean()  # only the answers matter
        return total

    # A high rate finds the answers fast; decayed, so the model settles instead of bouncing off them.
    opt = optim.Adam(learning_rate=optim.cosine_decay(1e-2, 400, 5e-4))
    step = nn.value_and_grad(small, loss_fn)
    for i in range(1500):
        loss, grads = step(small)
        opt.update(small, grads)
        mx.eval(small.parameters(), opt.state)
        if i % 20 == 19 and _reproduces(small, inputs, targets, starts, other):
            break
        if i % 20 == 19 and os.environ.get("TINY_FAMILY_VERBOSE"):
            print(i, loss.item(), flush=True)
    else:
        raise RuntimeError("the tiny model did not learn its continuations")

    full = llama.Model(args(len(hf)))
    weights = dict(tree_flatten(small.parameters()))
    ids = mx.array(vocab)
    embed = mx.zeros((len(hf), hidden)).at[ids].add(weights["model.embed_tokens.weight"][:other])
    head = mx.zeros((len(hf), hidden)).at[ids].add(weights["lm_head.weight"][:other])
    weights.update({"model.embed_tokens.weight": embed, "lm_head.weight": head})
    full.load_weights(list(weights.items()))
    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(full.parameters())))
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": hidden,
              "num_hidden_layers": 2, "intermediate_size": 2 * hidden, "num_attention_heads": 4,
              "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "vocab_size": len(hf), "tie_word_embeddings": False,
              "rope_theta": 10000.0, "max_position_embeddings": 4096, "eos_token_id": eos_ids,
              "torch_dtype": "float32"}
    (folder / "config.json").write_text(json.dumps(config))


def _reproduces(model: Any, inputs: list, targets: list, starts: list[int], other: int) -> bool:
    import mlx.core as mx

    for x, y, s in zip(inputs, targets, starts):
        logits = model(x[None])[0]
        logits = mx.concatenate([logits[:, :other], mx.zeros((logits.shape[0], 1))], axis=1)
        best = mx.argmax(logits[s:], axis=-1)
        margin = mx.min(mx.take_along_axis(logits[s:], y[s:, None], axis=1)[:, 0]
                        - mx.max(mx.where(mx.arange(logits.shape[1])[None] == y[s:, None], -1e9, logits[s:]), axis=1))
        if not (mx.all(best == y[s:]).item() and margin.item() > 2.0):
            return False
    return True
