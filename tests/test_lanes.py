"""The worker's lane choice: weights, no starvation, no burst after idling."""

from __future__ import annotations

import asyncio

from renderer.lanes import LaneScheduler


async def _order(scheduler: LaneScheduler, backlog: dict[str, int]) -> list[str]:
    """Start every delivery of ``backlog`` at once; the order in which they got a slot."""
    started: list[str] = []
    gate = asyncio.Event()

    async def job(lane: str) -> None:
        async with scheduler.turn(lane):
            started.append(lane)
            await gate.wait()

    tasks = [asyncio.create_task(job(lane)) for lane, n in backlog.items() for _ in range(n)]
    for _ in range(sum(backlog.values())):
        await asyncio.sleep(0)
    while len(started) < len(tasks):
        gate.set()
        gate.clear()
        await asyncio.sleep(0)
    gate.set()
    await asyncio.gather(*tasks)
    return started


async def test_a_freed_slot_goes_by_weight_spread_out() -> None:
    scheduler = LaneScheduler(["fast", "relax"], {"fast": 4, "relax": 1}, slots=1)

    order = await _order(scheduler, {"fast": 12, "relax": 12})

    first_ten = order[:10]
    assert first_ten.count("fast") == 8 and first_ten.count("relax") == 2
    # relax is never more than four fast jobs away while both wait
    gaps = [i for i, lane in enumerate(order[:15]) if lane == "relax"]
    assert all(b - a <= 5 for a, b in zip([-1, *gaps], gaps, strict=False))
    assert sorted(order) == sorted(["fast"] * 12 + ["relax"] * 12)


async def test_one_lane_alone_uses_every_slot() -> None:
    scheduler = LaneScheduler(["fast", "relax"], {"fast": 4, "relax": 1}, slots=2)
    running = 0
    most = 0

    async def job() -> None:
        nonlocal running, most
        async with scheduler.turn("relax"):
            running += 1
            most = max(most, running)
            await asyncio.sleep(0.01)
            running -= 1

    await asyncio.gather(*(job() for _ in range(6)))

    assert most == 2


async def test_a_cancelled_waiter_gives_its_place_back() -> None:
    scheduler = LaneScheduler(["fast"], {}, slots=1)
    hold = asyncio.Event()

    async def holder() -> None:
        async with scheduler.turn("fast"):
            await hold.wait()

    first = asyncio.create_task(holder())
    await asyncio.sleep(0)
    waiter = asyncio.create_task(holder())
    await asyncio.sleep(0)
    waiter.cancel()
    await asyncio.gather(waiter, return_exceptions=True)
    assert scheduler.waiting == 0
    hold.set()
    await first
    async with asyncio.timeout(1), scheduler.turn("fast"):
        pass  # the slot is free again
