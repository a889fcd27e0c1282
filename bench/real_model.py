"""A real GGUF model side by side with llama.cpp on the same file (issue 30 §7).

`python -m bench.real_model --gguf FILE.gguf` (about 5 minutes for Qwen2.5-Coder-0.5B on 2 cores)
serves the file with openmlx (`--model FILE.gguf`, converted into the store once, held as float32
where memory allows) and with llama.cpp (llama-cpp-python's server from ../shared/peers, the
file as is), each alone, and prints a markdown table:

- prefill: time to the first token of a fresh ~500- and ~2,000-token prompt (a number at its
  start, so no server can reuse a cached prefix); tok/s = prompt tokens / that time;
- decode: a 128-token story (greedy, end-of-sequence banned), tokens per second after the first;
- next turn: a ~500-token conversation, then the same plus an answer and a short question: the
  second request's time to first token (served from each server's prompt cache);
- tool call: a weather question with one tool under `tool_choice: auto`, the whole request, and
  whether a parsed `tool_calls` came back (llama-cpp-python applies the file's chat template but
  parses no calls without a chat handler of its own: its answer stays text).

Medians of `--repeats` runs.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from bench import workload
from bench.servers import Peer, Running, llama_cpp_peer, measure_each

NAMES = ("openmlx", "llama.cpp")
STORY = "Write a long story about a lighthouse keeper and a storm."
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def tool_call(url: str, model: str) -> dict:
    """One non-streamed tool-calling request: its time, and the call (or text) that came back."""
    body = {"model": model, "temperature": 0, "max_tokens": 48, "tools": [WEATHER], "tool_choice": "auto",
            "messages": [{"role": "user", "content": "What is the weather in Paris?"}]}
    start = time.perf_counter()
    r = workload.client().post(url + "/v1/chat/completions", json=body)
    took = time.perf_counter() - start
    if r.status_code != 200:
        return {"s": took, "call": f"HTTP {r.status_code}"}
    message = r.json()["choices"][0]["message"]
    calls = message.get("tool_calls") or []
    if calls:
        fn = calls[0]["function"]
        return {"s": took, "call": f"{fn['name']}({fn['arguments']})"}
    return {"s": took, "call": "text: " + (message.get("content") or "")[:60]}


def measure(run: Running, prompts: dict[int, str], eos: list[int], repeats: int) -> dict:
    url, model = run.url, run.peer.model_id
    workload.stream_chat(url, model, "Hi", 4, eos)  # warm-up
    out = workload.prefill_and_next_turn(url, model, prompts, eos, repeats, history=min(prompts))
    stories = [workload.stream_chat(url, model, f"{STORY} ({i})", 128, eos) for i in range(repeats)]
    out["decode_tps"] = statistics.median(r.decode_tps for r in stories)
    calls = [tool_call(url, model) for _ in range(repeats)]
    out["tool_call_s"] = statistics.median(c["s"] for c in calls)
    out["tool_call"] = calls[0]["call"]
    return out


def markdown(results: dict) -> str:
    sizes = results["sizes"]
    lines = [f"Model: {results['model']}", "",
             "| server | " + " | ".join(f"prefill ~{n} tok/s (TTFT s)" for n in sizes)
             + " | decode tok/s | next-turn TTFT s | tool call s | what the tool call returned |",
             "|---" * (len(sizes) + 5) + "|"]
    for name, r in results["servers"].items():
        if "error" in r:
            lines.append(f"| {name} | {r['error'][:80]} |" + " |" * (len(sizes) + 3))
            continue
        prefill = " | ".join(f"{r['prefill'][str(n)]['tok_s']:.0f} ({r['prefill'][str(n)]['ttft_s']:.2f})"
                             for n in sizes)
        lines.append(f"| {name} | {prefill} | {r['decode_tps']:.1f} | {r['next_turn_ttft_s']:.2f} | "
                     f"{r['tool_call_s']:.2f} | `{r['tool_call']}` |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.real_model", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", type=Path, required=True, help="the GGUF file both servers serve")
    parser.add_argument("--only", action="append", help=f"run only these (repeatable): {', '.join(NAMES)}")
    parser.add_argument("--sizes", type=int, nargs="+", default=[500, 2000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    from engine.config import openmlx_home
    from engine.models.gguf_import import import_gguf

    gguf = args.gguf.resolve()
    folder = import_gguf(gguf, openmlx_home() / "models")  # the same conversion `serve` makes
    model_id = folder.name
    count, eos = workload.count_with(folder)
    prompts = {n: workload.prompt_of(n, count) for n in args.sizes}
    table = {"openmlx": Peer("openmlx", [sys.executable, "-m", "handlers.cli", "serve", "--model", str(gguf),
                                         "--port", "{port}", "--embedding-model", "none", "--audio-model", "none",
                                         "--log-level", "warning"], model_id, "/health")}
    names = args.only or list(NAMES)
    if "llama.cpp" in names:
        peer = llama_cpp_peer(gguf=gguf, alias=model_id, n_ctx=8192)
        if peer is not None:
            table["llama.cpp"] = peer
    args.out.mkdir(parents=True, exist_ok=True)
    results = {"model": model_id, "sizes": args.sizes, "servers": measure_each(
        table, names, args.out, lambda run: measure(run, prompts, eos, args.repeats), "bench.real_model")}
    (args.out / f"real_model-{model_id}.json").write_text(json.dumps(results, indent=2))
    table_md = markdown(results)
    (args.out / f"real_model-{model_id}.md").write_text(table_md)
    print(table_md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
