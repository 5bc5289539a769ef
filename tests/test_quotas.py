"""Quotas at admission: rules on the request, counted limits reserved atomically with
the job row, and the images given back when a job does not render."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from jobs import ledger as ledger_module
from jobs import quotas
from jobs.admission import Admission
from jobs.broker import Broker
from jobs.bus import JobBus
from jobs.exceptions import InvalidRequest
from jobs.ledger import Ledger
from jobs.memory import MemoryBroker, MemoryHub
from jobs.models import Failed, FailureReason, JobRequest, Origin, Output, Succeeded
from jobs.quotas import QuotaExceeded, QuotaSettings
from jobs.topology import build_topology
from workflows import Catalog

GUILD = "guild-1"
DEFAULTS = QuotaSettings()


@pytest.fixture
async def broker() -> AsyncIterator[Broker]:
    broker = MemoryBroker(MemoryHub(), build_topology(["fast", "relax"]))
    await broker.connect()
    await broker.declare()
    yield broker
    await broker.close()


@pytest.fixture
def admission(ledger: Ledger, broker: Broker) -> Admission:
    return Admission(Catalog.load(), ledger, JobBus(broker), quota_defaults=DEFAULTS)


def origin(user: str = "alice", **fields: Any) -> Origin:
    return Origin(frontend="discord", reply_to="bot", tenant=GUILD, user=user, **fields)


_keys = iter(range(10**6))


async def submit(admission: Admission, user: str = "alice", **fields: Any) -> str:
    request = JobRequest.model_validate({"workflow": "demo", "prompt": "a fox", **fields})
    admitted = await admission.submit(
        request, idempotency_key=f"k{next(_keys)}", origin=origin(user)
    )
    return admitted.job.job_id


async def queued(broker: Broker) -> int:
    return await broker.depth(broker.topology.lane_queue("fast"))


async def end(ledger: Ledger, job_id: str, *, rendered: bool) -> None:
    event: Succeeded | Failed
    if rendered:
        output = Output(url="u", key="k", size=1, width=1, height=1)
        event = Succeeded(job_id=job_id, attempt=1, worker_id="w", seq=1, outputs=[output])
    else:
        event = Failed(
            job_id=job_id, attempt=1, worker_id="w", seq=1, reason=FailureReason.OOM, message="m"
        )
    assert await ledger.apply(event)


RULES = [
    ({"workflows": ["sd15-txt2img"]}, {}, "workflow", "allowed: sd15-txt2img"),
    ({"lanes": ["relax"]}, {}, "lane", "allowed: relax"),
    ({"max_steps": 10}, {"steps": 20}, "steps", "at most 10"),
    ({"max_pixels": 256 * 256}, {"width": 512, "height": 256}, "width", "at most 65536"),
    ({"max_count": 2}, {"count": 3}, "batch", "at most 2"),
    ({"banned_words": ["Fox"]}, {}, "prompt", "'Fox', a word this server does not allow"),
    ({"nsfw_workflows": ["demo"]}, {}, "workflow", "only in age-restricted channels"),
    (
        {"models": ["mine.safetensors"]},
        {"workflow": "sd15-txt2img", "checkpoint": "theirs.safetensors"},
        "checkpoint",
        "'theirs.safetensors' is not enabled here (allowed: mine.safetensors)",
    ),
    (  # the workflow's own default model is held to the list too
        {"models": []},
        {"workflow": "sd15-txt2img"},
        "checkpoint",
        "is not enabled here (allowed: none)",
    ),
]


@pytest.mark.parametrize(("limits", "fields", "field", "message"), RULES)
async def test_rules_on_the_request_name_the_field_and_the_limit(
    admission: Admission,
    ledger: Ledger,
    broker: Broker,
    limits: dict[str, Any],
    fields: dict[str, Any],
    field: str,
    message: str,
) -> None:
    await ledger.set_quota(GUILD, limits, DEFAULTS)

    with pytest.raises(InvalidRequest) as caught:
        await submit(admission, **fields)

    assert [e.field for e in caught.value.errors] == [field]
    assert message in str(caught.value)
    assert await queued(broker) == 0


async def test_an_allowed_model_is_admitted(admission: Admission, ledger: Ledger) -> None:
    await ledger.set_quota(GUILD, {"models": ["mine.safetensors"]}, DEFAULTS)

    assert await submit(admission, workflow="sd15-txt2img", checkpoint="mine.safetensors")
    assert await submit(admission, workflow="demo")  # it has no model to choose


async def test_banned_words_match_whole_words_only(admission: Admission, ledger: Ledger) -> None:
    await ledger.set_quota(GUILD, {"banned_words": ["fox"]}, DEFAULTS)

    assert await submit(admission, prompt="a foxglove in bloom")
    with pytest.raises(InvalidRequest):
        await submit(admission, prompt="a FOX, running")


async def test_nsfw_workflows_are_allowed_in_age_restricted_channels(
    admission: Admission, ledger: Ledger
) -> None:
    await ledger.set_quota(GUILD, {"nsfw_workflows": ["demo"]}, DEFAULTS)
    request = JobRequest(workflow="demo", prompt="x")

    admitted = await admission.submit(
        request, idempotency_key="nsfw", origin=origin(age_restricted=True)
    )

    assert admitted.created


async def test_images_per_user_per_day_refuses_and_charges_nothing(
    admission: Admission, ledger: Ledger, broker: Broker
) -> None:
    await ledger.set_quota(GUILD, {"images_per_user_per_day": 3}, DEFAULTS)
    first = await submit(admission, count=2)

    with pytest.raises(QuotaExceeded) as caught:
        await submit(admission, count=2)

    assert caught.value.limit == "images_per_user_per_day"
    assert "1 of your 3 images left today" in caught.value.message
    assert caught.value.retry_after is not None and caught.value.retry_after > 0
    assert await queued(broker) == 1
    usage = await ledger.usage(GUILD, "alice", DEFAULTS)
    assert (usage.user_images_today, usage.user_images_left) == (2, 1)
    await end(ledger, first, rendered=True)
    assert (await ledger.usage(GUILD, "alice", DEFAULTS)).user_images_left == 1
    assert await submit(admission, user="bob", count=2)  # per user


async def test_a_job_that_did_not_render_gives_its_images_back(
    admission: Admission, ledger: Ledger
) -> None:
    await ledger.set_quota(GUILD, {"images_per_user_per_day": 2}, DEFAULTS)
    failed = await submit(admission, count=2)
    await end(ledger, failed, rendered=False)

    assert await submit(admission, count=2)  # refunded: allowed again
    assert (await ledger.usage(GUILD, "alice", DEFAULTS)).user_images_left == 0


async def test_jobs_in_flight_per_user_and_pending_per_tenant(
    admission: Admission, ledger: Ledger
) -> None:
    await ledger.set_quota(GUILD, {"concurrent_per_user": 1, "pending_per_tenant": 2}, DEFAULTS)
    running = await submit(admission)
    with pytest.raises(QuotaExceeded, match="already have 1 jobs") as caught:
        await submit(admission)
    assert caught.value.limit == "concurrent_per_user"
    await submit(admission, user="bob")
    with pytest.raises(QuotaExceeded) as caught:
        await submit(admission, user="carol")
    assert caught.value.limit == "pending_per_tenant"

    await end(ledger, running, rendered=True)

    assert await submit(admission)


async def test_concurrent_submits_never_overspend(admission: Admission, ledger: Ledger) -> None:
    await ledger.set_quota(GUILD, {"images_per_day": 5, "concurrent_per_user": None}, DEFAULTS)

    results = await asyncio.gather(
        *(submit(admission, user=f"u{n}") for n in range(12)), return_exceptions=True
    )

    assert sum(isinstance(r, str) for r in results) == 5
    assert all(isinstance(r, str | QuotaExceeded) for r in results)
    assert (await ledger.usage(GUILD, None, DEFAULTS)).tenant_images_today == 5


async def test_reset_gives_a_user_todays_images_back(admission: Admission, ledger: Ledger) -> None:
    await ledger.set_quota(GUILD, {"images_per_user_per_day": 2}, DEFAULTS)
    await end(ledger, await submit(admission, count=2), rendered=True)

    assert await ledger.reset_usage(GUILD, "alice") == 2
    assert await submit(admission, count=2)


async def test_bad_quota_settings_are_refused(ledger: Ledger) -> None:
    with pytest.raises(ValidationError, match="max_steps"):
        await ledger.set_quota(GUILD, {"max_steps": 0}, DEFAULTS)
    with pytest.raises(ValidationError, match="Extra inputs"):
        await ledger.set_quota(GUILD, {"max_stepz": 5}, DEFAULTS)
    assert await ledger.quota(GUILD, DEFAULTS) == DEFAULTS


async def test_no_tenant_means_no_quota(ledger: Ledger, broker: Broker) -> None:
    strict = QuotaSettings(images_per_day=0, concurrent_per_user=0)
    admission = Admission(Catalog.load(), ledger, JobBus(broker), quota_defaults=strict)

    admitted = await admission.submit(
        JobRequest(workflow="demo", prompt="x"), idempotency_key="cli", origin=Origin()
    )

    assert admitted.created


async def test_a_refused_job_leaves_no_row_and_no_reservation(
    admission: Admission, ledger: Ledger
) -> None:
    """The job row and its reservation are one transaction: a refusal writes neither."""
    await ledger.set_quota(GUILD, {"images_per_user_per_day": 0}, DEFAULTS)
    request = JobRequest(workflow="demo", prompt="x")

    with pytest.raises(QuotaExceeded):
        await admission.submit(request, idempotency_key="refused", origin=origin())

    assert await ledger.get_by_key("refused") is None
    assert await ledger.unpublished() == []
    assert (await ledger.usage(GUILD, "alice", DEFAULTS)).user_in_flight == 0


async def test_paused_admissions_refuse_new_jobs_but_not_a_retry(
    admission: Admission, ledger: Ledger, broker: Broker
) -> None:
    request = JobRequest(workflow="demo", prompt="x")
    first = await admission.submit(request, idempotency_key="before", origin=origin())
    await ledger.set_quota(GUILD, {"paused": True}, DEFAULTS)

    with pytest.raises(QuotaExceeded) as caught:
        await submit(admission)
    again = await admission.submit(request, idempotency_key="before", origin=origin())

    assert caught.value.limit == "paused" and "paused" in caught.value.message
    assert again.job == first.job and not again.created
    assert await queued(broker) == 1
    await ledger.set_quota(GUILD, {"paused": False}, DEFAULTS)
    assert await submit(admission, user="bob")


async def test_a_global_pause_pauses_every_tenant(admission: Admission, ledger: Ledger) -> None:
    await ledger.set_quota("*", {"paused": True}, DEFAULTS)

    with pytest.raises(QuotaExceeded, match="paused"):
        await submit(admission)
    assert (await ledger.quota(GUILD, DEFAULTS)).paused

    await ledger.set_quota("*", {"paused": False}, DEFAULTS)
    assert await submit(admission)
    assert [r.job.origin.user for r in await ledger.active(GUILD)] == ["alice"]


async def test_limits_are_read_from_the_file_once_a_second_and_a_change_here_applies_at_once(
    ledger: Ledger, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every /imagine asks for its guild's limits several times: they are read once per
    ``QUOTA_FRESH_SECONDS``. A change through this ledger applies at once (a global pause
    too); one by another process sharing the file, once the time is up."""
    reads: list[str] = []
    stored = quotas.stored

    def counted(db: Any, tenant: str) -> Any:
        reads.append(tenant)
        return stored(db, tenant)

    monkeypatch.setattr(quotas, "stored", counted)
    monkeypatch.setattr(ledger_module, "QUOTA_FRESH_SECONDS", 0.3)
    for _ in range(5):
        assert await ledger.quota(GUILD, DEFAULTS) == DEFAULTS
    assert reads == [GUILD]

    await ledger.set_quota(GUILD, {"max_steps": 20}, DEFAULTS)
    assert (await ledger.quota(GUILD, DEFAULTS)).max_steps == 20
    await ledger.set_quota("*", {"paused": True}, DEFAULTS)
    assert (await ledger.quota(GUILD, DEFAULTS)).paused

    other = Ledger(tmp_path / "ledger.sqlite3")  # another process on the same file
    await other.open()
    try:
        await other.set_quota(GUILD, {"max_steps": 30}, DEFAULTS)
    finally:
        await other.close()
    assert (await ledger.quota(GUILD, DEFAULTS)).max_steps == 20  # read less than 0.3 s ago
    await asyncio.sleep(0.35)
    assert (await ledger.quota(GUILD, DEFAULTS)).max_steps == 30
