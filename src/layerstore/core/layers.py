"""Layer records: lookup, the references a record makes, and the backups in ``layers/``.

A layer record (``layers`` database, keyed by the DiffID) says which manifest object holds the
layer and carries its counts; it holds one reference on every object its manifest lists, on
the manifest itself and on its tar-split.  This module is the arithmetic of those references
and the derived backup copy of each record; *when* a record may be added or dropped -- pins,
deferred removal -- is :mod:`layerstore.core.protocol`'s to decide.
"""

from __future__ import annotations

import builtins
import os
from collections import Counter
from dataclasses import dataclass
from typing import Any

import lmdb

from ..errors import AmbiguousError, CorruptObjectError, InvalidInputError, NotFoundError
from . import leases
from .digests import parse_hex
from .fsutil import write_json_durable
from .index import layer_unproved
from .repo import Repo


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
    def from_record(diff_id: builtins.bytes, rec: dict[str, Any]) -> LayerInfo:
        # ``builtins.bytes``: the field named ``bytes`` shadows the type in the class body.
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


# -- lookup ---------------------------------------------------------------------------------
def resolve(repo: Repo, ref: str) -> bytes:
    """A layer's DiffID from: a full or prefixed DiffID, or a compressed-blob digest."""
    text = ref.removeprefix("sha256:").lower()
    if not text or any(c not in "0123456789abcdef" for c in text):
        raise InvalidInputError(f"{ref!r} is not a layer id (hex DiffID or digest prefix)")
    idx = repo.index
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


def record(repo: Repo, diff_id: bytes, ref: str) -> dict[str, Any]:
    """The record of a resolved layer (``ref`` names it in the error if it went meanwhile)."""
    with repo.index.read() as txn:
        rec = repo.index.get_layer(txn, diff_id)
    if rec is None:
        raise NotFoundError(f"layer {ref} was removed")
    return rec


def list_layers(repo: Repo, include_deleted: bool = False) -> list[LayerInfo]:
    with repo.index.read() as txn:
        out = [LayerInfo.from_record(k, r) for k, r in repo.index.iter_layers(txn)]
    if not include_deleted:
        out = [li for li in out if li.state == "live"]
    return sorted(out, key=lambda li: li.created)


def require_manifest(repo: Repo, diff_id: bytes, manifest_b3: bytes) -> None:
    """Refuse to start reading a layer whose manifest object is gone (checked while the layer
    is being pinned, so gc cannot take it afterwards): an error that says what to run instead
    of a failure halfway through building a tree."""
    if not os.path.isfile(repo.object_path(manifest_b3)):
        raise CorruptObjectError(
            f"layer sha256:{diff_id.hex()}: its manifest object {manifest_b3.hex()} is "
            f"missing from {repo.objects_dir}; run `layerstore fsck --repair --source "
            "STORE_OR_TARBALL` to restore it"
        )


def mark_standalone(repo: Repo, diff_id: bytes) -> None:
    """The layer was imported directly (not only for an image): it stays when its images go."""
    with repo.index.write() as txn:
        rec = repo.index.get_layer(txn, diff_id)
        if rec is not None and not rec.get("standalone", True):
            rec["standalone"] = True
            repo.index.put_layer(txn, diff_id, rec)


# -- references ------------------------------------------------------------------------------
def count_refs(
    repo: Repo, txn: lmdb.Transaction, manifest_b3: bytes, rec: dict[str, Any], delta: int
) -> None:
    """``delta`` (+1 or -1) on every reference a layer record makes: the objects its
    manifest lists, the manifest itself and its tar-split (``rec["tarsplit"]``)."""
    idx = repo.index
    idx.add_refs_many(txn, repo.object_refs(manifest_b3), delta)
    idx.add_refs(txn, manifest_b3, delta)
    if rec.get("tarsplit"):
        idx.add_refs(txn, bytes.fromhex(rec["tarsplit"]), delta)


def references(repo: Repo, rec: dict[str, Any]) -> Counter[bytes]:
    """The references a layer record makes, counted (what :func:`count_refs` adds or drops):
    read-only, for a plan that predicts what a removal would free."""
    out: Counter[bytes] = Counter(repo.object_refs(parse_hex(rec["manifest"])))
    out[parse_hex(rec["manifest"])] += 1
    if rec.get("tarsplit"):
        out[bytes.fromhex(rec["tarsplit"])] += 1
    return out


def drop_refs(repo: Repo, txn: lmdb.Transaction, diff_id: bytes, rec: dict[str, Any]) -> None:
    """The record goes: its references, its compressed-digest aliases and its layer pins;
    its backup file goes once this transaction has committed (:func:`remove_dropped_backups`).
    """
    idx = repo.index
    count_refs(repo, txn, parse_hex(rec["manifest"]), rec, -1)
    for c in rec.get("compressed", []):
        txn.delete(bytes.fromhex(c), db=idx.db[b"compressed"])
    txn.delete(diff_id, db=idx.db[b"layers"])
    repo.dropped.append(diff_id)
    for p in leases.layer_pinners(idx, txn, diff_id):
        leases.unpin_layer(idx, txn, p, diff_id)


# -- backups: derived copies of layer records, for rebuilding a lost index --------------------
def backup_path(repo: Repo, diff_id: bytes) -> str:
    return os.path.join(repo.layers_dir, diff_id.hex() + ".json")


def write_backup(repo: Repo, diff_id: bytes, rec: dict[str, Any]) -> None:
    """Written *after* the index commit (the index is authoritative; fsck reconciles)."""
    write_json_durable(
        backup_path(repo, diff_id), {"diff_id": diff_id.hex(), **rec}, repo.lease.id.hex()
    )


def remove_dropped_backups(repo: Repo) -> None:
    """Drop backups of layers whose removal has committed (re-checked against the index, so
    an aborted transaction can never cost a live layer its backup)."""
    while repo.dropped:
        diff_id = repo.dropped.pop()
        with repo.index.read() as txn:
            if repo.index.get_layer(txn, diff_id) is not None:
                continue
        try:
            os.unlink(backup_path(repo, diff_id))
        except FileNotFoundError:
            pass
