"""The admin commands and ``/usage``: permissions checked in code, quotas set from
Discord and enforced at the next ``/imagine``."""

from __future__ import annotations

from pathlib import Path

import pytest

from bot.cogs.admin import parse_quota_value
from bot.errors import Refused
from renderer.backends.base import RenderResult, RenderTask, Reporter
from renderer.exceptions import OutOfMemoryExhausted
from tests.emulators.discord import DiscordEmulator
from tests.fixtures.bot import bot_world


async def test_a_member_cannot_use_admin_commands(
    discord_emulator: DiscordEmulator, tmp_path: Path
) -> None:
    async with bot_world(discord_emulator, tmp_path) as world, world.running() as bot:
        refused = [
            await world.command(
                "quota", {"field": "max_count", "value": "1"}, user=world.user, subcommand="set"
            ),
            await world.command("queue", {"job": "x"}, user=world.user, subcommand="cancel"),
            await world.command("queue", {"job": "x"}, user=world.user, subcommand="retry"),
            await world.command("workers", user=world.user),
        ]
        quota = await bot.front.ledger.quota(str(world.guild.id), bot.front.quota_defaults)

    for interaction in refused:
        assert interaction.response_data["flags"] & 64, interaction.response_data
        assert "Only server admins" in interaction.response_data["content"]
    assert quota.max_count is None
    # The hint for Discord's client is there too, but it is not what protects them.
    commands = {c["name"]: c for c in discord_emulator.commands[world.guild.id].values()}
    assert int(commands["quota"]["default_member_permissions"]) == 1 << 5


async def test_quota_set_then_an_over_limit_imagine(
    discord_emulator: DiscordEmulator, tmp_path: Path
) -> None:
    async with bot_world(discord_emulator, tmp_path) as world, world.running() as bot:
        changed = await world.command(
            "quota", {"field": "max_count", "value": "1"}, subcommand="set"
        )
        changed_answer = await world.answer(changed)
        over = await world.imagine("four lighthouses", count=2)
        over_answer = await world.answer(over)
        usage = await bot.front.ledger.usage(
            str(world.guild.id), str(world.user.id), bot.front.quota_defaults
        )

    assert changed_answer.ephemeral and "`max_count`: 1" in changed_answer.content
    assert over_answer.ephemeral
    assert "count: 2 images is above this server's limit (allowed: at most 1)" in (
        over_answer.content
    )
    assert over.original is not None and over.original.deleted
    assert usage.user_images_today == 0


async def test_usage_queue_status_workers_and_reset(
    discord_emulator: DiscordEmulator, tmp_path: Path
) -> None:
    async with bot_world(discord_emulator, tmp_path) as world, world.running():
        first = await world.imagine("a lighthouse")
        assert first.original is not None
        await world.final(first.original)
        usage = await world.answer(await world.command("usage", user=world.user))
        status = await world.answer(await world.command("queue", subcommand="status"))
        await discord_emulator.wait_until(lambda: bool(world.app.frontend.workers.workers()))
        workers = await world.answer(await world.command("workers"))
        reset = await world.answer(
            await world.command("quota", {"user": world.user}, subcommand="reset")
        )
        shown = await world.answer(await world.command("quota", subcommand="show"))
        after = await world.answer(await world.command("usage", user=world.user))

    assert usage.ephemeral and "99 for you (1 used)" in usage.content
    assert "`fast`: 0 waiting, 0 rendering · 0 in the queue from every frontend" in status.content
    assert "`w-test` demo" in workers.content
    assert "1 images back" in reset.content
    assert "`images_per_user_per_day`: 100" in shown.content
    assert "100 for you (0 used)" in after.content


def test_quota_values_are_parsed_by_field() -> None:
    assert parse_quota_value("max_count", "3") == 3
    assert parse_quota_value("max_count", "none") is None
    assert parse_quota_value("workflows", "all") is None
    assert parse_quota_value("workflows", "demo, sdxl-txt2img") == ["demo", "sdxl-txt2img"]
    assert parse_quota_value("banned_words", "none") == []
    with pytest.raises(Refused):
        parse_quota_value("max_steps", "many")


async def test_pause_and_resume_admissions(
    discord_emulator: DiscordEmulator, tmp_path: Path
) -> None:
    async with bot_world(discord_emulator, tmp_path) as world, world.running() as bot:
        paused = await world.answer(await world.command("queue", subcommand="pause"))
        refused = await world.answer(await world.imagine("a lighthouse"))
        everywhere = await world.answer(
            await world.command("queue", {"everywhere": True}, subcommand="pause")
        )
        resumed = await world.answer(await world.command("queue", subcommand="resume"))
        taken = await world.imagine("a lighthouse")
        await world.answer(taken)
        admitted = await bot.front.ledger.get_by_key(str(taken.id))

    assert "this server are paused" in paused.content
    assert refused.ephemeral and "paused" in refused.content
    assert "Only the bot's owners" in everywhere.content
    assert "taking new jobs again" in resumed.content
    assert taken.original is not None and not taken.original.deleted
    assert admitted is not None and admitted.job.prompt == "a lighthouse"


async def test_list_and_purge_the_waiting_jobs(
    discord_emulator: DiscordEmulator, tmp_path: Path
) -> None:
    async with (
        bot_world(discord_emulator, tmp_path, step_seconds=0.3) as world,
        world.running() as bot,
    ):
        await world.answer(await world.imagine("first"))
        await world.answer(await world.imagine("second", user=world.other))
        listed = await world.answer(await world.command("queue", subcommand="list"))
        purged = await world.answer(await world.command("queue", subcommand="purge"))
        records = {
            r.job.prompt: r.status.value for r in await bot.front.ledger.active(str(world.guild.id))
        }

    assert "**2 job(s)**" in listed.content
    assert "first" in listed.content and "second" in listed.content
    assert purged.content == "Cancelled 1 waiting job(s)."
    assert records == {"first": "running"}


async def test_retry_sends_a_dead_job_back_and_its_message_follows(
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
        assert "❌ Failed" in message.content
        job_id = message.custom_ids()[0].rsplit(":", 1)[-1]
        monkeypatch.undo()  # the GPU is fine again

        other_guild = await world.answer(
            await world.command("queue", {"job": "no-such-job"}, subcommand="retry")
        )
        retried = await world.answer(
            await world.command("queue", {"job": job_id}, subcommand="retry")
        )
        await discord_emulator.wait_until(
            lambda: "✅ Done" in message.content, 10, "the retried job's result"
        )
        again = await world.answer(
            await world.command("queue", {"job": job_id}, subcommand="retry")
        )
        usage = await bot.front.ledger.usage(
            str(world.guild.id), str(world.user.id), bot.front.quota_defaults
        )

    assert other_guild.content == "No such job."
    assert retried.ephemeral and f"Sent `{job_id}` back to the queue." in retried.content
    assert "did not fail (succeeded)" in again.content
    assert (usage.user_images_today, usage.user_in_flight) == (1, 0)
