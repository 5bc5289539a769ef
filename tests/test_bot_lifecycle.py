"""A job's message over its life: restarts, deleted messages, rate limits, expired
interaction tokens, cancels. The real discord.py against the Discord emulator, the
embedded pipeline behind it."""

from __future__ import annotations

import asyncio
from pathlib import Path

from jobs.models import Failed, FailureReason, JobStatus, Succeeded
from tests.emulators.discord import CallbackType, DiscordEmulator, Message
from tests.fixtures.bot import BotWorld, bot_world

EDIT = "PATCH /channels/{channel_id}/messages/{message_id}"
WEBHOOK = "/webhooks/"


def _job_id(message: Message) -> str:
    return message.custom_ids()[0].split(":")[2]


async def _rendering(world: BotWorld, message: Message) -> None:
    await world.emulator.wait_until(lambda: "step" in message.content, 5.0, "a progress edit")


async def test_reroll_after_a_restart(discord_emulator: DiscordEmulator, tmp_path: Path) -> None:
    async with bot_world(discord_emulator, tmp_path) as world:
        async with world.running():
            first = await world.imagine("a lighthouse", seed=11)
            message = first.original
            assert message is not None
            await world.final(message)
        old_job = _job_id(message)
        # A new bot process: no view in memory, the custom_id carries the job.
        async with world.running(dev_guilds=[]) as bot:
            click = await discord_emulator.click_button(
                message, f"brigade:reroll:{old_job}", world.user.id
            )
            await click.wait_response()
            reroll = click.original
            assert reroll is not None
            await world.final(reroll)
            new_job = _job_id(reroll)
            old = await bot.front.ledger.get(old_job)
            new = await bot.front.ledger.get(new_job)

    assert click.deferred_within(3.0)
    assert click.response_type == CallbackType.DEFERRED_CHANNEL_MESSAGE_WITH_SOURCE
    assert "✅ Done" in reroll.content and not reroll.ephemeral
    assert new_job != old_job
    assert old is not None and new is not None
    assert new.job.idempotency_key == str(click.id)
    assert new.job.prompt == old.job.prompt == "a lighthouse"
    assert new.job.params["seed"] != 11
    assert {k: v for k, v in new.job.params.items() if k != "seed"} == {
        k: v for k, v in old.job.params.items() if k != "seed"
    }


async def test_a_restarted_bot_keeps_editing_jobs_in_flight(
    discord_emulator: DiscordEmulator, tmp_path: Path
) -> None:
    async with bot_world(discord_emulator, tmp_path, step_seconds=0.1) as world:
        async with world.running():
            interaction = await world.imagine("a slow lighthouse")
            message = interaction.original
            assert message is not None
            await _rendering(world, message)
        async with world.running(dev_guilds=[]):
            await world.final(message)

    assert "✅ Done" in message.content


async def test_a_deleted_message_stops_the_edits_not_the_job(
    discord_emulator: DiscordEmulator, tmp_path: Path
) -> None:
    async with (
        bot_world(discord_emulator, tmp_path, step_seconds=0.1) as world,
        world.running() as bot,
    ):
        interaction = await world.imagine("a lighthouse")
        message = interaction.original
        assert message is not None
        await _rendering(world, message)
        job_id = _job_id(message)
        discord_emulator.delete_message(world.channel_id, message.id)
        end = await bot.front.tracker.wait(job_id, 10)
        await discord_emulator.wait_until(
            lambda: any(c.status == 404 for c in discord_emulator.calls_to(EDIT)),
            what="an edit of the deleted message",
        )
        await asyncio.sleep(world.interval * 2)
        pending = await bot.messages.pending()

    assert isinstance(end, Succeeded)
    deleted_at = message.deleted_at
    assert deleted_at is not None
    edits = [c for c in discord_emulator.calls_to(EDIT) if c.time > deleted_at]
    assert [c.status for c in edits] == [404]
    assert pending == []


async def test_a_rate_limited_edit_is_retried(
    discord_emulator: DiscordEmulator, tmp_path: Path
) -> None:
    async with bot_world(discord_emulator, tmp_path) as world, world.running():
        discord_emulator.rate_limit_next(EDIT, retry_after=0.3)
        interaction = await world.imagine("a lighthouse")
        message = interaction.original
        assert message is not None
        await world.final(message)

    statuses = [c.status for c in discord_emulator.calls_to(EDIT)]
    assert statuses[0] == 429 and statuses[1] == 200
    limited, retried = discord_emulator.calls_to(EDIT)[:2]
    assert retried.time - limited.time >= 0.3
    assert "✅ Done" in message.content


async def test_a_job_outliving_its_interaction_token_still_lands(
    discord_emulator: DiscordEmulator, tmp_path: Path
) -> None:
    async with bot_world(discord_emulator, tmp_path, step_seconds=0.05) as world, world.running():
        interaction = await world.imagine("a lighthouse")
        message = interaction.original
        assert message is not None
        await discord_emulator.wait_until(lambda: len(message.edits) >= 1)
        discord_emulator.expire_interaction_tokens()
        await world.final(message)

    webhook_calls = [c for c in discord_emulator.calls if c.path.startswith(WEBHOOK)]
    assert all(c.status == 200 for c in webhook_calls)  # nothing tried the dead token
    assert {e.via for e in message.edits[1:]} == {"bot"}
    assert "✅ Done" in message.content


async def test_queue_cancel_of_a_running_job(
    discord_emulator: DiscordEmulator, tmp_path: Path
) -> None:
    async with (
        bot_world(discord_emulator, tmp_path, step_seconds=0.2) as world,
        world.running() as bot,
    ):
        interaction = await world.imagine("a lighthouse")
        message = interaction.original
        assert message is not None
        await _rendering(world, message)
        job_id = _job_id(message)
        cancel = await world.command("queue", {"job": job_id}, subcommand="cancel")
        answer = await world.answer(cancel)
        await world.final(message)
        record = await bot.front.ledger.get(job_id)
        usage = await bot.front.ledger.usage(
            str(world.guild.id), str(world.user.id), bot.front.quota_defaults
        )

    assert answer.ephemeral and answer.content == f"Cancelled `{job_id}`."
    assert "🚫 Cancelled" in message.content
    assert record is not None and record.status is JobStatus.FAILED
    assert isinstance(record.terminal, Failed)
    assert record.terminal.reason is FailureReason.CANCELLED
    assert (usage.user_images_today, usage.user_in_flight) == (0, 0)


async def test_the_author_cancels_with_the_button_and_others_cannot(
    discord_emulator: DiscordEmulator, tmp_path: Path
) -> None:
    async with bot_world(discord_emulator, tmp_path, step_seconds=0.2) as world, world.running():
        interaction = await world.imagine("a lighthouse")
        message = interaction.original
        assert message is not None
        await _rendering(world, message)
        custom_id = message.custom_ids()[0]
        assert custom_id.startswith("brigade:cancel:")
        refused = await discord_emulator.click_button(message, custom_id, world.other.id)
        await refused.wait_response()
        done = await discord_emulator.click_button(message, custom_id, world.user.id)
        await done.wait_response()
        await world.final(message)

    assert refused.response_data["flags"] & 64
    assert "Only the person who asked" in refused.response_data["content"]
    assert done.response_data["content"] == "Cancelled."
    assert "🚫 Cancelled" in message.content


async def test_variations_render_new_seeds_of_the_same_prompt(
    discord_emulator: DiscordEmulator, tmp_path: Path
) -> None:
    async with bot_world(discord_emulator, tmp_path) as world, world.running() as bot:
        first = await world.imagine("a lighthouse", seed=3)
        message = first.original
        assert message is not None
        await world.final(message)
        vary = next(c for c in message.custom_ids() if c.startswith("brigade:vary:"))
        click = await discord_emulator.click_button(message, vary, world.other.id)
        await click.wait_response()
        variations = click.original
        assert variations is not None
        await world.final(variations)
        record = await bot.front.ledger.get(_job_id(variations))

    assert record is not None
    assert record.job.params["batch"] == 4 and record.job.params["seed"] != 3
    assert record.job.prompt == "a lighthouse"
    assert record.job.origin.user == str(world.other.id)  # charged to whoever clicked
    assert variations.attachment("result.png").image().size == (1024, 1024)
