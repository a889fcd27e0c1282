"""Latency side by side: prefill at several prompt lengths, the next chat turn, a tiny request.

`python -m bench.latency` (about 5 minutes) runs each server alone on the idle machine, one after
another, and prints a markdown table with each figure against llama.cpp on the same GGUF:

- prefill: time to the first token of a prompt of N tokens, a fresh prompt each time (a number at
  its start, so no server can reuse a cached prefix); tok/s = prompt tokens / that time;
- next turn: a ~450-token conversation, then the same conversation plus an answer and a short
  question (~27 new tokens): the second request's time to first token, served from each server's
  prompt cache;
- tiny: a `max_tokens: 1` request, whole.

Medians of `--repeats` runs. `openmlx-mlxmath` is openmlx with OPENMLX_CPU_MATH=off (MLX's own
attention and SwiGLU on the CPU), to show what engine/cpu/cpu_math.py changes.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from bench import workload
from bench.__main__ import default_model_dir
from bench.servers import Running, measure_each, peers

SIZES = (50, 500, 858, 2000)
NAMES = ("openmlx", "openmlx-mlxmath", "llama.cpp")


def measure(run: Running, prompts: dict[int, str], eos: list[int], repeats: int) -> dict:
    url, model = run.url, run.peer.model_id
    workload.stream_chat(url, model, "Hi", 4, eos)  # warm-up
    out = workload.prefill_and_next_turn(url, model, prompts, eos, repeats, history=500)
    out["tiny_s"] = statistics.median(workload.stream_chat(url, model, "Hi", 1, eos).total_s
                                      for _ in range(max(5, repeats)))
    return out


def markdown(results: dict) -> str:
    servers = results["servers"]
    ref = servers.get("llama.cpp", {})
    lines = ["| server | " + " | ".join(f"prefill {n} tok/s (TTFT s)" for n in SIZES)
             + " | next-turn TTFT s | tiny request s |", "|---" * (len(SIZES) + 3) + "|"]
    for name, r in servers.items():
        if "error" in r:
            lines.append(f"| {name} | {r['error']} |")
            continue
        cells = [f"{r['prefill'][str(n)]['tok_s']:.0f} ({r['prefill'][str(n)]['ttft_s']:.3f})" for n in SIZES]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {r['next_turn_ttft_s']:.3f} | {r['tiny_s']:.3f} |")
    if "prefill" in ref:
        lines += ["", "| server vs llama.cpp | " + " | ".join(f"prefill {n} (x, >1 faster)" for n in SIZES)
                  + " | next-turn TTFT (x, <=1 target) |", "|---" * (len(SIZES) + 2) + "|"]
        for name, r in servers.items():
            if name == "llama.cpp" or "error" in r:
                continue
            cells = [f"{r['prefill'][str(n)]['tok_s'] / ref['prefill'][str(n)]['tok_s']:.2f}" for n in SIZES]
            lines.append(f"| {name} | " + " | ".join(cells)
                         + f" | {r['next_turn_ttft_s'] / ref['next_turn_ttft_s']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.latency", description=__doc__.split("\n")[0])
    parser.add_argument("--only", action="append", help=f"run only these (repeatable): {', '.join(NAMES)}")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    model_dir = default_model_dir().resolve()
    count, eos = workload.count_with(model_dir)
    prompts = {n: workload.prompt_of(n, count) for n in SIZES}
    names = args.only or list(NAMES)
    table = peers(model_dir, model_dir.name, work=args.out, names=tuple(names))
    results: dict = {"date": time.strftime("%Y-%m-%d"), "servers": {}}
    results["servers"] = measure_each(table, names, args.out, lambda run: measure(run, prompts, eos, args.repeats),
                                      "bench.latency")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "latency.json").write_text(json.dumps(results, indent=2))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
