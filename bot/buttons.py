"""The buttons on a job's message. Each carries its job id in its custom_id
(``brigade:reroll:<job_id>``) and is a ``DynamicItem``, so any process of the bot, a
restarted one included, answers it without remembering a view."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, Self

import discord

from jobs.models import Job

if TYPE_CHECKING:
    from bot.client import BrigadeBot

JOB_ID = r"(?P<job_id>[0-9a-f-]{36})"


class ViewFactory(Protocol):
    def __call__(self, job: Job, *, final: bool, succeeded: bool = False) -> discord.ui.View: ...


def _button(
    label: str, action: str, job_id: str, style: discord.ButtonStyle, emoji: str
) -> discord.ui.Button[discord.ui.View]:
    return discord.ui.Button(
        label=label, style=style, emoji=emoji, custom_id=f"brigade:{action}:{job_id}"
    )


def _bot(interaction: discord.Interaction[Any]) -> BrigadeBot:
    from bot.client import BrigadeBot

    client = interaction.client
    assert isinstance(client, BrigadeBot)
    return client


class _JobButton(
    discord.ui.DynamicItem[discord.ui.Button[discord.ui.View]],
    template=r"(?!)",  # never matches: only the subclasses below are registered
):
    """A button for one job: its custom_id is ``brigade:<action>:<job_id>``."""

    label: ClassVar[str]
    action: ClassVar[str]
    style: ClassVar[discord.ButtonStyle]
    emoji: ClassVar[str]

    def __init_subclass__(
        cls, *, action: str, label: str, style: discord.ButtonStyle, emoji: str
    ) -> None:
        super().__init_subclass__(template=rf"brigade:{action}:{JOB_ID}")
        cls.action, cls.label, cls.style, cls.emoji = action, label, style, emoji

    def __init__(self, job_id: str) -> None:
        super().__init__(_button(self.label, self.action, job_id, self.style, self.emoji))
        self.job_id = job_id

    @classmethod
    async def from_custom_id(
        cls,
        interaction: discord.Interaction[Any],
        item: discord.ui.Item[Any],
        match: re.Match[str],
        /,
    ) -> Self:
        return cls(match["job_id"])


class Reroll(
    _JobButton, action="reroll", label="Reroll", style=discord.ButtonStyle.primary, emoji="🎲"
):
    """The same settings with a new seed."""

    async def callback(self, interaction: discord.Interaction[Any]) -> None:
        from bot import flow

        await flow.rerun(_bot(interaction), interaction, self.job_id, variations=False)


class Variations(
    _JobButton, action="vary", label="Variations", style=discord.ButtonStyle.secondary, emoji="🔀"
):
    """The same prompt, several new seeds."""

    async def callback(self, interaction: discord.Interaction[Any]) -> None:
        from bot import flow

        await flow.rerun(_bot(interaction), interaction, self.job_id, variations=True)


class Cancel(
    _JobButton, action="cancel", label="Cancel", style=discord.ButtonStyle.danger, emoji="✖️"
):
    """Stop a job that waits or renders (its author or an admin)."""

    async def callback(self, interaction: discord.Interaction[Any]) -> None:
        from bot import flow

        await flow.cancel_button(_bot(interaction), interaction, self.job_id)


class Delete(
    _JobButton, action="delete", label="Delete", style=discord.ButtonStyle.secondary, emoji="🗑️"
):
    """Remove the message (its author or an admin)."""

    async def callback(self, interaction: discord.Interaction[Any]) -> None:
        from bot import flow

        await flow.delete_button(_bot(interaction), interaction, self.job_id)


class Upscale(
    _JobButton, action="upscale", label="Upscale", style=discord.ButtonStyle.secondary, emoji="🔍"
):
    """The finished picture, enlarged by ``DISCORD_UPSCALE_WORKFLOW``."""

    async def callback(self, interaction: discord.Interaction[Any]) -> None:
        from bot import flow

        await flow.upscale(_bot(interaction), interaction, self.job_id)


DYNAMIC_ITEMS = (Reroll, Variations, Upscale, Cancel, Delete)


def job_view(job: Job, *, final: bool, upscale: bool = False) -> discord.ui.View:
    """Cancel while the job waits or renders; Reroll, Variations, Upscale (with
    ``upscale``: a finished picture and an upscale workflow) and Delete after."""
    view = discord.ui.View(timeout=None)
    if final:
        view.add_item(Reroll(job.job_id))
        view.add_item(Variations(job.job_id))
        if upscale:
            view.add_item(Upscale(job.job_id))
        view.add_item(Delete(job.job_id))
    else:
        view.add_item(Cancel(job.job_id))
    return view
