"""Export: rebuild a layer's exact tar from its manifest, tar-split and objects.

The output is verified as it is produced: its sha256 must equal the layer's DiffID, or
:class:`CorruptObjectError` is raised at the end (a caller writing to a file should write to a
temporary name and rename only on success, as the CLI does).  Descriptors are bounded: one
object file is open at a time.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO

from ..chunked.writer import ChunkedBlob, write_chunked
from ..core import protocol
from ..core.manifest import Entry
from ..core.repo import Repo
from ..core.tarsplit import CONTENT, RAW, read_tarsplit
from ..errors import CorruptObjectError, StoreError


def export_layer(
    repo: Repo,
    diff_id: bytes,
    out: BinaryIO,
    progress: Callable[[int], None] | None = None,
    *,
    ref: str | None = None,
) -> int:
    """Write the layer's exact original tar to ``out``, pinned while it is read (like a
    materialization); returns the number of bytes written."""
    with protocol.pinned_layers(repo, [diff_id], content=False, ref=ref) as (layer,):
        return export_tar(repo, diff_id, layer.record, out, progress)


def export_chunked(
    repo: Repo, diff_id: bytes, out: BinaryIO, *, ref: str | None = None
) -> ChunkedBlob:
    """Write the layer as a zstd:chunked blob (current upstream variant), pinned meanwhile;
    returns the descriptor facts (digest, size, annotations)."""
    with protocol.pinned_layers(repo, [diff_id], content=False, ref=ref) as (layer,):
        return write_chunked(
            "sha256:" + diff_id.hex(),
            lambda w: export_tar(repo, diff_id, layer.record, w),
            out,
        )


def export_tar(
    repo: Repo,
    diff_id: bytes,
    rec: dict[str, Any],
    out: BinaryIO,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Write the layer's original tar to ``out``; returns the number of bytes written."""
    if not rec.get("tarsplit"):
        raise StoreError(
            f"layer sha256:{diff_id.hex()} has no tar-split (imported by an older layerstore); "
            "re-import it to make it exportable byte for byte"
        )
    sha = hashlib.sha256()
    entries: Iterator[Entry] = repo.manifest_entries(bytes.fromhex(rec["manifest"]))
    index = -1
    entry: Entry | None = None
    fd = -1
    total = 0

    def emit(data: bytes) -> None:
        nonlocal total
        sha.update(data)
        out.write(data)
        total += len(data)
        if progress:
            progress(len(data))

    try:
        with open(repo.object_path(bytes.fromhex(rec["tarsplit"])), "rb") as tsf:
            for kind, val in read_tarsplit(tsf):
                if kind == RAW:
                    assert isinstance(val, bytes)
                    emit(val)
                    continue
                assert kind == CONTENT and isinstance(val, tuple)
                want, offset, length = val
                if want < index:
                    raise CorruptObjectError("tar-split entry indexes go backwards")
                while index < want:
                    entry = next(entries, None)
                    index += 1
                    if entry is None:
                        raise CorruptObjectError("tar-split refers past the manifest's end")
                    if fd >= 0:
                        os.close(fd)
                        fd = -1
                    if entry.digest is not None and index == want:
                        try:
                            fd = os.open(repo.object_path(entry.digest), os.O_RDONLY)
                        except FileNotFoundError:
                            raise CorruptObjectError(
                                f"object for {entry.path!r} is missing; run `layerstore fsck`"
                            ) from None
                assert entry is not None
                if entry.inline is not None:
                    emit(entry.inline[offset : offset + length])
                    continue
                pos = offset
                end = offset + length
                while pos < end:
                    chunk = os.pread(fd, min(1 << 20, end - pos), pos)
                    if not chunk:
                        raise CorruptObjectError(f"object for {entry.path!r} is short")
                    emit(chunk)
                    pos += len(chunk)
    finally:
        if fd >= 0:
            os.close(fd)
    if sha.digest() != diff_id:
        raise CorruptObjectError(
            f"the exported tar hashes to sha256:{sha.hexdigest()}, not the layer's DiffID "
            f"sha256:{diff_id.hex()}; run `layerstore fsck`"
        )
    return total
