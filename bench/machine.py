"""What a result was measured on: the machine, the software, and the proxy's source state
(the package may have uncommitted edits; the JSON says so)."""

from __future__ import annotations

import asyncio
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import aiohttp

import seadragon_proxy

from .runtime import loop_version

ROOT = Path(__file__).resolve().parents[1]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict[str, Any]:
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "load_average_at_start": os.getloadavg(),
    }


def software(haproxy: str | None) -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        "uvloop": loop_version("uvloop"),
        "seadragon_proxy": seadragon_proxy.__version__,
        "haproxy": haproxy,
    }


async def _git(*args: str) -> str | None:
    try:
        process = await asyncio.create_subprocess_exec(
            "git", *args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
        )
        async with asyncio.timeout(10):
            output, _ = await process.communicate()
    except (OSError, TimeoutError):
        return None
    return output.decode().rstrip("\n") if process.returncode == 0 else None


async def revision() -> dict[str, Any]:
    """The commit, and the package files that differ from it (read-only git commands)."""
    changed = await _git("status", "--porcelain", "--", "seadragon_proxy")
    return {
        "commit": await _git("rev-parse", "--short", "HEAD"),  # porcelain lines: "XY path"
        "uncommitted": [line[3:] for line in changed.splitlines()] if changed else [],
    }
