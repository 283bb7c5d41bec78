"""Decompression bombs: memory stays bounded by a constant whatever the compression ratio.

A layer blob is untrusted, and a few hundred KiB of gzip or zstd can announce gigabytes.  Two
shapes matter: one huge file of zeros (legitimate content: it must stream through in bounded
memory), and zeros after the tar's end-of-archive block (refused once past
``tarstream.MAX_TRAILING``: nothing a tar writer produces, and it would otherwise be
decompressed, hashed and kept in the tar-split to the last byte).

The big bombs run the real CLI (``layerstore import``) in a child and watch its peak RSS
(``VmHWM``, tests/memwatch.py).  They are built by hand, cheaply: a zstd
frame of RLE blocks is 4 bytes per 128 KiB (10 GiB in 320 KiB), and a gzip member of 64 MiB of
zeros repeated 64 times is a 4 MB blob of 4 GiB.  A streaming child is killed once it has
staged more than twice the memory bound (proof that the bytes went through, not into memory),
so the tests take seconds, not the minutes a 10 GiB import would.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import subprocess
import sys
import tarfile
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import zstandard
from chunkedblob import rle_bomb
from memwatch import LIMIT_KB, Watched, watch
from test_hostile import Sandbox, assert_store_clean, end_of_members, make_tar, reg, reject

from layerstore import InvalidInputError, Store
from layerstore.tar import compression as blobs
from layerstore.tar.reader import MAX_TRAILING

PROVEN = 2 * LIMIT_KB << 10  # bytes staged once the child has streamed twice the bound


@pytest.fixture
def sandbox(tmp_path: Path, store: Store, monkeypatch: pytest.MonkeyPatch) -> Sandbox:
    sb = Sandbox(tmp_path)
    monkeypatch.chdir(tmp_path / "cwd")
    return sb


# -- bomb builders -------------------------------------------------------------------------------
def zc(data: bytes) -> bytes:
    return zstandard.ZstdCompressor(write_checksum=True).compress(data)


def huge_file_header(size: int) -> bytes:
    """A valid header of one regular file of ``size`` bytes (base-256 size: GNU format)."""
    ti = tarfile.TarInfo("zeros")
    ti.size = size
    ti.mode = 0o644
    return ti.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape")


_SMALL_TAR = make_tar(reg("etc/hostname", b"bomb\n"))  # ends with its end-of-archive blocks


def trailing_up_to(n: int, tail: bytes) -> bytes:
    """_SMALL_TAR with exactly ``n`` bytes after its end-of-archive block, ending in ``tail``."""
    after = len(_SMALL_TAR) - end_of_members(_SMALL_TAR) - 512  # tarfile's record padding
    return _SMALL_TAR + bytes(n - after - len(tail)) + tail


def zstd_file_bomb(size: int = 10 << 30) -> bytes:
    """One file of ``size`` zeros: header, RLE frame of the payload, end-of-archive."""
    assert size % 512 == 0
    return zc(huge_file_header(size)) + rle_bomb(size) + zc(bytes(1024))


def zstd_trailing_bomb(size: int = 10 << 30) -> bytes:
    """A small valid tar followed by ``size`` zeros after its end-of-archive block."""
    return zc(_SMALL_TAR) + rle_bomb(size)


_GZ_MEMBER = 64 << 20


def _gz_zeros() -> bytes:
    return gzip.compress(bytes(_GZ_MEMBER), compresslevel=9, mtime=0)  # ~65 KB


def gzip_file_bomb(members: int = 64) -> bytes:
    g = gzip.compress(huge_file_header(members * _GZ_MEMBER), mtime=0)
    return g + _gz_zeros() * members + gzip.compress(bytes(1024), mtime=0)


def gzip_trailing_bomb(members: int = 64) -> bytes:
    return gzip.compress(_SMALL_TAR, mtime=0) + _gz_zeros() * members


# -- the child and its peak RSS --------------------------------------------------------------------
def _staged_bytes(root: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(root / "staging"):
        for n in files:
            try:
                total += os.lstat(os.path.join(dirpath, n)).st_size
            except FileNotFoundError:
                pass
    return total


@dataclass
class Child(Watched):
    stderr: str = ""


def _cli() -> list[str]:
    script = Path(sys.executable).parent / "layerstore"
    return [str(script)] if script.exists() else [sys.executable, "-m", "layerstore"]


def run_import(
    tmp_path: Path,
    blob: bytes,
    proven: Callable[[], bool] | None = None,
    timeout: float = 60,
) -> Child:
    """``layerstore import BLOB`` in a child, its VmHWM watched (memwatch.watch)."""
    path = tmp_path / "bomb.blob"
    path.write_bytes(blob)
    err = tmp_path / "child.err"
    env = {**os.environ, "LAYERSTORE_STORE": str(tmp_path / "store")}
    with open(err, "wb") as ef:
        p = subprocess.Popen(
            [*_cli(), "-q", "import", str(path)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=ef,
            env=env,
        )
        w = watch(p, timeout=timeout, proven=proven)
    return Child(w.rc, w.why, w.hwm_kb, w.seconds, err.read_text(errors="replace"))


# -- one huge file: streamed, bounded ------------------------------------------------------------
@pytest.mark.parametrize(
    "make", [zstd_file_bomb, gzip_file_bomb], ids=["zstd-10GiB-in-320KiB", "gzip-64-members"]
)
def test_huge_file_bomb_streams_in_bounded_memory(tmp_path, make):
    blob = make()
    assert len(blob) < 5 << 20  # cheap to build and to store
    root = tmp_path / "store"
    child = run_import(tmp_path, blob, proven=lambda: _staged_bytes(root) > PROVEN)
    assert child.why == "proven", (child, _staged_bytes(root))
    assert child.hwm_kb <= LIMIT_KB, child
    print(f"{make.__name__}: peak RSS {child.hwm_kb >> 10} MiB after {child.seconds:.1f}s")


# -- zeros after the end of the archive: refused at a documented bound -----------------------------
@pytest.mark.parametrize(
    "make",
    [zstd_trailing_bomb, gzip_trailing_bomb],
    ids=["zstd-10GiB-in-320KiB", "gzip-64-members"],
)
def test_trailing_bomb_refused_fast_in_bounded_memory(tmp_path, make):
    child = run_import(tmp_path, make())
    assert child.why == "exited", child
    assert child.rc == InvalidInputError.exit_code, child
    assert "after its end-of-archive block" in child.stderr, child.stderr
    assert "Traceback" not in child.stderr
    assert child.hwm_kb <= LIMIT_KB, child
    assert child.seconds < 30, child
    with Store(str(tmp_path / "store")) as st:
        assert_store_clean(st)


def test_trailing_bytes_up_to_the_bound_are_kept_exactly(store, tmp_path):
    """Up to MAX_TRAILING bytes after the end-of-archive block (record padding, as tar
    writers add) are part of the layer: its DiffID and export cover them."""
    tar = trailing_up_to(MAX_TRAILING, b"tail")
    r = store.import_tar(io.BytesIO(zc(tar)))
    assert r.diff_id == "sha256:" + hashlib.sha256(tar).hexdigest()
    out = io.BytesIO()
    store.export_layer(r.diff_id, out)
    assert out.getvalue() == tar


@pytest.mark.parametrize("comp", ["plain", "zstd"])
def test_one_byte_past_the_trailing_bound_is_refused(store, sandbox, comp):
    tar = trailing_up_to(MAX_TRAILING + 1, b"tail!")
    reject(store, sandbox, zc(tar) if comp == "zstd" else tar, match="end-of-archive block")


# -- the reader itself: bounded pieces, a producer that cannot run ahead ---------------------------
def _gzip_backend(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if name == "zlib":
        monkeypatch.setattr(blobs, "_zlib", zlib)  # the fallback when ISA-L is missing
    else:
        from isal import isal_zlib

        monkeypatch.setattr(blobs, "_zlib", isal_zlib)


_BIG = 64 << 20


@pytest.mark.parametrize("kind", ["gzip-isal", "gzip-zlib", "zstd"])
def test_decompressed_pieces_are_bounded(kind, monkeypatch):
    """Every piece handed over is at most one chunk, whatever one input chunk expands to, and
    the digests still cover every byte."""
    if kind.startswith("gzip"):
        _gzip_backend(kind.split("-")[1], monkeypatch)
        blob = gzip.compress(bytes(_BIG), compresslevel=9, mtime=0) * 2  # two members
    else:
        blob = rle_bomb(_BIG) + rle_bomb(_BIG)  # two frames
    assert len(blob) < blobs._CHUNK  # all of it arrives in the first read
    r = blobs.BlobReader(io.BytesIO(blob))
    sizes = []
    while piece := r.read(1 << 40):
        sizes.append(len(piece))
    _comp, diff = r.finish()
    assert sum(sizes) == 2 * _BIG
    assert max(sizes) <= blobs._CHUNK, max(sizes)
    assert diff == hashlib.sha256(bytes(2 * _BIG)).digest()


@pytest.mark.parametrize("kind", ["gzip-isal", "gzip-zlib", "zstd"])
def test_producer_cannot_run_ahead_of_the_consumer(kind, monkeypatch):
    """Nobody reads: the producer must stop once the queue is full (bounded in bytes)."""
    if kind.startswith("gzip"):
        _gzip_backend(kind.split("-")[1], monkeypatch)
        blob = gzip.compress(bytes(256 << 20), compresslevel=1, mtime=0)
    else:
        blob = rle_bomb(256 << 20)
    r = blobs.BlobReader(io.BytesIO(blob))
    try:
        # Wait until the producer is done or blocked on a full queue, and stays so.
        deadline = time.monotonic() + 20
        last, since = -1, time.monotonic()
        while time.monotonic() < deadline:
            settled = not r._thread.is_alive() or r._q.full()
            if r.total_out != last or not settled:
                last, since = r.total_out, time.monotonic()
            elif time.monotonic() - since > 0.3:
                break
            time.sleep(0.01)
        assert r.total_out <= blobs.QUEUE_BYTES + 2 * blobs._CHUNK, r.total_out
    finally:
        r.abort()
