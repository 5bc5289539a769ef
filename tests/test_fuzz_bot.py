"""Hypothesis over the slash commands' options (issues 4 and 7), through the real
discord.py and the Discord emulator, with the embedded pipeline behind the bot.

``/imagine`` gets any text (control characters, odd and long Unicode), values of the
wrong type as the gateway could deliver them, and integers out of range, in every
option but its attachments; ``/quota set`` any field and value; ``/queue cancel`` and
``/queue retry`` any ticket. Properties:

* the bot always answers the interaction (a deferral or a message, never silence) and
  nothing is logged as an error or with a traceback (structlog and stdlib logging);
* a refusal is ephemeral and names the option;
* nothing is queued or charged for a refused ``/imagine``;
* an accepted prompt reaches the bound graph only as the prompt input's literal: the
  graph the renderer gets has the template's nodes, class types, inputs and links.

One bot serves all the examples of a test: starting a bot per example would take
seconds each. Hypothesis runs an ``async def`` test's examples on pytest-asyncio's
loop one after the other (pytest-asyncio wraps the inner test), so the bot and the
emulator run while each example awaits; hence the suppressed
``function_scoped_fixture`` health check: the fixture is shared on purpose, and no
example needs a fresh bot.

Budgets are small for the suite; ``BRIGADE_HYPOTHESIS_PROFILE=thorough`` runs 20 times
as many examples by hand."""

from __future__ import annotations

import asyncio
import io
import logging
import os
from collections.abc import AsyncIterator, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import structlog
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from bot.client import BrigadeBot
from bot.cogs.admin import NUMBER_FIELDS, PLAIN_LISTS, RESTRICTING_LISTS
from bot.cogs.imagine import ASPECTS
from bot.constants import COUNT_MAX, NEGATIVE_MAX_LENGTH, PROMPT_MAX_LENGTH, SEED_MAX
from jobs.quotas import QuotaSettings
from renderer.backends.base import RenderResult, RenderTask, Reporter
from tests.emulators.discord import DiscordEmulator, Interaction, Message, OptionType
from tests.fixtures.bot import BotWorld, bot_world
from workflows.template import _is_link

THOROUGH = os.environ.get("BRIGADE_HYPOTHESIS_PROFILE") == "thorough"


def budget(examples: int) -> settings:
    """``examples`` in the suite, twenty times as many in the thorough profile; no
    deadline (the machine is shared), no example database in the working tree, and one
    bot for all examples (see the module's docstring)."""
    return settings(
        max_examples=examples * 20 if THOROUGH else examples,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture],
    )


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), "navy").save(buffer, format="PNG")
    return buffer.getvalue()


PNG = _png()


@dataclass
class Fuzzed:
    world: BotWorld
    bot: BrigadeBot
    tasks: dict[str, RenderTask] = field(default_factory=dict)
    rendered: asyncio.Condition = field(default_factory=asyncio.Condition)
    logs: list[MutableMapping[str, Any]] = field(default_factory=list)
    records: list[logging.LogRecord] = field(default_factory=list)

    @property
    def emulator(self) -> DiscordEmulator:
        return self.world.emulator

    async def send(
        self, name: str, options: list[dict[str, Any]], subcommand: str | None = None
    ) -> Interaction:
        world = self.world
        user = world.user if name == "imagine" else world.admin
        return await self.emulator.send_slash_command(
            world.guild.id, world.channel_id, user.id, name, options, subcommand=subcommand
        )

    async def task_of(self, job_id: str, timeout: float = 10.0) -> RenderTask:
        async with asyncio.timeout(timeout), self.rendered:
            await self.rendered.wait_for(lambda: job_id in self.tasks)
        return self.tasks[job_id]

    def assert_quiet(self) -> None:
        """Nothing logged as an error, nothing with a traceback, since the last call."""
        for entry in self.logs:
            assert entry["log_level"] not in ("error", "critical", "exception"), entry
            assert "exc_info" not in entry and "exception" not in entry, entry
        for record in self.records:
            assert record.levelno < logging.ERROR, record.getMessage()
            assert record.exc_info is None, record.getMessage()
        self.logs.clear()
        self.records.clear()


class _Records(logging.Handler):
    def __init__(self, into: list[logging.LogRecord]) -> None:
        super().__init__(logging.DEBUG)
        self.into = into

    def emit(self, record: logging.LogRecord) -> None:
        self.into.append(record)


@pytest.fixture
async def fuzzed(discord_emulator: DiscordEmulator, tmp_path: Path) -> AsyncIterator[Fuzzed]:
    """The bot and the pipeline, the renderer's backend replaced by one that records the
    bound graph it is handed and answers at once; the guild has no limits."""
    async with bot_world(discord_emulator, tmp_path) as world, world.running() as bot:
        fuzz = Fuzzed(world, bot)

        async def record(task: RenderTask, report: Reporter) -> RenderResult:
            async with fuzz.rendered:
                fuzz.tasks[task.job_id] = task
                fuzz.rendered.notify_all()
            batch = task.params.get("batch", 1)
            return RenderResult(images=[PNG] * (batch if isinstance(batch, int) else 1))

        world.app.backend.render = record  # type: ignore[method-assign]
        front = bot.front
        unlimited = {name: None for name in QuotaSettings.model_fields if name in NUMBER_FIELDS}
        await front.ledger.set_quota(str(world.guild.id), unlimited, front.quota_defaults)
        handler = _Records(fuzz.records)
        root = logging.getLogger()
        root.addHandler(handler)
        try:
            with structlog.testing.capture_logs() as captured:
                fuzz.logs = captured
                yield fuzz
        finally:
            root.removeHandler(handler)


# -- values the gateway could deliver ---------------------------------------------------

#: Any text Discord's JSON can carry (no lone surrogates), control characters included.
ANY_TEXT = st.text(max_size=60)
ODD_TEXT = st.one_of(
    st.text(alphabet=st.characters(max_codepoint=0x1F), min_size=1, max_size=8),
    st.sampled_from(
        [
            "@everyone",
            "<@123> <@&456> @here",
            '{"3": {"class_type": "SaveImage"}}',
            '["4", 0]',
            "a\x00b",
            "\u202e\u200b\ufeff",
            "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 🙂👩‍👩‍👧‍👦",
            "x" * PROMPT_MAX_LENGTH,
            "y" * (PROMPT_MAX_LENGTH + 1),
            "\\",
            "",
            " ",
        ]
    ),
    st.text(min_size=PROMPT_MAX_LENGTH - 5, max_size=PROMPT_MAX_LENGTH + 5),
)
TEXT = ANY_TEXT | ODD_TEXT
INTS = st.one_of(
    st.integers(min_value=-5, max_value=COUNT_MAX + 2),
    st.integers(min_value=-(2**64), max_value=2**64),
    st.sampled_from([0, SEED_MAX, SEED_MAX + 1, -1, 2**63]),
)
WRONG = st.one_of(st.booleans(), st.floats(allow_nan=False, allow_infinity=False), st.none())

#: Prompts and negatives the bot should take: any printable text in range.
PLAIN = st.text(alphabet=st.characters(blacklist_categories=("Cc", "Cs")), min_size=1, max_size=200)
#: Model file names: ones a workflow could name, and any printable text.
MODELS = (
    st.sampled_from(["v1-5-pruned-emaonly.safetensors", "style.safetensors", "../x.ckpt"]) | PLAIN
)
#: /imagine's options: name, the type Discord registered, values it should take, and
#: anything else.
IMAGINE: dict[str, tuple[OptionType, st.SearchStrategy[Any], st.SearchStrategy[Any]]] = {
    "negative": (OptionType.STRING, PLAIN, TEXT | INTS | WRONG),
    "workflow": (
        OptionType.STRING,
        st.sampled_from(["demo", "sd15-txt2img"]),
        st.sampled_from(["nope", "DEMO", "../demo"]) | TEXT,
    ),
    "aspect": (OptionType.STRING, st.sampled_from(list(ASPECTS)), TEXT | INTS),
    "seed": (OptionType.INTEGER, st.integers(0, SEED_MAX), INTS | TEXT | WRONG),
    "count": (OptionType.INTEGER, st.integers(1, COUNT_MAX), INTS | TEXT | WRONG),
    "lane": (OptionType.STRING, st.just("fast"), st.sampled_from(["slow", ""]) | TEXT | INTS),
    "checkpoint": (OptionType.STRING, MODELS, TEXT | INTS | WRONG),
    "lora": (OptionType.STRING, MODELS, TEXT | INTS | WRONG),
}


@st.composite
def imagine_options(draw: st.DrawFn) -> list[dict[str, Any]]:
    """Raw option payloads: a prompt and any of the other options, each a value the bot
    should take or (about one time in three) anything the gateway could deliver."""
    prompt = draw(PLAIN if draw(st.integers(0, 2)) else TEXT | INTS | WRONG)
    options = [{"name": "prompt", "type": int(OptionType.STRING), "value": prompt}]
    for name in draw(st.lists(st.sampled_from(sorted(IMAGINE)), unique=True, max_size=4)):
        kind, good, bad = IMAGINE[name]
        value = draw(good if draw(st.integers(0, 2)) else bad)
        options.append({"name": name, "type": int(kind), "value": value})
    return options


def _structure(graph: Any) -> list[Any]:
    return sorted(
        (
            node_id,
            node["class_type"],
            sorted(node),
            sorted(node["inputs"]),
            sorted((key, list(v)) for key, v in node["inputs"].items() if _is_link(v)),
        )
        for node_id, node in graph.items()
    )


def _mentions(text: str, name: str) -> bool:
    return name in text.lower()


async def _answer(fuzz: Fuzzed, interaction: Interaction) -> Message:
    await interaction.wait_response(timeout=5.0)
    return await fuzz.world.answer(interaction, timeout=5.0)


@given(options=imagine_options())
@example(options=[{"name": "prompt", "type": 3, "value": '{"3": {"class_type": "X"}}'}])
@example(options=[{"name": "prompt", "type": 3, "value": "a\x00b"}])
@example(
    options=[
        {"name": "prompt", "type": 3, "value": "x"},
        {"name": "seed", "type": 4, "value": 2**64},
    ]
)
@example(
    options=[
        {"name": "prompt", "type": 3, "value": "x"},
        {"name": "count", "type": 4, "value": "2"},
    ]
)
@example(options=[{"name": "prompt", "type": 3, "value": 5}])
@example(
    options=[{"name": "prompt", "type": 3, "value": "x"}, {"name": "count", "type": 4, "value": 0}]
)
@example(
    options=[
        {"name": "prompt", "type": 3, "value": "x"},
        {"name": "workflow", "type": 3, "value": "nope"},
    ]
)
@budget(60)
async def test_imagine_answers_every_input_and_keeps_prompts_data(
    fuzzed: Fuzzed, options: list[dict[str, Any]]
) -> None:
    fuzz = fuzzed
    front = fuzz.bot.front
    tenant, user = str(fuzz.world.guild.id), str(fuzz.world.user.id)
    before = await front.ledger.usage(tenant, user, front.quota_defaults)

    interaction = await fuzz.send("imagine", options)
    answer = await _answer(fuzz, interaction)
    record = await front.ledger.get_by_key(str(interaction.id))

    if record is None or not record.published:
        event("imagine: refused")
        # Refused: privately, naming an option, and nothing queued or charged.
        assert answer.ephemeral, answer.content
        named = [o["name"] for o in options if _mentions(answer.content, o["name"])]
        assert named, answer.content
        after = await front.ledger.usage(tenant, user, front.quota_defaults)
        assert (after.user_images_today, after.user_in_flight) == (
            before.user_images_today,
            before.user_in_flight,
        )
    else:
        event("imagine: accepted")
        job = record.job
        prompt = next(o["value"] for o in options if o["name"] == "prompt")
        assert job.prompt == prompt
        task = await fuzz.task_of(job.job_id)
        template = front.catalog.get(job.workflow)
        assert _structure(task.graph) == _structure(template.graph)
        bound = [
            task.graph[b.node]["inputs"][b.input] for b in template.manifest.params["prompt"].bind
        ]
        assert bound == [prompt]
        await fuzz.world.final(answer, timeout=10.0)
    fuzz.assert_quiet()


QUOTA_FIELDS = [*NUMBER_FIELDS, *RESTRICTING_LISTS, *PLAIN_LISTS]


@given(
    field=st.sampled_from(QUOTA_FIELDS) | TEXT | INTS,
    value=st.one_of(
        TEXT,
        INTS.map(str),
        st.sampled_from(["none", "all", "NONE", " 3 ", "99999999999999999999999", "-1", "1e3"]),
        st.lists(st.sampled_from(["demo", "fast", "x", " ", ""]), max_size=4).map(",".join),
        INTS,
        WRONG,
    ),
)
@example(field="max_count", value="99999999999999999999999")
@example(field="images_per_day", value="-5")
@example(field="nope", value="1")
@example(field="max_count", value=5)
@budget(30)
async def test_quota_set_answers_every_input(fuzzed: Fuzzed, field: Any, value: Any) -> None:
    fuzz = fuzzed
    options = [
        {"name": "field", "type": int(OptionType.STRING), "value": field},
        {"name": "value", "type": int(OptionType.STRING), "value": value},
    ]
    interaction = await fuzz.send("quota", options, subcommand="set")
    answer = await _answer(fuzz, interaction)
    assert answer.ephemeral, answer.content
    if not answer.content.startswith("Updated."):
        # The refusal names the ``field`` option, or the setting it chose.
        shown = answer.content
        assert shown.startswith("field: ") or f"`{str(field).strip()}`" in shown, shown
    # The guild's limits still read.
    front = fuzz.bot.front
    await front.ledger.quota(str(fuzz.world.guild.id), front.quota_defaults)
    fuzz.assert_quiet()


@pytest.mark.parametrize("subcommand", ["cancel", "retry"])
@given(job=TEXT | INTS | WRONG | st.uuids().map(str))
@example(job="../../etc/passwd")
@example(job="x" * 65)
@example(job=7)
@budget(25)
async def test_queue_cancel_and_retry_answer_every_ticket(
    fuzzed: Fuzzed, subcommand: str, job: Any
) -> None:
    fuzz = fuzzed
    options = [{"name": "job", "type": int(OptionType.STRING), "value": job}]
    interaction = await fuzz.send("queue", options, subcommand=subcommand)
    answer = await _answer(fuzz, interaction)
    assert answer.ephemeral, answer.content
    assert answer.content
    fuzz.assert_quiet()


def test_the_option_table_is_the_command() -> None:
    """The strategies cover every option ``/imagine`` has but its attachments (``lane``
    only where there are several lanes)."""
    import discord

    from bot.cogs.imagine import Imagine

    names = {
        p.name
        for p in Imagine.imagine.parameters
        if p.type is not discord.AppCommandOptionType.attachment
    }
    assert {"prompt", *IMAGINE} - {"lane"} <= names <= {"prompt", *IMAGINE}
    assert NEGATIVE_MAX_LENGTH < PROMPT_MAX_LENGTH
