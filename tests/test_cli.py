"""The ``brigade`` command, run as a user runs it: a real process, the embedded mode."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from renderer.backends import UnknownBackend, available_backends, load_backend
from renderer.settings import RendererSettings


def brigade(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "BRIGADE_DATA_DIR": str(tmp_path / "data"),
        "RENDERER_DEMO_STEP_SECONDS": "0",
        "RENDERER_DEVICE": "cpu",
    }
    env.pop("COMFYUI_URL", None)
    env.pop("AMQP_URL", None)
    tmp_path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(
        [sys.executable, "-m", "brigade.cli", *args],
        cwd=tmp_path,
        env=env,
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
