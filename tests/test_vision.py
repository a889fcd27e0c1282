"""Vision end to end: a tiny random Qwen2-VL through the real mlx-vlm pipeline (processor, chat
template with images, vision tower, generation, streaming) behind a live server.

The model's words are gibberish; what is checked is what the server promises: every content
form reaches the model (the prompt grows by the image's tokens), stream = non-stream, numbering
and history, chunked passes, real accounting, and a clear 400 for every bad input.
"""
from __future__ import annotations

import base64
import io
import subprocess
import sys

import anthropic
import httpx
import openai
import pytest
from PIL import Image

from conftest import MODEL, Server
from contract import schemas
from engine.request import ImageInput
from engine.media.images import numbering
from engine.generation.text import ChatMessage
from engine.media.vision import template_turns

VLM = "tiny-vlm"


def image_bytes(color=(200, 30, 30), size=(80, 60), fmt="PNG") -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, fmt)
    return out.getvalue()


def data_url(color=(200, 30, 30), size=(80, 60), fmt="PNG") -> str:
    mime = {"PNG": "png", "JPEG": "jpeg", "WEBP": "webp", "GIF": "gif", "BMP": "bmp"}[fmt]
    return f"data:image/{mime};base64," + base64.b64encode(image_bytes(color, size, fmt)).decode()


def ask(*urls: str, text: str = "What is in the picture?") -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": text}]
             + [{"type": "image_url", "image_url": {"url": u, "detail": "low"}} for u in urls]}]


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    (folder / "cat.png").write_bytes(image_bytes((10, 200, 10)))
    return folder


@pytest.fixture(scope="module")
def vserver(tiny_vlm, image_dir):
    s = Server(["--model-dir", str(tiny_vlm), "--max-models", "2", "--max-image-bytes", "200000",
                "--max-image-pixels", "1000000", "--max-images", "6", "--image-dir", str(image_dir)],
               env={"HF_HUB_OFFLINE": "1"})
    yield s
    s.stop()


@pytest.fixture(scope="module")
def vclient(vserver):
    return openai.OpenAI(base_url=vserver.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def chat(vclient, messages, **kw):
    return vclient.chat.completions.create(model=VLM, messages=messages, max_tokens=kw.pop("max_tokens", 6),
                                           temperature=0, **kw)


def test_listed_as_vision(vclient, vserver, tiny_vlm):
    models = {m.id: m for m in vclient.models.list().data}
    assert models[VLM].model_extra["type"] == "vision"
    out = subprocess.run([sys.executable, "-m", "handlers.cli", "list", "--model-dir", str(tiny_vlm)],
                         capture_output=True, text=True, timeout=120)
    line = next(l for l in out.stdout.splitlines() if VLM in l)
    assert "vision" in line


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF"])
def test_each_image_format_reaches_the_model(vclient, fmt):
    text_only = chat(vclient, ask())
    raw = vclient.chat.completions.with_raw_response.create(model=VLM, messages=ask(data_url(fmt=fmt)),
                                                            max_tokens=6, temperature=0)
    r = raw.parse()
    assert r.usage.prompt_tokens > text_only.usage.prompt_tokens  # the image's tokens
    assert r.usage.completion_tokens == 6 and r.choices[0].finish_reason == "length"
    body = raw.http_response.json()
    assert schemas.openai("CreateChatCompletionResponse", body) == [] and schemas.ours("CreateChatCompletionResponse", body) == []


def test_text_only_request_to_a_vision_model(vclient):
    r = chat(vclient, [{"role": "user", "content": "Hello"}])
    assert r.choices[0].message.role == "assistant" and r.usage.completion_tokens >= 1


def test_stream_equals_non_stream(vclient):
    messages = ask(data_url())
    plain = chat(vclient, messages, max_tokens=8)
    stream = chat(vclient, messages, max_tokens=8, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == plain.usage.prompt_tokens


def test_stop_string_and_seeded_sampling(vclient):
    messages = ask(data_url())
    a = vclient.chat.completions.create(model=VLM, messages=messages, max_tokens=8, temperature=1.0, seed=7)
    b = vclient.chat.completions.create(model=VLM, messages=messages, max_tokens=8, temperature=1.0, seed=7)
    assert a.choices[0].message.content == b.choices[0].message.content
    greedy = chat(vclient, messages, max_tokens=8).choices[0].message.content
    word = greedy.split()[1] if len(greedy.split()) > 1 else None
    if word:
        cut = chat(vclient, messages, max_tokens=8, stop=[word])
        assert word not in cut.choices[0].message.content and cut.choices[0].finish_reason == "stop"


def test_local_file_under_image_dir(vclient, image_dir):
    r = chat(vclient, ask(f"file://{image_dir / 'cat.png'}"))
    assert r.usage.prompt_tokens > chat(vclient, ask()).usage.prompt_tokens
    r2 = chat(vclient, ask("cat.png"))  # a path relative to --image-dir
    assert r2.usage.prompt_tokens == r.usage.prompt_tokens


def test_history_keeps_images_for_vision_and_markers_for_text(vclient):
    red, blue = data_url((255, 0, 0)), data_url((0, 0, 255))
    history = ask(red, text="First picture") + [{"role": "assistant", "content": "A red square."}]
    follow = history + ask(blue, text="And this one?")
    with_history = chat(vclient, follow)
    alone = chat(vclient, ask(blue, text="And this one?"))
    image_tokens = chat(vclient, ask(blue)).usage.prompt_tokens - chat(vclient, ask()).usage.prompt_tokens
    # The earlier image is still seen: the prompt holds two images' tokens.
    assert with_history.usage.prompt_tokens - alone.usage.prompt_tokens > image_tokens
    # A text model gets the history with a marker instead (and no 400: the image is not in the newest turn).
    text = vclient.chat.completions.create(model=MODEL, messages=history + [{"role": "user", "content": "Thanks"}],
                                           max_tokens=2)
    assert text.usage.prompt_tokens > 0


def test_numbering_is_stable_across_turns():
    red, blue, green = (ImageInput(f"x{i}", "p", data=bytes([i])) for i in range(3))
    turn1 = [ChatMessage("user", "look", (red, blue))]
    turn2 = turn1 + [ChatMessage("assistant", "ok"), ChatMessage("user", "and", (green, red))]
    n1, n2 = numbering([i for m in turn1 for i in m.images]), numbering([i for m in turn2 for i in m.images])
    assert n1[red.digest] == n2[red.digest] == 1 and n1[blue.digest] == n2[blue.digest] == 2
    assert n2[green.digest] == 3
    turns, order = template_turns(turn2, n2, set(n2))
    texts = [p["text"] for t in turns if isinstance(t["content"], list) for p in t["content"] if p["type"] == "text"]
    assert texts[:2] == ["Image 1:", "Image 2:"] and "Image 3:" in texts and "Image 1 (again)." in texts
    assert order == [red.digest, blue.digest, green.digest]  # one placeholder per picture
    # Images not shown in a pass are named in a marker.
    turns, order = template_turns(turn2, n2, {green.digest})
    assert order == [green.digest]
    assert "[Image 1, Image 2 were attached]" in turns[0]["content"][-1]["text"]


def test_many_images_are_processed_in_chunks(vclient):
    urls = [data_url((40 * i, 0, 0)) for i in range(5)]
    one_pass = chat(vclient, ask(*urls), max_tokens=12, extra_body={"image_chunk_size": 8})
    chunked = chat(vclient, ask(*urls), max_tokens=12, extra_body={"image_chunk_size": 2})
    # Three passes (2 + 2 + 1 images), each seeing the conversation: more prompt tokens in all,
    # the budget shared (4 tokens each), the answers joined by blank lines.
    assert chunked.usage.prompt_tokens > one_pass.usage.prompt_tokens
    assert chunked.usage.completion_tokens == 12
    streamed = chat(vclient, ask(*urls), max_tokens=12, extra_body={"image_chunk_size": 2}, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert text == chunked.choices[0].message.content
    assert text.count("\n\n") >= 2


def test_responses_and_messages_take_images(vserver, vclient):
    r = vclient.responses.create(model=VLM, max_output_tokens=4, temperature=0, input=[{"role": "user", "content": [
        {"type": "input_text", "text": "What is it?"}, {"type": "input_image", "image_url": data_url()}]}])
    assert r.usage.input_tokens > vclient.responses.create(model=VLM, input="What is it?", max_output_tokens=4,
                                                           temperature=0).usage.input_tokens - 5
    claude = anthropic.Anthropic(base_url=vserver.url, api_key="unused", max_retries=0)
    m = claude.messages.create(model=VLM, max_tokens=4, messages=[{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                     "data": base64.b64encode(image_bytes()).decode()}},
        {"type": "text", "text": "What is it?"}]}])
    assert m.usage.output_tokens == 4


BMP = data_url(fmt="BMP")


@pytest.mark.parametrize("messages, code", [
    (ask("data:image/png;base64," + base64.b64encode(b"not an image at all").decode()), "invalid_image"),
    (ask("data:image/png;base64,@@@notbase64"), "invalid_image"),
    (ask(BMP), "unsupported_image_format"),
    (ask(data_url(size=(1200, 1000))), "image_too_large"),  # 1.2 M pixels > --max-image-pixels 1 M
    (ask("data:image/png;base64," + base64.b64encode(b"\x89PNG" + b"0" * 300000).decode()), "image_too_large"),
    (ask(*[data_url((i, 0, 0)) for i in range(7)]), "too_many_images"),
    (ask("http://127.0.0.1:9/cat.png"), "image_url_not_allowed"),
    (ask("file:///etc/passwd"), "image_file_not_allowed"),
    (ask("../../etc/passwd"), "image_file_not_allowed"),
    (ask("ftp://example.com/x.png"), "invalid_image"),
])
def test_bad_images_are_a_clear_400(vserver, messages, code):
    r = httpx.post(vserver.url + "/v1/chat/completions", json={"model": VLM, "messages": messages, "max_tokens": 2},
                   timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == code, error
    assert error["param"].startswith("messages"), error
    # The worker survived: the next request works.
    assert httpx.post(vserver.url + "/v1/chat/completions", json={"model": VLM, "messages": ask(data_url()),
                                                                  "max_tokens": 1}, timeout=60).status_code == 200


@pytest.mark.parametrize("chunk", [0, 9])
def test_chunk_size_out_of_range_is_400(vserver, chunk):
    r = httpx.post(vserver.url + "/v1/chat/completions", json={"model": VLM, "messages": ask(data_url()),
                                                                "image_chunk_size": chunk}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "image_chunk_size"


def test_image_to_a_text_model_names_the_vision_model(vserver):
    r = httpx.post(vserver.url + "/v1/chat/completions", json={"model": MODEL, "messages": ask(data_url())},
                   timeout=60)
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "model_not_multimodal" and VLM in r.json()["error"]["message"]
    m = httpx.post(vserver.url + "/v1/messages", json={"model": MODEL, "max_tokens": 2, "messages": [
        {"role": "user", "content": [{"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                                  "data": base64.b64encode(image_bytes()).decode()}}]}]},
                   timeout=60)
    assert m.status_code == 400 and m.json()["type"] == "error"
    resp = httpx.post(vserver.url + "/v1/responses", json={"model": MODEL, "input": [{"role": "user", "content": [
        {"type": "input_image", "image_url": data_url()}]}]}, timeout=60)
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "input"


def test_completions_refuse_a_vision_model(vserver):
    r = httpx.post(vserver.url + "/v1/completions", json={"model": VLM, "prompt": "Hi", "max_tokens": 2}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"


def test_http_image_urls_when_allowed(tiny_vlm, image_dir):
    """--allow-image-urls: fetched with a size limit; a missing file is a clear 400."""
    import functools
    import http.server
    import threading

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(image_dir))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    (image_dir / "big.png").write_bytes(image_bytes(size=(300, 300)) + b"\0" * 300_000)
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    s = Server(["--model-dir", str(tiny_vlm), "--max-models", "2", "--allow-image-urls",
                "--image-url-allow-network", "127.0.0.1/32", "--max-image-bytes", "200000"],
               env={"HF_HUB_OFFLINE": "1"})
    try:
        def post(url):
            return httpx.post(s.url + "/v1/chat/completions", timeout=60,
                              json={"model": VLM, "messages": ask(url), "max_tokens": 2})
        ok = post(f"{base}/cat.png")
        assert ok.status_code == 200 and ok.json()["usage"]["prompt_tokens"] > 20
        missing = post(f"{base}/nope.png")
        assert missing.status_code == 400 and missing.json()["error"]["code"] == "image_fetch_failed"
        big = post(f"{base}/big.png")  # every fetch failure is the same 400 (no port scanning)
        assert big.status_code == 400 and big.json()["error"] == {**missing.json()["error"]}
    finally:
        s.stop()
        httpd.shutdown()
