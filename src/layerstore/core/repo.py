"""The core handle on a store directory: layout, format file, identity, index and lease.

Layout of a store root (docs/format.md has the details)::

    layerstore.json     {"format": 1, "uuid", "index_generation"}: format refused if newer
                        than this build; the identity the index must carry (_open_index)
    index/              LMDB environment (data.mdb, lock.mdb)
    layers/<diffid>.json  derived copy of each layer record (rebuilds a lost index)
    quarantine/         corrupt files fsck --repair moved aside (never deleted silently)
    objects/00..ff/     immutable 0444 files named by blake3 hex (fan-out by first byte)
    staging/<lease>/    per-process scratch space on the same filesystem
    leases/<lease>.lock one flock-held file per process that has the store open
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import secrets
import shutil
import time
from collections.abc import Iterator
from typing import Any, Final

import lmdb

from ..errors import FormatVersionError, StoreError
from . import leases
from .digests import is_hex_name
from .index import DB_NAMES, Index, ObjectRecord, index_error
from .manifest import REG, Entry, read_manifest

FORMAT_VERSION: Final = 1
FORMAT_FILE: Final = "layerstore.json"


def is_backup_name(name: str) -> bool:
    return len(name) == 69 and name.endswith(".json") and is_hex_name(name[:64])


class Repo:
    """The core handle on one store directory, for one process.

    It owns what every operation shares: the layout (paths of ``objects/``, ``staging/``,
    ``leases/``, ``layers/``), the format file and the store's identity, the open index and
    this process's lease.  Operations (``layerstore.ops``) take a ``Repo``; the porcelain
    (:class:`layerstore.store.Store`) wraps one.  It knows nothing of tar, OCI or zstd:chunked.

    Open one per process (LMDB environments do not cross fork); :meth:`close` releases the
    lease and this process's staging space.
    """

    def __init__(
        self,
        root: str,
        *,
        create: bool = False,
        for_fsck: bool = False,
        rebuilding: bool = False,
    ) -> None:
        """Open (``create``: create if absent) the store at ``root``.

        The index must be this store's own (see :meth:`_open_index`): a missing, empty,
        foreign or stale one is refused with a :class:`StoreError` that says to run
        ``layerstore fsck --rebuild-index`` -- the one caller that passes ``rebuilding``.
        ``for_fsck`` opens a store whose ``objects/`` is missing, so fsck can report it as
        damage instead of being refused.
        """
        self.root = os.path.abspath(root)
        # Chunk plain-tar imports as they commit, for zstd:chunked chunk reuse
        # (layerstore.ops.chunkindex).  Off by default: it costs ~1 s of CPU per 190 MB (+50% on a
        # first import) for a measured gain of a few dozen KB on minbase v1 -> v2
        # (docs/benchmarks.md); `chunk_index()` / `layerstore chunk-index` backfill on demand.
        self.index_chunks = os.environ.get("LAYERSTORE_CHUNK_INDEX", "0") == "1"
        self.objects_dir = os.path.join(self.root, "objects")
        self.staging_dir = os.path.join(self.root, "staging")
        self.leases_dir = os.path.join(self.root, "leases")
        self.layers_dir = os.path.join(self.root, "layers")
        # Image records' backups, as layers/ holds layer records' (core.images.write_backup).
        self.images_dir = os.path.join(self.root, "images")
        self.quarantine_dir = os.path.join(self.root, "quarantine")
        self.index_dir = os.path.join(self.root, "index")
        self.fmt_path = os.path.join(self.root, FORMAT_FILE)
        new = create and not os.path.lexists(self.fmt_path)
        if new:
            self._create_layout()
        elif create:
            # An existing store: recreate only scratch directories.  objects/, layers/ and
            # index/ hold the store's data; recreating one empty would hide its loss.
            # (An empty layers/ loses nothing: fsck --repair rewrites the backups.)
            for d in (self.staging_dir, self.leases_dir, self.layers_dir, self.images_dir):
                os.makedirs(d, exist_ok=True)
        if not new:
            self._fmt = self._check_format()
        if not os.path.isdir(self.objects_dir) and not (for_fsck or rebuilding):
            raise StoreError(
                f"{self.objects_dir} is missing (or not a directory): the store's content is "
                "gone. Restore it from a backup, or run `layerstore fsck --repair --source "
                "STORE_OR_TARBALL` to recreate it and re-fetch what the layers need"
            )
        self.index = self._open_index(new=new, rebuilding=rebuilding)
        self.lease = leases.Lease(self.leases_dir)
        self._stage_seq = itertools.count()
        # DiffIDs whose removal this process has committed: their backups in layers/ go
        # next (layers.remove_dropped_backups re-checks each against the index first).
        self.dropped: list[bytes] = []

    # -- layout --------------------------------------------------------------------------
    def _create_layout(self) -> None:
        """A new store: directories, then the index with a fresh identity, then
        ``layerstore.json`` last -- a store is a store once that file exists, and by then its
        index carries the identity the file names."""
        if self._has_content():
            # layerstore.json is gone, but objects or backups are not: starting an empty
            # store over them would let the next gc delete them.
            raise StoreError(
                f"{self.root} has no {FORMAT_FILE} but holds objects or layer backups of a "
                f'store; recreate {self.fmt_path} with {{"format": {FORMAT_VERSION}}} and '
                "then run `layerstore fsck --rebuild-index`"
            )
        os.makedirs(self.root, exist_ok=True)
        for d in (
            self.objects_dir,
            self.staging_dir,
            self.leases_dir,
            self.layers_dir,
            self.images_dir,
        ):
            os.makedirs(d, exist_ok=True)
        for i in range(256):
            os.makedirs(os.path.join(self.objects_dir, f"{i:02x}"), exist_ok=True)
        self._fmt = {"format": FORMAT_VERSION, "created": time.time()}

    def _write_format(self, fmt: dict[str, Any]) -> None:
        """Replace ``layerstore.json`` atomically (a unique temporary name: two processes may
        write the same identity at once)."""
        tmp = f"{self.fmt_path}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        with open(tmp, "w") as f:
            json.dump(fmt, f, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, self.fmt_path)
        dfd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        self._fmt = fmt

    def _check_format(self) -> dict[str, Any]:
        fmt_path = self.fmt_path
        try:
            with open(fmt_path) as f:
                fmt = json.load(f)
        except FileNotFoundError:
            raise StoreError(
                f"{self.root} is not a layerstore store (no {FORMAT_FILE}); "
                "create one with `layerstore init`"
            ) from None
        except (OSError, ValueError) as exc:
            raise StoreError(f"cannot read {fmt_path}: {exc}") from None
        version = fmt.get("format") if isinstance(fmt, dict) else None
        if version != FORMAT_VERSION:
            raise FormatVersionError(
                f"{self.root} has on-disk format {version!r}; this layerstore reads format "
                f"{FORMAT_VERSION}. Use a layerstore release that supports it"
            )
        assert isinstance(fmt, dict)
        return fmt

    # -- the store's identity: this index and no other ---------------------------------------
    def _has_content(self) -> bool:
        """Does the store hold anything an index would have to know: a layer backup or an
        object file?  Stops at the first one found (a store of millions of objects costs a
        few directory reads here, an empty one 257)."""
        with contextlib.suppress(OSError), os.scandir(self.layers_dir) as it:
            if any(is_backup_name(de.name) for de in it):
                return True
        for i in range(256):
            with contextlib.suppress(OSError), os.scandir(self._p("objects", f"{i:02x}")) as it:
                if any(is_hex_name(de.name) for de in it):
                    return True
        return False

    def _lost_index(self, why: str) -> StoreError:
        return StoreError(
            f"the index {self.index_dir} {why}; nothing was changed (objects/ and the layer "
            "backups in layers/ are untouched): run `layerstore fsck --rebuild-index` to "
            "rebuild the index from them"
        )

    def _index_agrees(self, idx: Index) -> bool:
        """Can an index without a recorded identity be this store's?  Every layer backup
        names a layer it holds, and it records objects if objects/ holds any.  (A lost index
        replaced by a new one fails this as soon as the store holds anything.)"""
        layers, objects = idx.db.get(b"layers"), idx.db.get(b"objects")
        with idx.read() as txn:
            with contextlib.suppress(FileNotFoundError), os.scandir(self.layers_dir) as it:
                for de in it:
                    if is_backup_name(de.name) and (
                        layers is None or txn.get(bytes.fromhex(de.name[:64]), db=layers) is None
                    ):
                        return False
            if objects is not None and txn.stat(objects)["entries"]:
                return True
        return not self._has_content()

    @staticmethod
    def _identity(idx: Index, txn: lmdb.Transaction) -> tuple[str | None, str | None, bool]:
        """(uuid, generation, format recorded?) from the index's ``meta``."""
        if b"meta" not in idx.db:
            return None, None, False
        return (
            idx.get_meta(txn, "store_uuid"),
            idx.get_meta(txn, "index_generation"),
            idx.get_meta(txn, "format") is not None,
        )

    def _open_index(self, *, new: bool, rebuilding: bool) -> Index:
        """Open ``index/`` and make sure it is this store's.

        ``layerstore.json`` and the index's ``meta`` both record the store's ``uuid`` and
        the ``index_generation`` (bumped by every rebuild).  A missing or empty index, one
        of another store, or an older generation (a stale copy) is refused, before anything
        is written to it: opening it would show an empty or wrong store, and gc would delete
        what the true index references.  A store from before identities existed is adopted
        when its index agrees with the backups and objects (:meth:`_index_agrees`); the
        index is written first, so a crash in between is adopted again on the next open.
        """
        uuid = self._fmt.get("uuid")
        data = os.path.join(self.index_dir, "data.mdb")
        try:
            fresh = os.path.getsize(data) == 0
        except FileNotFoundError:
            fresh = True
        except OSError as exc:
            raise StoreError(f"cannot read the index {data}: {exc.strerror}") from None
        if fresh and not (new or rebuilding) and (uuid is not None or self._has_content()):
            what = "is missing" if not os.path.isdir(self.index_dir) else "is empty"
            raise self._lost_index(what + " (it was deleted or never written)")
        idx = Index(self.index_dir, create_dbs=False)
        try:
            self._check_identity(idx, new=new, rebuilding=rebuilding)
        except lmdb.Error as exc:
            idx.close()
            raise index_error(exc, "opening the store", self.index_dir) from None
        except BaseException:
            idx.close()
            raise
        return idx

    def _check_identity(self, idx: Index, *, new: bool, rebuilding: bool) -> None:
        fmt = self._fmt
        uuid, gen = fmt.get("uuid"), fmt.get("index_generation")
        with idx.read() as txn:
            got_uuid, got_gen, has_format = self._identity(idx, txn)
        complete = has_format and len(idx.db) == len(DB_NAMES)
        if rebuilding:
            pass  # rebuild_index stamps the identity when it is done (_stamp_identity)
        elif uuid is not None:
            if got_uuid is None:
                raise self._lost_index("is empty or new: it records no store identity")
            if got_uuid != uuid:
                raise self._lost_index(
                    f"belongs to another store (its uuid is {got_uuid}, {self.fmt_path} says "
                    f"{uuid})"
                )
            if got_gen != str(gen):
                raise self._lost_index(
                    f"is of generation {got_gen}, but {self.fmt_path} says {gen} (an older "
                    "copy of the index, from before a rebuild?)"
                )
            if complete:
                return
        elif not (new or self._index_agrees(idx)):
            raise self._lost_index(
                "does not know this store's layers or objects (it is empty, or another store's)"
                if got_uuid is None
                else f"belongs to another store (uuid {got_uuid})"
            )
        idx.create_missing_dbs()
        with idx.write() as txn:
            got_uuid, got_gen, has_format = self._identity(idx, txn)
            if not has_format:
                idx.put_meta(txn, "format", str(FORMAT_VERSION))
            if rebuilding or uuid is not None:
                return
            if got_uuid is None:  # a new store, or an old one adopted
                got_uuid, got_gen = secrets.token_hex(16), "1"
                idx.put_meta(txn, "store_uuid", got_uuid)
                idx.put_meta(txn, "index_generation", got_gen)
        # The index knows its identity now; record it (also when a process that wrote the
        # index died before writing layerstore.json).
        self._write_format({**fmt, "uuid": got_uuid, "index_generation": int(got_gen or 1)})

    def stamp_identity(self) -> None:
        """After a rebuild: the index becomes the next generation of this store's index
        (index first, then layerstore.json; a crash in between leaves them disagreeing,
        which is refused until the rebuild is run again)."""
        fmt = self._fmt
        uuid = fmt.get("uuid") or secrets.token_hex(16)
        gen = int(fmt.get("index_generation") or 0) + 1
        with self.index.write() as txn:
            self.index.put_meta(txn, "store_uuid", uuid)
            self.index.put_meta(txn, "index_generation", str(gen))
        self._write_format({**fmt, "uuid": uuid, "index_generation": gen})

    def _p(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    def object_path(self, b3: bytes) -> str:
        h = b3.hex()
        return os.path.join(self.objects_dir, h[:2], h)

    def new_staging_dir(self, kind: str) -> str:
        """A fresh directory under ``staging/<lease>/``; gc removes those of dead processes."""
        d = os.path.join(self.staging_dir, self.lease.id.hex(), f"{kind}-{next(self._stage_seq)}")
        os.makedirs(d)
        return d

    def close(self) -> None:
        try:
            self.index.close()
        finally:
            self.lease.release()
            shutil.rmtree(os.path.join(self.staging_dir, self.lease.id.hex()), ignore_errors=True)

    def __enter__(self) -> Repo:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading objects ---------------------------------------------------------------------------
    def manifest_entries(self, manifest_b3: bytes) -> Iterator[Entry]:
        path = self.object_path(manifest_b3)
        try:
            f = open(path, "rb")
        except FileNotFoundError:
            raise StoreError(
                f"manifest object {manifest_b3.hex()} is missing; run `layerstore fsck`"
            ) from None
        with f:
            yield from read_manifest(f)

    def object_refs(self, manifest_b3: bytes) -> Iterator[bytes]:
        """The object digests a manifest references, one per reference."""
        for e in self.manifest_entries(manifest_b3):
            if e.kind == REG and e.digest is not None:
                yield e.digest

    def get_object(self, b3: bytes) -> ObjectRecord | None:
        with self.index.read() as txn:
            return self.index.get_object(txn, b3)

    def lookup_sha256(self, sha: bytes) -> bytes | None:
        """blake3 name of the object whose sha256 is ``sha`` (OCI / TOC digests)."""
        with self.index.read() as txn:
            raw = txn.get(sha, db=self.index.db[b"sha256"])
        return None if raw is None else bytes(raw)
