"""Settings of the object stores, read from the environment (and ``.env``).

``S3_*`` configures the shared bucket of production; ``BRIGADE_DATA_DIR`` and
``BRIGADE_PUBLIC_BASE_URL`` the local folder of the embedded mode. Secrets are
``SecretStr``: they never show in reprs, logs or error messages.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

SEVEN_DAYS = 7 * 24 * 3600
"""The longest lifetime S3 allows for a SigV4 presigned URL."""


class S3Settings(BaseSettings):
    """Where the S3 (or MinIO, SeaweedFS, R2...) bucket is and how to reach it."""

    # `.env.example` leaves the optional URLs empty: an empty variable means "unset".
    model_config = SettingsConfigDict(
        env_prefix="S3_", env_file=".env", extra="ignore", env_ignore_empty=True
    )

    endpoint_url: str | None = None
    """``None`` means AWS itself; set it for MinIO and other S3-compatible servers."""
    region: str = "us-east-1"
    bucket: str = "brigade"
    access_key_id: SecretStr | None = None
    """``None`` (with the secret) lets botocore find credentials itself (role, profile)."""
    secret_access_key: SecretStr | None = None
    prefix: str = "images"
    """Every key starts with this folder; several deployments can share one bucket."""
    public_base_url: str | None = None
    """When set (a CDN or a public bucket), image URLs are ``{public_base_url}/{key}``."""
    presign_seconds: int = Field(default=SEVEN_DAYS, ge=1, le=SEVEN_DAYS)
    addressing_style: Literal["path", "virtual", "auto"] = "path"
    timeout_seconds: float = Field(default=30.0, gt=0)
    """Connect and read timeout of each HTTP request to the store."""
    max_attempts: int = Field(default=5, ge=1)
    """Attempts per request (botocore's standard retry mode), the first one included."""
    create_bucket: bool = False
    """Create the bucket at start when it is missing (a convenience for development)."""


class LocalStoreSettings(BaseSettings):
    """The local folder that stands in for the bucket in the embedded mode."""

    model_config = SettingsConfigDict(
        env_prefix="BRIGADE_", env_file=".env", extra="ignore", env_ignore_empty=True
    )

    data_dir: Path = Path("data")
    public_base_url: str | None = None
    """Where ``api/`` serves the folder; without it URLs are ``file://`` paths."""

    @property
    def root(self) -> Path:
        """The folder images are written under: ``data_dir / "images"``."""
        return self.data_dir / "images"


class InputImageSettings(BaseSettings):
    """Limits on images users hand in (attachments, API uploads), checked by every frontend."""

    model_config = SettingsConfigDict(
        env_prefix="INPUT_IMAGE_", env_file=".env", extra="ignore", env_ignore_empty=True
    )

    max_bytes: int = Field(default=10 * 1024 * 1024, ge=1024)
    """Largest file accepted, in bytes (checked before it is read or decoded)."""
    max_pixels: int = Field(default=4096 * 4096, ge=64 * 64)
    """Largest width × height accepted (checked from the header, before decoding)."""
