"""Backends are plug-ins: ``brigade.backends`` entry points naming a factory
``create(settings: RendererSettings) -> Backend``. See :mod:`renderer.backends.base`."""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from renderer.backends.base import Backend
    from renderer.settings import RendererSettings

ENTRY_POINT_GROUP = "brigade.backends"


class UnknownBackend(LookupError):
    """No installed distribution provides a backend of that name."""


def available_backends() -> list[str]:
    return sorted({ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)})


def load_backend(name: str, settings: RendererSettings) -> Backend:
    """Build the backend ``name`` from its entry point (import happens only here)."""
    matches = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == name]
    if not matches:
        installed = ", ".join(available_backends()) or "none"
        raise UnknownBackend(
            f"no renderer backend named {name!r} is installed (installed: {installed})"
        )
    factory = matches[0].load()
    backend: Backend = factory(settings)
    return backend
