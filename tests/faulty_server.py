"""`python tests/faulty_server.py serve ...`: openmlx whose generations asking for exactly
`FAULT_MAX_TOKENS` tokens fail half-way, as a bug in a model or kernel would (the error paths'
tests in test_hardening.py). Every other request runs as usual."""
from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout, not tests/, names engine

from engine.engine import Engine  # noqa: E402
from engine.request import Prepared, TextDelta  # noqa: E402

FAULT_MAX_TOKENS = 10


class FaultyRunner:
    """The runner, failing once it has sent more than half of the tokens asked for."""

    def __init__(self, runner: Any) -> None:
        self._runner = runner

    def run(self, prepared: Prepared, cancelled: Callable[[], bool]) -> Iterator[Any]:
        sent = 0
        for event in self._runner.run(replace(prepared, runner=self._runner), cancelled):
            yield event
            sent += isinstance(event, TextDelta)
            if sent > prepared.max_tokens // 2:
                raise RuntimeError("injected fault (tests/faulty_server.py)")


_stream = Engine.stream


def _faulty_stream(self: Engine, prepared: Prepared):
    if prepared.max_tokens == FAULT_MAX_TOKENS:
        prepared = replace(prepared, runner=FaultyRunner(prepared.runner))
    return _stream(self, prepared)


if __name__ == "__main__":
    Engine.stream = _faulty_stream  # type: ignore[method-assign]
    from handlers.cli import main

    main()
