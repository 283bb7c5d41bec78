"""Crash safety: kill -9 at random points inside import, materialize, remove and gc.

After every kill: the store opens; a quick fsck finds nothing but crash leftovers (orphan
files, dead pins, stale staging) -- never a reference to a missing object or a wrong count;
every layer whose import had returned (and was not yet removed) is intact; and the next gc
leaves a store on which a full fsck is clean.

The default suite kills 125 times (25 per operation, import twice: it covers remove too; 25
zstd:chunked partial imports); LAYERSTORE_SLOW=1 makes it 500.  The
random points come from a seeded generator; the seed is printed on failure.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import gnu_tar, gnu_untar
from treecmp import diff_trees

from layerstore import Store

PROCS = os.path.join(os.path.dirname(__file__), "procs.py")
SLOW = os.environ.get("LAYERSTORE_SLOW") == "1"
KILLS_PER_OP = 100 if SLOW else 25
SEED = int(os.environ.get("LAYERSTORE_SEED", "20261127"))
# What a kill may leave behind: files the index does not know, pins of the dead process, its
# staging directory, and a layer backup that lags the committed index (derived data).
LEFTOVERS = {
    "object-orphan",
    "dead-pins",
    "stale-staging",
    "layer-backup-missing",
    "layer-backup-extra",
    "image-backup-missing",
    "image-backup-extra",
}


def _trees(base: Path, n: int) -> Path:
    rnd = random.Random(7)
    tars = base / "tars"
    tars.mkdir()
    common = {f"c/{i}": rnd.randbytes(rnd.randint(65, 9000)) for i in range(60)}
    for k in range(n):
        root = base / f"t{k}"
        for rel, data in common.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(data)
        for i in range(120):
            (root / f"own{i % 9}").mkdir(exist_ok=True)
            (root / f"own{i % 9}" / f"f{i}").write_bytes(rnd.randbytes(rnd.randint(65, 9000)))
        # t0 is the base layer every cycle keeps; the workers import the others.
        gnu_tar(root, (base if k == 0 else tars) / f"t{k}.tar")
    return tars


@pytest.fixture(scope="module")
def tars(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _trees(tmp_path_factory.mktemp("crash"), 5)


def _kill_cycle(
    store_root: str, op: str, arg: str, dest: str, delay: float
) -> list[dict[str, str]]:
    p = subprocess.Popen(
        [sys.executable, PROCS, "loop", store_root, op, arg, dest],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert p.stdout is not None
    first = p.stdout.readline()
    assert json.loads(first)["event"] == "ready", first + p.stderr.read()  # type: ignore[union-attr]
    time.sleep(delay)
    os.kill(p.pid, signal.SIGKILL)
    out, err = p.communicate()
    assert p.returncode == -signal.SIGKILL, err[-2000:]
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def _check_consistent(st: Store, where: str) -> int:
    """Fail on real damage; return how many crash leftovers were found."""
    rep = st.fsck(full=False)
    bad = [p for p in rep.problems if p.code not in LEFTOVERS]
    assert not bad, f"{where}: {[p.message for p in bad]}"
    return len(rep.problems)


@pytest.fixture(scope="module")
def chunked(tars: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same tars, each beside its zstd:chunked blob (written by layerstore's writer)."""
    out = tmp_path_factory.mktemp("chunked")
    with Store.init(str(out / "writer")) as w:
        for t in sorted(tars.glob("*.tar")):
            (out / t.name).write_bytes(t.read_bytes())
            r = w.import_path(str(t))
            with open(out / (t.stem + ".zst"), "wb") as f:
                w.export_chunked(r.diff_id, f)
    return out


@pytest.mark.parametrize("op", ["import", "materialize", "gc", "partial"])
def test_kill_minus_9_at_random_points(op: str, tars: Path, chunked: Path, tmp_path: Path) -> None:
    """``partial``: zstd:chunked partial imports reusing the base layer's files (pinned)."""
    rnd = random.Random(f"{SEED}-{op}")
    kills = KILLS_PER_OP * (2 if op == "import" else 1)  # import covers import *and* remove
    root = str(tmp_path / "store")
    base_tar = tars.parent / "t0.tar"
    with Store.init(root) as st:
        base = st.import_path(str(base_tar))
    expected = gnu_untar(base_tar, tmp_path / "expected")
    dests = tmp_path / "dests"
    dests.mkdir()
    arg = base.diff_id if op == "materialize" else str(chunked if op == "partial" else tars)
    mid_op = 0  # kills that demonstrably interrupted an operation (left leftovers behind)
    for i in range(kills):
        delay = rnd.uniform(0.0, 0.6)
        where = f"seed={SEED} op={op} kill={i} delay={delay:.3f}"
        events = _kill_cycle(root, op, arg, str(dests), delay)
        with Store(root) as st:
            mid_op += _check_consistent(st, where) > 0
            live = {li.diff_id for li in st.layers()}
            assert base.diff_id in live, where
            imported = [e for e in events if e["event"] == "imported"]
            # "removing" is said before remove() starts: the kill may land after its commit
            # but before "removed" is printed, so such a layer may legitimately be gone.
            removed = {e["diff_id"] for e in events if e["event"] in ("removed", "removing")}
            for e in imported:
                if e["diff_id"] not in removed and e["diff_id"] != base.diff_id:
                    # its import returned and nothing removed it: it must be there, intact
                    assert e["diff_id"] in live, where
                    out = tmp_path / f"check{i}"
                    st.materialize(e["diff_id"], str(out))
                    want = gnu_untar(Path(e["tar"]), tmp_path / f"want{i}")
                    assert diff_trees(str(want), str(out)) == [], where
            for e in events:
                if e["event"] == "materialized":
                    assert diff_trees(str(expected), e["dest"]) == [], where
            # Layers a killed worker imported but never reported are legitimate: remove them
            # so every cycle starts from the base layer alone.
            for d in live - {base.diff_id}:
                st.remove(d)
            if i % 5 == 4:
                st.gc()
                _check_consistent(st, where + " after gc")
    # The kills must really land inside operations, not only between them.
    assert mid_op >= kills // 4, f"only {mid_op} of {kills} kills interrupted an operation"
    with Store(root) as st:
        st.gc()
        rep = st.fsck(full=True)
        assert rep.problems == [], [p.message for p in rep.problems]
        assert {li.diff_id for li in st.layers()} == {base.diff_id}
        st.remove(base.diff_id)
        st.gc()
        assert st.stats()["objects"] == 0
        assert st.fsck().problems == []
