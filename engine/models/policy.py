"""Policy: whether a probed model may load and run here, as ALLOW / WARN / BLOCK with a reason
and the status a client gets. WARNs are logged and sent in the `X-OpenMLX-Warning` header."""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Optional

from engine.errors import EngineError, InsufficientMemory, Unsupported
from engine.models.probe import Probe


class Action(str, Enum):
    ALLOW = "allow"
    WARN = "warn"
    BLOCK = "block"


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str = ""
    status: Optional[int] = None  # for BLOCK: what the client gets
    code: Optional[str] = None
    warnings: tuple[str, ...] = field(default_factory=tuple)

    def raise_if_blocked(self) -> None:
        if self.action is not Action.BLOCK:
            return
        error: EngineError = InsufficientMemory(self.reason, param="model") if self.status == 507 \
            else Unsupported(self.reason, param="model")
        raise error


def decide_runnable(model_id: str, probe: Probe, serves: tuple[str, ...] = ("text",)) -> Decision:
    """BLOCK (501) what can't run: unknown architecture, broken files, a kind we don't serve."""
    if not probe.runnable:
        return Decision(Action.BLOCK, f"The model '{model_id}' cannot run on this server: {probe.reason}.",
                        501, "unsupported_model")
    if probe.type not in serves:
        return Decision(Action.BLOCK, f"The model '{model_id}' is a {probe.type} model; this server runs "
                                      f"{', '.join(serves)} models for this endpoint.", 501, "unsupported_model")
    warnings = []
    if probe.context_length is None:
        warnings.append(f"'{model_id}' declares no context length; assuming 4096 tokens.")
    return Decision(Action.WARN if warnings else Action.ALLOW, warnings=tuple(warnings))
