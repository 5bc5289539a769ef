"""The ``brigade`` command.

``brigade imagine "PROMPT"`` runs one job through the embedded pipeline and prints where
the image is; ``brigade renderer`` runs a production worker; ``brigade workflows list``
shows the templates; ``brigade api`` runs the HTTP API (``brigade api keys create`` makes
its keys); ``brigade up`` runs everything in one process with the API in front.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from brigade.logs import configure_logging
from brigade.settings import BrigadeSettings

if TYPE_CHECKING:
    from jobs.models import JobRequest
    from renderer.settings import RendererSettings

#: Exit codes: 0 done, 1 the job failed, 2 the request was refused.
EXIT_FAILED = 1
EXIT_INVALID = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="brigade", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    imagine = commands.add_parser(
        "imagine", help="render one prompt in this process (embedded mode) and print its path"
    )
    imagine.add_argument("prompt")
    imagine.add_argument("--workflow", default="demo", help="template name (default: demo)")
    imagine.add_argument("--negative")
    imagine.add_argument("--seed", type=int)
    imagine.add_argument("--steps", type=int)
    imagine.add_argument("--cfg", type=float)
    imagine.add_argument("--width", type=int)
    imagine.add_argument("--height", type=int)
    imagine.add_argument("--count", type=int, help="images in this job (the batch)")
    imagine.add_argument("--checkpoint", help="checkpoint file name, as the ComfyUI lists it")
    imagine.add_argument(
        "--out", type=Path, help="folder for the images (default: DATA_DIR/images)"
    )
    imagine.add_argument("--timeout", type=float, default=900.0, help="seconds to wait (900)")
    imagine.add_argument("-v", "--verbose", action="store_true", help="log at info level")

    renderer = commands.add_parser("renderer", help="run a renderer worker against RabbitMQ and S3")
    renderer.add_argument(
        "--gpus",
        help="one worker and one supervised ComfyUI per GPU: 'all' or a list such as 0,1,3 "
        "(needs COMFYUI_PATH)",
    )

    workflows = commands.add_parser("workflows", help="workflow templates")
    workflow_commands = workflows.add_subparsers(dest="workflows_command", required=True)
    listing = workflow_commands.add_parser("list", help="list templates and their parameters")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    check = workflow_commands.add_parser(
        "check", help="check every template, and against a ComfyUI's /object_info when given"
    )
    check.add_argument("--comfyui-url", help="a ComfyUI to check against (default: COMFYUI_URL)")
    check.add_argument("--checkpoint", help="check with this checkpoint instead of the defaults")
    add = workflow_commands.add_parser(
        "add", help="propose a manifest for a graph saved with ComfyUI's Save (API)"
    )
    add.add_argument("graph", type=Path, help="the graph, e.g. workflow_api.json")
    add.add_argument("--name", help="workflow name (default: from the file name)")
    add.add_argument("--backends", default="comfyui", help="comma-separated (default: comfyui)")
    add.add_argument("--force", action="store_true", help="replace an existing manifest")
    _api_parsers(commands)
    return parser


def _api_parsers(commands: Any) -> None:
    api = commands.add_parser(
        "api", help="run the HTTP API against RabbitMQ (AMQP_URL), the ledger and the store"
    )
    api_commands = api.add_subparsers(dest="api_command")
    keys = api_commands.add_parser("keys", help="API keys, in the ledger of BRIGADE_DATA_DIR")
    key_commands = keys.add_subparsers(dest="keys_command", required=True)
    create = key_commands.add_parser("create", help="create a key for a tenant; prints it once")
    create.add_argument("--tenant", required=True, help="the tenant (quotas apply per tenant)")
    create.add_argument("--name", help="a note for admins: who or what uses the key")
    listing = key_commands.add_parser("list", help="list keys (never the keys themselves)")
    listing.add_argument("--tenant")
    revoke = key_commands.add_parser("revoke", help="revoke a key at once")
    revoke.add_argument("key_id", help="the key's id (the 12 hex digits after brg_)")
    commands.add_parser(
        "bot",
        help="the Discord bot (DISCORD_TOKEN) over RabbitMQ (AMQP_URL), the ledger and the store",
    )
    commands.add_parser(
        "up",
        help="everything in one process: in-process broker, renderer, local images, and the "
        "API with its status page on API_HOST:API_PORT (127.0.0.1:8080)",
    )


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    settings = BrigadeSettings()
    if args.command == "imagine":
        configure_logging("info" if args.verbose else "warning", settings.log_format)
        return asyncio.run(_imagine(args, settings))
    configure_logging(settings.log_level, settings.log_format)
    if args.command == "renderer":
        return asyncio.run(_renderer(args.gpus))
    if args.command == "api":
        if args.api_command == "keys":
            return asyncio.run(_api_keys(args, settings))
        return asyncio.run(_serve("api"))
    if args.command == "up":
        return asyncio.run(_serve("up"))
    if args.command == "bot":
        return asyncio.run(_bot())
    if args.workflows_command == "check":
        return asyncio.run(_workflows_check(settings, args.comfyui_url, args.checkpoint))
    if args.workflows_command == "add":
        return _workflows_add(args)
    return _workflows_list(settings, as_json=args.json)


async def _imagine(args: argparse.Namespace, settings: BrigadeSettings) -> int:
    from jobs.models import JobRequest

    try:
        request = JobRequest(
            workflow=args.workflow,
            prompt=args.prompt,
            negative=args.negative,
            seed=args.seed,
            steps=args.steps,
            cfg=args.cfg,
            width=args.width,
            height=args.height,
            count=args.count,
            checkpoint=args.checkpoint,
        )
    except ValueError as exc:
        print(f"brigade: {exc}", file=sys.stderr)
        return EXIT_INVALID
    from renderer.backends import UnknownBackend
    from renderer.exceptions import BackendUnavailable
    from renderer.settings import RendererSettings

    bar = ProgressBar(sys.stderr)
    # Ctrl-C should stop at once: nobody waits for a job this process no longer watches.
    renderer = RendererSettings().model_copy(update={"drain_seconds": 0.0})
    try:
        return await _run_one(args, settings, request, renderer, bar)
    except UnknownBackend as exc:
        print(f"brigade: {exc}. Unset COMFYUI_URL or set RENDERER_BACKEND=demo.", file=sys.stderr)
        return EXIT_INVALID
    except BackendUnavailable as exc:
        print(f"brigade: the renderer backend did not start: {exc}", file=sys.stderr)
        return EXIT_FAILED


async def _run_one(
    args: argparse.Namespace,
    settings: BrigadeSettings,
    request: JobRequest,
    renderer: RendererSettings,
    bar: ProgressBar,
) -> int:
    from brigade.app import embedded
    from jobs.exceptions import InvalidRequest
    from jobs.models import Failed, Origin, Preview, Progress, Succeeded

    async with embedded(settings, renderer=renderer, images_dir=args.out) as app:
        front = app.frontend
        origin = Origin(frontend="cli", reply_to=settings.frontend_id)
        try:
            admitted = await front.admission.submit(
                request, idempotency_key=f"cli:{uuid.uuid4()}", origin=origin
            )
        except InvalidRequest as exc:
            for error in exc.errors:
                print(f"brigade: {error.message}", file=sys.stderr)
            return EXIT_INVALID
        job = admitted.job
        bar.note(f"job {job.job_id} · {job.workflow} · seed {job.seed}")
        async with asyncio.timeout(args.timeout), front.tracker.watch(job.job_id) as watch:
            async for event in watch:
                if isinstance(event, Progress):
                    bar.update(event.step, event.total)
                elif isinstance(event, Preview):
                    bar.preview()
                elif isinstance(event, Failed):
                    bar.done()
                    print(f"brigade: {event.reason.value}: {event.message}", file=sys.stderr)
                    return EXIT_FAILED
                elif isinstance(event, Succeeded):
                    bar.done()
                    for output in event.outputs:
                        print(_local_path(output.url))
                    return 0
    return EXIT_FAILED  # pragma: no cover - a watch always ends with a terminal event


def _local_path(url: str) -> str:
    """A ``file://`` URL as a plain path people can open; other URLs as they are."""
    if url.startswith("file://"):
        from urllib.parse import unquote, urlparse

        return unquote(urlparse(url).path)
    return url


class ProgressBar:
    """A one-line progress bar on a terminal; sparse lines anywhere else."""

    WIDTH = 30

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._tty = stream.isatty()
        self._previews = 0
        self._last_quarter = -1

    def note(self, text: str) -> None:
        print(text, file=self._stream)

    def preview(self) -> None:
        self._previews += 1

    def update(self, step: int, total: int) -> None:
        if self._tty:
            filled = self.WIDTH * step // total
            bar = "█" * filled + "·" * (self.WIDTH - filled)
            self._stream.write(f"\r{bar} {step}/{total} steps · {self._previews} previews")
            self._stream.flush()
            return
        quarter = 4 * step // total
        if quarter != self._last_quarter:
            self._last_quarter = quarter
            print(f"step {step}/{total}", file=self._stream)

    def done(self) -> None:
        if self._tty:
            self._stream.write("\n")
            self._stream.flush()


def stop_on_signals() -> asyncio.Event:
    """An event set at SIGTERM or SIGINT (a service's ``stop``): the service then stops
    in order, rather than dying where it stands."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    return stop


async def _renderer(gpu_spec: str | None) -> int:
    from brigade.app import renderer_service
    from renderer.gpus import GpuError, parse_gpus

    try:
        # nvidia-smi blocks: not on the event loop.
        gpus = await asyncio.to_thread(parse_gpus, gpu_spec) if gpu_spec is not None else None
    except GpuError as exc:
        print(f"brigade: {exc}", file=sys.stderr)
        return EXIT_INVALID
    stop = stop_on_signals()
    try:
        await renderer_service(stop, gpus)
    except GpuError as exc:
        print(f"brigade: {exc}", file=sys.stderr)
        return EXIT_INVALID
    return 0


async def _bot() -> int:
    """``brigade bot`` until SIGTERM or SIGINT."""
    from bot.service import run_bot

    stop = stop_on_signals()
    await run_bot(stop)  # SystemExit with a message: no token, no AMQP_URL, token refused
    return 0


async def _serve(mode: str) -> int:
    """``brigade api`` or ``brigade up`` until SIGTERM or SIGINT."""
    from pydantic import ValidationError

    from api.settings import ApiSettings
    from brigade.app import api_service, up_service

    try:
        api = ApiSettings()
    except ValidationError as exc:
        print(f"brigade: {exc}", file=sys.stderr)
        return EXIT_INVALID
    stop = stop_on_signals()
    try:
        if mode == "api":
            await api_service(stop, api)
        else:
            if "status_page" not in api.model_fields_set:  # on unless API_STATUS_PAGE says no
                api = api.model_copy(update={"status_page": True})
            await up_service(stop, api)
    except OSError as exc:
        print(f"brigade: cannot listen on {api.host}:{api.port}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return 0


async def _api_keys(args: argparse.Namespace, settings: BrigadeSettings) -> int:
    """``brigade api keys create|list|revoke`` on the ledger's file, no server needed."""
    from api.database import ApiDatabase
    from api.keys import KeyStore
    from jobs.ledger import Ledger
    from jobs.settings import LedgerSettings

    path = LedgerSettings(data_dir=settings.data_dir).ledger_path
    ledger = Ledger(path)
    await ledger.open()  # creates the ledger's tables in a new data folder
    db = ApiDatabase(path)
    try:
        await db.open()
        keys = KeyStore(db)
        if args.keys_command == "create":
            try:
                created = await keys.create(args.tenant, args.name)
            except ValueError as exc:
                print(f"brigade: {exc}", file=sys.stderr)
                return EXIT_INVALID
            print(
                f"key {created.info.key_id} for tenant {created.info.tenant} (shown once; "
                "only its hash is stored):",
                file=sys.stderr,
            )
            print(created.key)
            return 0
        if args.keys_command == "revoke":
            revoked = await keys.revoke(args.key_id)
            if revoked is None:
                print(f"brigade: no API key {args.key_id!r}", file=sys.stderr)
                return EXIT_FAILED
            print(f"revoked {revoked.key_id} ({revoked.tenant})")
            return 0
        for key in await keys.list(args.tenant):
            state = f"revoked {key.revoked_at:%Y-%m-%d}" if key.revoked_at else "active"
            print(f"{key.key_id}  {key.tenant:<20} {state:<18} {key.name or ''}")
        return 0
    finally:
        await db.close()
        await ledger.close()


def _workflows_list(settings: BrigadeSettings, *, as_json: bool) -> int:
    from workflows import Catalog

    catalog = Catalog.load(settings.workflows_dirs)
    described: list[dict[str, Any]] = [template.describe() for template in catalog]
    if as_json:
        print(json.dumps(described, indent=2))
        return 0
    for template in catalog:
        manifest = template.manifest
        print(f"{manifest.name}  ({', '.join(manifest.backends)})  {manifest.title}")
        for name, param in manifest.params.items():
            print(f"    {name:<11} {_summary(param)}")
    return 0


def _workflows_add(args: argparse.Namespace) -> int:
    """Propose a manifest for a graph, write it next to the graph, say what it binds."""
    from workflows import WorkflowError
    from workflows.importer import add

    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    try:
        proposal, written = add(args.graph, name=args.name, backends=backends, force=args.force)
    except WorkflowError as exc:
        print(f"brigade: {args.graph}: {exc}", file=sys.stderr)
        return EXIT_INVALID
    print(proposal.describe())
    print(f"wrote {written}")
    print(
        f"check it against your ComfyUI: BRIGADE_WORKFLOWS_DIRS={written.parent}"
        " brigade workflows check --comfyui-url URL"
    )
    return 0


async def _workflows_check(
    settings: BrigadeSettings, url: str | None, checkpoint: str | None
) -> int:
    """Load every template; with a ComfyUI, check each against its ``/object_info``."""
    from renderer.comfyui.client import ComfyUIClient
    from renderer.exceptions import RenderError
    from renderer.settings import ComfyUISettings
    from workflows import Catalog, WorkflowError
    from workflows.compat import check_template, default_params

    try:
        catalog = Catalog.load(settings.workflows_dirs)
    except WorkflowError as exc:
        print(f"brigade: {exc}", file=sys.stderr)
        return EXIT_FAILED
    url = url or ComfyUISettings().effective_url
    if url is None:
        print(f"{len(catalog)} templates load and validate: {', '.join(catalog.names())}")
        print("(give --comfyui-url or set COMFYUI_URL to check them against a server)")
        return 0
    client = ComfyUIClient(url, "brigade-workflows-check")
    try:
        object_info = await client.object_info()
    except RenderError as exc:
        print(f"brigade: cannot read {url}/object_info: {exc}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        await client.close()
    failed = 0
    for template in catalog:
        if "comfyui" not in template.manifest.backends:
            continue
        params = default_params(template)
        if checkpoint is not None and "checkpoint" in params:
            params = template.resolve({**params, "checkpoint": checkpoint})
        problems = check_template(template, object_info, params)
        failed += bool(problems)
        print(f"{template.name}: {'ok' if not problems else f'{len(problems)} problem(s)'}")
        for problem in problems:
            print(f"    {problem}")
    return EXIT_FAILED if failed else 0


def _summary(param: Any) -> str:
    parts = [param.type]
    if param.min is not None or param.max is not None:
        parts.append(f"{param.min}..{param.max}")
    if param.multiple_of:
        parts.append(f"×{param.multiple_of}")
    if param.max_length:
        parts.append(f"≤{param.max_length} chars")
    if param.choices:
        parts.append("|".join(param.choices))
    if param.default is not None:
        parts.append(f"default {param.default}")
    elif param.random:
        parts.append("random")
    if param.required:
        parts.append("required")
    return ", ".join(str(part) for part in parts)


if __name__ == "__main__":
    raise SystemExit(main())
