"""Broken templates fail at load with a ManifestError naming the file, the parameter, the fault."""

from __future__ import annotations

import copy
import json
import pickle
from pathlib import Path
from typing import Any

import pytest

from workflows import ManifestError, ParameterError, Template

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
    },
    "outputs": ["2"],
}


def write(directory: Path, manifest: dict[str, Any], graph: object = GRAPH) -> Path:
    """Write a manifest and its graph into ``directory``; return the manifest's path."""
    (directory / manifest["graph"]).write_text(json.dumps(graph))
    path = directory / f"{manifest['name']}.manifest.json"
    path.write_text(json.dumps(manifest))
    return path


def broken(tmp_path: Path, change: Any, graph: object = GRAPH) -> ManifestError:
    manifest = copy.deepcopy(MANIFEST)
    change(manifest)
    path = write(tmp_path, manifest, graph)
    with pytest.raises(ManifestError) as caught:
        Template.load(path)
    return caught.value


def test_the_fixture_itself_loads(tmp_path: Path) -> None:
    template = Template.load(write(tmp_path, MANIFEST))
    assert template.name == "tiny"
    assert template.source == tmp_path / "tiny.manifest.json"


def test_binding_to_a_missing_node(tmp_path: Path) -> None:
    def change(m: dict[str, Any]) -> None:
        m["params"]["width"]["bind"] = [{"node": "42", "input": "width"}]

    error = broken(tmp_path, change)
    assert error.source == tmp_path / "tiny.manifest.json"
    assert error.param == "width"
    assert str(error) == (
        f'{tmp_path / "tiny.manifest.json"}: parameter "width": binds node "42",'
        " which is not in tiny.json (nodes: 1, 2, 3)"
    )


def test_binding_to_a_missing_input(tmp_path: Path) -> None:
    def change(m: dict[str, Any]) -> None:
        m["params"]["width"]["bind"] = [{"node": "1", "input": "wdth"}]

    error = broken(tmp_path, change)
    assert error.param == "width"
    assert 'input "wdth" of node "1" (EmptyImage), which has no such input' in str(error)
    assert "(inputs: width, height, batch_size)" in str(error)


def test_binding_to_a_link_input(tmp_path: Path) -> None:
    def change(m: dict[str, Any]) -> None:
        m["params"]["prompt"]["bind"] = [{"node": "2", "input": "images"}]

    error = broken(tmp_path, change)
    assert error.param == "prompt"
    assert 'input "images" of node "2" (SaveImage), which is a link to node "1"' in str(error)
    assert "only a literal input can be bound" in str(error)


def test_binding_to_a_literal_of_another_type(tmp_path: Path) -> None:
    def change(m: dict[str, Any]) -> None:
        m["params"]["prompt"]["bind"] = [{"node": "1", "input": "height"}]

    error = broken(tmp_path, change)
    assert error.param == "prompt"
    assert "which holds 64, not a string value" in str(error)


def test_ui_format_graph(tmp_path: Path) -> None:
    ui = {"last_node_id": 9, "last_link_id": 9, "nodes": [{"id": 1}], "links": [], "version": 0.4}
    error = broken(tmp_path, lambda m: None, graph=ui)
    assert error.source == tmp_path / "tiny.json"
    assert "this looks like a UI-format workflow; export it with Save (API)" in str(error)


def test_prompt_request_body_instead_of_graph(tmp_path: Path) -> None:
    error = broken(tmp_path, lambda m: None, graph={"prompt": GRAPH, "client_id": "x"})
    assert 'save only its "prompt" object' in str(error)


def test_node_without_class_type(tmp_path: Path) -> None:
    graph = copy.deepcopy(GRAPH)
    del graph["1"]["class_type"]
    assert 'node "1" has no class_type' in str(broken(tmp_path, lambda m: None, graph=graph))


def test_link_to_a_missing_node(tmp_path: Path) -> None:
    graph = copy.deepcopy(GRAPH)
    graph["2"]["inputs"]["images"] = ["77", 0]
    error = broken(tmp_path, lambda m: None, graph=graph)
    assert 'node "2" input "images" links to node "77", which is not in the graph' in str(error)


def test_default_out_of_bounds(tmp_path: Path) -> None:
    def change(m: dict[str, Any]) -> None:
        m["params"]["width"]["default"] = 4096

    error = broken(tmp_path, change)
    assert error.source == tmp_path / "tiny.manifest.json"
    assert error.param == "width"
    assert error.reason == "default 4096 is above the maximum (allowed: 64 to 512, a multiple of 8)"


@pytest.mark.parametrize(
    ("param", "change", "reason"),
    [
        ("width", {"default": 65}, "default 65 is not a multiple of 8"),
        ("width", {"default": "64"}, 'default "64" must be a whole number'),
        ("width", {"min": 600}, "min 600 is greater than max 512"),
        ("width", {"min": 1.5}, "min must be a whole number for an int parameter"),
        ("width", {"max_length": 5}, "max_length does not apply to a int parameter"),
        ("width", {"folder": "checkpoints"}, "folder does not apply to a int parameter"),
        ("width", {"default": None}, "needs a default (or required: true, or random: true)"),
        ("prompt", {"max_length": None}, "a string parameter needs max_length"),
        ("prompt", {"default": "x"}, "a required parameter cannot have a default"),
        ("prompt", {"type": "choice"}, "max_length does not apply to a choice parameter"),
        ("prompt", {"bind": []}, "bind: List should have at least 1 item"),
        ("prompt", {"typo": 1}, "typo: Extra inputs are not permitted"),
        ("prompt", {"type": "text"}, "type: Input should be 'string'"),
    ],
)
def test_bad_parameter(tmp_path: Path, param: str, change: dict[str, Any], reason: str) -> None:
    def apply(m: dict[str, Any]) -> None:
        m["params"][param].update(change)

    error = broken(tmp_path, apply)
    assert error.param == param
    assert reason in error.reason
    assert str(error).startswith(f'{tmp_path / "tiny.manifest.json"}: parameter "{param}": ')


def test_choice_needs_choices_and_a_valid_default(tmp_path: Path) -> None:
    def no_choices(m: dict[str, Any]) -> None:
        m["params"]["ckpt"] = {
            "type": "choice",
            "default": "a",
            "choices": [],
            "bind": [{"node": "3", "input": "value"}],
        }
        del m["params"]["prompt"]

    assert "needs a non-empty list of choices" in broken(tmp_path, no_choices).reason

    def bad_default(m: dict[str, Any]) -> None:
        no_choices(m)
        m["params"]["ckpt"]["choices"] = ["b", "c"]

    assert broken(tmp_path, bad_default).reason == 'default "a" is not allowed (allowed: b, c)'


def test_string_default_with_control_character(tmp_path: Path) -> None:
    def change(m: dict[str, Any]) -> None:
        m["params"]["prompt"].update({"required": False, "default": "a\x00"})

    assert "control character (U+0000)" in broken(tmp_path, change).reason


def test_bad_parameter_name(tmp_path: Path) -> None:
    def change(m: dict[str, Any]) -> None:
        m["params"]["Width"] = m["params"].pop("width")

    error = broken(tmp_path, change)
    assert error.param == "Width"
    assert "name: String should match pattern" in error.reason


def test_two_parameters_on_one_input(tmp_path: Path) -> None:
    def change(m: dict[str, Any]) -> None:
        m["params"]["height"] = copy.deepcopy(m["params"]["width"])

    error = broken(tmp_path, change)
    assert 'parameters "width" and "height" both bind node "1" input "width"' in str(error)


def test_missing_output_node(tmp_path: Path) -> None:
    error = broken(tmp_path, lambda m: m.update(outputs=["9"]))
    assert 'output node "9" is not in tiny.json' in str(error)


@pytest.mark.parametrize("graph", ["../outside.json", "/etc/passwd", "C:\\x.json"])
def test_graph_path_must_stay_beside_the_manifest(tmp_path: Path, graph: str) -> None:
    manifest = {**MANIFEST, "graph": graph}
    path = tmp_path / "tiny.manifest.json"
    path.write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match="must be a path relative to the manifest"):
        Template.load(path)


def test_bad_workflow_name_and_schema_version(tmp_path: Path) -> None:
    error = broken(tmp_path, lambda m: m.update(name="Tiny", schema_version=2))
    assert error.param is None
    assert "name: String should match pattern" in error.reason
    assert "schema_version: Input should be 1" in error.reason


def test_errors_in_several_parameters_name_each(tmp_path: Path) -> None:
    def change(m: dict[str, Any]) -> None:
        m["params"]["width"]["default"] = 4096
        m["params"]["prompt"]["max_length"] = None

    error = broken(tmp_path, change)
    assert error.param is None
    assert 'parameter "prompt": a string parameter needs max_length' in str(error)
    assert 'parameter "width": default 4096 is above the maximum' in str(error)


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="file not found"):
        Template.load(tmp_path / "nope.manifest.json")
    path = tmp_path / "bad.manifest.json"
    path.write_text("{\n  'name': 1\n}")
    with pytest.raises(ManifestError, match=r"not valid JSON: .* at line 2 column 3"):
        Template.load(path)
    path.write_text("[]")
    with pytest.raises(ManifestError, match="a manifest must be a JSON object"):
        Template.load(path)
    (tmp_path / "tiny.json").unlink(missing_ok=True)
    path.write_text(json.dumps(MANIFEST))
    with pytest.raises(ManifestError) as caught:
        Template.load(path)
    assert caught.value.source == tmp_path / "tiny.json"


def test_manifest_error_survives_pickling(tmp_path: Path) -> None:
    error = broken(tmp_path, lambda m: m["params"]["width"].update(default=4096))
    copy_ = pickle.loads(pickle.dumps(error))
    assert (copy_.source, copy_.param, copy_.reason) == (error.source, error.param, error.reason)
    assert str(copy_) == str(error)


# --- image parameters --------------------------------------------------------------------

IMAGE_GRAPH: dict[str, Any] = {
    **GRAPH,
    "4": {"class_type": "LoadImage", "inputs": {"image": "example.png"}},
    "5": {"class_type": "LoadImage", "inputs": {"image": "mask.png"}},
}
KEY = "images/inputs/" + "ab" * 32 + ".png"


def image_template(tmp_path: Path, **params: dict[str, Any]) -> Template:
    manifest = copy.deepcopy(MANIFEST)
    manifest["params"].update(params)
    return Template.load(write(tmp_path, manifest, IMAGE_GRAPH))


def test_image_parameter_takes_only_an_input_key(tmp_path: Path) -> None:
    template = image_template(
        tmp_path,
        image={"type": "image", "required": True, "bind": [{"node": "4", "input": "image"}]},
    )
    param = template.manifest.params["image"]
    for good in (KEY, "inputs/" + "0" * 64 + ".webp", "a/b.c/inputs/" + "f" * 64 + ".jpg"):
        assert param.check(good) is None, good
    for bad in (
        "../inputs/" + "ab" * 32 + ".png",
        "images/../inputs/" + "ab" * 32 + ".png",
        "/images/inputs/" + "ab" * 32 + ".png",
        "https://example.com/inputs/" + "ab" * 32 + ".png",
        "images/inputs/" + "AB" * 32 + ".png",
        "images/inputs/" + "ab" * 31 + ".png",
        "images/inputs/" + "ab" * 32 + ".gif",
        "images/2026/01/01/job/0.png",
        KEY + "\n",
        "C:\\inputs\\" + "ab" * 32 + ".png",
        7,
    ):
        problem = param.check(bad)
        assert problem is not None and "not the key of a stored input image" in problem, bad
    assert "PNG, JPEG or WebP" in param.allowed()


def test_required_image_must_be_given(tmp_path: Path) -> None:
    template = image_template(
        tmp_path,
        image={"type": "image", "required": True, "bind": [{"node": "4", "input": "image"}]},
    )
    with pytest.raises(ParameterError) as caught:
        template.resolve({"prompt": "p"})
    assert [e.field for e in caught.value.errors] == ["image"]
    assert "a value is required" in str(caught.value)
    with pytest.raises(ParameterError, match="not the key of a stored input image"):
        template.resolve({"prompt": "p", "image": "/etc/passwd"})
    assert template.resolve({"prompt": "p", "image": KEY})["image"] == KEY


def test_optional_image_without_value_keeps_the_graph_literal(tmp_path: Path) -> None:
    template = image_template(
        tmp_path, mask={"type": "image", "bind": [{"node": "5", "input": "image"}]}
    )
    params = template.resolve({"prompt": "p"})
    assert "mask" not in params
    assert template.bind(params)["5"]["inputs"]["image"] == "mask.png"
    given = template.resolve({"prompt": "p", "mask": KEY})
    graph = template.bind(given, images={"mask": "brigade/abc.png"})
    assert graph["5"]["inputs"]["image"] == "brigade/abc.png"


@pytest.mark.parametrize(
    ("param", "message"),
    [
        (
            {"type": "image", "default": KEY, "bind": [{"node": "4", "input": "image"}]},
            "an image parameter cannot have a default",
        ),
        (
            {"type": "image", "required": True, "bind": [{"node": "1", "input": "height"}]},
            "holds 64, not a image value",
        ),
        (
            {"type": "image", "max_length": 9, "bind": [{"node": "4", "input": "image"}]},
            "max_length does not apply to a image parameter",
        ),
    ],
)
def test_broken_image_parameters(tmp_path: Path, param: dict[str, Any], message: str) -> None:
    with pytest.raises(ManifestError) as caught:
        image_template(tmp_path, image=param)
    assert caught.value.param == "image"
    assert message in str(caught.value)
