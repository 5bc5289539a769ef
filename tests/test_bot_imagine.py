"""``/imagine`` end to end: the real discord.py against the Discord emulator, the
embedded pipeline (in-process broker, demo renderer, local images) behind it."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from bot import flow
from bot.cards import FAILURE_TEXT
from jobs.ledger import Ledger
from jobs.models import FailureReason, JobRequest, Origin
from renderer.backends.base import RenderResult, RenderTask, Reporter
from renderer.exceptions import OutOfMemoryExhausted
from tests.emulators.discord import CallbackType, DiscordEmulator
from tests.fixtures.bot import bot_world


async def test_imagine_happy_path(discord_emulator: DiscordEmulator, tmp_path: Path) -> None:
    async with bot_world(discord_emulator, tmp_path) as world, world.running():
        interaction = await world.imagine("a red fox in the snow", seed=7)
        assert interaction.deferred_within(3.0)
        assert interaction.response_type == CallbackType.DEFERRED_CHANNEL_MESSAGE_WITH_SOURCE
        message = interaction.original
        assert message is not None
        await world.final(message)

    assert "✅ Done" in message.content
    assert "a red fox in the snow" in message.content
    [embed] = message.embeds
    assert embed["title"] == "Done"
    assert embed["image"]["url"].startswith(discord_emulator.url)
    assert "file://" in embed["description"]
    assert message.attachment("result.png").image().size == (512, 512)
    [job_id] = {c.split(":")[2] for c in message.custom_ids()}
    assert message.custom_ids() == [
        f"brigade:reroll:{job_id}",
        f"brigade:vary:{job_id}",
        f"brigade:upscale:{job_id}",
        f"brigade:delete:{job_id}",
    ]
    # The first edit is the interaction's; every later one uses the bot token.
    vias = [edit.via for edit in message.edits]
    assert vias[0] == "webhook" and set(vias[1:]) == {"bot"} and len(vias) >= 3
    times = [edit.time for edit in message.edits]
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    assert min(gaps) >= world.interval - 0.05, gaps
    # While it rendered: a progress bar, the step and the latest preview.
    rendering = [e for e in message.edits if "step" in e.content]
    assert rendering and "█" in rendering[-1].content
    assert any(f.filename == "preview.webp" for e in rendering for f in e.files)


async def test_four_images_make_a_grid_under_the_upload_limit(
    discord_emulator: DiscordEmulator, tmp_path: Path
) -> None:
    discord_emulator.attachment_size_limit = 150_000
    async with bot_world(discord_emulator, tmp_path) as world, world.running():
        interaction = await world.imagine("four lighthouses", count=4, aspect="wide")
        message = interaction.original
        assert message is not None
        await world.final(message)

    [picture] = message.attachments
    assert picture.filename == "result.jpg"
    assert picture.size <= 150_000
    assert picture.image().width > picture.image().height
    [embed] = message.embeds
    assert embed["description"].count("file://") == 4
    assert "680×384" in embed["description"]


async def test_the_author_deletes_the_result(
    discord_emulator: DiscordEmulator, tmp_path: Path
) -> None:
    async with bot_world(discord_emulator, tmp_path) as world, world.running():
        interaction = await world.imagine("a lighthouse")
        message = interaction.original
        assert message is not None
        await world.final(message)
        delete = next(c for c in message.custom_ids() if c.startswith("brigade:delete:"))
        refused = await discord_emulator.click_button(message, delete, world.other.id)
        await refused.wait_response()
        assert not message.deleted
        click = await discord_emulator.click_button(message, delete, world.user.id)
        await discord_emulator.wait_until(lambda: message.deleted, what="the deletion")

    assert "Only the person who asked" in refused.response_data["content"]
    assert click.deferred_within(3.0)


async def test_the_same_interaction_twice_is_one_job(
    discord_emulator: DiscordEmulator, tmp_path: Path
) -> None:
    async with bot_world(discord_emulator, tmp_path) as world, world.running() as bot:
        interaction = await world.imagine("a lighthouse")
        message = interaction.original
        assert message is not None
        await world.final(message)
        # Discord redelivering the interaction: the cog's admission path, same id.
        origin = Origin(
            frontend="discord",
            reply_to=bot.front.tracker.frontend_id,
            tenant=str(world.guild.id),
            user=str(world.user.id),
        )
        request = JobRequest(workflow="demo", prompt="a lighthouse")
        again = await flow.admit(bot, request, key=str(interaction.id), origin=origin)
        usage = await bot.front.ledger.usage(
            str(world.guild.id), str(world.user.id), bot.front.quota_defaults
        )
        first = await _job_of(bot.front.ledger, message.custom_ids()[0])

    assert not again.created
    assert again.job.job_id == first
    assert usage.user_images_today == 1
    assert len(interaction.callbacks) == 1


async def test_quota_exhausted_is_refused_privately(
    discord_emulator: DiscordEmulator, tmp_path: Path
) -> None:
    async with bot_world(discord_emulator, tmp_path) as world, world.running() as bot:
        front = bot.front
        tenant = str(world.guild.id)
        await front.ledger.set_quota(tenant, {"images_per_user_per_day": 0}, front.quota_defaults)
        interaction = await world.imagine("a lighthouse")
        answer = await world.answer(interaction)
        usage = await front.ledger.usage(tenant, str(world.user.id), front.quota_defaults)
        record = await front.ledger.get_by_key(str(interaction.id))

    assert interaction.deferred_within(3.0)
    assert answer.ephemeral
    assert "0 of your 0 images left today" in answer.content
    assert interaction.original is not None and interaction.original.deleted
    # Never published. (jobs/ledger.py leaves the refused row behind, unpublished:
    # sqlite-utils 4 commits each db.execute, so admit's transaction is not one.)
    assert record is None or not record.published
    assert (usage.user_images_today, usage.user_in_flight) == (0, 0)
    assert not [m for m in discord_emulator.messages_in(world.channel_id) if m.custom_ids()]


async def test_a_failed_job_says_why_and_costs_nothing(
    discord_emulator: DiscordEmulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def out_of_memory(task: RenderTask, report: Reporter) -> RenderResult:
        raise OutOfMemoryExhausted("The GPU ran out of memory, twice.")

    async with bot_world(discord_emulator, tmp_path) as world, world.running() as bot:
        monkeypatch.setattr(world.app.backend, "render", out_of_memory)
        interaction = await world.imagine("a lighthouse")
        message = interaction.original
        assert message is not None
        await world.final(message)
        usage = await bot.front.ledger.usage(
            str(world.guild.id), str(world.user.id), bot.front.quota_defaults
        )

    assert "❌ Failed" in message.content
    assert FAILURE_TEXT[FailureReason.OOM] in message.content
    assert "not charged" in message.content
    assert message.custom_ids()[0].startswith("brigade:reroll:")
    assert (usage.user_images_today, usage.user_in_flight) == (0, 0)


async def test_invalid_options_are_listed_privately(
    discord_emulator: DiscordEmulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AMQP_LANES", "fast,relax")
    async with bot_world(discord_emulator, tmp_path) as world, world.running():
        interaction = await world.imagine("a lighthouse", lane="nowhere")
        answer = await world.answer(interaction)

    assert answer.ephemeral
    assert "lane: 'nowhere' is not a lane" in answer.content


async def test_the_lane_option_is_there_only_with_several_lanes(
    discord_emulator: DiscordEmulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with bot_world(discord_emulator, tmp_path / "one") as world, world.running():
        one = discord_emulator.commands[world.guild.id]
        single = {o["name"] for c in one.values() if c["name"] == "imagine" for o in c["options"]}

    monkeypatch.setenv("AMQP_LANES", "fast,relax")
    async with bot_world(discord_emulator, tmp_path / "two") as world, world.running() as bot:
        two = discord_emulator.commands[world.guild.id]
        several = {o["name"] for c in two.values() if c["name"] == "imagine" for o in c["options"]}
        front = bot.front
        await front.ledger.set_quota(
            str(world.guild.id), {"lanes": ["relax"]}, front.quota_defaults
        )
        offered = await discord_emulator.send_autocomplete(
            world.guild.id,
            world.channel_id,
            world.user.id,
            "imagine",
            {"prompt": "x", "lane": ""},
            focused="lane",
        )
        await offered.wait_response()
        refused = await world.answer(await world.imagine("a lighthouse", lane="fast"))
        taken = await world.imagine("a lighthouse", lane="relax")
        assert taken.original is not None
        await world.final(taken.original)

    assert "lane" not in single and "prompt" in single
    assert "lane" in several
    assert [c["value"] for c in offered.choices] == ["relax"]
    assert refused.ephemeral and "fast" in refused.content
    assert "✅ Done" in taken.original.content


async def _job_of(ledger: Ledger, custom_id: str) -> str:
    job_id = custom_id.split(":")[2]
    assert await ledger.get(job_id) is not None
    return job_id


async def test_a_waiting_job_shows_its_position_and_eta(
    discord_emulator: DiscordEmulator, tmp_path: Path
) -> None:
    async with (
        bot_world(discord_emulator, tmp_path, step_seconds=0.05) as world,
        world.running(),
    ):
        first = await world.imagine("the first lighthouse")
        second = await world.imagine("the second lighthouse", user=world.other)
        assert first.original is not None and second.original is not None
        edits = second.original.edits
        await discord_emulator.wait_until(lambda: bool(edits), what="the first response")
        waiting = edits[0].content
        await world.final(second.original)

    assert "⏳ Waiting: #1 in the `fast` queue, starts <t:" in waiting
    assert ":R>" in waiting
    assert "✅ Done" in first.original.content and "✅ Done" in second.original.content


async def test_workflow_autocomplete_offers_what_the_guild_allows(
    discord_emulator: DiscordEmulator, tmp_path: Path
) -> None:
    async with bot_world(discord_emulator, tmp_path) as world, world.running() as bot:
        everything = await discord_emulator.send_autocomplete(
            world.guild.id,
            world.channel_id,
            world.user.id,
            "imagine",
            {"prompt": "x", "workflow": ""},
            focused="workflow",
        )
        await everything.wait_response()
        front = bot.front
        await front.ledger.set_quota(
            str(world.guild.id), {"workflows": ["demo"]}, front.quota_defaults
        )
        limited = await discord_emulator.send_autocomplete(
            world.guild.id,
            world.channel_id,
            world.user.id,
            "imagine",
            {"prompt": "x", "workflow": "d"},
            focused="workflow",
        )
        await limited.wait_response()
        unknown = await world.imagine("x", workflow="no-such-workflow")

    assert [c["value"] for c in everything.choices] == bot.front.catalog.names()
    assert [c["value"] for c in limited.choices] == ["demo"]
    assert unknown.response_data["flags"] & 64
    assert "no-such-workflow" in unknown.response_data["content"]
