"""Write a layer as a zstd:chunked blob in the current upstream variant.

The blob is the layer's exact tar (replayed from the store, so its DiffID is verified on the way)
compressed so that a plain zstd decoder reads it as that tar, while a chunk-aware reader finds:

* tar header bytes (and padding) in frames of their own, every regular file's payload starting
  a new frame, one frame per content-defined chunk (:mod:`layerstore.chunker`, cut exactly where
  containers/storage cuts, so chunk digests match TOCs written by podman/buildah/skopeo);
* a TOC (``{"version": 1, "entries": [...], "tarSplitDigest": ...}``) and an upstream-format
  tar-split (vbatts/tar-split JSON lines, CRC-64/ISO per file), each zstd-compressed inside a
  skippable frame;
* a 64-byte-data footer (magic ``GNUlInUx``) and the three
  ``io.github.containers.zstd-chunked.*`` annotations for the OCI descriptor.

Memory is bounded: a file's content is chunked from a spooled buffer (in memory up to 64 MiB,
then a temporary file), never the whole layer.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import os
import struct
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, BinaryIO, Final

import zstandard

from ..errors import InvalidInputError
from ..tar.reader import TarMember, TarReader
from .chunker import Chunker, crc64_iso, tarsplit_crc_payload
from .toc import FOOTER_MAGIC_NEW, PREFIX_NEW, SKIPPABLE_MAGIC, TAR_TYPES

_SPOOL: Final = 64 << 20
_PIECE: Final = 1 << 20
_LEVEL: Final = 3


@dataclass
class ChunkedBlob:
    """What :func:`write_chunked` produced: the OCI descriptor's digest, size, annotations."""

    digest: str
    size: int
    diff_id: str
    annotations: dict[str, str]
    files: int
    chunks: int

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


class _Recorder:
    """Receives the raw (non-content) tar bytes from :class:`TarReader`."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.entry = -1

    def raw(self, data: bytes | memoryview) -> None:
        self.buf += data

    def content(self, offset: int, length: int) -> None:  # contents are read explicitly
        pass

    def raw_bytes(self) -> bytes:
        out = bytes(self.buf)
        self.buf.clear()
        return out


class _Out:
    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self.pos = 0
        self.sha = hashlib.sha256()

    def write(self, data: bytes) -> None:
        self.out.write(data)
        self.sha.update(data)
        self.pos += len(data)


def _rfc3339(ns: int) -> str:
    sec, frac = divmod(ns, 1_000_000_000)
    t = datetime.datetime.fromtimestamp(sec, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return t + (f".{frac:09d}".rstrip("0") if frac else "") + "Z"


def write_chunked(
    diff_id: str, write_tar: Callable[[BinaryIO], object], out: BinaryIO
) -> ChunkedBlob:
    """Write the layer whose tar ``write_tar(stream)`` produces to ``out`` as a zstd:chunked
    blob; see the module docstring.

    ``write_tar`` runs in a thread and must verify the tar against ``diff_id`` itself (the
    store's export does; an error it raises is raised here), so the blob's DiffID needs no
    second hash."""
    rfd, wfd = os.pipe()
    err: list[BaseException] = []

    def produce() -> None:
        try:
            with open(wfd, "wb", buffering=_PIECE) as w:
                write_tar(w)
        except BrokenPipeError:
            pass
        except BaseException as exc:  # re-raised by the consumer
            err.append(exc)

    t = threading.Thread(target=produce, name="chunked-export", daemon=True)
    t.start()
    try:
        with open(rfd, "rb", buffering=_PIECE) as r:
            blob = _write(r, out, diff_id)
    finally:
        t.join()
    if err:
        raise err[0]
    return blob


def _write(tar_stream: BinaryIO, dest: BinaryIO, diff_id: str) -> ChunkedBlob:
    cctx = zstandard.ZstdCompressor(level=_LEVEL)
    o = _Out(dest)
    rec = _Recorder()
    tar = TarReader(tar_stream, recorder=rec)
    toc: list[dict[str, Any]] = []
    split: list[dict[str, Any]] = []
    files = chunks = 0

    def flush_raw() -> None:
        data = rec.raw_bytes()
        if data:
            o.write(cctx.compress(data))
            split.append({"type": 2, "payload": base64.b64encode(data).decode(), "position": 0})

    for m in tar:
        if m.sparse:
            raise InvalidInputError(
                f"{m.name!r} is a sparse tar entry; zstd:chunked cannot describe sparse files "
                "(export this layer as plain zstd)"
            )
        flush_raw()
        e = _toc_entry(m)
        entry_split: dict[str, Any] = {"type": 1, "name": m.name, "payload": None, "position": 0}
        if m.size and e["type"] == "reg":
            entry_split["size"] = m.size
            with tempfile.SpooledTemporaryFile(_SPOOL) as spool:
                # One pass over the content: spooled, hashed, CRC'd and chunked as it arrives;
                # the chunk frames are then compressed from the spool.
                sha, crc, chunker = hashlib.sha256(), 0, Chunker()
                cuts = []
                left = m.size
                while left:
                    piece = tar.read(min(_PIECE, left))
                    spool.write(piece)
                    sha.update(piece)
                    crc = crc64_iso(piece, crc)
                    cuts += chunker.update(piece)
                    left -= len(piece)
                cuts += chunker.finish()
                e["digest"] = "sha256:" + sha.hexdigest()
                e["offset"] = o.pos
                spool.seek(0)
                extra = []
                for i, c in enumerate(cuts):
                    start = o.pos
                    o.write(cctx.compress(spool.read(c.length)))
                    if len(cuts) > 1:
                        fields = {
                            "chunkSize": c.length,
                            "chunkOffset": c.offset,
                            "chunkDigest": c.oci_digest(),
                        }
                        if c.zeros:
                            fields["chunkType"] = "zeros"
                        if i == 0:
                            e.update(fields)
                        else:
                            extra.append(
                                {"type": "chunk", "name": m.name, "offset": start, **fields}
                            )
                e["endOffset"] = o.pos
                files += 1
                chunks += len(cuts)
            entry_split["payload"] = base64.b64encode(tarsplit_crc_payload(crc)).decode()
            toc.append(e)
            toc.extend(extra)
        else:
            toc.append(e)
        split.append(entry_split)
    tar.drain_rest(None)  # a stored layer: bounded at its import
    flush_raw()
    for n, s in enumerate(split):
        s["position"] = n
    # tar-split: JSON lines, zstd, in a skippable frame; its digest goes into the TOC.
    ts_raw = b"".join(
        json.dumps(s, separators=(",", ":")).encode("utf-8", "surrogateescape") + b"\n"
        for s in split
    )
    ts_z = cctx.compress(ts_raw)
    doc = {
        "version": 1,
        "entries": toc,
        "tarSplitDigest": "sha256:" + hashlib.sha256(ts_z).hexdigest(),
    }
    toc_raw = json.dumps(doc, separators=(",", ":")).encode("utf-8", "surrogateescape")
    toc_z = cctx.compress(toc_raw)
    toc_off = o.pos + 8
    o.write(SKIPPABLE_MAGIC + struct.pack("<I", len(toc_z)) + toc_z)
    ts_off = o.pos + 8
    o.write(SKIPPABLE_MAGIC + struct.pack("<I", len(ts_z)) + ts_z)
    footer = (
        struct.pack("<7Q", toc_off, len(toc_z), len(toc_raw), 1, ts_off, len(ts_z), len(ts_raw))
        + FOOTER_MAGIC_NEW
    )
    o.write(SKIPPABLE_MAGIC + struct.pack("<I", len(footer)) + footer)
    ann = {
        PREFIX_NEW + "manifest-checksum": "sha256:" + hashlib.sha256(toc_z).hexdigest(),
        PREFIX_NEW + "manifest-position": f"{toc_off}:{len(toc_z)}:{len(toc_raw)}:1",
        PREFIX_NEW + "tarsplit-position": f"{ts_off}:{len(ts_z)}:{len(ts_raw)}",
    }
    return ChunkedBlob(
        digest="sha256:" + o.sha.hexdigest(),
        size=o.pos,
        diff_id=diff_id,
        annotations=ann,
        files=files,
        chunks=chunks,
    )


def _toc_entry(m: TarMember) -> dict[str, Any]:
    typ = TAR_TYPES.get(m.type)
    if typ is None:
        raise InvalidInputError(f"{m.name!r} has tar type {m.type!r}, which a TOC cannot list")
    e: dict[str, Any] = {"type": typ, "name": m.name}
    if m.linkname:
        e["linkName"] = m.linkname
    if m.mode:
        e["mode"] = m.mode
    if typ == "reg" and m.size:
        e["size"] = m.size
    if m.uid:
        e["uid"] = m.uid
    if m.gid:
        e["gid"] = m.gid
    e["modtime"] = _rfc3339(m.mtime_ns)
    if typ in ("char", "block"):
        e["devMajor"] = m.devmajor
        e["devMinor"] = m.devminor
    if m.xattrs:
        e["xattrs"] = {k: base64.b64encode(v).decode() for k, v in sorted(m.xattrs.items())}
    return e


__all__ = ["ChunkedBlob", "write_chunked"]
