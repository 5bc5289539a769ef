"""Errors raised by the workflows package, all under :class:`WorkflowError`.

Two kinds matter to callers: :class:`ParameterError` is the user's fault (show them its
messages) and :class:`ManifestError` is the operator's (a template on disk is broken;
fail at start-up). :class:`UnknownWorkflow` is the user's
fault too, and lists what exists.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path


class WorkflowError(Exception):
    """Base of every error this package raises."""


class UnknownWorkflow(WorkflowError):
    """No template has this name; the message lists the names that exist."""

    def __init__(self, name: str, available: Iterable[str]) -> None:
        self.name = name
        self.available = tuple(sorted(available))
        listed = ", ".join(self.available) if self.available else "none"
        super().__init__(f'unknown workflow "{name}" (available: {listed})')

    def __reduce__(self) -> tuple[type[UnknownWorkflow], tuple[str, tuple[str, ...]]]:
        return (type(self), (self.name, self.available))


class ManifestError(WorkflowError):
    """A template or its manifest is broken: says which file, which parameter, what is wrong."""

    def __init__(self, source: Path | str | None, reason: str, param: str | None = None) -> None:
        self.source = Path(source) if source is not None else None
        self.param = param
        self.reason = reason
        where = f"{self.source}: " if self.source is not None else ""
        which = f'parameter "{param}": ' if param is not None else ""
        super().__init__(f"{where}{which}{reason}")

    def __reduce__(self) -> tuple[type[ManifestError], tuple[Path | None, str, str | None]]:
        return (type(self), (self.source, self.reason, self.param))


@dataclass(frozen=True)
class FieldError:
    """One rejected parameter: ``message`` names the field, the bad value and what is allowed."""

    field: str
    message: str


class ParameterError(WorkflowError):
    """A job's parameters do not fit the workflow's manifest; carries every problem found."""

    def __init__(self, errors: Sequence[FieldError]) -> None:
        self.errors = list(errors)
        super().__init__("; ".join(error.message for error in self.errors))

    def __reduce__(self) -> tuple[type[ParameterError], tuple[list[FieldError]]]:
        return (type(self), (self.errors,))
