"""File watching: call back when a watched file (or its SQLite journal) is written, renamed
into place or deleted. inotify through watchfiles, so nothing polls."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

import structlog
import watchfiles

log = structlog.get_logger("seadragon.watch")

Callback = Callable[[], Awaitable[object]]

DEBOUNCE_MS = 200  # changes within this are one reload: an editor's two-step save is one event
STEP_MS = 50
_COMPANIONS = ("", "-journal", "-wal")  # a SQLite write touches the file or one of these


async def watch_files(targets: Mapping[Path, Callback]) -> None:
    """Run forever (until cancelled), calling each target's callback when it changes.

    Directories are watched, not files, so a save that replaces the file (write a
    temporary file, rename it over) is seen like any other edit.
    """
    resolved = {path.resolve(): callback for path, callback in targets.items()}
    names = {path.parent / (path.name + suffix) for path in resolved for suffix in _COMPANIONS}
    dirs = sorted({path.parent for path in resolved if path.parent.is_dir()})
    if not dirs:
        return

    def interesting(_change: watchfiles.Change, name: str) -> bool:
        return Path(name) in names

    async for changes in watchfiles.awatch(
        *dirs,
        watch_filter=interesting,
        debounce=DEBOUNCE_MS,
        step=STEP_MS,
        recursive=False,
    ):
        touched = {Path(name) for _, name in changes}
        for path, callback in resolved.items():
            if any(t.parent == path.parent and t.name.startswith(path.name) for t in touched):
                log.debug("file_changed", path=str(path))
                await callback()
