"""Every `serve` setting, declared once (`SERVE`): its flag (which is also its config-file key),
how a value is read and bounded, its help, the environment variable that stands in for it, and
the field it fills. The command line (handlers/cli.py), the config file's JSON Schema
(handlers/commands/config_file.py, made from the flags) and `EngineConfig` (`engine_config`) are all
made from this table.

A setting that fills a field of `EngineConfig`, `ImageLimits`, `ServerConfig` or `ImageSources`
takes its default from that field (stated there, once): its flag has no default of its own, so a
flag left out is absent from the parsed arguments and the field keeps its default. Only settings
that fill no such field (the host, logging, connection limits) state their default here. The
engine is not imported to build the parser: `--threads` must be set before OpenBLAS loads.
"""
from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

if TYPE_CHECKING:
    from engine.config import EngineConfig


def _number(text: str, convert: Callable[[str], Any], kind: str, ok: Callable[[Any], bool], rule: str) -> Any:
    """`text` as a number that keeps `ok`, or argparse's error naming the rule."""
    try:
        value = convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {kind}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"{text} {rule}")
    return value


def positive_int(text: str) -> int:
    """A count or size flag: a whole number of at least 1 (0 or -1 would disable a limit silently)."""
    return _number(text, int, "a whole number", lambda v: v >= 1, "must be at least 1")


def positive_float(text: str) -> float:
    """A duration or limit flag: a finite number above 0 (NaN or inf would never fire)."""
    return _number(text, float, "a number", lambda v: math.isfinite(v) and v > 0, "must be a finite number above 0")


def seconds_or_off(text: str) -> float:
    """A deadline flag where 0 turns the deadline off: a finite number of at least 0."""
    return _number(text, float, "a number", lambda v: math.isfinite(v) and v >= 0, "must be 0 (off) or a finite number above 0")


def keep_alive(text: str) -> float:
    """Ollama's keep_alive: seconds or a duration ("5m", "1h30m"); negative: forever."""
    from engine.errors import EngineError
    from handlers.wire.ollama_protocol import parse_duration

    try:
        return parse_duration(text, "--keep-alive")
    except EngineError as e:
        raise argparse.ArgumentTypeError(e.message) from None


def port_number(text: str) -> int:
    """A TCP port, 0-65535 (0: the system picks a free one)."""
    return _number(text, int, "a port number", lambda v: 0 <= v <= 65535, "is not a port (0-65535)")


def effort_budgets(text: str | tuple[int, int, int]) -> tuple[int, int, int]:
    """Thinking budgets for reasoning efforts low, medium and high: three whole numbers, LOW,MEDIUM,HIGH."""
    if isinstance(text, tuple):  # already read
        return text
    parts = text.split(",")
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"{text!r} is not three budgets LOW,MEDIUM,HIGH (e.g. 512,2048,8192)")
    return tuple(positive_int(p.strip()) for p in parts)  # type: ignore[return-value]


# The same rules for a config file's values (argparse does not convert a file's values).
FLAG_SCHEMAS = {positive_int: {"type": "integer", "minimum": 1},
                positive_float: {"type": "number", "exclusiveMinimum": 0, "maximum": 1e15},
                seconds_or_off: {"type": "number", "minimum": 0, "maximum": 1e15},
                port_number: {"type": "integer", "minimum": 0, "maximum": 65535},
                effort_budgets: {"type": "string", "pattern": "^ *[1-9][0-9]* *, *[1-9][0-9]* *, *[1-9][0-9]* *$"}}

_FIELD = object()  # the default is the field's own (see `Setting.into`)


def _folder(value: Optional[str]) -> Optional[Path]:
    return Path(value).expanduser() if value else None


def _folders(values: Optional[list[str]]) -> list[Path]:
    return [Path(v) for v in values or []]


@dataclass(frozen=True)
class Setting:
    """One setting: `--flag` on the command line, `flag` in a config file."""

    flag: str
    help: Optional[str] = None
    type: Optional[Callable[[str], Any]] = None
    choices: Optional[Sequence[Any]] = None
    metavar: Optional[str] = None
    action: Optional[str] = None  # "store_true" or "append"
    env: Optional[str] = None  # read when the flag is absent
    # The fields it fills, as "engine.<EngineConfig field>", "images.<ImageLimits field>",
    # "server.<ServerConfig field>" or "sources.<ImageSources field>"; their defaults are its default.
    into: tuple[str, ...] = ()
    default: Any = _FIELD  # only for a setting that fills no field
    to_field: Callable[[Any], Any] = lambda value: value  # the parsed value as the field holds it

    @property
    def dest(self) -> str:
        return self.flag.replace("-", "_")

    def add_to(self, parser: argparse.ArgumentParser, **override: Any) -> None:
        """Add the flag to `parser` (`override`: e.g. another help for another command)."""
        kwargs: dict[str, Any] = {"help": self.help}
        if self.action:
            kwargs["action"] = self.action
        kwargs.update({k: v for k, v in (("type", self.type), ("choices", self.choices), ("metavar", self.metavar))
                       if v is not None})
        default = self.default
        if default is _FIELD:
            default = argparse.SUPPRESS  # absent: the field keeps its default
        if self.env and self.env in os.environ:
            default = os.environ[self.env]  # a string: argparse reads it with `type` like a flag's value
        kwargs["default"] = default
        kwargs.update(override)
        parser.add_argument(f"--{self.flag}", **kwargs)


_TIMEOUT = dict(type=positive_float, metavar="SECONDS")

# `openmlx serve`'s settings, in the order `--help` lists them.
SERVE: tuple[Setting, ...] = (
    Setting("config", type=Path, metavar="FILE", default=None,
            help="a YAML file of settings under these flags' names and a models: list (flags given "
                 "here override it); its JSON Schema: `openmlx config-schema`"),
    Setting("model", env="OPENMLX_MODEL", into=("engine.model",),
            help="model id or local folder to preload (default: the embedded SmolLM2-135M-Instruct)"),
    Setting("embedding-model", env="OPENMLX_EMBEDDING_MODEL", into=("engine.embedding_model",),
            help="embedding model id or sentence-transformers BERT folder (default: the embedded "
                 "all-MiniLM-L6-v2; 'none' to serve no embeddings)"),
    Setting("rerank-model", env="OPENMLX_RERANK_MODEL", into=("engine.rerank_model",),
            help="the model /v1/rerank uses when a request names none: an embedding model, a cross-encoder "
                 "folder (BertForSequenceClassification) or a text model (default: the embedding model)"),
    Setting("audio-model", env="OPENMLX_AUDIO_MODEL", into=("engine.audio_model",),
            help="speech-to-text model id or Whisper folder (default: the embedded whisper-tiny.en; "
                 "'none' to serve no transcriptions)"),
    Setting("max-audio-bytes", type=positive_int, into=("server.max_audio_bytes",),
            help="largest audio upload (413 beyond it, enforced while reading)"),
    Setting("max-audio-seconds", type=positive_float, into=("engine.max_audio_seconds",),
            help="longest audio transcribed, decided from the file's header before decoding (413 beyond)"),
    Setting("host", env="OPENMLX_HOST", default="127.0.0.1"),
    Setting("port", type=port_number, env="OPENMLX_PORT", default=8000),
    Setting("max-tokens", type=positive_int, into=("engine.default_max_tokens",),
            help="default max_tokens when a request sets none"),
    Setting("max-tokens-cap", type=positive_int, into=("engine.max_tokens_cap",),
            help="reject requests whose max_tokens is above this (400)"),
    Setting("prompt-cache-bytes", type=positive_int, into=("engine.prompt_cache_bytes",),
            help="KV caches kept per text model for reuse by later prompts (conversations' histories and "
                 "shared prefixes; least recently used out first)"),
    Setting("kv-bits", type=int, choices=[8, 4], into=("engine.kv_bits",),
            help="when --prompt-cache-bytes is reached, quantize the least recently used cached prompts to "
                 "this many bits before dropping any: 3.6x (8) or 6.4x (4) less than float32, so more "
                 "histories stay; reusing one costs a dequantize and a little drift (docs/benchmarks.md). "
                 "Running streams and --prompt-cache-dir stay exact; the newest prompt is quantized last"),
    Setting("kv-group-size", type=int, choices=[32, 64, 128], into=("engine.kv_group_size",),
            help="values per quantization group with --kv-bits"),
    Setting("prompt-cache-dir", env="OPENMLX_PROMPT_CACHE_DIR", into=("engine.prompt_cache_dir",), to_field=_folder,
            help="also keep prompt KV caches in this folder, so they survive restarts (per model; "
                 "unreadable or foreign files are removed)"),
    Setting("prompt-cache-dir-bytes", type=positive_int, into=("engine.prompt_cache_dir_bytes",),
            help="the most bytes --prompt-cache-dir holds (least recently used files out first)"),
    Setting("reasoning-budgets", type=effort_budgets, metavar="LOW,MEDIUM,HIGH", into=("engine.reasoning_budgets",),
            help="thinking tokens a reasoning model may spend for reasoning efforts low, medium and high "
                 "(chat reasoning_effort, Responses reasoning.effort); past it the server closes the block"),
    Setting("cpu-dtype", choices=["auto", "keep", "float32", "float16", "quantized"], env="OPENMLX_CPU_DTYPE",
            into=("engine.cpu_dtype",),
            help="CPU weights: auto = float32 when memory allows (fast with OpenBLAS), keep = as shipped, "
                 "quantized = held as blocks (a GGUF file's in its own bit widths through compiled kernels, "
                 "an MLX folder's through onnxruntime MatMulNBits)"),
    Setting("max-batch-tokens", type=positive_int, into=("server.max_batch_tokens",),
            help="tokens one request may ask for: prompts plus max_tokens, times n or best_of (400 beyond)"),
    Setting("max-queue", type=positive_int, into=("engine.max_queue",), help="requests queued or running before 429"),
    Setting("request-timeout", type=seconds_or_off, metavar="SECONDS", into=("engine.request_timeout_s",),
            to_field=lambda v: None if float(v) == 0 else float(v),
            help="cut off a generation after this long, queue time included (504); 0: never (coding agents' "
                 "first prompts can take longer than the default to read on a CPU)"),
    Setting("max-models", type=positive_int, into=("engine.max_models",),
            help="models kept loaded (least recently used goes)"),
    Setting("idle-unload", **_TIMEOUT, into=("engine.idle_unload_s",), help="unload models unused for this long"),
    Setting("keep-alive", type=keep_alive, metavar="DURATION", into=("engine.keep_alive_s",),
            help="Ollama's API: keep a model loaded this long after a request that sets no keep_alive "
                 "(seconds or e.g. 5m, 1h30m; negative: until the server stops)"),
    Setting("assume-available-memory", type=positive_int, metavar="BYTES", into=("engine.available_memory_override",),
            help="use this instead of the measured available memory in the memory gate"),
    Setting("max-body-bytes", type=positive_int, into=("server.max_body_bytes",)),
    Setting("max-connections", type=positive_int, default=1000,
            help="open connections at most (a new one past it gets 503 and is closed)"),
    Setting("header-timeout", **_TIMEOUT, default=10.0,
            help="close a connection that has not sent a whole request head within this long"),
    Setting("max-connections-per-client", type=positive_int, metavar="N", default=None,
            help="open connections from one client address at most (default: a quarter of --max-connections)"),
    Setting("body-timeout", **_TIMEOUT, into=("server.body_timeout_s",),
            help="a request body must arrive whole within this long after its head (else 408, closed)"),
    Setting("shutdown-timeout", type=positive_float, default=5.0,
            help="seconds running requests get to finish on SIGTERM/SIGINT"),
    Setting("api-key", action="append", default=None, help="require this bearer key on /v1/* (repeatable)"),
    Setting("api-key-file", default=None, help="a file of API keys, one per line"),
    Setting("cors-origin", action="append", default=None,
            help="allow browser requests from this origin (repeatable; '*' only if you mean it). Off by default"),
    Setting("allowed-hosts", action="append", metavar="HOST", into=("server.allowed_hosts",),
            to_field=lambda values: [h.strip() for v in values or [] for h in v.split(",") if h.strip()],
            help="also answer requests whose Host header names HOST (repeatable or comma-separated; "
                 "'.example.com' for its subdomains, '*' for any). On a loopback --host only localhost, "
                 "127.0.0.1 and [::1] are answered without it (a guard against DNS rebinding); on another "
                 "--host every name is, unless this is given"),
    Setting("responses-max", type=positive_int, into=("server.responses_max",),
            help="stored Responses API responses kept (least recently used out first)"),
    Setting("responses-max-bytes", type=positive_int, into=("server.responses_max_bytes",),
            help="bytes of stored responses kept, in memory and in --responses-dir (least recently used "
                 "out first; an image carried by many turns counts once)"),
    Setting("responses-ttl", type=positive_float, into=("server.responses_ttl",),
            help="seconds a stored response is kept"),
    Setting("responses-dir", type=Path, into=("server.responses_dir",),
            help="also keep stored responses as JSON files here (they survive a restart)"),
    Setting("batch", choices=["auto", "on", "off"], env="OPENMLX_BATCH", into=("engine.batch",),
            help="decode concurrent streams of a text model together with mlx-lm's BatchGenerator "
                 "(auto = on; off: one stream per step, round-robin)"),
    Setting("allow-download", action="store_true", into=("engine.hub_download",),
            help="fetch a requested ORG/NAME that is not in the store from the Hugging Face Hub on its first "
                 "request (one download at a time; the memory gate and the architecture are checked before "
                 "the weights are fetched; HF_TOKEN for gated repos)"),
    Setting("download-timeout", **_TIMEOUT, into=("engine.download_timeout_s",),
            help="a Hub download must finish within this long (the transfer is cut off, the request gets 504)"),
    Setting("max-store-bytes", type=positive_int, metavar="BYTES", into=("engine.max_store_bytes",),
            help="the model store's quota: downloaded models least recently used are removed to make room "
                 "for a new download (507 when they can't be)"),
    Setting("speculative", choices=["auto", "ngram", "draft", "off"], env="OPENMLX_SPECULATIVE",
            into=("engine.speculative",),
            help="speculative decoding: guess tokens and check them in one pass, same answers "
                 "(auto = the --draft-model when given, else prompt lookup; ngram = prompt lookup: "
                 "guesses copied from the prompt and the answer so far; off)"),
    Setting("draft-model", metavar="ID|PATH", into=("engine.draft_model",),
            help="a smaller model with the same tokenizer that drafts tokens for speculative decoding"),
    Setting("num-draft-tokens", type=positive_int, metavar="N", into=("engine.num_draft_tokens",),
            help="the most tokens drafted per pass (speculative decoding; adapted per request below it)"),
    Setting("allow-image-urls", action="store_true", into=("sources.allow_urls",),
            help="let vision requests name http(s) image URLs, which the server fetches (off: data: URLs only)"),
    Setting("image-url-allow-private", action="store_true", default=False,
            help="with --allow-image-urls: also fetch from private networks (10/8, 172.16/12, 192.168/16, "
                 "fc00::/7), for a trusted LAN; loopback and link-local stay refused"),
    Setting("image-url-allow-network", action="append", metavar="CIDR", default=None,
            help="with --allow-image-urls: also fetch from this non-public network (repeatable)"),
    Setting("image-fetch-timeout", **_TIMEOUT, into=("sources.timeout_s",),
            help="one deadline for all of a request's image fetches (within --request-timeout)"),
    Setting("image-dir", type=Path, into=("sources.directory",),
            help="let vision requests name local image files under this directory"),
    Setting("max-image-bytes", type=positive_int, into=("images.max_bytes", "sources.max_bytes")),
    Setting("max-image-pixels", type=positive_int, into=("images.max_pixels",)),
    Setting("max-images", type=positive_int, into=("images.max_images", "sources.max_images"),
            help="images per request"),
    Setting("image-chunk-size", type=positive_int, env="OPENMLX_IMAGE_CHUNK_SIZE", into=("images.chunk_size",),
            help="images per vision generation pass (default: $OPENMLX_IMAGE_CHUNK_SIZE, else the engine's; "
                 "capped by the engine)"),
    Setting("log-json", action="store_true", default=False, help="log one JSON object per line"),
    Setting("log-level", default="info"),
)
# What every command that finds models takes (serve, pull, rm, list, show).
COMMON: tuple[Setting, ...] = (
    Setting("model-dir", action="append", metavar="DIR", into=("engine.local_models",), to_field=_folders,
            help="an extra local model folder to serve (repeatable)"),
    Setting("threads", type=positive_int, default=None,
            help="BLAS threads (default: OPENMLX_THREADS or the usable cores)"),
)
# Serving one model over several processes (serve); a rank's `follow` takes shard and backend too.
RANKS: tuple[Setting, ...] = (
    Setting("ranks", type=positive_int, env="OPENMLX_RANKS", into=("engine.world_size",),
            help="split the model over this many processes with MLX's distributed runtime (rank 0 serves HTTP)"),
    Setting("hostfile", type=Path, default=None,
            help="an MLX hostfile to spread ranks over hosts (through mlx.launch); default: this machine"),
    Setting("shard", choices=["auto", "tensor", "pipeline"], into=("engine.shard",),
            help="how to split the model (auto: tensor parallel where possible, else pipeline)"),
    Setting("backend", choices=["ring", "mpi"], into=("engine.backend",),
            help="MLX's distributed backend (ring stays on 127.0.0.1 here; MPI's launcher listens "
                 "on all interfaces)"),
    Setting("ring-port", type=port_number, default=None,
            help="first port of the ring (one per rank; default: free ports)"),
)
SETTINGS: dict[str, Setting] = {s.flag: s for s in (*SERVE, *COMMON, *RANKS)}


def fields_of(args: argparse.Namespace, part: str) -> dict[str, Any]:
    """The values the parsed arguments give for one dataclass's fields (`part`: engine, images,
    server or sources); a field no argument gives is left out, to keep its default."""
    given = vars(args)
    values: dict[str, Any] = {}
    for setting in SETTINGS.values():
        for target in setting.into:
            where, name = target.split(".")
            if where == part and setting.dest in given:
                values[name] = setting.to_field(given[setting.dest])
    return values


def engine_config(args: argparse.Namespace) -> "EngineConfig":
    """The engine's settings from parsed arguments (a setting the command doesn't take keeps its default)."""
    from dataclasses import replace

    from engine.config import EngineConfig, ImageLimits

    values = fields_of(args, "engine")
    if "models" in vars(args):  # a config file's models: list (config_file.apply)
        values["models"] = list(args.models)
    limits = ImageLimits(**fields_of(args, "images"))
    limits = replace(limits, chunk_size=min(max(1, limits.chunk_size), limits.max_chunk_size))
    return EngineConfig(image_limits=limits, **values)
