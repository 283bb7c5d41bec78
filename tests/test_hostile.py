"""Hostile and malformed tar input.

Bad input to ``Store.import_tar`` / ``Store.import_path`` must raise ``InvalidInputError`` (or
its subclass ``UnsafePathError``), or -- where the rules in ``layerstore.core.paths`` say so -- be
normalized safely (a leading ``/`` is dropped like GNU tar does).  Either way nothing may be
written outside the store, and a refused import must leave the store logically unchanged: no
layer, no object record, no pin, no file under ``objects/??/`` and nothing left in staging.

Hostile tars are built here with :mod:`tarfile` and by editing raw tar bytes.  Known bugs are
``RejectionBug`` marks a wrong outcome; the cleanliness checks run first and raise a plain
``AssertionError``, so a dirty store is always reported as such.
"""

from __future__ import annotations

import bz2
import errno
import gzip
import hashlib
import io
import lzma
import os
import random
import re
import stat
import subprocess
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import zstandard

from layerstore import InvalidInputError, Store, UnsafePathError
from layerstore.core.index import DB_NAMES
from layerstore.core.manifest import BLOCK, CHAR, DIR, FIFO, HARDLINK, REG

BLOCK_SIZE = 512


class RejectionBug(AssertionError):
    """Bad input was accepted, or refused with something other than InvalidInputError."""


# -- tar building ----------------------------------------------------------------------------------
def data_of(n: int, seed: int = 0) -> bytes:
    """Deterministic incompressible bytes (so corruption tests hit the same bytes every run)."""
    return random.Random(seed).randbytes(n)


def reg(name: str, data: bytes = b"hello\n", **kw: object) -> tuple[tarfile.TarInfo, bytes]:
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    ti.mode = 0o644
    for k, v in kw.items():
        setattr(ti, k, v)
    return ti, data


def special(name: str, type_: bytes, linkname: str = "", **kw: object):
    ti = tarfile.TarInfo(name)
    ti.type = type_
    ti.linkname = linkname
    ti.mode = 0o755 if type_ == tarfile.DIRTYPE else 0o644
    for k, v in kw.items():
        setattr(ti, k, v)
    return ti, None


def dir_(name: str):
    return special(name, tarfile.DIRTYPE)


def sym(name: str, target: str):
    return special(name, tarfile.SYMTYPE, target)


def hard(name: str, target: str):
    return special(name, tarfile.LNKTYPE, target)


def make_tar(*members, fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(
        fileobj=buf, mode="w", format=fmt, encoding="utf-8", errors="surrogateescape"
    ) as tf:
        for ti, data in members:
            tf.addfile(ti, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def member_offsets(blob: bytes) -> list[tuple[str, int, int, int]]:
    """(name, header offset, data offset, size) of every member of a valid tar."""
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:") as tf:
        return [(m.name, m.offset, m.offset_data, m.size) for m in tf.getmembers()]


def end_of_members(blob: bytes) -> int:
    """Offset of the end-of-archive zero blocks (just after the last member's padded data)."""
    name, _off, data_off, size = member_offsets(blob)[-1]
    return data_off + -(-size // BLOCK_SIZE) * BLOCK_SIZE


def set_header_field(blob: bytes, hdr_off: int, field_off: int, raw: bytes) -> bytes:
    """Overwrite a field of the ustar header at ``hdr_off`` and fix the header checksum."""
    b = bytearray(blob)
    b[hdr_off + field_off : hdr_off + field_off + len(raw)] = raw
    b[hdr_off + 148 : hdr_off + 156] = b" " * 8
    chk = sum(b[hdr_off : hdr_off + BLOCK_SIZE])
    b[hdr_off + 148 : hdr_off + 156] = b"%06o\0 " % chk
    return bytes(b)


def base256(n: int, width: int = 12) -> bytes:
    return bytes([0x80]) + n.to_bytes(width - 1, "big")


def compress(blob: bytes, kind: str) -> bytes:
    if kind == "plain":
        return blob
    if kind == "gzip":
        return gzip.compress(blob, mtime=0)
    if kind == "zstd":
        return zstandard.ZstdCompressor(write_checksum=True).compress(blob)
    raise AssertionError(kind)


def flip(blob: bytes, pos: int, mask: int = 0xFF) -> bytes:
    b = bytearray(blob)
    b[pos] ^= mask
    return bytes(b)


# -- store and sandbox checks ----------------------------------------------------------------------
def index_dump(store: Store) -> dict[bytes, list[tuple[bytes, bytes]]]:
    out = {}
    with store.index.read() as txn:
        for name in DB_NAMES:
            if name == b"meta":
                continue
            out[name] = [(bytes(k), bytes(v)) for k, v in txn.cursor(db=store.index.db[name])]
    return out


def object_files(store: Store) -> list[str]:
    out = []
    for fan in os.listdir(store.objects_dir):
        out += [f"{fan}/{n}" for n in os.listdir(os.path.join(store.objects_dir, fan))]
    return sorted(out)


def staging_leftovers(store: Store) -> list[str]:
    """Anything under staging/ except this process's (empty) lease directory."""
    out = []
    for dirpath, _dirnames, filenames in os.walk(store.staging_dir):
        rel = os.path.relpath(dirpath, store.staging_dir)
        out += [os.path.join(rel, f) for f in filenames]
        if rel != "." and dirpath != os.path.join(store.staging_dir, store.lease.id.hex()):
            out.append(rel + "/")
    return out


def assert_store_clean(store: Store) -> None:
    assert store.layers(include_deleted=True) == []
    assert store.stats()["objects"] == 0
    dump = index_dump(store)
    assert {k: v for k, v in dump.items() if v} == {}, "index records left behind"
    assert object_files(store) == []
    assert staging_leftovers(store) == []


class Sandbox:
    """Everything under tmp_path except the store and a materialize target must stay as it was."""

    def __init__(self, tmp_path: Path) -> None:
        self.root = tmp_path
        self.outside = tmp_path / "outside"
        self.outside.mkdir()
        (tmp_path / "cwd").mkdir()
        self.mnt = tmp_path / "mnt"
        self.mnt.mkdir()
        self.dest = self.mnt / "root"
        self.before = self.snapshot()

    def snapshot(self) -> dict[str, tuple[int, int]]:
        out = {}
        skip = (str(self.root / "store"), str(self.dest))
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = [d for d in dirnames if os.path.join(dirpath, d) not in skip]
            for n in dirnames + filenames:
                p = os.path.join(dirpath, n)
                st = os.lstat(p)
                out[os.path.relpath(p, self.root)] = (stat.S_IFMT(st.st_mode), st.st_size)
        return out

    def check(self) -> None:
        assert self.snapshot() == self.before, "something was written outside the store"
        assert os.listdir(self.outside) == []


@pytest.fixture
def sandbox(tmp_path: Path, store: Store, monkeypatch: pytest.MonkeyPatch) -> Sandbox:
    sb = Sandbox(tmp_path)
    monkeypatch.chdir(tmp_path / "cwd")
    return sb


def do_import(store: Store, blob: bytes, via: str = "stream", tmp: Path | None = None):
    if via == "stream":
        return store.import_tar(io.BytesIO(blob))
    assert tmp is not None
    p = tmp / "input.tar"
    p.write_bytes(blob)
    try:
        return store.import_path(str(p))
    finally:
        p.unlink()


def reject(
    store: Store,
    sandbox: Sandbox,
    blob: bytes,
    exc: type[Exception] = InvalidInputError,
    match: str | None = None,
    via: str = "stream",
) -> Exception:
    """Import must fail with ``exc``; the store and the sandbox must be exactly as before."""
    try:
        res = do_import(store, blob, via, sandbox.mnt)
    except Exception as e:  # the type is checked below, after cleanliness
        err = e
    else:
        raise RejectionBug(f"import accepted bad input: {res.diff_id}")
    sandbox.check()
    assert_store_clean(store)
    if not isinstance(err, exc):
        raise RejectionBug(f"expected {exc.__name__}, got {type(err).__name__}: {err}") from err
    if match is not None:
        assert re.search(match, str(err)), str(err)
    return err


def entries_of(store: Store, diff_id: str) -> dict[str, object]:
    return {e.path: e for e in store.entries(diff_id)}


# -- truncation ------------------------------------------------------------------------------------
def _base_tar() -> bytes:
    return make_tar(
        dir_("d"),
        reg("d/tiny", b"tiny\n"),  # inline in the manifest
        reg("d/mid", data_of(3000, 1)),  # in-memory object
        reg("d/last", data_of(20000, 2)),
    )


def _cut(where: str) -> bytes:
    blob = _base_tar()
    name, hdr, data_off, size = member_offsets(blob)[-1]
    if where == "mid-data":
        return blob[: data_off + size // 2]
    if where == "mid-data-small":
        _, _, d2, s2 = member_offsets(blob)[-2]
        return blob[: d2 + s2 // 2]
    if where == "at-header":
        return blob[:hdr]
    if where == "at-end-no-eof-blocks":
        return blob[: end_of_members(blob)]
    if where == "mid-header":
        return blob[: hdr + 100]
    if where == "one-zero-block-then-cut":
        return blob[: end_of_members(blob) + 100]
    raise AssertionError(where)


CUTS = [
    "mid-data",
    "mid-data-small",
    "at-header",
    "at-end-no-eof-blocks",
    "mid-header",
    "one-zero-block-then-cut",
]


@pytest.mark.parametrize("via", ["stream", "path"])
@pytest.mark.parametrize("comp", ["plain", "gzip", "zstd"])
@pytest.mark.parametrize("where", CUTS)
def test_truncated_tar(store, sandbox, where, comp, via):
    reject(store, sandbox, compress(_cut(where), comp), via=via, match="truncat|corrupt")


BIG = 9 << 20  # above ingest.MEM_MAX: the file streams through a staging file


def _big_blob(how: str) -> bytes:
    tar = make_tar(reg("big", data_of(BIG, 3)))
    if how in ("plain", "gzip", "zstd"):  # a well-formed stream of a cut tar
        return compress(tar[: BLOCK_SIZE * 3 + BIG // 2], how)
    comp = compress(tar, how.removesuffix("-stream-cut"))  # a cut compressed stream
    return comp[: len(comp) // 2]


@pytest.mark.parametrize(
    "how",
    [
        pytest.param("plain"),
        pytest.param("gzip"),
        pytest.param("zstd"),
        "gzip-stream-cut",
        pytest.param(
            "zstd-stream-cut",
        ),
    ],
)
def test_truncated_inside_large_streamed_file(store, sandbox, how):
    reject(store, sandbox, _big_blob(how), match="truncat|corrupt")


# -- corrupt compression ---------------------------------------------------------------------------
def _corrupt_base() -> bytes:
    # Two large incompressible files: the deflate/zstd stream is long, so corruption in its
    # middle lands inside file data, far from the end.
    return make_tar(reg("a", data_of(150_000, 4)), reg("b", data_of(150_000, 5)))


@pytest.mark.parametrize(
    "name, make",
    [
        pytest.param("gzip-flip-stored-middle", lambda g: flip(g, len(g) // 2)),
        pytest.param("gzip-flip-stored-early", lambda g: flip(g, 200)),
        ("gzip-flip-header-method", lambda g: flip(g, 2, 0x01)),
        ("gzip-flip-first-block-header", lambda g: flip(g, 10, 0x06)),
        pytest.param("gzip-bad-crc", lambda g: flip(g, len(g) - 8)),
        pytest.param("gzip-bad-isize", lambda g: flip(g, len(g) - 1)),
        ("gzip-cut-half", lambda g: g[: len(g) // 2]),
        ("gzip-cut-after-header", lambda g: g[:10]),
        pytest.param("gzip-cut-trailer", lambda g: g[:-8]),
        pytest.param("gzip-cut-3", lambda g: g[:-3]),
    ],
)
def test_corrupt_gzip(store, sandbox, name, make: Callable[[bytes], bytes]):
    g = compress(_corrupt_base(), "gzip")
    reject(store, sandbox, make(g), match="gzip|tar")


def _text_tar() -> bytes:
    # compressible: deflate uses Huffman blocks, so a flipped bit breaks the decoding
    return make_tar(reg("a", b"some compressible text line\n" * 5000), reg("b", b"more " * 3000))


@pytest.mark.parametrize("where", [100, 1 / 3, 1 / 2])
def test_corrupt_gzip_compressible(store, sandbox, where):
    g = compress(_text_tar(), "gzip")
    pos = where if isinstance(where, int) else int(len(g) * where)
    reject(store, sandbox, flip(g, pos), match="gzip|tar")


@pytest.mark.parametrize(
    "name, make",
    [
        ("zstd-flip-middle", lambda z: flip(z, len(z) // 2)),
        ("zstd-flip-frame-header", lambda z: flip(z, 4)),
        ("zstd-bad-checksum", lambda z: flip(z, len(z) - 1)),
        ("zstd-cut-half", lambda z: z[: len(z) // 2]),
        ("zstd-magic-only", lambda z: z[:4]),
        ("zstd-cut-6", lambda z: z[:-6]),
        pytest.param("zstd-cut-1", lambda z: z[:-1]),
    ],
)
def test_corrupt_zstd(store, sandbox, name, make: Callable[[bytes], bytes]):
    z = compress(_corrupt_base(), "zstd")
    reject(store, sandbox, make(z), match="zstd|tar")


@pytest.mark.parametrize("cut", [pytest.param(1), pytest.param(4)])
def test_zstd_small_layer_missing_checksum(store, sandbox, cut):
    z = compress(make_tar(reg("a", b"hello\n")), "zstd")
    reject(store, sandbox, z[:-cut], match="zstd|truncat")


# -- not a tar at all ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "blob",
    [
        pytest.param(b"hello, world\n" * 50, id="text"),
        pytest.param(data_of(3000, 6), id="random"),
        pytest.param(b"x", id="one-byte"),
        pytest.param(b"\xff" * 1024, id="ff-blocks"),
        pytest.param(b"\x1f", id="half-gzip-magic"),
        pytest.param(b"\x1f\x8b", id="gzip-magic-only"),
        pytest.param(b"\x28\xb5\x2f\xfd", id="zstd-magic-only"),
        pytest.param(gzip.compress(b"not a tar" * 100), id="gzip-of-text"),
        pytest.param(zstandard.ZstdCompressor().compress(b"no tar" * 100), id="zstd-of-text"),
        pytest.param(gzip.compress(b""), id="gzip-of-nothing"),
    ],
)
def test_garbage(store, sandbox, blob):
    reject(store, sandbox, blob)


def test_empty_input(store, sandbox):
    reject(store, sandbox, b"", match="empty")


@pytest.mark.parametrize("via", ["stream", "path"])
@pytest.mark.parametrize("comp", ["bzip2", "xz"])
def test_bzip2_xz_refused(store, sandbox, tmp_path, comp, via):
    tar = make_tar(reg("a"))
    blob = bz2.compress(tar) if comp == "bzip2" else lzma.compress(tar)
    reject(store, sandbox, blob, via=via, match=r"bzip2/xz.*not supported")


def test_import_path_missing_file(store, sandbox):
    with pytest.raises(InvalidInputError, match="cannot open"):
        store.import_path(str(sandbox.root / "no-such.tar"))
    sandbox.check()
    assert_store_clean(store)


# -- names -----------------------------------------------------------------------------------------
DOTDOT = ["../evil", "a/../../evil", "./../evil", "..", "a/..", "a/b/../c", "/../evil"]


@pytest.mark.parametrize("kind", ["file", "dir", "symlink", "fifo"])
@pytest.mark.parametrize("name", DOTDOT)
def test_dotdot_names_refused(store, sandbox, name, kind):
    member = {
        "file": lambda: reg(name),
        "dir": lambda: dir_(name),
        "symlink": lambda: sym(name, "x"),
        "fifo": lambda: special(name, tarfile.FIFOTYPE),
    }[kind]()
    blob = make_tar(reg("ok"), member)
    reject(store, sandbox, blob, UnsafePathError, match=r"'\.\.'")


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
def test_dotdot_via_long_name(store, sandbox, fmt):
    name = "a/" * 60 + "../" * 62 + "evil"  # > 100 bytes: PAX path / GNU ././@LongLink
    reject(store, sandbox, make_tar(reg(name), fmt=fmt), UnsafePathError)


def test_leading_slash_normalized(store, sandbox):
    outside_abs = str(sandbox.outside / "planted")  # an absolute name that points outside
    blob = make_tar(
        dir_("/etc"),
        reg("/etc/passwd", b"root:x:0:0::/root:/bin/sh\n"),
        reg("//double/slash", b"2"),
        reg("/./dot/x", b"3"),
        reg(outside_abs, b"would be outside\n"),
        hard("/hl", "/etc/passwd"),
    )
    res = store.import_tar(io.BytesIO(blob))
    ents = entries_of(store, res.diff_id)
    rel_outside = outside_abs.lstrip("/")
    assert set(ents) == {"etc", "etc/passwd", "double/slash", "dot/x", rel_outside, "hl"}
    assert all(not p.startswith("/") for p in ents)
    assert ents["hl"].kind == HARDLINK and ents["hl"].linkname == "etc/passwd"
    sandbox.check()
    store.materialize(res.diff_id, str(sandbox.dest), sync=False)
    sandbox.check()
    assert not os.path.lexists(outside_abs)
    assert (sandbox.dest / rel_outside).read_bytes() == b"would be outside\n"
    assert os.path.samefile(sandbox.dest / "hl", sandbox.dest / "etc" / "passwd")


@pytest.mark.parametrize(
    "target",
    [
        "../outside",
        "a/../../outside",
        "nothere",  # not in the layer at all
        "later",  # an entry that comes after the link
        "link",  # itself
        "d",  # a directory
        "s/f",  # through a symlink
        "f/x",  # through a file
        "/etc/passwd",  # absolute: normalized to etc/passwd, which is not in the layer
    ],
)
def test_bad_hardlink_targets(store, sandbox, target):
    blob = make_tar(
        dir_("d"),
        reg("f", b"file"),
        sym("s", str(sandbox.outside)),
        hard("link", target),
        reg("later", b"later"),
    )
    reject(store, sandbox, blob, UnsafePathError)


def test_hardlink_to_earlier_file_accepted(store, sandbox):
    blob = make_tar(dir_("d"), reg("d/f", b"content"), hard("h", "./d/f"), hard("h2", "/d/f"))
    res = store.import_tar(io.BytesIO(blob))
    ents = entries_of(store, res.diff_id)
    assert ents["h"].linkname == "d/f" and ents["h2"].linkname == "d/f"
    store.materialize(res.diff_id, str(sandbox.dest), sync=False)
    assert os.path.samefile(sandbox.dest / "h", sandbox.dest / "d" / "f")
    sandbox.check()


# -- writing through symlinks and files ------------------------------------------------------------
def _through(kind: str, via: str) -> tuple:
    return {
        "file": reg(f"{via}/file", b"pwned\n"),
        "dir": dir_(f"{via}/sub"),
        "deep-file": reg(f"{via}/sub/deep", b"pwned\n"),
        "symlink": sym(f"{via}/link", "/etc/passwd"),
        "hardlink": hard(f"{via}/hl", "victim"),
        "fifo": special(f"{via}/fifo", tarfile.FIFOTYPE),
    }[kind]


@pytest.mark.parametrize("kind", ["file", "dir", "deep-file", "symlink", "hardlink", "fifo"])
@pytest.mark.parametrize("target", ["outside-abs", "dotdot", "dot", "relative-dir"])
def test_write_through_symlink_refused(store, sandbox, target, kind):
    link_target = {
        "outside-abs": str(sandbox.outside),
        "dotdot": "..",
        "dot": ".",
        "relative-dir": "d",
    }[target]
    blob = make_tar(dir_("d"), reg("victim", b"v"), sym("a", link_target), _through(kind, "a"))
    err = reject(store, sandbox, blob, UnsafePathError, match="through")
    assert "'a'" in str(err)
    assert os.listdir(sandbox.outside) == []  # nothing at the symlink's target


def test_write_through_symlink_in_nested_dir_refused(store, sandbox):
    blob = make_tar(
        dir_("x"), dir_("x/y"), sym("x/y/esc", str(sandbox.outside)), reg("x/y/esc/z/f", b"!")
    )
    reject(store, sandbox, blob, UnsafePathError, match="x/y/esc")


@pytest.mark.parametrize("first", ["file", "fifo", "chardev", "hardlink"])
@pytest.mark.parametrize("kind", ["file", "dir", "deep-file", "symlink"])
def test_write_through_nondirectory_refused(store, sandbox, first, kind):
    head = {
        "file": reg("n", b"i am a file"),
        "fifo": special("n", tarfile.FIFOTYPE),
        "chardev": special("n", tarfile.CHRTYPE, devmajor=1, devminor=3),
        "hardlink": hard("n", "victim"),
    }[first]
    blob = make_tar(reg("victim", b"v"), head, _through(kind, "n"))
    reject(store, sandbox, blob, UnsafePathError, match="through non-directory 'n'")


@pytest.mark.parametrize(
    "members",
    [
        pytest.param(lambda: [dir_("x"), reg("x")], id="dir-then-file"),
        pytest.param(lambda: [reg("x"), dir_("x")], id="file-then-dir"),
        pytest.param(lambda: [reg("x/child"), reg("x")], id="implicit-dir-then-file"),
        pytest.param(lambda: [dir_("x"), sym("x", "/tmp")], id="dir-then-symlink"),
        pytest.param(lambda: [sym("x", "/tmp"), dir_("x")], id="symlink-then-dir"),
        pytest.param(lambda: [reg("f"), dir_("x"), hard("x", "f")], id="dir-then-hardlink"),
        pytest.param(lambda: [dir_("x"), special("x", tarfile.FIFOTYPE)], id="dir-then-fifo"),
        pytest.param(lambda: [special("x", tarfile.FIFOTYPE), dir_("x/")], id="fifo-then-dir"),
        pytest.param(lambda: [dir_("x"), reg("./x/")], id="dir-then-file-trailing-slash"),
        pytest.param(lambda: [reg(".")], id="root-as-file"),
        pytest.param(lambda: [sym("./", "/")], id="root-as-symlink"),
    ],
)
def test_dir_nondir_replacement_refused(store, sandbox, members):
    reject(store, sandbox, make_tar(*members()))


def test_nondir_replacing_nondir_is_tar_semantics(store, sandbox):
    """A later non-directory replaces an earlier one (that is how tar extraction works)."""
    blob = make_tar(reg("x", b"one"), reg("x", b"two"), sym("y", "x"), reg("y", b"three"))
    res = store.import_tar(io.BytesIO(blob))
    assert [e.path for e in store.entries(res.diff_id)] == ["x", "x", "y", "y"]
    sandbox.check()


# -- absurd sizes and long names -------------------------------------------------------------------
def _huge_size_blob(how: str) -> bytes:
    if how in ("gnu-base256", "pax-size"):
        ti = tarfile.TarInfo("huge")
        ti.size = 2**40
        fmt = tarfile.GNU_FORMAT if how == "gnu-base256" else tarfile.PAX_FORMAT
        hdr = ti.tobuf(fmt, "utf-8", "surrogateescape")
        return hdr + data_of(4096, 7)
    # raw byte surgery: patch the size field of a valid header
    blob = make_tar(reg("huge", data_of(4096, 7)))
    hdr = member_offsets(blob)[0][1]
    return set_header_field(blob, hdr, 124, base256(2**40))


@pytest.mark.parametrize(
    "how",
    [
        pytest.param("gnu-base256"),
        pytest.param("pax-size"),
        pytest.param("raw-patched"),
    ],
)
def test_absurd_size(store, sandbox, how):
    t0 = time.monotonic()
    try:
        reject(store, sandbox, _huge_size_blob(how), match="truncat")
    finally:
        assert time.monotonic() - t0 < 5
        assert_no_big_files(sandbox.root)


@pytest.mark.parametrize("how", ["gnu-base256", "pax-size", "raw-patched"])
def test_absurd_size_fails_fast_and_clean(store, sandbox, how):
    """Whatever the exception, a lying size field costs no time, space or store state."""
    t0 = time.monotonic()
    with pytest.raises(Exception):  # noqa: B017 - the exact type is test_absurd_size's job
        store.import_tar(io.BytesIO(_huge_size_blob(how)))
    assert time.monotonic() - t0 < 5
    assert_no_big_files(sandbox.root)
    sandbox.check()
    assert_store_clean(store)


def assert_no_big_files(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            st = os.lstat(os.path.join(dirpath, f))
            assert st.st_blocks * 512 < (64 << 20), f"{dirpath}/{f} is {st.st_blocks * 512} bytes"


def _long_path(total: int) -> str:
    comp = "c" * 200
    parts, n = [], 0
    while n + len(comp) + 1 < total:
        parts.append(comp)
        n += len(comp) + 1
    last = total - n
    return "/".join(parts) + "/" + "z" * last if parts else "z" * total


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
@pytest.mark.parametrize(
    "name, what",
    [
        (_long_path(4097), "longer than 4096"),
        (_long_path(10000), "longer than 4096"),
        ("d/" + "n" * 256, "over 255"),
        ("n" * 256 + "/f", "over 255"),
        ("\u00e9" * 128, "over 255"),  # 128 chars, 256 UTF-8 bytes
    ],
    ids=["4097", "10000", "component-256", "dir-component-256", "utf8-256-bytes"],
)
def test_long_names_refused(store, sandbox, name, what, fmt):
    reject(store, sandbox, make_tar(reg(name), fmt=fmt), UnsafePathError, match=what)


def test_long_hardlink_target_refused(store, sandbox):
    blob = make_tar(reg("f"), hard("h", "x" * 300))
    reject(store, sandbox, blob, UnsafePathError, match="hardlink target")


def test_long_names_at_limit_accepted(store, sandbox):
    at_limit = _long_path(4096)
    assert len(at_limit.encode()) == 4096
    comp255 = "m" * 255
    res = store.import_tar(io.BytesIO(make_tar(reg(at_limit, b"a"), reg(comp255, b"b"))))
    assert set(entries_of(store, res.diff_id)) == {at_limit, comp255}
    sandbox.check()


def test_nul_in_pax_path_refused(store, sandbox):
    ti, data = reg("placeholder")
    ti.pax_headers = {"path": "a\x00b"}
    reject(store, sandbox, make_tar((ti, data)), UnsafePathError, match="NUL")


@pytest.mark.parametrize(
    "members",
    [
        pytest.param(lambda: [sym("l", "t" * 70000)], id="symlink-target-70000-bytes"),
        pytest.param(lambda: [reg("u", b"", uid=2**40)], id="uid-2**40"),
        pytest.param(lambda: [reg("g", b"", gid=2**33)], id="gid-2**33"),
        pytest.param(lambda: [reg("m", b"", mtime=10**30)], id="mtime-1e30"),
    ],
)
def test_out_of_range_header_values_refused(store, sandbox, members):
    reject(store, sandbox, make_tar(*members()))


# -- non-UTF-8 names -------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
def test_non_utf8_names_round_trip(store, sandbox, fmt):
    bad_dir = b"dir-\xff\xfe"
    bad_file = b"caf\xe9-latin1"
    bad_link = b"lnk-\x80"
    d = os.fsdecode(bad_dir)
    blob = make_tar(
        dir_(d),
        reg(d + "/" + os.fsdecode(bad_file), b"latin-1 name\n"),
        sym(os.fsdecode(bad_link), d + "/" + os.fsdecode(bad_file)),
        fmt=fmt,
    )
    if fmt == tarfile.PAX_FORMAT:
        assert b"hdrcharset=BINARY" in blob
    else:
        assert bad_dir + b"/" + bad_file in blob  # raw bytes in the GNU header
    res = store.import_tar(io.BytesIO(blob))
    paths = {os.fsencode(p) for p in entries_of(store, res.diff_id)}
    assert paths == {bad_dir, bad_dir + b"/" + bad_file, bad_link}
    store.materialize(res.diff_id, str(sandbox.dest), sync=False)
    dest = os.fsencode(sandbox.dest)
    assert sorted(os.listdir(dest)) == sorted([bad_dir, bad_link])
    assert os.listdir(os.path.join(dest, bad_dir)) == [bad_file]
    assert os.readlink(os.path.join(dest, bad_link)) == bad_dir + b"/" + bad_file
    with open(os.path.join(dest, bad_link), "rb") as f:
        assert f.read() == b"latin-1 name\n"
    sandbox.check()


# -- devices, fifos, whiteouts ---------------------------------------------------------------------
def test_devices_fifos_whiteouts_accepted(store, sandbox):
    blob = make_tar(
        dir_("dev"),
        special("dev/null", tarfile.CHRTYPE, devmajor=1, devminor=3),
        special("dev/loop0", tarfile.BLKTYPE, devmajor=7, devminor=0),
        special("run-fifo", tarfile.FIFOTYPE),
        reg(".wh.foo", b""),
        dir_("opq"),
        reg("opq/.wh..wh..opq", b""),
        reg("dev/.wh.gone", b""),
    )
    res = store.import_tar(io.BytesIO(blob))
    ents = entries_of(store, res.diff_id)
    assert ents["dev/null"].kind == CHAR
    assert (ents["dev/null"].devmajor, ents["dev/null"].devminor) == (1, 3)
    assert ents["dev/loop0"].kind == BLOCK
    assert (ents["dev/loop0"].devmajor, ents["dev/loop0"].devminor) == (7, 0)
    assert ents["run-fifo"].kind == FIFO
    for wh in (".wh.foo", "opq/.wh..wh..opq", "dev/.wh.gone"):
        assert ents[wh].kind == REG and ents[wh].size == 0
    assert ents["dev"].kind == DIR and ents["opq"].kind == DIR
    store.materialize(res.diff_id, str(sandbox.dest), sync=False)
    assert stat.S_ISFIFO(os.lstat(sandbox.dest / "run-fifo").st_mode)
    assert stat.S_ISREG(os.lstat(sandbox.dest / "opq" / ".wh..wh..opq").st_mode)
    if os.geteuid() == 0:
        st = os.lstat(sandbox.dest / "dev" / "null")
        assert stat.S_ISCHR(st.st_mode) and os.major(st.st_rdev) == 1
    sandbox.check()


@pytest.mark.parametrize("typ", [b"Z", b"M", b"N"])
def test_unsupported_entry_type_refused(store, sandbox, typ):
    # An unknown type (GNU tar would extract it as a regular file, with a warning), a
    # multi-volume continuation, old GNU names.  (Volume labels, Solaris ACLs and malformed
    # PAX mtimes are accepted as GNU tar accepts them: tests/test_tarfidelity.py.)
    blob = make_tar(reg("ok"))
    hdr = member_offsets(blob)[0][1]
    reject(store, sandbox, set_header_field(blob, hdr, 156, typ), match="unsupported|type")


def test_garbage_header_after_valid_member(store, sandbox):
    blob = make_tar(reg("a", b"x" * 600))
    end = end_of_members(blob)
    bad = blob[:end] + data_of(BLOCK_SIZE, 8) + blob[end:]
    reject(store, sandbox, bad, match="corrupt|malformed|truncat")


def test_bad_header_checksum(store, sandbox):
    blob = make_tar(reg("a", b"1"), reg("b", b"2"))
    hdr = member_offsets(blob)[1][1]
    reject(store, sandbox, flip(blob, hdr + 10, 0x01))  # name byte changed, checksum stale


# -- trailing data ---------------------------------------------------------------------------------
def _unpadded_tar() -> bytes:
    """A tar with exactly two zero blocks at the end and no record padding (like Go writes)."""
    blob = make_tar(reg("a", b"hello\n"))
    return blob[: end_of_members(blob) + 2 * BLOCK_SIZE]


@pytest.mark.parametrize("comp", ["plain", "gzip", "zstd"])
@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: _unpadded_tar() + b"trailing garbage\n" * 10, id="small-garbage"),
        pytest.param(lambda: _unpadded_tar() + bytes(3 * BLOCK_SIZE), id="extra-zero-blocks"),
        pytest.param(
            lambda: make_tar(reg("a", b"hello\n")) + b"garbage after the record",
            id="garbage-after-record",
        ),
        pytest.param(
            lambda: make_tar(reg("a", b"hello\n")) + data_of(100_000, 9),
            id="100k-garbage",
        ),
        pytest.param(
            # a legitimate tar written with a blocking factor of 64 (32 KiB records, like
            # `tar -b 64`): zero padding beyond tarfile's first 10240-byte read
            lambda: _unpadded_tar().ljust(64 * BLOCK_SIZE, b"\0"),
            id="blocking-factor-64",
        ),
    ],
)
def test_trailing_data_is_hashed(store, sandbox, make, comp):
    tar = make()
    blob = compress(tar, comp)
    res = store.import_tar(io.BytesIO(blob))
    assert [e.path for e in store.entries(res.diff_id)] == ["a"]
    assert res.compressed_digest == "sha256:" + hashlib.sha256(blob).hexdigest()
    sandbox.check()
    if res.diff_id != "sha256:" + hashlib.sha256(tar).hexdigest():
        raise RejectionBug(f"DiffID {res.diff_id} is not sha256 of the {len(tar)}-byte stream")


def test_gnu_tar_blocking_factor(store, sandbox, tmp_path):
    """The same with a real GNU tar: ``tar -b 64`` pads the archive to 32 KiB records."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"data\n")
    out = tmp_path / "b64.tar"
    subprocess.run(["tar", "-b", "64", "-C", str(src), "-cf", str(out), "f"], check=True)
    tar = out.read_bytes()
    assert len(tar) == 64 * BLOCK_SIZE
    res = store.import_path(str(out))
    assert [e.path for e in store.entries(res.diff_id)] == ["f"]
    expected = "sha256:" + hashlib.sha256(tar).hexdigest()
    if res.diff_id != expected:
        raise RejectionBug(f"DiffID {res.diff_id} != {expected}")


# -- a refused import next to existing content -----------------------------------------------------
def test_refused_import_releases_pins_of_known_content(store, sandbox):
    shared = data_of(5000, 10)
    good = store.import_tar(io.BytesIO(make_tar(reg("shared", shared))))
    before = (index_dump(store), object_files(store), store.stats())
    # same content again (so the importer pins the existing object), then a truncation
    blob = make_tar(reg("again", shared), reg("tail", data_of(20000, 11)))
    cut = blob[: member_offsets(blob)[-1][2] + 100]
    with pytest.raises(InvalidInputError):
        store.import_tar(io.BytesIO(cut))
    assert (index_dump(store), object_files(store), store.stats()) == before
    assert staging_leftovers(store) == []
    assert [li.diff_id for li in store.layers()] == [good.diff_id]
    sandbox.check()


# -- materializing symlinks that point outside -----------------------------------------------------
def test_materialize_outward_symlinks_stays_inside(store, sandbox):
    """Symlinks pointing outside are data: materialize creates them, never follows them."""
    out = sandbox.outside
    blob = make_tar(
        sym("abs", str(out / "abs-target")),
        sym("up", "../../../../../../.." + str(out / "up-target")),
        sym("dotdot", ".."),
        sym("victim", str(out / "victim")),
        reg("victim", b"replaces the symlink\n"),  # must not write through it
        sym("fifo-victim", str(out / "fifo")),
        special("fifo-victim", tarfile.FIFOTYPE),
        sym("dev-victim", str(out / "dev")),
        special("dev-victim", tarfile.CHRTYPE, devmajor=1, devminor=3),
        hard("hl-to-symlink", "abs"),
        reg("big-victim-src", data_of(100_000, 12)),
        sym("big-victim", str(out / "big")),
        reg("big-victim", data_of(100_000, 12)),
    )
    res = store.import_tar(io.BytesIO(blob))
    store.materialize(res.diff_id, str(sandbox.dest), sync=False)
    sandbox.check()
    d = sandbox.dest
    assert os.readlink(d / "abs") == str(out / "abs-target")
    assert os.path.islink(d / "hl-to-symlink")
    assert (d / "victim").read_bytes() == b"replaces the symlink\n"
    assert not os.path.islink(d / "victim")
    assert not os.path.islink(d / "big-victim") and (d / "big-victim").stat().st_size == 100_000
    assert stat.S_ISFIFO(os.lstat(d / "fifo-victim").st_mode)


def test_symlink_escape_refused_and_never_materialized(store, sandbox):
    """The classic: ``a -> /somewhere`` then ``a/file``.  Import refuses it; if it had been
    accepted, materializing it must still not create anything at the symlink's target."""
    blob = make_tar(sym("a", str(sandbox.outside)), reg("a/file", b"escaped\n"))
    try:
        res = store.import_tar(io.BytesIO(blob))
    except UnsafePathError:
        assert_store_clean(store)
    else:  # pragma: no cover - only if import regressed
        try:
            store.materialize(res.diff_id, str(sandbox.dest), sync=False)
        except Exception:
            pass
        sandbox.check()
        pytest.fail("import accepted a write through a symlink")
    sandbox.check()


def _file_then_special_tar(sandbox: Sandbox, n: int) -> bytes:
    members = []
    for j in range(n):
        members.append(reg(f"x{j}", b"file %d\n" % j))
        members.append(sym(f"x{j}", str(sandbox.outside / f"t{j}")))
    return make_tar(*members)


def test_materialize_file_then_symlink_never_escapes(store, sandbox):
    """Regular files are written by a worker pool, symlinks by the main thread: however the
    two race, nothing may be created at a symlink's target and no staging may be left."""
    res = store.import_tar(io.BytesIO(_file_then_special_tar(sandbox, 200)))
    for i in range(3):
        dest = sandbox.mnt / f"race{i}"
        try:
            store.materialize(res.diff_id, str(dest), sync=False)
        except OSError as exc:
            assert exc.errno in (errno.EEXIST, errno.ENOENT)
        assert os.listdir(sandbox.outside) == []
    assert sorted(n for n in os.listdir(sandbox.mnt) if n.startswith(".")) == []


def test_materialize_file_then_symlink_last_entry_wins(store, sandbox):
    n = 200
    res = store.import_tar(io.BytesIO(_file_then_special_tar(sandbox, n)))
    problems = []
    for i in range(3):
        dest = sandbox.mnt / f"race{i}"
        try:
            store.materialize(res.diff_id, str(dest), sync=False)
        except OSError as exc:
            problems.append(f"run {i}: {type(exc).__name__}: {exc}")
            continue
        wrong = [j for j in range(n) if not os.path.islink(dest / f"x{j}")]
        if wrong:
            problems.append(f"run {i}: {len(wrong)} of {n} names are files, not symlinks")
    assert os.listdir(sandbox.outside) == []
    if problems:
        raise RejectionBug("; ".join(problems))
