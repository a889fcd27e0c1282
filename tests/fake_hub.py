"""A local stand-in for the few Hugging Face Hub routes huggingface_hub downloads through, so
`openmlx pull` and `--allow-download` run the real client code against `HF_ENDPOINT` with no
internet: model info with siblings, `resolve/{revision}/{file}` (HEAD and GET, ETag, ranges),
gated repos (401) and missing ones (404), and downloads cut off part-way to test resuming."""
from __future__ import annotations

import hashlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Optional
from urllib.parse import unquote, urlparse


class FakeHub:
    """Serves folders as Hub model repos on 127.0.0.1; `url` goes into HF_ENDPOINT."""

    def __init__(self) -> None:
        self.repos: dict[str, Path] = {}
        self.gated: set[str] = set()
        # file name -> [bytes sent before the connection drops, how many more times to do it]
        self.cut: dict[str, list[int]] = {}
        self.requests: list[tuple[str, str, Optional[str]]] = []  # method, path, Range header
        # Hostile behaviours: a repo's commit id as answered; a file GET redirected elsewhere; bytes
        # sent past a file's real size; seconds to wait before a file GET answers.
        self.commit: dict[str, str] = {}
        self.redirect: dict[str, str] = {}
        self.extra_bytes: dict[str, int] = {}
        self.delay: dict[str, float] = {}
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def do_HEAD(self) -> None:
                hub._handle(self, head=True)

            def do_GET(self) -> None:
                hub._handle(self, head=False)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    @staticmethod
    def sha(repo: str) -> str:
        return hashlib.sha1(repo.encode()).hexdigest()

    def _files(self, repo: str) -> dict[str, Path]:
        root = self.repos[repo]
        return {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*")) if p.is_file()}

    def _error(self, h: BaseHTTPRequestHandler, status: int, code: str, message: str, head: bool) -> None:
        body = json.dumps({"error": message}).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("X-Error-Code", code)
        h.send_header("X-Error-Message", message)
        h.send_header("Content-Length", str(0 if head else len(body)))
        h.end_headers()
        if not head:
            h.wfile.write(body)

    def _handle(self, h: BaseHTTPRequestHandler, head: bool) -> None:
        path = unquote(urlparse(h.path).path)
        self.requests.append((h.command, path, h.headers.get("Range")))
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            repo = "/".join(parts[2:4])
            if len(parts) >= 6 and parts[4] == "tree":
                return self._tree(h, repo, head)
            return self._info(h, repo, head)
        if len(parts) >= 5 and parts[2] == "resolve":
            repo, name = "/".join(parts[:2]), "/".join(parts[4:])
            return self._file(h, repo, name, head)
        self._error(h, 404, "EntryNotFound", "no such route", head)

    def _refused(self, h: BaseHTTPRequestHandler, repo: str, head: bool) -> bool:
        if repo in self.gated and "authorization" not in {k.lower() for k in h.headers.keys()}:
            self._error(h, 401, "GatedRepo", f"Access to model {repo} is restricted.", head)
            return True
        if repo not in self.repos:
            self._error(h, 404, "RepoNotFound", "Repository not found", head)
            return True
        return False

    def _info(self, h: BaseHTTPRequestHandler, repo: str, head: bool) -> None:
        if self._refused(h, repo, head):
            return
        files = self._files(repo)
        siblings = [{"rfilename": name, "size": p.stat().st_size, "blobId": self._etag(p)}
                    for name, p in files.items()]
        self._json(h, {"id": repo, "modelId": repo, "sha": self.commit.get(repo, self.sha(repo)), "private": False,
                       "gated": repo in self.gated, "disabled": False, "tags": [], "siblings": siblings,
                       "lastModified": "2026-11-28T00:00:00.000Z"}, head)

    @staticmethod
    def _json(h: BaseHTTPRequestHandler, value: object, head: bool) -> None:
        body = json.dumps(value).encode()
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if not head:
            h.wfile.write(body)

    def _tree(self, h: BaseHTTPRequestHandler, repo: str, head: bool) -> None:
        if self._refused(h, repo, head):
            return
        self._json(h, [{"type": "file", "path": name, "size": p.stat().st_size, "oid": self._etag(p)}
                       for name, p in self._files(repo).items()], head)

    @staticmethod
    def _etag(p: Path) -> str:
        return hashlib.sha256(p.read_bytes()).hexdigest()

    def _file(self, h: BaseHTTPRequestHandler, repo: str, name: str, head: bool) -> None:
        if self._refused(h, repo, head):
            return
        p = self._files(repo).get(name)
        if p is None:
            return self._error(h, 404, "EntryNotFound", f"{name} not found", head)
        if name in self.redirect and not head:
            h.send_response(302)
            h.send_header("Location", self.redirect[name])
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        if name in self.delay and not head:
            time.sleep(self.delay[name])
        data = p.read_bytes()
        if not head and name in self.extra_bytes:
            data += b"\0" * self.extra_bytes[name]
        start = 0
        rng = h.headers.get("Range")
        if rng and rng.startswith("bytes="):
            start = int(rng[6:].split("-")[0] or 0)
        h.send_response(206 if start else 200)
        h.send_header("Content-Type", "application/octet-stream")
        h.send_header("Content-Length", str(len(data) - start))
        h.send_header("ETag", f'"{self._etag(p)}"')
        h.send_header("X-Repo-Commit", self.sha(repo))
        h.send_header("Accept-Ranges", "bytes")
        if start:
            h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        h.end_headers()
        if head:
            return
        cut = self.cut.get(name)
        if cut and cut[1] > 0:  # a dropped connection part-way through this file
            cut[1] -= 1
            h.wfile.write(data[start:start + cut[0]])
            h.wfile.flush()
            h.close_connection = True
            return
        h.wfile.write(data[start:])
