"""Model affinity's decision (jobs/affinity.py), measured by simulation: renderers with
one model resident at a time, a fixed render time and a fixed load time, a backlog of
jobs for several models; model loads against the offline optimum and against taking
jobs in arrival order, and the longest wait against the bound."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import pytest

from jobs.affinity import Candidate, choose

RENDER = 1.0
LOAD = 5.0


@dataclass
class Outcome:
    loads: int
    waits: dict[str, float]
    makespan: float


def simulate(
    models: Sequence[str | None],
    renderers: int,
    *,
    bound: float,
    affinity: bool = True,
    arrivals: Sequence[float] | None = None,
) -> Outcome:
    """Jobs arrive (all at 0 unless ``arrivals`` says), in fair order; each renderer,
    when free, takes what :func:`choose` says (or the first job, without affinity),
    loading its model first when it has another one resident. Waits are measured from
    arrival to the moment a renderer takes the job."""
    times = list(arrivals) if arrivals is not None else [0.0] * len(models)
    pending = [(times[n], f"j{n}", model) for n, model in enumerate(models)]
    free_at = [0.0] * renderers
    loaded: list[str | None] = [None] * renderers
    loads = 0
    waits: dict[str, float] = {}
    while pending:
        worker = min(range(renderers), key=lambda w: (free_at[w], w))
        now = free_at[worker]
        aged = [Candidate(job, model, now - at) for at, job, model in pending if at <= now]
        elsewhere = Counter(m for w, m in enumerate(loaded) if w != worker and m is not None)
        pick: Candidate | None = None
        if aged:
            if affinity:
                pick = choose(aged, loaded[worker], elsewhere, bound=bound, render_seconds=RENDER)
            else:
                pick = aged[0]
        if pick is None:  # idle until a renderer frees up, a job arrives or one turns late
            later = [t for t in free_at if t > now] + [at for at, _, _ in pending if at > now]
            later += [at + bound for at, _, _ in pending if at + bound > now]
            free_at[worker] = min(later) if later else now + RENDER
            continue
        arrived = next(at for at, job, _ in pending if job == pick.job_id)
        waits[pick.job_id] = now - arrived
        pending = [p for p in pending if p[1] != pick.job_id]
        start = now
        if pick.model is not None and pick.model != loaded[worker]:
            loads += 1
            loaded[worker] = pick.model
            start += LOAD
        free_at[worker] = start + RENDER
    return Outcome(loads, waits, max(free_at))


def backlog(seed: int, counts: dict[str, int]) -> list[str | None]:
    jobs: list[str | None] = [model for model, n in counts.items() for _ in range(n)]
    random.Random(seed).shuffle(jobs)
    return jobs


def test_a_mixed_backlog_loads_each_model_once() -> None:
    jobs = backlog(1, {"a.safetensors": 10, "b.safetensors": 10, "c.safetensors": 10, "d": 10})
    optimum = 4  # each model must be loaded once, and once is enough: 2 renderers, 4 models

    fair = simulate(jobs, 2, bound=600)
    fifo = simulate(jobs, 2, bound=600, affinity=False)

    assert fair.loads <= 1.1 * optimum
    assert fifo.loads > 5 * optimum  # arrival order reloads at nearly every job
    assert fair.makespan < fifo.makespan / 2
    assert max(fair.waits.values()) <= 600


@pytest.mark.parametrize("seed", range(40))
def test_random_backlogs_stay_at_the_optimum_when_the_bound_is_not_reached(seed: int) -> None:
    rng = random.Random(seed)
    renderers = rng.randint(1, 4)
    counts = {f"m{n}": rng.randint(1, 15) for n in range(rng.randint(renderers, 7))}
    jobs = backlog(seed, counts)
    jobs[rng.randrange(len(jobs))] = None  # one job that needs no model
    optimum = len(counts)  # m >= renderers: every model loaded exactly once is possible

    outcome = simulate(jobs, renderers, bound=10_000)

    assert outcome.loads <= 1.1 * optimum
    assert len(outcome.waits) == len(jobs)  # every job ran


def test_a_job_for_a_cold_model_starts_within_the_bound() -> None:
    """Two renderers kept busy by a steady stream for their two models; one job for a
    third model arrives at 5 s. It starts once it reaches the bound, at the next free
    renderer, and no job waits past the bound (plus the render in progress)."""
    jobs: list[str | None] = []
    arrivals: list[float] = []
    for n in range(60):  # 1.6 jobs a second for 2 renderers: busy, not overloaded
        jobs.append("a" if n % 2 == 0 else "b")
        arrivals.append(n / 1.6)
    jobs.append("c")
    arrivals.append(5.0)
    cold = f"j{len(jobs) - 1}"
    bound = 12.0

    outcome = simulate(jobs, 2, bound=bound, arrivals=arrivals)
    without_bound = simulate(jobs, 2, bound=10_000, arrivals=arrivals)

    assert bound <= outcome.waits[cold] <= bound + RENDER + LOAD
    assert without_bound.waits[cold] > bound + RENDER + LOAD  # the bound made it start
    assert max(outcome.waits.values()) <= bound + RENDER + LOAD
    assert outcome.loads <= 4  # a, b, c, and one reload


def test_an_idle_renderer_helps_only_when_a_backlog_would_outlast_the_bound() -> None:
    many = ["a"] * 30 + ["b"]
    assert simulate(many, 2, bound=10_000).loads == 2  # b, then idle: a load buys nothing
    helped = simulate(many, 2, bound=20)  # 30 jobs on one renderer outlast 20 s
    assert helped.loads == 3
    assert helped.makespan < simulate(many, 2, bound=10_000).makespan


def test_choose_prefers_what_is_loaded_then_the_largest_cold_model() -> None:
    waiting = [
        Candidate("1", "b", 1.0),
        Candidate("2", "c", 1.0),
        Candidate("3", "a", 1.0),
        Candidate("4", "c", 1.0),
    ]
    assert choose(waiting, "a", {}, bound=60, render_seconds=1) == waiting[2]
    assert choose(waiting, None, {}, bound=60, render_seconds=1) == waiting[1]  # c: 2 jobs
    assert choose(waiting, None, {"c": 1}, bound=60, render_seconds=1) == waiting[0]
    late = [Candidate("0", "z", 61.0), *waiting]
    assert choose(late, "a", {}, bound=60, render_seconds=1) == late[0]
    assert choose([], "a", {}, bound=60, render_seconds=1) is None
