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
from workflows import FieldError

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


#: Manifest roles that the commands' options call otherwise (``/imagine count`` sets ``batch``).
_OPTION_OF_ROLE = {"batch": "count"}


def _as_option(error: FieldError) -> str:
    """``error``'s message, naming the option the user typed rather than the role."""
    option = _OPTION_OF_ROLE.get(error.field)
    if option is None or not error.message.startswith(f"{error.field}:"):
        return error.message
    return option + error.message.removeprefix(error.field)


def explain(error: BaseException, option: str | None = None) -> str | None:
    """What to tell the user about ``error``, or None when it is a bug. ``option`` names
    the option whose value a transformer refused, when the transformer does not say."""
    if isinstance(error, app_commands.CommandInvokeError):
        error = error.original
    if isinstance(error, QuotaExceeded):
        return error.message
    if isinstance(error, InvalidRequest):
        lines = "\n".join(f"• {discord.utils.escape_mentions(_as_option(e))}" for e in error.errors)
        return f"That request was refused:\n{lines}"[:1900]
    if isinstance(error, NotAllowed | Refused):
        return str(error)
    if isinstance(error, app_commands.TransformerError):
        option = getattr(error.transformer, "option", None) or option
        where = f"{option}: " if option else ""
        return f"{where}{discord.utils.escape_mentions(str(error.value))[:200]} is not valid here."
    if isinstance(error, app_commands.CheckFailure):
        return "You cannot use this command here."
    if isinstance(error, TransientError):
        return "The queue is unavailable right now; try again in a minute."
    if isinstance(error, ValidationError):
        # A value of the wrong type (the gateway delivered it, or a stored job has it).
        fields = ", ".join(sorted({str(e["loc"][0]) for e in error.errors() if e["loc"]}))
        shown = discord.utils.escape_mentions(fields)[:500]
        return f"That request was refused: {shown} cannot be used as given."
    if isinstance(error, JobsError):
        return f"That did not work: {discord.utils.escape_mentions(str(error))[:500]}"
    return None


def _option_given(interaction: discord.Interaction[Any], error: BaseException) -> str | None:
    """The option that was given the value a transformer refused (discord.py's choice
    transformers do not say which)."""
    if not isinstance(error, app_commands.TransformerError):
        return None
    return next((name for name, value in interaction.namespace if value == error.value), None)


async def reply_error(interaction: discord.Interaction[Any], error: BaseException) -> None:
    """Tell the user what went wrong, privately. A public "thinking…" message made by a
    defer is removed first, so the refusal leaves no trace in the channel."""
    text = explain(error, _option_given(interaction, error))
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
