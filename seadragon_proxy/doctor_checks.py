"""The doctor's checks, one method each: database, listen address, each Ollama server,
a one-token answer, the proxy's own routes. Each returns ✓/✗ lines; ``doctor.py`` runs them."""

from __future__ import annotations

import asyncio
import errno
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from . import __version__
from .defaults import merge
from .doctor_http import Answer, Unanswered, clean, error_text, fetch, last_object, model_names
from .exceptions import SeadragonError
from .netaddr import NetworkSet, parse_address
from .policy import RequestFacts
from .settings import Settings
from .whitelist import WhitelistStore

CONNECT_TIMEOUT = 2.0  # seconds to open a connection: a dead server costs no more
TIMEOUT = 3.0  # seconds for each metadata answer
GENERATE_TIMEOUT = 120.0  # a one-token answer may first load the model (70B: up to 90 s)
USER_AGENT = f"seadragon-proxy-doctor/{__version__}"
PROMPT = "Reply with the single word OK."


@dataclass(frozen=True, slots=True)
class Line:
    ok: bool
    text: str
    fix: str = ""


@dataclass
class Doctor:
    settings: Settings
    session: aiohttp.ClientSession
    timeout: float = TIMEOUT
    generate_timeout: float = GENERATE_TIMEOUT
    whitelist: NetworkSet | None = None
    listen: str = "unknown"  # free | proxy | other
    answering: set[str] = field(default_factory=set)  # servers whose /api/version answered

    @property
    def proxy_url(self) -> URL:
        host = self.settings.server.host
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
        return URL.build(scheme="http", host=host, port=self.settings.server.port)

    def fix_start(self) -> str:
        return (
            "the proxy is not running: start it with make run, or seadragon-proxy serve "
            f"--config {self.settings.file}"
        )

    async def database(self) -> Line:
        store = WhitelistStore(self.settings.whitelist.database, busy_timeout=self.timeout)
        if not store.path.exists():
            return Line(
                False,
                f"database {store.path} does not exist",
                "the proxy creates it at its first start (with loopback on the whitelist); "
                + self.fix_start(),
            )
        try:
            async with asyncio.timeout(self.timeout):
                self.whitelist = await store.load()
        except TimeoutError:
            return Line(
                False,
                f"database {store.path} did not open within {self.timeout:g} s",
                "another process holds a lock on it; find it with: fuser " + str(store.path),
            )
        except SeadragonError as e:
            return Line(False, f"database: {clean(e, 300)}", "fix or restore the file")
        if not self.whitelist:
            return Line(
                False,
                f"database {store.path} opens, but the whitelist is empty",
                "sources with require_whitelist refuse everyone; add an address: "
                f"seadragon-proxy whitelist add 127.0.0.1 --config {self.settings.file}",
            )
        entries = count(len(list(self.whitelist)), "whitelist entry", "whitelist entries")
        return Line(True, f"database {store.path} opens; {entries}")

    async def listening(self) -> Line:
        server = self.settings.server
        where = f"{server.host}:{server.port}"
        if server.port == 0:
            self.listen = "free"
            return Line(True, "server.port is 0: the proxy listens on a free port it picks")
        try:
            async with asyncio.timeout(self.timeout):
                infos = await asyncio.get_running_loop().getaddrinfo(
                    server.host or None,
                    server.port,
                    type=socket.SOCK_STREAM,
                    flags=socket.AI_PASSIVE,
                )
        except (OSError, TimeoutError) as e:
            return Line(
                False,
                f"server.host {server.host!r} does not resolve: {clean(e)}",
                f"set server.host in {self.settings.file} to an address of this machine",
            )
        taken: OSError | None = None
        for family, kind, proto, _, address in infos:
            with socket.socket(family, kind, proto) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    s.bind(address)
                except OSError as e:
                    taken = e
                    break
        if taken is None:
            self.listen = "free"
            return Line(True, f"{where} is free (the proxy is not running)")
        if taken.errno != errno.EADDRINUSE:
            return Line(
                False,
                f"cannot listen on {where}: {clean(taken.strerror or taken)}",
                f"set server.host in {self.settings.file} to an address of this machine",
            )
        return await self._who_listens(where)

    async def _who_listens(self, where: str) -> Line:
        try:
            health = await fetch(
                self.session, "GET", self.proxy_url / "health", timeout=self.timeout
            )
        except Unanswered as e:
            self.listen = "other"
            return Line(
                False,
                f"{where} is taken by something that does not answer HTTP ({e})",
                f"find it with: ss -ltnp 'sport = :{self.settings.server.port}'",
            )
        doc = health.doc()
        if isinstance(doc, dict) and "queue_length" in doc and "status" in doc:
            self.listen = "proxy"
            return Line(True, f"{where} is this proxy, answering")
        self.listen = "other"
        what = "something else"
        try:
            root = await fetch(self.session, "GET", self.proxy_url, timeout=self.timeout)
            if root.body.startswith(b"Ollama is running"):
                what = "Ollama itself"
        except Unanswered:
            pass
        return Line(
            False,
            f"{where} is taken by {what} (GET /health: {error_text(health)})",
            f"stop it or move one of them (server.port in {self.settings.file}); find it "
            f"with: ss -ltnp 'sport = :{self.settings.server.port}'",
        )

    async def server(self, name: str, url: URL, model: str | None) -> list[Line]:
        host = f"OLLAMA_HOST={url.host}:{url.port}"
        get: Callable[[str], Awaitable[Answer]] = lambda p: fetch(  # noqa: E731
            self.session, "GET", url / p, timeout=self.timeout
        )
        version, tags, ps = await asyncio.gather(
            get("api/version"), get("api/tags"), get("api/ps"), return_exceptions=True
        )
        label = f"Ollama {clean(name)} at {url}"
        if isinstance(version, BaseException):
            return [
                Line(
                    False,
                    f"{label}: {clean(version)}",
                    f"start Ollama there (docs/ollama-setup.md) or fix upstream.url in "
                    f"{self.settings.file}",
                )
            ]
        doc = version.doc()
        if version.status != 200 or not isinstance(doc, dict) or "version" not in doc:
            return [
                Line(
                    False,
                    f"{label}: GET /api/version answers {error_text(version)}",
                    "this is not Ollama, or not a working one: check upstream.url",
                )
            ]
        self.answering.add(name)
        lines = [
            Line(
                True,
                f"{label} answers: version {clean(doc['version'], 40)} "
                f"({version.seconds * 1000:.0f} ms)",
            )
        ]
        have = model_names(tags)
        loaded = model_names(ps)
        if have is None:
            lines.append(
                Line(
                    False,
                    f"{clean(name)}: GET /api/tags gives no model list",
                    "check the server's log (journalctl -u ollama)",
                )
            )
            return lines
        shown = ", ".join(clean(m, 60) for m in have[:8]) + (" …" if len(have) > 8 else "")
        state = (
            "loaded: " + (", ".join(clean(m, 60) for m in loaded) or "none")
            if loaded is not None
            else "loaded: unknown"
        )
        if not have:
            lines.append(
                Line(
                    False,
                    f"{clean(name)} has no models",
                    f"pull one: {host} ollama pull {model or 'llama3:70b'}",
                )
            )
        elif model is not None and model not in have and f"{model}:latest" not in have:
            lines.append(
                Line(
                    False,
                    f"{clean(name)} does not have {clean(model)} (it has {shown})",
                    f"pull it: {host} ollama pull {clean(model)}",
                )
            )
        else:
            lines.append(Line(True, f"{clean(name)} has {len(have)} models: {shown}; {state}"))
        return lines

    async def generate(self, label: str, url: URL, model: str, *, direct: bool) -> Line:
        body: dict[str, Any] = {"model": model, "prompt": PROMPT, "options": {"num_predict": 1}}
        if direct:  # what the proxy would send, pins included, so both load the model alike
            body = self._as_forwarded(body)
        started = time.perf_counter()
        try:
            answer = await fetch(
                self.session, "POST", url / "api/generate", body=body, timeout=self.generate_timeout
            )
        except Unanswered as e:
            fix = self.fix_start() if not direct else "see the Ollama lines above"
            return Line(False, f"one token {label}: {e}", fix)
        took = time.perf_counter() - started
        last = last_object(answer.body)
        if answer.status != 200 or "error" in last or not last.get("done"):
            what = (
                error_text(answer)
                if answer.status != 200
                else clean(last.get("error", "the stream ended early"))
            )
            return Line(
                False,
                f"one token {label}: {what}",
                "a 403 means this machine's address is not whitelisted; a 404, pull the model",
            )
        load = last.get("load_duration", 0)
        extra = (
            f", of which loading the model {load / 1e9:.1f} s"
            if isinstance(load, int) and load > 5e8
            else ""
        )
        return Line(True, f"one token from {clean(model)} {label} in {secs(took)}{extra}")

    def _as_forwarded(self, body: dict[str, Any]) -> dict[str, Any]:
        headers = CIMultiDict({"User-Agent": USER_AGENT})
        ip = parse_address("127.0.0.1")
        whitelisted = self.whitelist is not None and ip in self.whitelist
        facts = RequestFacts(ip, "/api/generate", headers, body["model"], whitelisted)
        source = self.settings.policy.classify(facts).source.name
        merged = merge(body, self.settings.defaults, source, body["model"])
        return merged.doc or body

    def _auth(self, admin: bool) -> dict[str, str]:
        token = self.settings.admin.token
        return {"Authorization": f"Bearer {token.reveal()}"} if admin and token else {}

    async def routes(self) -> list[Line]:
        health, queue = await asyncio.gather(
            fetch(self.session, "GET", self.proxy_url / "health", timeout=self.timeout),
            fetch(
                self.session,
                "GET",
                self.proxy_url / "api/admin/queue",
                timeout=self.timeout,
                headers=self._auth(True),
            ),
            return_exceptions=True,
        )
        out: list[Line] = []
        if isinstance(health, BaseException):
            out.append(
                Line(False, f"/health at {self.proxy_url}: {clean(health)}", self.fix_start())
            )
        elif health.status == 200:
            out.append(Line(True, f"/health answers healthy ({health.seconds * 1000:.0f} ms)"))
        else:
            doc = health.doc()
            unhealthy = isinstance(doc, dict) and doc.get("status") == "unhealthy"
            said = "unhealthy" if unhealthy else error_text(health)
            out.append(
                Line(
                    False,
                    f"/health answers HTTP {health.status}: {said}",
                    "the proxy cannot reach Ollama: see the Ollama lines above",
                )
            )
        token_env = self.settings.admin.token_env
        if isinstance(queue, BaseException):
            out.append(
                Line(False, f"admin API at {self.proxy_url}: {clean(queue)}", self.fix_start())
            )
        elif queue.status == 200:
            doc = queue.doc()
            doc = doc if isinstance(doc, dict) else {}
            out.append(
                Line(
                    True,
                    f"admin API answers: {doc.get('queue_length', '?')} waiting, "
                    f"{doc.get('in_flight', '?')} running",
                )
            )
        elif queue.status == 403:
            fix = (
                f"the proxy has ${token_env} set: export the same value in this shell"
                if self.settings.admin.token is None
                else f"${token_env} here differs from the proxy's"
            )
            out.append(Line(False, f"admin API refuses: {error_text(queue)}", fix))
        else:
            out.append(Line(False, f"admin API answers {error_text(queue)}", "is this the proxy?"))
        return out


def secs(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


def count(n: int, one: str, many: str | None = None) -> str:
    return f"{n} {one if n == 1 else many or one + 's'}"
