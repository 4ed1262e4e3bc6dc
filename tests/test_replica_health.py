"""/health and /metrics of a replica with the Redis backend: its name, Redis's state, and a
"degraded" 503 while Redis is away (inference is refused then; metadata still answers)."""

from __future__ import annotations

import aiohttp

from tests.conftest import ProxyFactory
from tests.redisserver import RedisServer
from tests.replicas import Replicas, admin


async def test_health_names_the_replica_and_says_why_redis_is_away(
    replicas: Replicas, redis_server: RedisServer
) -> None:
    (a,) = await replicas(1)
    async with aiohttp.ClientSession() as session:
        async with session.get(a.url + "/health") as r:
            doc = await r.json()
        assert r.status == 200
        assert doc["status"] == "healthy" and doc["replica"] == "proxy-1"
        assert doc["redis"] == {"up": True, "reason": None, "whitelist": "shared"}

        await redis_server.stop()
        await a.redis_up(False)
        async with session.get(a.url + "/health") as r:
            doc = await r.json()
        assert r.status == 503 and doc["status"] == "degraded"
        assert doc["ollama"]["reachable"] is True
        assert doc["redis"]["up"] is False
        assert f"Redis at redis://127.0.0.1:{redis_server.port}/0" in doc["redis"]["reason"]
        async with session.get(a.url + "/api/tags") as r:  # metadata still answers
            assert r.status == 200
        await admin(session, a, "POST", "10.0.0.0/8")  # in force here, not shared yet
        async with session.get(a.url + "/health") as r:
            assert (await r.json())["redis"]["whitelist"] == "pending"

        await redis_server.start()
        await a.redis_up(True)  # woken after the link's earlier listener, the reconcile
        async with session.get(a.url + "/health") as r:
            doc = await r.json()
        assert r.status == 200 and doc["status"] == "healthy"
        assert doc["redis"]["whitelist"] == "shared"  # the reconcile on link-up sent it


async def test_metrics_carry_the_replica_and_redis_state(
    replicas: Replicas, redis_server: RedisServer
) -> None:
    (a,) = await replicas(1)
    async with aiohttp.ClientSession() as session:
        async with session.get(a.url + "/metrics") as r:
            text = await r.text()
        assert 'seadragon_replica_info{backend="redis",replica="proxy-1"} 1.0' in text
        assert "seadragon_redis_up 1.0" in text
        await redis_server.stop()
        await a.redis_up(False)
        async with session.get(a.url + "/metrics") as r:
            assert "seadragon_redis_up 0.0" in await r.text()


async def test_memory_backend_health_and_metrics_need_no_redis(
    make_proxy: ProxyFactory,
) -> None:
    proxy = await make_proxy({"server": {"replica": "solo"}})
    async with proxy.session.get(proxy.url + "/health") as r:
        doc = await r.json()
    assert r.status == 200 and "redis" not in doc
    async with proxy.session.get(proxy.url + "/metrics") as r:
        text = await r.text()
    assert 'seadragon_replica_info{backend="memory",replica="solo"} 1.0' in text
    assert "seadragon_redis_up" not in text
