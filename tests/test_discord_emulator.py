"""The Discord emulator with the real discord.py: a tiny bot, its slash commands, and the
faults Brigade's bot has to live with.

The bot below is what Brigade's will be in small: a ``commands.Bot`` that syncs its
commands to a test guild, defers, edits its original response, posts a channel message
with an image and a ``DynamicItem`` button, and edits that message with the bot token.
Each test starts it against a fresh emulator (``running``), drives it through the
emulator's gateway and reads what discord.py sent back in ``emulator.calls``.
"""

from __future__ import annotations

import asyncio
import io
import re
import time
from typing import Any

import aiohttp
import discord
import pytest
from discord import app_commands
from discord.ext import commands
from PIL import Image

from tests.emulators.discord import (
    CallbackType,
    DiscordEmulator,
    ErrorCode,
    Guild,
    MessageFlag,
    User,
)
from tests.fixtures.discord import DiscordFactory, running

MESSAGE_ROUTE = "PATCH /channels/{channel_id}/messages/{message_id}"
MODELS = ("sd15", "sdxl", "flux-schnell")


def _png(width: int = 64, height: int = 48) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 40, 40)).save(buffer, "PNG")
    return buffer.getvalue()


PNG = _png()


class Reroll(
    discord.ui.DynamicItem[discord.ui.Button[discord.ui.View]],
    template=r"brigade:reroll:(?P<job_id>[0-9a-f]+)",
):
    """A button that works forever: its state is in its custom_id."""

    def __init__(self, job_id: str) -> None:
        button: discord.ui.Button[discord.ui.View] = discord.ui.Button(
            label="Reroll",
            style=discord.ButtonStyle.secondary,
            custom_id=f"brigade:reroll:{job_id}",
        )
        super().__init__(button)
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
        await interaction.response.send_message(f"Rerolling {self.job_id}", ephemeral=True)


class TinyBot(commands.Bot):
    def __init__(self, guild_id: int, *, sync: bool = True) -> None:
        super().__init__(
            command_prefix=commands.when_mentioned,
            intents=discord.Intents.default(),
            guild_ready_timeout=0.05,
        )
        self.guild_id = guild_id
        self.sync = sync
        self.release = asyncio.Event()
        self.done = asyncio.Event()
        self.outcomes: list[str] = []
        self.posted: list[discord.Message] = []

    async def setup_hook(self) -> None:
        self.add_dynamic_items(Reroll)
        guild = discord.Object(self.guild_id)
        commands_: tuple[app_commands.Command[Any, Any, None], ...] = (draw, inspect, slow)
        for command in commands_:
            self.tree.add_command(command, guild=guild)
        if self.sync:
            await self.tree.sync(guild=guild)


@app_commands.command(description="Draw a picture")
@app_commands.describe(prompt="What to draw", steps="Sampler steps", model="Checkpoint")
async def draw(
    interaction: discord.Interaction[TinyBot],
    prompt: str,
    steps: app_commands.Range[int, 1, 50] = 20,
    model: str = "sdxl",
    wait: bool = False,
) -> None:
    bot = interaction.client
    await interaction.response.defer(thinking=True)
    await interaction.edit_original_response(content=f"Queued: {prompt}")
    view = discord.ui.View(timeout=None)
    view.add_item(Reroll("abc123"))
    channel = interaction.channel
    assert isinstance(channel, discord.TextChannel)
    message = await channel.send(
        f"Rendering {prompt} with {model} ({steps} steps)",
        file=discord.File(io.BytesIO(PNG), "result.png"),
        view=view,
    )
    bot.posted.append(message)
    if wait:
        await bot.release.wait()
        try:
            await interaction.edit_original_response(content="Done (token)")
            bot.outcomes.append("token edit ok")
        except discord.HTTPException as error:
            bot.outcomes.append(f"token edit {error.status} {error.code}")
    await message.edit(content=f"Done: {prompt}")
    bot.outcomes.append("channel edit ok")
    bot.done.set()


@draw.autocomplete("model")
async def model_choices(
    interaction: discord.Interaction[TinyBot], current: str
) -> list[app_commands.Choice[str]]:
    return [app_commands.Choice(name=m, value=m) for m in MODELS if m.startswith(current)]


@app_commands.command(description="Describe an image")
async def inspect(interaction: discord.Interaction[TinyBot], image: discord.Attachment) -> None:
    data = await image.read()
    text = f"{image.filename}: {len(data)} bytes, {image.width}x{image.height}"
    await interaction.response.send_message(text, ephemeral=True)


@app_commands.command(description="Answers too late")
async def slow(interaction: discord.Interaction[TinyBot]) -> None:
    bot = interaction.client
    await asyncio.sleep(0.3)
    try:
        await interaction.response.defer()
        bot.outcomes.append("deferred")
    except discord.NotFound as error:
        bot.outcomes.append(f"defer {error.status} {error.code}")
    bot.done.set()


def _world(emulator: DiscordEmulator) -> tuple[Guild, User]:
    guild = emulator.add_guild(name="Brigade Test")
    user = emulator.add_user(username="painter", guild=guild)
    return guild, user


def _text_channel(bot: TinyBot, guild: Guild) -> discord.TextChannel:
    channel = bot.get_channel(guild.text_channel.id)
    assert isinstance(channel, discord.TextChannel)
    return channel


async def test_slash_command_defers_edits_and_posts(discord_emulator: DiscordEmulator) -> None:
    emulator = discord_emulator
    guild, user = _world(emulator)
    channel = guild.text_channel

    async with running(TinyBot(guild.id), emulator.token) as bot:
        registered = {c["name"] for c in emulator.commands[guild.id].values()}
        assert registered == {"draw", "inspect", "slow"}
        interaction = await emulator.send_slash_command(
            guild.id, channel.id, user.id, "draw", {"prompt": "a red fox", "steps": 12}
        )
        await interaction.wait_response()
        await asyncio.wait_for(bot.done.wait(), 5)

    # The defer: type 5 within 3 s, asking for the callback resource.
    assert interaction.deferred_within(3.0)
    assert interaction.response_type == CallbackType.DEFERRED_CHANNEL_MESSAGE_WITH_SOURCE
    assert interaction.response is not None
    assert interaction.response.query["with_response"] in ("1", "true")
    assert "Authorization" not in interaction.response.headers

    # The original response, edited through the interaction token.
    [original_edit] = emulator.calls_to(
        "PATCH /webhooks/{webhook_id}/{webhook_token}/messages/@original"
    )
    assert original_edit.status == 200
    assert original_edit.json["content"] == "Queued: a red fox"
    original = interaction.original
    assert original is not None and not original.loading
    assert original.content == "Queued: a red fox"
    assert [e.via for e in original.edits] == ["webhook"]

    # The channel message: an image and a button, then an edit with the bot token.
    [post] = emulator.calls_to("POST /channels/{channel_id}/messages")
    assert post.headers["Authorization"] == f"Bot {emulator.token}"
    assert [(f.field, f.filename, f.data) for f in post.files] == [("files[0]", "result.png", PNG)]
    button = post.json["components"][0]["components"][0]
    assert button["custom_id"] == "brigade:reroll:abc123"
    [edit] = emulator.calls_to(MESSAGE_ROUTE)
    assert edit.headers["Authorization"] == f"Bot {emulator.token}"
    assert edit.json["content"] == "Done: a red fox"

    posted = emulator.messages[int(post.response["id"])]
    assert posted.content == "Done: a red fox"
    assert posted.custom_ids() == ["brigade:reroll:abc123"]
    assert [e.content for e in posted.edits] == ["Done: a red fox"]
    assert posted.edits[0].time >= post.time
    picture = posted.attachment("result.png")
    assert picture.data == PNG
    assert (picture.content_type, picture.width, picture.height) == ("image/png", 64, 48)
    assert picture.image().size == (64, 48)
    assert emulator.messages_in(channel.id) == [original, posted]
    async with aiohttp.ClientSession() as session, session.get(picture.url) as answer:
        assert answer.status == 200
        assert await answer.read() == PNG


async def test_button_is_answered_by_a_restarted_bot(discord_emulator: DiscordEmulator) -> None:
    emulator = discord_emulator
    guild, user = _world(emulator)
    async with running(TinyBot(guild.id), emulator.token) as bot:
        await emulator.send_slash_command(
            guild.id, guild.text_channel.id, user.id, "draw", {"prompt": "a boat"}
        )
        await asyncio.wait_for(bot.done.wait(), 5)
        message_id = bot.posted[0].id

    # A new process: the button's view is gone, the DynamicItem parses the custom_id.
    async with running(TinyBot(guild.id, sync=False), emulator.token):
        click = await emulator.click_button(message_id, "brigade:reroll:abc123", user.id)
        await click.wait_response()

    assert click.response_type == CallbackType.CHANNEL_MESSAGE_WITH_SOURCE
    assert click.response_data["content"] == "Rerolling abc123"
    assert click.response_data["flags"] == MessageFlag.EPHEMERAL
    assert click.original is not None and click.original.ephemeral
    assert click.original not in emulator.messages_in(guild.text_channel.id)
    assert (
        len(emulator.calls_to("PUT /applications/{application_id}/guilds/{guild_id}/commands")) == 1
    )


async def test_autocomplete_and_attachment_options(discord_emulator: DiscordEmulator) -> None:
    emulator = discord_emulator
    guild, user = _world(emulator)
    channel_id = guild.text_channel.id
    async with running(TinyBot(guild.id), emulator.token):
        typing = await emulator.send_autocomplete(
            guild.id, channel_id, user.id, "draw", {"prompt": "x", "model": "sd"}, focused="model"
        )
        await typing.wait_response()
        upload = await emulator.send_slash_command(
            guild.id, channel_id, user.id, "inspect", attachments={"image": ("cat photo.png", PNG)}
        )
        await upload.wait_response()

    assert typing.response_type == CallbackType.APPLICATION_COMMAND_AUTOCOMPLETE_RESULT
    assert [c["value"] for c in typing.choices] == ["sd15", "sdxl"]
    assert upload.response_data["content"] == f"cat_photo.png: {len(PNG)} bytes, 64x48"
    with pytest.raises(ValueError, match="required"):
        await emulator.send_slash_command(guild.id, channel_id, user.id, "inspect", {})


async def test_edit_of_a_deleted_message_is_unknown_message(
    discord_emulator: DiscordEmulator,
) -> None:
    emulator = discord_emulator
    guild, _ = _world(emulator)
    async with running(TinyBot(guild.id, sync=False), emulator.token) as bot:
        message = await _text_channel(bot, guild).send("progress 10%")
        emulator.delete_message(guild.text_channel.id, message.id)
        with pytest.raises(discord.NotFound) as caught:
            await message.edit(content="progress 20%")

    assert caught.value.code == ErrorCode.UNKNOWN_MESSAGE
    assert [c.status for c in emulator.calls_to(MESSAGE_ROUTE)] == [404]


async def test_rate_limited_edit_is_retried_after_retry_after(
    discord_emulator: DiscordEmulator,
) -> None:
    emulator = discord_emulator
    guild, _ = _world(emulator)
    async with running(TinyBot(guild.id, sync=False), emulator.token) as bot:
        message = await _text_channel(bot, guild).send("progress 10%")
        emulator.rate_limit_next(MESSAGE_ROUTE, retry_after=0.3)
        await message.edit(content="progress 20%")

    limited, retried = emulator.calls_to(MESSAGE_ROUTE)
    assert (limited.status, retried.status) == (429, 200)
    assert limited.response == {
        "message": "You are being rate limited.",
        "retry_after": 0.3,
        "global": False,
    }
    assert retried.time - limited.time >= 0.3
    assert emulator.messages[message.id].content == "progress 20%"
    assert emulator.invalid_requests == 1


async def test_expired_token_fails_but_bot_token_edit_works(
    discord_emulator_factory: DiscordFactory,
) -> None:
    emulator = await discord_emulator_factory(interaction_token_ttl=0.5)
    guild, user = _world(emulator)
    async with running(TinyBot(guild.id), emulator.token) as bot:
        interaction = await emulator.send_slash_command(
            guild.id, guild.text_channel.id, user.id, "draw", {"prompt": "a tree", "wait": True}
        )
        await emulator.wait_for_call("POST /channels/{channel_id}/messages")
        await asyncio.sleep(interaction.created_at + 0.6 - time.monotonic())
        bot.release.set()
        await asyncio.wait_for(bot.done.wait(), 5)

    assert bot.outcomes == ["token edit 401 50027", "channel edit ok"]
    assert emulator.messages[bot.posted[0].id].content == "Done: a tree"


async def test_late_first_response_is_unknown_interaction(
    discord_emulator: DiscordEmulator,
) -> None:
    emulator = discord_emulator
    emulator.interaction_response_window = 0.2
    guild, user = _world(emulator)
    async with running(TinyBot(guild.id), emulator.token) as bot:
        interaction = await emulator.send_slash_command(
            guild.id, guild.text_channel.id, user.id, "slow"
        )
        await asyncio.wait_for(bot.done.wait(), 5)

    assert bot.outcomes == [f"defer 404 {ErrorCode.UNKNOWN_INTERACTION}"]
    assert interaction.response is None and len(interaction.callbacks) == 1


async def test_command_and_message_limits(discord_emulator: DiscordEmulator) -> None:
    emulator = discord_emulator
    guild, _ = _world(emulator)
    async with running(TinyBot(guild.id), emulator.token) as bot:
        assert bot.application_id is not None
        too_long = [{"name": "a" * 33, "description": "x", "type": 1}]
        with pytest.raises(discord.HTTPException) as name_error:
            await bot.http.bulk_upsert_guild_commands(bot.application_id, guild.id, too_long)
        options = [{"type": 3, "name": f"o{i}", "description": "x"} for i in range(26)]
        crowded = [{"name": "ok", "description": "x", "options": options}]
        with pytest.raises(discord.HTTPException) as options_error:
            await bot.http.bulk_upsert_guild_commands(bot.application_id, guild.id, crowded)
        channel = _text_channel(bot, guild)
        with pytest.raises(discord.HTTPException) as content_error:
            await channel.send("x" * 2001)
        emulator.attachment_size_limit = 1000
        with pytest.raises(discord.HTTPException) as size_error:
            await channel.send(file=discord.File(io.BytesIO(b"0" * 1001), "big.bin"))

    assert (name_error.value.status, name_error.value.code) == (400, ErrorCode.INVALID_FORM_BODY)
    assert "In 0.name: Must be between 1 and 32 in length." in name_error.value.text
    assert "In 0.options: Must be 25 or fewer in length." in options_error.value.text
    assert "In content: Must be 2000 or fewer in length." in content_error.value.text
    assert (size_error.value.status, size_error.value.code) == (
        413,
        ErrorCode.REQUEST_ENTITY_TOO_LARGE,
    )
    assert {c["name"] for c in emulator.commands[guild.id].values()} == {"draw", "inspect", "slow"}


async def test_dropped_gateway_is_resumed(discord_emulator: DiscordEmulator) -> None:
    emulator = discord_emulator
    guild, user = _world(emulator)
    async with running(TinyBot(guild.id), emulator.token) as bot:
        session = await emulator.wait_for_session()
        await emulator.drop_gateway()
        # Dispatched while the socket is down: replayed after RESUME.
        interaction = await emulator.send_slash_command(
            guild.id, guild.text_channel.id, user.id, "draw", {"prompt": "a bridge"}
        )
        await interaction.wait_response()
        await asyncio.wait_for(bot.done.wait(), 5)

    first, second = emulator.connections
    assert (first.path, first.identified) == ("/gateway", True)
    assert (second.path, second.resumed, second.identified) == ("/resume", True, False)
    assert emulator.sessions == [session]
    assert [e["t"] for e in session.events][-1] in ("RESUMED", "MESSAGE_CREATE", "MESSAGE_UPDATE")
    resume = [c for c in emulator.gateway_calls if c.route == "RESUME"]
    assert [c.json["d"]["session_id"] for c in resume] == [session.id]


class Ask(discord.ui.Modal, title="New prompt"):
    text: discord.ui.TextInput[Ask] = discord.ui.TextInput(label="Prompt", custom_id="prompt")

    async def on_submit(self, interaction: discord.Interaction[Any]) -> None:
        await interaction.response.send_message(f"Queued {self.text.value}")


class Panel(discord.ui.View):
    def __init__(self) -> None:
        super().__init__(timeout=None)

    @discord.ui.select(
        custom_id="panel:model",
        options=[discord.SelectOption(label=m) for m in MODELS],
    )
    async def model(
        self, interaction: discord.Interaction[Any], select: discord.ui.Select[Panel]
    ) -> None:
        await interaction.response.edit_message(content=f"Model: {select.values[0]}")

    @discord.ui.button(custom_id="panel:refresh", label="Refresh")
    async def refresh(
        self, interaction: discord.Interaction[Any], button: discord.ui.Button[Panel]
    ) -> None:
        await interaction.response.defer()
        await interaction.edit_original_response(content="Refreshed")

    @discord.ui.button(custom_id="panel:ask", label="Ask")
    async def ask(
        self, interaction: discord.Interaction[Any], button: discord.ui.Button[Panel]
    ) -> None:
        await interaction.response.send_modal(Ask())


class PanelBot(commands.Bot):
    def __init__(self, guild_id: int) -> None:
        super().__init__(
            command_prefix=commands.when_mentioned,
            intents=discord.Intents.default(),
            guild_ready_timeout=0.05,
        )
        self.guild_id = guild_id
        self.allowed: list[bool] = []

    async def setup_hook(self) -> None:
        self.tree.add_command(panel, guild=discord.Object(self.guild_id))
        await self.tree.sync(guild=discord.Object(self.guild_id))


@app_commands.command(description="Open the control panel")
async def panel(interaction: discord.Interaction[PanelBot]) -> None:
    interaction.client.allowed.append(interaction.permissions.manage_guild)
    await interaction.response.defer(thinking=True, ephemeral=True)
    if not interaction.permissions.manage_guild:
        await interaction.followup.send("Not for you")
        return
    await interaction.followup.send("Panel below")
    await interaction.followup.send("Panel", view=Panel(), ephemeral=False)


async def test_followups_components_and_modal(discord_emulator: DiscordEmulator) -> None:
    emulator = discord_emulator
    guild = emulator.add_guild()
    admin = emulator.add_user(username="admin", guild=guild, manage_guild=True)
    plain = emulator.add_user(username="plain", guild=guild)
    channel_id = guild.text_channel.id
    async with running(PanelBot(guild.id), emulator.token) as bot:
        refused = await emulator.send_slash_command(guild.id, channel_id, plain.id, "panel")
        opened = await emulator.send_slash_command(guild.id, channel_id, admin.id, "panel")
        await emulator.wait_until(lambda: len(opened.followups) == 1, what="the panel")
        await emulator.wait_until(
            lambda: refused.original is not None and not refused.original.loading
        )
        menu = opened.followups[0]
        choose = await emulator.select_values(menu, "panel:model", admin.id, ["flux-schnell"])
        await choose.wait_response()
        refresh = await emulator.click_button(menu, "panel:refresh", admin.id)
        await emulator.wait_until(lambda: menu.content == "Refreshed", what="the refresh")
        ask = await emulator.click_button(menu, "panel:ask", admin.id)
        await ask.wait_response()
        submit = await emulator.submit_modal(ask, {"prompt": "a lighthouse"})
        await submit.wait_response()

    assert bot.allowed == [False, True]
    # The first followup after a thinking defer replaces the loading message.
    assert refused.original is not None and refused.original.content == "Not for you"
    assert refused.original.ephemeral and refused.followups == []
    assert opened.original is not None and opened.original.content == "Panel below"
    assert not menu.ephemeral and menu.custom_ids() == ["panel:model", "panel:refresh", "panel:ask"]
    assert choose.response_type == CallbackType.UPDATE_MESSAGE
    assert refresh.response_type == CallbackType.DEFERRED_UPDATE_MESSAGE
    assert [(e.via, e.content) for e in menu.edits] == [
        ("component", "Model: flux-schnell"),
        ("webhook", "Refreshed"),
    ]
    assert ask.response_type == CallbackType.MODAL
    assert ask.response_data["title"] == "New prompt"
    assert submit.response_data["content"] == "Queued a lighthouse"
    # discord.py asked for a zlib stream and could read it.
    assert emulator.connections[0].query["compress"] == "zlib-stream"
    assert emulator.connections[0].compress
