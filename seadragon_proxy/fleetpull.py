"""``ollama pull M`` across a fleet: every target server pulls, the client sees one stream.

Each server's NDJSON progress is read as it comes. A status line without a digest
("pulling manifest", "verifying sha256 digest", ...) is passed on the first time any
server says it; a layer's progress is summed over the servers (``total`` and
``completed`` of that digest), so one bar fills as all of them pull. The servers' own
``success`` lines are held back: when every server is done the stream ends in one
``{"status":"success"}``, or in one ``{"error": ...}`` line naming each server that failed.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from .fleetmeta import SERVER_HEADER, Fleet, FleetServer, ServerFailed, endpoint, json_answer

NDJSON = "application/x-ndjson"
_DONE = object()  # a server's stream has ended (its outcome is in Merge.failures)


@dataclass
class Merge:
    """The merged view of the pulls so far."""

    said: set[str] = field(default_factory=set)
    layers: dict[str, dict[str, tuple[int, int]]] = field(default_factory=dict)
    failures: list[ServerFailed] = field(default_factory=list)

    def line(self, server: str, doc: dict[str, Any]) -> dict[str, Any] | None:
        """What the client sees of one progress line of ``server`` (None: nothing)."""
        status = str(doc.get("status", ""))
        digest = doc.get("digest")
        if isinstance(digest, str) and digest:
            total, completed = doc.get("total"), doc.get("completed", 0)
            if isinstance(total, int) and isinstance(completed, int):
                self.layers.setdefault(digest, {})[server] = (total, completed)
            per = self.layers.get(digest, {}).values()
            out: dict[str, Any] = {"status": status, "digest": digest}
            if per:
                out |= {"total": sum(t for t, _ in per), "completed": sum(c for _, c in per)}
            return out
        if status == "success" or status in self.said:
            return None
        self.said.add(status)
        return {"status": status}


async def pull(
    request: web.Request,
    fleet: Fleet,
    servers: Sequence[FleetServer],
    model: str | None,
    doc: dict[str, Any] | None,
) -> web.StreamResponse:
    assert doc is not None  # fleet_metadata read it
    if model is None:
        return json_answer({"error": "model is required"}, 400)  # Ollama's own words
    merge = Merge()
    lines: asyncio.Queue[tuple[str, object]] = asyncio.Queue(maxsize=64)
    upstream_doc = doc | {"stream": True}  # progress is read from every server
    tasks = [
        asyncio.create_task(_one(fleet, server, upstream_doc, merge, lines)) for server in servers
    ]
    try:
        if doc.get("stream", True) is False:
            for _ in servers:
                while (await lines.get())[1] is not _DONE:
                    pass
            return _summary(merge, servers)
        response = web.StreamResponse(headers={"Content-Type": NDJSON})
        response.headers[SERVER_HEADER] = ", ".join(s.name for s in servers)
        await response.prepare(request)
        running = len(servers)
        while running:
            server, item = await lines.get()
            if item is _DONE:
                running -= 1
                continue
            assert isinstance(item, dict)
            shown = merge.line(server, item)
            if shown is not None:
                await response.write(_ndjson(shown))
        await response.write(_ndjson(_outcome(merge, model)))
        await response.write_eof()
        return response
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _one(
    fleet: Fleet,
    server: FleetServer,
    doc: dict[str, Any],
    merge: Merge,
    lines: asyncio.Queue[tuple[str, object]],
) -> None:
    """Pull onto one server, putting its progress lines on ``lines``, then ``_DONE``."""
    limits = fleet.limits
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=limits.connect, sock_read=limits.idle)
    headers = fleet.headers.copy()
    headers["Content-Type"] = "application/json"
    succeeded = False
    try:
        async with fleet.session.post(
            endpoint(server, "/api/pull"),
            data=json.dumps(doc).encode(),
            headers=headers,
            timeout=timeout,
        ) as r:
            if r.status != 200:
                raw = await r.content.read(limits.max_line)
                raise ServerFailed(server.name, _error_text(raw, r.status), status=r.status)
            while raw := await r.content.readline():
                if len(raw) > limits.max_line:
                    raise ServerFailed(server.name, f"a progress line over {limits.max_line} bytes")
                if not raw.strip():
                    continue
                try:
                    line = json.loads(raw)
                except ValueError:
                    raise ServerFailed(server.name, "a progress line that is not JSON") from None
                if not isinstance(line, dict):
                    continue
                if "error" in line:
                    raise ServerFailed(server.name, str(line["error"]), status=500)
                succeeded = succeeded or line.get("status") == "success"
                await lines.put((server.name, line))
            if not succeeded:
                raise ServerFailed(server.name, "the progress stream ended without success")
    except ServerFailed as e:
        merge.failures.append(e)
    except ValueError:  # aiohttp's readline: a line past its own buffer limit
        merge.failures.append(ServerFailed(server.name, "a progress line too long"))
    except TimeoutError:
        merge.failures.append(
            ServerFailed(server.name, f"sent nothing for {limits.idle:g} s", status=504)
        )
    except aiohttp.ClientError as e:
        merge.failures.append(ServerFailed(server.name, f"unreachable: {e}"))
    await lines.put((server.name, _DONE))  # not when cancelled: nobody reads any more


def _error_text(raw: bytes, status: int) -> str:
    try:
        doc = json.loads(raw)
    except ValueError:
        doc = None
    if isinstance(doc, dict) and "error" in doc:
        return str(doc["error"])
    return f"status {status}: {raw[:200].decode(errors='replace')!r}"


def _outcome(merge: Merge, model: str) -> dict[str, Any]:
    if not merge.failures:
        return {"status": "success"}
    failed = "; ".join(str(f) for f in merge.failures)
    return {"error": f"pull of '{model}' failed on {failed}"}


def _summary(merge: Merge, servers: Sequence[FleetServer]) -> web.Response:
    """The one answer of ``stream: false``: success, or a 502 naming each server that failed."""
    names = ", ".join(s.name for s in servers)
    if not merge.failures:
        return json_answer({"status": "success"}, 200, names)
    failed = "; ".join(str(f) for f in merge.failures)
    return json_answer({"error": f"pull failed on {failed}"}, 502, names)


def _ndjson(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"
