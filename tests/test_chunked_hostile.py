"""Hostile zstd:chunked blobs: ``import_chunked`` must refuse them and leave the store as it was.

Blobs are made by ``chunkedblob.build`` (both variants: the older ``io.containers.*`` one with a
48-byte footer and no tar-split, the current ``io.github.containers.*`` one with a 72-byte footer
and a tar-split), honest or with one lie.  Every refusal must

* raise ``InvalidInputError`` (``ChunkedError`` where the chunked layer itself is at fault) with
  a message naming the problem;
* leave the store logically unchanged: same layers, same index records (objects, pins, chunk
  index), same files under ``objects/``, nothing left in staging, ``fsck`` clean;
* write nothing outside the store (everything else under ``tmp_path`` is compared).

Tests marked "Regression" reproduce bugs this file found (xfail'd in ee97a45, fixed in
7697137).
"""

from __future__ import annotations

import base64
import copy
import hashlib
import io
import json
import os
import random
import re
import resource
import stat
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zstandard
from chunkedblob import (
    VARIANTS,
    ChunkedBlob,
    build,
    dir_,
    hard,
    make_tar,
    reg,
    rewrite_footer,
    rle_bomb,
    sha,
    special,
    sym,
    zc,
)
from test_hostile import index_dump, object_files

from layerstore import InvalidInputError, Store, UnsafePathError
from layerstore.errors import ChunkedError
from layerstore.ops.partial import import_chunked
from layerstore.sources.base import FileSource

TRUST = ["annotations", "footer"]  # TOC located (and trusted) via annotations, or bare blob
# The big tables: the trust mode does not change what is checked after the TOC is read, so
# they run each variant once (the footer-only mode is covered by the smaller tests).
VARIANT_TRUST = [("old", "annotations"), ("new", "annotations")]


def data_of(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


MID = data_of(3000, 1)
BIG = data_of(40000, 2)
BIG_CHUNKS = {"d/big": [10000, 12000, 18000]}


def base_members() -> list:
    return [
        dir_("d"),
        reg("d/small", b"tiny\n"),
        reg("d/mid", MID),
        sym("d/link", "mid"),
        hard("d/hard", "d/mid"),
        reg("d/big", BIG),
        reg("e", b""),
    ]


def base(variant: str, **kw: Any) -> ChunkedBlob:
    return build(base_members(), variant, chunks=BIG_CHUNKS, **kw)


def entry(toc: dict[str, Any], name: str, typ: str | None = None) -> dict[str, Any]:
    (e,) = [e for e in toc["entries"] if e["name"] == name and (typ is None or e["type"] == typ)]
    return e


def chunk_entries(toc: dict[str, Any], name: str) -> list[dict[str, Any]]:
    return [e for e in toc["entries"] if e["name"] == name and e["type"] in ("reg", "chunk")]


# -- store state and the sandbox -------------------------------------------------------------
def staging_leftovers(store: Store) -> list[str]:
    out = []
    own = os.path.join(store.staging_dir, store.lease.id.hex())
    for dirpath, _dirnames, filenames in os.walk(store.staging_dir):
        rel = os.path.relpath(dirpath, store.staging_dir)
        out += [os.path.join(rel, f) for f in filenames]
        if rel != "." and dirpath != own:
            out.append(rel + "/")
    return out


def store_state(store: Store) -> dict[str, Any]:
    return {
        "layers": [li.to_json() for li in store.layers(include_deleted=True)],
        "stats": store.stats(),
        "index": index_dump(store),
        "objects": object_files(store),
    }


# fsck problems that are leftovers gc removes, not damage
GC_ABLE = {"stale-staging"}


def assert_fsck_clean(store: Store) -> None:
    report = store.fsck(full=True)
    bad = [p for p in report.problems if p.code not in GC_ABLE]
    assert not bad, [p.to_json() for p in bad]


class Env:
    """A store, an input directory, and everything else under tmp_path that must not change."""

    def __init__(self, tmp_path: Path, store: Store) -> None:
        self.root = tmp_path
        self.store = store
        self.inp = tmp_path / "in"
        self.inp.mkdir()
        self.outside = tmp_path / "outside"
        self.outside.mkdir()
        (tmp_path / "cwd").mkdir()
        self.n = 0

    def snapshot(self) -> dict[str, tuple[int, int, int]]:
        out = {}
        skip = str(self.root / "store")
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = [d for d in dirnames if os.path.join(dirpath, d) != skip]
            for n in dirnames + filenames:
                p = os.path.join(dirpath, n)
                st = os.lstat(p)
                out[os.path.relpath(p, self.root)] = (
                    stat.S_IFMT(st.st_mode),
                    st.st_size,
                    st.st_mtime_ns,
                )
        return out

    def write(self, blob: ChunkedBlob | bytes) -> Path:
        self.n += 1
        p = self.inp / f"blob{self.n}"
        p.write_bytes(blob if isinstance(blob, bytes) else blob.blob)
        return p

    def run(self, blob: ChunkedBlob | bytes, ann: dict[str, str] | None, **kw: Any) -> Any:
        p = self.write(blob)
        with FileSource(str(p)) as src:
            return import_chunked(self.store.repo, src, ann, **kw)

    def accept(self, blob: ChunkedBlob, trust: str = "annotations", **kw: Any) -> Any:
        return self.run(blob, blob.annotations if trust == "annotations" else None, **kw)

    def refuse(
        self,
        blob: ChunkedBlob | bytes,
        ann: dict[str, str] | None,
        match: str,
        exc: type[Exception] = InvalidInputError,
        **kw: Any,
    ) -> Exception:
        """The import must fail with ``exc`` matching ``match``, changing nothing."""
        p = self.write(blob)
        before, files_before = store_state(self.store), self.snapshot()
        try:
            with FileSource(str(p)) as src:
                res = import_chunked(self.store.repo, src, ann, **kw)
        except Exception as e:  # checked below, after the cleanliness checks
            err = e
        else:
            raise AssertionError(f"hostile blob accepted: {res.diff_id} {res.partial}")
        assert self.snapshot() == files_before, "something was written outside the store"
        assert os.listdir(self.outside) == []
        assert staging_leftovers(self.store) == []
        assert store_state(self.store) == before, "the refused import changed the store"
        assert_fsck_clean(self.store)
        assert isinstance(err, exc), f"expected {exc.__name__}, got {type(err).__name__}: {err}"
        assert re.search(match, str(err)), str(err)
        return err


@pytest.fixture
def env(tmp_path: Path, store: Store, monkeypatch: pytest.MonkeyPatch) -> Env:
    e = Env(tmp_path, store)
    monkeypatch.chdir(tmp_path / "cwd")
    return e


@pytest.fixture(scope="module")
def shared_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    """One store for the tests that only refuse: every refusal checks that it changed nothing,
    so sharing the store is as strict (and much cheaper than a store per case)."""
    tmp = tmp_path_factory.mktemp("chunked-hostile")
    st = Store.init(str(tmp / "store"))
    e = Env(tmp, st)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp / "cwd")
        yield e
    st.close()


def ann_for(b: ChunkedBlob, trust: str) -> dict[str, str] | None:
    return b.annotations if trust == "annotations" else None


def layer_files(store: Store, diff_id: str) -> dict[str, bytes]:
    """Regular file contents of a stored layer, read from its objects."""
    out = {}
    for e in store.entries(diff_id):
        if e.inline is not None or e.digest:
            if e.inline is not None and not e.digest:
                out[e.path] = bytes(e.inline)
            else:
                with open(store.object_path(e.digest), "rb") as f:
                    out[e.path] = f.read()
    return out


# == the builder itself ========================================================================
@pytest.mark.parametrize("variant", VARIANTS)
def test_builder_blob_is_plain_zstd_of_the_tar(variant):
    b = base(variant)
    reader = zstandard.ZstdDecompressor().stream_reader(b.blob, read_across_frames=True)
    assert reader.read() == b.tar
    # Footer, annotations and TOC agree with each other.
    off, clen, ulen, kind = map(int, b.annotations[b.prefix + "manifest-position"].split(":"))
    assert (off, clen, ulen, kind) == (b.toc_offset, len(b.toc_compressed), len(b.toc_json), 1)
    assert b.blob[off - 8 : off - 4] == b"\x50\x2a\x4d\x18"
    assert sha(b.blob[off : off + clen]) == b.annotations[b.prefix + "manifest-checksum"]
    assert (
        len(b.blob) - (b.tarsplit_offset + len(b.tarsplit_compressed))
        == (72 if variant == "new" else 0)
        or variant == "old"
    )
    assert b.blob.endswith(b"GNUlInUx" if variant == "new" else b"GnUlInUx")
    # Every file range decompresses to exactly its bytes; chunks to theirs.
    with tarfile.open(fileobj=io.BytesIO(b.tar)) as tf:
        members = {m.name: m for m in tf.getmembers()}
    for name, (a, z) in b.files.items():
        m = members[name]
        content = b.tar[m.offset_data : m.offset_data + m.size]
        got = zstandard.ZstdDecompressor().stream_reader(b.blob[a:z], read_across_frames=True)
        assert got.read() == content
    parts = chunk_entries(b.toc, "d/big")
    assert [p["type"] for p in parts] == ["reg", "chunk", "chunk"]
    assert [p["chunkSize"] for p in parts] == BIG_CHUNKS["d/big"]
    if variant == "new":
        # Replaying the tar-split over the contents reproduces the tar exactly.
        out = bytearray()
        for line in b.tarsplit_lines:
            if line["type"] == 2:
                out += base64.b64decode(line["payload"])
            elif line["size"]:
                m = members[line["name"]]
                out += b.tar[m.offset_data : m.offset_data + m.size]
        assert bytes(out) == b.tar
        assert b.toc["tarSplitDigest"] == sha(b.tarsplit_compressed)


@pytest.mark.parametrize("trust", TRUST)
@pytest.mark.parametrize("variant", VARIANTS)
def test_builder_honest_blob_imports(env, variant, trust):
    b = base(variant)
    res = env.accept(b, trust)
    assert res.diff_id == b.diff_id == "sha256:" + hashlib.sha256(b.tar).hexdigest()
    assert res.partial["variant"] == variant
    assert res.partial["toc_verified"] == (trust == "annotations")
    files = layer_files(env.store, res.diff_id)
    assert files["d/mid"] == MID and files["d/big"] == BIG and files["d/small"] == b"tiny\n"
    assert_fsck_clean(env.store)


@pytest.mark.parametrize("variant", VARIANTS)
def test_builder_second_layer_reuses_files_and_chunks(env, variant):
    env.accept(base(variant))
    big2 = BIG[:22000] + data_of(18000, 9)  # shares the first two chunks of d/big
    b2 = build(
        [dir_("d"), reg("d/mid", MID), reg("d/big", big2)],
        variant,
        chunks={"d/big": [10000, 12000, 18000]},
    )
    res = env.accept(b2)
    assert res.diff_id == b2.diff_id
    p = res.partial
    assert p["files_reused"] == 1 and p["files_assembled"] == 1 and p["chunks_reused"] == 2
    assert p["bytes_read"] < len(b2.blob) // 2
    assert layer_files(env.store, res.diff_id)["d/big"] == big2
    assert_fsck_clean(env.store)


# == the TOC's trust root ======================================================================
@pytest.mark.parametrize("variant", VARIANTS)
def test_toc_checksum_annotation_wrong(shared_env, variant):
    b = base(variant)
    ann = dict(b.annotations)
    ann[b.prefix + "manifest-checksum"] = sha(b"something else")
    shared_env.refuse(b, ann, r"TOC's sha256 does not match", ChunkedError)


@pytest.mark.parametrize("variant", VARIANTS)
def test_toc_tampered_checksum_not_updated(shared_env, variant):
    def lie(toc):
        entry(toc, "d/mid")["digest"] = sha(b"x" * 3000)

    b = base(variant, toc_hook=lie, stale_toc_checksum=True)
    shared_env.refuse(b, b.annotations, r"TOC's sha256 does not match", ChunkedError)


@pytest.mark.parametrize("trust", TRUST)
@pytest.mark.parametrize("variant", VARIANTS)
def test_toc_bytes_altered_in_blob(shared_env, variant, trust):
    b = base(variant)
    pos = b.toc_offset + len(b.toc_compressed) // 2
    bad = bytearray(b.blob)
    bad[pos] ^= 0x55
    match = (
        r"TOC's sha256 does not match"
        if trust == "annotations"
        else r"TOC does not decompress|TOC is not valid JSON|TOC decompresses to"
    )
    shared_env.refuse(bytes(bad), ann_for(b, trust), match, ChunkedError)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(
    "how, match",
    [
        ("trailing", r"not valid JSON"),
        ("dupkey", r"repeats the key"),
        ("version", r"unsupported zstd:chunked TOC version"),
        ("not-object", r"not an object with an 'entries' list"),
        ("bad-digest", r"is not sha256"),
        ("bad-type", r"bad type"),
    ],
)
def test_toc_malformed_json(shared_env, variant, how, match):
    def j(raw: bytes) -> bytes:
        if how == "trailing":
            return raw + b' {"x":1}'
        if how == "dupkey":
            return raw.replace(b'{"version":1,', b'{"version":1,"version":1,', 1)
        doc = json.loads(raw)
        if how == "version":
            doc["version"] = 2
        elif how == "not-object":
            doc = doc["entries"]
        elif how == "bad-digest":
            entry(doc, "d/mid")["digest"] = "sha256:" + "A" * 64
        elif how == "bad-type":
            entry(doc, "d")["type"] = "socket"
        return json.dumps(doc).encode()

    b = base(variant, toc_json_hook=j)
    shared_env.refuse(b, b.annotations, match, ChunkedError)


# == files that lie ============================================================================
# a file's content or one of its chunks differs from its TOC digest
LIE = r"does not match (the sha256 the TOC gives|its chunkDigest)"


def _flip_payload(target: str, index: int = 0) -> Callable[[str, int, bytes], bytes]:
    def hook(name: str, i: int, data: bytes) -> bytes:
        if name == target and i == index:
            return data[:-1] + bytes([data[-1] ^ 1])
        return data

    return hook


@pytest.mark.parametrize("trust", TRUST)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("target, index", [("d/mid", 0), ("d/big", 1)])
def test_file_digest_lies(shared_env, variant, trust, target, index):
    """The frames hold other bytes than the TOC's sha256 describes (the same length)."""
    b = base(variant, payload_hook=_flip_payload(target, index))
    shared_env.refuse(b, ann_for(b, trust), LIE, ChunkedError)


def _prior_sharing_chunks(env: Env, variant: str) -> None:
    """A stored layer sharing d/big's first two chunks (not the whole file): d/big is then
    assembled from two reused chunks and one fetched."""
    prior = BIG[:22000] + data_of(18000, 9)
    env.accept(build([reg("old/big", prior)], variant, chunks={"old/big": BIG_CHUNKS["d/big"]}))


@pytest.mark.parametrize("variant", VARIANTS)
def test_fetched_chunk_lies_while_others_are_reused(env, variant):
    """A file assembled from reused chunks: the one fetched chunk differs from its chunkDigest."""
    _prior_sharing_chunks(env, variant)
    b = base(variant, payload_hook=_flip_payload("d/big", 2))
    env.refuse(b, b.annotations, r"does not match its chunkDigest", ChunkedError)


@pytest.mark.parametrize("variant", VARIANTS)
def test_fetched_chunk_falsely_claims_zeros(env, variant):
    """An assembled file whose missing chunk the TOC calls a hole (chunkType "zeros"): the hole
    is not what the file's sha256 says."""
    _prior_sharing_chunks(env, variant)
    b = base(variant, toc_hook=lambda toc: chunk_entries(toc, "d/big")[2].update(chunkType="zeros"))
    env.refuse(b, b.annotations, LIE, ChunkedError)


@pytest.mark.parametrize("variant", VARIANTS)
def test_reused_chunk_index_entry_is_checked(env, variant):
    """Sanity of the assemble path the two tests above rely on."""
    _prior_sharing_chunks(env, variant)
    res = env.accept(base(variant))
    assert res.partial["files_assembled"] == 1 and res.partial["chunks_reused"] == 2


@pytest.mark.parametrize("variant", VARIANTS)
def test_lying_digest_of_stored_content_never_stores_the_blob_bytes(env, variant):
    """The TOC claims file ``x`` has the sha256 of content the store already holds (same size);
    the blob's frames hold something else.  The import may reuse the stored object -- it is the
    content the TOC vouches for -- but the blob's unverified bytes must never reach the layer,
    and the layer must not claim the DiffID of the tar the blob really holds."""
    secret = data_of(3000, 7)
    env.accept(build([reg("stored", secret)], variant))
    evil = data_of(3000, 8)

    def lie(toc):
        entry(toc, "x")["digest"] = sha(secret)

    b = build([reg("x", evil)], variant, toc_hook=lie)
    res = env.accept(b)
    assert res.partial["files_reused"] == 1
    files = layer_files(env.store, res.diff_id)
    assert files == {"x": secret}
    assert evil not in [
        open(env.store.object_path(bytes.fromhex(o.split("/")[1])), "rb").read()
        for o in object_files(env.store)
    ]
    assert res.diff_id != b.diff_id  # not the blob's tar ...
    assert res.diff_id == sha(make_tar([reg("x", secret)]))  # ... but the tar it vouches for
    assert_fsck_clean(env.store)


# Regression (found by this file, fixed in 7697137): expected_diff_id is compared only after
# run_import() committed the layer; the refused import leaves a standalone layer (and its objects)
# in the store
@pytest.mark.parametrize("variant", VARIANTS)
def test_lying_digest_of_stored_content_with_expected_diff_id(env, variant):
    secret = data_of(3000, 7)
    env.accept(build([reg("stored", secret)], variant))

    def lie(toc):
        entry(toc, "x")["digest"] = sha(secret)

    b = build([reg("x", data_of(3000, 8))], variant, toc_hook=lie)
    env.refuse(b, b.annotations, r"DiffID", expected_diff_id=b.diff_id)


# Regression (found by this file, fixed in 7697137): partial._plan reuses a stored object by the
# TOC's sha256 without checking its size against the TOC size; a TOC naming the digest of a stored
# object of another size makes the import fail with CorruptObjectError ('stored object ... run
# layerstore fsck', exit code 5) blaming a healthy store instead of refusing the blob
# (InvalidInputError)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("delta", [-1000, +1000])
def test_lying_digest_of_stored_content_other_size(env, variant, delta):
    stored = data_of(3000, 7)
    env.accept(build([reg("stored", stored)], variant))

    def lie(toc):
        entry(toc, "x")["digest"] = sha(stored)

    b = build([reg("x", data_of(3000 + delta, 8))], variant, toc_hook=lie)
    env.refuse(b, b.annotations, r"the TOC lies", ChunkedError)


# Regression (found by this file, fixed in 7697137): record_chunks() indexes the chunkDigests of a
# file that was fetched whole (or reused whole) without ever verifying them; a blob with one lying
# chunkDigest poisons the chunk index, and a later *honest* blob with a chunk of that digest fails
# with CorruptObjectError ('does not hold the chunk the index says ... run fsck'); fsck does not
# check the chunk index, so the poison stays until the poisoning layer is removed
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("f_is", ["fetched", "reused-whole"])
def test_lying_chunk_digest_does_not_poison_the_chunk_index(env, variant, f_is):
    """A TOC whose file digest is true but one chunkDigest lies (names another chunk of the
    same size) is refused, whether the file is fetched or reused whole; a later honest blob
    with a chunk of that digest imports."""
    victim_chunk = data_of(1000, 11)
    f = data_of(3000, 12)
    if f_is == "reused-whole":
        env.accept(build([reg("stored/f", f)], variant))

    def lie(toc):
        chunk_entries(toc, "f")[1]["chunkDigest"] = sha(victim_chunk)

    b = build([reg("f", f)], variant, chunks={"f": [2000, 1000]}, toc_hook=lie)
    env.refuse(b, b.annotations, r"chunk 1 of 'f' does not match its chunkDigest", ChunkedError)
    honest = build(
        [reg("g", data_of(2000, 13) + victim_chunk)], variant, chunks={"g": [2000, 1000]}
    )
    res = env.accept(honest)
    assert res.diff_id == honest.diff_id
    assert layer_files(env.store, res.diff_id)["g"].endswith(victim_chunk)
    assert_fsck_clean(env.store)


# == ranges ====================================================================================
def _toc_edit(fn: Callable[[dict[str, Any], ChunkedBlob], None]) -> Callable[[str], ChunkedBlob]:
    """A blob whose TOC is edited with knowledge of the honest blob's layout."""

    def make(variant: str) -> ChunkedBlob:
        honest = base(variant)
        return base(variant, toc_hook=lambda toc: fn(toc, honest))

    return make


def _set(name: str, typ: str | None = None, **kv: Any) -> Callable[[dict, ChunkedBlob], None]:
    def fn(toc: dict[str, Any], b: ChunkedBlob) -> None:
        e = entry(toc, name, typ)
        for k, v in kv.items():
            e[k] = v(b) if callable(v) else v

    return fn


def _chunk_set(i: int, **kv: Any) -> Callable[[dict, ChunkedBlob], None]:
    def fn(toc: dict[str, Any], b: ChunkedBlob) -> None:
        e = chunk_entries(toc, "d/big")[i]
        for k, v in kv.items():
            e[k] = v(b, e) if callable(v) else v

    return fn


RANGE_CASES = {
    "overlap-next-file": (
        _set("d/mid", endOffset=lambda b: b.files["d/big"][0] + 5),
        r"overlaps another file",
    ),
    "overlap-previous-file": (
        _set("d/big", "reg", offset=lambda b: b.files["d/mid"][1] - 5),
        r"overlaps another file|chunk 0 blob range",
    ),
    "same-range-twice": (
        _set("d/big", "reg", offset=lambda b: b.files["d/mid"][0]),
        r"overlaps another file|chunk 0 blob range",
    ),
    "empty-range": (_set("d/mid", endOffset=lambda b: b.files["d/mid"][0]), r"overlaps"),
    "past-blob-end": (
        _set("d/mid", offset=10**9, endOffset=10**9 + 100),
        r"outside the payload area",
    ),
    "into-the-toc": (
        _set("d/big", "reg", endOffset=lambda b: b.toc_offset + 10),
        r"outside the payload area",
    ),
    "negative-offset": (_set("d/mid", offset=-1), r"not an integer in range"),
    "float-size": (_set("d/mid", size=3000.0), r"not an integer in range"),
    "chunks-short": (_chunk_set(2, chunkSize=17000), r"chunks add up to 39000 bytes"),
    "chunks-long": (_chunk_set(2, chunkSize=19000), r"chunks add up to 41000 bytes"),
    "chunk-gap": (_chunk_set(1, chunkOffset=10001), r"do not tile"),
    "chunk-overlap": (_chunk_set(2, chunkOffset=21000), r"do not tile"),
    "first-chunk-not-at-0": (_chunk_set(0, chunkOffset=5), r"first chunk not at 0"),
    "chunk-zero-size": (_chunk_set(1, chunkSize=0), r"chunk 1 has size 0"),
    "chunk-frames-reversed": (
        _chunk_set(1, offset=lambda b, e: e["offset"] + 100_000),
        r"chunk \d blob range is invalid",
    ),
    "chunk-frame-before-file": (
        _chunk_set(1, offset=lambda b, e: b.files["d/mid"][0]),
        r"chunk \d blob range is invalid",
    ),
    "chunk-of-another-file": (_chunk_set(1, name="d/mid"), r"does not follow its file"),
    "chunk-bad-type": (_chunk_set(1, chunkType="hole"), r"unknown chunkType"),
    "chunk-bad-digest": (_chunk_set(1, chunkDigest="sha256:00"), r"chunkDigest"),
    "range-misses-frame-start": (
        _set("d/mid", offset=lambda b: b.files["d/mid"][0] + 3),
        r"do not decompress|fewer bytes|tar headers",
    ),
    "range-swallows-header-frame": (
        _set("d/big", "reg", offset=lambda b: b.files["d/mid"][1]),
        r"chunk 0 blob range|more bytes|do not decompress|chunkDigest",
    ),
}


@pytest.mark.parametrize("variant, trust", VARIANT_TRUST)
@pytest.mark.parametrize("case", list(RANGE_CASES))
def test_bad_ranges_and_chunks(shared_env, variant, trust, case):
    fn, match = RANGE_CASES[case]
    b = _toc_edit(fn)(variant)
    shared_env.refuse(b, ann_for(b, trust), match, ChunkedError)


# == names ======================================================================================
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", ["../x", "d/../../x", "a/../b", "./../x"])
def test_name_escaping_the_root(shared_env, variant, name):
    b = build([dir_("d"), reg(name, data_of(500, 3))], variant)
    shared_env.refuse(b, b.annotations, r"'\.\.'", UnsafePathError)


@pytest.mark.parametrize("variant", VARIANTS)
def test_toc_name_escapes_while_tar_name_does_not(shared_env, variant):
    b = build(
        [dir_("d"), reg("x", data_of(500, 3))],
        variant,
        toc_hook=lambda toc: entry(toc, "x").update(name="d/../../x"),
    )
    shared_env.refuse(b, b.annotations, r"'\.\.'", UnsafePathError)


@pytest.mark.parametrize("variant", VARIANTS)
def test_toc_name_with_nul(shared_env, variant):
    b = build(
        [reg("x", data_of(500, 3))],
        variant,
        toc_hook=lambda toc: entry(toc, "x").update(name="x\0/../../etc/passwd"),
    )
    shared_env.refuse(b, b.annotations, r"NUL", UnsafePathError)


@pytest.mark.parametrize("variant", VARIANTS)
def test_absolute_names_are_normalized_into_the_layer(env, variant, tmp_path):
    """paths.py: a leading '/' is dropped (like GNU tar); the entry stays inside the layer."""
    outside = tmp_path / "outside" / "abs"
    b = build([reg(str(outside), data_of(500, 3)), reg("/etc/pw", b"root\n")], variant)
    before = {p: os.lstat(p).st_mtime_ns for p in ("/etc",)}
    res = env.accept(b)
    paths = {e.path for e in env.store.entries(res.diff_id)}
    assert str(outside).lstrip("/") in paths and "etc/pw" in paths
    assert os.listdir(tmp_path / "outside") == []
    assert not os.path.exists("/etc/pw")
    assert before == {p: os.lstat(p).st_mtime_ns for p in ("/etc",)}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dup", ["d/mid", "./d/mid", "d//mid", "/d/mid"])
def test_toc_duplicate_names(shared_env, variant, dup):
    def add(toc):
        e = copy.deepcopy(entry(toc, "d/small"))
        e["name"] = dup
        toc["entries"].append(e)

    b = base(variant, toc_hook=add)
    shared_env.refuse(b, b.annotations, r"names .* twice", ChunkedError)


@pytest.mark.parametrize("variant", VARIANTS)
def test_tar_with_a_name_twice(shared_env, variant):
    b = build([reg("x", data_of(500, 3)), reg("x", data_of(600, 4))], variant)
    shared_env.refuse(b, b.annotations, r"names 'x' twice", ChunkedError)


@pytest.mark.parametrize("variant", VARIANTS)
def test_write_through_symlink(shared_env, variant):
    b = build([sym("s", str(shared_env.outside)), reg("s/evil", data_of(500, 3))], variant)
    shared_env.refuse(b, b.annotations, r"through non-directory", UnsafePathError)


# == the TOC against the tar ===================================================================
def _drop(name: str) -> Callable[[dict[str, Any]], None]:
    def fn(toc: dict[str, Any]) -> None:
        toc["entries"] = [e for e in toc["entries"] if e["name"] != name]

    return fn


def _append(e: dict[str, Any]) -> Callable[[dict[str, Any]], None]:
    return lambda toc: toc["entries"].append(dict(e))


def _mod(target: str, **kv: Any) -> Callable[[dict[str, Any]], None]:
    return lambda toc: entry(toc, target, "reg" if target == "d/big" else None).update(kv)


DISAGREE = r"disagrees with its TOC entry|not the TOC's next file|disagree on the size"
TOC_VS_TAR = {
    "size": (_mod("d/mid", size=2999), DISAGREE + r"|frames hold more"),
    "size-of-empty": (_mod("e", size=1), r"does not match|not sha256|disagrees"),
    "mode": (_mod("d/mid", mode=0o4755), r"mode/owner"),
    "uid": (_mod("d/mid", uid=1000), r"mode/owner"),
    "gid": (_mod("d", gid=7), r"mode/owner"),
    "mtime": (_mod("d/small", modtime="2001-01-01T00:00:00Z"), r"mtime"),
    "mtime-garbage": (_mod("d/small", modtime="yesterday"), r"not RFC 3339"),
    "name-of-empty-file": (_mod("e", name="f"), r"name 'f'"),
    "name-of-dir": (_mod("d", name="D"), r"name 'D'|not in the TOC"),
    "name-of-file": (_mod("d/mid", name="d/MID"), DISAGREE),
    "type-symlink-as-hardlink": (_mod("d/link", type="hardlink"), r"type hardlink"),
    "type-dir-as-fifo": (_mod("d", type="fifo"), r"type fifo"),
    "type-empty-reg-as-dir": (_mod("e", type="dir"), r"type dir"),
    "symlink-target": (_mod("d/link", linkName="/etc/shadow"), r"link target"),
    "hardlink-target": (_mod("d/hard", linkName="d/small"), r"link target"),
    "xattr-the-tar-lacks": (_mod("d/mid", xattrs={"user.x": "eA=="}), r"xattr user\.x"),
    "xattr-not-base64": (_mod("d/mid", xattrs={"user.x": "!!"}), r"not base64"),
    "missing-first": (_drop("d"), r"disagrees|not in the TOC"),
    "missing-middle": (_drop("d/link"), r"disagrees|not in the TOC"),
    "missing-last": (_drop("e"), r"tar entry 'e' is not in the TOC"),
    "missing-file-with-content": (_drop("d/small"), DISAGREE + r"|not in the TOC"),
    "extra-last": (_append({"type": "reg", "name": "zzz"}), r"1 entries the tar lacks"),
    "extra-dir": (_append({"type": "dir", "name": "zdir", "mode": 0o755}), r"entries the tar"),
}


@pytest.mark.parametrize("variant, trust", VARIANT_TRUST)
@pytest.mark.parametrize("case", list(TOC_VS_TAR))
def test_toc_disagrees_with_tar(shared_env, variant, trust, case):
    hook, match = TOC_VS_TAR[case]
    b = base(variant, toc_hook=hook)
    shared_env.refuse(b, ann_for(b, trust), match, ChunkedError)


@pytest.mark.parametrize("variant", VARIANTS)
def test_device_numbers_disagree(env, variant):
    members = [special("dev/null", tarfile.CHRTYPE, devmajor=1, devminor=3)]
    assert env.accept(build(members, variant)).entries == 1
    b = build(
        [special("dev/zero", tarfile.CHRTYPE, devmajor=1, devminor=5)],
        variant,
        toc_hook=lambda toc: entry(toc, "dev/zero").update(devMinor=3),
    )
    env.refuse(b, b.annotations, r"device numbers", ChunkedError)


@pytest.mark.parametrize("variant", VARIANTS)
def test_xattr_value_disagrees(shared_env, variant):
    x = {"SCHILY.xattr.user.note": "hello"}
    b = build(
        [reg("f", data_of(300, 5), pax_headers=x)],
        variant,
        toc_hook=lambda toc: entry(toc, "f")["xattrs"].update({"user.note": "aGVsbG8h"}),
    )
    shared_env.refuse(b, b.annotations, r"xattr user\.note", ChunkedError)


# == header frames of the older variant (the tar headers are not covered by any digest) ==========
def _replace_header(honest_tar: bytes, name: str, evil: tarfile.TarInfo) -> Callable:
    """A gap_hook replacing ``name``'s header bytes (PAX record included) in its gap frame."""
    with tarfile.open(fileobj=io.BytesIO(honest_tar)) as tf:
        m = tf.getmember(name)
    evil_tar = make_tar([(evil, b"\0" * evil.size)])
    with tarfile.open(fileobj=io.BytesIO(evil_tar)) as tf:
        evil_hdr = evil_tar[: tf.getmembers()[0].offset_data]

    def hook(i: int, raw: bytes) -> bytes:
        # Gap i ends with the header of the i-th file with content; find ours by its bytes.
        hdr = honest_tar[m.offset : m.offset_data]
        if raw.endswith(hdr):
            return zc(raw[: len(raw) - len(hdr)] + evil_hdr)
        return zc(raw)

    return hook


@pytest.mark.parametrize("trust", TRUST)
def test_old_header_frame_corrupt(shared_env, trust):
    b = base("old", gap_hook=lambda i, raw: zc(raw)[:-6] + b"\xff" * 6 if i == 1 else zc(raw))
    shared_env.refuse(b, ann_for(b, trust), r"tar headers\) are corrupt|checksum", ChunkedError)


@pytest.mark.parametrize("trust", TRUST)
def test_old_header_frame_size_disagrees(shared_env, trust):
    honest = base("old")
    evil, _ = reg("d/mid", b"\0" * 2000)
    b = base("old", gap_hook=_replace_header(honest.tar, "d/mid", evil))
    shared_env.refuse(
        b, ann_for(b, trust), r"disagrees with its TOC entry \(size 3000\)", ChunkedError
    )


def _sparse_blob() -> tuple[ChunkedBlob, bytes]:
    x = b"#!/bin/sh\necho hello\n" * 5
    honest_content = x + bytes(2048)
    members = [dir_("d"), reg("d/a", honest_content, mode=0o755)]
    honest = build(members, "old")
    evil, _ = reg("d/a", x, mode=0o755)
    evil.pax_headers = {
        "GNU.sparse.major": "0",
        "GNU.sparse.minor": "1",
        "GNU.sparse.map": f"1000,{len(x)}",
        "GNU.sparse.realsize": str(len(honest_content)),
    }
    return build(members, "old", gap_hook=_replace_header(honest.tar, "d/a", evil)), honest_content


# Regression (found by this file, fixed in 7697137): check_member compares the TOC size with the
# member's *logical* size and the sha256 check covers the payload *stream*; a PAX sparse header
# (GNU.sparse 0.1) in the older variant's header frames makes the verified payload be read as a
# sparse file, so the stored file is not the content whose sha256 the TOC gives (here: the script
# shifted behind 1000 zero bytes) and the import succeeds
def test_old_header_frame_injects_sparse_map(shared_env):
    b, _honest_content = _sparse_blob()
    shared_env.refuse(b, b.annotations, r"sparse", ChunkedError)


# Regression (found by this file, fixed in 7697137): check_member only checks the xattrs the TOC
# lists: a tar member carrying an xattr its TOC entry lacks (here security.capability, injected in
# the older variant's header frames, which no digest covers) is accepted into the layer
def test_old_header_frame_injects_xattr(shared_env):
    cap = "\x01\x00\x00\x02\xff\xff\xff\xff\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"
    members = [reg("bin/tool", data_of(400, 6), mode=0o755)]
    honest = build(members, "old")
    evil, _ = reg("bin/tool", b"\0" * 400, mode=0o755)
    evil.pax_headers = {"SCHILY.xattr.security.capability": cap}
    b = build(members, "old", gap_hook=_replace_header(honest.tar, "bin/tool", evil))
    # The TOC is the honest one apart from offsets (the forged header frame is longer; a
    # man in the middle facing a verified TOC must also make it fit the original gap).
    assert [e.get("xattrs") for e in b.toc["entries"]] == [None]
    shared_env.refuse(b, b.annotations, r"xattr", ChunkedError)


@pytest.mark.parametrize("where", ["last-gap", "middle-gap"])
def test_old_header_gap_is_a_zstd_bomb(shared_env, where):
    """The gaps between payloads are read in the older variant: a bomb must be cut off."""
    target = 2 if where == "last-gap" else 0

    def hook(i: int, raw: bytes) -> bytes:
        return zc(raw) + rle_bomb(1 << 30) if i == target else zc(raw)

    b = base("old", gap_hook=hook)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Zeros read as the end of the archive, so the bound on what may follow it (MAX_TRAILING)
    # is what usually stops them, before the gap's own expansion cap.
    shared_env.refuse(
        b,
        b.annotations,
        r"expand implausibly|entries the tar lacks|after its end-of-archive block",
        InvalidInputError,
    )
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 200 << 10  # KiB


def test_new_header_gaps_are_never_read(env):
    """The current variant replays the (digest-covered) tar-split: a bomb or garbage in the
    header frames costs nothing and does not change the layer."""
    b = base("new", gap_hook=lambda i, raw: rle_bomb(1 << 30) if i == 1 else zc(raw))
    res = env.accept(b)
    assert res.diff_id == b.diff_id
    assert res.partial["bytes_read"] < len(b.blob)


# == tar-split (current variant) ===============================================================
def _ts_file(lines: list[dict[str, Any]], name: str) -> dict[str, Any]:
    (line,) = [x for x in lines if x["type"] == 1 and x["name"] == name]
    return line


def _ts_header_of(name: str, fn: Callable[[tarfile.TarInfo], None]) -> Callable:
    """Rewrite the raw header bytes that precede ``name``'s file record."""

    def hook(lines: list[dict[str, Any]]) -> None:
        i = lines.index(_ts_file(lines, name))
        raw = base64.b64decode(lines[i - 1]["payload"])
        # The raw segment ends with the member's (PAX + ustar) header; re-make it.
        ti = tarfile.TarInfo(name)
        ti.size, ti.mode, ti.mtime = len(MID), 0o644, 1_700_000_000
        fn(ti)
        new = ti.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
        old = tarfile.TarInfo(name)
        old.size, old.mode, old.mtime = len(MID), 0o644, 1_700_000_000
        old_hdr = old.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
        assert raw.endswith(old_hdr)
        lines[i - 1]["payload"] = base64.b64encode(raw[: -len(old_hdr)] + new).decode()

    return hook


TARSPLIT_CASES = {
    "file-name": (lambda ls: _ts_file(ls, "d/mid").update(name="d/other"), r"not the TOC's next"),
    "file-size": (lambda ls: _ts_file(ls, "d/mid").update(size=2000), r"disagree on the size"),
    "file-dropped": (lambda ls: ls.remove(_ts_file(ls, "d/big")), r"TOC lists files|tar lacks"),
    "header-mode": (_ts_header_of("d/mid", lambda ti: setattr(ti, "mode", 0o6777)), r"mode"),
    "header-size": (
        _ts_header_of("d/mid", lambda ti: setattr(ti, "size", 2000)),
        r"disagrees with its TOC entry \(size 3000\)",
    ),
    "header-name": (
        _ts_header_of("d/mid", lambda ti: setattr(ti, "name", "d/evil")),
        r"disagrees with its TOC entry \(name",
    ),
    "not-json": (lambda ls: ls.insert(1, "{"), r"not JSON|not an object"),
    "unknown-type": (lambda ls: ls.insert(1, {"type": 3, "position": 1}), r"unknown type 3"),
    "bad-payload": (lambda ls: ls[0].update(payload="%%%"), r"payload is not base64"),
    "dup-key": (lambda ls: ls.insert(1, '{"type":2,"type":2}'), r"repeats the key"),
    "raw-bytes-dropped": (lambda ls: ls.pop(0), r"disagrees with its TOC entry"),
}


@pytest.mark.parametrize("trust", TRUST)
@pytest.mark.parametrize("case", list(TARSPLIT_CASES))
def test_tarsplit_disagrees_with_toc(shared_env, trust, case):
    """A tar-split consistent with its digest (the TOC covers it) that disagrees with the TOC."""
    hook, match = TARSPLIT_CASES[case]

    b = base("new", tarsplit_hook=hook)
    shared_env.refuse(b, ann_for(b, trust), match, InvalidInputError)


@pytest.mark.parametrize("trust", TRUST)
def test_tarsplit_digest_mismatch(shared_env, trust):
    b = base(
        "new",
        tarsplit_hook=lambda ls: _ts_file(ls, "d/mid").update(name="d/mid2"),
        stale_tarsplit_digest=True,
    )
    shared_env.refuse(b, ann_for(b, trust), r"tar-split's sha256 does not match", ChunkedError)


@pytest.mark.parametrize("trust", TRUST)
def test_tarsplit_bytes_altered_in_blob(shared_env, trust):
    b = base("new")
    bad = bytearray(b.blob)
    bad[b.tarsplit_offset + 20] ^= 0x40
    shared_env.refuse(
        bytes(bad), ann_for(b, trust), r"tar-split's sha256 does not match", ChunkedError
    )


def test_toc_names_tarsplit_but_no_position(shared_env):
    b = base("new")
    ann = {k.replace(b.prefix, "io.containers.zstd-chunked."): v for k, v in b.annotations.items()}
    del ann["io.containers.zstd-chunked.tarsplit-position"]
    shared_env.refuse(b, ann, r"no tar-split position", ChunkedError)


def test_tarsplit_bomb_past_announced_length(shared_env):
    b = base("new")
    ann = dict(b.annotations)
    off, clen, ulen = b.annotations[b.prefix + "tarsplit-position"].split(":")
    ann[b.prefix + "tarsplit-position"] = f"{off}:{clen}:{int(ulen) - 1}"
    shared_env.refuse(b, ann, r"tar-split decompresses to \d+ bytes, not the", ChunkedError)


# == oversized and bomb TOCs ===================================================================
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("field", ["ulength", "length"])
def test_toc_over_the_size_cap_annotation(shared_env, variant, field):
    b = base(variant)
    ann = dict(b.annotations)
    off, clen, ulen, _ = b.annotations[b.prefix + "manifest-position"].split(":")
    if field == "ulength":
        ulen = str(151 << 20)
        ann[b.prefix + "manifest-position"] = f"{off}:{clen}:{ulen}:1"
        shared_env.refuse(b, ann, r"over the 150 MiB limit", ChunkedError)
    else:  # a compressed length that large cannot lie inside this blob
        ann[b.prefix + "manifest-position"] = f"{off}:{151 << 20}:{ulen}:1"
        shared_env.refuse(b, ann, r"outside the \d+-byte blob|150 MiB", ChunkedError)


@pytest.mark.parametrize("variant", VARIANTS)
def test_toc_over_the_size_cap_footer(shared_env, variant):
    b = base(variant)
    shared_env.refuse(
        rewrite_footer(b.blob, toc_ulength=151 << 20), None, r"over the 150 MiB limit", ChunkedError
    )


@pytest.mark.parametrize("trust", TRUST)
@pytest.mark.parametrize("variant", VARIANTS)
def test_toc_bomb_bigger_than_announced(shared_env, variant, trust):
    """The TOC frame expands to 4 GiB; it announces 2 KiB.  Only announced+1 bytes are read."""
    b = base(variant, toc_json_hook=lambda raw: raw)
    bomb = rle_bomb(4 << 30, ord(" "))
    blob = b.blob[: b.toc_offset - 8] + b"\x50\x2a\x4d\x18" + len(bomb).to_bytes(4, "little")
    toc_offset = len(blob)
    blob += bomb
    ts_offset = 0
    if variant == "new":
        ts_offset = len(blob) + 8
        blob += b.blob[b.tarsplit_offset - 8 : b.tarsplit_offset + len(b.tarsplit_compressed)]
        tail = rewrite_footer(
            b.blob,
            toc_offset=toc_offset,
            toc_length=len(bomb),
            toc_ulength=2048,
            ts_offset=ts_offset,
        )[-72:]
    else:
        tail = rewrite_footer(
            b.blob, toc_offset=toc_offset, toc_length=len(bomb), toc_ulength=2048
        )[-48:]
    blob += tail
    ann = {
        b.prefix + "manifest-checksum": sha(bomb),
        b.prefix + "manifest-position": f"{toc_offset}:{len(bomb)}:2048:1",
    }
    if variant == "new":
        ann[b.prefix + "tarsplit-position"] = b.annotations[b.prefix + "tarsplit-position"].replace(
            str(b.tarsplit_offset), str(ts_offset), 1
        )
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    shared_env.refuse(
        blob,
        ann if trust == "annotations" else None,
        r"TOC decompresses to 2049 bytes",
        ChunkedError,
    )
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 200 << 10  # KiB


@pytest.mark.parametrize("variant", VARIANTS)
def test_toc_shorter_than_announced(shared_env, variant):
    b = base(variant)
    ann = dict(b.annotations)
    off, clen, ulen, _ = ann[b.prefix + "manifest-position"].split(":")
    ann[b.prefix + "manifest-position"] = f"{off}:{clen}:{int(ulen) + 10}:1"
    shared_env.refuse(b, ann, r"TOC decompresses to \d+ bytes, not the", ChunkedError)


# == footers and truncation ======================================================================
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("cut", ["footer", "half-footer", "into-toc", "half-blob", "all"])
def test_truncated_blob_without_annotations(shared_env, variant, cut):
    b = base(variant)
    n = 72 if variant == "new" else 48
    keep = {
        "footer": len(b.blob) - n,
        "half-footer": len(b.blob) - n // 2,
        "into-toc": b.toc_offset + 5,
        "half-blob": len(b.blob) // 2,
        "all": 0,
    }[cut]
    shared_env.refuse(b.blob[:keep], None, r"no zstd:chunked footer|too small", ChunkedError)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("cut", ["into-toc", "half-blob", "all"])
def test_truncated_blob_with_annotations(shared_env, variant, cut):
    b = base(variant)
    keep = {"into-toc": b.toc_offset + 5, "half-blob": len(b.blob) // 2, "all": 0}[cut]
    shared_env.refuse(b.blob[:keep], b.annotations, r"outside the \d+-byte blob", ChunkedError)


@pytest.mark.parametrize("variant", VARIANTS)
def test_footer_not_needed_with_annotations(env, variant):
    """The annotations are the trust root; a blob without its footer still imports."""
    b = base(variant)
    n = 72 if variant == "new" else 48
    res = env.run(b.blob[:-n], b.annotations)
    assert res.diff_id == b.diff_id


FOOTER_CASES = {
    "magic-lowercase": ({"magic": b"gnulinux"}, r"no zstd:chunked footer"),
    "magic-zeros": ({"magic": bytes(8)}, r"no zstd:chunked footer"),
    "frame-length": ({"frame_len": 12}, r"not a \d+-byte skippable frame"),
    "manifest-type": ({"kind": 2}, r"unknown zstd:chunked manifest type 2"),
    "toc-past-end": ({"toc_offset": 10**9}, r"outside the \d+-byte blob"),
    "toc-offset-zero": ({"toc_offset": 0}, r"outside the \d+-byte blob"),
    "toc-length-zero": ({"toc_length": 0}, r"outside the \d+-byte blob"),
    "toc-offset-huge": ({"toc_offset": (1 << 64) - 1}, r"outside the \d+-byte blob"),
    "toc-ulength-wrong": ({"toc_ulength": 5}, r"TOC decompresses to 6 bytes"),
    "toc-shifted": (
        {"toc_offset": lambda b: b.toc_offset + 1},
        r"outside|TOC does not decompress|not valid JSON",
    ),
}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", list(FOOTER_CASES))
def test_bad_footer(shared_env, variant, case):
    changes, match = FOOTER_CASES[case]
    b = base(variant)
    changes = {k: v(b) if callable(v) else v for k, v in changes.items()}
    shared_env.refuse(rewrite_footer(b.blob, **changes), None, match, ChunkedError)


@pytest.mark.parametrize("case", ["ts-past-end", "ts-overlaps-toc", "ts-over-cap"])
def test_bad_footer_tarsplit_position(shared_env, case):
    b = base("new")
    changes = {
        "ts-past-end": {"ts_offset": 10**9},
        "ts-overlaps-toc": {"ts_offset": b.toc_offset},
        "ts-over-cap": {"ts_ulength": 200 << 20},
    }[case]
    shared_env.refuse(
        rewrite_footer(b.blob, **changes), None, r"outside|overlap|150 MiB", ChunkedError
    )


def test_old_footer_magic_with_new_footer_layout(shared_env):
    """A 72-byte footer ending in the *older* magic: read as a 48-byte one, it is not a frame."""
    b = base("new")
    shared_env.refuse(
        rewrite_footer(b.blob, magic=b"GnUlInUx"), None, r"not a 40-byte", ChunkedError
    )


# == annotations ================================================================================
def _ann_cases() -> dict[str, tuple[Callable[[dict[str, str], str], None], str]]:
    def setk(key: str, value: str | None) -> Callable[[dict[str, str], str], None]:
        def fn(ann: dict[str, str], p: str) -> None:
            if value is None:
                del ann[p + key]
            else:
                ann[p + key] = value

        return fn

    pos = "manifest-position"
    bad_pos = r"is not 4 ':'-separated numbers"
    return {
        "checksum-missing": (setk("manifest-checksum", None), r"incomplete or malformed"),
        "position-missing": (setk(pos, None), r"incomplete or malformed"),
        "checksum-no-prefix": (setk("manifest-checksum", "a" * 64), r"incomplete or malformed"),
        "checksum-uppercase": (
            setk("manifest-checksum", "sha256:" + "A" * 64),
            r"incomplete or malformed",
        ),
        "checksum-sha512": (
            setk("manifest-checksum", "sha512:" + "a" * 128),
            r"incomplete or malformed",
        ),
        "checksum-short": (setk("manifest-checksum", "sha256:abc"), r"incomplete or malformed"),
        "checksum-newline": (
            setk("manifest-checksum", "sha256:" + "a" * 64 + "\n"),
            r"incomplete or malformed",
        ),
        "position-3-fields": (setk(pos, "100:200:300"), bad_pos),
        "position-5-fields": (setk(pos, "1:2:3:1:5"), bad_pos),
        "position-negative": (setk(pos, "-1:200:300:1"), bad_pos),
        "position-hex": (setk(pos, "0x10:200:300:1"), bad_pos),
        "position-spaces": (setk(pos, " 10:200:300:1"), bad_pos),
        "position-empty-field": (setk(pos, "10::300:1"), bad_pos),
        "position-20-digits": (setk(pos, "99999999999999999999:1:1:1"), bad_pos),
        "position-type-2": (setk(pos, "10:20:30:2"), r"unknown zstd:chunked manifest type 2"),
        "tarsplit-2-fields": (setk("tarsplit-position", "10:20"), r"tarsplit-position"),
        "tarsplit-garbage": (setk("tarsplit-position", "x:y:z"), r"tarsplit-position"),
    }


ANN_CASES = _ann_cases()


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", list(ANN_CASES))
def test_bad_annotations(shared_env, variant, case):
    b = base(variant)
    ann = dict(b.annotations)
    fn, match = ANN_CASES[case]
    fn(ann, b.prefix)
    shared_env.refuse(b, ann, match, ChunkedError)


# Regression (found by this file, fixed in 7697137): chunked._parse_position accepts any
# str.isdigit() character; a superscript digit like '²' passes isdigit() but int() raises a bare
# ValueError (not ChunkedError), and an Arabic-Indic '١' is silently read as 1
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("digit", ["\u00b2", "\u0661"])
def test_annotation_position_with_non_ascii_digits(env, variant, digit):
    b = base(variant)
    ann = dict(b.annotations)
    off, clen, ulen, _ = ann[b.prefix + "manifest-position"].split(":")
    ann[b.prefix + "manifest-position"] = f"{off}:{clen}:{ulen}:{digit}"
    env.refuse(b, ann, r"is not 4 ':'-separated numbers", ChunkedError)


@pytest.mark.parametrize("variant", VARIANTS)
def test_annotations_of_the_other_variant_point_elsewhere(shared_env, variant):
    """The current prefix wins over the older one: a bogus io.github.* set is not skipped."""
    b = base(variant)
    ann = dict(b.annotations)
    ann["io.github.containers.zstd-chunked.manifest-checksum"] = sha(b"x")
    ann["io.github.containers.zstd-chunked.manifest-position"] = ann[b.prefix + "manifest-position"]
    shared_env.refuse(b, ann, r"TOC's sha256 does not match", ChunkedError)


# == expected DiffID ============================================================================
# Regression (found by this file, fixed in 7697137): import_chunked compares expected_diff_id only
# after run_import() has committed the layer: the InvalidInputError is raised but the layer
# (standalone, with its objects) stays in the store
@pytest.mark.parametrize("variant", VARIANTS)
def test_expected_diff_id_mismatch(env, variant):
    b = base(variant)
    env.refuse(b, b.annotations, r"not sha256:0{64}", expected_diff_id="sha256:" + "0" * 64)


@pytest.mark.parametrize("bad", ["sha256:xyz", "sha256:" + "a" * 63, "zz"])
def test_expected_diff_id_malformed(shared_env, bad):
    b = base("new")
    shared_env.refuse(b, b.annotations, r"not a sha256 DiffID", expected_diff_id=bad)


@pytest.mark.parametrize("variant", VARIANTS)
def test_expected_diff_id_match(env, variant):
    b = base(variant)
    res = env.accept(b, expected_diff_id=b.diff_id)
    assert res.diff_id == b.diff_id
