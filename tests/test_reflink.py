"""Reflink materialization on real reflink-capable loop filesystems (XFS reflink=1, btrfs).

Block sharing is checked with FIEMAP (FIEMAP_EXTENT_SHARED) and with free space: the
materialized tree must cost metadata only.  These run as root (CI does); elsewhere they skip
loudly (conftest).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import LoopFS, gnu_tar, gnu_untar
from treecmp import diff_trees

from layerstore import Store
from layerstore.core.fsutil import shared_bytes


def _tree(root: Path, n: int = 40, size: int = 256 * 1024) -> Path:
    root.mkdir()
    for i in range(n):
        d = root / f"d{i % 5}"
        d.mkdir(exist_ok=True)
        (d / f"f{i}").write_bytes(os.urandom(size))
    os.symlink("d0/f0", root / "link")
    os.link(root / "d1" / "f1", root / "hard")
    return root


def test_materialize_shares_extents(loopfs: LoopFS, loopdir: Path) -> None:
    src = _tree(loopdir / "src")
    tarball = gnu_tar(src, loopdir / "src.tar")
    with Store.init(str(loopdir / "store")) as st:
        res = st.import_path(str(tarball))
        free_before = loopfs.free_bytes()
        m = st.materialize(res.diff_id, str(loopdir / "out"))
        free_after = loopfs.free_bytes()
        assert m.methods.get("reflink") == m.files == 40
        data = 40 * 256 * 1024
        # Metadata only: far less than the data (which would be 10 MiB for a copy).
        assert free_before - free_after < data // 4, (free_before, free_after)
        for e in st.entries(res.diff_id):
            if e.digest is None:
                continue
            shared, total = shared_bytes(str(loopdir / "out" / e.path))
            assert total == e.size and shared == total, (e.path, shared, total)
            obj_shared, _ = shared_bytes(st.object_path(e.digest))
            assert obj_shared == e.size
        assert diff_trees(str(gnu_untar(tarball, loopdir / "tar-x")), str(loopdir / "out")) == []


def test_copy_mode_does_not_share(loopfs: LoopFS, loopdir: Path) -> None:
    src = _tree(loopdir / "src", n=5)
    with Store.init(str(loopdir / "store")) as st:
        res = st.import_path(str(gnu_tar(src, loopdir / "src.tar")))
        m = st.materialize(res.diff_id, str(loopdir / "out"), mode="copy")
        assert "reflink" not in m.methods
        # copy_file_range may still reflink on these filesystems: that is the kernel's choice.
        assert sum(m.methods.values()) == m.files


def test_hardlink_mode_shares_inodes(loopfs: LoopFS, loopdir: Path) -> None:
    src = _tree(loopdir / "src", n=3)
    with Store.init(str(loopdir / "store")) as st:
        res = st.import_path(str(gnu_tar(src, loopdir / "src.tar")))
        m = st.materialize(res.diff_id, str(loopdir / "out"), mode="hardlink")
        assert m.methods.get("hardlink") == m.files == 3
        e = next(e for e in st.entries(res.diff_id) if e.digest is not None)
        assert os.stat(loopdir / "out" / e.path).st_ino == os.stat(st.object_path(e.digest)).st_ino


def test_objects_are_separate_inodes_after_reflink(loopfs: LoopFS, loopdir: Path) -> None:
    """A chmod/write in the materialized tree must never reach the object."""
    src = _tree(loopdir / "src", n=2)
    with Store.init(str(loopdir / "store")) as st:
        res = st.import_path(str(gnu_tar(src, loopdir / "src.tar")))
        st.materialize(res.diff_id, str(loopdir / "out"))
        e = next(e for e in st.entries(res.diff_id) if e.digest is not None)
        target = loopdir / "out" / e.path
        before = Path(st.object_path(e.digest)).read_bytes()
        with open(target, "r+b") as f:
            f.write(b"overwritten")
        os.chmod(target, 0o777)
        assert Path(st.object_path(e.digest)).read_bytes() == before
        assert os.stat(st.object_path(e.digest)).st_mode & 0o777 == 0o444


@pytest.mark.parametrize("fast", ["1", "0"])
def test_c_fast_path_and_python_path_agree(
    loopfs: LoopFS, loopdir: Path, monkeypatch: pytest.MonkeyPatch, fast: str
) -> None:
    """The C fast path (materialize's per-file syscalls without the GIL) and the pure-Python
    path build the same tree as tar -x, with the same clone methods, on a reflink fs."""
    from test_roundtrip import build_tree

    from layerstore.ops import materialize

    if fast == "1" and materialize._fastpath is None:
        if os.environ.get("CI"):
            raise AssertionError("the C fast path was not built (./dev installs gcc)")
        pytest.skip("FAST-PATH TEST SKIPPED: layerstore._fastpath is not built (no compiler)")
    monkeypatch.setenv("LAYERSTORE_FASTPATH", fast)
    src = build_tree(loopdir / "src")
    for i in range(150):  # enough files for several batches, some owned by others
        f = src / "many" / f"f{i:03d}"
        f.parent.mkdir(exist_ok=True)
        f.write_bytes(os.urandom(100 + i * 37))
        os.chmod(f, 0o640 if i % 3 else 0o4711)
        if os.geteuid() == 0 and i % 5 == 0:
            os.chown(f, 1000 + i, 2000 + i)
        os.utime(f, ns=(1_600_000_000_000_000_000 + i, 1_600_000_000_123_456_789 + i))
    tarball = gnu_tar(src, loopdir / "src.tar")
    with Store.init(str(loopdir / "store")) as st:
        res = st.import_path(str(tarball))
        m = st.materialize(res.diff_id, str(loopdir / "out"))
        assert m.methods.get("reflink", 0) >= 150 and "copy" not in m.methods, m.methods
        assert diff_trees(str(gnu_untar(tarball, loopdir / "tar-x")), str(loopdir / "out")) == []
