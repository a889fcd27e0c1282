"""The `openmlx` command: serve (and a rank's hidden `follow`), config-schema, pull, rm, list, show.
The flags of `serve` are declared in handlers/commands/settings.py; what each command does is in
handlers/commands/."""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

from handlers.commands import config_file, model_commands
from handlers.commands.serve import cmd_follow, cmd_serve
from handlers.commands.settings import COMMON, RANKS, SERVE, SETTINGS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="openmlx", description="OpenAI-compatible server for MLX models.")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        for setting in COMMON:
            setting.add_to(p)

    s = sub.add_parser("serve", help="start the server")
    for setting in SERVE:
        setting.add_to(s)
    common(s)
    for setting in RANKS:
        setting.add_to(s)
    s.set_defaults(func=cmd_serve)

    fw = sub.add_parser("follow", help=argparse.SUPPRESS)  # a worker rank, started by the supervisor
    fw.add_argument("--model", required=True)
    fw.add_argument("--world-size", type=int, required=True)
    # The supervisor passes serve's own: every rank keeps the same prompt cache.
    for flag in ("shard", "backend", "log-level", "prompt-cache-bytes", "kv-bits", "kv-group-size"):
        SETTINGS[flag].add_to(fw)
    fw.set_defaults(func=cmd_follow, threads=None)  # a rank inherits the supervisor's OPENMLX_THREADS

    cs = sub.add_parser("config-schema", help="print the JSON Schema of `serve --config` files")
    cs.set_defaults(func=lambda _args: print(json.dumps(config_file.schema(s), indent=2)) or 0, threads=None)

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
    SETTINGS["prompt-cache-dir"].add_to(sh, help="also say how many bytes the prompt cache keeps in DIR "
                                                 "(serve's --prompt-cache-dir)")
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
    if args.command == "serve" and args.config:
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
    if args.threads:
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
