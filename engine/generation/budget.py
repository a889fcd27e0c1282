"""The one rule for how many tokens a generation may make (`max_tokens` in openapi.yaml, called
`max_output_tokens` by the Responses API and `max_tokens` by Messages): the request's value, else
the server's `--max-tokens`, else the room the context leaves, never above `--max-tokens-cap`
and never above the room the context leaves (a larger request is clamped to it). A prompt that
alone fills the context, or a value above the cap, is a 400 naming the field the client sent.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from engine.errors import ContextLengthExceeded, InvalidRequest
from engine.request import Fields


@dataclass(frozen=True)
class BudgetPolicy:
    """The server's settings the rule uses."""

    default: Optional[int] = None  # --max-tokens
    cap: Optional[int] = None  # --max-tokens-cap
    # Thinking budgets for reasoning efforts low, medium, high (--reasoning-budgets).
    effort_budgets: tuple[int, int, int] = (512, 2048, 8192)


def max_new_tokens(prompt_len: int, requested: Optional[int], context_length: int, policy: BudgetPolicy,
                   fields: Fields = Fields(), score_only: bool = False) -> int:
    """Tokens to generate for a prompt of `prompt_len` tokens. `requested` 0 means "score the
    prompt, generate nothing", allowed only with `score_only` (completions with echo)."""
    if requested == 0:
        if not score_only:
            raise InvalidRequest(f"{fields.max_tokens} 0 (score the prompt, generate nothing) needs echo: true on "
                                 "/v1/completions.", param=fields.max_tokens)
    elif policy.cap is not None and requested is not None and requested > policy.cap:
        raise InvalidRequest(f"{fields.max_tokens} is {requested}, above this server's limit of {policy.cap} "
                             "(--max-tokens-cap).", param=fields.max_tokens)
    if prompt_len <= 0:
        raise InvalidRequest("The prompt is empty.", param=fields.prompt)
    room = context_length - prompt_len
    if room <= 0:
        raise ContextLengthExceeded(
            f"This model's maximum context length is {context_length} tokens, but the prompt has {prompt_len} "
            f"tokens. Shorten the {fields.prompt}.", param=fields.prompt)
    if requested is not None:
        # More than the context leaves is clamped to what it leaves, as local servers do: agents send
        # their cloud model's max_tokens (Claude Code 32000) whatever the context; the answer then
        # ends with finish_reason "length" when the room runs out.
        return min(requested, room)
    return min(x for x in (policy.default, policy.cap, room) if x)
