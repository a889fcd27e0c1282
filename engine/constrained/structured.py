"""Grammar-constrained decoding (JSON mode, JSON schema) with llguidance on mlx-lm.

A logits processor per request masks every token the grammar does not allow, so the output
always parses and matches the schema (unless max_tokens cuts it: then finish_reason is "length").
llguidance's MLX helper is Metal-only, so the mask is applied by hand with numpy (shared/STRUCTURED.md).
"""
from __future__ import annotations

import json
from functools import lru_cache
from typing import Any, Callable, Optional

import mlx.core as mx
import numpy as np

from engine.errors import InvalidRequest


def grammar_for(response_format: dict[str, Any], param: str = "response_format.json_schema.schema") -> Optional[str]:
    """The llguidance grammar for an OpenAI `response_format`, or None for plain text; a schema
    llguidance can't compile is a 400 naming `param`."""
    kind = response_format.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        schema: dict[str, Any] = {"type": "object"}
    else:
        schema = (response_format.get("json_schema") or {}).get("schema") or {}
    try:
        return _compile(json.dumps(schema, sort_keys=True))
    except (ValueError, RuntimeError, TypeError, RecursionError) as e:  # e.g. nested past the compiler's depth limit
        raise InvalidRequest(f"The JSON schema in {param} can't be used: {e}", param=param) from None


@lru_cache(maxsize=256)
def _compile(schema_json: str) -> str:
    """Compiled once per distinct schema (clients resend the same schema with every request)."""
    from llguidance import LLMatcher

    # Compact JSON (no pretty-printing): fewer tokens, same data.
    return LLMatcher.grammar_from_json_schema(schema_json, defaults={"whitespace_flexible": False})


def check_grammar(grammar: str) -> None:
    """400 if llguidance can't compile the schema."""
    from llguidance import LLMatcher

    message = LLMatcher.validate_grammar(grammar)  # "" when the grammar is usable
    if message:
        raise InvalidRequest(f"The JSON schema in response_format can't be used: {message}",
                             param="response_format.json_schema.schema")


def ll_tokenizer(tokenizer: Any) -> Any:
    """llguidance's view of an mlx-lm tokenizer (~0.5 s to build): a runner builds it once and
    keeps it as long as the model is loaded (TextRunner.ll_tokenizer)."""
    import llguidance.hf

    return llguidance.hf.from_tokenizer(tokenizer._tokenizer, n_vocab=None, eos_token=list(tokenizer.eos_token_ids))


def grammar_processor(lltok: Any, grammar: str) -> Callable[[mx.array, mx.array], mx.array]:
    """A fresh mlx-lm logits processor enforcing `grammar` (one per request: it holds state)."""
    import llguidance
    import llguidance.numpy as llnp

    matcher = llguidance.LLMatcher(lltok, grammar)
    bitmask = llnp.allocate_token_bitmask(1, lltok.vocab_size)
    state = {"seen": None}

    def process(tokens: mx.array, logits: mx.array) -> mx.array:
        # The first call sees the (uncached part of the) prompt; later calls add one token each.
        if state["seen"] is None:
            state["seen"] = tokens.size
        else:
            for t in tokens[state["seen"]:].tolist():
                matcher.consume_token(int(t))
            state["seen"] = tokens.size
        llnp.fill_next_token_bitmask(matcher, bitmask, 0)
        allowed = np.unpackbits(bitmask[0].view(np.uint8), bitorder="little")[: lltok.vocab_size].astype(bool)
        vocab = logits.shape[-1]
        mask = np.zeros(vocab, dtype=bool)  # ids past the grammar's vocabulary (padding) stay banned
        n = min(vocab, allowed.size)
        mask[:n] = allowed[:n]
        return mx.where(mx.array(mask)[None], logits, mx.array(-float("inf"), dtype=logits.dtype))

    return process


def schema_problem(schema: Any) -> Optional[str]:
    """Why llguidance can't enforce `schema` (e.g. an unsupported keyword), or None."""
    from llguidance import LLMatcher

    try:
        grammar = _compile(json.dumps(schema, sort_keys=True))
    except (ValueError, RuntimeError, TypeError, RecursionError) as e:
        return str(e)
    return LLMatcher.validate_grammar(grammar) or None
