"""Input images in the bot: ``/imagine``'s attachment options, and the Upscale button.

Attachments fill the chosen workflow's ``image`` parameters in manifest order (the
``image`` option the first, ``image2`` the second). Each is refused, before anything is
queued or charged, when the workflow does not take it, when it is larger than
``INPUT_IMAGE_MAX_BYTES`` by the size Discord declares (nothing is downloaded then), or
when :func:`storage.inputs.check_image` refuses its bytes (downloaded through
discord.py, which fetches Discord's own CDN URL, never a URL a user typed). Accepted
images are stored content-addressed; the job carries their keys.

The Upscale button stores a finished job's first picture again as an input and submits
``DISCORD_UPSCALE_WORKFLOW`` with it: one job per button press (the interaction id is
the idempotency key, as for every command).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import discord
import structlog

from bot.errors import Refused
from jobs.models import JobRequest, Succeeded
from storage import InvalidImage, ObjectStore, StorageError, validate_image
from storage.inputs import ALLOWED, size_problem
from workflows import Template, UnknownWorkflow

if TYPE_CHECKING:
    from bot.client import BrigadeBot

log = structlog.get_logger(__name__)

#: ``/imagine``'s attachment options, in the order they fill a workflow's image parameters.
ATTACHMENT_OPTIONS = ("image", "image2")

#: ``DISCORD_UPSCALE_WORKFLOW`` value that turns the Upscale button off.
OFF = "off"


def image_params(template: Template) -> list[str]:
    """The workflow's ``image`` parameters, in manifest order."""
    return [name for name, param in template.manifest.params.items() if param.type == "image"]


def upscale_template(bot: BrigadeBot) -> Template | None:
    """The Upscale button's workflow, when one is configured and fit for it: exactly one
    ``image`` parameter (required) and a ``prompt`` parameter (a job always has a prompt)."""
    name = bot.settings.upscale_workflow
    if name == OFF:
        return None
    try:
        template = bot.front.catalog.get(name)
    except UnknownWorkflow:
        return None
    params = template.manifest.params
    images = image_params(template)
    if len(images) != 1 or not params[images[0]].required or "prompt" not in params:
        return None
    return template


def _store(bot: BrigadeBot) -> ObjectStore:
    if bot.store is None:
        raise Refused("This bot has no image store, so it cannot take images.")
    return bot.store


async def attachment_params(
    bot: BrigadeBot, template: Template, attachments: Sequence[discord.Attachment | None]
) -> dict[str, str]:
    """Store each attachment for the image parameter it fills; return ``{param: key}``.

    Raises :class:`Refused` with the reason (nothing stored for the request then, beyond
    images already accepted, which are content-addressed and harmless).
    """
    wanted = image_params(template)
    given = [
        (option, attachment)
        for option, attachment in zip(ATTACHMENT_OPTIONS, attachments, strict=True)
        if attachment is not None
    ]
    for option, _ in given:
        if ATTACHMENT_OPTIONS.index(option) >= len(wanted):
            raise Refused(_no_slot(bot, template, option, len(wanted)))
    required = [name for name in wanted if template.manifest.params[name].required]
    if any(wanted.index(name) >= len(ATTACHMENT_OPTIONS) for name in required):
        raise Refused(f'The workflow "{template.name}" needs more images than /imagine takes.')
    missing = [
        ATTACHMENT_OPTIONS[slot]
        for slot, name in enumerate(wanted)
        if name in required and attachments[slot] is None
    ]
    if missing:
        options = " and ".join(f"`{option}`" for option in missing)
        raise Refused(
            f'The workflow "{template.name}" needs an image: attach a {ALLOWED} file'
            f" with the {options} option."
        )
    keys: dict[str, str] = {}
    for option, attachment in given:
        assert attachment is not None
        keys[wanted[ATTACHMENT_OPTIONS.index(option)]] = await _store_attachment(
            bot, option, attachment
        )
    return keys


def _no_slot(bot: BrigadeBot, template: Template, option: str, takes: int) -> str:
    if takes == 0:
        takers = [
            name for name in bot.front.catalog.names() if image_params(bot.front.catalog.get(name))
        ]
        hint = f" Workflows that do: {', '.join(takers)}." if takers else ""
        return f'The workflow "{template.name}" takes no image.{hint}'
    return (
        f'The workflow "{template.name}" takes {takes} image{"s" if takes > 1 else ""};'
        f" remove the `{option}` attachment."
    )


async def _store_attachment(bot: BrigadeBot, option: str, attachment: discord.Attachment) -> str:
    limits = bot.input_limits
    store = _store(bot)
    too_large = size_problem(attachment.size, limits.max_bytes)
    if too_large is not None:
        raise Refused(f"`{option}` ({_name(attachment)}): {too_large}.")
    try:
        data = await attachment.read()
    except discord.HTTPException as exc:
        log.warning("discord.attachment_unreadable", option=option, error=str(exc))
        raise Refused(f"`{option}` could not be downloaded from Discord; try again.") from exc
    try:
        image = await validate_image(data, max_bytes=limits.max_bytes, max_pixels=limits.max_pixels)
    except InvalidImage as exc:
        raise Refused(f"`{option}` ({_name(attachment)}): {exc}.") from exc
    try:
        return await store.put_input(image.data)
    except StorageError as exc:
        log.warning("discord.input_not_stored", option=option, error=str(exc))
        raise Refused("The image could not be stored right now; try again in a minute.") from exc


def _name(attachment: discord.Attachment) -> str:
    return discord.utils.escape_markdown(discord.utils.escape_mentions(attachment.filename))[:80]


async def upscale_request(bot: BrigadeBot, job_id: str) -> JobRequest:
    """The request that upscales ``job_id``'s first picture, its input already stored.

    Raises :class:`Refused` when the button is off, the job did not finish with a
    picture, or the picture cannot be read or is too large to upscale.
    """
    template = upscale_template(bot)
    if template is None:
        raise Refused("Upscaling is not set up here.")
    record = await bot.front.ledger.get(job_id)
    if record is None:
        raise Refused("That job is not known here any more.")
    terminal = record.terminal
    if not isinstance(terminal, Succeeded) or not terminal.outputs:
        raise Refused("Only a finished picture can be upscaled.")
    store = _store(bot)
    try:
        data = await store.get(terminal.outputs[0].key)
    except StorageError as exc:
        log.warning("discord.upscale_source_unreadable", job_id=job_id, error=str(exc))
        raise Refused("That picture cannot be read any more.") from exc
    limits = bot.input_limits
    try:
        image = await validate_image(data, max_bytes=limits.max_bytes, max_pixels=limits.max_pixels)
    except InvalidImage as exc:
        raise Refused(f"That picture cannot be upscaled: {exc}.") from exc
    try:
        key = await store.put_input(image.data)
    except StorageError as exc:
        raise Refused("The image could not be stored right now; try again in a minute.") from exc
    [param] = image_params(template)
    return JobRequest(workflow=template.name, prompt=record.job.prompt, params={param: key})
