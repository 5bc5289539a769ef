"""bench/fairness.py runs, and its report is well-formed (no timing is asserted)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from bench.fairness import one_run


async def test_one_small_run_reports_every_figure(tmp_path: Path) -> None:
    before = dict(os.environ)
    args = argparse.Namespace(heavy=8, others=3, each=1, workers=1, render=0.01)

    result = await one_run(args, 2, tmp_path)

    assert set(result) == {"first_wait_median", "first_wait_worst", "heavy_sixth_rank", "seconds"}
    assert 6 <= result["heavy_sixth_rank"] <= 11
    assert dict(os.environ) == before  # the run's settings do not leak
    assert 0 <= result["first_wait_median"] <= result["first_wait_worst"] <= result["seconds"]
