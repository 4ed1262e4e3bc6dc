"""``GET /admin``: the dashboard, one static page shipped in the package (no build step, no
CDN). Files are read once at start-up and served from memory; the page holds no data and
no secret — everything it shows comes from the admin API, which checks the token."""

from __future__ import annotations

import mimetypes
from pathlib import Path

from aiohttp import web

STATIC = Path(__file__).parent / "static"
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def load_static() -> dict[str, tuple[bytes, str]]:
    """Every file of the page, by name, with its content type."""
    files = {}
    for path in sorted(STATIC.iterdir()):
        if path.is_file():
            kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
            files[path.name] = (path.read_bytes(), kind)
    return files


def add_dashboard(app: web.Application) -> None:
    files = load_static()

    async def page(request: web.Request) -> web.Response:
        name = request.match_info.get("name", "admin.html")
        if name not in files:
            raise web.HTTPNotFound()
        body, kind = files[name]
        response = web.Response(body=body, headers=SECURITY_HEADERS)
        response.content_type = kind
        if kind.startswith("text/") or kind.endswith("javascript"):
            response.charset = "utf-8"
        return response

    app.router.add_get("/admin", page)
    app.router.add_get("/admin/{name}", page)
