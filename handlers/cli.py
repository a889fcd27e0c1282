"""The `openmlx` command: serve, list, show."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from handlers.commands import config_file, model_commands
from handlers.commands.serve import cmd_follow, cmd_serve
from handlers.commands.settings import effort_budgets, port_number, positive_float, positive_int


def prompt_cache_flags(p: argparse.ArgumentParser) -> None:
    """--prompt-cache-bytes, --kv-bits and --kv-group-size, for `serve` and a rank's `follow` alike."""
    p.add_argument("--prompt-cache-bytes", type=positive_int, default=512 << 20,
                   help="KV caches kept per text model for reuse by later prompts (conversations' histories and "
                        "shared prefixes; least recently used out first)")
    p.add_argument("--kv-bits", type=int, choices=[8, 4], default=None,
                   help="when --prompt-cache-bytes is reached, quantize the least recently used cached prompts to "
                        "this many bits before dropping any: 3.6x (8) or 6.4x (4) less than float32, so more "
                        "histories stay; reusing one costs a dequantize and a little drift (docs/benchmarks.md). "
                        "Running streams and --prompt-cache-dir stay exact; the newest prompt is quantized last")
    p.add_argument("--kv-group-size", type=int, choices=[32, 64, 128], default=64,
                   help="values per quantization group with --kv-bits")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="openmlx", description="OpenAI-compatible server for MLX models.")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model-dir", action="append", metavar="DIR",
                       help="an extra local model folder to serve (repeatable)")
        p.add_argument("--threads", type=positive_int, default=None,
                       help="BLAS threads (default: OPENMLX_THREADS or the usable cores)")

    s = sub.add_parser("serve", help="start the server")
    s.add_argument("--config", type=Path, default=None, metavar="FILE",
                   help="a YAML file of settings under these flags' names and a models: list (flags given "
                        "here override it); its JSON Schema: `openmlx config-schema`")
    s.add_argument("--model", default=os.environ.get("OPENMLX_MODEL"),
                   help="model id or local folder to preload (default: the embedded SmolLM2-135M-Instruct)")
    s.add_argument("--embedding-model", default=os.environ.get("OPENMLX_EMBEDDING_MODEL"),
                   help="embedding model id or sentence-transformers BERT folder (default: the embedded "
                        "all-MiniLM-L6-v2; 'none' to serve no embeddings)")
    s.add_argument("--rerank-model", default=os.environ.get("OPENMLX_RERANK_MODEL"),
                   help="the model /v1/rerank uses when a request names none: an embedding model, a cross-encoder "
                        "folder (BertForSequenceClassification) or a text model (default: the embedding model)")
    s.add_argument("--audio-model", default=os.environ.get("OPENMLX_AUDIO_MODEL"),
                   help="speech-to-text model id or Whisper folder (default: the embedded whisper-tiny.en; "
                        "'none' to serve no transcriptions)")
    s.add_argument("--max-audio-bytes", type=positive_int, default=25 << 20,
                   help="largest audio upload (413 beyond it, enforced while reading)")
    s.add_argument("--max-audio-seconds", type=positive_float, default=2 * 3600.0,
                   help="longest audio transcribed, decided from the file's header before decoding (413 beyond)")
    s.add_argument("--host", default=os.environ.get("OPENMLX_HOST", "127.0.0.1"))
    s.add_argument("--port", type=port_number, default=int(os.environ.get("OPENMLX_PORT", "8000")))
    s.add_argument("--max-tokens", type=positive_int, default=None, help="default max_tokens when a request sets none")
    s.add_argument("--max-tokens-cap", type=positive_int, default=None,
                   help="reject requests whose max_tokens is above this (400)")
    prompt_cache_flags(s)
    s.add_argument("--prompt-cache-dir", default=os.environ.get("OPENMLX_PROMPT_CACHE_DIR"),
                   help="also keep prompt KV caches in this folder, so they survive restarts (per model; "
                        "unreadable or foreign files are removed)")
    s.add_argument("--prompt-cache-dir-bytes", type=positive_int, default=4 << 30,
                   help="the most bytes --prompt-cache-dir holds (least recently used files out first)")
    s.add_argument("--reasoning-budgets", type=effort_budgets, default=(512, 2048, 8192), metavar="LOW,MEDIUM,HIGH",
                   help="thinking tokens a reasoning model may spend for reasoning efforts low, medium and high "
                        "(chat reasoning_effort, Responses reasoning.effort); past it the server closes the block")
    s.add_argument("--cpu-dtype", choices=["auto", "keep", "float32", "float16", "quantized"],
                   default=os.environ.get("OPENMLX_CPU_DTYPE", "auto"),
                   help="CPU weights: auto = float32 when memory allows (fast with OpenBLAS), keep = as shipped, "
                        "quantized = held as blocks, products through onnxruntime MatMulNBits (opt-in)")
    s.add_argument("--max-batch-tokens", type=positive_int, default=65536,
                   help="tokens one request may ask for: prompts plus max_tokens, times n or best_of (400 beyond)")
    s.add_argument("--max-queue", type=positive_int, default=64, help="requests queued or running before 429")
    s.add_argument("--request-timeout", type=positive_float, default=600.0, metavar="SECONDS",
                   help="cut off a generation after this long, queue time included (504); 0 = no limit")
    s.add_argument("--max-models", type=positive_int, default=1, help="models kept loaded (least recently used goes)")
    s.add_argument("--idle-unload", type=positive_float, default=None, metavar="SECONDS",
                   help="unload models unused for this long")
    s.add_argument("--assume-available-memory", type=positive_int, default=None, metavar="BYTES",
                   help="use this instead of the measured available memory in the memory gate")
    s.add_argument("--max-body-bytes", type=positive_int, default=10 << 20)
    s.add_argument("--max-connections", type=positive_int, default=1000,
                   help="open connections at most (a new one past it gets 503 and is closed)")
    s.add_argument("--header-timeout", type=positive_float, default=10.0, metavar="SECONDS",
                   help="close a connection that has not sent a whole request head within this long")
    s.add_argument("--max-connections-per-client", type=positive_int, default=None, metavar="N",
                   help="open connections from one client address at most (default: a quarter of --max-connections)")
    s.add_argument("--body-timeout", type=positive_float, default=60.0, metavar="SECONDS",
                   help="a request body must arrive whole within this long after its head (else 408, closed)")
    s.add_argument("--shutdown-timeout", type=positive_float, default=5.0,
                   help="seconds running requests get to finish on SIGTERM/SIGINT")
    s.add_argument("--api-key", action="append", help="require this bearer key on /v1/* (repeatable)")
    s.add_argument("--api-key-file", help="a file of API keys, one per line")
    s.add_argument("--cors-origin", action="append",
                   help="allow browser requests from this origin (repeatable; '*' only if you mean it). Off by default")
    s.add_argument("--responses-max", type=positive_int, default=1024,
                   help="stored Responses API responses kept (least recently used out first)")
    s.add_argument("--responses-max-bytes", type=positive_int, default=256 << 20,
                   help="bytes of stored responses kept, in memory and in --responses-dir (least recently used "
                        "out first; an image carried by many turns counts once)")
    s.add_argument("--responses-ttl", type=positive_float, default=24 * 3600, help="seconds a stored response is kept")
    s.add_argument("--responses-dir", type=Path, default=None,
                   help="also keep stored responses as JSON files here (they survive a restart)")
    s.add_argument("--batch", choices=["auto", "on", "off"], default=os.environ.get("OPENMLX_BATCH", "auto"),
                   help="decode concurrent streams of a text model together with mlx-lm's BatchGenerator "
                        "(auto = on; off: one stream per step, round-robin)")
    s.add_argument("--allow-download", action="store_true",
                   help="fetch a requested ORG/NAME that is not in the store from the Hugging Face Hub on its first "
                        "request (one download at a time; the memory gate and the architecture are checked before "
                        "the weights are fetched; HF_TOKEN for gated repos)")
    s.add_argument("--download-timeout", type=positive_float, default=3600.0, metavar="SECONDS",
                   help="a Hub download must finish within this long (the transfer is cut off, the request gets 504)")
    s.add_argument("--max-store-bytes", type=positive_int, default=None, metavar="BYTES",
                   help="the model store's quota: downloaded models least recently used are removed to make room "
                        "for a new download (507 when they can't be)")
    s.add_argument("--speculative", choices=["auto", "ngram", "draft", "off"],
                   default=os.environ.get("OPENMLX_SPECULATIVE", "auto"),
                   help="speculative decoding: guess tokens and check them in one pass, same answers "
                        "(auto = the --draft-model when given, else prompt lookup; ngram = prompt lookup: "
                        "guesses copied from the prompt and the answer so far; off)")
    s.add_argument("--draft-model", default=None, metavar="ID|PATH",
                   help="a smaller model with the same tokenizer that drafts tokens for speculative decoding")
    s.add_argument("--num-draft-tokens", type=positive_int, default=12, metavar="N",
                   help="the most tokens drafted per pass (speculative decoding; adapted per request below it)")
    s.add_argument("--allow-image-urls", action="store_true",
                   help="let vision requests name http(s) image URLs, which the server fetches (off: data: URLs only)")
    s.add_argument("--image-url-allow-private", action="store_true",
                   help="with --allow-image-urls: also fetch from private networks (10/8, 172.16/12, 192.168/16, "
                        "fc00::/7), for a trusted LAN; loopback and link-local stay refused")
    s.add_argument("--image-url-allow-network", action="append", metavar="CIDR",
                   help="with --allow-image-urls: also fetch from this non-public network (repeatable)")
    s.add_argument("--image-fetch-timeout", type=positive_float, default=10.0, metavar="SECONDS",
                   help="one deadline for all of a request's image fetches (within --request-timeout)")
    s.add_argument("--image-dir", type=Path, default=None,
                   help="let vision requests name local image files under this directory")
    s.add_argument("--max-image-bytes", type=positive_int, default=20 << 20)
    s.add_argument("--max-image-pixels", type=positive_int, default=4096 * 4096)
    s.add_argument("--max-images", type=positive_int, default=32, help="images per request")
    s.add_argument("--image-chunk-size", type=positive_int, default=None,
                   help="images per vision generation pass (default: $OPENMLX_IMAGE_CHUNK_SIZE or 4; at most 8)")
    s.add_argument("--log-json", action="store_true", help="log one JSON object per line")
    s.add_argument("--log-level", default="info")
    common(s)

    s.add_argument("--ranks", type=positive_int, default=int(os.environ.get("OPENMLX_RANKS", "1")),
                   help="split the model over this many processes with MLX's distributed runtime "
                        "(rank 0 serves HTTP; default 1)")
    s.add_argument("--hostfile", type=Path, default=None,
                   help="an MLX hostfile to spread ranks over hosts (through mlx.launch); default: this machine")
    s.add_argument("--shard", choices=["auto", "tensor", "pipeline"], default="auto",
                   help="how to split the model (auto: tensor parallel where possible, else pipeline)")
    s.add_argument("--backend", choices=["ring", "mpi"], default="ring",
                   help="MLX's distributed backend (ring stays on 127.0.0.1 here; MPI's launcher listens "
                        "on all interfaces)")
    s.add_argument("--ring-port", type=port_number, default=None,
                   help="first port of the ring (one per rank; default: free ports)")
    s.set_defaults(func=cmd_serve)

    fw = sub.add_parser("follow", help=argparse.SUPPRESS)  # a worker rank, started by the supervisor
    fw.add_argument("--model", required=True)
    fw.add_argument("--world-size", type=int, required=True)
    fw.add_argument("--shard", default="auto")
    fw.add_argument("--backend", default="ring")
    fw.add_argument("--log-level", default="info")
    prompt_cache_flags(fw)  # the supervisor passes serve's: every rank keeps the same prompt cache
    fw.set_defaults(func=cmd_follow)

    cs = sub.add_parser("config-schema", help="print the JSON Schema of `serve --config` files")
    cs.set_defaults(func=lambda _args: print(json.dumps(config_file.schema(s), indent=2)) or 0)

    pl = sub.add_parser("pull", help="download a model from the Hugging Face Hub into the store: ORG/NAME[@REVISION]; "
                                     "a GGUF repo's file by quantization, ORG/NAME-GGUF:Q4_K_M, or with --file")
    pl.add_argument("name", metavar="ORG/NAME[@REVISION][:QUANT]")
    pl.add_argument("--file", help="the GGUF file of the repo to fetch and convert (instead of :QUANT)")
    common(pl)
    pl.set_defaults(func=model_commands.cmd_pull)

    rm = sub.add_parser("rm", help="delete a pulled model (or a Hugging Face cache repo) from disk")
    rm.add_argument("name", metavar="ID")
    common(rm)
    rm.set_defaults(func=model_commands.cmd_rm)

    ls = sub.add_parser("list", help="list usable models: id, type, size, context length")
    ls.add_argument("--all", action="store_true", help="also folders that cannot run, with the reason")
    ls.add_argument("--json", action="store_true")
    common(ls)
    ls.set_defaults(func=model_commands.cmd_list)

    sh = sub.add_parser("show", help="show one model's probe and the active BLAS")
    sh.add_argument("name", help="model id or folder")
    sh.add_argument("--prompt-cache-dir", default=os.environ.get("OPENMLX_PROMPT_CACHE_DIR"),
                    help="also say how many bytes the prompt cache keeps in DIR (serve's --prompt-cache-dir)")
    common(sh)
    sh.set_defaults(func=model_commands.cmd_show)
    return parser


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The command line, over `serve --config FILE`'s settings when one is given."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "config", None):
        serve = _subparser(parser, "serve")
        try:
            config_file.apply(config_file.load(args.config, serve), serve)
        except config_file.ConfigError as e:
            raise SystemExit(f"openmlx: {e}") from None
        args = parser.parse_args(argv)
    return args


def main(argv: Optional[Sequence[str]] = None) -> None:
    try:
        args = parse_args(argv)
    except SystemExit as e:
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
        sys.exit(2 if isinstance(e.code, str) else e.code)
    if getattr(args, "threads", None):
        os.environ["OPENMLX_THREADS"] = str(args.threads)  # read by engine.cpu.blas when it loads
    try:
        code = args.func(args)
    except KeyboardInterrupt:
        code = 130
    except SystemExit as e:  # uvicorn exits this way when start-up fails
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
        code = e.code if isinstance(e.code, int) else 1
    except Exception as e:  # a start-up failure: say why, no traceback wall
        from engine.errors import EngineError

        message = e.message if isinstance(e, EngineError) else f"{e.__class__.__name__}: {e}"
        print(f"openmlx: {message}", file=sys.stderr)
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    # MLX can abort at interpreter exit after use from a worker thread (ml-explore/mlx#3126);
    # everything is flushed and released by now, so leave without running static destructors.
    os._exit(code)


if __name__ == "__main__":
    main()
