"""Catalog: built-ins first, extra directories override by name, unknown names list the rest."""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path

import pytest

from workflows import Catalog, ManifestError, UnknownWorkflow
from workflows.catalog import BUILTIN_DIR


def copy_builtin(builtin: str, directory: Path, /, **changes: object) -> Path:
    """Copy a built-in template into ``directory`` with manifest fields changed."""
    manifest = json.loads((BUILTIN_DIR / f"{builtin}.manifest.json").read_text())
    manifest.update(changes)
    graph = manifest["graph"]
    (directory / graph).write_text((BUILTIN_DIR / graph).read_text())
    path = directory / f"{manifest['name']}.manifest.json"
    path.write_text(json.dumps(manifest))
    return path


def test_get_contains_names_iter() -> None:
    catalog = Catalog.load()
    assert "sd15-txt2img" in catalog
    assert "nope" not in catalog
    assert catalog.get("demo").name == "demo"
    assert [t.name for t in catalog] == catalog.names()
    assert len(catalog) == len(catalog.names())


def test_unknown_workflow_lists_names() -> None:
    catalog = Catalog.load()
    with pytest.raises(UnknownWorkflow) as caught:
        catalog.get("sd3")
    assert "demo" in catalog.names()
    assert str(caught.value) == (
        f'unknown workflow "sd3" (available: {", ".join(catalog.names())})'
    )
    assert caught.value.available == tuple(catalog.names())
    copy = pickle.loads(pickle.dumps(caught.value))
    assert str(copy) == str(caught.value)


def test_extra_dir_adds_and_overrides(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    copy_builtin("demo", tmp_path, title="Local demo")
    copy_builtin("demo", tmp_path, name="my-demo", graph="demo.json")
    with caplog.at_level(logging.INFO, logger="workflows.catalog"):
        catalog = Catalog.load([tmp_path])
    assert catalog.get("demo").manifest.title == "Local demo"
    assert catalog.get("demo").source == tmp_path / "demo.manifest.json"
    assert catalog.get("my-demo").source == tmp_path / "my-demo.manifest.json"
    assert catalog.get("sd15-txt2img").source.parent == BUILTIN_DIR
    overridden = [r for r in caplog.records if "workflow.overridden" in r.getMessage()]
    assert len(overridden) == 1
    assert "name=demo" in overridden[0].getMessage()
    assert str(BUILTIN_DIR / "demo.manifest.json") in overridden[0].getMessage()


def test_later_dirs_win(tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    copy_builtin("demo", first, title="First")
    copy_builtin("demo", second, title="Second")
    assert Catalog.load([first, second]).get("demo").manifest.title == "Second"
    assert Catalog.load([second, first]).get("demo").manifest.title == "First"


def test_duplicate_name_in_one_dir(tmp_path: Path) -> None:
    copy_builtin("demo", tmp_path)
    manifest = json.loads((tmp_path / "demo.manifest.json").read_text())
    (tmp_path / "other.manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match='workflow name "demo" is also used by'):
        Catalog.load([tmp_path])


def test_broken_template_in_extra_dir_fails_loading(tmp_path: Path) -> None:
    copy_builtin("demo", tmp_path, outputs=["404"])
    with pytest.raises(ManifestError, match='output node "404"'):
        Catalog.load([tmp_path])


def test_missing_extra_dir(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="not a directory"):
        Catalog.load([tmp_path / "absent"])


def test_other_json_files_are_not_manifests(tmp_path: Path) -> None:
    copy_builtin("demo", tmp_path, name="local")
    (tmp_path / "notes.json").write_text("{}")
    assert "local" in Catalog.load([tmp_path])
