"""Distributed serving overhead: tokens/s and time to first token, 1 rank vs 2 ranks, on a tiny
random llama (tensor parallel) and qwen2 (pipeline), plus the start-up time of a 2-rank server.

    python -m bench.distributed [--tokens 64] [--out bench/results]

On one 2-core machine two ranks share the cores and talk over loopback: this measures the
overhead of the lockstep protocol and the collectives, not a speed-up.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.report import save_table  # noqa: E402
from tests.process import Server  # noqa: E402
from engine.config import openmlx_home  # noqa: E402
from engine.models.default_model import ensure_default_model  # noqa: E402
from tests.tiny_sharded import write_tiny_sharded  # noqa: E402

SIDE = ["--embedding-model", "none", "--audio-model", "none"]


def measure(url: str, model: str, tokens: int, runs: int = 3) -> dict:
    ttft, rate = [], []
    for i in range(runs + 1):
        body = {"model": model, "messages": [{"role": "user", "content": f"Tell me a story {i}"}],
                "max_tokens": tokens, "temperature": 0, "stream": True}
        start = time.perf_counter()
        first = None
        n = 0
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=300) as r:
            for line in r.iter_lines():
                if line.startswith("data: {") and '"content"' in line and '"content": ""' not in line:
                    n += 1
                    first = first or time.perf_counter()
        end = time.perf_counter()
        if i:  # the first run warms up
            ttft.append(first - start)
            rate.append((n - 1) / (end - first) if n > 1 else 0.0)
    return {"ttft_s": round(statistics.median(ttft), 3), "decode_tok_s": round(statistics.median(rate), 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    tokenizer = ensure_default_model(openmlx_home() / "models", openmlx_home())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind, shard in (("llama", "tensor"), ("qwen2", "pipeline")):
            folder = write_tiny_sharded(Path(tmp) / f"tiny-{kind}", kind, tokenizer)
            for ranks in (1, 2):
                extra = ["--ranks", "2", "--shard", shard] if ranks == 2 else []
                started = time.perf_counter()
                server = Server(["--model", str(folder), *SIDE, *extra])
                startup = time.perf_counter() - started
                try:
                    row = {"model": kind, "ranks": ranks, "sharding": shard if ranks == 2 else "-",
                           "startup_s": round(startup, 1), **measure(server.url, folder.name, args.tokens)}
                finally:
                    server.stop()
                rows.append(row)
                print(json.dumps(row), flush=True)
    save_table(rows, args.out, "distributed", {"model": "model", "ranks": "ranks", "sharding": "sharding",
                                               "start-up s": "startup_s", "TTFT s": "ttft_s",
                                               "decode tok/s": "decode_tok_s"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
