"""The fair release order (jobs/fairness.py) on its own, and through the ledger."""

from __future__ import annotations

from collections import deque

from hypothesis import given, settings
from hypothesis import strategies as st

from jobs.fairness import (
    Clocks,
    Held,
    Tags,
    Waiting,
    _as_released,
    _one_by_one,
    _with_heaps,
    fair_order,
    release_sequence,
)

NONE = Tags(0, {}, {}, {})


def _jobs(spec: list[tuple[str, str, int]]) -> list[Waiting]:
    """(tenant, user, how many) in submission order."""
    jobs = []
    moment = 0
    for tenant, user, count in spec:
        for n in range(count):
            moment += 1
            jobs.append(Waiting(f"{user}-{n + 1}", tenant, user, f"2026-11-27T00:00:{moment:06d}"))
    return jobs


def test_a_heavy_user_waits_behind_everyone_elses_first_job() -> None:
    others = [(guild, f"{guild}{n}", 2) for guild in ("a", "b", "c") for n in range(3)]
    jobs = _jobs([("a", "heavy", 50), *others])

    order = [r.job_id for r in fair_order(jobs, NONE)]

    sixth = order.index("heavy-6")
    second = order.index("heavy-2")
    for _, user, _ in others:
        assert order.index(f"{user}-1") < second
        assert order.index(f"{user}-2") < sixth
    assert len(order) == len(jobs) == len(set(order))


def test_guilds_take_turns_then_users_within_each() -> None:
    jobs = _jobs([("a", "a1", 3), ("a", "a2", 3), ("b", "b1", 3)])

    order = [r.job_id for r in fair_order(jobs, NONE)]

    # b is one guild with one user: it gets every other turn
    assert order[:6] == ["a1-1", "b1-1", "a2-1", "b1-2", "a1-2", "b1-3"]
    assert order[6:] == ["a2-2", "a1-3", "a2-3"]


def test_an_idle_tenant_comes_back_without_saved_up_credit() -> None:
    # 'a' was served 100 rounds while 'b' was away; 'b' gets one turn per round now,
    # not a hundred in a row.
    tags = Tags(100, {"a": 100}, {"a": 100}, {("a", "a1"): 100})
    jobs = _jobs([("a", "a1", 3), ("b", "b1", 3)])

    order = fair_order(jobs, tags)

    assert [r.job_id for r in order] == ["b1-1", "a1-1", "b1-2", "a1-2", "b1-3", "a1-3"]
    assert order[0].tenant_tag == 101


def test_limit_and_until_agree_with_the_full_order() -> None:
    jobs = _jobs([("a", "x", 5), ("a", "y", 2), ("b", "z", 4)])
    full = fair_order(jobs, NONE)

    assert fair_order(jobs, NONE, limit=4) == full[:4]
    for index, release in enumerate(full):
        assert fair_order(jobs, NONE, until=release.job_id) == full[: index + 1]


@st.composite
def _orders(draw: st.DrawFn) -> tuple[list[Waiting], Tags, int | None, str | None]:
    """Jobs of a few tenants and users, made at few distinct moments (exact ties), any
    tags (releases leave no last tag past its clock; these need not hold to that), and
    a limit or an ``until``."""
    tenants, users = ["a", "b", "c", "d"], ["u0", "u1", "u2", "u3", "u4"]
    jobs = [
        Waiting(
            f"j{n}",
            draw(st.sampled_from(tenants)),
            draw(st.sampled_from(users)),
            f"2026-11-27T00:00:{draw(st.integers(0, 30)):06d}",
        )
        for n in range(draw(st.integers(0, 40)))
    ]
    tag = st.integers(0, 30)
    tags = Tags(
        draw(tag),
        draw(st.dictionaries(st.sampled_from(tenants), tag)),
        draw(st.dictionaries(st.sampled_from(tenants), tag)),
        draw(st.dictionaries(st.tuples(st.sampled_from(tenants), st.sampled_from(users)), tag)),
    )
    limit = draw(st.one_of(st.none(), st.integers(1, 10)))
    until = draw(st.one_of(st.none(), st.sampled_from([job.job_id for job in jobs] or ["none"])))
    return jobs, tags, limit, until


def _held(jobs: list[Waiting]) -> Held:
    held: Held = {}
    for job in sorted(jobs, key=lambda j: (j.created_at, j.job_id)):
        held.setdefault(job.tenant, {}).setdefault(job.user, deque()).append(job)
    return held


@settings(max_examples=500, deadline=None, database=None)
@given(_orders())
def test_the_heaps_give_the_order_of_choosing_among_everyone(
    case: tuple[list[Waiting], Tags, int | None, str | None],
) -> None:
    """``fair_order`` without room uses heaps; it must give what choosing among every
    tenant and user for each release gives (the tags too), ties included."""
    jobs, tags, limit, until = case
    fast = _with_heaps(_held(jobs), tags, limit, until)
    assert fast == _one_by_one(_held(jobs), tags, limit, until, None)
    assert fair_order(jobs, tags, limit=limit, until=until) == fast


@st.composite
def _released_tags(draw: st.DrawFn) -> tuple[list[Waiting], Tags]:
    """Jobs as :func:`_orders` draws them, and the tags some earlier releases of those
    tenants' and users' jobs (and others') left: as a ledger holds them."""
    jobs, _, _, _ = draw(_orders())
    clocks = Clocks(NONE)
    served = st.tuples(
        st.sampled_from(["a", "b", "c", "d", "e"]), st.sampled_from(["u0", "u1", "u2", "u3", "u5"])
    )
    for n, (tenant, user) in enumerate(draw(st.lists(served, max_size=30))):
        clocks.release(f"gone{n}", tenant, user)
    return jobs, Tags(clocks.lane_clock, clocks.tenant_last, clocks.tenant_clock, clocks.user_last)


@settings(max_examples=500, deadline=None, database=None)
@given(_released_tags())
def test_the_turns_give_the_order_of_the_heaps(case: tuple[list[Waiting], Tags]) -> None:
    """With tags as releases leave them, ``release_sequence`` lets tenants and users take
    turns: the jobs must come in the order ``fair_order`` releases them, ties included."""
    jobs, tags = case
    assert _as_released(_held(jobs), tags)
    expected = [release.job_id for release in fair_order(jobs, tags)]
    assert [job.job_id for job in release_sequence(jobs, tags)] == expected


@settings(max_examples=300, deadline=None, database=None)
@given(_orders())
def test_the_sequence_follows_the_heaps_with_any_tags(
    case: tuple[list[Waiting], Tags, int | None, str | None],
) -> None:
    """Tags no releases could leave (a last tag past its clock) take the heaps' way: the
    same order still."""
    jobs, tags, _, _ = case
    expected = [release.job_id for release in fair_order(jobs, tags)]
    assert [job.job_id for job in release_sequence(jobs, tags)] == expected
