"""The admin routes (``Authorization: Bearer $API_ADMIN_KEY``): API keys and tenants'
quotas. A tenant's quota is the same rule set a Discord guild has (``jobs.quotas``)."""

from __future__ import annotations

import re
from typing import Any

from aiohttp import web
from pydantic import ValidationError

from api.auth import admin
from api.context import state
from api.http import field_errors, json_response, read_json
from api.keys import TENANT_PATTERN, ApiKey
from api.models import KeyCreated, KeyList, KeyRequest, KeyView, QuotaChange, TenantQuota
from api.problems import invalid, not_found
from workflows import FieldError

routes = web.RouteTableDef()

#: List settings where ``null`` means "none" rather than "no limit".
_LISTS = ("banned_words", "nsfw_workflows")


def _view(key: ApiKey) -> KeyView:
    return KeyView(
        key_id=key.key_id,
        tenant=key.tenant,
        name=key.name,
        created_at=key.created_at,
        revoked_at=key.revoked_at,
    )


def _tenant(request: web.Request) -> str:
    tenant = request.match_info["tenant"]
    if not re.fullmatch(TENANT_PATTERN, tenant):
        raise invalid([FieldError("tenant", "tenant: 1 to 64 letters, digits, '.', '_' or '-'")])
    return tenant


@routes.post("/v1/admin/keys")
async def create_key(request: web.Request) -> web.Response:
    await admin(request)
    try:
        wanted = KeyRequest.model_validate(await read_json(request))
    except ValidationError as exc:
        raise invalid(field_errors(exc, KeyRequest)) from exc
    created = await state(request).services.keys.create(wanted.tenant, wanted.name)
    body = KeyCreated(key=created.key, **_view(created.info).model_dump())
    return json_response(body, 201, {"Location": f"/v1/admin/keys/{created.info.key_id}"})


@routes.get("/v1/admin/keys")
async def list_keys(request: web.Request) -> web.Response:
    await admin(request)
    tenant = request.query.get("tenant")
    keys = await state(request).services.keys.list(tenant)
    return json_response(KeyList(keys=[_view(key) for key in keys]))


@routes.delete("/v1/admin/keys/{key_id}")
async def revoke_key(request: web.Request) -> web.Response:
    await admin(request)
    key_id = request.match_info["key_id"]
    revoked = await state(request).services.keys.revoke(key_id)
    if revoked is None:
        raise not_found(f"No API key {key_id!r}.")
    return json_response(_view(revoked))


@routes.get("/v1/admin/tenants/{tenant}/quota")
async def get_quota(request: web.Request) -> web.Response:
    await admin(request)
    tenant = _tenant(request)
    services = state(request).services
    limits = await services.ledger.quota(tenant, services.quota_defaults)
    return json_response(TenantQuota(tenant=tenant, limits=limits))


@routes.patch("/v1/admin/tenants/{tenant}/quota")
async def set_quota(request: web.Request) -> web.Response:
    await admin(request)
    tenant = _tenant(request)
    try:
        change = QuotaChange.model_validate(await read_json(request))
    except ValidationError as exc:
        raise invalid(field_errors(exc, QuotaChange)) from exc
    changes: dict[str, Any] = change.model_dump(exclude_unset=True)
    for name in _LISTS:
        if name in changes and changes[name] is None:
            changes[name] = []
    services = state(request).services
    try:
        limits = await services.ledger.set_quota(tenant, changes, services.quota_defaults)
    except ValidationError as exc:  # pragma: no cover - QuotaChange has the same bounds
        raise invalid(field_errors(exc, QuotaChange)) from exc
    return json_response(TenantQuota(tenant=tenant, limits=limits))
