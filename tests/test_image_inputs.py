"""Input images end to end: stored by a frontend, fetched by the renderer, uploaded to the
backend, rendered (img2img, upscale); through the real ComfyUI client against the
emulator, the demo backend, the HTTP API and the Discord bot."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
from collections.abc import AsyncIterator
from io import BytesIO
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from PIL import Image

from api.server import start_api
from bot import flow
from bot.client import BrigadeBot, point_discord_py
from bot.images import upscale_request
from jobs.models import Event, Failed, FailureReason, Succeeded
from renderer.comfyui.backend import ComfyUIBackend
from storage import InputImageSettings
from tests.api_rig import ApiRig, api_settings, start_api_rig
from tests.emulators.comfyui import ComfyUIEmulator
from tests.emulators.discord import DiscordEmulator, Interaction
from tests.fixtures.bot import BotWorld, bot_world
from tests.fixtures.comfyui import ComfyUIFactory
from tests.fixtures.discord import running
from tests.fixtures.pipeline import Rig, renderer_settings
from tests.test_pipeline_comfyui import CHECKPOINT, comfyui_settings


def picture(size: tuple[int, int] = (96, 64), fmt: str = "PNG") -> bytes:
    """A two-colour picture, so a scaled or blended copy can be told from noise."""
    image = Image.new("RGB", size, (230, 40, 40))
    image.paste((40, 40, 230), (0, 0, size[0] // 2, size[1]))
    out = BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


def last(events: list[Event]) -> Event:
    assert events, "no events"
    return events[-1]


async def output_image(rig: Rig, event: Event) -> Image.Image:
    assert isinstance(event, Succeeded), event
    [output] = event.outputs
    data = await rig.store.get(output.key)
    with Image.open(BytesIO(data)) as image:
        return image.convert("RGB")


async def comfy_renderer(rig: Rig, url: str) -> None:
    config = renderer_settings()
    await rig.renderer(backend=ComfyUIBackend(config, comfyui_settings(url)))


@pytest.mark.parametrize("brokers", ["memory"], indirect=True)
@pytest.mark.s3
async def test_img2img_uploads_the_input_to_comfyui_and_binds_its_name(
    rig: Rig, comfyui: ComfyUIEmulator
) -> None:
    await comfy_renderer(rig, comfyui.url)
    data = picture((96, 64))
    key = await rig.store.put_input(data)

    job_id = await rig.submit(
        workflow="img2img", checkpoint=CHECKPOINT, steps=3, params={"image": key}
    )
    result = last(await rig.events(job_id))

    digest = hashlib.sha256(data).hexdigest()
    assert comfyui.files[("input", "brigade", f"{digest}.png")] == data
    [prompt] = [p for p in comfyui.submitted if p.get("prompt_id") == job_id]
    loads = [n for n in prompt["prompt"].values() if n["class_type"] == "LoadImage"]
    assert [n["inputs"]["image"] for n in loads] == [f"brigade/{digest}.png"]
    assert (await output_image(rig, result)).size == (96, 64)  # VAEEncode keeps the size


@pytest.mark.parametrize("brokers", ["memory"], indirect=True)
@pytest.mark.s3
async def test_upscale_on_comfyui_doubles_the_input(rig: Rig, comfyui: ComfyUIEmulator) -> None:
    await comfy_renderer(rig, comfyui.url)
    key = await rig.store.put_input(picture((40, 24), "WEBP"))

    job_id = await rig.submit(workflow="upscale", prompt="", params={"image": key})
    image = await output_image(rig, last(await rig.events(job_id)))

    assert image.size == (80, 48)
    left, right = image.getpixel((5, 24)), image.getpixel((75, 24))
    assert isinstance(left, tuple) and isinstance(right, tuple)
    assert left[2] > 150 and right[0] > 150  # blue half, red half: scaled, not redrawn


@pytest.mark.parametrize("brokers", ["memory"], indirect=True)
@pytest.mark.s3
async def test_a_missing_input_fails_the_job_for_good(rig: Rig, comfyui: ComfyUIEmulator) -> None:
    await comfy_renderer(rig, comfyui.url)
    stored = await rig.store.put_input(picture((8, 8)))
    never_stored = stored.rsplit("/", 1)[0] + "/" + "0" * 64 + ".png"

    job_id = await rig.submit(
        workflow="img2img", checkpoint=CHECKPOINT, steps=2, params={"image": never_stored}
    )
    result = last(await rig.events(job_id))

    assert isinstance(result, Failed)
    assert result.reason == FailureReason.INVALID
    assert "input image" in result.message and "send it again" in result.message
    assert comfyui.submitted == []


@pytest.mark.parametrize("brokers", ["memory"], indirect=True)
@pytest.mark.s3
async def test_demo_img2img_starts_from_the_input(rig: Rig) -> None:
    await rig.renderer()
    data = picture((96, 64))
    key = await rig.store.put_input(data)

    kept = await rig.submit(
        "kept", workflow="img2img", steps=2, params={"image": key, "denoise": 0.0}
    )
    redrawn = await rig.submit(
        "redrawn", workflow="img2img", steps=2, params={"image": key, "denoise": 1.0}
    )
    kept_image = await output_image(rig, last(await rig.events(kept)))
    redrawn_image = await output_image(rig, last(await rig.events(redrawn)))

    with Image.open(BytesIO(data)) as original:
        assert kept_image.tobytes() == original.convert("RGB").tobytes()  # denoise 0: the input
    assert redrawn_image.size == (96, 64)
    assert redrawn_image.tobytes() != kept_image.tobytes()


@pytest.mark.parametrize("brokers", ["memory"], indirect=True)
@pytest.mark.s3
async def test_demo_upscale_resizes_with_lanczos(rig: Rig) -> None:
    await rig.renderer()
    key = await rig.store.put_input(picture((40, 24), "JPEG"))

    job_id = await rig.submit(workflow="upscale", prompt="", params={"image": key, "scale_by": 3.0})
    image = await output_image(rig, last(await rig.events(job_id)))

    assert image.size == (120, 72)


# -- the HTTP API ------------------------------------------------------------------------


@pytest.fixture
async def api(rig: Rig, tmp_path: Path) -> AsyncIterator[ApiRig]:
    """The API with small input limits: 64 KiB and 200 x 200 pixels."""
    async with aiohttp.ClientSession() as http:
        plain = await start_api_rig(rig, http, tmp_path / "ledger.db")
        limits = InputImageSettings.model_construct(max_bytes=64 * 1024, max_pixels=200 * 200)
        services = dataclasses.replace(plain.services, input_limits=limits)
        server = await start_api(rig.stack, services, api_settings())
        yield dataclasses.replace(plain, server=server, services=services)


async def post_input(
    api: ApiRig, key: str, data: bytes, content_type: str = "image/png", *, form: bool = False
) -> tuple[int, Any]:
    body: Any = data
    headers = api.auth(key)
    if form:
        body = aiohttp.FormData()
        body.add_field("image", data, filename="photo.bin", content_type="text/plain")
    else:
        headers["Content-Type"] = content_type
    async with api.http.post(f"{api.url}/v1/inputs", data=body, headers=headers) as response:
        return response.status, await response.json(content_type=None)


@pytest.mark.parametrize("brokers", ["memory"], indirect=True)
async def test_api_upload_then_img2img(api: ApiRig) -> None:
    await api.rig.renderer()
    key = await api.new_key("acme")
    data = picture((96, 64), "WEBP")

    status, stored = await post_input(api, key, data, "image/webp")
    again, stored_again = await post_input(api, key, data, form=True)

    assert status == 201 and again == 201, (stored, stored_again)
    assert stored["key"] == stored_again["key"]  # content-addressed: one object
    assert stored["key"].endswith(f"/inputs/{hashlib.sha256(data).hexdigest()}.webp")
    assert (stored["content_type"], stored["width"], stored["height"]) == ("image/webp", 96, 64)
    assert await api.rig.store.get_input(stored["key"]) == data

    status, _, ticket = await api.submit(
        key, workflow="img2img", steps=2, params={"image": stored["key"]}
    )
    assert status == 202, ticket
    result = last(await api.rig.events(ticket["job_id"]))
    assert (await output_image(api.rig, result)).size == (96, 64)


@pytest.mark.parametrize("brokers", ["memory"], indirect=True)
async def test_api_refuses_what_is_not_an_accepted_image(api: ApiRig) -> None:
    key = await api.new_key("acme")

    text_status, text = await post_input(api, key, b"GIF89a not really", "image/png")
    big_status, big = await post_input(api, key, b"\x89PNG" + b"\x00" * (70 * 1024))
    wide_status, wide = await post_input(api, key, picture((300, 200)))
    html_status, html = await post_input(api, key, picture(), "text/html")
    no_key_status, _ = await post_input(api, "brg_nope", picture())

    assert text_status == 422
    assert text["errors"][0]["field"] == "image"
    assert "not a PNG, JPEG or WebP image" in text["detail"]
    assert big_status == 413 and "at most 65,536 bytes" in big["detail"]
    assert wide_status == 422 and "300×200" in wide["detail"]
    assert "at most 40,000 pixels" in wide["detail"]
    assert html_status == 415 and "image/png, image/jpeg or image/webp" in html["detail"]
    broken = b"--b\r\nContent-Disposition form-data\r\n\r\nx\r\n--b--\r\n"
    headers = {**api.auth(key), "Content-Type": "multipart/form-data; boundary=b"}
    async with api.http.post(f"{api.url}/v1/inputs", data=broken, headers=headers) as response:
        text = await response.text()
    assert response.status == 400 and "not a readable multipart form" in text, text  # was a 500
    assert no_key_status == 401


@pytest.mark.parametrize("brokers", ["memory"], indirect=True)
async def test_api_job_takes_only_a_stored_input_key(api: ApiRig) -> None:
    key = await api.new_key("acme")

    for value in (
        "https://169.254.169.254/latest/meta-data.png",
        "../../etc/passwd",
        "images/2026/01/01/x/0.png",
    ):
        status, _, problem = await api.submit(
            key, idempotency_key=value, workflow="img2img", params={"image": value}
        )
        assert status == 422, problem
        assert problem["errors"][0]["field"] == "image"
        assert "not the key of a stored input image" in problem["detail"]
    status, _, problem = await api.submit(key, workflow="img2img")
    assert status == 422 and "image: a value is required" in problem["detail"]


# -- the Discord bot ---------------------------------------------------------------------


@contextlib.asynccontextmanager
async def bot_running(
    world: BotWorld, limits: InputImageSettings | None = None, **settings: Any
) -> AsyncIterator[BrigadeBot]:
    """The bot of ``world``, with input ``limits`` of its own."""
    config = world.settings(**settings)
    point_discord_py(config)
    bot = BrigadeBot(
        world.app.frontend, config, world.ledger_path, store=world.app.store, input_limits=limits
    )
    async with running(bot, world.emulator.token) as started:
        yield started


async def imagine_with(
    world: BotWorld, prompt: str, attachments: dict[str, tuple[str, bytes]], **options: Any
) -> Interaction:
    interaction = await world.emulator.send_slash_command(
        world.guild.id,
        world.channel_id,
        world.user.id,
        "imagine",
        {"prompt": prompt, **options},
        attachments=attachments,
    )
    await interaction.wait_response()
    return interaction


async def test_imagine_with_an_attachment_renders_img2img_on_comfyui(
    discord_emulator: DiscordEmulator,
    comfyui_factory: ComfyUIFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    comfyui = await comfyui_factory(step_seconds=0.01)
    monkeypatch.setenv("COMFYUI_URL", comfyui.url)
    data = picture((128, 96), "JPEG")
    async with (
        bot_world(discord_emulator, tmp_path, backend="comfyui") as world,
        world.running(),
    ):
        assert world.app.backend.name == "comfyui"
        interaction = await imagine_with(
            world, "a castle", {"image": ("castle.jpg", data)}, workflow="img2img"
        )
        message = interaction.original
        assert message is not None
        await world.final(message, timeout=20)

    assert "✅ Done" in message.content, message.content
    digest = hashlib.sha256(data).hexdigest()
    assert comfyui.files[("input", "brigade", f"{digest}.jpg")] == data
    [prompt] = comfyui.submitted
    loads = [
        n["inputs"]["image"] for n in prompt["prompt"].values() if n["class_type"] == "LoadImage"
    ]
    assert loads == [f"brigade/{digest}.jpg"]
    assert message.attachment("result.png").image().size == (128, 96)


@pytest.mark.parametrize(
    ("attachment", "options", "said"),
    [
        (("big.png", None), {"workflow": "img2img"}, "images of at most 1.0 MiB"),
        (
            ("notes.png", b"these are my notes, not a picture"),
            {"workflow": "img2img"},
            "not a PNG, JPEG or WebP image",
        ),
        (("huge.png", "pixels"), {"workflow": "img2img"}, "at most 10,000 pixels"),
        (("fox.png", "ok"), {"workflow": "demo"}, 'The workflow "demo" takes no image'),
        (None, {"workflow": "img2img"}, 'The workflow "img2img" needs an image'),
    ],
)
async def test_refused_attachments_queue_and_charge_nothing(
    discord_emulator: DiscordEmulator,
    tmp_path: Path,
    attachment: tuple[str, bytes | str | None] | None,
    options: dict[str, Any],
    said: str,
) -> None:
    limits = InputImageSettings.model_construct(max_bytes=1024 * 1024, max_pixels=100 * 100)
    files: dict[str, tuple[str, bytes]] = {}
    if attachment is not None:
        name, content = attachment
        if content is None:
            content = b"\x89PNG\r\n\x1a\n" + b"\x00" * (1024 * 1024 + 1)
        elif content == "pixels":
            content = picture((101, 100))
        elif content == "ok":
            content = picture((32, 32))
        assert isinstance(content, bytes)
        files["image"] = (name, content)
    async with bot_world(discord_emulator, tmp_path) as world, bot_running(world, limits) as bot:
        interaction = await imagine_with(world, "a castle", files, **options)
        answer = await world.answer(interaction)
        usage = await bot.front.ledger.usage(
            str(world.guild.id), str(world.user.id), bot.front.quota_defaults
        )
        record = await bot.front.ledger.get_by_key(str(interaction.id))

    assert answer.ephemeral
    assert said in answer.content, answer.content
    assert record is None
    assert (usage.user_images_today, usage.user_in_flight) == (0, 0)
    assert interaction.original is not None and interaction.original.deleted
    if said.startswith("images of at most"):
        assert discord_emulator.cdn_downloads == []  # refused by its declared size alone


async def test_upscale_button_enlarges_the_finished_picture_once_per_press(
    discord_emulator: DiscordEmulator, tmp_path: Path
) -> None:
    async with bot_world(discord_emulator, tmp_path) as world, world.running() as bot:
        interaction = await world.imagine("a small boat", aspect="landscape")
        message = interaction.original
        assert message is not None
        await world.final(message)
        [job_id] = {c.split(":")[2] for c in message.custom_ids()}
        upscale_id = f"brigade:upscale:{job_id}"
        assert upscale_id in message.custom_ids()

        click = await discord_emulator.click_button(message, upscale_id, world.user.id)
        await click.wait_response()
        upscaled = click.original
        assert upscaled is not None
        await world.final(upscaled)
        record = await bot.front.ledger.get_by_key(str(click.id))
        assert record is not None
        # Discord delivering the same press again: the same job, not a second one.
        request = await upscale_request(bot, job_id)
        again = await flow.admit(bot, request, key=str(click.id), origin=record.job.origin)

    assert "✅ Done" in upscaled.content, upscaled.content
    assert record.job.workflow == "upscale"
    assert record.job.params["prompt"] == "a small boat"
    first = message.attachment("result.png").image().size
    assert upscaled.attachment("result.png").image().size == (first[0] * 2, first[1] * 2)
    assert not again.created and again.job.job_id == record.job.job_id
    # An upscale job's own message offers Upscale again; a failed one would not.
    assert f"brigade:upscale:{record.job.job_id}" in upscaled.custom_ids()


async def test_no_upscale_button_when_it_is_off(
    discord_emulator: DiscordEmulator, tmp_path: Path
) -> None:
    async with (
        bot_world(discord_emulator, tmp_path) as world,
        world.running(upscale_workflow="off"),
    ):
        interaction = await world.imagine("a small boat")
        message = interaction.original
        assert message is not None
        await world.final(message)

    assert message.custom_ids() and not [c for c in message.custom_ids() if "upscale" in c]
