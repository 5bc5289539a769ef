"""Memory: peak resident set of the bot, the API and a renderer under a load of jobs.

Run from the repository root, with RabbitMQ at ``AMQP_URL`` (default: guest on loopback)
and SeaweedFS's ``weed`` in the virtualenv (the dev extra)::

    .venv/bin/python -m bench.memory [--jobs 60] [--step-seconds 0.02]

Three processes, each started as in production: ``brigade bot`` (discord.py against the
Discord emulator in this process), ``brigade api`` (HTTP on a free port) and ``brigade
renderer`` on the ComfyUI backend, against a ComfyUI emulator process (``sd15-txt2img``
at its defaults: 512x512, 25 steps of ``--step-seconds``, a 512 px JPEG preview per
step), over RabbitMQ, storing into SeaweedFS. Half of ``--jobs`` are ``/imagine``
commands sent to the bot one after another (each waits only for the bot's deferral),
the other half ``POST /v1/jobs`` to the API, all before the first ends; the API's jobs
are then polled with ``GET /v1/jobs/{id}`` every half second and the bot's messages
followed until every job has ended. So the bot holds every job's message and preview
state and edits them, the API holds its jobs and answers polls, the renderer renders
them all (``RENDERER_PREFETCH`` default) and relays previews.

Reported per process, in MiB from ``/proc/<pid>/status``: ``VmRSS`` once started and
idle, and ``VmHWM`` (the peak resident set) at the end. The script fails if any of the
three has torch mapped (``/proc/<pid>/maps``): none of them may load it.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import tempfile
import time
import uuid
from pathlib import Path

import aiohttp

from bench.common import quiet_logs, require_weed
from bench.preview_latency import FINISHED, NO_QUOTAS, WORKFLOW
from bench.services import URL, Service, comfyui_emulators, service_env, stop_all
from bench.services import renderer as renderer_service
from jobs.topology import build_topology
from storage.settings import S3Settings
from tests.emulators.discord import DiscordEmulator, Interaction
from tests.fixtures.rabbitmq import delete_topology
from tests.fixtures.s3server import run_seaweedfs, settings_for

BOT = "bench-bot"
API = "bench-api"
ADMIN_KEY = "bench-admin-key-" + "x" * 32
POLL_SECONDS = 0.5
MIB = 1024


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def api_jobs(base: str, count: int, timeout: float) -> list[str]:
    """Submit ``count`` jobs to the API up front; return their final statuses."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
        async with http.post(f"{base}/v1/admin/keys", json={"tenant": "bench"}, headers=admin) as r:
            r.raise_for_status()
            key = (await r.json())["key"]
        headers = {"Authorization": f"Bearer {key}"}
        ids = []
        for n in range(count):
            body = {"workflow": WORKFLOW, "prompt": f"a harbour at dawn #{n}", "seed": n}
            idempotency = {**headers, "Idempotency-Key": str(uuid.uuid4())}
            async with http.post(f"{base}/v1/jobs", json=body, headers=idempotency) as r:
                if r.status != 202:
                    raise RuntimeError(f"POST /v1/jobs: {r.status} {await r.text()}")
                ids.append((await r.json())["job_id"])
        statuses: dict[str, str] = {}
        async with asyncio.timeout(timeout):
            while len(statuses) < len(ids):
                await asyncio.sleep(POLL_SECONDS)
                for job_id in ids:
                    if job_id in statuses:
                        continue
                    async with http.get(f"{base}/v1/jobs/{job_id}", headers=headers) as r:
                        status = (await r.json())["status"]
                    if status in ("succeeded", "failed"):
                        statuses[job_id] = status
        return list(statuses.values())


async def bot_jobs(discord: DiscordEmulator, count: int, timeout: float) -> list[str]:
    """``count`` ``/imagine`` commands one after another; their messages' final marks."""
    [guild] = discord.guilds.values()
    user = next(member.user for member in guild.members.values() if not member.user.bot)
    interactions: list[Interaction] = []
    for n in range(count):
        interaction = await discord.send_slash_command(
            guild.id,
            guild.text_channel.id,
            user.id,
            "imagine",
            {"prompt": f"a lighthouse at dusk #{n}", "workflow": WORKFLOW, "seed": n},
        )
        await interaction.wait_response(timeout=10)
        interactions.append(interaction)

    def mark(interaction: Interaction) -> str | None:
        message = interaction.followups[-1] if interaction.followups else interaction.original
        if message is None:
            return None
        return next((m for m in FINISHED if m in message.content), None)

    await discord.wait_until(
        lambda: all(mark(i) is not None for i in interactions), timeout, "every final edit"
    )
    return [mark(i) or "" for i in interactions]


def mib(service: Service, field: str) -> float:
    return service.status(field) / MIB


async def bench(
    args: argparse.Namespace, s3: S3Settings, folder: Path, comfyui_url: str
) -> list[tuple[Service, float]]:
    prefix = f"bench{uuid.uuid4().hex[:8]}"
    topology = build_topology(["fast"], prefix=prefix)
    discord = DiscordEmulator()
    await discord.start()
    guild = discord.add_guild(name="Brigade")
    discord.add_user(username="painter", guild=guild)
    port = free_port()
    renderer = renderer_service("bench-renderer", folder, prefix, s3, comfyui_url)
    api = Service(
        "api",
        ["api"],
        service_env(
            prefix,
            folder / "api",
            s3,
            BRIGADE_FRONTEND_ID=API,
            API_PORT=str(port),
            API_ADMIN_KEY=ADMIN_KEY,
            **NO_QUOTAS,
        ),
        folder,
    )
    bot = Service(
        "bot",
        ["bot"],
        service_env(
            prefix,
            folder / "bot",
            s3,
            BRIGADE_FRONTEND_ID=BOT,
            DISCORD_TOKEN=discord.token,
            DISCORD_API_BASE_URL=discord.api_base,
            DISCORD_GATEWAY_URL=discord.gateway_url,
            DISCORD_DEV_GUILDS=str(guild.id),
            DISCORD_GUILD_READY_TIMEOUT="0.05",
            **NO_QUOTAS,
        ),
        folder,
    )
    services = [bot, api, renderer]
    timeout = 120.0 + args.jobs * 25 * args.step_seconds * 4
    idle: list[tuple[Service, float]] = []
    try:
        for service in services:
            service.start()
        await asyncio.to_thread(renderer.wait_for_log, "worker.started")
        await asyncio.to_thread(api.wait_for_log, "api.started")
        await discord.wait_for_session(timeout=60)
        await discord.wait_until(lambda: bool(discord.commands.get(guild.id)), 60, "commands")
        await asyncio.sleep(1.0)  # settled: the idle figure is not mid-start-up
        idle = [(service, mib(service, "VmRSS")) for service in services]
        began = time.monotonic()
        half = args.jobs // 2
        api_done, bot_done = await asyncio.gather(
            api_jobs(f"http://127.0.0.1:{port}", args.jobs - half, timeout),
            bot_jobs(discord, half, timeout),
        )
        seconds = time.monotonic() - began
        failed = sum(s != "succeeded" for s in api_done) + sum(m != FINISHED[0] for m in bot_done)
        print(
            f"  {len(api_done)} API jobs and {len(bot_done)} bot jobs ended in {seconds:.1f} s "
            f"({failed} not succeeded)",
            flush=True,
        )
        for service in services:
            torch = service.maps("torch")
            if torch:
                raise SystemExit(f"{service.name} has torch loaded: {torch[:3]}")
        peaks = [(service, mib(service, "VmHWM")) for service in services]
    finally:
        stop_all(services)
        await discord.stop()
        await delete_topology(
            URL, topology, [topology.events_queue(BOT).name, topology.events_queue(API).name]
        )
        for service in services:
            for line in service.warnings()[:3]:
                print(f"  {service.name}: {line[:300]}")
    print()
    print(
        f"{args.jobs} jobs ({args.jobs - args.jobs // 2} through the API, {args.jobs // 2} "
        f"through the bot), {WORKFLOW} 512x512, 25 steps x {args.step_seconds:g} s, previews "
        "on; torch mapped in none of them"
    )
    print(f"  {'process':<22}{'idle RSS MiB':>13}{'peak RSS MiB':>14}")
    for (service, start), (_, peak) in zip(idle, peaks, strict=True):
        command = f"brigade {' '.join(service.args)}"
        print(f"  {command:<22}{start:13.1f}{peak:14.1f}")
    return peaks


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--jobs", type=int, default=60, help="jobs in all, half per frontend")
    parser.add_argument(
        "--step-seconds", type=float, default=0.02, help="the emulator's time per step"
    )
    args = parser.parse_args()
    quiet_logs()
    weed = require_weed()
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as name:
        folder = Path(name)
        with (
            run_seaweedfs(folder / "seaweedfs", weed) as server,
            comfyui_emulators(1, args.step_seconds, folder) as [(url, _)],
        ):
            asyncio.run(bench(args, settings_for(server, "bench"), folder, url))
    print(f"({time.monotonic() - began:.0f} s in all)")


if __name__ == "__main__":
    main()
