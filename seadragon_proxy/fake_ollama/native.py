"""Ollama's native routes: /, version, tags, ps, show, generate, chat, embed, pull, push,
create, copy, delete, blobs, and its own 404/405."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

from aiohttp import web

from .core import SEEN, FakeCore
from .wire import NDJSON, VERSION, WORDS, error, go_json, json_response, now_iso


class NativeRoutes(FakeCore):
    async def root(self, request: web.Request) -> web.Response:
        return web.Response(text="Ollama is running")

    async def version(self, request: web.Request) -> web.Response:
        return json_response({"version": VERSION})

    async def tags(self, request: web.Request) -> web.Response:
        if self.tags_status != 200:
            return error(f"fake failure with status {self.tags_status}", self.tags_status)
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
        if self.residency is not None:
            return json_response({"models": self._resident()})
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

    def _resident(self) -> list[dict[str, Any]]:
        """What the residency has loaded, as Ollama's PsHandler lists it (latest expiry first)."""
        assert self.residency is not None
        models = []
        for runner in self.residency.loaded.values():
            m = runner.model
            size = 42_520_413_916 if "70b" in m else 1_321_098_329
            models.append(
                {
                    "name": m,
                    "model": m,
                    "size": size,
                    "digest": self._digest(m),
                    "details": self._details(m),
                    "expires_at": self.residency.expires_iso(runner),
                    "size_vram": size,
                    "context_length": runner.options.num_ctx,
                }
            )
        return sorted(models, key=lambda e: str(e["expires_at"]), reverse=True)

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
        if self.residency is None:
            return await self._answer(request, doc, model, chat=chat)
        keep_alive = self._keep_alive(doc)
        bare = not request[SEEN].prompt and not doc.get("messages")
        if bare and keep_alive == 0:
            self.residency.expire(model)  # Ollama unloads without loading it first
            return await self._answer(request, doc, model, chat=chat)
        options = self._runner_options(doc, "ChatRequest" if chat else "GenerateRequest")
        async with self.residency.use(model, keep_alive, work=not bare, options=options) as load_ns:
            return await self._answer(request, doc, model, chat=chat, load_ns=load_ns)

    async def _answer(
        self,
        request: web.Request,
        doc: dict[str, Any],
        model: str,
        *,
        chat: bool,
        load_ns: int = 1_000_000,
    ) -> web.StreamResponse:
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

        final = self._final(model, count, chat=chat, load_ns=load_ns)
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
        if self.residency is None:
            return await self._embed(request, doc, model)
        struct = "EmbeddingRequest" if request.path == "/api/embeddings" else "EmbedRequest"
        options = self._runner_options(doc, struct)
        async with self.residency.use(model, self._keep_alive(doc), options=options) as load_ns:
            return await self._embed(request, doc, model, load_ns)

    async def _embed(
        self, request: web.Request, doc: dict[str, Any], model: str, load_ns: int = 1_019_500
    ) -> web.Response:
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
                "load_duration": load_ns,
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
        name = str(doc.get("model") or doc.get("name"))
        name = name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"
        if name not in self.models:
            self.models.append(name)  # /api/tags lists it from now on, as Ollama's does
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
