"""The fake's machinery: what it records of each request, the gates and faults that steer
it, and its streaming, shared by the native and the OpenAI routes."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from .residency import BadKeepAlive, BadOption, Residency, RunnerOptions, parse_keep_alive
from .wire import INFERENCE, MODELS, RUNNER_ERROR, _Abort, error, go_json, now_iso


@dataclass
class Seen:
    """One request as the fake received it."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes
    prompt: str
    arrived: float  # perf_counter() when the handler started
    started: float = 0.0  # perf_counter() when it began to be served (after ``parallel``)
    finished: float = 0.0  # perf_counter() after the last byte was written
    cancelled: bool = False  # the client hung up before the answer ended

    @property
    def json(self) -> Any:
        return json.loads(self.body) if self.body else None


SEEN = web.RequestKey("seen", Seen)


@dataclass
class FakeCore:
    """State and helpers; ``FakeOllama`` adds the routes."""

    tokens: int = 5
    parallel: int | None = None
    residency: Residency | None = None  # opt-in: models load, evict and take turns (sched.go)
    models: list[str] = field(default_factory=lambda: list(MODELS))
    blobs: set[str] = field(default_factory=set)
    tags_status: int = 200  # another status: /api/tags fails with it (a broken Ollama)
    requests: list[Seen] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    _gates: dict[str, asyncio.Event] = field(default_factory=dict)
    _changed: asyncio.Event | None = None
    _runner: web.AppRunner | None = None
    _turns: asyncio.Semaphore | None = None
    port: int = 0

    def app(self) -> web.Application:
        raise NotImplementedError  # FakeOllama puts the routes together

    def __post_init__(self) -> None:
        if self.residency is not None:
            self.residency.on_change = self._notify

    def _keep_alive(self, doc: dict[str, Any]) -> float | str | None:
        """The request's ``keep_alive`` in seconds (None: forever; "default": none given)."""
        if doc.get("keep_alive") is None:
            return "default"
        try:
            return parse_keep_alive(doc["keep_alive"])
        except BadKeepAlive as e:
            raise _Abort(error(str(e), 400)) from None

    def _runner_options(self, doc: dict[str, Any], struct: str) -> RunnerOptions:
        """The runner options the request asks for; Ollama's answers to bad ones."""
        assert self.residency is not None
        options = doc.get("options")
        if options is not None and not isinstance(options, dict):
            kind = {str: "string", list: "array", bool: "bool"}.get(type(options), "number")
            raise _Abort(
                error(
                    f"json: cannot unmarshal {kind} into Go struct field {struct}.options"
                    " of type map[string]interface {}",
                    400,
                )
            )
        try:
            return self.residency.runner_options(options)
        except BadOption as e:
            raise _Abort(error(str(e), 500)) from None  # handleScheduleError's default

    def gate(self, name: str) -> asyncio.Event:
        return self._gates.setdefault(name, asyncio.Event())

    @property
    def inference(self) -> list[Seen]:
        return [r for r in self.requests if r.path.startswith(INFERENCE)]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    async def wait_until(self, predicate: Any, timeout: float = 10) -> None:
        """Wait (event-driven) until ``predicate()`` holds; fail after ``timeout`` s."""
        async with asyncio.timeout(timeout):
            while not predicate():
                if self._changed is None:
                    self._changed = asyncio.Event()
                await self._changed.wait()

    async def wait_for(self, count: int, timeout: float = 10) -> list[Seen]:
        await self.wait_until(lambda: len(self.inference) >= count, timeout)
        return self.inference

    async def start(self, port: int = 0, host: str = "127.0.0.1") -> None:
        self._runner = web.AppRunner(
            self.app(), handler_cancellation=True, access_log=None, shutdown_timeout=0.5
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port or self.port, reuse_address=True)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        """Stop listening and drop every connection, as a killed Ollama would."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @web.middleware
    async def _record(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        body = b"" if request.path.startswith("/api/blobs/") else await request.read()
        seen = Seen(
            request.method,
            request.path,
            request.query_string,
            dict(request.headers),
            body,
            "",
            time.perf_counter(),
        )
        request[SEEN] = seen
        self.requests.append(seen)
        self._notify()
        inference = request.path.startswith(INFERENCE)
        if self.parallel and self._turns is None:
            self._turns = asyncio.Semaphore(self.parallel)
        turns = self._turns if inference else None
        try:
            if turns is not None:
                await turns.acquire()
            seen.started = time.perf_counter()
            if inference:
                self.in_flight += 1
                self.max_in_flight = max(self.max_in_flight, self.in_flight)
            self._notify()
            try:
                return await handler(request)
            finally:
                seen.finished = time.perf_counter()
                if inference:
                    self.in_flight -= 1
                if turns is not None:
                    turns.release()
                self._notify()
        except (asyncio.CancelledError, ConnectionResetError):
            # The client went away before the answer ended: aiohttp cancels the handler, or
            # (when the hang-up is seen by a write first) the write fails.
            seen.cancelled = True
            self._notify()
            raise

    def _doc(self, request: web.Request, *, openai: bool = False) -> dict[str, Any]:
        seen: Seen = request[SEEN]
        if not seen.body:
            raise _Abort(error("missing request body", 400, openai=openai))
        try:
            doc = json.loads(seen.body)
        except ValueError as e:
            raise _Abort(error(f"invalid character in JSON: {e}", 400, openai=openai)) from None
        if not isinstance(doc, dict):
            raise _Abort(error("json: cannot unmarshal into Go value", 400, openai=openai))
        messages = doc.get("messages")
        prompt = doc.get("prompt")
        if isinstance(messages, list) and messages and isinstance(messages[-1], dict):
            prompt = messages[-1].get("content")
        seen.prompt = prompt if isinstance(prompt, str) else ""
        return doc

    def _model(self, doc: dict[str, Any], *, openai: bool = False) -> str:
        model = doc.get("model") or doc.get("name")
        if not model:
            raise _Abort(error("model is required", 400, openai=openai))
        if model not in self.models and f"{model}:latest" not in self.models:
            raise _Abort(error(f"model '{model}' not found", 404, openai=openai))
        return str(model)

    async def _steer(self, request: web.Request) -> web.StreamResponse | None:
        """Apply the gate and fault instructions that act before any header is sent."""
        prompt: str = request[SEEN].prompt
        if prompt.startswith("gate:"):
            await self.gate(prompt[5:]).wait()
        elif prompt == "fault:500":
            return web.Response(status=500, text="Internal Server Error")
        elif prompt.startswith("fault:status:"):
            status = int(prompt.rsplit(":", 1)[1])
            return error(f"fake failure with status {status}", status)
        elif prompt == "fault:never":
            await asyncio.Event().wait()
        return None

    async def _stream(
        self, request: web.Request, lines: Iterator[bytes], kind: str
    ) -> web.StreamResponse:
        prompt: str = request[SEEN].prompt
        response = web.StreamResponse(headers={"Content-Type": kind})
        await response.prepare(request)
        if prompt.startswith("gate-headers:"):
            await self.gate(prompt[13:]).wait()
        if prompt.startswith("fault:slow:"):
            delay = 1 / float(prompt.rsplit(":", 1)[1])
            for line in lines:
                for i in range(len(line)):
                    await response.write(line[i : i + 1])
                    await asyncio.sleep(delay)
            await response.write_eof()
            return response
        for index, line in enumerate(lines):
            if index == 2:
                if prompt.startswith("gate-mid:"):
                    await self.gate(prompt[9:]).wait()
                elif prompt == "fault:error-line":
                    await response.write(go_json({"error": RUNNER_ERROR}) + b"\n")
                    await response.write_eof()
                    return response
                elif prompt == "fault:hangup":
                    assert request.transport is not None
                    request.transport.abort()
                    return response
            await response.write(line)
            # A write that fits the socket buffer does not yield; without this a long
            # stream would hold the event loop it shares with the proxy in tests for as
            # long as the kernel takes bytes (0.4 s at a time), which no real Ollama does.
            await asyncio.sleep(0)
        await response.write_eof()
        return response

    def _count(self, doc: dict[str, Any]) -> int:
        options = doc.get("options")
        wanted = options.get("num_predict") if isinstance(options, dict) else doc.get("max_tokens")
        return max(0, wanted) if isinstance(wanted, int) else self.tokens

    def _final(
        self, model: str, count: int, *, chat: bool, load_ns: int = 1_000_000
    ) -> dict[str, Any]:
        """The last object of a generation, fields in Ollama's order."""
        out: dict[str, Any] = {"model": model, "created_at": now_iso()}
        if chat:
            out["message"] = {"role": "assistant", "content": ""}
        else:
            out["response"] = ""
        return (
            out
            | {
                "done": True,
                "done_reason": "stop" if count < 4096 else "length",
                "total_duration": 500_000 + load_ns + count * 20_000_000,
                "load_duration": load_ns,
                "prompt_eval_count": 12,
                "prompt_eval_duration": 500_000,
                "eval_count": count,
                "eval_duration": max(1, count) * 20_000_000,
            }
            | ({} if chat else {"context": [128006, 882, 128007]})
        )

    def _details(self, name: str) -> dict[str, Any]:
        family = "nomic-bert" if "embed" in name else "llama"
        return {
            "parent_model": "",
            "format": "gguf",
            "family": family,
            "families": [family],
            "parameter_size": "70.6B" if "70b" in name else "1.2B",
            "quantization_level": "Q4_K_M",
        }

    def _digest(self, name: str) -> str:
        return hashlib.sha256(name.encode()).hexdigest()
