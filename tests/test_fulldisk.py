"""A full filesystem during an import: a clear error, nothing half-published, a usable store.

The store lives on a small private XFS loop filesystem (root; skipped loudly otherwise, and
CI forbids the skip) that is filled until an import of new content cannot be staged.  Both ways
of writing staged objects are exercised: the C fast path and the pure-Python path.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import IS_ROOT, LoopFS, make_loopfs, unmount
from test_hostile import index_dump, object_files, staging_leftovers

from layerstore import Store
from layerstore.errors import StoreError


@pytest.fixture
def small_xfs(tmp_path: Path) -> Iterator[LoopFS]:
    fs = make_loopfs("xfs", tmp_path, size="320M")
    yield fs
    unmount(fs)


def _tar(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in files.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def _fill(path: Path, leave: int) -> Path:
    """Fill the filesystem until about ``leave`` bytes are free."""
    filler = path / "filler"
    st = os.statvfs(path)
    free = st.f_bavail * st.f_frsize
    with open(filler, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, max(free - leave, 0))
    return filler


@pytest.mark.parametrize("fastpath", ["1", "0"])
def test_import_on_a_full_filesystem(small_xfs: LoopFS, monkeypatch, fastpath: str) -> None:
    monkeypatch.setenv("LAYERSTORE_FASTPATH", fastpath)
    root = small_xfs.path / "store"
    small = _tar({"etc/hostname": b"box\n" * 40})
    big = _tar({f"data/{i:03d}": os.urandom(300_000) for i in range(100)})  # ~30 MB new
    with Store.init(str(root)) as st:
        first = st.import_tar(io.BytesIO(small))
        filler = _fill(small_xfs.path, leave=8 << 20)
        before = (index_dump(st), object_files(st))
        with pytest.raises(StoreError, match="filesystem is full"):
            st.import_tar(io.BytesIO(big))
        # Nothing of the failed import is visible: same index, same objects, no staging.
        assert (index_dump(st), object_files(st)) == before
        assert staging_leftovers(st) == []
        assert st.fsck(full=True).exit_code == 0
        assert [li.diff_id for li in st.layers()] == [first.diff_id]
        # Space freed: the same import now succeeds and the store is whole.
        filler.unlink()
        res = st.import_tar(io.BytesIO(big))
        assert res.new_objects == 100 + 2  # its files, its manifest, its tar-split
        assert st.fsck(full=True).exit_code == 0


def test_index_filesystem_full_during_an_import(tmp_path: Path) -> None:
    """The objects fit but the index cannot grow (its directory is a tiny tmpfs, so the
    kernel really answers ENOSPC to LMDB's page writes): a clear StoreError instead of a raw
    lmdb error, no layer, and after space is freed and the store reopened, gc removes what
    the failed import left and the same import succeeds."""
    if not IS_ROOT:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    root = tmp_path / "store"
    Store.init(str(root)).close()
    idx = root / "index"
    saved = tmp_path / "index-saved"
    shutil.move(idx, saved)
    idx.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(idx)], check=True)
    try:
        for f in saved.iterdir():
            shutil.copy(f, idx / f.name)
        layer = _tar({f"f{i:04d}": os.urandom(100) for i in range(3000)})
        st = Store(str(root))
        try:
            with pytest.raises(StoreError, match="the index could not be written"):
                st.import_tar(io.BytesIO(layer))
        finally:
            st.close()
        subprocess.run(["mount", "-o", "remount,size=64m", str(idx)], check=True)
        with Store(str(root)) as st:
            assert st.layers(include_deleted=True) == []
            g = st.gc()
            # the failed import published its objects (files renamed, maybe records) but no
            # layer: gc collects every one of them
            assert g.objects_freed + g.orphans_removed == 3000 + 2, g
            assert st.fsck(full=True).exit_code == 0
            res = st.import_tar(io.BytesIO(layer))
            assert res.new_objects == 3000 + 2
            assert st.fsck(full=True).exit_code == 0
    finally:
        subprocess.run(["umount", "-l", str(idx)], check=False)
