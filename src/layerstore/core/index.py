"""The LMDB index: what objects exist, who references them, who is reading them.

LMDB gives one writer at a time across all processes and lock-free snapshot readers, and a
committed write transaction is durable.  Every state change of the store is one write
transaction, so the index is always consistent; files on disk are made to follow the index in an
order that leaves only *orphans* (files with no record) after a crash, never records without
files (see docs/concurrency.md).

Named databases (keys are raw 32-byte digests unless noted; the layout is in docs/format.md):

``meta``        format version, the store identity (uuid, generation), store-wide settings
``objects``     blake3 -> size u64, sha256, refcount u64
``sha256``      sha256 -> blake3 (OCI digests and TOC digests resolve here)
``layers``      DiffID -> JSON layer record
``compressed``  compressed-blob sha256 -> DiffID
``blob_sizes``  size u64 big-endian + compressed-blob sha256 -> "" (a hint: which blob sizes
                the re-import shortcut should hash at all; entries without an alias are stale)
``pins``        blake3 -> lease id (dupsort): objects a live operation is about to read/publish
``lease_pins``  lease id + blake3 -> "" (reverse map, to drop a dead lease's pins)
``layer_pins``  DiffID + lease id -> "" (a materialization reading a layer)
``doomed``      blake3 -> lease id of the gc that is unlinking it right now
``chunks``      chunk sha256 -> blake3, offset, length (zstd:chunked reuse)
``images``      image name -> JSON image record (manifest, config, ordered layer DiffIDs)
"""

from __future__ import annotations

import errno
import json
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final

import lmdb

from ..errors import StoreError

DB_NAMES: Final = (
    b"meta",
    b"objects",
    b"sha256",
    b"layers",
    b"compressed",
    b"blob_sizes",
    b"pins",
    b"lease_pins",
    b"layer_pins",
    b"doomed",
    b"chunks",
    b"images",
)
_DUPSORT: Final = {b"pins"}
_OBJ = struct.Struct("<Q32sQ")

# Address space only: LMDB grows the file as needed.  256 GiB is far beyond the ~200 bytes per
# object a store of millions of objects needs, and costs nothing on 64-bit systems.
DEFAULT_MAP_SIZE: Final = 1 << 38


_META = struct.Struct("<IIQQ48s48sQQ")  # magic, version, address, mapsize, dbs[2], last_pg, txnid
_LMDB_MAGIC = 0xBEEFC0DE
_P_INVALID = (1 << 64) - 1


def check_data_file(path: str) -> None:
    """Refuse an LMDB data file whose B-tree roots lie past its end (a truncated file).

    LMDB memory-maps the file; touching a page past a truncated end kills the process with
    SIGBUS instead of raising.  Opening reads the roots of the free-page and main databases
    named in the newer meta page (by transaction id), so those must lie inside the file.  (The
    meta's last-page number is no test: pages allocated and freed in one transaction are never
    written, so a healthy file can be shorter than it.)  ``fsck`` additionally probes the whole
    index in a child process, which survives a SIGBUS anywhere deeper.
    """
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(2 * 65536)
    except FileNotFoundError:
        return  # a new index
    if size == 0:
        return
    metas = []
    for page in (0, 1):
        off = 0 if page == 0 else (metas[0][2] if metas else -1)
        if off < 0:
            break
        raw = head[off + 16 : off + 16 + _META.size]
        if len(raw) < _META.size:
            break
        magic, _ver, _addr, _mapsize, free_db, main_db, _last_pg, txnid = _META.unpack(raw)
        if magic != _LMDB_MAGIC:
            break
        psize = struct.unpack_from("<I", free_db, 0)[0]  # md_pad of the free DB holds it
        if psize < 512 or psize & (psize - 1):
            break
        roots = [struct.unpack_from("<Q", db, 40)[0] for db in (free_db, main_db)]
        metas.append((txnid, roots, psize))
    if not metas:
        raise StoreError(
            f"the index data file {path} is not an LMDB file (bad meta page); "
            "run `layerstore fsck --rebuild-index`"
        )
    _txnid, roots, psize = max(metas)
    pages = size // psize
    for root in roots:
        if root != _P_INVALID and root >= pages:
            raise StoreError(
                f"the index data file {path} is truncated ({size} bytes; its tree root is "
                f"page {root}); run `layerstore fsck --rebuild-index` to recreate the index "
                "from objects/ and layers/"
            )


# LMDB's answers for a data file whose pages do not make sense: the file is damaged, and no
# retry or free space helps.  (MapFullError, DiskError, PanicError... are write failures.)
_DAMAGE: Final = (
    lmdb.CorruptedError,
    lmdb.PageNotFoundError,
    lmdb.InvalidError,
    lmdb.VersionMismatchError,
    lmdb.BadValsizeError,
)


def index_damaged(path: str, exc: lmdb.Error) -> StoreError:
    """A damaged index as an error that says what to do: rebuild it (the objects and the
    layer backups are what it is rebuilt from, and they are not touched)."""
    return StoreError(
        f"the index {path} is damaged and cannot be read ({exc}); objects/ and the layer "
        "backups in layers/ are not affected: run `layerstore fsck --rebuild-index` to rebuild "
        "the index from them"
    )


def index_error(exc: lmdb.Error, what: str, path: str = "index/") -> StoreError:
    """An LMDB failure as an error a user can act on.  A damaged data file says so (see
    :func:`index_damaged`); otherwise the usual cause is a full filesystem under the store
    (LMDB then reports ENOSPC or EIO from its page writes).  Nothing of the failed
    transaction is visible; after such a failure LMDB refuses further writes in this process,
    so the store must be reopened."""
    if isinstance(exc, _DAMAGE):
        return index_damaged(path, exc)
    return StoreError(
        f"{what} failed: the index could not be written ({exc}). Nothing of it was recorded. "
        "If the filesystem holding the store is full, free space (`layerstore gc` removes what "
        "this left behind), then open the store again and retry"
    )


# LMDB's lock file: a header plus one 64-byte slot per reader (max_readers=1024), rounded up.
_LOCK_FILE_BYTES = 256 * 1024


def _reserve_lock_file(path: str) -> None:
    """Give ``lock.mdb`` its disk blocks before LMDB maps it.

    LMDB memory-maps the lock file and writes reader slots through the mapping; on a full
    filesystem a freshly created (sparse) lock file then kills the process with SIGBUS at the
    first write instead of failing a call (seen with ``fsck --rebuild-index`` on a full tmpfs).
    Allocating the blocks up front turns that into ENOSPC here, which we can report.  An
    existing, allocated file costs one no-op fallocate.
    """
    lock = os.path.join(path, "lock.mdb")
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except FileNotFoundError:
        return  # no index directory: lmdb.open reports it
    try:
        os.posix_fallocate(fd, 0, _LOCK_FILE_BYTES)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StoreError(
                f"no space left to open the index at {path}: free space on the filesystem "
                "holding the store and retry"
            ) from None
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise
    finally:
        os.close(fd)


# ``partial.diff_id_proof`` of a layer keyed by a DiffID nothing verified (a TOC-only partial
# import: the tar was synthesized from the TOC, so its sha256 proves nothing).
UNPROVED: Final = "unverified (TOC only)"


def layer_unproved(rec: dict[str, Any]) -> bool:
    """Does this layer record rest on a DiffID the import could not prove?

    Such a record is only a claim by whoever supplied the TOC: it must never stand in for the
    layer a proving import brings (that import replaces it), nor be what a compressed digest
    is taken to mean, and images built on it say so."""
    partial = rec.get("partial")
    return isinstance(partial, dict) and partial.get("diff_id_proof") == UNPROVED


def blob_size_key(size: int, comp: bytes) -> bytes:
    """Key of the ``blob_sizes`` hint: big-endian size first, so one size is one key range."""
    return size.to_bytes(8, "big") + comp


@dataclass(frozen=True, slots=True)
class ObjectRecord:
    size: int
    sha256: bytes
    refs: int

    def pack(self) -> bytes:
        return _OBJ.pack(self.size, self.sha256, self.refs)

    @staticmethod
    def unpack(raw: bytes) -> ObjectRecord:
        """Decode an ``objects`` value; a value of the wrong length is index damage, reported
        as such (a bare ``struct.error`` would be a traceback that names nothing)."""
        try:
            size, sha, refs = _OBJ.unpack(raw)
        except struct.error:
            raise StoreError(
                f"an object record in the index is corrupt ({len(raw)} bytes, not "
                f"{_OBJ.size}); run `layerstore fsck --rebuild-index`"
            ) from None
        return ObjectRecord(size, sha, refs)


def encode_layer_record(rec: dict[str, Any]) -> bytes:
    """A ``layers`` value: the layer record as JSON with sorted keys (docs/format.md)."""
    return json.dumps(rec, sort_keys=True).encode()


def decode_layer_record(raw: bytes) -> dict[str, Any]:
    """Decode a ``layers`` value.  Anything but a JSON object is index damage: a StoreError
    that says how to recover (the layer backups in ``layers/`` rebuild it), never a bare
    JSON or recursion error."""
    try:
        rec = json.loads(raw)
    except (ValueError, RecursionError):
        rec = None
    if not isinstance(rec, dict):
        raise StoreError(
            "a layer record in the index is corrupt (not a JSON object); run "
            "`layerstore fsck --rebuild-index` to rebuild it from the layers/ backups"
        )
    return rec


class Index:
    """Thin owner of the LMDB environment and its named databases for one process.

    An LMDB environment must not cross ``fork()``: a child process opens its own Store.
    """

    def __init__(
        self,
        path: str,
        readonly: bool = False,
        map_size: int = DEFAULT_MAP_SIZE,
        create_dbs: bool = True,
    ):
        """Open the environment at ``path``.  ``create_dbs=False`` opens only the named
        databases that exist, without writing (:meth:`create_missing_dbs` adds the rest):
        a store looks at an index's identity before it changes anything in it."""
        self.path = path
        self.pid = os.getpid()
        check_data_file(os.path.join(path, "data.mdb"))
        if not readonly:
            _reserve_lock_file(path)
        try:
            self.env = lmdb.open(
                path,
                map_size=map_size,
                max_dbs=len(DB_NAMES) + 4,
                max_readers=1024,
                subdir=True,
                readonly=readonly,
                create=not readonly,
                lock=True,
                sync=True,
                metasync=True,
                readahead=True,  # bulk passes sweep the b-tree in key order
            )
        except lmdb.Error as exc:
            if isinstance(exc, _DAMAGE):
                raise index_damaged(path, exc) from None
            raise StoreError(f"cannot open the index at {path}: {exc}") from None
        self.db: dict[bytes, Any] = {}
        try:
            # Readers that died (kill -9) leave stale slots; clear them so they neither pin
            # old pages forever nor exhaust max_readers.
            if not readonly:
                self.env.reader_check()
            # A write transaction, though nothing is created here: handles opened in a read
            # transaction die with it.  LMDB writes nothing when a transaction changed nothing.
            with self.env.begin(write=not readonly) as txn:
                for name in DB_NAMES:
                    try:
                        self.db[name] = self.env.open_db(
                            name, txn=txn, create=False, dupsort=name in _DUPSORT
                        )
                    except lmdb.NotFoundError:
                        continue
            if create_dbs and not readonly:
                self.create_missing_dbs()
        except lmdb.Error as exc:
            self.env.close()
            raise index_error(exc, "opening the index", path) from None

    def create_missing_dbs(self) -> None:
        missing = [n for n in DB_NAMES if n not in self.db]
        if not missing:
            return
        with self.env.begin(write=True) as txn:
            for name in missing:
                self.db[name] = self.env.open_db(
                    name, txn=txn, create=True, dupsort=name in _DUPSORT
                )

    def close(self) -> None:
        self.env.close()

    def read(self) -> lmdb.Transaction:
        return self.env.begin(write=False, buffers=False)

    def write(self) -> lmdb.Transaction:
        return self.env.begin(write=True)

    # -- objects ---------------------------------------------------------------------------
    def get_object(self, txn: lmdb.Transaction, b3: bytes) -> ObjectRecord | None:
        raw = txn.get(b3, db=self.db[b"objects"])
        return None if raw is None else ObjectRecord.unpack(raw)

    def put_object(self, txn: lmdb.Transaction, b3: bytes, rec: ObjectRecord) -> None:
        txn.put(b3, rec.pack(), db=self.db[b"objects"])

    def has_object(self, txn: lmdb.Transaction, b3: bytes) -> bool:
        """Is there a record for this digest (without decoding it)?"""
        return txn.get(b3, db=self.db[b"objects"]) is not None

    def put_sha256(self, txn: lmdb.Transaction, sha: bytes, b3: bytes) -> None:
        """Record the sha256 -> blake3 mapping of new content (sha256 lookups: OCI, fsck)."""
        txn.put(sha, b3, db=self.db[b"sha256"])

    # -- doomed: objects a gc is unlinking (docs/concurrency.md, reaping) -------------------
    def any_doomed(self, txn: lmdb.Transaction) -> bool:
        """Is any gc mid-unlink?  (One stat: the common case checks nothing per digest.)"""
        return bool(txn.stat(self.db[b"doomed"])["entries"])

    def is_doomed(self, txn: lmdb.Transaction, b3: bytes) -> bool:
        return txn.get(b3, db=self.db[b"doomed"]) is not None

    def doomed_by(self, txn: lmdb.Transaction, b3: bytes) -> bytes | None:
        """The lease of the gc that doomed this digest, if one did."""
        owner: bytes | None = txn.get(b3, db=self.db[b"doomed"])
        return owner

    def undoom(self, txn: lmdb.Transaction, b3: bytes) -> None:
        """Void a dead gc's intent to unlink this digest."""
        txn.delete(b3, db=self.db[b"doomed"])

    def add_refs(self, txn: lmdb.Transaction, b3: bytes, delta: int) -> ObjectRecord:
        """Change an object's reference count; a missing record here is index corruption."""
        rec = self.get_object(txn, b3)
        if rec is None:
            raise StoreError(
                f"index has a reference to object {b3.hex()} but no record of it; "
                "run `layerstore fsck --repair`"
            )
        refs = rec.refs + delta
        if refs < 0:
            refs = 0  # never wrap; fsck reports and rebuilds counts from manifests
        new = ObjectRecord(rec.size, rec.sha256, refs)
        self.put_object(txn, b3, new)
        return new

    def add_refs_many(
        self, txn: lmdb.Transaction, digests: Iterable[bytes], delta: int, chunk: int = 1 << 16
    ) -> None:
        """Apply ``delta`` once per occurrence, in sorted chunks through one cursor.

        A layer's manifest lists its objects in path order, which is random in digest order;
        sorting each chunk turns random page accesses into a sweep (and repeats into one
        update), which is what makes removing a 100k-file layer fast.  Bounded memory.
        """
        batch: list[bytes] = []
        for d in digests:
            batch.append(d)
            if len(batch) >= chunk:
                self._apply_sorted(txn, batch, delta)
                batch = []
        if batch:
            self._apply_sorted(txn, batch, delta)

    def _apply_sorted(self, txn: lmdb.Transaction, batch: list[bytes], delta: int) -> None:
        batch.sort()
        cur = txn.cursor(db=self.db[b"objects"])
        i = 0
        n = len(batch)
        while i < n:
            d = batch[i]
            j = i + 1
            while j < n and batch[j] == d:
                j += 1
            if not cur.set_key(d):
                raise StoreError(
                    f"index has a reference to object {d.hex()} but no record of it; "
                    "run `layerstore fsck --repair`"
                )
            rec = ObjectRecord.unpack(cur.value())
            cur.put(d, _OBJ.pack(rec.size, rec.sha256, max(0, rec.refs + delta * (j - i))))
            i = j

    # -- layers ----------------------------------------------------------------------------
    def get_layer(self, txn: lmdb.Transaction, diff_id: bytes) -> dict[str, Any] | None:
        raw = txn.get(diff_id, db=self.db[b"layers"])
        return None if raw is None else decode_layer_record(raw)

    def put_layer(self, txn: lmdb.Transaction, diff_id: bytes, rec: dict[str, Any]) -> None:
        txn.put(diff_id, encode_layer_record(rec), db=self.db[b"layers"])

    def iter_layers(self, txn: lmdb.Transaction) -> list[tuple[bytes, dict[str, Any]]]:
        cur = txn.cursor(db=self.db[b"layers"])
        return [(bytes(k), decode_layer_record(v)) for k, v in cur]

    # -- images ----------------------------------------------------------------------------
    def get_image(self, txn: lmdb.Transaction, name: str) -> dict[str, Any] | None:
        raw = txn.get(name.encode(), db=self.db[b"images"])
        return None if raw is None else json.loads(raw)

    def put_image(self, txn: lmdb.Transaction, name: str, rec: dict[str, Any]) -> None:
        txn.put(name.encode(), json.dumps(rec).encode(), db=self.db[b"images"])

    def delete_image(self, txn: lmdb.Transaction, name: str) -> None:
        txn.delete(name.encode(), db=self.db[b"images"])

    def iter_images(self, txn: lmdb.Transaction) -> list[tuple[str, dict[str, Any]]]:
        cur = txn.cursor(db=self.db[b"images"])
        return [(bytes(k).decode(), json.loads(v)) for k, v in cur]

    # -- compressed blobs ------------------------------------------------------------------
    def has_blob_of_size(self, txn: lmdb.Transaction, size: int) -> bool:
        """Could a stored layer's compressed blob have this size?  The re-import shortcut
        hashes a file only then: a first import skips that whole extra read.  A hint: entries
        whose alias is gone are skipped here and dropped by :meth:`sweep_blob_sizes`."""
        prefix = size.to_bytes(8, "big")
        comp_db = self.db[b"compressed"]
        cur = txn.cursor(db=self.db[b"blob_sizes"])
        if not cur.set_range(prefix):
            return False
        for k in cur.iternext(values=False):
            if k[:8] != prefix:
                return False
            if txn.get(k[8:], db=comp_db) is not None:
                return True
        return False

    def sweep_blob_sizes(self) -> int:
        """Drop size hints whose compressed alias is gone (gc's last step)."""
        comp_db = self.db[b"compressed"]
        return self.sweep(b"blob_sizes", lambda txn, k, _v: txn.get(k[8:], db=comp_db) is None)

    def sweep(
        self,
        name: bytes,
        stale: Callable[[lmdb.Transaction, bytes, bytes], bool],
        batch: int = 8192,
    ) -> int:
        """Delete the keys of database ``name`` that ``stale(txn, key, value)`` condemns, in
        bounded write transactions over a cursor (the write lock is never held for long).  The
        check and the delete share a transaction, so nothing changes between them.  Returns
        how many were deleted."""
        db = self.db[name]
        dropped = 0
        start = b""
        while True:
            with self.write() as txn:
                cur = txn.cursor(db=db)
                if not cur.set_range(start):
                    return dropped
                doomed: list[bytes] = []
                n = 0
                done = True
                for k, v in cur.iternext():
                    k = bytes(k)
                    if n >= batch:
                        start, done = k, False
                        break
                    n += 1
                    if stale(txn, k, bytes(v)):
                        doomed.append(k)
                for k in doomed:  # after the scan: deleting under a live cursor would skip keys
                    txn.delete(k, db=db)
                dropped += len(doomed)
            if done:
                return dropped

    # -- meta ------------------------------------------------------------------------------
    def get_meta(self, txn: lmdb.Transaction, key: str) -> str | None:
        raw = txn.get(key.encode(), db=self.db[b"meta"])
        return None if raw is None else bytes(raw).decode()

    def put_meta(self, txn: lmdb.Transaction, key: str, value: str) -> None:
        txn.put(key.encode(), value.encode(), db=self.db[b"meta"])
