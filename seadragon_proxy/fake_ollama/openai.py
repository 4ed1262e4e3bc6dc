"""The OpenAI-compatible routes: chat and text completions (SSE when streamed),
embeddings, models."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from aiohttp import web

from .core import FakeCore
from .wire import WORDS, error, go_json, json_response


class OpenAIRoutes(FakeCore):
    async def openai_chat(self, request: web.Request) -> web.StreamResponse:
        doc = self._doc(request, openai=True)
        model = self._model(doc, openai=True)
        if self.residency is None:
            return await self._openai_answer(request, doc, model)
        async with self.residency.use(model):
            return await self._openai_answer(request, doc, model)

    async def _openai_answer(
        self, request: web.Request, doc: dict[str, Any], model: str
    ) -> web.StreamResponse:
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
