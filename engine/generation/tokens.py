"""Tokenizing only as much text as a model can read, and a tokenizer's own failures as clear errors.

A prompt rendered from a 10 MB request, or a rerank query of 100,000 CJK characters, would take
seconds and gigabytes to tokenize whole, to then be refused or cut to a few thousand tokens.
`encode_prefix` tokenizes growing prefixes of the text until it has the tokens asked for (or
the whole text): the work stays within a small factor of what is kept.

tokenizers is Rust: a malformed tokenizer.json (a normalizer's bad `precompiled_charsmap`, say)
panics, and pyo3 raises that as `PanicException`, a BaseException that `except Exception` lets
through to a 500. `guarded` turns it, and any other error of the tokenizer, into a 501.
"""
from __future__ import annotations

import weakref
from typing import Any, Callable, TypeVar

from engine.errors import Unsupported

T = TypeVar("T")
SLACK = 16  # tokens beyond those asked for: a prefix's last few tokens may differ from the whole text's
MAX_PROMPT_CHARS = 1 << 23  # a rendered prompt of more characters is past any context (8 Mi)
_longest: "weakref.WeakKeyDictionary[Any, int]" = weakref.WeakKeyDictionary()


class TokenizerFailed(Unsupported):
    """The model's tokenizer raised (or panicked) on the text: 501."""

    code = "tokenizer_error"


def is_panic(error: BaseException) -> bool:
    """A Rust panic surfaced by pyo3 (pyo3_runtime.PanicException, not an Exception subclass)."""
    return type(error).__name__ == "PanicException"


def guarded(call: Callable[[], T], what: str = "tokenizer") -> T:
    """`call()` (a tokenizer call) with its panics and errors turned into TokenizerFailed."""
    try:
        return call()
    except Exception as e:
        raise TokenizerFailed(f"The model's {what} failed on this text ({e.__class__.__name__}: {str(e)[:200]}).") \
            from e
    except BaseException as e:
        if not is_panic(e):
            raise
        raise TokenizerFailed(f"The model's {what} failed on this text (a panic in tokenizers: "
                              f"{str(e)[:200]}); its tokenizer files may be broken.") from None


def longest_token_chars(tokenizer: Any) -> int:
    """The most characters one token of this vocabulary stands for (its longest entry; byte-level
    entries spell each byte as one character, so this is a bound). Computed once per tokenizer."""
    try:
        return _longest[tokenizer]
    except (KeyError, TypeError):
        pass
    try:
        vocab = tokenizer.get_vocab()
        longest = max((len(k) for k in vocab), default=16)
    except Exception:  # a tokenizer without a vocabulary to read: a generous guess
        longest = 256
    longest = max(longest, 1)
    try:
        _longest[tokenizer] = longest
    except TypeError:  # not weakly referable: computed again next time
        pass
    return longest


def prompt_chars(tokenizer: Any, context_length: int) -> int:
    """The most characters a prompt this model can read may have: its context times the longest
    token (a longer text has more tokens than the context, whatever it says)."""
    return min(MAX_PROMPT_CHARS, (context_length + SLACK) * longest_token_chars(tokenizer))


def encode_prefix(tokenizer: Any, text: str, n: int, add_special_tokens: bool = False) -> tuple[list[int], bool]:
    """The first `n` tokens of `text` and whether it has more. Growing prefixes of the text are
    tokenized until one yields `n + SLACK` tokens or the text ends, so a text far past `n` costs
    about `n` tokens' work. When nothing is cut, the ids are exactly the whole text's."""
    encode: Callable[[str], list[int]] = lambda t: list(tokenizer.encode(t, add_special_tokens=add_special_tokens))
    chars = max(4 * (n + SLACK), 1024)  # most tokens cover a few characters; grown below if not
    while True:
        ids = guarded(lambda: encode(text[:chars]))
        if chars >= len(text):
            return ids[:n], len(ids) > n
        if len(ids) >= n + SLACK:
            return ids[:n], True
        # characters per token so far, with room: usually the next try is the last
        chars = max(2 * chars, int(chars * (n + SLACK) / max(len(ids), 1) * 1.25))
