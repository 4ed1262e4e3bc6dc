"""``seadragon-proxy doctor``: the set-up checked end to end, one ✓/✗ line per check with what
to do when ✗. Checks run concurrently with short timeouts; nothing a server sends reaches
the terminal unescaped; every failure is a line, never a traceback."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Sequence
from pathlib import Path
from typing import TextIO

import aiohttp
from yarl import URL

from .doctor_checks import (
    CONNECT_TIMEOUT,
    GENERATE_TIMEOUT,
    TIMEOUT,
    USER_AGENT,
    Doctor,
    Line,
    count,
)
from .doctor_http import clean
from .exceptions import ConfigError
from .settings import Settings, load_settings


def _servers(settings: Settings) -> list[tuple[str, URL]]:
    """The Ollama servers behind the proxy, by name (``upstreams:``, or the one of ``upstream``)."""
    return [(entry.name, entry.url) for entry in settings.fleet]


async def run(
    config: Path,
    out: TextIO,
    *,
    generate: str | None = None,
    timeout: float = TIMEOUT,
    generate_timeout: float = GENERATE_TIMEOUT,
) -> int:
    """Run every check, print its line, return the exit status (0 all hold, 1 otherwise)."""
    ok, bad, arrow = _marks(out)
    failed = False

    def emit(lines: Sequence[Line]) -> None:
        nonlocal failed
        for line in lines:
            failed |= not line.ok
            fix = f" {arrow} {line.fix}" if not line.ok and line.fix else ""
            print(f"{ok if line.ok else bad} {line.text}{fix}", file=out, flush=True)

    try:
        settings = load_settings(config)
    except ConfigError as e:
        emit(
            [
                Line(
                    False,
                    f"config: {clean(e, 400)}",
                    "fix the file; seadragon-proxy check says the same",
                )
            ]
        )
        return 1
    policy = settings.policy
    emit(
        [
            Line(
                True,
                f"config {settings.file} loads: {count(len(policy.sources), 'source')}, "
                f"{count(len(settings.defaults), 'defaults entry', 'defaults entries')}",
            )
        ]
    )
    client_timeout = aiohttp.ClientTimeout(sock_connect=min(CONNECT_TIMEOUT, timeout))
    async with aiohttp.ClientSession(
        timeout=client_timeout, headers={"User-Agent": USER_AGENT}, trust_env=False
    ) as session:
        doctor = Doctor(settings, session, timeout, generate_timeout)
        servers = _servers(settings)
        local = asyncio.gather(
            _safe(doctor.database(), "database"),
            _safe(doctor.listening(), "listen address"),
            _safe_many(doctor.routes(), "proxy routes"),
        )
        remote = asyncio.gather(
            *(_safe_many(doctor.server(n, u, generate), f"Ollama {n}") for n, u in servers)
        )
        (database, listen, routes), ollama = await asyncio.gather(local, remote)
        emit([database, listen])
        for lines in ollama:
            emit(lines)
        if generate is not None:
            direct = await asyncio.gather(
                *(
                    _safe(
                        doctor.generate(f"from {clean(name)} directly", url, generate, direct=True),
                        name,
                    )
                    for name, url in servers
                )
            )
            emit(direct)
            via = Line(
                False,
                "one token through the proxy: not tried, as no Ollama server answers (the proxy "
                "would hold it for upstream.unreachable_wait)",
                "start Ollama first",
            )
            if doctor.answering:
                via = await _safe(
                    doctor.generate("through the proxy", doctor.proxy_url, generate, direct=False),
                    "proxy",
                )
            emit([via])
        if doctor.listen == "other":  # whatever answered there, it was not this proxy
            why = "not checked: the listen address belongs to something else"
            routes = [
                Line(False, f"/health {why}", "see above"),
                Line(False, f"admin API {why}", "see above"),
            ]
        emit(routes)
    return 1 if failed else 0


async def _safe(check: Awaitable[Line], what: str) -> Line:
    try:
        return await check
    except Exception as e:  # a check that breaks is a ✗ line, never a traceback
        return Line(
            False, f"{what}: the check itself failed: {clean(repr(e))}", "please report this"
        )


async def _safe_many(check: Awaitable[list[Line]], what: str) -> list[Line]:
    try:
        return await check
    except Exception as e:
        return [
            Line(False, f"{what}: the check itself failed: {clean(repr(e))}", "please report this")
        ]


def _marks(out: TextIO) -> tuple[str, str, str]:
    """✓ ✗ →, or ASCII on a terminal that cannot show them."""
    try:
        "✓✗→".encode(getattr(out, "encoding", None) or "utf-8")
    except (UnicodeEncodeError, LookupError):
        return "[ok]", "[FAIL]", "->"
    return "✓", "✗", "→"
