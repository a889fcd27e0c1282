"""Batched decoding vs round-robin: aggregate tokens/s and per-stream time for N concurrent greedy
streams on the same server build, `--batch off` against `--batch on`.

    python -m bench.batching [--streams 1 4 8] [--tokens 64] [--out bench/results]

On a CPU one stream already keeps the cores busy, so `--batch auto` leaves batching off there;
this shows what it costs or gains on the machine it runs on (on a GPU, run it there).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.report import save_table  # noqa: E402
from engine.models.default_model import DEFAULT_MODEL_ID as MODEL  # noqa: E402
from tests.process import Server  # noqa: E402  (the same subprocess helper the tests use)

PROMPTS = ["Tell me about rivers.", "Describe a city at night.", "Explain how rain forms.", "Write about the sea.",
           "Describe a forest in autumn.", "Tell me about mountains.", "Explain what a library is.",
           "Describe a busy market."]


def run(url: str, streams: int, tokens: int) -> dict:
    def one(i: int) -> tuple[int, float]:
        t = time.perf_counter()
        r = httpx.post(url + "/v1/chat/completions", timeout=600, json={
            "model": MODEL, "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
            "max_tokens": tokens, "temperature": 0, "logit_bias": {"2": -100}})  # no early end-of-turn
        return r.json()["usage"]["completion_tokens"], time.perf_counter() - t

    one(0)  # warm-up
    start = time.perf_counter()
    with ThreadPoolExecutor(streams) as pool:
        results = list(pool.map(one, range(streams)))
    wall = time.perf_counter() - start
    total = sum(n for n, _ in results)
    return {"streams": streams, "tokens": total, "wall_s": round(wall, 2), "aggregate_tok_s": round(total / wall, 1),
            "median_stream_s": round(statistics.median(d for _, d in results), 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    rows = []
    for mode in ("off", "on"):
        server = Server(["--batch", mode, "--max-queue", "64"])
        try:
            for n in args.streams:
                row = {"batch": mode, **run(server.url, n, args.tokens)}
                rows.append(row)
                print(json.dumps(row), flush=True)
            row_health = httpx.get(server.url + "/health").json()
            print(f"batch {mode}: /health batch_peak={row_health.get('batch_peak')}", flush=True)
        finally:
            server.stop()
    save_table(rows, args.out, "batching", {"batch": "batch", "streams": "streams",
                                            "aggregate tok/s": "aggregate_tok_s", "median stream s": "median_stream_s"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
