"""Templates checked against a server's /object_info (the recorded one, extended)."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from tests.recordings import recording
from workflows import Catalog
from workflows.compat import check_template, default_params


@pytest.fixture
def object_info() -> dict[str, Any]:
    """The recorded KSampler and CheckpointLoaderSimple, plus the other SD1.5 nodes."""
    stats = recording("stats.json")
    info: dict[str, Any] = {}
    for cls in ("KSampler", "CheckpointLoaderSimple"):
        info.update(stats[f"/object_info/{cls}"]["json"])
    info["CLIPTextEncode"] = {
        "input": {"required": {"text": ["STRING", {"multiline": True}], "clip": ["CLIP", {}]}},
        "output": ["CONDITIONING"],
    }
    info["EmptyLatentImage"] = {
        "input": {
            "required": {
                "width": ["INT", {"default": 512, "min": 16, "max": 16384, "step": 8}],
                "height": ["INT", {"default": 512, "min": 16, "max": 16384, "step": 8}],
                "batch_size": ["INT", {"default": 1, "min": 1, "max": 4096}],
            }
        },
        "output": ["LATENT"],
    }
    info["VAEDecode"] = {
        "input": {"required": {"samples": ["LATENT", {}], "vae": ["VAE", {}]}},
        "output": ["IMAGE"],
    }
    info["SaveImage"] = {
        "input": {"required": {"images": ["IMAGE", {}], "filename_prefix": ["STRING", {}]}},
        "output": [],
    }
    return info


def sd15_params(**overrides: Any) -> dict[str, Any]:
    template = Catalog.load().get("sd15-txt2img")
    return {**default_params(template), **overrides}


def test_a_template_that_fits_the_server_has_no_problems(object_info: dict[str, Any]) -> None:
    template = Catalog.load().get("sd15-txt2img")
    params = sd15_params(checkpoint="tiny_sd15_random.safetensors")

    assert check_template(template, object_info, params) == []


def test_a_checkpoint_the_server_lacks_is_named_with_what_it_has(
    object_info: dict[str, Any],
) -> None:
    template = Catalog.load().get("sd15-txt2img")

    (problem,) = check_template(template, object_info)

    assert problem.startswith("node 4 (Load Checkpoint, CheckpointLoaderSimple): ckpt_name")
    assert '"v1-5-pruned-emaonly.safetensors" is not on the server' in problem
    assert "tiny_sd15_random.safetensors" in problem


def test_unknown_classes_limits_and_link_types_are_reported(object_info: dict[str, Any]) -> None:
    info = copy.deepcopy(object_info)
    del info["SaveImage"]
    info["KSampler"]["input"]["required"]["steps"][1]["max"] = 10
    info["VAEDecode"]["input"]["required"]["vae"] = ["CLIP", {}]
    template = Catalog.load().get("sd15-txt2img")

    problems = check_template(
        template, info, sd15_params(checkpoint="tiny_sd15_random.safetensors")
    )

    assert any("has no node class 'SaveImage'" in p for p in problems)
    assert any("steps 25 is above the server's maximum 10" in p for p in problems)
    assert any("vae expects CLIP but node 4 output 2 gives VAE" in p for p in problems)


def test_a_missing_required_input_is_reported(object_info: dict[str, Any]) -> None:
    info = copy.deepcopy(object_info)
    info["KSampler"]["input"]["required"]["eta"] = ["FLOAT", {}]
    template = Catalog.load().get("sd15-txt2img")

    problems = check_template(
        template, info, sd15_params(checkpoint="tiny_sd15_random.safetensors")
    )

    assert problems == ["node 3 (KSampler, KSampler): required input 'eta' is missing"]
