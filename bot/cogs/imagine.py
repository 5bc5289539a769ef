"""``/imagine``: a prompt in, a job admitted, its message kept up to date."""

from __future__ import annotations

import math
from typing import Any

import discord
from discord import app_commands
from discord.ext import commands

from bot import flow
from bot.client import BrigadeBot
from bot.constants import (
    COUNT_MAX,
    MAX_CHOICES,
    MODEL_NAME_MAX_LENGTH,
    NEGATIVE_MAX_LENGTH,
    PROMPT_MAX_LENGTH,
    SEED_MAX,
)
from bot.errors import Refused, reply_error
from bot.images import attachment_params
from jobs.models import JobRequest
from workflows import Parameter, Template, UnknownWorkflow

#: Aspect choices: name shown, (width ratio, height ratio).
ASPECTS: dict[str, tuple[str, int, int]] = {
    "square": ("Square 1:1", 1, 1),
    "portrait": ("Portrait 2:3", 2, 3),
    "landscape": ("Landscape 3:2", 3, 2),
    "wide": ("Wide 16:9", 16, 9),
    "tall": ("Tall 9:16", 9, 16),
}


def _fit(value: float, param: Parameter) -> int:
    """``value`` rounded to the parameter's ``multiple_of`` and kept within its bounds."""
    step = param.multiple_of or 8
    low = math.ceil((param.min or step) / step) * step
    high = math.floor((param.max or 4096) / step) * step
    return int(min(max(round(value / step) * step, low), high))


def size_for(template: Template, aspect: str) -> tuple[int, int] | None:
    """Width and height for ``aspect`` with about the workflow's default pixel count,
    each a multiple of its ``multiple_of`` and within its bounds; None when the workflow
    has no size."""
    params = template.manifest.params
    width, height = params.get("width"), params.get("height")
    if width is None or height is None or aspect not in ASPECTS:
        return None
    base_w = width.default if isinstance(width.default, int) else width.max
    base_h = height.default if isinstance(height.default, int) else height.max
    if not isinstance(base_w, int | float) or not isinstance(base_h, int | float):
        return None
    _, ratio_w, ratio_h = ASPECTS[aspect]
    area = float(base_w) * float(base_h)
    target_w = math.sqrt(area * ratio_w / ratio_h)
    return _fit(target_w, width), _fit(target_w * ratio_h / ratio_w, height)


async def allowed_workflows(bot: BrigadeBot, guild_id: int | None) -> list[str]:
    """The catalog's workflows this guild may use, in catalog order."""
    names = bot.front.catalog.names()
    if guild_id is None:
        return names
    quota = await bot.front.ledger.quota(str(guild_id), bot.front.quota_defaults)
    if quota.workflows is None:
        return names
    return [name for name in names if name in quota.workflows]


class WorkflowTransformer(app_commands.Transformer):
    """A workflow by name: suggested from what the guild allows, turned into its template."""

    #: The option it reads, named when its value is refused (``bot.errors.explain``).
    option = "workflow"

    async def autocomplete(  # type: ignore[override]
        self, interaction: discord.Interaction[Any], value: str
    ) -> list[app_commands.Choice[str]]:
        bot = interaction.client
        assert isinstance(bot, BrigadeBot)
        typed = value.lower()
        own = await bot.workflows.templates(interaction.guild_id)
        titles = {name: template.manifest.title for name, template in own.items()}
        for name in await allowed_workflows(bot, interaction.guild_id):
            titles.setdefault(name, bot.front.catalog.get(name).manifest.title)
        choices = []
        for name, title in titles.items():
            if typed in name or typed in title.lower():
                label = f"{name} — {title}"[:100]
                choices.append(app_commands.Choice(name=label, value=name))
        return choices[:MAX_CHOICES]

    async def transform(self, interaction: discord.Interaction[Any], value: Any) -> Template:
        bot = interaction.client
        assert isinstance(bot, BrigadeBot)
        own = await bot.workflows.templates(interaction.guild_id)
        try:
            return own.get(str(value)) or bot.front.catalog.get(str(value))
        except UnknownWorkflow as exc:
            raise app_commands.TransformerError(
                value, discord.AppCommandOptionType.string, self
            ) from exc


async def allowed_lanes(bot: BrigadeBot, guild_id: int | None) -> list[str]:
    """The lanes this guild may use, in the deployment's order."""
    lanes = list(bot.front.admission.lanes)
    if guild_id is None:
        return lanes
    quota = await bot.front.ledger.quota(str(guild_id), bot.front.quota_defaults)
    return lanes if quota.lanes is None else [lane for lane in lanes if lane in quota.lanes]


def model_params(template: Template, *, lora: str | None) -> dict[str, Any]:
    """The workflow parameter the ``lora`` option sets: its first LoRA file parameter.
    :class:`Refused` when the option is given and the workflow takes no LoRA."""
    if lora is None:
        return {}
    for name, param in template.manifest.params.items():
        if param.folder == "loras":
            return {name: lora}
    raise Refused(f"lora: the workflow {template.name!r} takes no LoRA.")


async def model_choices(
    bot: BrigadeBot, guild_id: int | None, folder: str, current: str
) -> list[app_commands.Choice[str]]:
    """Model files to suggest: the guild's allow-list when it has one, else what the
    renderers can load (their heartbeats' ``available_models``) and the files the
    workflows name by default."""
    quota = None
    if guild_id is not None:
        quota = await bot.front.ledger.quota(str(guild_id), bot.front.quota_defaults)
    if quota is not None and quota.models is not None:
        files = list(quota.models)
    else:
        known: dict[str, None] = {}
        for name in bot.front.catalog.names():
            for param in bot.front.catalog.get(name).manifest.params.values():
                if param.folder == folder and isinstance(param.default, str):
                    known[param.default] = None
        for beat in bot.front.workers.workers():
            for file in (*beat.models, *beat.available_models.get(folder, ())):
                known[file] = None
        files = list(known)
    typed = current.lower()
    return [
        app_commands.Choice(name=file[:100], value=file)
        for file in files
        if typed in file.lower() and len(file) <= MODEL_NAME_MAX_LENGTH
    ][:MAX_CHOICES]


class Imagine(commands.Cog):
    def __init__(self, bot: BrigadeBot) -> None:
        self.bot = bot

    async def cog_load(self) -> None:
        # Slash commands are registered once for every guild, so an option cannot come
        # and go per guild; with one lane in the whole deployment there is nothing to
        # choose, and the option is left out (it suggests only a guild's own lanes).
        if len(self.bot.front.admission.lanes) < 2:
            self.imagine._params.pop("lane", None)

    async def default_workflow(self, guild_id: int | None) -> str:
        allowed = await allowed_workflows(self.bot, guild_id)
        wanted = self.bot.settings.default_workflow
        if wanted is not None and wanted in allowed:
            return wanted
        if "demo" in allowed:
            return "demo"
        return allowed[0] if allowed else wanted or "demo"

    @app_commands.command(name="imagine", description="Draw a picture from a prompt")
    @app_commands.guild_only()
    @app_commands.describe(
        prompt="What to draw",
        negative="What to keep out of the picture",
        workflow="Which workflow renders it",
        aspect="The picture's shape",
        seed="The same seed and settings give the same picture",
        count="How many pictures (1 to 4)",
        lane="Which queue (where there are several)",
        image="A picture to start from, for workflows that take one (PNG, JPEG or WebP)",
        image2="A second picture, for workflows that take two",
        checkpoint="The model, for workflows that let you choose it",
        lora="A LoRA (style), for workflows that take one",
    )
    @app_commands.choices(
        aspect=[
            app_commands.Choice(name=label, value=key) for key, (label, _, _) in ASPECTS.items()
        ]
    )
    async def imagine(
        self,
        interaction: discord.Interaction[BrigadeBot],
        prompt: app_commands.Range[str, 1, PROMPT_MAX_LENGTH],
        negative: app_commands.Range[str, 1, NEGATIVE_MAX_LENGTH] | None = None,
        workflow: app_commands.Transform[Template, WorkflowTransformer] | None = None,
        aspect: app_commands.Choice[str] | None = None,
        seed: app_commands.Range[int, 0, SEED_MAX] | None = None,
        count: app_commands.Range[int, 1, COUNT_MAX] = 1,
        lane: str | None = None,
        image: discord.Attachment | None = None,
        image2: discord.Attachment | None = None,
        checkpoint: app_commands.Range[str, 1, MODEL_NAME_MAX_LENGTH] | None = None,
        lora: app_commands.Range[str, 1, MODEL_NAME_MAX_LENGTH] | None = None,
    ) -> None:
        await flow.defer_public(interaction)
        template = workflow or self.bot.front.catalog.get(
            await self.default_workflow(interaction.guild_id)
        )
        # Refused here (the workflow takes no image, a required one is missing, a file is
        # too large or not an image): an ephemeral reply, nothing queued or charged.
        images = await attachment_params(self.bot, template, [image, image2])
        params: dict[str, Any] = {**images, **model_params(template, lora=lora)}
        size = size_for(template, aspect.value) if aspect is not None else None
        fields: dict[str, Any] = {
            "workflow": template.name,
            "prompt": prompt,
            "negative": negative,
            "seed": seed,
            # count has a default (1); a workflow without a batch takes none at all.
            "count": count if count != 1 or "batch" in template.manifest.params else None,
            "lane": lane,
            "checkpoint": checkpoint,
            "params": params,
        }
        if size is not None:
            fields["width"], fields["height"] = size
        await flow.start(self.bot, interaction, JobRequest.model_validate(fields))

    @imagine.autocomplete("lane")
    async def lane_choices(
        self, interaction: discord.Interaction[BrigadeBot], current: str
    ) -> list[app_commands.Choice[str]]:
        lanes = await allowed_lanes(self.bot, interaction.guild_id)
        return [app_commands.Choice(name=lane, value=lane) for lane in lanes if current in lane][
            :MAX_CHOICES
        ]

    @imagine.autocomplete("checkpoint")
    async def checkpoint_choices(
        self, interaction: discord.Interaction[BrigadeBot], current: str
    ) -> list[app_commands.Choice[str]]:
        return await model_choices(self.bot, interaction.guild_id, "checkpoints", current)

    @imagine.autocomplete("lora")
    async def lora_choices(
        self, interaction: discord.Interaction[BrigadeBot], current: str
    ) -> list[app_commands.Choice[str]]:
        return await model_choices(self.bot, interaction.guild_id, "loras", current)

    async def cog_app_command_error(
        self, interaction: discord.Interaction[discord.Client], error: app_commands.AppCommandError
    ) -> None:
        await reply_error(interaction, error)
