"""Slash-command inputs are data: random prompts, negatives, seeds, counts and aspects
never crash the request path and reach the graph only as the values they were, and
what the bot shows of them cannot mention anyone or break out of its Markdown.

A seeded random walk rather than Hypothesis (not a dependency here): the same cases
every run, including the nasty ones listed first."""

from __future__ import annotations

import random
import string

import pytest

from bot import cards
from bot.cogs.imagine import ASPECTS, size_for
from bot.flow import request_like
from jobs.admission import Admission
from jobs.exceptions import InvalidRequest
from jobs.models import Job, JobRequest, Origin
from workflows import Catalog

NASTY = [
    "@everyone draw a cat",
    "<@123> <@&456> <#789> @here",
    "**bold** ~~strike~~ `code` ||spoiler|| [link](https://example.com)",
    '{"3": {"class_type": "SaveImage"}}',
    "a\x00b",
    "line\nbreak\ttab",
    "\ud800 lone surrogate",
    "ends with backslash \\",
    "x" * 1500,
]
ALPHABET = string.printable + "éß漢字🙂\u200b\u202e@<>#&|*_~`"


def _cases(count: int) -> list[str]:
    rng = random.Random(20261127)
    cases = list(NASTY)
    for _ in range(count):
        length = rng.choice((1, 5, 40, 300, 1499))
        cases.append("".join(rng.choice(ALPHABET) for _ in range(length)))
    return cases


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return Catalog.load()


def _admission(catalog: Catalog) -> Admission:
    class _NoBus:
        topology = type("T", (), {"lanes": ("fast", "relax")})()

    return Admission(catalog, None, _NoBus(), backends=["demo"])  # type: ignore[arg-type]


@pytest.mark.parametrize("index", range(0, 160, 40))
def test_random_inputs_stay_data(catalog: Catalog, index: int) -> None:
    admission = _admission(catalog)
    template = catalog.get("demo")
    rng = random.Random(index)
    origin = Origin(frontend="discord", reply_to="bot", tenant="1", user="2")
    for number, prompt in enumerate(_cases(160)[index : index + 40]):
        negative = rng.choice([None, prompt[::-1]])
        aspect = rng.choice([None, *ASPECTS])
        fields: dict[str, object] = {
            "workflow": "demo",
            "prompt": prompt,
            "negative": negative,
            "seed": rng.choice([None, 0, 2**53 - 1, rng.randrange(2**53)]),
            "count": rng.randint(1, 4),
        }
        if aspect is not None:
            size = size_for(template, aspect)
            assert size is not None
            width, height = size
            assert width % 8 == 0 and height % 8 == 0
            assert 64 <= width <= 1024 and 64 <= height <= 1024
            fields["width"], fields["height"] = size
        request = JobRequest.model_validate(fields)
        refused: InvalidRequest | None
        try:
            job = admission.validate(request, idempotency_key=f"k{number}", origin=origin)
        except InvalidRequest as exc:
            refused = exc
        else:
            refused = None
        if refused is not None:
            assert refused.errors and all(error.message for error in refused.errors)
            continue
        graph = template.bind(job.params)
        bound = [
            node["inputs"][binding.input]
            for binding in template.manifest.params["prompt"].bind
            for node in [graph[binding.node]]
        ]
        assert bound == [prompt]
        assert sorted(graph) == sorted(template.graph)
        _shown_safely(job)
        again = request_like(job, seed=None)
        assert again.prompt == prompt and again.seed is None


def _shown_safely(job: Job) -> None:
    text = cards.header(job)
    assert "@everyone" not in text and "@here" not in text
    assert "<@" not in text.replace(f"<@{job.origin.user}>", "")
    assert len(cards.queued(job, 3, None).content) <= 2000
