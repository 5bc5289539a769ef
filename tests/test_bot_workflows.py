"""A guild's own workflows: ``/workflow add|remove|list`` through the Discord emulator,
checked before they are enabled, and rendered by ``/imagine`` with the job carrying its
template to the renderer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.emulators.discord import DiscordEmulator, Interaction, User
from tests.fixtures.bot import BotWorld, bot_world
from workflows.catalog import BUILTIN_DIR

EXPORTED = Path(__file__).parent / "data" / "exported"


def demo_files(**manifest_changes: Any) -> dict[str, tuple[str, bytes]]:
    graph = (BUILTIN_DIR / "demo.json").read_bytes()
    manifest = json.loads((BUILTIN_DIR / "demo.manifest.json").read_text())
    manifest.update({"name": "house-style", "title": "Our house style", **manifest_changes})
    return {
        "graph": ("house_api.json", graph),
        "manifest": ("house.manifest.json", json.dumps(manifest).encode()),
    }


async def workflow_command(
    world: BotWorld,
    subcommand: str,
    options: dict[str, Any] | None = None,
    *,
    attachments: dict[str, tuple[str, bytes]] | None = None,
    user: User | None = None,
) -> Interaction:
    interaction = await world.emulator.send_slash_command(
        world.guild.id,
        world.channel_id,
        (user or world.admin).id,
        "workflow",
        options or {},
        subcommand=subcommand,
        attachments=attachments,
    )
    await interaction.wait_response()
    return interaction


async def test_an_admin_adds_a_workflow_and_members_render_with_it(
    discord_emulator: DiscordEmulator, tmp_path: Path
) -> None:
    async with bot_world(discord_emulator, tmp_path) as world, world.running() as bot:
        added = await world.answer(await workflow_command(world, "add", attachments=demo_files()))
        listed = await world.answer(await workflow_command(world, "list"))
        interaction = await world.imagine("a lighthouse", workflow="house-style")
        message = interaction.original
        assert message is not None
        await world.final(message)
        (record,) = await bot.front.ledger.recent(str(world.guild.id), frontend="discord", limit=5)
        removed = await world.answer(
            await workflow_command(world, "remove", {"name": "house-style"})
        )
        gone = await world.answer(await world.imagine("a lighthouse", workflow="house-style"))

    assert added.ephemeral and "Enabled `house-style` (Our house style)" in added.content
    assert "`house-style`: Our house style" in listed.content
    assert "✅ Done" in message.content
    assert record.job.workflow == "house-style" and record.job.template is not None
    assert record.job.template["manifest"]["name"] == "house-style"
    assert "Removed `house-style`" in removed.content
    assert gone.ephemeral and "house-style" in gone.content


async def test_a_graph_alone_gets_the_proposed_manifest(
    discord_emulator: DiscordEmulator, tmp_path: Path
) -> None:
    graph = (EXPORTED / "txt2img_lora_api.json").read_bytes()
    async with bot_world(discord_emulator, tmp_path) as world, world.running() as bot:
        added = await world.answer(
            await workflow_command(
                world, "add", {"name": "loras"}, attachments={"graph": ("x_api.json", graph)}
            )
        )
        own = await bot.workflows.templates(world.guild.id)

    assert "Enabled `loras`" in added.content and "a proposed manifest" in added.content
    assert "`prompt`" in added.content and "`lora_1`" in added.content
    assert own["loras"].manifest.params["lora_1"].folder == "loras"


async def test_broken_or_clashing_workflows_and_members_are_refused(
    discord_emulator: DiscordEmulator, tmp_path: Path
) -> None:
    async with bot_world(discord_emulator, tmp_path) as world, world.running() as bot:
        broken_bind = demo_files(
            params={
                "prompt": {
                    "type": "string",
                    "required": True,
                    "max_length": 10,
                    "bind": [{"node": "99", "input": "text"}],
                }
            }
        )
        unbound = await world.answer(await workflow_command(world, "add", attachments=broken_bind))
        not_json = await world.answer(
            await workflow_command(
                world, "add", attachments={"graph": ("g_api.json", b"{not json")}
            )
        )
        builtin = await world.answer(
            await workflow_command(world, "add", attachments=demo_files(name="demo"))
        )
        member = await workflow_command(world, "add", attachments=demo_files(), user=world.user)
        own = await bot.workflows.templates(world.guild.id)

    assert (
        unbound.ephemeral and "cannot be enabled" in unbound.content and '"99"' in unbound.content
    )
    assert "not valid JSON" in not_json.content
    assert "`demo` is a built-in workflow" in builtin.content
    assert "Only server admins" in member.response_data["content"]
    assert own == {}
