"""Decode side by side: free text, a grounded answer, and four streams at once.

`python -m bench.decode` (about 6 minutes) runs each server alone on the idle machine, one after
another, with the same requests (greedy, end-of-sequence banned so every server makes the same
number of tokens), and prints a markdown table:

- story: a 128-token story from a short prompt, where speculation can't help: the decode rate of
  a lone stream;
- grounded: the code-edit answer (`workload.GROUNDED`, 128 tokens), where prompt lookup pays;
- 4 streams: four stories at once, tokens per second of all of them together (batched decode).

Servers: openmlx; `openmlx-mlxdecode` (OPENMLX_FAST_DECODE=off: MLX's own decode step, what
engine/cpu/decode.py changes); llama.cpp on the same GGUF; and raw `mlx_lm.stream_generate` on
float32 weights with OpenBLAS (story and grounded only). Medians of `--repeats` runs.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from bench import workload
from bench.__main__ import default_model_dir
from bench.servers import Running, measure_each, peers

NAMES = ("openmlx", "openmlx-mlxdecode", "llama.cpp", "raw")
STORY = "Write a long story about a lighthouse keeper and a storm."
TOKENS = 128


def measure(run: Running, eos: list[int], repeats: int) -> dict:
    url, model = run.url, run.peer.model_id
    workload.stream_chat(url, model, "Hi", 4, eos)  # warm-up
    story = [workload.stream_chat(url, model, f"{STORY} ({i})", TOKENS, eos) for i in range(repeats)]
    grounded = [workload.stream_chat(url, model, workload.GROUNDED, TOKENS, eos) for _ in range(repeats)]
    streams = workload.concurrent(url, model, STORY, TOKENS // 2, eos, 4)
    return {"story_tps": statistics.median(r.decode_tps for r in story),
            "grounded_tps": statistics.median(r.decode_tps for r in grounded),
            "four_streams_tps": streams["aggregate_tps"]}


def markdown(results: dict) -> str:
    rows = results["servers"]
    raw = rows.get("raw", {})
    lines = ["| server | story decode tok/s | grounded decode tok/s | 4 streams aggregate tok/s |",
             "|---|---|---|---|"]
    for name, r in rows.items():
        if "error" in r:
            lines.append(f"| {name} | {r['error'][:80]} | | |")
            continue
        four = f"{r['four_streams_tps']:.1f}" if r.get("four_streams_tps") is not None else "-"
        lines.append(f"| {name} | {r['story_tps']:.1f} | {r['grounded_tps']:.1f} | {four} |")
    if raw.get("story_tps"):
        lines += ["", "| server | story decode vs raw mlx-lm float32 (x) | vs llama.cpp (x) |", "|---|---|---|"]
        ref = rows.get("llama.cpp", {})
        for name, r in rows.items():
            if name == "raw" or "error" in r:
                continue
            versus = f"{r['story_tps'] / ref['story_tps']:.2f}" if ref.get("story_tps") else "-"
            lines.append(f"| {name} | {r['story_tps'] / raw['story_tps']:.2f} | {versus} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.decode", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", action="append", help=f"run only these (repeatable): {', '.join(NAMES)}")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    model_dir = default_model_dir().resolve()
    count, eos = workload.count_with(model_dir)
    names = args.only or list(NAMES)
    table = peers(model_dir, model_dir.name, work=args.out, names=tuple(names))
    results: dict = {"servers": {}}
    args.out.mkdir(parents=True, exist_ok=True)
    if "raw" in names:
        story = workload.raw_mlx_lm(str(model_dir), {"story": STORY}, TOKENS, True, eos)
        grounded = workload.raw_mlx_lm(str(model_dir), {"grounded": workload.GROUNDED}, TOKENS, True, eos)
        if "error" in story or "error" in grounded:
            raw = {"error": story.get("error") or grounded.get("error")}
        else:
            raw = {"story_tps": story["story"]["decode_tps"], "grounded_tps": grounded["grounded"]["decode_tps"],
                   "four_streams_tps": None}
    servers = [n for n in names if n != "raw"]
    results["servers"] = measure_each(table, servers, args.out, lambda run: measure(run, eos, args.repeats),
                                      "bench.decode")
    if "raw" in names:
        results["servers"]["raw"] = raw
    (args.out / "decode.json").write_text(json.dumps(results, indent=2))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
