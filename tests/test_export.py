"""Export rebuilds the exact original tar: same bytes, so the same DiffID."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import tarfile
from pathlib import Path

import pytest
from conftest import gnu_tar
from test_roundtrip import build_tree

import testdata as corpus
from layerstore import CorruptObjectError, Store


def _export(store: Store, diff_id: str) -> bytes:
    buf = io.BytesIO()
    store.export_layer(diff_id, buf)
    return buf.getvalue()


@pytest.mark.parametrize("fmt, extra", [("pax", []), ("gnu", []), ("gnu", ["--sparse"])])
def test_export_is_byte_identical(store: Store, tmp_path: Path, fmt: str, extra: list[str]):
    src = build_tree(tmp_path / "src")
    with open(src / "sparse", "wb") as f:
        f.seek(3 << 20)
        f.write(b"data after a hole")
    raw = gnu_tar(src, tmp_path / "t.tar", *extra, fmt=fmt).read_bytes()
    res = store.import_tar(io.BytesIO(gzip.compress(raw)))
    assert _export(store, res.diff_id) == raw


def test_export_keeps_trailing_bytes_and_odd_blocking(store: Store, tmp_path: Path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for i in range(3):
            data = os.urandom(100 + i)
            ti = tarfile.TarInfo(f"f{i}")
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    raw = buf.getvalue() + b"trailing junk after the archive" + bytes(700)
    res = store.import_tar(io.BytesIO(raw))
    assert res.diff_id == "sha256:" + hashlib.sha256(raw).hexdigest()
    assert _export(store, res.diff_id) == raw


def test_export_of_real_layer_matches_diff_id(store: Store) -> None:
    try:
        tgz = corpus.minbase_tar_gz()
    except corpus.CorpusError as exc:
        pytest.skip(f"REAL-DATA TEST SKIPPED: {exc}")
    res = store.import_path(str(tgz))
    h = hashlib.sha256()

    class Sink(io.RawIOBase):
        def write(self, b) -> int:  # type: ignore[override]
            h.update(b)
            return len(b)

    n = store.export_layer(res.diff_id, Sink())  # type: ignore[arg-type]
    assert "sha256:" + h.hexdigest() == res.diff_id
    assert n == os.path.getsize(corpus.minbase_tar())


def test_export_detects_corrupt_object(store: Store, tmp_path: Path) -> None:
    src = build_tree(tmp_path / "src")
    res = store.import_path(str(gnu_tar(src, tmp_path / "t.tar")))
    e = next(e for e in store.entries(res.diff_id) if e.digest is not None and e.size > 1000)
    path = store.object_path(e.digest)
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        f.seek(500)
        f.write(b"\xff")
    with pytest.raises(CorruptObjectError, match="DiffID"):
        _export(store, res.diff_id)
