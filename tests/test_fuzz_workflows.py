"""Hypothesis over workflow manifests and parameter binding (issue 7).

* A manifest near the valid shape (one key changed, removed or added, anywhere in it)
  either loads or raises :class:`ManifestError` naming what is wrong; never another
  exception.
* Any JSON value for any parameter of a built-in workflow is refused by the
  parameter's name, or lands as one literal in each of its bindings; the bound graph has
  the template's nodes, class types, input names and links, and every literal the job
  did not set is the template's own.

Budgets are small for the suite; ``BRIGADE_HYPOTHESIS_PROFILE=thorough`` runs 20 times
as many examples by hand."""

from __future__ import annotations

import copy
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from workflows import Catalog, ManifestError, ParameterError, Template
from workflows.template import _is_link

THOROUGH = os.environ.get("BRIGADE_HYPOTHESIS_PROFILE") == "thorough"


def budget(examples: int) -> settings:
    """``examples`` in the suite, twenty times as many in the thorough profile; no
    deadline (the machine is shared) and no example database in the working tree."""
    return settings(
        max_examples=examples * 20 if THOROUGH else examples, deadline=None, database=None
    )


GRAPH: dict[str, Any] = {
    "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
    "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "t"}},
    "3": {"class_type": "PrimitiveStringMultiline", "inputs": {"value": ""}},
}
MANIFEST: dict[str, Any] = {
    "schema_version": 1,
    "name": "tiny",
    "title": "Tiny",
    "graph": "tiny.json",
    "backends": ["comfyui"],
    "params": {
        "prompt": {
            "type": "string",
            "required": True,
            "max_length": 100,
            "bind": [{"node": "3", "input": "value"}],
        },
        "width": {
            "type": "int",
            "default": 64,
            "min": 64,
            "max": 512,
            "multiple_of": 8,
            "bind": [{"node": "1", "input": "width"}],
        },
        "seed": {"type": "int", "random": True, "bind": [{"node": "1", "input": "batch_size"}]},
    },
    "outputs": ["2"],
}

SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(),
    # Lone surrogates too: JSON carries them as "\ud800" escapes.
    st.text(alphabet=st.characters() | st.characters(categories=["Cs"]), max_size=30),
    st.sampled_from(["", "..", "/etc/passwd", "C:\\x", "1", "0", "-1", "1e999", "string"]),
)
JSON = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=8,
)
#: Keys that a manifest or a parameter has, and a few it does not.
KEYS = st.sampled_from(
    [
        *MANIFEST,
        *MANIFEST["params"]["width"],
        "choices",
        "max_length",
        "random",
        "required",
        "description",
        "lanes",
        "node",
        "input",
        "class_type",
        "inputs",
        "extra",
    ]
)


def _containers(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Paths of every dict and list inside ``value`` (itself included)."""
    found = []
    if isinstance(value, dict):
        found.append(path)
        for key, item in value.items():
            found += _containers(item, (*path, key))
    elif isinstance(value, list):
        found.append(path)
        for index, item in enumerate(value):
            found += _containers(item, (*path, index))
    return found


def _keys(value: Any) -> list[str]:
    """The keys of ``value`` when it is an object: a message may name one of them."""
    return [str(key) for key in value] if isinstance(value, dict) else []


@st.composite
def mutated(draw: st.DrawFn, base: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """``base`` with one to three changes; returns it and the words that name what changed
    (the keys on the changed paths and the new values)."""
    data = copy.deepcopy(base)
    names: list[str] = []
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(_containers(data)))
        target: Any = data
        for part in path:
            target = target[part]
        names += [str(part) for part in path]
        action = draw(st.sampled_from(["set", "delete", "add"]))
        if isinstance(target, dict):
            if action == "delete" and target:
                key = draw(st.sampled_from(sorted(target)))
                del target[key]
            else:
                key = draw(st.sampled_from(sorted(target)) | KEYS) if target else draw(KEYS)
                value = draw(JSON)
                target[key] = value
                names += [json.dumps(value)[:30], *_keys(value)]
            names.append(str(key))
        elif target:
            index = draw(st.integers(0, len(target) - 1))
            if action == "delete":
                del target[index]
            else:
                value = draw(JSON)
                target[index] = value
                names += [json.dumps(value)[:30], *_keys(value)]
            names.append(str(index))
    return data, names


def named(message: str, names: list[str]) -> bool:
    """Whether ``message`` names one of ``names`` (an empty one only in quotes)."""
    return any((name and name in message) or f'"{name}"' in message for name in names)


def _load(manifest: Any, graph: Any) -> Template:
    with tempfile.TemporaryDirectory() as folder:
        directory = Path(folder)
        (directory / "tiny.json").write_text(json.dumps(graph))
        path = directory / "tiny.manifest.json"
        path.write_text(json.dumps(manifest))
        return Template.load(path)


def test_the_base_manifest_loads() -> None:
    assert _load(MANIFEST, GRAPH).name == "tiny"


@given(change=mutated(MANIFEST))
@example(change=({**MANIFEST, "graph": "../tiny.json"}, ["graph"]))
@example(change=({**MANIFEST, "params": {"": None}}, ['{"": null}', "", "params"]))
@example(change=({**MANIFEST, "params": {"Bad Name": MANIFEST["params"]["prompt"]}}, ["Bad Name"]))
@budget(200)
def test_a_manifest_loads_or_says_what_is_wrong(change: tuple[dict[str, Any], list[str]]) -> None:
    manifest, names = change
    try:
        template = _load(manifest, GRAPH)
    except ManifestError as exc:
        refused: ManifestError | None = exc
    else:
        refused = None
    if refused is not None:
        message = str(refused)
        assert refused.reason
        assert named(message, names) or "tiny.json" in message, (
            message,
            names,
        )
        return
    assert template.manifest.name == manifest["name"]


@given(change=mutated(GRAPH))
@example(change=({**GRAPH, "3": {"class_type": "X", "inputs": {"value": ["9", 0]}}}, ["3"]))
@budget(200)
def test_a_graph_loads_or_says_what_is_wrong(change: tuple[dict[str, Any], list[str]]) -> None:
    graph, names = change
    try:
        template = _load(MANIFEST, graph)
    except ManifestError as exc:
        message: str | None = str(exc)
    else:
        message = None
    if message is not None:
        assert named(message, names) or "graph" in message, (
            message,
            names,
        )
        return
    assert sorted(template.graph) == sorted(graph)


CATALOG = Catalog.load()
NAMES = CATALOG.names()


#: A value each required parameter takes, so that only the drawn one can be refused.
REQUIRED: dict[str, Any] = {
    "prompt": "a lighthouse",
    "image": f"inputs/{'0' * 64}.png",
    "image2": f"inputs/{'1' * 64}.png",
}


def test_every_required_parameter_has_a_value() -> None:
    for name in NAMES:
        template = CATALOG.get(name)
        template.resolve({k: v for k, v in REQUIRED.items() if k in template.manifest.params})


def _literals(graph: Any) -> dict[tuple[str, str], Any]:
    return {
        (node_id, key): value
        for node_id, node in graph.items()
        for key, value in node["inputs"].items()
        if not _is_link(value)
    }


def _structure(graph: Any) -> list[tuple[str, str, list[str], list[tuple[str, Any]]]]:
    return sorted(
        (
            node_id,
            node["class_type"],
            sorted(node["inputs"]),
            sorted((k, list(v)) for k, v in node["inputs"].items() if _is_link(v)),
        )
        for node_id, node in graph.items()
    )


def _same(left: Any, right: Any) -> bool:
    if isinstance(left, float) and isinstance(right, float) and math.isnan(left):
        return math.isnan(right)
    return bool(left == right) and type(left) is type(right)


@pytest.mark.parametrize("workflow", NAMES)
@given(data=st.data())
@budget(100)
def test_any_value_is_refused_by_name_or_lands_as_one_literal(
    workflow: str, data: st.DataObject
) -> None:
    template = CATALOG.get(workflow)
    params = template.manifest.params
    name = data.draw(st.sampled_from(sorted(params)) | st.text(max_size=12), label="name")
    value = data.draw(JSON, label="value")
    values = {k: v for k, v in REQUIRED.items() if k in params} | {name: value}
    try:
        resolved = template.resolve(values)
    except ParameterError as exc:
        errors = exc.errors
    else:
        errors = []
    if errors:
        for error in errors:
            assert error.message.startswith(f"{error.field}: "), error
        fields = {error.field for error in errors}
        assert len(fields) == 1, errors
        [field] = fields
        assert field == name or name not in params, (field, name)
        return
    assert name in params, f"{name!r} is not a parameter but was taken"
    graph = template.bind(resolved)
    assert _structure(graph) == _structure(template.graph)
    before, after = _literals(template.graph), _literals(graph)
    assert set(before) == set(after)
    bound = {(b.node, b.input): role for role, p in params.items() for b in p.bind}
    for where, literal in after.items():
        role = bound.get(where)
        if role is None:
            assert _same(literal, before[where]), where
        else:
            assert _same(literal, resolved[role]), (where, literal)
    if value is not None:
        landed = [graph[b.node]["inputs"][b.input] for b in params[name].bind]
        assert all(literal == value for literal in landed), (landed, value)
        assert all(not isinstance(literal, dict | list) for literal in landed)
