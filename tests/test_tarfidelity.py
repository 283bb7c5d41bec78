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
import json
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest
import test_hostile
import zstandard
from test_hostile import dir_, hard, make_tar, reg, reject, sym
from treecmp import diff_trees

from layerstore import DestinationError, Store
from layerstore.core.manifest import DIR

BLOCK = 512
END = bytes(2 * BLOCK)
USTAR = b"ustar\x0000"
V7 = bytes(8)  # pre-POSIX: no magic at all
GNU_MAGIC = b"ustar  \x00"

sandbox = test_hostile.sandbox  # the fixture: nothing written outside the store
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


def assert_like_gnu(
    store: Store, tmp: Path, blob: bytes, *, gnu_rc: int = 0, partial: bool = True, **kw: object
):
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
    assert_exports_exactly(store, res.diff_id, blob, partial)
    return res


def assert_exports_exactly(store: Store, diff_id: str, blob: bytes, partial: bool = True) -> None:
    assert diff_id == "sha256:" + hashlib.sha256(blob).hexdigest()
    out = io.BytesIO()
    store.export_layer(diff_id, out)
    assert out.getvalue() == blob
    # The zstd:chunked writer re-reads the tar with the same reader: its blob must still
    # decompress to the very same bytes.
    chunked = io.BytesIO()
    info = store.export_chunked(diff_id, chunked)
    plain = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(chunked.getvalue()))
    assert plain.read() == blob
    if partial:
        # ... and a partial import of that blob replays the same header bytes: same DiffID.
        with tempfile.TemporaryDirectory() as d:
            Path(d, "l.zst").write_bytes(chunked.getvalue())
            with Store.init(os.path.join(d, "s")) as other:
                r = other.import_chunked(
                    os.path.join(d, "l.zst"), info.annotations, expected_diff_id=diff_id
                )
                assert r.diff_id == diff_id


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
    # (no partial re-import: a zstd:chunked TOC may not name a path twice)
    assert_like_gnu(store, tmp_path, HARDLINK_CASES[case](), partial=False)


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


# -- item 9: archives other tar writers wrote --------------------------------------------------
def _g(data: bytes = b"g\n") -> bytes:
    return file_("d/g", data)


DIALECT_CASES = {
    # pre-POSIX directory: type NUL, name ending in "/", a nonzero size and no data
    "v7-dir-with-size": lambda: (
        header("d/", b"\0", 1, mode=0o755, magic=V7)
        + header("d/g", b"\0", 2, magic=V7)
        + body(b"g\n")
        + END
    ),
    "ustar-nul-dir-with-size": lambda: header("d/", b"\0", 1, mode=0o755) + _g() + END,
    "regular-typed-dir": lambda: header("d/", b"0", 0, mode=0o750) + _g() + END,
    "contiguous-typed-dir": lambda: header("d/", b"7", 3, mode=0o700) + _g() + END,
    "pax-path-dir": lambda: pax([(b"path", b"d/")]) + header("x", b"0", 1) + _g() + END,
    "gnu-longname-dir": lambda: (
        header("././@LongLink", b"L", 3, magic=GNU_MAGIC)
        + body(b"d/\0")
        + header("x", b"0", 1, magic=GNU_MAGIC)
        + _g()
        + END
    ),
    "dir-type-with-size": lambda: header("d/", b"5", 700, mode=0o755) + _g() + END,
    # links, devices and fifos with a size but no data: the size is ignored
    "hardlink-with-size": lambda: file_("f") + header("h", b"1", 6, link="f") + _g() + END,
    "hardlink-with-pax-size": lambda: (
        file_("f") + pax([(b"size", b"6")]) + header("h", b"1", 0, link="f") + _g() + END
    ),
    "symlink-with-size": lambda: file_("f") + header("s", b"2", 6, link="f") + _g() + END,
    "fifo-with-size": lambda: header("p", b"6", 1024) + _g() + END,
    "chardev-with-size": lambda: (
        header("c", b"3", 5, raw={329: b"0000001\0", 337: b"0000003\0"}) + _g() + END
    ),
    # GNU volume labels: skipped (GNU tar says nothing)
    "volume-label": lambda: header("MY LABEL", b"V", 0, magic=GNU_MAGIC) + file_("f") + END,
    "volume-label-with-body": lambda: header("L", b"V", 6) + body(b"abcdef") + file_("f") + END,
    "volume-label-mid-archive": lambda: file_("f") + header("L", b"V", 0) + _g() + END,
    # Solaris: an ACL header before the entry it describes; "X" for the PAX "x"
    "solaris-acl-file": lambda: (
        header("f", b"A", 24) + body(b"0000001\0user::rw-\0\0\0\0\0\0\0") + file_("f") + END
    ),
    "solaris-acl-dir": lambda: (
        header("d", b"A", 8) + body(b"acl text") + header("d/", b"5", mode=0o755) + _g() + END
    ),
    "solaris-acl-hardlink": lambda: (
        file_("f") + header("./h", b"A", 3) + body(b"acl") + header("h", b"1", link="f") + END
    ),
    "solaris-acl-after-pax": lambda: (
        pax([(b"mtime", b"5")]) + header("f", b"A", 3) + body(b"acl") + file_("f") + END
    ),
    "solaris-x-header": lambda: pax([(b"mtime", b"1234.5")], b"X") + file_("f") + END,
    # a leading NUL in a number field ("buggy tar of unknown vintage"): GNU tar skips it
    "leading-nul-in-mode": lambda: file_("f", raw={100: b"\x000000755"}) + END,
    # PAX mtimes as GNU tar reads them: the longest number prefix, floor to nanoseconds
    "pax-mtime-prefix": lambda: pax([(b"mtime", b"1e5")]) + file_("f") + END,
    "pax-mtime-junk": lambda: pax([(b"mtime", b"12.5x")]) + file_("f") + END,
    "pax-mtime-underscore": lambda: pax([(b"mtime", b"1_000")]) + file_("f") + END,
    "pax-mtime-negative-floor": lambda: pax([(b"mtime", b"-12.1234567891")]) + file_("f") + END,
}


@pytest.mark.parametrize("case", sorted(DIALECT_CASES))
def test_dialect_like_gnu_tar(store, tmp_path, case):
    assert_like_gnu(store, tmp_path, DIALECT_CASES[case]())


@pytest.mark.parametrize("value", [b"yesterday", b"", b"+12", b".5", b" 12", b"NaN"])
def test_pax_mtime_not_a_number_falls_back_to_header(store, tmp_path, value):
    """GNU tar (and libarchive) ignore a malformed PAX mtime and keep the ustar one; GNU tar
    exits 2 for it.  Accepted the same way, with a warning in the import result."""
    blob = pax([(b"mtime", value)]) + file_("f", mtime=1_234_567) + END
    res = assert_like_gnu(store, tmp_path, blob, gnu_rc=2)
    assert [e.mtime_ns for e in store.entries(res.diff_id)] == [1_234_567 * 10**9]
    assert len(res.warnings) == 1 and "PAX mtime" in res.warnings[0], res.warnings


def test_warnings_are_printed_by_the_cli(tmp_path):
    tar = tmp_path / "l.tar"
    tar.write_bytes(pax([(b"mtime", b"soon")]) + file_("f") + END)
    cli = [sys.executable, "-m", "layerstore", "--store", str(tmp_path / "s")]
    p = subprocess.run([*cli, "import", str(tar)], capture_output=True, text=True, check=False)
    assert p.returncode == 0, p.stderr
    assert "warning:" in p.stderr and "PAX mtime b'soon'" in p.stderr


@pytest.mark.parametrize(
    "blob, match",
    [
        pytest.param(
            lambda: header("zz", b"A", 3) + body(b"acl") + file_("f") + END,
            "Solaris ACL header 'zz' is followed by entry 'f'",
            id="acl-for-another-name",
        ),
        pytest.param(
            lambda: file_("f") + header("f", b"A", 3) + body(b"acl") + END,
            "Solaris ACL.*end of the archive",
            id="acl-at-the-end",
        ),
        pytest.param(
            # a hardlink whose data *is* there: GNU tar reads the data as a header too
            # ("Skipping to next header", exit 2); refused as the corruption it looks like
            lambda: file_("f") + header("h", b"1", 6, link="f") + body(b"HELLO\n") + _g() + END,
            "bad checksum.*'h', is not a file but has a size",
            id="hardlink-with-data",
        ),
        pytest.param(
            lambda: header("x", b"Z", 3) + body(b"abc") + END,
            "unsupported tar type",
            id="unknown-type",
        ),
        pytest.param(
            lambda: header("m", b"M", 0) + END, "multi-volume", id="multi-volume-continuation"
        ),
        pytest.param(
            lambda: (
                pax([(b"GNU.sparse.major", b"1"), (b"GNU.sparse.realsize", b"9")])
                + header("h", b"1", link="f")
                + END
            ),
            "sparse keys but is not a file",
            id="sparse-hardlink",
        ),
    ],
)
def test_dialects_refused(store, sandbox, blob, match):
    reject(store, sandbox, blob(), match=match)


# -- item 8: numbers GNU tar would read differently -------------------------------------------
@pytest.mark.parametrize(
    "field, off, raw, kind",
    [
        ("uid", 108, b"-000001\0", b"0"),
        ("gid", 116, b"-000001\0", b"0"),
        ("mode", 100, b"-000001\0", b"0"),
        ("mtime", 136, b"-0000000001\0", b"0"),
        ("devmajor", 329, b"-000001\0", b"3"),
        ("devminor", 337, b"-000001\0", b"4"),
        ("mode", 100, b"0o000755", b"0"),  # int(s, 8) would take the radix prefix
        ("uid", 108, b"0000_001", b"0"),  # ... and underscores
        ("gid", 116, b"+000001\0", b"0"),
    ],
)
def test_signed_or_odd_octal_refused(store, sandbox, field, off, raw, kind):
    """A sign in an octal field is GNU tar's obsolete base-64 (it reads -000001 as a huge
    negative number and complains); it used to pass the range checks and crash the manifest
    writer with struct.error."""
    blob = header("e", kind, raw={off: raw}) + END
    reject(store, sandbox, blob, match=rf"{field} of entry 'e' is not an octal number")


@pytest.mark.parametrize("field, off", [("uid", 108), ("gid", 116), ("devmajor", 329)])
def test_negative_base256_owner_or_device_refused(store, sandbox, field, off):
    blob = header("e", b"3", raw={off: b"\xff" * 8}) + END  # base-256 -1
    reject(store, sandbox, blob, match=rf"entry 'e' has {field} -1, outside 0\.\.4294967295")


def test_negative_base256_mtime_accepted(store, tmp_path):
    """Negative mtimes are real (before 1970) and GNU tar writes them in base-256."""
    neg = (1 << 96) - 86400  # -86400 in 12 bytes of two's complement
    blob = file_("f", raw={136: neg.to_bytes(12, "big")}) + END
    res = assert_like_gnu(store, tmp_path, blob)
    assert [e.mtime_ns for e in store.entries(res.diff_id)] == [-86400 * 10**9]


@pytest.mark.parametrize(
    "key, value",
    [(b"uid", b"1_000"), (b"gid", b"0x10"), (b"uid", b"-1"), (b"size", b"6 ")],
)
def test_malformed_pax_numbers_refused(store, sandbox, key, value):
    """``int()`` took "1_000" for 1000 where GNU tar sees a malformed record (and keeps the
    header's value): an owner or a size read differently is a different tree."""
    blob = pax([(key, value)]) + file_("f") + END
    reject(store, sandbox, blob, match=rf"PAX {key.decode()}=.* is not a non-negative integer")


def test_malformed_pax_record_length_refused(store, sandbox):
    rec = b" path=x\n"
    blob = header("P", b"x", len(rec) + 3) + body(b"1_0" + rec) + file_("f") + END
    reject(store, sandbox, blob, match="PAX header record length")


# -- item 8: setuid and setgid as an unprivileged user -----------------------------------------
def _nobody() -> tuple[int, int]:
    pw = pwd.getpwnam("nobody")
    return pw.pw_uid, pw.pw_gid


def _as_user(uid: int, gid: int, argv: list[str]) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` as a real unprivileged uid (setpriv: no capabilities, no groups)."""
    return subprocess.run(
        ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", *argv],
        capture_output=True,
        text=True,
        check=False,
    )


def _special_bits_tar() -> bytes:
    members = []
    uid = _nobody()[0]
    for name, typ, mode, owner in [
        ("suid-root", tarfile.REGTYPE, 0o4755, 0),
        ("sgid-root", tarfile.REGTYPE, 0o2755, 0),
        ("suid-sgid-own", tarfile.REGTYPE, 0o6755, uid),  # the user's own file
        ("sticky-file", tarfile.REGTYPE, 0o1644, 0),
        ("all-bits", tarfile.REGTYPE, 0o7777, 0),
        ("plain", tarfile.REGTYPE, 0o750, 0),
        ("sgid-dir", tarfile.DIRTYPE, 0o2775, 0),
        ("sticky-dir", tarfile.DIRTYPE, 0o1777, 0),
        ("suid-fifo", tarfile.FIFOTYPE, 0o4640, 0),
    ]:
        ti = tarfile.TarInfo(name)
        ti.type, ti.mode, ti.uid, ti.gid, ti.mtime = typ, mode, owner, owner, 1_000_000_000
        data = b"#!/bin/sh\n" if typ == tarfile.REGTYPE else None
        ti.size = len(data) if data else 0
        members.append((ti, data))
    return make_tar(*members)


def _modes(root: Path) -> dict[str, int]:
    return {p.name: stat.S_IMODE(os.lstat(p).st_mode) for p in root.iterdir()}


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="switching to an unprivileged uid needs root and setpriv",
)
def test_unprivileged_materialize_drops_setuid_setgid_like_gnu_tar():
    """As an ordinary user GNU tar drops setuid/setgid (the files cannot have the layer's
    owners, so the bits would grant the extracting user's rights); materialize did keep
    them.  The other permission bits stay exact, as ``tar -xp`` keeps them."""
    uid, gid = _nobody()
    work = Path(tempfile.mkdtemp(prefix="layerstore-unpriv-"))
    try:
        os.chown(work, uid, gid)
        tar = work / "layer.tar"
        tar.write_bytes(_special_bits_tar())
        for d in ("gnu", "gnu-p"):
            (work / d).mkdir()
            os.chown(work / d, uid, gid)
        script = (
            "import json, sys\n"
            "from layerstore import Store\n"
            "st = Store.init(sys.argv[1])\n"
            "r = st.import_path(sys.argv[2])\n"
            "m = st.materialize(r.diff_id, sys.argv[3], sync=False)\n"
            "print(json.dumps(m.skipped))\n"
        )
        ours = work / "ours"
        p = _as_user(uid, gid, [sys.executable, "-c", script, str(work / "s"), str(tar), str(ours)])
        assert p.returncode == 0, p.stderr
        skipped = json.loads(p.stdout)
        for opt, d in (("-xf", "gnu"), ("-xpf", "gnu-p")):
            g = _as_user(uid, gid, ["tar", opt, str(tar), "-C", str(work / d)])
            assert g.returncode == 0, g.stderr
        got, gnu, gnu_p = _modes(ours), _modes(work / "gnu"), _modes(work / "gnu-p")
        assert set(got) == set(gnu) == set(gnu_p)
        assert {n: m & 0o6000 for n, m in got.items()} == {n: m & 0o6000 for n, m in gnu.items()}
        assert got == {n: m & ~0o6000 for n, m in gnu_p.items()}
        assert os.stat(ours / "suid-root").st_uid == uid  # the owner it could not set...
        assert skipped["ownership"] > 0  # ...is reported, and so are the dropped bits
        assert skipped["setuid/setgid"] == 6  # 4 files, a directory, a fifo
    finally:
        shutil.rmtree(work)


# -- item 8: the destination's parent replaced while materializing -----------------------------
@pytest.mark.parametrize("by", ["symlink", "directory"])
def test_destination_parent_swapped_mid_materialize(store, tmp_path, by):
    """``out/`` is renamed away and replaced (by a symlink elsewhere, or another directory)
    while ``out/dest`` is being built: a DestinationError, the staging tree removed from
    where it really is, nothing created at the symlink's target."""
    res = store.import_tar(io.BytesIO(make_tar(*(reg(f"f{i}", b"%d\n" % i) for i in range(8)))))
    out, moved, elsewhere = tmp_path / "out", tmp_path / "moved", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    swapped = []

    def swap(_n: int) -> None:
        if not swapped:
            swapped.append(1)
            os.rename(out, moved)
            if by == "symlink":
                os.symlink(elsewhere, out)
            else:
                out.mkdir()

    with pytest.raises(DestinationError, match=r"out.*replaced while materializing"):
        store.materialize(res.diff_id, str(out / "dest"), sync=False, progress=swap)
    assert swapped
    assert os.listdir(moved) == []  # the staging tree is gone from where it went
    assert os.listdir(elsewhere) == []
    assert os.listdir(out) == []
    # and the same destination works once the parent stays put
    store.materialize(res.diff_id, str(moved / "dest"), sync=False)
    assert sorted(os.listdir(moved / "dest")) == [f"f{i}" for i in range(8)]
