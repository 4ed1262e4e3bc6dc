"""What changes while the proxy runs: the policy, queue limits, CORS, the whitelist and the
API keys (both in the one SQLite file, so one watch and one reload serve them).

Reloads replace whole immutable objects, so a request sees one consistent policy.
A reload that fails is logged and the previous state stays.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import structlog

from .exceptions import ConfigError, DatabaseError
from .keys import KeyRing, KeyStore
from .netaddr import NetworkSet
from .scheduling import Scheduler
from .settings import Settings, load_settings
from .whitelist import WhitelistStore

log = structlog.get_logger("seadragon.live")

# Sections that only take effect at start-up; an edit to them is reported, not applied.
RESTART_ONLY = ("server", "upstream", "upstreams", "whitelist", "admin", "log", "history")

ReloadListener = Callable[[str, bool], None]  # (what: "config" | "whitelist" | "keys", ok)


class Live:
    def __init__(self, settings: Settings, scheduler: Scheduler, store: WhitelistStore) -> None:
        self.settings = settings
        self.whitelist = NetworkSet()
        self._scheduler = scheduler
        self.store = store
        self.keys = KeyRing()
        self.keystore = KeyStore(store.path, busy_timeout=store.busy_timeout)
        self._lock = asyncio.Lock()
        self.listeners: list[ReloadListener] = []

    @property
    def config_file(self) -> Path | None:
        return self.settings.file

    def _notify(self, what: str, ok: bool) -> None:
        for listener in self.listeners:
            listener(what, ok)

    async def reload_config(self) -> bool:
        """Re-read the YAML file; apply the live parts if it is valid."""
        path = self.config_file
        if path is None:
            return False
        async with self._lock:
            try:
                new = await asyncio.to_thread(load_settings, path)
            except ConfigError as e:
                log.warning("config_reload_failed", error=str(e), kept="previous policy")
                self._notify("config", False)
                return False
            old = self.settings
            ignored = [name for name in RESTART_ONLY if getattr(new, name) != getattr(old, name)]
            if ignored:
                log.warning("config_needs_restart", sections=ignored, applied=False)
            kept = {name: getattr(old, name) for name in RESTART_ONLY}
            self.settings = replace(new, **kept)
            q = self.settings.queue
            self._scheduler.reconfigure(
                max_size=q.max_size, max_wait=q.max_wait, aging=q.aging, affinity=q.affinity
            )
            log.info(
                "config_reloaded",
                file=str(path),
                sources={s.name: s.priority for s in new.policy.sources},
                default_source=new.policy.default.name,
            )
            self._notify("config", True)
            return True

    async def reload_whitelist(self) -> bool:
        """Re-read the whitelist and the key tables; on failure keep the last ones read.
        Listeners hear of changes and failures, not of reads that found the same list."""
        keys_ok = await self.reload_keys()
        return await self._reload_networks() and keys_ok

    async def reload_keys(self) -> bool:
        try:
            keys = await self.keystore.load()
        except DatabaseError as e:
            log.warning("keys_reload_failed", error=str(e), kept=len(self.keys))
            self._notify("keys", False)
            return False
        if keys == self.keys:
            return True
        self.keys = keys
        log.info("keys_reloaded", keys=len(keys))  # how many, never which digests
        self._notify("keys", True)
        return True

    async def _reload_networks(self) -> bool:
        try:
            networks = await self.store.load()
        except DatabaseError as e:
            log.warning("whitelist_reload_failed", error=str(e), kept=len(self.whitelist))
            self._notify("whitelist", False)
            return False
        if networks == self.whitelist:
            return True  # the file changed for another reason (the request history)
        self.whitelist = networks
        log.info("whitelist_reloaded", entries=len(networks))
        self._notify("whitelist", True)
        return True
