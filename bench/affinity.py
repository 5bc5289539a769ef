"""Model affinity beside FIFO: model loads, waits and run time on a mixed workload.

Run from the repository root, with RabbitMQ at ``AMQP_URL`` (default: guest on loopback)::

    .venv/bin/python -m bench.affinity [--renderers 3] [--models 20] [--jobs 100] \
        [--load-seconds 0.3] [--step-seconds 0.01] [--bound 30] [--rate 20] [--rounds 3]

``--renderers`` renderers (in this process, on RabbitMQ) each drive their own emulated
ComfyUI that holds one checkpoint at a time and takes ``--load-seconds`` to load
another (``tests/fixtures/fleet.py``); a render is 4 steps of ``--step-seconds``.
``--jobs`` jobs spread over ``--models`` checkpoints in a shuffled order are admitted
through the frontend (fair release, ledger) either all at once (*burst*) or at
``--rate`` jobs per second (*trickle*), with affinity (``AMQP_AFFINITY_WAIT_SECONDS=
--bound``) and without (FIFO: every job to the lane's queue). Images go to a local
folder (the store is not what is measured). Rounds run every case in turn, so they share
the machine's moods.

Reported per case, medians over rounds: model loads, beside the offline optimum (each
model loaded once); how long jobs waited from their admission to their start (p50,
p99, max: fair release's time in the ledger included); and the run time, first
admission to last success.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
import uuid
from pathlib import Path

from bench.common import percentile, quiet_logs
from jobs.broker import Broker
from jobs.rabbitmq import RabbitBroker
from jobs.topology import build_topology
from storage.local import LocalStore
from tests.emulators.comfyui import ComfyUIEmulator
from tests.fixtures.fleet import FRONTEND, fleet, model_names, offline_optimum, workload
from tests.fixtures.rabbitmq import delete_topology

URL = os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")


async def one_run(
    args: argparse.Namespace, affinity: bool, arrival: str, seed: int, folder: Path
) -> dict[str, float]:
    models = model_names(args.models)
    chosen = workload(args.jobs, models, seed)
    topology = build_topology(
        prefix=f"bench-affinity-{uuid.uuid4().hex[:8]}",
        delivery_limit=2,
        affinity_wait_ms=round(args.bound * 1000) if affinity else 0,
    )
    emulators = []
    for _ in range(args.renderers):
        emulator = ComfyUIEmulator(
            model_load_seconds=args.load_seconds,
            step_seconds=args.step_seconds,
            checkpoints=models,
        )
        emulator.preview_method = "none"
        emulator.resident_models = 1
        await emulator.start()
        emulators.append(emulator)
    brokers: list[Broker] = []

    async def connect(name: str) -> Broker:
        broker = RabbitBroker(URL, topology, name=name)
        await broker.connect()
        brokers.append(broker)
        return broker

    store = LocalStore(folder / "images")
    await store.start()
    try:
        async with fleet(connect, store, emulators, folder / "ledger.db") as run:
            began = time.monotonic()
            if arrival == "burst":
                await asyncio.gather(
                    *(run.submit(n, model, f"u{n % 4}") for n, model in enumerate(chosen))
                )
            else:
                for n, model in enumerate(chosen):
                    await run.submit(n, model, f"u{n % 4}")
                    await asyncio.sleep(1 / args.rate)
            await run.finish(len(chosen), timeout=600)
            ended = time.monotonic()
            waits = sorted((await run.waits("created_at")).values())
            failed = sum(1 for event in run.done.values() if event.type.value != "succeeded")
            if failed:
                raise SystemExit(f"{failed} jobs failed")
            return {
                "loads": float(run.loads),
                "optimum": float(offline_optimum(chosen)),
                "wait_p50": statistics.median(waits),
                "wait_p99": percentile(waits, 99),
                "wait_max": waits[-1],
                "seconds": ended - began,
            }
    finally:
        for broker in reversed(brokers):
            await broker.close()
        await store.close()
        for emulator in emulators:
            await emulator.stop()
        extra = [topology.events_queue(FRONTEND).name]
        extra += [topology.model_queue(lane, m).name for lane in topology.lanes for m in models]
        await delete_topology(URL, topology, extra)


async def main(args: argparse.Namespace) -> None:
    os.environ["FAIR_RELEASE_SECONDS"] = "0.2"
    for limit in ("CONCURRENT_PER_USER", "PENDING_PER_TENANT", "IMAGES_PER_USER_PER_DAY"):
        os.environ[f"QUOTA_{limit}"] = "100000"
    cases = [(arrival, mode) for arrival in ("burst", "trickle") for mode in ("affinity", "fifo")]
    runs: dict[tuple[str, str], list[dict[str, float]]] = {case: [] for case in cases}
    for round_ in range(args.rounds):
        for arrival, mode in cases:
            with tempfile.TemporaryDirectory() as folder:
                result = await one_run(args, mode == "affinity", arrival, round_, Path(folder))
                runs[(arrival, mode)].append(result)
    print(
        f"{args.jobs} jobs over {args.models} models, {args.renderers} renderers, load "
        f"{args.load_seconds} s, bound {args.bound} s, trickle {args.rate}/s; "
        f"medians of {args.rounds} rounds"
    )
    print(f"{'':18} {'loads':>6} {'optimum':>8} {'wait p50':>9} {'p99':>7} {'max':>7} {'run':>8}")
    for (arrival, mode), results in runs.items():

        def median(key: str, results: list[dict[str, float]] = results) -> float:
            return statistics.median(r[key] for r in results)

        print(
            f"{arrival + ' ' + mode:18} {median('loads'):6.0f} {median('optimum'):8.0f} "
            f"{median('wait_p50'):8.2f}s {median('wait_p99'):6.2f}s {median('wait_max'):6.2f}s "
            f"{median('seconds'):7.2f}s"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--renderers", type=int, default=3)
    parser.add_argument("--models", type=int, default=20)
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--load-seconds", type=float, default=0.3)
    parser.add_argument("--step-seconds", type=float, default=0.01)
    parser.add_argument("--bound", type=float, default=30.0)
    parser.add_argument("--rate", type=float, default=20.0)
    parser.add_argument("--rounds", type=int, default=3)
    quiet_logs()
    asyncio.run(main(parser.parse_args()))
