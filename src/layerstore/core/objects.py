"""ObjectWriter: how new content becomes objects, for any operation that adds content.

An import (a tar, a zstd:chunked partial import, a directory, fsck re-creating lost objects)
hands content to one :class:`ObjectWriter`; it knows nothing of where the content came from.
It does the part of docs/concurrency.md that belongs to object creation:

* **Dedup before writing.**  Content is hashed (blake3; sha256 for new content) on two writer
  threads; content the index already has is *pinned* against this process's lease (a short
  write transaction per batch, :meth:`ObjectWriter.pin_pending`) and never written again.  A
  pin re-checks the record under the write lock, and a record gc has doomed counts as gone.
* **Stage under the final name.**  New content is created 0444 in this operation's staging
  directory as ``<blake3>.<sha256>`` (a crash leaves only a staging directory that gc
  discards whole).  A background ``syncfs`` every 16 MiB starts writeback early.
* **Publish** (:meth:`ObjectWriter.publish`): ``syncfs`` makes the staged data durable; then,
  in write transactions of at most :data:`PUBLISH_BATCH` objects, each object is renamed into
  ``objects/``, recorded (refcount 0) and pinned, and a second ``syncfs`` makes the renames
  durable before the records commit.  This is the one write transaction that renames and
  syncs while holding LMDB's write lock, deliberately: a record and its file must appear
  together for every other writer (an importer that finds a record reuses it at once; a gc
  that finds a file without a record may unlink it).  Readers never wait for it (LMDB readers
  take no lock); docs/concurrency.md (invariant 6) says what it costs concurrent writers.

What the writer pinned is in :attr:`ObjectWriter.pinned`; the caller's commit turns those pins
into references (core.protocol.commit_layer) and :meth:`ObjectWriter.close` lets go of what
was not committed.
"""

from __future__ import annotations

import collections
import errno
import os
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, BinaryIO, Final

from ..errors import ConcurrencyError, InvalidInputError
from . import leases, protocol
from .digests import DigestSet, DualHasher, blake3_of, sha256_of
from .fsutil import syncfs
from .index import ObjectRecord
from .repo import Repo

try:  # the optional C fast path (src/layerstore/_fastpath.c); same results without it
    from .. import _fastpath  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - no compiler where it was installed
    _fastpath = None
# An extension built from an older source (a stale in-place build) may lack it.
_stage_files: Callable[[list[tuple[bytes, bytes]]], list[int]] | None = getattr(
    _fastpath, "stage_files", None
)

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
# What a writer thread did with a file's content.
_NEW, _KNOWN, _DUP = 0, 1, 2
_READ: Final = 1 << 20

# One item for the writer threads: (blake3 or None, sha256 or None, data, caller's token).
_Item = tuple[bytes | None, bytes | None, bytes, Any]


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


def hash_stream(f: BinaryIO, size: int, h: DualHasher, out: BinaryIO | None) -> None:
    """Read exactly ``size`` bytes of one file's content, hashing (and copying to ``out``)."""
    left = size
    while left:
        buf = f.read(min(_READ, left))
        if not buf:
            raise InvalidInputError("the input ends inside a file's data (truncated)")
        h.update(buf)
        if out is not None:
            out.write(buf)
        left -= len(buf)


class ObjectWriter:
    """Adds content to the store for one operation (see the module docstring).

    ``stage`` is the operation's staging directory (``Repo.new_staging_dir``); the writer keeps
    its files in ``stage/objects``.  Content handed to :meth:`submit` is named later, in
    submission order: ``on_named(token, blake3)`` is called for each, then ``on_settled()``
    once per batch of results, from the thread that called into the writer.
    """

    def __init__(
        self,
        repo: Repo,
        stage: str,
        on_named: Callable[[Any, bytes], None] | None = None,
        on_settled: Callable[[], None] | None = None,
    ) -> None:
        self.repo = repo
        self.idx = repo.index
        self.lease = repo.lease.id
        self.on_named = on_named
        self.on_settled = on_settled
        self.stage = stage
        self.obj_stage = os.path.join(stage, "objects")
        os.mkdir(self.obj_stage)
        # Opened before anything is staged: a writeback error on this filesystem from here on
        # is reported to publish's syncfs through this descriptor (Linux >= 5.8 reports
        # syncfs errors per open file, to descriptors opened before the error).
        self.stage_fd = os.open(stage, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.fanout_made: set[str] = set()
        self.pending: list[tuple[bytes, bytes, int, bytes | None]] = []
        self.pending_bytes = 0
        self.pinned = DigestSet()  # every object this writer pinned (exact, compact)
        self.new_objects = 0
        self.new_bytes = 0
        self.reused = 0
        self.batch: list[_Item] = []
        self.batch_bytes = 0
        # Early writeback: a background syncfs every _FLUSH_EVERY staged bytes, so the one
        # that publish must wait for finds little left to write.
        self.flusher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stage-flush")
        self.flushing: Future[None] | None = None
        self.unflushed = 0
        self.known_txn: Any = None
        self.known_uses = 0
        self.writers = ThreadPoolExecutor(max_workers=2, thread_name_prefix="stage-writer")
        self.inflight: collections.deque[tuple[Future[list[tuple[bytes, int]]], list[_Item]]] = (
            collections.deque()
        )
        self.inflight_bytes = 0
        self.closed = False

    # staging -----------------------------------------------------------------------------
    def temp_path(self, name: str) -> str:
        """A path in this writer's staging directory for a file the caller assembles itself
        and later hands to :meth:`adopt` (same filesystem as objects/: adoption renames)."""
        return os.path.join(self.obj_stage, f"{name}.tmp")

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
        return self.idx.has_object(self.known_txn, b3)

    def _end_known(self) -> None:
        if self.known_txn is not None:
            self.known_txn.abort()
            self.known_txn = None

    # in-memory content: hashed, checked and written by the writer threads -----------------
    def submit(self, data: bytes, token: Any) -> None:
        """Content in memory whose digest the caller learns later (``on_named``).  The
        caller's thread only hands over; blake3, the "already stored?" lookup, sha256 and the
        staging write run in the writer threads, one hand-off per batch of ~64 files (a
        hand-off per file cost more than a small file's syscalls)."""
        self._queue(None, None, data, token)

    def add_bytes(self, data: bytes) -> bytes:
        """Content in memory, named now (a manifest, a tar-split): reused if known (pinned at
        the next :meth:`pin_pending`), else staged.  Returns its blake3."""
        b3 = blake3_of(data)
        if self.pinned and b3 in self.pinned:
            self.reused += 1
        elif self._known(b3):
            self.pending.append((b3, b"", len(data), data))
            self.pending_bytes += len(data)
        else:
            self._queue(b3, None, data, None)
        return b3

    def add_stream(self, f: BinaryIO, size: int) -> bytes:
        """A large file: stream it to staging while hashing, then dedup by digest."""
        h = DualHasher(size)
        tmp = os.path.join(self.obj_stage, f"stream-{time.monotonic_ns()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444)
        with open(fd, "wb") as out:  # objects are read-only from birth
            hash_stream(f, size, h, out)
        return self._adopt(tmp, h.blake3(), h.sha256(), size)

    def adopt(self, f: BinaryIO, size: int, staged: str) -> bytes:
        """A file the caller already assembled at :meth:`temp_path` (a partial import): hash
        what ``f`` says it holds and adopt the staged file instead of writing a copy (its
        cloned extents stay shared)."""
        h = DualHasher(size)
        hash_stream(f, size, h, None)
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
            self.pin_pending()
        else:
            os.rename(tmp, path)
            self.new_objects += 1
            self.new_bytes += size
        return b3

    def _queue(self, b3: bytes | None, sha: bytes | None, data: bytes, token: Any) -> None:
        self.batch.append((b3, sha, data, token))
        self.batch_bytes += len(data)
        if len(self.batch) >= _WRITE_BATCH or self.batch_bytes >= _WRITE_BATCH_BYTES:
            self.flush_batch()

    def flush_batch(self) -> None:
        """Hand the partial batch to the writers now (the caller is about to wait for a
        token's name), keeping what is in flight bounded in batches and bytes."""
        if not self.batch:
            return
        batch = self.batch
        self.inflight.append((self.writers.submit(self._write_files, batch), batch))
        self.inflight_bytes += self.batch_bytes
        self.batch = []
        self.batch_bytes = 0
        while len(self.inflight) > _MAX_INFLIGHT or self.inflight_bytes > _MAX_INFLIGHT_BYTES:
            self.collect()

    def collect(self) -> None:
        """Take the oldest batch's results: name the tokens, count what was written, queue
        what is already stored for pinning.  A no-op when nothing is in flight."""
        if not self.inflight:
            return
        fut, batch = self.inflight.popleft()
        results = fut.result()
        on_named = self.on_named
        for (b3, status), (_b3, sha, data, token) in zip(results, batch, strict=True):
            self.inflight_bytes -= len(data)
            if token is not None and on_named is not None:
                on_named(token, b3)
            if status == _NEW:
                self.new_objects += 1
                self.new_bytes += len(data)
                self.unflushed += len(data)
            elif status == _KNOWN:
                if self.pinned and b3 in self.pinned:
                    self.reused += 1
                else:
                    self.pending.append((b3, sha or b"", len(data), data))
                    self.pending_bytes += len(data)
        if self.on_settled is not None:
            self.on_settled()
        if self.unflushed >= _FLUSH_EVERY and (self.flushing is None or self.flushing.done()):
            if self.flushing is not None:
                self.flushing.result()  # a writeback error fails the operation here
            self.unflushed = 0
            self.flushing = self.flusher.submit(self._flush_early)

    def drain(self) -> None:
        """Wait until every submitted item is named and written."""
        self.flush_batch()
        while self.inflight:
            self.collect()

    def _flush_early(self) -> None:
        fd = os.open(self.stage, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            syncfs(fd)
        finally:
            os.close(fd)

    def _write_files(self, batch: list[_Item]) -> list[tuple[bytes, int]]:
        """A writer thread: (blake3, status) per item.  Content the index has is not written
        (``_KNOWN``: the caller's thread pins it); new content is created 0444 under its final
        staged name ``<b3>.<sha256>``.  The same content twice in one operation meets O_EXCL
        (``_DUP``).  A crash mid-write leaves a partial file only in this lease's staging
        directory, which is discarded whole."""
        out: list[tuple[bytes, int]] = []
        files: list[tuple[bytes, bytes]] = []
        where: list[int] = []
        txn = None
        try:
            for b3, sha, data, _token in batch:
                if b3 is None:  # hashlib and blake3 release the GIL: this overlaps the parser
                    b3 = blake3_of(data)
                    if txn is None:
                        txn = self.idx.read()
                    if self.idx.has_object(txn, b3):
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

    # pins -----------------------------------------------------------------------------------
    def pin_pending_if_full(self) -> None:
        """Pin the known digests seen so far once a batch's worth is waiting."""
        if len(self.pending) >= PIN_BATCH or self.pending_bytes >= PIN_BATCH_BYTES:
            self.pin_pending()

    def pin_pending(self) -> None:
        """Pin the batch of known digests (one short write transaction); content whose record
        vanished or was doomed meanwhile is staged instead."""
        pending, self.pending = self.pending, []
        self.pending_bytes = 0
        if not pending:
            return
        lost: dict[bytes, tuple[bytes, int, bytes | None]] = {}
        idx = self.idx
        with idx.write() as txn:
            for b3, sha, size, data in pending:
                if b3 in self.pinned or b3 in lost:
                    continue
                # A record being unlinked by gc (doomed) is as good as gone: write our own.
                if idx.has_object(txn, b3) and not idx.is_doomed(txn, b3):
                    leases.pin_objects(idx, txn, self.lease, [b3])
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
                self.new_objects += 1
                self.new_bytes += size

    # publish --------------------------------------------------------------------------------
    def publish(self) -> None:
        """Make staged objects durable, rename them into objects/, record and pin them."""
        self.drain()
        if not self.fanout_made:
            return  # nothing new (a re-import): no syncfs, no write transaction
        # No need to wait for a background flush still running: syncfs also waits for the
        # writeback that one started, and reports its errors through ``stage_fd``.
        dfd = self.stage_fd
        syncfs(dfd)
        # The staged names carry both digests; scanning them keeps memory flat however many
        # objects there are.
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
        for _attempt in range(600):
            live = leases.LivenessChecker(self.repo.leases_dir, own=self.lease)
            busy = False
            with idx.write() as txn:
                # Check every digest before renaming anything: an aborted attempt must leave
                # the staged files where the retry expects them.  (No gc at work: nothing to
                # check.)
                if idx.any_doomed(txn):
                    for _src, b3, _sha, _size in batch:
                        owner = idx.doomed_by(txn, b3)
                        if owner is not None:
                            if live.alive(owner):
                                busy = True  # a live gc is unlinking this digest right now
                                break
                            idx.undoom(txn, b3)  # that gc died; its intent is void
                if busy:
                    txn.abort()
                else:
                    new = [item for item in batch if not idx.has_object(txn, item[1])]
                    self._rename_all([(src, self.repo.object_path(b3)) for src, b3, _, _ in new])
                    for _src, b3, sha, size in new:
                        idx.put_object(txn, b3, ObjectRecord(size, sha, 0))
                        idx.put_sha256(txn, sha, b3)
                    leases.pin_objects(idx, txn, self.lease, [b3 for _, b3, _, _ in batch])
                    syncfs(dfd)  # the renames are durable before the records commit
            if not busy:
                self.pinned.update(b3 for _, b3, _, _ in batch)
                return
            time.sleep(0.05)
        raise ConcurrencyError("gc kept objects of this import doomed for 30 s; retry the import")

    # end ------------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the threads and let go of every pin not turned into a reference by a commit
        (core.protocol.commit_layer drops the pins it converts).  The caller removes the
        staging directory.  Safe to call twice."""
        if self.closed:
            return
        self.closed = True
        self._end_known()
        self.writers.shutdown(wait=True, cancel_futures=True)
        self.flusher.shutdown(wait=True, cancel_futures=True)
        os.close(self.stage_fd)
        protocol.release_import_pins(self.repo, self.pinned)


__all__ = ["PIN_BATCH", "PUBLISH_BATCH", "ObjectWriter", "hash_stream"]
