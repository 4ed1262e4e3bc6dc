"""Pinned runner options (``force:`` on a ``defaults`` entry): they replace what the client
sent, so clients that disagree about ``num_ctx`` stop making Ollama reload the model."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from seadragon_proxy.cli import main
from seadragon_proxy.defaults import RequestDefaults, merge
from seadragon_proxy.exceptions import ConfigError
from seadragon_proxy.settings import parse_settings

from .conftest import MODEL, ProxyFactory

MINIMAL: dict[str, Any] = {"sources": [{"name": "chat", "priority": 5}], "default_source": "chat"}
PIN = {
    "match": {"model": "llama3:70b*"},
    "force": {"options": {"num_ctx": 8192, "num_thread": 16}, "keep_alive": "30m"},
}


def rules(*entries: dict[str, Any]) -> tuple[RequestDefaults, ...]:
    return parse_settings({**MINIMAL, "defaults": list(entries)}, file="t", base=Path(".")).defaults


@pytest.mark.parametrize(
    ("doc", "sent", "pinned"),
    [
        (
            {"model": MODEL, "options": {"num_ctx": 32768, "temperature": 0.2}},
            {"num_ctx": 8192, "num_thread": 16, "temperature": 0.2},
            "num_ctx 32768->8192, num_thread unset->16, keep_alive unset->30m",
        ),
        (
            {"model": MODEL, "options": {"num_ctx": 8192, "num_thread": 16}, "keep_alive": "5m"},
            {"num_ctx": 8192, "num_thread": 16},
            "keep_alive 5m->30m",
        ),
        (
            {"model": MODEL, "options": {"num_ctx": 8192.0, "num_thread": True}},
            {"num_ctx": 8192, "num_thread": 16},
            "num_ctx 8192.0->8192, num_thread true->16, keep_alive unset->30m",
        ),
    ],
)
def test_pins_replace_what_the_client_sent(
    doc: dict[str, Any], sent: dict[str, Any], pinned: str
) -> None:
    merged = merge(doc, rules(PIN), "chat", MODEL)
    assert merged.doc is not None
    assert merged.doc["options"] == sent and merged.doc["keep_alive"] == "30m"
    assert merged.describe() == pinned


def test_a_request_that_already_has_the_pinned_values_is_forwarded_as_sent() -> None:
    doc = {"model": MODEL, "options": {"num_ctx": 8192, "num_thread": 16}, "keep_alive": "30m"}
    assert merge(doc, rules(PIN), "chat", MODEL).doc is None
    assert merge({"model": "qwen"}, rules(PIN), "chat", "qwen").doc is None  # no match


def test_ollama_stop_still_unloads() -> None:
    """``ollama stop M`` (no prompt, keep_alive 0) is an order, not a preference: kept."""
    stop = merge({"model": MODEL, "keep_alive": 0}, rules(PIN), "chat", MODEL)
    assert stop.doc is not None and stop.doc["keep_alive"] == 0
    work = merge({"model": MODEL, "prompt": "hi", "keep_alive": 0}, rules(PIN), "chat", MODEL)
    assert work.doc is not None and work.doc["keep_alive"] == "30m"


def test_pins_beat_defaults_and_earlier_pins_win() -> None:
    entries = rules(
        {"options": {"num_ctx": 2048, "num_gpu": 99}},
        {"match": {"source": "chat"}, "force": {"options": {"num_ctx": 4096}}},
        {"force": {"options": {"num_ctx": 1024}}},
    )
    merged = merge({"model": MODEL, "options": {"num_ctx": 32768}}, entries, "chat", MODEL)
    assert merged.doc == {"model": MODEL, "options": {"num_ctx": 4096, "num_gpu": 99}}
    assert merged.describe() == "num_ctx 32768->4096"


@pytest.mark.parametrize(
    ("force", "key", "message"),
    [
        ({"options": {"temperature": 0.1}}, "defaults[0].force.options.temperature", "cannot be"),
        ({"options": {"num_ctx": "8k"}}, "defaults[0].force.options.num_ctx", "whole number"),
        ({"options": {"num_ctx": 0}}, "defaults[0].force.options.num_ctx", "at least 1"),
        ({"options": {"num_ctx": None}}, "defaults[0].force.options.num_ctx", "whole number"),
        ({"options": {"num_gpu": -2}}, "defaults[0].force.options.num_gpu", "at least -1"),
        ({"keep_alive": True}, "defaults[0].force.keep_alive", "duration"),
        ({"stop": ["x"]}, "defaults[0].force.stop", "unknown key"),
        ({}, "defaults[0].force", "pins nothing"),
        ("8192", "defaults[0].force", "must be a mapping"),
    ],
)
def test_bad_pins_name_the_file_and_key(force: object, key: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        rules({"match": {"model": MODEL}, "force": force})
    assert caught.value.file == "t" and caught.value.key == key
    assert message in caught.value.problem


def test_explain_shows_pins_and_defaults(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    config = tmp_path / "seadragon.yaml"
    doc = {**MINIMAL, "defaults": [PIN, {"options": {"num_gpu": 99}}]}
    config.write_text(json.dumps(doc))
    assert main(["explain", "--config", str(config), "--model", MODEL]) == 0
    out = capsys.readouterr().out
    assert (
        "options:   num_ctx 8192 (pinned: replaces the client's), num_thread 16 (pinned: "
        "replaces the client's), keep_alive 30m (pinned: replaces the client's), "
        "num_gpu 99 (if unset)"
    ) in out
    assert main(["explain", "--config", str(config), "--model", "qwen"]) == 0
    assert "options:   num_gpu 99 (if unset)" in capsys.readouterr().out
    assert main(["explain", "--config", str(config), "--path", "/v1/chat/completions"]) == 0
    assert "options:   forwarded as sent (only /api/generate" in capsys.readouterr().out


async def test_two_clients_with_different_num_ctx_reach_ollama_with_the_pinned_one(
    make_proxy: ProxyFactory,
) -> None:
    """The reload-thrash case of ollama/ollama#8903: 4096 and 32768 alternating; Ollama
    sees 8192 from both, and each request's log line says what was replaced."""
    proxy = await make_proxy({"defaults": [PIN]})
    for num_ctx in (4096, 32768, 4096, 32768):
        body = {"model": MODEL, "prompt": "x", "options": {"num_ctx": num_ctx}}
        status, lines = await proxy.collect("/api/chat" if num_ctx == 4096 else "/api/generate",
                                            body, {"X-Test-Source": "chat"})  # fmt: skip
        assert status == 200 and lines[-1]["done"] is True
    seen = [r.json for r in proxy.fake.inference]
    assert [s["options"] for s in seen] == [{"num_ctx": 8192, "num_thread": 16}] * 4
    assert {s["keep_alive"] for s in seen} == {"30m"}
    records = await proxy.records(4)
    assert [r.fields()["pinned"] for r in records] == [
        "num_ctx 4096->8192, num_thread unset->16, keep_alive unset->30m",
        "num_ctx 32768->8192, num_thread unset->16, keep_alive unset->30m",
    ] * 2
    other = await asyncio.gather(proxy.generate("y", "chat", model="llama3.2:1b"))
    assert other[0][0] == 200
    assert "options" not in proxy.fake.inference[-1].json  # another model: untouched


def test_the_cookbook_pinning_recipe_passes_check(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """docs/cookbook.md's recipe, added to the shipped config, loads and explains as printed."""
    root = Path(__file__).resolve().parent.parent
    page = (root / "docs" / "cookbook.md").read_text()
    section = page.split("## Pinning runner options", 1)[1]
    recipe = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    expected = section.split("```text\n", 1)[1].split("```", 1)[0].strip()
    shipped = (root / "config" / "seadragon.yaml").read_text()
    config = tmp_path / "seadragon.yaml"
    config.write_text(shipped + "\n" + recipe)
    assert main(["check", "--config", str(config)]) == 0
    assert main(["explain", "--config", str(config), "--model", MODEL]) == 0
    assert expected in capsys.readouterr().out
