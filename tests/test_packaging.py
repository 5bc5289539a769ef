"""The bot and the API install and import without torch; only the renderer needs it."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_torch_is_only_in_the_renderer_extra() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]

    def names(requirements: list[str]) -> set[str]:
        return {r.split(">")[0].split("=")[0].split("[")[0].strip().lower() for r in requirements}

    assert "torch" not in names(project["dependencies"])
    assert "torch" not in names(extras["bot"])
    assert "torch" in names(extras["renderer"])


def test_frontend_modules_do_not_import_torch() -> None:
    code = (
        "import sys, api, api.app, api.server, bot, brigade.app, brigade.cli, jobs.admission, "
        "jobs.rabbitmq, jobs.tracker, renderer.worker, renderer.backends, storage, workflows; "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)
