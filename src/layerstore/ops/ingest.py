"""Ingest: turn a tar stream (plain, gzip or zstd) into objects and a layer manifest.

The import runs in three phases so that bad input never changes what the store shows:

1. **Stream.**  Decompress (format detected by magic bytes; a producer thread), parse the tar
   and validate every name (the main thread); file contents go to the import's
   :class:`~layerstore.core.objects.ObjectWriter`, which hashes them on its writer threads,
   pins content the index already has and stages the rest.  The manifest is written to
   staging too, in tar order (an entry waits, bounded, until its content is named).  Any
   error here discards staging and pins: the store is as it was.
2. **Publish.**  ``ObjectWriter.publish``: staged objects become durable, are renamed into
   ``objects/``, recorded (refcount 0) and pinned, in bounded batches.  A crash leaves at
   worst orphan files or unreferenced records, which gc removes.
3. **Commit.**  ``core.protocol.commit_layer``: one write transaction adds the layer record and
   the references its manifest makes, and drops the import's pins.  From this commit on the
   layer exists.

Pins are held against this process's lease, so a killed import's pins are reclaimed by gc.
"""

from __future__ import annotations

import collections
import errno
import hashlib
import io
import os
import shutil
import stat
import tarfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Final

import lmdb

from ..core import layers, protocol
from ..core.digests import sha256_of
from ..core.index import index_error, layer_unproved
from ..core.manifest import (
    BLOCK,
    CHAR,
    DIR,
    FIFO,
    HARDLINK,
    REG,
    SYMLINK,
    Entry,
    ManifestWriter,
)
from ..core.objects import ObjectWriter
from ..core.paths import PATH_MAX, PathSet, ancestors, normalize
from ..core.repo import Repo
from ..core.tarsplit import TarSplitWriter
from ..errors import InvalidInputError, StoreError, UnsafePathError
from ..tar.compression import BlobReader, detect_compression
from ..tar.reader import TarMember, TarReader

# Files up to this size are kept in the manifest instead of becoming objects.  composefs uses
# 64 bytes; docs/architecture.md has the measurement behind keeping that value.
INLINE_MAX: Final = 64
# Files up to this size are read into memory and hashed before anything is written, so content
# already stored is never written again.  Larger files stream through a staging file.
MEM_MAX: Final = 8 << 20
# Entries at most waiting for their content's digest before the main thread waits.
_MAX_WAITING: Final = 8192
_READ = 1 << 20
_U32: Final = (1 << 32) - 1
# The largest device numbers Linux can represent (12-bit major, 20-bit minor).
DEV_MAJOR_MAX: Final = (1 << 12) - 1
DEV_MINOR_MAX: Final = (1 << 20) - 1
_I64_MIN: Final = -(1 << 63)
_I64_MAX: Final = (1 << 63) - 1
_TINY_MAX: Final = 100_000  # inline contents remembered per import (<= 6.4 MB)


# -- the import ------------------------------------------------------------------------------
@dataclass
class ImportResult:
    """What an import did; also the JSON the CLI prints."""

    diff_id: str
    compressed_digest: str
    compression: str
    manifest: str
    entries: int
    files: int
    logical_bytes: int
    new_objects: int = 0
    new_bytes: int = 0
    reused_objects: int = 0
    inline_files: int = 0
    already_present: bool = False
    seconds: float = 0.0
    stats: dict[str, int] = field(default_factory=dict)
    # zstd:chunked partial imports: bytes read vs blob size, what was reused (else None)
    partial: dict[str, Any] | None = None
    # The store held this DiffID only unproved (a TOC-only import); this import proved it and
    # replaced that record's content with its own (``Store._commit_layer``).
    proved_unproved: bool = False
    # What the tar reader accepted the way GNU tar does but a user may want to know (a
    # malformed PAX mtime, a Solaris ACL ignored); at most tarstream.MAX_WARNINGS of them.
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @staticmethod
    def stored(diff_id: bytes, rec: dict[str, Any], compressed: str = "") -> ImportResult:
        """The result of an import that found its layer already stored (nothing read)."""
        return ImportResult(
            diff_id="sha256:" + diff_id.hex(),
            compressed_digest=compressed,
            compression=rec.get("compression", ""),
            manifest=rec["manifest"],
            entries=rec["entries"],
            files=rec["files"],
            logical_bytes=rec["bytes"],
            already_present=True,
        )


@dataclass(frozen=True)
class Expected:
    """What an image says a layer blob is (OCI descriptor: digest and size; config: DiffID).

    Checked as soon as the blob has been read, before anything is published or committed, so
    a blob that is not what its image says leaves the store exactly as it was (no layer, no
    object records).  ``what`` names the layer in messages ("layer 1 (sha256:...)").
    """

    what: str
    digest: bytes | None = None  # sha256 of the blob as stored (compressed)
    size: int | None = None
    diff_id: bytes | None = None  # sha256 of the uncompressed tar

    def check_blob(self, digest: bytes, size: int) -> None:
        if self.size is not None and size != self.size:
            raise InvalidInputError(
                f"{self.what}: the blob is {size} bytes, but its descriptor says {self.size}; "
                "the layout is damaged or tampered with, nothing was imported"
            )
        if self.digest is not None and digest != self.digest:
            raise InvalidInputError(
                f"{self.what}: the blob hashes to sha256:{digest.hex()}, not to its "
                f"descriptor's sha256:{self.digest.hex()}; the layout is damaged or tampered "
                "with, nothing was imported"
            )

    def check_diff_id(self, diff_id: bytes) -> None:
        if self.diff_id is not None and diff_id != self.diff_id:
            raise InvalidInputError(
                f"{self.what} has DiffID sha256:{diff_id.hex()}, but the config says "
                f"sha256:{self.diff_id.hex()}; nothing was imported"
            )


class _Importer:
    """One layer's import: the manifest entries in tar order, and the :class:`ObjectWriter`
    that turns their content into objects.  An entry whose content the writers have not named
    yet waits (in order, bounded) with every entry behind it."""

    def __init__(self, repo: Repo) -> None:
        self.repo = repo
        self.stage = repo.new_staging_dir("import")
        try:
            self.objects = ObjectWriter(
                repo, self.stage, on_named=self._named, on_settled=self._write_settled
            )
        except BaseException:
            shutil.rmtree(self.stage, ignore_errors=True)
            raise
        # Manifest entries in tar order, each [entry, path, settled]: those behind one whose
        # content digest the writers have not returned yet wait here (bounded).
        self.entries: collections.deque[list[Any]] = collections.deque()
        self.mw: ManifestWriter | None = None
        self.inline = 0
        self.files = 0
        self.logical = 0
        self.replaces = 0
        self.tarsplit = b""
        self.tar_bytes = 0
        self.hooks: ImportHooks | None = None
        # Inline files' contents by sha256, for zstd:chunked reuse (chunkindex.record_tiny).
        self.tiny: dict[bytes, bytes] = {}

    def add_file(self, e: Entry, path: str, data: bytes) -> None:
        """A regular file read into memory: its entry waits (in order) for the writers to
        name its content."""
        item = [e, path, False]
        self.entries.append(item)
        self.objects.submit(data, item)
        self._bound_waiting()

    def emit(self, e: Entry) -> None:
        """An entry whose content is settled: written now unless earlier ones still wait."""
        if self.entries:
            self.entries.append([e, "", True])
            self._bound_waiting()
        else:
            self.mw.add(e)  # type: ignore[union-attr]

    def _bound_waiting(self) -> None:
        """Keep the waiting entries bounded (an entry can carry megabytes of xattrs): past
        the bound, hand over the partial batch and wait until the oldest entry is named."""
        if len(self.entries) > _MAX_WAITING:
            self.objects.flush_batch()
            while self.entries and not self.entries[0][2]:
                self.objects.collect()

    @staticmethod
    def _named(item: list[Any], b3: bytes) -> None:
        item[0].digest = b3
        item[2] = True

    def _write_settled(self) -> None:
        """Write out the entries at the head of the queue whose content is named."""
        entries, hooks = self.entries, self.hooks
        while entries and entries[0][2]:
            e, path, _ = entries.popleft()
            if path and hooks is not None:
                hooks.content_digest(path, e.digest)
            self.mw.add(e)  # type: ignore[union-attr]

    def close(self) -> None:
        """Stop the writers, drop uncommitted pins, discard staging (after commit or not)."""
        try:
            self.objects.close()
        finally:
            shutil.rmtree(self.stage, ignore_errors=True)


def import_tar(
    repo: Repo,
    stream: BinaryIO,
    progress: Callable[[int], None] | None = None,
    source: str = "",
    shortcut: bool = True,
    image_owned: bool = False,
    expect: Expected | None = None,
) -> ImportResult:
    """Import one layer from a tar stream (plain/gzip/zstd); see the module docstring.

    ``shortcut=False`` reads the blob even if its compressed digest is known (fsck uses it to
    re-create lost objects from a source tarball).  ``expect``: what the image says the blob
    is; a blob that differs is refused before anything is published.
    """
    t0 = time.monotonic()
    known = _known_blob(repo, stream, expect) if shortcut else None
    if known is not None:
        if not image_owned:
            layers.mark_standalone(repo, bytes.fromhex(known.diff_id[7:]))
        known.seconds = time.monotonic() - t0
        return known
    return run_import(
        repo, lambda imp: (stream, None), progress, source, image_owned, expect=expect
    )


class ImportHooks:
    """What a non-tar source (a zstd:chunked partial import) plugs into the import pipeline.

    The pipeline still parses the (reconstructed) tar and validates every name, so a partial
    import gets exactly the checks of a full one; the hooks add the cross-checks against the
    TOC and let assembled files be adopted instead of written a second time.
    """

    compression = "none"

    def check_member(self, m: TarMember, path: str) -> None:
        """Called for every tar member before it is used; raise to refuse the layer."""

    def content_digest(self, path: str, b3: bytes) -> None:
        """The blake3 the pipeline computed for a regular file's content (raise to refuse)."""

    def take_prestaged(self, path: str) -> str | None:
        """A staged file (in the importer's staging dir) holding this member's content."""
        return None

    def finish(self, diff_id: bytes) -> None:
        """Called after the tar ends, with its DiffID, before anything is published or
        committed; raise to refuse the layer (something expected never came, or the DiffID is
        not the one the image config names)."""

    def info(self) -> dict[str, Any]:
        """Extra fields for the layer record (and the result's ``partial``)."""
        return {}

    def commit_as(self, diff_id: bytes) -> tuple[bytes, bool]:
        """The DiffID to record and whether the tar-split is the layer's exact tar.  A TOC-only
        partial import replays a tar *synthesized* from the TOC: it keys the layer by the
        image config's (unverified) DiffID and keeps no tar-split (export then refuses)."""
        return diff_id, True


def run_import(
    repo: Repo,
    make_stream: Callable[[_Importer], tuple[BinaryIO, ImportHooks | None]],
    progress: Callable[[int], None] | None,
    source: str,
    image_owned: bool,
    record_compressed: bool = True,
    expect: Expected | None = None,
) -> ImportResult:
    """Stream, publish and commit one layer; ``make_stream`` supplies the raw byte stream (it
    gets the importer so a partial import can assemble files in its staging directory).
    ``expect`` is checked once the blob is read, before anything is published."""
    t0 = time.monotonic()
    imp = _Importer(repo)
    blob: BlobReader | None = None
    try:
        stream, hooks = make_stream(imp)
        imp.hooks = hooks
        blob = BlobReader(stream, progress, plain=hooks is not None)
        result = _stream_phase(imp, blob)
        comp_digest, diff_id = blob.finish()  # whole blob read, integrity checked
        if expect is not None:
            expect.check_blob(comp_digest, blob.total_in)
            expect.check_diff_id(diff_id)
        if hooks is not None:
            hooks.finish(diff_id)  # before anything is published or committed
        if imp.tar_bytes != blob.total_out:
            raise StoreError(
                f"internal error: the tar-split covers {imp.tar_bytes} bytes of a "
                f"{blob.total_out}-byte tar; please report this"
            )
        exact = True
        if hooks is not None:
            diff_id, exact = hooks.commit_as(diff_id)
        imp.objects.publish()
        compression = hooks.compression if hooks is not None else blob.compression
        extra = hooks.info() if hooks is not None else {}
        result.compression = compression
        result.diff_id = "sha256:" + diff_id.hex()
        result.compressed_digest = "sha256:" + comp_digest.hex() if record_compressed else ""
        outcome = protocol.commit_layer(
            repo,
            diff_id,
            comp_digest if record_compressed else None,
            bytes.fromhex(result.manifest),
            {
                "entries": result.entries,
                "files": result.files,
                "bytes": result.logical_bytes,
                "compression": compression,
                "source": source,
                "replaces": imp.replaces,
                "tarsplit": imp.tarsplit.hex() if exact else "",
                "tar_bytes": imp.tar_bytes if exact else 0,
                "standalone": not image_owned,
                "images": 0,
                **extra,
            },
            imp.objects.pinned,
            blob.total_in if record_compressed else None,
        )
        present = outcome == "present"
        result.already_present = present
        result.proved_unproved = outcome == "proved"
        if imp.tiny:
            from .chunkindex import record_tiny

            record_tiny(repo, imp.tiny)
        if not present and hooks is None and repo.index_chunks:
            # Plain tar: cut its new objects as containers/storage would, so later
            # zstd:chunked pulls find their chunks (a hint index; after the commit).
            from .chunkindex import index_layer

            result.stats.update(index_layer(repo, bytes.fromhex(result.manifest)))
        result.new_objects = imp.objects.new_objects
        result.new_bytes = imp.objects.new_bytes
        result.reused_objects = imp.objects.reused
        result.partial = extra.get("partial")
        result.seconds = time.monotonic() - t0
        return result
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise StoreError(
                f"the store's filesystem is full ({exc}); nothing was imported. "
                "Free space (e.g. `layerstore gc`) and retry"
            ) from None
        raise
    except lmdb.Error as exc:
        raise index_error(exc, "the import") from None
    finally:
        if blob is not None:
            blob.abort()
        imp.close()


def _known_blob(
    repo: Repo, stream: BinaryIO, expect: Expected | None = None
) -> ImportResult | None:
    """For a regular file: if its sha256 is a compressed digest of a stored layer, that layer
    *is* this blob -- nothing to parse or write.  One sequential read (~1.5 GB/s of sha256)
    that saves a re-import all of its decompression, parsing and hashing.  Streams that cannot
    be rewound (stdin, pipes) take the normal path.  Once hashed, the blob is held to
    ``expect`` right here (a blob that is not its descriptor's is refused unread)."""
    try:
        st = os.fstat(stream.fileno())
        if not stat.S_ISREG(st.st_mode):
            return None
        start = stream.tell()
    except (OSError, AttributeError, ValueError, io.UnsupportedOperation):
        return None
    size = st.st_size - start
    if size <= 0:
        return None  # nothing (more) to read: the normal path reports it
    with repo.index.read() as txn:
        if not repo.index.has_blob_of_size(txn, size):
            return None  # no stored blob has this size: not worth a read of the whole file
    h = hashlib.sha256()
    while chunk := stream.read(_READ):
        h.update(chunk)
    stream.seek(start)
    comp = h.digest()
    if expect is not None:
        expect.check_blob(comp, size)
    idx = repo.index
    with idx.read() as txn:
        alias = txn.get(comp, db=idx.db[b"compressed"])
        diff_id = bytes(alias) if alias is not None else b""
        rec = idx.get_layer(txn, diff_id) if diff_id else None
    if rec is None or rec.get("state") != "live" or rec.get("damaged") or layer_unproved(rec):
        return None  # an unproved layer is never what a blob's digest stands for
    if expect is not None:
        expect.check_diff_id(diff_id)
    result = ImportResult.stored(diff_id, rec, "sha256:" + comp.hex())
    result.stats = {"shortcut": 1}  # recognised by its compressed digest
    return result


def _last_is_dot(name: str) -> bool:
    """Does ``name`` end in a "." component ("a/.", "a/./")?  Normalizing drops it, but the
    kernel -- and so GNU tar -- resolves such a name only to a directory: a non-directory
    entry or a hardlink target spelled so fails there, and must not quietly become "a"."""
    return name.rstrip("/").rpartition("/")[2] == "."


def _check_ranges(m: TarMember) -> None:
    """Refuse values no Linux filesystem (or the manifest format) can hold.

    Negative numbers come only from GNU base-256 fields (the tar reader refuses a sign in an
    octal field): legitimate for an mtime before 1970, meaningless for an owner or a device.
    """
    for name, value in (
        ("uid", m.uid),
        ("gid", m.gid),
        ("devmajor", m.devmajor),
        ("devminor", m.devminor),
    ):
        if not 0 <= value <= _U32:
            raise InvalidInputError(
                f"entry {m.name!r} has {name} {value}, outside 0..{_U32}; the layer is malformed"
            )
    if not _I64_MIN <= m.mtime_ns <= _I64_MAX:
        raise InvalidInputError(f"entry {m.name!r} has an mtime out of range")
    if m.type in (b"3", b"4") and (m.devmajor > DEV_MAJOR_MAX or m.devminor > DEV_MINOR_MAX):
        # Linux's dev_t has 12 major and 20 minor bits: mknod fails with EINVAL on more, so
        # such a layer could never be materialized (GNU tar fails on it too).
        raise InvalidInputError(
            f"device {m.name!r} has number {m.devmajor}:{m.devminor}; Linux devices have "
            f"majors up to {DEV_MAJOR_MAX} and minors up to {DEV_MINOR_MAX}"
        )
    if len(m.linkname.encode("utf-8", "surrogateescape")) > PATH_MAX - 1:
        raise InvalidInputError(f"entry {m.name!r} has a link target over {PATH_MAX - 1} bytes")
    if len(m.xattrs) > 4096:
        raise InvalidInputError(f"entry {m.name!r} has {len(m.xattrs)} xattrs")
    for k, v in m.xattrs.items():
        if not k or len(k.encode("utf-8", "surrogateescape")) > 255 or len(v) > 65536:
            raise InvalidInputError(f"entry {m.name!r} has an oversized xattr {k[:40]!r}")


def _stream_phase(imp: _Importer, blob: BlobReader) -> ImportResult:
    mpath = os.path.join(imp.stage, "manifest.tmp")
    tspath = os.path.join(imp.stage, "tarsplit.tmp")
    dirs = PathSet()
    nondirs = PathSet()
    entries = 0
    # The parent directory whose ancestors were last checked.  Every ancestor checked is
    # recorded in ``dirs`` and a path in ``dirs`` can never become a non-directory (refused
    # below), so a sibling of the previous entry needs no second walk up its ancestors.
    checked_parent = ""
    with open(mpath, "wb") as mf, open(tspath, "wb") as tsf:
        split = TarSplitWriter(tsf)
        tar = TarReader(blob, recorder=split)
        mw = ManifestWriter(mf)
        imp.mw = mw
        for m in tar:
            entries += 1
            path = normalize(m.name)
            _check_ranges(m)
            if imp.hooks is not None:
                imp.hooks.check_member(m, path)
            slash = path.rfind("/")
            if slash > 0 and path[:slash] != checked_parent:
                for anc in ancestors(path):
                    if anc in nondirs:
                        raise UnsafePathError(
                            f"entry {m.name!r} would be written through non-directory {anc!r} "
                            "(a symlink or file earlier in the layer)"
                        )
                    dirs.add(anc)
                checked_parent = path[:slash]
            e = Entry(path, REG, mode=m.mode, uid=m.uid, gid=m.gid, mtime_ns=m.mtime_ns)
            e.xattrs = m.xattrs
            typ = m.type
            if typ == b"5":
                if path in nondirs:
                    raise InvalidInputError(f"entry {m.name!r} is a directory and a non-directory")
                e.kind = DIR
                dirs.add(path)
            else:
                if path == "." or path in dirs:
                    raise InvalidInputError(
                        f"entry {m.name!r} replaces a directory with a non-directory"
                    )
                if _last_is_dot(m.name):
                    raise InvalidInputError(
                        f"entry {m.name!r} is not a directory, but a name ending in '/.' can "
                        "only be one"
                    )
                if not nondirs.add(path):
                    imp.replaces += 1  # tar semantics: the later entry wins
                if m.isreg():
                    size = m.size
                    e.size = size
                    imp.files += 1
                    imp.logical += size
                    if size <= INLINE_MAX:
                        e.inline = tar.read_exact(size, m.name) if size else b""
                        imp.inline += 1
                        if size and len(imp.tiny) < _TINY_MAX:
                            imp.tiny[sha256_of(e.inline)] = e.inline
                    elif imp.hooks is not None and (pre := imp.hooks.take_prestaged(path)):
                        e.digest = imp.objects.adopt(tar, size, pre)  # type: ignore[arg-type]
                    elif size <= MEM_MAX:
                        imp.add_file(e, path, tar.read_exact(size, m.name))
                        imp.objects.pin_pending_if_full()
                        continue  # written out once the writers have named its content
                    else:
                        e.digest = imp.objects.add_stream(tar, size)  # type: ignore[arg-type]
                    if imp.hooks is not None and e.digest is not None:
                        imp.hooks.content_digest(path, e.digest)
                elif typ == b"2":
                    e.kind = SYMLINK
                    if not m.linkname:
                        raise InvalidInputError(f"symlink {m.name!r} has an empty target")
                    e.linkname = m.linkname
                elif typ == b"1":
                    e.kind = HARDLINK
                    target = normalize(m.linkname, "hardlink target")
                    if m.linkname.endswith("/") or _last_is_dot(m.linkname):
                        raise UnsafePathError(
                            f"hardlink {m.name!r} points to {m.linkname!r}, which can only "
                            "resolve to a directory"
                        )
                    if target == path or target not in nondirs:
                        raise UnsafePathError(
                            f"hardlink {m.name!r} points to {m.linkname!r}, which is not an "
                            "earlier file of this layer"
                        )
                    e.linkname = target
                elif typ in (b"3", b"4"):
                    e.kind = CHAR if typ == b"3" else BLOCK
                    e.devmajor, e.devminor = m.devmajor, m.devminor
                elif typ == b"6":
                    e.kind = FIFO
                else:
                    raise InvalidInputError(f"entry {m.name!r} has unsupported tar type {typ!r}")
            imp.emit(e)
        tar.drain_rest()
        warnings = list(tar.warnings)
        if tar.warning_count > len(warnings):
            warnings.append(f"... and {tar.warning_count - len(warnings)} more warnings")
        imp.objects.drain()
        if imp.entries:
            raise StoreError("internal error: manifest entries left unwritten; please report this")
        imp.objects.pin_pending()
        mw.close()
        split.close()
    # Manifest and tar-split are objects like any other: hashed, staged under their digest.
    mb3, tsb3 = b"", b""
    for path in (mpath, tspath):
        with open(path, "rb") as f:
            data = f.read()
        os.unlink(path)
        if path == mpath:
            mb3 = imp.objects.add_bytes(data)
        else:
            tsb3 = imp.objects.add_bytes(data)
    imp.objects.pin_pending()
    imp.objects.drain()
    imp.tarsplit = tsb3
    imp.tar_bytes = split.total
    return ImportResult(
        diff_id="",
        compressed_digest="",
        compression=blob.compression,
        manifest=mb3.hex(),
        entries=entries,
        files=imp.files,
        logical_bytes=imp.logical,
        inline_files=imp.inline,
        warnings=warnings,
    )


# -- directories -------------------------------------------------------------------------------
def tar_directory(root: str, out: BinaryIO) -> None:
    """Write a deterministic PAX tar of a directory (sorted names, xattrs, numeric owners).

    Importing a directory goes through this, so a directory layer gets a real DiffID and the
    same validation as any tar.  Runs in a thread writing into a pipe.
    """
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tf:
        seen_inodes: dict[tuple[int, int], str] = {}

        def add(rel: str, full: str) -> None:
            st = os.lstat(full)
            ti = tf.gettarinfo(full, arcname=rel)
            if ti is None:
                return  # a socket: tar skips those too; they cannot be part of a layer
            ti.uname = ti.gname = ""
            ti.pax_headers = {}
            ns = st.st_mtime_ns
            if ns % 1_000_000_000:
                ti.pax_headers["mtime"] = f"{ns // 1_000_000_000}.{ns % 1_000_000_000:09d}"
            try:
                names = os.listxattr(full, follow_symlinks=False)
            except OSError:
                names = []
            for name in sorted(names):
                try:
                    val = os.getxattr(full, name, follow_symlinks=False)
                except OSError:
                    continue
                ti.pax_headers["SCHILY.xattr." + name] = val.decode("utf-8", "surrogateescape")
            if ti.isreg() and st.st_nlink > 1:
                key = (st.st_dev, st.st_ino)
                if key in seen_inodes:
                    ti.type = tarfile.LNKTYPE
                    ti.linkname = seen_inodes[key]
                    ti.size = 0
                    tf.addfile(ti)
                    return
                seen_inodes[key] = rel
            if ti.isreg():
                with open(full, "rb") as f:
                    tf.addfile(ti, f)
            else:
                tf.addfile(ti)

        def walk(rel: str, full: str) -> None:
            with os.scandir(full) as it:
                names = sorted(de.name for de in it)
            for name in names:
                r = name if rel == "." else f"{rel}/{name}"
                f = os.path.join(full, name)
                add(r, f)
                if os.path.isdir(f) and not os.path.islink(f):
                    walk(r, f)

        add(".", root)
        walk(".", root)


def import_directory(
    repo: Repo, root: str, progress: Callable[[int], None] | None = None
) -> ImportResult:
    if not os.path.isdir(root):
        raise InvalidInputError(f"{root} is not a directory")
    rfd, wfd = os.pipe()
    err: list[BaseException] = []

    def producer() -> None:
        try:
            with open(wfd, "wb", buffering=1 << 20) as w:
                tar_directory(root, w)
        except BrokenPipeError:
            pass
        except BaseException as exc:  # reported by the consumer
            err.append(exc)

    t = threading.Thread(target=producer, daemon=True)
    t.start()
    with open(rfd, "rb", buffering=1 << 20) as r:
        try:
            result = import_tar(repo, r, progress, source=f"dir:{os.path.abspath(root)}")
        finally:
            r.close()
            t.join()
    if err:
        raise InvalidInputError(f"reading {root} failed: {err[0]}")
    return result


__all__ = ["Expected", "ImportResult", "import_tar", "import_directory", "detect_compression"]


def import_path(
    repo: Repo,
    path: str,
    progress: Callable[[int], None] | None = None,
    *,
    shortcut: bool = True,
    image_owned: bool = False,
) -> ImportResult:
    """Import from a tar file or a directory.  A tar file whose sha256 is already a stored
    layer's compressed digest is recognised without being parsed (``shortcut=False`` forces
    the full import)."""
    if os.path.isdir(path):
        return import_directory(repo, path, progress)
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise InvalidInputError(f"cannot open {path}: {exc.strerror}") from None
    with f:
        return import_tar(
            repo,
            f,
            progress,
            source=os.path.abspath(path),
            shortcut=shortcut,
            image_owned=image_owned,
        )
