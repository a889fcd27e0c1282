"""Agent workloads side by side: long shared prompts, growing histories, several agents at once.

`python -m bench.agents` (about 10 minutes) runs each server alone, one after another:

- interleaved: `--agents` agents (default 3) share a ~2,000-token system prompt and six tools; each
  takes `--turns` turns (default 4), the agents taking turns A1 B1 C1 A2 B2 ...; every later turn
  adds an assistant tool call and its result (~100 tokens) to that agent's history. The histories
  are fixed text, not the model's answers, so every server gets the same prompts. Per turn: time to
  first token, and the prompt tokens the server computed (prompt tokens minus the cached ones it
  reports, where it reports them);
- concurrent: then every agent sends its next turn at once;
- long prefill: while one stream decodes, a 3,800-token prompt arrives, then a short chat: the
  running stream's decode rate while the long prompt is read, and the short chat's time to first
  token (engine/scheduler.py reads a long prompt in passes with the other streams between them).

Servers: openmlx, llama.cpp (same GGUF; its server reports no cached tokens), mlx_lm.server.
Writes `agents.json` to `--out` and prints markdown tables.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Optional

from bench import workload
from bench.__main__ import default_model_dir
from bench.servers import Running, measure_each, peers

NAMES = ("openmlx", "llama.cpp", "mlx_lm.server")

TOOLS = [{"type": "function", "function": {"name": name, "description": description, "parameters": {
    "type": "object", "properties": {arg: {"type": "string", "description": f"The {arg}."}}, "required": [arg]}}}
    for name, description, arg in [
        ("read_file", "Read a file of the repository and return its text.", "path"),
        ("write_file", "Replace a file of the repository with new text.", "path"),
        ("run_tests", "Run the test suite, or one test file, and return the report.", "target"),
        ("search_code", "Search the repository for a regular expression.", "pattern"),
        ("list_dir", "List a folder of the repository.", "path"),
        ("git_diff", "Show the uncommitted changes of a path.", "path")]]

RULE = ("Rule {i}: when a change touches the engine, read the surrounding module first, keep functions small, "
        "run the tests of the area you changed, and explain in one sentence why the change is safe. ")


def system_prompt(count, tokens: int = 2000) -> str:
    text = "You are a careful coding agent working in a Python repository. Follow these rules.\n"
    i = 0
    while count(text) < tokens:
        i += 1
        text += RULE.format(i=i)
    return text


def turn_messages(system: str, agent: int, turns: int) -> list[dict]:
    """Agent `agent`'s conversation up to its turn `turns` (1-based)."""
    messages = [{"role": "system", "content": system},
                {"role": "user", "content": f"Task {agent}: fix the failing test number {agent} in tests/test_{agent}.py."}]
    for t in range(1, turns):
        call_id = f"call_{agent}_{t}"
        # content "" rather than null: llama-cpp-python's server refuses null content.
        messages.append({"role": "assistant", "content": "", "tool_calls": [{"id": call_id, "type": "function",
                         "function": {"name": "read_file", "arguments": json.dumps({"path": f"src/m{agent}_{t}.py"})}}]})
        body = "\n".join(f"def f{agent}_{t}_{k}(x):\n    return x * {k} + {t}" for k in range(8))
        messages.append({"role": "tool", "tool_call_id": call_id, "content": body})
    return messages


def request(url: str, model: str, messages: list[dict], max_tokens: int, eos: list[int]) -> dict:
    """One streamed chat with the tools; time to first token and the usage the server reports."""
    body = {"model": model, "messages": messages, "tools": TOOLS, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}, "logit_bias": {str(i): -100 for i in eos}}
    start = time.perf_counter()
    ttft: Optional[float] = None
    usage: dict = {}
    with workload.client().stream("POST", url + "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            return {"error": f"HTTP {r.status_code}: {r.read()[:200]!r}"}
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices", []):
                delta = choice.get("delta", {})
                if ttft is None and (delta.get("content") or delta.get("tool_calls")):
                    ttft = time.perf_counter() - start
    prompt = usage.get("prompt_tokens")
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
    return {"ttft_s": ttft if ttft is not None else time.perf_counter() - start, "prompt_tokens": prompt,
            "cached_tokens": cached, "computed_tokens": prompt - cached if prompt is not None and cached is not None
            else None}


def agents_run(url: str, model: str, system: str, agents: int, turns: int, eos: list[int]) -> dict:
    interleaved = []
    for t in range(1, turns + 1):
        for a in range(1, agents + 1):
            r = request(url, model, turn_messages(system, a, t), 8, eos)
            interleaved.append({"agent": a, "turn": t, **r})
    results: list[dict] = []
    lock = threading.Lock()

    def one(a: int) -> None:
        r = request(url, model, turn_messages(system, a, turns + 1), 8, eos)
        with lock:
            results.append({"agent": a, "turn": turns + 1, **r})

    threads = [threading.Thread(target=one, args=(a,)) for a in range(1, agents + 1)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return {"interleaved": interleaved, "concurrent": sorted(results, key=lambda r: r["agent"])}


def long_prefill(url: str, model: str, count, eos: list[int]) -> dict:
    """A stream decodes; a 3,800-token prompt arrives, then a short chat."""
    marks: dict = {"tokens": []}

    def running() -> None:
        body = {"model": model, "messages": [{"role": "user", "content": "Write a long story about a storm."}],
                "max_tokens": 400, "temperature": 0, "stream": True, "logit_bias": {str(i): -100 for i in eos}}
        with workload.client().stream("POST", url + "/v1/chat/completions", json=body) as r:
            for line in r.iter_lines():
                if line.startswith("data: {") and '"content"' in line:
                    marks["tokens"].append(time.perf_counter())

    def long() -> None:
        start = time.perf_counter()
        # 3,800 tokens: within llama.cpp's 4,096-token context (bench/servers.py).
        r = workload.stream_chat(url, model, "Request long. " + workload.prompt_of(3800, count), 2, eos)
        marks["long"] = (start, start + r.ttft_s)

    stream = threading.Thread(target=running)
    stream.start()
    while len(marks["tokens"]) < 5:
        time.sleep(0.05)
    reader = threading.Thread(target=long)
    reader.start()
    time.sleep(1.0)
    short = workload.stream_chat(url, model, "Hi", 4, eos)
    reader.join()
    stream.join()
    begin, end = marks["long"]
    during = [t for t in marks["tokens"] if begin <= t <= end]
    before = [t for t in marks["tokens"] if t < begin]
    rate = lambda ts: (len(ts) - 1) / (ts[-1] - ts[0]) if len(ts) > 1 and ts[-1] > ts[0] else 0.0  # noqa: E731
    return {"decode_tps_before": rate(before), "decode_tps_during_long_prefill": rate(during),
            "long_ttft_s": end - begin, "short_ttft_s": short.ttft_s}


def markdown(results: dict) -> str:
    lines = ["| server | turn 1 TTFT s (median) | later turns TTFT s (median) | later turns computed tokens (max) | "
             "concurrent: cached tokens | concurrent TTFT s (max) |", "|---|---|---|---|---|---|"]
    for name, r in results["servers"].items():
        if "error" in r:
            lines.append(f"| {name} | {r['error'][:80]} | | | | |")
            continue
        first = [t["ttft_s"] for t in r["interleaved"] if t["turn"] == 1]
        failed = [t["error"] for t in r["interleaved"] + r["concurrent"] if "error" in t]
        if failed:
            lines.append(f"| {name} | {failed[0][:80]} | | | | |")
            continue
        later = [t for t in r["interleaved"] if t["turn"] > 1]
        computed = [t["computed_tokens"] for t in later if t["computed_tokens"] is not None]
        cached = [t["cached_tokens"] for t in r["concurrent"]]
        lines.append(f"| {name} | {statistics.median(first):.2f} | {statistics.median(t['ttft_s'] for t in later):.2f} | "
                     f"{max(computed) if computed else 'not reported'} | "
                     f"{', '.join('-' if c is None else str(c) for c in cached)} | "
                     f"{max(t['ttft_s'] for t in r['concurrent']):.2f} |")
    lines += ["", "| server | decode tok/s before | decode tok/s while a 3,800-token prompt is read | "
              "3,800-token prompt TTFT s | short chat TTFT s |", "|---|---|---|---|---|"]
    for name, r in results["servers"].items():
        p = r.get("long_prefill")
        if p:
            lines.append(f"| {name} | {p['decode_tps_before']:.1f} | {p['decode_tps_during_long_prefill']:.1f} | "
                         f"{p['long_ttft_s']:.1f} | {p['short_ttft_s']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.agents", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", action="append", help=f"run only these (repeatable): {', '.join(NAMES)}")
    parser.add_argument("--agents", type=int, default=3)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    model_dir = default_model_dir().resolve()
    count, eos = workload.count_with(model_dir)
    system = system_prompt(count)
    names = args.only or list(NAMES)
    table = peers(model_dir, model_dir.name, work=args.out, names=tuple(names))
    results: dict = {"system_prompt_tokens": count(system), "servers": {}}
    args.out.mkdir(parents=True, exist_ok=True)

    def measure(run: Running) -> dict:
        out = agents_run(run.url, run.peer.model_id, system, args.agents, args.turns, eos)
        out["long_prefill"] = long_prefill(run.url, run.peer.model_id, count, eos)
        return out

    results["servers"] = measure_each(table, names, args.out, measure, "bench.agents")
    (args.out / "agents.json").write_text(json.dumps(results, indent=2))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
