"""The Responses API's store: bounded (LRU), expiring (TTL), optionally on disk."""
from __future__ import annotations

import time

from engine.generation.text import ChatMessage
from handlers.conversation.response_store import ResponseStore, StoredResponse


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
    store.flush()  # files are written by the store's writer thread
    again = ResponseStore(directory=tmp_path).get("resp_0123abcd")
    assert again is not None and again.history == [ChatMessage("user", "hi"), ChatMessage("assistant", "hello")]
    other = ResponseStore(directory=tmp_path)
    assert other.delete("resp_0123abcd")
    other.flush()
    assert not (tmp_path / "resp_0123abcd.json").exists()
    # Client-chosen ids are looked up, never turned into paths.
    assert store.get("../../etc/passwd") is None
    store.put(entry("../evil"))
    assert not list(tmp_path.parent.glob("evil*"))


def test_images_are_stored_by_source(tmp_path):
    from engine.request import ImageInput

    store = ResponseStore(directory=tmp_path)
    image = ImageInput("data:image/png;base64,AAAA", "input.0.content.1.image_url", data=b"\x89PNG")
    stored = entry("resp_00ff")
    stored.history = [ChatMessage("user", "look", (image,))]
    store.put(stored)
    store.flush()
    again = ResponseStore(directory=tmp_path).get("resp_00ff")
    assert again.history[0].images == (ImageInput(image.source, image.param),)


def _with_image(rid: str, url: str, turns: int = 1) -> StoredResponse:
    from engine.request import ImageInput

    stored = entry(rid)
    stored.input_items = [{"type": "message", "content": [{"type": "input_image", "image_url": url}]}]
    stored.history = [ChatMessage("user", f"look {i}", (ImageInput(url, "input.0.content.0.image_url"),))
                      for i in range(turns)]
    return stored


def test_bounded_by_bytes_least_recently_used_out(tmp_path):
    big = "data:image/png;base64," + "A" * 100_000
    store = ResponseStore(max_bytes=250_000, directory=tmp_path)
    for i in range(5):  # a different picture each: 100 KB apiece
        store.put(_with_image(f"resp_{i:04x}", big + str(i)))
    assert store.bytes <= 250_000 and len(store) == 2
    assert store.get("resp_0003") and store.get("resp_0004") and store.get("resp_0000") is None
    store.flush()
    assert len(list((tmp_path / "blobs").iterdir())) == 2 and len(list(tmp_path.glob("resp_*.json"))) == 2


def test_an_image_carried_by_every_turn_is_counted_and_written_once(tmp_path):
    big = "data:image/png;base64," + "B" * 200_000
    store = ResponseStore(max_bytes=1 << 20, directory=tmp_path)
    for i in range(20):  # a conversation: each stored turn's history holds the picture again
        store.put(_with_image(f"resp_{i:04x}", big, turns=i + 1))
    assert len(store) == 20 and store.bytes < 400_000
    store.flush()
    assert len(list((tmp_path / "blobs").iterdir())) == 1
    on_disk = sum(p.stat().st_size for p in tmp_path.rglob("*") if p.is_file())
    assert on_disk < 400_000
    # In memory too: every entry holds the one string.
    sources = {id(m.images[0].source) for e in (store.get(f"resp_{i:04x}") for i in range(20)) for m in e.history}
    assert len(sources) == 1


def test_start_up_prunes_earlier_runs_by_the_same_rules(tmp_path):
    big = "data:image/png;base64," + "C" * 100_000
    store = ResponseStore(directory=tmp_path)
    for i in range(6):
        store.put(_with_image(f"resp_{i:04x}", big + str(i)))
        store.flush()
        time.sleep(0.01)  # distinct modification times: the order of the run
    again = ResponseStore(directory=tmp_path, max_bytes=250_000)
    again.flush()
    assert len(again) == 2 and again.get("resp_0005") and again.get("resp_0004") and again.get("resp_0001") is None
    assert len(list(tmp_path.glob("resp_*.json"))) == 2 and len(list((tmp_path / "blobs").iterdir())) == 2
    expired = ResponseStore(directory=tmp_path, ttl=0)
    expired.flush()
    assert len(expired) == 0 and not list(tmp_path.glob("resp_*.json")) and not list((tmp_path / "blobs").iterdir())


def test_tool_calls_survive_a_restart(tmp_path):
    from engine.constrained.tools import ToolCall

    store = ResponseStore(directory=tmp_path)
    stored = entry("resp_0abc")
    stored.history = [ChatMessage("assistant", "", tool_calls=(ToolCall("call_1", "f", '{"a": 1}'),)),
                      ChatMessage("tool", "42", tool_call_id="call_1")]
    store.put(stored)
    store.flush()
    assert ResponseStore(directory=tmp_path).get("resp_0abc").history == stored.history
