"""fsck: find every kind of damage, say what it is, and repair what can be repaired.

Modelled on restic's ``checker``: read-only by default, every finding is a :class:`Problem`
with a stable ``code``, a message that names the object/layer/path and says what to do, and
whether ``--repair`` fixed it.  Repair never deletes the only copy of anything:

* corrupt or misplaced files go to ``quarantine/`` (timestamped), never to unlink;
* derived index data -- reference counts, sha256 aliases, compressed-digest aliases, layer
  backups -- is rebuilt from the manifests and object records;
* missing or corrupt objects are re-fetched from ``sources`` (another store, layer tarballs,
  or OCI image layouts whose layer blobs are re-imported; content is verified by digest
  before it is used);
* layers whose content cannot be restored are marked *damaged* with the paths they lack, and
  materializing them fails with an error naming those paths.

Checks: format version; objects (existence, regular file, read-only, size, and in full mode the
blake3 of the content against the name -- ``deep`` also recomputes sha256 against the record);
files in ``objects/`` without records and files that are not objects at all; sha256 aliases;
every manifest decodes and every object it references exists with the entry's size; reference
counts equal what the manifests say; compressed aliases; layer backups; pins and gc intents of
dead processes; staging leftovers.

Exit codes (``FsckReport.exit_code``): 0 clean, 1 damage found and all of it repaired,
4 damage left (found without ``--repair``, or not repairable); the CLI uses 8 when the store
cannot be checked at all.
"""

from __future__ import annotations

import collections
import hashlib
import json
import mmap
import os
import shutil
import stat
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Final

import blake3 as _blake3
import lmdb

from ..core import images as images_mod
from ..core import leases, protocol
from ..core.digests import is_hex_name
from ..core.index import ObjectRecord
from ..core.layers import write_backup
from ..core.manifest import REG
from ..core.repo import Repo
from ..errors import CorruptObjectError, LayerstoreError, StoreError
from . import ingest

EXIT_CLEAN: Final = 0
EXIT_REPAIRED: Final = 1
EXIT_DAMAGED: Final = 4
EXIT_ERROR: Final = 8


@dataclass
class Problem:
    code: str
    subject: str
    message: str
    repaired: bool = False

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class FsckReport:
    mode: str
    repair: bool
    problems: list[Problem] = field(default_factory=list)
    objects_checked: int = 0
    bytes_hashed: int = 0
    layers_checked: int = 0
    seconds: float = 0.0

    def add(self, code: str, subject: str, message: str) -> Problem:
        p = Problem(code, subject, message)
        self.problems.append(p)
        return p

    @property
    def exit_code(self) -> int:
        if not self.problems:
            return EXIT_CLEAN
        return EXIT_REPAIRED if all(p.repaired for p in self.problems) else EXIT_DAMAGED

    def to_json(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "repair": self.repair,
            "exit_code": self.exit_code,
            "objects_checked": self.objects_checked,
            "bytes_hashed": self.bytes_hashed,
            "layers_checked": self.layers_checked,
            "seconds": self.seconds,
            "mb_per_s": round(self.bytes_hashed / self.seconds / 1e6, 1) if self.seconds else None,
            "problems": [p.to_json() for p in self.problems],
            "counts": dict(Counter(p.code for p in self.problems)),
        }


# -- hashing ----------------------------------------------------------------------------------
_MT_HASH: Final = 1 << 20  # from here on, blake3 hashes one file on every core


def _hash_fd(fd: int, size: int, deep: bool) -> tuple[bytes, bytes | None]:
    """blake3 (and sha256 if ``deep``) of an open file.  Small files are read in one call;
    large ones are memory-mapped and hashed by blake3 on all cores (GIL released), so one
    thread keeps every core busy without per-file scheduling overhead."""
    if size == 0:
        return _blake3.blake3().digest(), (hashlib.sha256().digest() if deep else None)
    if size < _MT_HASH:
        data = os.pread(fd, size, 0)
        b3 = _blake3.blake3(data).digest()
        return b3, (hashlib.sha256(data).digest() if deep else None)
    with mmap.mmap(fd, 0, access=mmap.ACCESS_READ) as m:
        b3 = _blake3.blake3(m, max_threads=_blake3.blake3.AUTO).digest()
        sha = hashlib.sha256(m).digest() if deep else None
    return b3, sha


def _hash_object(path: str, deep: bool) -> tuple[bytes, bytes | None, int]:
    """(blake3, sha256 or None, size) of a file."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        b3, sha = _hash_fd(fd, size, deep)
    finally:
        os.close(fd)
    return b3, sha, size


class _Checker:
    def __init__(
        self,
        repo: Repo,
        full: bool,
        deep: bool,
        repair: bool,
        sources: list[str],
        progress: Callable[[int], None] | None,
        jobs: int,
    ) -> None:
        self.repo = repo
        self.idx = repo.index
        self.full = full or deep
        self.deep = deep
        self.repair = repair
        self.sources = sources
        self.progress = progress
        # One checking thread by default: small objects are hashed faster on one thread than
        # on several (GIL contention on small inputs, measured), and large ones are hashed by
        # blake3 on every core anyway (_hash_fd).
        self.jobs = jobs or 1
        self.report = FsckReport(
            mode="deep" if deep else "full" if full else "quick", repair=repair
        )
        self.bad: set[bytes] = set()  # objects whose record exists but content is missing/bad

    # objects ----------------------------------------------------------------------------------
    def _records(self) -> Iterator[tuple[bytes, ObjectRecord]]:
        with self.idx.read() as txn:
            for k, v in txn.cursor(db=self.idx.db[b"objects"]):
                yield bytes(k), ObjectRecord.unpack(v)

    def check_objects(self) -> None:
        rep = self.report
        repo = self.repo

        def one(item: tuple[bytes, ObjectRecord]) -> tuple[bytes, ObjectRecord, str, str, int]:
            b3, rec = item
            try:
                fd = os.open(repo.object_path(b3), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            except FileNotFoundError:
                return b3, rec, "object-missing", "file is missing", 0
            except OSError as exc:  # ELOOP: a symlink where an object should be
                return b3, rec, "object-not-regular", f"cannot be opened ({exc.strerror})", 0
            try:
                s = os.fstat(fd)
                if not stat.S_ISREG(s.st_mode):
                    return b3, rec, "object-not-regular", "is not a regular file", 0
                if s.st_size != rec.size:
                    msg = f"size {s.st_size}, index says {rec.size}"
                    return b3, rec, "object-corrupt", msg, 0
                size = 0
                if self.full:
                    try:
                        got, sha = _hash_fd(fd, s.st_size, self.deep)
                    except OSError as exc:
                        msg = f"cannot be read: {exc.strerror}"
                        return b3, rec, "object-unreadable", msg, 0
                    size = s.st_size
                    if got != b3:
                        msg = f"content hashes to {got.hex()[:16]}…"
                        return b3, rec, "object-corrupt", msg, size
                    if sha is not None and sha != rec.sha256:
                        msg = "recorded sha256 differs from content"
                        return b3, rec, "object-sha256-wrong", msg, size
                if s.st_mode & 0o222:
                    msg = "is writable (objects must be read-only)"
                    return b3, rec, "object-writable", msg, size
                return b3, rec, "", "", size
            finally:
                os.close(fd)

        def batch(items: list[tuple[bytes, ObjectRecord]]) -> list[tuple[Any, ...]]:
            return [one(it) for it in items]

        def batches() -> Iterator[list[tuple[bytes, ObjectRecord]]]:
            chunk: list[tuple[bytes, ObjectRecord]] = []
            for item in self._records():
                chunk.append(item)
                if len(chunk) >= 256:
                    yield chunk
                    chunk = []
            if chunk:
                yield chunk

        def results() -> Iterator[tuple[Any, ...]]:
            # Batches of 256 objects per task, at most 2 batches per thread in flight: bounded
            # memory for millions of objects, and scheduling cost far below the hashing.
            with ThreadPoolExecutor(max_workers=self.jobs) as pool:
                inflight: collections.deque[Future[list[tuple[Any, ...]]]] = collections.deque()
                for chunk in batches():
                    inflight.append(pool.submit(batch, chunk))
                    if len(inflight) >= 2 * self.jobs:
                        yield from inflight.popleft().result()
                while inflight:
                    yield from inflight.popleft().result()

        if True:
            for b3, rec, code, msg, hashed in results():
                rep.objects_checked += 1
                rep.bytes_hashed += hashed
                if self.progress:
                    self.progress(1)
                if not code:
                    continue
                p = rep.add(code, b3.hex(), f"object {b3.hex()}: {msg}")
                if code == "object-writable":
                    if self.repair:
                        os.chmod(repo.object_path(b3), 0o444)
                        p.repaired = True
                elif code == "object-sha256-wrong":
                    if self.repair:
                        _, sha, _ = _hash_object(repo.object_path(b3), True)
                        assert sha is not None
                        with self.idx.write() as txn:
                            self.idx.put_object(txn, b3, ObjectRecord(rec.size, sha, rec.refs))
                        p.repaired = True
                else:
                    self.bad.add(b3)
                    p.message += (
                        "; repair quarantines it and restores it from --source"
                        if code != "object-missing"
                        else "; restore it with --repair --source"
                    )

    def check_objects_dir(self) -> None:
        """objects/ itself.  Gone, every object is missing (reported one by one below); repair
        recreates the directory so the objects can be restored into it from ``--source``."""
        d = self.repo.objects_dir
        if os.path.isdir(d):
            return
        p = self.report.add(
            "objects-dir-missing",
            d,
            f"{d} is missing (or not a directory): every object of the store is gone; "
            "`layerstore fsck --repair --source STORE_OR_TARBALL` recreates it and restores "
            "the objects from the source",
        )
        if self.repair:
            if os.path.lexists(d):
                self._quarantine(d, "junk")
            for i in range(256):
                os.makedirs(os.path.join(d, f"{i:02x}"), exist_ok=True)
            p.repaired = True

    def check_files(self) -> None:
        """Files in objects/ with no record (orphans) and files that are not objects at all."""
        rep = self.report
        objs = self.idx.db[b"objects"]
        if not os.path.isdir(self.repo.objects_dir):
            return  # reported by check_objects_dir
        with os.scandir(self.repo.objects_dir) as top:
            fans = sorted(de.name for de in top)
        for fan in fans:
            d = os.path.join(self.repo.objects_dir, fan)
            if not is_hex_name(fan, 2) or not os.path.isdir(d):
                p = rep.add("junk-file", d, f"{d} does not belong in objects/")
                if self.repair:
                    self._quarantine(d, "junk")
                    p.repaired = True
                continue
            with os.scandir(d) as it, self.idx.read() as txn:
                entries = [(de.name, de.path) for de in it]
                unknown = [
                    (n, p)
                    for n, p in entries
                    if not (is_hex_name(n) and n.startswith(fan))
                    or txn.get(bytes.fromhex(n), db=objs) is None
                ]
            for name, path in unknown:
                if is_hex_name(name) and name.startswith(fan):
                    p = rep.add(
                        "object-orphan",
                        name,
                        f"object file {name} has no index record (a crash leftover; gc removes "
                        "unreferenced ones, repair records it if a layer needs it)",
                    )
                    if self.repair:
                        p.repaired = self._adopt_orphan(bytes.fromhex(name), path, p)
                else:
                    p = rep.add("junk-file", path, f"{path} is not an object file")
                    if self.repair:
                        self._quarantine(path, "junk")
                        p.repaired = True

    def _adopt_orphan(self, b3: bytes, path: str, p: Problem) -> bool:
        try:
            got, sha, size = _hash_object(path, True)
        except OSError:
            return False
        if got != b3:
            self._quarantine(path, "corrupt")
            p.message += "; its content does not match its name: quarantined"
            return True
        assert sha is not None
        os.chmod(path, 0o444)
        with self.idx.write() as txn:
            if self.idx.get_object(txn, b3) is None:
                self.idx.put_object(txn, b3, ObjectRecord(size, sha, 0))
                txn.put(sha, b3, db=self.idx.db[b"sha256"])
        p.message += "; recorded (refs are recounted below; gc frees it if nothing uses it)"
        return True

    def _quarantine(self, path: str, why: str) -> str:
        os.makedirs(self.repo.quarantine_dir, exist_ok=True)
        dest = os.path.join(
            self.repo.quarantine_dir, f"{os.path.basename(path)}.{why}.{time.time_ns()}"
        )
        shutil.move(path, dest)
        return dest

    # aliases ----------------------------------------------------------------------------------
    def check_aliases(self) -> None:
        """sha256 -> blake3 aliases agree with the object records, both ways.

        Repair does not trust a record's sha256 blindly: every object involved in a bad alias
        is re-hashed first, so a corrupted record is corrected rather than propagated.
        """
        rep = self.report
        idx = self.idx
        shadb = idx.db[b"sha256"]
        wrong: list[tuple[bytes, bytes]] = []  # (sha, the b3 it points to)
        missing: list[tuple[bytes, bytes]] = []  # (recorded sha, b3) not mapping back to b3
        with idx.read() as txn:
            for sha, b3 in txn.cursor(db=shadb):
                rec = idx.get_object(txn, bytes(b3))
                if rec is None or rec.sha256 != bytes(sha):
                    wrong.append((bytes(sha), bytes(b3)))
            wrong_shas = {sha for sha, _ in wrong}
            for b3, raw in txn.cursor(db=idx.db[b"objects"]):
                rec = ObjectRecord.unpack(raw)
                if rec.sha256 in wrong_shas:
                    continue  # one problem, already reported as a wrong alias
                if txn.get(rec.sha256, db=shadb) != bytes(b3):
                    missing.append((rec.sha256, bytes(b3)))
        problems = [
            rep.add("sha256-alias-wrong", sha.hex(), f"sha256 alias {sha.hex()} points wrong")
            for sha, _ in wrong
        ] + [
            rep.add("sha256-alias-missing", sha.hex(), f"object {b3.hex()} has no sha256 alias")
            for sha, b3 in missing
        ]
        if not self.repair or not problems:
            return
        involved = {b3 for _, b3 in wrong} | {b3 for _, b3 in missing}
        with idx.read() as txn:  # and the objects whose own alias a wrong one displaced
            for b3, raw in txn.cursor(db=idx.db[b"objects"]):
                if ObjectRecord.unpack(raw).sha256 in wrong_shas:
                    involved.add(bytes(b3))
        with idx.write() as txn:
            for sha, _ in wrong:
                txn.delete(sha, db=shadb)
            for b3 in sorted(involved):
                rec = idx.get_object(txn, b3)
                if rec is None or b3 in self.bad:
                    continue
                try:
                    got, sha, _ = _hash_object(self.repo.object_path(b3), True)
                except OSError:
                    continue  # missing/unreadable: reported by the object checks
                if got != b3 or sha is None:
                    continue
                if sha != rec.sha256:
                    idx.put_object(txn, b3, ObjectRecord(rec.size, sha, rec.refs))
                    rep.add(
                        "object-sha256-wrong",
                        b3.hex(),
                        f"object {b3.hex()}: recorded sha256 differed from content; corrected",
                    ).repaired = True
                txn.put(sha, b3, db=shadb)
        for p in problems:
            p.repaired = True

    # layers -----------------------------------------------------------------------------------
    def scan_layers(self) -> tuple[Counter[bytes], dict[bytes, list[str]], set[bytes], list]:
        """Read every manifest: reference counts, damaged layers (paths lacking content), the
        digests they lack, and size mismatches.  No side effects."""
        idx = self.idx
        counts: Counter[bytes] = Counter()
        damaged: dict[bytes, list[str]] = {}
        lacking: set[bytes] = set()
        notes: list[tuple[str, str, str]] = []
        with idx.read() as txn:
            layers = idx.iter_layers(txn)
        for diff_id, rec in layers:
            mb3 = bytes.fromhex(rec["manifest"])
            counts[mb3] += 1
            missing: list[str] = []
            if rec.get("tarsplit"):
                ts = bytes.fromhex(rec["tarsplit"])
                counts[ts] += 1
                with idx.read() as txn:
                    if idx.get_object(txn, ts) is None or ts in self.bad:
                        lacking.add(ts)
                        missing.append("*tar-split*")
            try:
                if mb3 in self.bad:
                    raise CorruptObjectError("manifest object is missing or corrupt")
                with idx.read() as txn:
                    for e in self.repo.manifest_entries(mb3):
                        if e.kind != REG or e.digest is None:
                            continue
                        counts[e.digest] += 1
                        orec = idx.get_object(txn, e.digest)
                        if orec is None or e.digest in self.bad:
                            missing.append(e.path)
                            lacking.add(e.digest)
                        elif orec.size != e.size:
                            missing.append(e.path)
                            notes.append(
                                (
                                    "manifest-size-mismatch",
                                    diff_id.hex(),
                                    f"layer {diff_id.hex()[:16]}: {e.path!r} is {e.size} bytes, "
                                    f"object {e.digest.hex()[:16]} is {orec.size}",
                                )
                            )
            except (LayerstoreError, OSError) as exc:
                notes.append(
                    (
                        "manifest-unreadable",
                        diff_id.hex(),
                        f"layer {diff_id.hex()[:16]}: manifest {mb3.hex()[:16]} cannot be read "
                        f"({exc}); the whole layer is damaged",
                    )
                )
                lacking.add(mb3)
                missing = ["*manifest*"]
            if missing:
                damaged[diff_id] = missing
        return counts, damaged, lacking, notes

    def check_layers(self) -> None:
        rep = self.report
        idx = self.idx
        counts, damaged, lacking, notes = self.scan_layers()
        restored_any = bool(self.bad)
        notes2: list = []
        if self.repair and (lacking or self.bad):
            self.restore(lacking)
            counts, after, _, notes2 = self.scan_layers()
            notes_after = {(c, s) for c, s, _ in notes2}
        else:
            after, notes_after = damaged, {(c, s) for c, s, _ in notes}
        for code, subject, msg in notes:
            p = rep.add(code, subject, msg)
            p.repaired = (code, subject) not in notes_after
        with idx.read() as txn:
            layers = dict(idx.iter_layers(txn))
        for diff_id, paths in damaged.items():
            p = rep.add(
                "layer-damaged",
                diff_id.hex(),
                f"layer sha256:{diff_id.hex()} lacks content for {len(paths)} paths "
                f"(first: {', '.join(paths[:3])}); restore with --repair --source",
            )
            p.repaired = diff_id not in after
        rep.layers_checked = len(layers)
        for diff_id, rec in layers.items():
            flagged = bool(rec.get("damaged"))
            if flagged and diff_id not in after and diff_id not in damaged:
                p = rep.add(
                    "layer-damaged-flag",
                    diff_id.hex(),
                    f"layer {diff_id.hex()[:16]} is marked damaged but is complete now",
                )
                p.repaired = self.repair
        if self.repair:
            changed: list[tuple[bytes, dict[str, Any]]] = []
            with idx.write() as txn:
                for diff_id, rec in layers.items():
                    want = after.get(diff_id)
                    if want is not None:
                        rec["damaged"] = want[:1000]
                    elif "damaged" in rec:
                        del rec["damaged"]
                    else:
                        continue
                    idx.put_layer(txn, diff_id, rec)
                    changed.append((diff_id, rec))
            for diff_id, rec in changed:  # backups follow the committed index
                write_backup(self.repo, diff_id, rec)
        final_notes = notes2 if self.repair and (lacking or restored_any) else notes
        unreadable = any(code == "manifest-unreadable" for code, _, _ in final_notes)
        self._check_counts(counts, can_lower=not unreadable)

    def _check_counts(self, counts: Counter[bytes], can_lower: bool) -> None:
        """Compare reference counts with the manifests.  While any manifest is unreadable its
        references are unknown, so counts are only ever raised, never lowered: lowering them
        would let gc delete the content a later repair needs."""
        rep = self.report
        idx = self.idx
        fixes: list[tuple[bytes, int, Problem]] = []
        for b3, rec in self._records():
            want = counts.get(b3, 0)
            if rec.refs != want:
                p = rep.add(
                    "refcount-wrong",
                    b3.hex(),
                    f"object {b3.hex()[:16]} has refcount {rec.refs}, manifests say {want}",
                )
                if want > rec.refs or can_lower:
                    fixes.append((b3, want, p))
                else:
                    p.message += " (not lowered while a manifest is unreadable)"
        if self.repair and fixes:
            with idx.write() as txn:
                for b3, want, _ in fixes:
                    rec = idx.get_object(txn, b3)
                    if rec is not None:
                        idx.put_object(txn, b3, ObjectRecord(rec.size, rec.sha256, want))
            for _, _, p in fixes:
                p.repaired = True

    def check_images(self) -> None:
        """Images name existing layers; each layer's image count equals the images using it."""
        rep = self.report
        idx = self.idx
        uses: Counter[bytes] = Counter()
        with idx.read() as txn:
            images = self.repo.index.iter_images(txn)
            layers = dict(idx.iter_layers(txn))
        for name, im in images:
            for h in im["layers"]:
                d = bytes.fromhex(h)
                uses[d] += 1
                if d not in layers:
                    rep.add(
                        "image-layer-missing",
                        name,
                        f"image {name!r} lists layer sha256:{h} which is not in the store; "
                        "re-import the image",
                    )
        fixes = []
        for d, rec in layers.items():
            if rec.get("images", 0) != uses.get(d, 0):
                p = rep.add(
                    "image-count-wrong",
                    d.hex(),
                    f"layer {d.hex()[:16]} says {rec.get('images', 0)} images use it, "
                    f"{uses.get(d, 0)} do",
                )
                fixes.append((d, p))
        if self.repair and fixes:
            with idx.write() as txn:
                for d, p in fixes:
                    rec = idx.get_layer(txn, d)
                    if rec is not None:
                        rec["images"] = uses.get(d, 0)
                        idx.put_layer(txn, d, rec)
                        p.repaired = True

    def check_compressed_and_backups(self) -> None:
        rep = self.report
        idx = self.idx
        with idx.read() as txn:
            layers = dict(idx.iter_layers(txn))
            dangling = [
                bytes(k)
                for k, v in txn.cursor(db=idx.db[b"compressed"])
                if bytes(v) not in layers or layers[bytes(v)].get("state") == "deleted"
            ]
        for k in dangling:
            p = rep.add("compressed-alias-dangling", k.hex(), f"alias {k.hex()} has no layer")
            if self.repair:
                with idx.write() as txn:
                    txn.delete(k, db=idx.db[b"compressed"])
                p.repaired = True
        on_disk = {
            n[:-5] for n in os.listdir(self.repo.layers_dir) if n.endswith(".json") and len(n) == 69
        }
        for diff_id, rec in layers.items():
            if diff_id.hex() not in on_disk:
                p = rep.add(
                    "layer-backup-missing", diff_id.hex(), f"layer {diff_id.hex()[:16]} backup"
                )
                if self.repair:
                    write_backup(self.repo, diff_id, rec)
                    p.repaired = True
        for h in sorted(on_disk - {d.hex() for d in layers}):
            p = rep.add("layer-backup-extra", h, f"backup of unknown layer {h[:16]}")
            if self.repair:
                self._quarantine(os.path.join(self.repo.layers_dir, h + ".json"), "stale")
                p.repaired = True
        self.check_image_backups()

    def check_image_backups(self) -> None:
        """Every image has its backup in images/ (what `--rebuild-index` restores images
        from), and every backup names an image of the index."""
        rep, repo = self.report, self.repo
        with self.idx.read() as txn:
            images = dict(self.idx.iter_images(txn))
        backed = dict(images_mod.read_backups(repo))
        for name, im in sorted(images.items()):
            if backed.get(name) != im:
                p = rep.add("image-backup-missing", name, f"image {name!r} backup")
                if self.repair:
                    images_mod.write_backup(repo, name, im)
                    p.repaired = True
        want = {os.path.basename(images_mod.backup_path(repo, n)) for n in images}
        try:
            on_disk = sorted(n for n in os.listdir(repo.images_dir) if n.endswith(".json"))
        except FileNotFoundError:
            on_disk = []
        for fn in on_disk:
            if fn not in want:
                p = rep.add("image-backup-extra", fn, f"image backup {fn[:16]} of no image")
                if self.repair:
                    self._quarantine(os.path.join(repo.images_dir, fn), "stale")
                    p.repaired = True

    # processes --------------------------------------------------------------------------------
    def check_leases(self) -> None:
        rep = self.report
        repo = self.repo
        live = leases.LivenessChecker(repo.leases_dir, own=repo.lease.id)
        with self.idx.read() as txn:
            dead = leases.dead_leases(self.idx, txn, live)
        for lease in sorted(dead):
            rep.add(
                "dead-pins",
                lease.hex(),
                f"pins/intents of dead process lease {lease.hex()} (gc or repair drops them)",
            )
        stale = []
        for name in os.listdir(repo.staging_dir):
            try:
                lease = bytes.fromhex(name)
            except ValueError:
                stale.append(name)
                continue
            if not live.alive(lease):
                stale.append(name)
        for name in stale:
            rep.add("stale-staging", name, f"staging/{name} belongs to a dead process")
        if self.repair and (dead or stale):
            protocol.reap(repo)
            for name in stale:
                shutil.rmtree(os.path.join(repo.staging_dir, name), ignore_errors=True)
            for p in rep.problems:
                if p.code in ("dead-pins", "stale-staging"):
                    p.repaired = True

    # repair from sources ----------------------------------------------------------------------
    def restore(self, lacking: set[bytes]) -> None:
        """Quarantine bad objects, drop their records, then re-fetch what layers lack."""
        idx = self.idx
        repo = self.repo
        with idx.write() as txn:
            for b3 in self.bad:
                path = repo.object_path(b3)
                if os.path.lexists(path):
                    self._quarantine(path, "corrupt")
                rec = idx.get_object(txn, b3)
                if rec is not None:
                    if txn.get(rec.sha256, db=idx.db[b"sha256"]) == b3:
                        txn.delete(rec.sha256, db=idx.db[b"sha256"])
                    txn.delete(b3, db=idx.db[b"objects"])
        want = lacking | self.bad
        restored: set[bytes] = set()
        for src in self.sources:
            restored |= self._restore_from(src, want - restored)
        # Objects the sources could not supply stay absent: their layers are marked damaged.
        self.bad = set()
        for p in self.report.problems:
            if p.code.startswith("object-") and p.subject in {b.hex() for b in restored}:
                p.repaired = True

    def _restore_from(self, src: str, want: set[bytes]) -> set[bytes]:
        repo = self.repo
        got: set[bytes] = set()
        if os.path.isfile(os.path.join(src, "layerstore.json")):
            try:
                other = Repo(src)  # refused if its own index is lost: then it is no source
            except LayerstoreError as exc:
                self.report.add("source-unusable", src, f"source {src} cannot be opened: {exc}")
                return got
            try:
                for b3 in sorted(want):
                    path = other.object_path(b3)
                    if not os.path.isfile(path):
                        continue
                    h, sha, size = _hash_object(path, True)
                    if h != b3:
                        continue  # the source is damaged too: never copy bad data
                    stage = repo.new_staging_dir("restore")
                    tmp = os.path.join(stage, b3.hex())
                    shutil.copyfile(path, tmp)
                    h2, sha2, _ = _hash_object(tmp, True)
                    if h2 != b3:
                        continue
                    os.chmod(tmp, 0o444)
                    with self.idx.write() as txn:
                        if self.idx.get_object(txn, b3) is None:
                            os.rename(tmp, repo.object_path(b3))
                            assert sha2 is not None
                            self.idx.put_object(txn, b3, ObjectRecord(size, sha2, 0))
                            txn.put(sha2, b3, db=self.idx.db[b"sha256"])
                    shutil.rmtree(stage, ignore_errors=True)
                    got.add(b3)
            finally:
                other.close()
        elif os.path.isfile(src):
            # A layer tarball: importing it writes exactly the contents the index lacks (the
            # bad records were dropped above), each verified by digest on the way in.
            try:
                ingest.import_path(repo, src, shortcut=False)
            except LayerstoreError as exc:
                self.report.add("source-unusable", src, f"source {src} could not be read: {exc}")
                return got
            with self.idx.read() as txn:
                for b3 in want:
                    if self.idx.get_object(txn, b3) is not None:
                        got.add(b3)
        elif os.path.isfile(os.path.join(src, "oci-layout")):
            # An OCI image layout: re-import the layer blobs whose compressed digest names a
            # layer of this store (never anything else), each verified on the way in.
            blobs = os.path.join(src, "blobs", "sha256")
            comp_db = self.idx.db[b"compressed"]
            for name in sorted(os.listdir(blobs)) if os.path.isdir(blobs) else []:
                try:
                    digest = bytes.fromhex(name)
                except ValueError:
                    continue
                with self.idx.read() as txn:
                    if len(digest) != 32 or txn.get(digest, db=comp_db) is None:
                        continue
                try:
                    ingest.import_path(
                        repo, os.path.join(blobs, name), shortcut=False, image_owned=True
                    )
                except LayerstoreError as exc:
                    self.report.add("source-unusable", src, f"{src}/{name}: {exc}")
            with self.idx.read() as txn:
                got |= {b3 for b3 in want if self.idx.get_object(txn, b3) is not None}
        else:
            self.report.add(
                "source-unusable", src, f"{src} is neither a store, an OCI layout nor a tarball"
            )
        return got


def fsck(
    repo: Repo,
    *,
    full: bool = True,
    deep: bool = False,
    repair: bool = False,
    sources: list[str] | None = None,
    progress: Callable[[int], None] | None = None,
    jobs: int = 0,
) -> FsckReport:
    """Check (and with ``repair`` fix) a store; see the module docstring."""
    t0 = time.monotonic()
    c = _Checker(repo, full, deep, repair, list(sources or []), progress, jobs)
    c.check_objects_dir()
    c.check_leases()
    c.check_objects()
    c.check_files()
    c.check_aliases()
    c.check_layers()
    c.check_images()
    c.check_compressed_and_backups()
    c.report.seconds = time.monotonic() - t0
    return c.report


_PROBE = """
import sys, lmdb
env = lmdb.open(sys.argv[1], readonly=True, lock=False, max_dbs=32, subdir=True)
with env.begin() as txn:
    names = [k for k, _ in txn.cursor()]
    for name in names:
        db = env.open_db(name, txn=txn, create=False)
        for _ in txn.cursor(db=db):
            pass
"""


def probe_index(root: str) -> str | None:
    """Read the whole index in a child process; return a problem description or None.

    A damaged LMDB file can crash the reading process with SIGBUS (pages past a truncated end)
    -- something no in-process check can catch.  The child takes the hit instead.
    """
    import subprocess
    import sys

    path = os.path.join(root, "index")
    if not os.path.exists(os.path.join(path, "data.mdb")):
        return None
    r = subprocess.run(
        [sys.executable, "-c", _PROBE, path], capture_output=True, text=True, timeout=3600
    )
    if r.returncode == 0:
        return None
    if r.returncode < 0:
        return f"reading the index crashed with signal {-r.returncode} (the data file is damaged)"
    return f"the index cannot be read: {r.stderr.strip().splitlines()[-1] if r.stderr else '?'}"


def _restore_images(repo: Repo, txn: lmdb.Transaction) -> tuple[int, list[str]]:
    """Images come back from images/*.json when every layer they list came back; each
    layer's image count is then recomputed from the restored images (a layer backup's own
    count may lag: it is not rewritten when an image is added)."""
    idx = repo.index
    restored: list[tuple[str, dict[str, Any]]] = []
    skipped: list[str] = []
    for name, im in images_mod.read_backups(repo):
        if all(idx.get_layer(txn, bytes.fromhex(h)) is not None for h in im["layers"]):
            idx.put_image(txn, name, im)
            restored.append((name, im))
        else:
            skipped.append(name)
    uses = Counter(bytes.fromhex(h) for _name, im in restored for h in im["layers"])
    for diff_id, rec in idx.iter_layers(txn):
        if rec.get("images", 0) != uses.get(diff_id, 0):
            rec["images"] = uses.get(diff_id, 0)
            idx.put_layer(txn, diff_id, rec)
    return len(restored), skipped


def rebuild_index(root: str, progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Recreate a lost or unreadable index from objects/ and the layer backups.

    The broken index directory is kept as ``index.broken-<time>``.  Every object is re-hashed
    (it is the only way to trust it again); layers come back from ``layers/*.json``; reference
    counts are recomputed from their manifests.
    """

    idx_dir = os.path.join(root, "index")
    if not os.path.isdir(os.path.join(root, "objects")):
        raise StoreError(f"{root} has no objects/ directory: nothing to rebuild from")
    aside: str | None = None
    if os.path.lexists(idx_dir):
        aside = f"{idx_dir}.broken-{time.strftime('%Y%m%dT%H%M%S')}"
        n = 0
        while os.path.lexists(aside):  # two rebuilds within a second: keep both
            n += 1
            aside = f"{idx_dir}.broken-{time.strftime('%Y%m%dT%H%M%S')}.{n}"
        os.rename(idx_dir, aside)
    os.makedirs(idx_dir)
    os.makedirs(os.path.join(root, "layers"), exist_ok=True)
    # The one open that accepts an index which is not (yet) this store's: it is filled from
    # objects/ and the backups, then stamped as the next generation of this store's index.
    repo = Repo(root, rebuilding=True)
    restored_objects = 0
    quarantined = 0
    n_layers = 0
    try:
        with repo.index.write() as txn:
            for fan in sorted(os.listdir(repo.objects_dir)):
                d = os.path.join(repo.objects_dir, fan)
                if not os.path.isdir(d):
                    continue
                for name in sorted(os.listdir(d)):
                    path = os.path.join(d, name)
                    try:
                        b3 = bytes.fromhex(name)
                        h, sha, size = _hash_object(path, True)
                    except (ValueError, OSError):
                        continue
                    if h != b3 or sha is None:
                        os.makedirs(repo.quarantine_dir, exist_ok=True)
                        shutil.move(path, os.path.join(repo.quarantine_dir, f"{name}.corrupt"))
                        quarantined += 1
                        continue
                    repo.index.put_object(txn, b3, ObjectRecord(size, sha, 0))
                    txn.put(sha, b3, db=repo.index.db[b"sha256"])
                    restored_objects += 1
                    if progress:
                        progress(1)
            for name in sorted(os.listdir(repo.layers_dir)):
                if not name.endswith(".json"):
                    continue
                with open(os.path.join(repo.layers_dir, name)) as f:
                    rec = json.load(f)
                diff_id = bytes.fromhex(rec.pop("diff_id"))
                repo.index.put_layer(txn, diff_id, rec)
                for c in rec.get("compressed", []):
                    txn.put(bytes.fromhex(c), diff_id, db=repo.index.db[b"compressed"])
                n_layers += 1
            n_images, skipped_images = _restore_images(repo, txn)
        repo.stamp_identity()
    finally:
        repo.close()
    with Repo(root) as repo:
        report = fsck(repo, full=False, repair=True)
    return {
        "index_moved_to": aside,
        "objects": restored_objects,
        "quarantined": quarantined,
        "layers": n_layers,
        "images": n_images,
        # Images whose backup names a layer no backup restored (their layers' backups were
        # lost too): not restored, named here so they can be pulled again.
        "images_not_restored": skipped_images,
        "image_backups": os.path.isdir(repo.images_dir),
        "fsck_exit_code": report.exit_code,
        "problems_after_rebuild": [p.to_json() for p in report.problems if not p.repaired],
    }
