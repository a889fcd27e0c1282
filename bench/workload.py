"""The measurements: the same requests against every server, and raw mlx-lm in-process."""
from __future__ import annotations

import json
import statistics
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import httpx

# The paragraph repeated to build prompts of a given token length.
FILLER = ("The history of the city is long and full of small events that shaped its streets, its markets "
          "and the habits of the people who lived there. ")


@dataclass
class StreamResult:
    ttft_s: float
    total_s: float
    completion_tokens: int
    prompt_tokens: int
    ok: bool
    error: str = ""

    @property
    def decode_tps(self) -> float:
        span = self.total_s - self.ttft_s
        return (self.completion_tokens - 1) / span if span > 0 and self.completion_tokens > 1 else 0.0

    @property
    def prefill_tps(self) -> float:
        return self.prompt_tokens / self.ttft_s if self.ttft_s > 0 else 0.0


# A grounded request: the answer quotes its input (a code edit), where speculative decoding's
# prompt lookup pays. With end-of-sequence banned the model goes on past the quote, as answers do.
GROUNDED = '''Here is my Python module:

import sys


def fibonacci(n):
    """Return the n-th Fibonacci number."""
    if n < 2:
        return n
    return fibonacci(n - 1) + fibonacci(n - 2)


def table(count):
    rows = []
    for i in range(count):
        rows.append((i, fibonacci(i)))
    return rows


def main(argv):
    count = int(argv[1]) if len(argv) > 1 else 10
    for i, value in table(count):
        print(f"{i:3d} {value:8d}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

Add a docstring to the function table and show the whole module.'''


def prompt_of(tokens: int, count) -> str:
    """A user message of about `tokens` tokens (counted with the model's tokenizer)."""
    text = "Summarise this text in one long paragraph. "
    while count(text) < tokens:
        text += FILLER
        if len(text) > 40 * tokens:  # a tokenizer that counts nothing must not loop forever
            raise ValueError("could not build a prompt of the requested length")
    return text


# Token counting with the model's own tokenizer (set by the bench before it runs): servers'
# `usage` is not trusted (one peer estimates it from words).
COUNTER: dict = {"text": None, "chat": None}


def count_with(model_dir) -> tuple[Callable[[str], int], list[int]]:
    """Count tokens with the model's own tokenizer from here on (sets COUNTER); returns a counter
    of a one-message chat prompt's tokens and the model's end-of-sequence ids."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    eos = json.loads((Path(model_dir) / "config.json").read_text()).get("eos_token_id")

    def chat(msgs: list) -> int:
        return len(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False))

    COUNTER["text"] = lambda text: len(tok.encode(text, add_special_tokens=False))
    COUNTER["chat"] = chat
    return (lambda text: chat([{"role": "user", "content": text}])), (eos if isinstance(eos, list) else [eos])


_CLIENT: Optional[httpx.Client] = None


def client() -> httpx.Client:
    """One pooled client for every request, as real clients (the openai SDK) hold one: a fresh
    `httpx.stream()` per request builds an SSL context first, ~25-35 ms of the client's own
    that used to land in every measured TTFT (it also counted against each server's tiny request)."""
    global _CLIENT
    if _CLIENT is None:
        _CLIENT = httpx.Client(timeout=600, limits=httpx.Limits(max_connections=64))
    return _CLIENT


def stream_chat(url: str, model: str, content: str, max_tokens: int, eos_ids: list[int],
                messages: Optional[list] = None) -> StreamResult:
    """One greedy streamed chat request with end-of-sequence banned, so every server produces
    exactly `max_tokens` tokens."""
    body = {"model": model, "messages": messages or [{"role": "user", "content": content}],
            "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "logit_bias": {str(i): -100 for i in eos_ids}}
    start = time.perf_counter()
    ttft = 0.0
    usage = None
    pieces: list[str] = []
    try:
        with client().stream("POST", url + "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                return StreamResult(0, 0, 0, 0, False, f"HTTP {r.status_code}: {r.read()[:200]!r}")
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for choice in chunk.get("choices", []):
                    if choice.get("delta", {}).get("content"):
                        pieces.append(choice["delta"]["content"])
                        if not ttft:
                            ttft = time.perf_counter() - start
    except httpx.HTTPError as e:
        return StreamResult(0, 0, 0, 0, False, repr(e))
    total = time.perf_counter() - start
    text = "".join(pieces)
    completion = COUNTER["text"](text) if COUNTER["text"] else (usage or {}).get("completion_tokens", len(pieces))
    msgs = messages or [{"role": "user", "content": content}]
    prompt = COUNTER["chat"](msgs) if COUNTER["chat"] else (usage or {}).get("prompt_tokens", 0)
    return StreamResult(ttft, total, completion, prompt, True)


def prefill_and_next_turn(url: str, model: str, prompts: dict[int, str], eos_ids: list[int],
                          repeats: int, history: int) -> dict:
    """{"prefill": {n: {ttft_s, prompt_tokens, tok_s}}, "next_turn_ttft_s"}: each prompt fresh (a
    number at its start, so no server reuses a cached prefix); then a conversation on prompt
    `history` and its next turn (an answer and a short question), the second request's TTFT."""
    out: dict = {"prefill": {}}
    for n, text in prompts.items():
        runs = [stream_chat(url, model, f"Request {i} of {n}. {text}", 2, eos_ids) for i in range(repeats)]
        ttft = statistics.median(r.ttft_s for r in runs)
        out["prefill"][str(n)] = {"ttft_s": ttft, "prompt_tokens": runs[0].prompt_tokens,
                                  "tok_s": runs[0].prompt_tokens / ttft if ttft else 0.0}
    turns = []
    for i in range(repeats):
        turn = [{"role": "user", "content": f"Conversation {i}. {prompts[history]}"}]
        stream_chat(url, model, "", 8, eos_ids, messages=turn)
        turn += [{"role": "assistant", "content": "It is a long story about a city and its streets."},
                 {"role": "user", "content": "Say it again in three words, please."}]
        turns.append(stream_chat(url, model, "", 8, eos_ids, messages=turn).ttft_s)
    out["next_turn_ttft_s"] = statistics.median(turns)
    return out


def concurrent(url: str, model: str, content: str, max_tokens: int, eos_ids: list[int], n: int) -> dict:
    results: list[StreamResult] = []
    lock = threading.Lock()

    def one():
        r = stream_chat(url, model, content, max_tokens, eos_ids)
        with lock:
            results.append(r)

    start = time.perf_counter()
    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ok = [r for r in results if r.ok]
    ttfts = sorted(r.ttft_s for r in ok)
    return {"streams": n, "aggregate_tps": sum(r.completion_tokens for r in ok) / wall if wall else 0,
            "ttft_p50_s": statistics.median(ttfts) if ttfts else None,
            "ttft_p95_s": ttfts[min(len(ttfts) - 1, int(0.95 * len(ttfts)))] if ttfts else None,
            "errors": len(results) - len(ok)}


def health_latency(url: str, path: str, samples: int = 50) -> dict:
    times = []
    with httpx.Client(timeout=10) as h:
        for _ in range(samples):
            t = time.perf_counter()
            h.get(url + path)
            times.append(time.perf_counter() - t)
            time.sleep(0.02)
    times.sort()
    return {"p50_ms": 1000 * times[len(times) // 2], "p99_ms": 1000 * times[min(len(times) - 1, int(0.99 * len(times)))]}


def raw_mlx_lm(model_dir: str, prompts: dict[int, str], max_tokens: int, dequantize: bool,
               eos_ids: list[int]) -> dict:
    """The physical reference: mlx_lm.stream_generate in this process (run in a subprocess so
    BLAS and dtype choices don't leak between runs)."""
    import subprocess
    import sys

    code = f"""
import json, sys, time
{"import engine" if dequantize else ""}
import mlx.core as mx
from mlx_lm import load, stream_generate
from mlx_lm.sample_utils import make_logits_processors
from mlx_lm.utils import dequantize_model
model, tok = load({model_dir!r})
if {dequantize}:
    model = dequantize_model(model); model.set_dtype(mx.float32); mx.eval(model.parameters())
out = {{}}
prompts = json.loads(sys.stdin.read())
for n, text in prompts.items():
    ids = tok.apply_chat_template([{{"role": "user", "content": text}}], add_generation_prompt=True)
    last = None
    # The same end-of-sequence ban the servers get, so the work per token is the same.
    procs = make_logits_processors(logit_bias={{i: -100.0 for i in {eos_ids!r}}})
    for r in stream_generate(model, tok, ids, max_tokens={max_tokens}, logits_processors=procs):
        last = r
    out[n] = {{"prefill_tps": last.prompt_tps, "decode_tps": last.generation_tps, "prompt_tokens": last.prompt_tokens}}
print(json.dumps(out))
"""
    env = None
    if not dequantize:
        import os
        env = {**os.environ, "OPENMLX_BLAS": "bundled"}
    r = subprocess.run([sys.executable, "-c", code], input=json.dumps({str(k): v for k, v in prompts.items()}),
                       capture_output=True, text=True, timeout=3600, env=env)
    if r.returncode != 0:
        return {"error": r.stderr[-500:]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def as_dict(r: StreamResult) -> dict:
    d = asdict(r)
    d.update(decode_tps=r.decode_tps, prefill_tps=r.prefill_tps)
    return d
