"""Settings: the YAML file parsed once into frozen dataclasses, validated, with defaults.

``load_settings(path)`` is the only way in; everything downstream takes a
``Settings`` and never looks at a dict. See docs/configuration.md for every key.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Hashable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import yaml
from yarl import URL

from .configfile import Section
from .defaults import RequestDefaults
from .exceptions import ConfigError
from .netaddr import NetworkSet
from .policy import Glob, Policy
from .replicafile import Backend, RedisSettings, parse_backend, parse_replica
from .rulesfile import parse_defaults, parse_policy

MiB = 1024 * 1024
CONFIG_ENV = "SEADRAGON_CONFIG"
DEFAULT_CONFIG = Path("config/seadragon.yaml")

LogFormat = Literal["auto", "json", "console"]
ManageModels = Literal["whitelisted", "admin", "anyone"]
LogLevel = Literal["debug", "info", "warning", "error"]


class Secret:
    """A value that never shows itself in a repr, a log line or a traceback."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('********')"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and hmac.compare_digest(
            self._value.encode(), other._value.encode()
        )

    def __hash__(self) -> int:
        return 0

    __str__ = __repr__


@dataclass(frozen=True, slots=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 11435
    replica: str = "proxy"  # this process's name among replicas; default the host name
    trusted_proxies: NetworkSet = field(default_factory=NetworkSet)
    max_body: int = 64 * MiB  # bytes, JSON routes only; blobs stream unbounded
    header_timeout: float = 30.0  # seconds to send request headers (also keep-alive idle)
    body_timeout: float = 60.0  # seconds of silence while a request body is arriving
    body_deadline: float = 120.0  # seconds a JSON body may take to arrive in total
    max_body_memory: int = 512 * MiB  # bytes of JSON bodies held at once, all requests together
    max_json_elements: int = 1_000_000  # values (objects, arrays, items) a JSON body may hold
    send_timeout: float = 60.0  # seconds a client may stop reading a response before it is cut
    shutdown_grace: float = 30.0  # seconds in-flight streams may finish after SIGTERM
    # Host names (globs) the admin, dashboard, /metrics and model-management routes answer
    # to, besides IP literals, localhost, the machine's name and server.host (hostcheck.py).
    allowed_hosts: tuple[Glob, ...] = ()


@dataclass(frozen=True, slots=True)
class UpstreamSettings:
    url: URL = URL("http://127.0.0.1:11434")  # noqa: RUF009 - URL is immutable
    slots: int = 1
    connect_timeout: float = 5.0
    idle_timeout: float = 600.0
    unreachable_wait: float = (
        30.0  # seconds queued requests wait for a down Ollama; 0 = 502 at once
    )


@dataclass(frozen=True, slots=True)
class QueueSettings:
    max_size: int = 512
    max_wait: float = 0.0  # 0 = no limit
    aging: float = 0.0  # 0 = strict priority
    backend: Backend = "memory"  # redis: replicas share one queue (replicafile.py)
    redis: RedisSettings = field(default_factory=RedisSettings)


@dataclass(frozen=True, slots=True)
class WhitelistSettings:
    database: Path = Path("data/seadragon.db")


@dataclass(frozen=True, slots=True)
class AdminSettings:
    token_env: str = "SEADRAGON_ADMIN_TOKEN"  # noqa: S105 - the name of a variable
    token: Secret | None = None  # read from the environment at load time
    # A second, read-only token that opens /metrics only (for the Prometheus scraper).
    metrics_token_env: str = "SEADRAGON_METRICS_TOKEN"  # noqa: S105 - the name of a variable
    metrics_token: Secret | None = None
    allow_origins: tuple[Glob, ...] = ()  # browser origins (besides the proxy's own) for admin
    manage_models: ManageModels = "whitelisted"  # who may pull, push, create, copy, delete


@dataclass(frozen=True, slots=True)
class CorsSettings:
    allow_origins: tuple[Glob, ...] = ()
    allow_ollama_defaults: bool = True  # also allow the origins Ollama allows by default


@dataclass(frozen=True, slots=True)
class HistorySettings:
    enabled: bool = True
    retention_days: float = 30.0  # rows older than this are pruned; 0 = keep regardless of age
    retention_rows: int = 1_000_000  # at most this many rows are kept; 0 = no limit
    flush_interval: float = 1.0  # seconds between batched writes


@dataclass(frozen=True, slots=True)
class LogSettings:
    format: LogFormat = "auto"
    level: LogLevel = "info"


@dataclass(frozen=True, slots=True)
class Settings:
    policy: Policy
    file: Path | None = None
    server: ServerSettings = field(default_factory=ServerSettings)
    upstream: UpstreamSettings = field(default_factory=UpstreamSettings)
    queue: QueueSettings = field(default_factory=QueueSettings)
    whitelist: WhitelistSettings = field(default_factory=WhitelistSettings)
    admin: AdminSettings = field(default_factory=AdminSettings)
    cors: CorsSettings = field(default_factory=CorsSettings)
    log: LogSettings = field(default_factory=LogSettings)
    history: HistorySettings = field(default_factory=HistorySettings)
    defaults: tuple[RequestDefaults, ...] = ()

    def override(
        self, *, host: str | None = None, port: int | None = None, upstream: str | None = None
    ) -> Settings:
        """Apply command-line flags, which win over the file."""
        server, up = self.server, self.upstream
        if host is not None:
            server = replace(server, host=host)
        if port is not None:
            server = replace(server, port=port)
        if upstream is not None:
            up = replace(up, url=parse_upstream_url(upstream, "--upstream", "upstream URL"))
        return replace(self, server=server, upstream=up)


def config_path(explicit: str | os.PathLike[str] | None) -> Path:
    """``--config`` if given, else ``$SEADRAGON_CONFIG``, else ``config/seadragon.yaml``."""
    if explicit is not None:
        return Path(explicit)
    env = os.environ.get(CONFIG_ENV)
    return Path(env) if env else DEFAULT_CONFIG


def load_settings(path: Path, environ: os._Environ[str] | dict[str, str] | None = None) -> Settings:
    """Read, parse and validate ``path``; raise ``ConfigError`` naming the file and key."""
    file = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            file, None, "no such file (pass --config or set SEADRAGON_CONFIG)"
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(file, None, f"cannot read the file: {e}") from e
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(file, None, f"{where}not valid YAML: {problem}") from e
    if raw is None:
        raise ConfigError(file, None, "the file is empty")
    return parse_settings(raw, file=file, base=path.parent, environ=environ)


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.safe_load`` that refuses a key given twice (pyyaml silently keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[object, object]:
        seen: set[object] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):
                continue  # SafeLoader reports unhashable keys itself
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def parse_settings(
    raw: object, *, file: str, base: Path, environ: os._Environ[str] | dict[str, str] | None = None
) -> Settings:
    env = os.environ if environ is None else environ
    top = Section(raw, file=file, key="")
    server = _server(top.section("server"))
    upstream = _upstream(top.section("upstream"))
    queue = _queue(top.section("queue"))
    whitelist = _whitelist(top.section("whitelist"), base)
    admin = _admin(top.section("admin"), env)
    cors = _cors(top.section("cors"))
    log = _log(top.section("log"))
    history = _history(top.section("history"))
    policy = parse_policy(top)
    defaults = parse_defaults(top)
    top.done()
    return Settings(
        policy=policy,
        file=Path(file),
        server=server,
        upstream=upstream,
        queue=queue,
        whitelist=whitelist,
        admin=admin,
        cors=cors,
        log=log,
        history=history,
        defaults=defaults,
    )


def parse_upstream_url(text: str, file: str, key: str) -> URL:
    try:
        url = URL(text)
    except (ValueError, TypeError) as e:
        raise ConfigError(file, key, f"is not a URL: {e}") from e
    if url.scheme not in ("http", "https") or not url.host:
        raise ConfigError(
            file, key, f"must be an http:// or https:// URL with a host, got {text!r}"
        )
    if url.query_string or url.fragment:
        raise ConfigError(file, key, "must not have a query string or fragment")
    return url


def _server(s: Section) -> ServerSettings:
    d = ServerSettings()
    try:
        proxies = NetworkSet.parse(s.strings("trusted_proxies", allow_empty=True))
    except ValueError as e:
        s.fail("trusted_proxies", str(e))
    max_body = s.size("max_body", d.max_body, min=1024)
    result = ServerSettings(
        host=s.text("host", d.host),
        port=s.integer("port", d.port, min=0, max=65535),
        trusted_proxies=proxies,
        max_body=max_body,
        header_timeout=s.seconds("header_timeout", d.header_timeout, min=1),
        body_timeout=s.seconds("body_timeout", d.body_timeout, min=1),
        body_deadline=s.seconds("body_deadline", d.body_deadline, min=1),
        # Unset, the ceiling grows with max_body: it must hold one body of that size.
        max_body_memory=s.size("max_body_memory", max(d.max_body_memory, max_body), min=1024),
        max_json_elements=s.integer("max_json_elements", d.max_json_elements, min=1000),
        send_timeout=s.seconds("send_timeout", d.send_timeout, min=0.1),
        shutdown_grace=s.seconds("shutdown_grace", d.shutdown_grace),
        allowed_hosts=tuple(
            Glob.compile(h.lower().rstrip("."))
            for h in s.strings("allowed_hosts", allow_empty=True)
        ),
        replica=parse_replica(s),
    )
    if result.max_body_memory < result.max_body:
        s.fail("max_body_memory", f"must be at least server.max_body ({result.max_body} bytes)")
    s.done()
    return result


def _upstream(s: Section) -> UpstreamSettings:
    d = UpstreamSettings()
    url = d.url
    if s.has("url"):
        url = parse_upstream_url(s.text("url", str(d.url)), s.file, s.path("url") or "url")
    result = UpstreamSettings(
        url=url,
        slots=s.integer("slots", d.slots, min=1, max=1024),
        connect_timeout=s.seconds("connect_timeout", d.connect_timeout, min=0.001),
        idle_timeout=s.seconds("idle_timeout", d.idle_timeout, min=0.001),
        unreachable_wait=s.seconds("unreachable_wait", d.unreachable_wait),
    )
    s.done()
    return result


def _queue(s: Section) -> QueueSettings:
    d = QueueSettings()
    result = QueueSettings(
        max_size=s.integer("max_size", d.max_size, min=1),
        max_wait=s.seconds("max_wait", d.max_wait),
        aging=s.seconds("aging", d.aging),
    )
    backend, redis = parse_backend(s)
    result = replace(result, backend=backend, redis=redis)
    s.done()
    return result


def _whitelist(s: Section, base: Path) -> WhitelistSettings:
    database = Path(s.text("database", str(WhitelistSettings().database)))
    s.done()
    return WhitelistSettings(database=database if database.is_absolute() else base / database)


def _admin(s: Section, env: os._Environ[str] | dict[str, str]) -> AdminSettings:
    d = AdminSettings()
    token_env = s.text("token_env", d.token_env)
    metrics_env = s.text("metrics_token_env", d.metrics_token_env)
    origins = s.strings("allow_origins", allow_empty=True)
    manage = s.choice("manage_models", d.manage_models, ("whitelisted", "admin", "anyone"))
    s.done()

    def secret(name: str) -> Secret | None:
        value = env.get(name, "").strip()
        return Secret(value) if value else None

    return AdminSettings(
        token_env,
        secret(token_env),
        metrics_env,
        secret(metrics_env),
        allow_origins=tuple(Glob.compile(o.rstrip("/")) for o in origins),
        manage_models=manage,  # type: ignore[arg-type]  # checked by choice()
    )


def _cors(s: Section) -> CorsSettings:
    origins = s.strings("allow_origins", allow_empty=True)
    result = CorsSettings(
        allow_origins=tuple(Glob.compile(o.rstrip("/")) for o in origins),
        allow_ollama_defaults=s.flag("allow_ollama_defaults", True),
    )
    s.done()
    return result


def _log(s: Section) -> LogSettings:
    fmt = s.choice("format", "auto", ("auto", "json", "console"))
    level = s.choice("level", "info", ("debug", "info", "warning", "error"))
    s.done()
    return LogSettings(format=fmt, level=level)  # type: ignore[arg-type]  # checked by choice()


def _history(s: Section) -> HistorySettings:
    d = HistorySettings()
    result = HistorySettings(
        enabled=s.flag("enabled", d.enabled),
        retention_days=s.seconds("retention_days", d.retention_days),
        retention_rows=s.integer("retention_rows", d.retention_rows, min=0),
        flush_interval=s.seconds("flush_interval", d.flush_interval, min=0.01),
    )
    s.done()
    return result
