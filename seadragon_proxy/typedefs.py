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
from .startcheck import StartCheck
from .upstream import Fleet, Upstream

if TYPE_CHECKING:  # redis is an optional extra: imported only with queue.backend: redis
    from .replicas.link import RedisLink
    from .replicas.replica import Replica
    from .replicas.whitelistsync import WhitelistSync

LIVE = web.AppKey("live", Live)
SCHEDULER = web.AppKey("scheduler", Scheduler)
UPSTREAM = web.AppKey("upstream", Upstream)  # the first server (fleet of one: the one)
FLEET = web.AppKey("fleet", Fleet)  # every server: FLEET.servers is the read-only list
RECORDER = web.AppKey("recorder", Recorder)
PROXY = web.AppKey("proxy", Proxy)
METRICS = web.AppKey("metrics", Metrics)
START_CHECK = web.AppKey("start_check", StartCheck)
HISTORY: web.AppKey[History | None] = web.AppKey("history")
REDIS_LINK: web.AppKey[RedisLink | None] = web.AppKey("redis_link")
WHITELIST_SYNC: web.AppKey[WhitelistSync | None] = web.AppKey("whitelist_sync")
REPLICA: web.AppKey[Replica | None] = web.AppKey("replica")
