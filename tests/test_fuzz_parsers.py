"""Fuzzing the parsers and codecs that read untrusted or stored bytes.

* the zstd:chunked TOC (``chunked.parse_toc``) and the upstream tar-split JSON lines
  (``chunked.parse_tarsplit``): arbitrary bytes and mutated valid documents give a result or
  :class:`InvalidInputError` (``ChunkedError``), never another exception;
* layerstore's own tar-split (``tarsplit``) and layer manifest (``manifest``): what the writers
  write reads back the same, and arbitrary bytes raise only :class:`CorruptObjectError`;
* the LMDB record codecs (``index``): object records and layer records round trip, and a
  corrupt value raises :class:`StoreError` (which names the way out), never ``struct.error``.

Generated inputs are small: each example costs well under a millisecond, so the CI budget of a
few hundred examples per property is a second or two.
"""

from __future__ import annotations

import base64
import io
import json
import struct

import pytest
import zstandard
from fuzzing import examples
from hypothesis import example, given
from hypothesis import strategies as st

from layerstore import CorruptObjectError, InvalidInputError, StoreError
from layerstore.chunked.toc import parse_tarsplit, parse_toc
from layerstore.core.index import ObjectRecord, decode_layer_record, encode_layer_record
from layerstore.core.manifest import (
    BLOCK,
    CHAR,
    KIND_NAMES,
    REG,
    Entry,
    ManifestWriter,
    decode_entry,
    encode_entry,
    read_manifest,
)
from layerstore.core.tarsplit import CONTENT, RAW, TarSplitWriter, read_tarsplit

DIGEST = "sha256:" + "ab" * 32
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(1 << 70), 1 << 70)
    | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
    max_leaves=8,
)
# A JSON nesting bomb: json.loads raises RecursionError, not ValueError, on deep nesting.
NESTED = b"[" * 100_000


def zstd(data: bytes) -> bytes:
    return zstandard.ZstdCompressor(write_checksum=True).compress(data)


def mutate_bytes(draw: st.DrawFn, data: bytes) -> bytes:
    """A byte-level change of a valid document: cut, flip, insert or splice in a bomb."""
    how = draw(st.sampled_from(["cut", "flip", "insert", "nest"] if data else ["insert"]))
    pos = draw(st.integers(0, max(0, len(data) - 1)))
    if how == "cut":
        return data[:pos]
    if how == "flip":
        return data[:pos] + bytes([data[pos] ^ draw(st.integers(1, 255))]) + data[pos + 1 :]
    if how == "insert":
        return data[:pos] + draw(st.binary(min_size=1, max_size=8)) + data[pos:]
    return data[:pos] + NESTED[: draw(st.sampled_from([10, 5000]))] + data[pos:]


# -- the TOC ---------------------------------------------------------------------------------------
TOC_KEYS = [
    "type",
    "name",
    "size",
    "offset",
    "endOffset",
    "digest",
    "chunkSize",
    "chunkOffset",
    "chunkDigest",
    "chunkType",
    "mode",
    "uid",
    "gid",
    "modtime",
    "linkName",
    "devMajor",
    "xattrs",
]


@st.composite
def valid_tocs(draw: st.DrawFn) -> tuple[dict[str, object], int]:
    """A TOC parse_toc accepts, and the end of its payload area."""
    entries: list[dict[str, object]] = []
    off = 0
    for i in range(draw(st.integers(0, 6))):
        kind = draw(st.sampled_from(["dir", "reg", "reg", "symlink", "char", "fifo"]))
        e: dict[str, object] = {"type": kind, "name": f"d/e{i}", "mode": 0o644}
        e["modtime"] = "2024-01-01T00:00:00Z"
        if kind == "symlink":
            e["linkName"] = "../t"
        elif kind == "char":
            e["devMajor"], e["devMinor"] = 1, 3
        if kind == "reg" and draw(st.booleans()):
            nchunks = draw(st.integers(1, 3))
            sizes = [draw(st.integers(1, 50)) for _ in range(nchunks)]
            start = off + draw(st.integers(0, 20))
            end = start + nchunks + draw(st.integers(0, 20))
            e |= {"size": sum(sizes), "offset": start, "endOffset": end, "digest": DIGEST}
            if nchunks > 1 or draw(st.booleans()):
                e |= {"chunkSize": sizes[0], "chunkOffset": 0, "chunkDigest": DIGEST}
            entries.append(e)
            pos = sizes[0]
            for j, size in enumerate(sizes[1:], 1):
                entries.append(
                    {
                        "type": "chunk",
                        "name": e["name"],
                        "offset": start + j,
                        "chunkOffset": pos,
                        "chunkSize": size,
                        "chunkDigest": DIGEST,
                    }
                )
                pos += size
            if nchunks == 1 and "chunkSize" not in e:
                pass
            off = end
            continue
        if kind == "reg":
            e["size"] = 0
        if draw(st.integers(0, 3)) == 0:
            e["xattrs"] = {"user.a": base64.b64encode(b"v").decode()}
        entries.append(e)
    return {"version": 1, "entries": entries}, off + draw(st.integers(0, 10))


@st.composite
def mutated_tocs(draw: st.DrawFn) -> tuple[bytes, int]:
    doc, limit = draw(valid_tocs())
    entries = doc["entries"]
    assert isinstance(entries, list)
    for _ in range(draw(st.integers(1, 3))):
        where = draw(st.sampled_from(["entry", "entry", "top", "bytes"]))
        if where == "entry" and entries:
            e = entries[draw(st.integers(0, len(entries) - 1))]
            key = draw(st.sampled_from(TOC_KEYS))
            if draw(st.booleans()):
                e[key] = draw(json_values)
            else:
                e.pop(key, None)
        elif where == "top":
            doc[draw(st.sampled_from(["version", "entries", "tarSplitDigest"]))] = draw(json_values)
    raw = json.dumps(doc).encode()
    if draw(st.integers(0, 3)) == 0:
        raw = mutate_bytes(draw, raw)
    return raw, limit


@examples(300)
@given(valid_tocs())
def test_toc_valid_parses(doc_limit: tuple[dict[str, object], int]) -> None:
    doc, limit = doc_limit
    toc = parse_toc(json.dumps(doc).encode(), limit)
    entries = doc["entries"]
    assert isinstance(entries, list)
    assert len(toc.entries) == sum(1 for e in entries if e["type"] != "chunk")


@example(raw_limit=(NESTED, 100))  # was RecursionError
@example(raw_limit=(b'{"version": 1, "entries": [{"type": [], "name": "a"}]}', 0))  # TypeError
@example(raw_limit=(b'{"version": 1, "entries": [' + NESTED[:5000] + b"]}", 100))
@examples(500)
@given(mutated_tocs() | st.tuples(st.binary(max_size=200), st.integers(0, 1000)))
def test_toc_parser_refuses_cleanly(raw_limit: tuple[bytes, int]) -> None:
    raw, limit = raw_limit
    try:
        parse_toc(raw, limit)
    except InvalidInputError:
        pass


# -- upstream tar-split JSON lines -----------------------------------------------------------------
@st.composite
def tarsplit_lines(draw: st.DrawFn) -> bytes:
    lines: list[dict[str, object]] = []
    for i in range(draw(st.integers(0, 6))):
        if draw(st.booleans()):
            payload = base64.b64encode(draw(st.binary(max_size=40))).decode()
            lines.append({"type": 2, "payload": payload, "position": i})
        else:
            lines.append({"type": 1, "name": f"f{i}", "size": draw(st.integers(0, 99))})
            lines[-1]["payload"] = None
    for _ in range(draw(st.integers(0, 2))):
        if lines:
            rec = lines[draw(st.integers(0, len(lines) - 1))]
            key = draw(st.sampled_from(["type", "payload", "name", "name_raw", "size"]))
            rec[key] = draw(json_values)
    raw = b"\n".join(json.dumps(rec).encode() for rec in lines)
    if draw(st.integers(0, 3)) == 0:
        raw = mutate_bytes(draw, raw)
    return raw


@example(raw=NESTED)  # was RecursionError
@example(raw=b'{"type": 2, "payload": "AAAA"}\n' + NESTED[:3000])
@examples(500)
@given(tarsplit_lines() | st.binary(max_size=200))
def test_upstream_tarsplit_parser_refuses_cleanly(raw: bytes) -> None:
    try:
        segments = parse_tarsplit(raw)
    except InvalidInputError:
        return
    assert all((s.raw is None) == (s.size > 0) for s in segments)


# -- layerstore's tar-split ------------------------------------------------------------------------
# What the tar reader tells a TarSplitWriter: raw bytes, or the next ``length`` content bytes of
# the current entry or (``new``) of the next one.
tarsplit_ops = st.lists(
    st.one_of(
        st.tuples(st.just("raw"), st.binary(max_size=600)),
        st.tuples(st.just("content"), st.booleans(), st.integers(0, 5000)),
    ),
    max_size=12,
)


def canonical(recs: list[tuple[int, object]]) -> list[tuple[object, ...]]:
    """Adjacent raw records joined, adjacent contiguous ranges of one entry joined, empty ones
    dropped: the writer may split or join records, never change the bytes they stand for."""
    out: list[tuple[object, ...]] = []
    for kind, val in recs:
        last = out[-1] if out else None
        if kind == RAW:
            assert isinstance(val, bytes)
            if last is not None and last[0] == RAW:
                out[-1] = (RAW, last[1] + val)  # type: ignore[operator]
            elif val:
                out.append((RAW, val))
        else:
            entry, offset, length = val  # type: ignore[misc]
            if (
                last is not None
                and last[0] == CONTENT
                and last[1] == entry
                and last[2] + last[3] == offset  # type: ignore[operator]
            ):
                out[-1] = (CONTENT, entry, last[2], last[3] + length)  # type: ignore[operator]
            elif length:
                out.append((CONTENT, entry, offset, length))
    return out


@examples(300)
@given(tarsplit_ops)
def test_tarsplit_round_trip(ops: list[tuple[object, ...]]) -> None:
    buf = io.BytesIO()
    w = TarSplitWriter(buf)
    written: list[tuple[int, object]] = []
    offset = 0
    for op in ops:
        if op[0] == "raw":
            data = op[1]
            assert isinstance(data, bytes)
            w.raw(data)
            written.append((RAW, data))
        else:
            _, new, length = op
            assert isinstance(length, int)
            if new or w.entry < 0:
                w.entry += 1
                offset = 0
            w.content(offset, length)
            written.append((CONTENT, (w.entry, offset, length)))
            offset += length
    w.close()
    got = list(read_tarsplit(io.BytesIO(buf.getvalue())))
    assert canonical(got) == canonical(written)  # type: ignore[arg-type]


@st.composite
def tarsplit_bodies(draw: st.DrawFn) -> bytes:
    body = b"LSTS" + struct.pack("<HH", draw(st.sampled_from([1, 1, 2])), 0)
    for _ in range(draw(st.integers(0, 5))):
        t = draw(st.sampled_from([RAW, CONTENT, 0xFF, 7]))
        body += bytes([t]) + draw(st.binary(max_size=30))
    return body


@examples(300)
@given(tarsplit_bodies().map(zstd) | tarsplit_bodies() | st.binary(max_size=100))
def test_tarsplit_reader_refuses_cleanly(blob: bytes) -> None:
    try:
        list(read_tarsplit(io.BytesIO(blob)))
    except CorruptObjectError:
        pass


# -- the layer manifest ----------------------------------------------------------------------------
names = st.text(
    st.sampled_from("ab/._\u00e9\udcff\udc80"), min_size=1, max_size=30
)  # surrogates: non-UTF-8 bytes of a tar name


@st.composite
def entries(draw: st.DrawFn) -> Entry:
    kind = draw(st.sampled_from(sorted(KIND_NAMES)))
    e = Entry(
        draw(names),
        kind,
        mode=draw(st.integers(0, 0o7777)),
        uid=draw(st.integers(0, (1 << 32) - 1)),
        gid=draw(st.integers(0, (1 << 32) - 1)),
        mtime_ns=draw(st.integers(-(1 << 63), (1 << 63) - 1)),
    )
    if kind == REG:
        if draw(st.booleans()):
            e.inline = draw(st.binary(max_size=64))
            e.size = len(e.inline)
        else:
            e.digest = draw(st.binary(min_size=32, max_size=32))
            e.size = draw(st.integers(65, (1 << 64) - 1))
    elif kind in (CHAR, BLOCK):
        e.devmajor, e.devminor = draw(st.integers(0, (1 << 32) - 1)), draw(st.integers(0, 9))
    if kind in (3, 4):  # symlink, hardlink
        e.linkname = draw(names)
    e.xattrs = draw(st.dictionaries(names, st.binary(max_size=20), max_size=3))
    return e


@examples(300)
@given(st.lists(entries(), max_size=8))
def test_manifest_round_trip(ents: list[Entry]) -> None:
    for e in ents:
        assert decode_entry(encode_entry(e)[4:]) == e
    buf = io.BytesIO()
    w = ManifestWriter(buf)
    for e in ents:
        w.add(e)
    w.close()
    assert list(read_manifest(io.BytesIO(buf.getvalue()))) == ents


@st.composite
def manifest_blobs(draw: st.DrawFn) -> bytes:
    """A valid manifest's bytes, changed: cut, flipped, records spliced, END miscounted."""
    ents = draw(st.lists(entries(), max_size=4))
    body = b"LSMF" + struct.pack("<HH", draw(st.sampled_from([1, 1, 2])), 0)
    body += b"".join(encode_entry(e) for e in ents)
    body += encode_entry(Entry("", 0xFF, size=len(ents) + draw(st.sampled_from([0, 0, 1]))))
    if draw(st.booleans()):
        body = mutate_bytes(draw, body)
    return zstd(body) if draw(st.integers(0, 4)) else body


@examples(300)
@given(manifest_blobs() | st.binary(max_size=100))
def test_manifest_reader_refuses_cleanly(blob: bytes) -> None:
    try:
        list(read_manifest(io.BytesIO(blob)))
    except CorruptObjectError:
        pass


# An inline size past the record (2**63 here) made the next unpack_from raise OverflowError.
@example(body=struct.pack("<BHIIBqQ", CHAR, 0, 0, 0, 2 | 8, 0, 1 << 63) + b"\0\0" + bytes(8))
@examples(300)
@given(st.binary(max_size=200))
def test_manifest_record_decoder_refuses_cleanly(body: bytes) -> None:
    try:
        e = decode_entry(body)
    except CorruptObjectError:
        return
    assert e.kind in KIND_NAMES or e.kind == 0xFF


# -- LMDB records ----------------------------------------------------------------------------------
@examples(200)
@given(
    st.integers(0, (1 << 64) - 1),
    st.binary(min_size=32, max_size=32),
    st.integers(0, (1 << 64) - 1),
)
def test_object_record_round_trip(size: int, sha: bytes, refs: int) -> None:
    rec = ObjectRecord(size, sha, refs)
    assert ObjectRecord.unpack(rec.pack()) == rec


@examples(200)
@given(st.binary(max_size=60))
def test_object_record_decoder_refuses_cleanly(raw: bytes) -> None:
    try:
        rec = ObjectRecord.unpack(raw)
    except StoreError as exc:
        assert "fsck" in str(exc)
        return
    assert rec.pack() == raw


layer_records = st.dictionaries(
    st.sampled_from(["manifest", "entries", "files", "bytes", "state", "source", "damaged"]),
    json_values,
)


@examples(200)
@given(layer_records)
def test_layer_record_round_trip(rec: dict[str, object]) -> None:
    assert decode_layer_record(encode_layer_record(rec)) == rec


@example(raw=NESTED)
@example(raw=b"[1, 2]")
@examples(200)
@given(layer_records.map(lambda r: json.dumps(r).encode()).map(lambda b: b[: len(b) // 2]))
def test_layer_record_decoder_refuses_cleanly(raw: bytes) -> None:
    try:
        rec = decode_layer_record(raw)
    except StoreError as exc:
        assert "fsck" in str(exc)
        return
    assert isinstance(rec, dict)


def test_corrupt_index_records_name_the_way_out(store) -> None:
    """Found by the record fuzzing: a damaged ``objects`` value raised ``struct.error`` and a
    damaged ``layers`` value a JSON error, tracebacks that name nothing, from any command
    reading them (``stats``, ``ls``, gc, remove)."""
    idx = store.index
    with idx.write() as txn:
        txn.put(b"\x01" * 32, b"short", db=idx.db[b"objects"])
        txn.put(b"\x02" * 32, b'{"manifest": "ab', db=idx.db[b"layers"])
    with pytest.raises(StoreError, match="rebuild-index"):
        store.get_object(b"\x01" * 32)
    with pytest.raises(StoreError, match="rebuild-index"):
        store.stats()
    with pytest.raises(StoreError, match="rebuild-index"):
        store.layers()
