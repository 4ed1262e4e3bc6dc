"""``seadragon-proxy serve`` as a real process: signals, graceful shutdown, exit status."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from seadragon_proxy.fake_ollama import FakeOllama

from .conftest import BASE_CONFIG, MODEL, merge
from .served import Served, spawn_serve, start_served


@pytest.fixture
async def serve(fake: FakeOllama, tmp_path: Path) -> AsyncIterator[Any]:
    processes: list[Served] = []

    async def start(override: dict[str, Any] | None = None) -> Served:
        served = await start_served(tmp_path, fake, override)
        processes.append(served)
        return served

    yield start
    for served in processes:
        if served.process.returncode is None:
            served.process.kill()
        await served.stop()


async def test_sigterm_refuses_the_queue_finishes_the_stream_and_exits_0(
    serve: Any, fake: FakeOllama
) -> None:
    served: Served = await serve({"log": {"level": "debug"}})
    gate = fake.gate("finish")
    async with aiohttp.ClientSession() as session:
        running = await session.post(
            served.url + "/api/generate", json={"model": MODEL, "prompt": "gate-mid:finish"}
        )
        assert json.loads(await running.content.readline())["response"] == "The"
        queued = asyncio.create_task(
            session.post(served.url + "/api/generate", json={"model": MODEL, "prompt": "queued"})
        )
        await served.wait_for("request_queued")
        served.process.send_signal(signal.SIGTERM)
        shutting = await served.wait_for("shutting_down")
        refused = await queued
        assert refused.status == 503
        assert "shutting down" in (await refused.json())["error"]
        assert shutting["in_flight"] == 1
        gate.set()  # the in-flight stream may finish within the grace period
        rest = [json.loads(line) for line in (await running.read()).splitlines()]
        assert rest[-1]["done"] is True
    assert await served.process.wait() == 0
    assert [s.prompt for s in fake.inference] == ["gate-mid:finish"]


async def test_a_second_sigterm_while_stopping_changes_nothing(
    serve: Any, fake: FakeOllama
) -> None:
    """systemd signals every process of the unit and ``serve --workers`` passes the signal
    on too: a worker gets two. The stream still finishes; the exit is still 0."""
    served: Served = await serve()
    gate = fake.gate("twice")
    async with aiohttp.ClientSession() as session:
        running = await session.post(
            served.url + "/api/generate", json={"model": MODEL, "prompt": "gate-mid:twice"}
        )
        await running.content.readline()
        served.process.send_signal(signal.SIGTERM)
        await served.wait_for("shutting_down")
        served.process.send_signal(signal.SIGTERM)
        served.process.send_signal(signal.SIGINT)
        gate.set()
        rest = [json.loads(line) for line in (await running.read()).splitlines()]
        assert rest[-1]["done"] is True
    assert await served.process.wait() == 0
    assert served.events("stopped")


async def test_stream_cut_at_the_end_of_the_grace_period_gets_an_error_line(
    serve: Any, fake: FakeOllama
) -> None:
    served: Served = await serve({"server": {"shutdown_grace": 0.3}})
    async with aiohttp.ClientSession() as session:
        running = await session.post(
            served.url + "/api/generate", json={"model": MODEL, "prompt": "gate-mid:never"}
        )
        await running.content.readline()
        served.process.send_signal(signal.SIGTERM)
        lines = [json.loads(line) for line in (await running.read()).splitlines()]
    assert lines[-1] == {"error": "seadragon-proxy is shutting down"}
    assert await served.process.wait() == 0
    await fake.wait_until(lambda: fake.inference[0].cancelled)  # Ollama was told to stop


async def test_sighup_reloads_the_config(serve: Any) -> None:
    served: Served = await serve()
    served.config.write_text(served.config.read_text().replace("name: coding", "name: hupped"))
    served.process.send_signal(signal.SIGHUP)
    await served.wait_for("sighup")
    reloaded = await served.wait_for("config_reloaded")
    assert reloaded["sources"] == {"hupped": 0, "chat": 5, "scripts": 8, "direct_api": 10}
    served.process.send_signal(signal.SIGINT)
    assert await served.process.wait() == 0


async def test_unusable_database_stops_the_start_with_a_sentence(
    tmp_path: Path, fake: FakeOllama
) -> None:
    config = merge(BASE_CONFIG, {"upstream": {"url": fake.url}})
    db = tmp_path / "seadragon.db"
    db.write_bytes(b"not a database" * 100)
    config["whitelist"] = {"database": str(db)}
    path = tmp_path / "seadragon.yaml"
    path.write_text(yaml.safe_dump(config))
    process = await spawn_serve(path)
    _, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 1
    assert "move it aside" in err.decode()
