"""A lost, empty, foreign or damaged index must never become data loss (issue 11, items 2, 8)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import gnu_tar
from test_cli import cli, js
from test_lifecycle import make_tree, spawn, wait_event
from test_roundtrip import build_tree

from layerstore import Store


@pytest.fixture(scope="module")
def tarballs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("lostindex")
    a = gnu_tar(build_tree(base / "a"), base / "a.tar")
    b = gnu_tar(build_tree(base / "b"), base / "b.tar")
    return a, b


def make_store(root: Path, tar: Path) -> str:
    """A store with one layer, made by the CLI; returns the layer's DiffID."""
    assert cli(root, "init").returncode == 0
    return str(js(cli(root, "--json", "import", str(tar)))["diff_id"])  # type: ignore[index]


@pytest.fixture
def stores(tmp_path: Path, tarballs: tuple[Path, Path]) -> tuple[Path, str, Path]:
    """This store (one layer) and another store (a different layer)."""
    root, other = tmp_path / "store", tmp_path / "other"
    diff_id = make_store(root, tarballs[0])
    make_store(other, tarballs[1])
    return root, diff_id, other


# -- gc and the layer backups ---------------------------------------------------------------------
def test_gc_deletes_no_backup_it_did_not_make_obsolete(stores: tuple[Path, str, Path]) -> None:
    """A backup the index does not know (a crash leftover -- or the only record of a layer
    whose index is gone) is fsck's to judge, and fsck --repair only quarantines it."""
    root, diff_id, _ = stores
    ghost = "ab" * 32
    backup = root / "layers" / f"{ghost}.json"
    shutil.copyfile(root / "layers" / f"{diff_id[7:]}.json", backup)
    assert js(cli(root, "--json", "gc"))["objects_freed"] == 0  # type: ignore[index]
    assert backup.exists()
    rep = cli(root, "--json", "fsck", "--quick")
    assert rep.returncode == 4
    assert json.loads(rep.stdout)["counts"] == {"layer-backup-extra": 1}


def test_gc_removes_the_backup_of_a_removal_it_finishes(store: Store, tmp_path: Path) -> None:
    """The one backup gc deletes: that of a layer whose deferred removal gc itself finishes
    (removed while a reader had it pinned; the reader died)."""
    y = store.import_path(str(gnu_tar(make_tree(tmp_path / "y", 300, 6), tmp_path / "y.tar")))
    backup = Path(store.layers_dir, y.diff_id[7:] + ".json")
    p = spawn("materialize", store.root, y.diff_id, str(tmp_path / "my"), "0.05")
    wait_event(p, "started")
    assert store.remove(y.diff_id)["deferred"]
    assert backup.exists()  # still needed: the layer is only deferred
    p.kill()
    p.wait()
    assert store.gc().layers_finalized == 1
    assert not backup.exists()
    assert store.fsck().exit_code == 0
