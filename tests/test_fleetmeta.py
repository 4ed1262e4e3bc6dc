"""Metadata across a fleet: several fakes on real ports behind a tiny app mounting
``fleet_metadata``, asked with aiohttp and with the real ``ollama`` client."""

from __future__ import annotations

import asyncio
import fnmatch
import hashlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp
import ollama
import pytest
from aiohttp import web
from yarl import URL

from seadragon_proxy.fake_ollama import FakeOllama
from seadragon_proxy.fleetmeta import SERVER_HEADER, Limits, fleet_metadata
from seadragon_proxy.middlewares import error_middleware

from .conftest import free_port

BIG, SMALL, CODER = "llama3:70b", "llama3.2:1b", "qwen2.5-coder:7b"


@dataclass
class Server:
    name: str
    url: str | URL
    healthy: bool = True
    models: list[str] = field(default_factory=lambda: ["*"])

    def allows(self, model: str) -> bool:
        return any(fnmatch.fnmatchcase(model, g) for g in self.models)


class BrokenPull(FakeOllama):
    """A server whose pull fails part-way with Ollama's error line."""

    async def pull(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        await response.write(b'{"status":"pulling manifest"}\n')
        await response.write(b'{"error":"max retries exceeded: disk full"}\n')
        await response.write_eof()
        return response


@dataclass
class Fleet:
    fakes: dict[str, FakeOllama]
    servers: list[Server]
    url: str
    limits: Limits

    def server(self, name: str) -> Server:
        return next(s for s in self.servers if s.name == name)

    def pulls(self, name: str) -> int:
        return sum(1 for r in self.fakes[name].requests if r.path == "/api/pull")


async def mounted(
    servers: list[Server], fakes: dict[str, FakeOllama], limits: Limits | None = None
) -> AsyncIterator[Fleet]:
    limits = limits or Limits()
    async with aiohttp.ClientSession() as session:

        async def handle(request: web.Request) -> web.StreamResponse:
            answer = await fleet_metadata(request, servers, session, limits=limits)
            return answer if answer is not None else web.Response(status=418, text="not mine")

        app = web.Application(middlewares=[error_middleware])
        app.router.add_route("*", "/{tail:.*}", handle)
        runner = web.AppRunner(
            app, handler_cancellation=True, access_log=None, shutdown_timeout=0.5
        )
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        try:
            yield Fleet(fakes, servers, f"http://127.0.0.1:{port}", limits)
        finally:
            await runner.cleanup()


@pytest.fixture
async def fleet() -> AsyncIterator[Fleet]:
    """a: 70b and 1b; b: 1b and the coder, allowed only the coder and 1b; c: unhealthy."""
    fakes = {
        "a": FakeOllama(models=[BIG, SMALL]),
        "b": FakeOllama(models=[SMALL, CODER, "secret:1b"]),
        "c": FakeOllama(models=["other:1b"]),
    }
    for fake in fakes.values():
        await fake.start()
    servers = [
        Server("a", fakes["a"].url + "/"),  # a trailing slash, as a config may have it
        Server("b", URL(fakes["b"].url), models=["qwen2.5-coder:*", SMALL]),  # as the fleet's
        Server("c", fakes["c"].url, healthy=False),
    ]
    try:
        async for f in mounted(servers, fakes):
            yield f
    finally:
        for fake in fakes.values():
            await fake.stop()


@pytest.fixture
async def client(fleet: Fleet) -> AsyncIterator[ollama.AsyncClient]:
    c = ollama.AsyncClient(host=fleet.url)
    try:
        yield c
    finally:
        await c._client.aclose()


async def test_tags_are_the_union_of_the_healthy_servers(
    fleet: Fleet, client: ollama.AsyncClient
) -> None:
    listed = await client.list()
    # deduped (1b is on a and b), b's "secret" is not one it may serve, c is not healthy
    assert [m.model for m in listed.models] == [BIG, SMALL, CODER]
    assert all(m.digest and m.size for m in listed.models)
    assert not any(r.path == "/api/tags" for r in fleet.fakes["c"].requests)


async def test_ps_names_the_server_of_each_entry(fleet: Fleet, client: ollama.AsyncClient) -> None:
    async with aiohttp.ClientSession() as s, s.get(fleet.url + "/api/ps") as r:
        doc = await r.json()
    assert [(m["name"], m["server"]) for m in doc["models"]] == [(BIG, "a"), (SMALL, "b")]
    assert {"expires_at", "size_vram", "digest"} <= set(doc["models"][0])
    running = await client.ps()  # the real client reads it, extra field and all
    assert [m.model for m in running.models] == [BIG, SMALL]


async def test_show_asks_a_server_that_has_the_model(
    fleet: Fleet, client: ollama.AsyncClient
) -> None:
    shown = await client.show(CODER)
    assert shown.modelfile == f"FROM {CODER}\n"
    async with aiohttp.ClientSession() as s:
        async with s.post(fleet.url + "/api/show", json={"model": CODER}) as r:
            assert r.headers[SERVER_HEADER] == "b"
        async with s.post(fleet.url + "/api/show", json={"model": "missing:1b"}) as r:
            assert (r.status, await r.json()) == (404, {"error": "model 'missing:1b' not found"})
    with pytest.raises(ollama.ResponseError) as e:
        await client.show("other:1b")  # only c has it, and c is not healthy
    assert e.value.status_code == 404
    asked = [r.json["model"] for r in fleet.fakes["a"].requests if r.path == "/api/show"]
    assert asked == [CODER, CODER, "missing:1b", "other:1b"]  # a is first; it says 404
    assert [r.json["model"] for r in fleet.fakes["b"].requests] == [CODER, CODER]
    assert not fleet.fakes["c"].requests


async def test_pull_onto_every_allowed_server_as_one_stream(
    fleet: Fleet, client: ollama.AsyncClient
) -> None:
    parts = [p async for p in await client.pull(SMALL, stream=True)]
    statuses = [p.status for p in parts]
    assert statuses[-1] == "success" and statuses.count("success") == 1
    assert statuses.count("pulling manifest") == 1 and statuses.count("writing manifest") == 1
    layer = [p for p in parts if p.digest]
    assert layer[-1].total == 8000 and layer[-1].completed == 8000  # both servers' bytes
    assert (fleet.pulls("a"), fleet.pulls("b"), fleet.pulls("c")) == (1, 1, 0)
    done = await client.pull(BIG, stream=False)  # b may not serve 70b: only a pulls
    assert done.status == "success"
    assert (fleet.pulls("a"), fleet.pulls("b")) == (2, 1)


async def test_a_failed_pull_names_its_server(fleet: Fleet) -> None:
    broken = BrokenPull(models=[SMALL])
    await broken.start()
    fleet.servers.append(Server("d", broken.url))
    fleet.servers.append(Server("e", f"http://127.0.0.1:{free_port()}"))  # down, not yet noticed
    try:
        client = ollama.AsyncClient(host=fleet.url)
        with pytest.raises(ollama.ResponseError) as e:
            async for _ in await client.pull(SMALL, stream=True):
                pass
        await client._client.aclose()
        message = str(e.value)
        assert "d: max retries exceeded: disk full" in message and "e: unreachable" in message
        async with aiohttp.ClientSession() as s:
            async with s.post(fleet.url + "/api/pull", json={"model": SMALL}) as r:
                lines = [json.loads(x) for x in (await r.read()).splitlines()]
            assert "error" in lines[-1] and not any(x.get("status") == "success" for x in lines)
            body = {"model": SMALL, "stream": False}
            async with s.post(fleet.url + "/api/pull", json=body) as r:
                doc = await r.json()
                assert r.status == 502 and "d: max retries exceeded" in doc["error"]
                assert "e: unreachable" in doc["error"]
    finally:
        await broken.stop()


async def test_model_no_server_may_serve_is_ollamas_404_at_once(fleet: Fleet) -> None:
    fleet.server("a").models = fleet.server("c").models = [BIG]
    async with aiohttp.ClientSession() as s:
        for path in ("/api/pull", "/api/show", "/api/copy"):
            body = {"model": "nope:1b", "source": "nope:1b", "destination": "x"}
            async with s.post(fleet.url + path, json=body) as r:
                assert (r.status, await r.json()) == (404, {"error": "model 'nope:1b' not found"})
    assert not any(f.requests for f in fleet.fakes.values())


async def test_management_goes_to_one_server_chosen_by_header(fleet: Fleet) -> None:
    async with aiohttp.ClientSession() as s:
        copy = {"source": SMALL, "destination": "mine:1b"}
        async with s.post(fleet.url + "/api/copy", json=copy) as r:
            assert (r.status, r.headers[SERVER_HEADER]) == (200, "a")  # the first healthy one
        headers = {SERVER_HEADER: "b"}
        async with s.post(fleet.url + "/api/copy", json=copy, headers=headers) as r:
            assert (r.status, r.headers[SERVER_HEADER]) == (200, "b")
        async with s.delete(fleet.url + "/api/delete", json={"model": SMALL}, headers=headers) as r:
            assert r.status == 200
        assert "mine:1b" in fleet.fakes["a"].models and "mine:1b" in fleet.fakes["b"].models
        assert SMALL not in fleet.fakes["b"].models and SMALL in fleet.fakes["a"].models
        async with s.post(fleet.url + "/api/copy", json=copy, headers={SERVER_HEADER: "z"}) as r:
            assert r.status == 400
            assert (await r.json())["error"] == (
                "X-Seadragon-Server: no server is named 'z'; the servers: a, b, c"
            )
        blob = b"layer bytes" * 1000
        digest = "sha256:" + hashlib.sha256(blob).hexdigest()
        async with s.head(fleet.url + f"/api/blobs/{digest}", headers=headers) as r:
            assert r.status == 404
        async with s.post(fleet.url + f"/api/blobs/{digest}", data=blob, headers=headers) as r:
            assert r.status == 201
        assert fleet.fakes["b"].blobs == {digest} and not fleet.fakes["a"].blobs
        sent = [r for r in fleet.fakes["b"].requests if r.path == "/api/copy"]
        assert SERVER_HEADER not in sent[0].headers  # the choice is the proxy's, not Ollama's


async def test_header_names_the_server_for_show_and_tags(fleet: Fleet) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.get(fleet.url + "/api/tags", headers={SERVER_HEADER: "b"}) as r:
            assert [m["name"] for m in (await r.json())["models"]] == [SMALL, CODER]
        body = {"model": BIG}
        async with s.post(fleet.url + "/api/show", json=body, headers={SERVER_HEADER: "b"}) as r:
            assert r.status == 404 and "may serve" in (await r.json())["error"]


async def test_no_healthy_server_and_other_routes(fleet: Fleet) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.post(fleet.url + "/api/generate", json={"model": BIG}) as r:
            assert r.status == 418  # not a metadata route: the caller handles it
        async with s.post(fleet.url + "/api/show", data=b"{") as r:
            assert r.status == 400 and "invalid JSON" in (await r.json())["error"]
        for server in fleet.servers:
            server.healthy = False
        async with s.get(fleet.url + "/api/tags") as r:
            assert r.status == 502 and "none is healthy" in (await r.json())["error"]
        async with s.post(fleet.url + "/api/pull", json={"model": SMALL}) as r:
            assert r.status == 502 and "no healthy Ollama server" in (await r.json())["error"]


async def test_answers_are_bounded_in_size_and_time() -> None:
    stuck = asyncio.Event()

    async def never(request: web.Request) -> web.Response:
        await stuck.wait()
        return web.Response()

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", never)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    big = FakeOllama(models=[f"model-{i}:1b" for i in range(50)])
    await big.start()
    servers = [
        Server("big", big.url),
        Server("stuck", f"http://127.0.0.1:{runner.addresses[0][1]}"),
    ]
    try:
        async for f in mounted(servers, {}, Limits(max_answer=2000, timeout=0.2)):
            async with aiohttp.ClientSession() as s:
                async with s.get(f.url + "/api/tags") as r:
                    error = (await r.json())["error"]
                    assert r.status == 502 and "big: answer over 2000 bytes" in error
                    assert "stuck: no answer in 0.2 s" in error
                body = {"model": "model-1:1b"}
                hdr = {SERVER_HEADER: "stuck"}
                async with s.post(f.url + "/api/show", json=body, headers=hdr) as r:
                    assert r.status == 504 and "stuck: no answer" in (await r.json())["error"]
    finally:
        stuck.set()
        await big.stop()
        await runner.cleanup()


async def test_client_hanging_up_mid_pull_stops_every_server_pull(fleet: Fleet) -> None:
    body = {"model": SMALL, "prompt": "gate-mid:held"}  # each fake streams two lines, then waits
    async with aiohttp.ClientSession() as s, s.post(fleet.url + "/api/pull", json=body) as r:
        first = json.loads(await r.content.readline())
        assert first == {"status": "pulling manifest"}
        await fleet.fakes["a"].wait_until(lambda: fleet.pulls("a") == 1)
        await fleet.fakes["b"].wait_until(lambda: fleet.pulls("b") == 1)
        r.close()  # the client goes away mid-pull
    for name in ("a", "b"):
        fake = fleet.fakes[name]
        [seen] = [x for x in fake.requests if x.path == "/api/pull"]
        await fake.wait_until(lambda seen=seen: seen.cancelled)
