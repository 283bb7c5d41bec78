"""The concurrency protocol: every transition of docs/concurrency.md, in one place.

What makes "deleting a layer never removes data an in-flight operation needs" true is a small
set of transitions on the index, each one LMDB write transaction:

* :func:`commit_layer` -- an import's pinned objects become a layer's references (the pins go
  in the same transaction that adds the references, so gc never sees them unprotected);
* :func:`pinned_layers` -- a reader pins the layers it reads (O(1) records per layer) and
  unpins them when done; :func:`unpin_layer` finishes a removal deferred meanwhile;
* :func:`drop_or_defer` / :func:`remove_layer` -- removal drops references now, or, while a
  live process reads the layer, hides it and leaves the drop to the last reader;
* :func:`plan_reap` / :func:`reap` -- pins and deferred removals of dead processes (their
  lease lock is free) are found in a snapshot, then finished by gc, each re-checked.

The primitives (lease files, pin tables, the liveness probe) are :mod:`.leases`; the reference
arithmetic is :mod:`.layers`.  Nothing outside this module pins or unpins a layer.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Final

import lmdb

from ..errors import ConcurrencyError, CorruptObjectError, InUseError, NotFoundError
from . import layers, leases
from .digests import DigestSet, parse_hex
from .index import Index, blob_size_key, layer_unproved
from .repo import Repo

# Object pins released per write transaction.
_UNPIN_BATCH = 4096


# -- import: pins become references ----------------------------------------------------------
def commit_layer(
    repo: Repo,
    diff_id: bytes,
    comp: bytes | None,
    manifest_b3: bytes,
    info: dict[str, Any],
    pinned: DigestSet,
    blob_size: int | None = None,
) -> str:
    """Phase 3 of an import: the layer record and its references, in one transaction, which
    also releases the import's object pins (invariant 2: an object is pinned or referenced
    from the moment it is published).

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
    idx = repo.index
    with idx.write() as txn:
        rec = idx.get_layer(txn, diff_id)
        outcome = "present" if rec is not None else "new"
        if rec is not None and layer_unproved(rec) and not layer_unproved(info):
            check_unread(repo, txn, diff_id)
            layers.count_refs(repo, txn, manifest_b3, info, +1)
            # after the +1s: shared objects never hit 0
            layers.count_refs(repo, txn, parse_hex(rec["manifest"]), rec, -1)
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
            layers.count_refs(repo, txn, manifest_b3, info, +1)
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
        leases.unpin_objects(idx, txn, repo.lease.id, pinned)
    pinned.clear()
    layers.write_backup(repo, diff_id, rec)
    return outcome


def check_unread(repo: Repo, txn: lmdb.Transaction, diff_id: bytes) -> None:
    """Refuse to swap a layer's manifest while a live process reads the old one: its
    objects must keep their references until that reader is done (invariant 5)."""
    live = leases.LivenessChecker(repo.leases_dir, own=repo.lease.id)
    if any(live.alive(p) for p in leases.layer_pinners(repo.index, txn, diff_id)):
        raise ConcurrencyError(
            f"layer sha256:{diff_id.hex()} (unproved DiffID) is being read by another "
            "process; nothing was imported. Retry this import once that has finished"
        )


def release_import_pins(repo: Repo, pinned: DigestSet) -> None:
    """An import that will not commit lets go of the objects it published (gc may take
    them once nothing references them)."""
    if not pinned:
        return
    # In bounded batches (invariant 6): a million-object import must not hold the write lock
    # for one unpin transaction of a million deletes.  Releasing in parts is safe: a pin only
    # ever protects, so a half-released set protects a superset of what is needed.
    batch: list[bytes] = []
    for d in pinned:
        batch.append(d)
        if len(batch) >= _UNPIN_BATCH:
            with repo.index.write() as txn:
                leases.unpin_objects(repo.index, txn, repo.lease.id, batch)
            batch = []
    if batch:
        with repo.index.write() as txn:
            leases.unpin_objects(repo.index, txn, repo.lease.id, batch)


# -- readers: pin a layer, read it, unpin it -----------------------------------------------------
@dataclass(frozen=True)
class PinnedLayer:
    """A layer a reader has pinned: its DiffID and record as of the pinning transaction."""

    diff_id: bytes
    record: dict[str, Any]

    @property
    def manifest(self) -> bytes:
        return parse_hex(self.record["manifest"])


@contextlib.contextmanager
def pinned_layers(
    repo: Repo,
    diff_ids: list[bytes],
    *,
    content: bool = True,
    image: str | None = None,
    ref: str | None = None,
) -> Iterator[list[PinnedLayer]]:
    """Pin ``diff_ids`` in one transaction for the duration of the block (invariant 4: gc
    never unlinks an object of a layer a live process has pinned, even if the layer is
    removed meanwhile), then unpin each (:func:`unpin_layer`).

    ``content``: also refuse a layer recorded as damaged or whose manifest object is gone
    (materialization needs every object; an export reads the tar-split instead).  ``image``
    / ``ref`` only name the layer in the errors."""
    out: list[PinnedLayer] = []
    try:
        with repo.index.write() as txn:
            for d in diff_ids:
                rec = repo.index.get_layer(txn, d)
                if image is not None:
                    if rec is None or rec.get("state") != "live" or rec.get("damaged"):
                        raise CorruptObjectError(
                            f"image {image!r}: layer sha256:{d.hex()} is missing or damaged; "
                            "run `layerstore fsck`"
                        )
                elif rec is None or rec.get("state") != "live":
                    raise NotFoundError(f"layer {ref or 'sha256:' + d.hex()} was removed")
                if content:
                    if rec.get("damaged"):
                        paths = rec["damaged"]
                        raise CorruptObjectError(
                            f"layer sha256:{d.hex()} is damaged: content is missing for "
                            f"{len(paths)} paths (first: {', '.join(paths[:5])}); restore it "
                            "with `layerstore fsck --repair --source STORE_OR_TARBALL`"
                        )
                    layers.require_manifest(repo, d, parse_hex(rec["manifest"]))
                leases.pin_layer(repo.index, txn, repo.lease.id, d)
                out.append(PinnedLayer(d, rec))
        yield out
    finally:
        for p in out:
            unpin_layer(repo, p.diff_id)


def unpin_layer(repo: Repo, diff_id: bytes) -> None:
    """Drop this process's pin; if the layer was removed meanwhile and no live process reads
    it any more, finish the removal now (invariant 5)."""
    idx = repo.index
    with idx.write() as txn:
        leases.unpin_layer(idx, txn, repo.lease.id, diff_id)
        rec = idx.get_layer(txn, diff_id)
        if rec is not None and rec.get("state") == "deleted":
            live = leases.LivenessChecker(repo.leases_dir)
            if not any(live.alive(p) for p in leases.layer_pinners(idx, txn, diff_id)):
                layers.drop_refs(repo, txn, diff_id, rec)
    layers.remove_dropped_backups(repo)


# -- removal ---------------------------------------------------------------------------------
def drop_or_defer(repo: Repo, txn: lmdb.Transaction, diff_id: bytes, rec: dict[str, Any]) -> bool:
    """Remove a layer now, or hide it until its live readers unpin it.  True if deferred."""
    live = leases.LivenessChecker(repo.leases_dir, own=repo.lease.id)
    if any(live.alive(p) for p in leases.layer_pinners(repo.index, txn, diff_id)):
        rec["state"] = "deleted"
        repo.index.put_layer(txn, diff_id, rec)
        for c in rec.get("compressed", []):
            txn.delete(bytes.fromhex(c), db=repo.index.db[b"compressed"])
        return True
    layers.drop_refs(repo, txn, diff_id, rec)
    return False


def remove_layer(repo: Repo, diff_id: bytes, ref: str) -> bool:
    """Drop a layer's references in one transaction (never unlinks a file; gc does).
    Refused while an image uses it.  True if the drop was deferred to a live reader."""
    idx = repo.index
    with idx.write() as txn:
        rec = idx.get_layer(txn, diff_id)
        if rec is None or rec.get("state") != "live":
            raise NotFoundError(f"layer {ref} was removed already")
        if rec.get("images", 0) > 0:
            users = [n for n, im in idx.iter_images(txn) if diff_id.hex() in im["layers"]]
            raise InUseError(
                f"layer sha256:{diff_id.hex()} is used by image(s) {', '.join(users)}; "
                "remove those with `layerstore rmi` (it goes with the last of them)"
            )
        deferred = drop_or_defer(repo, txn, diff_id, rec)
    if deferred:
        layers.write_backup(repo, diff_id, rec)
    layers.remove_dropped_backups(repo)
    return deferred


# -- dead processes ----------------------------------------------------------------------------
REAP_PIN_BATCH: Final = 4096  # object pins of a dead lease dropped per write transaction


@dataclass(frozen=True)
class ReapPlan:
    """What :func:`reap` would finish, read from one snapshot (nothing written).

    Advisory: :func:`reap` re-checks every item in the write transaction that acts on it."""

    # leases named by pins, layer pins or doomed entries in the index whose process is dead
    dead_leases: tuple[bytes, ...] = ()
    # layers removed while pinned (``state: deleted``) whose pinners are all dead
    deferred: tuple[bytes, ...] = ()
    # dead leases that left a lease file or a staging directory
    leftovers: tuple[bytes, ...] = ()
    # removed layers a live process still reads: kept until it unpins (invariant 5)
    still_read: tuple[bytes, ...] = ()


def plan_reap(repo: Repo) -> ReapPlan:
    """The dead processes' pins, deferred removals and files :func:`reap` would finish."""
    idx = repo.index
    live = leases.LivenessChecker(repo.leases_dir, own=repo.lease.id)
    deferred: list[bytes] = []
    still_read: list[bytes] = []
    with idx.read() as txn:
        dead = leases.dead_leases(idx, txn, live)
        for diff_id, rec in idx.iter_layers(txn):
            if rec.get("state") != "deleted":
                continue
            if any(live.alive(p) for p in leases.layer_pinners(idx, txn, diff_id)):
                still_read.append(diff_id)
            else:
                deferred.append(diff_id)
    return ReapPlan(
        dead_leases=tuple(sorted(dead)),
        deferred=tuple(deferred),
        leftovers=tuple(leases.dead_leftovers(repo.leases_dir, repo.staging_dir, live)),
        still_read=tuple(still_read),
    )


@dataclass
class Reaped:
    """What :func:`reap` finished for processes that died."""

    dead_leases: int = 0
    layers_finalized: int = 0
    staging_removed: int = 0


def reap(repo: Repo, plan: ReapPlan | None = None) -> Reaped:
    """Forget dead processes' pins, finish removals they deferred, drop their lease files and
    staging space (gc's first step; fsck --repair's for dead-pins and stale-staging).

    ``plan`` (default: :func:`plan_reap` now) says what to look at; each item is re-checked
    in the transaction that acts on it, so a plan made earlier can only do less, never
    wrong: a lease is reaped only while it is dead, a deferred removal finished only while
    it is still deleted and unread (invariant 5).  Every write transaction is one dead
    lease's pins (at most :data:`REAP_PIN_BATCH` object pins, then another) or one deferred
    removal (invariant 6)."""
    plan = plan if plan is not None else plan_reap(repo)
    out = Reaped()
    idx = repo.index
    live = leases.LivenessChecker(repo.leases_dir, own=repo.lease.id)
    for lease in plan.dead_leases:
        if live.alive(lease):
            continue  # cannot happen (a lease id is never reused); the check is the rule
        while True:
            with idx.write() as txn:
                if leases.unpin_all_objects(idx, txn, lease, REAP_PIN_BATCH) < REAP_PIN_BATCH:
                    _drop_lease_records(idx, txn, lease)
                    break
        out.dead_leases += 1
    for diff_id in plan.deferred:
        with idx.write() as txn:
            rec = idx.get_layer(txn, diff_id)
            if rec is None or rec.get("state") != "deleted":
                continue  # finished by its last reader, or imported again meanwhile
            if any(live.alive(p) for p in leases.layer_pinners(idx, txn, diff_id)):
                continue  # a new reader pinned it (it cannot: only live layers are pinned)
            layers.drop_refs(repo, txn, diff_id, rec)
        out.layers_finalized += 1
    # Only the backups of the removals finished just now.  Never "every backup the index does
    # not know": an index that lost layers (or a lost index) would then cost the backups that
    # `fsck --rebuild-index` restores them from.  A backup left by a removal whose process
    # died before unlinking it is fsck's to report (layer-backup-extra; --repair quarantines).
    layers.remove_dropped_backups(repo)  # re-checks each against the index before unlinking
    for lease in plan.leftovers:
        if leases.remove_leftovers(repo.leases_dir, repo.staging_dir, lease, live):
            out.staging_removed += 1
    return out


def _drop_lease_records(idx: Index, txn: lmdb.Transaction, lease: bytes) -> None:
    """A dead lease's layer pins and doomed entries (the file of a doomed entry, if any, is
    an orphan now: gc's orphan sweep takes it)."""
    lp = idx.db[b"layer_pins"]
    for k in [bytes(k) for k in txn.cursor(db=lp).iternext(values=False)]:
        if k[-leases.LEASE_SIZE :] == lease:
            txn.delete(k, db=lp)
    doomed = idx.db[b"doomed"]
    for k, v in [(bytes(k), bytes(v)) for k, v in txn.cursor(db=doomed)]:
        if v == lease:
            txn.delete(k, db=doomed)
