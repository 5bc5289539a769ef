"""Choosing models from Discord: the checkpoint and LoRA options, suggested from the
guild's allow-list, and refused outside it (nothing queued, nothing charged)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from tests.emulators.discord import DiscordEmulator
from tests.fixtures.bot import BotWorld, bot_world
from workflows.importer import add

EXPORTED = Path(__file__).parent / "data" / "exported"


def lora_workflow(folder: Path) -> Path:
    """A txt2img workflow with a LoRA chain, made by ``brigade workflows add``."""
    folder.mkdir()
    graph = folder / "txt2img_lora_api.json"
    shutil.copy(EXPORTED / "txt2img_lora_api.json", graph)
    add(graph, name="lora-test")
    return folder


async def _refusal(world: BotWorld, **options: Any) -> str:
    interaction = await world.imagine("a lighthouse", **options)
    answer = await world.answer(interaction)
    assert answer.ephemeral, answer.content
    return answer.content


async def test_models_outside_the_guilds_allow_list_are_refused(
    discord_emulator: DiscordEmulator, tmp_path: Path
) -> None:
    workflows = lora_workflow(tmp_path / "workflows")
    async with (
        bot_world(discord_emulator, tmp_path / "data", workflows_dirs=(workflows,)) as world,
        world.running() as bot,
    ):
        front = bot.front
        template = front.catalog.get("lora-test")
        lora_param = next(n for n, p in template.manifest.params.items() if p.folder == "loras")
        default_lora = template.manifest.params[lora_param].default
        checkpoint = template.manifest.params["checkpoint"].default
        assert isinstance(default_lora, str) and isinstance(checkpoint, str)
        allowed = [checkpoint, default_lora]
        await front.ledger.set_quota(str(world.guild.id), {"models": allowed}, front.quota_defaults)

        lora = await _refusal(world, workflow="lora-test", lora="someone-elses-style.safetensors")
        model = await _refusal(world, workflow="lora-test", checkpoint="other.safetensors")
        no_lora = await _refusal(world, workflow="demo", lora=default_lora)
        suggested = await discord_emulator.send_autocomplete(
            world.guild.id,
            world.channel_id,
            world.user.id,
            "imagine",
            {"prompt": "x", "lora": ""},
            focused="lora",
        )
        await suggested.wait_response()
        jobs = await front.ledger.active(str(world.guild.id))
        usage = await front.ledger.usage(
            str(world.guild.id), str(world.user.id), front.quota_defaults
        )

    assert f"{lora_param}: 'someone-elses-style.safetensors' is not enabled here" in lora
    assert default_lora in lora  # the allowed ones are named
    assert "checkpoint: 'other.safetensors' is not enabled here" in model
    assert "takes no LoRA" in no_lora
    assert [c["value"] for c in suggested.choices] == allowed
    assert jobs == [] and usage.user_images_today == 0
