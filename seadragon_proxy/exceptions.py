"""The errors seadragon-proxy raises; request errors carry the HTTP status they become.

    SeadragonError
    ├── ConfigError              the YAML file is wrong; names the file and the dotted key
    ├── DatabaseError            the SQLite file (whitelist, history) cannot be read or written
    └── RequestError             a request cannot be served (rendered once, in middlewares.py)
        ├── BadRequest           400  body not a JSON object, model missing or not a string
        ├── Forbidden            403  not whitelisted, admin route without the token
        ├── NotFound             404  an admin resource that does not exist
        ├── Conflict             409  an API key of that name exists already
        ├── PayloadTooLarge      413  body over server.max_body or server.max_json_elements
        ├── UnsupportedEncoding  415  a request body with a Content-Encoding the route cannot take
        ├── TenantLimited        429  a tenant's limits.max_queued or limits.tokens_per_hour
        ├── RequestTimeout       408  the client stopped sending its body
        ├── UpstreamUnavailable  502  Ollama refuses connections or hung up before answering
        ├── QueueFull            503  queue.max_size reached (Ollama's own message)
        ├── QueueTimeout         503  waited longer than queue.max_wait
        ├── ShuttingDown         503  the proxy is stopping
        ├── RedisUnavailable     503  queue.backend redis and Redis cannot be reached
        ├── Unavailable          503  the database behind an admin route cannot be read
        ├── BodiesFull           503  request bodies in progress hold server.max_body_memory
        ├── UpstreamTimeout      504  Ollama accepted the request but said nothing for idle_timeout
        └── LoopDetected         508  upstream.url leads back to this proxy

Invalid addresses are plain ``ValueError``s from :mod:`seadragon_proxy.netaddr`.
"""

from __future__ import annotations


class SeadragonError(Exception):
    """Base of every error this package raises on purpose."""


class ConfigError(SeadragonError):
    """The configuration file cannot be used; the message names the file and the key."""

    def __init__(self, file: str, key: str | None, problem: str) -> None:
        self.file = file
        self.key = key
        self.problem = problem
        # A key is the file's own text: a key thousands of characters long is quoted cut.
        shown = key if key is None or len(key) <= 120 else key[:117] + "..."
        where = f"{file}: {shown}" if shown else file
        super().__init__(f"{where}: {problem}")


class DatabaseError(SeadragonError):
    """The SQLite database cannot be used; the message says what to do."""


class RequestError(SeadragonError):
    """A request that gets an error answer instead of being forwarded."""

    status = 500
    openai_type = "api_error"

    def __init__(self, message: str, *, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


class BadRequest(RequestError):
    status = 400
    openai_type = "invalid_request_error"


class Forbidden(RequestError):
    status = 403
    openai_type = "permission_error"


class NotFound(RequestError):
    status = 404
    openai_type = "not_found_error"


class Conflict(RequestError):
    status = 409
    openai_type = "invalid_request_error"


class RequestTimeout(RequestError):
    status = 408
    openai_type = "invalid_request_error"


class PayloadTooLarge(RequestError):
    status = 413
    openai_type = "invalid_request_error"


class UnsupportedEncoding(RequestError):
    status = 415
    openai_type = "invalid_request_error"


class TenantLimited(RequestError):
    """A tenant of a source is over one of its ``limits``; ``limit`` names which."""

    status = 429

    def __init__(self, message: str, *, limit: str, retry_after: int) -> None:
        super().__init__(message, retry_after=retry_after)
        self.limit = limit
        # OpenAI's own types for a rate limit: on requests, or on tokens.
        self.openai_type = "tokens" if limit == "tokens_per_hour" else "requests"


class UpstreamUnavailable(RequestError):
    status = 502

    def __init__(self, message: str, *, reached: bool = False) -> None:
        super().__init__(message)
        self.reached = reached  # Ollama may have seen the request (it hung up before answering)


class QueueFull(RequestError):
    status = 503

    # Ollama's own text, two spaces and all (server/sched.go ErrMaxQueue).
    MESSAGE = "server busy, please try again.  maximum pending requests exceeded"

    def __init__(self, *, retry_after: int) -> None:
        super().__init__(self.MESSAGE, retry_after=retry_after)


class QueueTimeout(RequestError):
    status = 503


class ShuttingDown(RequestError):
    status = 503

    def __init__(self) -> None:
        super().__init__("seadragon-proxy is shutting down; try again shortly", retry_after=5)


class RedisUnavailable(RequestError):
    """``queue.backend: redis`` and this replica cannot reach Redis: no turn can be granted."""

    status = 503

    def __init__(self, reason: str | None) -> None:
        super().__init__(
            f"{reason or 'Redis is unreachable'}; inference waits for the shared queue, "
            "try again shortly",
            retry_after=2,
        )


class Unavailable(RequestError):
    status = 503


class BodiesFull(RequestError):
    status = 503


class UpstreamTimeout(RequestError):
    status = 504


class LoopDetected(RequestError):
    status = 508
