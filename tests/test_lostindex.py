"""A lost, empty, foreign or damaged index must never become data loss (issue 11, items 2, 8).

Without its index a store still holds everything that matters -- objects/ and the layer
backups in layers/ -- and `fsck --rebuild-index` brings the layers back from them.  What used to
happen instead: every command quietly opened a new empty index, `ls` said "no layers" with
exit 0, and `gc` deleted every object and every backup.  Now the store knows its index (a uuid
and a generation in layerstore.json and in the index) and every command but the rebuild refuses
to use one that is not its own.  All of it through the CLI, as a user meets it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import lmdb
import pytest
from conftest import gnu_tar
from test_cli import cli, js
from test_lifecycle import make_tree, spawn, wait_event
from test_roundtrip import build_tree

from layerstore import Store

REBUILD = "run `layerstore fsck --rebuild-index`"


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


def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file under objects/ and layers/: what must survive untouched."""
    out = {}
    for sub in ("objects", "layers"):
        for dirpath, _dirs, files in os.walk(root / sub):
            for n in files:
                p = os.path.join(dirpath, n)
                with open(p, "rb") as f:
                    out[os.path.relpath(p, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


def refused(p: subprocess.CompletedProcess, code: int = 3) -> str:
    err = p.stderr.decode()
    assert "Traceback" not in err, err
    assert p.returncode == code, (p.returncode, p.stdout.decode(), err)
    return err


def lose_index(root: Path, how: str, other: Path | None = None) -> None:
    """Replace root/index the ways it gets lost: deleted, emptied, recreated, or swapped."""
    idx = root / "index"
    shutil.rmtree(idx)
    if how == "empty-dir":
        idx.mkdir()
    elif how == "new-lmdb":  # what every command used to create silently
        lmdb.open(str(idx), max_dbs=16).close()
    elif how == "foreign":
        assert other is not None
        shutil.copytree(other / "index", idx)


@pytest.fixture
def stores(tmp_path: Path, tarballs: tuple[Path, Path]) -> tuple[Path, str, Path]:
    """This store (one layer) and another store (a different layer)."""
    root, other = tmp_path / "store", tmp_path / "other"
    diff_id = make_store(root, tarballs[0])
    make_store(other, tarballs[1])
    return root, diff_id, other


COMMANDS = [
    ("ls",),
    ("gc",),
    ("gc", "--dry-run"),
    ("import", "{tar}"),
    ("materialize", "{diff_id}", "{dest}"),
    ("show", "{diff_id}"),
    ("export", "{diff_id}", "-o", "{dest}"),
    ("rm", "{diff_id}"),
    ("du",),
    ("images",),
    ("init",),
]


def run(root: Path, cmd: tuple[str, ...], **fill: str) -> subprocess.CompletedProcess:
    return cli(root, *(a.format(**fill) for a in cmd))


@pytest.mark.parametrize("how", ["missing", "empty-dir", "new-lmdb", "foreign"])
def test_lost_index_is_refused_by_every_command(
    stores: tuple[Path, str, Path], tarballs: tuple[Path, Path], tmp_path: Path, how: str
) -> None:
    root, diff_id, other = stores
    lose_index(root, how, other)
    before = snapshot(root)
    index_before = snapshot_index(root)
    dest = tmp_path / "dest"
    for cmd in COMMANDS:
        err = refused(run(root, cmd, tar=str(tarballs[1]), diff_id=diff_id, dest=str(dest)))
        assert REBUILD in err, (cmd, err)
        assert str(root / "index") in err, (cmd, err)
        assert not dest.exists()
    # fsck keeps its own documented exit codes: 8, "the store could not be checked"
    for args in (("fsck",), ("fsck", "--quick"), ("fsck", "--repair")):
        assert REBUILD in refused(cli(root, *args), 8), args
        rj = cli(root, "--json", *args)
        assert rj.returncode == 8 and REBUILD in json.loads(rj.stdout)["error"]
    # nothing was deleted, nothing created: not even an empty index in place of a missing one
    assert snapshot(root) == before
    assert snapshot_index(root) == index_before

    # the one command that proceeds: afterwards the store works again, with its layer back
    r = cli(root, "--json", "fsck", "--rebuild-index")
    assert r.returncode == 0, r.stderr.decode()
    assert json.loads(r.stdout)["layers"] == 1
    assert [li["diff_id"] for li in js(cli(root, "--json", "ls"))] == [diff_id]  # type: ignore[index]
    assert js(cli(root, "--json", "fsck"))["exit_code"] == 0  # type: ignore[index]
    gc = js(cli(root, "--json", "gc"))
    assert gc["objects_freed"] == 0 and gc["orphans_removed"] == 0  # type: ignore[index]
    assert snapshot(root) == before
    js(cli(root, "--json", "materialize", diff_id, str(dest)))
    assert (dest / "etc" / "hostname").read_text() == "box\n"


def snapshot_index(root: Path) -> dict[str, str] | None:
    idx = root / "index"
    if not idx.exists():
        return None
    return {
        n: hashlib.sha256((idx / n).read_bytes()).hexdigest()
        for n in sorted(os.listdir(idx))
        if n != "lock.mdb"  # LMDB's reader table: opening for a look may touch it
    }


def test_init_on_a_store_without_its_index_refuses(stores: tuple[Path, str, Path]) -> None:
    root, diff_id, _ = stores
    shutil.rmtree(root / "index")
    before = snapshot(root)
    assert REBUILD in refused(cli(root, "init"))
    assert not (root / "index").exists()
    # the very sequence of the issue: init, then gc, must not wipe the store
    assert REBUILD in refused(cli(root, "gc"))
    assert snapshot(root) == before
    assert cli(root, "fsck", "--rebuild-index").returncode == 0
    assert [li["diff_id"] for li in js(cli(root, "--json", "ls"))] == [diff_id]  # type: ignore[index]


def test_identity_is_recorded_and_rebuild_moves_the_generation(
    stores: tuple[Path, str, Path],
) -> None:
    root, _, other = stores
    fmt = json.loads((root / "layerstore.json").read_text())
    assert len(fmt["uuid"]) == 32 and fmt["index_generation"] == 1
    assert json.loads((other / "layerstore.json").read_text())["uuid"] != fmt["uuid"]
    with Store(str(root)) as st, st.index.read() as txn:
        assert st.index.get_meta(txn, "store_uuid") == fmt["uuid"]
        assert st.index.get_meta(txn, "index_generation") == "1"

    old = root.parent / "index-copy"
    shutil.copytree(root / "index", old)
    assert cli(root, "fsck", "--rebuild-index").returncode == 0
    fmt2 = json.loads((root / "layerstore.json").read_text())
    assert fmt2["uuid"] == fmt["uuid"] and fmt2["index_generation"] == 2
    assert js(cli(root, "--json", "fsck"))["exit_code"] == 0  # type: ignore[index]
    # an index from before the rebuild (restored from a copy) is stale: refused
    shutil.rmtree(root / "index")
    shutil.copytree(old, root / "index")
    err = refused(cli(root, "ls"))
    assert REBUILD in err and "generation" in err


def _make_old(root: Path) -> None:
    """Turn a store into one written before store identities existed."""
    fmt = json.loads((root / "layerstore.json").read_text())
    del fmt["uuid"], fmt["index_generation"]
    (root / "layerstore.json").write_text(json.dumps(fmt))
    env = lmdb.open(str(root / "index"), max_dbs=32)
    meta = env.open_db(b"meta")
    with env.begin(write=True) as txn:
        txn.delete(b"store_uuid", db=meta)
        txn.delete(b"index_generation", db=meta)
    env.close()


def test_old_store_without_identity_is_adopted(stores: tuple[Path, str, Path]) -> None:
    root, diff_id, _ = stores
    _make_old(root)
    assert [li["diff_id"] for li in js(cli(root, "--json", "ls"))] == [diff_id]  # type: ignore[index]
    fmt = json.loads((root / "layerstore.json").read_text())
    assert len(fmt["uuid"]) == 32 and fmt["index_generation"] == 1
    with Store(str(root)) as st, st.index.read() as txn:
        assert st.index.get_meta(txn, "store_uuid") == fmt["uuid"]
    assert js(cli(root, "--json", "fsck"))["exit_code"] == 0  # type: ignore[index]


def test_empty_old_store_is_adopted(tmp_path: Path) -> None:
    root = tmp_path / "store"
    assert cli(root, "init").returncode == 0
    _make_old(root)
    assert js(cli(root, "--json", "ls")) == []
    assert "uuid" in json.loads((root / "layerstore.json").read_text())


@pytest.mark.parametrize("how", ["missing", "new-lmdb", "foreign"])
def test_old_store_with_a_lost_index_is_not_adopted(
    stores: tuple[Path, str, Path], how: str
) -> None:
    root, diff_id, other = stores
    _make_old(root)
    lose_index(root, how, other)
    before = snapshot(root)
    for cmd in (("ls",), ("gc",), ("init",)):
        assert REBUILD in refused(cli(root, *cmd)), cmd
    assert "uuid" not in json.loads((root / "layerstore.json").read_text())
    assert snapshot(root) == before
    assert cli(root, "fsck", "--rebuild-index").returncode == 0
    assert [li["diff_id"] for li in js(cli(root, "--json", "ls"))] == [diff_id]  # type: ignore[index]
    assert "uuid" in json.loads((root / "layerstore.json").read_text())


def test_init_refuses_objects_without_layerstore_json(stores: tuple[Path, str, Path]) -> None:
    """Both layerstore.json and the index gone: `init` must not start an empty store over
    the objects and backups (gc would then take them)."""
    root, _, _ = stores
    shutil.rmtree(root / "index")
    (root / "layerstore.json").unlink()
    before = snapshot(root)
    err = refused(cli(root, "init"))
    assert REBUILD in err and "layerstore.json" in err
    assert snapshot(root) == before and not (root / "layerstore.json").exists()


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


# -- a missing objects/ ---------------------------------------------------------------------------
def test_missing_objects_dir_is_diagnosed(
    stores: tuple[Path, str, Path], tarballs: tuple[Path, Path], tmp_path: Path
) -> None:
    root, diff_id, _ = stores
    shutil.rmtree(root / "objects")
    dest = tmp_path / "dest"
    for cmd in (("materialize", diff_id, str(dest)), ("ls",), ("gc",), ("import", "{tar}")):
        err = refused(run(root, cmd, tar=str(tarballs[1])))
        assert str(root / "objects") in err and "fsck --repair" in err, (cmd, err)
    assert not (root / "objects").exists() and not dest.exists()
    # fsck: damage, with its documented exit code, and the way to repair it
    r = cli(root, "--json", "fsck")
    assert r.returncode == 4, r.stderr.decode()
    rep = json.loads(r.stdout)
    assert rep["counts"]["objects-dir-missing"] == 1 and rep["counts"]["object-missing"] >= 1
    (msg,) = [p["message"] for p in rep["problems"] if p["code"] == "objects-dir-missing"]
    assert str(root / "objects") in msg and "--source" in msg
    assert not (root / "objects").exists()  # a check changes nothing
    refused(cli(root, "fsck", "--quick"), 4)
    # repair without a source: objects/ is back, the layer is marked damaged (not lost)
    r = cli(root, "--json", "fsck", "--repair")
    assert r.returncode == 4, r.stderr.decode()
    assert "layer-damaged" in json.loads(r.stdout)["counts"]
    assert (root / "objects").is_dir()
    assert "damaged" in refused(cli(root, "materialize", diff_id, str(dest)), 5)
    # repair with a source: everything back
    r = cli(root, "--json", "fsck", "--repair", "--source", str(tarballs[0]))
    assert r.returncode == 1, (r.stdout.decode(), r.stderr.decode())
    assert js(cli(root, "--json", "fsck"))["exit_code"] == 0  # type: ignore[index]
    js(cli(root, "--json", "materialize", diff_id, str(dest)))
    assert (dest / "etc" / "hostname").read_text() == "box\n"


def test_missing_manifest_object_is_diagnosed(
    stores: tuple[Path, str, Path], tmp_path: Path
) -> None:
    root, diff_id, _ = stores
    manifest = js(cli(root, "--json", "show", diff_id))["manifest"]  # type: ignore[index]
    (root / "objects" / manifest[:2] / manifest).unlink()
    err = refused(cli(root, "materialize", diff_id, str(tmp_path / "dest")), 5)
    assert manifest in err and "fsck --repair" in err
    assert not [n for n in os.listdir(tmp_path) if "dest" in n]  # no tree, no staging left


def test_a_source_store_without_its_index_is_unusable_not_fatal(
    stores: tuple[Path, str, Path], tarballs: tuple[Path, Path]
) -> None:
    root, diff_id, other = stores
    victim = next(p for p in (root / "objects").rglob("*") if p.is_file())
    victim.chmod(0o644)
    victim.write_bytes(b"corrupt")
    src = root.parent / "source"
    make_store(src, tarballs[0])
    shutil.rmtree(src / "index")
    r = cli(root, "--json", "fsck", "--repair", "--source", str(src))
    assert r.returncode == 4, r.stderr.decode()
    rep = json.loads(r.stdout)
    (msg,) = [p["message"] for p in rep["problems"] if p["code"] == "source-unusable"]
    assert REBUILD in msg


# -- a corrupt data.mdb ---------------------------------------------------------------------------
def corrupt_pages(data: Path, keep_main: bool) -> None:
    """Zero the page flags of the index's B-tree pages (LMDB then reports MDB_CORRUPTED:
    "page was wrong type"), sparing the meta pages and, with ``keep_main``, the main
    database's root, so that opening succeeds and reading a named database fails."""
    from layerstore.core.index import _META

    raw = bytearray(data.read_bytes())
    psize = 4096
    metas = []
    for page in (0, 1):
        off = page * psize + 16
        *_, free_db, main_db, _last, txnid = _META.unpack_from(raw, off)
        metas.append((txnid, int.from_bytes(main_db[40:48], "little")))
    main_root = max(metas)[1]
    for page in range(2, len(raw) // psize):
        if keep_main and page == main_root:
            continue
        raw[page * psize + 10 : page * psize + 12] = b"\0\0"
    data.write_bytes(bytes(raw))


@pytest.mark.parametrize("keep_main", [False, True], ids=["all-pages", "named-dbs"])
def test_corrupt_index_says_rebuild(stores: tuple[Path, str, Path], keep_main: bool) -> None:
    root, diff_id, _ = stores
    corrupt_pages(root / "index" / "data.mdb", keep_main)
    before = snapshot(root)
    for args in (("fsck",), ("fsck", "--repair")):
        err = refused(cli(root, *args), 8)
        assert REBUILD in err and "could not be written" not in err, err
    for cmd in (("ls",), ("gc",), ("show", diff_id)):
        err = refused(cli(root, *cmd))
        assert REBUILD in err and "could not be written" not in err, err
        assert "damaged" in err
    assert snapshot(root) == before
    r = cli(root, "--json", "fsck", "--rebuild-index")
    assert r.returncode == 0, r.stderr.decode()
    assert [li["diff_id"] for li in js(cli(root, "--json", "ls"))] == [diff_id]  # type: ignore[index]
    assert js(cli(root, "--json", "fsck"))["exit_code"] == 0  # type: ignore[index]
