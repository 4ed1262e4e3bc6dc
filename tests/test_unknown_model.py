"""Issue 11: with the Part 1 single ``upstream:`` the proxy knows Ollama's models (its
/api/tags) and answers a request for a missing one at once, never after a turn in the queue;
any name Ollama itself would accept goes through."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from seadragon_proxy import upstream
from seadragon_proxy.fake_ollama import FakeOllama
from seadragon_proxy.scheduling.names import model_key

from .conftest import MODEL, Proxy, ProxyFactory

MISSING = "qwen2:0.5b"


async def generate(proxy: Proxy, model: str, prompt: str = "hi") -> Any:
    """A generate, failing within 10 s rather than waiting for ever (a queued refusal)."""
    body = {"model": model, "prompt": prompt, "stream": False}
    async with asyncio.timeout(10):
        return await proxy.collect("/api/generate", body, {})


async def busy(proxy: Proxy) -> asyncio.Task[Any]:
    """The only slot taken by a request held in the fake until ``gate:busy`` is set."""
    await proxy.tags_read()
    task = asyncio.create_task(generate(proxy, MODEL, "gate:busy"))
    await proxy.watch.until(lambda: proxy.scheduler.in_flight == 1)
    return task


async def test_a_missing_model_is_answered_at_once_while_the_slot_is_busy(proxy: Proxy) -> None:
    held = await busy(proxy)
    status, doc = await generate(proxy, MISSING)  # it does not wait behind the busy slot
    assert (status, doc) == (404, {"error": f"model '{MISSING}' not found"})  # Ollama's words
    assert proxy.scheduler.in_flight == 1 and proxy.scheduler.queue_length == 0
    status, doc = await proxy.collect("/v1/chat/completions", {"model": MISSING}, {})
    assert (status, doc["error"]) == (  # Ollama's OpenAI shape there
        404,
        {
            "message": f"model '{MISSING}' not found",
            "type": "not_found_error",
            "param": None,
            "code": None,
        },
    )
    proxy.fake.gate("busy").set()
    assert (await held)[0] == 200
    records = await proxy.records(3)
    assert [r.refusal for r in records if r.model == MISSING] == ["unknown_model"] * 2
    assert [s.json["model"] for s in proxy.fake.inference] == [MODEL]  # never sent on


async def test_a_model_pulled_through_the_proxy_is_accepted_right_after(proxy: Proxy) -> None:
    await proxy.tags_read()
    assert (await generate(proxy, MISSING))[0] == 404  # a read just now: the next is throttled
    async with proxy.session.post(proxy.url + "/api/pull", json={"model": MISSING}) as r:
        assert r.status == 200
        lines = (await r.text()).splitlines()
    assert lines[-1] == '{"status":"success"}'
    status, doc = await generate(proxy, MISSING)
    assert status == 200 and doc["model"] == MISSING
    assert [s.json["model"] for s in proxy.fake.inference] == [MISSING]


async def test_copy_and_delete_through_the_proxy_change_what_is_known(proxy: Proxy) -> None:
    await proxy.tags_read()
    copy = {"source": MODEL, "destination": "mine:v1"}
    async with proxy.session.post(proxy.url + "/api/copy", json=copy) as r:
        assert r.status == 200
    assert (await generate(proxy, "mine:v1"))[0] == 200
    reads = proxy.fleet.refreshes
    async with proxy.session.delete(proxy.url + "/api/delete", json={"model": "mine:v1"}) as r:
        assert r.status == 200
    await proxy.tags_read(reads + 1)  # a deletion is read at once, not on demand
    assert (await generate(proxy, "mine:v1")) == (404, {"error": "model 'mine:v1' not found"})
    assert [s.json["model"] for s in proxy.fake.inference] == ["mine:v1"]  # the 404 came here
    assert (await proxy.records(4))[-1].refusal == "unknown_model"


async def test_a_failed_pull_changes_nothing_and_reads_nothing(proxy: Proxy) -> None:
    await proxy.tags_read()
    reads = proxy.fleet.refreshes
    async with proxy.session.post(proxy.url + "/api/pull", json={"stream": False}) as r:
        assert r.status == 400  # the fake's (Ollama's) own refusal
    assert (await generate(proxy, MISSING))[0] == 404
    assert (await generate(proxy, MISSING))[0] == 404  # within the throttle: no second read
    assert proxy.fleet.refreshes == reads + 1


@pytest.mark.parametrize(
    "name",
    [
        "LLAMA3:70B",  # Ollama ignores case
        "library/llama3:70b",
        "registry.ollama.ai/library/llama3:70b",
        "https://registry.ollama.ai/library/llama3:70b",
        "nomic-embed-text",  # :latest
        "llama3:70b+Q4_0",  # a build: not read here, Ollama decides
        "llama3@sha256-" + "a" * 64,  # a digest: likewise
        "localhost:5000/team/model:1",  # a name Ollama would not parse: not refused here
        "gpt-oss:20b-cloud",  # cloud models need no pull (ollama/ollama#14574)
        "kimi-k2.5:cloud",
    ],
)
async def test_a_name_ollama_may_accept_is_never_refused(proxy: Proxy, name: str) -> None:
    held = await busy(proxy)
    answer = asyncio.create_task(generate(proxy, name))
    await proxy.watch.queued(1)  # it waits its turn, like any known model
    proxy.fake.gate("busy").set()
    await asyncio.gather(held, answer)
    assert [s.json["model"] for s in proxy.fake.inference[1:]] == [name]  # Ollama answered
    assert (await proxy.records(2))[-1].refusal is None


async def test_unreadable_tags_let_every_request_through(
    fake: FakeOllama, make_proxy: ProxyFactory
) -> None:
    fake.tags_status = 500
    proxy = await make_proxy()
    await proxy.tags_read()
    assert proxy.scheduler.servers[0].known is None
    status, doc = await generate(proxy, MISSING)
    assert (status, doc) == (404, {"error": f"model '{MISSING}' not found"})  # Ollama's own
    assert [s.json["model"] for s in proxy.fake.inference] == [MISSING]
    assert (await proxy.records(1))[-1].refusal is None


async def test_a_list_that_could_not_be_read_is_read_again_until_it_is(
    fake: FakeOllama, make_proxy: ProxyFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ollama unreadable at start (down, or failing): its list is read again on the
    residency interval (shortened here) until it is in."""
    monkeypatch.setattr(upstream, "RESIDENCY_INTERVAL", 0.05)
    fake.tags_status = 500
    proxy = await make_proxy()
    await proxy.tags_read(2)  # read, failed, read again
    assert proxy.scheduler.servers[0].known is None
    fake.tags_status = 200
    async with asyncio.timeout(10):
        while proxy.scheduler.servers[0].known is None:
            await proxy.fleet.next_refresh()
    assert (await generate(proxy, MISSING))[0] == 404
    assert (await proxy.records(1))[-1].refusal == "unknown_model"


async def test_a_waiter_whose_model_is_deleted_meanwhile_gets_ollamas_answer(
    proxy: Proxy,
) -> None:
    """The list decides at arrival only: a queued request never waits for nothing."""
    held = await busy(proxy)
    waiting = asyncio.create_task(generate(proxy, "llama3.2:1b"))
    await proxy.watch.queued(1)
    reads = proxy.fleet.refreshes
    async with proxy.session.delete(proxy.url + "/api/delete", json={"model": "llama3.2:1b"}) as r:
        assert r.status == 200
    await proxy.tags_read(reads + 1)
    assert (await generate(proxy, "llama3.2:1b"))[0] == 404  # a newcomer: at once
    proxy.fake.gate("busy").set()
    await held
    assert await waiting == (404, {"error": "model 'llama3.2:1b' not found"})  # from the fake
    assert [s.json["model"] for s in proxy.fake.inference] == [MODEL, "llama3.2:1b"]


async def test_unknown_names_are_read_for_at_most_once_a_second(proxy: Proxy) -> None:
    await proxy.tags_read()
    reads = proxy.fleet.refreshes
    answers = await asyncio.gather(*(generate(proxy, f"made-up-{i}") for i in range(20)))
    assert all(status == 404 for status, _ in answers)
    assert proxy.fleet.refreshes - reads <= 2  # one shared read (one more if a second passed)
    assert [r.path for r in proxy.fake.requests].count("/api/ps") == 0


def test_model_keys_match_as_ollama_does() -> None:
    same = [
        "llama3",
        "llama3:latest",
        "LLaMA3",
        "library/llama3",
        "registry.ollama.ai/library/llama3:latest",
        "http://registry.ollama.ai/library/llama3",
    ]
    assert {model_key(n) for n in same} == {"registry.ollama.ai/library/llama3:latest"}
    assert model_key("hf.co/bartowski/Qwen:Q4_K_M") == "hf.co/bartowski/qwen:q4_k_m"
    assert model_key("user/m:tag") == "registry.ollama.ai/user/m:tag"
    assert model_key("llama3:8b") != model_key("llama3")
    in_doubt = [
        "",
        "a+Q4_0",
        "a@sha256-00",
        "a/b/c/d",
        "a..b",
        "x:y:z",
        "h:1/n/m",
        "/m",
        "a:",
        "é",
        "n.s/m",
        "m" * 129,
    ]
    assert [model_key(n) for n in in_doubt] == [None] * len(in_doubt)


async def test_while_a_model_change_is_under_way_unlisted_models_go_through(
    proxy: Proxy,
) -> None:
    """A pull in progress (begun as ``_serve`` begins one): the list is in doubt, so a
    request for a model it does not list is sent on; once Ollama accepted the change the
    list is read again, unthrottled, and the 404 comes at once."""
    await proxy.tags_read()
    assert (await generate(proxy, MISSING))[0] == 404  # refused here: a read just now
    proxy.fleet.begin_change()
    assert await generate(proxy, MISSING) == (404, {"error": f"model '{MISSING}' not found"})
    assert [s.json["model"] for s in proxy.fake.inference] == [MISSING]  # Ollama answered
    reads = proxy.fleet.refreshes
    proxy.fleet.end_change(changed=True)
    assert (await generate(proxy, MISSING))[0] == 404
    assert len(proxy.fake.inference) == 1 and proxy.fleet.refreshes > reads  # read again
    records = await proxy.records(3)
    assert [r.refusal for r in records] == ["unknown_model", None, "unknown_model"]
