"""Reflink materialization on real reflink-capable loop filesystems (XFS reflink=1, btrfs).

Block sharing is checked with FIEMAP (FIEMAP_EXTENT_SHARED) and with free space: the
materialized tree must cost metadata only.  These run as root (CI does); elsewhere they skip
loudly (conftest).
"""

from __future__ import annotations

import os
from pathlib import Path

from conftest import LoopFS, gnu_tar, gnu_untar
from treecmp import diff_trees

from layerstore import Store
from layerstore.fsutil import shared_bytes


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
