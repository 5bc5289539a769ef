"""The fair release order (jobs/fairness.py) on its own, and through the ledger."""

from __future__ import annotations

from jobs.fairness import Tags, Waiting, fair_order

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
