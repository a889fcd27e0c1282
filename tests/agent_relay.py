"""A logging relay between a coding agent and openmlx, both on 127.0.0.1 (tests/test_agents_e2e.py).

`python -m tests.agent_relay PORT UPSTREAM DIR CLIENT`: every request is forwarded to UPSTREAM as
received and its answer streamed back as it comes; each one is written to DIR/NNN.json in the
recordings' format (tests/data/agents/: client, recorded, method, path, headers, body) with the
answer's status added, so a request the server refused can be replayed as sent.
"""
from __future__ import annotations

import http.client
import json
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

# Headers not kept in a recording (they name the connection, not the request).
DROPPED = {"host", "content-length", "connection", "authorization", "x-api-key", "accept-encoding"}


def serve(port: int, upstream: str, out: Path, client: str) -> None:
    """Relay 127.0.0.1:PORT to UPSTREAM until killed, recording each request under OUT."""
    out.mkdir(parents=True, exist_ok=True)
    target = urlsplit(upstream)
    count = [0]

    class Relay(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _forward(self) -> None:
            t0 = time.monotonic()
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            up = http.client.HTTPConnection(target.hostname, target.port, timeout=3600)
            headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "accept-encoding")}
            try:
                up.request(self.command, self.path, body=raw or None, headers=headers)
                answer = up.getresponse()
            except OSError:  # the server is not up yet
                self.send_error(502)
                return
            count[0] += 1
            try:
                body = json.loads(raw) if raw else None
            except ValueError:
                body = raw.decode("utf-8", "replace")
            (out / f"{count[0]:03d}.json").write_text(json.dumps({
                "client": client, "recorded": time.strftime("%Y-%m-%d"), "method": self.command,
                "path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()
                                               if k.lower() not in DROPPED},
                "body": body, "status": answer.status, "request_id": answer.getheader("x-request-id")}, indent=1))
            self.send_response(answer.status)
            for k, v in answer.getheaders():
                if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                    self.send_header(k, v)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            n = count[0]
            # When each answer started and how it ended, on stderr: a client that hangs up shows.
            print(f"{time.strftime('%H:%M:%S')} #{n} {self.command} {self.path} -> {answer.status} "
                  f"after {time.monotonic() - t0:.1f} s", file=sys.stderr, flush=True)
            try:
                while chunk := answer.read1(65536):
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    self.wfile.flush()
                self.wfile.write(b"0\r\n\r\n")
                end = "ended"
            except OSError:
                end = "the client hung up"
            finally:
                up.close()  # a client's hang-up reaches the server
            print(f"{time.strftime('%H:%M:%S')} #{n} {end} after {time.monotonic() - t0:.1f} s",
                  file=sys.stderr, flush=True)

        do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _forward

        def log_message(self, *args) -> None:  # the recordings are the log
            pass

    ThreadingHTTPServer(("127.0.0.1", port), Relay).serve_forever()


if __name__ == "__main__":
    serve(int(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), sys.argv[4])
