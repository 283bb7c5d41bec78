"""Write a tree (:mod:`.tree`) as an EROFS image, in the composefs V1 layout.

The layout is mkcomposefs' (libcomposefs ``lcfs-writer-erofs.c``), which composefs-rs keeps
byte-compatible in its V1 mode -- read for its format facts, written anew here:

* offset 0: the composefs header; 1024: the superblock; the inode table follows it directly
  (``meta_blkaddr`` 0, so a nid is the byte offset / 32 and the root's is 36 or a little more);
* inodes in breadth-first order (root, its children sorted by name, their children, ...), each
  on a 32-byte slot; compact (32 bytes) when the mtime is the image's minimum (kept once, as
  ``build_time``) and owner, link count and size fit 16/16/16/32 bits, else extended (64);
* xattrs: a (name, value) pair that more than one inode has is *shared* (one copy in the table
  after the inodes, referenced by a 4-byte id), the rest inline after the inode; every inode
  with xattrs has the bloom-filter word of its names;
* small data is tail-packed after the inode (a directory's last dirent block when it is at most
  half a block, a file's last partial block when at most half a block, a symlink's target), the
  rest in whole blocks after the shared xattrs; a tail never crosses a block boundary;
* an external file (data elsewhere) is a chunk-based inode whose only chunk is a hole: its
  ``stat`` size is right and it costs 4 bytes; overlayfs reads the data through its
  ``trusted.overlay.redirect`` / ``trusted.overlay.metacopy`` xattrs.

``composefs=True`` (the default) adds what makes the image a composefs image under overlayfs:
user ``trusted.overlay.*`` xattrs are escaped (``trusted.overlay.overlay.*``: overlayfs shows
them unescaped), whiteouts in the tree are escaped as composefs V1 does (an empty regular file
with ``trusted.overlay.overlay.whiteout``; overlayfs would otherwise *apply* them), the root is
opaque and holds whiteouts ``00``..``ff`` (they hide the object directories when the data
directory is mounted as an ordinary lower layer).  ``composefs=False`` writes the tree as it is
(a plain EROFS image: tests mount it directly).

The same tree always gives the same bytes: nothing depends on the clock, dict order or the
machine.
"""

from __future__ import annotations

import struct
from collections import Counter
from collections.abc import Iterable
from typing import Final

from ..errors import InvalidInputError
from . import format as F
from .tree import (
    S_IFBLK,
    S_IFCHR,
    S_IFDIR,
    S_IFIFO,
    S_IFLNK,
    S_IFREG,
    S_IFSOCK,
    Device,
    Dir,
    File,
    Inode,
    Symlink,
    is_whiteout,
)

_BLK = F.BLOCK_SIZE
_HALF = _BLK // 2
_FT = {
    S_IFREG: F.FT_REG,
    S_IFDIR: F.FT_DIR,
    S_IFCHR: F.FT_CHR,
    S_IFBLK: F.FT_BLK,
    S_IFIFO: F.FT_FIFO,
    S_IFSOCK: F.FT_SOCK,
    S_IFLNK: F.FT_SYMLINK,
}
OVERLAY: Final = b"trusted.overlay."
OVERLAY_ESCAPED: Final = b"trusted.overlay.overlay."
METACOPY: Final = b"trusted.overlay.metacopy"
REDIRECT: Final = b"trusted.overlay.redirect"
FS_VERITY_HASH_ALG_SHA256: Final = 1


class ImageError(InvalidInputError):
    """The tree cannot be written as EROFS (a name, target or xattr the format cannot hold)."""


def metacopy_value(verity: bytes | None) -> bytes:
    """``trusted.overlay.metacopy``: empty, or overlayfs' ``struct ovl_metacopy`` (version 0,
    length 36, flags 0, sha256) with the data's fs-verity digest."""
    if verity is None:
        return b""
    if len(verity) != 32:
        raise ImageError(f"an fs-verity sha256 digest has 32 bytes, not {len(verity)}")
    return bytes((0, 36, 0, FS_VERITY_HASH_ALG_SHA256)) + verity


def _round_up(n: int, a: int) -> int:
    return (n + a - 1) // a * a


class _Node:
    """One inode of the image as the writer lays it out."""

    __slots__ = (
        "blkaddr",
        "blocks",
        "children",
        "compact",
        "data",
        "filt",
        "fmt",
        "idx",
        "inline_x",
        "inode",
        "nlink",
        "pad",
        "pos",
        "shared",
        "size",
        "tail",
        "u",
        "xattrs",
        "xattr_size",
    )

    def __init__(self, inode: Inode | None, fmt: int, idx: int) -> None:
        self.inode = inode
        self.fmt = fmt  # S_IF* of the image inode (an escaped whiteout is S_IFREG)
        self.idx = idx
        self.nlink = 0
        self.xattrs: list[tuple[bytes, bytes]] = []
        self.shared: list[int] = []  # byte offsets into the shared table
        self.inline_x: list[tuple[int, bytes, bytes]] = []
        self.filt = 0
        self.xattr_size = 0
        self.children: list[tuple[bytes, _Node]] = []  # directories: sorted, with . and ..
        self.compact = False
        self.blocks = 0  # whole data blocks
        self.tail = 0  # inline bytes after the inode
        self.size = 0
        self.u = 0  # i_u: blkaddr, rdev or chunk format
        self.data = b""  # a regular file's bytes, a symlink's target
        self.pad = 0
        self.pos = 0
        self.blkaddr = 0


class _Synthetic(Inode):
    """An inode the writer adds (composefs' root whiteouts)."""

    __slots__ = ()


def write_image(root: Dir, *, composefs: bool = True) -> bytes:
    """The EROFS image of ``root`` (see the module docstring)."""
    return _Writer(root, composefs).run()


class _Writer:
    def __init__(self, root: Dir, composefs: bool) -> None:
        if not isinstance(root, Dir):
            raise ImageError("the root of an image must be a directory")
        self.root = root
        self.composefs = composefs
        self.nodes: list[_Node] = []
        self.has_acl = False

    # -- 1. inodes in breadth-first order ---------------------------------------------------
    def collect(self) -> None:
        nodes = self.nodes
        seen: dict[int, _Node] = {}
        root = _Node(self.root, S_IFDIR, 0)
        nodes.append(root)
        seen[id(self.root)] = root
        queue = [(root, root)]  # (node, parent)
        qi = 0
        escaped_parents: set[int] = set()
        while qi < len(queue):
            node, par = queue[qi]
            qi += 1
            d = node.inode
            assert isinstance(d, Dir)
            entries = d.entries
            names = sorted(entries)
            if node is root and self.composefs:
                names = sorted(set(names) | {f"{i:02x}".encode() for i in range(256)})
            children: list[tuple[bytes, _Node]] = []
            subdirs = 0
            for name in names:
                child_inode = entries.get(name)
                if child_inode is None:  # a composefs root whiteout
                    w = _Synthetic(0o644, d.uid, d.gid, d.mtime_ns)
                    sel = d.xattrs.get(b"security.selinux")
                    if sel is not None:
                        w.xattrs[b"security.selinux"] = sel
                    cn = _Node(w, S_IFCHR, len(nodes))
                    nodes.append(cn)
                    cn.nlink = 1
                    children.append((name, cn))
                    continue
                _check_name(name)
                cn = seen.get(id(child_inode))
                if cn is None:
                    fmt = child_inode.st_mode & 0o170000
                    if self.composefs and is_whiteout(child_inode):
                        fmt = S_IFREG
                        escaped_parents.add(node.idx)
                    cn = _Node(child_inode, fmt, len(nodes))
                    nodes.append(cn)
                    seen[id(child_inode)] = cn
                    if isinstance(child_inode, Dir):
                        queue.append((cn, node))
                elif cn.fmt == S_IFDIR:
                    raise ImageError(f"directory {name!r} is linked twice (directory hardlink)")
                elif self.composefs and is_whiteout(child_inode):
                    escaped_parents.add(node.idx)
                if cn.fmt == S_IFDIR:
                    subdirs += 1
                else:
                    cn.nlink += 1
                children.append((name, cn))
            children.append((b".", node))
            children.append((b"..", par))
            children.sort(key=lambda c: c[0])
            node.children = children
            node.nlink = 2 + subdirs
        self.escaped_parents = escaped_parents

    # -- 2. xattrs --------------------------------------------------------------------------
    def node_xattrs(self, n: _Node) -> list[tuple[bytes, bytes]]:
        inode = n.inode
        assert inode is not None
        out: dict[bytes, bytes] = {}
        for k, v in inode.xattrs.items():
            if self.composefs and k.startswith(OVERLAY):
                k = OVERLAY_ESCAPED + k[len(OVERLAY) :]
            if not k or (len(k) > F.NAME_MAX and len(F.split_xattr_name(k)[1]) > F.NAME_MAX):
                raise ImageError(f"xattr name {k[:80]!r} is empty or longer than 255 bytes")
            if len(v) > F.XATTR_VALUE_MAX:
                raise ImageError(f"xattr {k!r} has a value over {F.XATTR_VALUE_MAX} bytes")
            if k in F.XATTR_FULL_NAMES:
                self.has_acl = True
            out[k] = v
        if n.fmt == S_IFREG and isinstance(inode, File):
            if inode.data is None and inode.size > 0 and inode.redirect is not None:
                out[METACOPY] = metacopy_value(inode.verity)
                red = inode.redirect
                out[REDIRECT] = red if red.startswith(b"/") else b"/" + red
            if not out:
                return []
        if self.composefs:
            if n.fmt == S_IFREG and is_whiteout(inode):
                out[OVERLAY_ESCAPED + b"whiteout"] = b""
                out[b"user.overlay.whiteout"] = b""
            if n.idx in self.escaped_parents:
                out[OVERLAY_ESCAPED + b"whiteouts"] = b""
                out[b"user.overlay.whiteouts"] = b""
                out[OVERLAY_ESCAPED + b"opaque"] = b"x"
                out[b"user.overlay.opaque"] = b"x"
            if n.idx == 0:
                out[OVERLAY + b"opaque"] = b"y"
        return sorted(out.items())

    def share_xattrs(self) -> list[tuple[int, bytes, bytes]]:
        """Pairs used by more than one inode go to the shared table (mkcomposefs' rule and
        order: descending by name, value length, value); returns the table."""
        counts: Counter[tuple[bytes, bytes]] = Counter()
        for n in self.nodes:
            n.xattrs = self.node_xattrs(n)
            counts.update(n.xattrs)
        shared_pairs = sorted(
            (p for p, c in counts.items() if c > 1),
            key=lambda p: (p[0], len(p[1]), p[1]),
            reverse=True,
        )
        offsets: dict[tuple[bytes, bytes], int] = {}
        table: list[tuple[int, bytes, bytes]] = []
        off = 0
        for name, value in shared_pairs:
            index, suffix, _bit = F.name_info(name)
            offsets[(name, value)] = off
            table.append((index, suffix, value))
            off += _round_up(F.XATTR_ENTRY.size + len(suffix) + len(value), 4)
        self.shared_size = off
        for n in self.nodes:
            if not n.xattrs:
                continue
            size = F.XATTR_IBODY_HEADER.size
            filt = 0
            for pair in n.xattrs:
                index, suffix, bit = F.name_info(pair[0])
                filt |= bit
                so = offsets.get(pair) if offsets else None
                if so is not None and len(n.shared) < F.MAX_SHARED_PER_INODE:
                    n.shared.append(so)
                    size += 4
                else:
                    value = pair[1]
                    n.inline_x.append((index, suffix, value))
                    size += (F.XATTR_ENTRY.size + len(suffix) + len(value) + 3) & ~3
            n.filt = filt
            n.xattr_size = size
        return table

    # -- 3. sizes, tails and positions ------------------------------------------------------
    def sizes(self) -> None:
        min_mtime: int | None = None
        for n in self.nodes:
            inode = n.inode
            assert inode is not None
            m = inode.mtime_ns
            if min_mtime is None or m < min_mtime:
                min_mtime = m
            fmt = n.fmt
            if fmt == S_IFDIR:
                blocks, used = 0, 0
                for name, _ in n.children:
                    ln = F.DIRENT.size + len(name)
                    if used + ln > _BLK:
                        blocks += 1
                        used = 0
                    used += ln
                if used > _HALF:  # never inline more than half a block
                    blocks, used = blocks + 1, 0
                n.blocks, n.tail = blocks, used
            elif fmt == S_IFLNK:
                assert isinstance(inode, Symlink)
                t = inode.target
                if not t or len(t) > F.SYMLINK_MAX or b"\0" in t:
                    raise ImageError(f"symlink target {t[:80]!r} is empty, has NUL or is long")
                n.data = t
                n.tail = len(t)
                n.size = len(t)
            elif fmt == S_IFREG and isinstance(inode, File):
                n.size = inode.size
                if inode.data is not None:
                    if len(inode.data) != inode.size:
                        raise ImageError("a file's size differs from its data")
                    n.data = inode.data
                    n.blocks, n.tail = divmod(inode.size, _BLK)
                    if n.tail > _HALF:
                        n.blocks, n.tail = n.blocks + 1, 0
                elif inode.size > 0:
                    bits = max(F.BLOCK_BITS, (inode.size - 1).bit_length())
                    bits = min(bits, F.BLOCK_BITS + F.CHUNK_FORMAT_BLKBITS_MASK)
                    chunks = -(-inode.size // (1 << bits))
                    n.u = bits - F.BLOCK_BITS
                    n.tail = 4 * chunks
                    if n.tail > _BLK:
                        raise ImageError(f"an external file of {inode.size} bytes is too large")
            elif isinstance(inode, Device):
                if fmt == S_IFREG:  # an escaped whiteout
                    continue
                if inode.major > 0xFFF or inode.minor > 0xFFFFF:
                    raise ImageError(f"device {inode.major}:{inode.minor} does not fit EROFS")
                n.u = F.encode_dev(inode.major, inode.minor)
        self.min_mtime = min_mtime or 0

    def layout(self) -> None:
        bt = self.min_mtime
        pos = F.SUPER_OFFSET + F.SUPERBLOCK.size
        for n in self.nodes:
            inode = n.inode
            assert inode is not None
            size = n.blocks * _BLK + n.tail if n.fmt == S_IFDIR else n.size
            n.compact = (
                inode.mtime_ns == bt
                and n.nlink <= 0xFFFF
                and inode.uid <= 0xFFFF
                and inode.gid <= 0xFFFF
                and size <= 0xFFFFFFFF
            )
            isize = F.INODE_COMPACT.size if n.compact else F.INODE_EXTENDED.size
            start = _round_up(pos, F.SLOT_SIZE)
            pad = start - pos
            pos = start
            head = isize + n.xattr_size
            if n.fmt == S_IFLNK:
                total = head + n.tail
                if total > _BLK:  # the target cannot share a block with its inode
                    n.blocks, n.tail = 1, 0
                if pos // _BLK != (pos + total - 1) // _BLK:
                    extra = _round_up(pos, _BLK) - pos
                    pad += extra
                    pos += extra
            elif n.tail:
                room = _BLK - (pos + head) % _BLK
                if room < n.tail:
                    extra = _round_up(room, F.SLOT_SIZE)
                    if n.tail <= _BLK - (pos + head + extra) % _BLK:
                        pad += extra
                        pos += extra
                    else:  # it cannot fit: the tail becomes a block of its own
                        if n.fmt == S_IFREG and n.inode is not None and n.data:
                            n.blocks += 1
                        elif n.fmt == S_IFDIR:
                            n.blocks += 1
                        else:  # a chunk map: never larger than a block, always fits
                            raise AssertionError("chunk map does not fit a block")
                        n.tail = 0
                        extra = _round_up(pos, _BLK) - pos
                        pad += extra
                        pos += extra
            if pad >= _BLK:
                raise AssertionError("inode padding of a block or more")
            n.pad = pad
            n.pos = pos
            pos += head + n.tail
            if n.tail:
                assert (pos - n.tail) // _BLK == (pos - 1) // _BLK
        self.inodes_end = _round_up(pos, F.SLOT_SIZE)
        if (self.nodes[0].pos // F.SLOT_SIZE) > 0xFFFF:
            raise AssertionError("root nid does not fit 16 bits")
        self.data_start = _round_up(self.inodes_end + self.shared_size, _BLK)
        blk = self.data_start // _BLK
        for n in self.nodes:
            if n.blocks:
                n.blkaddr = blk
                blk += n.blocks
        self.total_blocks = blk

    # -- 4. bytes ----------------------------------------------------------------------------
    def emit(self, table: list[tuple[int, bytes, bytes]]) -> bytes:
        out = bytearray()
        flags = F.COMPOSEFS_FLAG_HAS_ACL if self.has_acl else 0
        out += F.COMPOSEFS_HEADER.pack(
            F.COMPOSEFS_MAGIC, F.COMPOSEFS_HEADER_VERSION, flags, F.COMPOSEFS_VERSION
        )
        out += bytes(F.SUPER_OFFSET - len(out))
        bt_sec, bt_nsec = divmod(self.min_mtime, 1_000_000_000)
        out += F.SUPERBLOCK.pack(
            F.SUPER_MAGIC,
            0,
            F.FEATURE_COMPAT_MTIME | F.FEATURE_COMPAT_XATTR_FILTER,
            F.BLOCK_BITS,
            0,
            self.nodes[0].pos // F.SLOT_SIZE,
            len(self.nodes),
            bt_sec & 0xFFFFFFFFFFFFFFFF,
            bt_nsec,
            self.total_blocks,
            0,
            self.inodes_end // _BLK,
            bytes(16),
            bytes(16),
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
        )
        xbase = self.inodes_end % _BLK
        for n in self.nodes:
            out += bytes(n.pad)
            assert len(out) == n.pos, (len(out), n.pos)
            self._inode(out, n, xbase)
        out += bytes(self.inodes_end - len(out))
        for index, suffix, value in table:
            _xattr_entry(out, index, suffix, value)
        out += bytes(self.data_start - len(out))
        for n in self.nodes:
            if not n.blocks:
                continue
            assert len(out) == n.blkaddr * _BLK
            if n.fmt == S_IFDIR:
                for chunk in self._dir_chunks(n)[: n.blocks]:
                    _dirents(out, chunk)
                    out += bytes(_round_up(len(out), _BLK) - len(out))
            else:
                body = n.data[: n.blocks * _BLK]
                out += body
                out += bytes(n.blocks * _BLK - len(body))
        assert len(out) == self.total_blocks * _BLK
        return bytes(out)

    def _dir_chunks(self, n: _Node) -> list[list[tuple[bytes, _Node]]]:
        """Dirents split as :meth:`sizes` counted: full blocks, then the rest (a last block
        or the inline tail)."""
        chunks: list[list[tuple[bytes, _Node]]] = []
        cur: list[tuple[bytes, _Node]] = []
        used = 0
        for name, child in n.children:
            ln = F.DIRENT.size + len(name)
            if used + ln > _BLK:
                chunks.append(cur)
                cur, used = [], 0
            cur.append((name, child))
            used += ln
        if cur:
            chunks.append(cur)
        return chunks

    def _inode(self, out: bytearray, n: _Node, xbase: int) -> None:
        inode = n.inode
        assert inode is not None
        if n.fmt == S_IFDIR:
            size = n.blocks * _BLK + n.tail
            layout = F.LAYOUT_FLAT_INLINE if n.tail else F.LAYOUT_FLAT_PLAIN
            u = n.blkaddr if n.blocks else 0
        elif n.fmt == S_IFREG and isinstance(inode, File) and inode.data is None and n.size:
            size = n.size
            layout = F.LAYOUT_CHUNK_BASED
            u = n.u
        elif n.fmt in (S_IFREG, S_IFLNK):
            size = n.size
            layout = F.LAYOUT_FLAT_INLINE if n.tail else F.LAYOUT_FLAT_PLAIN
            u = n.blkaddr if n.blocks else 0
        else:  # devices, fifos, sockets (and escaped whiteouts, S_IFREG without data)
            size = 0
            layout = F.LAYOUT_FLAT_PLAIN
            u = n.u
        icount = 0 if not n.xattr_size else (n.xattr_size - F.XATTR_IBODY_HEADER.size) // 4 + 1
        if icount > 0xFFFF:
            raise ImageError("an inode has more xattr bytes than EROFS can hold")
        mode = n.fmt | inode.mode
        if n.compact:
            out += F.INODE_COMPACT.pack(
                layout << 1,
                icount,
                mode,
                n.nlink,
                size,
                0,
                u,
                n.idx,
                inode.uid,
                inode.gid,
                0,
            )
        else:
            sec, nsec = divmod(inode.mtime_ns, 1_000_000_000)
            if not -(1 << 63) <= sec < (1 << 63) or inode.uid > 0xFFFFFFFF:
                raise ImageError("an mtime or owner does not fit EROFS")
            out += F.INODE_EXTENDED.pack(
                (layout << 1) | 1,
                icount,
                mode,
                0,
                size,
                u,
                n.idx & 0xFFFFFFFF,
                inode.uid,
                inode.gid,
                sec & 0xFFFFFFFFFFFFFFFF,
                nsec,
                n.nlink,
            )
        if n.xattr_size:
            out += F.XATTR_IBODY_HEADER.pack(~n.filt & 0xFFFFFFFF, len(n.shared))
            for so in n.shared:
                out += struct.pack("<I", (xbase + so) // 4)
            for index, suffix, value in n.inline_x:
                _xattr_entry(out, index, suffix, value)
        if n.tail:
            if n.fmt == S_IFDIR:
                chunks = self._dir_chunks(n)
                _dirents(out, chunks[n.blocks])
            elif layout == F.LAYOUT_CHUNK_BASED:
                out += struct.pack("<I", F.NULL_ADDR) * (n.tail // 4)
            else:
                out += n.data[n.blocks * _BLK :]

    def run(self) -> bytes:
        self.collect()
        table = self.share_xattrs()
        self.sizes()
        self.layout()
        return self.emit(table)


def _check_name(name: bytes) -> None:
    if not name or name in (b".", b"..") or b"/" in name or b"\0" in name:
        raise ImageError(f"{name!r} is not a valid file name")
    if len(name) > F.NAME_MAX:
        raise ImageError(f"file name {name[:60]!r}... is longer than {F.NAME_MAX} bytes")


def _xattr_entry(out: bytearray, index: int, suffix: bytes, value: bytes) -> None:
    start = len(out)
    out += F.XATTR_ENTRY.pack(len(suffix), index, len(value))
    out += suffix
    out += value
    out += bytes(_round_up(len(out) - start, 4) - (len(out) - start))


def _dirents(out: bytearray, chunk: Iterable[tuple[bytes, _Node]]) -> None:
    items = list(chunk)
    nameoff = F.DIRENT.size * len(items)
    for name, child in items:
        out += F.DIRENT.pack(child.pos // F.SLOT_SIZE, nameoff, _FT[child.fmt], 0)
        nameoff += len(name)
    for name, _ in items:
        out += name
