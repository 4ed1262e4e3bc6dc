"""A source per path prefix: ``OLLAMA_HOST=http://gpu:11435/s/coding``. The prefix is taken
off before anything else looks at the path, so every route works under it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import ollama
import openai
import pytest

from seadragon_proxy.exceptions import ConfigError
from seadragon_proxy.policy import split_path
from seadragon_proxy.settings import parse_settings

from .conftest import BASE_CONFIG, MODEL, Proxy, ProxyFactory, merge

PREFIXED = {
    "sources": [
        {"name": "coding", "priority": 0, "match": {"path_prefix": "/s/coding"}},
        {"name": "chat", "priority": 5, "match": {"path_prefix": ["/s/chat", "/webui"]}},
        {"name": "direct_api", "priority": 10},
    ],
    "default_source": "direct_api",
}


@pytest.fixture
async def proxy(make_proxy: ProxyFactory) -> Proxy:
    return await make_proxy(PREFIXED)


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/s/coding/api/chat", ("/s/coding", "/api/chat")),
        ("/s/coding", ("/s/coding", "/")),
        ("/s/coding/", ("/s/coding", "/")),
        ("/s/codingx/api/chat", (None, "/s/codingx/api/chat")),  # whole segments only
        ("/api/chat", (None, "/api/chat")),
        ("/webui/v1/models", ("/webui", "/v1/models")),
    ],
)
def test_split_path(path: str, expected: tuple[str | None, str]) -> None:
    assert split_path(("/s/chat", "/s/coding", "/webui"), path) == expected


@pytest.mark.parametrize(
    ("prefixes", "problem"),
    [
        ("s/coding", "must start with /"),
        ("/s/coding/", "must not end with /"),
        ("/s//coding", "path segments of letters"),
        ("/s/cod ing", "path segments of letters"),
        ("/api/coding", "under /api, which Ollama or the proxy serves"),
        ("/v1", "under /v1"),
        ("/health", "under /health"),
        (["/s", "/s/x"], "nested"),
        (["/t", "/t"], "the same prefix twice"),
        ([], "empty list"),
    ],
)
def test_bad_prefixes_are_refused_with_the_key(prefixes: Any, problem: str) -> None:
    doc = merge(PREFIXED, {})
    doc["sources"][0]["match"]["path_prefix"] = prefixes
    with pytest.raises(ConfigError) as caught:
        parse_settings(doc, file="t.yaml", base=Path("."), environ={})
    assert caught.value.key == "sources[0].match.path_prefix"
    assert problem in caught.value.problem


def test_prefixes_nested_across_sources_are_refused() -> None:
    """Which of /s and /s/coding a request is under would depend on the order of the rules."""
    doc = merge(PREFIXED, {})
    doc["sources"][1]["match"]["path_prefix"] = "/s"
    with pytest.raises(ConfigError) as caught:
        parse_settings(doc, file="t.yaml", base=Path("."), environ={})
    assert caught.value.key == "sources[1].match.path_prefix"
    assert "'/s' and '/s/coding' (source 'coding') are nested" in caught.value.problem


def test_the_same_prefix_on_two_rules_is_an_ordinary_first_match() -> None:
    doc = merge(BASE_CONFIG, {})
    doc["sources"][0]["match"] = {"path_prefix": "/s/team", "whitelisted": True}
    doc["sources"][1]["match"] = {"path_prefix": "/s/team"}
    policy = parse_settings(doc, file="t.yaml", base=Path("."), environ={}).policy
    assert policy.prefixes == ("/s/team",)


async def test_prefix_picks_the_source_and_is_removed_before_forwarding(proxy: Proxy) -> None:
    body = {"model": MODEL, "prompt": "hi"}
    async with proxy.session.post(proxy.url + "/s/coding/api/generate?x=1", json=body) as r:
        assert r.status == 200
        await r.read()
    async with proxy.session.post(proxy.url + "/webui/api/generate", json=body) as r:
        assert r.status == 200
        await r.read()
    async with proxy.session.post(proxy.url + "/api/generate", json=body) as r:
        assert r.status == 200
        await r.read()
    seen = await proxy.fake.wait_for(3)
    assert [(s.path, s.query) for s in seen] == [
        ("/api/generate", "x=1"),
        ("/api/generate", ""),
        ("/api/generate", ""),
    ]
    records = await proxy.records(3)
    assert [(r.source, r.route) for r in records] == [
        ("coding", "/api/generate"),
        ("chat", "/api/generate"),
        ("direct_api", "/api/generate"),
    ]


async def test_an_unknown_prefix_is_forwarded_as_it_is(proxy: Proxy) -> None:
    async with proxy.session.get(proxy.url + "/s/codingx/api/tags") as r:
        assert r.status == 404  # Ollama's own 404 for a path it does not know
    assert proxy.forwarded[-1].path == "/s/codingx/api/tags"


@pytest.fixture
async def client(proxy: Proxy) -> AsyncIterator[ollama.AsyncClient]:
    c = ollama.AsyncClient(host=proxy.url + "/s/coding")  # what OLLAMA_HOST=…/s/coding does
    yield c
    await c._client.aclose()


async def test_every_ollama_route_works_under_the_prefix(
    client: ollama.AsyncClient, proxy: Proxy
) -> None:
    assert MODEL in [m.model for m in (await client.list()).models]
    assert (await client.show(MODEL)).details is not None
    assert (await client.ps()).models
    parts = [
        p async for p in await client.chat(MODEL, [{"role": "user", "content": "x"}], stream=True)
    ]
    assert parts[-1].done
    assert len((await client.embed(MODEL, input=["a"])).embeddings) == 1
    assert (await client.pull("llama3.2:1b")).status == "success"
    assert all(not s.path.startswith("/s/") for s in proxy.forwarded)
    sources = {r.source for r in proxy.finished}
    assert sources == {"coding"}


async def test_openai_clients_work_under_the_prefix(proxy: Proxy) -> None:
    oai = openai.AsyncOpenAI(base_url=proxy.url + "/s/chat/v1", api_key="x", max_retries=0)
    try:
        stream = await oai.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True
        )
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        assert text == "The sky is blue because"
        assert MODEL in [m.id async for m in oai.models.list()]
        with pytest.raises(openai.NotFoundError) as caught:  # OpenAI's error shape there too
            await oai.chat.completions.create(
                model="no-such-model", messages=[{"role": "user", "content": "x"}]
            )
        assert "not found" in str(caught.value)
    finally:
        await oai.close()
    assert {r.source for r in await proxy.records(3)} == {"chat"}


async def test_health_answers_under_the_prefix_and_admin_does_not(proxy: Proxy) -> None:
    """A client's set-up check may ask /health where it sends everything else; the operator
    routes exist at the root only, behind the Host check and the token."""
    async with proxy.session.get(proxy.url + "/s/coding/health") as r:
        assert r.status == 200
        assert (await r.json())["ollama"]["reachable"] is True
    for path in ("/api/admin/queue", "/metrics", "/admin"):
        async with proxy.session.get(proxy.url + "/s/coding" + path) as r:
            assert r.status == 404
            assert (await r.json())["error"] == (
                f"{path} is served at the root only, not under the source prefix /s/coding"
            )
    assert not [s for s in proxy.forwarded if "admin" in s.path or "metrics" in s.path]


async def test_model_management_under_the_prefix_still_checks_host(proxy: Proxy) -> None:
    async with proxy.session.post(
        proxy.url + "/s/coding/api/pull",
        json={"model": "llama3.2:1b"},
        headers={"Host": "evil.example.net:11435"},
    ) as r:
        assert r.status == 403
    assert not [s for s in proxy.forwarded if s.path == "/api/pull"]


async def test_a_prefix_added_by_a_reload_applies_at_once(proxy: Proxy) -> None:
    coding = {"name": "coding", "priority": 0, "match": {"path_prefix": "/new"}}
    sources = [coding, *PREFIXED["sources"][1:]]
    assert await proxy.next_reload("config", lambda: proxy.write_config({"sources": sources}))
    status, _ = await proxy.collect("/new/api/generate", {"model": MODEL, "prompt": "x"}, {})
    assert status == 200
    assert (await proxy.records(1))[0].source == "coding"
    assert proxy.fake.inference[-1].path == "/api/generate"


def test_path_globs_see_the_path_without_the_prefix() -> None:
    """``match.path`` is about the route Ollama sees, so one rule can take only the OpenAI
    routes under a prefix; the prefix is cut even when that rule does not match."""
    doc = {
        "sources": [
            {"name": "team_v1", "priority": 1, "match": {"path_prefix": "/t", "path": "/v1/*"}},
            {"name": "native", "priority": 2, "match": {"path": "/api/*"}},
            {"name": "other", "priority": 9},
        ],
        "default_source": "other",
    }
    policy = parse_settings(doc, file="t.yaml", base=Path("."), environ={}).policy
    from multidict import CIMultiDict

    from seadragon_proxy.policy import RequestFacts

    def source(path: str) -> str:
        prefix, rest = policy.split_path(path)
        return policy.classify(
            RequestFacts(None, rest, CIMultiDict(), None, False, prefix)
        ).source.name

    assert source("/t/v1/chat/completions") == "team_v1"
    assert source("/t/api/chat") == "native"  # cut, then classified by the later rules
    assert source("/v1/chat/completions") == "other"
