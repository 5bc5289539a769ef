"""The built-in templates: they load, their roles and bounds are the documented ones."""

from __future__ import annotations

import json
import random

import pytest

from workflows import Catalog, Template
from workflows.catalog import BUILTIN_DIR

BUILTINS = (
    "demo",
    "flux-schnell-txt2img",
    "img2img",
    "sd15-txt2img",
    "sdxl-txt2img",
    "upscale",
)
INPUT_KEY = "images/inputs/" + "e" * 64 + ".png"


def example_values(template: Template) -> dict[str, object]:
    """A prompt and an input image, for the templates that take them."""
    values: dict[str, object] = {}
    for name, param in template.manifest.params.items():
        if name == "prompt":
            values[name] = "a red cube"
        elif param.type == "image" and param.required:
            values[name] = INPUT_KEY
    return values


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return Catalog.load()


def test_every_builtin_loads(catalog: Catalog) -> None:
    assert catalog.names() == list(BUILTINS)
    for template in catalog:
        assert template.source.parent == BUILTIN_DIR
        assert template.source.name == f"{template.name}.manifest.json"


def test_every_graph_file_has_a_manifest() -> None:
    graphs = {p.name for p in BUILTIN_DIR.glob("*.json") if not p.name.endswith(".manifest.json")}
    assert graphs == {f"{name}.json" for name in BUILTINS}


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_nodes_have_titles(catalog: Catalog, name: str) -> None:
    for node in catalog.get(name).graph.values():
        assert node["_meta"]["title"]


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_binds_to_json(catalog: Catalog, name: str) -> None:
    template = catalog.get(name)
    graph = template.bind(template.resolve(example_values(template), rng=random.Random(1)))
    assert json.loads(json.dumps(graph)) == graph
    for output in template.manifest.outputs:
        assert graph[output]["class_type"] == "SaveImage"


def _bounds(template: Template) -> dict[str, tuple[object, ...]]:
    return {
        name: (p.type, p.min, p.max, p.multiple_of, p.default)
        for name, p in template.manifest.params.items()
        if p.type in ("int", "float")
    }


def test_sd15(catalog: Catalog) -> None:
    template = catalog.get("sd15-txt2img")
    params = template.manifest.params
    assert set(params) == {
        "prompt",
        "negative",
        "seed",
        "steps",
        "cfg",
        "width",
        "height",
        "batch",
        "checkpoint",
    }
    assert params["prompt"].required
    assert params["prompt"].max_length == 1500
    assert params["negative"].max_length == 1000
    assert params["negative"].default == ""
    assert params["seed"].random
    assert params["checkpoint"].type == "string"
    assert params["checkpoint"].default == "v1-5-pruned-emaonly.safetensors"
    assert _bounds(template) == {
        "seed": ("int", 0, 2**53 - 1, None, None),
        "steps": ("int", 1, 150, None, 25),
        "cfg": ("float", 1.0, 30.0, None, 7.0),
        "width": ("int", 64, 1024, 8, 512),
        "height": ("int", 64, 1024, 8, 512),
        "batch": ("int", 1, 4, None, 1),
    }
    classes = sorted(node["class_type"] for node in template.graph.values())
    assert classes == [
        "CLIPTextEncode",
        "CLIPTextEncode",
        "CheckpointLoaderSimple",
        "EmptyLatentImage",
        "KSampler",
        "SaveImage",
        "VAEDecode",
    ]
    sampler = next(n for n in template.graph.values() if n["class_type"] == "KSampler")
    assert (sampler["inputs"]["sampler_name"], sampler["inputs"]["scheduler"]) == (
        "euler",
        "normal",
    )


def test_sdxl(catalog: Catalog) -> None:
    template = catalog.get("sdxl-txt2img")
    params = template.manifest.params
    assert params["checkpoint"].default == "sd_xl_base_1.0.safetensors"
    bounds = _bounds(template)
    assert bounds["width"] == bounds["height"] == ("int", 512, 2048, 8, 1024)
    assert bounds["steps"] == ("int", 1, 150, None, 30)
    assert bounds["cfg"] == ("float", 1.0, 30.0, None, 6.5)


def test_flux_schnell(catalog: Catalog) -> None:
    template = catalog.get("flux-schnell-txt2img")
    params = template.manifest.params
    assert "negative" not in params
    assert "cfg" not in params
    assert params["checkpoint"].default == "flux1-schnell-fp8.safetensors"
    bounds = _bounds(template)
    assert bounds["width"] == bounds["height"] == ("int", 256, 2048, 16, 1024)
    assert bounds["steps"] == ("int", 1, 8, None, 4)
    by_class = {node["class_type"]: node for node in template.graph.values()}
    assert "EmptySD3LatentImage" in by_class
    sampler = by_class["KSampler"]["inputs"]
    assert (sampler["cfg"], sampler["sampler_name"], sampler["scheduler"]) == (
        1.0,
        "euler",
        "simple",
    )
    negative = template.graph[sampler["negative"][0]]
    assert negative["class_type"] == "CLIPTextEncode"
    assert negative["inputs"]["text"] == ""


def test_demo(catalog: Catalog) -> None:
    template = catalog.get("demo")
    manifest = template.manifest
    assert manifest.backends == ["demo", "comfyui"]
    assert "weight-free" in manifest.description
    assert set(manifest.params) == {"prompt", "seed", "steps", "width", "height", "batch"}
    bounds = _bounds(template)
    assert bounds["width"] == bounds["height"] == ("int", 64, 1024, 8, 512)
    assert bounds["steps"] == ("int", 1, 50, None, 20)
    assert bounds["batch"] == ("int", 1, 4, None, 1)
    bound_classes = {
        name: {template.graph[b.node]["class_type"] for b in p.bind}
        for name, p in manifest.params.items()
    }
    assert bound_classes["prompt"] == {"PrimitiveStringMultiline"}
    assert bound_classes["seed"] == bound_classes["steps"] == {"PrimitiveInt"}
    assert bound_classes["width"] == {"EmptyImage"}
    assert "CheckpointLoaderSimple" not in {n["class_type"] for n in template.graph.values()}


def test_describe_is_json(catalog: Catalog) -> None:
    described = catalog.get("sd15-txt2img").describe()
    assert json.loads(json.dumps(described)) == described
    width = described["params"]["width"]
    assert width["min"] == 64
    assert width["max"] == 1024
    assert width["multiple_of"] == 8
    assert width["default"] == 512
    assert width["allowed"] == "64 to 1024, a multiple of 8"
    assert described["params"]["seed"]["default"] is None
    assert described["params"]["seed"]["random"] is True
    assert described["params"]["checkpoint"]["max_length"] == 255
    assert described["backends"] == ["comfyui"]


EXAMPLES_DIR = BUILTIN_DIR.parent / "examples"


@pytest.mark.parametrize(
    ("name", "image"), [("img2img", "image"), ("upscale", "image"), ("controlnet-pose", "pose")]
)
def test_image_templates_load_their_input_through_load_image(name: str, image: str) -> None:
    template = Catalog.load([EXAMPLES_DIR]).get(name)
    param = template.manifest.params[image]
    assert (param.type, param.required) == ("image", True)
    [binding] = param.bind
    assert template.graph[binding.node]["class_type"] == "LoadImage"
    assert binding.input == "image"
    bound = template.bind(
        template.resolve(example_values(template), rng=random.Random(1)),
        images={image: "brigade/x.png"},
    )
    assert bound[binding.node]["inputs"]["image"] == "brigade/x.png"


def test_image_templates_run_where_they_say(catalog: Catalog) -> None:
    assert catalog.get("img2img").manifest.backends == ["comfyui", "demo"]
    assert catalog.get("upscale").manifest.backends == ["comfyui", "demo"]
    # The ControlNet example needs a model no stock server has: opt in through a dir.
    assert "controlnet-pose" not in catalog.names()
    example = Catalog.load([EXAMPLES_DIR]).get("controlnet-pose")
    assert example.manifest.backends == ["comfyui"]
    classes = {node["class_type"] for node in example.graph.values()}
    assert {"ControlNetLoader", "ControlNetApplyAdvanced", "LoadImage"} <= classes
    assert set(catalog.get("upscale").manifest.params) == {"image", "prompt", "scale_by"}
