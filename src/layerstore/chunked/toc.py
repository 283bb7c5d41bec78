"""zstd:chunked: locating and trusting the TOC, strict TOC and tar-split parsing, byte sources.

A zstd:chunked blob is a plain ``tar+zstd`` layer whose file payloads start new zstd frames, with
a table of contents (TOC) appended in a skippable frame (docs/format.md, "zstd:chunked", and
``shared/reference/zstd-chunked.md``).  This module is the *format* half: where the TOC is, whether
it can be trusted, what it says (validated strictly: it comes from a registry), and the byte-range
sources a partial import reads from.  :mod:`layerstore.ops.partial` decides what to fetch.

Trust.  With the OCI descriptor's annotations the TOC is trusted only after the sha256 of its
compressed bytes equals ``manifest-checksum`` (the registry manifest is itself content-addressed).
From a bare blob there is no such root: the footer says where the TOC is, and the import records
``toc_verified: false``.  Either way every file is verified against the TOC's digest before it
becomes an object, and the layer's DiffID is the sha256 of the tar the import *replays* (header
frames or tar-split plus verified contents), so what is stored is always self-consistent.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import struct
from dataclasses import dataclass, field
from typing import Any, Final

import zstandard

from ..core.paths import normalize
from ..errors import ChunkedError
from ..sources.base import RangeSource, read_range

SKIPPABLE_MAGIC: Final = b"\x50\x2a\x4d\x18"
FOOTER_MAGIC_OLD: Final = b"GnUlInUx"  # sic: the historic variant's spelling
FOOTER_MAGIC_NEW: Final = b"GNUlInUx"
FOOTER_LEN_OLD: Final = 8 + 40
FOOTER_LEN_NEW: Final = 8 + 64
PREFIX_OLD: Final = "io.containers.zstd-chunked."
PREFIX_NEW: Final = "io.github.containers.zstd-chunked."
# Upstream refuses TOCs and tar-splits over 150 MiB (and pulls the blob whole instead).
TOC_MAX: Final = 150 << 20
TARSPLIT_MAX: Final = 150 << 20
TOC_ENTRIES_MAX: Final = 50_000_000
_SHA_RE: Final = re.compile(r"sha256:[0-9a-f]{64}\Z")
_TYPES: Final = frozenset({"reg", "hardlink", "symlink", "dir", "char", "block", "fifo", "chunk"})
# tar typeflag <-> TOC type (the TOC never lists PAX/GNU metadata headers or sparse entries)
TAR_TYPES: Final = {
    b"0": "reg",
    b"\0": "reg",
    b"7": "reg",
    b"1": "hardlink",
    b"2": "symlink",
    b"3": "char",
    b"4": "block",
    b"5": "dir",
    b"6": "fifo",
}
TYPEFLAG: Final = {t: f for f, t in TAR_TYPES.items() if f not in (b"\0", b"7")}


# -- locating the TOC ------------------------------------------------------------------------
@dataclass(frozen=True)
class Position:
    offset: int
    length: int
    ulength: int


@dataclass(frozen=True)
class Located:
    """Where a blob's TOC (and tar-split) are, and what vouches for them."""

    variant: str  # "old" (io.containers.*, 48-byte footer) or "new" (64-byte data footer)
    toc: Position
    toc_digest: str | None  # sha256 of the compressed TOC from the annotation; None: footer only
    tarsplit: Position | None


def _parse_position(text: str, fields: int, what: str) -> list[int]:
    parts = text.split(":")
    if len(parts) != fields or not all(p.isascii() and p.isdigit() and len(p) <= 19 for p in parts):
        raise ChunkedError(f"annotation {what} {text!r} is not {fields} ':'-separated numbers")
    return [int(p) for p in parts]


def locate(source: RangeSource, annotations: dict[str, str] | None = None) -> Located:
    """Find the TOC from the descriptor's annotations, or else from the blob's footer."""
    ann = annotations or {}
    size = source.size()
    for prefix, variant in ((PREFIX_NEW, "new"), (PREFIX_OLD, "old")):
        checksum = ann.get(prefix + "manifest-checksum")
        position = ann.get(prefix + "manifest-position")
        if checksum is None and position is None:
            continue
        if (
            type(checksum) is not str or type(position) is not str or not _SHA_RE.match(checksum)
        ):  # (annotations come from an untrusted descriptor: any JSON value)
            raise ChunkedError(
                f"the {prefix}* annotations are incomplete or malformed "
                "(need manifest-checksum sha256:<hex> and manifest-position)"
            )
        off, clen, ulen, typ = _parse_position(position, 4, "manifest-position")
        if typ != 1:
            raise ChunkedError(f"unknown zstd:chunked manifest type {typ}")
        ts = None
        tsp = ann.get(prefix + "tarsplit-position")
        if tsp is not None:
            if type(tsp) is not str:
                raise ChunkedError(f"annotation {prefix}tarsplit-position {tsp!r} is not a string")
            t_off, t_clen, t_ulen = _parse_position(tsp, 3, "tarsplit-position")
            ts = Position(t_off, t_clen, t_ulen)
        loc = Located(variant, Position(off, clen, ulen), checksum, ts)
        _check_positions(loc, size)
        return loc
    return _from_footer(source, size)


def _from_footer(source: RangeSource, size: int) -> Located:
    if size < FOOTER_LEN_OLD:
        raise ChunkedError("blob too small for a zstd:chunked footer")
    tail = read_range(source, max(0, size - FOOTER_LEN_NEW), size)
    if tail.endswith(FOOTER_MAGIC_NEW) and len(tail) == FOOTER_LEN_NEW:
        head, data = tail[:8], tail[8:]
        if head != SKIPPABLE_MAGIC + struct.pack("<I", 64):
            raise ChunkedError("zstd:chunked footer is not a 64-byte skippable frame")
        off, clen, ulen, typ, t_off, t_clen, t_ulen = struct.unpack_from("<7Q", data)
        ts = Position(t_off, t_clen, t_ulen) if t_clen else None
        variant = "new"
    elif tail.endswith(FOOTER_MAGIC_OLD):
        tail = tail[-FOOTER_LEN_OLD:]
        if tail[:8] != SKIPPABLE_MAGIC + struct.pack("<I", 40):
            raise ChunkedError("zstd:chunked footer is not a 40-byte skippable frame")
        off, clen, ulen, typ = struct.unpack_from("<4Q", tail, 8)
        ts, variant = None, "old"
    else:
        raise ChunkedError(
            "this blob has no zstd:chunked footer (no GNUlInUx/GnUlInUx magic): "
            "import it as a plain zstd layer"
        )
    if typ != 1:
        raise ChunkedError(f"unknown zstd:chunked manifest type {typ}")
    loc = Located(variant, Position(off, clen, ulen), None, ts)
    _check_positions(loc, size)
    return loc


def _check_positions(loc: Located, size: int) -> None:
    for what, pos, cap in (("TOC", loc.toc, TOC_MAX), ("tar-split", loc.tarsplit, TARSPLIT_MAX)):
        if pos is None:
            continue
        if pos.offset < 8 or pos.length <= 0 or pos.offset + pos.length > size:
            raise ChunkedError(f"the {what} position {pos} lies outside the {size}-byte blob")
        if pos.ulength > cap or pos.length > cap:
            raise ChunkedError(
                f"the {what} is {max(pos.ulength, pos.length) >> 20} MiB, over the "
                f"{cap >> 20} MiB limit: import this layer whole instead of partially"
            )
    if loc.tarsplit is not None:
        a, b = loc.toc, loc.tarsplit
        if a.offset < b.offset + b.length and b.offset < a.offset + a.length:
            raise ChunkedError("the TOC and tar-split positions overlap")


def data_end(loc: Located) -> int:
    """Where the tar payload frames end: the first skippable frame of TOC/tar-split metadata."""
    ends = [loc.toc.offset - 8]
    if loc.tarsplit is not None:
        ends.append(loc.tarsplit.offset - 8)
    return min(ends)


def decode_frame(data: bytes, pos: Position, digest: str | None, what: str) -> bytes:
    """Verify (when a digest is known) and decompress the TOC or tar-split bytes."""
    import hashlib

    if len(data) != pos.length:
        raise ChunkedError(f"the {what} was cut short ({len(data)} of {pos.length} bytes)")
    if digest is not None and "sha256:" + hashlib.sha256(data).hexdigest() != digest:
        raise ChunkedError(
            f"the {what}'s sha256 does not match {digest}: the blob or its annotations were "
            "altered; nothing was imported"
        )
    try:
        dctx = zstandard.ZstdDecompressor()
        reader = dctx.stream_reader(data, read_across_frames=True)
        out = reader.read(pos.ulength + 1)
    except zstandard.ZstdError as exc:
        raise ChunkedError(f"the {what} does not decompress: {exc}") from None
    if len(out) != pos.ulength:
        raise ChunkedError(
            f"the {what} decompresses to {len(out)} bytes, not the {pos.ulength} announced"
        )
    return out


# -- the TOC -------------------------------------------------------------------------------
@dataclass(slots=True)
class ChunkRef:
    """One chunk of a regular file: where it is in the file and in the blob."""

    file_offset: int
    size: int
    blob_offset: int
    blob_end: int
    digest: bytes  # sha256 of the uncompressed chunk
    zeros: bool


@dataclass(slots=True)
class TocEntry:
    type: str
    name: str  # normalized
    raw_name: str
    size: int = 0
    mode: int = 0
    uid: int = 0
    gid: int = 0
    mtime: str = ""
    linkname: str = ""
    devmajor: int = 0
    devminor: int = 0
    xattrs: dict[str, bytes] = field(default_factory=dict)
    digest: bytes = b""  # sha256 of the whole file (regular files with content)
    offset: int = 0
    end: int = 0
    chunks: list[ChunkRef] = field(default_factory=list)


@dataclass
class Toc:
    version: int
    entries: list[TocEntry]  # in tar order, chunk entries folded into their file
    tarsplit_digest: str | None


def _reject_dups_in(what: str) -> Any:
    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in pairs:
            if k in out:
                raise ChunkedError(f"the {what} repeats the key {k!r} in one object")
            out[k] = v
        return out

    return hook


_reject_dups = _reject_dups_in("TOC")


def _int(e: dict[str, Any], key: str, name: str, lo: int = 0, hi: int = (1 << 63) - 1) -> int:
    v = e.get(key, 0)
    if type(v) is not int or not lo <= v <= hi:
        raise ChunkedError(f"TOC entry {name!r}: {key} {v!r} is not an integer in range")
    return v


def _str(e: dict[str, Any], key: str, name: str) -> str:
    v = e.get(key, "")
    if type(v) is not str:
        raise ChunkedError(f"TOC entry {name!r}: {key} is not a string")
    return v


def _sha(v: Any, name: str, what: str) -> bytes:
    if type(v) is not str or not _SHA_RE.match(v):
        raise ChunkedError(f"TOC entry {name!r}: {what} {v!r} is not sha256:<64 hex>")
    return bytes.fromhex(v[7:])


def parse_toc(raw: bytes, data_limit: int) -> Toc:
    """Parse and validate a decompressed TOC.  ``data_limit``: where payload frames must end.

    Strict where a lie could matter: duplicate keys or names, names escaping the root, offsets
    outside the payload area or out of order, overlapping files, chunks that do not tile their
    file exactly, digests that are not sha256.  Unknown fields are ignored (forward compatible).
    """
    try:
        doc = json.loads(raw, object_pairs_hook=_reject_dups)
    except ChunkedError:
        raise
    except (ValueError, UnicodeDecodeError) as exc:
        raise ChunkedError(f"the TOC is not valid JSON: {exc}") from None
    except RecursionError:  # json.loads on "[[[[...": not a ValueError
        raise ChunkedError("the TOC nests JSON arrays or objects too deeply") from None
    if type(doc) is not dict or type(doc.get("entries")) is not list:
        raise ChunkedError("the TOC is not an object with an 'entries' list")
    version = doc.get("version")
    if version != 1:
        raise ChunkedError(f"unsupported zstd:chunked TOC version {version!r} (this reads 1)")
    ts_digest = doc.get("tarSplitDigest")
    if ts_digest is not None and (type(ts_digest) is not str or not _SHA_RE.match(ts_digest)):
        raise ChunkedError(f"the TOC's tarSplitDigest {ts_digest!r} is not sha256:<64 hex>")
    raw_entries = doc["entries"]
    if len(raw_entries) > TOC_ENTRIES_MAX:
        raise ChunkedError(f"the TOC has {len(raw_entries)} entries, over {TOC_ENTRIES_MAX}")
    entries: list[TocEntry] = []
    names: set[str] = set()
    last_end = 0
    cur: TocEntry | None = None  # the regular file whose chunk entries may follow
    for e in raw_entries:
        if type(e) is not dict:
            raise ChunkedError("a TOC entry is not an object")
        typ, raw_name = e.get("type"), e.get("name")
        if type(typ) is not str or typ not in _TYPES or type(raw_name) is not str or not raw_name:
            raise ChunkedError(f"TOC entry {raw_name!r} has a bad type {typ!r} or name")
        name = normalize(raw_name, "TOC entry")
        if typ == "chunk":
            if cur is None or name != cur.name:
                raise ChunkedError(f"TOC chunk entry {raw_name!r} does not follow its file")
            cur.chunks.append(_chunk(e, raw_name))
            continue
        if cur is not None:
            last_end = _close_file(cur, last_end, data_limit)
            cur = None
        if name in names:
            raise ChunkedError(f"the TOC names {raw_name!r} twice")
        names.add(name)
        te = TocEntry(typ, name, raw_name)
        te.mode = _int(e, "mode", raw_name, hi=0o7777777)
        te.uid = _int(e, "uid", raw_name, hi=(1 << 32) - 1)
        te.gid = _int(e, "gid", raw_name, hi=(1 << 32) - 1)
        te.mtime = _str(e, "modtime", raw_name)
        te.linkname = _str(e, "linkName", raw_name)
        te.devmajor = _int(e, "devMajor", raw_name, hi=(1 << 32) - 1)
        te.devminor = _int(e, "devMinor", raw_name, hi=(1 << 32) - 1)
        xattrs = e.get("xattrs", {})
        if type(xattrs) is not dict:
            raise ChunkedError(f"TOC entry {raw_name!r}: xattrs is not an object")
        for k, v in xattrs.items():
            if type(v) is not str:
                raise ChunkedError(f"TOC entry {raw_name!r}: xattr {k!r} is not base64 text")
            try:
                te.xattrs[k] = base64.b64decode(v, validate=True)
            except binascii.Error:
                raise ChunkedError(f"TOC entry {raw_name!r}: xattr {k!r} is not base64") from None
        if typ == "reg":
            te.size = _int(e, "size", raw_name)
            if te.size:
                te.digest = _sha(e.get("digest"), raw_name, "digest")
                te.offset = _int(e, "offset", raw_name)
                te.end = _int(e, "endOffset", raw_name)
                if "chunkSize" in e:
                    first = _chunk(e, raw_name)
                    if first.file_offset != 0:
                        raise ChunkedError(f"TOC entry {raw_name!r}: first chunk not at 0")
                    te.chunks.append(first)
                cur = te
            elif "digest" in e:
                empty = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
                if e["digest"] != empty:
                    raise ChunkedError(f"TOC entry {raw_name!r}: empty file with a digest")
        entries.append(te)
    if cur is not None:
        _close_file(cur, last_end, data_limit)
    return Toc(1, entries, ts_digest)


def _chunk(e: dict[str, Any], name: str) -> ChunkRef:
    ctype = e.get("chunkType", "")
    if ctype not in ("", "zeros"):
        raise ChunkedError(f"TOC entry {name!r}: unknown chunkType {ctype!r}")
    return ChunkRef(
        file_offset=_int(e, "chunkOffset", name),
        size=_int(e, "chunkSize", name),
        blob_offset=_int(e, "offset", name),
        blob_end=0,
        digest=_sha(e.get("chunkDigest"), name, "chunkDigest"),
        zeros=ctype == "zeros",
    )


def _close_file(te: TocEntry, last_end: int, data_limit: int) -> int:
    """Check a regular file's ranges (and chunks) and return its end offset."""
    if not last_end <= te.offset < te.end <= data_limit:
        raise ChunkedError(
            f"TOC entry {te.raw_name!r}: range {te.offset}-{te.end} overlaps another file or "
            f"lies outside the payload area (0-{data_limit})"
        )
    if te.chunks:
        pos = 0
        for i, c in enumerate(te.chunks):
            nxt = te.chunks[i + 1].blob_offset if i + 1 < len(te.chunks) else te.end
            if c.size <= 0:
                raise ChunkedError(f"TOC entry {te.raw_name!r}: chunk {i} has size {c.size}")
            if c.file_offset != pos:
                raise ChunkedError(
                    f"TOC entry {te.raw_name!r}: chunks do not tile the file (chunk {i} at "
                    f"{c.file_offset}, expected {pos})"
                )
            if not te.offset <= c.blob_offset < nxt <= te.end or (
                i == 0 and c.blob_offset != te.offset
            ):
                raise ChunkedError(f"TOC entry {te.raw_name!r}: chunk {i} blob range is invalid")
            c.blob_end = nxt
            pos += c.size
        if pos != te.size:
            raise ChunkedError(
                f"TOC entry {te.raw_name!r}: chunks add up to {pos} bytes, the file has {te.size}"
            )
    return te.end


# -- tar-split (vbatts/tar-split JSON lines, as upstream stores it) --------------------------
@dataclass(slots=True)
class Segment:
    """A piece of the original tar: raw bytes, or the payload of the next file of ``size``."""

    raw: bytes | None
    name: str = ""
    size: int = 0


def parse_tarsplit(raw: bytes) -> list[Segment]:
    """Parse upstream tar-split JSON lines into raw/file segments (adjacent raw ones merged)."""
    out: list[Segment] = []
    for n, line in enumerate(raw.split(b"\n")):
        if not line.strip():
            continue
        try:
            rec = json.loads(line, object_pairs_hook=_reject_dups_in("tar-split"))
        except ChunkedError:
            raise
        except (ValueError, UnicodeDecodeError) as exc:
            raise ChunkedError(f"tar-split line {n + 1} is not JSON: {exc}") from None
        except RecursionError:
            raise ChunkedError(f"tar-split line {n + 1} nests JSON too deeply") from None
        if type(rec) is not dict:
            raise ChunkedError(f"tar-split line {n + 1} is not an object")
        typ = rec.get("type")
        if typ == 2:
            try:
                data = base64.b64decode(rec.get("payload") or "", validate=True)
            except (binascii.Error, TypeError):
                raise ChunkedError(f"tar-split line {n + 1}: payload is not base64") from None
            if out and out[-1].raw is not None:
                out[-1].raw += data
            else:
                out.append(Segment(data))
        elif typ == 1:
            name, size = rec.get("name", ""), rec.get("size", 0)
            if "name_raw" in rec and not name:
                try:
                    name = base64.b64decode(rec["name_raw"]).decode("utf-8", "surrogateescape")
                except (binascii.Error, TypeError):
                    raise ChunkedError(f"tar-split line {n + 1}: bad name_raw") from None
            if type(name) is not str or type(size) is not int or size < 0:
                raise ChunkedError(f"tar-split line {n + 1}: bad file record")
            if size:
                out.append(Segment(None, name, size))
        else:
            raise ChunkedError(f"tar-split line {n + 1} has unknown type {typ!r}")
    return out


__all__ = [
    "ChunkRef",
    "ChunkedError",
    "Located",
    "Position",
    "Segment",
    "Toc",
    "TocEntry",
    "data_end",
    "decode_frame",
    "locate",
    "parse_tarsplit",
    "parse_toc",
]
