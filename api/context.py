"""What the handlers share: the services the composition root hands over, the settings,
the metrics, and the open event streams. One :class:`ApiState` per app."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from aiohttp import web

from api.database import ApiDatabase
from api.keys import KeyStore
from api.metrics import Metrics
from api.settings import ApiSettings
from jobs.admission import Admission
from jobs.bus import JobBus
from jobs.control import JobControl
from jobs.ledger import Ledger
from jobs.models import Event
from jobs.quotas import QuotaSettings
from jobs.registry import WorkerRegistry
from jobs.tracker import JobTracker
from storage import InputImageSettings, LocalStore, ObjectStore
from workflows import Catalog


class StreamEnd:
    """Put in an event stream's queue: the watch ended, or the server is stopping."""


STREAM_END = StreamEnd()
StreamQueue = asyncio.Queue[Event | StreamEnd]


@dataclass(frozen=True, slots=True)
class Services:
    """A frontend's parts (``brigade.app.Frontend``) plus what only the API needs."""

    admission: Admission
    tracker: JobTracker
    ledger: Ledger
    catalog: Catalog
    control: JobControl
    workers: WorkerRegistry
    quota_defaults: QuotaSettings
    bus: JobBus
    db: ApiDatabase
    keys: KeyStore
    #: Where outputs are; None when this process has none configured. A
    #: :class:`LocalStore` is also served at ``/images/`` (the embedded mode).
    store: ObjectStore | None = None
    #: Limits on uploaded input images (``INPUT_IMAGE_*``); None: the defaults.
    input_limits: InputImageSettings | None = None

    @property
    def local_store(self) -> LocalStore | None:
        return self.store if isinstance(self.store, LocalStore) else None


@dataclass
class ApiState:
    services: Services
    settings: ApiSettings
    metrics: Metrics
    #: The status page's key for the ``local`` tenant; only when bound to loopback.
    local_key: str | None = None
    #: Open event streams; each gets None when the server stops.
    streams: set[StreamQueue] = field(default_factory=set)


STATE = web.AppKey("brigade_state", ApiState)


def state(request: web.Request) -> ApiState:
    return request.app[STATE]
