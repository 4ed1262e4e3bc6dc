"""A fake Ollama that speaks the wire format faithfully, for tests, benchmarks and demos.

Run it alone with ``python -m seadragon_proxy.fake_ollama --port 11434`` to try the
proxy without a GPU. Tests steer it through the prompt (or last message):

    gate:NAME          wait for ``fake.gate(NAME).set()`` before answering (no headers yet)
    gate-headers:NAME  send the headers, then wait for the gate before the first chunk
    gate-mid:NAME      send the headers and two chunks, then wait for the gate
    fault:error-line   two chunks, then ``{"error": ...}`` and the end, as Ollama does
    fault:hangup       two chunks, then the connection is cut
    fault:500          a plain-text 500, as a crashing Go handler would send
    fault:status:NNN   a JSON error with that status
    fault:never        headers never come (until the client gives up)
    fault:slow:N       stream one byte every 1/N seconds

``options.num_predict`` sets how many tokens a generation streams (default 5).
``parallel=N`` makes inference requests take turns N at a time inside the fake, as
Ollama's ``OLLAMA_NUM_PARALLEL`` does: the baseline a direct client sees.
Every request is recorded in ``fake.requests``; ``await fake.wait_for(n)`` waits until
n inference requests have arrived, without sleeping.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

VERSION = "0.12.6"
MODELS = ("llama3:70b", "llama3.2:1b", "nomic-embed-text:latest")
WORDS = ("The", " sky", " is", " blue", " because", " of", " Rayleigh", " scattering", ".")
NDJSON = "application/x-ndjson"
RUNNER_ERROR = "an error was encountered while running the model: unexpected EOF"
INFERENCE = ("/api/generate", "/api/chat", "/api/embed", "/api/embeddings", "/v1/")


def go_json(obj: object) -> bytes:
    """JSON as Go's encoding/json writes it: compact, with <, >, &, U+2028/9 escaped."""
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
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
    cancelled: bool = False

    @property
    def json(self) -> Any:
        return json.loads(self.body) if self.body else None


@dataclass
class FakeOllama:
    tokens: int = 5
    parallel: int | None = None
    models: list[str] = field(default_factory=lambda: list(MODELS))
    blobs: set[str] = field(default_factory=set)
    requests: list[Seen] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    _gates: dict[str, asyncio.Event] = field(default_factory=dict)
    _changed: asyncio.Event | None = None
    _runner: web.AppRunner | None = None
    _turns: asyncio.Semaphore | None = None
    port: int = 0

    # -- test helpers ---------------------------------------------------------------------

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

    # -- running -----------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(client_max_size=1024**3)
        app.middlewares.extend([self._record, _abort_middleware])
        r = app.router
        r.add_route("GET", "/", self.root)
        r.add_route("HEAD", "/", self.root)
        r.add_get("/api/version", self.version)
        r.add_get("/api/tags", self.tags)
        r.add_get("/api/ps", self.ps)
        r.add_post("/api/show", self.show)
        r.add_post("/api/generate", self.generate)
        r.add_post("/api/chat", self.chat)
        r.add_post("/api/embed", self.embed)
        r.add_post("/api/embeddings", self.embed)
        r.add_post("/api/pull", self.pull)
        r.add_post("/api/push", self.pull)
        r.add_post("/api/create", self.pull)
        r.add_post("/api/copy", self.copy)
        r.add_delete("/api/delete", self.delete)
        r.add_route("HEAD", "/api/blobs/{digest}", self.blob_head)
        r.add_post("/api/blobs/{digest}", self.blob_upload)
        r.add_post("/v1/chat/completions", self.openai_chat)
        r.add_post("/v1/completions", self.openai_chat)
        r.add_post("/v1/embeddings", self.openai_embeddings)
        r.add_get("/v1/models", self.openai_models)
        r.add_get("/v1/models/{model:.+}", self.openai_model)
        r.add_route("*", "/{tail:.*}", self.not_found)
        return app

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

    # -- plumbing ------------------------------------------------------------------------------

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
        except asyncio.CancelledError:
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
        await response.write_eof()
        return response

    def _count(self, doc: dict[str, Any]) -> int:
        options = doc.get("options")
        wanted = options.get("num_predict") if isinstance(options, dict) else doc.get("max_tokens")
        return max(0, wanted) if isinstance(wanted, int) else self.tokens

    def _final(self, model: str, count: int, *, chat: bool) -> dict[str, Any]:
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
                "total_duration": 1_500_000 + count * 20_000_000,
                "load_duration": 1_000_000,
                "prompt_eval_count": 12,
                "prompt_eval_duration": 500_000,
                "eval_count": count,
                "eval_duration": max(1, count) * 20_000_000,
            }
            | ({} if chat else {"context": [128006, 882, 128007]})
        )

    # -- native routes -------------------------------------------------------------------------

    async def root(self, request: web.Request) -> web.Response:
        return web.Response(text="Ollama is running")

    async def version(self, request: web.Request) -> web.Response:
        return json_response({"version": VERSION})

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

    async def tags(self, request: web.Request) -> web.Response:
        models = [
            {
                "name": m,
                "model": m,
                "modified_at": "2026-10-01T12:00:00.000000000Z",
                "size": 42_520_413_916 if "70b" in m else 1_321_098_329,
                "digest": self._digest(m),
                "details": self._details(m),
            }
            for m in self.models
        ]
        return json_response({"models": models})

    async def ps(self, request: web.Request) -> web.Response:
        models = [
            {
                "name": m,
                "model": m,
                "size": 42_520_413_916,
                "digest": self._digest(m),
                "details": self._details(m),
                "expires_at": "2026-11-26T12:05:00.000000000Z",
                "size_vram": 42_520_413_916,
                "context_length": 8192,
            }
            for m in self.models[:1]
        ]
        return json_response({"models": models})

    async def show(self, request: web.Request) -> web.Response:
        model = self._model(self._doc(request))
        return json_response(
            {
                "license": "META LLAMA 3 COMMUNITY LICENSE AGREEMENT",
                "modelfile": f"FROM {model}\n",
                "parameters": 'stop "<|eot_id|>"',
                "template": "{{ .Prompt }}",
                "details": self._details(model),
                "model_info": {"general.architecture": "llama", "llama.context_length": 8192},
                "capabilities": ["embedding"] if "embed" in model else ["completion"],
                "modified_at": "2026-10-01T12:00:00.000000000Z",
            }
        )

    async def generate(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def _generate(self, request: web.Request, *, chat: bool) -> web.StreamResponse:
        doc = self._doc(request)
        model = self._model(doc)
        if (early := await self._steer(request)) is not None:
            return early
        prompt = request[SEEN].prompt
        if not prompt and not doc.get("messages"):
            reason = "unload" if doc.get("keep_alive") in (0, "0", "0s") else "load"
            loaded: dict[str, Any] = {"model": model, "created_at": now_iso()}
            if chat:
                loaded["message"] = {"role": "assistant", "content": ""}
            else:
                loaded["response"] = ""
            return json_response(loaded | {"done": True, "done_reason": reason})
        count = self._count(doc)

        def piece(i: int) -> dict[str, Any]:
            word = WORDS[i % len(WORDS)]
            out: dict[str, Any] = {"model": model, "created_at": now_iso()}
            if chat:
                out["message"] = {"role": "assistant", "content": word}
            else:
                out["response"] = word
            out["done"] = False
            return out

        final = self._final(model, count, chat=chat)
        if doc.get("stream", True) is False:
            text = "".join(WORDS[i % len(WORDS)] for i in range(count))
            if chat:
                final["message"]["content"] = text
            else:
                final["response"] = text
            return json_response(final)

        def lines() -> Iterator[bytes]:
            for i in range(count):
                yield go_json(piece(i)) + b"\n"
            yield go_json(final) + b"\n"

        return await self._stream(request, lines(), NDJSON)

    async def embed(self, request: web.Request) -> web.Response:
        doc = self._doc(request)
        model = self._model(doc)
        if (early := await self._steer(request)) is not None:
            return early  # type: ignore[return-value]
        if request.path == "/api/embeddings":
            return json_response({"embedding": [0.1, 0.2, 0.3]})
        inputs = doc.get("input", [])
        count = len(inputs) if isinstance(inputs, list) else 1
        return json_response(
            {
                "model": model,
                "embeddings": [[0.1, 0.2, 0.3]] * count,
                "total_duration": 14_143_917,
                "load_duration": 1_019_500,
                "prompt_eval_count": 8 * count,
            }
        )

    async def pull(self, request: web.Request) -> web.StreamResponse:
        doc = self._doc(request)
        if not (doc.get("model") or doc.get("name")):
            return error("model is required", 400)
        digest = "sha256:" + self._digest(str(doc.get("model") or doc.get("name")))
        steps: list[dict[str, Any]] = [{"status": "pulling manifest"}]
        steps += [
            {
                "status": f"pulling {digest[7:19]}",
                "digest": digest,
                "total": 4000,
                "completed": done,
            }
            for done in (0, 1000, 4000)
        ]
        steps += [
            {"status": "verifying sha256 digest"},
            {"status": "writing manifest"},
            {"status": "success"},
        ]
        if doc.get("stream", True) is False:
            return json_response({"status": "success"})
        return await self._stream(request, (go_json(s) + b"\n" for s in steps), NDJSON)

    async def copy(self, request: web.Request) -> web.Response:
        doc = self._doc(request)
        source = str(doc.get("source", ""))
        if source not in self.models:
            return error(f"model '{source}' not found", 404)
        self.models.append(str(doc.get("destination")))
        return web.Response(status=200)

    async def delete(self, request: web.Request) -> web.Response:
        model = self._model(self._doc(request))
        self.models.remove(model if model in self.models else f"{model}:latest")
        return web.Response(status=200)

    async def blob_head(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if request.match_info["digest"] in self.blobs else 404)

    async def blob_upload(self, request: web.Request) -> web.Response:
        digest = request.match_info["digest"]
        if digest in self.blobs:
            return web.Response(status=200)
        hasher = hashlib.sha256()
        size = 0
        async for chunk in request.content.iter_any():
            hasher.update(chunk)
            size += len(chunk)
        request[SEEN].body = f"<{size} bytes>".encode()
        if digest != f"sha256:{hasher.hexdigest()}":
            return error("digest mismatch", 400)
        self.blobs.add(digest)
        return web.Response(status=201)

    async def not_found(self, request: web.Request) -> web.Response:
        known = {r.resource.canonical for r in request.app.router.routes() if r.resource}
        if request.path in known:
            return web.Response(status=405, text="405 method not allowed")
        return web.Response(status=404, text="404 page not found")

    # -- OpenAI-compatible routes ------------------------------------------------------------

    async def openai_chat(self, request: web.Request) -> web.StreamResponse:
        doc = self._doc(request, openai=True)
        model = self._model(doc, openai=True)
        if (early := await self._steer(request)) is not None:
            return early
        count = self._count(doc)
        chat = request.path.endswith("/chat/completions")
        created = int(time.time())
        ident = "chatcmpl-7" if chat else "cmpl-7"
        obj = "chat.completion" if chat else "text_completion"
        usage = {"prompt_tokens": 12, "completion_tokens": count, "total_tokens": 12 + count}
        text = "".join(WORDS[i % len(WORDS)] for i in range(count))
        if not doc.get("stream"):
            choice: dict[str, Any] = {"index": 0, "finish_reason": "stop"}
            if chat:
                choice["message"] = {"role": "assistant", "content": text}
            else:
                choice["text"] = text
            body = {
                "id": ident,
                "object": obj,
                "created": created,
                "model": model,
                "system_fingerprint": "fp_ollama",
                "choices": [choice],
                "usage": usage,
            }
            return json_response(body)

        def chunk(content: str | None, finish: str | None) -> bytes:
            c: dict[str, Any] = {"index": 0}
            if chat:
                c["delta"] = {"role": "assistant", "content": content or ""}
            else:
                c["text"] = content or ""
            c["finish_reason"] = finish
            body = {
                "id": ident,
                "object": f"{obj}.chunk" if chat else obj,
                "created": created,
                "model": model,
                "system_fingerprint": "fp_ollama",
                "choices": [c],
            }
            return b"data: " + go_json(body) + b"\n\n"

        def events() -> Iterator[bytes]:
            for i in range(count):
                yield chunk(WORDS[i % len(WORDS)], None)
            yield chunk("", "stop")
            options = doc.get("stream_options")
            if isinstance(options, dict) and options.get("include_usage"):
                body = {
                    "id": ident,
                    "object": f"{obj}.chunk",
                    "created": created,
                    "model": model,
                    "system_fingerprint": "fp_ollama",
                    "choices": [],
                    "usage": usage,
                }
                yield b"data: " + go_json(body) + b"\n\n"
            yield b"data: [DONE]\n\n"

        return await self._stream(request, events(), "text/event-stream")

    async def openai_embeddings(self, request: web.Request) -> web.Response:
        doc = self._doc(request, openai=True)
        model = self._model(doc, openai=True)
        return json_response(
            {
                "object": "list",
                "data": [{"object": "embedding", "embedding": [0.1, 0.2, 0.3], "index": 0}],
                "model": model,
                "usage": {"prompt_tokens": 8, "total_tokens": 8},
            }
        )

    async def openai_models(self, request: web.Request) -> web.Response:
        data = [
            {"id": m, "object": "model", "created": 1727784000, "owned_by": "library"}
            for m in self.models
        ]
        return json_response({"object": "list", "data": data})

    async def openai_model(self, request: web.Request) -> web.Response:
        model = request.match_info["model"]
        if model not in self.models:
            return error(f"model '{model}' not found", 404, openai=True)
        return json_response(
            {"id": model, "object": "model", "created": 1727784000, "owned_by": "library"}
        )


SEEN = web.RequestKey("seen", Seen)


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


def main() -> None:
    parser = argparse.ArgumentParser(description="A fake Ollama for trying seadragon-proxy.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=11434)
    parser.add_argument("--tokens", type=int, default=20, help="tokens per generation")
    args = parser.parse_args()

    async def run() -> None:
        fake = FakeOllama(tokens=args.tokens)
        await fake.start(args.port, args.host)
        print(f"fake Ollama listening on http://{args.host}:{fake.port}", flush=True)
        await asyncio.Event().wait()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())


if __name__ == "__main__":
    main()
