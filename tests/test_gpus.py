"""One renderer per GPU: the GPU list, each GPU's settings, and ``brigade renderer --gpus``
as a real process with one emulated ComfyUI per (fake) GPU."""

from __future__ import annotations

import asyncio
import os
import signal
import stat
import sys
from pathlib import Path

import pytest

from jobs.models import Succeeded
from renderer.gpus import GpuError, nvidia_smi_gpus, parse_gpus, per_gpu
from renderer.settings import ComfyUISettings, RendererSettings
from storage.settings import S3Settings
from tests.fixtures.pipeline import Rig, start_renderer_process, stop_process

REPO = Path(__file__).resolve().parents[1]


def test_a_list_of_gpus() -> None:
    assert parse_gpus("0,1, 3") == ["0", "1", "3"]
    assert parse_gpus("GPU-8f6c2a1e-0000-1111") == ["GPU-8f6c2a1e-0000-1111"]
    assert parse_gpus("all", discover=lambda: ["0", "1"]) == ["0", "1"]


@pytest.mark.parametrize(
    ("spec", "message"),
    [("", "no GPU"), ("0,x", "'x' is not an index"), ("1,1", "listed twice"), ("0;1", "not an")],
)
def test_a_bad_gpu_list_says_what_is_allowed(spec: str, message: str) -> None:
    with pytest.raises(GpuError, match=message):
        parse_gpus(spec, discover=lambda: [])


def fake_nvidia_smi(folder: Path, gpus: int) -> Path:
    script = folder / "nvidia-smi"
    lines = "\\n".join(str(n) for n in range(gpus))
    script.write_text(f"#!/bin/sh\nprintf '{lines}\\n'\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


def test_all_asks_nvidia_smi(tmp_path: Path) -> None:
    assert nvidia_smi_gpus(str(fake_nvidia_smi(tmp_path, 3))) == ["0", "1", "2"]
    with pytest.raises(GpuError, match="not on PATH"):
        nvidia_smi_gpus(str(tmp_path / "missing"))


def test_each_gpu_gets_its_port_device_and_worker_id(tmp_path: Path) -> None:
    renderer = RendererSettings(_env_file=None, worker_id="host7")
    comfyui = ComfyUISettings(_env_file=None, path=tmp_path, url="http://127.0.0.1:8190")

    configured = per_gpu(renderer, comfyui, ["0", "2"])

    assert [(r.worker_id, c.url, c.gpu) for r, c in configured] == [
        ("host7-gpu0", "http://127.0.0.1:8190", "0"),
        ("host7-gpu2", "http://127.0.0.1:8191", "2"),
    ]
    supervisor = configured[1][1].supervisor_config()
    assert supervisor is not None and (supervisor.port, supervisor.gpu) == (8191, "2")
    with pytest.raises(GpuError, match="COMFYUI_PATH"):
        per_gpu(renderer, ComfyUISettings(_env_file=None), ["0"])


def emulated_comfyui(folder: Path) -> Path:
    """A ComfyUI folder whose main.py is the emulator, noting its GPU, port and pid."""
    (folder / "main.py").write_text(
        "import os, runpy, sys\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "port = sys.argv[sys.argv.index('--port') + 1]\n"
        "with open(os.path.join(os.path.dirname(__file__), 'started'), 'a') as f:\n"
        "    f.write(f\"{os.environ.get('CUDA_VISIBLE_DEVICES')} {port} {os.getpid()}\\n\")\n"
        "sys.argv = ['comfyui', *sys.argv[1:], '--step-seconds', '0.02']\n"
        "runpy.run_module('tests.emulators.comfyui', run_name='__main__')\n"
    )
    return folder


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/stat")
    return status.exists() and status.read_text().split()[2] != "Z"


@pytest.mark.rabbitmq
@pytest.mark.s3
@pytest.mark.parametrize("brokers", ["rabbitmq"], indirect=True)
@pytest.mark.parametrize("spec", ["0,1,2", "all"])
async def test_renderer_gpus_runs_one_worker_and_one_comfyui_per_gpu(
    rig: Rig, amqp_url: str, s3_settings: S3Settings, tmp_path: Path, spec: str
) -> None:
    (tmp_path / "comfy").mkdir()
    comfy = emulated_comfyui(tmp_path / "comfy")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake_nvidia_smi(bin_dir, 2)
    expected = 3 if spec != "all" else 2
    process = start_renderer_process(
        rig,
        amqp_url,
        s3_settings,
        tmp_path,
        "host",
        "--gpus",
        spec,
        COMFYUI_PATH=str(comfy),
        COMFYUI_URL=f"http://127.0.0.1:{free_port_block(expected)}",
        COMFYUI_PYTHON=sys.executable,
        RENDERER_HEARTBEAT_SECONDS="0.2",
        PATH=f"{bin_dir}:{os.environ['PATH']}",
    )
    try:
        async with asyncio.timeout(60):
            while len(rig.front.workers.workers()) < expected:
                await asyncio.sleep(0.1)
        assert sorted(b.worker_id for b in rig.front.workers.workers()) == [
            f"host-gpu{n}" for n in range(expected)
        ]
        jobs = [
            await rig.submit(
                f"k{n}",
                workflow="sd15-txt2img",
                steps=3,
                width=64,
                height=64,
                checkpoint="tiny_sd15_random.safetensors",
                seed=n,
            )
            for n in range(expected)
        ]
        results = [await rig.front.tracker.wait(job, timeout=30) for job in jobs]
        process.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(process.wait, 30)
    finally:
        stop_process(process)

    started = [line.split() for line in (comfy / "started").read_text().splitlines()]
    assert sorted(device for device, _, _ in started) == [str(n) for n in range(expected)]
    assert len({port for _, port, _ in started}) == expected
    assert all(isinstance(result, Succeeded) for result in results)
    assert code == 0
    for _, _, pid in started:
        assert not alive(int(pid)), "a ComfyUI outlived its renderer"


def free_port_block(count: int) -> int:
    """A base port with ``count`` free ports after it (ComfyUI i listens on base + i)."""
    import socket

    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = int(probe.getsockname()[1])
        if base + count > 65535:
            continue
        sockets = []
        try:
            for offset in range(count):
                candidate = socket.socket()
                sockets.append(candidate)
                candidate.bind(("127.0.0.1", base + offset))
        except OSError:
            continue
        finally:
            for candidate in sockets:
                candidate.close()
        return base
    raise RuntimeError("no block of free ports")
