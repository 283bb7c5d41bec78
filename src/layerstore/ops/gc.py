"""gc: unlink objects that nothing references and nobody is reading -- as a plan, then its
execution.

References are *counted* (``objects[b3].refs``), not marked: an import adds one per manifest
reference in the same transaction that creates the layer, a removal subtracts them in the
transaction that deletes it.  So "is this object garbage?" is answered from one record inside a
write transaction -- the same consistent view in which the decision is committed -- instead of
by a mark phase over every manifest that would have to run under a lock (ostree's prune lost
data computing reachability outside its lock).  fsck recounts from the manifests and repairs
the counts if they ever disagree.

Two steps, in the shape of restic's ``PlanPrune`` / ``plan.Execute``:

* :func:`plan` reads one snapshot and writes nothing: the :class:`GcPlan` says which objects
  and orphan files would be unlinked, which dead processes' pins, files and deferred removals
  would be finished, which layer backups go with those -- and, for what looks collectable but
  stays, why (:class:`KeepReason`).  ``layerstore gc --dry-run`` prints it.
* :func:`execute` carries a plan out under the protocol (docs/concurrency.md): every item is
  re-checked in the write transaction that acts on it, so the plan is advisory and the
  protocol decides.  An object referenced or pinned since the plan was made is skipped; what
  became garbage since waits for the next gc.  Its steps:

  1. reap (:func:`layerstore.core.protocol.reap`): pins, layer pins and doomed entries of dead
     leases are dropped; layers removed while pinned whose readers are all gone have their
     references dropped now, and their backups go; staging directories and lease files of
     dead processes are removed.  No other layer backup: one whose layer the index lacks is
     what a lost index looks like, and what ``fsck --rebuild-index`` restores it from;
  2. doom (:func:`_doom_and_unlink`): in bounded write transactions, each planned object still
     with refs == 0, no live pin and no record of being doomed by another live gc has its
     record deleted and a ``doomed`` entry (owner: this gc's lease) added -- commit;
  3. unlink the doomed files (index commit -> unlink: a crash leaves orphan files, never
     records without files);
  4. clear the ``doomed`` entries.  An import that meets a digest doomed by a live gc waits
     for step 4 before publishing its own copy; one doomed by a dead gc is simply taken over;
  5. orphans: planned files in objects/ still without a record (left by crashes) are doomed
     and unlinked the same way, so an import publishing that very digest never loses its file;
  6. chunk-index and blob-size hints that point at what is no longer recorded are dropped
     (hints: this only keeps them from growing; every use re-checks anyway).  Not planned:
     they are derived data, swept after the objects they point at are gone.

No step holds the LMDB write lock for longer than one bounded batch, so imports, removals and
materializations proceed while gc runs.
"""

from __future__ import annotations

import enum
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import lmdb

from ..core import layers, leases, protocol
from ..core.digests import is_hex_name
from ..core.index import Index, ObjectRecord
from ..core.repo import Repo, is_backup_name

BATCH: Final = 2048  # gc decisions per write transaction (invariant 6)


class KeepReason(enum.StrEnum):
    """Why something that looks collectable is kept (stable kebab-case: ``--json`` shows it)."""

    # a live process pins the object: an import publishing it, a partial import reading it
    PINNED = "pinned"
    # another gc, still alive, has doomed it and is unlinking it right now
    DOOMED_BY_LIVE_GC = "doomed-by-live-gc"
    # a removed layer a live materialization still reads: its references stay until it unpins
    READ_BY_LIVE_PROCESS = "read-by-live-process"
    # layers/<diffid>.json of a layer the index lacks: what a lost index looks like (fsck
    # reports it as layer-backup-extra; only --repair quarantines it)
    BACKUP_WITHOUT_LAYER = "backup-without-layer"


@dataclass(frozen=True, slots=True)
class Candidate:
    """An object file the plan would unlink."""

    digest: bytes  # blake3
    size: int

    def to_json(self) -> dict[str, Any]:
        return {"digest": self.digest.hex(), "size": self.size}


@dataclass(frozen=True, slots=True)
class Kept:
    """Something the plan keeps although it looks collectable, and why."""

    kind: str  # "object", "orphan", "layer" or "layer-backup"
    subject: str  # hex digest, DiffID, or backup file name
    reason: KeepReason

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "subject": self.subject, "reason": str(self.reason)}


@dataclass
class GcResult:
    """What a gc did (or, ``dry_run``, what its plan says it would do)."""

    dry_run: bool
    objects_freed: int = 0
    bytes_freed: int = 0
    orphans_removed: int = 0
    orphan_bytes: int = 0
    dead_leases: int = 0
    layers_finalized: int = 0
    staging_removed: int = 0
    skipped_pinned: int = 0
    chunk_hints_dropped: int = 0
    blob_size_hints_dropped: int = 0
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class GcPlan:
    """What a gc would do, computed from one read snapshot without writing anything.

    ``objects`` counts the objects whose only references are those of the deferred removals
    the plan finishes (``reap.deferred``): they reach refs == 0 during the same gc."""

    objects: tuple[Candidate, ...] = ()  # records with refs == 0 (now or after the reap)
    orphans: tuple[Candidate, ...] = ()  # files in objects/ without a record
    reap: protocol.ReapPlan = field(default_factory=protocol.ReapPlan)
    backups: tuple[str, ...] = ()  # layers/<diffid>.json removed with reap.deferred
    kept: tuple[Kept, ...] = ()
    seconds: float = 0.0  # how long planning took

    @property
    def bytes(self) -> int:
        return sum(c.size for c in self.objects)

    @property
    def orphan_bytes(self) -> int:
        return sum(c.size for c in self.orphans)

    def kept_for(self, reason: KeepReason) -> list[Kept]:
        return [k for k in self.kept if k.reason is reason]

    def summary(self) -> GcResult:
        """The plan as the counts executing it would report (``gc --dry-run``'s figures)."""
        return GcResult(
            dry_run=True,
            objects_freed=len(self.objects),
            bytes_freed=self.bytes,
            orphans_removed=len(self.orphans),
            orphan_bytes=self.orphan_bytes,
            dead_leases=len(self.reap.dead_leases),
            layers_finalized=len(self.reap.deferred),
            staging_removed=len(self.reap.leftovers),
            skipped_pinned=len(self.kept_for(KeepReason.PINNED)),
            seconds=self.seconds,
        )

    def to_json(self) -> dict[str, Any]:
        """The summary's keys (those of ``gc --json``, so a script reads both alike) and, under
        ``plan``, every item."""
        out = self.summary().to_json()
        del out["chunk_hints_dropped"], out["blob_size_hints_dropped"]  # not planned
        out["plan"] = {
            "objects": [c.to_json() for c in self.objects],
            "orphans": [c.to_json() for c in self.orphans],
            "dead_leases": [x.hex() for x in self.reap.dead_leases],
            "deferred_removals": ["sha256:" + x.hex() for x in self.reap.deferred],
            "backups": list(self.backups),
            "leftovers": [x.hex() for x in self.reap.leftovers],
            "kept": [k.to_json() for k in self.kept],
        }
        return out


def _batches(items: Sequence[bytes], n: int) -> Iterator[Sequence[bytes]]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


# -- plan -------------------------------------------------------------------------------------
def plan(repo: Repo) -> GcPlan:
    """What :func:`execute` would do now.  Reads, never writes: no write transaction, no
    unlink (``gc --dry-run``)."""
    t0 = time.monotonic()
    idx = repo.index
    live = leases.LivenessChecker(repo.leases_dir, own=repo.lease.id)
    rp = protocol.plan_reap(repo)
    kept: list[Kept] = [
        Kept("layer", "sha256:" + d.hex(), KeepReason.READ_BY_LIVE_PROCESS) for d in rp.still_read
    ]

    # References the deferred removals drop: their objects are garbage in this same gc.
    dropping: Counter[bytes] = Counter()
    with idx.read() as txn:
        deferred = [(d, idx.get_layer(txn, d)) for d in rp.deferred]
    for _d, layer in deferred:
        if layer is not None:
            dropping.update(layers.references(repo, layer))

    objs, doomed = idx.db[b"objects"], idx.db[b"doomed"]
    objects: list[Candidate] = []
    with idx.read() as txn:
        for k, v in txn.cursor(db=objs):
            rec = ObjectRecord.unpack(bytes(v))
            if rec.refs - dropping.get(bytes(k), 0) > 0:
                continue
            b3 = bytes(k)
            why = _kept_why(idx, txn, b3, doomed, live)
            if why is None:
                objects.append(Candidate(b3, rec.size))
            else:
                kept.append(Kept("object", b3.hex(), why))

    # Orphans: files with no record.  Listing first, then checking, is safe because an import
    # renames a file into objects/ only inside the write transaction that records it (and
    # execute re-checks each in the transaction that dooms it).
    orphans: list[Candidate] = []
    for fan in range(256):
        d = os.path.join(repo.objects_dir, f"{fan:02x}")
        try:
            it = os.scandir(d)
        except FileNotFoundError:
            continue
        with it, idx.read() as txn:
            for de in it:
                if not is_hex_name(de.name):
                    continue  # not an object name: fsck reports it, gc never guesses
                b3 = bytes.fromhex(de.name)
                if txn.get(b3, db=objs) is not None:
                    continue
                why = _kept_why(idx, txn, b3, doomed, live)
                if why is None:
                    orphans.append(Candidate(b3, _size(repo, b3)))
                else:
                    kept.append(Kept("orphan", b3.hex(), why))

    # Layer backups: those of the deferred removals go; any other without a layer stays.
    finishing = {d.hex() + ".json" for d in rp.deferred}
    with idx.read() as txn:
        known = {k.hex() + ".json" for k, _ in idx.iter_layers(txn)}
    names = sorted(n for n in _listdir(repo.layers_dir) if is_backup_name(n))
    backups = tuple(n for n in names if n in finishing)
    kept += [
        Kept("layer-backup", n, KeepReason.BACKUP_WITHOUT_LAYER)
        for n in names
        if n not in known and n not in finishing
    ]
    return GcPlan(
        objects=tuple(objects),
        orphans=tuple(orphans),
        reap=rp,
        backups=backups,
        kept=tuple(kept),
        seconds=time.monotonic() - t0,
    )


def _kept_why(
    idx: Index, txn: lmdb.Transaction, b3: bytes, doomed: Any, live: leases.LivenessChecker
) -> KeepReason | None:
    owner = txn.get(b3, db=doomed)
    if owner is not None and live.alive(bytes(owner)):
        return KeepReason.DOOMED_BY_LIVE_GC
    if leases.is_object_pinned(idx, txn, b3, live):
        return KeepReason.PINNED
    return None


# -- execute ----------------------------------------------------------------------------------
def execute(
    repo: Repo, the_plan: GcPlan, progress: Callable[[int], None] | None = None
) -> GcResult:
    """Carry out ``the_plan`` (see the module docstring), each item re-checked under the
    protocol.  ``skipped_pinned`` counts both the objects the plan kept as pinned and those
    pinned since it was made."""
    t0 = time.monotonic()
    result = GcResult(dry_run=False)
    r = protocol.reap(repo, the_plan.reap)
    result.dead_leases = r.dead_leases
    result.layers_finalized = r.layers_finalized
    result.staging_removed = r.staging_removed
    result.skipped_pinned = len(the_plan.kept_for(KeepReason.PINNED))
    for batch in _batches([c.digest for c in the_plan.objects], BATCH):
        _doom_and_unlink(repo, batch, result, orphans=False)
        if progress:
            progress(len(batch))
    for batch in _batches([c.digest for c in the_plan.orphans], BATCH):
        _doom_and_unlink(repo, batch, result, orphans=True)
    from .chunkindex import sweep

    result.chunk_hints_dropped = sweep(repo)
    result.blob_size_hints_dropped = repo.index.sweep_blob_sizes()
    result.seconds = the_plan.seconds + (time.monotonic() - t0)
    return result


def collect(
    repo: Repo,
    dry_run: bool = False,
    progress: Callable[[int], None] | None = None,
) -> GcResult:
    """A full gc pass: :func:`plan`, then (unless ``dry_run``) :func:`execute`."""
    p = plan(repo)
    return p.summary() if dry_run else execute(repo, p, progress)


def _doom_and_unlink(repo: Repo, batch: Sequence[bytes], result: GcResult, orphans: bool) -> None:
    """Steps 2-4 (or 5, ``orphans``) for one batch.  The re-check in the write transaction
    is what keeps invariant 3: a file is unlinked only if, in the transaction that commits
    its record's deletion and this gc's doomed entry, it had no record (orphans) or refs 0,
    no pin of a live lease and no live gc's doomed entry."""
    idx = repo.index
    objs, doomed, shadb = idx.db[b"objects"], idx.db[b"doomed"], idx.db[b"sha256"]
    live = leases.LivenessChecker(repo.leases_dir, own=repo.lease.id)
    chosen: list[tuple[bytes, int]] = []
    with idx.write() as txn:
        for b3 in batch:
            raw = txn.get(b3, db=objs)
            if orphans:
                if raw is not None:
                    continue  # published meanwhile
                size = _size(repo, b3)
            else:
                if raw is None:
                    continue  # collected by another gc meanwhile
                rec = ObjectRecord.unpack(bytes(raw))
                if rec.refs:
                    continue  # referenced again meanwhile
                size = rec.size
            owner = txn.get(b3, db=doomed)
            if owner is not None and live.alive(bytes(owner)):
                continue  # another gc has it
            if leases.is_object_pinned(idx, txn, b3, live):
                result.skipped_pinned += 1
                continue
            chosen.append((b3, size))
            if raw is not None:
                sha = ObjectRecord.unpack(bytes(raw)).sha256
                if txn.get(sha, db=shadb) == b3:
                    txn.delete(sha, db=shadb)
                txn.delete(b3, db=objs)
            txn.put(b3, repo.lease.id, db=doomed)
    for _b3, size in chosen:
        if orphans:
            result.orphans_removed += 1
            result.orphan_bytes += size
        else:
            result.objects_freed += 1
            result.bytes_freed += size
    if not chosen:
        return
    for b3, _ in chosen:
        try:
            os.unlink(repo.object_path(b3))
        except FileNotFoundError:
            pass
    with idx.write() as txn:
        for b3, _ in chosen:
            txn.delete(b3, db=doomed)


def _size(repo: Repo, b3: bytes) -> int:
    try:
        return os.lstat(repo.object_path(b3)).st_size
    except FileNotFoundError:
        return 0


def _listdir(d: str) -> list[str]:
    try:
        return os.listdir(d)
    except FileNotFoundError:
        return []
