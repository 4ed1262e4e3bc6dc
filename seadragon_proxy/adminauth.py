"""Who may use the operator routes: the admin token, the read-only metrics token, or (with
no token configured) a loopback client. Also decides ``admin.manage_models: admin``."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping

from .exceptions import Forbidden
from .netaddr import IPAddress
from .settings import AdminSettings, Secret


def bearer_matches(headers: Mapping[str, str], token: Secret) -> bool:
    given = headers.get("Authorization", "")
    expected = f"Bearer {token.reveal()}"
    # Hash both so the comparison takes the same time whatever the lengths.
    return hmac.compare_digest(
        hashlib.sha256(given.encode()).digest(), hashlib.sha256(expected.encode()).digest()
    )


def admin_grant(
    headers: Mapping[str, str],
    ip: IPAddress | None,
    admin: AdminSettings,
    *,
    metrics: bool = False,
) -> str:
    """How the request is allowed in (``token``, ``metrics_token``, ``loopback``), else raise
    ``Forbidden``. ``metrics``: /metrics, which the metrics token also opens."""
    if metrics and admin.metrics_token is not None and bearer_matches(headers, admin.metrics_token):
        return "metrics_token"
    if admin.token is not None:
        if not bearer_matches(headers, admin.token):
            raise Forbidden(
                "admin routes need the header 'Authorization: Bearer <token>' with the token "
                f"from ${admin.token_env}"
            )
        return "token"
    if ip is None or not ip.is_loopback:
        raise Forbidden(
            f"admin routes are open to loopback clients only until ${admin.token_env} "
            "is set; set it and send 'Authorization: Bearer <token>'"
        )
    return "loopback"


def check_manage_models(
    headers: Mapping[str, str], ip: IPAddress | None, whitelisted: bool, admin: AdminSettings
) -> str | None:
    """Raise ``Forbidden`` unless ``admin.manage_models`` lets this client pull, push,
    create, copy, delete or upload blobs. Returns ``"token"`` when the admin token was the
    proof (the caller then keeps the token from Ollama)."""
    mode = admin.manage_models
    if mode == "anyone":
        return None
    if mode == "whitelisted":
        if whitelisted:
            return None
        who = "the client's address is unknown" if ip is None else f"client {ip} is not whitelisted"
        raise Forbidden(
            f"model management (pull, push, create, copy, delete, blobs) is for whitelisted "
            f"clients only (admin.manage_models: whitelisted), and {who}"
        )
    try:
        grant = admin_grant(headers, ip, admin)
    except Forbidden as e:
        raise Forbidden(
            f"model management (pull, push, create, copy, delete, blobs) is for admins only "
            f"(admin.manage_models: admin): {e.message}"
        ) from None
    return grant if grant == "token" else None
