"""``FakeOllama``: the native and the OpenAI routes on one aiohttp application."""

from __future__ import annotations

from aiohttp import web

from .native import NativeRoutes
from .openai import OpenAIRoutes
from .wire import _abort_middleware


class FakeOllama(NativeRoutes, OpenAIRoutes):
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
