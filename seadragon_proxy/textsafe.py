"""Text a person reads: control characters escaped, length bounded.

Anything a client or a file can choose (model names, header values, notes, config keys)
goes through :func:`escape` before it reaches a terminal, so it cannot move the cursor,
recolour the screen, retitle the window or reorder the line (bidi overrides). Newlines
are kept only where the writer itself puts them (:class:`SafeText`).
"""

from __future__ import annotations

import re
from typing import TextIO

# C0, DEL, C1, lone surrogates, and the invisible format characters that reorder or hide
# text (bidi embeddings/overrides/isolates, zero-width, line/paragraph separators, BOM).
_UNSAFE = re.compile(
    "[\x00-\x1f\x7f-\x9f\ud800-\udfff\u061c\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff]"
)
_UNSAFE_EXCEPT_NEWLINE = re.compile(
    "[\x00-\x09\x0b-\x1f\x7f-\x9f\ud800-\udfff\u061c\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff]"
)


def _escaped(found: re.Match[str]) -> str:
    code = ord(found.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape(text: str) -> str:
    """``text`` with every control or invisible format character written as ``\\xNN`` or
    ``\\uNNNN``; printable text (any script, emoji) is unchanged."""
    return _UNSAFE.sub(_escaped, text)


def excerpt(text: str, limit: int = 200) -> str:
    """:func:`escape`, bounded to about ``limit`` characters (``…`` marks a cut)."""
    if len(text) > limit:
        return escape(text[:limit]) + "…"
    return escape(text)


class SafeText:
    """A text stream that escapes control characters other than newline on the way out."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        self._stream.write(_UNSAFE_EXCEPT_NEWLINE.sub(_escaped, text))
        return len(text)

    def flush(self) -> None:
        self._stream.flush()

    def isatty(self) -> bool:
        return self._stream.isatty()
