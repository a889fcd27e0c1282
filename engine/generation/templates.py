"""Chat templates rendered under a time budget.

A template is code that comes with the model, and with `--allow-download` a client picks the
model: a template that loops (nested `range`s, a macro calling itself) would hold the one worker
for good, and the model stays in the store, so it recurs after a restart. Jinja compiles a
template to Python code whose file name is "<template>"; while one renders, a trace function on
this thread checks the clock at each line of that code and abandons the render past the budget.
Other code (the tokenizer, transformers) is not traced line by line, so the cost is small.
"""
from __future__ import annotations

import sys
import time
from typing import Any, Callable, TypeVar

from engine.errors import Unsupported

T = TypeVar("T")
TEMPLATE_BUDGET_S = 5.0  # a real template renders in milliseconds
_JINJA_FILE = "<template>"


class TemplateTooSlow(Unsupported):
    """The model's chat template did not finish within the budget (a loop, or far too much work)."""

    code = "chat_template_timeout"


def render_bounded(render: Callable[[], T], budget_s: float = TEMPLATE_BUDGET_S) -> T:
    """`render()` (a call that renders a chat template) abandoned with TemplateTooSlow after `budget_s`."""
    deadline = time.monotonic() + budget_s

    def in_template(frame: Any, event: str, arg: Any) -> Any:
        if time.monotonic() > deadline:
            raise TemplateTooSlow(f"The model's chat template did not finish rendering within {budget_s:g} s "
                                  "(it loops, or does far too much work); fix or replace the template "
                                  "(chat_template in the config file).")
        return in_template

    def on_call(frame: Any, event: str, arg: Any) -> Any:
        return in_template if frame.f_code.co_filename == _JINJA_FILE else None

    previous = sys.gettrace()
    sys.settrace(on_call)
    try:
        return render()
    finally:
        sys.settrace(previous)
