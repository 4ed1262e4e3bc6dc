"""Every ``web.AppKey`` in one place: the typed state the aiohttp glue shares."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from .history import History
from .live import Live
from .metrics import Metrics
from .proxy import Proxy
from .record import Recorder
from .scheduling import Scheduler
from .upstream import Upstream

if TYPE_CHECKING:  # redis is an optional extra: imported only with queue.backend: redis
    from .replicas.link import RedisLink
    from .replicas.replica import Replica

LIVE = web.AppKey("live", Live)
SCHEDULER = web.AppKey("scheduler", Scheduler)
UPSTREAM = web.AppKey("upstream", Upstream)
RECORDER = web.AppKey("recorder", Recorder)
PROXY = web.AppKey("proxy", Proxy)
METRICS = web.AppKey("metrics", Metrics)
HISTORY: web.AppKey[History | None] = web.AppKey("history")
REDIS_LINK: web.AppKey[RedisLink | None] = web.AppKey("redis_link")
REPLICA: web.AppKey[Replica | None] = web.AppKey("replica")
