"""The policy: ordered source rules that turn a request's facts into a source and a priority.

Pure logic: no I/O, no aiohttp. The first rule whose ``match`` holds wins; a rule
without ``match`` matches everything; no match means ``default_source``.
A ``path_prefix`` named by any rule is taken off the path before any rule looks at it
(``split_path``): the rules and Ollama see ``/api/chat``, the prefix is a fact of its own.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from .netaddr import IPAddress, NetworkSet
from .tenants import Fairness


@dataclass(frozen=True, slots=True)
class Glob:
    """A case-insensitive shell glob (``*Continue*``), compiled once."""

    pattern: str
    regex: re.Pattern[str] = field(compare=False, repr=False)

    @classmethod
    def compile(cls, pattern: str) -> Glob:
        return cls(pattern, re.compile(fnmatch.translate(pattern), re.IGNORECASE | re.DOTALL))

    def matches(self, value: str) -> bool:
        return self.regex.match(value) is not None


def _first(globs: tuple[Glob, ...], value: str | None) -> Glob | None:
    if value is None:
        return None
    for glob in globs:
        if glob.matches(value):
            return glob
    return None


@dataclass(frozen=True, slots=True)
class RequestFacts:
    """What the policy may look at. ``headers`` must be case-insensitive (a CIMultiDict)."""

    client_ip: IPAddress | None  # None: unknown (an unreadable X-Forwarded-For)
    path: str  # the path Ollama sees: the prefix (if any) and the /api/ollama alias removed
    headers: Mapping[str, str]
    model: str | None = None
    whitelisted: bool = False  # on the whitelist, or a known API key
    path_prefix: str | None = None  # the source prefix the request came under
    api_key: str | None = None  # the name of the known API key it carried
    on_whitelist: bool = False  # the address itself is on the whitelist (for the reasons)


@dataclass(frozen=True, slots=True)
class Match:
    """All given keys must hold; a tuple of globs holds if any of them matches."""

    user_agent: tuple[Glob, ...] = ()
    origin: tuple[Glob, ...] = ()
    header: tuple[tuple[str, tuple[Glob, ...]], ...] = ()
    client_ip: NetworkSet | None = None
    path: tuple[Glob, ...] = ()
    model: tuple[Glob, ...] = ()
    whitelisted: bool | None = None
    path_prefix: tuple[str, ...] = ()  # validated: /a/b, no trailing /, none nested in another
    api_key: tuple[str, ...] = ()  # key names (``seadragon-proxy keys add NAME``)

    def evaluate(self, facts: RequestFacts) -> tuple[str, ...] | None:
        """The reasons this match holds for ``facts``, or ``None`` if it does not."""
        reasons: list[str] = []
        checks = (
            ("user_agent", self.user_agent, facts.headers.get("User-Agent")),
            ("origin", self.origin, facts.headers.get("Origin")),
            ("path", self.path, facts.path),
            ("model", self.model, facts.model),
        )
        for key, globs, value in checks:
            if globs:
                hit = _first(globs, value)
                if hit is None:
                    return None
                reasons.append(f"{key} {value!r} matches {hit.pattern!r}")
        for name, globs in self.header:
            value = facts.headers.get(name)
            hit = _first(globs, value)
            if hit is None:
                return None
            reasons.append(f"header {name} {value!r} matches {hit.pattern!r}")
        if self.path_prefix:
            if facts.path_prefix not in self.path_prefix:
                return None
            reasons.append(f"path_prefix {facts.path_prefix!r}")
        if self.api_key:
            if facts.api_key not in self.api_key:
                return None
            reasons.append(f"api_key {facts.api_key!r}")
        if self.client_ip is not None:
            if facts.client_ip not in self.client_ip:
                return None
            reasons.append(
                f"client_ip {facts.client_ip} is in {', '.join(map(str, self.client_ip))}"
            )
        if self.whitelisted is not None:
            if facts.whitelisted != self.whitelisted:
                return None
            reasons.append(_whitelist_reason(facts))
        return tuple(reasons)

    def describe(self) -> str:
        parts = [
            f"{key} {' | '.join(g.pattern for g in globs)}"
            for key, globs in (
                ("user_agent", self.user_agent),
                ("origin", self.origin),
                ("path", self.path),
                ("model", self.model),
            )
            if globs
        ]
        parts += [f"header {n}: {' | '.join(g.pattern for g in globs)}" for n, globs in self.header]
        if self.path_prefix:
            parts.append(f"path_prefix {' | '.join(self.path_prefix)}")
        if self.api_key:
            parts.append(f"api_key {' | '.join(self.api_key)}")
        if self.client_ip is not None:
            parts.append(f"client_ip {' | '.join(map(str, self.client_ip))}")
        if self.whitelisted is not None:
            parts.append(f"whitelisted {str(self.whitelisted).lower()}")
        return "; ".join(parts) if parts else "everything"


def _whitelist_reason(facts: RequestFacts) -> str:
    if facts.on_whitelist:
        return f"client {facts.client_ip} is on the whitelist"
    if facts.whitelisted and facts.api_key is not None:
        return f"API key {facts.api_key!r} counts as whitelisted"
    state = "on" if facts.whitelisted else "not on"
    return f"client {facts.client_ip} is {state} the whitelist"


def split_path(prefixes: tuple[str, ...], path: str) -> tuple[str | None, str]:
    """``/s/coding/api/chat`` → ``("/s/coding", "/api/chat")`` when ``/s/coding`` is one of
    ``prefixes`` (whole segments only: ``/s/codingx`` is not under it); else ``(None, path)``."""
    for prefix in prefixes:
        if path.startswith(prefix):
            rest = path[len(prefix) :]
            if not rest:
                return prefix, "/"
            if rest[0] == "/":
                return prefix, rest
    return None, path


@dataclass(frozen=True, slots=True)
class Source:
    name: str
    priority: int
    match: Match | None = None
    require_whitelist: bool = False
    max_wait: float | None = None  # seconds; None = queue.max_wait, 0 = no limit
    fairness: Fairness = field(default_factory=Fairness)  # fair_by, weights, limits


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of classification: the source, and why (for ``explain`` and logs)."""

    source: Source
    rule_index: int | None  # position in ``sources``; None when default_source decided
    reasons: tuple[str, ...]

    @property
    def priority(self) -> int:
        return self.source.priority

    def explain(self) -> str:
        if self.rule_index is None:
            return f"no rule matched, so default_source {self.source.name!r} applies"
        why = (
            "; ".join(self.reasons)
            if self.reasons
            else "the rule has no match, so it matches everything"
        )
        return f"rule sources[{self.rule_index}] {self.source.name!r} matched: {why}"


@dataclass(frozen=True, slots=True)
class Policy:
    sources: tuple[Source, ...]
    default: Source
    prefixes: tuple[str, ...] = field(init=False, compare=False)

    def __post_init__(self) -> None:
        found = {p for s in self.sources if s.match for p in s.match.path_prefix}
        object.__setattr__(self, "prefixes", tuple(sorted(found)))

    def split_path(self, path: str) -> tuple[str | None, str]:
        """The source prefix a request came under (if any) and the path without it."""
        if not self.prefixes:
            return None, path
        return split_path(self.prefixes, path)

    def classify(self, facts: RequestFacts) -> Decision:
        for index, source in enumerate(self.sources):
            if source.match is None:
                return Decision(source, index, ())
            reasons = source.match.evaluate(facts)
            if reasons is not None:
                return Decision(source, index, reasons)
        return Decision(self.default, None, ())

    def could_accept(self, facts: RequestFacts) -> bool:
        """Whether some source could accept a request with these facts whatever its model
        (``facts.model`` is ignored): ``False`` refuses it before its body is read."""
        for source in self.sources:
            match = source.match
            if match is not None and replace(match, model=()).evaluate(facts) is None:
                continue  # fails on what is known already, whatever the model
            if not source.require_whitelist or facts.whitelisted:
                return True
            if match is None or not match.model:
                return False  # this rule decides for every model, and refuses
        return not self.default.require_whitelist or facts.whitelisted

    def source(self, name: str) -> Source | None:
        return next((s for s in self.sources if s.name == name), None)
