"""ComfyUI API-format templates, their parameter manifests, and binding jobs into them.

Load once at start-up, then resolve a job's values and bind them::

    catalog = Catalog.load(extra_dirs)
    template = catalog.get("sd15-txt2img")
    params = template.resolve({"prompt": "a red cube", "width": 768})
    graph = template.bind(params)

Imports nothing else of Brigade's: only the standard library and pydantic.
"""

from __future__ import annotations

from workflows.catalog import Catalog
from workflows.exceptions import (
    FieldError,
    ManifestError,
    ParameterError,
    UnknownWorkflow,
    WorkflowError,
)
from workflows.manifest import Binding, Manifest, Parameter, Scalar
from workflows.template import Template

__all__ = [
    "Binding",
    "Catalog",
    "FieldError",
    "Manifest",
    "ManifestError",
    "Parameter",
    "ParameterError",
    "Scalar",
    "Template",
    "UnknownWorkflow",
    "WorkflowError",
]
