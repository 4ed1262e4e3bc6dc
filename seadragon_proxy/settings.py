"""Settings: the YAML file parsed once into frozen dataclasses, validated, with defaults.

``load_settings(path)`` is the only way in; everything downstream takes a
``Settings`` and never looks at a dict. See docs/configuration.md for every key.
"""

from __future__ import annotations

import hmac
import os
import re
from collections.abc import Hashable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import yaml
from yarl import URL

from .configfile import Section, clip, describe
from .defaults import RequestDefaults
from .exceptions import ConfigError
from .netaddr import NetworkSet
from .policy import Glob, Policy
from .replicafile import Backend, RedisSettings, parse_backend, parse_replica
from .rulesfile import parse_defaults, parse_policy
from .scheduling import Affinity

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
class ServerEntry:
    """One Ollama server of the fleet (an entry of ``upstreams:``)."""

    name: str
    url: URL
    slots: int = 1
    max_loaded_models: int = 0  # 0 = not predicted by the proxy (Ollama decides)
    models: tuple[str, ...] = ()  # globs it may serve; empty = whatever it has


MAX_SERVERS = 64  # server names are metric labels: bounded
_SERVER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


@dataclass(frozen=True, slots=True)
class QueueSettings:
    max_size: int = 512
    max_wait: float = 0.0  # 0 = no limit
    aging: float = 0.0  # 0 = strict priority
    affinity: Affinity = field(default_factory=Affinity)  # max_defer 0 = off
    output_weight: float = 2.0  # queue.fairness.output_weight: an output token's cost in input
    retry_window: float = 10.0  # seconds a hung-up request's place is kept for its retry
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
    upstreams: tuple[ServerEntry, ...] = ()  # empty: one server, upstream.url
    queue: QueueSettings = field(default_factory=QueueSettings)
    whitelist: WhitelistSettings = field(default_factory=WhitelistSettings)
    admin: AdminSettings = field(default_factory=AdminSettings)
    cors: CorsSettings = field(default_factory=CorsSettings)
    log: LogSettings = field(default_factory=LogSettings)
    history: HistorySettings = field(default_factory=HistorySettings)
    defaults: tuple[RequestDefaults, ...] = ()

    @property
    def fleet(self) -> tuple[ServerEntry, ...]:
        """The Ollama servers: ``upstreams:``, or ``upstream:`` as a fleet of one."""
        if self.upstreams:
            return self.upstreams
        return (ServerEntry("default", self.upstream.url, self.upstream.slots),)

    def override(
        self, *, host: str | None = None, port: int | None = None, upstream: str | None = None
    ) -> Settings:
        """Apply command-line flags, which win over the file."""
        server, up = self.server, self.upstream
        if host is not None:
            server = replace(server, host=host)
        if port is not None:
            server = replace(server, port=port)
        upstreams = self.upstreams
        if upstream is not None:  # one server instead of the file's fleet
            up = replace(up, url=parse_upstream_url(upstream, "--upstream", "upstream URL"))
            upstreams = ()
        return replace(self, server=server, upstream=up, upstreams=upstreams)


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
        _count_aliases(text, file)
        raw = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(file, None, f"{where}not valid YAML: {clip(problem, 120)}") from e
    if raw is None:
        raise ConfigError(file, None, "the file is empty")
    return parse_settings(raw, file=file, base=path.parent, environ=environ)


# A config file has no use for more than a few anchors; a file with thousands of alias uses
# is an "alias bomb" (each level doubling the last), whose expansion — in a repr(), in a
# loop over a list — freezes the process. Counting costs one pass of libyaml's parser.
MAX_ALIASES = 100
_SafeLoader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _count_aliases(text: str, file: str) -> None:
    """Refuse a file that uses more than ``MAX_ALIASES`` aliases (``*name``)."""
    aliases = 0
    for event in yaml.parse(text, Loader=_SafeLoader):
        if isinstance(event, yaml.AliasEvent):
            aliases += 1
            if aliases > MAX_ALIASES:
                mark = event.start_mark
                where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
                raise ConfigError(
                    file,
                    None,
                    f"{where}more than {MAX_ALIASES} YAML aliases (*name); "
                    "a config needs few, write the values out instead",
                )


class _UniqueKeyLoader(_SafeLoader):  # type: ignore[valid-type,misc]
    """``yaml.safe_load`` that refuses a key given twice (pyyaml silently keeps the last);
    libyaml's parser when pyyaml has it, several times faster on a large file."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[object, object]:
        seen: set[object] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):
                continue  # SafeLoader reports unhashable keys itself
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {describe(key)}", key_node.start_mark
                )
            seen.add(key)
        mapping: dict[object, object] = super().construct_mapping(node, deep=deep)
        return mapping


def parse_settings(
    raw: object, *, file: str, base: Path, environ: os._Environ[str] | dict[str, str] | None = None
) -> Settings:
    env = os.environ if environ is None else environ
    top = Section(raw, file=file, key="")
    server = _server(top.section("server"))
    upstream_section = top.section("upstream")
    upstream = _upstream(upstream_section)
    upstreams = _upstreams(top, file)
    if upstreams:
        for key in ("url", "slots"):
            if upstream_section.has(key):
                upstream_section.fail(
                    key,
                    "is set together with upstreams:; give each server's url and slots "
                    "there (upstream: keeps only the shared timeouts)",
                )
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
        upstreams=upstreams,
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
        raise ConfigError(file, key, f"is not a URL: {clip(str(e))}") from e
    if url.scheme not in ("http", "https") or not url.host:
        raise ConfigError(
            file, key, f"must be an http:// or https:// URL with a host, got {describe(text)}"
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


def _upstreams(top: Section, file: str) -> tuple[ServerEntry, ...]:
    raw = top.get("upstreams")
    if raw is None:
        return ()
    if not isinstance(raw, list) or not raw:
        top.fail("upstreams", "must be a list of servers, each with at least name and url")
    if len(raw) > MAX_SERVERS:
        top.fail("upstreams", f"lists {len(raw)} servers; at most {MAX_SERVERS}")
    entries: list[ServerEntry] = []
    for index, item in enumerate(raw):
        s = Section(item, file=file, key=f"upstreams[{index}]")
        if not s.has("name") or not s.has("url"):
            s.fail(None, "needs a name and a url")
        name = s.text("name", "")
        if not _SERVER_NAME.match(name):
            s.fail("name", f"must be letters, digits, '.', '_' or '-' (1-63), got {name!r}")
        if any(e.name == name for e in entries):
            s.fail("name", f"{name!r} is the name of an earlier server; names must differ")
        url = parse_upstream_url(s.text("url", ""), file, s.path("url") or "url")
        if any(e.url == url for e in entries):
            s.fail("url", f"{url} is the url of an earlier server")
        entries.append(
            ServerEntry(
                name=name,
                url=url,
                slots=s.integer("slots", 1, min=1, max=1024),
                max_loaded_models=s.integer("max_loaded_models", 0, min=0, max=1024),
                models=s.strings("models"),
            )
        )
        s.done()
    return tuple(entries)


def _queue(s: Section) -> QueueSettings:
    d = QueueSettings()
    result = QueueSettings(
        max_size=s.integer("max_size", d.max_size, min=1),
        max_wait=s.seconds("max_wait", d.max_wait),
        aging=s.seconds("aging", d.aging),
        affinity=_affinity(s.section("affinity")) if s.has("affinity") else Affinity(),
        output_weight=_output_weight(s.section("fairness"), d.output_weight),
        retry_window=s.seconds("retry_window", d.retry_window),
    )
    backend, redis = parse_backend(s)
    result = replace(result, backend=backend, redis=redis)
    s.done()
    return result


def _affinity(s: Section) -> Affinity:
    result = Affinity(
        window=s.integer("window", 0, min=0, max=1000),
        max_defer=s.seconds("max_defer", 120.0),
        min_residency=s.seconds("min_residency", 20.0),
    )
    s.done()
    return result


def _output_weight(s: Section, default: float) -> float:
    value = s.get("output_weight")
    if value is None:
        value = default
    elif isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 100:
        s.fail("output_weight", f"must be a number from 0 to 100 (2 = the paper's), got {value!r}")
    s.done()
    return float(value)


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
