"""The chat page at GET /, in a real browser: Debian's chromium, driven by Playwright with
`executable_path` (Playwright's own browser download is not reachable here). The whole path a
newcomer takes: `openmlx pull` from a (local) Hub -> `openmlx serve --model ID` -> the page lists
the model, streams an answer with TTFT and tokens/s, shows a tool call. Screenshots are saved
under $OPENMLX_ARTIFACTS (default: pytest's tmp dir) as test artefacts."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from conftest import MODEL, Server
from test_hub import _env, hub  # noqa: F401  (the local Hub fixture)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install '.[test]')")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium (Debian: apt-get install chromium)")


def _artifacts(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("OPENMLX_ARTIFACTS", tmp_path))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--headless=new"])
        yield b
        b.close()


def test_page_is_served_open_and_self_contained(server):
    r = httpx.get(server.url + "/")
    assert r.status_code == 200 and r.headers["content-type"] == "text/html" and r.headers["x-request-id"]
    assert "default-src 'none'" in r.headers["content-security-policy"]
    assert "http://" not in r.text and "https://" not in r.text  # no CDN, nothing from elsewhere
    keyed = Server(["--api-key", "sekret", "--embedding-model", "none", "--audio-model", "none"])
    try:
        assert httpx.get(keyed.url + "/").status_code == 200  # the page itself needs no key
        assert httpx.get(keyed.url + "/v1/models").status_code == 401
    finally:
        keyed.stop()


DONE = ".msg.assistant[data-done='1']"


def _ask(page, text: str) -> str:
    """Send `text`, wait for its answer to finish streaming; the answer's text."""
    before = page.locator(DONE).count()
    page.fill("#prompt", text)
    page.click("#send")
    page.locator(DONE).nth(before).wait_for(timeout=120_000)  # locators, not eval: the page's CSP forbids it
    return page.locator(".msg.assistant .body").last.inner_text()


def test_pull_serve_and_chat_in_the_browser(browser, hub, tmp_path):  # noqa: F811
    env = _env(hub, tmp_path)
    pulled = subprocess.run([sys.executable, "-m", "handlers.cli", "pull", "acme/tiny"], capture_output=True,
                            text=True, timeout=300, env={**os.environ, **env})
    assert pulled.returncode == 0, pulled.stderr
    s = Server(["--model", "acme/tiny", "--embedding-model", "none", "--audio-model", "none"], env=env)
    try:
        page = browser.new_page()
        page.goto(s.url + "/")
        page.locator("#model option").first.wait_for(state="attached")
        options = page.eval_on_selector_all("#model option", "els => els.map(e => e.value)")
        assert "acme/tiny" in options
        page.select_option("#model", "acme/tiny")
        page.fill("#max-tokens", "12")
        answer = _ask(page, "Hello there")
        stats = page.inner_text("#stats")
        assert answer.strip() and "completion 12" in stats and "TTFT" in stats and "finish length" in stats
        page.screenshot(path=str(_artifacts(tmp_path) / "chat-page-pulled-model.png"), full_page=True)
    finally:
        s.stop()


def test_default_model_streams_and_shows_a_tool_call(browser, server, tmp_path):
    page = browser.new_page()
    page.goto(server.url + "/")
    page.locator("#model option").first.wait_for(state="attached")
    page.select_option("#model", MODEL)
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "24")
    assert "Paris" in _ask(page, "What is the capital of France?")
    assert "tok/s" in page.inner_text("#stats")
    # A second turn carries the history (the prompt cache serves it).
    _ask(page, "And of Germany?")
    assert "cached" in page.inner_text("#stats") and "cached 0)" not in page.inner_text("#stats")
    page.click("#clear")
    tools = ('[{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", '
             '"properties": {"city": {"type": "string"}}, "required": ["city"]}}}]')
    page.fill("#tools", tools)
    page.select_option("#tool-choice", "required")  # decoded under the call's grammar: always a call
    page.fill("#max-tokens", "60")
    shown = _ask(page, "What is the weather in Paris? Use the tool.")
    stats = page.inner_text("#stats")
    assert "finish tool_calls" in stats and "tool call get_weather(" in shown and '"city"' in shown
    page.screenshot(path=str(_artifacts(tmp_path) / "chat-page-default-model.png"), full_page=True)


def test_errors_are_shown_not_swallowed(browser, server):
    page = browser.new_page()
    page.goto(server.url + "/")
    page.locator("#model option").first.wait_for(state="attached")
    # The server's 400 (the spec bounds temperature to 0..2) reaches the page as an error bubble.
    # (A huge max_tokens is no longer an error: the answer's room is clamped to what the context has left.)
    page.fill("#temperature", "7")
    _ = page.fill("#prompt", "hi")
    page.click("#send")
    page.wait_for_selector(".msg.assistant.error", timeout=60_000)
    assert "temperature" in page.inner_text(".msg.assistant.error")
