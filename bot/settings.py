"""Settings of the Discord bot (``DISCORD_*``). Only this module reads them from the
environment; the entry point (``bot.service``) builds one and passes it down."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from jobs.settings import split_csv


class DiscordSettings(BaseSettings):
    """How the bot reaches Discord and how it behaves there."""

    model_config = SettingsConfigDict(
        env_prefix="DISCORD_", env_file=".env", extra="ignore", env_ignore_empty=True
    )

    #: The bot token (Developer Portal → Bot). Secret: never logged.
    token: SecretStr | None = None
    #: Discord's REST base; a deployment may put a rate-limit proxy in front.
    api_base_url: str = "https://discord.com/api/v10"
    #: Discord's gateway; discord.py resumes on the READY payload's URL after that.
    gateway_url: str = "wss://gateway.discord.gg/"
    #: Users who may run the global admin commands everywhere (comma-separated ids).
    owner_ids: Annotated[list[int], NoDecode] = Field(default_factory=list)
    #: Guilds the commands are synced to at start-up, for instant updates while developing
    #: (comma-separated ids). Empty: the commands are synced globally.
    dev_guilds: Annotated[list[int], NoDecode] = Field(default_factory=list)
    #: No message is edited more often than this (seconds); stale frames are dropped.
    edit_interval_seconds: float = Field(default=1.5, ge=0.0, le=60.0)
    #: The workflow ``/imagine`` uses when none is given and the guild allows any.
    default_workflow: str | None = None
    #: The workflow the Upscale button runs on a finished picture (one ``image`` parameter
    #: and a ``prompt``). ``off``, or a name the catalog lacks: no Upscale button. Not
    #: "empty means off": an empty variable means unset here, as everywhere.
    upscale_workflow: str = "upscale"
    #: Seconds discord.py waits after the last GUILD_CREATE before it is ready.
    guild_ready_timeout: float = Field(default=2.0, ge=0.0)
    #: ``/healthz`` and ``/readyz`` of ``brigade bot`` on this port (unset: off; 0: any),
    #: on ``DISCORD_HEALTH_HOST``. Ready: the gateway is connected, the broker and the
    #: ledger answer.
    health_port: int | None = Field(default=None, ge=0, le=65535)
    health_host: str = "127.0.0.1"

    _split_owners = field_validator("owner_ids", mode="before")(split_csv)
    _split_guilds = field_validator("dev_guilds", mode="before")(split_csv)
