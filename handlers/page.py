"""GET /: the chat page, one static HTML file (no build step, no CDN) that talks to the public API."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

# The page's own script and style are inline; nothing is loaded from elsewhere, and it may only
# talk back to this server.
CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src 'self' data: blob:; "
       "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


@lru_cache(maxsize=1)
def _page() -> str:
    return (Path(__file__).parent / "static" / "chat.html").read_text()


async def get():
    return _page(), 200, {"Content-Type": "text/html", "Content-Security-Policy": CSP,
                          "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}
