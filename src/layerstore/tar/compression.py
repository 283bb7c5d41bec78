"""Layer blobs: detect the compression by magic bytes, decompress, and digest both sides.

:class:`BlobReader` runs decompression and both sha256 digests (compressed blob digest, and
the DiffID over the uncompressed tar) in a producer thread: ISA-L/zlib, libzstd and hashlib
release the GIL, so on two cores this work overlaps the tar parsing and file hashing done by
the consumer (with ISA-L inflate the producer is the lighter side; docs/architecture.md).

The producer always reads its input to the very end and checks the container's own
integrity: gzip CRC32/ISIZE of every member, zstd frame completeness and checksums, and refuses
anything after the last member that is not zero padding.  So the DiffID covers every byte of
the uncompressed stream, and a corrupt or truncated blob is an error even where the tar inside
happens to look complete.

Memory is bounded by a constant whatever the compression ratio (a 320 KiB zstd blob can
announce 10 GiB): each decompressor call returns at most ``_CHUNK`` bytes (``max_length``; for
zstd that needs the stdlib-style decompressor of ``compression.zstd``, since python-zstandard's
``decompressobj`` has no output bound), the producer hands over one piece at a time, and the
queue holds at most ``QUEUE_BYTES``.  What the tar reader then does with the bytes is bounded
too (``tarstream``; docs/operations.md, "Resource bounds").
"""

from __future__ import annotations

import hashlib
import queue
import sys
import threading
import zlib
from collections.abc import Callable, Iterator
from typing import Any, Final

from ..errors import InvalidInputError

if sys.version_info >= (3, 14):
    from compression.zstd import ZstdDecompressor, ZstdError
else:  # the same module, backported (a declared dependency before 3.14)
    from backports.zstd import ZstdDecompressor, ZstdError

_zlib: Any  # isal_zlib or zlib: the same API (decompressobj, max_length, error)
try:  # ISA-L's inflate is ~2x faster than zlib's and a drop-in replacement (docs/dependencies)
    from isal import isal_zlib as _zlib
except ImportError:  # pragma: no cover - isal is a declared dependency; zlib is the fallback
    _zlib = zlib

GZIP_MAGIC: Final = b"\x1f\x8b"
ZSTD_MAGIC: Final = b"\x28\xb5\x2f\xfd"
_CHUNK: Final = 1 << 20  # input read, and decompressed output handed over, per piece (at most)
_QUEUE: Final = 16  # pieces in flight between producer and consumer
QUEUE_BYTES: Final = _QUEUE * _CHUNK  # so the queue never holds more than this
_ZSTD_SLICE: Final = 64 << 10  # zstd input per decompressor call (see _Unzstd.feed)


def is_zstd_skippable(head: bytes) -> bool:
    return len(head) >= 4 and head[1:4] == b"\x2a\x4d\x18" and (head[0] & 0xF0) == 0x50


def detect_compression(head: bytes) -> str:
    """'gzip', 'zstd' or 'none' from the first bytes; other known formats are refused."""
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    if head.startswith(ZSTD_MAGIC) or is_zstd_skippable(head):
        return "zstd"
    if head.startswith(b"BZh") or head.startswith(b"\xfd7zXZ\x00"):
        raise InvalidInputError(
            "bzip2/xz layers are not supported (OCI layers are tar, tar+gzip or tar+zstd); "
            "decompress it first and import the plain tar"
        )
    return "none"


class _Gunzip:
    """Multi-member gzip with integrity checks (zlib verifies CRC32 and ISIZE per member)."""

    def __init__(self) -> None:
        self.d: Any = _zlib.decompressobj(wbits=31)
        self.in_member = False

    def feed(self, data: bytes) -> Iterator[bytes]:
        """The output of ``data``, in pieces of at most ``_CHUNK`` bytes, produced lazily: a
        member of zeros expands ~1000x, so one input chunk can be a gigabyte of output."""
        while True:
            if not self.in_member:
                data = data.lstrip(b"\x00")  # zero padding between/after members is allowed
                if not data:
                    return
                if not data.startswith(GZIP_MAGIC[: len(data)]):
                    raise InvalidInputError("data after the last gzip member is not gzip")
                self.d = _zlib.decompressobj(wbits=31)
                self.in_member = True
            try:
                chunk = self.d.decompress(data, _CHUNK)
            except (zlib.error, _zlib.error) as exc:  # ISA-L has its own error class
                raise InvalidInputError(f"gzip stream is corrupt: {exc}") from None
            if chunk:
                yield chunk
            if self.d.eof:
                self.in_member = False
                data = self.d.unused_data
                continue
            data = self.d.unconsumed_tail  # input left over because the output was full
            if not data and len(chunk) < _CHUNK:
                return  # all input consumed and nothing pending: wait for more input

    def finish(self) -> None:
        if self.in_member:
            raise InvalidInputError("gzip stream is truncated (a member has no end)")


class _Unzstd:
    """zstd frame by frame (skippable frames included), so truncation is always detected.

    ``compression.zstd``'s decompressor (one per frame, like ``lzma``) is the one whose
    ``decompress`` takes a ``max_length``: an RLE block is 4 bytes for 128 KiB, so one input
    chunk may hold 32 GiB of output, which must come out a piece at a time."""

    def __init__(self) -> None:
        self.d: ZstdDecompressor | None = None

    def feed(self, data: bytes) -> Iterator[bytes]:
        """The output of ``data``, in pieces of at most ``_CHUNK`` bytes, produced lazily."""
        # In slices: at a frame's end the decompressor copies the rest of its input into
        # ``unused_data``, and a zstd:chunked blob has a frame per file (~100 per MiB).
        view = memoryview(data)
        for i in range(0, len(view), _ZSTD_SLICE):
            yield from self._feed(view[i : i + _ZSTD_SLICE])

    def _feed(self, data: bytes | memoryview) -> Iterator[bytes]:
        while True:
            if self.d is None:
                if not data:
                    return
                self.d = ZstdDecompressor()
            try:
                chunk = self.d.decompress(data, _CHUNK)
            except ZstdError as exc:
                raise InvalidInputError(f"zstd stream is corrupt: {exc}") from None
            if chunk:
                yield chunk
            if self.d.eof:
                data = self.d.unused_data  # the next frame's bytes, if any
                self.d = None
            elif self.d.needs_input:
                return
            else:
                data = b""  # more output pending from the input it holds

    def finish(self) -> None:
        if self.d is not None:
            raise InvalidInputError("zstd stream is truncated (a frame has no end)")


class BlobReader:
    """A file-like ``read(n)`` over the uncompressed tar, fed by a producer thread.

    After the consumer is done, :meth:`finish` drains the rest (so digests cover everything),
    joins the producer and re-raises its error if it had one.
    """

    def __init__(
        self, raw: Any, progress: Callable[[int], None] | None = None, plain: bool = False
    ) -> None:
        self.raw = raw
        self.progress = progress
        head = _read_some(raw, 8)
        if not head:
            raise InvalidInputError("empty input: expected a tar stream")
        # ``plain``: the caller reconstructed the tar itself (a partial import); never guess.
        self.compression = "none" if plain else detect_compression(head)
        self.comp_sha = hashlib.sha256()
        self.diff_sha = hashlib.sha256()
        self.total_in = 0
        self.total_out = 0
        self._q: queue.Queue[bytes | BaseException | None] = queue.Queue(_QUEUE)
        self._buf = b""
        self._off = 0
        self._eof = False
        self._stop = False
        self._thread = threading.Thread(
            target=self._produce, args=(head,), name="blob-reader", daemon=True
        )
        self._thread.start()

    def _produce(self, head: bytes) -> None:
        try:
            dec: _Gunzip | _Unzstd | None = (
                _Gunzip()
                if self.compression == "gzip"
                else _Unzstd()
                if self.compression == "zstd"
                else None
            )
            data = head
            while data and not self._stop:
                if dec is not None:  # uncompressed: the consumer's DiffID hash is the same
                    self.comp_sha.update(data)
                self.total_in += len(data)
                if self.progress is not None:
                    self.progress(len(data))
                # One piece at a time into the bounded queue: the decompressor makes the next
                # only when this one has been queued, so nothing runs ahead of the consumer.
                pieces = dec.feed(data) if dec is not None else _pieces(data)
                for c in pieces:
                    if self._stop:
                        break
                    self.diff_sha.update(c)
                    self.total_out += len(c)
                    self._q.put(c)
                data = self.raw.read(_CHUNK)
            if dec is not None:
                dec.finish()
            self._q.put(None)
        except BaseException as exc:  # handed to the consumer
            self._q.put(exc)

    def read(self, n: int) -> bytes:
        """Up to ``n`` bytes: at most one decompressed chunk, so fewer than ``n`` before the
        end of the stream too (the tar reader asks again); b"" only at the end.  A chunk that
        fits is handed over as it is, without a copy."""
        buf, off = self._buf, self._off
        if off < len(buf):
            if off == 0 and len(buf) <= n:
                self._buf = b""
                return buf
            out = buf[off : off + n]
            self._off = off + len(out)
            return out
        while not self._eof:
            item = self._q.get()
            if item is None:
                self._eof = True
                break
            if isinstance(item, BaseException):
                self._eof = True
                raise item
            if not item:
                continue
            if len(item) <= n:
                self._buf = b""
                return item
            self._buf, self._off = item, n
            return item[:n]
        return b""

    def finish(self) -> tuple[bytes, bytes]:
        """Drain, join, and return (compressed sha256, uncompressed sha256 = DiffID)."""
        self._buf = b""
        while not self._eof:
            item = self._q.get()
            if item is None:
                self._eof = True
            elif isinstance(item, BaseException):
                self._eof = True
                raise item
        self._thread.join()
        diff = self.diff_sha.digest()
        return (self.comp_sha.digest() if self.compression != "none" else diff), diff

    def abort(self) -> None:
        """Stop early (error path): let the producer run out without queueing more."""
        self._stop = True
        while self._thread.is_alive():
            try:
                self._q.get(timeout=0.05)
            except queue.Empty:
                pass
        self._thread.join()


def _pieces(data: bytes) -> Iterator[bytes]:
    """Plain input as queue pieces of at most ``_CHUNK`` (a source may return more)."""
    if len(data) <= _CHUNK:
        yield data
        return
    for i in range(0, len(data), _CHUNK):
        yield data[i : i + _CHUNK]


def _read_some(raw: Any, n: int) -> bytes:
    out = b""
    while len(out) < n:
        more = raw.read(n - len(out))
        if not more:
            break
        out += more
    return out
