"""Lifecycle: pins, gc, deferred removal, and the seed race -- with real processes."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import LoopFS, gnu_tar, gnu_untar
from treecmp import diff_trees

from layerstore import Store

PROCS = os.path.join(os.path.dirname(__file__), "procs.py")


def spawn(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, PROCS, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def wait_event(p: subprocess.Popen[str], event: str, timeout: float = 60) -> dict:
    end = time.monotonic() + timeout
    assert p.stdout is not None
    while time.monotonic() < end:
        line = p.stdout.readline()
        if not line:
            raise AssertionError(f"worker exited before {event!r}: {p.stderr.read()}")  # type: ignore[union-attr]
        msg = json.loads(line)
        if msg.get("event") == event:
            return msg
    raise AssertionError(f"timeout waiting for {event!r}")


def make_tree(root: Path, n: int, seed: int, shared: dict[str, bytes] | None = None) -> Path:
    import random

    rnd = random.Random(seed)
    root.mkdir(parents=True)
    for rel, data in (shared or {}).items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    for i in range(n):
        d = root / f"own{i % 7}"
        d.mkdir(exist_ok=True)
        (d / f"f{i}").write_bytes(rnd.randbytes(rnd.randint(100, 20_000)))
    return root


def shared_files(n: int, seed: int = 1) -> dict[str, bytes]:
    import random

    rnd = random.Random(seed)
    return {f"shared/{i % 13}/s{i}": rnd.randbytes(rnd.randint(100, 30_000)) for i in range(n)}


def test_gc_frees_only_unreferenced(store: Store, tmp_path: Path) -> None:
    sh = shared_files(30)
    a = store.import_path(str(gnu_tar(make_tree(tmp_path / "a", 20, 2, sh), tmp_path / "a.tar")))
    b = store.import_path(str(gnu_tar(make_tree(tmp_path / "b", 20, 3, sh), tmp_path / "b.tar")))
    assert store.gc().objects_freed == 0
    store.remove(a.diff_id)
    r = store.gc()
    assert r.objects_freed == 22  # a's own 20 files, manifest, tar-split; shared content stays
    store.materialize(b.diff_id, str(tmp_path / "mb"))
    assert (
        diff_trees(str(gnu_untar(tmp_path / "b.tar", tmp_path / "bx")), str(tmp_path / "mb")) == []
    )
    store.remove(b.diff_id)
    r = store.gc()
    assert r.objects_freed == 52
    assert store.stats()["objects"] == 0
    assert sum(len(f) for _, _, f in os.walk(store.objects_dir)) == 0


def test_gc_dry_run_changes_nothing(store: Store, tmp_path: Path) -> None:
    a = store.import_path(str(gnu_tar(make_tree(tmp_path / "a", 10, 2), tmp_path / "a.tar")))
    store.remove(a.diff_id)
    before = store.stats()
    r = store.gc(dry_run=True)
    assert r.objects_freed == 12 and r.bytes_freed == before["physical_bytes"]
    assert store.stats() == before


def test_dead_pin_does_not_keep_objects_forever(store: Store, tmp_path: Path) -> None:
    a = store.import_path(str(gnu_tar(make_tree(tmp_path / "a", 5, 2), tmp_path / "a.tar")))
    digests = [e.digest.hex() for e in store.entries(a.diff_id) if e.digest]
    store.remove(a.diff_id)
    p = spawn("pin-and-wait", store.root, *digests)
    try:
        wait_event(p, "pinned")
        r = store.gc()
        assert r.skipped_pinned == 5 and r.objects_freed == 2  # only manifest and tar-split
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        r = store.gc()
        assert r.dead_leases == 1 and r.objects_freed == 5
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert os.listdir(store.leases_dir) == [store.lease.path.rsplit("/", 1)[1]]


def test_orphans_and_staging_leftovers_are_collected(store: Store, tmp_path: Path) -> None:
    orphan = store.object_path(bytes(range(32)))
    with open(orphan, "wb") as f:
        f.write(b"left by a crash between rename and commit")
    dead = os.path.join(store.staging_dir, "00" * 16, "import-0")
    os.makedirs(dead)
    Path(dead, "junk").write_bytes(b"x" * 100)
    Path(store.leases_dir, "00" * 16 + ".lock").write_text("1\n")  # nobody holds its flock
    r = store.gc()
    assert r.orphans_removed == 1 and not os.path.exists(orphan)
    assert not os.path.exists(os.path.dirname(dead))
    assert r.staging_removed == 1


def test_seed_race_materialize_while_source_layer_deleted_and_gc(
    store: Store, tmp_path: Path
) -> None:
    """Y's data came from X; Y is materialized while X (and Y) are removed and gc runs in
    another process.  The materialization completes byte-exact; nothing leaks afterwards."""
    sh = shared_files(400)
    tx = gnu_tar(make_tree(tmp_path / "x", 10, 5, sh), tmp_path / "x.tar")
    ty = gnu_tar(make_tree(tmp_path / "y", 10, 6, sh), tmp_path / "y.tar")
    x = store.import_path(str(tx))
    y = store.import_path(str(ty))
    assert y.reused_objects >= 400
    dest = tmp_path / "my"
    p = spawn("materialize", store.root, y.diff_id, str(dest), "0.01")
    try:
        wait_event(p, "started")
        store.remove(x.diff_id)
        out = store.remove(y.diff_id)  # a live reader: references stay until it finishes
        assert out["deferred"]
        for _ in range(3):
            store.gc()
        done = wait_event(p, "done", timeout=120)
        assert p.wait() == 0
    finally:
        if p.poll() is None:
            p.kill()
    assert done["files"] == 410
    assert diff_trees(str(gnu_untar(ty, tmp_path / "yx")), str(dest)) == []
    r = store.gc()  # the reader has gone: Y's references were dropped at its unpin
    assert store.stats()["objects"] == 0, r


def test_seed_race_reader_killed_releases_everything(store: Store, tmp_path: Path) -> None:
    ty = gnu_tar(make_tree(tmp_path / "y", 300, 6), tmp_path / "y.tar")
    y = store.import_path(str(ty))
    p = spawn("materialize", store.root, y.diff_id, str(tmp_path / "my"), "0.05")
    wait_event(p, "started")
    assert store.remove(y.diff_id)["deferred"]
    assert store.gc().objects_freed == 0
    p.kill()
    p.wait()
    r = store.gc()
    assert r.layers_finalized == 1 and store.stats()["objects"] == 0
    leftovers = [n for n in os.listdir(tmp_path) if n.startswith(".my.")]
    assert leftovers, "killed materialization leaves its staging tree next to the target"


@pytest.mark.loopfs
def test_materialize_100k_files_under_ulimit_64(scratch_xfs: LoopFS) -> None:
    """Descriptors are bounded whatever the layer size: 100k files with RLIMIT_NOFILE=64."""
    import io
    import tarfile

    loopdir = scratch_xfs.path

    tar = loopdir / "100k.tar"
    with tarfile.open(tar, "w", format=tarfile.PAX_FORMAT) as tf:
        for d in range(100):
            ti = tarfile.TarInfo(f"d{d}")
            ti.type = tarfile.DIRTYPE
            ti.mode = 0o755
            tf.addfile(ti)
            for i in range(1000):
                data = f"file {d}/{i} ".encode() * 8
                ti = tarfile.TarInfo(f"d{d}/f{i}")
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
    code = f"""
import resource, sys
sys.path.insert(0, {os.path.join(os.path.dirname(__file__), "..", "src")!r})
from layerstore import Store
st = Store.init({str(loopdir / "store")!r})
r = st.import_path({str(tar)!r})
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
m = st.materialize(r.diff_id, {str(loopdir / "out")!r})
print(m.files, sorted(m.methods.items()))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("100000 ")
    assert len(os.listdir(loopdir / "out" / "d99")) == 1000
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] > 64  # the parent was not limited
