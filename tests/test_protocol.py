"""Unit tests of the core's concurrency protocol (core.protocol, core.objects), no tar involved.

Layers here are built the way any operation builds them through the core: content goes through
an ObjectWriter (stage, pin, publish), a manifest is written with ManifestWriter and committed
with protocol.commit_layer.  A second process (tests/procs.py) plays the live reader where a
transition depends on one.  Every assertion reads the index's own counts and pins, so each
test fails if the transition it names stops doing what docs/concurrency.md says.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from layerstore import Store
from layerstore.core import layers, leases, protocol
from layerstore.core.digests import DigestSet, blake3_of
from layerstore.core.index import UNPROVED
from layerstore.core.manifest import DIR, REG, Entry, ManifestWriter
from layerstore.core.objects import ObjectWriter
from layerstore.core.repo import Repo
from layerstore.errors import NotFoundError

PROCS = str(Path(__file__).parent / "procs.py")


def _commit(
    repo: Repo,
    contents: list[bytes],
    info: dict[str, Any] | None = None,
    diff_id: bytes | None = None,
) -> tuple[bytes, str]:
    """Build and commit a layer of one file per content (through ObjectWriter and
    commit_layer only); returns its DiffID (made up, unique per content, unless given) and
    commit_layer's outcome."""
    stage = repo.new_staging_dir("import")
    w = ObjectWriter(repo, stage)
    try:
        digests = [w.add_bytes(c) for c in contents]
        buf = io.BytesIO()
        mw = ManifestWriter(buf)
        mw.add(Entry(".", DIR, mode=0o755))
        for i, (c, d) in enumerate(zip(contents, digests, strict=True)):
            e = Entry(f"f{i}", REG, mode=0o644)
            e.size, e.digest = len(c), d
            mw.add(e)
        mw.close()
        mb3 = w.add_bytes(buf.getvalue())
        w.pin_pending()
        w.publish()
        if diff_id is None:
            diff_id = hashlib.sha256(b"\0".join(contents)).digest()
        rec = {
            "entries": len(contents) + 1,
            "files": len(contents),
            "bytes": sum(map(len, contents)),
            "compression": "none",
            "source": "test",
            "replaces": 0,
            "tarsplit": "",
            "tar_bytes": 0,
            "standalone": True,
            "images": 0,
            **(info or {}),
        }
        outcome = protocol.commit_layer(repo, diff_id, None, mb3, rec, w.pinned)
        return diff_id, outcome
    finally:
        w.close()
        shutil.rmtree(stage, ignore_errors=True)


def _layer(repo: Repo, contents: list[bytes], info: dict[str, Any] | None = None) -> bytes:
    return _commit(repo, contents, info)[0]


def _refs(repo: Repo, data: bytes) -> int:
    with repo.index.read() as txn:
        rec = repo.index.get_object(txn, blake3_of(data))
    return -1 if rec is None else rec.refs


def _pins_of(repo: Repo, lease: bytes) -> int:
    with repo.index.read() as txn:
        cur = txn.cursor(db=repo.index.db[b"lease_pins"])
        return sum(1 for k in cur.iternext(values=False) if bytes(k).startswith(lease))


def _spawn_reader(store: str, diff_id: bytes) -> subprocess.Popen[str]:
    p = subprocess.Popen(
        [sys.executable, PROCS, "pin_layer_and_wait", store, diff_id.hex()],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert p.stdout is not None
    line = p.stdout.readline()
    assert line and json.loads(line)["event"] == "pinned", p.stderr.read() if p.stderr else ""
    return p


@pytest.fixture
def st(tmp_path: Path) -> Any:
    with Store.init(str(tmp_path / "store")) as s:
        yield s


A, B, C = b"a" * 100, b"b" * 200, b"c" * 300


def test_commit_turns_pins_into_references(st: Store) -> None:
    repo = st.repo
    d = _layer(repo, [A, B, A])
    assert _refs(repo, A) == 2 and _refs(repo, B) == 1  # one reference per manifest entry
    assert _pins_of(repo, repo.lease.id) == 0  # the commit dropped the import's pins
    assert layers.resolve(repo, d.hex()) == d
    # The same layer again: "present", nothing counted twice, no pin left behind.
    assert _commit(repo, [A, B, A]) == (d, "present")
    assert _refs(repo, A) == 2 and _refs(repo, B) == 1
    assert _pins_of(repo, repo.lease.id) == 0


def test_remove_without_readers_drops_references_at_once(st: Store) -> None:
    repo = st.repo
    d = _layer(repo, [A, B])
    assert protocol.remove_layer(repo, d, d.hex()) is False
    assert _refs(repo, A) == 0 and _refs(repo, B) == 0  # garbage now; only gc unlinks
    assert os.path.exists(repo.object_path(blake3_of(A)))
    with pytest.raises(NotFoundError):
        protocol.remove_layer(repo, d, d.hex())


def test_remove_while_a_live_process_reads_defers_until_it_unpins(st: Store) -> None:
    repo = st.repo
    d = _layer(repo, [A, C])
    reader = _spawn_reader(st.root, d)
    try:
        assert protocol.remove_layer(repo, d, d.hex()) is True  # deferred
        with repo.index.read() as txn:
            rec = repo.index.get_layer(txn, d)
        assert rec is not None and rec["state"] == "deleted"
        assert _refs(repo, A) == 1  # the reader's objects keep their references
        assert d not in {bytes.fromhex(li.diff_id[7:]) for li in layers.list_layers(repo)}
        # A new reader is refused: the layer is gone for everyone but the one reading it.
        with pytest.raises(NotFoundError), protocol.pinned_layers(repo, [d]):
            pass
        # gc's reap must not finish the removal while the reader lives.
        assert protocol.reap(repo).layers_finalized == 0
        assert _refs(repo, A) == 1
    finally:
        reader.kill()
        reader.wait()
    # The reader died without unpinning: reap finishes what it deferred.
    r = protocol.reap(repo)
    assert r.dead_leases == 1 and r.layers_finalized == 1
    assert _refs(repo, A) == 0 and _refs(repo, C) == 0
    with repo.index.read() as txn:
        assert repo.index.get_layer(txn, d) is None


def test_unpin_finishes_a_removal_deferred_to_this_reader(st: Store) -> None:
    """The last reader's unpin drops the references (no gc needed)."""
    repo = st.repo
    d = _layer(repo, [B, C])
    other = _spawn_reader(st.root, d)  # someone else reads too, and leaves first
    with protocol.pinned_layers(repo, [d]) as pinned:
        assert pinned[0].diff_id == d
        assert protocol.remove_layer(repo, d, d.hex()) is True
        other.kill()
        other.wait()
        assert _refs(repo, B) == 1  # our own pin still holds it
    # Leaving the block unpinned us: nobody live reads it, so the removal is finished.
    assert _refs(repo, B) == 0
    with repo.index.read() as txn:
        assert repo.index.get_layer(txn, d) is None


def test_a_proving_import_replaces_an_unproved_record(st: Store) -> None:
    repo = st.repo
    unproved = {"partial": {"diff_id_proof": UNPROVED}}
    d1 = _layer(repo, [A], unproved)
    assert _refs(repo, A) == 1
    # Same DiffID, other content, proved: its manifest replaces the claim's.
    assert _commit(repo, [C], diff_id=d1) == (d1, "proved")
    assert _refs(repo, A) == 0 and _refs(repo, C) == 1
    # ... and an unproved import never replaces a proved record.
    assert _commit(repo, [A], unproved) == (d1, "present")
    assert _refs(repo, A) == 0 and _refs(repo, C) == 1


def test_objects_are_deduplicated_before_they_are_written(st: Store) -> None:
    repo = st.repo
    _layer(repo, [A, B])
    stage = repo.new_staging_dir("import")
    w = ObjectWriter(repo, stage)
    try:
        for data in (A, B, C):
            w.submit(data, None)
        w.drain()
        w.pin_pending()
        assert w.reused == 2 and w.new_objects == 1  # A and B are pinned, not rewritten
        assert _pins_of(repo, repo.lease.id) == 2
        w.publish()
        assert _pins_of(repo, repo.lease.id) == 3  # C is published pinned (refcount 0)
        assert _refs(repo, C) == 0
    finally:
        w.close()
        shutil.rmtree(stage, ignore_errors=True)
    # Not committed: close let go of every pin, so C is plain garbage for gc.
    assert _pins_of(repo, repo.lease.id) == 0


def test_import_pins_are_released_in_bounded_batches(st: Store, monkeypatch: Any) -> None:
    """More pins than one unpin transaction may hold: all released, in several txns."""
    repo = st.repo
    monkeypatch.setattr(protocol, "_UNPIN_BATCH", 7)
    digests = [hashlib.sha256(str(i).encode()).digest() for i in range(50)]
    with repo.index.write() as txn:
        leases.pin_objects(repo.index, txn, repo.lease.id, digests)
    pins = DigestSet()
    for d in digests:
        pins.add(d)
    writes = 0
    real_write = repo.index.write

    def counting_write() -> Any:
        nonlocal writes
        writes += 1
        return real_write()

    monkeypatch.setattr(repo.index, "write", counting_write)
    protocol.release_import_pins(repo, pins)
    assert _pins_of(repo, repo.lease.id) == 0
    assert writes == 8  # ceil(50 / 7)


def test_dead_importers_pins_are_reaped(st: Store) -> None:
    repo = st.repo
    p = subprocess.Popen(
        [sys.executable, PROCS, "pin_and_wait", st.root, b"x".hex() * 32],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert p.stdout is not None and json.loads(p.stdout.readline())["event"] == "pinned"
    with repo.index.read() as txn:
        assert len(list(txn.cursor(db=repo.index.db[b"pins"]).iternext())) == 1
    assert protocol.reap(repo).dead_leases == 0  # alive: its pins stand
    p.kill()
    p.wait()
    time.sleep(0.05)
    assert protocol.reap(repo).dead_leases == 1
    with repo.index.read() as txn:
        assert list(txn.cursor(db=repo.index.db[b"pins"]).iternext()) == []
