"""The Redis the tests use is the real server, and the settings that point at it."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import pytest
import redis.asyncio as redis

from seadragon_proxy.exceptions import ConfigError
from seadragon_proxy.settings import parse_settings
from tests.redisserver import RedisServer

RULES = {"sources": [{"name": "all", "priority": 0}], "default_source": "all"}


async def test_a_real_redis_server_answers_and_can_be_stopped_and_started(
    redis_server: RedisServer,
) -> None:
    client = redis.Redis.from_url(redis_server.url)
    try:
        assert await client.ping()
        info = await client.info("server")
        assert int(str(info["redis_version"]).split(".")[0]) >= 6
        await redis_server.stop(signal.SIGKILL)
        with pytest.raises(redis.ConnectionError):
            await client.ping()
        await redis_server.start()  # the same port again
        assert await client.ping()
    finally:
        await client.aclose()


def test_backend_settings_default_to_memory_and_validate(tmp_path: Path) -> None:
    settings = parse_settings(RULES, file="t.yaml", base=tmp_path, environ={})
    assert settings.queue.backend == "memory"
    assert settings.server.replica
    doc = {
        **RULES,
        "queue": {"backend": "redis", "redis": {"url": "redis://:hunter2@10.0.0.9:6380/1",
                                                "lease": 5, "prefix": "team:"}},
        "server": {"replica": "proxy-2"},
    }  # fmt: skip
    settings = parse_settings(doc, file="t.yaml", base=tmp_path, environ={})
    assert (settings.queue.backend, settings.queue.redis.lease) == ("redis", 5.0)
    assert settings.server.replica == "proxy-2"
    assert "hunter2" not in repr(settings.queue.redis)


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"queue": {"backend": "etcd"}}, r"queue\.backend: must be one of memory, redis"),
        ({"queue": {"redis": {"url": "http://x"}}}, r"queue\.redis\.url: must be a redis://"),
        ({"queue": {"redis": {"url": "redis://:pw@h/0", "x": 1}}}, r"queue\.redis\.x: unknown"),
        ({"queue": {"redis": {"lease": 0.5}}}, r"queue\.redis\.lease: must be at least 1"),
        ({"queue": {"redis": {"prefix": "a b"}}}, r"queue\.redis\.prefix: must be"),
        ({"server": {"replica": "-x"}}, r"server\.replica: must be"),
    ],
)
def test_bad_backend_settings_name_the_key(
    tmp_path: Path, doc: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        parse_settings({**RULES, **doc}, file="t.yaml", base=tmp_path, environ={})
    assert "pw@" not in str(caught.value)


async def test_the_link_pushes_messages_goes_down_with_redis_and_comes_back(
    redis_server: RedisServer,
) -> None:
    from seadragon_proxy.replicafile import RedisSettings
    from seadragon_proxy.replicas.link import RedisLink

    link = RedisLink(RedisSettings(url=redis_server.url, prefix="t:"), "proxy-1")
    got: asyncio.Queue[bytes] = asyncio.Queue()
    states: asyncio.Queue[bool] = asyncio.Queue()
    link.subscribe(link.key("events"), got.put_nowait)
    link.add_state_listener(states.put_nowait)
    await link.start()
    try:
        assert await states.get() is True and link.up and link.reason is None
        await link.client.publish("t:events", b"hello")
        assert await got.get() == b"hello"
        await redis_server.stop(signal.SIGKILL)
        assert await states.get() is False
        assert link.reason is not None and f":{redis_server.port}" in link.reason
        await redis_server.start()
        assert await states.get() is True  # resubscribed: messages flow again
        await link.client.publish("t:events", b"again")
        assert await got.get() == b"again"
    finally:
        await link.close()
