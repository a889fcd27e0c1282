"""Chat prompts: a text model's chat template applied to messages and tools, within its context,
and its tool-call format (grammar under a tool choice, parsing). A mixin of TextRunner
(engine/generation/text.py), which holds the tokenizer and context length these read.
"""
from __future__ import annotations

import logging
from functools import cached_property
from typing import Any, Optional, Sequence

from engine.constrained.toolcalls import ToolFormat, for_template, own_tool_prompt
from engine.constrained.toolcalls.common import added_tokens, special_trigger
from engine.constrained.tools import ToolCall, ToolChoice, ToolSpec, tool_schema
from engine.errors import ContextLengthExceeded, InvalidRequest
from engine.generation.templates import render_chat
from engine.generation.tokens import encode_prefix, guarded, prompt_chars
from engine.generation.turns import render_turn, with_tool_prompt
from engine.request import ChatMessage, SamplingParams

log = logging.getLogger("openmlx.engine")


class ChatPrompts:
    """Prompt building and tool-call formats for a runner with these attributes (TextRunner's)."""

    model_id: str
    tokenizer: Any  # mlx_lm TokenizerWrapper
    config: dict
    context_length: int
    tool_parser: Optional[str]

    def encode_chat(self, messages: Sequence[ChatMessage], tools: Sequence[ToolSpec] = (),
                    continue_final: bool = False, param: str = "messages",
                    template_kwargs: Optional[dict[str, Any]] = None, generation_prompt: bool = True) -> list[int]:
        """Token ids of the chat template applied to `messages`, ready for the assistant turn
        (without its generation prompt: `generation_prompt` False).

        Tools go through the template when it renders them in the `<tool_call>` format our parser
        reads (Hermes/Qwen templates); otherwise the generic tool prompt is added as a system turn."""
        template = getattr(self.tokenizer, "chat_template", None) or ""
        fmt, native = self.tool_format
        if tools and not native:
            messages = with_tool_prompt(messages, tools)
        elif (own := own_tool_prompt(fmt, template, tools)) is not None:
            messages = with_tool_prompt(messages, tools, own)
        turns = [render_turn(m, fmt, native, renders_calls="tool_calls" in template) for m in messages]
        if template:
            extra = {**(template_kwargs or {}),
                     **({"tools": [tool_schema(t) for t in tools]} if native and tools and "tools" in template else {})}
            # continue_final: the last assistant turn is a prefix to go on with (Anthropic's prefill).
            prefill = {"continue_final_message": True} if continue_final and turns[-1]["role"] == "assistant" \
                else {"add_generation_prompt": generation_prompt}
            # Rendered as text within a bound (engine/generation/templates.py), then tokenized as
            # apply_chat_template would (no special tokens added), no further than the context.
            text = render_chat(lambda: self.tokenizer.apply_chat_template(turns, tokenize=False, **prefill, **extra),
                               prompt_chars(self.tokenizer, self.context_length), param)
            return self.encode_within_context(text, param)
        text = "\n".join(f"{t['role']}: {t['content']}" for t in turns) + "\nassistant:"
        return self.encode_text(text)

    def encode_within_context(self, text: str, param: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`, or ContextLengthExceeded as soon as it is known to have more tokens
        than the context (nothing past that is tokenized)."""
        if len(text) > prompt_chars(self.tokenizer, self.context_length):
            ids, cut = [], True
        else:
            ids, cut = encode_prefix(self.tokenizer, text, self.context_length, add_special_tokens)
        if cut:
            raise ContextLengthExceeded(f"This model's maximum context length is {self.context_length} tokens, but "
                                        f"the prompt has more ({len(text):,} characters). Shorten the {param}.",
                                        param=param)
        return ids

    @cached_property
    def ll_tokenizer(self) -> Any:
        """The grammar engine's tokenizer, built on first use, gone with the runner."""
        from engine.constrained.structured import ll_tokenizer

        return ll_tokenizer(self.tokenizer)

    @cached_property
    def tool_format(self) -> tuple[ToolFormat, bool]:
        """How this model writes tool calls, and whether its template renders tools itself."""
        return for_template(getattr(self.tokenizer, "chat_template", None) or "", self.tool_parser)

    def tool_grammar(self, tools: Sequence[ToolSpec], choice: ToolChoice) -> Optional[str]:
        """The grammar for a tool choice: one valid call (required/named) or, for auto, free
        text where a started call must be valid. Compiled once per tool set. A schema the
        compiler can't take is a 400 naming `tools` when a call is required; under auto the
        call is then only parsed (strict tools were refused at the API already)."""
        from llguidance import LLMatcher

        fmt, _ = self.tool_format
        if choice.mode == "auto" and special_trigger(fmt, self.tokenizer):
            # The model opens its calls with a special token, which a lazy grammar's text trigger
            # never sees: it would mask that token and the model could not call at all.
            return None
        try:
            grammar = fmt.auto_grammar(tools) if choice.mode == "auto" else \
                fmt.call_grammar(tools, choice.name if choice.mode == "named" else None, added_tokens(self.tokenizer))
            if grammar is None:  # this format's calls under auto are parsed, not constrained
                return None
            problem = LLMatcher.validate_grammar(grammar)
        except (ValueError, RuntimeError) as e:
            grammar, problem = None, str(e)
        if problem and choice.mode == "auto":
            log.info("%s: tool calls under auto are parsed, not constrained: %s", self.model_id, problem)
            return None
        if problem:
            raise InvalidRequest(f"A tool's parameters schema can't be used: {problem}", param="tools")
        return grammar

    def split_calls(self, text: str, tools: Sequence[ToolSpec] = ()) -> tuple[str, list[ToolCall]]:
        """The text and the tool calls in it, read in this model's format (`tools` type the
        values of formats that write them as bare text)."""
        return self.tool_format[0].parse(text, tools)

    def encode_text(self, prompt: str) -> list[int]:
        """Token ids of a plain completion prompt (with BOS where the tokenizer adds one)."""
        return guarded(lambda: list(self.tokenizer.encode(prompt)))

    @property
    def vocab_size(self) -> int:
        return int(self.config.get("vocab_size", 0) or len(self.tokenizer.vocab))

    def check_params(self, params: SamplingParams) -> None:
        """What only the loaded model can check: logit_bias token ids must exist."""
        bad = [t for t, _ in params.logit_bias if t >= self.vocab_size]
        if bad:
            raise InvalidRequest(f"logit_bias names token ids outside the vocabulary (size {self.vocab_size}): "
                                 f"{bad[:5]}.", param="logit_bias")
        if params.grammar:
            from engine.constrained.structured import check_grammar

            check_grammar(params.grammar)
