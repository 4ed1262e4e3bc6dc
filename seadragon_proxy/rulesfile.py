"""The ``sources``, ``default_source`` and ``defaults`` sections of the config file, read
into a ``Policy`` and ``RequestDefaults``. Every error names the file and the dotted key."""

from __future__ import annotations

import re

from .configfile import Section, clip, describe
from .defaults import PINNABLE, KeepAlive, OptionValue, RequestDefaults
from .netaddr import NetworkSet, parse_network
from .policy import Glob, Match, Policy, Source
from .tenants import Fairness, TenantLimits, valid_fair_by

_SCALARS = (str, int, float, bool)

# A prefix is whole path segments of URL-safe characters: /s/coding, /team-a.
_PREFIX = re.compile(r"^(/[A-Za-z0-9._~-]+)+$")
# The proxy's and Ollama's own paths: a prefix there would take their requests.
_RESERVED = ("/api", "/v1", "/health", "/metrics", "/admin")
# A key name: what `keys add NAME` accepts and `match.api_key` lists.
KEY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def parse_defaults(top: Section) -> tuple[RequestDefaults, ...]:
    raw = top.get("defaults")
    if raw is None:
        return ()
    if not isinstance(raw, list):
        top.fail("defaults", "must be a list of {match, options, keep_alive, force} entries")
    entries: list[RequestDefaults] = []
    for index, item in enumerate(raw):
        s = Section(item, file=top.file, key=f"defaults[{index}]")
        m = s.section("match")
        sources = _globs(m, "source")
        models = _globs(m, "model")
        m.done()
        o = s.section("options")
        options: list[tuple[str, OptionValue]] = []
        for name in list(o.raw):
            value = o.get(name)
            if isinstance(value, list) and all(isinstance(v, _SCALARS) for v in value):
                options.append((name, tuple(value)))
            elif isinstance(value, _SCALARS):
                options.append((name, value))
            else:
                o.fail(name, "must be a number, string, true/false or a list of them")
        o.done()
        keep_alive = _keep_alive(s)
        forced: tuple[tuple[str, int], ...] = ()
        forced_keep_alive = None
        if s.has("force"):
            f = s.section("force")
            forced = _pins(f.section("options"))
            forced_keep_alive = _keep_alive(f)
            f.done()
            if not forced and forced_keep_alive is None:
                f.fail(None, f"pins nothing; give options ({', '.join(PINNABLE)}) or keep_alive")
        if not options and keep_alive is None and not forced and forced_keep_alive is None:
            s.fail(None, "sets nothing; give options, keep_alive or force")
        s.done()
        entries.append(
            RequestDefaults(sources, models, tuple(options), keep_alive, forced, forced_keep_alive)
        )
    return tuple(entries)


def _keep_alive(s: Section) -> KeepAlive | None:
    value = s.get("keep_alive")
    if value is not None and (isinstance(value, bool) or not isinstance(value, (str, int, float))):
        s.fail("keep_alive", "must be a duration such as 30m or a number of seconds")
    return value


def _pins(o: Section) -> tuple[tuple[str, int], ...]:
    """``force.options``: only the runner options whose change reloads the model."""
    pins: list[tuple[str, int]] = []
    lowest = {"num_gpu": -1, "num_thread": 0}
    for name in list(o.raw):
        if name not in PINNABLE:
            o.fail(name, f"cannot be pinned; the options that can are {', '.join(PINNABLE)}")
        if o.raw[name] is None:
            o.fail(name, "must be a whole number, got nothing")
        pins.append((name, o.integer(name, 0, min=lowest.get(name, 1))))
    o.done()
    return tuple(pins)


def parse_policy(top: Section) -> Policy:
    raw_sources = top.get("sources")
    if raw_sources is None:
        top.fail("sources", "is missing; list at least one source")
    if not isinstance(raw_sources, list) or not raw_sources:
        top.fail("sources", "must be a non-empty list of sources")
    sources: list[Source] = []
    names: set[str] = set()  # a set, not a scan of sources: 20 000 sources load in linear time
    for index, raw in enumerate(raw_sources):
        s = Section(raw, file=top.file, key=f"sources[{index}]")
        name = s.text("name", "")
        if not name:
            s.fail("name", "is missing; every source needs a name")
        if name in names:
            s.fail("name", f"{describe(name)} is used by an earlier source; names must be unique")
        names.add(name)
        if not s.has("priority"):
            s.fail("priority", "is missing; lower numbers are served first")
        source = Source(
            name=name,
            priority=s.integer("priority", 0),
            match=_match(s.section("match")) if s.has("match") else None,
            require_whitelist=s.flag("require_whitelist", False),
            max_wait=s.seconds("max_wait", 0.0) if s.has("max_wait") else None,
            fairness=_fairness(s),
        )
        s.done()
        if source.match is not None:
            _check_prefixes(s, source.match.path_prefix, sources)
        sources.append(source)
    default_name = top.text("default_source", "")
    if not default_name:
        top.fail("default_source", "is missing; name the source for requests no rule matches")
    default = next((s for s in sources if s.name == default_name), None)
    if default is None:
        listed = clip(", ".join(s.name for s in sources[:10]), 120)
        more = f" and {len(sources) - 10} more" if len(sources) > 10 else ""
        top.fail(
            "default_source",
            f"{describe(default_name)} names no source (sources are: {listed}{more})",
        )
    return Policy(sources=tuple(sources), default=default)


def _fairness(s: Section) -> Fairness:
    """``fair_by``, ``weights`` and ``limits`` of one source."""
    fair_by = s.text("fair_by", "none")
    problem = valid_fair_by(fair_by)
    if problem is not None:
        s.fail("fair_by", problem)
    weights: list[tuple[str, float]] = []
    if s.has("weights"):
        w = s.section("weights")
        if fair_by == "none" and w.raw:
            s.fail("weights", "needs fair_by (client_ip, api_key or header:<Name>) to name tenants")
        for name in list(w.raw):
            value = w.get(name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                w.fail(name, f"must be a number above 0 (a tenant's share), got {value!r}")
            if value > 1000:
                w.fail(name, f"must be at most 1000, got {value!r}")
            weights.append((name, float(value)))
        w.done()
    limits = TenantLimits()
    if s.has("limits"):
        lim = s.section("limits")
        limits = TenantLimits(
            max_queued=lim.integer("max_queued", 0, min=0),
            max_in_flight=lim.integer("max_in_flight", 0, min=0),
            tokens_per_hour=lim.integer("tokens_per_hour", 0, min=0),
        )
        lim.done()
    return Fairness(fair_by=fair_by, weights=tuple(weights), limits=limits)


def _segment_prefix(outer: str, inner: str) -> bool:
    return inner == outer or inner.startswith(outer + "/")


def _check_prefixes(s: Section, prefixes: tuple[str, ...], earlier: list[Source]) -> None:
    """Nested prefixes (``/s`` and ``/s/coding``) are refused: which one a request is under
    would depend on the order of the rules, silently. The same prefix on several rules is
    fine: those rules are tried in order like any others."""
    key = "match.path_prefix"
    for other in earlier:
        for theirs in other.match.path_prefix if other.match else ():
            for ours in prefixes:
                if ours != theirs and (
                    _segment_prefix(ours, theirs) or _segment_prefix(theirs, ours)
                ):
                    s.fail(
                        key,
                        f"{ours!r} and {theirs!r} (source {other.name!r}) are nested: a "
                        "request under both would belong to either; use prefixes that do "
                        "not contain one another, such as /s/coding and /s/chat",
                    )


def _prefixes(s: Section) -> tuple[str, ...]:
    prefixes = s.strings("path_prefix")
    for prefix in prefixes:
        if not prefix.startswith("/"):
            s.fail("path_prefix", f"{prefix!r} must start with / (such as /s/coding)")
        if prefix.endswith("/"):
            s.fail("path_prefix", f"{prefix!r} must not end with / (write {prefix.rstrip('/')!r})")
        if not _PREFIX.match(prefix):
            s.fail(
                "path_prefix",
                f"{prefix!r} must be path segments of letters, digits and . _ ~ - "
                "(such as /s/coding)",
            )
        reserved = next((r for r in _RESERVED if _segment_prefix(r, prefix)), None)
        if reserved is not None:
            s.fail(
                "path_prefix",
                f"{prefix!r} is under {reserved}, which Ollama or the proxy serves itself; "
                "choose a prefix of your own such as /s/coding",
            )
    if len(set(prefixes)) != len(prefixes):
        s.fail("path_prefix", "lists the same prefix twice")
    for ours in prefixes:
        for other in prefixes:
            if ours != other and _segment_prefix(ours, other):
                s.fail("path_prefix", f"{ours!r} and {other!r} are nested; list only one")
    return prefixes


def _key_names(s: Section) -> tuple[str, ...]:
    names = s.strings("api_key")
    for name in names:
        if not KEY_NAME.match(name):
            s.fail(
                "api_key",
                f"{name!r} is not a key name (letters, digits, . _ -, at most 64, as "
                "'seadragon-proxy keys add NAME' takes them)",
            )
    return names


def _globs(s: Section, name: str) -> tuple[Glob, ...]:
    return tuple(Glob.compile(p) for p in s.strings(name))


def _match(s: Section) -> Match:
    header = s.get("header")
    headers: list[tuple[str, tuple[Glob, ...]]] = []
    if header is not None:
        h = Section(header, file=s.file, key=s.path("header") or "header")
        for name in list(h.raw):
            headers.append((name, _globs(h, name)))
        h.done()
    client_ip = None
    if s.has("client_ip"):
        try:
            client_ip = NetworkSet(parse_network(t) for t in s.strings("client_ip"))
        except ValueError as e:
            s.fail("client_ip", str(e))
    whitelisted = s.flag("whitelisted", False) if s.has("whitelisted") else None
    result = Match(
        user_agent=_globs(s, "user_agent"),
        origin=tuple(Glob.compile(o.rstrip("/")) for o in s.strings("origin")),
        header=tuple(headers),
        client_ip=client_ip,
        path=_globs(s, "path"),
        model=_globs(s, "model"),
        whitelisted=whitelisted,
        path_prefix=_prefixes(s),
        api_key=_key_names(s),
    )
    s.done()
    return result
