"""A ComfyUI server for tests: ComfyUI's HTTP and WebSocket protocol, without models.

``ComfyUIEmulator`` answers the routes a client of a headless ComfyUI uses, with the
bodies, status codes, content types and WebSocket frame order of a real ComfyUI 0.8.0 as
recorded in ``/work/shared/comfyui/recordings`` (``tests/test_comfyui_emulator.py``
replays those recordings against it). What it copies from ComfyUI, and how:

- ``POST /prompt`` validates the graph with the same walk as ComfyUI's
  ``validate_prompt``/``validate_inputs`` (same error types, messages, ``node_errors``
  and ``dependent_outputs``) against ``NODES``, a registry of the core nodes in
  ``/object_info`` format.
- One prompt runs at a time, taken from a priority queue (``number``; ``front`` puts a
  prompt first), in a background task. Nodes run in ComfyUI's order (its topological
  sort and "ux friendly" pick), and a node whose inputs (its whole upstream graph) match
  a node of the previous prompt is reported in ``execution_cached`` and not run, as with
  ComfyUI's classic cache.
- ``KSampler`` takes ``step_seconds`` per step and sends ``progress_state``, ``progress``
  and a JPEG preview per step (binary type 1 for plain clients, type 4 with JSON
  metadata for clients that negotiated ``supports_preview_metadata``). Images are
  drawn with Pillow, deterministic from the seed and the prompt text.
- Frames go to the socket whose clientId is the prompt's ``client_id``; ``status`` goes
  to every socket; a prompt without ``client_id`` broadcasts only what ComfyUI
  broadcasts (``progress_state``, ``progress``, previews, errors).

What a real ComfyUI does that this does not: no model weights or GPU (errors come from
``Faults``), no custom nodes, no subgraphs or lazy inputs, no ``/view`` ``preview`` or
``channel`` conversions, no ``/userdata``, ``/settings`` or frontend. Output files live
in memory and survive ``stop()``/``start()`` like files on disk; queue, history, cache
and loaded models do not.

Run it as a process (``python -m tests.emulators.comfyui --listen 127.0.0.1 --port
8188``) to stand in for ``python main.py`` of ComfyUI; see ``main``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import hashlib
import heapq
import io
import json
import logging
import mimetypes
import posixpath
import random
import re
import signal
import struct
import sys
import time
import traceback
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web
from PIL import Image, ImageFilter, ImageOps
from PIL.PngImagePlugin import PngInfo

log = logging.getLogger(__name__)

COMFYUI_VERSION = "0.8.0"
MAX_RESOLUTION = 16384
# ComfyUI's default --max-upload-size (100 MB) in bytes, as /features reports it.
MAX_UPLOAD_SIZE = 104857600
# Kept in history by ComfyUI; the oldest entries go first past this many.
MAXIMUM_HISTORY_SIZE = 10000
# ComfyUI moves these out of extra_data before it queues or records a prompt.
SENSITIVE_EXTRA_DATA_KEYS = ("auth_token_comfy_org", "api_key_comfy_org")
SERVER_FEATURES: dict[str, Any] = {
    "supports_preview_metadata": True,
    "max_upload_size": MAX_UPLOAD_SIZE,
    "extension": {"manager": {"supports_v4": True}},
}
# Binary WebSocket event types (ComfyUI's protocol.BinaryEventTypes).
PREVIEW_IMAGE = 1
PREVIEW_IMAGE_WITH_METADATA = 4
# The model folders of ComfyUI 0.8.0, in its order (GET /models).
MODEL_FOLDERS = (
    "checkpoints",
    "configs",
    "loras",
    "vae",
    "text_encoders",
    "diffusion_models",
    "clip_vision",
    "style_models",
    "embeddings",
    "diffusers",
    "vae_approx",
    "controlnet",
    "gligen",
    "upscale_models",
    "latent_upscale_models",
    "custom_nodes",
    "hypernetworks",
    "photomaker",
    "classifiers",
    "model_patches",
    "audio_encoders",
)
DEFAULT_CHECKPOINTS = (
    "v1-5-pruned-emaonly.safetensors",
    "sd_xl_base_1.0.safetensors",
    "flux1-schnell-fp8.safetensors",
    "tiny_sd15_random.safetensors",
)
DEFAULT_DIFFUSION_MODELS = ("flux1-dev.safetensors", "flux1-schnell.safetensors")
DEFAULT_TEXT_ENCODERS = (
    "clip_l.safetensors",
    "t5xxl_fp16.safetensors",
    "t5xxl_fp8_e4m3fn.safetensors",
)
DEFAULT_VAES = ("ae.safetensors", "sdxl_vae.safetensors")
SAMPLERS = (
    "euler",
    "euler_cfg_pp",
    "euler_ancestral",
    "euler_ancestral_cfg_pp",
    "heun",
    "heunpp2",
    "exp_heun_2_x0",
    "exp_heun_2_x0_sde",
    "dpm_2",
    "dpm_2_ancestral",
    "lms",
    "dpm_fast",
    "dpm_adaptive",
    "dpmpp_2s_ancestral",
    "dpmpp_2s_ancestral_cfg_pp",
    "dpmpp_sde",
    "dpmpp_sde_gpu",
    "dpmpp_2m",
    "dpmpp_2m_cfg_pp",
    "dpmpp_2m_sde",
    "dpmpp_2m_sde_gpu",
    "dpmpp_2m_sde_heun",
    "dpmpp_2m_sde_heun_gpu",
    "dpmpp_3m_sde",
    "dpmpp_3m_sde_gpu",
    "ddpm",
    "lcm",
    "ipndm",
    "ipndm_v",
    "deis",
    "res_multistep",
    "res_multistep_cfg_pp",
    "res_multistep_ancestral",
    "res_multistep_ancestral_cfg_pp",
    "gradient_estimation",
    "gradient_estimation_cfg_pp",
    "er_sde",
    "seeds_2",
    "seeds_3",
    "sa_solver",
    "sa_solver_pece",
    "ddim",
    "uni_pc",
    "uni_pc_bh2",
)
SCHEDULERS = (
    "simple",
    "sgm_uniform",
    "karras",
    "exponential",
    "ddim_uniform",
    "beta",
    "normal",
    "linear_quadratic",
    "kl_optimal",
)
# What a model of each family takes in VRAM once loaded, by a substring of its name.
MODEL_SIZES = (("flux", 12 * 2**30), ("xl", 7 * 2**30), ("", 2 * 2**30))
_UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_ANNOTATION_RE = re.compile(r"^(.*) \[(input|output|temp)\]$")
_INTERNAL_ERROR = "500 Internal Server Error\n\nServer got itself in trouble"
_OOM_TIPS = (
    "This error means you ran out of memory on your GPU.\n\n"
    "TIPS: If the workflow worked before you might have accidentally set the batch_size "
    "to a large number."
)


# -- the node registry -----------------------------------------------------------------


def _v1_node(
    name: str,
    *,
    inputs: dict[str, Any],
    outputs: Sequence[str],
    category: str,
    display_name: str | None = None,
    description: str = "",
    output_node: bool = False,
    output_tooltips: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Node info as ComfyUI's ``node_info`` builds it for a classic (V1) node class."""
    info: dict[str, Any] = {
        "input": inputs,
        "input_order": {kind: list(specs) for kind, specs in inputs.items()},
        "output": list(outputs),
        "output_is_list": [False] * len(outputs),
        "output_name": list(outputs),
        "name": name,
        "display_name": display_name or name,
        "description": description,
        "python_module": "nodes",
        "category": category,
        "output_node": output_node,
    }
    if output_tooltips is not None:
        info["output_tooltips"] = list(output_tooltips)
    return info


def _v3_node(
    name: str,
    *,
    inputs: dict[str, Any],
    outputs: Sequence[str],
    category: str,
    python_module: str,
    display_name: str | None = None,
) -> dict[str, Any]:
    """Node info as ComfyUI 0.8.0 serves a schema (V3) node: a few more keys, fixed order."""
    return {
        "input": inputs,
        "input_order": {kind: list(specs) for kind, specs in inputs.items()},
        "output": list(outputs),
        "output_is_list": [False] * len(outputs),
        "output_name": list(outputs),
        "output_tooltips": [None] * len(outputs),
        "output_matchtypes": None,
        "name": name,
        "display_name": display_name,
        "description": "",
        "python_module": python_module,
        "category": category,
        "output_node": False,
        "deprecated": False,
        "experimental": False,
        "api_node": False,
    }


_SAVE_HIDDEN = {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}

NODES: dict[str, dict[str, Any]] = {
    "CheckpointLoaderSimple": _v1_node(
        "CheckpointLoaderSimple",
        inputs={
            "required": {
                "ckpt_name": [
                    sorted(DEFAULT_CHECKPOINTS),
                    {"tooltip": "The name of the checkpoint (model) to load."},
                ]
            }
        },
        outputs=("MODEL", "CLIP", "VAE"),
        category="loaders",
        display_name="Load Checkpoint",
        description=(
            "Loads a diffusion model checkpoint, diffusion models are used to denoise latents."
        ),
        output_tooltips=(
            "The model used for denoising latents.",
            "The CLIP model used for encoding text prompts.",
            "The VAE model used for encoding and decoding images to and from latent space.",
        ),
    ),
    "CLIPTextEncode": _v1_node(
        "CLIPTextEncode",
        inputs={
            "required": {
                "text": [
                    "STRING",
                    {
                        "multiline": True,
                        "dynamicPrompts": True,
                        "tooltip": "The text to be encoded.",
                    },
                ],
                "clip": ["CLIP", {"tooltip": "The CLIP model used for encoding the text."}],
            }
        },
        outputs=("CONDITIONING",),
        category="conditioning",
        display_name="CLIP Text Encode (Prompt)",
        description=(
            "Encodes a text prompt using a CLIP model into an embedding that can be used to "
            "guide the diffusion model towards generating specific images."
        ),
        output_tooltips=(
            "A conditioning containing the embedded text used to guide the diffusion model.",
        ),
    ),
    "EmptyLatentImage": _v1_node(
        "EmptyLatentImage",
        inputs={
            "required": {
                "width": [
                    "INT",
                    {
                        "default": 512,
                        "min": 16,
                        "max": MAX_RESOLUTION,
                        "step": 8,
                        "tooltip": "The width of the latent images in pixels.",
                    },
                ],
                "height": [
                    "INT",
                    {
                        "default": 512,
                        "min": 16,
                        "max": MAX_RESOLUTION,
                        "step": 8,
                        "tooltip": "The height of the latent images in pixels.",
                    },
                ],
                "batch_size": [
                    "INT",
                    {
                        "default": 1,
                        "min": 1,
                        "max": 4096,
                        "tooltip": "The number of latent images in the batch.",
                    },
                ],
            }
        },
        outputs=("LATENT",),
        category="latent",
        display_name="Empty Latent Image",
        description="Create a new batch of empty latent images to be denoised via sampling.",
        output_tooltips=("The empty latent image batch.",),
    ),
    "EmptySD3LatentImage": _v3_node(
        "EmptySD3LatentImage",
        inputs={
            "required": {
                "width": ["INT", {"default": 1024, "min": 16, "max": MAX_RESOLUTION, "step": 16}],
                "height": ["INT", {"default": 1024, "min": 16, "max": MAX_RESOLUTION, "step": 16}],
                "batch_size": ["INT", {"default": 1, "min": 1, "max": 4096}],
            }
        },
        outputs=("LATENT",),
        category="latent/sd3",
        python_module="comfy_extras.nodes_sd3",
    ),
    "KSampler": _v1_node(
        "KSampler",
        inputs={
            "required": {
                "model": ["MODEL", {"tooltip": "The model used for denoising the input latent."}],
                "seed": [
                    "INT",
                    {
                        "default": 0,
                        "min": 0,
                        "max": 18446744073709551615,
                        "control_after_generate": True,
                        "tooltip": "The random seed used for creating the noise.",
                    },
                ],
                "steps": [
                    "INT",
                    {
                        "default": 20,
                        "min": 1,
                        "max": 10000,
                        "tooltip": "The number of steps used in the denoising process.",
                    },
                ],
                "cfg": [
                    "FLOAT",
                    {
                        "default": 8.0,
                        "min": 0.0,
                        "max": 100.0,
                        "step": 0.1,
                        "round": 0.01,
                        "tooltip": (
                            "The Classifier-Free Guidance scale balances creativity and "
                            "adherence to the prompt. Higher values result in images more "
                            "closely matching the prompt however too high values will "
                            "negatively impact quality."
                        ),
                    },
                ],
                "sampler_name": [
                    list(SAMPLERS),
                    {
                        "tooltip": (
                            "The algorithm used when sampling, this can affect the quality, "
                            "speed, and style of the generated output."
                        )
                    },
                ],
                "scheduler": [
                    list(SCHEDULERS),
                    {
                        "tooltip": (
                            "The scheduler controls how noise is gradually removed to form "
                            "the image."
                        )
                    },
                ],
                "positive": [
                    "CONDITIONING",
                    {
                        "tooltip": (
                            "The conditioning describing the attributes you want to include "
                            "in the image."
                        )
                    },
                ],
                "negative": [
                    "CONDITIONING",
                    {
                        "tooltip": (
                            "The conditioning describing the attributes you want to exclude "
                            "from the image."
                        )
                    },
                ],
                "latent_image": ["LATENT", {"tooltip": "The latent image to denoise."}],
                "denoise": [
                    "FLOAT",
                    {
                        "default": 1.0,
                        "min": 0.0,
                        "max": 1.0,
                        "step": 0.01,
                        "tooltip": (
                            "The amount of denoising applied, lower values will maintain the "
                            "structure of the initial image allowing for image to image "
                            "sampling."
                        ),
                    },
                ],
            }
        },
        outputs=("LATENT",),
        category="sampling",
        display_name="KSampler",
        description=(
            "Uses the provided model, positive and negative conditioning to denoise the "
            "latent image."
        ),
        output_tooltips=("The denoised latent.",),
    ),
    "VAEDecode": _v1_node(
        "VAEDecode",
        inputs={
            "required": {
                "samples": ["LATENT", {"tooltip": "The latent to be decoded."}],
                "vae": ["VAE", {"tooltip": "The VAE model used for decoding the latent."}],
            }
        },
        outputs=("IMAGE",),
        category="latent",
        display_name="VAE Decode",
        description="Decodes latent images back into pixel space images.",
        output_tooltips=("The decoded image.",),
    ),
    "SaveImage": _v1_node(
        "SaveImage",
        inputs={
            "required": {
                "images": ["IMAGE", {"tooltip": "The images to save."}],
                "filename_prefix": [
                    "STRING",
                    {
                        "default": "ComfyUI",
                        "tooltip": (
                            "The prefix for the file to save. This may include formatting "
                            "information such as %date:yyyy-MM-dd% or %Empty Latent "
                            "Image.width% to include values from nodes."
                        ),
                    },
                ],
            },
            "hidden": dict(_SAVE_HIDDEN),
        },
        outputs=(),
        category="image",
        display_name="Save Image",
        description="Saves the input images to your ComfyUI output directory.",
        output_node=True,
    ),
    "PreviewImage": _v1_node(
        "PreviewImage",
        inputs={"required": {"images": ["IMAGE"]}, "hidden": dict(_SAVE_HIDDEN)},
        outputs=(),
        category="image",
        display_name="Preview Image",
        description="Saves the input images to your ComfyUI output directory.",
        output_node=True,
    ),
    "EmptyImage": _v1_node(
        "EmptyImage",
        inputs={
            "required": {
                "width": ["INT", {"default": 512, "min": 1, "max": MAX_RESOLUTION, "step": 1}],
                "height": ["INT", {"default": 512, "min": 1, "max": MAX_RESOLUTION, "step": 1}],
                "batch_size": ["INT", {"default": 1, "min": 1, "max": 4096}],
                "color": [
                    "INT",
                    {"default": 0, "min": 0, "max": 0xFFFFFF, "step": 1, "display": "color"},
                ],
            }
        },
        outputs=("IMAGE",),
        category="image",
    ),
    "ImageBlur": _v3_node(
        "ImageBlur",
        inputs={
            "required": {
                "image": ["IMAGE", {}],
                "blur_radius": ["INT", {"default": 1, "min": 1, "max": 31, "step": 1}],
                "sigma": ["FLOAT", {"default": 1.0, "min": 0.1, "max": 10.0, "step": 0.1}],
            }
        },
        outputs=("IMAGE",),
        category="image/postprocessing",
        python_module="comfy_extras.nodes_post_processing",
    ),
    "PrimitiveInt": _v3_node(
        "PrimitiveInt",
        inputs={
            "required": {
                "value": [
                    "INT",
                    {
                        "min": -9223372036854775807,
                        "max": 9223372036854775807,
                        "control_after_generate": True,
                    },
                ]
            }
        },
        outputs=("INT",),
        category="utils/primitive",
        python_module="comfy_extras.nodes_primitive",
        display_name="Int",
    ),
    "PrimitiveStringMultiline": _v3_node(
        "PrimitiveStringMultiline",
        inputs={"required": {"value": ["STRING", {"multiline": True}]}},
        outputs=("STRING",),
        category="utils/primitive",
        python_module="comfy_extras.nodes_primitive",
        display_name="String (Multiline)",
    ),
    "LoadImage": _v1_node(
        "LoadImage",
        inputs={"required": {"image": [[], {"image_upload": True}]}},
        outputs=("IMAGE", "MASK"),
        category="image",
        display_name="Load Image",
    ),
    "UNETLoader": _v1_node(
        "UNETLoader",
        inputs={
            "required": {
                "unet_name": [sorted(DEFAULT_DIFFUSION_MODELS)],
                "weight_dtype": [["default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2"]],
            }
        },
        outputs=("MODEL",),
        category="advanced/loaders",
        display_name="Load Diffusion Model",
    ),
    "DualCLIPLoader": _v1_node(
        "DualCLIPLoader",
        inputs={
            "required": {
                "clip_name1": [sorted(DEFAULT_TEXT_ENCODERS)],
                "clip_name2": [sorted(DEFAULT_TEXT_ENCODERS)],
                "type": [["sdxl", "sd3", "flux", "hunyuan_video", "hidream", "hunyuan_image"]],
            },
            "optional": {"device": [["default", "cpu"], {"advanced": True}]},
        },
        outputs=("CLIP",),
        category="advanced/loaders",
        description=(
            "[Recipes]\n\nsdxl: clip-l, clip-g\nsd3: clip-l, clip-g / clip-l, t5 / clip-g, t5\n"
            "flux: clip-l, t5\nhidream: at least one of t5 or llama, recommended t5 and llama\n"
            "hunyuan_image: qwen2.5vl 7b and byt5 small"
        ),
    ),
    "VAELoader": _v1_node(
        "VAELoader",
        inputs={"required": {"vae_name": [[*sorted(DEFAULT_VAES), "pixel_space"]]}},
        outputs=("VAE",),
        category="loaders",
        display_name="Load VAE",
    ),
}

# Image-input nodes (img2img and upscale templates), as nodes.py defines them.
UPSCALE_METHODS = ["nearest-exact", "bilinear", "area", "bicubic", "lanczos"]
NODES["VAEEncode"] = _v1_node(
    "VAEEncode",
    inputs={"required": {"pixels": ["IMAGE"], "vae": ["VAE"]}},
    outputs=("LATENT",),
    category="latent",
    display_name="VAE Encode",
)
NODES["ImageScaleBy"] = _v1_node(
    "ImageScaleBy",
    inputs={
        "required": {
            "image": ["IMAGE"],
            "upscale_method": [list(UPSCALE_METHODS)],
            "scale_by": ["FLOAT", {"default": 1.0, "min": 0.01, "max": 8.0, "step": 0.01}],
        }
    },
    outputs=("IMAGE",),
    category="image/upscaling",
    display_name="Upscale Image By",
)

# Combo inputs whose values are files: (class, input) -> the folder that lists them.
FOLDER_INPUTS: dict[tuple[str, str], str] = {
    ("CheckpointLoaderSimple", "ckpt_name"): "checkpoints",
    ("UNETLoader", "unet_name"): "diffusion_models",
    ("DualCLIPLoader", "clip_name1"): "text_encoders",
    ("DualCLIPLoader", "clip_name2"): "text_encoders",
    ("VAELoader", "vae_name"): "vae",
    ("LoadImage", "image"): "input",
}

# Loaders and nodes of imported workflows (``brigade workflows add``), as ComfyUI 0.8.0
# serves them in /object_info so ``workflows check`` can judge graphs that use them.
# They have no runner here: a prompt that reaches one fails as it runs.
_STRENGTH = {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01}
NODES.update(
    {
        "LoraLoader": _v1_node(
            "LoraLoader",
            inputs={
                "required": {
                    "model": [
                        "MODEL",
                        {"tooltip": "The diffusion model the LoRA will be applied to."},
                    ],
                    "clip": ["CLIP", {"tooltip": "The CLIP model the LoRA will be applied to."}],
                    "lora_name": [[], {"tooltip": "The name of the LoRA."}],
                    "strength_model": [
                        "FLOAT",
                        {
                            **_STRENGTH,
                            "tooltip": "How strongly to modify the diffusion model. This value"
                            " can be negative.",
                        },
                    ],
                    "strength_clip": [
                        "FLOAT",
                        {
                            **_STRENGTH,
                            "tooltip": "How strongly to modify the CLIP model. This value can"
                            " be negative.",
                        },
                    ],
                }
            },
            outputs=("MODEL", "CLIP"),
            category="loaders",
            display_name="Load LoRA",
            description=(
                "LoRAs are used to modify diffusion and CLIP models, altering the way in which"
                " latents are denoised such as applying styles. Multiple LoRA nodes can be"
                " linked together."
            ),
            output_tooltips=("The modified diffusion model.", "The modified CLIP model."),
        ),
        "LoraLoaderModelOnly": _v1_node(
            "LoraLoaderModelOnly",
            inputs={
                "required": {
                    "model": ["MODEL"],
                    "lora_name": [[]],
                    "strength_model": ["FLOAT", dict(_STRENGTH)],
                }
            },
            outputs=("MODEL",),
            category="loaders",
        ),
        "ControlNetLoader": _v1_node(
            "ControlNetLoader",
            inputs={"required": {"control_net_name": [[]]}},
            outputs=("CONTROL_NET",),
            category="loaders",
            display_name="Load ControlNet Model",
        ),
        "ControlNetApplyAdvanced": {
            **_v1_node(
                "ControlNetApplyAdvanced",
                inputs={
                    "required": {
                        "positive": ["CONDITIONING"],
                        "negative": ["CONDITIONING"],
                        "control_net": ["CONTROL_NET"],
                        "image": ["IMAGE"],
                        "strength": [
                            "FLOAT",
                            {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01},
                        ],
                        "start_percent": [
                            "FLOAT",
                            {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001},
                        ],
                        "end_percent": [
                            "FLOAT",
                            {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.001},
                        ],
                    },
                    "optional": {"vae": ["VAE"]},
                },
                outputs=("CONDITIONING", "CONDITIONING"),
                category="conditioning/controlnet",
                display_name="Apply ControlNet",
            ),
            "output_name": ["positive", "negative"],
        },
        "UpscaleModelLoader": _v3_node(
            "UpscaleModelLoader",
            inputs={"required": {"model_name": [[], {}]}},
            outputs=("UPSCALE_MODEL",),
            category="loaders",
            python_module="comfy_extras.nodes_upscale_model",
            display_name="Load Upscale Model",
        ),
        "ImageUpscaleWithModel": _v3_node(
            "ImageUpscaleWithModel",
            inputs={"required": {"upscale_model": ["UPSCALE_MODEL", {}], "image": ["IMAGE", {}]}},
            outputs=("IMAGE",),
            category="image/upscaling",
            python_module="comfy_extras.nodes_upscale_model",
            display_name="Upscale Image (using Model)",
        ),
        "KSamplerAdvanced": _v1_node(
            "KSamplerAdvanced",
            inputs={
                "required": {
                    "model": ["MODEL"],
                    "add_noise": [["enable", "disable"]],
                    "noise_seed": [
                        "INT",
                        {
                            "default": 0,
                            "min": 0,
                            "max": 18446744073709551615,
                            "control_after_generate": True,
                        },
                    ],
                    "steps": ["INT", {"default": 20, "min": 1, "max": 10000}],
                    "cfg": [
                        "FLOAT",
                        {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01},
                    ],
                    "sampler_name": [list(SAMPLERS)],
                    "scheduler": [list(SCHEDULERS)],
                    "positive": ["CONDITIONING"],
                    "negative": ["CONDITIONING"],
                    "latent_image": ["LATENT"],
                    "start_at_step": ["INT", {"default": 0, "min": 0, "max": 10000}],
                    "end_at_step": ["INT", {"default": 10000, "min": 0, "max": 10000}],
                    "return_with_leftover_noise": [["disable", "enable"]],
                }
            },
            outputs=("LATENT",),
            category="sampling",
            display_name="KSampler (Advanced)",
        ),
        "LatentUpscaleBy": _v1_node(
            "LatentUpscaleBy",
            inputs={
                "required": {
                    "samples": ["LATENT"],
                    "upscale_method": [["nearest-exact", "bilinear", "area", "bicubic", "bislerp"]],
                    "scale_by": [
                        "FLOAT",
                        {"default": 1.5, "min": 0.01, "max": 8.0, "step": 0.01},
                    ],
                }
            },
            outputs=("LATENT",),
            category="latent",
            display_name="Upscale Latent By",
        ),
    }
)
FOLDER_INPUTS.update(
    {
        ("LoraLoader", "lora_name"): "loras",
        ("LoraLoaderModelOnly", "lora_name"): "loras",
        ("ControlNetLoader", "control_net_name"): "controlnet",
        ("UpscaleModelLoader", "model_name"): "upscale_models",
    }
)
#: Files in the other model folders (``ComfyUIEmulator.model_files``).
DEFAULT_MODEL_FILES: dict[str, tuple[str, ...]] = {
    "loras": ("add_detail.safetensors", "film_grain_style.safetensors"),
    "controlnet": ("control_v11p_sd15_openpose.pth",),
    "upscale_models": ("4x-UltraSharp.pth",),
}


# -- tracebacks ComfyUI puts in its errors ---------------------------------------------


def _frame(path: str, line: int, func: str, code: str, mark: tuple[str, int, int] | None) -> str:
    """One ``traceback.format_tb`` entry of a ComfyUI file, caret line included.

    ``mark`` is (where the marked expression starts, its length or 0 for "to the end",
    how many of its first characters are ``~``), as Python 3.11 draws it.
    """
    text = f'  File "/opt/ComfyUI/{path}", line {line}, in {func}\n    {code}\n'
    if mark is not None:
        start_text, length, tildes = mark
        start = code.index(start_text)
        length = length or len(code) - start
        text += " " * (4 + start) + "~" * tildes + "^" * (length - tildes) + "\n"
    return text


_EXECUTE_FRAMES = [
    _frame(
        "execution.py",
        518,
        "execute",
        "output_data, output_ui, has_subgraph, has_pending_tasks = await get_output_data("
        "prompt_id, unique_id, obj, input_data_all, execution_block_cb=execution_block_cb, "
        "pre_execute_cb=pre_execute_cb, v3_data=v3_data)",
        ("await get_output_data(", 0, 0),
    ),
    _frame(
        "execution.py",
        329,
        "get_output_data",
        "return_values = await _async_map_node_over_list(prompt_id, unique_id, obj, "
        "input_data_all, obj.FUNCTION, allow_interrupt=True, "
        "execution_block_cb=execution_block_cb, pre_execute_cb=pre_execute_cb, v3_data=v3_data)",
        ("await _async_map", 0, 0),
    ),
    _frame(
        "execution.py",
        303,
        "_async_map_node_over_list",
        "await process_inputs(input_dict, i)",
        None,
    ),
    _frame("execution.py", 291, "process_inputs", "result = f(**inputs)", ("f(**inputs)", 0, 0)),
]
# The run-time error recorded in errors.json (runtime_error_run): a checkpoint that is
# not a safetensors file, failing in CheckpointLoaderSimple.
LOAD_ERROR_TYPE = "safetensors._safetensors_rust.SafetensorError"
LOAD_ERROR_MESSAGE = "Error while deserializing header: header too large"
LOAD_ERROR_TRACEBACK = [
    *_EXECUTE_FRAMES,
    _frame(
        "nodes.py",
        585,
        "load_checkpoint",
        "out = comfy.sd.load_checkpoint_guess_config(ckpt_path, output_vae=True, "
        'output_clip=True, embedding_directory=folder_paths.get_folder_paths("embeddings"))',
        ("comfy.sd.", 0, 0),
    ),
    _frame(
        "comfy/sd.py",
        1348,
        "load_checkpoint_guess_config",
        "sd, metadata = comfy.utils.load_torch_file(ckpt_path, return_metadata=True)",
        ("comfy.utils", 0, 0),
    ),
    _frame("comfy/utils.py", 80, "load_torch_file", "raise e", None),
    _frame(
        "comfy/utils.py",
        64,
        "load_torch_file",
        'with safetensors.safe_open(ckpt, framework="pt", device=device.type) as f:',
        ("safetensors.", 63, 0),
    ),
]
# Not recorded (the recordings ran on a CPU): modelled on ComfyUI's KSampler call chain
# and on the message PyTorch's cudaMallocAsync allocator raises.
OOM_ERROR_TYPE = "torch.OutOfMemoryError"
OOM_TRACEBACK = [
    *_EXECUTE_FRAMES,
    _frame(
        "nodes.py",
        1572,
        "sample",
        "return common_ksampler(model, seed, steps, cfg, sampler_name, scheduler, positive, "
        "negative, latent_image, denoise=denoise)",
        ("common_ksampler(", 0, 0),
    ),
    _frame(
        "nodes.py",
        1505,
        "common_ksampler",
        "samples = comfy.sample.sample(model, noise, steps, cfg, sampler_name, scheduler, "
        "positive, negative, latent_image,",
        None,
    ),
    _frame(
        "comfy/samplers.py",
        1163,
        "sample",
        "return cfg_guider.sample(noise, latent_image, sampler, sigmas, denoise_mask, "
        "callback, disable_pbar, seed)",
        ("cfg_guider.sample(", 0, 0),
    ),
    _frame(
        "comfy/ldm/modules/attention.py",
        471,
        "attention_pytorch",
        "out = comfy.ops.scaled_dot_product_attention(q, k, v, attn_mask=mask, "
        "dropout_p=0.0, is_causal=False)",
        ("comfy.ops.", 0, 0),
    ),
]
# validate_inputs' own lookups, for exception_during_(inner_)validation.
_VALIDATE_RECURSE_FRAME = _frame(
    "execution.py",
    838,
    "validate_inputs",
    "r = await validate_inputs(prompt_id, prompt, o_id, validated)",
    ("await", 0, 0),
)
_VALIDATE_PROMPT_FRAME = _frame(
    "execution.py",
    1062,
    "validate_prompt",
    "m = await validate_inputs(prompt_id, prompt, o, validated)",
    ("await", 0, 0),
)
_LINKED_CLASS_FRAME = _frame(
    "execution.py",
    818,
    "validate_inputs",
    "o_class_type = prompt[o_id]['class_type']",
    ("prompt[", 12, 6),
)
_LINKED_TYPE_FRAME = _frame(
    "execution.py", 820, "validate_inputs", "received_type = r[val[1]]", ("r[", 9, 1)
)
_INPUTS_FRAME = _frame(
    "execution.py",
    767,
    "validate_inputs",
    "inputs = prompt[unique_id]['inputs']",
    ("prompt[", 0, 17),
)


# -- faults ----------------------------------------------------------------------------


@dataclass
class Faults:
    """Failures the next prompts meet; tests set these on ``ComfyUIEmulator.faults``.

    A fault fires at the first point where it applies (a KSampler that runs for
    ``oom_next`` and ``hang_next``, any node that runs for ``error_next``) and counts down
    then; prompts that never reach such a point (everything cached, no sampler) leave it
    armed. ``drop_ws_at_step`` and ``crash_at_step`` fire once, after that step's frames
    have been sent, and reset to ``None``.
    """

    oom_next: int = 0
    hang_next: int = 0
    drop_ws_at_step: int | None = None
    crash_at_step: int | None = None
    error_next: int = 0


# -- values that flow between emulated nodes -------------------------------------------


def _address(name: str) -> str:
    return "0x7f" + hashlib.sha1(name.encode()).hexdigest()[:10]


@dataclass(frozen=True)
class _Model:
    name: str

    def __str__(self) -> str:
        return f"<comfy.model_patcher.ModelPatcher object at {_address(self.name)}>"


@dataclass(frozen=True)
class _Clip:
    names: tuple[str, ...]

    def __str__(self) -> str:
        return f"<comfy.sd.CLIP object at {_address(','.join(self.names))}>"


@dataclass(frozen=True)
class _Vae:
    name: str

    def __str__(self) -> str:
        return f"<comfy.sd.VAE object at {_address(self.name)}>"


@dataclass(frozen=True)
class _Conditioning:
    text: str

    def __str__(self) -> str:
        return "[[tensor([[[-0.3884,  0.0229, -0.0523,  ...]]]), {'pooled_output': tensor(...)}]]"


@dataclass(frozen=True)
class _Latent:
    width: int
    height: int
    batch: int
    seed: int | None = None
    label: str = ""

    def __str__(self) -> str:
        shape = f"[{self.batch}, 4, {self.height // 8}, {self.width // 8}]"
        return "{'samples': tensor([[[[0., 0., 0.,  ..., 0., 0., 0.]]]]) " + shape + "}"


@dataclass(frozen=True, eq=False)
class _Images:
    frames: tuple[Image.Image, ...]

    def __str__(self) -> str:
        width, height = self.frames[0].size if self.frames else (0, 0)
        return f"tensor([[[[0.2000, 0.4000, 0.8000]]]]) [{len(self.frames)}, {height}, {width}, 3]"


_NodeResult = tuple[tuple[Any, ...], dict[str, Any] | None]


class _Interrupted(Exception):
    """The running prompt was interrupted (ComfyUI's InterruptProcessingException)."""


class _NodeError(Exception):
    """A node failed the way a ComfyUI node raises: a type name, a message, a traceback."""

    def __init__(self, exception_type: str, message: str, frames: list[str]) -> None:
        super().__init__(message)
        self.exception_type = exception_type
        self.message = message
        self.frames = frames


class _LookupFailure(Exception):
    """One of validate_inputs' lookups raised; carries ComfyUI's frame for that line."""

    def __init__(self, error: Exception, frame: str) -> None:
        super().__init__(str(error))
        self.error = error
        self.frame = frame


def _type_name(error: BaseException) -> str:
    module = type(error).__module__
    name = type(error).__qualname__
    return name if module == "builtins" else f"{module}.{name}"


def _error(kind: str, message: str, details: str) -> dict[str, Any]:
    return {"type": kind, "message": message, "details": details, "extra_info": {}}


def _is_link(value: Any) -> bool:
    return (
        isinstance(value, list)
        and len(value) == 2
        and isinstance(value[0], str)
        and isinstance(value[1], int | float)
    )


def _types_match(received: Any, expected: Any) -> bool:
    """ComfyUI's ``validate_node_input``: equal, or comma-separated sets that overlap."""
    if received == expected:
        return True
    if not isinstance(received, str) or not isinstance(expected, str):
        return False
    received_set = {part.strip() for part in received.split(",")}
    expected_set = {part.strip() for part in expected.split(",")}
    if "*" in received_set or "*" in expected_set:
        return True
    return bool(received_set & expected_set)


def _input_specs(info: dict[str, Any]) -> list[tuple[str, str, list[Any]]]:
    """(name, "required"|"optional", [type, options]) for a node's validated inputs."""
    specs = []
    for category in ("required", "optional"):
        for name, spec in info["input"].get(category, {}).items():
            specs.append((name, category, spec))
    return specs


def _is_image_name(name: str) -> bool:
    content_type = mimetypes.guess_type(name)[0]
    return content_type is not None and content_type.startswith("image/")


def _now_ms() -> int:
    return int(time.time() * 1000)


def _annotated(name: str) -> tuple[str, str | None]:
    """ComfyUI's ``annotated_filepath``: ``"a.png [output]"`` names a file in output/."""
    match = _ANNOTATION_RE.match(name)
    if match is None:
        return name, None
    return match.group(1), match.group(2)


def _subfolder(path: str) -> str | None:
    """A normalised subfolder, or None when it leaves its folder."""
    if not path:
        return ""
    normal = posixpath.normpath(path.replace("\\", "/"))
    if normal == ".":
        return ""
    if normal.startswith("/") or normal == ".." or normal.startswith("../"):
        return None
    return normal


# -- validation ------------------------------------------------------------------------

_Validated = tuple[bool, list[dict[str, Any]], str]


class _Validator:
    """ComfyUI's ``validate_prompt`` and ``validate_inputs`` over one posted prompt.

    Values are converted in place (``"64"`` for an INT becomes ``64``), as ComfyUI does
    before it queues the prompt.
    """

    def __init__(
        self,
        prompt: dict[str, Any],
        node_info: Callable[[str], dict[str, Any]],
        image_exists: Callable[[str], bool],
        targets: list[Any] | None = None,
    ) -> None:
        self.prompt = prompt
        self.node_info = node_info
        self.image_exists = image_exists
        self.targets = targets
        self.validated: dict[str, _Validated] = {}

    def validate_prompt(self) -> tuple[bool, dict[str, Any] | None, list[str], dict[str, Any]]:
        outputs: list[str] = []
        for node_id, node in self.prompt.items():
            if not isinstance(node, dict):
                raise TypeError(f"node {node_id!r} is not an object")
            if "class_type" not in node:
                message = "Cannot execute because a node is missing the class_type property."
                return False, _error("invalid_prompt", message, f"Node ID '#{node_id}'"), [], {}
            class_type = node["class_type"]
            if class_type not in NODES:
                message = f"Cannot execute because node {class_type} does not exist."
                return False, _error("invalid_prompt", message, f"Node ID '#{node_id}'"), [], {}
            if NODES[class_type]["output_node"] and (
                self.targets is None or node_id in self.targets
            ):
                outputs.append(node_id)
        if not outputs:
            return False, _error("prompt_no_outputs", "Prompt has no outputs", ""), [], {}

        good: list[str] = []
        failed: list[tuple[str, list[dict[str, Any]]]] = []
        node_errors: dict[str, Any] = {}
        for output in outputs:
            try:
                valid, reasons, _ = self.validate_inputs(output)
            except _LookupFailure as failure:
                valid = False
                reasons = [
                    {
                        "type": "exception_during_validation",
                        "message": "Exception when validating node",
                        "details": str(failure.error),
                        "extra_info": {
                            "exception_type": _type_name(failure.error),
                            "traceback": [_VALIDATE_PROMPT_FRAME, failure.frame],
                        },
                    }
                ]
                self.validated[output] = (False, reasons, output)
            if valid:
                good.append(output)
                continue
            failed.append((output, reasons))
            for node_id, (ok, node_reasons, _) in self.validated.items():
                # Nodes downstream of a bad node are invalid with no reasons of their own:
                # ComfyUI reports only the nodes that have reasons.
                if ok or not node_reasons:
                    continue
                if node_id not in node_errors:
                    node_errors[node_id] = {
                        "errors": node_reasons,
                        "dependent_outputs": [],
                        "class_type": self.prompt[node_id]["class_type"],
                    }
                node_errors[node_id]["dependent_outputs"].append(output)
        if not good:
            details = "\n".join(
                f"{reason['message']}: {reason['details']}"
                for _, reasons in failed
                for reason in reasons
            )
            error = _error(
                "prompt_outputs_failed_validation", "Prompt outputs failed validation", details
            )
            return False, error, [], node_errors
        return True, None, good, node_errors

    def validate_inputs(self, unique_id: str) -> _Validated:
        if unique_id in self.validated:
            return self.validated[unique_id]
        node = self.prompt[unique_id]
        try:
            inputs = node["inputs"]
        except (KeyError, TypeError) as error:
            raise _LookupFailure(error, _INPUTS_FRAME) from error
        if not isinstance(inputs, dict):
            raise _LookupFailure(TypeError("'inputs' is not an object"), _INPUTS_FRAME)
        class_type = node["class_type"]
        errors: list[dict[str, Any]] = []
        valid = True
        for name, category, spec in _input_specs(self.node_info(class_type)):
            input_type = spec[0]
            options = spec[1] if len(spec) > 1 else {}
            config = [input_type, options]
            if name not in inputs:
                if category == "required":
                    errors.append(
                        {
                            "type": "required_input_missing",
                            "message": "Required input is missing",
                            "details": name,
                            "extra_info": {"input_name": name},
                        }
                    )
                continue
            value = inputs[name]
            if isinstance(value, list):
                ok = self._validate_link(name, value, input_type, config, errors)
                valid = valid and ok
                continue
            problem = self._validate_value(class_type, inputs, name, value, input_type, config)
            if problem is not None:
                errors.append(problem)
        # LoadImage checks its file in VALIDATE_INPUTS instead of as a value list.
        image = inputs.get("image")
        if class_type == "LoadImage" and isinstance(image, str) and not self.image_exists(image):
            errors.append(
                {
                    "type": "custom_validation_failed",
                    "message": "Custom validation failed for node",
                    "details": f"image - Invalid image file: {image}",
                    "extra_info": {"input_name": "image"},
                }
            )
        result: _Validated = (not errors and valid, errors, unique_id)
        self.validated[unique_id] = result
        return result

    def _validate_link(
        self,
        name: str,
        value: list[Any],
        input_type: Any,
        config: list[Any],
        errors: list[dict[str, Any]],
    ) -> bool:
        if len(value) != 2:
            errors.append(
                {
                    "type": "bad_linked_input",
                    "message": "Bad linked input, must be a length-2 list of [node_id, slot_index]",
                    "details": name,
                    "extra_info": {
                        "input_name": name,
                        "input_config": config,
                        "received_value": value,
                    },
                }
            )
            return True
        linked_id = value[0]
        try:
            linked_class = self.prompt[linked_id]["class_type"]
        except (KeyError, TypeError) as error:
            raise _LookupFailure(error, _LINKED_CLASS_FRAME) from error
        try:
            received_type = NODES[linked_class]["output"][value[1]]
        except (IndexError, TypeError) as error:
            raise _LookupFailure(error, _LINKED_TYPE_FRAME) from error
        if not _types_match(received_type, input_type):
            errors.append(
                {
                    "type": "return_type_mismatch",
                    "message": "Return type mismatch between linked nodes",
                    "details": (
                        f"{name}, received_type({received_type}) mismatch input_type({input_type})"
                    ),
                    "extra_info": {
                        "input_name": name,
                        "input_config": config,
                        "received_type": received_type,
                        "linked_node": value,
                    },
                }
            )
            return True
        try:
            linked_valid, _, _ = self.validate_inputs(linked_id)
        except (_LookupFailure, RecursionError) as caught:
            # RecursionError: a cycle of links, which ComfyUI reports the same way.
            failure = caught if isinstance(caught, _LookupFailure) else _LookupFailure(caught, "")
            frames = [_VALIDATE_RECURSE_FRAME, failure.frame] if failure.frame else []
            self.validated[linked_id] = (
                False,
                [
                    {
                        "type": "exception_during_inner_validation",
                        "message": "Exception when validating inner node",
                        "details": str(failure.error),
                        "extra_info": {
                            "input_name": name,
                            "input_config": config,
                            "exception_message": str(failure.error),
                            "exception_type": _type_name(failure.error),
                            "traceback": frames,
                            "linked_node": value,
                        },
                    }
                ],
                linked_id,
            )
            return False
        return linked_valid

    def _validate_value(
        self,
        class_type: str,
        inputs: dict[str, Any],
        name: str,
        value: Any,
        input_type: Any,
        config: list[Any],
    ) -> dict[str, Any] | None:
        options: dict[str, Any] = config[1]
        try:
            if isinstance(value, dict) and "__value__" in value:
                value = value["__value__"]
                inputs[name] = value
            if input_type == "INT":
                value = int(value)
            elif input_type == "FLOAT":
                value = float(value)
            elif input_type == "STRING":
                value = str(value)
            elif input_type == "BOOLEAN":
                value = bool(value)
            inputs[name] = value
        except (TypeError, ValueError, OverflowError) as error:
            return {
                "type": "invalid_input_type",
                "message": f"Failed to convert an input value to a {input_type} value",
                "details": f"{name}, {inputs[name]}, {error}",
                "extra_info": {
                    "input_name": name,
                    "input_config": config,
                    "received_value": inputs[name],
                    "exception_message": str(error),
                },
            }
        if class_type == "LoadImage" and name == "image":
            return None
        if "min" in options and value < options["min"]:
            return {
                "type": "value_smaller_than_min",
                "message": f"Value {value} smaller than min of {options['min']}",
                "details": name,
                "extra_info": {"input_name": name, "input_config": config, "received_value": value},
            }
        if "max" in options and value > options["max"]:
            return {
                "type": "value_bigger_than_max",
                "message": f"Value {value} bigger than max of {options['max']}",
                "details": name,
                "extra_info": {"input_name": name, "input_config": config, "received_value": value},
            }
        if isinstance(input_type, list) and value not in input_type:
            # ComfyUI leaves out long lists (many model files) from the answer.
            listed = (
                str(input_type) if len(input_type) <= 20 else f"(list of length {len(input_type)})"
            )
            return {
                "type": "value_not_in_list",
                "message": "Value not in list",
                "details": f"{name}: '{value}' not in {listed}",
                "extra_info": {
                    "input_name": name,
                    "input_config": config if len(input_type) <= 20 else None,
                    "received_value": value,
                },
            }
        return None


# -- the order nodes run in ------------------------------------------------------------


class _ExecutionList:
    """ComfyUI's ExecutionList: a topological dissolve with its "ux friendly" pick."""

    def __init__(
        self,
        prompt: dict[str, Any],
        is_cached: Callable[[str], bool],
        is_output: Callable[[str], bool],
    ) -> None:
        self.prompt = prompt
        self.is_cached = is_cached
        self.is_output = is_output
        self.pending: dict[str, bool] = {}
        self.block_count: dict[str, int] = {}
        self.blocking: dict[str, dict[str, dict[Any, bool]]] = {}
        self.staged: str | None = None

    def add_node(self, node_id: str) -> None:
        stack = [node_id]
        links: list[tuple[str, Any, str]] = []
        while stack:
            unique_id = stack.pop()
            if unique_id in self.pending:
                continue
            self.pending[unique_id] = True
            self.block_count[unique_id] = 0
            self.blocking[unique_id] = {}
            for value in self.prompt[unique_id]["inputs"].values():
                if _is_link(value) and not self.is_cached(value[0]):
                    stack.append(value[0])
                    links.append((value[0], value[1], unique_id))
        for from_id, socket, to_id in links:
            self._add_strong_link(from_id, socket, to_id)

    def _add_strong_link(self, from_id: str, socket: Any, to_id: str) -> None:
        if self.is_cached(from_id):
            return
        self.add_node(from_id)
        if to_id not in self.blocking[from_id]:
            self.blocking[from_id][to_id] = {}
            self.block_count[to_id] += 1
        self.blocking[from_id][to_id][socket] = True

    def is_empty(self) -> bool:
        return not self.pending

    def stage(self) -> str | None:
        """The next node to run, or None when the pending nodes wait on each other."""
        available = [node for node in self.pending if self.block_count[node] == 0]
        if not available:
            return None
        self.staged = self._pick(available)
        return self.staged

    def _pick(self, available: list[str]) -> str:
        for node_id in available:
            if self.is_output(node_id):
                return node_id
        for node_id in available:
            if any(self.is_output(blocked) for blocked in self.blocking[node_id]):
                return node_id
        for node_id in available:
            for blocked in self.blocking[node_id]:
                if any(self.is_output(further) for further in self.blocking[blocked]):
                    return node_id
        return available[0]

    def complete(self) -> None:
        assert self.staged is not None
        node_id, self.staged = self.staged, None
        del self.pending[node_id]
        for blocked in self.blocking[node_id]:
            self.block_count[blocked] -= 1
        del self.blocking[node_id]


# -- images ----------------------------------------------------------------------------


def _palette(key: str, cells: int = 4) -> Image.Image:
    """A few random colours, the same for the same key, to be scaled up smoothly."""
    rng = random.Random(key)
    image = Image.new("RGB", (cells, cells))
    image.frombytes(rng.randbytes(cells * cells * 3))
    return image


def _latent_size(latent: _Latent) -> tuple[int, int]:
    return max(1, latent.width // 8), max(1, latent.height // 8)


def _sampler_pictures(latent: _Latent, key: str) -> tuple[Image.Image, Image.Image]:
    """The noise a sampler starts from and the picture it ends at, at latent size."""
    size = _latent_size(latent)
    rng = random.Random(f"noise:{key}")
    noise = Image.frombytes("RGB", size, rng.randbytes(size[0] * size[1] * 3))
    final = _palette(f"{key}:0").resize(size, Image.Resampling.BICUBIC)
    return noise, final


def _preview_jpeg(noise: Image.Image, final: Image.Image, progress: float, size: int) -> bytes:
    """A latent2rgb-like preview: scaled to fit ``size`` (ComfyUI's --preview-size)."""
    image = Image.blend(noise, final, progress)
    image = ImageOps.contain(image, (size, size), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def _decode(latent: _Latent) -> tuple[Image.Image, ...]:
    size = (latent.width // 8 * 8, latent.height // 8 * 8)
    if latent.seed is None:
        return tuple(Image.new("RGB", size, (127, 127, 127)) for _ in range(latent.batch))
    key = f"{latent.seed}:{latent.label}"
    return tuple(
        _palette(f"{key}:{index}").resize(size, Image.Resampling.BICUBIC)
        for index in range(latent.batch)
    )


def _blur(frames: tuple[Image.Image, ...], radius: int, sigma: float) -> tuple[Image.Image, ...]:
    if radius <= 1:
        return frames
    return tuple(frame.filter(ImageFilter.GaussianBlur(sigma)) for frame in frames)


def _png(image: Image.Image, text: dict[str, str], compress_level: int) -> bytes:
    info = PngInfo()
    for key, value in text.items():
        info.add_text(key, value)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info, compress_level=compress_level)
    return buffer.getvalue()


def _open_image(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as opened:
        return ImageOps.exif_transpose(opened).convert("RGB")


# -- the server ------------------------------------------------------------------------


@dataclass
class _QueueItem:
    number: int | float
    prompt_id: str
    prompt: dict[str, Any]
    extra_data: dict[str, Any]
    outputs: list[str]

    def as_list(self) -> list[Any]:
        """The 5-element form of /queue and of history's ``prompt``."""
        return [
            self.number,
            self.prompt_id,
            copy.deepcopy(self.prompt),
            copy.deepcopy(self.extra_data),
            list(self.outputs),
        ]


@dataclass(eq=False)
class _Socket:
    ws: web.WebSocketResponse
    transport: asyncio.BaseTransport | None
    sid: str
    feature_flags: dict[str, Any] = field(default_factory=dict)
    closed: bool = False

    def abort(self) -> None:
        """Cut the connection without a close frame, as a dying server or network does."""
        if self.transport is not None:
            self.transport.close()


@dataclass
class _Outgoing:
    kind: str  # "text", "bytes", "open", "flush"
    payload: str | bytes | None = None
    sid: str | None = None
    target: _Socket | None = None
    done: asyncio.Future[None] | None = None


@dataclass
class _Run:
    """One prompt while it executes."""

    item: _QueueItem
    client_id: str | None
    signatures: dict[str, str]
    previews: bool
    messages: list[list[Any]] = field(default_factory=list)
    progress: dict[str, dict[str, Any]] = field(default_factory=dict)
    executed: list[str] = field(default_factory=list)

    @property
    def prompt_id(self) -> str:
        return self.item.prompt_id


@dataclass
class _Failure:
    node_id: str
    interrupted: bool
    exception_message: str = ""
    exception_type: str = ""
    traceback: list[str] = field(default_factory=list)
    current_inputs: dict[str, list[Any]] = field(default_factory=dict)


_Runner = Callable[[_Run, str, dict[str, Any]], Awaitable[_NodeResult]]


class ComfyUIEmulator:
    """A ComfyUI 0.8.0 look-alike on a local port; see the module docstring.

    Test-facing state: ``url``/``host``/``port`` once started, ``faults`` (what the next
    prompts meet), ``executed`` (prompt ids in the order they finished, any outcome;
    ``wait_executed`` waits on it), ``submitted`` (accepted POST /prompt bodies),
    ``free_calls``, ``interrupts`` (POST /interrupt bodies, ``None`` when there was no
    JSON body), ``loaded_models`` (name -> VRAM bytes, least recently used first),
    ``loads`` (every model load, in order), ``files`` ((type, subfolder,
    name) -> bytes: outputs, uploads). The knobs (``step_seconds``, ``history_delay``,
    ``model_load_seconds``, ``resident_models``, ``interrupt_delay``, ...), the model
    lists (``checkpoints``, ``diffusion_models``, ``text_encoders``, ``vaes``,
    ``embeddings``; ``model_files`` by folder for the other folders),
    ``devices`` (``None``: one fake CUDA GPU of ``vram_total``), ``preview_method`` and
    ``argv`` can be changed at any time.
    """

    def __init__(
        self,
        *,
        step_seconds: float = 0.005,
        checkpoints: Sequence[str] = DEFAULT_CHECKPOINTS,
        preview_size: int = 512,
        history_delay: float = 0.02,
        model_load_seconds: float = 0.0,
        vram_total: int = 24 * 2**30,
        preview_method: str = "latent2rgb",
    ) -> None:
        self.step_seconds = step_seconds
        self.checkpoints = list(checkpoints)
        self.diffusion_models = list(DEFAULT_DIFFUSION_MODELS)
        self.text_encoders = list(DEFAULT_TEXT_ENCODERS)
        self.vaes = list(DEFAULT_VAES)
        self.embeddings: list[str] = []
        #: Files of the model folders with no list of their own above (loras, ...).
        self.model_files = {folder: list(files) for folder, files in DEFAULT_MODEL_FILES.items()}
        self.preview_size = preview_size
        self.preview_method = preview_method
        self.history_delay = history_delay
        self.model_load_seconds = model_load_seconds
        #: At most this many models stay loaded (None: no limit); loading one more
        #: evicts the least recently used, as a GPU with room for one checkpoint does.
        self.resident_models: int | None = None
        #: Every model load, in order (a model already loaded is not loaded again).
        self.loads: list[str] = []
        self.vram_total = vram_total
        self.device_name = "NVIDIA GeForce RTX 4090"
        self.devices: list[dict[str, Any]] | None = None
        self.argv: list[str] | None = None
        self.faults = Faults()
        self.executed: list[str] = []
        self.submitted: list[dict[str, Any]] = []
        self.free_calls = 0
        self.interrupts: list[dict[str, Any] | None] = []
        #: Seconds before a POST /interrupt takes effect. A real ComfyUI notices it only
        #: at its next check (before a node, in a sampler step): a long step or an
        #: uninterruptible node (a model load) keeps the prompt running meanwhile.
        self.interrupt_delay = 0.0
        #: Set to a list to record ``(time.monotonic(), payload)`` of every binary frame
        #: (a preview) as it is written to a socket (``bench/preview_latency.py``).
        self.binary_frames_sent: list[tuple[float, bytes]] | None = None
        self.url = ""
        self.host = "127.0.0.1"
        self.port = 0
        # Files, as on disk: (type, subfolder, name) -> bytes. They outlive restarts.
        self.files: dict[tuple[str, str, str], bytes] = {}
        self._runner: web.AppRunner | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stop_task: asyncio.Task[None] | None = None
        self._crash_task: asyncio.Task[None] | None = None
        self._executed_changed = asyncio.Condition()
        self._runners: dict[str, _Runner] = {
            "CheckpointLoaderSimple": self._checkpoint_loader,
            "UNETLoader": self._unet_loader,
            "DualCLIPLoader": self._dual_clip_loader,
            "VAELoader": self._vae_loader,
            "CLIPTextEncode": self._clip_text_encode,
            "EmptyLatentImage": self._empty_latent,
            "EmptySD3LatentImage": self._empty_latent,
            "KSampler": self._ksampler,
            "VAEDecode": self._vae_decode,
            "SaveImage": self._save_image,
            "PreviewImage": self._save_image,
            "EmptyImage": self._empty_image,
            "ImageBlur": self._image_blur,
            "PrimitiveInt": self._primitive,
            "PrimitiveStringMultiline": self._primitive,
            "LoadImage": self._load_image,
            "VAEEncode": self._vae_encode,
            "ImageScaleBy": self._image_scale_by,
        }
        self._reset_process_state()

    def _reset_process_state(self) -> None:
        """What a ComfyUI process holds in memory and loses when it restarts."""
        self.loaded_models: dict[str, int] = {}
        self._number = 0
        self._task_counter = 0
        self._sequence = 0
        self._pending: list[tuple[int | float, int, _QueueItem]] = []
        self._running: dict[int, _QueueItem] = {}
        self._history: dict[str, dict[str, Any]] = {}
        self._outputs_cache: dict[str, tuple[Any, ...]] = {}
        self._ui_cache: dict[str, dict[str, Any]] = {}
        self._sockets: dict[str, _Socket] = {}
        self._open_sockets: set[_Socket] = set()
        self._flags: dict[str, Any] = {}
        self._client_id: str | None = None
        self._last_node_id: str | None = None
        self._interrupt = asyncio.Event()
        self._wake = asyncio.Event()
        self._outbox: asyncio.Queue[_Outgoing] = asyncio.Queue()
        # ComfyUI empties its temp folder (PreviewImage files) when it starts.
        self.files = {key: data for key, data in self.files.items() if key[0] != "temp"}

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Listen on ``host:port`` (0: any free port) and return the base URL.

        After ``stop()`` (or a ``crash_at_step`` fault) this starts a fresh "process" on
        the port given: empty queue, history and cache; files kept.
        """
        if self._stop_task is not None:
            await asyncio.shield(self._stop_task)
            self._stop_task = None
        if self._runner is not None:
            raise RuntimeError("the emulator is already running")
        self._reset_process_state()
        app = web.Application(client_max_size=MAX_UPLOAD_SIZE)
        self._add_routes(app)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.25)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.host = host
        self.port = int(runner.addresses[0][1])
        url_host = f"[{host}]" if ":" in host else host
        self.url = f"http://{url_host}:{self.port}"
        self._tasks = [
            asyncio.create_task(self._worker(), name="comfyui-emulator-worker"),
            asyncio.create_task(self._publisher(), name="comfyui-emulator-publisher"),
        ]
        return self.url

    async def stop(self) -> None:
        """Stop as a killed process would: sockets cut, the running prompt abandoned."""
        if self._stop_task is None:
            if self._runner is None:
                return
            self._stop_task = asyncio.create_task(self._shutdown())
        await asyncio.shield(self._stop_task)

    async def _shutdown(self) -> None:
        runner, self._runner = self._runner, None
        for socket in list(self._open_sockets):
            socket.abort()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if runner is not None:
            await runner.cleanup()

    def drop_websockets(self) -> None:
        """Cut every open WebSocket (no close frame); the server keeps running."""
        for socket in list(self._open_sockets):
            socket.abort()

    async def wait_executed(self, count: int) -> list[str]:
        """Wait until ``count`` prompts have finished (any outcome); return their ids."""
        async with self._executed_changed:
            await self._executed_changed.wait_for(lambda: len(self.executed) >= count)
        return list(self.executed)

    # -- routes ------------------------------------------------------------------------

    def _add_routes(self, app: web.Application) -> None:
        routes: list[tuple[str, str, Callable[[web.Request], Awaitable[web.StreamResponse]]]] = [
            ("GET", "/ws", self._websocket),
            ("GET", "/", self._index),
            ("GET", "/prompt", self._get_prompt),
            ("POST", "/prompt", self._post_prompt),
            ("GET", "/queue", self._get_queue),
            ("POST", "/queue", self._post_queue),
            ("POST", "/interrupt", self._post_interrupt),
            ("POST", "/free", self._post_free),
            ("GET", "/history", self._get_history),
            ("GET", "/history/{prompt_id}", self._get_history_item),
            ("POST", "/history", self._post_history),
            ("GET", "/view", self._view),
            ("POST", "/upload/image", self._upload_image),
            ("GET", "/system_stats", self._system_stats),
            ("GET", "/features", self._features),
            ("GET", "/embeddings", self._embeddings),
            ("GET", "/models", self._models),
            ("GET", "/models/{folder}", self._models_in_folder),
            ("GET", "/object_info", self._object_info),
            ("GET", "/object_info/{node_class}", self._object_info_one),
        ]
        # ComfyUI serves every route twice: as is and under /api (what its frontend uses).
        for method, path, handler in routes:
            app.router.add_route(method, path, handler)
            app.router.add_route(method, "/api" + path, handler)
        app.router.add_get("/api/jobs", self._jobs)
        app.router.add_get("/api/jobs/{job_id}", self._job)

    async def _index(self, request: web.Request) -> web.Response:
        return web.Response(text="<!doctype html><title>ComfyUI</title>", content_type="text/html")

    # -- POST /prompt ------------------------------------------------------------------

    async def _post_prompt(self, request: web.Request) -> web.Response:
        log.info("got prompt")
        try:
            body = json.loads(await request.text())
            return self._accept_prompt(body)
        except Exception:
            log.exception("POST /prompt failed")
            return web.Response(status=500, text=_INTERNAL_ERROR)

    def _accept_prompt(self, body: Any) -> web.Response:
        if not isinstance(body, dict):
            raise TypeError("the body is not a JSON object")
        number: int | float
        if "number" in body:
            number = float(body["number"])
        else:
            number = self._number
            if body.get("front"):
                number = -number
            self._number += 1
        if "prompt" not in body:
            error = _error("no_prompt", "No prompt provided", "No prompt provided")
            return web.json_response({"error": error, "node_errors": {}}, status=400)
        prompt_id = body.get("prompt_id")
        if prompt_id is None:
            prompt_id = str(uuid.uuid4())
        elif not isinstance(prompt_id, str) or not _UUID_RE.fullmatch(prompt_id):
            # Stricter than ComfyUI, which uses any string: Brigade's prompt ids are job
            # ids, lowercase UUIDs, and anything else is a client bug worth failing on.
            error = _error(
                "invalid_prompt",
                "Invalid prompt_id",
                f"prompt_id must be a lowercase UUID, got {prompt_id!r}",
            )
            return web.json_response({"error": error, "node_errors": {}}, status=400)
        prompt = copy.deepcopy(body["prompt"])
        if not isinstance(prompt, dict):
            raise TypeError("prompt is not a JSON object")
        targets = body.get("partial_execution_targets")
        valid, problem, outputs, node_errors = _Validator(
            prompt, self.node_info, self._input_image_exists, targets
        ).validate_prompt()
        extra_data = dict(body.get("extra_data", {}))
        if "client_id" in body:
            extra_data["client_id"] = body["client_id"]
        if not valid:
            log.warning("invalid prompt: %s", problem)
            return web.json_response({"error": problem, "node_errors": node_errors}, status=400)
        for key in SENSITIVE_EXTRA_DATA_KEYS:
            extra_data.pop(key, None)
        extra_data["create_time"] = _now_ms()
        self.submitted.append(copy.deepcopy(body))
        item = _QueueItem(number, prompt_id, prompt, extra_data, outputs)
        self._sequence += 1
        heapq.heappush(self._pending, (number, self._sequence, item))
        self._queue_updated()
        self._wake.set()
        return web.json_response(
            {"prompt_id": prompt_id, "number": number, "node_errors": node_errors}
        )

    def node_info(self, class_type: str) -> dict[str, Any]:
        """``/object_info`` for one node class, with this server's file lists filled in."""
        info = copy.deepcopy(NODES[class_type])
        for (owner, name), folder in FOLDER_INPUTS.items():
            if owner == class_type:
                info["input"]["required"][name][0] = self._folder_files(folder)
        return info

    def _folder_files(self, folder: str) -> list[str]:
        if folder == "checkpoints":
            return sorted(self.checkpoints)
        if folder == "diffusion_models":
            return sorted(self.diffusion_models)
        if folder == "text_encoders":
            return sorted(self.text_encoders)
        if folder == "vae":
            return [*sorted(self.vaes), "pixel_space"]
        if folder == "embeddings":
            return sorted(self.embeddings)
        if folder == "input":
            return sorted(
                name
                for kind, subfolder, name in self.files
                if kind == "input" and subfolder == "" and _is_image_name(name)
            )
        return sorted(self.model_files.get(folder, ()))

    def _input_image_key(self, name: str) -> tuple[str, str, str] | None:
        filename, kind = _annotated(name)
        folder = _subfolder(posixpath.dirname(filename))
        if folder is None:
            return None
        return kind or "input", folder, posixpath.basename(filename)

    def _input_image_exists(self, name: str) -> bool:
        key = self._input_image_key(name)
        return key is not None and key in self.files

    # -- the queue ---------------------------------------------------------------------

    def _queue_info(self) -> dict[str, Any]:
        return {"exec_info": {"queue_remaining": len(self._pending) + len(self._running)}}

    def _queue_updated(self) -> None:
        self._send_json("status", {"status": self._queue_info()}, None)

    async def _get_prompt(self, request: web.Request) -> web.Response:
        return web.json_response(self._queue_info())

    async def _get_queue(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "queue_running": [item.as_list() for item in self._running.values()],
                "queue_pending": [entry[2].as_list() for entry in self._pending],
            }
        )

    async def _post_queue(self, request: web.Request) -> web.Response:
        try:
            body = json.loads(await request.text())
            if body.get("clear"):
                self._pending = []
                self._queue_updated()
            for prompt_id in body.get("delete", []):
                self._delete_pending(prompt_id)
        except Exception:
            log.exception("POST /queue failed")
            return web.Response(status=500, text=_INTERNAL_ERROR)
        return web.Response(status=200)

    def _delete_pending(self, prompt_id: Any) -> None:
        """Remove one pending prompt; a running one stays (ComfyUI's delete_queue_item)."""
        for index, entry in enumerate(self._pending):
            if entry[2].prompt_id == prompt_id:
                if len(self._pending) == 1:
                    self._pending = []
                    self._queue_updated()
                else:
                    self._pending.pop(index)
                    heapq.heapify(self._pending)
                self._queue_updated()
                return

    async def _post_interrupt(self, request: web.Request) -> web.Response:
        try:
            body = json.loads(await request.text())
        except ValueError:
            body = None
        self.interrupts.append(body if isinstance(body, dict) else None)
        target = body.get("prompt_id") if isinstance(body, dict) else None
        if target:
            if any(item.prompt_id == target for item in self._running.values()):
                log.info("Interrupting prompt %s", target)
                self._interrupt_later()
            else:
                log.info("Prompt %s is not currently running, skipping interrupt", target)
        else:
            log.info("Global interrupt (no prompt_id specified)")
            self._interrupt_later()
        return web.Response(status=200)

    def _interrupt_later(self) -> None:
        """Raise the interrupt flag, after ``interrupt_delay``."""
        if self.interrupt_delay > 0:
            asyncio.get_running_loop().call_later(self.interrupt_delay, self._interrupt.set)
        else:
            self._interrupt.set()

    async def _post_free(self, request: web.Request) -> web.Response:
        try:
            body = json.loads(await request.text())
            unload_models = bool(body.get("unload_models", False))
            free_memory = bool(body.get("free_memory", False))
        except Exception:
            log.exception("POST /free failed")
            return web.Response(status=500, text=_INTERNAL_ERROR)
        self.free_calls += 1
        if unload_models:
            self._flags["unload_models"] = True
        if free_memory:
            self._flags["free_memory"] = True
        if not self._running:
            self._apply_flags()
        return web.Response(status=200)

    def _apply_flags(self) -> None:
        """What ComfyUI's worker does with /free's flags between prompts."""
        flags, self._flags = self._flags, {}
        free_memory = flags.get("free_memory", False)
        if flags.get("unload_models", free_memory):
            self.loaded_models.clear()
        if free_memory:
            self._outputs_cache.clear()
            self._ui_cache.clear()

    # -- history and jobs --------------------------------------------------------------

    async def _get_history(self, request: web.Request) -> web.Response:
        query = request.rel_url.query
        try:
            max_items = int(query["max_items"]) if "max_items" in query else None
            offset = int(query.get("offset", -1))
        except ValueError:
            return web.Response(status=500, text=_INTERNAL_ERROR)
        if offset < 0 and max_items is not None:
            offset = len(self._history) - max_items
        out: dict[str, Any] = {}
        for index, (prompt_id, entry) in enumerate(self._history.items()):
            if index >= offset:
                out[prompt_id] = entry
                if max_items is not None and len(out) >= max_items:
                    break
        return web.json_response(out)

    async def _get_history_item(self, request: web.Request) -> web.Response:
        prompt_id = request.match_info["prompt_id"]
        if prompt_id not in self._history:
            return web.json_response({})
        return web.json_response({prompt_id: self._history[prompt_id]})

    async def _post_history(self, request: web.Request) -> web.Response:
        try:
            body = json.loads(await request.text())
            if body.get("clear"):
                self._history = {}
            for prompt_id in body.get("delete", []):
                self._history.pop(prompt_id, None)
        except Exception:
            log.exception("POST /history failed")
            return web.Response(status=500, text=_INTERNAL_ERROR)
        return web.Response(status=200)

    def _job_from_history(self, prompt_id: str, entry: dict[str, Any]) -> dict[str, Any]:
        number, _, _, extra_data, _ = entry["prompt"]
        status_info = entry.get("status") or {}
        failed = status_info.get("status_str") == "error"
        start = end = None
        execution_error = None
        for event, data in status_info.get("messages", []):
            if event == "execution_start":
                start = data.get("timestamp")
            elif event in ("execution_success", "execution_error", "execution_interrupted"):
                end = data.get("timestamp")
                if event == "execution_error":
                    execution_error = data
        count = 0
        preview = None
        for node_id, node_outputs in entry.get("outputs", {}).items():
            for media_type, items in node_outputs.items():
                if media_type == "animated" or not isinstance(items, list):
                    continue
                for output in items:
                    count += 1
                    if preview is None and media_type in ("images", "video", "audio"):
                        preview = {**output, "nodeId": node_id, "mediaType": media_type}
        job = {
            "id": prompt_id,
            "status": "failed" if failed else "completed",
            "priority": number,
            "create_time": extra_data.get("create_time"),
            "execution_start_time": start,
            "execution_end_time": end,
            "execution_error": execution_error,
            "outputs_count": count,
            "preview_output": preview,
        }
        return {key: value for key, value in job.items() if value is not None}

    def _all_jobs(self) -> list[dict[str, Any]]:
        jobs = []
        for item in self._running.values():
            jobs.append(self._job_from_queue(item, "in_progress"))
        for _, _, item in self._pending:
            jobs.append(self._job_from_queue(item, "pending"))
        for prompt_id, entry in self._history.items():
            jobs.append(self._job_from_history(prompt_id, entry))
        return jobs

    @staticmethod
    def _job_from_queue(item: _QueueItem, status: str) -> dict[str, Any]:
        job = {
            "id": item.prompt_id,
            "status": status,
            "priority": item.number,
            "create_time": item.extra_data.get("create_time"),
            "outputs_count": 0,
        }
        return {key: value for key, value in job.items() if value is not None}

    async def _jobs(self, request: web.Request) -> web.Response:
        query = request.rel_url.query
        try:
            limit = int(query["limit"]) if "limit" in query else None
            offset = int(query.get("offset", 0))
        except ValueError:
            return web.json_response({"error": "limit and offset must be integers"}, status=400)
        statuses = set(query.get("status", "pending,in_progress,completed,failed").split(","))
        jobs = [job for job in self._all_jobs() if job["status"] in statuses]
        jobs.sort(
            key=lambda job: job.get("create_time", 0), reverse=query.get("sort_order") != "asc"
        )
        total = len(jobs)
        page = jobs[offset:]
        if limit is not None:
            page = page[:limit]
        pagination = {
            "offset": offset,
            "limit": limit,
            "total": total,
            "has_more": offset + len(page) < total,
        }
        return web.json_response({"jobs": page, "pagination": pagination})

    async def _job(self, request: web.Request) -> web.Response:
        job_id = request.match_info["job_id"]
        if job_id in self._history:
            entry = self._history[job_id]
            job = self._job_from_history(job_id, entry)
            job["outputs"] = entry.get("outputs", {})
            job["execution_status"] = entry.get("status")
            return web.json_response(job)
        for job in self._all_jobs():
            if job["id"] == job_id:
                return web.json_response(job)
        return web.json_response({"error": "Job not found"}, status=404)

    # -- files -------------------------------------------------------------------------

    async def _view(self, request: web.Request) -> web.Response:
        query = request.rel_url.query
        if "filename" not in query:
            return web.Response(status=404)
        filename, kind = _annotated(query["filename"])
        if not filename or filename[0] == "/" or ".." in filename:
            return web.Response(status=400)
        kind = kind or query.get("type", "output")
        if kind not in ("input", "output", "temp"):
            return web.Response(status=400)
        folder = _subfolder(query.get("subfolder", ""))
        if folder is None:
            return web.Response(status=403)
        name = posixpath.basename(filename)
        data = self.files.get((kind, folder, name))
        if data is None:
            return web.Response(status=404)
        content_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
        return web.Response(
            body=data,
            content_type=content_type,
            headers={"Content-Disposition": f'filename="{name}"'},
        )

    async def _upload_image(self, request: web.Request) -> web.Response:
        post = await request.post()
        image = post.get("image")
        if not isinstance(image, web.FileField) or not image.filename:
            return web.Response(status=400)
        kind = str(post.get("type") or "input")
        if kind not in ("input", "output", "temp"):
            return web.Response(status=500, text=_INTERNAL_ERROR)
        raw_subfolder = str(post.get("subfolder", ""))
        folder = _subfolder(posixpath.join(raw_subfolder, posixpath.dirname(image.filename)))
        if folder is None:
            return web.Response(status=400)
        data = await asyncio.to_thread(image.file.read)
        name = posixpath.basename(image.filename)
        stem, extension = posixpath.splitext(name)
        overwrite = post.get("overwrite") in ("true", "1")
        counter = 1
        while not overwrite and (kind, folder, name) in self.files:
            if self.files[(kind, folder, name)] == data:
                break  # the same image again: ComfyUI keeps the one it has
            name = f"{stem} ({counter}){extension}"
            counter += 1
        self.files[(kind, folder, name)] = data
        return web.json_response({"name": name, "subfolder": raw_subfolder, "type": kind})

    # -- about the server --------------------------------------------------------------

    def _vram_used(self) -> int:
        return sum(self.loaded_models.values())

    async def _system_stats(self, request: web.Request) -> web.Response:
        used = self._vram_used()
        devices = self.devices
        if devices is None:
            devices = [
                {
                    "name": f"cuda:0 {self.device_name} : cudaMallocAsync",
                    "type": "cuda",
                    "index": 0,
                    "vram_total": self.vram_total,
                    "vram_free": max(0, self.vram_total - used - 2**29),
                    "torch_vram_total": used,
                    "torch_vram_free": 2**25 if used else 0,
                }
            ]
        argv = self.argv or ["main.py", "--listen", self.host, "--port", str(self.port)]
        stats = {
            "system": {
                "os": "linux",
                "ram_total": 68719476736,
                "ram_free": 60129542144,
                "comfyui_version": COMFYUI_VERSION,
                "required_frontend_version": "1.35.9",
                "installed_templates_version": "0.7.67",
                "required_templates_version": "0.7.67",
                "python_version": sys.version,
                "pytorch_version": "2.14.1+cu130",
                "embedded_python": False,
                "argv": argv,
            },
            "devices": devices,
        }
        return web.json_response(stats)

    async def _features(self, request: web.Request) -> web.Response:
        return web.json_response(SERVER_FEATURES)

    async def _embeddings(self, request: web.Request) -> web.Response:
        return web.json_response([posixpath.splitext(name)[0] for name in self.embeddings])

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response(list(MODEL_FOLDERS))

    async def _models_in_folder(self, request: web.Request) -> web.Response:
        folder = request.match_info["folder"]
        if folder not in MODEL_FOLDERS:
            return web.Response(status=404)
        return web.json_response(self._folder_files(folder))

    async def _object_info(self, request: web.Request) -> web.Response:
        return web.json_response({name: self.node_info(name) for name in NODES})

    async def _object_info_one(self, request: web.Request) -> web.Response:
        node_class = request.match_info["node_class"]
        if node_class not in NODES:
            return web.json_response({})
        return web.json_response({node_class: self.node_info(node_class)})

    # -- the WebSocket -----------------------------------------------------------------

    async def _websocket(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        sid = request.rel_url.query.get("clientId", "") or uuid.uuid4().hex
        socket = _Socket(ws, request.transport, sid)
        self._open_sockets.add(socket)
        self._outbox.put_nowait(_Outgoing("open", target=socket))
        first_message = True
        try:
            async for message in ws:
                if message.type != aiohttp.WSMsgType.TEXT:
                    continue
                try:
                    data = json.loads(message.data)
                except ValueError:
                    log.warning("Invalid JSON received from client %s: %s", sid, message.data)
                    continue
                # Only a client's first message can negotiate features.
                if first_message and isinstance(data, dict) and data.get("type") == "feature_flags":
                    flags = data.get("data", {})
                    socket.feature_flags = flags if isinstance(flags, dict) else {}
                    text = json.dumps({"type": "feature_flags", "data": SERVER_FEATURES})
                    self._outbox.put_nowait(_Outgoing("text", text, target=socket))
                first_message = False
        finally:
            socket.closed = True
            self._open_sockets.discard(socket)
            # As ComfyUI: by clientId, so an old socket closing after a newer one with the
            # same clientId connected unregisters the newer one too.
            self._sockets.pop(sid, None)
        return ws

    def _send_json(self, event: str, data: Any, sid: str | None) -> None:
        text = json.dumps({"type": event, "data": data})
        self._outbox.put_nowait(_Outgoing("text", text, sid=sid))

    def _send_bytes(self, payload: bytes, sid: str | None) -> None:
        self._outbox.put_nowait(_Outgoing("bytes", payload, sid=sid))

    async def _flush(self) -> None:
        """Wait until every frame queued so far has been written to its socket."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._outbox.put_nowait(_Outgoing("flush", done=done))
        await done

    def _supports_metadata(self, sid: str | None) -> bool:
        socket = self._sockets.get(sid) if sid is not None else None
        return socket is not None and socket.feature_flags.get("supports_preview_metadata") is True

    async def _publisher(self) -> None:
        """Write frames in the order they were queued (ComfyUI's publish loop)."""
        while True:
            message = await self._outbox.get()
            if message.kind == "flush":
                assert message.done is not None
                if not message.done.done():
                    message.done.set_result(None)
                continue
            if message.kind == "open":
                assert message.target is not None
                await self._open(message.target)
                continue
            if message.target is not None:
                targets = [message.target]
            elif message.sid is None:
                targets = list(self._sockets.values())
            else:
                socket = self._sockets.get(message.sid)
                targets = [socket] if socket is not None else []
            for socket in targets:
                await self._write(socket, message.payload)
                if self.binary_frames_sent is not None and isinstance(message.payload, bytes):
                    self.binary_frames_sent.append((time.monotonic(), message.payload))

    async def _open(self, socket: _Socket) -> None:
        if socket.closed:
            return
        self._sockets.pop(socket.sid, None)
        self._sockets[socket.sid] = socket
        status = {"status": self._queue_info(), "sid": socket.sid}
        await self._write(socket, json.dumps({"type": "status", "data": status}))
        # A client that reconnects while its prompt runs learns the node it is on.
        if self._client_id == socket.sid and self._last_node_id is not None:
            executing = {"type": "executing", "data": {"node": self._last_node_id}}
            await self._write(socket, json.dumps(executing))

    @staticmethod
    async def _write(socket: _Socket, payload: str | bytes | None) -> None:
        if socket.ws.closed or payload is None:
            return
        try:
            if isinstance(payload, bytes):
                await socket.ws.send_bytes(payload)
            else:
                await socket.ws.send_str(payload)
        except (ConnectionError, aiohttp.ClientError) as error:
            log.warning("send error: %s", error)

    # -- the worker --------------------------------------------------------------------

    async def _worker(self) -> None:
        while True:
            if not self._pending:
                self._apply_flags()
                self._wake.clear()
                await self._wake.wait()
                continue
            _, _, item = heapq.heappop(self._pending)
            task_id = self._task_counter
            self._task_counter += 1
            self._running[task_id] = item
            self._queue_updated()
            await self._run_item(task_id, item)
            self._apply_flags()

    async def _run_item(self, task_id: int, item: _QueueItem) -> None:
        started = time.perf_counter()
        try:
            success, history_result, messages = await self._execute(item)
        except Exception:
            # A bug in the emulator: end the prompt rather than hang every later one.
            log.exception("the emulator failed to run prompt %s", item.prompt_id)
            success, history_result, messages = False, {"outputs": {}, "meta": {}}, []
        # ComfyUI writes history after execute() returns, a moment after
        # execution_success reached the client.
        await asyncio.sleep(self.history_delay)
        self._running.pop(task_id, None)
        if len(self._history) > MAXIMUM_HISTORY_SIZE:
            self._history.pop(next(iter(self._history)))
        self._history[item.prompt_id] = {
            "prompt": item.as_list(),
            "outputs": {},
            "status": {
                "status_str": "success" if success else "error",
                "completed": success,
                "messages": messages,
            },
            **history_result,
        }
        self._queue_updated()
        client_id = item.extra_data.get("client_id")
        if client_id is not None:
            self._send_json("executing", {"node": None, "prompt_id": item.prompt_id}, client_id)
        log.info("Prompt executed in %.2f seconds", time.perf_counter() - started)
        async with self._executed_changed:
            self.executed.append(item.prompt_id)
            self._executed_changed.notify_all()

    def _add_message(self, run: _Run, event: str, data: dict[str, Any], broadcast: bool) -> None:
        data = {**data, "timestamp": _now_ms()}
        run.messages.append([event, data])
        if run.client_id is not None or broadcast:
            self._send_json(event, data, run.client_id)

    async def _execute(self, item: _QueueItem) -> tuple[bool, dict[str, Any], list[list[Any]]]:
        client_id = item.extra_data.get("client_id")
        self._interrupt.clear()
        self._client_id = client_id
        method = item.extra_data.get("preview_method")
        if method in (None, "default"):
            method = self.preview_method
        run = _Run(
            item=item,
            client_id=client_id,
            signatures={node_id: self._signature(item.prompt, node_id) for node_id in item.prompt},
            previews=method != "none",
        )
        self._add_message(run, "execution_start", {"prompt_id": run.prompt_id}, broadcast=False)
        # The classic cache keeps what the new prompt can reuse and forgets the rest.
        live = set(run.signatures.values())
        for cache in (self._outputs_cache, self._ui_cache):
            for signature in [key for key in cache if key not in live]:
                del cache[signature]
        cached = [node for node in item.prompt if run.signatures[node] in self._outputs_cache]
        self._add_message(
            run, "execution_cached", {"nodes": cached, "prompt_id": run.prompt_id}, broadcast=False
        )
        order = _ExecutionList(
            item.prompt,
            lambda node: run.signatures.get(node) in self._outputs_cache,
            lambda node: bool(NODES[item.prompt[node]["class_type"]]["output_node"]),
        )
        for output in item.outputs:
            order.add_node(output)
        success = True
        while not order.is_empty():
            node_id = order.stage()
            if node_id is None:
                blamed = next(iter(order.pending))
                failure: _Failure | None = _Failure(
                    blamed, False, "Dependency cycle detected", "graph.DependencyCycleError"
                )
            else:
                failure = await self._execute_node(run, node_id)
            if failure is not None:
                self._report_failure(run, failure)
                success = False
                break
            order.complete()
        else:
            self._add_message(
                run, "execution_success", {"prompt_id": run.prompt_id}, broadcast=False
            )
        outputs: dict[str, Any] = {}
        meta: dict[str, Any] = {}
        for node_id in item.prompt:
            ui = self._ui_cache.get(run.signatures[node_id])
            if ui is not None:
                outputs[node_id] = ui["output"]
                meta[node_id] = ui["meta"]
        self._last_node_id = None
        return success, {"outputs": outputs, "meta": meta}, run.messages

    def _signature(self, prompt: dict[str, Any], node_id: str) -> str:
        """ComfyUI's input signature: the node and its whole upstream graph, ids aside."""
        ancestors: list[str] = []
        order: dict[str, int] = {}

        def walk(current: str) -> None:
            node = prompt.get(current)
            if not isinstance(node, dict):
                return
            for key in sorted(node["inputs"]):
                value = node["inputs"][key]
                if _is_link(value) and value[0] not in order:
                    ancestors.append(value[0])
                    order[value[0]] = len(ancestors) - 1
                    walk(value[0])

        def immediate(current: str) -> list[Any]:
            node = prompt.get(current)
            if not isinstance(node, dict):
                return [f"missing {uuid.uuid4()}"]  # never equal to anything, as ComfyUI's NaN
            signature: list[Any] = [node["class_type"], self._is_changed(node)]
            for key in sorted(node["inputs"]):
                value = node["inputs"][key]
                if _is_link(value):
                    signature.append([key, ["ANCESTOR", order[value[0]], value[1]]])
                else:
                    signature.append([key, value])
            return signature

        walk(node_id)
        parts = [immediate(node_id), *(immediate(ancestor) for ancestor in ancestors)]
        return json.dumps(parts, sort_keys=True, default=str)

    def _is_changed(self, node: dict[str, Any]) -> str:
        """LoadImage's IS_CHANGED: the file's hash, so a new upload under a name re-runs."""
        if node["class_type"] != "LoadImage":
            return ""
        key = self._input_image_key(str(node["inputs"].get("image", "")))
        data = self.files.get(key) if key is not None else None
        return hashlib.sha256(data).hexdigest() if data is not None else ""

    async def _execute_node(self, run: _Run, node_id: str) -> _Failure | None:
        signature = run.signatures[node_id]
        class_type = run.item.prompt[node_id]["class_type"]
        if signature in self._outputs_cache:
            if run.client_id is not None:
                cached_ui = self._ui_cache.get(signature) or {}
                executed = {
                    "node": node_id,
                    "display_node": node_id,
                    "output": cached_ui.get("output"),
                    "prompt_id": run.prompt_id,
                }
                self._send_json("executed", executed, run.client_id)
            self._progress_finish(run, node_id)
            return None
        self._progress_start(run, node_id)
        inputs: dict[str, Any] = {}
        try:
            inputs = self._node_inputs(run, node_id)
            outputs, ui = await self._run_node(run, node_id, class_type, inputs)
        except _Interrupted:
            log.info("Processing interrupted")
            return _Failure(node_id, interrupted=True)
        except _NodeError as error:
            tips = _OOM_TIPS if error.exception_type == OOM_ERROR_TYPE else ""
            return _Failure(
                node_id,
                interrupted=False,
                exception_message=f"{error.message}\n{tips}",
                exception_type=error.exception_type,
                traceback=list(error.frames),
                current_inputs=_format_inputs(inputs),
            )
        except Exception as error:
            log.exception("!!! Exception during processing !!!")
            return _Failure(
                node_id,
                interrupted=False,
                exception_message=f"{error}\n",
                exception_type=_type_name(error),
                traceback=traceback.format_tb(error.__traceback__),
                current_inputs=_format_inputs(inputs),
            )
        if ui:
            self._ui_cache[signature] = {
                "meta": {
                    "node_id": node_id,
                    "display_node": node_id,
                    "parent_node": None,
                    "real_node_id": node_id,
                },
                "output": ui,
            }
            if run.client_id is not None:
                executed = {
                    "node": node_id,
                    "display_node": node_id,
                    "output": ui,
                    "prompt_id": run.prompt_id,
                }
                self._send_json("executed", executed, run.client_id)
        self._outputs_cache[signature] = outputs
        self._progress_finish(run, node_id)
        run.executed.append(node_id)
        return None

    async def _run_node(
        self, run: _Run, node_id: str, class_type: str, inputs: dict[str, Any]
    ) -> _NodeResult:
        if run.client_id is not None:
            self._last_node_id = node_id
            executing = {"node": node_id, "display_node": node_id, "prompt_id": run.prompt_id}
            self._send_json("executing", executing, run.client_id)
        # ComfyUI checks for an interrupt before each node runs, and in sampler steps.
        if self._interrupt.is_set():
            raise _Interrupted
        if self.faults.error_next > 0:
            self.faults.error_next -= 1
            raise _NodeError(LOAD_ERROR_TYPE, LOAD_ERROR_MESSAGE, LOAD_ERROR_TRACEBACK)
        return await self._runners[class_type](run, node_id, inputs)

    def _node_inputs(self, run: _Run, node_id: str) -> dict[str, Any]:
        node = run.item.prompt[node_id]
        inputs: dict[str, Any] = {}
        for name, _, _ in _input_specs(NODES[node["class_type"]]):
            if name not in node["inputs"]:
                continue
            value = node["inputs"][name]
            if _is_link(value):
                upstream = self._outputs_cache[run.signatures[value[0]]]
                value = upstream[int(value[1])]
            inputs[name] = value
        return inputs

    def _report_failure(self, run: _Run, failure: _Failure) -> None:
        class_type = run.item.prompt[failure.node_id]["class_type"]
        message: dict[str, Any] = {
            "prompt_id": run.prompt_id,
            "node_id": failure.node_id,
            "node_type": class_type,
            "executed": list(run.executed),
        }
        if failure.interrupted:
            self._add_message(run, "execution_interrupted", message, broadcast=True)
            return
        message |= {
            "exception_message": failure.exception_message,
            "exception_type": failure.exception_type,
            "traceback": failure.traceback,
            "current_inputs": failure.current_inputs,
            "current_outputs": list(run.item.prompt),
        }
        self._add_message(run, "execution_error", message, broadcast=False)

    # -- progress ----------------------------------------------------------------------

    def _progress_entry(self, run: _Run, node_id: str) -> dict[str, Any]:
        return run.progress.setdefault(node_id, {"state": "pending", "value": 0, "max": 1})

    def _progress_state(self, run: _Run) -> None:
        nodes = {
            node_id: {
                "value": entry["value"],
                "max": entry["max"],
                "state": entry["state"],
                "node_id": node_id,
                "prompt_id": run.prompt_id,
                "display_node_id": node_id,
                "parent_node_id": None,
                "real_node_id": node_id,
            }
            for node_id, entry in run.progress.items()
            if entry["state"] != "pending"
        }
        self._send_json(
            "progress_state", {"prompt_id": run.prompt_id, "nodes": nodes}, run.client_id
        )

    def _progress_start(self, run: _Run, node_id: str) -> None:
        self._progress_entry(run, node_id).update(state="running", value=0.0, max=1.0)
        self._progress_state(run)

    def _progress_finish(self, run: _Run, node_id: str) -> None:
        entry = self._progress_entry(run, node_id)
        entry.update(state="finished", value=entry["max"])
        self._progress_state(run)

    def _progress_step(
        self, run: _Run, node_id: str, step: int, steps: int, jpeg: bytes | None
    ) -> None:
        """One sampler step, in ComfyUI's order for this client's preview format."""
        self._progress_entry(run, node_id).update(state="running", value=step, max=steps)
        self._progress_state(run)
        metadata_client = self._supports_metadata(run.client_id)
        if jpeg is not None and metadata_client:
            metadata = {
                "node_id": node_id,
                "prompt_id": run.prompt_id,
                "display_node_id": node_id,
                "parent_node_id": None,
                "real_node_id": node_id,
                "image_type": "image/jpeg",
            }
            encoded = json.dumps(metadata).encode()
            header = struct.pack(">II", PREVIEW_IMAGE_WITH_METADATA, len(encoded))
            self._send_bytes(header + encoded + jpeg, run.client_id)
        progress = {"value": step, "max": steps, "prompt_id": run.prompt_id, "node": node_id}
        self._send_json("progress", progress, run.client_id)
        if jpeg is not None and not metadata_client:
            self._send_bytes(struct.pack(">II", PREVIEW_IMAGE, 1) + jpeg, run.client_id)

    # -- faults and time ---------------------------------------------------------------

    async def _pause(self, seconds: float) -> None:
        """Sleep, or raise _Interrupted as soon as POST /interrupt applies."""
        if self._interrupt.is_set():
            raise _Interrupted
        try:
            async with asyncio.timeout(seconds):
                await self._interrupt.wait()
        except TimeoutError:
            return
        raise _Interrupted

    async def _after_step(self, step: int) -> None:
        faults = self.faults
        if step == 1 and faults.hang_next > 0:
            faults.hang_next -= 1
            await self._interrupt.wait()
            raise _Interrupted
        if faults.drop_ws_at_step == step:
            faults.drop_ws_at_step = None
            await self._flush()
            self.drop_websockets()
        if faults.crash_at_step == step:
            faults.crash_at_step = None
            await self._flush()
            self._crash_task = asyncio.create_task(self.stop())
            await asyncio.Event().wait()  # stop() cancels this task

    async def _ensure_loaded(self, name: str) -> None:
        if name in self.loaded_models:
            self.loaded_models[name] = self.loaded_models.pop(name)  # most recently used
            return
        limit = self.resident_models
        if limit is not None:  # a GPU that holds ``limit`` models: evict the oldest
            while len(self.loaded_models) >= limit:
                del self.loaded_models[next(iter(self.loaded_models))]
        self.loads.append(name)
        if self.model_load_seconds > 0:
            await asyncio.sleep(self.model_load_seconds)
        self.loaded_models[name] = next(size for part, size in MODEL_SIZES if part in name.lower())

    def _out_of_memory(self) -> _NodeError:
        used = self._vram_used()
        gib = 2**30
        message = (
            "Allocation on device 0 would exceed allowed memory. (out of memory)\n"
            f"Currently allocated     : {used / gib:.2f} GiB\n"
            f"Requested               : {(self.vram_total - used) / gib + 1:.2f} GiB\n"
            f"Device limit            : {self.vram_total / gib:.2f} GiB\n"
            "Free (according to CUDA): 0 bytes\n"
            "PyTorch limit (set by user-supplied memory fraction)\n"
            "                        : 17179869184.00 GiB"
        )
        # ComfyUI unloads every model after an out-of-memory error.
        self.loaded_models.clear()
        return _NodeError(OOM_ERROR_TYPE, message, OOM_TRACEBACK)

    # -- the nodes ---------------------------------------------------------------------

    async def _checkpoint_loader(
        self, run: _Run, node_id: str, inputs: dict[str, Any]
    ) -> _NodeResult:
        name = str(inputs["ckpt_name"])
        await self._ensure_loaded(name)
        return (_Model(name), _Clip((name,)), _Vae(name)), None

    async def _unet_loader(self, run: _Run, node_id: str, inputs: dict[str, Any]) -> _NodeResult:
        name = str(inputs["unet_name"])
        await self._ensure_loaded(name)
        return (_Model(name),), None

    async def _dual_clip_loader(
        self, run: _Run, node_id: str, inputs: dict[str, Any]
    ) -> _NodeResult:
        return (_Clip((str(inputs["clip_name1"]), str(inputs["clip_name2"]))),), None

    async def _vae_loader(self, run: _Run, node_id: str, inputs: dict[str, Any]) -> _NodeResult:
        return (_Vae(str(inputs["vae_name"])),), None

    async def _clip_text_encode(
        self, run: _Run, node_id: str, inputs: dict[str, Any]
    ) -> _NodeResult:
        if not isinstance(inputs.get("clip"), _Clip):
            message = "ERROR: clip input is invalid: None"
            raise _NodeError("RuntimeError", message, _EXECUTE_FRAMES)
        return (_Conditioning(str(inputs["text"])),), None

    async def _empty_latent(self, run: _Run, node_id: str, inputs: dict[str, Any]) -> _NodeResult:
        latent = _Latent(
            int(inputs["width"]), int(inputs["height"]), int(inputs.get("batch_size", 1))
        )
        return (latent,), None

    async def _ksampler(self, run: _Run, node_id: str, inputs: dict[str, Any]) -> _NodeResult:
        model: _Model = inputs["model"]
        latent: _Latent = inputs["latent_image"]
        positive = inputs["positive"]
        steps = int(inputs["steps"])
        seed = int(inputs["seed"])
        label = f"{model.name}:{getattr(positive, 'text', '')}"
        # ComfyUI moves the model to the GPU when sampling starts, not when loading it.
        await self._ensure_loaded(model.name)
        if self.faults.oom_next > 0:
            self.faults.oom_next -= 1
            raise self._out_of_memory()
        noise, final = await asyncio.to_thread(_sampler_pictures, latent, f"{seed}:{label}")
        for step in range(1, steps + 1):
            await self._pause(self.step_seconds)
            jpeg = None
            if run.previews:
                jpeg = await asyncio.to_thread(
                    _preview_jpeg, noise, final, step / steps, self.preview_size
                )
            self._progress_step(run, node_id, step, steps, jpeg)
            await self._after_step(step)
        return (_Latent(latent.width, latent.height, latent.batch, seed, label),), None

    async def _vae_decode(self, run: _Run, node_id: str, inputs: dict[str, Any]) -> _NodeResult:
        frames = await asyncio.to_thread(_decode, inputs["samples"])
        return (_Images(frames),), None

    async def _empty_image(self, run: _Run, node_id: str, inputs: dict[str, Any]) -> _NodeResult:
        color = int(inputs.get("color", 0))
        rgb = ((color >> 16) & 0xFF, (color >> 8) & 0xFF, color & 0xFF)
        size = (int(inputs["width"]), int(inputs["height"]))
        frames = tuple(Image.new("RGB", size, rgb) for _ in range(int(inputs.get("batch_size", 1))))
        return (_Images(frames),), None

    async def _image_blur(self, run: _Run, node_id: str, inputs: dict[str, Any]) -> _NodeResult:
        images: _Images = inputs["image"]
        frames = await asyncio.to_thread(
            _blur, images.frames, int(inputs["blur_radius"]), float(inputs["sigma"])
        )
        return (_Images(frames),), None

    async def _primitive(self, run: _Run, node_id: str, inputs: dict[str, Any]) -> _NodeResult:
        return (inputs["value"],), None

    async def _vae_encode(self, run: _Run, node_id: str, inputs: dict[str, Any]) -> _NodeResult:
        images: _Images = inputs["pixels"]
        width, height = images.frames[0].size
        # ComfyUI crops the pixels to a multiple of 8 before encoding.
        return (_Latent(width // 8 * 8, height // 8 * 8, len(images.frames)),), None

    async def _image_scale_by(self, run: _Run, node_id: str, inputs: dict[str, Any]) -> _NodeResult:
        images: _Images = inputs["image"]
        scale = float(inputs["scale_by"])
        frames = tuple(
            frame.resize(
                (round(frame.width * scale), round(frame.height * scale)),
                Image.Resampling.LANCZOS,
            )
            for frame in images.frames
        )
        return (_Images(frames),), None

    async def _load_image(self, run: _Run, node_id: str, inputs: dict[str, Any]) -> _NodeResult:
        name = str(inputs["image"])
        key = self._input_image_key(name)
        data = self.files.get(key) if key is not None else None
        if data is None:
            raise FileNotFoundError(f"[Errno 2] No such file or directory: '{name}'")
        image = await asyncio.to_thread(_open_image, data)
        mask = Image.new("L", (64, 64), 0)
        return (_Images((image,)), mask), None

    async def _save_image(self, run: _Run, node_id: str, inputs: dict[str, Any]) -> _NodeResult:
        images: _Images = inputs["images"]
        preview = run.item.prompt[node_id]["class_type"] == "PreviewImage"
        kind = "temp" if preview else "output"
        prefix = str(inputs.get("filename_prefix", "ComfyUI"))
        if preview:
            prefix += "_temp_" + "".join(
                random.choice("abcdefghijklmnopqrstupvxyz") for _ in range(5)
            )
        width, height = images.frames[0].size if images.frames else (0, 0)
        folder, filename, counter = self._save_path(kind, prefix, width, height)
        text = {"prompt": json.dumps(run.item.prompt)}
        for key, value in run.item.extra_data.get("extra_pnginfo", {}).items():
            text[key] = json.dumps(value)
        results = []
        for batch_number, frame in enumerate(images.frames):
            name = f"{filename.replace('%batch_num%', str(batch_number))}_{counter:05}_.png"
            data = await asyncio.to_thread(_png, frame, text, 1 if preview else 4)
            self.files[(kind, folder, name)] = data
            results.append({"filename": name, "subfolder": folder, "type": kind})
            counter += 1
        return (), {"images": results}

    def _save_path(self, kind: str, prefix: str, width: int, height: int) -> tuple[str, str, int]:
        """ComfyUI's ``get_save_image_path``: the subfolder, the name, the next counter."""
        if "%" in prefix:
            now = time.localtime()
            for token, value in (
                ("%width%", str(width)),
                ("%height%", str(height)),
                ("%year%", str(now.tm_year)),
                ("%month%", f"{now.tm_mon:02}"),
                ("%day%", f"{now.tm_mday:02}"),
                ("%hour%", f"{now.tm_hour:02}"),
                ("%minute%", f"{now.tm_min:02}"),
                ("%second%", f"{now.tm_sec:02}"),
            ):
                prefix = prefix.replace(token, value)
        normal = posixpath.normpath(prefix.replace("\\", "/"))
        folder = _subfolder(posixpath.dirname(normal))
        if folder is None:
            raise _NodeError(
                "Exception",
                "**** ERROR: Saving image outside the output folder is not allowed.",
                _EXECUTE_FRAMES,
            )
        filename = posixpath.basename(normal)
        counter = 0
        for file_kind, file_folder, name in self.files:
            if file_kind != kind or file_folder != folder:
                continue
            head = name[: len(filename) + 1]
            if head[:-1] != filename or head[-1:] != "_":
                continue
            digits = name[len(filename) + 1 :].split("_")[0]
            counter = max(counter, int(digits) if digits.isdigit() else 0)
        return folder, filename, counter + 1


def _format_inputs(inputs: dict[str, Any]) -> dict[str, list[Any]]:
    """``current_inputs`` of an execution_error: plain values as they are, objects as text."""
    formatted: dict[str, list[Any]] = {}
    for name, value in inputs.items():
        if value is None or isinstance(value, bool | int | float | str):
            formatted[name] = [value]
        else:
            formatted[name] = [str(value)]
    return formatted


# -- as a process ----------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tests.emulators.comfyui",
        description="A ComfyUI look-alike for tests. Other ComfyUI flags are accepted and ignored.",
    )
    parser.add_argument("--listen", nargs="?", const="0.0.0.0,::", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8188)
    parser.add_argument("--step-seconds", type=float, default=0.005)
    parser.add_argument("--model-load-seconds", type=float, default=0.0)
    parser.add_argument("--preview-size", type=int, default=512)
    parser.add_argument("--preview-method", default="latent2rgb", help="'none' turns previews off")
    parser.add_argument(
        "--hang-on-start",
        action="store_true",
        help="never listen, as a ComfyUI stuck while starting (exits on SIGTERM)",
    )
    parser.add_argument(
        "--exit-after-prompts",
        type=int,
        metavar="N",
        help="exit with status 1 once N prompts have finished, as a crash would",
    )
    parser.add_argument(
        "--log-stdout", action="store_true", help="log to stdout instead of stderr, as ComfyUI"
    )
    return parser


async def _serve(args: argparse.Namespace, argv: list[str]) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    emulator = ComfyUIEmulator(
        step_seconds=args.step_seconds,
        preview_size=args.preview_size,
        model_load_seconds=args.model_load_seconds,
        preview_method=args.preview_method,
    )
    # What ComfyUI logs early in its start-up, long before it listens.
    log.info("Total VRAM %d MB, total RAM 65536 MB", emulator.vram_total // 2**20)
    log.info("Device: cuda:0 %s : cudaMallocAsync", emulator.device_name)
    if args.hang_on_start:
        await stop.wait()
        return 0
    host = str(args.listen).split(",")[0] or "127.0.0.1"
    emulator.argv = ["main.py", *argv]
    await emulator.start(host, args.port)
    shown = "127.0.0.1" if host == "0.0.0.0" else (f"[{host}]" if ":" in host else host)
    log.info("Starting server\n")
    log.info("To see the GUI go to: http://%s:%d", shown, emulator.port)
    waits: set[asyncio.Task[Any]] = {asyncio.create_task(stop.wait())}
    if args.exit_after_prompts is not None:
        waits.add(asyncio.create_task(emulator.wait_executed(args.exit_after_prompts)))
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in waits:
            task.cancel()
        await asyncio.gather(*waits, return_exceptions=True)
        await emulator.stop()
    if not stop.is_set():
        log.error(
            "Exiting after %d prompts, as asked (--exit-after-prompts)", args.exit_after_prompts
        )
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the emulator as a process, the way ComfyUI's ``main.py`` is run."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    args, _ = _parser().parse_known_args(arguments)
    stream = sys.stdout if args.log_stdout else sys.stderr
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=stream, force=True)
    return asyncio.run(_serve(args, arguments))


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        raise SystemExit(main())
