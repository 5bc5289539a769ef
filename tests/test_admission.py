"""Admission: validation names the field and the range, nothing is queued for bad input,
and a retried submit returns the same job."""

from __future__ import annotations

import pytest

from jobs.admission import Admission
from jobs.broker import Broker
from jobs.bus import JobBus
from jobs.exceptions import BrokerUnavailable, InvalidRequest
from jobs.ledger import Ledger
from jobs.models import Job, JobRequest, JobStatus, Origin, request_fields
from tests.fixtures.brokers import BrokerFactory
from workflows import Catalog

ORIGIN = Origin(frontend="cli", reply_to="test")


@pytest.fixture
async def broker(brokers: BrokerFactory, test_prefix: str) -> Broker:
    topology = brokers.topology(test_prefix, lanes=("fast", "relax"))
    broker = await brokers.connect(topology)
    await broker.declare()
    return broker


@pytest.fixture
def admission(broker: Broker, ledger: Ledger) -> Admission:
    return Admission(Catalog.load(), ledger, JobBus(broker))


async def queued(broker: Broker) -> int:
    topology = broker.topology
    return sum([await broker.depth(topology.lane_queue(lane)) for lane in topology.lanes])


async def test_submit_writes_the_row_then_publishes(
    admission: Admission, broker: Broker, ledger: Ledger
) -> None:
    admitted = await admission.submit(
        JobRequest(workflow="demo", prompt="a red fox", width=256, height=192),
        idempotency_key="interaction-1",
        origin=ORIGIN,
    )

    assert admitted.created
    job = admitted.job
    assert job.params["width"] == 256 and job.params["height"] == 192
    assert job.params["steps"] == 20  # the manifest's default
    assert isinstance(job.params["seed"], int)
    record = await ledger.get(job.job_id)
    assert record is not None and record.status is JobStatus.QUEUED and record.published
    delivery = await broker.get(broker.topology.lane_queue("fast"))
    assert delivery is not None
    assert Job.from_wire(delivery.body) == job
    await delivery.ack()


async def test_same_idempotency_key_returns_the_same_job(
    admission: Admission, broker: Broker
) -> None:
    request = JobRequest(workflow="demo", prompt="twice")
    first = await admission.submit(request, idempotency_key="k", origin=ORIGIN)
    second = await admission.submit(request, idempotency_key="k", origin=ORIGIN)

    assert second.job == first.job
    assert not second.created
    assert await queued(broker) == 1


BAD_REQUESTS = [
    (dict(workflow="nope", prompt="x"), "workflow", "demo"),
    (dict(workflow="demo", prompt="x" * 1501), "prompt", "at most 1500 characters"),
    (dict(workflow="demo", prompt="x", width=513), "width", "multiple of 8"),
    (dict(workflow="demo", prompt="x", steps=51), "steps", "1 to 50"),
    (dict(workflow="demo", prompt="x", lane="vip"), "lane", "fast, relax"),
    (dict(workflow="demo", prompt="x", count=9), "batch", "1 to 4"),
    (dict(workflow="demo", prompt="bad\x00byte"), "prompt", "control character"),
]


@pytest.mark.parametrize(("fields", "field", "allowed"), BAD_REQUESTS)
async def test_bad_input_is_refused_naming_the_field_and_nothing_is_queued(
    admission: Admission,
    broker: Broker,
    ledger: Ledger,
    fields: dict[str, object],
    field: str,
    allowed: str,
) -> None:
    request = JobRequest.model_validate(fields)
    with pytest.raises(InvalidRequest) as caught:
        await admission.submit(request, idempotency_key="bad", origin=ORIGIN)

    assert [e.field for e in caught.value.errors] == [field]
    assert allowed in str(caught.value)
    assert await queued(broker) == 0
    assert await ledger.get_by_key("bad") is None


@pytest.mark.parametrize(
    "prompt",
    [["4", 0], {"3": {"class_type": "SaveImage", "inputs": {}}}],
    ids=["node-link", "graph-object"],
)
def test_a_prompt_that_is_structure_not_text_is_refused(prompt: object) -> None:
    """A JSON body whose prompt is a link or a node, not text, never gets past the model."""
    with pytest.raises(ValueError, match="prompt"):
        JobRequest.model_validate({"workflow": "demo", "prompt": prompt})


@pytest.mark.parametrize(
    "prompt",
    ['{"3": {"class_type": "SaveImage"}}', '["4", 0]', '"}, "9": {"inputs": {'],
)
async def test_a_prompt_that_looks_like_json_is_only_ever_text(
    admission: Admission, broker: Broker, prompt: str
) -> None:
    """Text that looks like a graph is admitted as text: bound verbatim, structure intact."""
    admitted = await admission.submit(
        JobRequest(workflow="sd15-txt2img", prompt=prompt), idempotency_key=prompt, origin=ORIGIN
    )
    template = Catalog.load().get("sd15-txt2img")
    graph = template.bind(admitted.job.params)

    texts = [node["inputs"].get("text") for node in graph.values()]
    assert prompt in texts
    assert graph.keys() == template.graph.keys()
    for node_id, node in graph.items():
        assert node["class_type"] == template.graph[node_id]["class_type"]
        assert node["inputs"].keys() == template.graph[node_id]["inputs"].keys()


async def test_failed_publish_leaves_nothing_behind(
    ledger: Ledger, brokers: BrokerFactory, test_prefix: str
) -> None:
    topology = brokers.topology(test_prefix)
    broker = await brokers.connect(topology)
    await broker.declare()
    admission = Admission(Catalog.load(), ledger, JobBus(broker))
    await broker.close()  # the broker goes away between validation and publish

    with pytest.raises(BrokerUnavailable):
        await admission.submit(
            JobRequest(workflow="demo", prompt="lost?"), idempotency_key="k", origin=ORIGIN
        )

    assert await ledger.get_by_key("k") is None


async def test_recover_publishes_rows_a_crash_left_unpublished(
    admission: Admission, broker: Broker, ledger: Ledger
) -> None:
    job = admission.validate(
        JobRequest(workflow="demo", prompt="crashed"), idempotency_key="k", origin=ORIGIN
    )
    await ledger.admit(job)  # written, then the process died before publishing

    assert await admission.recover() == 1

    assert await queued(broker) == 1
    record = await ledger.get(job.job_id)
    assert record is not None and record.published
    assert await admission.recover() == 0


def test_request_fields_ask_again_for_what_a_job_asked_for() -> None:
    """A job's params (the bot's "again" and "variations" buttons) as request fields:
    the standard roles as their own fields, the rest as params, so that the request's
    roles are the job's params again."""
    catalog = Catalog.load()
    asked = JobRequest(
        workflow="sd15-txt2img", prompt="a red fox", negative="blurry", seed=7, count=2
    )
    params = catalog.get("sd15-txt2img").resolve(asked.role_values())
    again = JobRequest.model_validate({"workflow": "sd15-txt2img", **request_fields(params)})

    assert again.role_values() == params
    assert (again.prompt, again.negative, again.seed, again.count) == ("a red fox", "blurry", 7, 2)
    assert request_fields({"denoise": 0.5, "cfg": 6}) == {"params": {"denoise": 0.5}, "cfg": 6}
