"""Ingest: turn a tar stream (plain, gzip or zstd) into objects and a layer manifest.

The import runs in three phases so that bad input never changes what the store shows:

1. **Stream.**  Decompress (format detected by magic bytes; a producer thread), parse the tar
   and validate every name (the main thread), hash every file (blake3, and sha256 for new
   content: two writer threads).  Content the index already has is *pinned* (a short write
   transaction per batch, so gc cannot take it away before our layer references it) and not
   written again; new content is written to this process's staging directory, named by digest,
   and a background ``syncfs`` every 16 MiB starts its writeback early.  The manifest is written
   to staging too, in tar order.  Any error here discards staging and pins: the store is as it
   was.
2. **Publish.**  ``syncfs`` makes staged data durable; then, in write transactions of bounded
   size, each new object is renamed into ``objects/``, recorded (refcount 0) and pinned; a second
   ``syncfs`` makes the renames durable before the transaction commits.  A crash leaves at worst
   orphan files or unreferenced records, which gc removes.
3. **Commit.**  One write transaction adds the layer record and the references its manifest
   makes, and drops the import's pins.  From this commit on the layer exists.

Pins are held against this process's lease, so a killed import's pins are reclaimed by gc.
"""

from __future__ import annotations

import collections
import errno
import hashlib
import io
import os
import shutil
import stat
import tarfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Final

import lmdb

from ..core import layers, leases, protocol
from ..core.digests import DigestSet, DualHasher, blake3_of, sha256_of
from ..core.fsutil import syncfs
from ..core.index import ObjectRecord, index_error, layer_unproved
from ..core.manifest import (
    BLOCK,
    CHAR,
    DIR,
    FIFO,
    HARDLINK,
    REG,
    SYMLINK,
    Entry,
    ManifestWriter,
)
from ..core.paths import PATH_MAX, PathSet, ancestors, normalize
from ..core.repo import Repo
from ..core.tarsplit import TarSplitWriter
from ..errors import ConcurrencyError, InvalidInputError, StoreError, UnsafePathError
from ..tar.compression import BlobReader, detect_compression
from ..tar.reader import TarMember, TarReader

try:  # the optional C fast path (src/layerstore/_fastpath.c); same results without it
    from .. import _fastpath  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - no compiler where it was installed
    _fastpath = None
# An extension built from an older source (a stale in-place build) may lack it.
_stage_files: Callable[[list[tuple[bytes, bytes]]], list[int]] | None = getattr(
    _fastpath, "stage_files", None
)

# Files up to this size are kept in the manifest instead of becoming objects.  composefs uses
# 64 bytes; docs/architecture.md has the measurement behind keeping that value.
INLINE_MAX: Final = 64
# Files up to this size are read into memory and hashed before anything is written, so content
# already stored is never written again.  Larger files stream through a staging file.
MEM_MAX: Final = 8 << 20
# Known-content pins are taken in batches of this many digests or this many held bytes.
PIN_BATCH: Final = 4096
PIN_BATCH_BYTES: Final = 64 << 20
# New objects are published in write transactions of at most this many renames.
PUBLISH_BATCH: Final = 16384
# Staged writes go to the writer threads in batches of this many files or bytes, with at most
# this many batches or bytes in flight.
_WRITE_BATCH: Final = 64
_WRITE_BATCH_BYTES: Final = 4 << 20
_MAX_INFLIGHT: Final = 16
_MAX_INFLIGHT_BYTES: Final = 64 << 20
_FLUSH_EVERY: Final = 16 << 20
# Entries at most waiting for their content's digest before the main thread waits.
_MAX_WAITING: Final = 8192
# What a writer thread did with a file's content.
_NEW, _KNOWN, _DUP = 0, 1, 2
_READ = 1 << 20
_U32: Final = (1 << 32) - 1
# The largest device numbers Linux can represent (12-bit major, 20-bit minor).
DEV_MAJOR_MAX: Final = (1 << 12) - 1
DEV_MINOR_MAX: Final = (1 << 20) - 1
_I64_MIN: Final = -(1 << 63)
_I64_MAX: Final = (1 << 63) - 1
_TINY_MAX: Final = 100_000  # inline contents remembered per import (<= 6.4 MB)


# -- the import ------------------------------------------------------------------------------
@dataclass
class ImportResult:
    """What an import did; also the JSON the CLI prints."""

    diff_id: str
    compressed_digest: str
    compression: str
    manifest: str
    entries: int
    files: int
    logical_bytes: int
    new_objects: int = 0
    new_bytes: int = 0
    reused_objects: int = 0
    inline_files: int = 0
    already_present: bool = False
    seconds: float = 0.0
    stats: dict[str, int] = field(default_factory=dict)
    # zstd:chunked partial imports: bytes read vs blob size, what was reused (else None)
    partial: dict[str, Any] | None = None
    # The store held this DiffID only unproved (a TOC-only import); this import proved it and
    # replaced that record's content with its own (``Store._commit_layer``).
    proved_unproved: bool = False
    # What the tar reader accepted the way GNU tar does but a user may want to know (a
    # malformed PAX mtime, a Solaris ACL ignored); at most tarstream.MAX_WARNINGS of them.
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @staticmethod
    def stored(diff_id: bytes, rec: dict[str, Any], compressed: str = "") -> ImportResult:
        """The result of an import that found its layer already stored (nothing read)."""
        return ImportResult(
            diff_id="sha256:" + diff_id.hex(),
            compressed_digest=compressed,
            compression=rec.get("compression", ""),
            manifest=rec["manifest"],
            entries=rec["entries"],
            files=rec["files"],
            logical_bytes=rec["bytes"],
            already_present=True,
        )


@dataclass(frozen=True)
class Expected:
    """What an image says a layer blob is (OCI descriptor: digest and size; config: DiffID).

    Checked as soon as the blob has been read, before anything is published or committed, so
    a blob that is not what its image says leaves the store exactly as it was (no layer, no
    object records).  ``what`` names the layer in messages ("layer 1 (sha256:...)").
    """

    what: str
    digest: bytes | None = None  # sha256 of the blob as stored (compressed)
    size: int | None = None
    diff_id: bytes | None = None  # sha256 of the uncompressed tar

    def check_blob(self, digest: bytes, size: int) -> None:
        if self.size is not None and size != self.size:
            raise InvalidInputError(
                f"{self.what}: the blob is {size} bytes, but its descriptor says {self.size}; "
                "the layout is damaged or tampered with, nothing was imported"
            )
        if self.digest is not None and digest != self.digest:
            raise InvalidInputError(
                f"{self.what}: the blob hashes to sha256:{digest.hex()}, not to its "
                f"descriptor's sha256:{self.digest.hex()}; the layout is damaged or tampered "
                "with, nothing was imported"
            )

    def check_diff_id(self, diff_id: bytes) -> None:
        if self.diff_id is not None and diff_id != self.diff_id:
            raise InvalidInputError(
                f"{self.what} has DiffID sha256:{diff_id.hex()}, but the config says "
                f"sha256:{self.diff_id.hex()}; nothing was imported"
            )


def _write_new(path: bytes, data: bytes) -> int:
    """Create (O_EXCL, 0444) and fill one staged file; 0 or an errno (as _fastpath does)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444)
    except OSError as exc:
        return exc.errno or errno.EIO
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    except OSError as exc:
        return exc.errno or errno.EIO
    finally:
        os.close(fd)
    return 0


def _hash_stream(f: BinaryIO, size: int, h: DualHasher, out: BinaryIO | None) -> None:
    """Read ``size`` bytes of a member's content, hashing (and copying to ``out``)."""
    left = size
    while left:
        buf = f.read(min(_READ, left))
        if not buf:
            raise InvalidInputError("tar stream ends inside a file's data (truncated)")
        h.update(buf)
        if out is not None:
            out.write(buf)
        left -= len(buf)


class _Importer:
    def __init__(self, repo: Repo, progress: Callable[[int], None] | None) -> None:
        self.repo = repo
        self.idx = repo.index
        self.lease = repo.lease.id
        self.progress = progress
        self.stage = repo.new_staging_dir("import")
        self.obj_stage = os.path.join(self.stage, "objects")
        os.mkdir(self.obj_stage)
        # Opened before anything is staged: a writeback error on this filesystem from here on
        # is reported to publish's syncfs through this descriptor (Linux >= 5.8 reports
        # syncfs errors per open file, to descriptors opened before the error).
        self.stage_fd = os.open(self.stage, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.fanout_made: set[str] = set()
        self.pending: list[tuple[bytes, bytes, int, bytes | None]] = []
        self.pending_bytes = 0
        self.pinned = DigestSet()  # every object this import pinned (exact, compact)
        self.staged_new = 0
        self.staged_bytes = 0
        # Content for the writer threads: (blake3 or None, sha256 or None, data, waiting entry)
        self.batch: list[tuple[bytes | None, bytes | None, bytes, Any]] = []
        self.batch_bytes = 0
        # Manifest entries in tar order, each [entry, path, settled]: those behind one whose
        # content digest the writers have not returned yet wait here (bounded).
        self.entries: collections.deque[list[Any]] = collections.deque()
        self.mw: ManifestWriter | None = None
        # Early writeback: a background syncfs every _FLUSH_EVERY staged bytes, so the one
        # that publish must wait for finds little left to write.
        self.flusher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stage-flush")
        self.flushing: Future[None] | None = None
        self.unflushed = 0
        self.known_txn: Any = None
        self.known_uses = 0
        self.writers = ThreadPoolExecutor(max_workers=2, thread_name_prefix="stage-writer")
        self.inflight: collections.deque[tuple[Future[list[tuple[bytes, int]]], list[Any]]] = (
            collections.deque()
        )
        self.inflight_bytes = 0
        self.reused = 0
        self.inline = 0
        self.files = 0
        self.logical = 0
        self.replaces = 0
        self.tarsplit = b""
        self.tar_bytes = 0
        self.hooks: ImportHooks | None = None
        # Inline files' contents by sha256, for zstd:chunked reuse (chunkindex.record_tiny).
        self.tiny: dict[bytes, bytes] = {}

    # staging -----------------------------------------------------------------------------
    def _fan_dir(self, b3: bytes) -> str:
        """The staging fan-out directory of a digest, created on first use (by any thread:
        ``makedirs(exist_ok=True)`` makes a race between the writers harmless)."""
        fan = b3[:1].hex()
        d = os.path.join(self.obj_stage, fan)
        if fan not in self.fanout_made:
            os.makedirs(d, exist_ok=True)
            self.fanout_made.add(fan)
        return d

    def _staged_path(self, b3: bytes, sha: bytes) -> str:
        return os.path.join(self._fan_dir(b3), b3.hex() + "." + sha.hex())

    def _known(self, b3: bytes) -> bool:
        """Is this content stored?  A hint only (the pin batch re-checks under the write
        lock), so one read snapshot serves many lookups; it is renewed often to stay short."""
        self.known_uses += 1
        if self.known_txn is None or self.known_uses > 1000:
            if self.known_txn is not None:
                self.known_txn.abort()
            self.known_txn = self.idx.read()
            self.known_uses = 0
        return self.known_txn.get(b3, db=self.idx.db[b"objects"]) is not None

    def end_known(self) -> None:
        if self.known_txn is not None:
            self.known_txn.abort()
            self.known_txn = None

    # The in-memory content path: hashed, checked and written by the writer threads -------
    def add_file(self, e: Entry, path: str, data: bytes) -> None:
        """A regular file read into memory: its entry waits (in order) for the writers to
        name its content.  The main thread only parses; blake3, the "already stored?" lookup,
        sha256 and the staging write run in the writer threads, one hand-off per batch of
        ~64 files (a hand-off per file cost more than a small file's syscalls)."""
        item = [e, path, False]
        self.entries.append(item)
        self._queue(None, None, data, item)
        self._bound_waiting()

    def emit(self, e: Entry) -> None:
        """An entry whose content is settled: written now unless earlier ones still wait."""
        if self.entries:
            self.entries.append([e, "", True])
            self._bound_waiting()
        else:
            self.mw.add(e)  # type: ignore[union-attr]

    def _bound_waiting(self) -> None:
        """Keep the waiting entries bounded (an entry can carry megabytes of xattrs): past
        the bound, hand over the partial batch and wait until the oldest entry is named."""
        if len(self.entries) > _MAX_WAITING:
            self._submit_batch()
            while self.entries and not self.entries[0][2]:
                self._collect()

    def _queue(
        self, b3: bytes | None, sha: bytes | None, data: bytes, item: list[Any] | None
    ) -> None:
        self.batch.append((b3, sha, data, item))
        self.batch_bytes += len(data)
        if len(self.batch) >= _WRITE_BATCH or self.batch_bytes >= _WRITE_BATCH_BYTES:
            self._submit_batch()

    def _submit_batch(self) -> None:
        if not self.batch:
            return
        batch = self.batch
        self.inflight.append((self.writers.submit(self._write_files, batch), batch))
        self.inflight_bytes += self.batch_bytes
        self.batch = []
        self.batch_bytes = 0
        while len(self.inflight) > _MAX_INFLIGHT or self.inflight_bytes > _MAX_INFLIGHT_BYTES:
            self._collect()

    def _collect(self) -> None:
        """Take the oldest batch's results: name the waiting entries, count what was written,
        queue what is already stored for pinning; then write out entries now settled."""
        fut, batch = self.inflight.popleft()
        results = fut.result()
        for (b3, status), (_b3, sha, data, item) in zip(results, batch, strict=True):
            self.inflight_bytes -= len(data)
            if item is not None:
                item[0].digest = b3
                item[2] = True
            if status == _NEW:
                self.staged_new += 1
                self.staged_bytes += len(data)
                self.unflushed += len(data)
            elif status == _KNOWN:
                if self.pinned and b3 in self.pinned:
                    self.reused += 1
                else:
                    self.pending.append((b3, sha or b"", len(data), data))
                    self.pending_bytes += len(data)
        entries, hooks = self.entries, self.hooks
        while entries and entries[0][2]:
            e, path, _ = entries.popleft()
            if path and hooks is not None:
                hooks.content_digest(path, e.digest)  # type: ignore[arg-type]
            self.mw.add(e)
        if self.unflushed >= _FLUSH_EVERY and (self.flushing is None or self.flushing.done()):
            if self.flushing is not None:
                self.flushing.result()  # a writeback error fails the import here
            self.unflushed = 0
            self.flushing = self.flusher.submit(self._flush_early)

    def _flush_early(self) -> None:
        fd = os.open(self.stage, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            syncfs(fd)
        finally:
            os.close(fd)

    def _write_files(
        self, batch: list[tuple[bytes | None, bytes | None, bytes, Any]]
    ) -> list[tuple[bytes, int]]:
        """A writer thread: (blake3, status) per item.  Content the index has is not written
        (``_KNOWN``: the main thread pins it); new content is created 0444 under its final
        staged name ``<b3>.<sha256>``.  The same content twice in one layer meets O_EXCL
        (``_DUP``).  A crash mid-write leaves a partial file only in this lease's staging
        directory, which is discarded whole."""
        out: list[tuple[bytes, int]] = []
        files: list[tuple[bytes, bytes]] = []
        where: list[int] = []
        txn = None
        objs = self.idx.db[b"objects"]
        try:
            for b3, sha, data, _item in batch:
                if b3 is None:  # hashlib and blake3 release the GIL: this overlaps the parser
                    b3 = blake3_of(data)
                    if txn is None:
                        txn = self.idx.read()
                    if txn.get(b3, db=objs) is not None:
                        out.append((b3, _KNOWN))
                        continue
                if sha is None:
                    sha = sha256_of(data)
                where.append(len(out))
                out.append((b3, _NEW))
                files.append((os.fsencode(self._staged_path(b3, sha)), data))
        finally:
            if txn is not None:
                txn.abort()
        if _stage_files is not None and os.environ.get("LAYERSTORE_FASTPATH", "1") != "0":
            # One GIL release for the whole batch's syscalls instead of three per file.
            errs = _stage_files(files)
        else:
            errs = [_write_new(path, data) for path, data in files]
        for i, err, (path, _) in zip(where, errs, files, strict=True):
            if err == errno.EEXIST:
                out[i] = (out[i][0], _DUP)
            elif err:
                raise OSError(err, os.strerror(err), os.fsdecode(path))
        return out

    def drain_writes(self) -> None:
        self._submit_batch()
        while self.inflight:
            self._collect()

    def add_content(self, data: bytes) -> bytes:
        """Handle an in-memory object now (the manifest, the tar-split): reuse if known (pin
        later), else stage.  Returns its blake3."""
        b3 = blake3_of(data)
        if self.pinned and b3 in self.pinned:
            self.reused += 1
        elif self._known(b3):
            self.pending.append((b3, b"", len(data), data))
            self.pending_bytes += len(data)
        else:
            self._queue(b3, None, data, None)
        return b3

    def maybe_flush_pins(self) -> None:
        if len(self.pending) >= PIN_BATCH or self.pending_bytes >= PIN_BATCH_BYTES:
            self._flush_pins()

    def add_stream(self, f: BinaryIO, size: int) -> bytes:
        """Handle a large file: stream it to staging while hashing, then dedup by digest."""
        h = DualHasher(size)
        tmp = os.path.join(self.obj_stage, f"stream-{time.monotonic_ns()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444)
        with open(fd, "wb") as out:  # objects are read-only from birth
            _hash_stream(f, size, h, out)
        return self._adopt(tmp, h.blake3(), h.sha256(), size)

    def add_prestaged(self, f: BinaryIO, size: int, staged: str) -> bytes:
        """A file already assembled in staging (a partial import): hash what the stream says
        it holds and adopt the staged file instead of writing a copy (its cloned extents
        stay shared)."""
        h = DualHasher(size)
        _hash_stream(f, size, h, None)
        return self._adopt(staged, h.blake3(), h.sha256(), size)

    def _adopt(self, tmp: str, b3: bytes, sha: bytes, size: int) -> bytes:
        """Take a complete staged file: dedup by digest, else keep it under its staged name."""
        path = self._staged_path(b3, sha)
        if (self.pinned and b3 in self.pinned) or os.path.exists(path):
            os.unlink(tmp)
            self.reused += b3 in self.pinned
        elif self._known(b3):
            # Keep the staged copy until the pin batch decides: the index might lose it first.
            os.rename(tmp, path)
            self.pending.append((b3, sha, size, None))
            self._flush_pins()
        else:
            os.rename(tmp, path)
            self.staged_new += 1
            self.staged_bytes += size
        return b3

    def _flush_pins(self) -> None:
        """Pin batch of known digests; anything that vanished meanwhile is staged instead."""
        pending, self.pending = self.pending, []
        self.pending_bytes = 0
        if not pending:
            return
        objs, doomed = self.idx.db[b"objects"], self.idx.db[b"doomed"]
        lost: dict[bytes, tuple[bytes, int, bytes | None]] = {}
        with self.idx.write() as txn:
            for b3, sha, size, data in pending:
                if b3 in self.pinned or b3 in lost:
                    continue
                # A record being unlinked by gc (doomed) is as good as gone: write our own.
                if txn.get(b3, db=objs) is not None and txn.get(b3, db=doomed) is None:
                    leases.pin_objects(self.idx, txn, self.lease, [b3])
                    self.pinned.add(b3)
                else:
                    lost[b3] = (sha, size, data)
        for b3, sha, _size, data in pending:
            if b3 in self.pinned:
                self.reused += 1
                if data is None:  # staged large file no longer needed
                    try:
                        os.unlink(self._staged_path(b3, sha))
                    except FileNotFoundError:
                        pass
        for b3, (sha, size, data) in lost.items():
            if data is not None:
                self._queue(b3, sha or None, data, None)
            else:  # a large file kept staged for this case
                self.staged_new += 1
                self.staged_bytes += size

    # publish ------------------------------------------------------------------------------
    def publish(self) -> None:
        """Phase 2: make staged objects durable, rename them into objects/, record and pin."""
        if not self.fanout_made:
            return  # nothing new (a re-import): no syncfs, no write transaction
        # No need to wait for a background flush still running: syncfs also waits for the
        # writeback that one started, and reports its errors through ``stage_fd``.
        dfd = self.stage_fd
        syncfs(dfd)
        # The staged names carry both digests; scanning them keeps memory flat however many
        # objects the layer has.
        batch: list[tuple[str, bytes, bytes, int]] = []
        for fan in sorted(self.fanout_made):
            with os.scandir(os.path.join(self.obj_stage, fan)) as it:
                for de in it:
                    name = de.name
                    if name.endswith(".tmp"):
                        continue
                    b3h, _, shah = name.partition(".")
                    b3 = bytes.fromhex(b3h)
                    if b3 in self.pinned:
                        continue
                    batch.append((de.path, b3, bytes.fromhex(shah), de.stat().st_size))
                    if len(batch) >= PUBLISH_BATCH:
                        self._publish_batch(batch, dfd)
                        batch = []
        if batch:
            self._publish_batch(batch, dfd)

    def _rename_all(self, moves: list[tuple[str, str]]) -> None:
        """Rename staged objects into objects/, half of them on a writer thread (rename
        releases the GIL; the fan-out directories spread the directory locks)."""

        def run(part: list[tuple[str, str]]) -> None:
            for src, dst in part:
                os.rename(src, dst)

        if len(moves) < 256:
            run(moves)
            return
        half = len(moves) // 2
        other = self.writers.submit(run, moves[half:])
        try:
            run(moves[:half])
        finally:
            other.result()

    def _publish_batch(self, batch: list[tuple[str, bytes, bytes, int]], dfd: int) -> None:
        idx = self.idx
        objs, doomed, shadb = idx.db[b"objects"], idx.db[b"doomed"], idx.db[b"sha256"]
        for _attempt in range(600):
            live = leases.LivenessChecker(self.repo.leases_dir, own=self.lease)
            busy = False
            with idx.write() as txn:
                # Check every digest before renaming anything: an aborted attempt must leave
                # the staged files where the retry expects them.  (No gc at work: nothing to
                # check.)
                if txn.stat(doomed)["entries"]:
                    for _src, b3, _sha, _size in batch:
                        owner = txn.get(b3, db=doomed)
                        if owner is not None:
                            if live.alive(owner):
                                busy = True  # a live gc is unlinking this digest right now
                                break
                            txn.delete(b3, db=doomed)  # that gc died; its intent is void
                if busy:
                    txn.abort()
                else:
                    new = [item for item in batch if txn.get(item[1], db=objs) is None]
                    self._rename_all([(src, self.repo.object_path(b3)) for src, b3, _, _ in new])
                    for _src, b3, sha, size in new:
                        idx.put_object(txn, b3, ObjectRecord(size, sha, 0))
                        txn.put(sha, b3, db=shadb)
                    leases.pin_objects(idx, txn, self.lease, [b3 for _, b3, _, _ in batch])
                    syncfs(dfd)  # the renames are durable before the records commit
            if not busy:
                self.pinned.update(b3 for _, b3, _, _ in batch)
                return
            time.sleep(0.05)
        raise ConcurrencyError("gc kept objects of this import doomed for 30 s; retry the import")


def import_tar(
    repo: Repo,
    stream: BinaryIO,
    progress: Callable[[int], None] | None = None,
    source: str = "",
    shortcut: bool = True,
    image_owned: bool = False,
    expect: Expected | None = None,
) -> ImportResult:
    """Import one layer from a tar stream (plain/gzip/zstd); see the module docstring.

    ``shortcut=False`` reads the blob even if its compressed digest is known (fsck uses it to
    re-create lost objects from a source tarball).  ``expect``: what the image says the blob
    is; a blob that differs is refused before anything is published.
    """
    t0 = time.monotonic()
    known = _known_blob(repo, stream, expect) if shortcut else None
    if known is not None:
        if not image_owned:
            layers.mark_standalone(repo, bytes.fromhex(known.diff_id[7:]))
        known.seconds = time.monotonic() - t0
        return known
    return run_import(
        repo, lambda imp: (stream, None), progress, source, image_owned, expect=expect
    )


class ImportHooks:
    """What a non-tar source (a zstd:chunked partial import) plugs into the import pipeline.

    The pipeline still parses the (reconstructed) tar and validates every name, so a partial
    import gets exactly the checks of a full one; the hooks add the cross-checks against the
    TOC and let assembled files be adopted instead of written a second time.
    """

    compression = "none"

    def check_member(self, m: TarMember, path: str) -> None:
        """Called for every tar member before it is used; raise to refuse the layer."""

    def content_digest(self, path: str, b3: bytes) -> None:
        """The blake3 the pipeline computed for a regular file's content (raise to refuse)."""

    def take_prestaged(self, path: str) -> str | None:
        """A staged file (in the importer's staging dir) holding this member's content."""
        return None

    def finish(self, diff_id: bytes) -> None:
        """Called after the tar ends, with its DiffID, before anything is published or
        committed; raise to refuse the layer (something expected never came, or the DiffID is
        not the one the image config names)."""

    def info(self) -> dict[str, Any]:
        """Extra fields for the layer record (and the result's ``partial``)."""
        return {}

    def commit_as(self, diff_id: bytes) -> tuple[bytes, bool]:
        """The DiffID to record and whether the tar-split is the layer's exact tar.  A TOC-only
        partial import replays a tar *synthesized* from the TOC: it keys the layer by the
        image config's (unverified) DiffID and keeps no tar-split (export then refuses)."""
        return diff_id, True


def run_import(
    repo: Repo,
    make_stream: Callable[[_Importer], tuple[BinaryIO, ImportHooks | None]],
    progress: Callable[[int], None] | None,
    source: str,
    image_owned: bool,
    record_compressed: bool = True,
    expect: Expected | None = None,
) -> ImportResult:
    """Stream, publish and commit one layer; ``make_stream`` supplies the raw byte stream (it
    gets the importer so a partial import can assemble files in its staging directory).
    ``expect`` is checked once the blob is read, before anything is published."""
    t0 = time.monotonic()
    imp = _Importer(repo, progress=None)
    blob: BlobReader | None = None
    try:
        stream, hooks = make_stream(imp)
        imp.hooks = hooks
        blob = BlobReader(stream, progress, plain=hooks is not None)
        result = _stream_phase(imp, blob)
        comp_digest, diff_id = blob.finish()  # whole blob read, integrity checked
        if expect is not None:
            expect.check_blob(comp_digest, blob.total_in)
            expect.check_diff_id(diff_id)
        if hooks is not None:
            hooks.finish(diff_id)  # before anything is published or committed
        if imp.tar_bytes != blob.total_out:
            raise StoreError(
                f"internal error: the tar-split covers {imp.tar_bytes} bytes of a "
                f"{blob.total_out}-byte tar; please report this"
            )
        exact = True
        if hooks is not None:
            diff_id, exact = hooks.commit_as(diff_id)
        imp.publish()
        compression = hooks.compression if hooks is not None else blob.compression
        extra = hooks.info() if hooks is not None else {}
        result.compression = compression
        result.diff_id = "sha256:" + diff_id.hex()
        result.compressed_digest = "sha256:" + comp_digest.hex() if record_compressed else ""
        outcome = protocol.commit_layer(
            repo,
            diff_id,
            comp_digest if record_compressed else None,
            bytes.fromhex(result.manifest),
            {
                "entries": result.entries,
                "files": result.files,
                "bytes": result.logical_bytes,
                "compression": compression,
                "source": source,
                "replaces": imp.replaces,
                "tarsplit": imp.tarsplit.hex() if exact else "",
                "tar_bytes": imp.tar_bytes if exact else 0,
                "standalone": not image_owned,
                "images": 0,
                **extra,
            },
            imp.pinned,
            blob.total_in if record_compressed else None,
        )
        present = outcome == "present"
        result.already_present = present
        result.proved_unproved = outcome == "proved"
        if imp.tiny:
            from .chunkindex import record_tiny

            record_tiny(repo, imp.tiny)
        if not present and hooks is None and repo.index_chunks:
            # Plain tar: cut its new objects as containers/storage would, so later
            # zstd:chunked pulls find their chunks (a hint index; after the commit).
            from .chunkindex import index_layer

            result.stats.update(index_layer(repo, bytes.fromhex(result.manifest)))
        result.new_objects = imp.staged_new
        result.new_bytes = imp.staged_bytes
        result.reused_objects = imp.reused
        result.partial = extra.get("partial")
        result.seconds = time.monotonic() - t0
        return result
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise StoreError(
                f"the store's filesystem is full ({exc}); nothing was imported. "
                "Free space (e.g. `layerstore gc`) and retry"
            ) from None
        raise
    except lmdb.Error as exc:
        raise index_error(exc, "the import") from None
    finally:
        if blob is not None:
            blob.abort()
        imp.end_known()
        imp.writers.shutdown(wait=True, cancel_futures=True)
        imp.flusher.shutdown(wait=True, cancel_futures=True)
        os.close(imp.stage_fd)
        protocol.release_import_pins(repo, imp.pinned)
        shutil.rmtree(imp.stage, ignore_errors=True)


def _known_blob(
    repo: Repo, stream: BinaryIO, expect: Expected | None = None
) -> ImportResult | None:
    """For a regular file: if its sha256 is a compressed digest of a stored layer, that layer
    *is* this blob -- nothing to parse or write.  One sequential read (~1.5 GB/s of sha256)
    that saves a re-import all of its decompression, parsing and hashing.  Streams that cannot
    be rewound (stdin, pipes) take the normal path.  Once hashed, the blob is held to
    ``expect`` right here (a blob that is not its descriptor's is refused unread)."""
    try:
        st = os.fstat(stream.fileno())
        if not stat.S_ISREG(st.st_mode):
            return None
        start = stream.tell()
    except (OSError, AttributeError, ValueError, io.UnsupportedOperation):
        return None
    size = st.st_size - start
    if size <= 0:
        return None  # nothing (more) to read: the normal path reports it
    with repo.index.read() as txn:
        if not repo.index.has_blob_of_size(txn, size):
            return None  # no stored blob has this size: not worth a read of the whole file
    h = hashlib.sha256()
    while chunk := stream.read(_READ):
        h.update(chunk)
    stream.seek(start)
    comp = h.digest()
    if expect is not None:
        expect.check_blob(comp, size)
    idx = repo.index
    with idx.read() as txn:
        alias = txn.get(comp, db=idx.db[b"compressed"])
        diff_id = bytes(alias) if alias is not None else b""
        rec = idx.get_layer(txn, diff_id) if diff_id else None
    if rec is None or rec.get("state") != "live" or rec.get("damaged") or layer_unproved(rec):
        return None  # an unproved layer is never what a blob's digest stands for
    if expect is not None:
        expect.check_diff_id(diff_id)
    result = ImportResult.stored(diff_id, rec, "sha256:" + comp.hex())
    result.stats = {"shortcut": 1}  # recognised by its compressed digest
    return result


def _last_is_dot(name: str) -> bool:
    """Does ``name`` end in a "." component ("a/.", "a/./")?  Normalizing drops it, but the
    kernel -- and so GNU tar -- resolves such a name only to a directory: a non-directory
    entry or a hardlink target spelled so fails there, and must not quietly become "a"."""
    return name.rstrip("/").rpartition("/")[2] == "."


def _check_ranges(m: TarMember) -> None:
    """Refuse values no Linux filesystem (or the manifest format) can hold.

    Negative numbers come only from GNU base-256 fields (the tar reader refuses a sign in an
    octal field): legitimate for an mtime before 1970, meaningless for an owner or a device.
    """
    for name, value in (
        ("uid", m.uid),
        ("gid", m.gid),
        ("devmajor", m.devmajor),
        ("devminor", m.devminor),
    ):
        if not 0 <= value <= _U32:
            raise InvalidInputError(
                f"entry {m.name!r} has {name} {value}, outside 0..{_U32}; the layer is malformed"
            )
    if not _I64_MIN <= m.mtime_ns <= _I64_MAX:
        raise InvalidInputError(f"entry {m.name!r} has an mtime out of range")
    if m.type in (b"3", b"4") and (m.devmajor > DEV_MAJOR_MAX or m.devminor > DEV_MINOR_MAX):
        # Linux's dev_t has 12 major and 20 minor bits: mknod fails with EINVAL on more, so
        # such a layer could never be materialized (GNU tar fails on it too).
        raise InvalidInputError(
            f"device {m.name!r} has number {m.devmajor}:{m.devminor}; Linux devices have "
            f"majors up to {DEV_MAJOR_MAX} and minors up to {DEV_MINOR_MAX}"
        )
    if len(m.linkname.encode("utf-8", "surrogateescape")) > PATH_MAX - 1:
        raise InvalidInputError(f"entry {m.name!r} has a link target over {PATH_MAX - 1} bytes")
    if len(m.xattrs) > 4096:
        raise InvalidInputError(f"entry {m.name!r} has {len(m.xattrs)} xattrs")
    for k, v in m.xattrs.items():
        if not k or len(k.encode("utf-8", "surrogateescape")) > 255 or len(v) > 65536:
            raise InvalidInputError(f"entry {m.name!r} has an oversized xattr {k[:40]!r}")


def _stream_phase(imp: _Importer, blob: BlobReader) -> ImportResult:
    mpath = os.path.join(imp.stage, "manifest.tmp")
    tspath = os.path.join(imp.stage, "tarsplit.tmp")
    dirs = PathSet()
    nondirs = PathSet()
    entries = 0
    # The parent directory whose ancestors were last checked.  Every ancestor checked is
    # recorded in ``dirs`` and a path in ``dirs`` can never become a non-directory (refused
    # below), so a sibling of the previous entry needs no second walk up its ancestors.
    checked_parent = ""
    with open(mpath, "wb") as mf, open(tspath, "wb") as tsf:
        split = TarSplitWriter(tsf)
        tar = TarReader(blob, recorder=split)
        mw = ManifestWriter(mf)
        imp.mw = mw
        for m in tar:
            entries += 1
            path = normalize(m.name)
            _check_ranges(m)
            if imp.hooks is not None:
                imp.hooks.check_member(m, path)
            slash = path.rfind("/")
            if slash > 0 and path[:slash] != checked_parent:
                for anc in ancestors(path):
                    if anc in nondirs:
                        raise UnsafePathError(
                            f"entry {m.name!r} would be written through non-directory {anc!r} "
                            "(a symlink or file earlier in the layer)"
                        )
                    dirs.add(anc)
                checked_parent = path[:slash]
            e = Entry(path, REG, mode=m.mode, uid=m.uid, gid=m.gid, mtime_ns=m.mtime_ns)
            e.xattrs = m.xattrs
            typ = m.type
            if typ == b"5":
                if path in nondirs:
                    raise InvalidInputError(f"entry {m.name!r} is a directory and a non-directory")
                e.kind = DIR
                dirs.add(path)
            else:
                if path == "." or path in dirs:
                    raise InvalidInputError(
                        f"entry {m.name!r} replaces a directory with a non-directory"
                    )
                if _last_is_dot(m.name):
                    raise InvalidInputError(
                        f"entry {m.name!r} is not a directory, but a name ending in '/.' can "
                        "only be one"
                    )
                if not nondirs.add(path):
                    imp.replaces += 1  # tar semantics: the later entry wins
                if m.isreg():
                    size = m.size
                    e.size = size
                    imp.files += 1
                    imp.logical += size
                    if size <= INLINE_MAX:
                        e.inline = tar.read_exact(size, m.name) if size else b""
                        imp.inline += 1
                        if size and len(imp.tiny) < _TINY_MAX:
                            imp.tiny[sha256_of(e.inline)] = e.inline
                    elif imp.hooks is not None and (pre := imp.hooks.take_prestaged(path)):
                        e.digest = imp.add_prestaged(tar, size, pre)  # type: ignore[arg-type]
                    elif size <= MEM_MAX:
                        imp.add_file(e, path, tar.read_exact(size, m.name))
                        imp.maybe_flush_pins()
                        continue  # written out once the writers have named its content
                    else:
                        e.digest = imp.add_stream(tar, size)  # type: ignore[arg-type]
                    if imp.hooks is not None and e.digest is not None:
                        imp.hooks.content_digest(path, e.digest)
                elif typ == b"2":
                    e.kind = SYMLINK
                    if not m.linkname:
                        raise InvalidInputError(f"symlink {m.name!r} has an empty target")
                    e.linkname = m.linkname
                elif typ == b"1":
                    e.kind = HARDLINK
                    target = normalize(m.linkname, "hardlink target")
                    if m.linkname.endswith("/") or _last_is_dot(m.linkname):
                        raise UnsafePathError(
                            f"hardlink {m.name!r} points to {m.linkname!r}, which can only "
                            "resolve to a directory"
                        )
                    if target == path or target not in nondirs:
                        raise UnsafePathError(
                            f"hardlink {m.name!r} points to {m.linkname!r}, which is not an "
                            "earlier file of this layer"
                        )
                    e.linkname = target
                elif typ in (b"3", b"4"):
                    e.kind = CHAR if typ == b"3" else BLOCK
                    e.devmajor, e.devminor = m.devmajor, m.devminor
                elif typ == b"6":
                    e.kind = FIFO
                else:
                    raise InvalidInputError(f"entry {m.name!r} has unsupported tar type {typ!r}")
            imp.emit(e)
        tar.drain_rest()
        warnings = list(tar.warnings)
        if tar.warning_count > len(warnings):
            warnings.append(f"... and {tar.warning_count - len(warnings)} more warnings")
        imp.drain_writes()
        if imp.entries:
            raise StoreError("internal error: manifest entries left unwritten; please report this")
        imp._flush_pins()
        mw.close()
        split.close()
    # Manifest and tar-split are objects like any other: hashed, staged under their digest.
    mb3, tsb3 = b"", b""
    for path in (mpath, tspath):
        with open(path, "rb") as f:
            data = f.read()
        os.unlink(path)
        if path == mpath:
            mb3 = imp.add_content(data)
        else:
            tsb3 = imp.add_content(data)
    imp._flush_pins()
    imp.drain_writes()
    imp.tarsplit = tsb3
    imp.tar_bytes = split.total
    return ImportResult(
        diff_id="",
        compressed_digest="",
        compression=blob.compression,
        manifest=mb3.hex(),
        entries=entries,
        files=imp.files,
        logical_bytes=imp.logical,
        inline_files=imp.inline,
        warnings=warnings,
    )


# -- directories -------------------------------------------------------------------------------
def tar_directory(root: str, out: BinaryIO) -> None:
    """Write a deterministic PAX tar of a directory (sorted names, xattrs, numeric owners).

    Importing a directory goes through this, so a directory layer gets a real DiffID and the
    same validation as any tar.  Runs in a thread writing into a pipe.
    """
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tf:
        seen_inodes: dict[tuple[int, int], str] = {}

        def add(rel: str, full: str) -> None:
            st = os.lstat(full)
            ti = tf.gettarinfo(full, arcname=rel)
            if ti is None:
                return  # a socket: tar skips those too; they cannot be part of a layer
            ti.uname = ti.gname = ""
            ti.pax_headers = {}
            ns = st.st_mtime_ns
            if ns % 1_000_000_000:
                ti.pax_headers["mtime"] = f"{ns // 1_000_000_000}.{ns % 1_000_000_000:09d}"
            try:
                names = os.listxattr(full, follow_symlinks=False)
            except OSError:
                names = []
            for name in sorted(names):
                try:
                    val = os.getxattr(full, name, follow_symlinks=False)
                except OSError:
                    continue
                ti.pax_headers["SCHILY.xattr." + name] = val.decode("utf-8", "surrogateescape")
            if ti.isreg() and st.st_nlink > 1:
                key = (st.st_dev, st.st_ino)
                if key in seen_inodes:
                    ti.type = tarfile.LNKTYPE
                    ti.linkname = seen_inodes[key]
                    ti.size = 0
                    tf.addfile(ti)
                    return
                seen_inodes[key] = rel
            if ti.isreg():
                with open(full, "rb") as f:
                    tf.addfile(ti, f)
            else:
                tf.addfile(ti)

        def walk(rel: str, full: str) -> None:
            with os.scandir(full) as it:
                names = sorted(de.name for de in it)
            for name in names:
                r = name if rel == "." else f"{rel}/{name}"
                f = os.path.join(full, name)
                add(r, f)
                if os.path.isdir(f) and not os.path.islink(f):
                    walk(r, f)

        add(".", root)
        walk(".", root)


def import_directory(
    repo: Repo, root: str, progress: Callable[[int], None] | None = None
) -> ImportResult:
    if not os.path.isdir(root):
        raise InvalidInputError(f"{root} is not a directory")
    rfd, wfd = os.pipe()
    err: list[BaseException] = []

    def producer() -> None:
        try:
            with open(wfd, "wb", buffering=1 << 20) as w:
                tar_directory(root, w)
        except BrokenPipeError:
            pass
        except BaseException as exc:  # reported by the consumer
            err.append(exc)

    t = threading.Thread(target=producer, daemon=True)
    t.start()
    with open(rfd, "rb", buffering=1 << 20) as r:
        try:
            result = import_tar(repo, r, progress, source=f"dir:{os.path.abspath(root)}")
        finally:
            r.close()
            t.join()
    if err:
        raise InvalidInputError(f"reading {root} failed: {err[0]}")
    return result


__all__ = ["Expected", "ImportResult", "import_tar", "import_directory", "detect_compression"]


def import_path(
    repo: Repo,
    path: str,
    progress: Callable[[int], None] | None = None,
    *,
    shortcut: bool = True,
    image_owned: bool = False,
) -> ImportResult:
    """Import from a tar file or a directory.  A tar file whose sha256 is already a stored
    layer's compressed digest is recognised without being parsed (``shortcut=False`` forces
    the full import)."""
    if os.path.isdir(path):
        return import_directory(repo, path, progress)
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise InvalidInputError(f"cannot open {path}: {exc.strerror}") from None
    with f:
        return import_tar(
            repo,
            f,
            progress,
            source=os.path.abspath(path),
            shortcut=shortcut,
            image_owned=image_owned,
        )
