"""Leases and pins: how a process says "I am reading these; do not collect them".

A *lease* is one file ``leases/<id>.lock`` on which the owning process holds an exclusive
``flock`` for as long as it has the store open.  The kernel drops the lock when the process dies
(however it dies), so "is lease X alive?" is answered by trying to take the lock without
blocking: success means the owner is gone.  No wall-clock timeouts, and one descriptor per
process however many objects it pins.

*Pins* are index records naming a lease: ``pins`` / ``lease_pins`` for objects (an import
publishing new objects, a partial pull reusing chunks) and ``layer_pins`` for whole layers (a
materialization reading a layer's objects -- O(1) records however large the layer).  gc skips
everything pinned by a live lease; pins of dead leases are dropped by
:func:`layerstore.core.protocol.reap`.
"""

from __future__ import annotations

import errno
import fcntl
import os
import secrets
import shutil
from collections.abc import Iterable

import lmdb

from .index import Index

LEASE_SIZE = 16


class Lease:
    """This process's lease on a store: a held ``flock`` on ``leases/<id>.lock``."""

    def __init__(self, leases_dir: str) -> None:
        self.id = secrets.token_bytes(LEASE_SIZE)
        self.path = os.path.join(leases_dir, self.id.hex() + ".lock")
        # Lock under a temporary name, then rename: a checker must never see the final name
        # unlocked while its owner is alive (it would declare the lease dead and drop its pins).
        tmp = self.path[: -len(".lock")] + ".tmp"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, f"{os.getpid()}\n".encode())
        os.rename(tmp, self.path)
        self.fd: int | None = fd
        self.pid = os.getpid()

    def release(self) -> None:
        """Drop the lease file and the lock.  Pins must have been released already."""
        if self.fd is not None and self.pid == os.getpid():
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            os.close(self.fd)
        self.fd = None


class LivenessChecker:
    """Answers "is lease X alive?" by probing its flock; caches answers for one pass."""

    def __init__(self, leases_dir: str, own: bytes | None = None) -> None:
        self.dir = leases_dir
        self.cache: dict[bytes, bool] = {}
        if own is not None:
            self.cache[own] = True

    def alive(self, lease_id: bytes) -> bool:
        lease_id = bytes(lease_id)
        hit = self.cache.get(lease_id)
        if hit is not None:
            return hit
        path = os.path.join(self.dir, lease_id.hex() + ".lock")
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            alive = False  # released cleanly, or already reaped
        else:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                alive = False  # nobody holds it: the owner is dead
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise
                alive = True
            finally:
                os.close(fd)
        self.cache[lease_id] = alive
        return alive


def pin_objects(idx: Index, txn: lmdb.Transaction, lease: bytes, digests: Iterable[bytes]) -> None:
    pins, rev = idx.db[b"pins"], idx.db[b"lease_pins"]
    for d in digests:
        txn.put(d, lease, db=pins, dupdata=True)
        txn.put(lease + d, b"", db=rev)


def unpin_objects(
    idx: Index, txn: lmdb.Transaction, lease: bytes, digests: Iterable[bytes]
) -> None:
    pins, rev = idx.db[b"pins"], idx.db[b"lease_pins"]
    for d in digests:
        txn.delete(d, lease, db=pins)
        txn.delete(lease + d, db=rev)


def unpin_all_objects(
    idx: Index, txn: lmdb.Transaction, lease: bytes, limit: int | None = None
) -> int:
    """Drop the object pins of a lease (reverse map scan), at most ``limit`` of them (so a
    caller can keep each write transaction bounded); returns how many."""
    rev = idx.db[b"lease_pins"]
    cur = txn.cursor(db=rev)
    keys: list[bytes] = []
    if cur.set_range(lease):
        for k in cur.iternext(values=False):
            k = bytes(k)
            if not k.startswith(lease) or (limit is not None and len(keys) >= limit):
                break
            keys.append(k)
    unpin_objects(idx, txn, lease, [k[LEASE_SIZE:] for k in keys])
    return len(keys)


def is_object_pinned(
    idx: Index, txn: lmdb.Transaction, digest: bytes, live: LivenessChecker
) -> bool:
    cur = txn.cursor(db=idx.db[b"pins"])
    if not cur.set_key(digest):
        return False
    return any(live.alive(bytes(v)) for v in cur.iternext_dup())


def pin_layer(idx: Index, txn: lmdb.Transaction, lease: bytes, diff_id: bytes) -> None:
    txn.put(diff_id + lease, b"", db=idx.db[b"layer_pins"])


def unpin_layer(idx: Index, txn: lmdb.Transaction, lease: bytes, diff_id: bytes) -> None:
    txn.delete(diff_id + lease, db=idx.db[b"layer_pins"])


def layer_pinners(idx: Index, txn: lmdb.Transaction, diff_id: bytes) -> list[bytes]:
    cur = txn.cursor(db=idx.db[b"layer_pins"])
    out: list[bytes] = []
    if cur.set_range(diff_id):
        for k in cur.iternext(values=False):
            k = bytes(k)
            if not k.startswith(diff_id):
                break
            out.append(k[len(diff_id) :])
    return out


def dead_leases(idx: Index, txn: lmdb.Transaction, live: LivenessChecker) -> set[bytes]:
    """Every lease id that appears in the index (pins, layer pins, doomed) and is dead."""
    seen: set[bytes] = set()
    for k in txn.cursor(db=idx.db[b"lease_pins"]).iternext(values=False):
        seen.add(bytes(k[:LEASE_SIZE]))
    for k in txn.cursor(db=idx.db[b"layer_pins"]).iternext(values=False):
        seen.add(bytes(k[-LEASE_SIZE:]))
    for v in txn.cursor(db=idx.db[b"doomed"]).iternext(keys=False):
        seen.add(bytes(v))
    return {lease for lease in seen if not live.alive(lease)}


def dead_leftovers(leases_dir: str, staging_dir: str, live: LivenessChecker) -> list[bytes]:
    """Leases of dead processes that left files: a lease file nobody holds (``.lock``, or a
    ``.tmp`` of a process that died before renaming it) or a ``staging/<lease>`` directory.
    Read-only; sorted.  Names that are not lease ids are not gc's to guess at (fsck reports
    a staging entry it cannot attribute)."""
    out: set[bytes] = set()
    for name in _listdir(leases_dir):
        if not name.endswith((".lock", ".tmp")):
            continue
        lease = _lease_id(name.rsplit(".", 1)[0])
        if lease is None:
            continue
        if name.endswith(".tmp"):
            if not _locked(os.path.join(leases_dir, name)):
                out.add(lease)
        elif not live.alive(lease):
            out.add(lease)
    for name in _listdir(staging_dir):
        lease = _lease_id(name)
        if lease is not None and not live.alive(lease):
            out.add(lease)
    return sorted(out)


def remove_leftovers(
    leases_dir: str, staging_dir: str, lease: bytes, live: LivenessChecker
) -> bool:
    """Delete a dead lease's staging directory, then its lease file(s); re-checks that the
    lease is dead first (its owner could only be alive if it were still creating it: a
    ``.tmp`` held locked).  Staging goes first, so a crash in between leaves the lease file
    and the next gc finds the lease again.  True if the lease was dead (and is gone now)."""
    base = os.path.join(leases_dir, lease.hex())
    if live.alive(lease) or (os.path.lexists(base + ".tmp") and _locked(base + ".tmp")):
        return False
    shutil.rmtree(os.path.join(staging_dir, lease.hex()), ignore_errors=True)
    for suffix in (".lock", ".tmp"):
        try:
            os.unlink(base + suffix)
        except FileNotFoundError:
            pass
    return True


def _listdir(d: str) -> list[str]:
    try:
        return os.listdir(d)
    except FileNotFoundError:
        return []


def _lease_id(text: str) -> bytes | None:
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        return None
    return raw if len(raw) == LEASE_SIZE else None


def _locked(path: str) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return True  # gone already: nothing to clean
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)
