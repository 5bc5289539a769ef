"""Process-wide settings of the ``brigade`` command (``BRIGADE_*``)."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from jobs.settings import split_csv


class BrigadeSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="BRIGADE_", env_file=".env", extra="ignore", env_ignore_empty=True
    )

    #: Ledger, embedded-mode images, anything a process keeps on disk.
    data_dir: Path = Path("data")
    #: Folders with extra workflow templates (``*.manifest.json``), comma-separated;
    #: a template here replaces a built-in one of the same name.
    workflows_dirs: Annotated[list[Path], NoDecode] = Field(default_factory=list)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    #: ``auto``: JSON lines when stderr is not a terminal, readable lines when it is.
    log_format: Literal["auto", "json", "console"] = "auto"
    #: This frontend instance's name: its event queue is ``<prefix>.events.<frontend_id>``.
    #: Must be stable across restarts so no event is stranded.
    frontend_id: str = Field(
        default_factory=lambda: f"cli-{socket.gethostname()}", pattern=r"^[A-Za-z0-9_.-]{1,64}$"
    )

    _split_dirs = field_validator("workflows_dirs", mode="before")(split_csv)
