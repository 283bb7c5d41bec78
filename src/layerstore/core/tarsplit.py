"""Tar-split: the bytes of a layer's tar that are not file content, to rebuild it exactly.

A layer's identity is its DiffID, the sha256 of the *exact* uncompressed tar.  The manifest
keeps what a filesystem needs; the tar-split keeps everything else -- header blocks, PAX and GNU
long-name records, padding, sparse maps, the end-of-archive blocks and any trailing bytes -- in
order, with references to file content in between.  Replaying it over the objects reproduces
the original tar byte for byte, so an exported layer has the DiffID it was imported with.
(containers/storage keeps the same information in the vbatts/tar-split JSON format; this is a
compact binary equivalent, stored as an object of its own.)

Format (version 1), one zstd stream with frame checksums::

    header   b"LSTS" u16 version=1 u16 reserved
    record*  u8 type, then
               1 RAW      u32 length + bytes
               2 CONTENT  u32 entry index, u64 offset, u64 length   (bytes of that file)
    end      u8 0xFF, u64 total length of the tar
"""

from __future__ import annotations

import io
import struct
from collections.abc import Iterator
from typing import BinaryIO, Final

import zstandard

from ..errors import CorruptObjectError

MAGIC: Final = b"LSTS"
VERSION: Final = 1
RAW: Final = 1
CONTENT: Final = 2
END: Final = 0xFF
_CONTENT = struct.Struct("<IQQ")
_FLUSH = 1 << 18


class TarSplitWriter:
    """Collects raw and content records as the tar reader consumes the stream."""

    def __init__(self, fileobj: BinaryIO) -> None:
        cctx = zstandard.ZstdCompressor(level=3, write_checksum=True)
        self._z = cctx.stream_writer(fileobj, closefd=False)
        self._buf = bytearray(MAGIC + struct.pack("<HH", VERSION, 0))
        self._raw = bytearray()
        self._pending: tuple[int, int, int] | None = None  # (entry, offset, length)
        self.entry = -1  # index of the current manifest entry
        self.total = 0

    def raw(self, data: bytes | memoryview) -> None:
        if not data:
            return
        self._flush_content()
        self._raw += data
        self.total += len(data)
        if len(self._raw) >= _FLUSH:
            self._flush_raw()

    def content(self, offset: int, length: int) -> None:
        if not length:
            return
        self._flush_raw()
        p = self._pending
        if p is not None and p[0] == self.entry and p[1] + p[2] == offset:
            self._pending = (p[0], p[1], p[2] + length)  # contiguous: one record
        else:
            self._flush_content()
            self._pending = (self.entry, offset, length)
        self.total += length

    def _flush_raw(self) -> None:
        if self._raw:
            self._buf += bytes([RAW]) + struct.pack("<I", len(self._raw)) + self._raw
            self._raw.clear()
            self._maybe_write()

    def _flush_content(self) -> None:
        if self._pending is not None:
            self._buf += bytes([CONTENT]) + _CONTENT.pack(*self._pending)
            self._pending = None
            self._maybe_write()

    def _maybe_write(self) -> None:
        if len(self._buf) >= _FLUSH:
            self._z.write(self._buf)
            self._buf.clear()

    def close(self) -> None:
        self._flush_raw()
        self._flush_content()
        self._buf += bytes([END]) + struct.pack("<Q", self.total)
        self._z.write(self._buf)
        self._buf.clear()
        self._z.flush(zstandard.FLUSH_FRAME)
        self._z.close()  # type: ignore[no-untyped-call]  # zstandard's stub lacks it


def read_tarsplit(fileobj: BinaryIO) -> Iterator[tuple[int, bytes | tuple[int, int, int]]]:
    """Yield (RAW, bytes) and (CONTENT, (entry, offset, length)) records; verifies the end."""
    reader: BinaryIO = io.BufferedReader(
        zstandard.ZstdDecompressor().stream_reader(fileobj, read_across_frames=True), 1 << 16
    )
    try:
        head = reader.read(8)
        if len(head) != 8 or head[:4] != MAGIC:
            raise CorruptObjectError("not a layerstore tar-split (bad magic)")
        if struct.unpack_from("<H", head, 4)[0] != VERSION:
            raise CorruptObjectError("unsupported tar-split version")
        total = 0
        while True:
            t = reader.read(1)
            if not t:
                raise CorruptObjectError("tar-split is truncated")
            if t[0] == RAW:
                (n,) = struct.unpack("<I", _exact(reader, 4))
                data = _exact(reader, n)
                total += n
                yield RAW, data
            elif t[0] == CONTENT:
                rec = _CONTENT.unpack(_exact(reader, _CONTENT.size))
                total += rec[2]
                yield CONTENT, rec
            elif t[0] == END:
                (want,) = struct.unpack("<Q", _exact(reader, 8))
                if want != total or reader.read(1):
                    raise CorruptObjectError("tar-split length or trailer is wrong")
                return
            else:
                raise CorruptObjectError(f"tar-split has an unknown record type {t[0]}")
    except zstandard.ZstdError as exc:
        raise CorruptObjectError(f"tar-split does not decompress: {exc}") from None


def _exact(r: BinaryIO, n: int) -> bytes:
    b = r.read(n)
    if len(b) != n:
        raise CorruptObjectError("tar-split is truncated")
    return b
