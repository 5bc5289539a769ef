"""Every setting is an environment variable documented in ``.env.example``, and secrets
stay secret."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import SecretStr
from pydantic_settings import BaseSettings

from api.settings import ApiSettings
from bot.settings import DiscordSettings
from brigade.settings import BrigadeSettings
from jobs.quotas import QuotaDefaults
from jobs.settings import AmqpSettings, FairSettings, LedgerSettings
from renderer.settings import ComfyUISettings, RendererSettings
from storage.settings import InputImageSettings, LocalStoreSettings, S3Settings

SETTINGS: list[type[BaseSettings]] = [
    AmqpSettings,
    ApiSettings,
    BrigadeSettings,
    ComfyUISettings,
    DiscordSettings,
    FairSettings,
    InputImageSettings,
    LedgerSettings,
    LocalStoreSettings,
    QuotaDefaults,
    RendererSettings,
    S3Settings,
]
EXAMPLE = Path(__file__).parent.parent / ".env.example"


def env_names(settings: type[BaseSettings]) -> set[str]:
    prefix = settings.model_config.get("env_prefix", "")
    return {f"{prefix}{name}".upper() for name in settings.model_fields}


def test_every_setting_is_in_env_example() -> None:
    documented = set(re.findall(r"^([A-Z0-9_]+)=", EXAMPLE.read_text(), flags=re.MULTILINE))
    wanted = set().union(*(env_names(s) for s in SETTINGS))

    assert wanted - documented == set(), "settings missing from .env.example"
    assert documented - wanted == set(), ".env.example documents settings that do not exist"


def test_env_example_values_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    for line in EXAMPLE.read_text().splitlines():
        if (match := re.match(r"^([A-Z0-9_]+)=(.+)$", line)) is not None:
            monkeypatch.setenv(match.group(1), match.group(2))
    for settings in SETTINGS:
        settings(_env_file=None)


def test_secrets_do_not_show_in_reprs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AMQP_URL", "amqp://bob:hunter2@rabbit:5672/")
    monkeypatch.setenv("S3_SECRET_ACCESS_KEY", "s3cr3t-value")
    amqp = AmqpSettings(_env_file=None)
    s3 = S3Settings(_env_file=None)

    assert isinstance(amqp.url, SecretStr)
    assert "hunter2" not in repr(amqp) and "hunter2" not in str(amqp.model_dump())
    assert "s3cr3t-value" not in repr(s3)
