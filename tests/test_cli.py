"""The ``brigade`` command, run as a user runs it: a real process, the embedded mode."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from renderer.backends import UnknownBackend, available_backends, load_backend
from renderer.settings import RendererSettings
from tests.emulators.comfyui import ComfyUIEmulator
from workflows import Catalog


def brigade(
    tmp_path: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    environment = {
        **os.environ,
        "BRIGADE_DATA_DIR": str(tmp_path / "data"),
        "RENDERER_DEMO_STEP_SECONDS": "0",
        "RENDERER_DEVICE": "cpu",
    }
    environment.pop("COMFYUI_URL", None)
    environment.pop("AMQP_URL", None)
    environment.update(env or {})
    tmp_path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(
        [sys.executable, "-m", "brigade.cli", *args],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_imagine_prints_the_stored_image_path_last(tmp_path: Path) -> None:
    done = brigade(
        tmp_path,
        "imagine",
        "a lighthouse at dusk",
        "--seed",
        "7",
        "--steps",
        "4",
        "--width",
        "96",
        "--height",
        "64",
    )

    assert done.returncode == 0, done.stderr
    path = Path(done.stdout.strip().splitlines()[-1])
    assert path.is_file() and path.is_relative_to(tmp_path / "data" / "images")
    with Image.open(path) as image:
        assert image.size == (96, 64)
        assert image.info["prompt"] == "a lighthouse at dusk"
        assert image.info["seed"] == "7"


def test_imagine_is_deterministic_for_a_prompt_and_seed(tmp_path: Path) -> None:
    runs = [
        brigade(
            tmp_path / str(n),
            "imagine",
            "same",
            "--seed",
            "3",
            "--steps",
            "3",
            "--width",
            "64",
            "--height",
            "64",
            "--out",
            str(tmp_path / f"out{n}"),
        )
        for n in (1, 2)
    ]
    for run in runs:
        assert run.returncode == 0, run.stderr
    pixels = []
    for run in runs:
        with Image.open(run.stdout.strip().splitlines()[-1]) as image:
            pixels.append(image.tobytes())
    assert pixels[0] == pixels[1]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--width", "513"], "width: 513 is not a multiple of 8"),
        (["--steps", "500"], "steps: 500 is above the maximum (allowed: 1 to 50)"),
        (["--workflow", "nope"], "sd15-txt2img"),
    ],
)
def test_imagine_refuses_bad_input_with_the_field_and_range(
    tmp_path: Path, args: list[str], expected: str
) -> None:
    done = brigade(tmp_path, "imagine", "x", *args)

    assert done.returncode == 2
    assert expected in done.stderr
    assert done.stdout == ""
    assert not (tmp_path / "data" / "images").exists() or not any(
        (tmp_path / "data" / "images").rglob("*.png")
    )


def test_workflows_list_shows_templates_and_bounds(tmp_path: Path) -> None:
    done = brigade(tmp_path, "workflows", "list")

    assert done.returncode == 0, done.stderr
    for name in ("demo", "sd15-txt2img", "sdxl-txt2img", "flux-schnell-txt2img"):
        assert name in done.stdout
    assert "64..1024" in done.stdout


def test_the_console_script_is_installed() -> None:
    assert shutil.which("brigade", path=str(Path(sys.executable).parent)) is not None


def test_backends_come_from_entry_points() -> None:
    assert "demo" in available_backends()
    backend = load_backend("demo", RendererSettings(_env_file=None))
    assert backend.name == "demo"
    with pytest.raises(UnknownBackend, match=r"installed: .*demo"):
        load_backend("comfyui-next", RendererSettings(_env_file=None))


async def test_imagine_renders_through_comfyui_when_comfyui_url_is_set(
    tmp_path: Path, comfyui: ComfyUIEmulator
) -> None:
    done = await asyncio.to_thread(
        brigade,
        tmp_path,
        "imagine",
        "a lighthouse at dusk",
        "--workflow",
        "sd15-txt2img",
        "--checkpoint",
        "tiny_sd15_random.safetensors",
        "--steps",
        "3",
        "--width",
        "64",
        "--height",
        "96",
        env={"COMFYUI_URL": comfyui.url},
    )

    assert done.returncode == 0, done.stderr
    with Image.open(done.stdout.strip().splitlines()[-1]) as image:
        assert image.size == (64, 96)
        assert image.info["prompt"] == "a lighthouse at dusk"
    assert len(comfyui.executed) == 1
    (body,) = comfyui.submitted
    assert body["prompt"]["4"]["inputs"]["ckpt_name"] == "tiny_sd15_random.safetensors"


async def test_imagine_names_a_checkpoint_comfyui_lacks(
    tmp_path: Path, comfyui: ComfyUIEmulator
) -> None:
    done = await asyncio.to_thread(
        brigade,
        tmp_path,
        "imagine",
        "x",
        "--workflow",
        "sd15-txt2img",
        "--checkpoint",
        "nope.ckpt",
        env={"COMFYUI_URL": comfyui.url},
    )

    assert done.returncode == 1
    assert 'ckpt_name "nope.ckpt" is not in the list' in done.stderr


def test_imagine_falls_back_to_the_demo_when_comfyui_does_not_answer(tmp_path: Path) -> None:
    """The embedded default: ComfyUI at COMFYUI_URL when one answers, else the demo."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        silent = f"http://127.0.0.1:{sock.getsockname()[1]}"  # bound, never listening
        done = brigade(
            tmp_path,
            "imagine",
            "x",
            "--steps",
            "2",
            "--width",
            "64",
            "--height",
            "64",
            env={"COMFYUI_URL": silent, "COMFYUI_CONNECT_TIMEOUT_SECONDS": "1"},
        )

    assert done.returncode == 0, done.stderr
    assert "backend.fallback" in done.stderr
    assert Path(done.stdout.strip().splitlines()[-1]).is_file()


def test_imagine_with_comfyui_required_but_down_says_so(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        done = brigade(
            tmp_path,
            "imagine",
            "x",
            env={
                "COMFYUI_URL": f"http://127.0.0.1:{sock.getsockname()[1]}",
                "COMFYUI_CONNECT_TIMEOUT_SECONDS": "1",
                "RENDERER_BACKEND": "comfyui",
            },
        )

    assert done.returncode == 1
    assert "brigade: the renderer backend did not start" in done.stderr
    assert "Traceback" not in done.stderr


async def test_workflows_check_against_a_comfyui(tmp_path: Path, comfyui: ComfyUIEmulator) -> None:
    fits = await asyncio.to_thread(
        brigade, tmp_path, "workflows", "check", "--comfyui-url", comfyui.url
    )
    comfyui.checkpoints = ["tiny_sd15_random.safetensors"]
    lacks = await asyncio.to_thread(
        brigade, tmp_path, "workflows", "check", "--comfyui-url", comfyui.url
    )

    assert fits.returncode == 0, fits.stdout + fits.stderr
    assert "sd15-txt2img: ok" in fits.stdout and "demo: ok" in fits.stdout
    assert lacks.returncode == 1
    assert "sd15-txt2img: 1 problem(s)" in lacks.stdout
    assert '"v1-5-pruned-emaonly.safetensors" is not on the server' in lacks.stdout
    assert "tiny_sd15_random.safetensors" in lacks.stdout


def test_workflows_check_without_a_server_loads_every_template(tmp_path: Path) -> None:
    done = brigade(tmp_path, "workflows", "check")

    assert done.returncode == 0, done.stderr
    assert f"{len(Catalog.load().names())} templates load and validate" in done.stdout
    assert "img2img" in done.stdout and "upscale" in done.stdout


def test_imagine_says_nothing_on_stderr_about_a_clean_stop(tmp_path: Path) -> None:
    done = brigade(tmp_path, "imagine", "quiet", "--steps", "2", "--width", "64", "--height", "64")

    assert done.returncode == 0, done.stderr
    assert "drain_timeout" not in done.stderr
    assert "warning" not in done.stderr.lower()
