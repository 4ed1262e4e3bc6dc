"""structlog, configured once: key/value events, JSON when stderr is not a terminal,
colours when it is; the standard library's loggers (aiohttp, asyncio) go the same way.

Lines are rendered on the event loop but written by one background thread, so a slow
reader of stderr (a busy journald, a full pipe) never stalls request handling.
"""

from __future__ import annotations

import atexit
import logging
import queue
import re
import sys
import threading
from typing import Any, TextIO

import structlog
from aiohttp.http_exceptions import HttpProcessingError
from structlog.typing import EventDict, Processor, WrappedLogger

from .settings import LogSettings
from .textsafe import escape, excerpt

_SECRET_KEYS = frozenset({"authorization", "token", "admin_token", "api_key", "password", "secret"})


# A credential inside free text (an error message quoting a header): scheme kept, value not.
_CREDENTIAL = re.compile(r"(?i)\b(bearer|basic)(\s+)[^\s'\"\\,;]+")


def redact_secrets(_logger: WrappedLogger, _method: str, event: EventDict) -> EventDict:
    """Belt and braces: a value logged under a secret-sounding key is never written out,
    and a ``Bearer …``/``Basic …`` credential inside any text is replaced."""
    for key, value in event.items():
        if key.lower() in _SECRET_KEYS:
            event[key] = "[redacted]"
        elif isinstance(value, str) and _CREDENTIAL.search(value):
            event[key] = _CREDENTIAL.sub(r"\1\2[redacted]", value)
    return event


def escape_text(_logger: WrappedLogger, _method: str, event: EventDict) -> EventDict:
    """For the console: control characters in any value (a model name, a header, aiohttp's
    own messages) are escaped, so a log line cannot drive the operator's terminal."""
    for key, value in event.items():
        if isinstance(value, str) and not key.startswith("_"):
            event[key] = escape(value)
    return event


def bad_request_reason(error: HttpProcessingError) -> str:
    """What was wrong, without the request's bytes: aiohttp quotes the offending line (a
    ``Bearer`` token, a secret in a query string), so only the text before the quote stays."""
    first = str(error.message or type(error).__name__).splitlines()[0]
    first = re.split(r"""[:\s]*b?['"]""", first, maxsplit=1)[0].rstrip(" :.")
    return excerpt(first or type(error).__name__, 120)


class QuietBadRequests(logging.Filter):
    """aiohttp logs each malformed request (a scanner, TLS on the plain port, a smuggling
    attempt) with a traceback; one warning line without it, or its bytes, is enough."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], HttpProcessingError):
            error = record.exc_info[1]
            record.msg = "bad_http_request: %s (%s)"
            record.args = (bad_request_reason(error), type(error).__name__)
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.exc_info = record.exc_text = None
        return True


class LineWriter:
    """Writes finished log lines from a daemon thread; ``close()`` flushes what is queued."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self._lines: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="log-writer", daemon=True)
        self._thread.start()

    def put(self, line: str) -> None:
        self._lines.put(line)

    def _run(self) -> None:
        while (line := self._lines.get()) is not None:
            try:
                self.stream.write(line + "\n")
                if self._lines.empty():
                    self.stream.flush()
            except (OSError, ValueError):
                pass  # stderr gone: nothing sensible left to do with a log line

    def close(self) -> None:
        if self._thread.is_alive():
            self._lines.put(None)
            self._thread.join(timeout=5)


class QueuedLogger:
    """A structlog logger (``PrintLogger``'s interface) that hands lines to a LineWriter."""

    def __init__(self, writer: LineWriter) -> None:
        self._writer = writer

    def msg(self, message: str) -> None:
        self._writer.put(message)

    log = debug = info = warn = warning = error = critical = exception = fatal = msg


class QueuedHandler(logging.Handler):
    """The standard library's records, formatted here and written by the same thread."""

    def __init__(self, writer: LineWriter) -> None:
        super().__init__()
        self._writer = writer

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._writer.put(self.format(record))
        except Exception:
            self.handleError(record)


_writer: LineWriter | None = None


def configure_logging(
    settings: LogSettings, stream: TextIO | None = None, *, cache_loggers: bool = True
) -> None:
    """Configure structlog and the standard library's logging once, at start-up.

    ``cache_loggers=False`` keeps loggers re-configurable (tests reconfigure them).
    """
    global _writer
    out = stream if stream is not None else sys.stderr
    as_json = settings.format == "json" or (settings.format == "auto" and not out.isatty())
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        redact_secrets,
    ]
    renderer: Processor
    last: list[Processor] = []
    if as_json:  # json.dumps escapes every control character itself
        renderer = structlog.processors.JSONRenderer()
        shared.append(structlog.processors.format_exc_info)
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=out.isatty())
        last.append(escape_text)
    level = logging.getLevelNamesMapping()[settings.level.upper()]
    stop_logging()
    _writer = writer = LineWriter(out)
    atexit.register(stop_logging)
    structlog.configure(
        processors=[*shared, *last, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=lambda *_args: QueuedLogger(writer),
        cache_logger_on_first_use=cache_loggers,
    )
    handler = QueuedHandler(writer)
    handler.addFilter(QuietBadRequests())
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                *last,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(level, logging.INFO))
    # The canonical request line replaces aiohttp's access log; watchfiles' "N changes
    # detected" lines say nothing the reload events do not.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    logging.getLogger("watchfiles").setLevel(logging.WARNING)


def stop_logging() -> None:
    """Write out every queued line (called at exit, and before reconfiguring)."""
    global _writer
    if _writer is not None:
        _writer.close()
        _writer = None


def bind_request(**values: Any) -> None:
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(**values)
