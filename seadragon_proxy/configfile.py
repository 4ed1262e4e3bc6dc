"""Typed, validated reads from a parsed YAML mapping; every error names the file and dotted key."""

from __future__ import annotations

import math
import re
import reprlib
from collections.abc import Mapping
from typing import Any, NoReturn

from .exceptions import ConfigError

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)


QUOTE = 60  # characters of the file an error message may quote

# reprlib stops at a few items per level and two levels down, so describing a value costs
# the same whether it is one string or an alias bomb that expands to millions of items.
_repr = reprlib.Repr()
_repr.maxlevel = 2
_repr.maxlist = _repr.maxtuple = _repr.maxdict = _repr.maxset = 4
_repr.maxstring = _repr.maxother = _repr.maxlong = QUOTE


def clip(text: str, limit: int = QUOTE) -> str:
    """``text`` cut to ``limit`` characters, ``...`` marking the cut."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe(value: object) -> str:
    """A value from the file as an error message quotes it: at most ``QUOTE`` characters,
    found in bounded work."""
    if value is None:
        return "nothing"
    return clip(_repr.repr(value))


def kind(value: object) -> str:
    """What a value is, without quoting it (for a file that may not be a config at all)."""
    names = {str: "text", list: "a list", int: "a number", float: "a number", bool: "true/false"}
    return names.get(type(value), type(value).__name__)


class Section:
    """A mapping from the file, read key by key; unknown keys are reported by :meth:`done`."""

    def __init__(self, raw: object, *, file: str, key: str) -> None:
        self.file = file
        self.key = key
        if raw is None:
            raw = {}
        if not isinstance(raw, Mapping):
            # The whole file quoted could be a secret the --config path led to by mistake.
            got = kind(raw) if not key else describe(raw)
            self.fail(None, f"must be a mapping of keys to values, got {got}")
        bad = [k for k in raw if not isinstance(k, str)]
        if bad:
            self.fail(None, f"keys must be strings, got {describe(bad[0])}")
        self.raw: Mapping[str, Any] = raw
        self._read: set[str] = set()

    def path(self, name: str | None) -> str | None:
        if name is None:
            return self.key or None
        return f"{self.key}.{name}" if self.key else name

    def fail(self, name: str | None, problem: str) -> NoReturn:
        raise ConfigError(self.file, self.path(name), problem)

    def has(self, name: str) -> bool:
        return name in self.raw

    def get(self, name: str) -> Any:
        self._read.add(name)
        return self.raw.get(name)

    def section(self, name: str) -> Section:
        return Section(self.get(name), file=self.file, key=self.path(name) or name)

    def done(self) -> None:
        unknown = [k for k in self.raw if k not in self._read]
        if unknown:
            known = ", ".join(sorted(self._read))
            self.fail(unknown[0], f"unknown key (known keys here: {known})")

    # -- scalars -----------------------------------------------------------------

    def text(self, name: str, default: str, *, nonempty: bool = True) -> str:
        value = self.get(name)
        if value is None:
            return default
        if not isinstance(value, str) or (nonempty and not value.strip()):
            self.fail(name, f"must be a non-empty string, got {describe(value)}")
        return value

    def flag(self, name: str, default: bool) -> bool:
        value = self.get(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            self.fail(name, f"must be true or false, got {describe(value)}")
        return value

    def integer(
        self, name: str, default: int, *, min: int | None = None, max: int | None = None
    ) -> int:
        value = self.get(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(name, f"must be a whole number, got {describe(value)}")
        self._bounds(name, value, min, max)
        return value

    def seconds(self, name: str, default: float, *, min: float = 0.0) -> float:
        value = self.get(name)
        if value is None:
            return default
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
        ):
            self.fail(name, f"must be a number of seconds, got {describe(value)}")
        self._bounds(name, value, min, None)
        return float(value)

    def size(self, name: str, default: int, *, min: int = 1) -> int:
        """A byte count: a whole number, or text such as ``64MiB``, ``512 KB``, ``1G``."""
        value = self.get(name)
        if value is None:
            return default
        if isinstance(value, bool):
            self.fail(name, f"must be a size such as 65536 or 64MiB, got {describe(value)}")
        if isinstance(value, int):
            size = value
        else:
            found = _SIZE.match(str(value))
            if not found:
                self.fail(name, f"must be a size such as 65536 or 64MiB, got {describe(value)}")
            unit = (found.group(2) or "").lower().rstrip("b")  # "", "k", "ki", "m", "mi", ...
            base = 1024 if unit.endswith("i") else 1000
            scale = base ** ("kmgt".index(unit[0]) + 1) if unit else 1
            size = int(float(found.group(1)) * scale)
        self._bounds(name, size, min, None)
        return size

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.get(name)
        if value is None:
            return default
        if value not in choices:
            self.fail(name, f"must be one of {', '.join(choices)}; got {describe(value)}")
        assert isinstance(value, str)
        return value

    def strings(
        self, name: str, default: tuple[str, ...] = (), *, allow_empty: bool = False
    ) -> tuple[str, ...]:
        """A string or a list of strings; an empty list is an error unless ``allow_empty``
        (a pattern list that is empty could never match)."""
        value = self.get(name)
        if value is None:
            return default
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(i, str) and i for i in items):
            self.fail(name, f"must be a string or a list of strings, got {describe(value)}")
        if not items and not allow_empty:
            self.fail(name, "is an empty list; remove the key or list at least one value")
        return tuple(items)

    def _bounds(self, name: str, value: float, lo: float | None, hi: float | None) -> None:
        if lo is not None and value < lo:
            self.fail(name, f"must be at least {lo:g}, got {value:g}")
        if hi is not None and value > hi:
            self.fail(name, f"must be at most {hi:g}, got {value:g}")
