"""Shared fixtures. Service fixtures live in ``tests/fixtures/`` and are plugged in here."""

from __future__ import annotations

pytest_plugins = [
    "tests.fixtures.rabbitmq",
    "tests.fixtures.brokers",
    "tests.fixtures.s3server",
    "tests.fixtures.comfyui",
    "tests.fixtures.discord",
    "tests.fixtures.tcpproxy",
    "tests.fixtures.pipeline",
    "tests.fixtures.faults",
    "tests.fixtures.ledger",
]
