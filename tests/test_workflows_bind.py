"""Template.bind: values land verbatim in literal inputs; the graph's structure never changes."""

from __future__ import annotations

import json
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from workflows import Catalog, ParameterError, Template, WorkflowError


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return Catalog.load()


@pytest.fixture(scope="module")
def sd15(catalog: Catalog) -> Template:
    return catalog.get("sd15-txt2img")


def _structure(graph: Mapping[str, Any]) -> dict[str, tuple[object, ...]]:
    """Node ids, class types, node and input keys, and every link, as plain data."""
    shape: dict[str, tuple[object, ...]] = {}
    for node_id, node in graph.items():
        links = sorted(
            (key, value[0], value[1])
            for key, value in node["inputs"].items()
            if isinstance(value, list | tuple) and len(value) == 2 and isinstance(value[0], str)
        )
        shape[node_id] = (node["class_type"], sorted(node), sorted(node["inputs"]), links)
    return shape


HOSTILE_PROMPTS = [
    '{"3": {"class_type": "SaveImage"}}',
    '["4", 0]',
    '"}, "9": {',
    '", "inputs": {}}, "99": {"class_type": "SaveImage", "inputs": {"images": ["8", 0]}}}',
    "{{prompt}} ${seed} %(width)s {0}",
    "\\u0000 \\n ' \" ` <script>",
    "",
]


@pytest.mark.parametrize("prompt", HOSTILE_PROMPTS)
def test_prompt_that_looks_like_json_binds_verbatim(sd15: Template, prompt: str) -> None:
    graph = sd15.bind(sd15.resolve({"prompt": prompt, "negative": prompt, "seed": 1}))
    assert graph["6"]["inputs"]["text"] == prompt
    assert graph["7"]["inputs"]["text"] == prompt
    assert _structure(graph) == _structure(sd15.graph)
    assert len(graph) == len(sd15.graph)


def test_bind_writes_every_binding(sd15: Template) -> None:
    params = sd15.resolve(
        {"prompt": "a red cube", "seed": 99, "steps": 12, "cfg": 5, "width": 640, "batch": 2}
    )
    graph = sd15.bind(params)
    assert graph["6"]["inputs"]["text"] == "a red cube"
    assert graph["7"]["inputs"]["text"] == ""
    sampler = graph["3"]["inputs"]
    assert (sampler["seed"], sampler["steps"], sampler["cfg"]) == (99, 12, 5.0)
    assert isinstance(sampler["cfg"], float)
    latent = graph["5"]["inputs"]
    assert (latent["width"], latent["height"], latent["batch_size"]) == (640, 512, 2)
    assert graph["4"]["inputs"]["ckpt_name"] == "v1-5-pruned-emaonly.safetensors"
    assert sampler["model"] == ["4", 0]


def test_bind_returns_a_fresh_mutable_copy(sd15: Template) -> None:
    params = sd15.resolve({"prompt": "p", "seed": 1})
    first = sd15.bind(params)
    first["6"]["inputs"]["text"] = "changed"
    first["3"]["inputs"]["model"][0] = "7"
    second = sd15.bind(params)
    assert second["6"]["inputs"]["text"] == "p"
    assert second["3"]["inputs"]["model"] == ["4", 0]
    assert sd15.graph["6"]["inputs"]["text"] == ""


def test_template_graph_is_read_only(sd15: Template) -> None:
    with pytest.raises(TypeError):
        sd15.graph["6"]["inputs"]["text"] = "x"
    with pytest.raises(TypeError):
        sd15.graph["3"]["inputs"]["model"][0] = "x"


def test_one_role_may_feed_several_nodes(sd15: Template, tmp_path: Path) -> None:
    graph = sd15.bind(sd15.resolve({"prompt": "p", "seed": 1}))
    graph["10"] = {"class_type": "KSampler", "inputs": dict(graph["3"]["inputs"])}
    (tmp_path / "two.json").write_text(json.dumps(graph))
    manifest = {
        "schema_version": 1,
        "name": "two",
        "title": "Two samplers",
        "graph": "two.json",
        "backends": ["comfyui"],
        "params": {
            "seed": {
                "type": "int",
                "min": 0,
                "max": 2**53 - 1,
                "random": True,
                "bind": [{"node": "3", "input": "seed"}, {"node": "10", "input": "seed"}],
            }
        },
        "outputs": ["9"],
    }
    (tmp_path / "two.manifest.json").write_text(json.dumps(manifest))
    two = Template.load(tmp_path / "two.manifest.json")
    bound = two.bind(two.resolve({"seed": 1234}))
    assert bound["3"]["inputs"]["seed"] == bound["10"]["inputs"]["seed"] == 1234


def test_bind_refuses_unresolved_or_bad_params(sd15: Template) -> None:
    params = sd15.resolve({"prompt": "p", "seed": 1})
    with pytest.raises(ParameterError) as caught:
        sd15.bind({k: v for k, v in params.items() if k != "seed"})
    assert [e.field for e in caught.value.errors] == ["seed"]
    with pytest.raises(ParameterError) as caught:
        sd15.bind({**params, "prompt": ["4", 0]})  # type: ignore[dict-item]
    assert caught.value.errors[0].message.startswith('prompt: ["4", 0] must be text')
    with pytest.raises(ParameterError) as caught:
        sd15.bind({**params, "extra": 1})
    assert caught.value.errors[0].field == "extra"


def test_structure_check_catches_a_rewired_graph(sd15: Template) -> None:
    # Load refuses this, so build it directly: a binding that targets a link input.
    graph = sd15.bind(sd15.resolve({"prompt": "p"}))
    graph["6"]["inputs"]["text"] = ["7", 0]
    broken = Template(manifest=sd15.manifest, graph=graph, source=sd15.source)
    with pytest.raises(WorkflowError, match="structure"):
        broken.bind(sd15.resolve({"prompt": "p"}))


def _random_text(rng: random.Random) -> str:
    alphabet = '{}[]",:\\0123456789 abcSaveImageclass_typeinputs\n\t猫🐱' + "\u2028\u202e"
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 200)))


@pytest.mark.parametrize("name", ["sd15-txt2img", "sdxl-txt2img", "flux-schnell-txt2img", "demo"])
def test_random_prompts_never_change_structure(catalog: Catalog, name: str) -> None:
    template = catalog.get(name)
    expected = _structure(template.graph)
    rng = random.Random(20240601)
    string_params = [n for n, p in template.manifest.params.items() if p.type == "string"]
    for _ in range(300):
        values = {n: _random_text(rng) for n in string_params}
        graph = template.bind(template.resolve(values, rng=rng))
        assert _structure(graph) == expected
        for n in string_params:
            for binding in template.manifest.params[n].bind:
                assert graph[binding.node]["inputs"][binding.input] == values[n]


def test_image_binds_the_backend_name_not_the_key(tmp_path: Path) -> None:
    graph = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "example.png"}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "t"}},
    }
    (tmp_path / "i.json").write_text(json.dumps(graph))
    manifest = {
        "schema_version": 1,
        "name": "i",
        "title": "Image in, image out",
        "graph": "i.json",
        "backends": ["comfyui"],
        "params": {
            "image": {"type": "image", "required": True, "bind": [{"node": "1", "input": "image"}]}
        },
        "outputs": ["2"],
    }
    (tmp_path / "i.manifest.json").write_text(json.dumps(manifest))
    template = Template.load(tmp_path / "i.manifest.json")
    key = "images/inputs/" + "c" * 64 + ".jpg"
    params = template.resolve({"image": key})
    bound = template.bind(params, images={"image": "brigade/" + "c" * 64 + ".jpg"})
    assert bound["1"]["inputs"]["image"] == "brigade/" + "c" * 64 + ".jpg"
    assert template.bind(params)["1"]["inputs"]["image"] == key
    with pytest.raises(ParameterError) as caught:
        template.bind({"image": "../secret.png"}, images={"image": "x.png"})
    assert "not the key of a stored input image" in str(caught.value)
    with pytest.raises(ParameterError) as caught:
        template.bind(params, images={"image": "bad\x00name"})
    assert "not a usable file name" in str(caught.value)
    with pytest.raises(ParameterError) as caught:
        template.bind({}, images={})
    assert [e.field for e in caught.value.errors] == ["image"]
