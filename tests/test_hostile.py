"""Hostile input, round 2 (issue 19): nothing a client sends exhausts the server, reaches inside the
network or leaks a key. Every test runs against a real `openmlx serve` process.

Network tests only ever talk to loopback addresses (127.0.0.0/8): private and link-local ranges
are checked without traffic (address_allowed) and refused before any connection.
"""
from __future__ import annotations

import base64
import functools
import http.server
import io
import ipaddress
import json
import socket
import struct
import threading
import time
import zlib

import httpx
import psutil
import pytest

from conftest import MODEL, Server

VLM = "tiny-vlm"
MSG = [{"role": "user", "content": "What is the capital of France?"}]


def rss_mb(server: Server) -> float:
    return psutil.Process(server.proc.pid).memory_info().rss / 2**20


def chat_body(*urls: str) -> dict:
    content = [{"type": "image_url", "image_url": {"url": u}} for u in urls] + [{"type": "text", "text": "What?"}]
    return {"model": VLM, "messages": [{"role": "user", "content": content}], "max_tokens": 1}


def png_bytes(size=(40, 30), color=(10, 200, 30)) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, format="PNG")
    return out.getvalue()


def data_url(raw: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(raw).decode()


# --- bombs ------------------------------------------------------------------------------------
def wav(rate: int, samples: bytes, bits: int = 8, declared_frames: int | None = None) -> bytes:
    """A PCM WAV; `declared_frames` lets the header claim more data than the file holds."""
    block = bits // 8
    size = (declared_frames * block) if declared_frames is not None else len(samples)
    fmt = struct.pack("<4sIHHIIHH", b"fmt ", 16, 1, 1, rate, rate * block, block, bits)
    return b"RIFF" + struct.pack("<I", 36 + size) + b"WAVE" + fmt + b"data" + struct.pack("<I", size) + samples


def png_bomb(side: int = 20000) -> bytes:
    """A valid one-colour PNG, side x side grey pixels, ~50 KB (compressed row by row)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    z = zlib.compressobj(9)
    row = b"\0" * (side + 1)
    idat = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def gif_bomb() -> bytes:
    """A 35-byte GIF whose screen is 65535 x 65535."""
    return (b"GIF89a" + struct.pack("<HH", 65535, 65535) + b"\x00\x00\x00"
            + b"," + struct.pack("<HHHH", 0, 0, 65535, 65535) + b"\x00" + b"\x02\x02\x44\x01\x00;")


def webp_bomb() -> bytes:
    """A lossless WebP whose header says 16384 x 16384."""
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (1, 1)).save(out, format="WEBP", lossless=True)
    raw = bytearray(out.getvalue())
    at = raw.index(b"VP8L") + 8
    assert raw[at] == 0x2F
    raw[at + 1:at + 5] = struct.pack("<I", 16383 | (16383 << 14))
    return bytes(raw)


@pytest.fixture(scope="module")
def limits(default_model_dir):
    """Small limits, to reach them cheaply."""
    s = Server(["--max-audio-seconds", "5", "--max-connections", "20", "--max-connections-per-client", "20",
                "--header-timeout", "2", "--max-queue", "1"])
    yield s
    s.stop()


def transcribe(server: Server, data: bytes, name: str = "a.wav", timeout: float = 60) -> httpx.Response:
    return httpx.post(server.url + "/v1/audio/transcriptions", files={"file": (name, data, "audio/wav")},
                      data={"model": "whisper-tiny.en"}, timeout=timeout)


AUDIO_BOMBS = {
    "1 Hz rate": (wav(1, bytes(range(256)) * 47), 400, "invalid_audio"),  # 12 KB: 3.3 hours at 1 Hz
    "4 kHz rate": (wav(4000, b"\x80" * 8000), 400, "invalid_audio"),
    "a billion Hz": (wav(1_000_000_000, b"\x80" * 2000), 400, "invalid_audio"),
    "10 s, the limit is 5": (wav(8000, b"\x80" * 80000), 413, "audio_too_long"),
}


@pytest.mark.parametrize("name", list(AUDIO_BOMBS))
def test_audio_is_judged_by_its_header(limits, name):
    data, status, code = AUDIO_BOMBS[name]
    before = rss_mb(limits)
    start = time.monotonic()
    r = transcribe(limits, data)
    took = time.monotonic() - start
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code and r.json()["error"]["param"] == "file"
    assert r.headers["x-request-id"]
    if status == 413:
        assert "--max-audio-seconds" in r.json()["error"]["message"]
    assert took < 2 and rss_mb(limits) - before < 100


def test_audio_within_the_limits_still_transcribes(limits):
    r = transcribe(limits, wav(16000, b"\x80" * 16000 * 2))  # 2 s of silence
    assert r.status_code == 200, r.text
    # A header that claims 2 hours over 2,000 bytes: only what the file holds is decoded.
    r = httpx.post(limits.url + "/v1/audio/transcriptions", timeout=60,
                   files={"file": ("a.wav", wav(8000, b"\x80" * 2000, declared_frames=8000 * 7200), "audio/wav")},
                   data={"model": "whisper-tiny.en", "response_format": "verbose_json"})
    assert r.status_code == 200 and r.json()["duration"] <= 1


def test_audio_bomb_does_not_hold_up_a_chat(server):
    """Posted on the default limits (2 h), the 1 Hz bomb is refused at once; a chat alongside is
    answered as usual."""
    bomb = wav(1, b"\x80" * 200_000)  # ~200 KB: the size that got the process OOM-killed
    results: dict[str, httpx.Response] = {}
    t = threading.Thread(target=lambda: results.setdefault("bomb", transcribe(server, bomb)))
    t.start()
    start = time.monotonic()
    chat = httpx.post(server.url + "/v1/chat/completions", json={"model": MODEL, "messages": MSG, "max_tokens": 4},
                      timeout=60)
    t.join(30)
    assert chat.status_code == 200 and time.monotonic() - start < 10
    assert results["bomb"].status_code == 400 and results["bomb"].json()["error"]["code"] == "invalid_audio"


@pytest.fixture(scope="module")
def image_hosts():
    """Two loopback image servers: 127.0.0.1 (never allowed) and 127.0.0.2 (allowed by a flag),
    counting the requests they get. /cat.png, /redirect (to 127.0.0.1), /drip (1 byte / 0.5 s)."""
    hits = {"127.0.0.1": 0, "127.0.0.2": 0}
    cat = png_bytes()

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            host = self.server.server_address[0]
            hits[host] += 1
            if self.path == "/redirect":
                self.send_response(302)
                self.send_header("Location", f"http://127.0.0.1:{servers['127.0.0.1'].server_address[1]}/cat.png")
                self.send_header("Content-Length", "0")
                self.end_headers()
            elif self.path == "/drip":
                self.send_response(200)
                self.send_header("Content-Length", "1000")
                self.end_headers()
                try:
                    for _ in range(1000):
                        self.wfile.write(b"\0")
                        self.wfile.flush()
                        time.sleep(0.5)
                except OSError:
                    pass
            elif self.path == "/cat.png":
                self.send_response(200)
                self.send_header("Content-Length", str(len(cat)))
                self.end_headers()
                self.wfile.write(cat)
            else:
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()

    servers = {}
    for host in hits:
        servers[host] = http.server.ThreadingHTTPServer((host, 0), Handler)
        servers[host].daemon_threads = True
        threading.Thread(target=servers[host].serve_forever, daemon=True).start()
    yield {h: f"http://{h}:{s.server_address[1]}" for h, s in servers.items()}, hits
    for s in servers.values():
        s.shutdown()


@pytest.fixture(scope="module")
def vision(tiny_vlm, tmp_path_factory):
    images = tmp_path_factory.mktemp("images")
    (images / "red.png").write_bytes(png_bytes())
    responses = tmp_path_factory.mktemp("responses")
    s = Server(["--model-dir", str(tiny_vlm), "--max-models", "2", "--allow-image-urls",
                "--image-url-allow-network", "127.0.0.2/32", "--image-fetch-timeout", "2", "--image-dir", str(images),
                "--max-images", "8", "--responses-max-bytes", "600000", "--responses-dir", str(responses)],
               env={"HF_HUB_OFFLINE": "1"})
    s.responses_dir = responses
    yield s
    s.stop()


def post_vision(server: Server, *urls: str) -> httpx.Response:
    return httpx.post(server.url + "/v1/chat/completions", json=chat_body(*urls), timeout=60)


@pytest.mark.parametrize("name, make", [("png 20000x20000", png_bomb), ("gif 65535x65535", gif_bomb),
                                        ("webp 16384x16384", webp_bomb)])
def test_image_decompression_bombs_are_400_before_any_pixels(vision, name, make):
    raw = make()
    assert len(raw) < 500_000  # deflate tops out near 1:1000
    before = rss_mb(vision)
    start = time.monotonic()
    r = post_vision(vision, data_url(raw, "image/" + name.split()[0]))
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "image_too_large" and r.json()["error"]["param"].startswith("messages")
    assert time.monotonic() - start < 2 and rss_mb(vision) - before < 100


def test_a_bad_image_among_many_fails_before_any_is_decoded(vision):
    good = [data_url(png_bytes((2000, 2000), (i, 0, 0))) for i in range(2)]
    r = post_vision(vision, *good, data_url(gif_bomb(), "image/gif"))
    assert r.status_code == 400 and r.json()["error"]["code"] == "image_too_large"
    assert r.json()["error"]["param"] == "messages.0.content.2.image_url.url"


def test_nul_byte_in_an_image_path(vision):
    r = post_vision(vision, "red.png\u0000")
    assert r.status_code == 400 and r.json()["error"]["code"] == "image_file_not_allowed"
    assert post_vision(vision, "red.png").status_code == 200


# --- reaching inside the network ----------------------------------------------------------------
@pytest.mark.parametrize("address", ["127.0.0.1", "10.0.0.1", "172.16.5.4", "192.168.1.1", "169.254.169.254",
                                     "100.64.0.1", "0.0.0.0", "::1", "fe80::1", "fc00::1", "::ffff:127.0.0.1",
                                     "::ffff:169.254.169.254", "224.0.0.1", "255.255.255.255"])
def test_non_public_addresses_are_refused(address):
    from handlers.conversation.images import PRIVATE_NETWORKS, address_allowed

    ip = ipaddress.ip_address(address)
    assert not address_allowed(ip)
    judged = getattr(ip, "ipv4_mapped", None) or ip  # a mapped address is judged as the IPv4 it carries
    assert address_allowed(ip, [ipaddress.ip_network(judged)])
    assert address_allowed(ipaddress.ip_address("93.184.216.34")) and address_allowed(ipaddress.ip_address("2606:4700::1"))
    private = str(judged).startswith(("10.", "172.16", "192.168", "fc00"))
    assert address_allowed(ip, PRIVATE_NETWORKS) == private


def test_loopback_urls_are_refused_uniformly(vision, image_hosts):
    urls, hits = image_hosts
    port = urls["127.0.0.1"].rsplit(":", 1)[1]
    closed = free_closed_port()
    tries = [f"{urls['127.0.0.1']}/cat.png", f"{urls['127.0.0.1']}/nope.png", f"http://127.0.0.1:{closed}/x.png",
             f"http://localhost:{port}/cat.png", f"http://[::1]:{port}/cat.png",
             f"http://[::ffff:127.0.0.1]:{port}/cat.png", f"http://2130706433:{port}/cat.png",
             f"{urls['127.0.0.2']}/nope.png", f"http://127.0.0.2:{closed}/x.png"]
    errors = []
    for url in tries:
        r = post_vision(vision, url)
        assert r.status_code == 400, (url, r.text)
        errors.append(r.json()["error"])
    assert all(e == errors[0] for e in errors), errors  # open, closed, refused: one answer
    assert errors[0]["code"] == "image_fetch_failed"
    assert hits["127.0.0.1"] == 0


def free_closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_allowed_network_is_fetched_and_redirects_are_checked_again(vision, image_hosts):
    urls, hits = image_hosts
    assert post_vision(vision, f"{urls['127.0.0.2']}/cat.png").status_code == 200
    r = post_vision(vision, f"{urls['127.0.0.2']}/redirect")  # allowed host, redirect to a refused one
    assert r.status_code == 400 and r.json()["error"]["code"] == "image_fetch_failed"
    assert hits["127.0.0.1"] == 0


def test_one_deadline_for_the_whole_fetch(vision, image_hosts):
    urls, _ = image_hosts
    start = time.monotonic()
    r = post_vision(vision, f"{urls['127.0.0.2']}/drip")  # 1 byte every 0.5 s; each read is quick
    assert r.status_code == 400 and r.json()["error"]["code"] == "image_fetch_failed"
    assert time.monotonic() - start < 6  # --image-fetch-timeout 2


def test_counts_are_checked_before_any_fetch(vision, image_hosts):
    urls, hits = image_hosts
    before = hits["127.0.0.2"]
    r = post_vision(vision, *[f"{urls['127.0.0.2']}/cat.png?{i}" for i in range(100)])
    assert r.status_code == 400 and r.json()["error"]["code"] == "too_many_images"
    assert hits["127.0.0.2"] == before
    oversized = "data:image/png;base64," + "A" * 30_000_000  # decided from the length, before decoding
    r = httpx.post(vision.url + "/v1/chat/completions", json=chat_body(oversized), timeout=60)
    assert r.status_code in (400, 413)


# --- the responses store ----------------------------------------------------------------------
def noise_png(seed: int) -> bytes:
    import random

    from PIL import Image

    rng = random.Random(seed)
    img = Image.frombytes("RGB", (180, 180), bytes(rng.getrandbits(8) for _ in range(180 * 180 * 3)))
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()  # ~100 KB, incompressible


def test_responses_store_is_bounded_by_bytes(vision):
    ids = []
    for i in range(8):
        body = {"model": VLM, "max_output_tokens": 1, "input": [{"role": "user", "content": [
            {"type": "input_image", "image_url": data_url(noise_png(i))}, {"type": "input_text", "text": "What?"}]}]}
        r = httpx.post(vision.url + "/v1/responses", json=body, timeout=60)
        assert r.status_code == 200, r.text
        ids.append(r.json()["id"])
    time.sleep(0.5)  # files are written by the store's writer thread
    on_disk = sum(p.stat().st_size for p in vision.responses_dir.rglob("*") if p.is_file())
    assert on_disk <= 600_000
    assert httpx.get(f"{vision.url}/v1/responses/{ids[-1]}").status_code == 200
    assert httpx.get(f"{vision.url}/v1/responses/{ids[0]}").status_code == 404
    # A conversation carrying one picture in every turn stores it once.
    before = sum(p.stat().st_size for p in vision.responses_dir.rglob("*") if p.is_file())
    previous = ids[-1]
    for _ in range(4):
        r = httpx.post(vision.url + "/v1/responses", timeout=60, json={
            "model": VLM, "max_output_tokens": 1, "previous_response_id": previous, "input": "And now?"})
        assert r.status_code == 200, r.text
        previous = r.json()["id"]
    time.sleep(0.5)
    grown = sum(p.stat().st_size for p in vision.responses_dir.rglob("*") if p.is_file()) - before
    assert grown < 100_000  # the ~130 KB data URL was not written again


# --- connections, queue ---------------------------------------------------------------------
def test_connection_cap_answers_503_and_idle_sockets_are_closed(limits):
    held = [socket.create_connection(("127.0.0.1", limits.port)) for _ in range(20)]
    try:
        time.sleep(0.3)
        extra = socket.create_connection(("127.0.0.1", limits.port))
        extra.settimeout(5)
        answer = extra.recv(65536).decode()
        extra.close()
        assert answer.startswith("HTTP/1.1 503") and "too_many_connections" in answer and "x-request-id" in answer
        # The idle ones are closed after --header-timeout (2 s); then the server serves again.
        for s in held:
            s.settimeout(6)
            assert s.recv(10) == b""
    finally:
        for s in held:
            s.close()
    assert httpx.get(limits.url + "/v1/models").status_code == 200
    assert limits.log().count("connection cap reached") == 1


def test_slowloris_does_not_hold_sockets(limits):
    socks = [socket.create_connection(("127.0.0.1", limits.port)) for _ in range(10)]
    request = b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 100
    closed = set()
    start = time.monotonic()
    for byte in range(len(request)):
        for i, s in enumerate(socks):
            if i in closed:
                continue
            try:
                s.send(request[byte:byte + 1])
            except OSError:
                closed.add(i)
        if len(closed) == len(socks) or time.monotonic() - start > 15:
            break
        time.sleep(0.3)
    for s in socks:
        s.close()
    assert len(closed) == len(socks) and time.monotonic() - start < 10


def test_embeddings_and_token_counts_count_against_the_queue(limits):
    """--max-queue 1: while a stream runs, an embedding or a token count gets 429 too."""
    body = {"model": MODEL, "messages": MSG, "max_tokens": 400, "stream": True, "logit_bias": {"2": -100}}
    with httpx.stream("POST", limits.url + "/v1/chat/completions", json=body, timeout=60) as s:
        lines = s.iter_lines()
        next(lines)
        emb = httpx.post(limits.url + "/v1/embeddings", json={"model": "all-MiniLM-L6-v2", "input": "hi"})
        count = httpx.post(limits.url + "/v1/messages/count_tokens",
                           json={"model": MODEL, "messages": MSG})
    assert emb.status_code == 429 and emb.headers["retry-after"], emb.text
    assert count.status_code == 429


# --- keys and protocol ------------------------------------------------------------------------
def test_chunked_json_and_multipart_bodies(server):
    payload = json.dumps({"model": MODEL, "messages": MSG, "max_tokens": 3}).encode()

    def chunks(data: bytes):
        for i in range(0, len(data), 7):
            yield data[i:i + 7]

    r = httpx.post(server.url + "/v1/chat/completions", content=chunks(payload),
                   headers={"Content-Type": "application/json"}, timeout=60)
    assert r.request.headers.get("transfer-encoding") == "chunked"
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    upload = httpx.Request("POST", "/", files={"file": ("a.wav", wav(16000, b"\x80" * 32000), "audio/wav")},
                           data={"model": "whisper-tiny.en", "response_format": "json"})
    body = upload.read()
    r = httpx.post(server.url + "/v1/audio/transcriptions", content=chunks(body),
                   headers={"Content-Type": upload.headers["content-type"]}, timeout=60)
    assert r.status_code == 200, r.text
    too_big = (b"x" * 1024 for _ in range(11 * 1024))  # 11 MiB > --max-body-bytes
    r = httpx.post(server.url + "/v1/chat/completions", content=too_big,
                   headers={"Content-Type": "application/json"}, timeout=60)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_translation_errors_log_one_line(server):
    r = httpx.post(server.url + "/v1/audio/translations", files={"file": ("a.wav", wav(16000, b"\x80" * 32000))},
                   data={"model": "whisper-tiny.en"}, timeout=60)
    assert r.status_code == 400
    time.sleep(0.2)
    tail = server.log()[-3000:]
    assert "English-only" in tail and "Traceback" not in tail


def test_swagger_servers_are_usable(server):
    assert httpx.get(server.url + "/openapi.json").json()["servers"] == [{"url": "/"}]
