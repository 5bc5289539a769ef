"""Render errors, classified once.

Every failure a backend can meet is one of these. ``TransientRenderError`` means "try
again, maybe elsewhere" (the worker requeues the job, bounded by the queue's delivery
limit); ``PermanentRenderError`` means "this job will never render" (the worker fails it
now and tells the user). ``reason`` is the wire value of ``jobs.models.FailureReason``
and ``user_message`` is safe to show a user.
"""

from __future__ import annotations

from jobs.models import FailureReason


class RenderError(Exception):
    """Base of every error a backend raises on purpose."""

    reason: FailureReason = FailureReason.INTERNAL
    transient: bool = False

    def __init__(self, user_message: str, *, detail: str | None = None) -> None:
        super().__init__(detail or user_message)
        self.user_message = user_message


class TransientRenderError(RenderError):
    """Worth another attempt: the backend was down, busy or out of memory for a moment."""

    transient = True


class PermanentRenderError(RenderError):
    """No attempt will ever succeed: the graph is invalid, or the job was cancelled."""


class BackendUnavailable(TransientRenderError):
    reason = FailureReason.BACKEND_DOWN


class OutOfMemory(TransientRenderError):
    reason = FailureReason.OOM


class RenderTimeout(TransientRenderError):
    reason = FailureReason.TIMEOUT


class InvalidWorkflow(PermanentRenderError):
    reason = FailureReason.INVALID


class RenderCancelled(PermanentRenderError):
    reason = FailureReason.CANCELLED


class OutOfMemoryExhausted(PermanentRenderError):
    """Out of memory again after the backend freed what it could and retried once: the
    job fails now instead of going round the GPUs (a smaller job may fit)."""

    reason = FailureReason.OOM
