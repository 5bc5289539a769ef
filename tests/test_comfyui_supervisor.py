"""The ComfyUI supervisor, with a stand-in ComfyUI: a ``main.py`` that serves
``/system_stats``, can be told to hang, and starts a grandchild process, so the tests
see restarts and that nothing outlives a stop."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from renderer.comfyui.supervisor import ComfyUIDidNotStart, ComfyUISupervisor, SupervisorConfig

FAKE_MAIN = """
import argparse, os, pathlib, subprocess, sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

parser = argparse.ArgumentParser()
parser.add_argument("--listen"); parser.add_argument("--port", type=int)
parser.add_argument("--fail-start", action="store_true")
args, _ = parser.parse_known_args()
here = pathlib.Path(__file__).parent
if args.fail_start:
    sys.exit(3)
# A grandchild, as ComfyUI's custom nodes sometimes start: it must die with the group.
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
(here / "grandchild.pid").write_text(str(child.pid))
(here / "starts").open("a").write(f"{os.getpid()} {os.environ.get('CUDA_VISIBLE_DEVICES')}\\n")

class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        if (here / "hang").exists():
            time.sleep(30)
        self.send_response(200); self.send_header("Content-Type", "application/json")
        self.end_headers(); self.wfile.write(b'{"system": {}, "devices": []}')
    def log_message(self, *a):
        print("request", self.path, flush=True)

print("To see the GUI go to: http://%s:%d" % (args.listen, args.port), flush=True)
ThreadingHTTPServer((args.listen, args.port), Handler).serve_forever()
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); its state in /proc says Z.
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"


@pytest.fixture
def comfy_dir(tmp_path: Path) -> Path:
    (tmp_path / "main.py").write_text(FAKE_MAIN)
    return tmp_path


def config(path: Path, **overrides: object) -> SupervisorConfig:
    fields: dict[str, object] = {
        "path": path,
        "port": free_port(),
        "gpu": "1",
        "start_timeout": 20.0,
        "health_interval": 0.2,
        "health_timeout": 0.5,
        "health_failures": 2,
        "max_faults": 2,
        "stop_timeout": 2.0,
        **overrides,
    }
    return SupervisorConfig(**fields)  # type: ignore[arg-type]


@pytest.fixture
async def supervisor(comfy_dir: Path) -> AsyncIterator[ComfyUISupervisor]:
    supervisor = ComfyUISupervisor(config(comfy_dir))
    await supervisor.start()
    yield supervisor
    await supervisor.stop()


async def wait_until(predicate: object, timeout: float = 20) -> None:
    assert callable(predicate)
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.05)


def starts(path: Path) -> list[str]:
    return (path / "starts").read_text().splitlines() if (path / "starts").exists() else []


async def test_it_starts_comfyui_on_its_gpu_and_waits_until_it_answers(
    supervisor: ComfyUISupervisor, comfy_dir: Path
) -> None:
    assert supervisor.healthy
    ((pid, gpu),) = [line.split() for line in starts(comfy_dir)]
    assert int(pid) == supervisor.pid
    assert gpu == "1"


async def test_stop_kills_the_whole_process_group_and_leaves_no_zombie(comfy_dir: Path) -> None:
    supervisor = ComfyUISupervisor(config(comfy_dir))
    await supervisor.start()
    pid = supervisor.pid
    assert pid is not None
    grandchild = int((comfy_dir / "grandchild.pid").read_text())

    await supervisor.stop()

    assert not alive(pid)
    await wait_until(lambda: not alive(grandchild), timeout=5)
    await supervisor.stop()  # twice is fine


async def test_a_comfyui_that_exits_is_started_again(
    supervisor: ComfyUISupervisor, comfy_dir: Path
) -> None:
    first = supervisor.pid
    assert first is not None
    os.kill(first, signal.SIGKILL)

    await wait_until(lambda: len(starts(comfy_dir)) == 2 and supervisor.healthy)

    assert supervisor.pid != first
    assert supervisor.restarts == 1
    assert not alive(first)


async def test_a_hung_comfyui_is_killed_and_started_again(
    supervisor: ComfyUISupervisor, comfy_dir: Path
) -> None:
    first = supervisor.pid
    (comfy_dir / "hang").touch()
    await wait_until(lambda: not supervisor.healthy)
    (comfy_dir / "hang").unlink()

    await wait_until(lambda: supervisor.healthy and supervisor.pid != first)

    assert supervisor.restarts >= 1
    assert first is not None and not alive(first)


async def test_consecutive_gpu_faults_restart_it_and_a_success_resets_the_count(
    supervisor: ComfyUISupervisor, comfy_dir: Path
) -> None:
    supervisor.record_fault()
    supervisor.record_success()
    supervisor.record_fault()
    await asyncio.sleep(0.3)
    assert supervisor.restarts == 0

    supervisor.record_fault()

    await wait_until(lambda: supervisor.restarts == 1 and supervisor.healthy)
    assert len(starts(comfy_dir)) == 2


async def test_a_comfyui_that_cannot_start_is_reported(comfy_dir: Path) -> None:
    supervisor = ComfyUISupervisor(config(comfy_dir, extra_args=("--fail-start",)))

    with pytest.raises(ComfyUIDidNotStart, match="exited with code 3"):
        await supervisor.start()
    assert supervisor.pid is None


def test_the_command_is_comfyuis_own() -> None:
    command = SupervisorConfig(path=Path("/opt/ComfyUI"), port=8190, extra_args=("--lowvram",))
    assert command.command() == [
        sys.executable,
        "/opt/ComfyUI/main.py",
        "--listen",
        "127.0.0.1",
        "--port",
        "8190",
        "--lowvram",
    ]
