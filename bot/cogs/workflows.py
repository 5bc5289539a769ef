"""``/workflow add|remove|list``: a guild's admins bring their own ComfyUI workflows.

``/workflow add`` takes the graph exported with ComfyUI's Save (API) as an attachment,
and its manifest as a second one or, without it, the manifest ``brigade workflows add``
would propose. Both are checked as a built-in template is (``Template.from_documents``)
before the workflow is enabled for the guild; a name the catalog already has is refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import discord
from discord import app_commands
from discord.ext import commands

from bot.client import BrigadeBot
from bot.cogs.admin import admin_only
from bot.constants import MAX_CHOICES
from bot.errors import Refused, reply_error
from bot.workflows import MAX_PER_GUILD
from workflows import Template, WorkflowError
from workflows.importer import propose, workflow_name

#: Largest graph or manifest file taken, bytes (a 40-node graph is about 20 KB).
MAX_WORKFLOW_BYTES = 1024 * 1024


async def read_json(attachment: discord.Attachment, what: str) -> Any:
    """An attachment's JSON, its size checked before it is downloaded."""
    if attachment.size > MAX_WORKFLOW_BYTES:
        raise Refused(
            f"{what}: {attachment.filename} is {attachment.size} bytes "
            f"(allowed: at most {MAX_WORKFLOW_BYTES})."
        )
    data = await attachment.read()
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise Refused(f"{what}: {attachment.filename} is not UTF-8 text.") from None
    except json.JSONDecodeError as exc:
        raise Refused(
            f"{what}: {attachment.filename} is not valid JSON "
            f"({exc.msg} at line {exc.lineno} column {exc.colno})."
        ) from None


class Workflows(commands.Cog):
    workflow = app_commands.Group(
        name="workflow",
        description="This server's own workflows",
        guild_only=True,
        default_permissions=discord.Permissions(manage_guild=True),
    )

    def __init__(self, bot: BrigadeBot) -> None:
        self.bot = bot

    @workflow.command(name="add", description="Enable a ComfyUI workflow for this server")
    @app_commands.describe(
        graph="The graph, exported with ComfyUI's Save (API) (JSON)",
        manifest="Its manifest (JSON); without it, one is proposed from the graph",
        name="The name to call it by (default: from the manifest or the file name)",
    )
    @admin_only()
    async def add(
        self,
        interaction: discord.Interaction[BrigadeBot],
        graph: discord.Attachment,
        manifest: discord.Attachment | None = None,
        name: app_commands.Range[str, 1, 64] | None = None,
    ) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        assert interaction.guild_id is not None
        graph_data = await read_json(graph, "graph")
        chosen = name.strip().lower() if name is not None else None
        try:
            if manifest is not None:
                manifest_data = await read_json(manifest, "manifest")
                if chosen is not None and isinstance(manifest_data, dict):
                    manifest_data = {**manifest_data, "name": chosen}
                summary = "its manifest"
            else:
                proposal = propose(
                    graph_data,
                    name=chosen or workflow_name(graph.filename),
                    graph_file=graph.filename,
                )
                manifest_data = proposal.manifest
                summary = "a proposed manifest"
            where = Path(f"guild-{interaction.guild_id}") / graph.filename
            template = Template.from_documents(manifest_data, graph_data, where)
        except WorkflowError as exc:
            raise Refused(f"That workflow cannot be enabled: {exc}") from None
        if template.name in self.bot.front.catalog.names():
            raise Refused(
                f"`{template.name}` is a built-in workflow here; give yours another `name`."
            )
        if not await self.bot.workflows.add(interaction.guild_id, template, interaction.user.id):
            raise Refused(f"This server keeps {MAX_PER_GUILD} workflows already; remove one first.")
        params = ", ".join(f"`{p}`" for p in template.manifest.params) or "none"
        await interaction.followup.send(
            f"Enabled `{template.name}` ({template.manifest.title}) with {summary}. "
            f"Parameters: {params}. Use it with `/imagine workflow:{template.name}`.",
            ephemeral=True,
        )

    @workflow.command(name="remove", description="Disable one of this server's workflows")
    @app_commands.describe(name="The workflow's name")
    @admin_only()
    async def remove(
        self, interaction: discord.Interaction[BrigadeBot], name: app_commands.Range[str, 1, 64]
    ) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        removed = await self.bot.workflows.remove(interaction.guild_id or 0, name.strip())
        text = f"Removed `{name}`." if removed else f"This server has no workflow `{name}`."
        await interaction.followup.send(text, ephemeral=True)

    @remove.autocomplete("name")
    async def remove_choices(
        self, interaction: discord.Interaction[BrigadeBot], current: str
    ) -> list[app_commands.Choice[str]]:
        own = await self.bot.workflows.templates(interaction.guild_id)
        return [app_commands.Choice(name=n, value=n) for n in own if current in n][:MAX_CHOICES]

    @workflow.command(name="list", description="This server's own workflows")
    @admin_only()
    async def list_workflows(self, interaction: discord.Interaction[BrigadeBot]) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        own = await self.bot.workflows.templates(interaction.guild_id)
        if not own:
            text = "This server has no workflow of its own; `/workflow add` enables one."
        else:
            lines = [f"**{len(own)} workflow(s)**"]
            for template in own.values():
                params = ", ".join(template.manifest.params)
                title = discord.utils.escape_markdown(template.manifest.title)
                lines.append(f"`{template.name}`: {title} ({params})")
            text = "\n".join(lines)
        await interaction.followup.send(text, ephemeral=True)

    async def cog_app_command_error(
        self, interaction: discord.Interaction[discord.Client], error: app_commands.AppCommandError
    ) -> None:
        await reply_error(interaction, error)
