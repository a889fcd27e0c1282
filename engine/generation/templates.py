"""Chat templates rendered under a time budget and a size bound.

A template is code that comes with the model, and with `--allow-download` a client picks the
model: a template that loops (nested `range`s, a macro calling itself) would hold the one worker
for good, and the model stays in the store, so it recurs after a restart. Jinja compiles a
template to Python code whose file name is "<template>"; while one renders, a trace function on
this thread checks the clock at each line of that code and abandons the render past the budget.
Other code (the tokenizer, transformers) is not traced line by line, so the cost is small.

The clock alone can't stop one expression: `{{ 'x' * 100000000 }}` is one line that builds
100 MB (a Hub GGUF's template took a server from 0.7 to 8 GB). So templates render in
`BoundedEnvironment`, Jinja's immutable sandbox with every operation that can make a large value
checked before it runs: `*`, `+`, `**` and `%`, `~` concatenation, string methods and filters
that take a width or join many parts, `lipsum`, and the output itself (the template's text, block
sets and macros). A value past the render's bound (`max_chars`: more characters than the model's
context could hold) or more than a few times that built in all is refused before it is made.
transformers compiles every chat template (tokenizers' and processors') through one function,
which builds its environment from the name `ImmutableSandboxedEnvironment` in its module: that name
is pointed at `BoundedEnvironment` once, here.
"""
from __future__ import annotations

import builtins
import functools
import json
import re
import string
import sys
import threading
import time
from typing import Any, Callable, Optional, TypeVar

from jinja2 import nodes
from jinja2.compiler import CodeGenerator, Frame, optimizeconst
from jinja2.sandbox import ImmutableSandboxedEnvironment

from engine.errors import ContextLengthExceeded, EngineError, InvalidRequest, Unsupported
from engine.generation.tokens import TokenizerFailed, is_panic

T = TypeVar("T")
TEMPLATE_BUDGET_S = 5.0  # a real template renders in milliseconds
_JINJA_FILE = "<template>"
DEFAULT_MAX_CHARS = 1 << 22  # a render with no bound of its own (4 Mi characters)
BUILT_FACTOR = 8  # all the values a render builds: at most this many times its bound
MAX_INT_BITS = 1 << 16  # `10 ** 10 ** 9` would compute for ever
_state = threading.local()  # this thread's render: .limit, .built

# What a chat template raises for messages it won't render (role order, missing fields): the
# client's to fix (400). Anything else a template raises (`range(10**9)`'s OverflowError, a
# division by zero) is the template's fault (501).
try:
    from jinja2 import TemplateError as _TemplateError
except ImportError:  # pragma: no cover - transformers brings jinja2
    _TemplateError = ValueError
TEMPLATE_ERRORS = (_TemplateError, ValueError, TypeError, KeyError, IndexError, RecursionError)


class TemplateTooSlow(Unsupported):
    """The model's chat template did not finish within the budget (a loop, or far too much work)."""

    code = "chat_template_timeout"


class TemplateTooLarge(ContextLengthExceeded):
    """The template would build a value larger than any prompt this model can read (400)."""


class TemplateFailed(Unsupported):
    """The model's chat template raised an error of its own (not a complaint about the messages): 501."""

    code = "chat_template_error"


def render_bounded(render: Callable[[], T], budget_s: float = TEMPLATE_BUDGET_S,
                   max_chars: Optional[int] = None) -> T:
    """`render()` (a call that renders a chat template) abandoned with TemplateTooSlow after
    `budget_s`, and with TemplateTooLarge where it would build a value of more than `max_chars`
    characters (or more than BUILT_FACTOR times that in all)."""
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
    before = (getattr(_state, "limit", None), getattr(_state, "built", 0))
    _state.limit, _state.built = max_chars or DEFAULT_MAX_CHARS, 0
    sys.settrace(on_call)
    try:
        return render()
    finally:
        sys.settrace(previous)
        _state.limit, _state.built = before


def render_chat(render: Callable[[], T], max_chars: int, param: str = "messages") -> T:
    """`render_bounded(render, max_chars=...)` with every error it can raise made an EngineError:
    the template's complaint about the messages a 400 naming `param`, any other failure of the
    template (or a tokenizer's panic inside it) a 501. Never a 500."""
    try:
        return render_bounded(render, max_chars=max_chars)
    except EngineError:
        raise
    except TEMPLATE_ERRORS as e:  # templates raise their own errors for e.g. role order
        raise InvalidRequest(f"The model's chat template rejected the messages: {e}", param=param) from e
    except Exception as e:
        raise TemplateFailed(f"The model's chat template failed ({e.__class__.__name__}: {str(e)[:300]}); fix or "
                             "replace the template (chat_template in the config file).") from e
    except BaseException as e:
        if not is_panic(e):
            raise
        raise TokenizerFailed(f"The model's tokenizer failed while applying the chat template (a panic in "
                              f"tokenizers: {str(e)[:200]}); its tokenizer files may be broken.") from None


# --- the bound --------------------------------------------------------------------------------
def _limit() -> int:
    return getattr(_state, "limit", None) or DEFAULT_MAX_CHARS


def _too_large(what: str, size: int) -> TemplateTooLarge:
    return TemplateTooLarge(f"The chat template would build {what} of {size:,} characters, more than a prompt this "
                            f"model can read ({_limit():,} characters at most). Shorten the messages, or fix or "
                            "replace the model's chat template.", param="messages")


def _grow(size: int, what: str = "a string") -> None:
    """A value of `size` characters (or items) is about to be built: within the bound, or refused."""
    limit = _limit()
    if size > limit:
        raise _too_large(what, size)
    built = getattr(_state, "built", 0) + size
    if built > BUILT_FACTOR * limit:
        raise _too_large("values", built)
    _state.built = built


def _weight(value: Any, depth: int = 0) -> int:
    """About how many characters `value` prints as: strings by length, containers by their contents
    (a list of 300,000 references to one long message is long, whatever its item count)."""
    if isinstance(value, (str, bytes)):
        return len(value)
    if depth > 8:
        return 1
    if isinstance(value, (list, tuple, set, frozenset)):
        total = 0
        for item in value:
            total += _weight(item, depth + 1) + 2
            if total > BUILT_FACTOR * _limit():
                break  # already far past any bound: no need to walk the rest
        return total
    if isinstance(value, dict):
        return sum(_weight(k, depth + 1) + _weight(v, depth + 1) + 4 for k, v in value.items())
    return 1


def _check_int_bits(a: int, b: int, op: str) -> None:
    if op == "*":
        bits = a.bit_length() + b.bit_length()
    else:  # "**"
        bits = b * max(abs(a).bit_length(), 1) if abs(a) > 1 and b > 0 else 0
    if bits > MAX_INT_BITS:
        raise TemplateTooLarge(f"The chat template would compute a number of about {bits * 3 // 10:,} digits; fix or "
                               "replace the model's chat template.", param="messages")


_PERCENT = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?")


def _check_percent(fmt: str, args: Any) -> None:
    """`fmt % args`: refuse field widths and precisions past the bound before formatting."""
    values = args if isinstance(args, tuple) else (args,)
    widths = 0
    for match in _PERCENT.finditer(fmt):
        for group in match.groups():
            if group == "*":
                widths += sum(v for v in values if isinstance(v, int) and v > 0)
            elif group:
                widths += int(group)
    _grow(len(fmt) + widths + sum(_weight(v) for v in values))


def _check_format(fmt: str, args: tuple, kwargs: dict) -> None:
    """`fmt.format(...)`: widths in the format specs (nested `{}` in a spec take the arguments')."""
    widths = 0
    try:
        fields = list(string.Formatter().parse(fmt))
    except ValueError:
        return  # format() raises the same error itself
    for _literal, _name, spec, _conversion in fields:
        if spec and "{" in spec:
            widths += sum(v for v in [*args, *kwargs.values()] if isinstance(v, int) and v > 0)
        widths += sum(int(d) for d in re.findall(r"\d+", spec or ""))
    _grow(len(fmt) + widths + sum(_weight(v) for v in [*args, *kwargs.values()]))


def _check_str_method(owner: Any, name: str, args: tuple, kwargs: dict) -> None:
    """String (and bytes) methods whose result can be far larger than the string."""
    size = len(owner)
    if name in ("ljust", "rjust", "center", "zfill"):
        width = args[0] if args else kwargs.get("width", 0)
        if isinstance(width, int):
            _grow(max(size, width))
    elif name == "expandtabs":
        tab = args[0] if args else kwargs.get("tabsize", 8)
        if isinstance(tab, int):
            _grow(size + owner.count("\t" if isinstance(owner, str) else b"\t") * max(tab, 0))
    elif name == "replace" and len(args) >= 2:
        old, new = args[0], args[1]
        if isinstance(old, type(owner)) and isinstance(new, type(owner)):
            hits = owner.count(old) if old else size + 1
            if len(args) > 2 and isinstance(args[2], int) and args[2] >= 0:
                hits = min(hits, args[2])
            _grow(size + hits * max(len(new) - len(old), 0))
    elif name == "join" and args:
        parts = args[0]
        _grow(_weight(parts) + size * max(len(parts) - 1 if hasattr(parts, "__len__") else 0, 0))
    elif name == "translate" and args and isinstance(args[0], dict):
        longest = max((len(v) for v in args[0].values() if isinstance(v, (str, bytes))), default=1)
        _grow(size * max(longest, 1))


def _check_result(value: Any) -> Any:
    if isinstance(value, (str, bytes, list, tuple)) and len(value) > _limit():
        raise _too_large("a value", len(value))
    return value


def _bounded_concat(parts: Any) -> str:
    """The template's output (and block sets' and macros'): joined while it stays within the bound."""
    out, size, limit = [], 0, _limit()
    for part in parts:
        size += len(part)
        if size > limit:
            raise _too_large("a prompt", size)
        out.append(part)
    return "".join(out)


def _join(parts: tuple) -> str:
    """`a ~ b ~ c`."""
    _grow(sum(_weight(p) for p in parts))
    return "".join(map(str, parts))


def _finalize(value: Any) -> Any:
    """Each `{{ value }}` before it becomes text: a list or dict prints as long as its contents."""
    if not isinstance(value, str) and _weight(value) > _limit():
        raise _too_large("a printed value", _weight(value))
    return value


# Filters whose result can be far larger than their input, checked before they run (the
# argument after the value, where the filter takes Jinja's context or environment first).
def _filter_check(name: str, args: tuple, kwargs: dict) -> None:
    if name == "center" and args:
        width = args[1] if len(args) > 1 else kwargs.get("width", 80)
        if isinstance(width, int):
            _grow(max(len(str(args[0])), width))
    elif name == "indent" and args:
        width = args[1] if len(args) > 1 else kwargs.get("width", 4)
        text = str(args[0])
        step = len(width) if isinstance(width, str) else width if isinstance(width, int) else 0
        _grow(len(text) + (text.count("\n") + 1) * max(step, 0))
    elif name == "join" and len(args) > 1:  # (eval_ctx, value, d="", attribute=None)
        sep = args[2] if len(args) > 2 else kwargs.get("d", "")
        _grow(_weight(args[1]) + len(str(sep)) * max(len(args[1]) - 1 if hasattr(args[1], "__len__") else 0, 0))
    elif name == "replace" and len(args) > 3:  # (eval_ctx, s, old, new, count=None)
        _check_str_method(str(args[1]), "replace", (str(args[2]), str(args[3]),
                                                    *([args[4]] if len(args) > 4 and args[4] else [])), {})
    elif name == "format" and args and isinstance(args[0], str):
        _check_percent(args[0], kwargs if kwargs else tuple(args[1:]))
    elif name == "wordwrap" and len(args) > 1:  # (environment, s, width=79, break_long_words, wrapstring)
        text = str(args[1])
        width = args[2] if len(args) > 2 else kwargs.get("width", 79)
        wrap = args[4] if len(args) > 4 else kwargs.get("wrapstring") or "\n"
        if isinstance(width, int):
            _grow(len(text) + (len(text) // max(width, 1) + 1) * len(str(wrap)))
    elif name == "tojson":  # Jinja's own (eval_ctx, value, indent=None); transformers' is streamed instead
        indent = args[2] if len(args) > 2 else kwargs.get("indent")
        _check_indent(indent)
    elif name in _STRINGIFYING and args:
        value = args[1] if name in _WITH_CONTEXT and len(args) > 1 else args[0]
        if not isinstance(value, str):
            _grow(_weight(value), "a printed value")


# Filters that print their value (a list of 300,000 references to one long message prints long).
_STRINGIFYING = frozenset({"string", "pprint", "e", "escape", "forceescape", "safe", "urlencode", "xmlattr",
                           "title", "capitalize", "upper", "lower", "trim", "striptags", "wordcount", "truncate"})
_WITH_CONTEXT = frozenset({"xmlattr", "truncate", "wordcount"})  # their first argument is Jinja's context


def _check_indent(indent: Any) -> None:
    """json's indent is repeated on every line times its depth: a step of more than 1,024 is refused."""
    if isinstance(indent, bool) or not isinstance(indent, (int, str)):
        return
    step = len(indent) if isinstance(indent, str) else indent
    if step > 1024:
        raise _too_large("a JSON indent", step)


def _streamed_tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
                     sort_keys: bool = False) -> str:
    """transformers' `tojson` (json.dumps with these options, no HTML escaping), written piece by
    piece within the bound rather than whole and then measured."""
    _check_indent(indent)
    encoder = json.JSONEncoder(ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    return _bounded_concat(encoder.iterencode(x))


def _bounded_filter(name: str, func: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(func)  # keeps Jinja's pass_context/pass_eval_context marker
    def bounded(*args: Any, **kwargs: Any) -> Any:
        _filter_check(name, args, kwargs)
        return _check_result(func(*args, **kwargs))

    bounded.__openmlx_bounded__ = True  # type: ignore[attr-defined]
    return bounded


def _bounded_lipsum(n: int = 5, html: bool = True, min: int = 20, max: int = 100) -> str:  # noqa: A002
    """Jinja's `lipsum` (its keyword names), sized before it is made: n paragraphs of up to `max` words."""
    from jinja2.utils import generate_lorem_ipsum

    _grow(builtins.max(n, 0) * builtins.max(max, 1) * 12)
    return generate_lorem_ipsum(n, html, min, max)


class _BoundedCodeGenerator(CodeGenerator):
    """`a ~ b` compiles to the environment's checked join instead of jinja2.runtime's str_join."""

    @optimizeconst
    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        self.write("environment.bounded_join((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class BoundedEnvironment(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox, with every way to build a large value checked first (see the
    module docstring). transformers adds its own filters and globals after construction; they are
    wrapped when the template is compiled."""

    intercepted_binops = frozenset({"*", "+", "**", "%"})
    code_generator_class = _BoundedCodeGenerator
    concat = staticmethod(_bounded_concat)  # type: ignore[assignment]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("finalize", _finalize)
        super().__init__(*args, **kwargs)
        self.globals["lipsum"] = _bounded_lipsum

    @staticmethod
    def bounded_join(parts: tuple) -> str:
        return _join(parts)

    def _bound_filters(self) -> None:
        for name, func in list(self.filters.items()):
            if getattr(func, "__openmlx_bounded__", False):
                continue
            if name == "tojson" and getattr(func, "jinja_pass_arg", None) is None:  # transformers' json.dumps
                func = _streamed_tojson
            self.filters[name] = _bounded_filter(name, func)

    def from_string(self, source: Any, *args: Any, **kwargs: Any) -> Any:
        self._bound_filters()
        return super().from_string(source, *args, **kwargs)

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator in ("*", "**") and type(left) is int and type(right) is int:
            _check_int_bits(left, right, operator)
        elif operator == "*":
            # lists hold references: their items are counted here, what they print as where they are printed
            seq, times = (left, right) if isinstance(right, int) else (right, left)
            if isinstance(seq, (str, bytes, list, tuple)) and isinstance(times, int) and times > 1:
                _grow(len(seq) * times, "a string" if isinstance(seq, (str, bytes)) else "a list")
        elif operator == "+" and isinstance(left, (str, bytes, list, tuple)) and type(left) is type(right):
            _grow(len(left) + len(right), "a string" if isinstance(left, (str, bytes)) else "a list")
        elif operator == "%" and isinstance(left, str):
            _check_percent(left, right)
        return _check_result(super().call_binop(context, operator, left, right))

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        owner = getattr(__obj, "__self__", None)
        if isinstance(owner, (str, bytes)):
            _check_str_method(owner, getattr(__obj, "__name__", ""), args, kwargs)
        return _check_result(super().call(__context, __obj, *args, **kwargs))

    def wrap_str_format(self, value: Any) -> Optional[Callable[..., str]]:
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None
        fmt = value.__self__

        def checked(*args: Any, **kwargs: Any) -> str:
            if value.__name__ == "format_map" and args and isinstance(args[0], dict):
                _check_format(fmt, (), args[0])
            else:
                _check_format(fmt, args, kwargs)
            return _check_result(wrapped(*args, **kwargs))

        return checked


def _install() -> None:
    """Point transformers' chat-template compiler at BoundedEnvironment (see the module docstring)."""
    try:
        from transformers.utils import chat_template_utils
    except ImportError:  # pragma: no cover - mlx-lm brings transformers
        return
    if getattr(chat_template_utils, "ImmutableSandboxedEnvironment", None) is not BoundedEnvironment:
        chat_template_utils.ImmutableSandboxedEnvironment = BoundedEnvironment
        chat_template_utils._compile_jinja_template.cache_clear()


_install()
