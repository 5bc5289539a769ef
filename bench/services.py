"""Brigade's services as processes of their own, for the benchmarks that run them so.

``brigade renderer``, ``brigade bot`` and ``brigade api`` are started with
``python -m brigade.cli`` in a folder of their own (so no ``.env`` is read), with an
environment built here from scratch for the bench's broker prefix, bucket and data
folder, and JSON logs in a file. :class:`Service` reads what the benchmarks measure from
``/proc``: CPU seconds, peak resident memory (``VmHWM``), whether torch is mapped.
:func:`comfyui_emulators` runs ComfyUI emulators, each a process of its own as a real
ComfyUI is (one per GPU).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.pipeline import emulator_process
from storage.settings import S3Settings

URL = os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
ROOT = Path(__file__).resolve().parent.parent
#: Settings of ours that a developer's shell may hold; a service sees only the bench's.
OWN_PREFIXES = ("AMQP_", "S3_", "RENDERER_", "COMFYUI_", "DISCORD_", "BRIGADE_", "API_", "QUOTA_")
START_SECONDS = 60.0
STOP_SECONDS = 10.0
TICK = os.sysconf("SC_CLK_TCK")
#: Lines every ``brigade bot`` logs and nobody needs (discord.py without voice extras).
NOISE = ("voice will NOT be supported",)


def service_env(
    prefix: str, data_dir: Path, s3: S3Settings | None, **settings: str
) -> dict[str, str]:
    """The environment of one service: this machine's, less our settings, plus the
    bench's broker (``prefix``), bucket, data folder and ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(OWN_PREFIXES)}
    env.update(
        PYTHONPATH=str(ROOT),
        AMQP_URL=URL,
        AMQP_PREFIX=prefix,
        BRIGADE_DATA_DIR=str(data_dir),
        BRIGADE_LOG_FORMAT="json",
        BRIGADE_LOG_LEVEL="info",
    )
    if s3 is not None:
        assert s3.access_key_id is not None and s3.secret_access_key is not None
        env.update(
            S3_ENDPOINT_URL=str(s3.endpoint_url),
            S3_BUCKET=s3.bucket,
            S3_REGION=s3.region,
            S3_PREFIX=prefix,
            S3_ACCESS_KEY_ID=s3.access_key_id.get_secret_value(),
            S3_SECRET_ACCESS_KEY=s3.secret_access_key.get_secret_value(),
        )
    env.update(settings)
    return env


@dataclass
class Service:
    """One ``brigade`` process: its command, environment, log file and process."""

    name: str
    args: list[str]
    env: dict[str, str]
    folder: Path
    process: subprocess.Popen[bytes] | None = None
    #: CPU seconds of the processes this one replaced (``restart``).
    cpu_before: float = 0.0
    starts: int = 0

    @property
    def log_path(self) -> Path:
        return self.folder / f"{self.name}.log"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "brigade.cli", *self.args],
                env=self.env,
                cwd=self.folder,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.starts += 1

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """``kill -9``, then reap it; its CPU time is kept in ``cpu_before``."""
        assert self.process is not None
        self.cpu_before += self.cpu_seconds(alive_only=True)
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=STOP_SECONDS)

    def stop(self) -> None:
        """SIGTERM (the service drains), SIGKILL after ``STOP_SECONDS``; reaped."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=STOP_SECONDS)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def cpu_seconds(self, *, alive_only: bool = False) -> float:
        """User and system CPU seconds of the live process (and, unless ``alive_only``,
        of the ones it replaced)."""
        spent = 0.0 if alive_only else self.cpu_before
        if self.running():
            with contextlib.suppress(OSError):
                fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
                spent += (int(fields[11]) + int(fields[12])) / TICK
        return spent

    def status(self, field: str) -> int:
        """A ``kB`` figure of ``/proc/<pid>/status`` (``VmHWM``: peak resident set)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
        raise KeyError(field)

    def maps(self, needle: str) -> list[str]:
        """Files mapped into the process whose path contains ``needle``."""
        found = set()
        for line in Path(f"/proc/{self.pid}/maps").read_text().splitlines():
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and needle in parts[5]:
                found.add(parts[5])
        return sorted(found)

    def log_events(self, name: str | None = None) -> list[dict[str, Any]]:
        """The JSON lines of its log (every start), those named ``name`` when given."""
        events = []
        with contextlib.suppress(OSError):
            for line in self.log_path.read_text(errors="replace").splitlines():
                if not line.startswith("{"):
                    continue
                with contextlib.suppress(ValueError):
                    event = json.loads(line)
                    if name is None or event.get("event") == name:
                        events.append(event)
        return events

    def wait_for_log(self, name: str, count: int = 1, timeout: float = START_SECONDS) -> None:
        """Wait until its log holds ``count`` events named ``name``; raise with the log's
        tail if the process ends first or time runs out."""
        deadline = time.monotonic() + timeout
        while len(self.log_events(name)) < count:
            if not self.running() or time.monotonic() > deadline:
                tail = "\n".join(self.log_path.read_text(errors="replace").splitlines()[-30:])
                raise RuntimeError(f"{self.name} did not log {name!r}:\n{tail}")
            time.sleep(0.05)

    def warnings(self) -> list[str]:
        """Lines logged at warning level or above (and anything not JSON: tracebacks)."""
        lines = []
        with contextlib.suppress(OSError):
            for line in self.log_path.read_text(errors="replace").splitlines():
                if not line.startswith("{"):
                    if not any(noise in line for noise in NOISE):
                        lines.append(line)
                    continue
                with contextlib.suppress(ValueError):
                    if json.loads(line).get("level") in ("warning", "error", "critical"):
                        lines.append(line)
        return lines


def renderer(
    name: str,
    folder: Path,
    prefix: str,
    s3: S3Settings | None,
    comfyui_url: str,
    **settings: str,
) -> Service:
    """``brigade renderer`` on the ComfyUI backend at ``comfyui_url``, worker id ``name``."""
    env = service_env(
        prefix,
        folder / name,
        s3,
        RENDERER_WORKER_ID=name,
        RENDERER_BACKEND="comfyui",
        COMFYUI_URL=comfyui_url,
        RENDERER_HEARTBEAT_SECONDS="1",
        **settings,
    )
    return Service(name, ["renderer"], env, folder)


def stop_all(services: Sequence[Service]) -> None:
    """``stop`` side by side: SIGTERM to every one, then wait for each (they drain
    together, so stopping a fleet takes as long as its slowest, not their sum)."""
    for service in services:
        if service.running():
            assert service.process is not None
            service.process.send_signal(signal.SIGTERM)
    for service in services:
        service.stop()


@contextlib.contextmanager
def comfyui_emulators(
    count: int, step_seconds: float, logs: Path
) -> Iterator[list[tuple[str, int]]]:
    """``count`` ComfyUI emulators, each a process of its own: their URLs and pids."""
    with contextlib.ExitStack() as stack:
        yield [
            stack.enter_context(emulator_process(step_seconds, logs / f"emulator-{n}.log"))
            for n in range(count)
        ]


def machine_cpu() -> float:
    """CPU seconds the whole machine has been busy (all but idle, iowait and steal)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:9]]
    return (sum(values) - values[3] - values[4] - values[7]) / TICK


def process_cpu(pid: int) -> float:
    """User and system CPU seconds of process ``pid`` (0 if it is gone)."""
    with contextlib.suppress(OSError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICK
    return 0.0


def own_cpu() -> float:
    times = os.times()
    return times.user + times.system
