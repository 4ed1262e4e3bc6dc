"""Token counts read off a response as it passes: Ollama's final NDJSON line, its JSON body,
or an OpenAI ``usage`` object. Only a bounded tail is kept; the bytes are never changed."""

from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass

TAIL_LIMIT = 1 << 20  # the final generate line carries ``context``; a MiB is plenty


@dataclass(frozen=True, slots=True)
class Usage:
    eval_count: int = 0
    eval_duration_ns: int = 0
    prompt_eval_count: int = 0
    load_duration_ns: int = 0
    done_reason: str | None = None

    @property
    def tokens_per_second(self) -> float | None:
        if not self.eval_count or not self.eval_duration_ns:
            return None
        return self.eval_count / (self.eval_duration_ns / 1e9)


def _int(doc: dict[str, object], key: str) -> int:
    value = doc.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def usage_from(doc: object) -> Usage | None:
    """Usage from one decoded object: Ollama's final ``done`` object or an OpenAI body/chunk."""
    if not isinstance(doc, dict):
        return None
    if doc.get("done") is True:
        reason = doc.get("done_reason")
        return Usage(
            eval_count=_int(doc, "eval_count"),
            eval_duration_ns=_int(doc, "eval_duration"),
            prompt_eval_count=_int(doc, "prompt_eval_count"),
            load_duration_ns=_int(doc, "load_duration"),
            done_reason=reason if isinstance(reason, str) else None,
        )
    usage = doc.get("usage")
    if isinstance(usage, dict):
        return Usage(
            eval_count=_int(usage, "completion_tokens") or _int(usage, "output_tokens"),
            prompt_eval_count=_int(usage, "prompt_tokens") or _int(usage, "input_tokens"),
        )
    if "embeddings" in doc or "embedding" in doc:
        return Usage(prompt_eval_count=_int(doc, "prompt_eval_count"))
    return None


class UsageTail:
    """Feed it every chunk; ``usage()`` decodes the last object or SSE event at the end."""

    __slots__ = ("_chunks", "_size")

    def __init__(self) -> None:
        self._chunks: deque[bytes] = deque()
        self._size = 0

    def feed(self, chunk: bytes) -> None:
        self._chunks.append(chunk)
        self._size += len(chunk)
        while self._size - len(self._chunks[0]) >= TAIL_LIMIT:
            self._size -= len(self._chunks.popleft())

    def usage(self) -> Usage | None:
        """Look at the last few JSON objects only: usage is always at the very end."""
        candidates = 0
        for line in reversed(b"".join(self._chunks).splitlines()):
            line = line.strip()
            if line.startswith(b"data:"):
                line = line[5:].strip()
            if not line.startswith(b"{"):
                continue  # blank, "[DONE]", "event: ...", or a cut-off first line
            try:
                found = usage_from(json.loads(line))
            except ValueError:
                found = None
            if found is not None:
                return found
            candidates += 1
            if candidates == 3:
                break
        return None
