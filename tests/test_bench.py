"""Smoke tests of the benchmarks in ``bench/``: each runs with tiny parameters, as a
process of its own (as a person runs it), and prints a well-formed table. No figure is
checked against a threshold: these machines are shared and noisy."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench.common import percentile, summary_ms

ROOT = Path(__file__).resolve().parent.parent
NUMBER = r"(-?\d+(?:\.\d+)?|nan)"

pytestmark = [pytest.mark.rabbitmq, pytest.mark.s3, pytest.mark.timeout(240)]


def run_bench(module: str, amqp_url: str, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        env={**os.environ, "AMQP_URL": amqp_url},
        capture_output=True,
        text=True,
        timeout=220,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_preview_latency(amqp_url: str) -> None:
    out = run_bench(
        "bench.preview_latency",
        amqp_url,
        *("--jobs", "1", "--rounds", "1", "--steps", "6", "--step-seconds", "0.05"),
    )
    rows = re.findall(
        rf"^  ([\d.]+) s\s+(\d+)\s+(\d+)\s+(\d+)\s+(-?\d+)\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}",
        out,
        re.MULTILINE,
    )
    assert [row[0] for row in rows] == ["1.5", "0"], out
    for _, frames, forwarded, shown, coalesced, *_ in rows:
        assert int(frames) >= int(forwarded) >= int(shown), out
        assert int(coalesced) == int(forwarded) - int(shown), out
    assert "0 failed" in out


def test_scaleout(amqp_url: str) -> None:
    out = run_bench(
        "bench.scaleout",
        amqp_url,
        *("--counts", "1", "2", "--jobs-per-renderer", "2", "--rounds", "1"),
        *("--step-seconds", "0.05"),
    )
    rows = re.findall(rf"^\s+(\d+)\s+{NUMBER}\s+{NUMBER}\s+\(", out, re.MULTILINE)
    assert [row[0] for row in rows] == ["1", "2"], out
    assert float(rows[0][2]) == pytest.approx(1.0), out
    assert float(rows[1][1]) > 0, out


def test_memory(amqp_url: str) -> None:
    out = run_bench("bench.memory", amqp_url, "--jobs", "2")
    rows = {
        name: (float(idle), float(peak))
        for name, idle, peak in re.findall(
            rf"^  brigade (\w+)\s+{NUMBER}\s+{NUMBER}$", out, re.MULTILINE
        )
    }
    assert set(rows) == {"bot", "api", "renderer"}, out
    for idle, peak in rows.values():
        assert 0 < idle <= peak, out
    assert "torch mapped in none of them" in out
    assert "(0 not succeeded)" in out


def test_chaos(amqp_url: str) -> None:
    out = run_bench("bench.chaos", amqp_url, "--kills", "2", "--renderers", "2")
    figures = dict(re.findall(r"^  (\S.*?)\s{2,}(\S.*)$", out, re.MULTILINE))
    assert figures["kill -9 of a renderer mid-job"] == "2", out
    assert figures["lost (no terminal event)"] == "0", out
    assert figures["lost (not terminal in the ledger)"] == "0", out
    assert figures["terminal events seen twice by listeners"] == "0", out
    assert int(figures["jobs ended"]) == int(figures["jobs admitted"]) > 0, out
    assert int(figures["orphaned prompts, rendered for nobody"]) >= 0, out
    assert int(figures["orphaned prompts, stopped part way"]) >= 0, out
    assert re.fullmatch(rf"{NUMBER} s", figures["GPU time of orphaned prompts"]), out


def test_admission(amqp_url: str) -> None:
    out = run_bench(
        "bench.admission",
        amqp_url,
        *("--jobs", "20", "--rounds", "2", "--concurrency", "4", "--ceiling", "--served", "30"),
        "--lag",
    )
    raw = re.search(rf"^raw confirmed publish: median\s+{NUMBER} msg/s", out, re.MULTILINE)
    admitted = re.search(rf"^admission\s+: median\s+{NUMBER} jobs/s", out, re.MULTILINE)
    assert raw is not None and admitted is not None, out
    assert float(raw.group(1)) > 0 and float(admitted.group(1)) > 0, out
    rounds = re.search(r"^ratio per round\s+: median [\d.]+ \(rounds: ([\d., ]+)\)", out, re.M)
    assert rounds is not None and len(rounds.group(1).split(", ")) == 2, out
    ceiling = re.search(rf"^ceiling .*: median {NUMBER} jobs/s, ratio per round median", out, re.M)
    assert ceiling is not None and float(ceiling.group(1)) > 0, out
    for side in ("raw", "admission"):
        cpu = re.search(
            rf"^CPU per job, {side}\s*: {NUMBER} ms in all, {NUMBER} ms on the loop$", out, re.M
        )
        assert cpu is not None and float(cpu.group(1)) >= float(cpu.group(2)) > 0, out
        lag = re.search(
            rf"^loop lag, {side}\s*: median\s+{NUMBER} ms, p99\s+{NUMBER} ms, "
            rf"longest\s+{NUMBER} ms \((\d+) ticks\)$",
            out,
            re.M,
        )
        assert lag is not None, out
        assert float(lag.group(1)) <= float(lag.group(2)) <= float(lag.group(3)), out
        assert int(lag.group(4)) > 0, out


@pytest.mark.parametrize("per_model", [False, True])
def test_backlog(amqp_url: str, per_model: bool) -> None:
    out = run_bench(
        "bench.backlog",
        amqp_url,
        *("--backlogs", "0,50", "--samples", "10"),
        *(["--per-model"] if per_model else []),
    )
    rows = re.findall(
        rf"^(?:backlog\s+(\d+):|\s+) (admit|release|position|again)\s+median\s+{NUMBER} ms, "
        rf"p90\s+{NUMBER} ms, longest\s+{NUMBER} ms"
        rf"(?:; the loop ran up to {NUMBER} ms late)?$",
        out,
        re.MULTILINE,
    )
    steps = [("admit", True), ("release", False), ("position", False), ("again", False)]
    assert [(backlog, step) for backlog, step, *_ in rows] == [
        (backlog if at == 0 else "", step)
        for backlog in ("0", "50")
        for at, (step, _) in enumerate(steps)
    ], out
    assert all(
        0 < float(median) <= float(p90) <= float(longest) for _, _, median, p90, longest, _ in rows
    ), out
    assert [late != "" for *_, late in rows] == [lag for _, lag in steps] * 2, out


def test_positions(amqp_url: str) -> None:
    """Past 500 held jobs an order answers for a while (``POSITION_EXACT_HELD``): 600
    takes that path, 20 the exact one."""
    out = run_bench(
        "bench.positions",
        amqp_url,
        *("--backlogs", "20,600", "--seconds", "2", "--every", "1"),
    )
    rows = re.findall(
        rf"^(?:backlog\s+(\d+):|\s+) (admit|release|position|first)\s+median\s+{NUMBER} ms, "
        rf"p99\s+{NUMBER} ms, longest\s+{NUMBER} ms",
        out,
        re.MULTILINE,
    )
    steps = ["admit", "release", "position", "first"]
    assert [(backlog, step) for backlog, step, *_ in rows] == [
        (backlog if at == 0 else "", step)
        for backlog in ("20", "600")
        for at, step in enumerate(steps)
    ], out
    assert all(0 <= float(a) <= float(b) <= float(c) for *_, a, b, c in rows), out
    answered = re.findall(r"positions answered (\d+) of about (\d+) asked", out)
    assert len(answered) == 2 and all(int(n) > 0 for n, _ in answered), out


def test_affinity(amqp_url: str) -> None:
    out = run_bench(
        "bench.affinity",
        amqp_url,
        *("--renderers", "2", "--models", "3", "--jobs", "6", "--rounds", "1"),
        *("--load-seconds", "0.05", "--rate", "50"),
    )
    rows = re.findall(
        rf"^(burst|trickle) (affinity|fifo)\s+(\d+)\s+(\d+)\s+{NUMBER}s\s+{NUMBER}s\s+{NUMBER}s"
        rf"\s+{NUMBER}s$",
        out,
        re.MULTILINE,
    )
    assert [(arrival, mode) for arrival, mode, *_ in rows] == [
        ("burst", "affinity"),
        ("burst", "fifo"),
        ("trickle", "affinity"),
        ("trickle", "fifo"),
    ], out
    for _, _, loads, optimum, *_ in rows:
        assert int(loads) >= int(optimum) == 3, out


def test_idle_polling(amqp_url: str) -> None:
    out = run_bench(
        "bench.idle_polling", amqp_url, *("--renderers", "2", "--models", "3"), *("--seconds", "1")
    )
    found = re.search(
        rf"^2 idle renderers, 3 models, 1 s .*: (\d+) queue inspections, {NUMBER} per renderer",
        out,
        re.MULTILINE,
    )
    assert found is not None and int(found.group(1)) >= 2 * 3, out  # each looked once at least


def test_percentile_interpolates_between_ranks() -> None:
    assert percentile([3.0], 99) == 3.0
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 90) == pytest.approx(4.6)
    assert percentile([1.0, 2.0], 100) == 2.0
    assert summary_ms([]) == "none"
    assert summary_ms([0.001, 0.002, 0.004], 90) == (
        "median    2.00 ms, p90     3.60 ms, longest     4.00 ms"
    )
