"""The zstd:chunked chunker and CRC-64/GO-ISO.

The decisive test is against a TOC that skopeo 1.9.3 (Debian 12, containers/storage 1.43) wrote:
every file's chunk boundaries, kinds and sha256 digests must come out identical.  The unit tests
compare the vectorized chunker with a slow, literal byte-at-a-time model of the Go code (the
uint32 recurrence as written upstream, not the closed form the chunker uses), on data with
planted rolling-sum splits next to and inside zero runs, fed in pieces of many sizes.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
from pathlib import Path

import numpy as np
import pytest
import zstandard
from conftest import need_corpus

import testdata as corpus
from layerstore.chunked import chunker as ck
from layerstore.chunked.chunker import Chunk, Chunker, chunk_bytes, chunk_file, crc64_iso

# ---------------------------------------------------------------------------------------------
# A literal model of containers/storage's chunking, one byte at a time.


def reference_chunks(data: bytes, *, zeros: bool = True) -> list[tuple[int, int, bool]]:
    """(offset, length, zeros) per chunk, computed the slow, obvious way: the uint32 rolling
    sum of rollsum.go stepped per byte, and zero runs of >= 1024 bytes rolled without split
    checks and cut out as chunks of their own."""
    mask = 0xFFFFFFFF
    s1, s2 = 64 * 31, 64 * 63 * 31
    window = [0] * 64
    wpos = 0
    out: list[tuple[int, int, bool]] = []
    start = 0

    def roll(c: int) -> bool:
        nonlocal s1, s2, wpos
        d = window[wpos]
        window[wpos] = c
        wpos = (wpos + 1) & 63
        s1 = (s1 + c - d) & mask
        s2 = (s2 + s1 - 64 * (d + 31)) & mask
        return (s2 & 0xFFFF) == 0xFFFF

    n = len(data)
    i = 0
    while i < n:
        if zeros and data[i] == 0:
            j = i
            while j < n and data[j] == 0:
                j += 1
            if j - i >= 1024:
                for _ in range(j - i):
                    roll(0)
                if i > start:
                    out.append((start, i - start, False))
                out.append((i, j - i, True))
                start = i = j
                continue
        if roll(data[i]):
            out.append((start, i + 1 - start, False))
            start = i + 1
        i += 1
    if n > start:
        out.append((start, n - start, False))
    return out


def _window_weights() -> np.ndarray:
    """Weight of each byte of a 64-byte window (oldest first) in s2: the newest counts once."""
    return np.arange(64, 0, -1, dtype=np.float64)


def split_window(trailing_zeros: int, seed: int) -> bytes:
    """A 64-byte window ending in ``trailing_zeros`` zero bytes that makes the rolling sum split
    after its last byte, whatever came before it (s2 depends on the window alone)."""
    rng = np.random.default_rng(seed)
    free = 64 - trailing_zeros
    weights = _window_weights()[:free]
    target = (0xFFFF - 64 * 63 * 31) & 0xFFFF
    while True:
        cand = rng.integers(1, 256, size=(1 << 16, free), dtype=np.uint8)
        t = (cand.astype(np.float64) @ weights).astype(np.int64) & 0xFFFF
        hits = np.flatnonzero(t == target)
        if len(hits):
            return cand[hits[0]].tobytes() + bytes(trailing_zeros)


def _rand(rng: random.Random, n: int) -> bytes:
    """n random bytes with no zero byte (so the only zero runs are the planted ones)."""
    return bytes(b or 1 for b in rng.randbytes(n))


class Planted:
    """Test data with known features: positions after which the rolling sum must split, and
    the long zero runs that must become zeros chunks."""

    def __init__(self) -> None:
        rng = random.Random(1234)
        buf = bytearray()
        self.cuts: list[int] = []  # ends of chunks that must exist
        self.no_cut: list[int] = []  # split points that must be suppressed (inside long runs)
        self.zero_runs: list[tuple[int, int]] = []

        def zrun(n: int) -> None:
            if n >= 1024:
                self.zero_runs.append((len(buf), len(buf) + n))
            buf.extend(bytes(n))

        zrun(1500)  # the file starts with a long run
        buf += _rand(rng, 5000)
        buf += split_window(0, 1)  # split right before a long run: cut coincides with its start
        self.cuts.append(len(buf))
        zrun(2000)
        buf += _rand(rng, 3000)
        w = split_window(10, 2)  # split after the 10th zero of a short run: must be kept
        buf += w[:-10]
        self.cuts.append(len(buf) + 10)
        zrun(500)
        buf += _rand(rng, 3000)
        buf += w[:-10]  # same, inside a long run: must be suppressed
        self.no_cut.append(len(buf) + 10)
        zrun(2000)
        buf += _rand(rng, 777)
        zrun(1023)  # one short of a zeros chunk
        buf += _rand(rng, 999)
        zrun(1024)  # exactly a zeros chunk
        buf += _rand(rng, 300_000)  # spans a BLOCK_SIZE boundary
        buf += split_window(0, 3)
        self.cuts.append(len(buf))
        buf += _rand(rng, 1)
        zrun(600_000)  # spans blocks: held back across several blocks
        buf += split_window(40, 4)[:-40]  # a split 40 zeros into a run that turns out long
        self.no_cut.append(len(buf) + 40)
        zrun(1100)
        buf += _rand(rng, 200_000)
        zrun(1030)  # ... and the file ends in a long run
        self.data = bytes(buf)


@pytest.fixture(scope="module")
def planted() -> Planted:
    return Planted()


@pytest.fixture(scope="module")
def planted_ref(planted: Planted) -> dict[bool, list[tuple[int, int, bool]]]:
    return {z: reference_chunks(planted.data, zeros=z) for z in (True, False)}


def _shape(chunks: list[Chunk]) -> list[tuple[int, int, bool]]:
    return [(c.offset, c.length, c.zeros) for c in chunks]


def _feed(data: bytes, sizes: list[int], *, zeros: bool = True) -> list[Chunk]:
    """Chunk ``data`` fed in pieces of the given sizes, cycled."""
    ch = Chunker(zeros=zeros)
    out: list[Chunk] = []
    pos = 0
    i = 0
    while pos < len(data):
        n = sizes[i % len(sizes)]
        out += ch.update(data[pos : pos + n])
        pos += n
        i += 1
    return out + ch.finish()


def test_planted_features_are_cut_as_upstream_cuts(planted: Planted, planted_ref: dict) -> None:
    chunks = chunk_bytes(planted.data)
    ends = {c.end for c in chunks}
    for cut in planted.cuts:
        assert cut in ends, cut
    for pos in planted.no_cut:
        assert pos not in ends, pos
    assert [(c.offset, c.end) for c in chunks if c.zeros] == planted.zero_runs
    assert _shape(chunks) == planted_ref[True]
    # Tiling and digests.
    assert chunks[0].offset == 0 and chunks[-1].end == len(planted.data)
    for a, b in zip(chunks, chunks[1:], strict=False):
        assert a.end == b.offset and a.length > 0
    for c in chunks:
        assert c.digest == hashlib.sha256(planted.data[c.offset : c.end]).digest()
        assert c.oci_digest() == "sha256:" + c.digest.hex()


def test_without_zero_runs_matches_reference(planted: Planted, planted_ref: dict) -> None:
    chunks = chunk_bytes(planted.data, zeros=False)
    assert not any(c.zeros for c in chunks)
    assert _shape(chunks) == planted_ref[False]
    # The planted split inside the long run is a cut in this variant.
    assert planted.no_cut[0] in {c.end for c in chunks}
    assert planted_ref[False] != planted_ref[True]


@pytest.mark.parametrize(
    "sizes",
    [[7], [63], [64], [65], [1000], [4096], [65537], [ck.BLOCK_SIZE + 1], [1, 2, 3, 1500, 99991]],
)
@pytest.mark.parametrize("zeros", [True, False])
def test_streaming_equals_one_shot(planted: Planted, sizes: list[int], zeros: bool) -> None:
    one_shot = chunk_bytes(planted.data, zeros=zeros)
    assert _feed(planted.data, sizes, zeros=zeros) == one_shot


def test_tiny_pieces_byte_by_byte() -> None:
    """One byte per update across a split, a short zero run and a long one."""
    rng = random.Random(7)
    data = _rand(rng, 100) + split_window(3, 5) + bytes(200) + _rand(rng, 50) + bytes(1100)
    data += _rand(rng, 30)
    want = reference_chunks(data)
    assert len(want) >= 4
    assert _shape(_feed(data, [1])) == want
    assert _feed(data, [1]) == chunk_bytes(data)


def test_random_data_many_block_sizes() -> None:
    """Unplanted random data with random zero runs; several seeds, random piece sizes."""
    for seed in range(3):
        rng = random.Random(seed)
        parts = []
        for _ in range(40):
            parts.append(rng.randbytes(rng.randrange(0, 40_000)))
            parts.append(bytes(rng.choice([1, 5, 64, 1023, 1024, 1025, 3000, 70_000])))
        data = b"".join(parts)
        want = reference_chunks(data)
        got = chunk_bytes(data)
        assert _shape(got) == want
        sizes = [rng.randrange(1, 300_000) for _ in range(20)]
        assert _feed(data, sizes) == got


def test_chunk_file_matches_chunk_bytes(planted: Planted, tmp_path: Path) -> None:
    p = tmp_path / "f"
    p.write_bytes(planted.data)
    with p.open("rb") as f:
        assert list(chunk_file(f)) == chunk_bytes(planted.data)
    with p.open("rb") as f:  # a prefix, by size
        assert list(chunk_file(f, size=100_000)) == chunk_bytes(planted.data[:100_000])
    with p.open("rb") as f, pytest.raises(EOFError):
        list(chunk_file(f, size=len(planted.data) + 1))
    bare = list(chunk_file(io.BytesIO(planted.data), digests=False))
    assert [c._replace(digest=b"") for c in chunk_bytes(planted.data)] == bare


def test_edge_inputs() -> None:
    assert chunk_bytes(b"") == []
    ch = Chunker()
    assert ch.update(b"") == [] and ch.finish() == []
    assert _shape(chunk_bytes(b"x")) == [(0, 1, False)]
    assert _shape(chunk_bytes(bytes(1023))) == [(0, 1023, False)]
    z = chunk_bytes(bytes(5000))
    assert _shape(z) == [(0, 5000, True)]
    assert z[0].digest == hashlib.sha256(bytes(5000)).digest()
    assert _shape(chunk_bytes(bytes(5000), zeros=False)) == [(0, 5000, False)]
    assert _shape(chunk_bytes(b"a" + bytes(1024))) == [(0, 1, False), (1, 1024, True)]
    assert _shape(chunk_bytes(bytes(1024) + b"a")) == [(0, 1024, True), (1024, 1, False)]
    with pytest.raises(ValueError):
        ch.update(b"more")


def test_split_window_splits_after_any_history() -> None:
    """s2 is a function of the last 64 bytes only: the planted window cuts after its last byte
    whatever precedes it (this is what lets the chunker carry just 63 bytes between blocks)."""
    w = split_window(0, 9)
    rng = random.Random(3)
    for n in (0, 1, 63, 64, 5000):
        data = _rand(rng, n) + w + _rand(rng, 10)
        assert (n + 64) in {end for _, end in ((o, o + ln) for o, ln, _ in reference_chunks(data))}
        assert (n + 64) in {c.end for c in chunk_bytes(data)}


# ---------------------------------------------------------------------------------------------
# CRC-64/GO-ISO


def _crc64_bitwise(data: bytes, crc: int = 0) -> int:
    """Go's crc64 with the ISO table, bit by bit: reflected poly 0xD800000000000000."""
    crc ^= 0xFFFFFFFFFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (0xD800000000000000 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFFFFFFFFFF


def test_crc64_check_value() -> None:
    assert crc64_iso(b"123456789") == 0xB90956C775A41001
    assert _crc64_bitwise(b"123456789") == 0xB90956C775A41001
    assert crc64_iso(b"") == 0
    assert ck.tarsplit_crc_payload(0xB90956C775A41001) == bytes.fromhex("b90956c775a41001")


def test_crc64_incremental_and_buffers() -> None:
    rng = random.Random(11)
    data = rng.randbytes(100_000)
    whole = crc64_iso(data)
    assert crc64_iso(data[:3000]) == _crc64_bitwise(data[:3000])
    for _ in range(20):
        cuts = sorted(rng.sample(range(len(data)), 5))
        crc = 0
        for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True):
            crc = crc64_iso(memoryview(data)[a:b], crc)
        assert crc == whole
    assert crc64_iso(bytearray(data)) == whole
    assert crc64_iso(np.frombuffer(data, np.uint8)) == whole  # type: ignore[arg-type]
    assert crc64_iso(data[:-1] + bytes([data[-1] ^ 1])) != whole


# ---------------------------------------------------------------------------------------------
# Real data: a zstd:chunked layer written by skopeo 1.9.3 (Debian 12).


def _layer_and_toc(layout: Path) -> tuple[Path, list[dict]]:
    index = json.loads((layout / "index.json").read_text())
    mdesc = index["manifests"][0]
    blob = lambda d: layout / "blobs" / d["digest"].split(":")[0] / d["digest"].split(":")[1]  # noqa: E731
    manifest = json.loads(blob(mdesc).read_text())
    (layer,) = manifest["layers"]
    pos = layer["annotations"]["io.containers.zstd-chunked.manifest-position"]
    off, clen, ulen, typ = (int(x) for x in pos.split(":"))
    assert typ == 1
    path = blob(layer)
    with path.open("rb") as f:
        f.seek(off)
        raw = f.read(clen)
    want = layer["annotations"]["io.containers.zstd-chunked.manifest-checksum"]
    assert "sha256:" + hashlib.sha256(raw).hexdigest() == want
    toc = json.loads(zstandard.ZstdDecompressor().decompress(raw, max_output_size=ulen))
    return path, toc["entries"]


@pytest.mark.realdata
def test_real_skopeo_zstd_chunked_toc_boundaries_and_digests() -> None:
    layout = need_corpus(corpus.oci_layout, 1, "zstd:chunked")
    path, entries = _layer_and_toc(layout)
    files: list[tuple[dict, list[dict]]] = []  # (reg entry, its chunk entries incl. itself)
    for e in entries:
        if e["type"] == "reg":
            files.append((e, [e]))
        elif e["type"] == "chunk":
            assert files and files[-1][0]["name"] == e["name"]
            files[-1][1].append(e)
    dctx = zstandard.ZstdDecompressor()
    multi_files = multi_chunks = single_files = zero_chunks = 0
    with path.open("rb") as blob:
        for reg, chunks in files:
            size = reg.get("size", 0)
            if size == 0:
                continue
            blob.seek(reg["offset"])
            raw = blob.read(reg["endOffset"] - reg["offset"])
            content = dctx.stream_reader(io.BytesIO(raw), read_across_frames=True).read()
            assert len(content) == size, reg["name"]
            assert "sha256:" + hashlib.sha256(content).hexdigest() == reg["digest"]
            got = chunk_bytes(content)
            if "chunkDigest" not in reg:  # a single-chunk file carries no chunk fields
                assert len(chunks) == 1
                assert [(c.offset, c.length) for c in got] == [(0, size)], reg["name"]
                single_files += 1
                continue
            want = [
                (
                    c.get("chunkOffset", 0),
                    c["chunkSize"],
                    c.get("chunkType", "") == "zeros",
                    c["chunkDigest"],
                )
                for c in chunks
            ]
            have = [(c.offset, c.length, c.zeros, c.oci_digest()) for c in got]
            assert have == want, reg["name"]
            multi_files += 1
            multi_chunks += len(chunks)
            zero_chunks += sum(c.zeros for c in got)
    print(
        f"\nzstd:chunked TOC check: {multi_files} multi-chunk files ({multi_chunks} chunks, "
        f"{zero_chunks} zeros chunks) and {single_files} single-chunk files match"
    )
    assert multi_files > 500 and multi_chunks > 3000 and zero_chunks > 100 and single_files > 1000
