"""A small, independent EROFS reader for the writer's round-trip tests (no root needed).

It reads what the kernel reads -- superblock, compact and extended inodes, inline and shared
xattrs (and checks every name against the inode's bloom filter, as the kernel's lookup would),
directories in blocks and inline tails (and checks the global name order the kernel's binary
search needs), flat, tail-packed and chunk-based data -- and returns a flat listing:
path -> :class:`Entry`.  Written from the kernel's format description, not from the writer.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

BLK = 4096
S_IFMT = 0o170000
S_IFDIR, S_IFREG, S_IFLNK, S_IFCHR, S_IFBLK = 0o040000, 0o100000, 0o120000, 0o020000, 0o060000
PREFIX = {
    0: b"",
    1: b"user.",
    2: b"system.posix_acl_access",
    3: b"system.posix_acl_default",
    4: b"trusted.",
    6: b"security.",
}


class Corrupt(Exception):
    pass


@dataclass
class Entry:
    nid: int
    mode: int
    uid: int
    gid: int
    mtime_ns: int
    nlink: int
    size: int
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    data: bytes | None = None  # regular files: bytes (holes read as zeros); None if sparse
    sparse: bool = False  # a chunk-based file whose chunks are all holes
    target: bytes | None = None  # symlinks
    rdev: tuple[int, int] | None = None  # devices
    compact: bool = False


def _xxh32(data: bytes, seed: int) -> int:
    # An independent copy of xxHash32 (the writer's is in layerstore.erofs.format).
    p1, p2, p3, p4, p5, m = 2654435761, 2246822519, 3266489917, 668265263, 374761393, 0xFFFFFFFF

    def rotl(x: int, r: int) -> int:
        return ((x << r) | (x >> (32 - r))) & m

    n, i = len(data), 0
    if n >= 16:
        v = [(seed + p1 + p2) & m, (seed + p2) & m, seed & m, (seed - p1) & m]
        while i <= n - 16:
            for j in range(4):
                lane = int.from_bytes(data[i : i + 4], "little")
                v[j] = (rotl((v[j] + lane * p2) & m, 13) * p1) & m
                i += 4
        h = (rotl(v[0], 1) + rotl(v[1], 7) + rotl(v[2], 12) + rotl(v[3], 18)) & m
    else:
        h = (seed + p5) & m
    h = (h + n) & m
    while i + 4 <= n:
        h = (rotl((h + int.from_bytes(data[i : i + 4], "little") * p3) & m, 17) * p4) & m
        i += 4
    while i < n:
        h = (rotl((h + data[i] * p5) & m, 11) * p1) & m
        i += 1
    h ^= h >> 15
    h = (h * p2) & m
    h ^= h >> 13
    h = (h * p3) & m
    return h ^ (h >> 16)


class Image:
    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        if len(raw) < 1024 + 128:
            raise Corrupt("too short")
        (
            magic,
            _csum,
            self.compat,
            blkbits,
            extslots,
            self.root_nid,
            self.inos,
            self.build_time,
            self.build_nsec,
            self.blocks,
            self.meta_blk,
            self.xattr_blk,
        ) = struct.unpack_from("<IIIBBHQQIIII", raw, 1024)
        if magic != 0xE0F5E1E2 or blkbits != 12 or extslots:
            raise Corrupt("bad superblock")
        if self.blocks * BLK != len(raw):
            raise Corrupt(f"superblock says {self.blocks} blocks, image has {len(raw)} bytes")
        self.header = struct.unpack_from("<IIII", raw, 0)
        if self.build_time >= 1 << 63:
            self.build_time -= 1 << 64

    def _shared(self, xid: int) -> tuple[bytes, bytes]:
        off = self.xattr_blk * BLK + xid * 4
        return self._xentry(off)[0]

    def _xentry(self, off: int) -> tuple[tuple[bytes, bytes], int]:
        nlen, idx, vlen = struct.unpack_from("<BBH", self.raw, off)
        if idx not in PREFIX:
            raise Corrupt(f"unknown xattr index {idx}")
        name = self.raw[off + 4 : off + 4 + nlen]
        value = self.raw[off + 4 + nlen : off + 4 + nlen + vlen]
        return (PREFIX[idx] + name, value), (4 + nlen + vlen + 3) // 4 * 4

    def inode(self, nid: int) -> tuple[Entry, int, int, int, int]:
        """(entry, layout, i_u, offset of the inline tail, tail bytes available)."""
        off = self.meta_blk * BLK + nid * 32
        (fmt,) = struct.unpack_from("<H", self.raw, off)
        extended = fmt & 1
        layout = (fmt >> 1) & 7
        if extended:
            (_, icount, mode, _, size, u, _ino, uid, gid, mt, mtn, nlink) = struct.unpack_from(
                "<HHHHQIIIIQII", self.raw, off
            )
            if mt >= 1 << 63:
                mt -= 1 << 64
            mtime = mt * 1_000_000_000 + mtn
            isize = 64
        else:
            (_, icount, mode, nlink, size, _, u, _ino, uid, gid) = struct.unpack_from(
                "<HHHHIIIIHH", self.raw, off
            )
            mtime = self.build_time * 1_000_000_000 + self.build_nsec
            isize = 32
        e = Entry(nid, mode, uid, gid, mtime, nlink, size, compact=not extended)
        xoff = off + isize
        xsize = 0
        if icount:
            xsize = 12 + 4 * (icount - 1)
            filt, nshared = struct.unpack_from("<IB", self.raw, xoff)
            p = xoff + 12
            pairs = []
            for _ in range(nshared):
                (xid,) = struct.unpack_from("<I", self.raw, p)
                pairs.append(self._shared(xid))
                p += 4
            while p < xoff + xsize:
                pair, ln = self._xentry(p)
                pairs.append(pair)
                p += ln
            if p != xoff + xsize:
                raise Corrupt("xattr body overruns its size")
            for name, value in pairs:
                idx, suffix = _split(name)
                bit = _xxh32(suffix, 0x25BBE08F + idx) & 31
                if filt & (1 << bit):
                    raise Corrupt(f"xattr {name!r} is excluded by its inode's name filter")
                if name in e.xattrs:
                    raise Corrupt(f"xattr {name!r} twice")
                e.xattrs[name] = value
        tail_off = xoff + xsize
        return e, layout, u, tail_off, BLK - tail_off % BLK

    def data(self, nid: int) -> tuple[Entry, bytes | None, int]:
        e, layout, u, tail_off, room = self.inode(nid)
        size = e.size
        if layout == 4:  # chunk based
            bits = (u & 0x1F) + 12
            if u & 0x20:
                raise Corrupt("chunk indexes are not used by composefs images")
            n = -(-size // (1 << bits)) if size else 0
            addrs = struct.unpack_from(f"<{n}I", self.raw, tail_off)
            if any(a != 0xFFFFFFFF for a in addrs):
                raise Corrupt("a chunk of an external file is not a hole")
            return e, None, layout
        if layout not in (0, 2):
            raise Corrupt(f"data layout {layout}")
        nblocks = size // BLK if layout == 2 else -(-size // BLK)
        body = b""
        if nblocks:
            body = self.raw[u * BLK : u * BLK + nblocks * BLK]
        if layout == 2:
            tail = size - nblocks * BLK
            if tail > room:
                raise Corrupt("inline tail crosses a block boundary")
            body += self.raw[tail_off : tail_off + tail]
        return e, body[:size], layout

    def listing(self) -> dict[bytes, Entry]:
        out: dict[bytes, Entry] = {}
        seen_dirs: set[int] = set()
        stack = [(b".", self.root_nid, self.root_nid)]
        while stack:
            path, nid, parent = stack.pop()
            e, body, _layout = self.data(nid)
            kind = e.mode & S_IFMT
            out[path] = e
            if kind == S_IFREG:
                e.data, e.sparse = body, body is None
            elif kind == S_IFLNK:
                e.target = body
            elif kind in (S_IFCHR, S_IFBLK):
                _, _, u, _, _ = self.inode(nid)
                e.rdev = ((u & 0xFFF00) >> 8, (u & 0xFF) | ((u >> 12) & 0xFFF00))
            if kind != S_IFDIR:
                continue
            if nid in seen_dirs:
                raise Corrupt("directory reached twice")
            seen_dirs.add(nid)
            assert body is not None
            names = self._dirents(body, e.size)
            if [n for n, _, _ in names] != sorted(n for n, _, _ in names):
                raise Corrupt(f"{path!r}: entries are not sorted")
            got = {n: (c, ft) for n, c, ft in names}
            if got.get(b".", (None,))[0] != nid or got.get(b"..", (None,))[0] != parent:
                raise Corrupt(f"{path!r}: bad . or ..")
            for name, child, _ft in names:
                if name in (b".", b".."):
                    continue
                stack.append((name if path == b"." else path + b"/" + name, child, nid))
        return out

    @staticmethod
    def _dirents(body: bytes, size: int) -> list[tuple[bytes, int, int]]:
        out = []
        for start in range(0, size, BLK):
            blk = body[start : min(size, start + BLK)]
            nid0, nameoff0, _, _ = struct.unpack_from("<QHBB", blk, 0)
            n = nameoff0 // 12
            ents = [struct.unpack_from("<QHBB", blk, 12 * i) for i in range(n)]
            for i, (nid, nameoff, ft, _) in enumerate(ents):
                end = ents[i + 1][1] if i + 1 < n else len(blk)
                name = blk[nameoff:end]
                if i + 1 == n:
                    name = name.split(b"\0", 1)[0]
                out.append((name, nid, ft))
        return out


def _split(name: bytes) -> tuple[int, bytes]:
    if name in (b"system.posix_acl_access", b"system.posix_acl_default"):
        return (2 if name.endswith(b"access") else 3), b""
    for idx, p in ((1, b"user."), (4, b"trusted."), (6, b"security.")):
        if name.startswith(p):
            return idx, name[len(p) :]
    return 0, name


def read(raw: bytes) -> dict[bytes, Entry]:
    return Image(raw).listing()
