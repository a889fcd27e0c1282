"""Embedding speed: openmlx's MLX BERT (exact and tanh-approximated GELU) and, when a Python with
sentence-transformers is given, torch on the same folder and sentences.

    python -m bench.embeddings [--torch-python /path/to/venv/bin/python] [--out bench/results]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

SENTENCES = [f"This is test sentence number {i}, about rivers, cities and the weather." for i in range(64)]
REPEATS = 5

TORCH_CODE = """
import json, sys, time, statistics
from sentence_transformers import SentenceTransformer
m = SentenceTransformer(sys.argv[1], device="cpu")
s = json.loads(sys.stdin.read())
m.encode(s, batch_size=64)  # warm-up
batch = []
for _ in range(%d):
    t = time.perf_counter(); v = m.encode(s, batch_size=64, normalize_embeddings=True); batch.append(time.perf_counter() - t)
single = []
for x in s[:20]:
    t = time.perf_counter(); m.encode([x]); single.append(time.perf_counter() - t)
print(json.dumps({"batch64_s": statistics.median(batch), "single_ms": 1000 * statistics.median(single),
                  "vectors": v[:4].tolist()}))
""" % REPEATS


def mlx_run(folder: Path, approx: bool) -> dict:
    import mlx.nn as nn
    import numpy as np

    from engine.media.embeddings import BertEmbedder

    e = BertEmbedder("bench", folder, gelu=nn.gelu_approx if approx else nn.gelu)
    e.embed(SENTENCES[:8])
    batch = []
    for _ in range(REPEATS):
        t = time.perf_counter()
        vecs = np.concatenate([e.embed(SENTENCES[i:i + 32]).vectors for i in range(0, 64, 32)])
        batch.append(time.perf_counter() - t)
    single = []
    for s in SENTENCES[:20]:
        t = time.perf_counter()
        e.embed([s])
        single.append(time.perf_counter() - t)
    return {"batch64_s": statistics.median(batch), "single_ms": 1000 * statistics.median(single), "vectors": vecs}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.embeddings", description=__doc__)
    parser.add_argument("--torch-python", help="a Python that has sentence-transformers (optional)")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    import numpy as np

    import engine  # noqa: F401  (OpenBLAS before mlx)
    from engine.config import openmlx_home
    from engine.models.default_model import ensure_default_embedding_model

    home = openmlx_home()
    folder = ensure_default_embedding_model(home / "models", home)
    exact, approx = mlx_run(folder, False), mlx_run(folder, True)
    cos = float(min((exact["vectors"] * approx["vectors"]).sum(1)))
    rows = [("openmlx MLX, exact GELU (served)", exact), ("MLX, tanh-approx GELU", approx)]
    if args.torch_python:
        r = subprocess.run([args.torch_python, "-c", TORCH_CODE, str(folder)], input=json.dumps(SENTENCES),
                           capture_output=True, text=True, timeout=600)
        if r.returncode == 0:
            rows.append(("sentence-transformers (torch)", json.loads(r.stdout.strip().splitlines()[-1])))
        else:
            print("torch run failed:", r.stderr[-500:], file=sys.stderr)
    lines = ["| implementation | batch of 64: sentences/s | single sentence ms |", "|---|---|---|"]
    lines += [f"| {name} | {64 / d['batch64_s']:.0f} | {d['single_ms']:.1f} |" for name, d in rows]
    lines.append(f"\nExact vs tanh-approximated GELU: minimum cosine {cos:.7f} over the batch.")
    text = "\n".join(lines)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "embeddings.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
