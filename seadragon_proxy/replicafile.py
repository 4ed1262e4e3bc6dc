"""``queue.backend``, ``queue.redis`` and ``server.replica``: how replicas share one queue.

Read by settings.py from the ``queue`` and ``server`` sections (``QueueSettings.backend``,
``QueueSettings.redis``, ``ServerSettings.replica``).
"""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass
from typing import Literal

from yarl import URL

from .configfile import Section

Backend = Literal["memory", "redis"]
BACKENDS: tuple[Backend, ...] = ("memory", "redis")
_REPLICA = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
_PREFIX = re.compile(r"[A-Za-z0-9._:-]{1,64}")


@dataclass(frozen=True, slots=True)
class RedisSettings:
    url: str = "redis://127.0.0.1:6379/0"
    lease: float = 10.0  # seconds; a replica that stops renewing loses its slots after this
    prefix: str = "seadragon:"

    def __repr__(self) -> str:  # the URL may carry a password
        return (
            f"RedisSettings(url={redacted(self.url)!r}, lease={self.lease}, prefix={self.prefix!r})"
        )


def redacted(url: str) -> str:
    """``url`` as it may be shown: any password replaced by ``***``."""
    try:
        parsed = URL(url)
    except ValueError:
        return "<unparsable URL>"
    return str(parsed if parsed.password is None else parsed.with_password("***"))


def default_replica() -> str:
    name = socket.gethostname().split(".")[0]
    return name if _REPLICA.fullmatch(name) else "proxy"


def parse_backend(queue: Section) -> tuple[Backend, RedisSettings]:
    """``queue.backend`` and ``queue.redis`` (the section is read, not ``done()``)."""
    backend: Backend = (
        "redis" if queue.choice("backend", "memory", BACKENDS) == "redis" else "memory"
    )
    s = queue.section("redis")
    d = RedisSettings()
    url = s.text("url", d.url)
    try:
        parsed = URL(url)
    except ValueError:
        s.fail("url", "must be a redis:// or rediss:// URL")
    if parsed.scheme not in ("redis", "rediss", "unix") or (
        parsed.scheme != "unix" and not parsed.host
    ):
        s.fail(
            "url",
            f"must be a redis://host:port/db, rediss:// or unix:// URL, got {redacted(url)!r}",
        )
    lease = s.seconds("lease", d.lease, min=1)
    prefix = s.text("prefix", d.prefix)
    if not _PREFIX.fullmatch(prefix):
        s.fail("prefix", "must be 1-64 characters of letters, digits and . _ : -")
    s.done()
    if backend == "redis":
        try:
            import redis.asyncio  # noqa: F401 - only whether it is there
        except ImportError:
            queue.fail(
                "backend",
                "redis needs the redis package: pip install 'seadragon-proxy[redis]'",
            )
    return backend, RedisSettings(url=url, lease=lease, prefix=prefix)


def parse_replica(server: Section) -> str:
    """``server.replica``: letters, digits, ``. _ -``, at most 63 characters."""
    name = server.get("replica")
    if name is None:
        return default_replica()
    if not isinstance(name, str) or not _REPLICA.fullmatch(name):
        server.fail(
            "replica",
            "must be 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit",
        )
    return name
