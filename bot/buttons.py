"""The buttons on a job's message. Each carries its job id in its custom_id
(``brigade:reroll:<job_id>``) and is a ``DynamicItem``, so any process of the bot, a
restarted one included, answers it without remembering a view."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Protocol

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


class Reroll(
    discord.ui.DynamicItem[discord.ui.Button[discord.ui.View]],
    template=rf"brigade:reroll:{JOB_ID}",
):
    """The same settings with a new seed."""

    def __init__(self, job_id: str) -> None:
        super().__init__(_button("Reroll", "reroll", job_id, discord.ButtonStyle.primary, "🎲"))
        self.job_id = job_id

    @classmethod
    async def from_custom_id(
        cls,
        interaction: discord.Interaction[Any],
        item: discord.ui.Item[Any],
        match: re.Match[str],
        /,
    ) -> Reroll:
        return cls(match["job_id"])

    async def callback(self, interaction: discord.Interaction[Any]) -> None:
        from bot import flow

        await flow.rerun(_bot(interaction), interaction, self.job_id, variations=False)


class Variations(
    discord.ui.DynamicItem[discord.ui.Button[discord.ui.View]],
    template=rf"brigade:vary:{JOB_ID}",
):
    """The same prompt, several new seeds."""

    def __init__(self, job_id: str) -> None:
        super().__init__(_button("Variations", "vary", job_id, discord.ButtonStyle.secondary, "🔀"))
        self.job_id = job_id

    @classmethod
    async def from_custom_id(
        cls,
        interaction: discord.Interaction[Any],
        item: discord.ui.Item[Any],
        match: re.Match[str],
        /,
    ) -> Variations:
        return cls(match["job_id"])

    async def callback(self, interaction: discord.Interaction[Any]) -> None:
        from bot import flow

        await flow.rerun(_bot(interaction), interaction, self.job_id, variations=True)


class Cancel(
    discord.ui.DynamicItem[discord.ui.Button[discord.ui.View]],
    template=rf"brigade:cancel:{JOB_ID}",
):
    """Stop a job that waits or renders (its author or an admin)."""

    def __init__(self, job_id: str) -> None:
        super().__init__(_button("Cancel", "cancel", job_id, discord.ButtonStyle.danger, "✖️"))
        self.job_id = job_id

    @classmethod
    async def from_custom_id(
        cls,
        interaction: discord.Interaction[Any],
        item: discord.ui.Item[Any],
        match: re.Match[str],
        /,
    ) -> Cancel:
        return cls(match["job_id"])

    async def callback(self, interaction: discord.Interaction[Any]) -> None:
        from bot import flow

        await flow.cancel_button(_bot(interaction), interaction, self.job_id)


class Delete(
    discord.ui.DynamicItem[discord.ui.Button[discord.ui.View]],
    template=rf"brigade:delete:{JOB_ID}",
):
    """Remove the message (its author or an admin)."""

    def __init__(self, job_id: str) -> None:
        super().__init__(_button("Delete", "delete", job_id, discord.ButtonStyle.secondary, "🗑️"))
        self.job_id = job_id

    @classmethod
    async def from_custom_id(
        cls,
        interaction: discord.Interaction[Any],
        item: discord.ui.Item[Any],
        match: re.Match[str],
        /,
    ) -> Delete:
        return cls(match["job_id"])

    async def callback(self, interaction: discord.Interaction[Any]) -> None:
        from bot import flow

        await flow.delete_button(_bot(interaction), interaction, self.job_id)


class Upscale(
    discord.ui.DynamicItem[discord.ui.Button[discord.ui.View]],
    template=rf"brigade:upscale:{JOB_ID}",
):
    """The finished picture, enlarged by ``DISCORD_UPSCALE_WORKFLOW``."""

    def __init__(self, job_id: str) -> None:
        super().__init__(_button("Upscale", "upscale", job_id, discord.ButtonStyle.secondary, "🔍"))
        self.job_id = job_id

    @classmethod
    async def from_custom_id(
        cls,
        interaction: discord.Interaction[Any],
        item: discord.ui.Item[Any],
        match: re.Match[str],
        /,
    ) -> Upscale:
        return cls(match["job_id"])

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
