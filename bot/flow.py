"""What the commands and buttons do: admit a job for an interaction and show its
message, run a job again, cancel, delete. Each entry point turns domain errors into an
ephemeral reply (``bot.errors``); the commands' error handlers do the same."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import discord
import structlog

from bot import cards
from bot.buttons import job_view
from bot.constants import COUNT_MAX
from bot.errors import EXPLAINED, NotAllowed, Refused, reply_error
from bot.messages import JobMessage
from jobs.admission import Admitted
from jobs.control import CancelOutcome, RetryOutcome
from jobs.models import Job, JobRequest, Origin, request_fields
from workflows import UnknownWorkflow

if TYPE_CHECKING:
    from bot.client import BrigadeBot

log = structlog.get_logger(__name__)

_AGE_RESTRICTABLE = (
    discord.TextChannel,
    discord.VoiceChannel,
    discord.StageChannel,
    discord.ForumChannel,
    discord.Thread,
)


def origin_for(bot: BrigadeBot, interaction: discord.Interaction[Any]) -> Origin:
    """Who asked and where: the guild is the quota tenant; an age-restricted channel
    allows the guild's NSFW-only workflows."""
    channel = interaction.channel
    nsfw = isinstance(channel, _AGE_RESTRICTABLE) and channel.is_nsfw()
    return Origin(
        frontend="discord",
        reply_to=bot.front.tracker.frontend_id,
        tenant=str(interaction.guild_id) if interaction.guild_id is not None else None,
        user=str(interaction.user.id),
        channel=str(interaction.channel_id) if interaction.channel_id is not None else None,
        age_restricted=nsfw,
    )


def is_admin(bot: BrigadeBot, interaction: discord.Interaction[Any]) -> bool:
    """A bot owner, or a member who may manage the guild (checked here, not only by
    ``default_permissions``, which a guild can override)."""
    if interaction.user.id in bot.settings.owner_ids:
        return True
    return interaction.guild_id is not None and interaction.permissions.manage_guild


async def admit(bot: BrigadeBot, request: JobRequest, *, key: str, origin: Origin) -> Admitted:
    """Admit ``request`` once per ``key`` (the interaction id), with the guild's own
    workflows beside the catalog."""
    guild = int(origin.tenant) if origin.tenant is not None else None
    return await bot.front.admission.submit(
        request,
        idempotency_key=key,
        origin=origin,
        templates=await bot.workflows.templates(guild),
    )


async def defer_public(interaction: discord.Interaction[Any]) -> None:
    if not interaction.response.is_done():
        await interaction.response.defer(thinking=True)
        interaction.extras["public"] = True


async def start(bot: BrigadeBot, interaction: discord.Interaction[Any], request: JobRequest) -> Job:
    """Defer (public), admit with the interaction id as idempotency key, show the ticket,
    queue position and ETA, and hand the message to the progress editor. Domain errors
    propagate (the caller's error handler answers them)."""
    await defer_public(interaction)
    admitted = await admit(
        bot, request, key=str(interaction.id), origin=origin_for(bot, interaction)
    )
    await show(bot, interaction, admitted)
    return admitted.job


async def show(bot: BrigadeBot, interaction: discord.Interaction[Any], admitted: Admitted) -> None:
    job = admitted.job
    if not admitted.created:
        known = await bot.messages.get(job.job_id)
        if known is not None:  # this interaction was delivered before: one job, one message
            where = f"{known.guild_id or '@me'}/{known.channel_id}/{known.message_id}"
            link = f"https://discord.com/channels/{where}"
            await interaction.edit_original_response(content=f"Already queued: {link}")
            return
    await bot.progress.track(job)
    position = await bot.front.ledger.position(job.job_id)
    card = bot.progress.first_card(job, position)
    message = await interaction.edit_original_response(
        content=card.content, view=job_view(job, final=False), allowed_mentions=cards.NO_MENTIONS
    )
    shown_at = asyncio.get_running_loop().time()
    await bot.progress.attach(
        JobMessage(
            job_id=job.job_id,
            channel_id=message.channel.id,
            message_id=message.id,
            guild_id=interaction.guild_id,
            user_id=interaction.user.id,
            attachment_limit=interaction.filesize_limit,
            done=False,
        ),
        shown_at=shown_at,
    )
    log.info("discord.job_shown", job_id=job.job_id, message_id=message.id)


def request_like(job: Job, *, seed: int | None, count: int | None = None) -> JobRequest:
    """What ``job`` asked for, with a new seed (None: drawn) and optionally a count."""
    fields = {"workflow": job.workflow, "lane": job.lane, **request_fields(job.params)}
    fields["seed"] = seed
    if count is not None:
        fields["count"] = count
    return JobRequest.model_validate(fields)


def _variation_count(bot: BrigadeBot, job: Job) -> int:
    try:
        batch = bot.front.catalog.get(job.workflow).manifest.params.get("batch")
    except UnknownWorkflow:  # the workflow is gone: admission says so
        return 1
    if batch is None:
        return 1
    return int(min(COUNT_MAX, batch.max if batch.max is not None else COUNT_MAX))


async def rerun(
    bot: BrigadeBot, interaction: discord.Interaction[Any], job_id: str, *, variations: bool
) -> None:
    """Reroll (same settings, new seed) or Variations (same prompt, several new seeds)."""
    try:
        job = await _job(bot, job_id)
        count = _variation_count(bot, job) if variations else None
        await start(bot, interaction, request_like(job, seed=None, count=count))
    except EXPLAINED as exc:
        await reply_error(interaction, exc)


async def upscale(bot: BrigadeBot, interaction: discord.Interaction[Any], job_id: str) -> None:
    """The Upscale button: a job of the upscale workflow on the finished picture, once
    per press (the interaction id is its idempotency key)."""
    from bot.images import upscale_request

    try:
        await defer_public(interaction)  # reading and storing the picture takes a moment
        await start(bot, interaction, await upscale_request(bot, job_id))
    except EXPLAINED as exc:
        await reply_error(interaction, exc)


async def _job(bot: BrigadeBot, job_id: str) -> Job:
    record = await bot.front.ledger.get(job_id)
    if record is None:
        raise Refused("That job is not known here any more.")
    return record.job


async def _owned(bot: BrigadeBot, interaction: discord.Interaction[Any], job_id: str) -> Job:
    job = await _job(bot, job_id)
    if job.origin.user != str(interaction.user.id) and not is_admin(bot, interaction):
        raise NotAllowed("Only the person who asked for it, or an admin, can do that.")
    return job


async def cancel_button(
    bot: BrigadeBot, interaction: discord.Interaction[Any], job_id: str
) -> None:
    try:
        await _owned(bot, interaction, job_id)
        outcome = await bot.front.control.cancel(
            job_id, requested_by=f"discord:{interaction.user.id}"
        )
        text = {
            CancelOutcome.CANCELLED: "Cancelled.",
            CancelOutcome.ALREADY_FINISHED: "It already finished.",
            CancelOutcome.NOT_FOUND: "That job is not known here any more.",
        }[outcome]
        await interaction.response.send_message(text, ephemeral=True)
    except EXPLAINED as exc:
        await reply_error(interaction, exc)


async def delete_button(
    bot: BrigadeBot, interaction: discord.Interaction[Any], job_id: str
) -> None:
    try:
        await _owned(bot, interaction, job_id)
        bot.progress.forget(job_id)
        await bot.messages.mark_done(job_id)
        await interaction.response.defer(ephemeral=True, thinking=False)
        if interaction.message is not None:
            await interaction.message.delete()
    except EXPLAINED as exc:
        await reply_error(interaction, exc)


async def cancel_command(
    bot: BrigadeBot, interaction: discord.Interaction[Any], job_id: str
) -> str:
    """``/queue cancel``: an admin cancels a job of their guild (owners: any job)."""
    record = await bot.front.ledger.get(job_id)
    if record is None:
        return "No such job."
    owner = interaction.user.id in bot.settings.owner_ids
    if not owner and record.job.origin.tenant != str(interaction.guild_id):
        return "No such job."
    outcome = await bot.front.control.cancel(job_id, requested_by=f"discord:{interaction.user.id}")
    if outcome is CancelOutcome.CANCELLED:
        return f"Cancelled `{job_id}`."
    if outcome is CancelOutcome.ALREADY_FINISHED:
        return f"`{job_id}` already finished."
    return "No such job."


async def retry_command(bot: BrigadeBot, interaction: discord.Interaction[Any], job_id: str) -> str:
    """``/queue retry``: an admin sends a job of their guild (owners: any job) back from
    the dead-letter queue; its message follows it again."""
    record = await bot.front.ledger.get(job_id)
    owner = interaction.user.id in bot.settings.owner_ids
    if record is None or (not owner and record.job.origin.tenant != str(interaction.guild_id)):
        return "No such job."
    outcome = await bot.front.control.retry(job_id, requested_by=f"discord:{interaction.user.id}")
    if outcome is RetryOutcome.NOT_FAILED:
        return f"`{job_id}` did not fail ({record.status.value}): there is nothing to retry."
    if outcome is RetryOutcome.CANCELLED:
        return f"`{job_id}` was cancelled: ask for it again instead."
    if outcome is RetryOutcome.NOT_DEAD:
        return f"`{job_id}` is not in the dead-letter queue any more: ask for it again instead."
    if outcome is RetryOutcome.NOT_FOUND:
        return "No such job."
    message = await bot.messages.get(job_id)
    if message is not None:
        bot.progress.forget(job_id)
        retried = await bot.front.ledger.get(job_id)
        if retried is not None:
            await bot.progress.track(retried.job)
            await bot.progress.attach(replace(message, done=False))
    return f"Sent `{job_id}` back to the queue."
