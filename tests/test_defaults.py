"""Default request options per source or model, merged only where the client left them unset."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from seadragon_proxy.defaults import RequestDefaults, apply_defaults
from seadragon_proxy.exceptions import ConfigError
from seadragon_proxy.settings import parse_settings

from .conftest import MODEL, Proxy, ProxyFactory

MINIMAL: dict[str, Any] = {"sources": [{"name": "chat", "priority": 5}], "default_source": "chat"}


def rules(*entries: dict[str, Any]) -> tuple[RequestDefaults, ...]:
    return parse_settings({**MINIMAL, "defaults": list(entries)}, file="t", base=Path(".")).defaults


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        (
            {"model": "m"},
            {"model": "m", "options": {"num_ctx": 8192, "stop": ["x"]}, "keep_alive": "30m"},
        ),
        (
            {"model": "m", "options": {"num_ctx": 2048}},
            {"model": "m", "options": {"num_ctx": 2048, "stop": ["x"]}, "keep_alive": "30m"},
        ),
        (
            {"model": "m", "keep_alive": 0},
            {"model": "m", "keep_alive": 0, "options": {"num_ctx": 8192, "stop": ["x"]}},
        ),
        (
            {"model": "m", "options": {"num_ctx": 1, "stop": []}, "keep_alive": "5m"},
            None,
        ),  # all set
        ({"model": "m", "options": "not a mapping"}, None),  # left for Ollama to refuse
    ],
)
def test_client_values_win(doc: dict[str, Any], expected: dict[str, Any] | None) -> None:
    applied = apply_defaults(
        doc, rules({"options": {"num_ctx": 8192, "stop": ["x"]}, "keep_alive": "30m"}), "chat", "m"
    )
    assert applied == expected


def test_earlier_entries_win_and_matching_is_by_source_and_model() -> None:
    entries = rules(
        {"match": {"model": "llama3:70b*"}, "options": {"num_ctx": 8192}},
        {"match": {"source": ["chat", "script*"]}, "options": {"num_ctx": 2048, "num_thread": 16}},
        {"match": {"source": "coding", "model": "*embed*"}, "keep_alive": -1},
    )
    assert apply_defaults({}, entries, "chat", "llama3:70b") == {
        "options": {"num_ctx": 8192, "num_thread": 16}
    }
    assert apply_defaults({}, entries, "scripts", "qwen") == {
        "options": {"num_ctx": 2048, "num_thread": 16}
    }
    assert apply_defaults({}, entries, "coding", "nomic-embed-text") == {"keep_alive": -1}
    assert apply_defaults({}, entries, "coding", None) is None


@pytest.mark.parametrize(
    ("entry", "key"),
    [
        ({"options": {"num_ctx": {"nested": 1}}}, "defaults[0].options.num_ctx"),
        ({"match": {"source": "chat"}}, "defaults[0]"),  # sets nothing
        ({"keep_alive": True, "options": {"a": 1}}, "defaults[0].keep_alive"),
        ({"options": {"a": 1}, "extra": 1}, "defaults[0].extra"),
        ({"match": {"sauce": "x"}, "options": {"a": 1}}, "defaults[0].match.sauce"),
    ],
)
def test_bad_entries_name_their_key(entry: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        rules(entry)
    assert caught.value.key == key


async def test_defaults_reach_ollama_for_matching_requests_only(make_proxy: ProxyFactory) -> None:
    proxy: Proxy = await make_proxy(
        {
            "defaults": [
                {
                    "match": {"source": "chat"},
                    "options": {"num_ctx": 8192, "num_gpu": 99},
                    "keep_alive": "30m",
                }
            ]
        }
    )
    assert (await proxy.generate("a", "chat"))[0] == 200
    seen = proxy.fake.inference[-1].json
    assert seen["options"] == {"num_ctx": 8192, "num_gpu": 99} and seen["keep_alive"] == "30m"
    assert seen["prompt"] == "a" and seen["model"] == MODEL

    sent = json.dumps(
        {
            "model": MODEL,
            "prompt": "b",
            "options": {"num_ctx": 2048, "num_gpu": 1},
            "keep_alive": "5m",
        }
    ).encode()
    async with proxy.session.post(
        proxy.url + "/api/generate", data=sent, headers={"X-Test-Source": "chat"}
    ) as r:
        await r.read()
    assert proxy.fake.inference[-1].body == sent  # nothing to add: the very same bytes

    other = json.dumps({"model": MODEL, "prompt": "c"}).encode()
    async with proxy.session.post(
        proxy.url + "/api/chat", data=other, headers={"X-Test-Source": "coding"}
    ) as r:
        await r.read()
    assert proxy.fake.inference[-1].body == other  # another source: untouched

    openai = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "d"}]}).encode()
    async with proxy.session.post(
        proxy.url + "/v1/chat/completions", data=openai, headers={"X-Test-Source": "chat"}
    ) as r:
        await r.read()
    assert proxy.fake.inference[-1].body == openai  # OpenAI routes carry no Ollama options


async def test_defaults_reload_live(proxy: Proxy) -> None:
    assert await proxy.next_reload(
        "config", lambda: proxy.write_config({"defaults": [{"options": {"num_ctx": 4096}}]})
    )
    assert (await proxy.generate("x"))[0] == 200
    assert proxy.fake.inference[-1].json["options"] == {"num_ctx": 4096}
