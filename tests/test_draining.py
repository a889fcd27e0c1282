"""Shutting down: while a SIGTERM drains the server (a client still connected), every new request
gets 503 shutting_down with Retry-After (moved from test_hostile.py, hostile input round 2)."""
from __future__ import annotations

import signal
import time

import httpx

from conftest import MODEL, Server

MSG = [{"role": "user", "content": "What is the capital of France?"}]


def test_503_while_draining_after_sigterm(default_model_dir):
    s = Server(["--shutdown-timeout", "5"])
    try:
        with httpx.Client() as kept:  # an open keep-alive connection keeps the drain window open
            assert kept.get(s.url + "/v1/models").status_code == 200
            s.proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            r = httpx.get(s.url + "/v1/models")
            assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
            assert r.headers["retry-after"] and r.headers["x-request-id"]
            chat = httpx.post(s.url + "/v1/chat/completions", json={"model": MODEL, "messages": MSG})
            assert chat.status_code == 503
        s.proc.wait(20)
    finally:
        s.stop()
