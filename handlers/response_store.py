"""Stored responses for the Responses API: `previous_response_id`, retrieve, delete, input items.

Bounded: at most `max_entries` responses, least recently used out first, each for `ttl` seconds.
With a directory, entries are also written there as JSON and found again after a restart.
"""
from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from engine.images import ImageInput
from engine.text import ChatMessage

log = logging.getLogger("openmlx.http")
_SAFE_ID = re.compile(r"^resp_[0-9a-f]{1,64}$")


@dataclass
class StoredResponse:
    response: dict[str, Any]  # the Response object as returned
    input_items: list[dict[str, Any]]  # this request's input, as items with ids
    history: list[ChatMessage]  # the conversation through this response's output (no instructions)
    stored_at: float


def _message_json(m: ChatMessage) -> dict[str, Any]:
    # Images are kept by source (a data: URL holds the picture itself), not as fetched bytes.
    return {"role": m.role, "content": m.content, "images": [{"source": i.source, "param": i.param} for i in m.images]}


def _message_from_json(d: dict[str, Any]) -> ChatMessage:
    return ChatMessage(d["role"], d["content"], tuple(ImageInput(i["source"], i["param"]) for i in d.get("images", [])))


class ResponseStore:
    def __init__(self, max_entries: int = 1024, ttl: float = 24 * 3600, directory: Optional[Path] = None) -> None:
        self.max_entries = max_entries
        self.ttl = ttl
        self.directory = directory
        self._entries: OrderedDict[str, StoredResponse] = OrderedDict()
        self._lock = threading.Lock()
        if directory:
            directory.mkdir(parents=True, exist_ok=True)

    def _path(self, response_id: str) -> Optional[Path]:
        # Ids come from clients: only our own shape ever becomes a file name.
        if not self.directory or not _SAFE_ID.match(response_id):
            return None
        return self.directory / f"{response_id}.json"

    def put(self, entry: StoredResponse) -> None:
        rid = entry.response["id"]
        with self._lock:
            self._entries[rid] = entry
            self._entries.move_to_end(rid)
            while len(self._entries) > self.max_entries:
                old, _ = self._entries.popitem(last=False)
                self._remove_file(old)
        path = self._path(rid)
        if path:
            data = {"response": entry.response, "input_items": entry.input_items, "stored_at": entry.stored_at,
                    "history": [_message_json(m) for m in entry.history]}
            path.write_text(json.dumps(data))

    def get(self, response_id: str) -> Optional[StoredResponse]:
        with self._lock:
            entry = self._entries.get(response_id)
            if entry is not None:
                self._entries.move_to_end(response_id)
        if entry is None:
            entry = self._load(response_id)
        if entry is not None and time.time() - entry.stored_at > self.ttl:
            self.delete(response_id)
            return None
        return entry

    def delete(self, response_id: str) -> bool:
        with self._lock:
            found = self._entries.pop(response_id, None) is not None
        return self._remove_file(response_id) or found

    def _load(self, response_id: str) -> Optional[StoredResponse]:
        path = self._path(response_id)
        if not path or not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
            entry = StoredResponse(data["response"], data["input_items"],
                                   [_message_from_json(m) for m in data["history"]], data["stored_at"])
        except (ValueError, KeyError, TypeError) as e:
            log.warning("unreadable stored response %s: %s", path, e)
            return None
        with self._lock:
            self._entries[response_id] = entry
        return entry

    def _remove_file(self, response_id: str) -> bool:
        path = self._path(response_id)
        if path and path.is_file():
            path.unlink(missing_ok=True)
            return True
        return False

    def __len__(self) -> int:
        return len(self._entries)
