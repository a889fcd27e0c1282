"""`openmlx serve` and a worker rank's `openmlx follow`: logging, API keys, image sources, the
uvicorn server with its graceful shutdown, and a rank joining its group. The command line that
leads here is handlers/cli.py."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Optional

from handlers.commands.settings import engine_config, fields_of


class JsonFormatter(logging.Formatter):
    """One JSON object per log line (for `--log-json`), with a request's fields when it has them."""

    FIELDS = ("request_id", "model", "endpoint", "prompt_tokens", "completion_tokens", "cached_tokens",
              "finish_reason", "cancelled", "ttft_s", "duration_s")

    def format(self, record: logging.LogRecord) -> str:
        entry = {"ts": round(record.created, 3), "level": record.levelname.lower(),
                 "logger": record.name, "message": record.getMessage()}
        entry.update({k: getattr(record, k) for k in self.FIELDS if getattr(record, k, None) is not None})
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


class RedactQuery(logging.Filter):
    """Access-log lines without their query strings: a client may put a key there
    (`?api_key=...`), and keys are never logged."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("uvicorn.access") and isinstance(record.args, tuple) and len(record.args) >= 3:
            args = list(record.args)
            if isinstance(args[2], str) and "?" in args[2]:
                args[2] = args[2].split("?", 1)[0] + "?[redacted]"
                record.args = tuple(args)
        return True


def _logging(log_json: bool, level: str) -> dict:
    handler = {"class": "logging.StreamHandler", "stream": "ext://sys.stderr",
               "formatter": "json" if log_json else "plain", "filters": ["redact_query"]}
    return {
        "version": 1, "disable_existing_loggers": False,
        "filters": {"redact_query": {"()": RedactQuery}},
        "formatters": {"json": {"()": JsonFormatter},
                       "plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
        "handlers": {"default": handler},
        "root": {"handlers": ["default"], "level": level.upper()},
        "loggers": {"uvicorn": {"level": level.upper()}, "uvicorn.access": {"level": level.upper()}},
    }


def _image_sources(args: argparse.Namespace, request_timeout_s: Optional[float]):
    """What image URLs and files requests may name; one fetch deadline inside --request-timeout."""
    import ipaddress
    from dataclasses import replace

    from handlers.conversation.images import PRIVATE_NETWORKS, ImageSources

    networks = [ipaddress.ip_network(n, strict=False) for n in args.image_url_allow_network or []]
    if args.image_url_allow_private:
        networks += PRIVATE_NETWORKS
    sources = ImageSources(**fields_of(args, "sources"), allowed_networks=tuple(networks))
    if request_timeout_s:
        sources = replace(sources, timeout_s=min(sources.timeout_s, request_timeout_s))
    return sources


class NoKeys(ValueError):
    """Keys were asked for and none is usable: serving without auth instead would fail open."""


def _api_keys(args: argparse.Namespace) -> list[str]:
    """Keys from --api-key, OPENMLX_API_KEY and --api-key-file (one per line, # comments). Asking
    for keys and giving none that is non-empty (an empty file, `--api-key ''`) is refused."""
    asked = args.api_key is not None or args.api_key_file is not None or "OPENMLX_API_KEY" in os.environ
    keys = [k.strip() for k in args.api_key or []]
    keys.append(os.environ.get("OPENMLX_API_KEY", "").strip())
    if args.api_key_file:
        try:
            text = Path(args.api_key_file).read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise NoKeys(f"--api-key-file {args.api_key_file}: can't read it ({e})") from None
        for line in text.splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                keys.append(line)
    keys = [k for k in keys if k]
    if asked and not keys:
        raise NoKeys("API keys were asked for (--api-key, --api-key-file, OPENMLX_API_KEY or the config's "
                     "api-key) but none is non-empty; refusing to serve without authentication")
    return keys


def cmd_serve(args: argparse.Namespace) -> int:
    import logging.config
    import signal
    import threading
    import time

    engine_settings = engine_config(args)
    if engine_settings.speculative == "draft" and not engine_settings.draft_model:
        raise SystemExit("openmlx: --speculative draft needs --draft-model ID|PATH")
    try:
        api_keys = _api_keys(args)  # before anything starts, ranks included: no keys must not mean no auth
    except NoKeys as e:
        raise SystemExit(f"openmlx: {e}") from None
    if engine_settings.world_size > 1 and engine_settings.prompt_cache_dir:
        # Each rank would need its own shard's files, kept in step with the others': not built.
        raise SystemExit("openmlx: --prompt-cache-dir is not supported with --ranks > 1 (the prompt cache "
                         "stays in memory on every rank)")
    if engine_settings.world_size > 1 and os.environ.get("OPENMLX_RANK_ROLE") != "serve":
        from engine.distributed.supervisor import RankLaunch, supervise

        logging.config.dictConfig(_logging(args.log_json, args.log_level))
        launch = RankLaunch(args.hostfile, args.ring_port, args.log_level)
        return supervise(engine_settings, launch, list(sys.argv[2:]) if argv_is_cli() else [])

    import uvicorn

    from engine.engine import Engine
    from handlers.app import ServerConfig, create_app
    from handlers.asgi.connections import guarded_protocol, raise_file_limit

    logging.config.dictConfig(_logging(args.log_json, args.log_level))
    config = ServerConfig(engine=engine_settings, api_keys=api_keys, cors_origins=args.cors_origin or [],
                          bind_host=args.host,
                          image_sources=_image_sources(args, engine_settings.request_timeout_s),
                          **fields_of(args, "server"))
    from engine.models.external import PREFIXES

    model = engine_settings.model
    if model and (model.lower().endswith(".gguf") and Path(model).expanduser().is_file()
                  or model.startswith(PREFIXES)):
        # Converted before the server starts: a file openmlx can't run is one clear line, not a
        # failed lifespan's traceback.
        from engine.models.resolution import ModelStore, locate

        entry = locate(ModelStore(config.engine.models_dir, config.engine.hf_cache), model)
        config.engine.model = str(entry.path)
    engine = Engine(config.engine)
    if config.engine.world_size > 1:  # the supervisor says a worker rank died: 503 until restarted
        signal.signal(signal.SIGUSR1, lambda *_: engine.mark_failed("a worker rank exited"))

    class Server(uvicorn.Server):
        draining = False

        def handle_exit(self, sig: int, frame) -> None:
            # First tell the engine: running streams end with an error event naming the signal,
            # queued and new requests get 503. The listener stays open while clients are still
            # connected (up to --shutdown-timeout), so a new request gets that 503 rather than a
            # refused connection, as load balancers expect; a second signal stops at once.
            engine.begin_shutdown(f"The server is shutting down ({signal.Signals(sig).name}).")
            if self.draining:
                super().handle_exit(sig, frame)
                return
            self.draining = True
            deadline = time.monotonic() + args.shutdown_timeout
            # The promise is two --shutdown-timeouts: draining, then uvicorn's graceful close. Past
            # that, whatever still runs (a prefill pass, a thread in a download or a schema compile
            # that Python would otherwise join at exit) must not hold the process: exit anyway.
            watchdog = threading.Timer(2 * args.shutdown_timeout + 1.0, _exit_now, args=(sig,))
            watchdog.daemon = True
            watchdog.start()

            def drain() -> None:
                while time.monotonic() < deadline and self.server_state.connections:
                    time.sleep(0.05)
                uvicorn.Server.handle_exit(self, sig, None)

            threading.Thread(target=drain, name="openmlx-drain", daemon=True).start()

    soft_limit = raise_file_limit()
    max_connections = min(args.max_connections, max(16, soft_limit - 64))  # room for models, logs, pipes
    server = Server(uvicorn.Config(create_app(config, engine=engine), host=args.host, port=args.port,
                                   log_config=_logging(args.log_json, args.log_level),
                                   http=guarded_protocol(max_connections, args.header_timeout,
                                                         args.max_connections_per_client or max(1, max_connections // 4)),
                                   timeout_graceful_shutdown=args.shutdown_timeout))
    server.run()
    return 0 if server.started else 1


def _exit_now(sig: int) -> None:
    logging.getLogger("openmlx").warning("shutdown did not finish within twice --shutdown-timeout; exiting now")
    logging.shutdown()
    os._exit(128 + sig)


def argv_is_cli() -> bool:
    return len(sys.argv) > 1 and sys.argv[1] == "serve"


def cmd_follow(args: argparse.Namespace) -> int:
    """A worker rank (started by the supervisor): load this rank's shard and repeat rank 0's steps."""
    import logging.config

    import engine  # noqa: F401  (OpenBLAS before MLX)
    from engine.distributed import follow, join_group
    from engine.models.memory import MemoryGate
    from engine.models.resolution import ModelStore, locate

    logging.config.dictConfig(_logging(False, args.log_level))
    config = engine_config(args)
    entry = locate(ModelStore(config.models_dir, config.hf_cache, []), args.model)
    # rank 0's prompt cache, as given: every rank keeps and drops the same entries
    rank = join_group(args.model, entry.path, args.world_size, config.shard, config.backend, MemoryGate(),
                      config.prompt_cache_settings())
    return follow(rank.lockstep, rank.runner)
