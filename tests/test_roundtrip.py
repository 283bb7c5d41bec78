"""Round trip: import a tar, materialize it, compare with what GNU ``tar -x`` makes of it."""

from __future__ import annotations

import io
import os
import struct
import subprocess
import tarfile
from pathlib import Path

import pytest
from conftest import IS_ROOT, gnu_tar, gnu_untar
from treecmp import diff_trees

from layerstore import Store
from layerstore.core.manifest import DIR, HARDLINK, REG, SYMLINK

# A valid VFS_CAP_REVISION_2 security.capability value (cap_net_bind_service, effective).
CAP_NET_BIND = struct.pack("<IIIII", 0x02000001, 1 << 10, 0, 0, 0)


def build_tree(root: Path) -> Path:
    """Every kind of entry a layer can hold, with awkward metadata."""
    root.mkdir()
    (root / "etc").mkdir()
    (root / "etc" / "hostname").write_text("box\n")
    (root / "etc" / "big.bin").write_bytes(os.urandom(300_000))
    (root / "empty").write_bytes(b"")
    (root / "tiny").write_bytes(b"x" * 64)
    (root / "small").write_bytes(b"y" * 65)
    (root / "dup1").write_bytes(b"same content in two files" * 10)
    (root / "dup2").write_bytes(b"same content in two files" * 10)
    deep = root / "a" / "b" / "c" / ("long-name-" * 20)
    deep.mkdir(parents=True)
    (deep / ("f" * 200)).write_text("deep and long\n")
    (root / "usr" / "bin").mkdir(parents=True)
    suid = root / "usr" / "bin" / "su"
    suid.write_bytes(b"#!/bin/sh\necho su\n" * 5)
    os.chmod(suid, 0o4755)
    sgid = root / "usr" / "bin" / "wall"
    sgid.write_bytes(b"#!/bin/sh\necho wall\n" * 5)
    os.chmod(sgid, 0o2755)
    (root / "tmp").mkdir()
    os.chmod(root / "tmp", 0o1777)
    os.link(root / "etc" / "big.bin", root / "usr" / "bin" / "hardlinked")
    os.symlink("../etc/hostname", root / "usr" / "hostname-link")
    os.symlink("/absolute/dangling", root / "dangling")
    os.mkfifo(root / "fifo")
    ping = root / "usr" / "bin" / "ping"
    ping.write_bytes(b"\x7fELF fake ping" * 10)
    os.chmod(ping, 0o755)
    os.setxattr(root / "etc" / "hostname", "user.comment", b"hello \x00\xff binary")
    (root / "ro").mkdir()
    (root / "ro" / "inside").write_text("in a read-only dir\n")
    if IS_ROOT:
        os.setxattr(ping, "security.capability", CAP_NET_BIND)
        os.setxattr(root / "etc", "trusted.overlay.opaque", b"y")
        os.mknod(root / "null", 0o666 | 0o020000, os.makedev(1, 3))
        os.mknod(root / "sda", 0o660 | 0o060000, os.makedev(8, 0))
        os.chown(root / "etc" / "hostname", 1234, 5678)
        os.lchown(root / "dangling", 42, 43)
        os.chown(root / "tmp", 0, 100)
    os.chmod(root / "ro", 0o555)
    # Nanosecond mtimes, set last (children first so directories keep theirs).
    t = 1_600_000_000_123_456_789
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for n in filenames + dirnames:
            os.utime(os.path.join(dirpath, n), ns=(t, t), follow_symlinks=False)
            t += 1_000_000_007
        os.utime(dirpath, ns=(t, t))
    return root


@pytest.fixture(scope="module")
def tree_and_tars(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    base = tmp_path_factory.mktemp("rt")
    src = build_tree(base / "src")
    tars = {
        "pax": gnu_tar(src, base / "pax.tar"),
        "gnu": gnu_tar(src, base / "gnu.tar", fmt="gnu"),
    }
    subprocess.run(["gzip", "-n", "-k", str(tars["pax"])], check=True)
    tars["pax.gz"] = base / "pax.tar.gz"
    subprocess.run(
        ["zstd", "-q", "-k", str(tars["pax"]), "-o", str(base / "pax.tar.zst")], check=True
    )
    tars["pax.zst"] = base / "pax.tar.zst"
    return src, tars


@pytest.mark.parametrize("kind", ["pax", "gnu", "pax.gz", "pax.zst"])
def test_materialize_equals_tar_x(store: Store, tree_and_tars, tmp_path: Path, kind: str) -> None:
    _src, tars = tree_and_tars
    expected = gnu_untar(tars[kind], tmp_path / "tar-x")
    res = store.import_path(str(tars[kind]))
    assert res.compression == {"pax.gz": "gzip", "pax.zst": "zstd"}.get(kind, "none")
    got = tmp_path / "mat"
    m = store.materialize(res.diff_id, str(got))
    assert diff_trees(str(expected), str(got)) == []
    # ext4 (the root fs here) cannot reflink: the fallback must be used and reported.
    assert m.methods.get("reflink", 0) == 0 or m.methods.get("copy_file_range", 0) == 0
    assert sum(m.methods.values()) == m.files


def test_diff_id_is_sha256_of_uncompressed_tar(store: Store, tree_and_tars) -> None:
    import hashlib

    _src, tars = tree_and_tars
    raw = tars["pax"].read_bytes()
    gz = tars["pax.gz"].read_bytes()
    r1 = store.import_path(str(tars["pax.gz"]))
    assert r1.diff_id == "sha256:" + hashlib.sha256(raw).hexdigest()
    assert r1.compressed_digest == "sha256:" + hashlib.sha256(gz).hexdigest()
    # Same layer, other compression: found by either digest, stored once.
    r2 = store.import_path(str(tars["pax.zst"]))
    assert r2.diff_id == r1.diff_id and r2.already_present
    assert store.resolve(r1.compressed_digest) == store.resolve(r2.compressed_digest)
    assert len(store.layers()) == 1


def test_manifest_keeps_every_kind(store: Store, tree_and_tars) -> None:
    _src, tars = tree_and_tars
    res = store.import_path(str(tars["pax"]))
    entries = {e.path: e for e in store.entries(res.diff_id)}
    assert entries["."].kind == DIR
    assert entries["usr/bin/su"].mode == 0o4755
    assert entries["tmp"].mode == 0o1777
    assert entries["usr/hostname-link"].kind == SYMLINK
    assert entries["usr/hostname-link"].linkname == "../etc/hostname"
    links = [e for e in entries.values() if e.kind == HARDLINK]
    assert len(links) == 1 and {links[0].path, links[0].linkname} == {
        "etc/big.bin",
        "usr/bin/hardlinked",
    }
    assert entries["etc/hostname"].xattrs["user.comment"] == b"hello \x00\xff binary"
    assert entries["tiny"].inline == b"x" * 64 and entries["small"].digest is not None
    assert entries["empty"].kind == REG and entries["empty"].inline == b""
    assert entries["etc/hostname"].mtime_ns % 1_000_000_000 != 0  # nanoseconds survive
    if IS_ROOT:
        assert entries["usr/bin/ping"].xattrs["security.capability"] == CAP_NET_BIND
        assert (entries["null"].devmajor, entries["null"].devminor) == (1, 3)
        assert (entries["etc/hostname"].uid, entries["etc/hostname"].gid) == (1234, 5678)


def test_import_directory_equals_source(store: Store, tree_and_tars, tmp_path: Path) -> None:
    src, _ = tree_and_tars
    res = store.import_path(str(src))
    got = tmp_path / "mat"
    store.materialize(res.diff_id, str(got))
    assert diff_trees(str(src), str(got)) == []


def test_dedup_two_layers_share_content(store: Store, tmp_path: Path) -> None:
    """Two layers sharing files store each content once (objects and bytes counted)."""
    shared = {f"shared/{i}": os.urandom(10_000 + i) for i in range(50)}
    a = tmp_path / "a"
    b = tmp_path / "b"
    for root, extra in ((a, b"only in a" * 100), (b, b"only in b" * 100)):
        for rel, data in shared.items():
            p = root / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
        (root / "own").write_bytes(extra)
    ra = store.import_path(str(gnu_tar(a, tmp_path / "a.tar")))
    before = store.stats()
    rb = store.import_path(str(gnu_tar(b, tmp_path / "b.tar")))
    after = store.stats()
    # its own file, its manifest and its tar-split
    assert rb.reused_objects == 50 and rb.new_objects == 3
    assert after["objects"] - before["objects"] == 3
    shared_bytes = sum(len(d) for d in shared.values())
    unique = shared_bytes + 2 * 900
    assert after["logical_bytes"] == 2 * shared_bytes + 2 * 900
    meta_objects = {  # manifests and tar-splits (distinct: two could be identical)
        d
        for li in store.layers()
        for d in (li.manifest, store._layer_record(li.diff_id)["tarsplit"])
    }
    metadata = sum(store.get_object(bytes.fromhex(d)).size for d in meta_objects)
    assert after["physical_bytes"] - metadata == unique
    # On disk: one file per object.
    files = sum(len(fs) for _, _, fs in os.walk(store.objects_dir))
    assert files == after["objects"]
    assert ra.diff_id != rb.diff_id


def test_remove_drops_references_never_files(store: Store, tree_and_tars) -> None:
    _src, tars = tree_and_tars
    res = store.import_path(str(tars["pax"]))
    files_before = sorted(p for _, _, fs in os.walk(store.objects_dir) for p in fs)
    out = store.remove(res.diff_id)
    assert not out["deferred"]
    assert store.layers() == []
    s = store.stats()
    assert s["unreferenced_objects"] == s["objects"] > 0
    assert sorted(p for _, _, fs in os.walk(store.objects_dir) for p in fs) == files_before


def test_store_format_version_checked(tmp_path: Path) -> None:
    import json

    from layerstore import FormatVersionError, StoreError

    Store.init(str(tmp_path / "s")).close()
    (tmp_path / "s" / "layerstore.json").write_text(json.dumps({"format": 99}))
    with pytest.raises(FormatVersionError, match="format 99"):
        Store(str(tmp_path / "s"))
    with pytest.raises(StoreError, match="layerstore init"):
        Store(str(tmp_path / "nothing-here"))


def test_materialize_refuses_existing_destination(store: Store, tree_and_tars, tmp_path: Path):
    from layerstore import DestinationError

    _src, tars = tree_and_tars
    res = store.import_path(str(tars["pax"]))
    (tmp_path / "exists").mkdir()
    with pytest.raises(DestinationError):
        store.materialize(res.diff_id, str(tmp_path / "exists"))
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []


def _fs_type(path: Path) -> str:
    return subprocess.run(
        ["stat", "-f", "-c", "%T", str(path)], capture_output=True, text=True, check=True
    ).stdout.strip()


def test_copy_fallback_on_a_filesystem_without_reflink(store: Store, tree_and_tars, tmp_path):
    """The root filesystem here is ext4: FICLONE fails, the fallback is used and reported."""
    if _fs_type(tmp_path) not in ("ext2/ext3", "ext4", "tmpfs"):
        pytest.skip(f"tmp_path is on {_fs_type(tmp_path)}, which may reflink")
    _src, tars = tree_and_tars
    res = store.import_path(str(tars["pax"]))
    m = store.materialize(res.diff_id, str(tmp_path / "m"))
    assert "reflink" not in m.methods
    objects = sum(1 for e in store.entries(res.diff_id) if e.digest is not None)
    assert m.methods.get("copy_file_range", 0) + m.methods.get("copy", 0) == objects
    assert m.methods.get("inline", 0) == m.files - objects


@pytest.mark.parametrize(
    "fmt, extra",
    [
        ("gnu", []),  # old GNU sparse headers ('S')
        ("pax", ["--sparse-version=0.0"]),
        ("pax", ["--sparse-version=0.1"]),
        ("pax", ["--sparse-version=1.0"]),
    ],
)
def test_gnu_sparse_files(store: Store, tmp_path: Path, fmt: str, extra: list[str]) -> None:
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "sparse.img", "wb") as f:
        for off in (0, 1 << 20, 5 << 20, (9 << 20) - 100):
            f.seek(off)
            f.write(os.urandom(3000))
        f.truncate(12 << 20)  # a trailing hole
    with open(src / "allhole", "wb") as f:
        f.truncate(2 << 20)
    (src / "plain").write_bytes(os.urandom(10_000))
    tarball = gnu_tar(src, tmp_path / "s.tar", "--sparse", *extra, fmt=fmt)
    res = store.import_path(str(tarball))
    got = tmp_path / "mat"
    store.materialize(res.diff_id, str(got))
    assert diff_trees(str(gnu_untar(tarball, tmp_path / "x")), str(got)) == []
    assert (got / "sparse.img").stat().st_size == 12 << 20


def test_reimport_of_a_known_blob_is_recognised_by_its_digest(store: Store, tree_and_tars):
    _src, tars = tree_and_tars
    first = store.import_path(str(tars["pax.gz"]))
    again = store.import_path(str(tars["pax.gz"]))
    assert again.already_present and again.stats == {"shortcut": 1}
    assert again.diff_id == first.diff_id and again.new_objects == 0
    forced = store.import_path(str(tars["pax.gz"]), shortcut=False)
    assert forced.already_present and forced.stats == {} and forced.diff_id == first.diff_id
    # stdin-like streams cannot be rewound: the normal path, same answer
    with open(tars["pax.gz"], "rb") as f:
        piped = store.import_tar(io.BufferedReader(_Unseekable(f)))
    assert piped.already_present and piped.stats == {}


class _CountingFile(io.FileIO):
    """A real file (fstat works) that counts the bytes read through it."""

    nread = 0

    def readinto(self, b) -> int:  # type: ignore[override]
        n = super().readinto(b)
        self.nread += n or 0
        return n

    def read(self, n: int = -1) -> bytes:
        b = super().read(n)
        self.nread += len(b)
        return b


def _import_counted(store: Store, path: Path):
    with _CountingFile(path) as f:
        res = store.import_tar(f)  # type: ignore[arg-type]
        return res, f.nread


def test_first_import_reads_its_file_once_size_hint(store: Store, tree_and_tars, tmp_path):
    """The re-import shortcut hashes a file only if a stored blob has its size: a first import
    reads the file once, a re-import once (hash only), a same-size stranger twice."""
    _src, tars = tree_and_tars
    blob = tars["pax.gz"]
    size = blob.stat().st_size
    first, n = _import_counted(store, blob)
    assert not first.already_present and first.stats.get("shortcut") is None
    assert n == size  # no hashing pre-pass: nothing of this size was stored
    again, n = _import_counted(store, blob)
    assert again.stats == {"shortcut": 1} and again.diff_id == first.diff_id
    assert n == size  # hashed, recognised, never parsed
    # A different blob of exactly the same size: the hint says "maybe", the hash says no.
    other = tmp_path / "other.tar.gz"
    with tarfile.open(other, "w:gz") as tf:
        data = os.urandom(1000)
        ti = tarfile.TarInfo("x")
        ti.size = len(data)
        tf.addfile(ti, io.BytesIO(data))
    raw = other.read_bytes()
    assert len(raw) < size
    other.write_bytes(raw + bytes(size - len(raw)))  # trailing zeros: still the same tar
    third, n = _import_counted(store, other)
    assert not third.already_present and n == 2 * size
    # Removing the layer leaves a stale hint: ignored, and gc drops it.
    store.remove(first.diff_id)
    fourth, n = _import_counted(store, other)
    assert fourth.stats == {"shortcut": 1} and n == size  # first's stale hint is skipped
    store.remove(third.diff_id)
    g = store.gc()
    assert g.blob_size_hints_dropped == 2
    fifth, n = _import_counted(store, blob)
    assert not fifth.already_present and n == size  # no hint left: read once


class _Unseekable(io.RawIOBase):
    def __init__(self, f) -> None:
        self.f = f

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:  # type: ignore[override]
        data = self.f.read(len(b))
        b[: len(data)] = data
        return len(data)


@pytest.mark.parametrize("fastpath", ["1", "0"])
def test_same_content_twice_in_one_layer_is_stored_once(
    store: Store, tmp_path: Path, monkeypatch, fastpath: str
) -> None:
    """The writer threads meet a repeated content at its staged name (O_EXCL) and count it
    once, on both staging paths (C fast path and pure Python)."""
    monkeypatch.setenv("LAYERSTORE_FASTPATH", fastpath)
    src = tmp_path / "src"
    src.mkdir()
    same = os.urandom(5000)
    for i in range(200):  # spread over several writer batches
        (src / f"f{i:03d}").write_bytes(same if i % 2 else os.urandom(100 + i))
    tarball = gnu_tar(src, tmp_path / "t.tar")
    res = store.import_path(str(tarball))
    assert res.new_objects == 100 + 1 + 2  # distinct contents, one shared, manifest, tar-split
    got = tmp_path / "mat"
    store.materialize(res.diff_id, str(got))
    assert diff_trees(str(gnu_untar(tarball, tmp_path / "x")), str(got)) == []
    assert store.fsck(full=True).exit_code == 0


def test_entries_waiting_for_digests_stay_bounded(
    store: Store, tmp_path: Path, monkeypatch
) -> None:
    """Entries behind a file whose digest the writers have not returned wait in a queue; it
    stays bounded (whatever follows: directories, links, small files) and the manifest keeps
    tar order -- the same manifest as with an unbounded queue."""
    from layerstore.ops import ingest

    src = tmp_path / "src"
    src.mkdir()
    for i in range(300):
        (src / f"d{i:03d}").mkdir()
        (src / f"d{i:03d}" / "f").write_bytes(os.urandom(200))  # an object (> 64 bytes)
        (src / f"d{i:03d}" / "s").symlink_to("f")
        (src / f"d{i:03d}" / "t").write_bytes(b"tiny")  # inline
    tarball = gnu_tar(src, tmp_path / "t.tar")
    with Store.init(str(tmp_path / "ref")) as ref:
        expected = ref.import_path(str(tarball)).manifest
    seen: list[int] = []
    real_emit = ingest._Importer.emit

    def emit(self, e):  # type: ignore[no-untyped-def]
        real_emit(self, e)
        seen.append(len(self.entries))

    monkeypatch.setattr(ingest, "_MAX_WAITING", 8)
    monkeypatch.setattr(ingest._Importer, "emit", emit)
    res = store.import_path(str(tarball))
    assert res.manifest == expected
    assert max(seen) <= 9 and len(seen) > 900
