"""Will a template run on this ComfyUI? Checked against the server's ``/object_info``.

ComfyUI answers ``GET /object_info`` with every node class it has: each input's type and
limits (``["INT", {"min": 1, "max": 10000}]``), value lists (``[["a.safetensors"], {}]``
for a checkpoint name), and each class's output types. :func:`check_template` binds a
template with its defaults (the smallest allowed value for a random seed) and reports,
in words a person can act on, what the server would refuse: unknown classes, missing
required inputs, values outside their limits or lists, links to outputs that do not
exist or carry another type.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from workflows.manifest import show
from workflows.template import Template, _is_link

#: Stands in for a required input image: the renderer uploads the real one before submitting.
_PLACEHOLDER_IMAGE = "inputs/" + "0" * 64 + ".png"

#: Input types whose literal values ComfyUI checks against min/max.
_NUMBERS: dict[str, type | tuple[type, ...]] = {"INT": int, "FLOAT": (int, float)}


def default_params(template: Template) -> dict[str, Any]:
    """The parameters a template binds with when nobody sets any."""
    values: dict[str, Any] = {}
    for name, param in template.manifest.params.items():
        if param.default is not None:
            values[name] = param.default
        elif param.random:
            values[name] = int(param.min or 0)
        elif param.type == "string":
            values[name] = "a test prompt"
        elif param.type == "image" and param.required:
            values[name] = _PLACEHOLDER_IMAGE
    return template.resolve(values)


def check_template(
    template: Template,
    object_info: Mapping[str, Any],
    params: Mapping[str, Any] | None = None,
) -> list[str]:
    """Every problem the server would have with ``template`` bound with ``params``
    (default: its defaults). An empty list means it should run."""
    graph = template.bind(params if params is not None else default_params(template))
    problems: list[str] = []
    # An image parameter's file is uploaded just before the prompt: not on the server yet.
    uploaded = {
        (binding.node, binding.input)
        for param in template.manifest.params.values()
        if param.type == "image"
        for binding in param.bind
    }
    for node_id, node in graph.items():
        cls = node["class_type"]
        label = _label(node_id, node)
        info = object_info.get(cls)
        if not isinstance(info, Mapping):
            problems.append(f"{label}: the server has no node class {cls!r}")
            continue
        spec = info.get("input", {})
        required: Mapping[str, Any] = spec.get("required", {}) or {}
        optional: Mapping[str, Any] = spec.get("optional", {}) or {}
        inputs: Mapping[str, Any] = node.get("inputs", {})
        for name in required:
            if name not in inputs:
                problems.append(f"{label}: required input {name!r} is missing")
        for name, value in inputs.items():
            declared = required.get(name, optional.get(name))
            if declared is None or (node_id, name) in uploaded:
                continue  # ComfyUI ignores inputs a class does not declare
            problem = (
                _check_link(value, declared, graph, object_info)
                if _is_link(value)
                else _check_value(value, declared)
            )
            if problem:
                problems.append(f"{label}: {name} {problem}")
    return problems


def _label(node_id: str, node: Mapping[str, Any]) -> str:
    title = (node.get("_meta") or {}).get("title")
    cls = node["class_type"]
    return f"node {node_id} ({title}, {cls})" if title else f"node {node_id} ({cls})"


def _check_value(value: Any, declared: Any) -> str | None:
    kind, limits = _declared(declared)
    if kind == "COMBO":  # newer node schemas put the value list in the options
        kind = list(limits.get("options", []))
    if isinstance(kind, list | tuple):  # a value list: checkpoint names, sampler names...
        if value not in kind:
            listed = ", ".join(str(v) for v in list(kind)[:10]) or "nothing"
            more = f" and {len(kind) - 10} more" if len(kind) > 10 else ""
            return f"{show(value)} is not on the server (it has: {listed}{more})"
        return None
    if kind in _NUMBERS:
        if isinstance(value, bool) or not isinstance(value, _NUMBERS[kind]):
            return f"{show(value)} is not a {kind}"
        low, high = limits.get("min"), limits.get("max")
        if low is not None and value < low:
            return f"{show(value)} is below the server's minimum {low}"
        if high is not None and value > high:
            return f"{show(value)} is above the server's maximum {high}"
        return None
    if kind == "STRING" and not isinstance(value, str):
        return f"{show(value)} is not text"
    if kind == "BOOLEAN" and not isinstance(value, bool):
        return f"{show(value)} is not true or false"
    return None


def _check_link(
    link: Any, declared: Any, graph: Mapping[str, Any], object_info: Mapping[str, Any]
) -> str | None:
    source_id, index = link
    source = graph.get(source_id)
    if source is None:
        return f"links to node {source_id}, which is not in the graph"
    info = object_info.get(source["class_type"])
    if not isinstance(info, Mapping):
        return None  # reported on the source node itself
    outputs = info.get("output", [])
    if index >= len(outputs):
        return f"links to output {index} of node {source_id}, which has {len(outputs)}"
    wanted, _ = _declared(declared)
    given = outputs[index]
    if (
        isinstance(wanted, str)
        and isinstance(given, str)
        and "*" not in (wanted, given)
        and given not in wanted.split(",")
    ):
        return f"expects {wanted} but node {source_id} output {index} gives {given}"
    return None


def _declared(declared: Any) -> tuple[Any, Mapping[str, Any]]:
    """``(type or value list, limits)`` from an input spec like ``["INT", {"min": 1}]``."""
    if not isinstance(declared, list | tuple) or not declared:
        return declared, {}
    limits = declared[1] if len(declared) > 1 and isinstance(declared[1], dict) else {}
    return declared[0], limits
