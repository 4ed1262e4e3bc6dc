"""What every scenario gets: the fake's controls, the targets in column order, the sizes."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .targets import Fake, Target


@dataclass(frozen=True)
class Sizes:
    """How much each scenario does; ``quick()`` is for trying the harness out."""

    handoff_jobs: int = 200
    latency_requests: int = 2000
    ttfc_requests: int = 1000
    stream_tokens: int = 50_000
    stream_repeats: int = 7
    queue_sizes: tuple[int, ...] = (10, 1_000, 10_000)
    cpu_window: float = 3.0
    priority_jobs: int = 300

    @classmethod
    def quick(cls) -> Sizes:
        return cls(50, 200, 100, 5_000, 1, (10, 100, 1_000), 0.5, 60)


@dataclass
class Bench:
    fake: Fake
    targets: list[Target]
    sizes: Sizes
    details: dict[str, Any] = field(default_factory=dict)  # raw figures for the JSON file
    workdir: Path = field(default_factory=Path)  # the run's temporary directory
