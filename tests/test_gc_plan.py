"""gc as plan -> execute: the plan is read-only and says what and why; execution re-checks.

Unit tests on a store in tmp_path (no loop filesystem: nothing here reflinks).  A "dead
process" is a lease id whose lease file nobody holds, exactly what the kernel leaves behind
when a process dies holding one (tests/test_lifecycle.py does it with real processes).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import blake3
import pytest
from conftest import gnu_tar
from test_cli import cli, js
from test_lifecycle import make_tree, shared_files

from layerstore import Store
from layerstore.core import leases
from layerstore.core.index import ObjectRecord
from layerstore.ops import gc

DEAD = bytes(16)  # a lease id; its lease file (if any) is held by nobody


def _import(store: Store, tmp_path: Path, name: str, n: int, seed: int, **kw: object) -> str:
    tree = make_tree(tmp_path / name, n, seed, **kw)  # type: ignore[arg-type]
    return store.import_path(str(gnu_tar(tree, tmp_path / f"{name}.tar"))).diff_id


def _objects_of(store: Store, diff_id: str) -> set[bytes]:
    """Every object a layer references: its files, its manifest and its tar-split."""
    info = store.layer(diff_id)
    out = {e.digest for e in store.entries(diff_id) if e.digest is not None}
    return out | {bytes.fromhex(info.manifest), bytes.fromhex(info.tarsplit)}


def _state(store: Store) -> dict[str, object]:
    """Everything a gc could change: every index database and every file of the store."""
    idx = store.index
    dbs = {}
    with idx.read() as txn:
        for name, db in sorted(idx.db.items()):
            dbs[name.decode()] = [(bytes(k).hex(), bytes(v).hex()) for k, v in txn.cursor(db=db)]
    files = {}
    for dirpath, dirnames, filenames in os.walk(store.root):
        if os.path.basename(dirpath) == "index":
            continue
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            files[os.path.relpath(p, store.root)] = (st.st_mode, st.st_size)
    return {"dbs": dbs, "files": files}


def _pin_layer_dead(store: Store, diff_id: str) -> None:
    """A reader pinned the layer, it was removed meanwhile (deferred), then the reader died:
    its layer pin now names a lease nobody holds."""
    d = bytes.fromhex(diff_id[7:])
    with store.index.write() as txn:
        leases.pin_layer(store.index, txn, store.lease.id, d)
    assert store.remove(diff_id)["deferred"]
    with store.index.write() as txn:
        leases.unpin_layer(store.index, txn, store.lease.id, d)
        leases.pin_layer(store.index, txn, DEAD, d)


def test_plan_writes_nothing_and_lists_exactly_the_garbage(store: Store, tmp_path: Path) -> None:
    sh = shared_files(10)
    a = _import(store, tmp_path, "a", 12, 2, shared=sh)
    b = _import(store, tmp_path, "b", 12, 3, shared=sh)
    only_a = _objects_of(store, a) - _objects_of(store, b)
    store.remove(a)
    before = _state(store)
    plan = store.gc_plan()
    assert _state(store) == before  # no write transaction, no file touched
    with store.index.read() as txn:
        zero = {
            bytes(k)
            for k, v in txn.cursor(db=store.index.db[b"objects"])
            if ObjectRecord.unpack(bytes(v)).refs == 0
        }
    assert {c.digest for c in plan.objects} == zero == only_a and len(zero) == 14  # 12 files + 2
    assert plan.bytes == sum(store.repo.get_object(d).size for d in zero)  # type: ignore[union-attr]
    assert plan.orphans == () and plan.kept == () and plan.reap == gc.protocol.ReapPlan()
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.objects = ()  # type: ignore[misc]

    r = gc.execute(store.repo, plan)
    assert (r.objects_freed, r.bytes_freed) == (14, plan.bytes)
    assert all(not os.path.exists(store.object_path(d)) for d in zero)
    assert store.gc_plan().objects == ()
    assert store.fsck().problems == []


def test_objects_referenced_since_the_plan_are_kept(store: Store, tmp_path: Path) -> None:
    """The plan is advisory: a layer imported again between plan and execution references
    the planned objects, and execution re-checks refs in its write transaction."""
    a = _import(store, tmp_path, "a", 8, 2)
    store.remove(a)
    plan = store.gc_plan()
    planned = {c.digest for c in plan.objects}
    store.import_path(str(tmp_path / "a.tar"))  # the same layer, back again
    assert planned == _objects_of(store, a) and len(planned) == 10
    r = gc.execute(store.repo, plan)
    assert r.objects_freed == 0 and r.bytes_freed == 0
    assert all(os.path.exists(store.object_path(d)) for d in planned)
    assert store.fsck().problems == []


def test_objects_pinned_since_the_plan_are_kept(store: Store, tmp_path: Path) -> None:
    a = _import(store, tmp_path, "a", 6, 4)
    store.remove(a)
    plan = store.gc_plan()
    planned = sorted(c.digest for c in plan.objects)
    assert len(planned) == 8 and plan.kept_for(gc.KeepReason.PINNED) == []
    with store.index.write() as txn:  # an import of this process reuses three of them
        leases.pin_objects(store.index, txn, store.lease.id, planned[:3])
    r = gc.execute(store.repo, plan)
    assert r.objects_freed == 5 and r.skipped_pinned == 3
    assert all(os.path.exists(store.object_path(d)) for d in planned[:3])
    assert not any(os.path.exists(store.object_path(d)) for d in planned[3:])
    # and the next plan says why they stay
    kept = store.gc_plan().kept
    assert {(k.kind, k.subject, k.reason) for k in kept} == {
        ("object", d.hex(), gc.KeepReason.PINNED) for d in planned[:3]
    }


def test_orphan_published_since_the_plan_is_kept(store: Store, tmp_path: Path) -> None:
    data = b"a crash left this between rename and commit"
    b3 = blake3.blake3(data).digest()
    path = store.object_path(b3)
    Path(path).write_bytes(data)
    os.chmod(path, 0o444)
    plan = store.gc_plan()
    assert plan.orphans == (gc.Candidate(b3, len(data)),) and plan.orphan_bytes == len(data)
    with store.index.write() as txn:  # an import publishes that very content now
        store.index.put_object(txn, b3, ObjectRecord(len(data), hashlib.sha256(data).digest(), 1))
    r = gc.execute(store.repo, plan)
    assert r.orphans_removed == 0 and os.path.exists(path)


def test_kept_and_why(store: Store, tmp_path: Path) -> None:
    """Each reason a collectable-looking thing stays is named in the plan."""
    a = _import(store, tmp_path, "a", 5, 5)
    b = _import(store, tmp_path, "b", 5, 6)
    b_objects = _objects_of(store, b)
    # a: removed while this (live) process reads it -> deferred, kept with its objects
    with store.index.write() as txn:
        leases.pin_layer(store.index, txn, store.lease.id, bytes.fromhex(a[7:]))
    assert store.remove(a)["deferred"]
    # b: removed; one of its objects is being unlinked by another live gc (this lease)
    victim = sorted(b_objects)[0]
    store.remove(b)
    with store.index.write() as txn:
        txn.put(victim, store.lease.id, db=store.index.db[b"doomed"])
    # a backup whose layer the index lacks (what a lost index looks like)
    ghost = "ab" * 32 + ".json"
    Path(store.layers_dir, ghost).write_text(json.dumps({"diff_id": "ab" * 32}))

    plan = store.gc_plan()
    kept = {(k.kind, k.subject, k.reason) for k in plan.kept}
    assert kept == {
        ("layer", a, gc.KeepReason.READ_BY_LIVE_PROCESS),
        ("object", victim.hex(), gc.KeepReason.DOOMED_BY_LIVE_GC),
        ("layer-backup", ghost, gc.KeepReason.BACKUP_WITHOUT_LAYER),
    }
    assert {c.digest for c in plan.objects} == b_objects - {victim}
    assert plan.reap.still_read == (bytes.fromhex(a[7:]),) and plan.reap.deferred == ()
    r = gc.execute(store.repo, plan)
    assert r.objects_freed == 6 and r.layers_finalized == 0
    assert os.path.exists(os.path.join(store.layers_dir, ghost))  # gc never deletes it
    assert os.path.exists(store.object_path(victim))


def test_deferred_removal_of_a_dead_reader_is_planned_with_its_objects(
    store: Store, tmp_path: Path
) -> None:
    """A layer removed while pinned by a process that then died: the plan finishes the
    removal, counts the objects it frees (refs reach 0 in the same gc) and its backup."""
    a = _import(store, tmp_path, "a", 7, 7)
    objs = _objects_of(store, a)
    _pin_layer_dead(store, a)
    Path(store.leases_dir, DEAD.hex() + ".lock").write_text("1\n")  # nobody holds its flock
    before = _state(store)
    plan = store.gc_plan()
    assert _state(store) == before
    assert plan.reap.dead_leases == (DEAD,) and plan.reap.deferred == (bytes.fromhex(a[7:]),)
    assert plan.reap.leftovers == (DEAD,)
    assert plan.backups == (a[7:] + ".json",)
    assert {c.digest for c in plan.objects} == objs  # refs > 0 now, 0 once reaped
    s = plan.summary()
    assert (s.dry_run, s.objects_freed, s.layers_finalized, s.dead_leases, s.staging_removed) == (
        True,
        9,
        1,
        1,
        1,
    )
    r = gc.execute(store.repo, plan)
    assert (r.objects_freed, r.layers_finalized, r.dead_leases, r.staging_removed) == (9, 1, 1, 1)
    assert store.layers(include_deleted=True) == []
    assert not os.path.exists(os.path.join(store.layers_dir, a[7:] + ".json"))
    assert os.listdir(store.leases_dir) == [os.path.basename(store.lease.path)]
    assert store.fsck().problems == []


def test_a_deferred_removal_revived_since_the_plan_is_not_finished(
    store: Store, tmp_path: Path
) -> None:
    """Planned as a deferred removal of a dead reader, but imported again before the plan
    runs (state back to live): execution must not drop its references."""
    a = _import(store, tmp_path, "a", 4, 8)
    _pin_layer_dead(store, a)
    plan = store.gc_plan()
    assert plan.reap.deferred == (bytes.fromhex(a[7:]),) and len(plan.objects) == 6
    store.import_path(str(tmp_path / "a.tar"))  # back to live, references kept
    r = gc.execute(store.repo, plan)
    assert r.layers_finalized == 0 and r.objects_freed == 0
    assert [li.diff_id for li in store.layers()] == [a]
    assert os.path.exists(os.path.join(store.layers_dir, a[7:] + ".json"))
    assert store.fsck().problems == []


def test_cli_dry_run_prints_the_plan(tmp_path: Path) -> None:
    root = tmp_path / "store"
    assert cli(root, "init").returncode == 0
    tar = gnu_tar(make_tree(tmp_path / "a", 5, 9), tmp_path / "a.tar")
    diff_id = js(cli(root, "--json", "import", str(tar)))["diff_id"]  # type: ignore[index]
    js(cli(root, "--json", "rm", diff_id))
    doc = js(cli(root, "--json", "gc", "--dry-run"))
    assert isinstance(doc, dict)
    # the figures gc would report, under the names `gc --json` uses ...
    assert doc["dry_run"] is True and doc["objects_freed"] == 7
    assert doc["bytes_freed"] == sum(o["size"] for o in doc["plan"]["objects"])
    # ... and every item
    assert len(doc["plan"]["objects"]) == 7
    assert set(doc["plan"]) == {
        "objects",
        "orphans",
        "dead_leases",
        "deferred_removals",
        "backups",
        "leftovers",
        "kept",
    }
    human = cli(root, "gc", "--dry-run").stdout.decode()
    assert human.startswith("would free 7 objects")
    done = js(cli(root, "--json", "gc"))
    assert isinstance(done, dict) and done["objects_freed"] == 7 and "plan" not in done
