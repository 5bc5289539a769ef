"""API keys: who is calling, and for which tenant.

A key is ``brg_<id>_<secret>``: ``id`` is 12 hex digits that name the key (in lists,
logs and revocations), ``secret`` is 32 random bytes (``secrets.token_urlsafe``). Only
the SHA-256 of the whole key is stored (table ``api_keys`` in the ledger's file); the
key itself is shown once, when it is created. A plain SHA-256 is the right hash here: a
key carries 256 random bits, so there is nothing for a slow hash to protect against
guessing, and checking a key costs one hash. Lookups go by ``id`` and the hashes are
compared in constant time.

Each key belongs to one tenant; the tenant is ``Origin.tenant`` of the jobs it submits
and the unit of quotas (``ledger.set_quota(tenant, ...)``), as a Discord guild is.
The admin key (``API_ADMIN_KEY``) is not stored here: it comes from the settings.

Ephemeral keys live in memory only, for this process: the status page's local key (see
``api.page``) is one.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import datetime

import sqlite_utils

from api.database import ApiDatabase
from jobs.models import utcnow
from jobs.sql import immediate, insert_row

KEY_PREFIX = "brg_"
#: Tenants are names people type: ``acme``, ``team-7``, ``local``.
TENANT_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"
_KEY = re.compile(r"^brg_([0-9a-f]{12})_([A-Za-z0-9_-]{43})$")


@dataclass(frozen=True, slots=True)
class Principal:
    """Who made a request: a key of a tenant."""

    key_id: str
    tenant: str


@dataclass(frozen=True, slots=True)
class ApiKey:
    """A key as an admin sees it: never the key itself."""

    key_id: str
    tenant: str
    name: str | None
    created_at: datetime
    revoked_at: datetime | None


@dataclass(frozen=True, slots=True)
class NewKey:
    """A key just created: ``key`` is shown this once and stored nowhere."""

    key: str
    info: ApiKey


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def make_key() -> tuple[str, str]:
    """A new ``(key_id, key)``."""
    while True:
        key_id = secrets.token_hex(6)
        key = f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
        if _KEY.match(key):  # token_urlsafe(32) is always 43 characters; be sure anyway
            return key_id, key


class KeyStore:
    def __init__(self, db: ApiDatabase) -> None:
        self._db = db
        self._ephemeral: dict[str, tuple[str, Principal]] = {}

    async def create(self, tenant: str, name: str | None = None) -> NewKey:
        """A new key for ``tenant``."""
        if not re.match(TENANT_PATTERN, tenant):
            raise ValueError(f"tenant {tenant!r}: use 1 to 64 letters, digits, '.', '_', '-'")
        key_id, key = make_key()
        created = utcnow()

        def insert(db: sqlite_utils.Database) -> None:
            with immediate(db):
                insert_row(
                    db,
                    "api_keys",
                    {
                        "key_id": key_id,
                        "tenant": tenant,
                        "name": name,
                        "key_sha256": digest(key),
                        "created_at": created.isoformat(),
                        "revoked_at": None,
                    },
                )

        await self._db.run(insert)
        return NewKey(key, ApiKey(key_id, tenant, name, created, None))

    def ephemeral(self, tenant: str) -> str:
        """A key for ``tenant`` that lives in this process's memory only."""
        key_id, key = make_key()
        self._ephemeral[key_id] = (digest(key), Principal(key_id, tenant))
        return key

    async def authenticate(self, presented: str) -> Principal | None:
        """The principal of ``presented``, or None: unknown, malformed or revoked."""
        match = _KEY.match(presented)
        if match is None:
            return None
        key_id = match.group(1)
        presented_digest = digest(presented)
        if key_id in self._ephemeral:
            stored, principal = self._ephemeral[key_id]
            return principal if hmac.compare_digest(stored, presented_digest) else None

        def read(db: sqlite_utils.Database) -> tuple[str, str] | None:
            row = db.execute(
                "SELECT key_sha256, tenant FROM api_keys WHERE key_id = ? AND revoked_at IS NULL",
                [key_id],
            ).fetchone()
            return None if row is None else (str(row[0]), str(row[1]))

        found = await self._db.run(read)
        if found is None or not hmac.compare_digest(found[0], presented_digest):
            return None
        return Principal(key_id, found[1])

    async def revoke(self, key_id: str) -> ApiKey | None:
        """Revoke a key at once. Returns it, or None when there is no such key."""
        now = utcnow().isoformat()

        def write(db: sqlite_utils.Database) -> ApiKey | None:
            with immediate(db):
                db.execute(
                    "UPDATE api_keys SET revoked_at = ? WHERE key_id = ? AND revoked_at IS NULL",
                    [now, key_id],
                )
                rows = _select(db, "key_id = ?", [key_id])
            return rows[0] if rows else None

        return await self._db.run(write)

    async def list(self, tenant: str | None = None) -> list[ApiKey]:
        """Every key (of ``tenant``), oldest first, revoked ones included."""
        if tenant is None:
            return await self._db.run(lambda db: _select(db, "1 = 1", []))
        return await self._db.run(lambda db: _select(db, "tenant = ?", [tenant]))


def _select(db: sqlite_utils.Database, where: str, params: list[str]) -> list[ApiKey]:
    rows = db.execute(
        "SELECT key_id, tenant, name, created_at, revoked_at FROM api_keys "
        f"WHERE {where} ORDER BY created_at, key_id",
        params,
    ).fetchall()
    return [
        ApiKey(
            key_id=str(key_id),
            tenant=str(tenant),
            name=name,
            created_at=datetime.fromisoformat(created_at),
            revoked_at=datetime.fromisoformat(revoked_at) if revoked_at else None,
        )
        for key_id, tenant, name, created_at, revoked_at in rows
    ]
