"""Soak: N clients for M minutes against a local openmlx, mixing streamed and plain requests,
mid-stream disconnects and bad requests. Loopback only; bounded in time; stops by itself.

    python -m bench.soak --minutes 10 --clients 8 [--out bench/results]

Reports requests sent, answers by status, p50/p99 latency, and RSS after warm-up and at the end.
Targets: zero 5xx, every well-formed request answered, RSS growth under 10 % after warm-up.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx

from bench.servers import Peer, Running

MSG = [{"role": "user", "content": "Tell me something about the sea."}]


def client_loop(url: str, model: str, seed: int, stop_at: float, record) -> None:
    rng = random.Random(seed)
    with httpx.Client(timeout=120) as h:
        while time.monotonic() < stop_at:
            kind = rng.choices(["plain", "stream", "disconnect", "bad"], weights=[4, 4, 2, 1])[0]
            body = {"model": model, "messages": MSG, "max_tokens": rng.randint(1, 24)}
            start = time.perf_counter()
            try:
                if kind == "plain":
                    r = h.post(url + "/v1/chat/completions", json=body)
                    record(kind, r.status_code, time.perf_counter() - start, well_formed=True)
                elif kind == "stream":
                    with h.stream("POST", url + "/v1/chat/completions", json={**body, "stream": True}) as r:
                        done = any(line == "data: [DONE]" for line in r.iter_lines())
                    record(kind, r.status_code if done or r.status_code != 200 else 0,
                           time.perf_counter() - start, well_formed=True)
                elif kind == "disconnect":
                    with h.stream("POST", url + "/v1/chat/completions",
                                  json={**body, "max_tokens": 200, "stream": True}) as r:
                        lines = r.iter_lines()
                        for _ in range(rng.randint(0, 5)):
                            next(lines, None)
                    record(kind, r.status_code, time.perf_counter() - start, well_formed=False)
                else:
                    bad = rng.choice([{"model": model}, {"model": model, "messages": "x"},
                                      {"model": "nope", "messages": MSG}, {**body, "max_tokens": -5}])
                    r = h.post(url + "/v1/chat/completions", json=bad)
                    record(kind, r.status_code, time.perf_counter() - start, well_formed=False)
            except httpx.HTTPError as e:
                record(kind, f"error:{type(e).__name__}", time.perf_counter() - start, well_formed=kind != "bad")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--warmup", type=float, default=30, help="seconds before the first RSS reading")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    from bench.__main__ import default_model_dir

    model_dir = default_model_dir()
    run = Running(Peer("openmlx-soak", [sys.executable, "-m", "handlers.cli", "serve", "--model", str(model_dir),
                                        "--port", "{port}", "--log-level", "warning", "--max-queue", "64"],
                       model_dir.name, "/health"), args.out)
    statuses: Counter = Counter()
    latencies: list[float] = []
    unanswered = 0
    lock = threading.Lock()

    def record(kind: str, status, seconds: float, well_formed: bool) -> None:
        nonlocal unanswered
        with lock:
            statuses[f"{kind}:{status}"] += 1
            if kind in ("plain", "stream"):
                latencies.append(seconds)
            if well_formed and status != 200:
                unanswered += 1

    try:
        run.wait_ready()
        stop_at = time.monotonic() + args.minutes * 60
        threads = [threading.Thread(target=client_loop, args=(run.url, run.peer.model_id, i, stop_at, record))
                   for i in range(args.clients)]
        for t in threads:
            t.start()
        time.sleep(min(args.warmup, args.minutes * 60 / 3))
        rss_warm = run.rss_bytes()
        for t in threads:
            t.join()
        time.sleep(1)
        rss_end = run.rss_bytes()
        health = httpx.get(run.url + "/health").json()
    finally:
        run.stop()
    lat = sorted(latencies)
    five_xx = sum(n for k, n in statuses.items() if k.rsplit(":", 1)[-1].startswith("5"))
    report = {"minutes": args.minutes, "clients": args.clients, "requests": sum(statuses.values()),
              "by_kind_and_status": dict(sorted(statuses.items())), "5xx": five_xx,
              "well_formed_unanswered": unanswered,
              "latency_p50_s": statistics.median(lat) if lat else None,
              "latency_p99_s": lat[int(0.99 * (len(lat) - 1))] if lat else None,
              "rss_after_warmup_mib": rss_warm / 2**20, "rss_end_mib": rss_end / 2**20,
              "rss_growth_pct": 100 * (rss_end - rss_warm) / rss_warm if rss_warm else None,
              "queued_at_end": health["queued"]}
    (args.out / "soak.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    ok = five_xx == 0 and unanswered == 0 and (report["rss_growth_pct"] or 0) < 10 and health["queued"] == 0
    print("soak:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
