"""Settings of the HTTP API (``API_*``), documented in ``.env.example``."""

from __future__ import annotations

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

#: An admin key shorter than this is refused at start-up: it would be guessable.
MIN_ADMIN_KEY_LENGTH = 16


class ApiSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="API_", env_file=".env", extra="ignore", env_ignore_empty=True
    )

    #: Address to listen on. Only a loopback address lets the status page hand itself a key.
    host: str = "127.0.0.1"
    #: Port to listen on (0: any free port, for tests).
    port: int = Field(default=8080, ge=0, le=65535)
    #: The key of the admin endpoints (create and revoke API keys, set a tenant's quota).
    #: Unset: no admin endpoint answers. A secret: it is never logged.
    admin_key: SecretStr | None = None
    #: Serve the status page at ``/`` (``brigade up`` turns it on unless set).
    status_page: bool = False
    #: Seconds between two heartbeat comments on an event stream, so proxies keep it open.
    sse_heartbeat_seconds: float = Field(default=15.0, gt=0, le=300)
    #: Largest request body accepted (a job request is well under 4 KiB).
    max_body_bytes: int = Field(default=65536, ge=1024, le=16 * 1024 * 1024)

    @field_validator("admin_key")
    @classmethod
    def _long_enough(cls, key: SecretStr | None) -> SecretStr | None:
        if key is not None and len(key.get_secret_value()) < MIN_ADMIN_KEY_LENGTH:
            raise ValueError(f"API_ADMIN_KEY must be at least {MIN_ADMIN_KEY_LENGTH} characters")
        return key
