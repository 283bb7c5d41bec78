"""gc: unlink objects that nothing references and nobody is reading.

References are *counted* (``objects[b3].refs``), not marked: an import adds one per manifest
reference in the same transaction that creates the layer, a removal subtracts them in the
transaction that deletes it.  So "is this object garbage?" is answered from one record inside a
write transaction -- the same consistent view in which the decision is committed -- instead of
by a mark phase over every manifest that would have to run under a lock (ostree's prune lost
data computing reachability outside its lock).  fsck recounts from the manifests and repairs
the counts if they ever disagree.

Protocol (docs/concurrency.md has the argument for each step):

1. reap: pins and layer pins of dead leases are dropped; layers removed while pinned whose
   readers are all gone have their references dropped now;
2. doom: in bounded write transactions, each candidate with refs == 0, no live pin and no
   record of being doomed by another live gc has its record deleted and a ``doomed`` entry
   (owner: this gc's lease) added -- commit;
3. unlink the doomed files (index commit -> unlink: a crash leaves orphan files, never records
   without files);
4. clear the ``doomed`` entries.  An import that meets a digest doomed by a live gc waits for
   step 4 before publishing its own copy; one doomed by a dead gc is simply taken over.
5. orphans: files in objects/ with no record (left by crashes) are doomed and unlinked the same
   way, so an import that is publishing that very digest can never lose its file.
6. staging directories and lease files of dead processes are removed.  The only layer backups
   gc deletes are those of the deferred removals it finishes in step 1: never a backup merely
   because the index lacks its layer (that is what a lost index looks like).
7. chunk-index hints that point at objects no longer recorded are dropped (the index is a hint:
   this only keeps it from growing; every use re-checks anyway).

No step holds the LMDB write lock for longer than one bounded batch, so imports, removals and
materializations proceed while gc runs.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Final

from ..core import leases, protocol
from ..core.digests import is_hex_name
from ..core.index import ObjectRecord
from ..core.repo import Repo

BATCH: Final = 2048


@dataclass
class GcResult:
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


def _batches(items: list[bytes], n: int) -> Iterator[list[bytes]]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


def reap(repo: Repo, result: GcResult | None = None) -> GcResult:
    """Step 1 and 6: dead processes' pins, deferred removals and files
    (:func:`layerstore.core.protocol.reap`), counted into ``result``."""
    result = result or GcResult(dry_run=False)
    r = protocol.reap(repo)
    result.dead_leases += r.dead_leases
    result.layers_finalized += r.layers_finalized
    result.staging_removed += r.staging_removed
    return result


def collect(
    repo: Repo,
    dry_run: bool = False,
    progress: Callable[[int], None] | None = None,
) -> GcResult:
    """Run a full gc pass (see the module docstring)."""
    t0 = time.monotonic()
    result = GcResult(dry_run=dry_run)
    idx = repo.index
    if not dry_run:
        reap(repo, result)

    # Candidates from a snapshot; each is re-checked inside the write transaction that dooms it.
    objs = idx.db[b"objects"]
    candidates: list[bytes] = []
    with idx.read() as txn:
        for k, v in txn.cursor(db=objs):
            if ObjectRecord.unpack(v).refs == 0:
                candidates.append(bytes(k))
    for batch in _batches(candidates, BATCH):
        _doom_and_unlink(repo, batch, result, dry_run, orphans=False)
        if progress:
            progress(len(batch))

    # Orphans: files with no record.  Listing first, then checking, is safe because an import
    # renames a file into objects/ only inside the write transaction that records it.
    orphans: list[bytes] = []
    for fan in range(256):
        d = os.path.join(repo.objects_dir, f"{fan:02x}")
        try:
            it = os.scandir(d)
        except FileNotFoundError:
            continue
        with it, idx.read() as txn:
            for de in it:
                name = de.name
                if not is_hex_name(name):
                    continue  # not an object name: fsck reports it, gc never guesses
                b3 = bytes.fromhex(name)
                if txn.get(b3, db=objs) is None:
                    orphans.append(b3)
    for batch in _batches(orphans, BATCH):
        _doom_and_unlink(repo, batch, result, dry_run, orphans=True)
    if not dry_run:
        from .chunkindex import sweep

        result.chunk_hints_dropped = sweep(repo)
        result.blob_size_hints_dropped = repo.index.sweep_blob_sizes()
    result.seconds = time.monotonic() - t0
    return result


def _doom_and_unlink(
    repo: Repo, batch: list[bytes], result: GcResult, dry_run: bool, orphans: bool
) -> None:
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
                    continue
                rec = ObjectRecord.unpack(raw)
                if rec.refs:
                    continue  # referenced again meanwhile
                size = rec.size
            owner = txn.get(b3, db=doomed)
            if owner is not None and live.alive(owner):
                continue  # another gc has it
            if leases.is_object_pinned(idx, txn, b3, live):
                result.skipped_pinned += 1
                continue
            chosen.append((b3, size))
            if dry_run:
                continue
            if raw is not None:
                sha = ObjectRecord.unpack(raw).sha256
                if txn.get(sha, db=shadb) == b3:
                    txn.delete(sha, db=shadb)
                txn.delete(b3, db=objs)
            txn.put(b3, repo.lease.id, db=doomed)
        if dry_run:
            txn.abort()
    for _b3, size in chosen:
        if orphans:
            result.orphans_removed += 1
            result.orphan_bytes += size
        else:
            result.objects_freed += 1
            result.bytes_freed += size
    if dry_run or not chosen:
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
