"""What the fake says on the wire: Go-style JSON, Ollama's and OpenAI's error shapes,
and the constants its answers are made of."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from aiohttp import web
from aiohttp.typedefs import Handler

VERSION = "0.12.6"
MODELS = ("llama3:70b", "llama3.2:1b", "nomic-embed-text:latest")
WORDS = ("The", " sky", " is", " blue", " because", " of", " Rayleigh", " scattering", ".")
NDJSON = "application/x-ndjson"
RUNNER_ERROR = "an error was encountered while running the model: unexpected EOF"
INFERENCE = ("/api/generate", "/api/chat", "/api/embed", "/api/embeddings", "/v1/")


def go_json(obj: object) -> bytes:
    """JSON as Go's encoding/json writes it: compact, with <, >, &, U+2028/9 escaped, and
    a lone surrogate (which Go's decoder never produces) as U+FFFD, as Go would have read it."""
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    for raw, escaped in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026")):
        text = text.replace(raw, escaped)
    return text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029").encode()


def now_iso() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def json_response(obj: object, status: int = 200) -> web.Response:
    return web.Response(
        status=status, body=go_json(obj), content_type="application/json", charset="utf-8"
    )


def error(message: str, status: int, *, openai: bool = False) -> web.Response:
    if openai:
        kind = {400: "invalid_request_error", 404: "not_found_error"}.get(status, "api_error")
        doc: object = {"error": {"message": message, "type": kind, "param": None, "code": None}}
        return json_response(doc, status)
    return json_response({"error": message}, status)


class _Abort(Exception):
    """Carries an early error response out of the body parsing helpers."""

    def __init__(self, response: web.Response) -> None:
        self.response = response


@web.middleware
async def _abort_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except _Abort as e:
        return e.response
