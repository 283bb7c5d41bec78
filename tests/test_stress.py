"""Multi-process stress on a real XFS reflink filesystem.

Four processes (LAYERSTORE_STRESS_PROCS) for 30 s (LAYERSTORE_STRESS_SECONDS) import,
materialize, remove and gc at random, all on one store.  Afterwards every materialization that
reported success must be byte-exact, no surviving layer may reference a missing object, and a
full fsck must be clean.  Seeded (LAYERSTORE_SEED); the seed is in every failure message.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import LoopFS, gnu_tar, gnu_untar
from treecmp import diff_trees

from layerstore import Store

PROCS = os.path.join(os.path.dirname(__file__), "procs.py")
SEED = int(os.environ.get("LAYERSTORE_SEED", "424242"))
NPROCS = int(os.environ.get("LAYERSTORE_STRESS_PROCS", "4"))
SECONDS = float(os.environ.get("LAYERSTORE_STRESS_SECONDS", "30"))


@pytest.mark.loopfs
def test_concurrent_import_materialize_remove_gc(scratch_xfs: LoopFS) -> None:
    base = scratch_xfs.path
    rnd = random.Random(SEED)
    tars = base / "tars"
    tars.mkdir()
    # Six layers sharing most content, so removals and gc race readers of shared objects.
    common = {f"common/{i % 11}/c{i}": rnd.randbytes(rnd.randint(65, 60_000)) for i in range(300)}
    for k in range(6):
        root = base / f"src{k}"
        for rel, data in common.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(data)
        for i in range(40):
            (root / "own").mkdir(exist_ok=True)
            (root / "own" / f"f{i}").write_bytes(rnd.randbytes(rnd.randint(65, 60_000)))
        os.symlink("common/0", root / "link")
        gnu_tar(root, tars / f"l{k}.tar")
    store_root = str(base / "store")
    Store.init(store_root).close()
    dest = base / "out"
    dest.mkdir()
    log = base / "log.jsonl"
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                PROCS,
                "stress",
                store_root,
                str(SEED + n),
                str(SECONDS),
                str(tars),
                str(dest),
                str(log),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in range(NPROCS)
    ]
    outs = [p.communicate(timeout=SECONDS + 300) for p in procs]
    for p, (_out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, f"seed={SEED}: worker failed: {err[-3000:]}"
    records = [json.loads(line) for line in log.read_text().splitlines()]
    errors = [r for r in records if "error" in r]
    assert not errors, f"seed={SEED}: {errors[:5]}"
    ops = {
        op: sum(r["op"] == op for r in records) for op in ("import", "materialize", "remove", "gc")
    }
    assert all(n > 0 for n in ops.values()), f"seed={SEED}: not every operation ran: {ops}"

    # Every materialization that reported success is byte-exact.
    by_layer: dict[str, str] = {r["diff_id"]: r["tar"] for r in records if r["op"] == "import"}
    expected: dict[str, Path] = {}
    for r in records:
        if r["op"] != "materialize":
            continue
        tar = by_layer[r["diff_id"]]
        if tar not in expected:
            expected[tar] = gnu_untar(Path(tar), base / f"expected-{Path(tar).stem}")
        assert diff_trees(str(expected[tar]), r["dest"]) == [], f"seed={SEED}: {r}"

    with Store(store_root) as st:
        rep = st.fsck(full=True)
        leftovers = {"dead-pins", "stale-staging"}  # workers exit cleanly: there should be none
        assert [p.message for p in rep.problems if p.code not in leftovers] == [], f"seed={SEED}"
        for li in st.layers():
            for e in st.entries(li.diff_id):
                if e.digest is not None:
                    assert os.path.exists(st.object_path(e.digest)), f"seed={SEED}: {e.path}"
        st.gc()
        assert st.fsck(full=True).problems == [], f"seed={SEED}"
    print(f"stress seed={SEED} ops={ops} materializations verified={ops['materialize']}")
