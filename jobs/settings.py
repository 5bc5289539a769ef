"""Settings of the job system: the broker (``AMQP_*``) and the ledger (``BRIGADE_*``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from jobs.topology import DEFAULT_DELIVERY_LIMIT, Topology, build_topology


def split_csv(value: object) -> object:
    """Accept ``fast,relax`` as well as a JSON list for list settings."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class AmqpSettings(BaseSettings):
    """Where RabbitMQ is and how the topology is named. Unset ``AMQP_URL`` = embedded."""

    model_config = SettingsConfigDict(
        env_prefix="AMQP_", env_file=".env", extra="ignore", env_ignore_empty=True
    )

    #: ``amqp://user:password@host:5672/vhost``; a secret because it holds the password.
    url: SecretStr | None = None
    #: Prefix of every exchange and queue name, so deployments can share a vhost.
    prefix: str = Field(default="brigade", pattern=r"^[A-Za-z0-9_-]{1,64}$")
    #: Lanes that exist (each is one queue). The first is the default lane.
    lanes: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["fast"])
    #: Failed deliveries (crashes included) before a job goes to the dead-letter queue.
    delivery_limit: int = Field(default=DEFAULT_DELIVERY_LIMIT, ge=0, le=100)
    #: Seconds for connecting and for each publisher confirm.
    timeout_seconds: float = Field(default=10.0, gt=0)
    #: Model affinity: a job for a model file waits this long for a renderer that has the
    #: model loaded, then any renderer of its lane takes it. 0 turns affinity off. Every
    #: service of a deployment must agree (it is an argument of the model queues).
    affinity_wait_seconds: float = Field(default=30.0, ge=0, le=3600)

    _split_lanes = field_validator("lanes", mode="before")(split_csv)

    @field_validator("lanes")
    @classmethod
    def _check_lanes(cls, lanes: list[str]) -> list[str]:
        if not lanes:
            raise ValueError("at least one lane is needed")
        for lane in lanes:
            if not lane.replace("-", "").replace("_", "").isalnum() or len(lane) > 32:
                raise ValueError(f"lane {lane!r}: use letters, digits, - and _ (at most 32)")
        return lanes

    def topology(self) -> Topology:
        return build_topology(
            self.lanes,
            prefix=self.prefix,
            delivery_limit=self.delivery_limit,
            affinity_wait_ms=round(self.affinity_wait_seconds * 1000),
        )


class FairSettings(BaseSettings):
    """How a frontend releases its jobs to the broker (``jobs/fairness.py``)."""

    model_config = SettingsConfigDict(
        env_prefix="FAIR_", env_file=".env", extra="ignore", env_ignore_empty=True
    )

    #: Jobs of this frontend waiting at the broker, per worker serving the lane. The rest
    #: wait in the ledger and are released round robin across tenants and users.
    window_per_worker: int = Field(default=2, ge=1, le=1000)
    #: The window when few or no workers are known (at least this many wait there).
    window_min: int = Field(default=2, ge=1, le=100_000)
    #: Releases also happen this often (workers come and go, claims lapse).
    release_seconds: float = Field(default=1.0, gt=0, le=60)


class LedgerSettings(BaseSettings):
    """Where a frontend keeps its SQLite ledger."""

    model_config = SettingsConfigDict(
        env_prefix="BRIGADE_", env_file=".env", extra="ignore", env_ignore_empty=True
    )

    #: Folder for the ledger (and, in the embedded mode, the images).
    data_dir: Path = Path("data")

    @property
    def ledger_path(self) -> Path:
        return self.data_dir / "ledger.sqlite3"
