"""`n` choices with one shared prefill against the same choices as separate requests (each
prefilling the prompt itself), on a long prompt; and echo scoring (max_tokens 0) of a batch.

    python -m bench.choices [--n 4] [--prompt-words 600] [--tokens 8] [--repeat 3] [--out bench/results]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.report import save_table  # noqa: E402
from engine.models.default_model import DEFAULT_MODEL_ID as MODEL  # noqa: E402
from tests.process import Server  # noqa: E402


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--prompt-words", type=int, default=600)
    parser.add_argument("--tokens", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    words = "the river runs past the old mill and the town where people walk at night".split()
    # A different prompt each time: the prompt cache must not help either side.
    prompts = [f"Story {i}: " + " ".join(words[j % len(words)] for j in range(args.prompt_words))
               for i in range(2 * args.repeat + 1)]
    server = Server(["--max-queue", "64"])
    rows = []
    try:
        def post(body: dict) -> dict:
            r = httpx.post(server.url + "/v1/completions", timeout=600, json={"model": MODEL, **body})
            r.raise_for_status()
            return r.json()

        post({"prompt": prompts[-1], "max_tokens": 2})  # warm-up
        shared, separate = [], []
        for k in range(args.repeat):
            body = {"max_tokens": args.tokens, "temperature": 0.8, "seed": k}
            shared.append(timed(lambda: post({**body, "prompt": prompts[2 * k], "n": args.n})))
            with ThreadPoolExecutor(args.n) as pool:
                separate.append(timed(lambda: list(pool.map(
                    lambda i: post({**body, "prompt": prompts[2 * k + 1], "seed": k + i}), range(args.n)))))
        tokens = post({"prompt": prompts[0], "max_tokens": 1})["usage"]["prompt_tokens"]
        for mode, times in (("n in one request (prefill once)", shared), ("separate requests", separate)):
            rows.append({"mode": mode, "choices": args.n, "prompt_tokens": tokens,
                         "median_s": round(statistics.median(times), 2), "min_s": round(min(times), 2)})
            print(rows[-1], flush=True)
        batch = [{"prompt": prompts[i], "max_tokens": 0, "echo": True, "logprobs": 0} for i in range(4)]
        score = statistics.median(timed(lambda: post({**batch[0], "prompt": [b["prompt"] for b in batch]}))
                                  for _ in range(args.repeat))
        rows.append({"mode": "score 4 prompts (echo, max_tokens 0)", "choices": 4, "prompt_tokens": tokens,
                     "median_s": round(score, 2), "min_s": None})
        print(rows[-1], flush=True)
    finally:
        server.stop()
    save_table(rows, args.out, "choices", {"mode": "mode", "choices": "choices", "prompt tokens": "prompt_tokens",
                                           "median s": "median_s", "min s": "min_s"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
