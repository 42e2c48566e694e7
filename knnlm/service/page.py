"""``GET /``: one self-contained page that shows what the memory did.

The page (``static/index.html``) holds its CSS and JavaScript inline: no build step, no CDN,
no font or script from anywhere else. It calls the API from the browser with the key the
user types, sent as ``Authorization: Bearer`` and kept in the tab's ``sessionStorage``, never
in a URL; so the page itself loads without the key (the guard leaves ``/`` open), and it
holds nothing secret.

The response carries a Content-Security-Policy that allows exactly the page's own inline
script and style (by their SHA-256) and requests to the server's own origin: even a bug in
the page could not make the browser fetch from, or send text to, anywhere else.
"""

from __future__ import annotations

import base64
import hashlib
import re
from functools import cache
from importlib.resources import files

from fastapi import FastAPI
from fastapi.responses import HTMLResponse

PAGE = "index.html"


def _hashes(html: str, tag: str) -> str:
    """CSP sources for each inline ``<tag>`` element of ``html``: ``'sha256-...'``."""
    bodies = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.DOTALL)
    if not bodies:
        raise ValueError(f"the page has no inline <{tag}>")
    digests = (base64.b64encode(hashlib.sha256(b.encode()).digest()).decode() for b in bodies)
    return " ".join(f"'sha256-{d}'" for d in digests)


@cache
def page() -> tuple[bytes, dict[str, str]]:
    """The page's bytes and the headers it is served with, read once from the package."""
    html = files("knnlm.service").joinpath("static", PAGE).read_text(encoding="utf-8")
    policy = "; ".join(
        [
            "default-src 'none'",
            f"script-src {_hashes(html, 'script')}",
            f"style-src {_hashes(html, 'style')}",
            "connect-src 'self'",  # the API, on this server only
            "img-src data:",  # the empty favicon, so the browser asks for none
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        ]
    )
    headers = {
        "Content-Security-Policy": policy,
        "Referrer-Policy": "no-referrer",
        "X-Content-Type-Options": "nosniff",
        "Cache-Control": "no-cache",
    }
    return html.encode("utf-8"), headers


def install_page(app: FastAPI) -> None:
    """Serve the page at ``GET /`` (left out of the OpenAPI spec: it is not part of the API)."""
    content, headers = page()

    @app.get("/", include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(content, headers=headers)
