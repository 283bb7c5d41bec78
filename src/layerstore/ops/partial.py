"""Partial import of a zstd:chunked layer: read only what the store does not have.

How it works (docs/format.md, "zstd:chunked"; docs/concurrency.md for the pins):

1. **TOC.**  :func:`chunked.locate` finds it (annotations, else the footer); it is verified against
   ``manifest-checksum`` when there is one and parsed strictly.
2. **Plan, under pins.**  In one write transaction every regular file is matched against the
   index: a file whose sha256 is stored is *reused whole*; a multi-chunk file some of whose chunks
   are in the chunk index is *assembled* (chunks cloned with FICLONERANGE where the offsets are
   block-aligned, copied otherwise, holes for ``zeros`` chunks, the rest fetched); anything else
   is *fetched*.  Every object used as a source is pinned against this process's lease in that
   same transaction, so a concurrent ``rm`` + ``gc`` cannot take it away (no descriptors are held
   across files: open, clone or read, close).
3. **Replay.**  The original tar is reconstructed in order -- header bytes from the tar-split
   (current variant) or from the blob's inter-payload frames (older variant, which has no
   tar-split; these are small and are fetched), file contents from objects, assembled files or
   fetched frames -- and fed through the ordinary import pipeline.  So a partial import gets
   every check a full import gets, its layer is byte-identical to a full import of the same blob
   (same DiffID, same manifest, same tar-split), and the DiffID is *proved* by the replay.
   Every tar member must agree with its TOC entry, every file with its TOC sha256, every reused
   or fetched chunk with its chunk digest, before anything becomes an object.
4. **Fetch.**  The ranges still needed (header frames, missing files and chunks) are coalesced
   (gaps up to 1 KiB merged, at most 1024 ranges) and read through one
   :class:`chunked.RangeSource` call, streamed in blob order.

The result reports bytes read against the blob size ("skipped N%").
"""

from __future__ import annotations

import datetime
import hashlib
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Final

import zstandard

from ..chunked.toc import (
    TAR_TYPES,
    TYPEFLAG,
    ChunkRef,
    Located,
    Segment,
    TocEntry,
    data_end,
    decode_frame,
    locate,
    parse_tarsplit,
    parse_toc,
)
from ..core import layers, leases, protocol
from ..core.digests import DigestSet
from ..core.fsutil import clone_range
from ..core.index import UNPROVED, layer_unproved
from ..core.paths import normalize
from ..core.repo import Repo
from ..errors import ChunkedError, CorruptObjectError, InvalidInputError
from ..sources.base import RangeSource, coalesce
from ..tar.reader import TarMember
from . import chunkindex
from .ingest import INLINE_MAX, ImportHooks, ImportResult, _Importer, run_import

_PIECE: Final = 1 << 20
# A header gap may expand at most this much (zstd bombs between payload frames).
_GAP_RATIO: Final = 256
_GAP_SLACK: Final = 1 << 20


@dataclass(slots=True)
class _Part:
    """One chunk of a file being assembled."""

    chunk: ChunkRef
    kind: str  # "reuse" | "zeros" | "fetch"
    b3: bytes = b""
    src_offset: int = 0


@dataclass(slots=True)
class _Plan:
    entry: TocEntry
    kind: str  # "object" | "assemble" | "fetch"
    b3: bytes = b""
    parts: list[_Part] = field(default_factory=list)
    staged: str = ""
    chunks_known: bool = False  # object plan: its chunk digests are indexed for this object
    data: bytes = b""  # inline plan: the content, known by its sha256


@dataclass
class PartialStats:
    variant: str = ""
    toc_verified: bool = False
    diff_id_proof: str = ""
    blob_size: int = 0
    bytes_read: int = 0
    ranges: int = 0
    files_reused: int = 0
    files_assembled: int = 0
    files_fetched: int = 0
    chunks_reused: int = 0
    chunks_fetched: int = 0
    chunks_zeros: int = 0
    bytes_cloned: int = 0
    bytes_copied: int = 0

    def to_json(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["skipped_pct"] = (
            round(100.0 * (1 - self.bytes_read / self.blob_size), 2) if (self.blob_size) else 0.0
        )
        return d


class _Fetcher:
    """Hands out the bytes of increasing blob ranges from one streamed multi-range read."""

    def __init__(
        self,
        source: RangeSource,
        ranges: list[tuple[int, int]],
        on_read: Callable[[int], None] | None = None,
    ) -> None:
        self.it = source.read_ranges(ranges) if ranges else iter(())
        self.off = 0
        self.buf = b""
        self.bytes = 0
        self.on_read = on_read

    def pieces(self, a: int, b: int) -> Iterator[bytes]:
        while a < b:
            if not self.off <= a < self.off + len(self.buf):
                try:
                    off, data = next(self.it)
                except StopIteration:
                    raise ChunkedError(f"the source ended before blob range {a}-{b}") from None
                self.bytes += len(data)
                if self.on_read is not None:
                    self.on_read(len(data))
                if off > a:
                    raise ChunkedError(f"the source skipped blob bytes {a}-{off}")
                self.off, self.buf = off, data
                continue
            s = a - self.off
            e = min(len(self.buf), b - self.off)
            yield self.buf[s:e]
            a += e - s


def _unzstd(
    dctx: zstandard.ZstdDecompressor, pieces: Iterator[bytes], size: int, what: str
) -> Iterator[bytes]:
    """Decompress frames into exactly ``size`` bytes, bounded memory, no bomb can expand."""
    reader = dctx.stream_reader(_Stream(pieces), read_across_frames=True)  # type: ignore[arg-type]
    left = size
    try:
        while left:
            out = reader.read(min(_PIECE, left))
            if not out:
                raise ChunkedError(f"{what}: the frames hold fewer bytes than the TOC says")
            left -= len(out)
            yield out
        if reader.read(1):
            raise ChunkedError(f"{what}: the frames hold more bytes than the TOC says")
    except zstandard.ZstdError as exc:
        raise ChunkedError(f"{what}: the frames do not decompress: {exc}") from None


class _Partial(ImportHooks):
    compression = "zstd:chunked"

    def __init__(
        self,
        repo: Repo,
        imp: _Importer,
        source: RangeSource,
        loc: Located,
        toc_entries: list[TocEntry],
        tarsplit: list[Segment] | None,
        stats: PartialStats,
        pins: DigestSet,
        on_read: Callable[[int], None] | None = None,
        expected_diff_id: bytes | None = None,
        toc_only: bool = False,
    ) -> None:
        self.repo = repo
        self.expected_diff_id = expected_diff_id
        self.toc_only = toc_only
        # One decompression context for the whole import: making one per frame (thousands of
        # tiny header frames) cost more than decompressing them.
        self.dctx = zstandard.ZstdDecompressor()
        self.imp = imp
        self.source = source
        self.loc = loc
        self.entries = toc_entries
        self.tarsplit = tarsplit
        self.stats = stats
        self.pins = pins
        self.next_entry = 0
        self.plans: dict[str, _Plan] = {}
        self.order: list[_Plan] = []
        self._plan()
        self.fetcher = _Fetcher(source, self._ranges(), on_read)

    # planning ---------------------------------------------------------------------------
    def _plan(self) -> None:
        idx = self.repo.index
        objs, doomed = idx.db[b"objects"], idx.db[b"doomed"]
        shadb, chunkdb = idx.db[b"sha256"], idx.db[b"chunks"]
        lease = self.repo.lease.id
        with idx.write() as txn:

            def usable(b3: bytes) -> bool:
                return txn.get(b3, db=objs) is not None and txn.get(b3, db=doomed) is None

            for n, e in enumerate(self.entries):
                if e.type != "reg" or not e.size:
                    continue
                plan = _Plan(e, "fetch")
                if e.size <= INLINE_MAX:
                    tiny = chunkindex.lookup_tiny(txn, chunkdb, e.digest)
                    if tiny is not None and len(tiny) == e.size:
                        plan.kind, plan.data = "inline", tiny
                        self.plans[e.name] = plan
                        self.order.append(plan)
                        continue
                raw = txn.get(e.digest, db=shadb)
                b3 = bytes(raw) if raw is not None else b""
                rec = idx.get_object(txn, b3) if b3 else None
                if rec is not None and txn.get(b3, db=doomed) is None:
                    if rec.size != e.size:
                        raise ChunkedError(
                            f"the TOC gives {e.raw_name!r} ({e.size} bytes) the sha256 of "
                            f"stored content of {rec.size} bytes: the TOC lies"
                        )
                    if e.size > INLINE_MAX:
                        plan.kind, plan.b3 = "object", b3
                        self.pins.add(b3)
                        # Chunk digests recorded for this very object by an earlier, verified
                        # import need not be hashed again.
                        plan.chunks_known = len(e.chunks) > 1 and all(
                            c.zeros
                            or chunkindex.lookup(txn, chunkdb, c.digest)
                            == (b3, c.file_offset, c.size)
                            for c in e.chunks
                        )
                if plan.kind != "object" and len(e.chunks) > 1:
                    parts, reused = [], 0
                    for c in e.chunks:
                        part = _Part(c, "zeros" if c.zeros else "fetch")
                        if not c.zeros:
                            v = txn.get(c.digest, db=chunkdb)
                            if v is not None:
                                cb3, coff, clen = chunkindex.VALUE.unpack(v)
                                if clen == c.size and usable(cb3):
                                    part.kind, part.b3, part.src_offset = "reuse", cb3, coff
                                    self.pins.add(cb3)
                                    reused += 1
                        parts.append(part)
                    if reused:
                        plan.kind, plan.parts = "assemble", parts
                        plan.staged = self.imp.objects.temp_path(f"assemble-{n}")
                self.plans[e.name] = plan
                self.order.append(plan)
            leases.pin_objects(idx, txn, lease, self.pins)
        st = self.stats
        for p in self.order:
            if p.kind in ("object", "inline"):
                st.files_reused += 1
            elif p.kind == "assemble":
                st.files_assembled += 1
            else:
                st.files_fetched += 1

    def _ranges(self) -> list[tuple[int, int]]:
        need: list[tuple[int, int]] = []
        if self.tarsplit is None and not self.toc_only:
            need.extend(self._gaps())
        for p in self.order:
            if p.kind == "fetch":
                need.append((p.entry.offset, p.entry.end))
            elif p.kind == "assemble":
                for pt in p.parts:
                    if pt.kind == "fetch":
                        need.append((pt.chunk.blob_offset, pt.chunk.blob_end))
        src = self.source
        ranges = coalesce(need, getattr(src, "merge_gap", 1024), getattr(src, "max_ranges", 1024))
        self.stats.ranges = len(ranges)
        return ranges

    def _gaps(self) -> list[tuple[int, int]]:
        """The blob ranges between file payloads: tar headers and padding, in frames."""
        return [item for item in self._walk() if isinstance(item, tuple)]

    def _walk(self) -> Iterator[tuple[int, int] | _Plan]:
        """The payload area in blob order: header gaps ``(start, end)`` and file plans."""
        pos = 0
        for p in self.order:
            if p.entry.offset > pos:
                yield (pos, p.entry.offset)
            yield p
            pos = p.entry.end
        end = data_end(self.loc)
        if end > pos:
            yield (pos, end)

    # the reconstructed tar ---------------------------------------------------------------
    def tar_pieces(self) -> Iterator[bytes]:
        files = iter(self.order)
        if self.toc_only:
            yield from self._synthesized()
            return
        if self.tarsplit is not None:
            for seg in self.tarsplit:
                if seg.raw is not None:
                    yield seg.raw
                    continue
                plan = next(files, None)
                if plan is None or normalize(seg.name) != plan.entry.name:
                    raise ChunkedError(
                        f"the tar-split's file {seg.name!r} is not the TOC's next file "
                        f"({plan.entry.raw_name if plan else 'none left'!r})"
                    )
                if seg.size != plan.entry.size:
                    raise ChunkedError(f"tar-split and TOC disagree on the size of {seg.name!r}")
                yield from self._content(plan)
        else:
            for item in self._walk():
                if isinstance(item, tuple):
                    yield from self._gap(*item)
                else:
                    yield from self._content(item)
        if next(files, None) is not None and self.tarsplit is not None:
            raise ChunkedError("the TOC lists files the tar-split does not contain")

    def _synthesized(self) -> Iterator[bytes]:
        """A PAX tar written from the TOC alone (TOC-only mode: no header frames fetched)."""
        for e in self.entries:
            yield _header(e)
            if e.type == "reg" and e.size:
                yield from self._content(self.plans[e.name])
                if e.size % 512:
                    yield bytes(512 - e.size % 512)
        yield bytes(1024)

    def _gap(self, a: int, b: int) -> Iterator[bytes]:
        cap = (b - a) * _GAP_RATIO + _GAP_SLACK
        src: Any = (
            b"".join(self.fetcher.pieces(a, b))
            if b - a <= _PIECE
            else _Stream(self.fetcher.pieces(a, b))
        )
        reader = self.dctx.stream_reader(src, read_across_frames=True)
        total = 0
        try:
            while out := reader.read(_PIECE):
                total += len(out)
                if total > cap:
                    raise ChunkedError(f"blob bytes {a}-{b} between files expand implausibly")
                yield out
        except zstandard.ZstdError as exc:
            raise ChunkedError(f"blob bytes {a}-{b} (tar headers) are corrupt: {exc}") from None

    def _content(self, plan: _Plan) -> Iterator[bytes]:
        """A file's bytes, verified against the TOC before the last piece is handed on."""
        e = plan.entry
        if plan.kind == "inline":
            gen = iter((plan.data,))
        elif plan.kind == "object":
            gen = self._read_file(self.repo.object_path(plan.b3), e.size)
        elif plan.kind == "assemble":
            self._assemble(plan)
            gen = self._read_file(plan.staged, e.size)
        else:
            gen = _unzstd(self.dctx, self.fetcher.pieces(e.offset, e.end), e.size, e.raw_name)
        # A reused object is the store's own content: the pipeline's blake3 must name it
        # (content_digest below), and its sha256 was recorded from its bytes -- hashing it
        # again against the TOC would prove nothing new.  Everything else is hashed here.
        h = hashlib.sha256() if plan.kind != "object" else None
        held: bytes | None = None
        # Every chunk digest is checked too, whatever the file's plan, so the chunk index only
        # ever learns digests that were verified (a lying chunkDigest would poison it).
        # (An assembled file's chunks were each checked while it was built.)
        verified = plan.chunks_known or plan.kind == "assemble"
        cv = _ChunkVerifier(e) if len(e.chunks) > 1 and not verified else None
        for piece in gen:
            if h is not None:
                h.update(piece)
            if cv is not None:
                cv.update(piece)
            if held is not None:
                yield held
            held = piece
        if cv is not None:
            cv.finish()
        if h is not None and h.digest() != e.digest:
            raise ChunkedError(
                f"{e.raw_name!r} does not match the sha256 the TOC gives for it: the blob lies"
            )
        if held is not None:
            yield held

    @staticmethod
    def _read_file(path: str, size: int) -> Iterator[bytes]:
        with open(path, "rb", buffering=0) as f:
            left = size
            while left:
                buf = f.read(min(_PIECE, left))
                if not buf:
                    raise CorruptObjectError(f"{path} is shorter than {size} bytes")
                left -= len(buf)
                yield buf

    def _assemble(self, plan: _Plan) -> None:
        """Build a file from reused chunks (cloned where aligned), holes and fetched chunks."""
        st = self.stats
        fd = os.open(plan.staged, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444)
        try:
            bs = max(os.fstat(fd).st_blksize, 4096)
            for pt in plan.parts:
                c = pt.chunk
                if pt.kind == "zeros":
                    st.chunks_zeros += 1
                    continue  # a hole: ftruncate below extends the file sparsely
                if pt.kind == "fetch":
                    data = b"".join(
                        _unzstd(
                            self.dctx,
                            self.fetcher.pieces(c.blob_offset, c.blob_end),
                            c.size,
                            "chunk",
                        )
                    )
                    if hashlib.sha256(data).digest() != c.digest:
                        raise ChunkedError(
                            f"a chunk of {plan.entry.raw_name!r} does not match its chunkDigest"
                        )
                    os.pwrite(fd, data, c.file_offset)
                    st.chunks_fetched += 1
                    continue
                self._reuse_chunk(fd, pt, bs, plan.entry)
            os.ftruncate(fd, plan.entry.size)
        finally:
            os.close(fd)

    def _reuse_chunk(self, fd: int, pt: _Part, bs: int, e: TocEntry) -> None:
        c, st = pt.chunk, self.stats
        src = os.open(self.repo.object_path(pt.b3), os.O_RDONLY | os.O_CLOEXEC)
        try:
            data = os.pread(src, c.size, pt.src_offset)
            if len(data) != c.size or hashlib.sha256(data).digest() != c.digest:
                raise CorruptObjectError(
                    f"object {pt.b3.hex()} does not hold the chunk the index says (for "
                    f"{e.raw_name!r}); run `layerstore fsck`"
                )
            lo, hi = c.file_offset, c.file_offset + c.size
            a = -(-lo // bs) * bs  # aligned middle [a, z) of the destination range
            z = hi // bs * bs
            cloned = 0
            if (pt.src_offset - lo) % bs == 0 and z > a:
                if clone_range(fd, src, pt.src_offset + (a - lo), z - a, a):
                    cloned = z - a
            if cloned:
                if a > lo:
                    os.pwrite(fd, data[: a - lo], lo)
                if hi > z:
                    os.pwrite(fd, data[z - lo :], z)
            else:
                os.pwrite(fd, data, lo)
            st.bytes_cloned += cloned
            st.bytes_copied += c.size - cloned
            st.chunks_reused += 1
        finally:
            os.close(src)

    # hooks -------------------------------------------------------------------------------
    def check_member(self, m: TarMember, path: str) -> None:
        if self.next_entry >= len(self.entries):
            raise ChunkedError(f"tar entry {m.name!r} is not in the TOC")
        e = self.entries[self.next_entry]
        self.next_entry += 1
        if m.sparse is not None:
            raise ChunkedError(
                f"tar entry {m.name!r} is sparse, which a zstd:chunked TOC cannot describe; "
                "import this blob whole"
            )
        typ = TAR_TYPES.get(m.type, "?")
        problems = []
        if e.name != path:
            problems.append(f"name {e.raw_name!r}")
        if e.type != typ:
            problems.append(f"type {e.type}")
        if typ == "reg" and e.size != m.size:
            problems.append(f"size {e.size}")
        if (e.mode & 0o7777) != (m.mode & 0o7777) or e.uid != m.uid or e.gid != m.gid:
            problems.append("mode/owner")
        if typ == "symlink" and e.linkname != m.linkname:
            problems.append(f"link target {e.linkname!r}")
        if typ == "hardlink" and normalize(e.linkname or "", "link") != normalize(m.linkname):
            problems.append(f"link target {e.linkname!r}")
        if typ in ("char", "block") and (e.devmajor, e.devminor) != (m.devmajor, m.devminor):
            problems.append("device numbers")
        if e.mtime and _seconds(e.mtime) != m.mtime_ns // 1_000_000_000:
            problems.append(f"mtime {e.mtime}")
        # Exactly the TOC's xattrs: the older variant's header frames are covered by no
        # digest, so an xattr (say security.capability) must not slip in through them.
        if set(e.xattrs) != set(m.xattrs):
            problems.append("xattr names")
        for k, v in e.xattrs.items():
            have = m.xattrs.get(k)
            if isinstance(have, str):
                have = have.encode("utf-8", "surrogateescape")
            if have != v:
                problems.append(f"xattr {k}")
        if problems:
            raise ChunkedError(
                f"tar entry {m.name!r} disagrees with its TOC entry ({', '.join(problems)}): "
                "the blob's TOC lies"
            )

    def content_digest(self, path: str, b3: bytes) -> None:
        plan = self.plans.get(path)
        if plan is not None and plan.kind == "object" and b3 != plan.b3:
            raise CorruptObjectError(
                f"stored object {plan.b3.hex()} (reused for {plan.entry.raw_name!r}) does not "
                "hash to its name; run `layerstore fsck`"
            )

    def take_prestaged(self, path: str) -> str | None:
        plan = self.plans.get(path)
        return plan.staged if plan is not None and plan.kind == "assemble" else None

    def finish(self, diff_id: bytes) -> None:
        if self.next_entry != len(self.entries):
            raise ChunkedError(
                f"the TOC lists {len(self.entries) - self.next_entry} entries the tar lacks"
            )
        self.stats.bytes_read += self.fetcher.bytes
        if self.toc_only:
            return  # the replayed tar is synthesized: its digest proves nothing
        if self.expected_diff_id is not None and diff_id != self.expected_diff_id:
            raise ChunkedError(
                f"the layer replayed from this zstd:chunked blob has DiffID "
                f"sha256:{diff_id.hex()}, not sha256:{self.expected_diff_id.hex()} as the image "
                "config says: the TOC or the blob does not match the image; nothing was imported"
            )

    def info(self) -> dict[str, Any]:
        return {"partial": self.stats.to_json()}

    def commit_as(self, diff_id: bytes) -> tuple[bytes, bool]:
        if self.toc_only:
            assert self.expected_diff_id is not None
            return self.expected_diff_id, False
        return diff_id, True


class _ChunkVerifier:
    """Hashes a file's bytes per TOC chunk as they stream past and checks each chunkDigest."""

    def __init__(self, e: TocEntry) -> None:
        self.e = e
        self.i = 0
        self.left = e.chunks[0].size
        self.h = hashlib.sha256()

    def update(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = min(self.left, len(view))
            self.h.update(view[:n])
            view = view[n:]
            self.left -= n
            if not self.left:
                self._check()

    def _check(self) -> None:
        c = self.e.chunks[self.i]
        if self.h.digest() != c.digest:
            raise ChunkedError(
                f"chunk {self.i} of {self.e.raw_name!r} does not match its chunkDigest: "
                "the TOC lies"
            )
        self.i += 1
        self.h = hashlib.sha256()
        if self.i < len(self.e.chunks):
            self.left = self.e.chunks[self.i].size

    def finish(self) -> None:
        if self.i != len(self.e.chunks):
            raise ChunkedError(f"{self.e.raw_name!r} ended inside a chunk")


def _pax_record(key: str, value: bytes) -> bytes:
    body = b" " + key.encode("utf-8", "surrogateescape") + b"=" + value + b"\n"
    n = len(body) + 1
    while len(str(n)) + len(body) != n:
        n = len(str(n)) + len(body)
    return str(n).encode() + body


def _octal(n: int, width: int) -> bytes:
    return b"%0*o\0" % (width - 1, n) if 0 <= n < 8 ** (width - 1) else bytes(width)


def _block(name: bytes, typ: bytes, size: int, e: TocEntry | None) -> bytes:
    h = bytearray(512)
    h[0:100] = name[:100].ljust(100, b"\0")
    h[100:108] = _octal(e.mode & 0o7777777 if e else 0o644, 8)
    h[108:116] = _octal(e.uid if e else 0, 8)
    h[116:124] = _octal(e.gid if e else 0, 8)
    h[124:136] = _octal(size, 12)
    h[136:148] = _octal(max(0, _time_ns(e.mtime) // 10**9) if e and e.mtime else 0, 12)
    h[148:156] = b" " * 8
    h[156:157] = typ
    if e is not None:
        h[157:257] = e.linkname.encode("utf-8", "surrogateescape")[:100].ljust(100, b"\0")
        h[329:337] = _octal(e.devmajor, 8)
        h[337:345] = _octal(e.devminor, 8)
    h[257:265] = b"ustar\x0000"
    h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h)


def _header(e: TocEntry) -> bytes:
    """PAX header blocks for a TOC entry: every field the TOC has, nothing it lacks."""
    recs = [_pax_record("path", e.raw_name.encode("utf-8", "surrogateescape"))]
    if e.linkname:
        recs.append(_pax_record("linkpath", e.linkname.encode("utf-8", "surrogateescape")))
    if e.mtime:
        ns = _time_ns(e.mtime)
        sec, frac = divmod(ns, 10**9)
        text = f"{sec}.{frac:09d}".rstrip("0").rstrip(".") if frac else str(sec)
        recs.append(_pax_record("mtime", text.encode()))
    size = e.size if e.type == "reg" else 0
    if size >= 8**11:
        recs.append(_pax_record("size", str(size).encode()))
    for key, val in (("uid", e.uid), ("gid", e.gid)):
        if val >= 8**7:
            recs.append(_pax_record(key, str(val).encode()))
    for k, v in sorted(e.xattrs.items()):
        recs.append(_pax_record("SCHILY.xattr." + k, v))
    data = b"".join(recs)
    pax = _block(b"PaxHeader", b"x", len(data), None) + data + bytes(-len(data) % 512)
    return pax + _block(e.raw_name.encode("utf-8", "surrogateescape"), TYPEFLAG[e.type], size, e)


def _time_ns(text: str) -> int:
    """RFC 3339 (as Go writes it, up to nanoseconds) to ns since the epoch."""
    frac_ns = 0
    m = re.fullmatch(r"([^.]+)\.(\d{1,9})(Z|[+-]\d\d:\d\d)", text)
    if m:
        frac_ns = int(m.group(2).ljust(9, "0"))
        text = m.group(1) + m.group(3)
    return _seconds(text) * 10**9 + frac_ns


def _seconds(text: str) -> int:
    try:
        t = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise ChunkedError(f"TOC time {text!r} is not RFC 3339") from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=datetime.UTC)
    return int(t.timestamp() // 1)


class _Stream:
    """``read(n)`` over the reconstructed tar pieces (runs in the blob-reader thread).

    Fills each read up to ``n`` bytes: the pieces are small (a header frame is ~1.5 KB) and
    every read becomes one queue hand-off to the parsing thread -- one per piece measured
    0.6 s of thread switching for minbase, one per MiB is negligible."""

    def __init__(self, pieces: Iterator[bytes]) -> None:
        self.pieces = pieces
        self.rest = b""
        self.eof = False

    def read(self, n: int = -1) -> bytes:
        if n < 0:
            n = 1 << 62
        parts = [self.rest] if self.rest else []
        have = len(self.rest)
        self.rest = b""
        while have < n and not self.eof:
            nxt = next(self.pieces, None)
            if nxt is None:
                self.eof = True
                break
            parts.append(nxt)
            have += len(nxt)
        out = b"".join(parts)
        if len(out) > n:
            out, self.rest = out[:n], out[n:]
        return out


def import_chunked(
    repo: Repo,
    source: RangeSource,
    annotations: dict[str, str] | None = None,
    *,
    expected_diff_id: str | None = None,
    progress: Callable[[int], None] | None = None,
    source_name: str = "",
    image_owned: bool = False,
    toc_only: bool = False,
) -> ImportResult:
    """Import a zstd:chunked layer reading only what the store lacks; see the module doc.

    ``toc_only`` (older variant, no tar-split): read no header frames -- as podman does -- and
    build the layer from the TOC's metadata.  The DiffID then cannot be proved: the layer is
    recorded under ``expected_diff_id`` (required) with ``diff_id_proof: "unverified
    (TOC only)"`` and no tar-split (``export`` refuses it; its metadata is what the TOC says,
    e.g. whole-second mtimes in the older variant).

    ``progress(n)`` is called with the bytes read from the source (a bar over the blob size
    shows how much is skipped)."""
    stats = PartialStats(blob_size=source.size())
    want_diff: bytes | None = None
    if expected_diff_id is not None:
        try:
            want_diff = bytes.fromhex(expected_diff_id.removeprefix("sha256:"))
        except ValueError:
            raise InvalidInputError(f"{expected_diff_id!r} is not a sha256 DiffID") from None
        if len(want_diff) != 32:
            raise InvalidInputError(f"{expected_diff_id!r} is not a sha256 DiffID")
        known = _known_layer(repo, expected_diff_id, image_owned, toc_only)
        if known is not None:
            stats.diff_id_proof = "already stored"
            known.partial = stats.to_json()
            return known
    loc = locate(source, annotations)
    stats.variant = loc.variant
    stats.toc_verified = loc.toc_digest is not None
    want = [(loc.toc.offset, loc.toc.offset + loc.toc.length)]
    if loc.tarsplit is not None:
        want.append((loc.tarsplit.offset, loc.tarsplit.offset + loc.tarsplit.length))
    want.sort()
    got: dict[int, bytearray] = {a: bytearray() for a, _ in want}
    # One request for both (a registry round trip each would cost more than the bytes).
    for off, data in source.read_ranges(want):
        owner = next((a for a, b in want if a <= off < b), None)
        if owner is None or off != owner + len(got[owner]):
            raise ChunkedError("the source returned bytes outside the requested ranges")
        got[owner] += data
        stats.bytes_read += len(data)
        if progress is not None:
            progress(len(data))
    toc = parse_toc(
        decode_frame(bytes(got[loc.toc.offset]), loc.toc, loc.toc_digest, "TOC"), data_end(loc)
    )
    segments: list[Segment] | None = None
    if toc.tarsplit_digest is not None:
        if loc.tarsplit is None:
            raise ChunkedError("the TOC names a tar-split but no tar-split position is given")
        raw_ts = decode_frame(
            bytes(got[loc.tarsplit.offset]), loc.tarsplit, toc.tarsplit_digest, "tar-split"
        )
        segments = parse_tarsplit(raw_ts)
        stats.diff_id_proof = "tar-split replay"
        toc_only = False  # the tar-split is as good as the header frames, and already read
    elif toc_only:
        if want_diff is None:
            raise InvalidInputError(
                "a TOC-only import needs the DiffID from the image config (expected_diff_id); "
                "without it, import with header frames (the default) to prove one"
            )
        stats.diff_id_proof = UNPROVED
    else:
        stats.diff_id_proof = "header-frame replay"
    pins = DigestSet()

    def make_stream(imp: _Importer) -> tuple[BinaryIO, ImportHooks]:
        hooks = _Partial(
            repo,
            imp,
            source,
            loc,
            toc.entries,
            segments,
            stats,
            pins,
            progress,
            want_diff,
            toc_only,
        )
        return _Stream(hooks.tar_pieces()), hooks  # type: ignore[return-value]

    try:
        result = run_import(
            repo, make_stream, None, source_name, image_owned, record_compressed=False
        )
    finally:
        protocol.release_import_pins(repo, pins)
    chunkindex.record_toc(repo, toc.entries)
    return result


def _known_layer(
    repo: Repo, diff_id: str, image_owned: bool, toc_only: bool
) -> ImportResult | None:
    """The layer is stored already (the image config names its DiffID): read nothing.

    A record whose DiffID is unproved (an earlier TOC-only import) answers only another
    TOC-only import: anyone can claim any DiffID that way, so an import that will prove its
    DiffID goes on and replaces that record (``Store._commit_layer``) instead of trusting it."""
    try:
        key = bytes.fromhex(diff_id.removeprefix("sha256:"))
    except ValueError:
        raise InvalidInputError(f"{diff_id!r} is not a sha256 DiffID") from None
    with repo.index.read() as txn:
        rec = repo.index.get_layer(txn, key)
    if rec is None or rec.get("state") != "live" or rec.get("damaged"):
        return None
    if layer_unproved(rec) and not toc_only:
        return None
    if not image_owned:
        layers.mark_standalone(repo, key)
    return ImportResult.stored(key, rec)


__all__ = ["PartialStats", "import_chunked"]
