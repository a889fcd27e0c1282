"""Stored responses for the Responses API: `previous_response_id`, retrieve, delete, input items.

Bounded three ways: at most `max_entries` responses and `max_bytes` bytes (least recently used out
first), each for `ttl` seconds. Large inline inputs (a `data:` URL image) are kept once however
many responses of a conversation carry them: each entry refers to them by digest, and they are
counted, held and written once. With a directory, entries (and those inputs, under `blobs/`) are
also written there as JSON and loaded again at start-up, pruned by the same rules.

`put`, `get` and `delete` work in memory; files are written and removed by one writer thread, in
order, so a request never waits on the disk (the event loop calls them).
"""
from __future__ import annotations

import hashlib
import json
import logging
import queue
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from engine.request import ImageInput
from engine.request import ChatMessage
from engine.request import ToolCall

log = logging.getLogger("openmlx.http")
_SAFE_ID = re.compile(r"^resp_[0-9a-f]{1,64}$")
_SAFE_BLOB = re.compile(r"^[0-9a-f]{64}$")
BLOB_MIN = 1024  # inline inputs at least this long (data: URLs) are kept once, by digest
DEFAULT_MAX_ENTRIES = 1024
DEFAULT_TTL_S = 24 * 3600.0
DEFAULT_MAX_BYTES = 256 << 20


@dataclass
class StoredResponse:
    response: dict[str, Any]  # the Response object as returned
    input_items: list[dict[str, Any]]  # this request's input, as items with ids
    history: list[ChatMessage]  # the conversation through this response's output (no instructions)
    stored_at: float
    owner: str = ""  # the hash of the API key that made it ("" on a server without keys): only it may read it


def _message_json(m: ChatMessage) -> dict[str, Any]:
    # Images are kept by source (a data: URL holds the picture itself), not as fetched bytes.
    return {"role": m.role, "content": m.content, "images": [{"source": i.source, "param": i.param} for i in m.images],
            "tool_calls": [[c.id, c.name, c.arguments] for c in m.tool_calls], "tool_call_id": m.tool_call_id}


def _message_from_json(d: dict[str, Any]) -> ChatMessage:
    return ChatMessage(d["role"], d["content"], tuple(ImageInput(i["source"], i["param"]) for i in d.get("images", [])),
                       tuple(ToolCall(*c) for c in d.get("tool_calls", [])), d.get("tool_call_id"))


def _document(entry: StoredResponse) -> dict[str, Any]:
    return {"response": entry.response, "input_items": entry.input_items, "stored_at": entry.stored_at,
            "history": [_message_json(m) for m in entry.history], "owner": entry.owner}


def _from_document(doc: dict[str, Any]) -> StoredResponse:
    return StoredResponse(doc["response"], doc["input_items"], [_message_from_json(m) for m in doc["history"]],
                          doc["stored_at"], str(doc.get("owner") or ""))


def _is_blob(value: Any) -> bool:
    return isinstance(value, str) and len(value) >= BLOB_MIN and value.startswith("data:")


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _map_strings(value: Any, fn) -> Any:
    if isinstance(value, dict):
        return {k: _map_strings(v, fn) for k, v in value.items()}
    if isinstance(value, list):
        return [_map_strings(v, fn) for v in value]
    return fn(value)


class ResponseStore:
    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES, ttl: float = DEFAULT_TTL_S, directory: Optional[Path] = None,
                 max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.ttl = ttl
        self.directory = directory
        self._entries: OrderedDict[str, StoredResponse] = OrderedDict()
        self._own_bytes: dict[str, int] = {}  # an entry's JSON without its blobs
        self._uses: dict[str, set[str]] = {}  # entry id -> blob digests it refers to
        self._blobs: dict[str, list] = {}  # digest -> [text, number of entries using it]
        self.bytes = 0  # entries' own bytes + each blob once
        self._lock = threading.Lock()
        self._writes: "queue.Queue[tuple[Path, Optional[str]]]" = queue.Queue()
        self._writer: Optional[threading.Thread] = None
        if directory:
            directory.mkdir(parents=True, exist_ok=True)
            (directory / "blobs").mkdir(exist_ok=True)
            self._load_directory()

    def _path(self, response_id: str) -> Optional[Path]:
        # Ids come from clients: only our own shape ever becomes a file name.
        if not self.directory or not _SAFE_ID.match(response_id):
            return None
        return self.directory / f"{response_id}.json"

    def _blob_path(self, digest: str) -> Optional[Path]:
        return self.directory / "blobs" / digest if self.directory and _SAFE_BLOB.match(digest) else None

    # --- adding and removing (under the lock) ----------------------------------------------
    def _add(self, rid: str, doc: dict[str, Any], write: bool) -> None:
        """Insert an entry from its document: blobs are shared, the bounds then enforced."""
        digest_of: dict[str, str] = {}  # each blob's text -> its digest (hashed once per entry)

        def out(value: Any) -> Any:
            if not _is_blob(value):
                return value
            if value not in digest_of:
                digest_of[value] = _digest(value)
            return {"$blob": digest_of[value]}

        text = json.dumps(_map_strings(doc, out))
        size = len(text)
        blob_texts = {digest: blob for blob, digest in digest_of.items()}
        new_bytes = size + sum(len(t) for d, t in blob_texts.items() if d not in self._blobs)
        if new_bytes > self.max_bytes:
            log.warning("response %s (%d bytes) is larger than --responses-max-bytes; not stored", rid, new_bytes)
            return
        if rid in self._entries:
            self._remove(rid)
        for digest, blob in blob_texts.items():
            if digest not in self._blobs:
                self._blobs[digest] = [blob, 0]
                self.bytes += len(blob)
                if write and (path := self._blob_path(digest)) is not None:
                    self._disk(path, blob)
            self._blobs[digest][1] += 1
        # The entry held in memory shares each blob's one string.
        held = _map_strings(doc, lambda v: self._blobs[digest_of[v]][0] if _is_blob(v) else v)
        self._entries[rid] = _from_document(held)
        self._own_bytes[rid] = size
        self._uses[rid] = set(blob_texts)
        self.bytes += size
        if write and (path := self._path(rid)) is not None:
            self._disk(path, text)
        self._evict()

    def _remove(self, rid: str) -> bool:
        if self._entries.pop(rid, None) is None:
            return False
        self.bytes -= self._own_bytes.pop(rid)
        for digest in self._uses.pop(rid):
            blob = self._blobs[digest]
            blob[1] -= 1
            if blob[1] == 0:
                self.bytes -= len(blob[0])
                del self._blobs[digest]
                if (path := self._blob_path(digest)) is not None:
                    self._disk(path, None)
        if (path := self._path(rid)) is not None:
            self._disk(path, None)
        return True

    def _disk(self, path: Path, text: Optional[str]) -> None:
        """Write (or, with None, remove) a file on the writer thread."""
        if self._writer is None:
            self._writer = threading.Thread(target=self._write_loop, name="openmlx-response-store", daemon=True)
            self._writer.start()
        self._writes.put((path, text))

    def _write_loop(self) -> None:
        while True:
            path, text = self._writes.get()
            try:
                if text is None:
                    path.unlink(missing_ok=True)
                else:
                    path.write_text(text)
            except OSError as e:
                log.warning("response store: %s: %s", path, e)
            finally:
                self._writes.task_done()

    def flush(self) -> None:
        """Wait until every file write queued so far is done."""
        self._writes.join()

    def _evict(self) -> None:
        cutoff = time.time() - self.ttl
        for rid in [r for r, e in self._entries.items() if e.stored_at < cutoff]:
            self._remove(rid)
        while self._entries and (len(self._entries) > self.max_entries or self.bytes > self.max_bytes):
            self._remove(next(iter(self._entries)))

    def _load_directory(self) -> None:
        """Entries of earlier runs, oldest first (so the newest are the most recently used),
        pruned by TTL, count and bytes; blobs nothing refers to any more are deleted."""
        assert self.directory is not None
        files = sorted(self.directory.glob("resp_*.json"), key=lambda p: p.stat().st_mtime)
        blobs = self.directory / "blobs"
        for path in files:
            try:
                self._add(path.stem, _restore(json.loads(path.read_text()), blobs), write=False)
            except (ValueError, KeyError, TypeError, OSError) as e:
                log.warning("unreadable stored response %s: %s", path, e)
                path.unlink(missing_ok=True)
                continue
            if path.stem not in self._entries:
                path.unlink(missing_ok=True)
        for blob in blobs.iterdir():
            if blob.name not in self._blobs:
                blob.unlink(missing_ok=True)

    # --- the API ---------------------------------------------------------------------------
    def put(self, entry: StoredResponse) -> None:
        with self._lock:
            self._add(entry.response["id"], _document(entry), write=True)

    def get(self, response_id: str) -> Optional[StoredResponse]:
        with self._lock:
            entry = self._entries.get(response_id)
            if entry is None:
                return None
            if time.time() - entry.stored_at > self.ttl:
                self._remove(response_id)
                return None
            self._entries.move_to_end(response_id)
            return entry

    def delete(self, response_id: str) -> bool:
        with self._lock:
            return self._remove(response_id)

    def __len__(self) -> int:
        return len(self._entries)


def _restore(light: Any, blobs: Path) -> Any:
    """A document read from disk with its blob references filled in."""
    if isinstance(light, dict):
        if set(light) == {"$blob"}:
            digest = light["$blob"]
            if not _SAFE_BLOB.match(str(digest)):
                raise ValueError("bad blob reference")
            return (blobs / digest).read_text()
        return {k: _restore(v, blobs) for k, v in light.items()}
    if isinstance(light, list):
        return [_restore(v, blobs) for v in light]
    return light
