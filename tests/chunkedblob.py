"""A test-side builder of zstd:chunked blobs (both variants), with hooks to make them lie.

Independent of ``layerstore.chunked.toc``: it follows ``shared/reference/zstd-chunked.md`` only, so
a misreading of the format in the reader is not mirrored here.

Layout written (what containers/storage writes):

* tar header bytes (PAX records, padding of the previous member, headers of members without
  payload) go into *inter-payload* zstd frames, one frame per gap;
* each regular file's payload starts a new frame; a file given explicit chunk sizes gets one
  frame per chunk and a ``reg`` TOC entry describing chunk 0 followed by ``chunk`` entries;
* after the last gap (final padding and the end-of-archive blocks): the TOC (a zstd frame in a
  skippable frame), in the current variant the tar-split (likewise), then the footer.

``build(...)`` returns a :class:`ChunkedBlob` with the blob bytes, the tar it decodes to, the
OCI descriptor annotations, and everything a test needs to aim a corruption.  The tamper hooks:

* ``toc_hook(toc)`` -- mutate the TOC dict before it is serialized;
* ``toc_json_hook(raw) -> raw`` -- replace the serialized TOC JSON;
* ``tarsplit_hook(lines)`` -- mutate the list of tar-split records (dicts; a ``str`` is
  written verbatim) before serialization;
* ``payload_hook(name, index, data) -> data`` -- what a file's chunk frame really holds (the TOC
  still describes the tar's bytes: a file whose digest lies);
* ``gap_hook(index, raw) -> compressed`` -- the compressed bytes of an inter-payload gap;
* ``stale_toc_checksum`` / ``stale_tarsplit_digest`` -- keep the digest of the *untampered*
  bytes (a tamper that forgot, or could not, update the checksum);
* ``blob_hook(blob) -> blob`` -- final byte-level corruption (annotations are not recomputed).
"""

from __future__ import annotations

import base64
import copy
import datetime
import hashlib
import io
import json
import struct
import tarfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zstandard

SKIPPABLE_MAGIC = b"\x50\x2a\x4d\x18"
MAGIC_OLD = b"GnUlInUx"
MAGIC_NEW = b"GNUlInUx"
PREFIX_OLD = "io.containers.zstd-chunked."
PREFIX_NEW = "io.github.containers.zstd-chunked."
VARIANTS = ("old", "new")

Member = tuple[tarfile.TarInfo, bytes | None]


# -- tar members -------------------------------------------------------------------------------
def reg(name: str, data: bytes = b"hello\n", **kw: Any) -> Member:
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    ti.mode = 0o644
    ti.mtime = 1_700_000_000
    for k, v in kw.items():
        setattr(ti, k, v)
    return ti, data


def special(name: str, type_: bytes, linkname: str = "", **kw: Any) -> Member:
    ti = tarfile.TarInfo(name)
    ti.type = type_
    ti.linkname = linkname
    ti.mode = 0o755 if type_ == tarfile.DIRTYPE else 0o644
    ti.mtime = 1_700_000_000
    for k, v in kw.items():
        setattr(ti, k, v)
    return ti, None


def dir_(name: str, **kw: Any) -> Member:
    return special(name, tarfile.DIRTYPE, **kw)


def sym(name: str, target: str, **kw: Any) -> Member:
    return special(name, tarfile.SYMTYPE, target, **kw)


def hard(name: str, target: str, **kw: Any) -> Member:
    return special(name, tarfile.LNKTYPE, target, **kw)


def make_tar(members: Sequence[Member]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for ti, data in members:
            tf.addfile(copy.copy(ti), io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


# -- helpers -----------------------------------------------------------------------------------
def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def zc(data: bytes, level: int = 3) -> bytes:
    """One zstd frame (with content size and checksum)."""
    return zstandard.ZstdCompressor(level=level, write_checksum=True).compress(data)


def skippable(data: bytes) -> bytes:
    return SKIPPABLE_MAGIC + struct.pack("<I", len(data)) + data


def zstd_bomb(size: int) -> bytes:
    """A small frame that expands to ``size`` zero bytes."""
    return zstandard.ZstdCompressor(level=19).compress(bytes(size))


def _crc64_table() -> list[int]:
    poly = 0xD800000000000000  # CRC-64/ISO, reflected (Go's crc64.ISO)
    table = []
    for i in range(256):
        crc = i
        for _ in range(8):
            crc = (crc >> 1) ^ poly if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC64 = _crc64_table()


def crc64_iso(data: bytes) -> bytes:
    crc = 0xFFFFFFFFFFFFFFFF
    for b in data:
        crc = _CRC64[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return struct.pack(">Q", crc ^ 0xFFFFFFFFFFFFFFFF)


def _rfc3339(mtime: float) -> str:
    t = datetime.datetime.fromtimestamp(int(mtime), tz=datetime.UTC)
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


_TOC_TYPES = {
    tarfile.REGTYPE: "reg",
    tarfile.AREGTYPE: "reg",
    tarfile.CONTTYPE: "reg",
    tarfile.LNKTYPE: "hardlink",
    tarfile.SYMTYPE: "symlink",
    tarfile.DIRTYPE: "dir",
    tarfile.CHRTYPE: "char",
    tarfile.BLKTYPE: "block",
    tarfile.FIFOTYPE: "fifo",
}


# -- the blob ----------------------------------------------------------------------------------
@dataclass
class ChunkedBlob:
    variant: str
    blob: bytes
    tar: bytes
    annotations: dict[str, str]
    toc: dict[str, Any]  # as serialized (after toc_hook)
    toc_json: bytes
    toc_compressed: bytes
    toc_offset: int  # just past the skippable frame header
    tarsplit_lines: list[dict[str, Any]] | None = None
    tarsplit_compressed: bytes = b""
    tarsplit_offset: int = 0
    data_end: int = 0  # where the metadata skippable frames start
    files: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (offset, end)
    gaps: list[tuple[int, int]] = field(default_factory=list)  # inter-payload frame ranges

    @property
    def diff_id(self) -> str:
        return sha(self.tar)

    @property
    def prefix(self) -> str:
        return PREFIX_NEW if self.variant == "new" else PREFIX_OLD

    def write(self, path: Path) -> Path:
        path.write_bytes(self.blob)
        return path


def build(
    members: Sequence[Member],
    variant: str = "new",
    *,
    chunks: dict[str, Sequence[int]] | None = None,
    toc_hook: Callable[[dict[str, Any]], None] | None = None,
    toc_json_hook: Callable[[bytes], bytes] | None = None,
    tarsplit_hook: Callable[[list[dict[str, Any]]], None] | None = None,
    payload_hook: Callable[[str, int, bytes], bytes] | None = None,
    gap_hook: Callable[[int, bytes], bytes] | None = None,
    stale_toc_checksum: bool = False,
    stale_tarsplit_digest: bool = False,
    blob_hook: Callable[[bytes], bytes] | None = None,
    tar: bytes | None = None,
) -> ChunkedBlob:
    """Turn tar members (or ready ``tar`` bytes) into a zstd:chunked blob; see the module doc.

    ``chunks`` maps a regular file's name to its chunk sizes (they must add up to its size).
    """
    assert variant in VARIANTS, variant
    chunks = dict(chunks or {})
    if tar is None:
        tar = make_tar(members)
    with tarfile.open(fileobj=io.BytesIO(tar), mode="r:") as tf:
        infos = tf.getmembers()

    out = bytearray()
    entries: list[dict[str, Any]] = []
    lines: list[dict[str, Any]] = []
    files: dict[str, tuple[int, int]] = {}
    gaps: list[tuple[int, int]] = []
    emitted = 0  # tar bytes already in frames
    ts_pos = 0  # tar bytes already described by the tar-split

    def gap(raw: bytes) -> None:
        if not raw:
            return
        comp = gap_hook(len(gaps), raw) if gap_hook else zc(raw)
        gaps.append((len(out), len(out) + len(comp)))
        out.extend(comp)

    def ts_raw(raw: bytes) -> None:
        if raw:
            lines.append({"type": 2, "payload": base64.b64encode(raw).decode(), "position": 0})

    for m in infos:
        content = tar[m.offset_data : m.offset_data + m.size] if m.isreg() else b""
        ts_raw(tar[ts_pos : m.offset_data])
        lines.append(
            {
                "type": 1,
                "name": m.name,
                "size": len(content),
                "payload": base64.b64encode(crc64_iso(content)).decode() if content else None,
                "position": 0,
            }
        )
        ts_pos = m.offset_data + len(content)
        e = _toc_entry(m)
        entries.append(e)
        if not content:
            continue
        gap(tar[emitted : m.offset_data])
        sizes = list(chunks.pop(m.name, [m.size]))
        assert sum(sizes) == m.size, (m.name, sizes, m.size)
        e["digest"] = sha(content)
        e["offset"] = len(out)
        chunk_entries = []
        coff = 0
        for i, n in enumerate(sizes):
            piece = content[coff : coff + n]
            frame_at = len(out)
            out.extend(zc(payload_hook(m.name, i, piece) if payload_hook else piece))
            if len(sizes) > 1:
                c: dict[str, Any] = {
                    "offset": frame_at,
                    "chunkOffset": coff,
                    "chunkSize": n,
                    "chunkDigest": sha(piece),
                }
                if n >= 1024 and piece.count(0) == n:
                    c["chunkType"] = "zeros"
                if i == 0:
                    e.update({k: v for k, v in c.items() if k != "offset"})
                else:
                    chunk_entries.append({"type": "chunk", "name": m.name, **c})
            coff += n
        e["endOffset"] = len(out)
        entries.extend(chunk_entries)
        files[m.name] = (e["offset"], e["endOffset"])
        emitted = m.offset_data + m.size
    assert not chunks, f"chunk sizes given for unknown files: {sorted(chunks)}"
    ts_raw(tar[ts_pos:])
    gap(tar[emitted:])
    data_end = len(out)
    for i, line in enumerate(lines):
        line["position"] = i

    # tar-split (current variant only)
    ts_comp, ts_clean_comp, ts_raw_bytes = b"", b"", b""
    if variant == "new":
        ts_clean_comp = zc(_jsonl(lines))
        if tarsplit_hook:
            tarsplit_hook(lines)
        ts_raw_bytes = _jsonl(lines)
        ts_comp = zc(ts_raw_bytes)

    toc: dict[str, Any] = {"version": 1, "entries": entries}
    if variant == "new":
        toc["tarSplitDigest"] = sha(ts_clean_comp if stale_tarsplit_digest else ts_comp)
    clean_toc_comp = zc(json.dumps(toc, separators=(",", ":")).encode())
    if toc_hook:
        toc_hook(toc)
    toc_json = json.dumps(toc, separators=(",", ":")).encode()
    if toc_json_hook:
        toc_json = toc_json_hook(toc_json)
    toc_comp = zc(toc_json)

    toc_offset = len(out) + 8
    out.extend(skippable(toc_comp))
    ts_offset = 0
    if variant == "new":
        ts_offset = len(out) + 8
        out.extend(skippable(ts_comp))
        footer = struct.pack(
            "<7Q",
            toc_offset,
            len(toc_comp),
            len(toc_json),
            1,
            ts_offset,
            len(ts_comp),
            len(ts_raw_bytes),
        )
        out.extend(skippable(footer + MAGIC_NEW))
    else:
        footer = struct.pack("<4Q", toc_offset, len(toc_comp), len(toc_json), 1)
        out.extend(skippable(footer + MAGIC_OLD))
    prefix = PREFIX_NEW if variant == "new" else PREFIX_OLD
    ann = {
        prefix + "manifest-checksum": sha(clean_toc_comp if stale_toc_checksum else toc_comp),
        prefix + "manifest-position": f"{toc_offset}:{len(toc_comp)}:{len(toc_json)}:1",
    }
    if variant == "new":
        ann[prefix + "tarsplit-position"] = f"{ts_offset}:{len(ts_comp)}:{len(ts_raw_bytes)}"
    blob = bytes(out)
    if blob_hook:
        blob = blob_hook(blob)
    return ChunkedBlob(
        variant=variant,
        blob=blob,
        tar=tar,
        annotations=ann,
        toc=toc,
        toc_json=toc_json,
        toc_compressed=toc_comp,
        toc_offset=toc_offset,
        tarsplit_lines=lines if variant == "new" else None,
        tarsplit_compressed=ts_comp,
        tarsplit_offset=ts_offset,
        data_end=data_end,
        files=files,
        gaps=gaps,
    )


def _toc_entry(m: tarfile.TarInfo) -> dict[str, Any]:
    e: dict[str, Any] = {
        "type": _TOC_TYPES[m.type],
        "name": m.name,
        "mode": m.mode,
        "uid": m.uid,
        "gid": m.gid,
        "modtime": _rfc3339(m.mtime),
    }
    if m.linkname:
        e["linkName"] = m.linkname
    if m.ischr() or m.isblk():
        e["devMajor"], e["devMinor"] = m.devmajor, m.devminor
    xattrs = {
        k.removeprefix("SCHILY.xattr."): base64.b64encode(
            v.encode("utf-8", "surrogateescape")
        ).decode()
        for k, v in m.pax_headers.items()
        if k.startswith("SCHILY.xattr.")
    }
    if xattrs:
        e["xattrs"] = xattrs
    if m.isreg():
        e["size"] = m.size
    return e


def _jsonl(lines: list[Any]) -> bytes:
    """JSON lines; a ``str`` item is written verbatim (for malformed lines)."""
    return b"".join(
        (line if isinstance(line, str) else json.dumps(line, separators=(",", ":"))).encode()
        + b"\n"
        for line in lines
    )


def rle_bomb(size: int, byte: int = 0) -> bytes:
    """A hand-made zstd frame of RLE blocks: 4 bytes per 128 KiB, no content size announced."""
    out = bytearray(b"\x28\xb5\x2f\xfd")  # frame magic
    out += bytes([0x00, 7 << 3])  # no checksum/FCS; window 128 KiB
    left = size
    while left:
        n = min(left, 128 << 10)
        left -= n
        out += ((n << 3) | (1 << 1) | (0 if left else 1)).to_bytes(3, "little") + bytes([byte])
    return bytes(out)


def rewrite_footer(blob: bytes, **changes: Any) -> bytes:
    """Re-pack the blob's footer with some fields changed: ``magic``, ``frame_len`` (the
    skippable frame's length field), ``toc_offset``, ``toc_length``, ``toc_ulength``, ``kind``,
    ``ts_offset``, ``ts_length``, ``ts_ulength``."""
    names = ["toc_offset", "toc_length", "toc_ulength", "kind"]
    if blob.endswith(MAGIC_NEW):
        n, names = 64, names + ["ts_offset", "ts_length", "ts_ulength"]
    else:
        assert blob.endswith(MAGIC_OLD)
        n = 40
    head, tail = blob[: -(n + 8)], blob[-(n + 8) :]
    fields = dict(zip(names, struct.unpack_from(f"<{len(names)}Q", tail, 8), strict=True))
    magic = changes.pop("magic", tail[-8:])
    frame_len = changes.pop("frame_len", n)
    fields.update(changes)
    assert set(fields) == set(names), changes
    data = struct.pack(f"<{len(names)}Q", *fields.values()) + magic
    return head + SKIPPABLE_MAGIC + struct.pack("<I", frame_len) + data
