"""``jobs/recent.py``: the latest ids, the oldest forgotten first."""

from __future__ import annotations

from jobs.recent import RecentIds


def test_keeps_the_latest_and_forgets_the_oldest_first() -> None:
    recent = RecentIds(3)
    for key in ("a", "b", "c"):
        recent.add(key)
    recent.add("a")  # the newest again: "b" is now the oldest
    recent.add("d")

    assert len(recent) == 3
    assert [key in recent for key in ("a", "b", "c", "d")] == [True, False, True, True]
    recent.discard("c")
    recent.discard("never")
    assert "c" not in recent and len(recent) == 2
