"""Soak: N clients for M minutes against a local openmlx, mixing streamed and plain requests,
mid-stream disconnects and bad requests. Loopback only; bounded in time; stops by itself.

    python -m bench.soak --minutes 10 --clients 8 [--out bench/results]
    python -m bench.soak --minutes 30 --clients 4 --conversations 12 --prompt-cache-bytes 64000000

Reports requests sent, answers by status, p50/p99 latency, and memory: RSS after warm-up, at the
end under load and a few seconds after the last request (when the server has handed its idle
memory back), with MLX's own active and peak bytes from /metrics beside it.
Targets: zero 5xx, every well-formed request answered, and no leak: RSS once idle at the end under
10 % above RSS after warm-up. (Under load RSS follows MLX's peak, the most KV cache that was ever
alive at once, which keeps rising for minutes as the longest histories happen to coincide; it is
reported as `rss_growth_pct` and `mlx_peak_growth_mib`, and handed back once idle.)

`--conversations K` (issue 34): the clients instead take turns in K agent conversations that share
a long system prompt, each growing by an answer and a question a turn and starting over after
`--turns` turns, with the server's prompt cache bounded by `--prompt-cache-bytes`. `/health` is
read every 2 s: the cache's bytes must never pass the bound. Also reported: the share of prompt
tokens served from the cache. `--kv-bits 8|4` passes the server's flag (histories quantized
instead of dropped when the bound is reached), for the same run with more histories kept.
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
SYSTEM = {"role": "system", "content": "You are a coding agent working in a large repository. " * 40}
QUESTIONS = ["List the files you would read first.", "What does the main module do?", "Find the bug in the parser.",
             "Write a test for it.", "Explain the fix in one line.", "What should we refactor next?"]


class Conversations:
    """K agent conversations the clients take turns in (one client at a time per conversation)."""

    def __init__(self, count: int, turns: int, seed: int = 0) -> None:
        self.turns = turns
        self.rng = random.Random(seed)
        self.free = list(range(count))
        self.history: dict[int, list] = {i: self._fresh(i) for i in range(count)}
        self.lock = threading.Lock()
        self.prompt_tokens = 0
        self.cached_tokens = 0

    def _fresh(self, i: int) -> list:
        return [SYSTEM, {"role": "user", "content": f"Task {i}-{self.rng.randrange(10**6)}: " + QUESTIONS[0]}]

    def take(self) -> tuple[int, list]:
        with self.lock:
            i = self.free.pop(0)
            return i, list(self.history[i])

    def give_back(self, i: int, messages: list, answer: str, usage: dict) -> None:
        with self.lock:
            self.prompt_tokens += usage.get("prompt_tokens", 0)
            self.cached_tokens += (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
            done = (len(messages) - 1) // 2 >= self.turns
            self.history[i] = self._fresh(i) if done else messages + [
                {"role": "assistant", "content": answer},
                {"role": "user", "content": self.rng.choice(QUESTIONS)}]
            self.free.append(i)


def conversation_loop(url: str, model: str, seed: int, stop_at: float, record, talks: Conversations) -> None:
    rng = random.Random(seed)
    with httpx.Client(timeout=300) as h:
        while time.monotonic() < stop_at:
            i, messages = talks.take()
            start = time.perf_counter()
            answer, usage = "", {}
            try:
                r = h.post(url + "/v1/chat/completions",
                           json={"model": model, "messages": messages, "max_tokens": rng.randint(4, 16)})
                record("turn", r.status_code, time.perf_counter() - start, well_formed=True)
                if r.status_code == 200:
                    answer = r.json()["choices"][0]["message"]["content"] or ""
                    usage = r.json()["usage"]
            except httpx.HTTPError as e:
                record("turn", f"error:{type(e).__name__}", time.perf_counter() - start, well_formed=True)
            finally:
                talks.give_back(i, messages, answer, usage)


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


def watch_cache(url: str, stop_at: float, readings: list[int]) -> None:
    """The prompt cache's bytes in memory (/health) every 2 s until `stop_at`."""
    with httpx.Client(timeout=30) as h:
        while time.monotonic() < stop_at:
            try:
                readings.append(int(h.get(url + "/health").json()["prompt_cache"]["bytes"]))
            except (httpx.HTTPError, KeyError, ValueError):
                pass
            time.sleep(2)


def mlx_memory(url: str) -> dict[str, int]:
    """openmlx_mlx_memory_bytes from /metrics: {"active": ..., "peak": ..., "cache": ...}."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=30).text):
        if family.name == "openmlx_mlx_memory_bytes":
            return {sample.labels["kind"]: int(sample.value) for sample in family.samples}
    return {}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--warmup", type=float, default=30, help="seconds before the first RSS reading")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--conversations", type=int, default=0, help="agent conversations instead of the mix")
    parser.add_argument("--turns", type=int, default=8, help="turns before a conversation starts over")
    parser.add_argument("--prompt-cache-bytes", type=int, default=64_000_000)
    parser.add_argument("--kv-bits", type=int, choices=[8, 4], default=None,
                        help="the server's --kv-bits (conversations: histories quantized instead of dropped)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    talks = Conversations(max(args.conversations, args.clients), args.turns) if args.conversations else None

    from bench.__main__ import default_model_dir

    model_dir = default_model_dir()
    run = Running(Peer("openmlx-soak", [sys.executable, "-m", "handlers.cli", "serve", "--model", str(model_dir),
                                        "--port", "{port}", "--log-level", "warning", "--max-queue", "64",
                                        *(["--prompt-cache-bytes", str(args.prompt_cache_bytes)] if talks else []),
                                        *(["--kv-bits", str(args.kv_bits)] if talks and args.kv_bits else [])],
                       model_dir.name, "/health"), args.out)
    statuses: Counter = Counter()
    latencies: list[float] = []
    unanswered = 0
    lock = threading.Lock()

    def record(kind: str, status, seconds: float, well_formed: bool) -> None:
        nonlocal unanswered
        with lock:
            statuses[f"{kind}:{status}"] += 1
            if kind in ("plain", "stream", "turn"):
                latencies.append(seconds)
            if well_formed and status != 200:
                unanswered += 1

    try:
        run.wait_ready()
        stop_at = time.monotonic() + args.minutes * 60
        if talks:
            threads = [threading.Thread(target=conversation_loop, args=(run.url, run.peer.model_id, i, stop_at,
                                                                        record, talks)) for i in range(args.clients)]
        else:
            threads = [threading.Thread(target=client_loop, args=(run.url, run.peer.model_id, i, stop_at, record))
                       for i in range(args.clients)]
        cache_bytes: list[int] = []
        watcher = threading.Thread(target=watch_cache, args=(run.url, stop_at, cache_bytes), daemon=True)
        for t in [*threads, watcher]:
            t.start()
        time.sleep(min(args.warmup, args.minutes * 60 / 3))
        rss_warm, mlx_warm = run.rss_bytes(), mlx_memory(run.url)
        for t in threads:
            t.join()
        rss_end, mlx_end = run.rss_bytes(), mlx_memory(run.url)
        time.sleep(4)  # the server hands idle memory back a second after the last request
        rss_idle, mlx_idle = run.rss_bytes(), mlx_memory(run.url)
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
              "rss_idle_end_mib": rss_idle / 2**20,
              "rss_idle_growth_pct": 100 * (rss_idle - rss_warm) / rss_warm if rss_warm else None,
              "mlx_active_after_warmup_mib": mlx_warm.get("active", 0) / 2**20,
              "mlx_peak_after_warmup_mib": mlx_warm.get("peak", 0) / 2**20,
              "mlx_peak_end_mib": mlx_end.get("peak", 0) / 2**20,
              "mlx_peak_growth_mib": (mlx_end.get("peak", 0) - mlx_warm.get("peak", 0)) / 2**20,
              "mlx_active_idle_end_mib": mlx_idle.get("active", 0) / 2**20,
              # what RSS holds beyond MLX's high-water mark (Python, libraries, the heap's slack)
              "rss_beyond_mlx_peak_after_warmup_mib": (rss_warm - mlx_warm.get("peak", 0)) / 2**20,
              "rss_beyond_mlx_peak_end_mib": (rss_end - mlx_end.get("peak", 0)) / 2**20,
              "queued_at_end": health["queued"],
              "prompt_cache_bytes_max": max(cache_bytes, default=0), "prompt_cache_readings": len(cache_bytes)}
    if talks:
        report.update({"conversations": len(talks.history), "prompt_cache_bound": args.prompt_cache_bytes,
                       "kv_bits": args.kv_bits, "quantized_entries_at_end": health["prompt_cache"]["quantized"],
                       "prompt_tokens": talks.prompt_tokens, "cached_tokens": talks.cached_tokens,
                       "cached_share": talks.cached_tokens / talks.prompt_tokens if talks.prompt_tokens else None})
    (args.out / "soak.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    ok = five_xx == 0 and unanswered == 0 and (report["rss_idle_growth_pct"] or 0) < 10 and health["queued"] == 0
    if talks:
        ok = ok and 0 < report["prompt_cache_bytes_max"] <= args.prompt_cache_bytes
    print("soak:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
