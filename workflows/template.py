"""A template: a ComfyUI API-format graph, its manifest, and binding parameters into it.

Binding is data in, data out: each bound input is a literal in the graph and is replaced
by a typed value. A prompt is never parsed, never becomes a link, never adds or removes a
node or a key; :meth:`Template.bind` re-checks the structure after every bind.

The graph is checked once, at load: API format (not the UI format), every link points at
a node that exists, every binding targets a literal input of a compatible type, every
output node exists. A template that loads can be bound with any resolved parameters.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, cast

from pydantic import ValidationError

from workflows.exceptions import FieldError, ManifestError, ParameterError, WorkflowError
from workflows.manifest import PARAM_NAME, Manifest, Parameter, Scalar, show

MAX_RANDOM_SEED = 2**53 - 1
"""Largest drawn seed: JavaScript clients and Discord integer options stay exact below 2**53."""

_SYSTEM_RANDOM = random.SystemRandom()

_CONTROL = re.compile("[\x00-\x1f\x7f\ud800-\udfff]")

# A node's identity as far as binding is concerned: everything except literal values.
_Shape = tuple[str, str, tuple[str, ...], tuple[str, ...], tuple[tuple[str, str, int], ...]]


@dataclass(frozen=True, eq=False)
class Template:
    """One workflow: its validated manifest, its graph (deep-frozen), and the manifest's path.

    Build it with :meth:`load`. ``graph`` is read-only (mappings and tuples); use
    :meth:`bind` to get a JSON-ready graph to submit.
    """

    manifest: Manifest
    graph: Mapping[str, Any]
    source: Path
    _shape: tuple[_Shape, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "graph", _freeze(self.graph))
        object.__setattr__(self, "_shape", _structure(self.graph))

    @property
    def name(self) -> str:
        """The workflow's name, as jobs and commands refer to it."""
        return self.manifest.name

    @classmethod
    def load(cls, manifest_path: Path) -> Template:
        """Read and check a manifest and the graph it names.

        Raises :class:`ManifestError` naming the file, the parameter and the problem when
        the manifest is invalid, the graph is not API format, or a binding or output
        does not fit the graph.
        """
        manifest = _read_manifest(manifest_path)
        graph_path = manifest_path.parent / manifest.graph
        graph = _read_json(graph_path)
        _check_graph(graph, graph_path)
        _check_bindings(manifest, graph, manifest_path)
        return cls(manifest=manifest, graph=graph, source=manifest_path)

    @classmethod
    def from_documents(cls, manifest: object, graph: object, source: Path) -> Template:
        """The same checks as :meth:`load`, on a manifest and a graph already read (a
        guild's own workflow, or one a job carries). ``source`` names them in errors."""
        if not isinstance(manifest, dict):
            raise ManifestError(source, "a manifest must be a JSON object")
        try:
            checked = Manifest.model_validate(manifest)
        except ValidationError as exc:
            raise _manifest_error(source, exc) from exc
        _check_graph(graph, source)
        assert isinstance(graph, dict)
        _check_bindings(checked, graph, source)
        return cls(manifest=checked, graph=graph, source=source)

    def documents(self) -> dict[str, Any]:
        """The manifest and graph as JSON documents, for :meth:`from_documents`."""
        return {
            "manifest": self.manifest.model_dump(mode="json", exclude_none=True),
            "graph": _thaw(self.graph),
        }

    def resolve(
        self, values: Mapping[str, object], *, rng: random.Random | None = None
    ) -> dict[str, Scalar]:
        """Check a job's values against the manifest and return every parameter resolved.

        Absent values (or ``None``) take the default; a ``random`` parameter with neither
        is drawn from ``rng`` (the system's randomness when not given). Collects every
        problem and raises one :class:`ParameterError` carrying them all.
        """
        params = self.manifest.params
        errors = self._unknown(values)
        resolved: dict[str, Scalar] = {}
        for name, param in params.items():
            value = values.get(name)
            if value is None:
                if param.default is not None:
                    resolved[name] = param.default
                elif param.random:
                    resolved[name] = _draw(param, rng or _SYSTEM_RANDOM)
                elif param.type == "image" and not param.required:
                    pass  # the graph keeps its own image
                else:
                    errors.append(
                        FieldError(
                            name, f"{name}: a value is required (allowed: {param.allowed()})"
                        )
                    )
                continue
            problem = param.check(value)
            if problem is not None:
                errors.append(FieldError(name, f"{name}: {problem} (allowed: {param.allowed()})"))
                continue
            resolved[name] = param.coerce(cast(Scalar, value))
        if errors:
            raise ParameterError(errors)
        return resolved

    def bind(
        self, params: Mapping[str, Scalar], images: Mapping[str, str] | None = None
    ) -> dict[str, Any]:
        """Return a fresh copy of the graph with every parameter written into its bindings.

        ``params`` must be what :meth:`resolve` returned: every parameter (an optional
        ``image`` one may be absent), nothing else, each valid (checked again here,
        because a renderer binds what a queue handed it). ``images`` maps an ``image``
        parameter to the file name its backend gave the uploaded image, which is what
        gets written (without it, the stored key is). Raises :class:`ParameterError`
        otherwise.
        """
        images = images or {}
        errors = self._unknown(params)
        for name in images:
            param = self.manifest.params.get(name)
            if param is None or param.type != "image" or name not in params:
                errors.append(FieldError(name, f"{name}: an uploaded image for no image value"))
            elif not isinstance(images[name], str) or _bad_upload_name(images[name]):
                errors.append(
                    FieldError(name, f"{name}: {show(images[name])} is not a usable file name")
                )
        for name, param in self.manifest.params.items():
            if name not in params:
                if param.type == "image" and not param.required:
                    continue
                errors.append(
                    FieldError(name, f"{name}: missing; bind takes every parameter resolved")
                )
                continue
            problem = param.check(params[name])
            if problem is not None:
                errors.append(FieldError(name, f"{name}: {problem} (allowed: {param.allowed()})"))
        if errors:
            raise ParameterError(errors)

        graph = cast(dict[str, Any], _thaw(self.graph))
        for name, param in self.manifest.params.items():
            if name not in params:
                continue
            value = images.get(name, param.coerce(params[name]))
            for binding in param.bind:
                graph[binding.node]["inputs"][binding.input] = value
        if _structure(graph) != self._shape:
            # Unreachable while bindings only target literals; kept so a future change
            # that breaks that promise fails loudly instead of submitting a rewired graph.
            raise WorkflowError(f'binding changed the structure of workflow "{self.name}"')
        return graph

    def describe(self) -> dict[str, Any]:
        """The workflow and its parameters as JSON-ready data, for listings and help."""
        manifest = self.manifest
        return {
            "name": manifest.name,
            "title": manifest.title,
            "description": manifest.description,
            "backends": list(manifest.backends),
            "lanes": list(manifest.lanes) if manifest.lanes is not None else None,
            "params": {name: _describe(param) for name, param in manifest.params.items()},
        }

    def _unknown(self, values: Mapping[str, object]) -> list[FieldError]:
        params = self.manifest.params
        errors = []
        for key in values:
            if key in params:
                continue
            label = key if isinstance(key, str) and re.fullmatch(PARAM_NAME, key) else show(key)
            errors.append(
                FieldError(
                    label,
                    f'{label}: unknown parameter for workflow "{self.name}"'
                    f" (allowed: {', '.join(params) or 'none'})",
                )
            )
        return errors


def _describe(param: Parameter) -> dict[str, Any]:
    described: dict[str, Any] = {
        "type": param.type,
        "description": param.description,
        "required": param.required,
        "default": param.default,
        "random": param.random,
        "allowed": param.allowed(),
    }
    for key in ("min", "max", "multiple_of", "max_length", "choices"):
        value = getattr(param, key)
        if value is not None:
            described[key] = list(value) if isinstance(value, list) else value
    return described


def _draw(param: Parameter, rng: random.Random) -> int:
    low = int(param.min) if param.min is not None else 0
    high = int(param.max) if param.max is not None else MAX_RANDOM_SEED
    if max(low, 0) <= min(high, MAX_RANDOM_SEED):
        low, high = max(low, 0), min(high, MAX_RANDOM_SEED)
    step = param.multiple_of or 1
    return rng.randint(-(-low // step), high // step) * step


def _read_json(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ManifestError(path, "file not found") from exc
    except UnicodeDecodeError as exc:
        raise ManifestError(path, f"not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except OSError as exc:
        raise ManifestError(path, f"cannot read: {exc.strerror or exc}") from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ManifestError(
            path, f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from exc


def _read_manifest(path: Path) -> Manifest:
    data = _read_json(path)
    if not isinstance(data, dict):
        raise ManifestError(path, "a manifest must be a JSON object")
    try:
        return Manifest.model_validate(data)
    except ValidationError as exc:
        raise _manifest_error(path, exc) from exc


def _manifest_error(path: Path, exc: ValidationError) -> ManifestError:
    found: list[tuple[str | None, str]] = []
    for error in exc.errors(include_url=False):
        loc = [str(part) for part in error["loc"]]
        message = error["msg"].removeprefix("Value error, ")
        param = None
        if len(loc) >= 2 and loc[0] == "params":
            param, loc = loc[1], loc[2:]
            loc = ["name" if part == "[key]" else part for part in loc]
        found.append((param, f"{'.'.join(loc)}: {message}" if loc else message))
    params = {param for param, _ in found}
    if len(params) == 1:
        return ManifestError(path, "; ".join(reason for _, reason in found), params.pop())
    return ManifestError(
        path,
        "; ".join(
            f'parameter "{param}": {reason}' if param is not None else reason
            for param, reason in found
        ),
    )


def _check_graph(graph: object, path: Path) -> None:
    if not isinstance(graph, dict):
        raise ManifestError(path, "a graph must be a JSON object of nodes (ComfyUI API format)")
    if isinstance(graph.get("nodes"), list) and "links" in graph:
        raise ManifestError(path, "this looks like a UI-format workflow; export it with Save (API)")
    if isinstance(graph.get("prompt"), dict) and set(graph) <= {
        "prompt",
        "client_id",
        "prompt_id",
        "extra_data",
        "front",
        "number",
    }:
        raise ManifestError(
            path, 'this looks like a /prompt request body; save only its "prompt" object'
        )
    if not graph:
        raise ManifestError(path, "the graph has no nodes")
    for node_id, node in graph.items():
        if not isinstance(node, dict):
            raise ManifestError(path, f'node "{node_id}" is not a JSON object')
        if not isinstance(node.get("class_type"), str) or not node["class_type"]:
            raise ManifestError(path, f'node "{node_id}" has no class_type string')
        if not isinstance(node.get("inputs"), dict):
            raise ManifestError(path, f'node "{node_id}" has no inputs object')
        for key, value in node["inputs"].items():
            if _is_link(value) and value[0] not in graph:
                raise ManifestError(
                    path,
                    f'node "{node_id}" input "{key}" links to node "{value[0]}",'
                    " which is not in the graph",
                )


def _check_bindings(manifest: Manifest, graph: Mapping[str, Any], path: Path) -> None:
    for name, param in manifest.params.items():
        for binding in param.bind:
            node = graph.get(binding.node)
            if node is None:
                raise ManifestError(
                    path,
                    f'binds node "{binding.node}", which is not in {manifest.graph}'
                    f" (nodes: {', '.join(graph)})",
                    name,
                )
            where = f'input "{binding.input}" of node "{binding.node}" ({node["class_type"]})'
            inputs = node["inputs"]
            if binding.input not in inputs:
                raise ManifestError(
                    path,
                    f"binds {where}, which has no such input (inputs: {', '.join(inputs)})",
                    name,
                )
            value = inputs[binding.input]
            if _is_link(value):
                raise ManifestError(
                    path,
                    f'binds {where}, which is a link to node "{value[0]}";'
                    " only a literal input can be bound",
                    name,
                )
            if not _compatible(param, value):
                raise ManifestError(
                    path,
                    f"binds {where}, which holds {show(value)}, not a {param.type} value",
                    name,
                )
    for output in manifest.outputs:
        if output not in graph:
            raise ManifestError(path, f'output node "{output}" is not in {manifest.graph}')


def _bad_upload_name(name: str) -> bool:
    """A backend's name for an upload is short text with no control characters."""
    return not name or len(name) > 1024 or _CONTROL.search(name) is not None


def _compatible(param: Parameter, value: object) -> bool:
    if param.type in ("string", "choice", "image"):
        return isinstance(value, str)
    if param.type == "bool":
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    return isinstance(value, int) if param.type == "int" else isinstance(value, int | float)


def _is_link(value: object) -> bool:
    """ComfyUI reads any two-item ``[node_id, output_index]`` input as a link."""
    return (
        isinstance(value, list | tuple)
        and len(value) == 2
        and isinstance(value[0], str)
        and isinstance(value[1], int)
        and not isinstance(value[1], bool)
    )


def _structure(graph: Mapping[str, Any]) -> tuple[_Shape, ...]:
    shapes = []
    for node_id, node in graph.items():
        inputs = node["inputs"]
        links = tuple(
            sorted((key, value[0], value[1]) for key, value in inputs.items() if _is_link(value))
        )
        shapes.append(
            (node_id, node["class_type"], tuple(sorted(node)), tuple(sorted(inputs)), links)
        )
    return tuple(sorted(shapes))


def _freeze(value: Any) -> Any:
    if isinstance(value, Mapping):
        return MappingProxyType({key: _freeze(item) for key, item in value.items()})
    if isinstance(value, list | tuple):
        return tuple(_freeze(item) for item in value)
    return value


def _thaw(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {key: _thaw(item) for key, item in value.items()}
    if isinstance(value, tuple):
        return [_thaw(item) for item in value]
    return value
