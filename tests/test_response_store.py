"""The Responses API's store: bounded (LRU), expiring (TTL), optionally on disk."""
from __future__ import annotations

import time

from engine.text import ChatMessage
from handlers.response_store import ResponseStore, StoredResponse


def entry(rid: str, at: float | None = None) -> StoredResponse:
    return StoredResponse({"id": rid, "output": []}, [{"id": "msg_1", "type": "message"}],
                          [ChatMessage("user", "hi"), ChatMessage("assistant", "hello")], at or time.time())


def test_least_recently_used_goes_first():
    store = ResponseStore(max_entries=2)
    store.put(entry("resp_a"))
    store.put(entry("resp_b"))
    assert store.get("resp_a") is not None  # a is now the most recent
    store.put(entry("resp_c"))
    assert store.get("resp_b") is None and store.get("resp_a") and store.get("resp_c")
    assert len(store) == 2


def test_entries_expire():
    store = ResponseStore(ttl=60)
    store.put(entry("resp_old", at=time.time() - 61))
    assert store.get("resp_old") is None
    assert not store.delete("resp_old")


def test_disk_survives_a_restart_and_ids_never_escape(tmp_path):
    store = ResponseStore(directory=tmp_path)
    store.put(entry("resp_0123abcd"))
    again = ResponseStore(directory=tmp_path).get("resp_0123abcd")
    assert again is not None and again.history == [ChatMessage("user", "hi"), ChatMessage("assistant", "hello")]
    assert ResponseStore(directory=tmp_path).delete("resp_0123abcd")
    assert not (tmp_path / "resp_0123abcd.json").exists()
    # Client-chosen ids are looked up, never turned into paths.
    assert store.get("../../etc/passwd") is None
    store.put(entry("../evil"))
    assert not list(tmp_path.parent.glob("evil*"))


def test_images_are_stored_by_source(tmp_path):
    from engine.images import ImageInput

    store = ResponseStore(directory=tmp_path)
    image = ImageInput("data:image/png;base64,AAAA", "input.0.content.1.image_url", data=b"\x89PNG")
    stored = entry("resp_00ff")
    stored.history = [ChatMessage("user", "look", (image,))]
    store.put(stored)
    again = ResponseStore(directory=tmp_path).get("resp_00ff")
    assert again.history[0].images == (ImageInput(image.source, image.param),)
