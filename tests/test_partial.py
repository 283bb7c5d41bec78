"""zstd:chunked partial imports, the writer, chunk-level reuse and the seed race.

Real blobs written by buildah 1.28 and skopeo 1.9 (older variant) from the corpus; blobs of the
current variant come from layerstore's own writer and are cross-checked with the real ``zstd``
decoder.  Bytes read are counted by a wrapper around the source, independently of the stats
the import reports.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import zstandard
from conftest import LoopFS, need_corpus

import testdata as corpus
from layerstore import Store
from layerstore.chunked.chunker import crc64_iso
from layerstore.chunked.toc import locate
from layerstore.core.fsutil import shared_bytes
from layerstore.sources.base import FileSource, read_range

HERE = Path(__file__).parent


class CountingSource:
    """Wraps a source and counts every byte it hands out (the test's own count)."""

    def __init__(self, inner: FileSource) -> None:
        self.inner = inner
        self.counted = 0
        self.max_ranges = inner.max_ranges
        self.merge_gap = inner.merge_gap

    def size(self) -> int:
        return self.inner.size()

    def read_ranges(self, ranges: Sequence[tuple[int, int]]) -> Iterator[tuple[int, bytes]]:
        for off, data in self.inner.read_ranges(ranges):
            self.counted += len(data)
            yield off, data


def _layers(layout: Path, tag: str) -> list[tuple[Path, dict[str, str], str]]:
    def blob(d: str) -> Path:
        return layout / "blobs" / "sha256" / d.split(":", 1)[1]

    index = json.loads((layout / "index.json").read_text())
    desc = next(
        m
        for m in index["manifests"]
        if m["annotations"]["org.opencontainers.image.ref.name"] == tag
    )
    man = json.loads(blob(desc["digest"]).read_bytes())
    cfg = json.loads(blob(man["config"]["digest"]).read_bytes())
    return [
        (blob(lay["digest"]), lay.get("annotations", {}), did)
        for lay, did in zip(man["layers"], cfg["rootfs"]["diff_ids"], strict=True)
    ]


def _layout(tool: str, version: int) -> Path:
    if tool == "buildah":
        return need_corpus(corpus.buildah_chunked_layout, version)
    return need_corpus(corpus.oci_layout, version, "zstd:chunked")


# -- real blobs -----------------------------------------------------------------------------
@pytest.mark.realdata
@pytest.mark.parametrize("tool", ["buildah", "skopeo"])
def test_partial_after_v1_reads_little_and_equals_full_import(tool: str, tmp_path: Path) -> None:
    """buildah: single-layer v1 then v2 (whole rootfs each).  skopeo writes v2 as v1's layer plus
    a small diff layer, so its case is: buildah's v1 first, then skopeo's v1 blob (another
    writer, same files: reuse must work across writers) and skopeo's v2 layers."""
    b1 = _layers(_layout("buildah", 1), "v1")[0]
    if tool == "buildah":
        targets = _layers(_layout("buildah", 2), "v2")
    else:
        targets = _layers(_layout("skopeo", 1), "v1") + _layers(_layout("skopeo", 2), "v2")
    with Store.init(str(tmp_path / "s")) as st:
        with FileSource(str(b1[0])) as src:
            first = st.import_chunked(src, b1[1], expected_diff_id=b1[2])
        assert first.partial["files_reused"] == 0 and first.new_objects > 5000
        total_counted = total_size = 0
        for blob, ann, diff_id in targets:
            src = CountingSource(FileSource(str(blob)))
            r = st.import_chunked(src, ann, expected_diff_id=diff_id)
            p = r.partial
            print(f"{tool} {blob.name[:12]}: {p}")
            assert r.diff_id == diff_id
            assert p["bytes_read"] == src.counted  # the report is what was really read
            if p["diff_id_proof"] != "already stored":
                assert p["variant"] == "old" and p["toc_verified"]
                assert p["diff_id_proof"] == "header-frame replay"
            total_counted += src.counted
            total_size += src.size()
            src.inner.close()
            # The same layer as a full import of the same blob, in a fresh store.
            with Store.init(str(tmp_path / f"full-{blob.name[:8]}")) as full:
                f = full.import_path(str(blob))
                assert f.diff_id == diff_id
                mine, theirs = st.layer(diff_id), full.layer(diff_id)
                assert mine.manifest == theirs.manifest  # same entries, metadata, objects
                assert mine.tarsplit == theirs.tarsplit and mine.tarsplit
        big = max(targets, key=lambda t: t[0].stat().st_size)
        assert big[0].stat().st_size > 40 << 20
        # v2 shares almost all files with v1: only a few % of its bytes may be read.
        assert total_counted < 0.06 * total_size, (total_counted, total_size)
        rep = st.fsck()
        assert rep.exit_code == 0, rep.to_json()


# -- the writer -----------------------------------------------------------------------------
def _sample_tree(root: Path, big: bytes) -> Path:
    root.mkdir()
    (root / "etc").mkdir()
    (root / "etc" / "hostname").write_text("layerstore\n")
    (root / "empty").write_bytes(b"")
    (root / "big.bin").write_bytes(big)
    (root / "sparse-ish").write_bytes(b"head" + bytes(200_000) + b"tail")  # a zeros chunk
    os.symlink("etc/hostname", root / "link")
    os.link(root / "etc" / "hostname", root / "hard")
    os.setxattr(root / "big.bin", "user.note", b"\x00\x01binary")
    os.utime(root / "big.bin", ns=(1_700_000_000_123_456_789, 1_700_000_000_123_456_789))
    return root


def _tar_of(root: Path, out: Path) -> Path:
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tf:
        for p in sorted(root.rglob("*")):
            tf.add(p, arcname=str(p.relative_to(root)), recursive=False)
    return out


def test_writer_blob_reads_back_everywhere(tmp_path: Path) -> None:
    rnd = random.Random(7)
    tree = _sample_tree(tmp_path / "t", rnd.randbytes(3 << 20))
    tarball = _tar_of(tree, tmp_path / "l.tar")
    with Store.init(str(tmp_path / "a")) as a:
        res = a.import_path(str(tarball))
        with open(tmp_path / "l.zst", "wb") as f:
            blob = a.export_chunked(res.diff_id, f)
    assert blob.diff_id == res.diff_id and blob.size == (tmp_path / "l.zst").stat().st_size
    data = (tmp_path / "l.zst").read_bytes()
    assert "sha256:" + hashlib.sha256(data).hexdigest() == blob.digest
    # A plain zstd decoder (python-zstandard, and the real zstd CLI) reads the exact tar.
    tar = zstandard.ZstdDecompressor().stream_reader(data, read_across_frames=True).read()
    assert tar == tarball.read_bytes()
    out = subprocess.run(
        ["zstd", "-d", "-c", str(tmp_path / "l.zst")], check=True, capture_output=True
    ).stdout
    assert out == tar
    # Its TOC: current variant, chunked big file, a zeros chunk, trusted by the annotation.
    with FileSource(str(tmp_path / "l.zst")) as src:
        loc = locate(src, blob.annotations)
        assert loc.variant == "new" and loc.tarsplit is not None and loc.toc_digest
        raw = read_range(src, loc.toc.offset, loc.toc.offset + loc.toc.length)
    toc = json.loads(zstandard.ZstdDecompressor().decompress(raw, max_output_size=loc.toc.ulength))
    kinds = [(e["type"], e["name"], e.get("chunkType", "")) for e in toc["entries"]]
    assert ("chunk", "sparse-ish", "zeros") in kinds
    assert sum(1 for k in kinds if k[:2] == ("chunk", "big.bin")) >= 10
    # TOC and tar-split cross-checked by hand: every file entry of the tar-split, in order,
    # is the TOC's next regular file, with its size and the CRC-64/ISO of the real content.
    with FileSource(str(tmp_path / "l.zst")) as src:
        ts_z = read_range(src, loc.tarsplit.offset, loc.tarsplit.offset + loc.tarsplit.length)
    assert toc["tarSplitDigest"] == "sha256:" + hashlib.sha256(ts_z).hexdigest()
    lines = zstandard.ZstdDecompressor().decompress(ts_z, max_output_size=loc.tarsplit.ulength)
    records = [json.loads(x) for x in lines.splitlines()]
    assert [r["position"] for r in records] == list(range(len(records)))
    regs = [e for e in toc["entries"] if e["type"] == "reg"]
    files = [r for r in records if r["type"] == 1]
    assert [r["name"] for r in files] == [e["name"] for e in toc["entries"] if e["type"] != "chunk"]
    by_name = {r["name"]: r for r in files}
    for e in regs:
        content = (tree / e["name"]).read_bytes()
        assert by_name[e["name"]].get("size", 0) == len(content) == e.get("size", 0)
        if content:
            want = crc64_iso(content).to_bytes(8, "big")
            assert base64.b64decode(by_name[e["name"]]["payload"]) == want
            assert e["digest"] == "sha256:" + hashlib.sha256(content).hexdigest()
        else:
            assert by_name[e["name"]]["payload"] is None
    raw = b"".join(base64.b64decode(r["payload"]) for r in records if r["type"] == 2)
    assert len(raw) + sum(len((tree / e["name"]).read_bytes()) for e in regs) == len(tar)
    # Its own reader, from the annotations and from the bare footer: the same layer.
    for ann, verified in ((blob.annotations, True), (None, False)):
        with Store.init(str(tmp_path / f"b{verified}")) as b:
            r = b.import_chunked(str(tmp_path / "l.zst"), ann)
            assert r.diff_id == res.diff_id
            assert r.partial["toc_verified"] is verified
            assert r.partial["diff_id_proof"] == "tar-split replay"
            assert b.layer(r.diff_id).manifest == res.manifest


# -- chunk-level reuse on a real reflink filesystem -------------------------------------------
def _two_versions(
    tmp: Path, size: int = 8 << 20
) -> tuple[Path, Path, bytes, bytes, dict[str, str]]:
    rnd = random.Random(11)
    v1 = rnd.randbytes(size)
    v2 = bytearray(v1)
    for at in (size // 5, size // 2, size - 1000):  # a few in-place edits
        v2[at : at + 100] = rnd.randbytes(100)
    blobs = []
    for n, content in enumerate((v1, bytes(v2))):
        d = tmp / f"tree{n}"
        d.mkdir()
        (d / "db.bin").write_bytes(content)
        with Store.init(str(tmp / f"writer{n}")) as w:
            r = w.import_path(str(_tar_of(d, tmp / f"v{n}.tar")))
            with open(tmp / f"v{n}.zst", "wb") as f:
                blobs.append((tmp / f"v{n}.zst", w.export_chunked(r.diff_id, f)))
    return blobs[0][0], blobs[1][0], v1, bytes(v2), blobs[1][1].annotations


@pytest.mark.loopfs
def test_changed_file_is_assembled_from_shared_chunks(scratch_xfs: LoopFS) -> None:
    base = scratch_xfs.path
    b1, b2, _v1, v2, _ann = _two_versions(base)
    with Store.init(str(base / "store")) as st:
        st.import_chunked(str(b1))
        src = CountingSource(FileSource(str(b2)))
        r = st.import_chunked(src)
        p = r.partial
        print(p)
        assert p["files_assembled"] == 1 and p["chunks_reused"] >= 50
        assert p["chunks_fetched"] <= 6
        assert src.counted < 0.1 * src.size()
        assert p["bytes_cloned"] > 0.5 * len(v2)  # in-place edits keep offsets aligned
        entry = next(e for e in st.entries(r.diff_id) if e.path == "db.bin")
        obj = st.object_path(entry.digest)
        with open(obj, "rb") as f:
            assert f.read() == v2
        shared, total = shared_bytes(obj)
        assert shared >= p["bytes_cloned"] * 0.9, (shared, total)  # FIEMAP: really shared
        out = base / "out"
        st.materialize(r.diff_id, str(out))
        assert (out / "db.bin").read_bytes() == v2


# -- the seed race ----------------------------------------------------------------------------
@pytest.mark.loopfs
def test_seed_race_partial_import_survives_rm_and_gc(scratch_xfs: LoopFS) -> None:
    """Process A partially imports Y reusing chunks of layer X; while it is stalled after its
    plan, the test removes X and runs gc.  A must finish byte-exact; X's data goes only after."""
    base = scratch_xfs.path
    b1, b2, _v1, v2, ann = _two_versions(base)
    store = str(base / "store")
    with Store.init(store) as st:
        x = st.import_chunked(str(b1))
        x_obj = next(e for e in st.entries(x.diff_id) if e.path == "db.bin").digest
    marker = base / "planned"
    proc = subprocess.Popen(
        [
            sys.executable,
            str(HERE / "procs.py"),
            "partial-slow",
            store,
            str(b2),
            json.dumps(ann),
            str(marker),
            "3",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            assert time.monotonic() < deadline
            time.sleep(0.02)
        with Store(store) as st:
            st.remove(x.diff_id)
            g = st.gc()
            print("gc during the import:", g)
            assert g.skipped_pinned >= 1  # the chunk source survived because it was pinned
            assert os.path.exists(st.object_path(x_obj))  # pinned by the partial import
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    events = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert proc.returncode == 0, events
    done = events[-1]
    assert done["event"] == "done" and done["partial"]["chunks_reused"] >= 50
    with Store(store) as st:
        y = st.layer(done["diff_id"])
        entry = next(e for e in st.entries(y.diff_id) if e.path == "db.bin")
        with open(st.object_path(entry.digest), "rb") as f:
            assert f.read() == v2
        st.gc()
        assert not os.path.exists(st.object_path(x_obj))  # unpinned now: collected
        assert st.fsck().exit_code == 0


def test_chunk_index_of_plain_tar_import_serves_partial_imports(tmp_path: Path) -> None:
    """A layer imported from a plain tar, chunked like containers/storage cuts, lets a later
    zstd:chunked import assemble a changed file from its chunks (no reflink needed: ext4)."""
    b1, b2, _v1, v2, ann = _two_versions(tmp_path)
    with Store.init(str(tmp_path / "s")) as st:
        st.import_path(str(tmp_path / "v0.tar"))  # the plain tar behind b1
        first = st.chunk_index()
        assert first["objects_chunked"] == 1 and first["chunks_indexed"] >= 100
        assert st.chunk_index()["objects_chunked"] == 0  # marked: never chunked twice
        src = CountingSource(FileSource(str(b2)))
        r = st.import_chunked(src, ann)
        p = r.partial
        assert p["files_assembled"] == 1 and p["chunks_reused"] >= 100, p
        assert src.counted < 0.1 * src.size()
        entry = next(e for e in st.entries(r.diff_id) if e.path == "db.bin")
        with open(st.object_path(entry.digest), "rb") as f:
            assert f.read() == v2


@pytest.mark.realdata
def test_toc_only_reads_fewer_bytes_and_says_the_diff_id_is_unproved(tmp_path: Path) -> None:
    """The older variant has no tar-split: TOC-only mode skips the header frames (podman's
    byte count) and records the config's DiffID as unproved, with no tar-split to export."""
    from layerstore import InvalidInputError, StoreError

    b1 = _layers(_layout("buildah", 1), "v1")[0]
    b2, ann2, did2 = _layers(_layout("buildah", 2), "v2")[0]
    counts = {}
    for toc_only in (False, True):
        with Store.init(str(tmp_path / f"s{toc_only}")) as st:
            st.import_chunked(str(b1[0]), b1[1], expected_diff_id=b1[2], toc_only=toc_only)
            src = CountingSource(FileSource(str(b2)))
            r = st.import_chunked(src, ann2, expected_diff_id=did2, toc_only=toc_only)
            src.inner.close()
            counts[toc_only] = src.counted
            info = st.layer(did2)
            if toc_only:
                assert r.partial["diff_id_proof"] == "unverified (TOC only)"
                assert info.partial["diff_id_proof"] == "unverified (TOC only)"
                assert info.tarsplit == ""
                with pytest.raises(StoreError, match="no tar-split"):
                    st.export_layer(did2, open(os.devnull, "wb"))
                with pytest.raises(InvalidInputError, match="needs the DiffID"):
                    st.import_chunked(str(b2), ann2, toc_only=True)
                toc_manifest = info.manifest
            else:
                assert info.partial["diff_id_proof"] == "header-frame replay"
    # The header frames are what TOC-only saves (~0.6 MB of this 52 MB blob).
    assert counts[True] < counts[False] - 300_000, counts
    # buildah's tar has whole-second mtimes, so the TOC says all the manifest needs: the
    # TOC-only layer equals a full import of the same blob.
    with Store.init(str(tmp_path / "full")) as full:
        assert full.import_path(str(b2)).diff_id == did2
        assert full.layer(did2).manifest == toc_manifest


def test_tiny_files_are_reused_without_a_range(tmp_path: Path) -> None:
    """Files of <= 64 bytes live inline in manifests (no object); the chunk index keeps their
    contents by sha256 so a partial import does not fetch a range for each of them."""
    t1, t2 = tmp_path / "t1", tmp_path / "t2"
    for t in (t1, t2):
        t.mkdir()
        for i in range(30):
            (t / f"tiny{i}").write_bytes(f"tiny file number {i}\n".encode())
    (t2 / "new-tiny").write_bytes(b"only in v2\n")
    with Store.init(str(tmp_path / "w")) as w:
        r2 = w.import_path(str(t2))
        with open(tmp_path / "v2.zst", "wb") as f:
            blob = w.export_chunked(r2.diff_id, f)
    with Store.init(str(tmp_path / "s")) as st:
        st.import_path(str(t1))  # a plain import: the tiny contents are remembered
        r = st.import_chunked(str(tmp_path / "v2.zst"), blob.annotations)
        assert r.diff_id == r2.diff_id and r.manifest == r2.manifest
        assert r.partial["files_fetched"] == 1, r.partial  # only new-tiny
        assert r.partial["files_reused"] == 30


def test_gc_drops_chunk_hints_of_collected_objects(tmp_path: Path) -> None:
    """The chunk index is a hint, but it must not grow forever: gc drops entries whose object
    it collected, and keeps those of live objects."""
    b1, b2, _v1, _v2, ann = _two_versions(tmp_path)
    with Store.init(str(tmp_path / "s")) as st:
        x = st.import_chunked(str(b1))
        y = st.import_chunked(str(b2), ann)
        db = st.index.db[b"chunks"]

        def hints() -> int:
            with st.index.read() as txn:
                return sum(1 for k in txn.cursor(db=db).iternext(values=False) if len(k) == 32)

        before = hints()
        assert before >= 100
        assert st.gc().chunk_hints_dropped == 0  # everything still live
        st.remove(x.diff_id)
        g = st.gc()
        assert g.objects_freed >= 1 and g.chunk_hints_dropped > 0
        after = hints()
        assert 0 < after < before
        # what is left points at live objects only, and still serves a partial import
        with st.index.read() as txn:
            for k, v in txn.cursor(db=db):
                if len(k) == 32:
                    assert txn.get(bytes(v)[:32], db=st.index.db[b"objects"]) is not None
        st.remove(y.diff_id)
        st.gc()
        assert hints() == 0
        assert st.fsck().exit_code == 0
