"""Domain errors turned into what the user reads: one ephemeral reply each."""

from __future__ import annotations

import contextlib
from typing import Any

import discord
import structlog
from discord import app_commands
from pydantic import ValidationError

from bot.cards import NO_MENTIONS
from jobs.exceptions import InvalidRequest, JobsError, TransientError
from jobs.quotas import QuotaExceeded

log = structlog.get_logger(__name__)


class NotAllowed(app_commands.CheckFailure):
    """The user may not do this here (an admin command, someone else's job)."""


class Refused(Exception):
    """A request the bot refuses itself, with the reason to show."""


#: What a button's callback answers with a reply instead of letting it escape.
EXPLAINED: tuple[type[BaseException], ...] = (
    JobsError,
    Refused,
    app_commands.AppCommandError,
    ValidationError,
)


def explain(error: BaseException) -> str | None:
    """What to tell the user about ``error``, or None when it is a bug."""
    if isinstance(error, app_commands.CommandInvokeError):
        error = error.original
    if isinstance(error, QuotaExceeded):
        return error.message
    if isinstance(error, InvalidRequest):
        lines = "\n".join(f"• {discord.utils.escape_mentions(e.message)}" for e in error.errors)
        return f"That request was refused:\n{lines}"[:1900]
    if isinstance(error, NotAllowed | Refused):
        return str(error)
    if isinstance(error, app_commands.TransformerError):
        return f"{discord.utils.escape_mentions(str(error.value))[:200]} is not valid here."
    if isinstance(error, app_commands.CheckFailure):
        return "You cannot use this command here."
    if isinstance(error, TransientError):
        return "The queue is unavailable right now; try again in a minute."
    if isinstance(error, ValidationError):
        return "That job cannot be asked for again as it was."
    if isinstance(error, JobsError):
        return f"That did not work: {discord.utils.escape_mentions(str(error))[:500]}"
    return None


async def reply_error(interaction: discord.Interaction[Any], error: BaseException) -> None:
    """Tell the user what went wrong, privately. A public "thinking…" message made by a
    defer is removed first, so the refusal leaves no trace in the channel."""
    text = explain(error)
    if text is None:
        log.error("discord.command_failed", error=repr(error), exc_info=error)
        text = "Something went wrong on our side; it has been logged."
    try:
        if not interaction.response.is_done():
            await interaction.response.send_message(
                text, ephemeral=True, allowed_mentions=NO_MENTIONS
            )
            return
        if interaction.extras.get("public"):
            with contextlib.suppress(discord.HTTPException):
                await interaction.delete_original_response()
        await interaction.followup.send(text, ephemeral=True, allowed_mentions=NO_MENTIONS)
    except discord.HTTPException as exc:
        log.warning("discord.reply_failed", error=str(exc))
