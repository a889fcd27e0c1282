"""Float32 against `--cpu-dtype quantized` (weights held as blocks, products through onnxruntime's
MatMulNBits) on one model: decode tok/s, prefill tok/s, peak RSS, and whether the greedy tokens agree.

`python -m bench.quant_cpu [--model FOLDER] [--rounds 2] [--tokens 48]` loads the model in a fresh
process per path and per round, the two paths in turns (float32, quantized, float32, ...), so
whatever else the machine does at the time weighs on both alike; each process reports its own peak
RSS (ru_maxrss: the load's transient copies included). Prints a markdown table; `--json` writes
the raw figures. Default model: the Qwen2.5-Coder-0.5B Q4_K_M store folder, else the default model.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

PROMPT = "Write a long story about a lighthouse keeper and a storm."

_CHILD = r"""
import json, resource, sys, time
from engine.cpu import blas  # OpenBLAS before mlx, as the server does
import mlx.core as mx
from pathlib import Path
from mlx_lm.models.cache import make_prompt_cache
from engine.models.memory import MemoryGate
from engine.models.probe import probe
from engine.models.weights import load_gated
folder, dtype, tokens, prompt = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
t0 = time.perf_counter()
loaded = load_gated("bench", probe(Path(folder)), dtype, MemoryGate())
load_s = time.perf_counter() - t0
ids = loaded.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
cache = make_prompt_cache(loaded.model)
t0 = time.perf_counter()
logits = loaded.model(mx.array([ids]), cache=cache)[0, -1]
out = [int(mx.argmax(logits))]
prefill_s = time.perf_counter() - t0
t0 = time.perf_counter()
for _ in range(tokens - 1):
    out.append(int(mx.argmax(loaded.solo(mx.array([[out[-1]]]), cache=cache)[0, -1])))
decode_s = time.perf_counter() - t0
print(json.dumps({"dtype": loaded.dtype, "reason": loaded.dtype_reason, "decode": loaded.decode,
                  "load_s": load_s, "prefill_tps": len(ids) / prefill_s, "prompt_tokens": len(ids),
                  "decode_tps": (tokens - 1) / decode_s, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6 * 1.024,
                  "tokens": out}))
"""


def default_folder() -> Path:
    home = Path(os.environ.get("OPENMLX_HOME", Path.home() / ".cache" / "openmlx"))
    qwen = home / "models" / "qwen2.5-coder-0.5b-instruct-q4_k_m"
    return qwen if qwen.exists() else home / "models" / "SmolLM2-135M-Instruct"


def run_one(folder: Path, dtype: str, tokens: int) -> dict:
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", _CHILD, str(folder), dtype, str(tokens), PROMPT], cwd=root,
                         capture_output=True, text=True)
    if out.returncode:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def markdown(folder: Path, runs: dict[str, list[dict]]) -> str:
    lines = [f"model: `{folder.name}`", "",
             "| path | decode tok/s | prefill tok/s | peak RSS GB | load s | greedy tokens equal to float32 |",
             "|---|---|---|---|---|---|"]
    ref = next((r["tokens"] for r in runs.get("float32", []) if "tokens" in r), None)
    for dtype, rs in runs.items():
        ok = [r for r in rs if "error" not in r]
        if not ok:
            lines.append(f"| {dtype} | {rs[0]['error'][:80]} | | | | |")
            continue
        med = lambda key: statistics.median(r[key] for r in ok)  # noqa: E731
        same = "-" if ref is None else ("yes" if all(r["tokens"] == ref for r in ok) else
                                        f"first {next(i for i, (a, b) in enumerate(zip(ok[0]['tokens'] + [None], ref)) if a != b)}")
        lines.append(f"| {dtype} | {med('decode_tps'):.1f} | {med('prefill_tps'):.1f} | {med('peak_rss_gb'):.2f} | "
                     f"{med('load_s'):.0f} | {same} |")
    for dtype, rs in runs.items():
        for r in rs[:1]:
            if "error" not in r:
                lines.append(f"\n{dtype}: {r['reason']}; decode: {r['decode']}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="a model folder in the store")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    folder = args.model or default_folder()
    runs: dict[str, list[dict]] = {"float32": [], "quantized": []}
    for _ in range(args.rounds):
        for dtype in runs:
            runs[dtype].append(run_one(folder, dtype, args.tokens))
            print(dtype, {k: v for k, v in runs[dtype][-1].items() if k != "tokens"}, file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(runs, indent=1))
    print(markdown(folder, runs))


if __name__ == "__main__":
    main()
