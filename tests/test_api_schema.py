"""schemathesis against the running API: every operation of ``/openapi.json``, with data
the document allows and data it forbids, over a real socket and a real RabbitMQ; no
answer may be a 5xx, and every answer must conform to the document (status code,
content type, headers, body schema)."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.api_rig import ADMIN_KEY, ApiRig, start_api_rig
from tests.fixtures.pipeline import Rig

pytestmark = [pytest.mark.s3, pytest.mark.rabbitmq]

#: Cases per operation and generation mode: enough to cross every branch of the
#: validation, few enough to finish in seconds.
EXAMPLES = 6


@pytest.fixture
async def api(rig: Rig, tmp_path: Path) -> AsyncIterator[ApiRig]:
    async with aiohttp.ClientSession() as http:
        yield await start_api_rig(rig, http, tmp_path / "ledger.db")


def fuzz(base_url: str, tenant_key: str) -> list[str]:
    """Run schemathesis (synchronous, ``requests``) and return the operations it ran."""
    import schemathesis
    from hypothesis.errors import Unsatisfiable

    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json", timeout=10)
    ran = []
    results: list[Any] = list(schema.get_all_operations())
    for result in results:
        operation = result.ok()
        key = ADMIN_KEY if operation.path.startswith("/v1/admin") else tenant_key
        _cases(operation, schemathesis.GenerationMode.POSITIVE, base_url, key)()
        # Nothing can be wrong in a call with no parameter and no body (GET /v1/workflows).
        with contextlib.suppress(Unsatisfiable):
            _cases(operation, schemathesis.GenerationMode.NEGATIVE, base_url, key)()
        ran.append(f"{operation.method.upper()} {operation.path}")
    return ran


def _cases(operation: Any, mode: Any, base_url: str, key: str) -> Callable[[], None]:
    from hypothesis import HealthCheck, Phase, given, settings
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_headers_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    checks = [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_headers_conformance,
        response_schema_conformance,
    ]

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(mode))
    def run(case: Any) -> None:
        case.call_and_validate(
            base_url=base_url,
            headers={"Authorization": f"Bearer {key}"},
            checks=checks,
            timeout=10,
        )

    return run


def _operations() -> list[str]:
    from api.openapi import document

    return [f"{m.upper()} {path}" for path, item in document()["paths"].items() for m in item]


# The server under test runs in this process, beside schemathesis's thread: anything it
# (or a library under it: botocore's retry jitter, ...) draws from the global ``random``
# while a case is being generated looks to Hypothesis like a strategy using ``random``.
# The strategies here use none; only that warning is silenced, nothing else.
@pytest.mark.filterwarnings(
    "ignore:Do not use the `random` module inside strategies"
    ":hypothesis.errors.HypothesisDeprecationWarning"
)
@pytest.mark.parametrize("brokers", ["rabbitmq"], indirect=True)
async def test_schemathesis_finds_no_5xx_and_no_schema_violation(api: ApiRig) -> None:
    await api.rig.renderer()
    tenant_key = await api.new_key("fuzz")

    ran = await asyncio.wait_for(asyncio.to_thread(fuzz, api.url, tenant_key), timeout=50)

    assert {"POST /v1/jobs", "GET /v1/jobs/{job_id}/events", "GET /v1/admin/keys"} <= set(ran)
    # Every operation of the document but GET /openapi.json, which schemathesis leaves out
    # when it loaded the document from it.
    assert len(ran) == len(_operations()) - 1 == 18
    _, _, metrics = await api.call("GET", "/metrics")
    answered = re.findall(r'^brigade_api_requests_total\{.*status="(\d+)"\} (\S+)$', metrics, re.M)
    assert sum(float(count) for _, count in answered) >= len(ran) * EXAMPLES
    assert not [status for status, _ in answered if status.startswith("5")]
