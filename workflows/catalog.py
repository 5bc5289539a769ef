"""The catalog: every template this deployment offers, by name.

Built-in templates ship in ``workflows/templates/``; operators add or replace templates
with extra directories (later directories win over earlier ones and over the built-ins,
by manifest name). Loading is all-or-nothing: one broken template fails start-up with a
:class:`ManifestError` rather than quietly disappearing from the list.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from workflows.exceptions import ManifestError, UnknownWorkflow
from workflows.template import Template

BUILTIN_DIR = Path(__file__).parent / "templates"
MANIFEST_GLOB = "*.manifest.json"

log = logging.getLogger(__name__)


class Catalog:
    """Templates by name. Build it with :meth:`load`; it does not change afterwards."""

    def __init__(self, templates: Mapping[str, Template]) -> None:
        self._templates = dict(sorted(templates.items()))

    @classmethod
    def load(cls, extra_dirs: Sequence[Path] = ()) -> Catalog:
        """Load the built-in templates, then each of ``extra_dirs`` in order.

        A template in a later directory replaces one of the same name from an earlier
        one (logged as ``workflow.overridden``). Raises :class:`ManifestError` for a
        broken template, a missing directory, or two manifests with one name in one
        directory.
        """
        templates: dict[str, Template] = {}
        for directory in (BUILTIN_DIR, *extra_dirs):
            for name, template in load_dir(directory).items():
                replaced = templates.get(name)
                if replaced is not None:
                    log.info(
                        "workflow.overridden name=%s source=%s replaced=%s",
                        name,
                        template.source,
                        replaced.source,
                    )
                templates[name] = template
        return cls(templates)

    def get(self, name: str) -> Template:
        """Return the template called ``name``; raises :class:`UnknownWorkflow` listing names."""
        try:
            return self._templates[name]
        except KeyError:
            raise UnknownWorkflow(name, self._templates) from None

    def names(self) -> list[str]:
        """Every workflow name, sorted."""
        return list(self._templates)

    def __iter__(self) -> Iterator[Template]:
        return iter(self._templates.values())

    def __contains__(self, name: object) -> bool:
        return name in self._templates

    def __len__(self) -> int:
        return len(self._templates)


def load_dir(directory: Path) -> dict[str, Template]:
    """Load every ``*.manifest.json`` in ``directory`` (not its subdirectories), by name."""
    if not directory.is_dir():
        raise ManifestError(directory, "not a directory of workflow templates")
    found: dict[str, Template] = {}
    for path in sorted(directory.glob(MANIFEST_GLOB)):
        template = Template.load(path)
        other = found.get(template.name)
        if other is not None:
            raise ManifestError(
                path, f'workflow name "{template.name}" is also used by {other.source.name}'
            )
        found[template.name] = template
    return found
