"""Who is calling: ``Authorization: Bearer <key>`` on every ``/v1/`` route.

* a tenant's key (``api.keys``) for the job, workflow, queue and worker routes;
* the admin key (``API_ADMIN_KEY``) for ``/v1/admin/``. A tenant's key there is 403;
  the admin key on a tenant route is 403 too (it has no tenant, so no quota).

Keys travel only in that header, never in a URL (URLs end up in logs and histories);
the status page reads event streams with ``fetch`` for that reason, not ``EventSource``.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress

from aiohttp import web

from api.context import state
from api.keys import Principal
from api.problems import forbidden, unauthorized


def _bearer(request: web.Request) -> str:
    header = request.headers.get("Authorization")
    if header is None:
        raise unauthorized("Send the key as 'Authorization: Bearer <key>'.")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise unauthorized("The Authorization header must be 'Bearer <key>'.")
    return key.strip()


def _is_admin_key(request: web.Request, key: str) -> bool:
    admin = state(request).settings.admin_key
    if admin is None:
        return False
    wanted = hashlib.sha256(admin.get_secret_value().encode()).digest()
    return hmac.compare_digest(wanted, hashlib.sha256(key.encode()).digest())


async def tenant(request: web.Request) -> Principal:
    """The tenant key's principal, or 401 (no or bad key) / 403 (the admin key)."""
    key = _bearer(request)
    if _is_admin_key(request, key):
        raise forbidden("The admin key has no tenant: use a tenant's key here.")
    principal = await state(request).services.keys.authenticate(key)
    if principal is None:
        raise unauthorized("This API key is unknown or revoked.")
    return principal


async def admin(request: web.Request) -> None:
    """Return when the caller is the admin, else 401 (no or bad key) / 403 (a tenant's key)."""
    key = _bearer(request)
    if _is_admin_key(request, key):
        return
    if await state(request).services.keys.authenticate(key) is not None:
        raise forbidden("This route needs the admin key (API_ADMIN_KEY).")
    raise unauthorized("This key is not the admin key.")


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address to bind, or a Host header's name) is this machine only."""
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
