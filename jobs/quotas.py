"""Quotas: what a tenant (a Discord guild, an API tenant) may ask for, and how much.

Two kinds of rule, checked at admission:

* **Rules on the request** (:func:`check_request`): allowed workflows and lanes, largest
  steps, pixels and count, banned words, NSFW-only workflows outside age-restricted
  channels. Pure: they need no counting.
* **Counted limits** (:func:`reserve`): images per day for the tenant and per user,
  jobs in flight per user, jobs pending for the tenant. Checked and reserved in the same
  SQLite transaction that writes the job row, so two concurrent submits cannot both take
  the last image. A job that fails (cancelled included) gets its images back
  (:func:`settle`): a job that did not render costs nothing.

Days are UTC days. ``None`` means "no limit". A tenant without its own settings gets the
defaults (``QUOTA_*``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlite_utils
from pydantic import BaseModel, ConfigDict, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from jobs.exceptions import PermanentError
from jobs.models import Job
from jobs.sql import insert_row
from workflows import FieldError


class QuotaSettings(BaseModel):
    """One tenant's limits. Every field is optional; ``None`` means no limit."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    images_per_day: int | None = Field(default=None, ge=0)
    images_per_user_per_day: int | None = Field(default=None, ge=0)
    concurrent_per_user: int | None = Field(default=None, ge=0)
    pending_per_tenant: int | None = Field(default=None, ge=0)
    max_steps: int | None = Field(default=None, ge=1)
    max_pixels: int | None = Field(default=None, ge=1)
    max_count: int | None = Field(default=None, ge=1)
    #: Workflows this tenant may use; None = every workflow.
    workflows: list[str] | None = None
    #: Lanes this tenant may use; None = every lane.
    lanes: list[str] | None = None
    #: Model files (checkpoints, LoRAs, ...: parameters with a ``folder``) this tenant
    #: may use; None = any the renderers have.
    models: list[str] | None = None
    #: Words refused in prompts and negatives (whole words, any case).
    banned_words: list[str] = Field(default_factory=list)
    #: Workflows allowed only in age-restricted channels.
    nsfw_workflows: list[str] = Field(default_factory=list)
    #: No new job is admitted (``/queue pause``); jobs already queued go on.
    paused: bool = False


class QuotaDefaults(BaseSettings):
    """The limits of a tenant that has none of its own (``QUOTA_*``)."""

    model_config = SettingsConfigDict(
        env_prefix="QUOTA_", env_file=".env", extra="ignore", env_ignore_empty=True
    )

    images_per_day: int | None = Field(default=None, ge=0)
    images_per_user_per_day: int | None = Field(default=100, ge=0)
    concurrent_per_user: int | None = Field(default=2, ge=0)
    pending_per_tenant: int | None = Field(default=50, ge=0)
    max_steps: int | None = Field(default=None, ge=1)
    max_pixels: int | None = Field(default=None, ge=1)
    max_count: int | None = Field(default=None, ge=1)

    def settings(self) -> QuotaSettings:
        return QuotaSettings(**self.model_dump())


class QuotaExceeded(PermanentError):
    """A counted limit is reached. ``limit`` names it; ``retry_after`` is seconds until
    it frees up when that is known (the next UTC day), else None."""

    def __init__(self, limit: str, message: str, *, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.limit = limit
        self.message = message
        self.retry_after = retry_after


@dataclass(frozen=True, slots=True)
class Usage:
    """What a user of a tenant has used today and has left (None: no limit)."""

    tenant_images_today: int
    user_images_today: int
    user_in_flight: int
    tenant_pending: int
    tenant_images_left: int | None
    user_images_left: int | None
    user_in_flight_left: int | None
    resets_at: datetime


def check_paused(settings: QuotaSettings) -> None:
    """Raise :class:`QuotaExceeded` (limit ``paused``) while admissions are paused."""
    if settings.paused:
        raise QuotaExceeded("paused", "New jobs are paused here for now; an admin can resume them.")


def check_request(
    settings: QuotaSettings, job: Job, folders: Mapping[str, str] | None = None
) -> list[FieldError]:
    """Every rule ``job`` breaks, as field errors naming what is allowed. ``folders``:
    the workflow's model file parameters (name to models folder)."""
    errors: list[FieldError] = []
    params = job.params
    if settings.models is not None:
        allowed = ", ".join(settings.models) or "none"
        for name in sorted(folders or {}):
            value = params.get(name)
            if isinstance(value, str) and value not in settings.models:
                errors.append(
                    FieldError(name, f"{name}: {value!r} is not enabled here (allowed: {allowed})")
                )
    if settings.workflows is not None and job.workflow not in settings.workflows:
        allowed = ", ".join(settings.workflows) or "none"
        errors.append(
            FieldError(
                "workflow", f"workflow: {job.workflow!r} is not enabled here (allowed: {allowed})"
            )
        )
    if settings.lanes is not None and job.lane not in settings.lanes:
        allowed = ", ".join(settings.lanes) or "none"
        errors.append(
            FieldError("lane", f"lane: {job.lane!r} is not open here (allowed: {allowed})")
        )
    steps = params.get("steps")
    if settings.max_steps is not None and isinstance(steps, int) and steps > settings.max_steps:
        errors.append(
            FieldError(
                "steps",
                f"steps: {steps} is above this server's limit "
                f"(allowed: at most {settings.max_steps})",
            )
        )
    width, height = params.get("width"), params.get("height")
    if (
        settings.max_pixels is not None
        and isinstance(width, int)
        and isinstance(height, int)
        and width * height > settings.max_pixels
    ):
        errors.append(
            FieldError(
                "width",
                f"width × height: {width}×{height} is {width * height} "
                f"pixels (allowed: at most {settings.max_pixels})",
            )
        )
    count = _images(job)
    if settings.max_count is not None and count > settings.max_count:
        errors.append(
            FieldError(
                "batch",
                f"count: {count} images is above this server's limit "
                f"(allowed: at most {settings.max_count})",
            )
        )
    for field in ("prompt", "negative"):
        word = _banned(str(params.get(field, "")), settings.banned_words)
        if word is not None:
            errors.append(
                FieldError(field, f"{field}: contains {word!r}, a word this server does not allow")
            )
    if job.workflow in settings.nsfw_workflows and not job.origin.age_restricted:
        errors.append(
            FieldError(
                "workflow", f"workflow: {job.workflow!r} is allowed only in age-restricted channels"
            )
        )
    return errors


def _banned(text: str, words: list[str]) -> str | None:
    for word in words:
        if word and re.search(rf"(?<!\w){re.escape(word)}(?!\w)", text, flags=re.IGNORECASE):
            return word
    return None


def _images(job: Job) -> int:
    batch = job.params.get("batch", 1)
    return batch if isinstance(batch, int) and not isinstance(batch, bool) and batch > 0 else 1


def day_bounds(now: datetime) -> tuple[str, str, datetime]:
    """The UTC day of ``now`` as ISO strings [start, end) and the moment it ends."""
    start = now.replace(hour=0, minute=0, second=0, microsecond=0)
    end = start + timedelta(days=1)
    return start.isoformat(), end.isoformat(), end


def create_tables(db: sqlite_utils.Database) -> None:
    if "quota_settings" not in db.table_names():
        db.table("quota_settings").create({"tenant": str, "settings_json": str}, pk="tenant")
    if "reservations" not in db.table_names():
        db.table("reservations").create(
            {
                "job_id": str,
                "tenant": str,
                "user": str,
                "images": int,
                "state": str,
                "created_at": str,
            },
            pk="job_id",
        )
    # Every admission with a tenant reads its counts (:func:`reserve`): these indexes
    # answer each from the rows it counts, not from every reservation the tenant ever
    # made (a busy guild has hundreds of thousands). The day's sums read the day's index
    # entries only (covering); the jobs in flight are in a partial index of their own.
    for statement in (
        "CREATE INDEX IF NOT EXISTS idx_reservations_day "
        "ON reservations (tenant, created_at, state, images)",
        "CREATE INDEX IF NOT EXISTS idx_reservations_user_day "
        "ON reservations (tenant, user, created_at, state, images)",
        "CREATE INDEX IF NOT EXISTS idx_reservations_reserved "
        "ON reservations (tenant, user) WHERE state = 'reserved'",
        # Superseded by the three above (files from before them).
        "DROP INDEX IF EXISTS idx_reservations_tenant_created_at",
        "DROP INDEX IF EXISTS idx_reservations_tenant_user_state",
    ):
        db.execute(statement)


#: The pseudo-tenant whose ``paused`` pauses every tenant (a bot owner's global pause).
EVERYONE = "*"


def settings_for(db: sqlite_utils.Database, tenant: str, defaults: QuotaSettings) -> QuotaSettings:
    """``tenant``'s limits (else ``defaults``), paused as well when everyone is."""
    return combined(tenant, *stored(db, tenant), defaults)


def stored(
    db: sqlite_utils.Database, tenant: str
) -> tuple[QuotaSettings | None, QuotaSettings | None]:
    """The limits stored for ``tenant`` and for :data:`EVERYONE` (None: none stored)."""
    rows = {
        row["tenant"]: QuotaSettings.model_validate_json(row["settings_json"])
        for row in db.table("quota_settings").rows_where("tenant IN (?, ?)", [tenant, EVERYONE])
    }
    return rows.get(tenant), rows.get(EVERYONE)


def combined(
    tenant: str,
    own: QuotaSettings | None,
    everyone: QuotaSettings | None,
    defaults: QuotaSettings,
) -> QuotaSettings:
    """:func:`settings_for` from what :func:`stored` read."""
    settings = own if own is not None else defaults
    if everyone is not None and everyone.paused and tenant != EVERYONE:
        settings = settings.model_copy(update={"paused": True})
    return settings


def store_settings(db: sqlite_utils.Database, tenant: str, settings: QuotaSettings) -> None:
    db.table("quota_settings").upsert(
        {"tenant": tenant, "settings_json": settings.model_dump_json()}, pk="tenant"
    )


def usage(
    db: sqlite_utils.Database,
    tenant: str,
    user: str | None,
    settings: QuotaSettings,
    now: datetime,
) -> Usage:
    counts = _Counts(db, tenant, user, now)
    tenant_images = counts.tenant_images()
    user_images = counts.user_images()
    in_flight = counts.in_flight()
    pending = counts.pending()
    resets_at = counts.resets_at

    def left(limit: int | None, used: int) -> int | None:
        return None if limit is None else max(0, limit - used)

    return Usage(
        tenant_images_today=tenant_images,
        user_images_today=user_images,
        user_in_flight=in_flight,
        tenant_pending=pending,
        tenant_images_left=left(settings.images_per_day, tenant_images),
        user_images_left=left(settings.images_per_user_per_day, user_images),
        user_in_flight_left=left(settings.concurrent_per_user, in_flight),
        resets_at=resets_at,
    )


class _Counts:
    """What a tenant's user has used, each count read when asked for (:func:`reserve`
    reads only those its limits need)."""

    _COUNTED = "state IN ('reserved', 'charged')"

    def __init__(self, db: sqlite_utils.Database, tenant: str, user: str | None, now: datetime):
        self._db = db
        self._tenant = tenant
        self._user = user
        self._start, self._end, self.resets_at = day_bounds(now)

    def _scalar(self, sql: str, params: list[Any]) -> int:
        return int(self._db.execute(sql, params).fetchone()[0] or 0)

    def tenant_images(self) -> int:
        return self._scalar(
            f"SELECT SUM(images) FROM reservations WHERE tenant = ? AND {self._COUNTED} "
            "AND created_at >= ? AND created_at < ?",
            [self._tenant, self._start, self._end],
        )

    def user_images(self) -> int:
        return self._scalar(
            "SELECT SUM(images) FROM reservations WHERE tenant = ? AND user IS ? "
            f"AND {self._COUNTED} AND created_at >= ? AND created_at < ?",
            [self._tenant, self._user, self._start, self._end],
        )

    def in_flight(self) -> int:
        return self._scalar(
            # INDEXED BY: without statistics SQLite prefers a covering index of every
            # reservation of the tenant (or user) to the small partial one.
            "SELECT COUNT(*) FROM reservations INDEXED BY idx_reservations_reserved "
            "WHERE tenant = ? AND user IS ? AND state = 'reserved'",
            [self._tenant, self._user],
        )

    def pending(self) -> int:
        return self._scalar(
            "SELECT COUNT(*) FROM reservations INDEXED BY idx_reservations_reserved "
            "WHERE tenant = ? AND state = 'reserved'",
            [self._tenant],
        )


def reserve(db: sqlite_utils.Database, job: Job, settings: QuotaSettings, now: datetime) -> None:
    """Check the counted limits for ``job`` and reserve its images, or raise
    :class:`QuotaExceeded`. Call inside the transaction that writes the job row. Reads
    the counts of the limits set only (``images_per_day`` is off by default)."""
    tenant = job.origin.tenant
    if tenant is None:
        return
    user = job.origin.user
    images = _images(job)
    counts = _Counts(db, tenant, user, now)
    until_tomorrow = int((counts.resets_at - now).total_seconds()) + 1
    if settings.images_per_user_per_day is not None:
        left = max(0, settings.images_per_user_per_day - counts.user_images())
        if images > left:
            raise QuotaExceeded(
                "images_per_user_per_day",
                f"You have {left} of your {settings.images_per_user_per_day} images left "
                f"today; this job needs {images}. "
                f"It resets <t:{int(counts.resets_at.timestamp())}:R>.",
                retry_after=until_tomorrow,
            )
    if settings.images_per_day is not None:
        left = max(0, settings.images_per_day - counts.tenant_images())
        if images > left:
            raise QuotaExceeded(
                "images_per_day",
                f"This server has {left} of its {settings.images_per_day} "
                f"images left today; this job needs {images}.",
                retry_after=until_tomorrow,
            )
    if settings.concurrent_per_user is not None:
        in_flight = counts.in_flight()
        if in_flight >= settings.concurrent_per_user:
            raise QuotaExceeded(
                "concurrent_per_user",
                f"You already have {in_flight} jobs queued or rendering (the limit "
                f"is {settings.concurrent_per_user}); wait for one to finish.",
            )
    if settings.pending_per_tenant is not None:
        pending = counts.pending()
        if pending >= settings.pending_per_tenant:
            raise QuotaExceeded(
                "pending_per_tenant",
                f"This server already has {pending} jobs waiting (the limit is "
                f"{settings.pending_per_tenant}); try again in a while.",
            )
    insert_row(
        db,
        "reservations",
        {
            "job_id": job.job_id,
            "tenant": tenant,
            "user": user,
            "images": images,
            "state": "reserved",
            "created_at": job.created_at.isoformat(),
        },
    )


def settle(db: sqlite_utils.Database, job_id: str, *, charged: bool) -> None:
    """A job ended: its reservation is charged (it rendered) or refunded (it did not)."""
    db.execute(
        "UPDATE reservations SET state = ? WHERE job_id = ? AND state = 'reserved'",
        ["charged" if charged else "refunded", job_id],
    )


def reserve_again(db: sqlite_utils.Database, job_id: str) -> None:
    """An admin retries a job that was refunded: it holds its images again, whatever the
    limits say now (the admin decided)."""
    db.execute(
        "UPDATE reservations SET state = 'reserved' WHERE job_id = ? AND state = 'refunded'",
        [job_id],
    )


def reset_user(db: sqlite_utils.Database, tenant: str, user: str, now: datetime) -> int:
    """Give a user today's images back (``/quota reset``). Returns how many."""
    start, end, _ = day_bounds(now)
    row = db.execute(
        "SELECT SUM(images) FROM reservations WHERE tenant = ? AND user = ? AND state = 'charged' "
        "AND created_at >= ? AND created_at < ?",
        [tenant, user, start, end],
    ).fetchone()
    db.execute(
        "UPDATE reservations SET state = 'reset' WHERE tenant = ? AND user = ? "
        "AND state = 'charged' AND created_at >= ? AND created_at < ?",
        [tenant, user, start, end],
    )
    return int(row[0] or 0)


def merged(settings: QuotaSettings, changes: Mapping[str, Any]) -> QuotaSettings:
    """``settings`` with ``changes`` applied and validated (``/quota set``)."""
    return QuotaSettings.model_validate({**settings.model_dump(), **changes})
