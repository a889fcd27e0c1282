"""Ollama's native API (api/types.go): request bodies -> the engine's Conversation and sampling,
engine results -> Ollama's responses and NDJSON chunks, model descriptions, durations.

Connexion has validated the body against openapi.yaml; what is checked here is what the schema
can't say (a keep_alive duration's syntax, `format`'s schema, a tool message's call...).
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Optional, Sequence

from engine.engine import ModelCard, ModelInfo, Resident, grammar_for, size_label
from engine.errors import InvalidRequest
from engine.request import ChatMessage, ToolCall, ToolSpec, Conversation, Fields, Finished, ImageInput, SamplingParams, Thinking
from handlers.conversation.generation import newest_user_index
from handlers.wire.protocol import effort_thinking
from handlers.wire.tools import offer_tools

# The Ollama version /api/version reports: the API this module follows (api/types.go, docs/api.md).
# Clients gate features on it (Copilot Chat needs >= 0.6.4).
VERSION = "0.12.0"
FIELDS = Fields(max_tokens="options.num_predict", prompt="messages", media="messages")
GENERATE_FIELDS = Fields(max_tokens="options.num_predict", prompt="prompt", media="images")
# Options openmlx accepts and does not apply (docs/ollama.md says why): the runner's own
# settings (threads, GPU layers, batch) and samplers mlx-lm's sampling here does not have.
IGNORED_OPTIONS = ("min_p", "repeat_penalty", "repeat_last_n", "typical_p", "num_keep", "num_batch", "num_gpu",
                   "main_gpu", "use_mmap", "num_thread", "numa", "low_vram", "penalize_newline", "mirostat",
                   "mirostat_tau", "mirostat_eta", "tfs_z", "draft_num_predict")
_FOREVER_S = 100 * 365 * 86400.0
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION = re.compile(r"([0-9]*\.?[0-9]+)(ns|us|µs|μs|ms|s|m|h)")


# --- names and durations ---------------------------------------------------------------
def ollama_name(model_id: str) -> str:
    """The name /api/tags lists: Ollama's `name:tag`, `:latest` when the id has no tag."""
    return model_id if ":" in model_id.rsplit("/", 1)[-1] else f"{model_id}:latest"


def parse_duration(value: Any, param: str = "keep_alive") -> float:
    """Seconds from Ollama's keep_alive: a number of seconds or a Go duration ("5m", "1h30m",
    "300ms"; a bare number is seconds too); negative: forever (math.inf). A 400 otherwise."""
    if isinstance(value, bool):
        value = None
    seconds: Optional[float] = None
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        sign = -1.0 if text.startswith("-") else 1.0
        body = text.lstrip("+-")
        try:
            seconds = sign * float(body)  # "300", "-1"
        except ValueError:
            if body and _DURATION.sub("", body) == "":
                seconds = sign * sum(float(n) * _UNITS[u] for n, u in _DURATION.findall(body))
    if seconds is None or math.isnan(seconds):
        raise InvalidRequest(f"{param}: {json.dumps(value)} is not a duration (seconds, or e.g. \"5m\", \"1h30m\"; "
                             "negative keeps the model loaded).", param=param, code="invalid_duration")
    # Negative, or past a century (a date too far to write): until the server stops.
    return math.inf if seconds < 0 or seconds > _FOREVER_S else seconds


def iso(timestamp: Optional[float]) -> str:
    """RFC 3339 with the UTC offset, as Go writes time.Time; None: far in the future (forever)."""
    if timestamp is None:
        return "2318-08-27T13:09:36.999999+00:00"
    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat()


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat()


# --- requests --------------------------------------------------------------------------
@dataclass(frozen=True)
class Options:
    """What a request's `options` (and `format`, `think`) become."""

    params: SamplingParams
    warnings: tuple[str, ...]


def options(body: dict[str, Any], context_length: Optional[int]) -> Options:
    """Ollama's options as the engine's sampling. num_ctx past the model's context is clamped to
    it (a warning says so); options openmlx does not apply are named in a warning."""
    opts = body.get("options") or {}
    warnings: list[str] = []
    num_ctx = opts.get("num_ctx")
    if num_ctx is not None and context_length and num_ctx > context_length:
        warnings.append(f"options.num_ctx={num_ctx} is past the model's context ({context_length} tokens); "
                        f"clamped to {context_length}")
    ignored = sorted(k for k in opts if k in IGNORED_OPTIONS)
    if ignored:
        warnings.append("options not applied by openmlx: " + ", ".join(ignored))
    stop = opts.get("stop")
    stops = tuple(s for s in ((stop,) if isinstance(stop, str) else (stop or ())) if s)  # "" stops nothing
    max_tokens = opts.get("num_predict")
    if max_tokens is not None and max_tokens < 0:  # -1 (and -2): until the context is full
        max_tokens = None
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=None if opts.get("temperature") is None else float(opts["temperature"]),
        top_p=1.0 if opts.get("top_p") is None else float(opts["top_p"]),
        top_k=int(opts.get("top_k") or 0),
        seed=opts.get("seed"),
        stop=stops,
        presence_penalty=float(opts.get("presence_penalty") or 0.0),
        frequency_penalty=float(opts.get("frequency_penalty") or 0.0),
        grammar=_grammar(body.get("format")),
    )
    return Options(params, tuple(warnings))


def _grammar(fmt: Any) -> Optional[str]:
    """`format`: "json" (any JSON object) or a JSON schema -> constrained decoding."""
    if fmt is None or fmt == "":
        return None
    if fmt == "json":
        return grammar_for({"type": "json_object"}, "format")
    if isinstance(fmt, dict):
        return grammar_for({"type": "json_schema", "json_schema": {"schema": fmt}}, "format")
    raise InvalidRequest(f"format must be \"json\" or a JSON schema object, not {json.dumps(fmt)}.", param="format")


def thinking(value: Any) -> Thinking:
    """`think`: true / false (false turns a reasoning model's thinking off), or an effort."""
    if value is None:
        return Thinking()
    if isinstance(value, bool):
        return Thinking(enabled=value)
    return effort_thinking("high" if value == "max" else value)


def images(values: Optional[Sequence[str]], where: str) -> tuple[ImageInput, ...]:
    """Base64 images (Ollama sends the bytes, never URLs) as data: URLs."""
    out = []
    for i, data in enumerate(values or ()):
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidRequest(f"{where}.{i} is not base64 image data.", param=f"{where}.{i}") from None
        if not raw:
            raise InvalidRequest(f"{where}.{i} is empty.", param=f"{where}.{i}")
        # The bytes are loaded (and size-checked) with every other image; PIL reads the real format.
        out.append(ImageInput("data:image/png;base64," + data, f"{where}.{i}"))
    return tuple(out)


def _arguments(value: Any) -> str:
    """A call's `arguments` as the engine keeps them (JSON text); Ollama sends an object."""
    if isinstance(value, str):
        return value
    return json.dumps(value if value is not None else {})


def _turns(messages: list[dict[str, Any]]) -> list[ChatMessage]:
    turns: list[ChatMessage] = []
    calls_by_name: dict[str, list[str]] = {}  # open calls of the turn before, so a tool message finds its id
    for i, m in enumerate(messages):
        role, content = m["role"], m.get("content") or ""
        pics = images(m.get("images"), f"messages.{i}.images")
        if role == "assistant":
            calls = tuple(ToolCall(c.get("id") or f"call_{i}_{j}", c["function"]["name"],
                                   _arguments(c["function"].get("arguments")))
                          for j, c in enumerate(m.get("tool_calls") or ()))
            calls_by_name = {}
            for c in calls:
                calls_by_name.setdefault(c.name, []).append(c.id)
            turns.append(ChatMessage("assistant", content, pics, tool_calls=calls))
        elif role == "tool":
            name = m.get("tool_name") or m.get("name")
            call_id = m.get("tool_call_id")
            if not call_id:
                waiting = calls_by_name.get(name or "") or [i for ids in calls_by_name.values() for i in ids]
                call_id = waiting.pop(0) if waiting else f"call_{name or i}"
            turns.append(ChatMessage("tool", content, tool_call_id=call_id))
        else:
            turns.append(ChatMessage(role, content, pics))
    return turns


def tools(body: dict[str, Any]) -> list[ToolSpec]:
    specs = []
    for t in body.get("tools") or ():
        f = t["function"]
        specs.append(ToolSpec(f["name"], f.get("description") or "", json.dumps(f.get("parameters") or {})))
    return specs


def chat_conversation(model_id: str, body: dict[str, Any], opts: Options) -> Conversation:
    """A /api/chat body -> a Conversation (the model already resolved to its id)."""
    messages = body["messages"]
    turns = _turns(messages)
    newest = newest_user_index([m["role"] for m in messages])
    newest_media = frozenset({"image"}) if newest is not None and turns[newest].images else frozenset()
    specs, choice = offer_tools(tools(body), None)
    return Conversation(model_id, turns, opts.params, tuple(specs), newest_media, tool_choice=choice, fields=FIELDS,
                        thinking=thinking(body.get("think")),
                        continue_final=bool(messages) and messages[-1]["role"] == "assistant")


def refuse_suffix(body: dict[str, Any]) -> None:
    """/api/generate's `suffix` (fill-in-the-middle), raw or not: a 400."""
    if body.get("suffix"):
        raise InvalidRequest("suffix (fill-in-the-middle) is not supported by openmlx; send the prompt only.",
                             param="suffix", code="unsupported_parameter")


def generate_conversation(model_id: str, body: dict[str, Any], opts: Options) -> Conversation:
    """A templated /api/generate: the system prompt and the prompt as one user turn (`suffix`
    was refused before: `refuse_suffix`)."""
    turns = [ChatMessage("system", body["system"])] if body.get("system") else []
    pics = images(body.get("images"), "images")
    turns.append(ChatMessage("user", body.get("prompt") or "", pics))
    return Conversation(model_id, turns, opts.params, newest_media=frozenset({"image"}) if pics else frozenset(),
                        fields=GENERATE_FIELDS, thinking=thinking(body.get("think")))


# --- responses -------------------------------------------------------------------------
@dataclass
class Timing:
    """A request's clock, in time.monotonic seconds: start, model ready, first token, end."""

    start: float
    loaded: float = 0.0
    load_s: float = 0.0  # time spent loading the model (0 when it was resident)
    started: float = 0.0  # the generation got its turn
    first: float = 0.0
    end: float = 0.0

    def stats(self, done: Finished) -> dict[str, Any]:
        """done_reason, the counts and the durations (nanoseconds) of the final chunk."""
        ns = lambda s: max(0, int(s * 1e9))  # noqa: E731
        started = self.started or self.loaded or self.start
        first = self.first or self.end
        return {"done_reason": done_reason(done), "total_duration": ns(self.end - self.start),
                "load_duration": ns(self.load_s), "prompt_eval_count": done.prompt_tokens,
                "prompt_eval_duration": ns(first - started), "eval_count": done.completion_tokens,
                "eval_duration": ns(self.end - first)}


def done_reason(done: Finished) -> str:
    return {"length": "length", "cancelled": "stop"}.get(done.finish_reason, "stop")


def tool_calls(calls: Sequence[ToolCall]) -> list[dict[str, Any]]:
    """Ollama's calls: arguments as an object, the call's index among the answer's calls."""
    out = []
    for i, c in enumerate(calls):
        try:
            args = json.loads(c.arguments)
        except ValueError:
            args = {}
        out.append({"id": c.id, "function": {"index": i, "name": c.name,
                                             "arguments": args if isinstance(args, dict) else {}}})
    return out


def chat_message(content: str, thinking_text: Optional[str] = None,
                 calls: Sequence[ToolCall] = ()) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if thinking_text:
        message["thinking"] = thinking_text
    if calls:
        message["tool_calls"] = tool_calls(calls)
    return message


def digest(info: ModelInfo) -> str:
    """A stable identifier of the model's files (Ollama's is its manifest's sha256)."""
    return hashlib.sha256(f"{info.id}\0{info.path}\0{info.created}\0{info.size_bytes}".encode()).hexdigest()


def details(info: ModelInfo, card: ModelCard) -> dict[str, Any]:
    family = card.family or info.architecture or "unknown"
    return {"parent_model": "", "format": "safetensors", "family": family, "families": [family],
            "parameter_size": size_label(card.parameter_count), "quantization_level": card.quantization}


def tag(info: ModelInfo, card: ModelCard) -> dict[str, Any]:
    """One model of /api/tags."""
    name = ollama_name(info.id)
    return {"name": name, "model": name, "modified_at": iso(info.created), "size": info.size_bytes,
            "digest": digest(info), "details": details(info, card), "capabilities": list(card.capabilities)}


def show(info: ModelInfo, card: ModelCard) -> dict[str, Any]:
    """/api/show: details, capabilities, model_info with the architecture's context and
    embedding lengths, the chat template and the generation defaults."""
    arch = card.family or info.architecture or "unknown"
    model_info: dict[str, Any] = {"general.architecture": arch, "general.basename": info.id.rsplit("/", 1)[-1]}
    if card.parameter_count:
        model_info["general.parameter_count"] = card.parameter_count
    if info.context_length:
        model_info[f"{arch}.context_length"] = info.context_length
    length = info.embedding_dim or card.embedding_length
    if length:
        model_info[f"{arch}.embedding_length"] = length
    parameters = "\n".join(f"{k:<20} {v}" for k, v in card.defaults.items())
    return {"license": "", "modelfile": f"# openmlx serves {info.id} from {info.path}\nFROM {info.path}\n",
            "parameters": parameters, "template": card.template, "details": details(info, card),
            "model_info": model_info, "capabilities": list(card.capabilities), "modified_at": iso(info.created)}


def running(r: Resident, card: ModelCard, on_gpu: bool) -> dict[str, Any]:
    """One model of /api/ps. size_vram: the model's bytes when MLX runs on the GPU (unified
    memory), 0 on the CPU."""
    name = ollama_name(r.id)
    return {"name": name, "model": name, "size": r.size_bytes, "digest": digest(r.info),
            "details": details(r.info, card), "expires_at": iso(r.expires_at),
            "size_vram": r.size_bytes if on_gpu else 0, "context_length": r.info.context_length or 0}
