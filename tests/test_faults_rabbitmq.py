"""RabbitMQ going away under load: a TCP proxy in front of the shared broker cuts every
connection (the bot's frontend and the renderers alike) again and again while jobs run.
Nothing is restarted by hand; every job still ends once, with one result in Discord."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from jobs.admission import Admission
from jobs.bus import JobBus
from jobs.exceptions import BrokerUnavailable
from jobs.ledger import Ledger
from jobs.models import Accepted, Job, JobRequest, JobStatus, Origin
from jobs.quotas import QuotaSettings
from jobs.rabbitmq import RabbitBroker
from jobs.topology import Topology, build_topology
from tests.emulators.discord import Interaction
from tests.fixtures.comfyui import ComfyUIFactory
from tests.fixtures.faults import StageFactory
from tests.fixtures.rabbitmq import delete_topology
from tests.fixtures.tcpproxy import TcpProxy, through
from workflows import Catalog

pytestmark = [pytest.mark.rabbitmq, pytest.mark.s3]

JOBS = 12
LATE_JOBS = 3
CUTS = 5
UNAVAILABLE = "The queue is unavailable right now"


@pytest.mark.timeout(120)
async def test_connections_cut_under_load_lose_and_double_nothing(
    amqp_url: str,
    rabbit_proxy: TcpProxy,
    fault_stage: StageFactory,
    comfyui_factory: ComfyUIFactory,
) -> None:
    stage = await fault_stage(amqp=through(amqp_url, rabbit_proxy), delivery_limit=20)
    side = await stage.bot()
    for n in range(2):
        comfyui = await comfyui_factory(step_seconds=0.1)
        # As a real ComfyUI, which stops a prompt at its next check: a job handed back
        # at once may find its interrupted prompt still running.
        comfyui.interrupt_delay = 0.3
        await stage.renderer(f"cut-{n}", comfyui=comfyui, retry_backoff_seconds=0.2)
    interactions = [await side.imagine(f"harbour number {n}") for n in range(JOBS)]

    # Cut while the renderers hold jobs, events are in flight and messages are edited.
    async with asyncio.timeout(30):
        while not any(e.attempt == 1 for e in stage.events if isinstance(e, Accepted)):
            await asyncio.sleep(0.05)
    for _ in range(CUTS):
        rabbit_proxy.cut()
        await asyncio.sleep(2.0)
    # The publisher came back by itself: new jobs are admitted on the same connection.
    interactions += [await side.imagine(f"late harbour {n}") for n in range(LATE_JOBS)]

    # A submit caught by a cut is told to try again; every other one shows its result.
    def refused(interaction: Interaction) -> bool:
        return any(UNAVAILABLE in m.content for m in interaction.followups)

    def settled() -> bool:
        return all(
            refused(i) or (i.original is not None and "✅ Done" in i.original.content)
            for i in interactions
        )

    await side.emulator.wait_until(settled, 60, "every job's result or refusal")
    await asyncio.sleep(1.5)  # a second result or edit would arrive now

    assert rabbit_proxy.cuts == CUTS
    shown = [i for i in interactions if not refused(i)]
    assert len(shown) > LATE_JOBS and all(i in shown for i in interactions[JOBS:])
    for interaction in interactions:
        if refused(interaction):  # then nothing was admitted, nothing will be charged
            assert await stage.front.ledger.get_by_key(str(interaction.id)) is None
    messages = [i.original for i in shown if i.original is not None]
    job_ids = [m.custom_ids()[0].split(":")[2] for m in messages]
    assert len(set(job_ids)) == len(shown)
    for job_id in job_ids:
        record = await stage.front.ledger.get(job_id)
        assert record is not None and record.status is JobStatus.SUCCEEDED
        history = [status for status, _, _ in await stage.front.ledger.history(job_id)]
        assert [s for s in history if s.terminal] == [JobStatus.SUCCEEDED], history
    ends = stage.terminal_events()
    assert sorted(ends) == sorted(job_ids)
    assert all(len(events) == 1 for events in ends.values()), ends
    # The broker did hand jobs out again (attempt 2+), and still one result each.
    redelivered = {e.job_id for e in stage.events if isinstance(e, Accepted) and e.attempt > 1}
    assert redelivered
    posted = stage.discord.messages_in(side.channel_id)
    assert len([m for m in posted if m.custom_ids()]) == len(shown)
    for message in messages:
        finals = [e for e in message.edits if "✅ Done" in e.content]
        assert len(finals) == 1, [e.content for e in message.edits]
        assert message.attachment("result.png").image().size == (64, 64)
    usage = await side.usage()
    assert (usage.user_images_today, usage.user_in_flight) == (len(shown), 0)


class FlakyRabbit(RabbitBroker):
    """The real broker, but a publish carrying ``poison`` fails as in a cut, and
    ``before(body)`` runs before each publish."""

    def __init__(self, url: str, topology: Topology, before: Callable[[bytes], Awaitable[None]]):
        super().__init__(url, topology, name="flaky", timeout=5)
        self._before = before

    async def publish(self, exchange: str, routing_key: str, body: bytes, **options: Any) -> None:
        await self._before(body)
        if b"poison" in body:
            raise BrokerUnavailable("the connection was cut")
        await super().publish(exchange, routing_key, body, **options)


async def test_a_submit_whose_job_was_published_is_admitted_when_a_later_publish_fails(
    amqp_url: str, test_prefix: str, tmp_path: Path
) -> None:
    """One release publishes the submitted job, then claims another that a concurrent
    submit just admitted, and that publish fails in a cut. The submitted job is on the
    queue and will run (and be charged): its submit must say admitted, not "the queue is
    unavailable" (the user would retry and pay twice)."""
    topology = build_topology(["fast"], prefix=test_prefix, delivery_limit=4)
    ledger = Ledger(tmp_path / "ledger.db")
    await ledger.open()
    catalog = Catalog.load()
    origin = Origin(frontend="discord", reply_to="front-faults", tenant="g", user="u")
    admitted_meanwhile: list[Job] = []

    async def before(body: bytes) -> None:
        if b"first" in body and not admitted_meanwhile:
            # A concurrent submit admits its job now; this release claims it next.
            request = JobRequest(workflow="demo", prompt="poison")
            job = admission.validate(request, idempotency_key="second", origin=origin)
            await ledger.admit(job)
            admitted_meanwhile.append(job)

    broker = FlakyRabbit(amqp_url, topology, before)
    await broker.connect()
    try:
        await broker.declare()
        admission = Admission(catalog, ledger, JobBus(broker))
        first = await admission.submit(
            JobRequest(workflow="demo", prompt="the first"), idempotency_key="first", origin=origin
        )
        depth = await broker.depth(topology.lane_queue("fast"))
        record = await ledger.get(first.job.job_id)
        other = await ledger.get(admitted_meanwhile[0].job_id)
    finally:
        await broker.close()
        await ledger.close()
        await delete_topology(amqp_url, topology, [])

    assert first.created and first.record.published
    assert record is not None and record.published and depth == 1
    assert other is not None and not other.published  # held, for the next release


async def test_a_submit_refused_in_a_cut_reserves_nothing(
    amqp_url: str, test_prefix: str, tmp_path: Path
) -> None:
    """The publish of the submitted job fails in a cut, and again after each wait for
    the connection: the user is told to try again, and neither the job nor its reserved
    images (nor an in-flight slot) are left."""
    topology = build_topology(["fast"], prefix=test_prefix, delivery_limit=4)
    ledger = Ledger(tmp_path / "ledger.db")
    await ledger.open()
    defaults = QuotaSettings(images_per_user_per_day=10, concurrent_per_user=2)
    origin = Origin(frontend="discord", reply_to="front-faults", tenant="g", user="u")

    async def nothing(body: bytes) -> None:
        return None

    broker = FlakyRabbit(amqp_url, topology, nothing)
    await broker.connect()
    try:
        await broker.declare()
        admission = Admission(Catalog.load(), ledger, JobBus(broker), quota_defaults=defaults)
        with pytest.raises(BrokerUnavailable):
            await admission.submit(
                JobRequest(workflow="demo", prompt="poison"), idempotency_key="k", origin=origin
            )
        record = await ledger.get_by_key("k")
        usage = await ledger.usage("g", "u", defaults)
    finally:
        await broker.close()
        await ledger.close()
        await delete_topology(amqp_url, topology, [])

    assert record is None
    assert (usage.user_images_today, usage.user_in_flight, usage.tenant_pending) == (0, 0, 0)


class CuttingRabbit(RabbitBroker):
    """The real broker behind ``proxy``: the first publish of a job cuts every connection
    just before it is sent, as a broker restart would."""

    def __init__(self, url: str, topology: Topology, proxy: TcpProxy) -> None:
        super().__init__(url, topology, name="cutting", timeout=5)
        self._proxy = proxy
        self.tries = 0

    async def publish(self, exchange: str, routing_key: str, body: bytes, **options: Any) -> None:
        if exchange == self.topology.jobs_exchange:
            self.tries += 1
            if self.tries == 1:
                self._proxy.cut()
        await super().publish(exchange, routing_key, body, **options)


async def test_a_submit_caught_by_a_cut_waits_for_the_connection_and_is_admitted(
    amqp_url: str, rabbit_proxy: TcpProxy, test_prefix: str, tmp_path: Path
) -> None:
    """A cut under a job's publish: the submit waits for the robust connection to come
    back and publishes again, so the user gets the job, not "try again", and is charged
    once."""
    topology = build_topology(["fast"], prefix=test_prefix, delivery_limit=4)
    ledger = Ledger(tmp_path / "ledger.db")
    await ledger.open()
    defaults = QuotaSettings(images_per_user_per_day=10, concurrent_per_user=2)
    origin = Origin(frontend="discord", reply_to="front-faults", tenant="g", user="u")
    broker = CuttingRabbit(through(amqp_url, rabbit_proxy), topology, rabbit_proxy)
    await broker.connect()
    try:
        await broker.declare()
        admission = Admission(Catalog.load(), ledger, JobBus(broker), quota_defaults=defaults)
        admitted = await admission.submit(
            JobRequest(workflow="demo", prompt="a cut"), idempotency_key="k", origin=origin
        )
        await ledger.flush()
        record = await ledger.get(admitted.job.job_id)
        usage = await ledger.usage("g", "u", defaults)
        waiting = await broker.get(topology.lane_queue("fast"))
    finally:
        await broker.close()
        await ledger.close()
        await delete_topology(amqp_url, topology, [])

    assert rabbit_proxy.cuts == 1 and broker.tries == 2
    assert admitted.created and admitted.record.published
    assert record is not None and record.published and record.status is JobStatus.QUEUED
    assert (usage.user_images_today, usage.user_in_flight) == (1, 1)
    assert waiting is not None and waiting.message_id == admitted.job.job_id
