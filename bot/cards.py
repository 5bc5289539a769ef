"""What a job's message says in each state: queued, rendering, done, failed.

Pure functions of the job and its latest events (plus image bytes): no Discord calls
here, so every state can be checked without a gateway. A prompt is user data: it is
escaped before it reaches Markdown, and no message mentions anyone.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from datetime import datetime

import discord
from PIL import Image

from bot.constants import PROGRESS_CELLS, PROMPT_SHOWN
from jobs.models import Failed, FailureReason, Job, Output, Preview, Progress, Succeeded

#: What each failure means to the person who asked, and what they can do about it.
FAILURE_TEXT: dict[FailureReason, str] = {
    FailureReason.INVALID: "The workflow refused these settings.",
    FailureReason.OOM: "The GPU ran out of memory. Try a smaller size or fewer images.",
    FailureReason.BACKEND_DOWN: "No renderer could run it right now. Try again in a few minutes.",
    FailureReason.TIMEOUT: "The render took too long and was stopped.",
    FailureReason.CANCELLED: "This job was cancelled.",
    FailureReason.INTERNAL: "Something broke on our side. It has been logged; try again.",
}

NO_MENTIONS = discord.AllowedMentions.none()


@dataclass(frozen=True, slots=True)
class Attachment:
    filename: str
    data: bytes

    def file(self) -> discord.File:
        """A fresh ``discord.File`` (one is consumed by each request)."""
        return discord.File(io.BytesIO(self.data), filename=self.filename)


@dataclass(frozen=True, slots=True)
class Card:
    """A message's content, embeds and attachments (the buttons are added by the caller)."""

    content: str
    embeds: list[discord.Embed] = field(default_factory=list)
    attachments: list[Attachment] = field(default_factory=list)

    def files(self) -> list[discord.File]:
        return [attachment.file() for attachment in self.attachments]


def quoted(text: str, limit: int = PROMPT_SHOWN) -> str:
    """User text made safe to show: truncated, Markdown and mentions escaped, one block."""
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    text = discord.utils.escape_markdown(text, as_needed=False)
    return discord.utils.escape_mentions(text).replace("\n", " ")


def header(job: Job) -> str:
    seed = job.seed
    parts = [f"`{job.workflow}`"]
    if seed is not None:
        parts.append(f"seed `{seed}`")
    images = job.params.get("batch", 1)
    if isinstance(images, int) and images > 1:
        parts.append(f"{images} images")
    if job.origin.user:
        parts.append(f"for <@{job.origin.user}>")
    return f"**{quoted(job.prompt)}**\n" + " · ".join(parts)


def ticket(job: Job) -> str:
    return f"ticket `{job.job_id}`"


def queued(job: Job, position: int | None, eta: datetime | None) -> Card:
    where = f"#{position} in the `{job.lane}` queue" if position is not None else "queued"
    when = f", starts {discord.utils.format_dt(eta, 'R')}" if eta is not None else ""
    return Card(f"{header(job)}\n⏳ Waiting: {where}{when} · {ticket(job)}")


def bar(step: int, total: int) -> str:
    fraction = 0.0 if total <= 0 else min(max(step / total, 0.0), 1.0)
    filled = math.floor(fraction * PROGRESS_CELLS)
    return "█" * filled + "░" * (PROGRESS_CELLS - filled) + f" {round(fraction * 100)}%"


def rendering(job: Job, progress: Progress | None, preview: Preview | None) -> Card:
    if progress is None:
        status = "🎨 Rendering: starting…"
    else:
        shown = bar(progress.step, progress.total)
        status = f"🎨 Rendering `{shown}` step {progress.step}/{progress.total}"
    content = f"{header(job)}\n{status} · {ticket(job)}"
    if preview is None:
        return Card(content)
    extension = "webp" if preview.mime == "image/webp" else "jpg"
    name = f"preview.{extension}"
    embed = discord.Embed(colour=discord.Colour.blurple()).set_image(url=f"attachment://{name}")
    return Card(content, [embed], [Attachment(name, preview.image)])


def links(outputs: list[Output]) -> str:
    """Full-resolution links; ``file://`` (the local mode) as text, Discord cannot open it."""
    lines = []
    for index, output in enumerate(outputs, start=1):
        size = f"{output.width}×{output.height}"
        if output.url.startswith(("http://", "https://")):
            lines.append(f"[image {index}]({output.url}) ({size})")
        else:
            lines.append(f"image {index} ({size}): `{output.url}`")
    return "\n".join(lines)


def succeeded(job: Job, event: Succeeded, image: Attachment | None) -> Card:
    seed = event.seed if event.seed is not None else job.seed
    embed = discord.Embed(
        title="Done",
        description=links(event.outputs)[:4000],
        colour=discord.Colour.green(),
    )
    embed.add_field(name="Workflow", value=f"`{job.workflow}`")
    embed.add_field(name="Seed", value=f"`{seed}`" if seed is not None else "—")
    render = event.timings.get("render")
    if render is not None:
        embed.add_field(name="Render", value=f"{render:.1f} s")
    if image is not None:
        embed.set_image(url=f"attachment://{image.filename}")
    content = f"{header(job)}\n✅ Done · {ticket(job)}"
    return Card(content, [embed], [image] if image is not None else [])


def failed(job: Job, event: Failed) -> Card:
    reason = FAILURE_TEXT.get(event.reason, FAILURE_TEXT[FailureReason.INTERNAL])
    detail = "" if event.reason is FailureReason.CANCELLED else f"\n> {quoted(event.message, 500)}"
    verb = "🚫 Cancelled" if event.reason is FailureReason.CANCELLED else "❌ Failed"
    note = "" if event.reason is FailureReason.CANCELLED else " Your quota was not charged."
    content = f"{header(job)}\n{verb}: {reason}{note}{detail}\n{ticket(job)}"
    return Card(content)


def compose(images: list[bytes], limit: int) -> Attachment:
    """One picture for the message: the image itself, or a 2x2 grid of up to four, as
    PNG when it fits under ``limit`` bytes, else as ever smaller JPEG. Blocking (Pillow):
    run it in a thread."""
    opened = [Image.open(io.BytesIO(data)).convert("RGB") for data in images[:4]]
    if len(opened) == 1:
        picture = opened[0]
    else:
        width = max(image.width for image in opened)
        height = max(image.height for image in opened)
        columns = 2
        rows = math.ceil(len(opened) / columns)
        picture = Image.new("RGB", (width * columns, height * rows), (24, 24, 24))
        for index, image in enumerate(opened):
            x, y = (index % columns) * width, (index // columns) * height
            picture.paste(image, (x + (width - image.width) // 2, y + (height - image.height) // 2))
    buffer = io.BytesIO()
    picture.save(buffer, "PNG", optimize=False)
    if buffer.tell() <= limit:
        return Attachment("result.png", buffer.getvalue())
    scale = 1.0
    while True:
        for quality in (90, 80, 70, 60):
            buffer = io.BytesIO()
            sized = picture
            if scale < 1.0:
                size = (max(1, int(picture.width * scale)), max(1, int(picture.height * scale)))
                sized = picture.resize(size, Image.Resampling.LANCZOS)
            sized.save(buffer, "JPEG", quality=quality)
            if buffer.tell() <= limit:
                return Attachment("result.jpg", buffer.getvalue())
        if scale < 0.05:
            raise ValueError(f"cannot fit the picture under {limit} bytes")
        scale *= 0.7
