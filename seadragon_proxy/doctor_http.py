"""The doctor's questions over HTTP: short timeouts, bounded reads, and answers made safe
to print (control characters escaped) before a person reads them."""

from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
from yarl import URL

LIMIT = 1 << 20  # bytes read of any answer


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    body: bytes
    seconds: float

    def doc(self) -> Any:
        try:
            return json.loads(self.body)
        except ValueError:
            return None


class Unanswered(Exception):
    """No HTTP answer: the message says why (refused, timed out, broke off)."""


def clean(value: object, limit: int = 160) -> str:
    """Text from a server made safe for a terminal: control characters escaped, bounded."""
    text = value if isinstance(value, str) else str(value)
    out = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text[: limit * 2])
    return out if len(out) <= limit else out[: limit - 3] + "..."


async def fetch(
    session: aiohttp.ClientSession,
    method: str,
    url: URL,
    *,
    timeout: float,
    body: object = None,
    headers: dict[str, str] | None = None,
) -> Answer:
    started = time.perf_counter()
    try:
        async with asyncio.timeout(timeout):
            async with session.request(method, url, json=body, headers=headers) as response:
                chunks: list[bytes] = []
                size = 0
                async for chunk in response.content.iter_any():
                    chunks.append(chunk)
                    size += len(chunk)
                    if size > LIMIT:
                        break
                return Answer(response.status, b"".join(chunks), time.perf_counter() - started)
    except TimeoutError:
        raise Unanswered(f"no answer within {timeout:g} s") from None
    except aiohttp.ClientConnectorError as e:
        code = e.os_error.errno if e.os_error else None
        reason = os.strerror(code).lower() if code else clean(e)
        raise Unanswered(f"cannot connect: {reason}") from None
    except (aiohttp.ClientError, OSError, ValueError) as e:
        raise Unanswered(f"the connection broke: {clean(e) or type(e).__name__}") from None


def error_text(answer: Answer) -> str:
    doc = answer.doc()
    if isinstance(doc, dict) and "error" in doc:
        message = doc["error"]
        if isinstance(message, dict):
            message = message.get("message", message)
        return f"HTTP {answer.status}: {clean(message)}"
    return f"HTTP {answer.status}: {clean(answer.body.decode(errors='replace')) or 'empty body'}"


def last_object(body: bytes) -> dict[str, Any]:
    for line in reversed(body.splitlines()):
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        return doc if isinstance(doc, dict) else {}
    return {}


def model_names(answer: Answer | BaseException) -> list[str] | None:
    if isinstance(answer, BaseException) or answer.status != 200:
        return None
    doc = answer.doc()
    models = doc.get("models") if isinstance(doc, dict) else None
    if not isinstance(models, list):
        return None
    return [str(m.get("name") or m.get("model")) for m in models if isinstance(m, dict)]
