"""``seadragon-proxy serve --workers N``: N processes on one port (SO_REUSEPORT), one replica
each through the Redis backend; the parent passes signals on and reports a worker that dies."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from seadragon_proxy.cli import main
from seadragon_proxy.fake_ollama import FakeOllama
from tests.conftest import BASE_CONFIG, merge
from tests.redisserver import RedisServer
from tests.served import Served, spawn_workers


def write_config(tmp_path: Path, fake: FakeOllama, queue: dict[str, Any]) -> Path:
    config = merge(BASE_CONFIG, {"queue": queue, "server": {"replica": "box"}})
    config["upstream"]["url"] = fake.url
    config["whitelist"] = {"database": str(tmp_path / "seadragon.db")}
    config["log"] = {"format": "json"}
    path = tmp_path / "seadragon.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("workers", ["0", "65", "two"])
def test_a_bad_number_of_workers_is_a_usage_error(
    workers: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["serve", "--workers", workers]) == 2
    err = capsys.readouterr().err
    assert "is not a number of workers (1 to 64)" in err and err.count("\n") == 1


async def test_workers_with_the_memory_backend_is_a_usage_error_saying_why(
    tmp_path: Path, fake: FakeOllama, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(tmp_path, fake, {"backend": "memory"})
    assert main(["serve", "--workers", "2", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "--workers 2 needs queue.backend: redis" in err and "share one queue" in err
    assert err.count("\n") == 1


async def start_workers(tmp_path: Path, fake: FakeOllama, redis_url: str, count: int) -> Served:
    queue = {"backend": "redis", "redis": {"url": redis_url, "lease": 2, "prefix": "w:"}}
    path = write_config(tmp_path, fake, queue)
    served = Served(await spawn_workers(path, count), path)
    await served.wait_for("listening", count=count)
    urls = {line["url"] for line in served.events("listening")}
    assert len(urls) == 1  # one port for all (port 0 in the file: the parent picked it)
    served.url = urls.pop()
    return served


async def test_two_workers_share_the_port_as_two_replicas_and_stop_on_sigterm(
    tmp_path: Path, fake: FakeOllama, redis_server: RedisServer
) -> None:
    served = await start_workers(tmp_path, fake, redis_server.url, 2)
    try:
        names = {line["replica"] for line in served.events("listening")}
        assert names == {"box-1", "box-2"}
        seen: set[str] = set()
        connector = aiohttp.TCPConnector(force_close=True)  # a new connection each time
        async with aiohttp.ClientSession(connector=connector) as session:
            for _ in range(200):  # the kernel spreads new connections over both sockets
                async with session.get(served.url + "/health") as r:
                    doc = await r.json()
                assert r.status == 200, doc
                seen.add(doc["replica"])
                if seen == names:
                    break
            assert seen == names
            async with session.get(served.url + "/api/tags") as r:
                assert r.status == 200
        served.process.send_signal(signal.SIGHUP)  # passed on: each worker reloads
        await served.wait_for("sighup", count=2)
        served.process.send_signal(signal.SIGTERM)
        assert await served.process.wait() == 0
        stopped = await served.wait_for("workers_stopped")
        assert stopped["statuses"] == {"1": 0, "2": 0}
    finally:
        await served.stop()


async def test_a_worker_that_dies_is_reported_and_the_others_are_stopped(
    tmp_path: Path, fake: FakeOllama, redis_server: RedisServer
) -> None:
    served = await start_workers(tmp_path, fake, redis_server.url, 2)
    try:
        pids = (await served.wait_for("workers_started"))["pids"]
        os.kill(pids["2"], signal.SIGKILL)
        exited = await served.wait_for("worker_exited")
        assert (exited["worker"], exited["pid"], exited["status"]) == (2, pids["2"], -9)
        assert await served.process.wait() == 1
        stopped = await served.wait_for("workers_stopped")
        assert stopped["statuses"] == {"1": 0, "2": -9}  # worker 1 stopped gracefully
        assert not Path(f"/proc/{pids['1']}").exists()
    finally:
        await served.stop()


async def test_workers_on_a_port_in_use_fail_before_any_worker_starts(
    tmp_path: Path, fake: FakeOllama, redis_server: RedisServer, capsys: pytest.CaptureFixture[str]
) -> None:
    queue = {"backend": "redis", "redis": {"url": redis_server.url}}
    path = write_config(tmp_path, fake, queue)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        code = await asyncio.to_thread(
            main, ["serve", "--workers", "2", "--config", str(path), "--port", port]
        )
    assert code == 1
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in err


async def exited(pid: int, timeout: float = 30) -> None:
    """Until process ``pid`` (not our child) has exited: its pidfd becomes readable."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    loop = asyncio.get_running_loop()
    gone = asyncio.Event()
    loop.add_reader(fd, gone.set)
    try:
        async with asyncio.timeout(timeout):
            await gone.wait()
    finally:
        loop.remove_reader(fd)
        os.close(fd)


async def test_workers_stop_when_the_parent_is_killed(
    tmp_path: Path, fake: FakeOllama, redis_server: RedisServer
) -> None:
    served = await start_workers(tmp_path, fake, redis_server.url, 2)
    try:
        pids = (await served.wait_for("workers_started"))["pids"]
        served.process.kill()  # SIGKILL: the parent passes nothing on
        assert await served.process.wait() == -9
        for pid in pids.values():  # the kernel's parent-death signal stops each worker
            await exited(pid)
        # (no orphan keeps the port: a new server can take it at once)
        with socket.socket() as again:
            again.bind(("127.0.0.1", int(served.url.rsplit(":", 1)[1])))
    finally:
        await served.stop()
