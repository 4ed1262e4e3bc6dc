"""Optional sampling of the proxy with py-spy (``--profile DIR``) while a scenario runs.

``py-spy record --format raw`` writes collapsed stacks; ``summary()`` turns them into the
functions that hold the most samples, by their own time, and the proxy's own functions
inclusive of what they call. py-spy pauses the process for each sample (``--nonblocking``
gives torn stacks), so the figures of a profiled run are not comparable with others.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

RATE = 1000  # samples per second


@contextlib.asynccontextmanager
async def sampled(pid: int, out: Path) -> AsyncIterator[None]:
    """Record ``pid`` into ``out`` for the duration of the block (no-op without py-spy)."""
    py_spy = shutil.which("py-spy") or _beside_python("py-spy")
    if py_spy is None:
        yield
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    log = out.with_suffix(".log").open("wb")
    process = await asyncio.create_subprocess_exec(
        py_spy,
        "record",
        "--pid",
        str(pid),
        "--rate",
        str(RATE),
        "--format",
        "raw",
        "--output",
        str(out),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        yield
    finally:
        process.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
        try:
            async with asyncio.timeout(20):
                await process.wait()
        except TimeoutError:
            process.kill()
            await process.wait()
        log.close()


def _beside_python(name: str) -> str | None:
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else None


IDLE_LEAVES = (
    "EpollSelector.select",  # asyncio waiting in epoll, when py-spy takes it for busy
    "Runner.run",  # uvloop's loop is C: its epoll wait shows as the runner's frame
    "BaseEventLoop.run_until_complete",
)


def summary(raw: Path, top: int = 15) -> str:
    """The event loop thread's busy samples: the ``top`` functions by own time, and the
    proxy's functions inclusive of what they call. Other threads (the log writer, the file
    watcher) and idle samples are left out."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = idle = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit() or not stack.startswith("_run_module_as_main"):
            continue  # not the main (event loop) thread
        frames = [_short(frame) for frame in stack.split(";")]
        n = int(count)
        if frames[-1].startswith(IDLE_LEAVES):
            idle += n
            continue
        total += n
        own[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
    if not total:
        return f"{raw.name}: no busy samples"
    lines = [f"{raw.name}: {total} busy samples of the loop thread ({idle} idle left out)"]
    lines.append("  by own time:")
    lines += [f"    {n / total:6.1%}  {frame}" for frame, n in own.most_common(top)]
    lines.append("  seadragon_proxy functions, inclusive:")
    ours = Counter({f: n for f, n in inclusive.items() if "seadragon_proxy/" in f})
    lines += [f"    {n / total:6.1%}  {frame}" for frame, n in ours.most_common(top)]
    return "\n".join(lines)


def _short(frame: str) -> str:
    """``func (path/to/module.py:123)`` -> ``func (module.py)``: lines vary, names do not."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    parts = Path(path).parts
    return f"{name} ({'/'.join(parts[-2:])})" if parts else name
