"""The bot: a ``commands.Bot`` over a Brigade ``Frontend``.

``setup_hook`` (once, after login, before the gateway) opens the bot's message table,
adds the cogs and the buttons' ``DynamicItem``s, routes the tracker's events to the
progress editor, re-attaches the messages of jobs still in flight (restart safety) and
syncs the commands: to ``dev_guilds`` for instant updates, else globally.
"""

from __future__ import annotations

from pathlib import Path

import discord
import structlog
import yarl
from discord.ext import commands

from bot.buttons import DYNAMIC_ITEMS, job_view
from bot.constants import MAX_RATELIMIT_SLEEP_SECONDS
from bot.messages import MessageStore
from bot.progress import ProgressEditor
from bot.settings import DiscordSettings
from bot.workflows import GuildWorkflows
from brigade.app import Frontend
from jobs.models import Job
from storage import InputImageSettings, ObjectStore

log = structlog.get_logger(__name__)


def point_discord_py(settings: DiscordSettings) -> None:
    """Send discord.py's REST calls and gateway connection where the settings say (a
    rate-limit proxy, or the emulator in tests). Must run before ``login``."""
    discord.http.Route.BASE = settings.api_base_url.rstrip("/")
    discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(settings.gateway_url)


class BrigadeBot(commands.Bot):
    def __init__(
        self,
        front: Frontend,
        settings: DiscordSettings,
        ledger_path: Path,
        *,
        store: ObjectStore | None = None,
        input_limits: InputImageSettings | None = None,
    ) -> None:
        super().__init__(
            command_prefix=commands.when_mentioned,
            intents=discord.Intents.default(),
            owner_ids=set(settings.owner_ids) or None,
            guild_ready_timeout=settings.guild_ready_timeout,
            max_ratelimit_timeout=MAX_RATELIMIT_SLEEP_SECONDS,
            allowed_mentions=discord.AllowedMentions.none(),
            help_command=None,
        )
        self.front = front
        self.settings = settings
        #: Where attachments are kept for renderers (None: the bot takes no images).
        self.store = store
        #: Limits on attachments; None given: the documented defaults.
        self.input_limits = input_limits or InputImageSettings.model_construct()
        self.messages = MessageStore(ledger_path)
        self.workflows = GuildWorkflows(ledger_path)
        self.progress = ProgressEditor(
            self,
            front.ledger,
            self.messages,
            store,
            self.job_view,
            interval=settings.edit_interval_seconds,
        )

    def job_view(self, job: Job, *, final: bool, succeeded: bool = False) -> discord.ui.View:
        """A job message's buttons; Upscale on a finished picture when it is set up."""
        from bot.images import upscale_template

        upscale = succeeded and self.store is not None and upscale_template(self) is not None
        return job_view(job, final=final, upscale=upscale)

    async def setup_hook(self) -> None:
        from bot.cogs.admin import Admin
        from bot.cogs.imagine import Imagine
        from bot.cogs.workflows import Workflows

        await self.messages.open()
        await self.workflows.open()
        await self.add_cog(Imagine(self))
        await self.add_cog(Admin(self))
        await self.add_cog(Workflows(self))
        self.add_dynamic_items(*DYNAMIC_ITEMS)
        self.front.tracker.add_listener(self.progress.on_event)
        resumed = await self.progress.resume()
        if resumed:
            log.info("discord.resumed", messages=resumed)
        await self.sync_commands()

    async def sync_commands(self) -> None:
        if self.settings.dev_guilds:
            for guild_id in self.settings.dev_guilds:
                guild = discord.Object(guild_id)
                self.tree.copy_global_to(guild=guild)
                await self.tree.sync(guild=guild)
        else:
            await self.tree.sync()

    async def close(self) -> None:
        self.front.tracker.remove_listener(self.progress.on_event)
        await self.progress.close()
        await super().close()
        await self.messages.close()
        await self.workflows.close()
