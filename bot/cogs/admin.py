"""Usage, quotas, the queue and the workers: ``/usage`` for anyone, the rest for guild
admins (Manage Server, checked here as well as by ``default_permissions``) and the
bot's owners."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import discord
from discord import app_commands
from discord.ext import commands
from pydantic import ValidationError

from bot import flow
from bot.cards import NO_MENTIONS
from bot.client import BrigadeBot
from bot.errors import NotAllowed, Refused, reply_error
from jobs.control import CancelOutcome
from jobs.exceptions import JobsError
from jobs.quotas import EVERYONE, QuotaSettings

#: ``/quota set`` fields that hold a number (``none`` lifts the limit).
NUMBER_FIELDS = (
    "images_per_day",
    "images_per_user_per_day",
    "concurrent_per_user",
    "pending_per_tenant",
    "max_steps",
    "max_pixels",
    "max_count",
)
#: Fields that hold a list where ``all`` means no restriction.
RESTRICTING_LISTS = ("workflows", "lanes", "models")
#: Fields that hold a list where ``none`` empties it.
PLAIN_LISTS = ("banned_words", "nsfw_workflows")


T = TypeVar("T")


def admin_only() -> Callable[[T], T]:
    """An app-command check: bot owners, or members who may manage the guild."""

    def predicate(interaction: discord.Interaction[Any]) -> bool:
        bot = interaction.client
        assert isinstance(bot, BrigadeBot)
        if not flow.is_admin(bot, interaction):
            raise NotAllowed("Only server admins (Manage Server) can do that.")
        return True

    return app_commands.check(predicate)


def parse_quota_value(field: str, text: str) -> Any:
    """``/quota set``'s value as the field's type; :class:`Refused` when it is not one."""
    text = str(text).strip()  # the gateway may deliver any JSON value
    lowered = text.lower()
    if field in NUMBER_FIELDS:
        if lowered in ("none", "off", "unlimited"):
            return None
        try:
            return int(text)
        except ValueError:
            raise Refused(f"`{field}` takes a whole number, or `none` for no limit.") from None
    items = [part.strip() for part in text.split(",") if part.strip()]
    if field in RESTRICTING_LISTS:
        if lowered == "all":
            return None
        return [] if lowered == "none" else items
    if field in PLAIN_LISTS:
        return [] if lowered == "none" else items
    raise Refused(f"`{field}` is not a quota setting.")


def describe_quota(quota: QuotaSettings) -> str:
    lines = []
    for name, value in quota.model_dump().items():
        if value is None:
            shown = "no limit" if name in NUMBER_FIELDS else "all"
        elif isinstance(value, list):
            shown = ", ".join(str(v) for v in value) or "none"
        else:
            shown = str(value)
        lines.append(f"`{name}`: {discord.utils.escape_markdown(shown)}")
    return "\n".join(lines)


def _left(value: int | None) -> str:
    return "no limit" if value is None else str(value)


class Admin(commands.Cog):
    quota = app_commands.Group(
        name="quota",
        description="This server's limits",
        guild_only=True,
        default_permissions=discord.Permissions(manage_guild=True),
    )
    queue = app_commands.Group(
        name="queue",
        description="The render queue",
        guild_only=True,
        default_permissions=discord.Permissions(manage_guild=True),
    )

    def __init__(self, bot: BrigadeBot) -> None:
        self.bot = bot

    def _tenant(self, interaction: discord.Interaction[Any]) -> str:
        if interaction.guild_id is None:
            raise Refused("Use this in a server.")
        return str(interaction.guild_id)

    async def _answer(self, interaction: discord.Interaction[Any], text: str) -> None:
        await interaction.followup.send(text[:2000], ephemeral=True, allowed_mentions=NO_MENTIONS)

    @app_commands.command(name="usage", description="What you have left today")
    @app_commands.guild_only()
    async def usage(self, interaction: discord.Interaction[BrigadeBot]) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        front = self.bot.front
        usage = await front.ledger.usage(
            self._tenant(interaction), str(interaction.user.id), front.quota_defaults
        )
        text = (
            f"Images left today: {_left(usage.user_images_left)} for you "
            f"({usage.user_images_today} used), "
            f"{_left(usage.tenant_images_left)} for this server.\n"
            f"Jobs in flight: {usage.user_in_flight} "
            f"(can start {_left(usage.user_in_flight_left)} more).\n"
            f"Resets {discord.utils.format_dt(usage.resets_at, 'R')}."
        )
        await self._answer(interaction, text)

    @quota.command(name="show", description="Show this server's limits")
    @admin_only()
    async def quota_show(self, interaction: discord.Interaction[BrigadeBot]) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        front = self.bot.front
        quota = await front.ledger.quota(self._tenant(interaction), front.quota_defaults)
        await self._answer(interaction, describe_quota(quota))

    @quota.command(name="set", description="Change one of this server's limits")
    @app_commands.describe(
        field="Which limit",
        value="A number (`none`: no limit) or a comma-separated list (`all`, `none`)",
    )
    @app_commands.choices(
        field=[
            app_commands.Choice(name=name, value=name)
            for name in (*NUMBER_FIELDS, *RESTRICTING_LISTS, *PLAIN_LISTS)
        ]
    )
    @admin_only()
    async def quota_set(
        self,
        interaction: discord.Interaction[BrigadeBot],
        field: app_commands.Choice[str],
        value: app_commands.Range[str, 1, 1000],
    ) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        front = self.bot.front
        parsed = parse_quota_value(field.value, value)
        try:
            quota = await front.ledger.set_quota(
                self._tenant(interaction), {field.value: parsed}, front.quota_defaults
            )
        except ValidationError as exc:
            problem = exc.errors()[0]["msg"] if exc.errors() else str(exc)
            raise Refused(f"`{field.value}`: {problem}") from exc
        await self._answer(interaction, f"Updated.\n{describe_quota(quota)}")

    @quota.command(name="reset", description="Give a member today's images back")
    @admin_only()
    async def quota_reset(
        self, interaction: discord.Interaction[BrigadeBot], user: discord.Member
    ) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        given = await self.bot.front.ledger.reset_usage(self._tenant(interaction), str(user.id))
        await self._answer(interaction, f"Gave {user.mention} {given} images back for today.")

    @queue.command(name="status", description="Jobs waiting and rendering, and the workers")
    @admin_only()
    async def queue_status(self, interaction: discord.Interaction[BrigadeBot]) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        ledger = self.bot.front.ledger
        counts: dict[str, dict[str, int]] = {lane: {} for lane in self.bot.front.admission.lanes}
        for (lane, status), jobs in sorted((await ledger.counts()).items()):
            counts.setdefault(lane, {})[status] = jobs
        try:
            depths: dict[str, int] | None = await self.bot.front.admission.depths()
        except JobsError:
            depths = None
        busy = [b for b in self.bot.front.workers.workers() if b.state.value != "stopped"]
        lines = ["**Lanes**"]
        for lane, by_status in counts.items():
            line = (
                f"`{lane}`: {by_status.get('queued', 0)} waiting, "
                f"{by_status.get('running', 0)} rendering"
            )
            if depths is not None:
                waiting = depths.get(lane, 0)
                serving = sum(1 for beat in busy if lane in beat.lanes)
                line += f" · {waiting} in the queue from every frontend"
                if waiting and serving:
                    eta = self.bot.progress.eta(-(-waiting // serving))
                    if eta is not None:
                        line += f", the last starts <t:{int(eta.timestamp())}:R>"
                elif waiting:
                    line += ", no worker serves it"
            lines.append(line)
        running = await ledger.running()
        if running:
            lines.append("**Rendering**")
            lines += [f"`{r.job.job_id}` ({r.job.workflow})" for r in running]
        lines.append(self._workers_text())
        await self._answer(interaction, "\n".join(lines))

    @queue.command(name="cancel", description="Cancel a job of this server")
    @app_commands.describe(job="The job's ticket")
    @admin_only()
    async def queue_cancel(
        self, interaction: discord.Interaction[BrigadeBot], job: app_commands.Range[str, 1, 64]
    ) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        await self._answer(
            interaction, await flow.cancel_command(self.bot, interaction, str(job).strip())
        )

    @queue.command(name="retry", description="Send a failed job back from the dead-letter queue")
    @app_commands.describe(job="The job's ticket")
    @admin_only()
    async def queue_retry(
        self, interaction: discord.Interaction[BrigadeBot], job: app_commands.Range[str, 1, 64]
    ) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        await self._answer(
            interaction, await flow.retry_command(self.bot, interaction, str(job).strip())
        )

    @queue.command(name="list", description="This server's jobs waiting and rendering")
    @admin_only()
    async def queue_list(self, interaction: discord.Interaction[BrigadeBot]) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        records = await self.bot.front.ledger.active(self._tenant(interaction))
        if not records:
            await self._answer(interaction, "No job of this server is waiting or rendering.")
            return
        lines = [f"**{len(records)} job(s)**, oldest first"]
        for record in records:
            job = record.job
            prompt = discord.utils.escape_markdown(job.prompt[:60])
            lines.append(
                f"`{job.job_id}` {record.status.value} · {job.workflow} · "
                f"<@{job.origin.user}> · {prompt}"
            )
        await self._answer(interaction, "\n".join(lines))

    @queue.command(name="purge", description="Cancel every job of this server still waiting")
    @admin_only()
    async def queue_purge(self, interaction: discord.Interaction[BrigadeBot]) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        records = await self.bot.front.ledger.active(self._tenant(interaction), limit=1000)
        by = f"discord:{interaction.user.id}"
        cancelled = 0
        for record in records:
            if record.status.value == "queued":
                outcome = await self.bot.front.control.cancel(record.job.job_id, requested_by=by)
                cancelled += outcome is CancelOutcome.CANCELLED
        await self._answer(interaction, f"Cancelled {cancelled} waiting job(s).")

    @queue.command(name="pause", description="Stop taking new jobs (jobs already queued go on)")
    @app_commands.describe(everywhere="Every server (bot owners only)")
    @admin_only()
    async def queue_pause(
        self, interaction: discord.Interaction[BrigadeBot], everywhere: bool = False
    ) -> None:
        await self._set_paused(interaction, paused=True, everywhere=everywhere)

    @queue.command(name="resume", description="Take new jobs again")
    @app_commands.describe(everywhere="Every server (bot owners only)")
    @admin_only()
    async def queue_resume(
        self, interaction: discord.Interaction[BrigadeBot], everywhere: bool = False
    ) -> None:
        await self._set_paused(interaction, paused=False, everywhere=everywhere)

    async def _set_paused(
        self, interaction: discord.Interaction[BrigadeBot], *, paused: bool, everywhere: bool
    ) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        if everywhere and interaction.user.id not in self.bot.settings.owner_ids:
            raise Refused("Only the bot's owners can pause or resume every server.")
        tenant = EVERYONE if everywhere else self._tenant(interaction)
        front = self.bot.front
        await front.ledger.set_quota(tenant, {"paused": paused}, front.quota_defaults)
        where = "every server" if everywhere else "this server"
        state = "paused: no new job is taken" if paused else "taking new jobs again"
        await self._answer(interaction, f"Admissions for {where} are {state}.")

    @app_commands.command(name="workers", description="The renderers and what they do")
    @app_commands.guild_only()
    @app_commands.default_permissions(manage_guild=True)
    @admin_only()
    async def workers(self, interaction: discord.Interaction[BrigadeBot]) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        await self._answer(interaction, self._workers_text())

    def _workers_text(self) -> str:
        beats = self.bot.front.workers.workers()
        if not beats:
            return "**Workers**\nNone heard from recently."
        lines = ["**Workers**"]
        for beat in beats:
            vram = ""
            if beat.vram_total:
                used = (beat.vram_total - (beat.vram_free or 0)) / 2**30
                vram = f", VRAM {used:.1f}/{beat.vram_total / 2**30:.1f} GiB"
            doing = f" on `{beat.job_id}`" if beat.job_id else ""
            device = f" ({beat.device})" if beat.device else ""
            lines.append(
                f"`{beat.worker_id}` {beat.backend}{device}: {beat.state.value}{doing}, "
                f"lanes {', '.join(beat.lanes)}{vram}, {beat.completed} done"
            )
        return "\n".join(lines)

    async def cog_app_command_error(
        self, interaction: discord.Interaction[discord.Client], error: app_commands.AppCommandError
    ) -> None:
        await reply_error(interaction, error)
