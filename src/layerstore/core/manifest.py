"""Layer manifests: a compact, versioned, streamable list of a layer's entries.

A manifest says what a layer contains: for every tar entry its normalized path, kind, mode,
owner, mtime (nanoseconds), xattrs, link target or device numbers, and for a regular file either
the blake3 digest of the object holding its content or, for tiny files, the content itself
(inline).  It is stored in the object store like any other content (zstd-compressed), named by
its blake3, and referenced by the layer record in the index.

Binary format (version 1), inside one zstd stream -- see docs/format.md for the full table::

    header  b"LSMF" u16 version u16 reserved
    record  u32 length, then length bytes:
            u8 kind, u16 mode, u32 uid, u32 gid, u8 flags, i64 mtime_ns, u64 size,
            u16 len + path, [32 digest], [inline bytes], [u16 len + link],
            [u32 major, u32 minor], [u16 n, (u16 len + key, u32 len + value) * n]
    end     a record of kind END whose size field is the number of entries before it

Entries are written and read one at a time, so a layer of a million files never needs a million
live Python objects; the END record makes truncation detectable even where zstd frame
boundaries happen to line up.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Iterator
from typing import BinaryIO, Final

import zstandard

from ..errors import CorruptObjectError

MAGIC: Final = b"LSMF"
VERSION: Final = 1

# Entry kinds.  Values are part of the on-disk format: never renumber.
REG: Final = 1
DIR: Final = 2
SYMLINK: Final = 3
HARDLINK: Final = 4
CHAR: Final = 5
BLOCK: Final = 6
FIFO: Final = 7
_END: Final = 0xFF
KIND_NAMES: Final = {
    REG: "file",
    DIR: "dir",
    SYMLINK: "symlink",
    HARDLINK: "hardlink",
    CHAR: "char",
    BLOCK: "block",
    FIFO: "fifo",
}

_F_DIGEST: Final = 1
_F_INLINE: Final = 2
_F_LINK: Final = 4
_F_DEV: Final = 8
_F_XATTR: Final = 16

_HEAD = struct.Struct("<BHIIBqQ")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_DEV = struct.Struct("<II")
_XVAL = struct.Struct("<I")
# Hard caps: a record bigger than this is corruption, not a layer (PATH_MAX is 4096, an xattr
# value is at most 64 KiB on Linux, inline data is tiny).
MAX_RECORD: Final = 4 << 20


class Entry:
    """One entry of a layer.  Plain attributes; ``__slots__`` keeps a million of them cheap.

    ``path`` is normalized and relative ("." is the layer root, never a leading "/" or "./", no
    ".." components).  Names that are not valid UTF-8 are carried with ``surrogateescape`` so the
    original bytes survive a round trip through ``os`` functions.
    """

    __slots__ = (
        "path",
        "kind",
        "mode",
        "uid",
        "gid",
        "mtime_ns",
        "size",
        "digest",
        "inline",
        "linkname",
        "devmajor",
        "devminor",
        "xattrs",
    )

    def __init__(
        self,
        path: str,
        kind: int,
        mode: int = 0o644,
        uid: int = 0,
        gid: int = 0,
        mtime_ns: int = 0,
        size: int = 0,
        digest: bytes | None = None,
        inline: bytes | None = None,
        linkname: str = "",
        devmajor: int = 0,
        devminor: int = 0,
        xattrs: dict[str, bytes] | None = None,
    ) -> None:
        self.path = path
        self.kind = kind
        self.mode = mode
        self.uid = uid
        self.gid = gid
        self.mtime_ns = mtime_ns
        self.size = size
        self.digest = digest
        self.inline = inline
        self.linkname = linkname
        self.devmajor = devmajor
        self.devminor = devminor
        self.xattrs = xattrs or {}

    def __repr__(self) -> str:
        return f"Entry({self.path!r}, {KIND_NAMES.get(self.kind, self.kind)}, {self.mode:o})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Entry):
            return NotImplemented
        return all(getattr(self, s) == getattr(other, s) for s in self.__slots__)

    def to_json(self) -> dict[str, object]:
        """A JSON-friendly view (for ``layerstore show --json``)."""
        d: dict[str, object] = {
            "path": self.path,
            "type": KIND_NAMES[self.kind],
            "mode": f"{self.mode:04o}",
            "uid": self.uid,
            "gid": self.gid,
            "mtime_ns": self.mtime_ns,
        }
        if self.kind == REG:
            d["size"] = self.size
            if self.digest is not None:
                d["object"] = self.digest.hex()
            else:
                d["inline"] = True
        if self.linkname:
            d["link"] = self.linkname
        if self.kind in (CHAR, BLOCK):
            d["dev"] = [self.devmajor, self.devminor]
        if self.xattrs:
            d["xattrs"] = sorted(self.xattrs)
        return d


def _enc(s: str) -> bytes:
    return s.encode("utf-8", "surrogateescape")


def _dec(b: bytes) -> str:
    return b.decode("utf-8", "surrogateescape")


def encode_entry(e: Entry) -> bytes:
    """Serialize one entry as a framed record."""
    flags = 0
    tail: list[bytes] = []
    if e.digest is not None:
        flags |= _F_DIGEST
        tail.append(e.digest)
    if e.inline is not None:
        flags |= _F_INLINE
        tail.append(e.inline)
    if e.linkname:
        flags |= _F_LINK
        lb = _enc(e.linkname)
        tail.append(_U16.pack(len(lb)) + lb)
    if e.kind in (CHAR, BLOCK):
        flags |= _F_DEV
        tail.append(_DEV.pack(e.devmajor, e.devminor))
    if e.xattrs:
        flags |= _F_XATTR
        tail.append(_U16.pack(len(e.xattrs)))
        for k in sorted(e.xattrs):
            kb = _enc(k)
            v = e.xattrs[k]
            tail.append(_U16.pack(len(kb)) + kb + _XVAL.pack(len(v)) + v)
    pb = _enc(e.path)
    body = b"".join(
        [
            _HEAD.pack(e.kind, e.mode, e.uid, e.gid, flags, e.mtime_ns, e.size),
            _U16.pack(len(pb)),
            pb,
            *tail,
        ]
    )
    return _U32.pack(len(body)) + body


def decode_entry(body: bytes) -> Entry:
    """Parse one record body (without its length prefix); raises on any inconsistency."""
    try:
        kind, mode, uid, gid, flags, mtime_ns, size = _HEAD.unpack_from(body, 0)
        pos = _HEAD.size
        (n,) = _U16.unpack_from(body, pos)
        pos += 2
        path = _dec(body[pos : pos + n])
        pos += n
        e = Entry(path, kind, mode, uid, gid, mtime_ns, size)
        if flags & _F_DIGEST:
            e.digest = body[pos : pos + 32]
            pos += 32
        if flags & _F_INLINE:
            if size > len(body) - pos:  # (also keeps pos a valid offset for struct)
                raise CorruptObjectError(f"manifest record for {path!r} is truncated")
            e.inline = body[pos : pos + size]
            pos += size
        if flags & _F_LINK:
            (n,) = _U16.unpack_from(body, pos)
            pos += 2
            e.linkname = _dec(body[pos : pos + n])
            pos += n
        if flags & _F_DEV:
            e.devmajor, e.devminor = _DEV.unpack_from(body, pos)
            pos += _DEV.size
        if flags & _F_XATTR:
            (count,) = _U16.unpack_from(body, pos)
            pos += 2
            for _ in range(count):
                (n,) = _U16.unpack_from(body, pos)
                pos += 2
                key = _dec(body[pos : pos + n])
                pos += n
                (n,) = _XVAL.unpack_from(body, pos)
                pos += 4
                e.xattrs[key] = body[pos : pos + n]
                pos += n
    except struct.error as exc:
        raise CorruptObjectError(f"manifest record is truncated: {exc}") from None
    if pos != len(body) or (kind != _END and kind not in KIND_NAMES):
        raise CorruptObjectError("manifest record has a bad kind or trailing bytes")
    if e.digest is not None and len(e.digest) != 32:
        raise CorruptObjectError(f"manifest record for {path!r} is truncated")
    return e


class ManifestWriter:
    """Streams entries into a zstd-compressed manifest file."""

    def __init__(self, fileobj: BinaryIO, level: int = 3) -> None:
        self._raw = fileobj
        # A frame checksum: a flipped byte must fail to decode, not decode into a wrong digest.
        cctx = zstandard.ZstdCompressor(level=level, write_checksum=True)
        self._z = cctx.stream_writer(fileobj, closefd=False)
        self._buf = bytearray(MAGIC + struct.pack("<HH", VERSION, 0))
        self.count = 0

    def add(self, e: Entry) -> None:
        # Batch records: one compressor call per 256 KiB instead of one per entry.
        self._buf += encode_entry(e)
        self.count += 1
        if len(self._buf) >= 1 << 18:
            self._z.write(self._buf)
            self._buf.clear()

    def close(self) -> None:
        """Write the END record and flush the zstd frame (does not close the file)."""
        self._buf += encode_entry(Entry("", _END, size=self.count))
        self._z.write(self._buf)
        self._buf.clear()
        self._z.flush(zstandard.FLUSH_FRAME)
        self._z.close()


def read_manifest(fileobj: BinaryIO) -> Iterator[Entry]:
    """Yield the entries of a manifest, one at a time, verifying framing and the END count."""
    dctx = zstandard.ZstdDecompressor()
    reader = io.BufferedReader(dctx.stream_reader(fileobj, read_across_frames=True), 1 << 16)
    try:
        head = reader.read(8)
        if len(head) != 8 or head[:4] != MAGIC:
            raise CorruptObjectError("not a layerstore manifest (bad magic)")
        (version,) = struct.unpack_from("<H", head, 4)
        if version != VERSION:
            raise CorruptObjectError(
                f"manifest format version {version} is not supported (this build reads {VERSION})"
            )
        count = 0
        while True:
            lb = reader.read(4)
            if len(lb) != 4:
                raise CorruptObjectError(f"manifest is truncated after {count} entries")
            (n,) = _U32.unpack(lb)
            if n > MAX_RECORD:
                raise CorruptObjectError(f"manifest record of {n} bytes is implausible")
            body = reader.read(n)
            if len(body) != n:
                raise CorruptObjectError(f"manifest is truncated after {count} entries")
            e = decode_entry(body)
            if e.kind == _END:
                if e.size != count:
                    raise CorruptObjectError(
                        f"manifest END says {e.size} entries, {count} were read"
                    )
                if reader.read(1):
                    raise CorruptObjectError("manifest has trailing data after END")
                return
            count += 1
            yield e
    except zstandard.ZstdError as exc:
        raise CorruptObjectError(f"manifest does not decompress: {exc}") from None
