"""Preview latency: a ComfyUI preview frame sent, to the Discord edit that shows it.

Run from the repository root, with RabbitMQ at ``AMQP_URL`` (default: guest on loopback)
and SeaweedFS's ``weed`` in the virtualenv (the dev extra)::

    .venv/bin/python -m bench.preview_latency [--jobs 6] [--rounds 2] [--steps 25]
        [--step-seconds 0.16] [--intervals 1.5 0]

The real bot (``brigade bot``: discord.py against the Discord emulator) and a real
renderer (``brigade renderer`` on the ComfyUI backend) run as processes of their own, over
RabbitMQ, storing into SeaweedFS. Both emulators run in this process: the ComfyUI one
(``--steps`` KSampler steps of ``--step-seconds``, a 512 px JPEG preview per step, the
default ``sd15-txt2img`` at 512x512) records when it writes each binary preview frame to
the renderer's socket; the Discord one records when each REST request arrives, with its
files. Both clocks are this process's ``time.monotonic()``.

Matching: the renderer downscales and re-encodes a preview (``encode_preview``,
``RENDERER_PREVIEW_MAX_SIDE``) deterministically, so the bench encodes every frame the
emulator sent the same way and looks for those bytes among the files of the bot's
message edits. A preview's latency is from its frame leaving ComfyUI to the first edit
request carrying it reaching Discord. Frames that never reach Discord are counted where
they went: dropped by the renderer's throttle (``RENDERER_PREVIEW_INTERVAL_SECONDS``,
1 s: one frame per interval is forwarded, the rest are not even decoded) or coalesced by
the bot (``DISCORD_EDIT_INTERVAL_SECONDS``: a message is edited at most once per
interval with its newest state, so a forwarded preview overtaken by the next one before
the edit is never shown).

Each ``--intervals`` value is one bot configuration (a fresh ``brigade bot`` process
with that ``DISCORD_EDIT_INTERVAL_SECONDS``); each round runs ``--jobs`` ``/imagine``
commands one at a time under every configuration in turn (the renderer's queue is
otherwise empty), so the configurations see the same machine. The default interval
(1.5 s) shows what users see; a small one shows the pipeline's own latency (the bot's
wait removed). Nothing rate-limits the edits here (the emulator's default limits allow
50 per second per route), unlike Discord's 5 edits per 5 s per channel.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import statistics
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import percentile, quiet_logs, require_weed
from bench.services import URL, Service, service_env
from bench.services import renderer as renderer_service
from jobs.topology import build_topology
from renderer.comfyui.frames import parse_binary_frame
from renderer.previews import encode_preview
from renderer.settings import RendererSettings
from storage.settings import S3Settings
from tests.emulators.comfyui import ComfyUIEmulator
from tests.emulators.discord import Call, DiscordEmulator, Guild, Interaction, User
from tests.fixtures.rabbitmq import delete_topology
from tests.fixtures.s3server import run_seaweedfs, settings_for

WORKFLOW = "sd15-txt2img"
FRONTEND = "bench-bot"
#: The renderer's default: the bench encodes frames as the renderer does.
MAX_SIDE = int(RendererSettings.model_fields["preview_max_side"].default)
FINISHED = ("✅ Done", "❌ Failed", "🚫 Cancelled")
#: Quotas out of the way: one member sends every command.
NO_QUOTAS = {
    "QUOTA_CONCURRENT_PER_USER": "1000",
    "QUOTA_PENDING_PER_TENANT": "1000",
    "QUOTA_IMAGES_PER_USER_PER_DAY": "1000000",
}


@dataclass
class Tally:
    """What happened to the preview frames of one bot configuration."""

    frames: int = 0
    forwarded: int = 0
    shown: int = 0
    jobs: int = 0
    failed: int = 0
    latencies: list[float] = field(default_factory=list)
    edits: int = 0


@dataclass
class World:
    comfyui: ComfyUIEmulator
    discord: DiscordEmulator
    guild: Guild
    user: User
    renderer: Service
    prefix: str
    folder: Path
    s3: S3Settings


def bot_service(world: World, interval: float) -> Service:
    env = service_env(
        world.prefix,
        world.folder / "bot",
        world.s3,
        BRIGADE_FRONTEND_ID=FRONTEND,
        DISCORD_TOKEN=world.discord.token,
        DISCORD_API_BASE_URL=world.discord.api_base,
        DISCORD_GATEWAY_URL=world.discord.gateway_url,
        DISCORD_DEV_GUILDS=str(world.guild.id),
        DISCORD_GUILD_READY_TIMEOUT="0.05",
        DISCORD_EDIT_INTERVAL_SECONDS=str(interval),
        **NO_QUOTAS,
    )
    return Service("bot", ["bot"], env, world.folder)


async def bot_ready(world: World) -> None:
    """A live gateway session and ``/imagine`` registered in the guild."""

    def ready() -> bool:
        registered = world.discord.commands.get(world.guild.id, {}).values()
        return any(command.get("name") == "imagine" for command in registered)

    await world.discord.wait_for_session(timeout=60)
    await world.discord.wait_until(ready, 60, "/imagine registered")


async def imagine(world: World, n: int, timeout: float) -> bool:
    """One ``/imagine``, waited for until its message shows the end; True if it succeeded."""
    interaction: Interaction = await world.discord.send_slash_command(
        world.guild.id,
        world.guild.text_channel.id,
        world.user.id,
        "imagine",
        {"prompt": f"a lighthouse at dusk #{n}", "workflow": WORKFLOW, "seed": n},
    )
    await interaction.wait_response(timeout=10)

    def final() -> str | None:
        message = interaction.followups[-1] if interaction.followups else interaction.original
        if message is None:
            return None
        return next((mark for mark in FINISHED if mark in message.content), None)

    await world.discord.wait_until(lambda: final() is not None, timeout, "the final edit")
    return final() == FINISHED[0]


def shown_previews(calls: list[Call]) -> dict[str, float]:
    """sha256 of every file sent in an edit -> when the first request carrying it came."""
    first: dict[str, float] = {}
    for call in calls:
        if call.method != "PATCH":
            continue
        for upload in call.files:
            first.setdefault(hashlib.sha256(upload.data).hexdigest(), call.time)
    return first


def sent_previews(frames: list[tuple[float, bytes]]) -> dict[str, float]:
    """sha256 of each frame as the renderer re-encodes it -> when ComfyUI sent it."""
    sent: dict[str, float] = {}
    for at, payload in frames:
        frame = parse_binary_frame(payload)
        if frame is None:
            continue
        data, _ = encode_preview(frame.image, MAX_SIDE)
        sent.setdefault(hashlib.sha256(data).hexdigest(), at)
    return sent


def forwarded(renderer: Service) -> int:
    return sum(int(e.get("previews_sent", 0)) for e in renderer.log_events("job.succeeded"))


async def run_config(world: World, interval: float, jobs: list[int], timeout: float) -> Tally:
    """A fresh bot with ``interval``; ``jobs`` one at a time; what the frames did."""
    bot = bot_service(world, interval)
    frames: list[tuple[float, bytes]] = []
    world.comfyui.binary_frames_sent = frames
    calls_before = len(world.discord.calls)
    forwarded_before = forwarded(world.renderer)
    tally = Tally()
    bot.start()
    try:
        await bot_ready(world)
        for n in jobs:
            tally.jobs += 1
            tally.failed += not await imagine(world, n, timeout)
    finally:
        bot.stop()
        world.comfyui.binary_frames_sent = None
    calls = world.discord.calls[calls_before:]
    tally.edits = sum(call.method == "PATCH" for call in calls)
    sent = await asyncio.to_thread(sent_previews, frames)
    shown = shown_previews(calls)
    tally.frames = len(frames)
    tally.forwarded = forwarded(world.renderer) - forwarded_before
    for digest, at in sent.items():
        if digest in shown:
            tally.shown += 1
            tally.latencies.append(shown[digest] - at)
    for line in bot.warnings()[:5]:
        print(f"    bot: {line[:300]}")
    return tally


async def bench(args: argparse.Namespace, s3: S3Settings, folder: Path) -> None:
    prefix = f"bench{uuid.uuid4().hex[:8]}"
    topology = build_topology(["fast"], prefix=prefix)
    comfyui = ComfyUIEmulator(step_seconds=args.step_seconds)
    discord = DiscordEmulator()
    await comfyui.start()
    await discord.start()
    guild = discord.add_guild(name="Brigade")
    user = discord.add_user(username="painter", guild=guild)
    renderer = renderer_service("bench-renderer", folder, prefix, s3, comfyui.url)
    world = World(comfyui, discord, guild, user, renderer, prefix, folder, s3)
    tallies: dict[float, list[Tally]] = {interval: [] for interval in args.intervals}
    timeout = 30.0 + 3 * args.steps * args.step_seconds
    try:
        renderer.start()
        await asyncio.to_thread(renderer.wait_for_log, "worker.started")
        numbers = iter(range(10**6))
        for round_ in range(args.rounds):
            for interval in args.intervals:
                jobs = [next(numbers) for _ in range(args.jobs)]
                tally = await run_config(world, interval, jobs, timeout)
                tallies[interval].append(tally)
                report(round_, interval, tally)
    finally:
        renderer.stop()
        await discord.stop()
        await comfyui.stop()
        await delete_topology(URL, topology, [topology.events_queue(FRONTEND).name])
    for line in renderer.warnings()[:5]:
        print(f"  renderer: {line[:300]}")
    print_table(args, tallies)


def report(round_: int, interval: float, tally: Tally) -> None:
    ms = sorted(s * 1000 for s in tally.latencies)
    p50 = f"{percentile(ms, 50):.0f}" if ms else "-"
    print(
        f"  round {round_ + 1}: bot interval {interval:g} s: {tally.jobs} jobs "
        f"({tally.failed} failed), {tally.frames} frames, {tally.forwarded} forwarded, "
        f"{tally.shown} shown in {tally.edits} edits; p50 {p50} ms",
        flush=True,
    )


def print_table(args: argparse.Namespace, tallies: dict[float, list[Tally]]) -> None:
    print()
    print(
        f"{WORKFLOW} 512x512, {args.steps} steps x {args.step_seconds:g} s, one job at a time, "
        f"{args.jobs} jobs x {args.rounds} round(s) per bot interval; renderer preview "
        f"interval: the default, max side {MAX_SIDE} px"
    )
    print(
        f"  {'bot interval':<14}{'frames':>7}{'forwarded':>10}{'shown':>7}{'coalesced':>10}"
        f"{'p50 ms':>8}{'p90 ms':>8}{'p99 ms':>8}{'max ms':>8}   round p50s"
    )
    for interval, runs in tallies.items():
        latencies = [s * 1000 for tally in runs for s in tally.latencies]
        frames = sum(t.frames for t in runs)
        sent = sum(t.forwarded for t in runs)
        shown = sum(t.shown for t in runs)
        rounds = ", ".join(
            f"{statistics.median(t.latencies) * 1000:.0f}" if t.latencies else "-" for t in runs
        )
        if not latencies:
            latencies = [float("nan")]
        print(
            f"  {f'{interval:g} s':<14}{frames:>7}{sent:>10}{shown:>7}{sent - shown:>10}"
            f"{percentile(latencies, 50):8.0f}{percentile(latencies, 90):8.0f}"
            f"{percentile(latencies, 99):8.0f}{max(latencies):8.0f}   {rounds}"
        )
    print(
        "frames: sent by ComfyUI; forwarded: by the renderer's throttle (the rest dropped "
        "there); shown: reached Discord in an edit; coalesced: forwarded but overtaken "
        "before the bot's next edit. Latency: frame written -> edit request received."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--jobs", type=int, default=6, help="jobs per round and bot interval")
    parser.add_argument("--rounds", type=int, default=2, help="rounds (intervals alternate)")
    parser.add_argument("--steps", type=int, default=25, help="KSampler steps per job")
    parser.add_argument(
        "--step-seconds", type=float, default=0.16, help="the emulator's time per step"
    )
    parser.add_argument(
        "--intervals",
        type=float,
        nargs="+",
        default=[1.5, 0.0],
        help="DISCORD_EDIT_INTERVAL_SECONDS values, one bot each",
    )
    args = parser.parse_args()
    quiet_logs()
    weed = require_weed()
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-preview-") as name:
        folder = Path(name)
        with run_seaweedfs(folder / "seaweedfs", weed) as server:
            asyncio.run(bench(args, settings_for(server, "bench"), folder))
    print(f"({time.monotonic() - began:.0f} s in all)")


if __name__ == "__main__":
    main()
