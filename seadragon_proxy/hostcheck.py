"""The ``Host`` check against DNS rebinding: which host names the operator routes answer to.

Pure logic. An IP literal always passes (a rebound name is never an IP literal); a name
passes when it is ``localhost``, the machine's own name, ``server.host`` or listed in
``server.allowed_hosts``.
"""

from __future__ import annotations

import ipaddress
import socket
from functools import cache

from .policy import Glob


def split_host(header: str) -> str:
    """The host part of a ``Host`` header, lower case, without port or trailing dot."""
    host = header.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    name, sep, port = host.rpartition(":")
    if sep and port.isdigit():
        host = name
    return host.rstrip(".")


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


@cache
def machine_names() -> frozenset[str]:
    """``localhost`` and this machine's own name (``socket.gethostname()``, no DNS)."""
    name = socket.gethostname().lower().rstrip(".")
    return frozenset({"localhost", name, name.partition(".")[0]} - {""})


def host_allowed(header: str | None, listen_host: str, allowed: tuple[Glob, ...]) -> bool:
    """Whether a request with this ``Host`` may reach an operator route.

    No header at all (HTTP/1.0) cannot come from a browser, so it passes too.
    """
    if header is None:
        return True
    host = split_host(header)
    if _is_ip_literal(host) or host in machine_names():
        return True
    if host == split_host(listen_host):
        return True
    return any(glob.matches(host) for glob in allowed)


def refused_message(header: str) -> str:
    shown = split_host(header)[:100]
    return (
        f"host name {shown!r} is not one this proxy answers to for admin and model-management "
        f"routes; add it to server.allowed_hosts if it is really this machine"
    )
