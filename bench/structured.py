"""Cost of constrained decoding: decode tokens/s with and without a json_schema grammar on the
same prompt, grammar compile time cold vs cached, and tool-call parsing per request.

    python -m bench.structured [--out bench/results]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}, "population": {"type": "integer"},
                                           "landmarks": {"type": "array", "items": {"type": "string"}}},
          "required": ["city", "population", "landmarks"], "additionalProperties": False}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.structured", description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args(argv)

    import engine  # noqa: F401  (OpenBLAS before mlx)
    from engine.constrained import structured
    from engine.constrained.toolcalls import hermes
    from engine.config import openmlx_home
    from engine.models.default_model import ensure_default_model
    from engine.models.memory import MemoryGate
    from engine.models.probe import probe
    from engine.generation.text import ChatMessage, Finished, SamplingParams, TextRunner

    home = openmlx_home()
    runner = TextRunner.load("bench", probe(ensure_default_model(home / "models", home)), "auto", MemoryGate())
    prompt = runner.encode_chat([ChatMessage("user", "Describe Paris as JSON with its landmarks.")])
    # Rates are per token actually decoded, so runs that end at different lengths stay comparable.
    rows = []
    for label, grammar in (("plain", None), ("json_schema grammar", structured.grammar_for(
            {"type": "json_schema", "json_schema": {"name": "c", "schema": SCHEMA}}))):
        rates = []
        for _ in range(3):
            runner.prompt_cache.clear()
            params = SamplingParams(temperature=0, grammar=grammar, max_tokens=args.tokens)
            t0 = None
            n = 0
            start = time.perf_counter()
            for ev in runner.generate(prompt, args.tokens, params, lambda: False):
                if t0 is None:
                    t0 = time.perf_counter()
                if isinstance(ev, Finished):
                    n = ev.completion_tokens
            rates.append((n - 1) / (time.perf_counter() - t0) if n > 1 else 0.0)
        rows.append((label, statistics.median(rates), n))
    overhead = 100 * (1 - rows[1][1] / rows[0][1])

    structured._compile.cache_clear()
    t = time.perf_counter()
    structured.grammar_for({"type": "json_schema", "json_schema": {"name": "c", "schema": SCHEMA}})
    cold = 1000 * (time.perf_counter() - t)
    t = time.perf_counter()
    for _ in range(100):
        structured.grammar_for({"type": "json_schema", "json_schema": {"name": "c", "schema": SCHEMA}})
    cached = 1000 * (time.perf_counter() - t) / 100
    text = 'Sure. <tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}</tool_call>'
    t = time.perf_counter()
    for _ in range(1000):
        hermes.FORMAT.parse(text)
    parse_us = 1e6 * (time.perf_counter() - t) / 1000

    lines = ["| decode | tokens/s | tokens |", "|---|---|---|"]
    lines += [f"| {label} | {rate:.1f} | {n} |" for label, rate, n in rows]
    lines += ["", f"Grammar overhead on decode: {overhead:.1f} %.",
              f"Schema compile: {cold:.2f} ms cold, {cached:.3f} ms cached.",
              f"Tool-call parsing: {parse_us:.1f} µs per response."]
    report = "\n".join(lines)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "structured.md").write_text(report + "\n")
    (args.out / "structured.json").write_text(json.dumps({"rows": rows, "overhead_pct": overhead, "compile_cold_ms": cold,
                                                          "compile_cached_ms": cached, "parse_us": parse_us}))
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
