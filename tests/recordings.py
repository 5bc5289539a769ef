"""Where the recordings of a real ComfyUI are: ``shared/comfyui/recordings`` beside the
repository (as CI lays it out), or ``$COMFYUI_RECORDINGS``. A test that needs them and
cannot find them fails: it never passes quietly."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]


def find_recordings() -> Path | None:
    candidates: list[str | Path] = [
        os.environ.get("COMFYUI_RECORDINGS", ""),
        REPO / "shared" / "comfyui" / "recordings",
        REPO.parent / "shared" / "comfyui" / "recordings",
        "/work/shared/comfyui/recordings",
    ]
    for candidate in candidates:
        if candidate and (Path(candidate) / "basic.json").is_file():
            return Path(candidate)
    return None


RECORDINGS = find_recordings()


def recordings_dir() -> Path:
    if RECORDINGS is None:
        pytest.fail(
            "the ComfyUI recordings are missing: expected shared/comfyui/recordings beside "
            "the repository, or $COMFYUI_RECORDINGS",
            pytrace=False,
        )
    return RECORDINGS


def recording(name: str) -> Any:
    return json.loads((recordings_dir() / name).read_text())
