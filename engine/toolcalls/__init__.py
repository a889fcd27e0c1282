"""Tool-call formats: one small module per way models write calls, chosen by the chat template.

Each format knows how its models write a call (to render earlier calls and to constrain new
ones with a grammar) and how to read calls back out of generated text. A template that renders
`tools` in one of these formats gets the tools through the template; any other template gets the
generic prompt (engine/tools.py) and the Hermes format.
"""
from __future__ import annotations

from typing import Protocol, Sequence

from engine.tools import ToolCall, ToolSpec


class ToolFormat(Protocol):
    name: str
    trigger: str  # text that starts a call in the output (held back while streaming)

    def detect(self, template: str) -> bool:
        """Does this chat template render tools in this format?"""

    def render_call(self, name: str, arguments: str) -> str:
        """An earlier call as the model writes it (for prompts without native rendering)."""

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        """(text without the calls, calls). Malformed calls stay in the text."""

    def call_grammar(self, tools: Sequence[ToolSpec], only: str | None = None) -> str:
        """llguidance grammar: exactly one valid call (of `only` when given)."""

    def auto_grammar(self, tools: Sequence[ToolSpec]) -> str:
        """llguidance grammar: free text, and a call once started is valid."""


def formats() -> list[ToolFormat]:
    from engine.toolcalls import hermes, llama3, mistral

    # Most specific first: Mistral and Llama templates may mention JSON too.
    return [mistral.FORMAT, llama3.FORMAT, hermes.FORMAT]


def for_template(template: str) -> tuple[ToolFormat, bool]:
    """The format a chat template uses and whether it renders tools itself (native)."""
    from engine.toolcalls import hermes

    if template and "tools" in template:
        for fmt in formats():
            if fmt.detect(template):
                return fmt, True
    return hermes.FORMAT, False
