"""Errors of ``jobs/``, classified once: transient (retry, bounded) or permanent (tell the user)."""

from __future__ import annotations

from collections.abc import Sequence

from workflows.exceptions import FieldError


class JobsError(Exception):
    """Base of every error ``jobs/`` raises on purpose."""


class TransientError(JobsError):
    """The same call may succeed later: retry with backoff, a bounded number of times."""


class PermanentError(JobsError):
    """The same call will fail again: report it, do not retry."""


class BrokerUnavailable(TransientError):
    """The broker could not be reached, or did not confirm a publish in time."""


class Unroutable(PermanentError):
    """A mandatory publish matched no queue: the topology is not declared, or a name is wrong."""


class JobNotFound(PermanentError):
    """No job with that id (or idempotency key) is in the ledger."""


class InvalidRequest(PermanentError):
    """A request failed validation. ``errors`` name each field and what is allowed there."""

    def __init__(self, errors: Sequence[FieldError]) -> None:
        self.errors = list(errors)
        super().__init__("; ".join(e.message for e in self.errors))
