"""Tar fidelity: the tree a layer gives is the tree GNU tar gives for the same bytes.

Every case here is checked against the oracle itself: the same tar bytes are extracted with
``tar -x`` (GNU tar, as root: owners and permissions kept) and the materialized layer must be
the same tree (tests/treecmp.py: names, types, content, modes, owners, mtimes, hardlink groups).
What is accepted must still export byte for byte (sha256 == DiffID).  What is refused is
refused with InvalidInputError and leaves the store clean (``reject``).  The dialect decisions
are listed in docs/format.md ("Tar dialects").
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import zstandard
from test_hostile import (  # noqa: F401 - sandbox is a fixture
    Sandbox,
    base256,
    dir_,
    hard,
    make_tar,
    reg,
    reject,
    sandbox,
    set_header_field,
    sym,
)
from treecmp import diff_trees

from layerstore import Store
from layerstore.manifest import DIR

BLOCK = 512
END = bytes(2 * BLOCK)
USTAR = b"ustar\x0000"
V7 = bytes(8)  # pre-POSIX: no magic at all
GNU_MAGIC = b"ustar  \x00"

pytestmark = pytest.mark.skipif(shutil.which("tar") is None, reason="GNU tar is the oracle")


# -- raw tar bytes (tarfile cannot write most of these) --------------------------------------
def header(
    name: str,
    typ: bytes = b"0",
    size: int = 0,
    *,
    link: str = "",
    mode: int = 0o644,
    uid: int = 0,
    gid: int = 0,
    mtime: int = 1_000_000_000,
    magic: bytes = USTAR,
    raw: dict[int, bytes] | None = None,
) -> bytes:
    """One 512-byte header with a correct checksum; ``raw`` overwrites fields by offset."""
    h = bytearray(BLOCK)
    h[0 : len(name)] = name.encode()
    h[100:108] = b"%07o\0" % mode
    h[108:116] = b"%07o\0" % uid
    h[116:124] = b"%07o\0" % gid
    h[124:136] = b"%011o\0" % size
    h[136:148] = b"%011o\0" % mtime
    h[156:157] = typ
    h[157 : 157 + len(link)] = link.encode()
    h[257:265] = magic
    if magic == USTAR:
        h[329:337] = h[337:345] = b"0000000\0"
    for off, b in (raw or {}).items():
        h[off : off + len(b)] = b
    h[148:156] = b" " * 8
    h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h)


def body(data: bytes) -> bytes:
    return data + bytes(-len(data) % BLOCK)


def pax(records: list[tuple[bytes, bytes]], typ: bytes = b"x") -> bytes:
    """A PAX extended header (``typ`` b"X" is the Solaris spelling)."""
    out = b""
    for k, v in records:
        rec = b" " + k + b"=" + v + b"\n"
        n = len(rec) + 1
        while len(str(n)) + len(rec) != n:
            n += 1
        out += str(n).encode() + rec
    return header("PaxHeaders/x", typ, len(out)) + body(out)


def file_(name: str, data: bytes = b"hello\n", **kw: object) -> bytes:
    return header(name, b"0", len(data), **kw) + body(data)  # type: ignore[arg-type]


# -- the oracle --------------------------------------------------------------------------------
def gnu_extract(blob: bytes, dest: Path) -> subprocess.CompletedProcess[bytes]:
    dest.mkdir()
    return subprocess.run(
        ["tar", "--numeric-owner", "-xpf", "-", "-C", str(dest)],
        input=blob,
        capture_output=True,
        check=False,
    )


def assert_like_gnu(store: Store, tmp: Path, blob: bytes, *, gnu_rc: int = 0, **kw: object):
    """Import ``blob``, materialize it, and compare with GNU tar's extraction of the same
    bytes; then check that the layer still exports to exactly ``blob``."""
    res = store.import_tar(io.BytesIO(blob))
    ours, gnu = tmp / "ours", tmp / "gnu"
    store.materialize(res.diff_id, str(ours), sync=False, **kw)
    p = gnu_extract(blob, gnu)
    assert p.returncode == gnu_rc, p.stderr.decode()
    listed = {e.path for e in store.entries(res.diff_id) if e.kind == DIR}
    implicit = frozenset(
        os.path.relpath(os.path.join(d, n), ours)
        for d, dirs, _ in os.walk(ours)
        for n in dirs
        if os.path.relpath(os.path.join(d, n), ours) not in listed
    )
    assert diff_trees(str(ours), str(gnu), root_meta=False, implicit=implicit) == []
    assert_exports_exactly(store, res.diff_id, blob)
    return res


def assert_exports_exactly(store: Store, diff_id: str, blob: bytes) -> None:
    assert diff_id == "sha256:" + hashlib.sha256(blob).hexdigest()
    out = io.BytesIO()
    store.export_layer(diff_id, out)
    assert out.getvalue() == blob
    # The zstd:chunked writer re-reads the tar with the same reader: its blob must still
    # decompress to the very same bytes.
    chunked = io.BytesIO()
    store.export_chunked(diff_id, chunked)
    plain = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(chunked.getvalue()))
    assert plain.read() == blob


# -- item 6: hardlinks and "the later entry wins" ---------------------------------------------
HARDLINK_CASES = {
    # a hardlink replaced by a regular file: the file, not the link's target
    "link-then-file": lambda: make_tar(
        reg("x", b"original\n"), hard("h", "x"), reg("h", b"pwned\n")
    ),
    # the target replaced after the link: the link keeps the old content
    "target-replaced": lambda: make_tar(reg("a", b"old\n"), hard("b", "a"), reg("a", b"new\n")),
    # chains: c -> b -> a, then b and a replaced; c keeps the first inode
    "chain": lambda: make_tar(
        reg("a", b"first\n"),
        hard("b", "a"),
        hard("c", "b"),
        reg("b", b"second\n"),
        reg("a", b"third\n"),
        hard("d", "b"),
    ),
    # a hardlink replacing a symlink, and a symlink replacing a hardlink
    "link-and-symlink": lambda: make_tar(
        reg("t", b"target\n"),
        sym("s", "t"),
        hard("s", "t"),
        hard("u", "t"),
        sym("u", "t"),
    ),
    # in a directory, the target replaced by a link to another file
    "in-dir": lambda: make_tar(
        dir_("d"),
        reg("d/one", b"one\n"),
        reg("d/two", b"two\n"),
        hard("d/link", "d/one"),
        hard("d/one", "d/two"),
    ),
}


@pytest.mark.parametrize("case", sorted(HARDLINK_CASES))
def test_hardlinks_in_tar_order_like_gnu_tar(store, tmp_path, case):
    assert_like_gnu(store, tmp_path, HARDLINK_CASES[case]())


@pytest.mark.parametrize("mode", ["copy", "hardlink"])
def test_hardlink_replacement_in_every_mode(store, tmp_path, mode):
    """The same contents whatever the materialize mode (``hardlink`` shares object inodes,
    so only the contents are comparable with tar's tree)."""
    blob = make_tar(
        reg("x", b"original\n"),
        hard("h", "x"),
        reg("h", b"pwned\n"),
        reg("a", b"old\n"),
        hard("b", "a"),
        reg("a", b"new\n"),
    )
    res = store.import_tar(io.BytesIO(blob))
    dest = tmp_path / "out"
    store.materialize(res.diff_id, str(dest), sync=False, mode=mode)
    got = {n: (dest / n).read_bytes() for n in ("x", "h", "a", "b")}
    assert got == {"x": b"original\n", "h": b"pwned\n", "a": b"new\n", "b": b"old\n"}
    assert not os.path.samefile(dest / "h", dest / "x")
    assert not os.path.samefile(dest / "a", dest / "b")
