"""Tiny llama folders for replaying coding agents' real request bodies fast and honestly.

The recorded bodies are 12-25k tokens: the default model's 8k context can't take them, and a
real 32k model needs minutes per prefill on two cores. A 2-layer, 64-wide llama with the default
model's tokenizer and chat template reads 25k tokens in seconds, so the server's whole path runs
on the bodies as sent (parsing, the template, the budget, the prompt cache, the stream):

- `ends_at_once`: a 32k context and an output head that always ends the turn, so a 32000-token
  budget is not spent on noise. One hidden unit is held at a constant (its embedding column is
  100, no layer writes to it); the head scores the stop tokens 80 from it, `"`, `}` and `]` 40,
  everything else 0. Under a grammar (a forced tool call) the stop tokens are masked and JSON
  closes as soon as the grammar lets it, so the call is written whole in a few dozen tokens.
- `talks_on`: a small context of random weights that never stops on its own: a budget larger than
  the room left runs to the end of the context (the clamp, `length`).
"""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

END_TOKENS = (0, 2)  # SmolLM2's <|endoftext|> and <|im_end|>
BIG, SMALL = "agents-32k", "talker-256"  # the models agent_config serves


def write_tiny_llama(folder: Path, tokenizer_from: Path, context: int, ends_at_once: bool) -> Path:
    """A tiny llama folder with the default model's tokenizer (see the module docstring)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama

    folder.mkdir(parents=True, exist_ok=True)
    config = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128,
              "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "vocab_size": 49152,
              "max_position_embeddings": context, "tie_word_embeddings": not ends_at_once,
              "rope_theta": 10000.0, "eos_token_id": list(END_TOKENS), "bos_token_id": 1}
    mx.random.seed(0)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    weights = dict(tree_flatten(model.parameters()))
    if ends_at_once:
        from tokenizers import Tokenizer

        vocab = Tokenizer.from_file(str(tokenizer_from / "tokenizer.json"))
        embed = weights["model.embed_tokens.weight"]
        weights["model.embed_tokens.weight"] = mx.concatenate([mx.full((embed.shape[0], 1), 100.0), embed[:, 1:]], 1)
        for name in list(weights):
            if name.endswith(("self_attn.o_proj.weight", "mlp.down_proj.weight")):  # nothing writes unit 0
                w = weights[name]
                weights[name] = mx.concatenate([mx.zeros((1, w.shape[1])), w[1:]], 0)
        weights["model.norm.weight"] = mx.zeros((64,)).at[0].add(1.0)  # the head sees unit 0 alone (~8)
        head = mx.zeros((49152, 64))
        for token, score in [(t, 10.0) for t in END_TOKENS] + [(vocab.token_to_id(c), 5.0) for c in '"}]']:
            head = head.at[token, 0].add(score)
        weights["lm_head.weight"] = head
    mx.save_safetensors(str(folder / "model.safetensors"), weights)
    (folder / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tokenizer_from / name, folder / name)
    return folder


def agent_config(root: Path, default_model_dir: Path) -> Path:
    """A config file serving `agents-32k` (ends at once) and `talker-256` (talks on)."""
    big = write_tiny_llama(root / "agents-32k", default_model_dir, 32768, ends_at_once=True)
    small = write_tiny_llama(root / "talker-256", default_model_dir, 256, ends_at_once=False)
    config = root / "config.yaml"
    config.write_text(json.dumps({"models": [{"source": str(big), "id": "agents-32k"},
                                             {"source": str(small), "id": "talker-256"}]}))
    return config


def recorded(name: str) -> dict:
    """A recorded request (tests/data/agents/NAME.json): client, path, headers, body as sent."""
    return json.loads((Path(__file__).parent / "data" / "agents" / f"{name}.json").read_text())


def _cut(text: str, keep: int = 400) -> str:
    return text if len(text) <= keep else text[:keep]


def claude_body(name: str, trimmed: bool = True) -> tuple[str, dict, dict]:
    """(path, headers, body) of a recorded Claude Code request; trimmed: texts cut to 400
    characters and three tools kept, every field (billing block, system message, max_tokens
    32000, thinking, context_management, metadata...) as sent."""
    rec = recorded(name)
    body = copy.deepcopy(rec["body"])
    body["model"] = BIG
    if trimmed:
        for block in body["system"]:
            block["text"] = _cut(block["text"])
        for m in body["messages"]:
            if isinstance(m["content"], str):
                m["content"] = _cut(m["content"])
            else:
                for block in m["content"]:
                    block["text"] = _cut(block["text"])
        body["tools"] = [t for t in body["tools"] if t["name"] in ("Bash", "Read", "Write")]
        for t in body["tools"]:
            t["description"] = _cut(t["description"], 200)
    return rec["path"], rec["headers"], body


def codex_body(trimmed: bool = True) -> tuple[str, dict, dict]:
    """(path, headers, body) of Codex's recorded request; trimmed: texts cut, the tools kept are
    exec_command, the namespace multi_agent_v1 (all its functions) and web_search."""
    rec = recorded("codex_hello")
    body = copy.deepcopy(rec["body"])
    body["model"] = BIG
    if trimmed:
        for item in body["input"]:
            for part in item["content"]:
                part["text"] = _cut(part["text"])
        body["tools"] = [t for t in body["tools"] if t.get("name") in ("exec_command", "multi_agent_v1")
                         or t["type"] == "web_search"]
        for t in body["tools"]:
            if "description" in t:
                t["description"] = _cut(t["description"], 200)
            for inner in t.get("tools") or []:
                inner["description"] = _cut(inner["description"], 200)
    return "/v1/responses", rec["headers"], body
