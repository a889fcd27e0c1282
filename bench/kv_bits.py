"""What `--kv-bits 8|4` buys and costs: the prompt cache quantizing its least recently used
entries when its bytes run out, instead of dropping them.

`python -m bench.kv_bits [--model DIR ...]` (a few minutes a model) loads each model as the server
does and takes an agent's conversation: a system prompt of ~`--prefix` tokens (this repository's
README: prose, code and tables), the agent's reply, then a pasted test file and a question. The
first turn's prompt is put in a prompt cache too small to hold it exactly, so it is kept quantized
(or, without --kv-bits, dropped), as it would be under memory pressure. Per mode:

- capacity: bytes a cached token takes, and the tokens 512 MB (the default `--prompt-cache-bytes`)
  holds;
- cost: quantizing the entry (once, when the bytes run out) and taking it back (dequantizing);
- the next turn: time to its first token (median of 3); "dropped" recomputes the whole prompt;
- drift, teacher-forced: the next turn's new tokens read on top of the reused prefix against the
  same tokens on the exact prefix: how often the top token agrees, the mean KL divergence of the
  next-token distributions, the largest logit difference;
- drift, free-running: how many of the greedy answer's first `--answer` tokens equal the answer
  on the exact prefix.

Writes `kv_bits.json` to `--out` and prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any, Optional

import engine  # noqa: F401 - loads OpenBLAS before anything imports mlx (engine/cpu/blas.py)
from bench.__main__ import default_model_dir


def _runner(model_dir: Path) -> Any:
    from engine.generation.text import TextRunner
    from engine.models.memory import MemoryGate
    from engine.models.probe import probe

    return TextRunner.load(model_dir.name, probe(model_dir), "auto", MemoryGate())


def _conversation(runner: Any, prefix_tokens: int) -> tuple[list[int], list[int]]:
    """(the first turn's prompt, the next turn's prompt): an agent given this repository's README,
    then a test file to read."""
    from engine.generation.text import ChatMessage

    words = (Path(__file__).resolve().parents[1] / "README.md").read_text().split(" ")
    system, n = "You are a coding agent. The project's README follows.\n", 0
    while len(runner.tokenizer.encode(system)) < prefix_tokens and n < len(words):
        system += " ".join(words[n:n + 40]) + " "
        n += 40
    first = [ChatMessage("system", system), ChatMessage("user", "Which command runs the tests? Answer briefly.")]
    body = "\n".join(f"def check_{k}(server):\n    assert server.get('/health').status_code == 200" for k in range(6))
    later = first + [ChatMessage("assistant", "Let me read the test file first."),
                     ChatMessage("user", f"Here is tests/test_health.py:\n{body}\nWhat does it check, and how "
                                         "would you run only it?")]
    return runner.encode_chat(first), runner.encode_chat(later)


def _fresh_cache(runner: Any, tokens: list[int]) -> list[Any]:
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    from engine.generation.batching import PREFILL_STEP

    cache = make_prompt_cache(runner.model)
    for i in range(0, len(tokens), PREFILL_STEP):
        runner.model(mx.array(tokens[i:i + PREFILL_STEP])[None], cache=cache)
        mx.eval([c.state for c in cache])
    return cache


def _logits(runner: Any, cache: list[Any], tokens: list[int]) -> Any:
    import mlx.core as mx

    out = runner.model(mx.array(tokens)[None], cache=cache)[0].astype(mx.float32)
    mx.eval(out)
    return out


def measure(model_dir: Path, prefix: int, answer: int) -> dict:
    import mlx.core as mx

    from engine.generation.prompt_cache import PromptCache, _prefix_copy

    runner = _runner(model_dir)
    first, later = _conversation(runner, prefix)
    shared = len(first) - 1  # what the next turn reuses: the first turn's prompt
    suffix = later[shared:]
    exact = _fresh_cache(runner, first[:shared])
    exact_bytes = sum(c.nbytes for c in _prefix_copy(exact, shared))
    reference = _logits(runner, _prefix_copy(exact, shared), suffix)
    ref_probs = mx.softmax(reference, axis=-1)
    # (name, --kv-bits, --prompt-cache-bytes): room for the exact entry, not for it, room for nothing
    modes = [("exact", None, 1 << 40), ("8", 8, exact_bytes - 1), ("4", 4, exact_bytes - 1),
             ("dropped", None, 1)]
    ref_answer = _answer(runner, first, later, answer, None, 1 << 40)
    rows = []
    for name, bits, bound in modes:
        row: dict[str, Any] = {"mode": name, "next_turn_ttft_s": round(_next_turn(runner, first, later, bits, bound), 3)}
        if name != "dropped":
            put_s, take_s = [], []
            for _ in range(5):
                cache = PromptCache(max_bytes=bound)
                cache.kv_bits = bits
                start = time.perf_counter()
                cache.put(first[:shared], _prefix_copy(exact, shared))
                put_s.append(time.perf_counter() - start)
                entry_bytes = cache.nbytes
                start = time.perf_counter()
                taken, reused = cache.take(later)
                mx.eval([x for c in taken for x in (c.keys, c.values)])
                take_s.append(time.perf_counter() - start)
                assert reused == shared, (reused, shared)
            logits = _logits(runner, taken, suffix)
            probs = mx.softmax(logits, axis=-1)
            kl = mx.sum(ref_probs * (mx.log(ref_probs + 1e-12) - mx.log(probs + 1e-12)), axis=-1)
            agree = mx.mean((mx.argmax(logits, axis=-1) == mx.argmax(reference, axis=-1)).astype(mx.float32))
            got = _answer(runner, first, later, answer, bits, bound)
            same = next((i for i, (a, b) in enumerate(zip(got, ref_answer)) if a != b), min(len(got), len(ref_answer)))
            per_token = entry_bytes / shared
            row.update({"bytes_per_token": round(per_token), "tokens_in_512MB": int((512 << 20) // per_token),
                        "put_ms": round(1000 * statistics.median(put_s), 1),
                        "take_ms": round(1000 * statistics.median(take_s), 1),
                        "top1_agree": round(float(agree), 4), "mean_kl": float(mx.mean(kl)),
                        "max_logit_diff": float(mx.max(mx.abs(logits - reference))),
                        "answer_same_tokens": f"{same}/{len(ref_answer)}"})
        rows.append(row)
    return {"model": model_dir.name, "dtype": runner.dtype, "prefix_tokens": shared, "suffix_tokens": len(suffix),
            "rows": rows}


def _first_turn(runner: Any, first: list[int], bits: Optional[int], bound: int) -> None:
    """A fresh prompt cache (`--kv-bits`, `--prompt-cache-bytes`) that has seen the first turn."""
    from engine.generation.text import SamplingParams

    runner.prompt_cache.clear()
    runner.prompt_cache.kv_bits, runner.prompt_cache.max_bytes = bits, bound
    for _ in runner.generate(first, 1, SamplingParams(temperature=0), lambda: False):
        pass


def _answer(runner: Any, first: list[int], later: list[int], n: int, bits: Optional[int], bound: int) -> list[str]:
    """The greedy answer's tokens to `later`, the conversation's next turn."""
    from engine.generation.text import SamplingParams, TextDelta

    _first_turn(runner, first, bits, bound)
    params = SamplingParams(temperature=0, logprobs=True)
    return [lp.token for event in runner.generate(later, n, params, lambda: False)
            if isinstance(event, TextDelta) for lp in event.logprobs]


def _next_turn(runner: Any, first: list[int], later: list[int], bits: Optional[int], bound: int) -> float:
    """Median seconds to the next turn's first token."""
    from engine.generation.text import SamplingParams, TextDelta

    times = []
    for _ in range(3):
        _first_turn(runner, first, bits, bound)
        start = time.perf_counter()
        for event in runner.generate(later, 2, SamplingParams(temperature=0), lambda: False):
            if isinstance(event, TextDelta):
                break
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def markdown(results: list[dict]) -> str:
    lines = []
    for r in results:
        lines += [f"**{r['model']}** ({r['dtype']}; the next turn reuses a {r['prefix_tokens']}-token prompt and "
                  f"reads {r['suffix_tokens']} new tokens)", "",
                  "| cached prompt | bytes/token | tokens in 512 MB | quantize ms | take ms | next-turn TTFT s | "
                  "top-1 agree | mean KL | max logit diff | greedy answer same |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for row in r["rows"]:
            name = {"exact": "exact (room for it)", "dropped": "dropped (no --kv-bits)"}.get(row["mode"],
                                                                                         f"--kv-bits {row['mode']}")
            if "bytes_per_token" not in row:
                lines.append(f"| {name} | | | | | {row['next_turn_ttft_s']} | | | | |")
                continue
            lines.append(f"| {name} | {row['bytes_per_token']:,} | {row['tokens_in_512MB']:,} | "
                         f"{row['put_ms']} | {row['take_ms']} | {row['next_turn_ttft_s']} | "
                         f"{100 * row['top1_agree']:.1f} % | {row['mean_kl']:.2e} | {row['max_logit_diff']:.3f} | "
                         f"{row['answer_same_tokens']} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", default=None,
                        help="model folder (repeatable; default: the embedded default model)")
    parser.add_argument("--prefix", type=int, default=2000, help="tokens of the reused system prompt")
    parser.add_argument("--answer", type=int, default=48, help="tokens of the greedy answer compared")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    models = [Path(m) for m in args.model] if args.model else [default_model_dir()]
    results = [measure(m, args.prefix, args.answer) for m in models]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "kv_bits.json").write_text(json.dumps(results, indent=2))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
