"""The one table: a row per figure, a column per target, the proxy against the direct
baseline, and the target it is held to; plus the same figures as JSON."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

Compare = Literal["ratio", "diff", ""]
COLUMNS = ("direct", "proxy", "proxy-redis", "haproxy", "affinity", "nginx")  # the last two: 7-8
DECIMALS = {
    "ms": 3,
    "s": 2,
    "MB/s": 1,
    "MB": 1,
    "KB": 1,
    "%": 1,
    "jobs": 1,
    "count": 0,
    "µs": 0,
    "req/s": 0,
}


class MissingFigure(LookupError):
    """A row has no figure for a target (its scenario failed, or it does not apply)."""


@dataclass
class Row:
    """One figure for every target. ``compare`` is how the proxy is set against direct;
    ``goal`` is the target as printed and ``passed`` its verdict (``None``: no target)."""

    scenario: str
    metric: str
    unit: str
    values: dict[str, float | None]
    compare: Compare = ""
    goal: str = ""
    passed: bool | None = None

    def value(self, name: str) -> float:
        """The figure for ``name``; ``MissingFigure`` if there is none."""
        value = self.values.get(name)
        if value is None or math.isnan(value):
            raise MissingFigure(f"{self.metric}: no figure for {name}")
        return value

    def comparison(self) -> float | None:
        proxy, direct = self.values.get("proxy"), self.values.get("direct")
        if proxy is None or direct is None or math.isnan(proxy) or math.isnan(direct):
            return None
        if self.compare == "diff":
            return proxy - direct
        if self.compare == "ratio":
            return proxy / direct if direct else None
        return None

    def judge(self, goal: str, check: Callable[[Row], bool]) -> Row:
        """Set the target and its verdict; a missing figure is a miss."""
        self.goal = goal
        try:
            self.passed = bool(check(self))
        except (MissingFigure, ZeroDivisionError):
            self.passed = False
        return self


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def columns(self) -> list[str]:
        present = {name for row in self.rows for name in row.values}
        return [name for name in COLUMNS if name in present] or ["direct", "proxy"]


def _number(value: float | None, unit: str) -> str:
    if value is None or math.isnan(value):
        return "n/a"
    return f"{value:.{DECIMALS.get(unit, 3)}f}"


def _comparison(row: Row) -> str:
    value = row.comparison()
    if value is None:
        return ""
    if row.compare == "ratio":
        return f"{value:.2f}x"
    return f"{value:+.{DECIMALS.get(row.unit, 3)}f} {row.unit}"


def render(report: Report) -> str:
    """The table as printed (and pasted into docs/performance.md)."""
    columns = report.columns()
    head = ["scenario", "metric", *columns, "proxy vs direct", "target (proxy)"]
    lines: list[list[str]] = []
    for row in report.rows:
        verdict = "" if row.passed is None else ("pass" if row.passed else "MISS")
        metric = f"{row.metric} ({row.unit})" if row.unit else row.metric
        cells = [_number(row.values.get(name), row.unit) for name in columns]
        target = f"{row.goal}  {verdict}".strip()
        lines.append([row.scenario, metric, *cells, _comparison(row), target])
    widths = [max(len(r[i]) for r in [head, *lines]) for i in range(len(head))]
    numeric = range(2, 2 + len(columns) + 1)

    def fmt(cells: Sequence[str]) -> str:
        return "  ".join(
            c.rjust(w) if i in numeric else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    rule = "  ".join("-" * w for w in widths)
    out = [fmt(head), rule]
    previous = ""
    for row, cells in zip(report.rows, lines, strict=True):
        if previous and row.scenario != previous:
            out.append("")
        previous = row.scenario
        out.append(fmt(cells))
    out.extend(f"error: {e}" for e in report.errors)
    return "\n".join(out)


def write_json(path: Path, report: Report, meta: dict[str, Any]) -> None:
    rows = []
    for row in report.rows:
        doc = asdict(row)
        doc["proxy_vs_direct"] = row.comparison()
        rows.append(doc)
    doc = meta | {"rows": rows, "errors": report.errors}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_no_nan(doc), indent=1) + "\n")


def _no_nan(value: Any) -> Any:
    """NaN is not JSON: it becomes null."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _no_nan(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_no_nan(v) for v in value]
    return value
