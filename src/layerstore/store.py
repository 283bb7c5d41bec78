"""The public face of layerstore: :class:`Store`.

Everything a caller does goes through a ``Store``: import a layer, list, show, materialize,
remove, account for space.  Modules below it each do one job (``ingest``, ``materialize``,
``manifest``, ``index``, ``leases``, ``fsutil``); this module holds the store layout, the
transactions that change what layers exist, and nothing else.

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
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO, Final

import lmdb

from .core import protocol
from .core.digests import DigestSet, is_hex_name, parse_hex
from .core.index import DB_NAMES, Index, ObjectRecord, blob_size_key, index_error, layer_unproved
from .core.manifest import REG, Entry, read_manifest
from .errors import (
    AmbiguousError,
    ConcurrencyError,
    CorruptObjectError,
    DestinationError,
    FormatVersionError,
    InUseError,
    InvalidInputError,
    NotFoundError,
    StoreError,
)

FORMAT_VERSION: Final = 1
FORMAT_FILE: Final = "layerstore.json"
ENV_STORE: Final = "LAYERSTORE_STORE"


def sha256_hex(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def default_store_path() -> str:
    """``$LAYERSTORE_STORE``, else ``$XDG_DATA_HOME/layerstore``, else ``~/.local/share/...``."""
    env = os.environ.get(ENV_STORE)
    if env:
        return env
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "share"
    )
    return os.path.join(base, "layerstore")


@dataclass(frozen=True)
class LayerInfo:
    """A layer as the index records it."""

    diff_id: str
    manifest: str
    compressed: tuple[str, ...]
    entries: int
    files: int
    bytes: int
    created: float
    source: str
    compression: str
    state: str
    tarsplit: str = ""
    # zstd:chunked partial imports: how it was read and what proves the DiffID (else None)
    partial: dict[str, Any] | None = None
    # Keyed by a DiffID nothing verified (TOC-only import): a proving import replaces it.
    unproved: bool = False

    @staticmethod
    def from_record(diff_id: bytes, rec: dict[str, Any]) -> LayerInfo:
        return LayerInfo(
            unproved=layer_unproved(rec),
            diff_id="sha256:" + diff_id.hex(),
            manifest=rec["manifest"],
            compressed=tuple("sha256:" + c for c in rec.get("compressed", [])),
            entries=rec["entries"],
            files=rec["files"],
            bytes=rec["bytes"],
            created=rec["created"],
            source=rec.get("source", ""),
            compression=rec.get("compression", ""),
            state=rec.get("state", "live"),
            tarsplit=rec.get("tarsplit", ""),
            partial=rec.get("partial"),
        )

    def to_json(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["compressed"] = list(self.compressed)
        return d


def _is_backup_name(name: str) -> bool:
    return len(name) == 69 and name.endswith(".json") and is_hex_name(name[:64])


class Store:
    """A layerstore at ``root``.  Open one per process (LMDB environments do not cross fork).

    Use as a context manager, or call :meth:`close`: closing releases this process's lease.
    """

    def __init__(
        self,
        root: str,
        *,
        create: bool = False,
        for_fsck: bool = False,
        _rebuilding: bool = False,
    ) -> None:
        """Open (``create``: create if absent) the store at ``root``.

        The index must be this store's own (see :meth:`_open_index`): a missing, empty,
        foreign or stale one is refused with a :class:`StoreError` that says to run
        ``layerstore fsck --rebuild-index`` -- the one caller that passes ``_rebuilding``.
        ``for_fsck`` opens a store whose ``objects/`` is missing, so fsck can report it as
        damage instead of being refused.
        """
        self.root = os.path.abspath(root)
        # Chunk plain-tar imports as they commit, for zstd:chunked chunk reuse
        # (layerstore.chunkindex).  Off by default: it costs ~1 s of CPU per 190 MB (+50% on a
        # first import) for a measured gain of a few dozen KB on minbase v1 -> v2
        # (docs/benchmarks.md); `chunk_index()` / `layerstore chunk-index` backfill on demand.
        self.index_chunks = os.environ.get("LAYERSTORE_CHUNK_INDEX", "0") == "1"
        self.objects_dir = os.path.join(self.root, "objects")
        self.staging_dir = os.path.join(self.root, "staging")
        self.leases_dir = os.path.join(self.root, "leases")
        self.layers_dir = os.path.join(self.root, "layers")
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
            for d in (self.staging_dir, self.leases_dir, self.layers_dir):
                os.makedirs(d, exist_ok=True)
        if not new:
            self._fmt = self._check_format()
        if not os.path.isdir(self.objects_dir) and not (for_fsck or _rebuilding):
            raise StoreError(
                f"{self.objects_dir} is missing (or not a directory): the store's content is "
                "gone. Restore it from a backup, or run `layerstore fsck --repair --source "
                "STORE_OR_TARBALL` to recreate it and re-fetch what the layers need"
            )
        self.index = self._open_index(new=new, rebuilding=_rebuilding)
        self.lease = protocol.Lease(self.leases_dir)
        self._stage_seq = itertools.count()
        self._dropped: list[bytes] = []

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
        for d in (self.objects_dir, self.staging_dir, self.leases_dir, self.layers_dir):
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
            if any(_is_backup_name(de.name) for de in it):
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
                    if _is_backup_name(de.name) and (
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

    def _stamp_identity(self) -> None:
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

    # -- lifecycle -------------------------------------------------------------------------
    @classmethod
    def init(cls, root: str) -> Store:
        return cls(root, create=True)

    def close(self) -> None:
        try:
            self.index.close()
        finally:
            self.lease.release()
            import shutil

            shutil.rmtree(os.path.join(self.staging_dir, self.lease.id.hex()), ignore_errors=True)

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- import ----------------------------------------------------------------------------
    def import_tar(
        self,
        stream: BinaryIO,
        progress: Callable[[int], None] | None = None,
        source: str = "",
        image_owned: bool = False,
    ) -> Any:
        """Import a layer from a tar stream (plain, gzip or zstd, detected by magic bytes)."""
        from .ops.ingest import import_tar

        return import_tar(self, stream, progress, source, image_owned=image_owned)

    def import_path(
        self,
        path: str,
        progress: Callable[[int], None] | None = None,
        shortcut: bool = True,
        image_owned: bool = False,
    ) -> Any:
        """Import from a tar file, ``-`` (stdin), or a directory.

        A tar file whose sha256 is already a stored layer's compressed digest is recognised
        without being parsed (``shortcut=False`` forces the full import)."""
        from .ops.ingest import import_directory, import_tar

        if path == "-":
            return import_tar(self, sys.stdin.buffer, progress, source="stdin")
        if os.path.isdir(path):
            return import_directory(self, path, progress)
        try:
            f = open(path, "rb")
        except OSError as exc:
            raise InvalidInputError(f"cannot open {path}: {exc.strerror}") from None
        with f:
            return import_tar(
                self,
                f,
                progress,
                source=os.path.abspath(path),
                shortcut=shortcut,
                image_owned=image_owned,
            )

    def _commit_layer(
        self,
        diff_id: bytes,
        comp: bytes | None,
        manifest_b3: bytes,
        info: dict[str, Any],
        pinned: DigestSet,
        blob_size: int | None = None,
    ) -> str:
        """Phase 3 of an import: the layer record and its references, in one transaction.

        Returns ``"new"``, ``"present"`` (the layer was stored already: no references are
        added) or ``"proved"``: the stored record's DiffID was unproved (a TOC-only import,
        which anyone can key by any DiffID) and this import proves it, so this import's
        manifest and tar-split *replace* the unproved ones -- an unproved record must never
        stand in for the real layer.  The old objects lose their references (gc-able garbage
        unless something else uses them); image counts and ``standalone`` carry over, as the
        images listing that DiffID meant the real layer.  An unproved import never replaces
        anything.  ``blob_size``: the compressed blob's size, recorded as the re-import
        shortcut's hint.
        """
        idx = self.index
        with idx.write() as txn:
            rec = idx.get_layer(txn, diff_id)
            outcome = "present" if rec is not None else "new"
            if rec is not None and layer_unproved(rec) and not layer_unproved(info):
                self._check_unread(txn, diff_id)
                self._count_layer_refs(txn, manifest_b3, info, +1)
                # after the +1s: shared objects never hit 0
                self._count_layer_refs(txn, parse_hex(rec["manifest"]), rec, -1)
                for c in rec.get("compressed", []):  # none expected: it never read a blob
                    txn.delete(bytes.fromhex(c), db=idx.db[b"compressed"])
                rec = {
                    "manifest": manifest_b3.hex(),
                    "compressed": [],
                    "created": time.time(),
                    "state": "live",
                    **info,
                    "images": rec.get("images", 0),
                    "standalone": bool(rec.get("standalone") or info.get("standalone")),
                }
                outcome = "proved"
            elif rec is None:
                self._count_layer_refs(txn, manifest_b3, info, +1)
                rec = {
                    "manifest": manifest_b3.hex(),
                    "compressed": [],
                    "created": time.time(),
                    "state": "live",
                    **info,
                }
            else:
                if rec.get("state") == "deleted":
                    rec["state"] = "live"  # removed while pinned; references never dropped
                if info.get("standalone"):
                    rec["standalone"] = True
            # A partial import never read the whole blob, so it records no compressed digest
            # (``comp`` None): the re-import shortcut must only ever trust a verified one --
            # and never map a blob to an unproved layer.
            if comp is not None and not layer_unproved(rec):
                if comp.hex() not in rec["compressed"]:
                    rec["compressed"].append(comp.hex())
                txn.put(comp, diff_id, db=idx.db[b"compressed"])
                if blob_size is not None:
                    txn.put(blob_size_key(blob_size, comp), b"", db=idx.db[b"blob_sizes"])
            idx.put_layer(txn, diff_id, rec)
            protocol.unpin_objects(idx, txn, self.lease.id, pinned)
        pinned.clear()
        self._write_layer_backup(diff_id, rec)
        return outcome

    def _count_layer_refs(
        self, txn: lmdb.Transaction, manifest_b3: bytes, rec: dict[str, Any], delta: int
    ) -> None:
        """``delta`` (+1 or -1) on every reference a layer record makes: the objects its
        manifest lists, the manifest itself and its tar-split (``rec["tarsplit"]``)."""
        idx = self.index
        idx.add_refs_many(txn, self._object_refs(manifest_b3), delta)
        idx.add_refs(txn, manifest_b3, delta)
        if rec.get("tarsplit"):
            idx.add_refs(txn, bytes.fromhex(rec["tarsplit"]), delta)

    def _check_unread(self, txn: lmdb.Transaction, diff_id: bytes) -> None:
        """Refuse to swap a layer's manifest while a live process reads the old one: its
        objects must keep their references until that reader is done (invariant 5)."""
        live = protocol.LivenessChecker(self.leases_dir, own=self.lease.id)
        if any(live.alive(p) for p in protocol.layer_pinners(self.index, txn, diff_id)):
            raise ConcurrencyError(
                f"layer sha256:{diff_id.hex()} (unproved DiffID) is being read by another "
                "process; nothing was imported. Retry this import once that has finished"
            )

    # -- layer backups: derived copies of layer records, for rebuilding a lost index ---------
    def _layer_backup_path(self, diff_id: bytes) -> str:
        return os.path.join(self.layers_dir, diff_id.hex() + ".json")

    def _write_layer_backup(self, diff_id: bytes, rec: dict[str, Any]) -> None:
        """Written *after* the index commit (the index is authoritative; fsck reconciles)."""
        path = self._layer_backup_path(diff_id)
        tmp = f"{path}.{self.lease.id.hex()}.tmp"
        with open(tmp, "w") as f:
            json.dump({"diff_id": diff_id.hex(), **rec}, f, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, path)

    def _remove_layer_backups(self) -> None:
        """Drop backups of layers whose removal has committed (re-checked against the index, so
        an aborted transaction can never cost a live layer its backup)."""
        while self._dropped:
            diff_id = self._dropped.pop()
            with self.index.read() as txn:
                if self.index.get_layer(txn, diff_id) is not None:
                    continue
            try:
                os.unlink(self._layer_backup_path(diff_id))
            except FileNotFoundError:
                pass

    def release_import_pins(self, pinned: DigestSet) -> None:
        if not pinned:
            return
        with self.index.write() as txn:
            protocol.unpin_objects(self.index, txn, self.lease.id, pinned)

    # -- queries ---------------------------------------------------------------------------
    def _manifest_entries(self, manifest_b3: bytes) -> Iterator[Entry]:
        path = self.object_path(manifest_b3)
        try:
            f = open(path, "rb")
        except FileNotFoundError:
            raise StoreError(
                f"manifest object {manifest_b3.hex()} is missing; run `layerstore fsck`"
            ) from None
        with f:
            yield from read_manifest(f)

    def _object_refs(self, manifest_b3: bytes) -> Iterator[bytes]:
        """The object digests a manifest references, one per reference."""
        for e in self._manifest_entries(manifest_b3):
            if e.kind == REG and e.digest is not None:
                yield e.digest

    def layers(self, include_deleted: bool = False) -> list[LayerInfo]:
        with self.index.read() as txn:
            out = [LayerInfo.from_record(k, r) for k, r in self.index.iter_layers(txn)]
        if not include_deleted:
            out = [li for li in out if li.state == "live"]
        return sorted(out, key=lambda li: li.created)

    def resolve(self, ref: str) -> bytes:
        """A layer's DiffID from: a full or prefixed DiffID, or a compressed-blob digest."""
        text = ref.removeprefix("sha256:").lower()
        if not text or any(c not in "0123456789abcdef" for c in text):
            raise InvalidInputError(f"{ref!r} is not a layer id (hex DiffID or digest prefix)")
        idx = self.index
        with idx.read() as txn:
            if len(text) == 64:
                raw = bytes.fromhex(text)
                rec = idx.get_layer(txn, raw)
                if rec is not None and rec.get("state", "live") == "live":
                    return raw
                alias = txn.get(raw, db=idx.db[b"compressed"])
                if alias is not None:
                    return bytes(alias)
                raise NotFoundError(f"no layer {ref} (neither DiffID nor compressed digest)")
            matches = [
                k
                for k, rec in idx.iter_layers(txn)
                if k.hex().startswith(text) and rec.get("state", "live") == "live"
            ]
        if not matches:
            raise NotFoundError(f"no layer matches {ref!r}; `layerstore ls` lists them")
        if len(matches) > 1:
            raise AmbiguousError(f"{ref!r} matches {len(matches)} layers; give more digits")
        return matches[0]

    def layer(self, ref: str) -> LayerInfo:
        diff_id = self.resolve(ref)
        with self.index.read() as txn:
            rec = self.index.get_layer(txn, diff_id)
        if rec is None:
            raise NotFoundError(f"layer {ref} was removed")
        return LayerInfo.from_record(diff_id, rec)

    def _layer_record(self, ref: str) -> dict[str, Any]:
        diff_id = self.resolve(ref)
        with self.index.read() as txn:
            rec = self.index.get_layer(txn, diff_id)
        if rec is None:
            raise NotFoundError(f"layer {ref} was removed")
        return rec

    def entries(self, ref: str) -> Iterator[Entry]:
        """Stream a layer's manifest entries (in tar order)."""
        info = self.layer(ref)
        return self._manifest_entries(parse_hex(info.manifest))

    def get_object(self, b3: bytes) -> ObjectRecord | None:
        with self.index.read() as txn:
            return self.index.get_object(txn, b3)

    def lookup_sha256(self, sha: bytes) -> bytes | None:
        """blake3 name of the object whose sha256 is ``sha`` (OCI / TOC digests)."""
        with self.index.read() as txn:
            raw = txn.get(sha, db=self.index.db[b"sha256"])
        return None if raw is None else bytes(raw)

    # -- materialize -------------------------------------------------------------------------
    def materialize(
        self,
        ref: str,
        dest: str,
        *,
        mode: str = "reflink",
        progress: Callable[[int], None] | None = None,
        workers: int = 0,
        sync: bool = True,
    ) -> Any:
        """Build the layer as a directory tree at ``dest`` (which must not exist)."""
        from .ops.materialize import materialize

        diff_id = self.resolve(ref)
        with self.index.write() as txn:
            rec = self.index.get_layer(txn, diff_id)
            if rec is None or rec.get("state") != "live":
                raise NotFoundError(f"layer {ref} was removed")
            if rec.get("damaged"):
                paths = rec["damaged"]
                raise CorruptObjectError(
                    f"layer sha256:{diff_id.hex()} is damaged: content is missing for "
                    f"{len(paths)} paths (first: {', '.join(paths[:5])}); restore it with "
                    "`layerstore fsck --repair --source STORE_OR_TARBALL`"
                )
            self._require_manifest(diff_id, parse_hex(rec["manifest"]))
            protocol.pin_layer(self.index, txn, self.lease.id, diff_id)
        try:
            return materialize(
                self,
                parse_hex(rec["manifest"]),
                dest,
                mode=mode,
                progress=progress,
                workers=workers,
                sync=sync,
                total_files=rec["files"],
                ordered=bool(rec.get("replaces")),
            )
        finally:
            self._unpin_layer(diff_id)

    def materialize_image(
        self,
        name: str,
        dest: str,
        *,
        mode: str = "reflink",
        progress: Callable[[int], None] | None = None,
        sync: bool = True,
        diff_dirs: bool = False,
    ) -> Any:
        """Build image ``name`` as one flattened root filesystem at ``dest`` (whiteouts and
        opaque directories resolved) -- or, with ``diff_dirs``, one overlayfs-ready lower
        directory per layer under ``dest/`` (``0``, ``1``, ... bottom first)."""
        from .ops.materialize import materialize, materialize_flat

        im = self.image(name)
        diff_ids = [bytes.fromhex(h) for h in im["layers"]]
        manifests: list[bytes] = []
        pinned: list[bytes] = []
        try:
            with self.index.write() as txn:
                for d in diff_ids:
                    rec = self.index.get_layer(txn, d)
                    if rec is None or rec.get("state") != "live" or rec.get("damaged"):
                        raise CorruptObjectError(
                            f"image {name!r}: layer sha256:{d.hex()} is missing or damaged; "
                            "run `layerstore fsck`"
                        )
                    self._require_manifest(d, parse_hex(rec["manifest"]))
                    protocol.pin_layer(self.index, txn, self.lease.id, d)
                    pinned.append(d)
                    manifests.append(parse_hex(rec["manifest"]))
            if not diff_dirs:
                return materialize_flat(
                    self, manifests, dest, mode=mode, progress=progress, sync=sync
                )
            if os.path.lexists(dest):
                raise DestinationError(f"{dest} exists; materialize creates a new directory")
            os.mkdir(dest, 0o755)
            try:
                return [
                    materialize(
                        self,
                        m,
                        os.path.join(dest, str(i)),
                        mode=mode,
                        progress=progress,
                        sync=sync,
                        ordered=True,
                        overlay=True,
                    )
                    for i, m in enumerate(manifests)
                ]
            except BaseException:
                # all or nothing, like the flattened form: drop the layers already built
                shutil.rmtree(dest, ignore_errors=True)
                raise
        finally:
            for d in pinned:
                self._unpin_layer(d)

    def _require_manifest(self, diff_id: bytes, manifest_b3: bytes) -> None:
        """Refuse to start a materialization whose manifest object is gone (checked while
        the layer is being pinned, so gc cannot take it afterwards): an error that says what
        to run instead of a failure halfway through building the tree."""
        if not os.path.isfile(self.object_path(manifest_b3)):
            raise CorruptObjectError(
                f"layer sha256:{diff_id.hex()}: its manifest object {manifest_b3.hex()} is "
                f"missing from {self.objects_dir}; run `layerstore fsck --repair --source "
                "STORE_OR_TARBALL` to restore it"
            )

    def _unpin_layer(self, diff_id: bytes) -> None:
        idx = self.index
        with idx.write() as txn:
            protocol.unpin_layer(idx, txn, self.lease.id, diff_id)
            rec = idx.get_layer(txn, diff_id)
            if rec is not None and rec.get("state") == "deleted":
                live = protocol.LivenessChecker(self.leases_dir)
                if not any(live.alive(p) for p in protocol.layer_pinners(idx, txn, diff_id)):
                    self._drop_layer_refs(txn, diff_id, rec)
        self._remove_layer_backups()

    # -- remove ----------------------------------------------------------------------------
    def remove(self, ref: str) -> dict[str, Any]:
        """Drop a layer's references in one transaction.  Never unlinks a file (gc does).

        If a live process is materializing the layer, the layer disappears from listings now
        and its references are dropped when that process unpins it (or dies).
        """
        diff_id = self.resolve(ref)
        idx = self.index
        t0 = time.monotonic()
        with idx.write() as txn:
            rec = idx.get_layer(txn, diff_id)
            if rec is None or rec.get("state") != "live":
                raise NotFoundError(f"layer {ref} was removed already")
            if rec.get("images", 0) > 0:
                users = [n for n, im in self._iter_images(txn) if diff_id.hex() in im["layers"]]
                raise InUseError(
                    f"layer sha256:{diff_id.hex()} is used by image(s) {', '.join(users)}; "
                    "remove those with `layerstore rmi` (it goes with the last of them)"
                )
            deferred = self._drop_or_defer(txn, diff_id, rec)
        if deferred:
            self._write_layer_backup(diff_id, rec)
        self._remove_layer_backups()
        return {
            "diff_id": "sha256:" + diff_id.hex(),
            "deferred": deferred,
            "seconds": time.monotonic() - t0,
        }

    def _drop_or_defer(self, txn: lmdb.Transaction, diff_id: bytes, rec: dict[str, Any]) -> bool:
        """Remove a layer now, or hide it until its live readers unpin it.  True if deferred."""
        live = protocol.LivenessChecker(self.leases_dir, own=self.lease.id)
        if any(live.alive(p) for p in protocol.layer_pinners(self.index, txn, diff_id)):
            rec["state"] = "deleted"
            self.index.put_layer(txn, diff_id, rec)
            for c in rec.get("compressed", []):
                txn.delete(bytes.fromhex(c), db=self.index.db[b"compressed"])
            return True
        self._drop_layer_refs(txn, diff_id, rec)
        return False

    # -- images ----------------------------------------------------------------------------
    def _iter_images(self, txn: lmdb.Transaction) -> list[tuple[str, dict[str, Any]]]:
        cur = txn.cursor(db=self.index.db[b"images"])
        return [(bytes(k).decode(), json.loads(v)) for k, v in cur]

    def _unproved_of(self, txn: lmdb.Transaction, layers: list[str]) -> list[str]:
        """The DiffIDs (hex) among an image's layers that rest on no proof (TOC-only imports):
        computed at each query, so a later proving import clears them."""
        out = []
        for h in layers:
            rec = self.index.get_layer(txn, bytes.fromhex(h))
            if rec is not None and layer_unproved(rec):
                out.append(h)
        return out

    def images(self) -> list[dict[str, Any]]:
        """Every image; ``unproved`` lists the layers whose DiffID nothing verified."""
        with self.index.read() as txn:
            out = [
                {
                    "name": n,
                    **{k: v for k, v in im.items() if k not in ("manifest_json", "config_json")},
                    "unproved": self._unproved_of(txn, im["layers"]),
                }
                for n, im in self._iter_images(txn)
            ]
        return sorted(out, key=lambda im: im["name"])

    def image(self, name: str) -> dict[str, Any]:
        with self.index.read() as txn:
            raw = txn.get(name.encode(), db=self.index.db[b"images"])
            if raw is None:
                raise NotFoundError(f"no image {name!r}; `layerstore images` lists them")
            im = json.loads(raw)
            im["unproved"] = self._unproved_of(txn, im["layers"])
        return {"name": name, **im}

    def import_oci(
        self,
        layout: str,
        ref: str | None = None,
        name: str | None = None,
        platform: str | None = None,
        on_layer: Callable[[int, int, dict[str, Any]], None] | None = None,
        partial: bool = True,
        toc_only: bool = False,
    ) -> Any:
        """Import an image from an OCI image layout or a ``docker save`` archive (see
        ``layerstore.oci``); ``on_layer`` reports each layer as it is done; ``partial``: read
        zstd:chunked layers partially."""
        from .ops.oci import import_docker_archive, import_layout

        if os.path.isfile(layout):  # a `docker save` archive
            return import_docker_archive(self, layout, name=name)
        return import_layout(
            self,
            layout,
            ref=ref,
            name=name,
            plat=platform,
            on_layer=on_layer,
            partial=partial,
            toc_only=toc_only,
        )

    def export_oci(self, name: str, path: str, compression: str = "gzip") -> Any:
        """Write image ``name`` as an OCI image layout (see ``layerstore.oci``)."""
        from .ops.oci import export_layout

        return export_layout(self, name, path, compression)

    def _mark_standalone(self, diff_id: bytes) -> None:
        with self.index.write() as txn:
            rec = self.index.get_layer(txn, diff_id)
            if rec is not None and not rec.get("standalone", True):
                rec["standalone"] = True
                self.index.put_layer(txn, diff_id, rec)

    def _commit_image(
        self, name: str, manifest: bytes, config: bytes, layers: list[str], media_type: str
    ) -> None:
        """One transaction: the image record, +1 image reference per layer it lists."""
        import base64

        from .ops.oci import check_image_name

        check_image_name(name)
        idx = self.index
        with idx.write() as txn:
            raw = txn.get(name.encode(), db=idx.db[b"images"])
            old = json.loads(raw) if raw is not None else None
            for d in layers:
                rec = idx.get_layer(txn, bytes.fromhex(d[7:]))
                if rec is None or rec.get("state") != "live":
                    raise ConcurrencyError(f"layer {d} was removed during the import; retry")
                rec["images"] = rec.get("images", 0) + 1
                idx.put_layer(txn, bytes.fromhex(d[7:]), rec)
            record = {
                "manifest_digest": "sha256:" + sha256_hex(manifest),
                "config_digest": "sha256:" + sha256_hex(config),
                "media_type": media_type,
                "layers": [d[7:] for d in layers],
                "created": time.time(),
                "manifest_json": base64.b64encode(manifest).decode(),
                "config_json": base64.b64encode(config).decode(),
            }
            txn.put(name.encode(), json.dumps(record).encode(), db=idx.db[b"images"])
            if old is not None:  # a tag moved: release what the old image held
                for h in old["layers"]:
                    self._release_in_txn(txn, bytes.fromhex(h))
        self._remove_layer_backups()

    def _release_in_txn(self, txn: lmdb.Transaction, diff_id: bytes) -> None:
        rec = self.index.get_layer(txn, diff_id)
        if rec is None:
            return
        rec["images"] = max(0, rec.get("images", 0) - 1)
        if rec["images"] == 0 and not rec.get("standalone", True):
            if rec.get("state") == "live":
                self._drop_or_defer(txn, diff_id, rec)
        else:
            self.index.put_layer(txn, diff_id, rec)

    def _release_image_layer(self, diff_id_text: str) -> None:
        """Undo a layer a failed image import created (it has no image references yet)."""
        diff_id = bytes.fromhex(diff_id_text[7:])
        with self.index.write() as txn:
            rec = self.index.get_layer(txn, diff_id)
            if rec is not None and rec.get("images", 0) == 0 and not rec.get("standalone"):
                self._drop_or_defer(txn, diff_id, rec)
        self._remove_layer_backups()

    def rmi(self, name: str) -> dict[str, Any]:
        """Remove an image: drops its references; layers no other image uses go with it."""
        idx = self.index
        with idx.write() as txn:
            raw = txn.get(name.encode(), db=idx.db[b"images"])
            if raw is None:
                raise NotFoundError(f"no image {name!r}; `layerstore images` lists them")
            im = json.loads(raw)
            txn.delete(name.encode(), db=idx.db[b"images"])
            before = {k for k, _ in idx.iter_layers(txn)}
            for h in im["layers"]:
                self._release_in_txn(txn, bytes.fromhex(h))
            after = {k for k, r in idx.iter_layers(txn) if r.get("state") == "live"}
        self._remove_layer_backups()
        return {"image": name, "layers_removed": len(before - after)}

    def tag(self, src: str, dst: str) -> None:
        """Give image ``src`` another name ``dst`` (both then reference its layers)."""
        import base64

        im = self.image(src)
        self._commit_image(
            dst,
            base64.b64decode(im["manifest_json"]),
            base64.b64decode(im["config_json"]),
            ["sha256:" + h for h in im["layers"]],
            im.get("media_type", ""),
        )

    def _drop_layer_refs(self, txn: lmdb.Transaction, diff_id: bytes, rec: dict[str, Any]) -> None:
        idx = self.index
        self._count_layer_refs(txn, parse_hex(rec["manifest"]), rec, -1)
        for c in rec.get("compressed", []):
            txn.delete(bytes.fromhex(c), db=idx.db[b"compressed"])
        txn.delete(diff_id, db=idx.db[b"layers"])
        self._dropped.append(diff_id)  # its backup file goes once this transaction commits
        for p in protocol.layer_pinners(idx, txn, diff_id):
            protocol.unpin_layer(idx, txn, p, diff_id)

    # -- export ----------------------------------------------------------------------------
    def import_chunked(
        self,
        source: Any,
        annotations: dict[str, str] | None = None,
        *,
        expected_diff_id: str | None = None,
        progress: Callable[[int], None] | None = None,
        image_owned: bool = False,
        toc_only: bool = False,
        source_name: str = "",
    ) -> Any:
        """Partially import a zstd:chunked blob: read only what the store lacks.

        ``source`` is a path to a local blob, an http(s) URL of a blob (read with range
        requests, :class:`layerstore.httpsource.HttpSource`), or any
        :class:`layerstore.chunked.RangeSource`; ``annotations`` are the OCI descriptor's,
        which make the TOC trusted by checksum.  The result's ``partial`` reports bytes read
        vs the blob size.
        ``toc_only`` reads no header frames (podman's byte count) at the price of an unproved
        DiffID (see ``layerstore.partial.import_chunked``).  ``source_name`` is recorded for a
        RangeSource (a path or URL names itself).
        """
        from .chunked.toc import open_source
        from .ops.partial import import_chunked

        opened = (
            open_source(source)
            if isinstance(source, str | os.PathLike)
            else contextlib.nullcontext((source, source_name))
        )
        with opened as (src, name):
            return import_chunked(
                self,
                src,
                annotations,
                expected_diff_id=expected_diff_id,
                progress=progress,
                source_name=name,
                image_owned=image_owned,
                toc_only=toc_only,
            )

    def chunk_index(self, refs: list[str] | None = None) -> dict[str, int]:
        """Cut the objects of these layers (default: all live layers) with the
        containers/storage chunker and index their chunks, so partial imports can reuse chunks
        of files that changed.  Objects done before are skipped (a marker per object)."""
        from .ops.chunkindex import index_layer

        total = {"layers": 0, "objects_chunked": 0, "bytes_chunked": 0, "chunks_indexed": 0}
        infos = [self.layer(r) for r in refs] if refs else self.layers()
        for info in infos:
            for k, v in index_layer(self, parse_hex(info.manifest)).items():
                total[k] += v
            total["layers"] += 1
        return total

    def export_chunked(self, ref: str, out: BinaryIO) -> Any:
        """Write a layer as a zstd:chunked blob (current upstream variant); returns the
        descriptor facts (digest, size, annotations).  See ``layerstore.chunked_writer``."""
        from .chunked.writer import write_chunked

        return write_chunked(self, ref, out)

    def export_layer(
        self, ref: str, out: BinaryIO, progress: Callable[[int], None] | None = None
    ) -> int:
        """Write the layer's exact original tar (sha256 == DiffID, verified) to ``out``.

        The layer is pinned while it is read, like a materialization.
        """
        from .ops.export import export_tar

        diff_id = self.resolve(ref)
        with self.index.write() as txn:
            rec = self.index.get_layer(txn, diff_id)
            if rec is None or rec.get("state") != "live":
                raise NotFoundError(f"layer {ref} was removed")
            protocol.pin_layer(self.index, txn, self.lease.id, diff_id)
        try:
            return export_tar(self, diff_id, rec, out, progress)
        finally:
            self._unpin_layer(diff_id)

    # -- maintenance -----------------------------------------------------------------------
    def gc(self, dry_run: bool = False, progress: Callable[[int], None] | None = None) -> Any:
        """Unlink unreferenced, unpinned objects and crash leftovers (see ``layerstore.gc``)."""
        from .ops.gc import collect

        return collect(self, dry_run=dry_run, progress=progress)

    def fsck(
        self,
        *,
        full: bool = True,
        deep: bool = False,
        repair: bool = False,
        sources: list[str] | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> Any:
        """Check the store (see ``layerstore.fsck``); ``repair`` fixes what it can."""
        from .ops.fsck import fsck

        return fsck(self, full=full, deep=deep, repair=repair, sources=sources, progress=progress)

    # -- accounting ------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Logical bytes (what layers contain) vs physical bytes (what objects hold)."""
        idx = self.index
        objects = 0
        physical = 0
        unreferenced = 0
        unreferenced_bytes = 0
        with idx.read() as txn:
            for _k, v in txn.cursor(db=idx.db[b"objects"]):
                rec = ObjectRecord.unpack(v)
                objects += 1
                physical += rec.size
                if rec.refs == 0:
                    unreferenced += 1
                    unreferenced_bytes += rec.size
            layers = [LayerInfo.from_record(k, r) for k, r in idx.iter_layers(txn)]
        live = [li for li in layers if li.state == "live"]
        logical = sum(li.bytes for li in live)
        return {
            "store": self.root,
            "layers": len(live),
            "layers_pending_delete": len(layers) - len(live),
            "files": sum(li.files for li in live),
            "logical_bytes": logical,
            "objects": objects,
            "physical_bytes": physical,
            "unreferenced_objects": unreferenced,
            "unreferenced_bytes": unreferenced_bytes,
            "dedup_ratio": round(logical / physical, 3) if physical else None,
        }
