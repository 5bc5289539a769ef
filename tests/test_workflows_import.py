"""``brigade workflows add``: manifests proposed from graphs exported with Save (API).

The graphs in ``tests/data/exported`` are shaped as ComfyUI exports them (string ids,
``_meta.title``, ``["id", index]`` links, core classes). Each test asserts every binding
the proposal makes, or the reason it refuses; the proposals are then loaded with the
real loader, bound with a job's values, and checked against the ComfyUI emulator's
``/object_info``.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.emulators.comfyui import ComfyUIEmulator
from workflows import Template
from workflows.compat import check_template, default_params
from workflows.importer import ImportRefused, Proposal, propose, workflow_name

EXPORTED = Path(__file__).parent / "data" / "exported"
ACCEPTED = (
    "txt2img_lora_api.json",
    "img2img_api.json",
    "controlnet_pose_api.json",
    "hires_fix_api.json",
    "sdxl_refiner_api.json",
)
#: An input image as a job carries it: the key a frontend stored it under.
IMAGE_KEY = "brigade/inputs/" + "ab" * 32 + ".png"


def graph(file: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((EXPORTED / file).read_text(encoding="utf-8"))
    return data


def proposal(file: str, nodes: dict[str, Any] | None = None) -> Proposal:
    return propose(nodes or graph(file), name=workflow_name(file), graph_file=file)


def bindings(made: Proposal) -> dict[str, list[tuple[str, str]]]:
    return {
        name: [(b["node"], b["input"]) for b in param["bind"]]
        for name, param in made.manifest["params"].items()
    }


def fixed_reasons(made: Proposal) -> dict[tuple[str, str | None], str]:
    return {(f.node, f.input): f.reason for f in made.fixed if f.reason}


def refusal(nodes: object) -> str:
    with pytest.raises(ImportRefused) as caught:
        propose(nodes, name="x", graph_file="x.json")
    return str(caught.value)


# -- what each graph binds -------------------------------------------------------------


def test_txt2img_with_a_lora_chain_and_a_model_upscale() -> None:
    made = proposal("txt2img_lora_api.json")
    params = made.manifest["params"]

    assert bindings(made) == {
        "prompt": [("6", "text")],
        "negative": [("7", "text")],
        "seed": [("3", "seed")],
        "steps": [("3", "steps")],
        "cfg": [("3", "cfg")],
        "width": [("5", "width")],
        "height": [("5", "height")],
        "batch": [("5", "batch_size")],
        "checkpoint": [("4", "ckpt_name")],
        "lora_1": [("10", "lora_name")],
        "lora_1_strength": [("10", "strength_model"), ("10", "strength_clip")],
        "lora_2": [("11", "lora_name")],
        "lora_2_strength": [("11", "strength_model")],
        "lora_2_clip_strength": [("11", "strength_clip")],
        "upscale_model": [("12", "model_name")],
    }
    assert made.manifest["outputs"] == ["9"]
    assert params["prompt"] == {
        "type": "string",
        "description": "What to draw.",
        "required": True,
        "max_length": 1500,
        "bind": [{"node": "6", "input": "text"}],
    }
    assert params["negative"]["default"] == "blurry, lowres, watermark, text"
    assert params["seed"] | {"bind": None} == {
        "type": "int",
        "description": params["seed"]["description"],
        "min": 0,
        "max": 2**53 - 1,
        "random": True,
        "bind": None,
    }
    assert (params["steps"]["default"], params["steps"]["min"], params["steps"]["max"]) == (
        25,
        1,
        150,
    )
    assert (params["cfg"]["default"], params["cfg"]["min"], params["cfg"]["max"]) == (7.5, 0, 30)
    for side, size in (("width", 512), ("height", 768)):
        assert {k: params[side][k] for k in ("default", "min", "max", "multiple_of")} == {
            "default": size,
            "min": 64,
            "max": 2048,
            "multiple_of": 8,
        }
    assert (params["batch"]["default"], params["batch"]["min"], params["batch"]["max"]) == (1, 1, 4)
    assert params["lora_1"]["default"] == "add_detail.safetensors"
    assert params["lora_2"]["default"] == "film_grain_style.safetensors"
    strengths = {n: params[n]["default"] for n in params if n.endswith("strength")}
    assert strengths == {
        "lora_1_strength": 0.8,
        "lora_2_strength": 0.6,
        "lora_2_clip_strength": 1.0,
    }
    assert all((params[n]["min"], params[n]["max"]) == (-2, 2) for n in strengths)
    assert params["upscale_model"]["default"] == "4x-UltraSharp.pth"
    assert "empty latent" in fixed_reasons(made)[("3", "denoise")]


def test_img2img_binds_the_loaded_image_and_the_denoise() -> None:
    made = proposal("img2img_api.json")
    params = made.manifest["params"]

    assert bindings(made) == {
        "prompt": [("6", "text")],
        "negative": [("7", "text")],
        "image": [("10", "image")],
        "seed": [("3", "seed")],
        "steps": [("3", "steps")],
        "cfg": [("3", "cfg")],
        "denoise": [("3", "denoise")],
        "checkpoint": [("4", "ckpt_name")],
    }
    assert params["image"] == {
        "type": "image",
        "description": "The image to start from.",
        "required": True,
        "bind": [{"node": "10", "input": "image"}],
    }
    assert (params["denoise"]["default"], params["denoise"]["min"], params["denoise"]["max"]) == (
        0.55,
        0,
        1,
    )
    assert params["negative"]["default"] == "photo, blurry"  # titled "Negative"


def test_controlnet_with_a_reference_image_follows_the_conditioning_through_it() -> None:
    made = proposal("controlnet_pose_api.json")
    params = made.manifest["params"]

    # The sampler's positive and negative are outputs 0 and 1 of the Apply ControlNet.
    assert bindings(made) == {
        "prompt": [("6", "text")],
        "negative": [("7", "text")],
        "pose_reference": [("12", "image")],
        "seed": [("3", "seed")],
        "steps": [("3", "steps")],
        "cfg": [("3", "cfg")],
        "width": [("5", "width")],
        "height": [("5", "height")],
        "batch": [("5", "batch_size")],
        "checkpoint": [("4", "ckpt_name")],
        "controlnet": [("11", "control_net_name")],
        "controlnet_strength": [("13", "strength")],
    }
    assert params["pose_reference"]["type"] == "image" and params["pose_reference"]["required"]
    assert params["controlnet"]["default"] == "control_v11p_sd15_openpose.pth"
    strength = params["controlnet_strength"]
    assert (strength["default"], strength["min"], strength["max"]) == (0.85, 0, 2)
    assert params["batch"]["default"] == 2
    assert made.manifest["outputs"] == ["9"]  # not the Preview Image of the pose
    assert any("node 14 (Preview Image, PreviewImage)" in note for note in made.notes)
    settings = {(f.node, f.input) for f in made.fixed}
    assert {("13", "start_percent"), ("13", "end_percent")} <= settings


def test_two_untitled_samplers_share_the_prompt_and_seed_and_keep_differing_steps() -> None:
    made = proposal("hires_fix_api.json")

    assert bindings(made) == {
        "prompt": [("6", "text")],
        "negative": [("7", "text")],
        "seed": [("3", "seed"), ("11", "seed")],
        "cfg": [("3", "cfg"), ("11", "cfg")],  # both 7.0: one value for both passes
        "denoise": [("11", "denoise")],  # the hires pass starts from an image
        "width": [("5", "width")],
        "height": [("5", "height")],
        "batch": [("5", "batch_size")],
        "checkpoint": [("4", "ckpt_name")],
    }
    reasons = fixed_reasons(made)
    assert 'each would be "steps", but they hold different values' in reasons[("3", "steps")]
    assert reasons[("11", "steps")] == reasons[("3", "steps")]
    assert "empty latent" in reasons[("3", "denoise")]
    assert made.manifest["params"]["denoise"]["default"] == 0.5
    assert "node 3 (KSampler) steps 20, node 11 (KSampler) steps 12: each" in made.describe()


def test_titled_samplers_and_checkpoints_are_named_by_their_titles() -> None:
    made = proposal("sdxl_refiner_api.json")

    assert bindings(made) == {
        # A titled "Positive" and the refiner's untitled encoder both take the prompt.
        "prompt": [("6", "text"), ("15", "text")],
        "negative": [("7", "text"), ("16", "text")],
        "seed": [("10", "noise_seed")],
        "base_cfg": [("10", "cfg")],
        "refiner_cfg": [("11", "cfg")],
        "width": [("5", "width")],
        "height": [("5", "height")],
        "batch": [("5", "batch_size")],
        "base_model": [("4", "ckpt_name")],
        "refiner_model": [("12", "ckpt_name")],
    }
    reasons = fixed_reasons(made)
    assert reasons[("11", "noise_seed")] == "add_noise is disabled: the seed is unused"
    assert "steps 0 to 20" in reasons[("10", "steps")]
    assert "steps 20 to 10000" in reasons[("11", "steps")]
    assert made.manifest["params"]["base_cfg"]["description"].startswith(
        'Classifier-free guidance of "Base"'
    )


@pytest.mark.parametrize("name", ["sd15-txt2img", "sdxl-txt2img", "flux-schnell-txt2img"])
def test_the_built_in_graphs_get_the_bindings_written_by_hand(name: str) -> None:
    templates = Path(__file__).parents[1] / "workflows" / "templates"
    nodes = json.loads((templates / f"{name}.json").read_text(encoding="utf-8"))
    by_hand = json.loads((templates / f"{name}.manifest.json").read_text(encoding="utf-8"))

    made = propose(nodes, name=name, graph_file=f"{name}.json")

    proposed = bindings(made)
    for param, spec in by_hand["params"].items():
        assert proposed.pop(param) == [(b["node"], b["input"]) for b in spec["bind"]], param
    # Schnell ignores cfg and the negative prompt; whoever wrote its manifest left them out.
    assert set(proposed) == ({"cfg", "negative"} if name.startswith("flux") else set())
    assert made.manifest["outputs"] == by_hand["outputs"]
    step = 16 if name.startswith("flux") else 8  # EmptySD3LatentImage
    assert made.manifest["params"]["width"]["multiple_of"] == step


# -- titles ----------------------------------------------------------------------------


def test_titles_name_loras_and_fixed_keeps_a_node_out() -> None:
    nodes = graph("txt2img_lora_api.json")
    nodes["11"]["_meta"]["title"] = "Style LoRA"
    nodes["12"]["_meta"]["title"] = "fixed: always 4x"
    nodes["6"]["_meta"]["title"] = "Positive prompt"

    made = proposal("txt2img_lora_api.json", nodes)
    found = bindings(made)

    assert found["lora"] == [("10", "lora_name")]  # the one untitled LoRA is not numbered
    assert found["lora_strength"] == [("10", "strength_model"), ("10", "strength_clip")]
    assert found["style_lora"] == [("11", "lora_name")]
    assert found["style_lora_strength"] == [("11", "strength_model")]
    assert found["style_lora_clip_strength"] == [("11", "strength_clip")]
    assert found["prompt"] == [("6", "text")]
    assert "upscale_model" not in found
    assert fixed_reasons(made)[("12", None)] == "titled fixed: nothing in it is bound"
    assert made.manifest["params"]["style_lora"]["description"].startswith(
        'LoRA file name of "Style LoRA"'
    )


def test_a_titled_primitive_is_a_parameter_and_a_linked_one_is_bound_through() -> None:
    nodes = graph("img2img_api.json")
    nodes["20"] = {
        "inputs": {"value": 30},
        "class_type": "PrimitiveInt",
        "_meta": {"title": "Int"},
    }
    nodes["21"] = {
        "inputs": {"value": True},
        "class_type": "PrimitiveBoolean",
        "_meta": {"title": "Sharpen"},
    }
    nodes["22"] = {
        "inputs": {"images": ["8", 0], "enabled": ["21", 0]},
        "class_type": "CustomSharpen",
        "_meta": {"title": "Sharpen (custom)"},
    }
    nodes["9"]["inputs"]["images"] = ["22", 0]
    nodes["3"]["inputs"]["steps"] = ["20", 0]

    made = proposal("img2img_api.json", nodes)

    assert bindings(made)["steps"] == [("20", "value")]
    assert made.manifest["params"]["sharpen"] == {
        "type": "bool",
        "description": 'On or off of "Sharpen".',
        "default": True,
        "bind": [{"node": "21", "input": "value"}],
    }


def test_several_untitled_images_are_numbered() -> None:
    nodes = graph("controlnet_pose_api.json")
    nodes["12"]["_meta"]["title"] = "Load Image"
    nodes["15"] = copy.deepcopy(nodes["12"])
    nodes["15"]["inputs"]["image"] = "depth.png"
    nodes["16"] = copy.deepcopy(nodes["13"])
    nodes["16"]["inputs"] |= {"image": ["15", 0], "positive": ["13", 0], "negative": ["13", 1]}
    nodes["3"]["inputs"] |= {"positive": ["16", 0], "negative": ["16", 1]}

    found = bindings(proposal("controlnet_pose_api.json", nodes))

    assert found["controlnet_image_1"] == [("12", "image")]
    assert found["controlnet_image_2"] == [("15", "image")]
    assert found["prompt"] == [("6", "text")]  # through two Apply ControlNets
    assert found["controlnet_strength"] == [("13", "strength"), ("16", "strength")]


# -- refusals --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("file", "reason"),
    [
        ("no_output_api.json", "no output node: ComfyUI runs only what leads to an output"),
        ("ui_format.json", "this is a UI-format workflow (it has nodes and links lists)"),
        (
            "broken_link_api.json",
            'node 3 (KSampler) input "latent_image" links to node "5", which is not in the graph',
        ),
    ],
)
def test_graphs_that_cannot_run_are_refused_with_the_reason(file: str, reason: str) -> None:
    assert reason in refusal(graph(file))


def test_a_graph_whose_only_output_is_a_preview_is_refused() -> None:
    nodes = graph("txt2img_lora_api.json")
    nodes["9"]["class_type"] = "PreviewImage"
    del nodes["9"]["inputs"]["filename_prefix"]

    reason = refusal(nodes)

    assert "no Save Image node" in reason
    assert "node 9 (Save Image, PreviewImage)" in reason


def test_a_cycle_is_refused_naming_its_nodes() -> None:
    nodes = graph("txt2img_lora_api.json")
    nodes["10"]["inputs"]["model"] = ["11", 0]

    reason = refusal(nodes)

    assert "cycle" in reason
    assert (
        "node 10 (Load LoRA, LoraLoader)" in reason and "node 11 (Load LoRA, LoraLoader)" in reason
    )


def test_no_way_to_the_prompt_is_refused_until_a_title_shows_it() -> None:
    nodes = graph("img2img_api.json")
    nodes["12"] = {
        "inputs": {"conditioning": ["6", 0], "style": "vivid"},
        "class_type": "StyleConditioning",
        "_meta": {"title": "Style"},
    }
    nodes["3"]["inputs"]["positive"] = ["12", 0]
    nodes["6"]["_meta"]["title"] = "CLIP Text Encode (Prompt)"

    reason = refusal(nodes)

    assert "no place for the prompt" in reason
    assert "leads to node 12 (Style, StyleConditioning)" in reason
    assert (
        'title the text encoder (or the String primitive) that takes the prompt "prompt"' in reason
    )

    nodes["6"]["_meta"]["title"] = "prompt"
    assert bindings(proposal("img2img_api.json", nodes))["prompt"] == [("6", "text")]


def test_a_request_body_or_a_node_without_a_class_is_refused() -> None:
    assert "/prompt request body" in refusal({"prompt": graph("img2img_api.json")})
    nodes = graph("img2img_api.json")
    del nodes["8"]["class_type"]
    assert 'node "8" has no class_type' in refusal(nodes)
    assert "a JSON object of nodes" in refusal([1, 2])


def test_the_workflow_name_comes_from_the_file_name() -> None:
    assert workflow_name("My Portrait_api.json") == "my-portrait"
    assert workflow_name("/x/workflow_api.json") == "workflow"
    assert workflow_name("ÉTÉ v2.json") == "ete-v2"
    assert workflow_name("___.json") == "workflow"


# -- the proposals load, bind and fit a ComfyUI ----------------------------------------


def write_all(folder: Path) -> list[Template]:
    folder.mkdir(parents=True, exist_ok=True)
    templates = []
    for file in ACCEPTED:
        shutil.copy(EXPORTED / file, folder / file)
        manifest = proposal(file).manifest
        path = folder / f"{manifest['name']}.manifest.json"
        path.write_text(json.dumps(manifest, indent=2), encoding="utf-8")
        templates.append(Template.load(path))
    return templates


def job_values(template: Template) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name, param in template.manifest.params.items():
        if param.type == "image":
            values[name] = IMAGE_KEY
        elif name == "prompt":
            values[name] = 'a "quoted" prompt ["6", 0]'
        elif name == "seed":
            values[name] = 99
        elif param.type == "float" and param.max is not None:
            values[name] = float(param.max)
        elif param.type == "int" and param.min is not None:
            values[name] = int(param.min)
    return values


@pytest.mark.parametrize("file", ACCEPTED)
def test_binding_a_job_changes_only_the_bound_literals(tmp_path: Path, file: str) -> None:
    (template,) = [t for t in write_all(tmp_path) if t.manifest.graph == file]
    original = graph(file)
    params = template.resolve(job_values(template))
    uploaded = {n: "upload_1.png" for n, p in template.manifest.params.items() if p.type == "image"}

    bound = template.bind(params, images=uploaded)

    expected: dict[tuple[str, str], Any] = {}
    for name, param in template.manifest.params.items():
        for binding in param.bind:
            expected[(binding.node, binding.input)] = uploaded.get(name, params[name])
    assert set(bound) == set(original)
    for node_id, node in original.items():
        assert bound[node_id]["class_type"] == node["class_type"]
        assert set(bound[node_id]["inputs"]) == set(node["inputs"])
        for key, value in node["inputs"].items():
            want = expected.get((node_id, key), value)
            assert bound[node_id]["inputs"][key] == want, (node_id, key)


async def test_the_proposals_pass_the_compat_check_against_the_emulator(
    tmp_path: Path, comfyui: ComfyUIEmulator
) -> None:
    comfyui.checkpoints.append("sd_xl_refiner_1.0.safetensors")
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{comfyui.url}/object_info") as response,
    ):
        object_info = await response.json()

    templates = write_all(tmp_path)
    for template in templates:
        assert check_template(template, object_info, default_params(template)) == [], template.name

    comfyui.model_files["loras"] = ["other.safetensors"]
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{comfyui.url}/object_info/LoraLoader") as response,
    ):
        object_info |= await response.json()
    (lora,) = [t for t in templates if t.name == "txt2img-lora"]
    problems = check_template(lora, object_info, default_params(lora))
    assert [p.split(":")[0] for p in problems] == [
        "node 10 (Load LoRA, LoraLoader)",
        "node 11 (Load LoRA, LoraLoader)",
    ]
    assert (
        '"add_detail.safetensors" is not on the server (it has: other.safetensors)' in problems[0]
    )


# -- the command -----------------------------------------------------------------------


def brigade(
    cwd: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "BRIGADE_DATA_DIR": str(cwd / "data"), **(env or {})}
    for name in ("COMFYUI_URL", "AMQP_URL", "BRIGADE_WORKFLOWS_DIRS"):
        if name not in (env or {}):
            environment.pop(name, None)
    return subprocess.run(
        [sys.executable, "-m", "brigade.cli", *args],
        cwd=cwd,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


async def test_workflows_add_writes_a_manifest_that_workflows_check_accepts(
    tmp_path: Path, comfyui: ComfyUIEmulator
) -> None:
    folder = tmp_path / "mine"
    folder.mkdir()
    for file in ("img2img_api.json", "txt2img_lora_api.json"):
        shutil.copy(EXPORTED / file, folder / file)

    added = await asyncio.to_thread(
        brigade, tmp_path, "workflows", "add", str(folder / "img2img_api.json")
    )
    named = await asyncio.to_thread(
        brigade,
        tmp_path,
        "workflows",
        "add",
        str(folder / "txt2img_lora_api.json"),
        "--name",
        "lighthouse",
    )
    again = await asyncio.to_thread(
        brigade, tmp_path, "workflows", "add", str(folder / "img2img_api.json")
    )
    checked = await asyncio.to_thread(
        brigade,
        tmp_path,
        "workflows",
        "check",
        "--comfyui-url",
        comfyui.url,
        env={"BRIGADE_WORKFLOWS_DIRS": str(folder)},
    )

    assert added.returncode == 0, added.stderr
    assert "  image       image, required" in added.stdout
    assert "-> node 10 (Load Image, LoadImage) image" in added.stdout
    assert 'node 3 (KSampler): sampler_name "euler_ancestral", scheduler "normal"' in added.stdout
    assert f"wrote {folder / 'img2img.manifest.json'}" in added.stdout
    manifest = json.loads((folder / "img2img.manifest.json").read_text(encoding="utf-8"))
    assert manifest["graph"] == "img2img_api.json" and manifest["backends"] == ["comfyui"]
    assert named.returncode == 0, named.stderr
    assert (folder / "lighthouse.manifest.json").is_file()
    assert again.returncode == 2
    assert "img2img.manifest.json exists; give --force" in again.stderr
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "img2img: ok" in checked.stdout and "lighthouse: ok" in checked.stdout


def test_workflows_add_refuses_with_the_reason_and_writes_nothing(tmp_path: Path) -> None:
    shutil.copy(EXPORTED / "ui_format.json", tmp_path / "ui_format.json")

    done = brigade(tmp_path, "workflows", "add", str(tmp_path / "ui_format.json"))

    assert done.returncode == 2
    assert "this is a UI-format workflow" in done.stderr and "Save (API)" in done.stderr
    assert "Traceback" not in done.stderr
    assert list(tmp_path.glob("*.manifest.json")) == []
