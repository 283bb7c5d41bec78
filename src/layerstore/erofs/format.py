"""EROFS on-disk constants and records, as the kernel reads them (``fs/erofs/erofs_fs.h``).

Only what a composefs-style image uses: 4 KiB blocks, uncompressed inodes (flat, flat with an
inline tail, chunk-based with a 4-byte block map), shared and inline xattrs with the name
filter, and the composefs header in front of the superblock.  Everything is little-endian.
"""

from __future__ import annotations

import struct
from typing import Final

BLOCK_BITS: Final = 12
BLOCK_SIZE: Final = 1 << BLOCK_BITS
SLOT_SIZE: Final = 32  # inodes are addressed by 32-byte slots (nid = offset / 32)
SUPER_OFFSET: Final = 1024
SUPER_MAGIC: Final = 0xE0F5E1E2

# composefs' header at offset 0 (the superblock starts at 1024, so the first KiB is free):
# magic, header version, flags, composefs format version, 16 bytes unused.
COMPOSEFS_MAGIC: Final = 0xD078629A
COMPOSEFS_HEADER_VERSION: Final = 1
COMPOSEFS_VERSION: Final = 1  # the V1 whiteout handling (mkcomposefs --min-version=1)
COMPOSEFS_FLAG_HAS_ACL: Final = 1
COMPOSEFS_HEADER = struct.Struct("<IIII16x")

FEATURE_COMPAT_MTIME: Final = 0x2  # extended inodes carry their own mtime
FEATURE_COMPAT_XATTR_FILTER: Final = 0x4  # h_name_filter bloom bits are valid

SUPERBLOCK = struct.Struct(
    "<"
    "I"  # magic
    "I"  # checksum (crc32c; only with FEATURE_COMPAT_SB_CHKSUM, unused here)
    "I"  # feature_compat
    "B"  # blkszbits
    "B"  # sb_extslots
    "H"  # root_nid
    "Q"  # inos
    "Q"  # build_time (the mtime of every compact inode)
    "I"  # build_time_nsec
    "I"  # blocks
    "I"  # meta_blkaddr
    "I"  # xattr_blkaddr
    "16s"  # uuid
    "16s"  # volume_name
    "I"  # feature_incompat
    "H"  # available_compr_algs / lz4_max_distance
    "H"  # extra_devices
    "H"  # devt_slotoff
    "B"  # dirblkbits
    "B"  # xattr_prefix_count
    "I"  # xattr_prefix_start
    "Q"  # packed_nid
    "B"  # xattr_filter_reserved
    "23x"
)
assert SUPERBLOCK.size == 128

# i_format: bit 0 = inode version (0 compact, 1 extended), bits 1-3 = data layout.
LAYOUT_FLAT_PLAIN: Final = 0
LAYOUT_FLAT_INLINE: Final = 2
LAYOUT_CHUNK_BASED: Final = 4

# format, xattr_icount, mode, nlink, size, reserved, i_u, ino, uid, gid, reserved2
INODE_COMPACT = struct.Struct("<HHHHIIIIHHI")
# format, xattr_icount, mode, reserved, size, i_u, ino, uid, gid, mtime, mtime_nsec, nlink
INODE_EXTENDED = struct.Struct("<HHHHQIIIIQII16x")
assert INODE_COMPACT.size == 32 and INODE_EXTENDED.size == 64

NULL_ADDR: Final = 0xFFFFFFFF  # a hole in a chunk map
CHUNK_FORMAT_BLKBITS_MASK: Final = 0x1F

DIRENT = struct.Struct("<QHBB")  # nid, nameoff, file_type, reserved
assert DIRENT.size == 12
FT_REG, FT_DIR, FT_CHR, FT_BLK, FT_FIFO, FT_SOCK, FT_SYMLINK = 1, 2, 3, 4, 5, 6, 7

XATTR_IBODY_HEADER = struct.Struct("<IB7x")  # name_filter, shared_count
XATTR_ENTRY = struct.Struct("<BBH")  # name_len, name_index, value_size
XATTR_FILTER_SEED: Final = 0x25BBE08F
XATTR_FILTER_BITS: Final = 32
MAX_SHARED_PER_INODE: Final = 128  # as mkcomposefs: h_shared_count is a u8

# Name indexes: an xattr name is stored as (index, suffix).  Index 0 keeps the whole name
# (the kernel then lists no such xattr: only these namespaces exist for it).
XATTR_PREFIXES: Final = (
    (1, b"user."),
    (4, b"trusted."),
    (6, b"security."),
)
XATTR_FULL_NAMES: Final = {
    b"system.posix_acl_access": 2,
    b"system.posix_acl_default": 3,
}
PREFIX_OF_INDEX: Final = {
    0: b"",
    1: b"user.",
    2: b"system.posix_acl_access",
    3: b"system.posix_acl_default",
    4: b"trusted.",
    6: b"security.",
}

NAME_MAX: Final = 255
SYMLINK_MAX: Final = 4095
XATTR_VALUE_MAX: Final = 65535


_split_cache: dict[bytes, tuple[int, bytes, int]] = {}


def name_info(name: bytes) -> tuple[int, bytes, int]:
    """(name index, stored suffix, filter bit) of an xattr name, memoized: an image repeats a
    handful of names (the overlay ones on every file)."""
    info = _split_cache.get(name)
    if info is None:
        index, suffix = split_xattr_name(name)
        info = (index, suffix, filter_bit(index, suffix))
        if len(_split_cache) < 65536:
            _split_cache[name] = info
    return info


def split_xattr_name(name: bytes) -> tuple[int, bytes]:
    """(name index, stored suffix) of an xattr name."""
    full = XATTR_FULL_NAMES.get(name)
    if full is not None:
        return full, b""
    for index, prefix in XATTR_PREFIXES:
        if name.startswith(prefix):
            return index, name[len(prefix) :]
    return 0, name


def encode_dev(major: int, minor: int) -> int:
    """The kernel's ``new_encode_dev``: what erofs keeps in ``i_u.rdev``."""
    return (minor & 0xFF) | ((major & 0xFFF) << 8) | ((minor & ~0xFF) << 12) & 0xFFFFFFFF


def decode_dev(raw: int) -> tuple[int, int]:
    """``new_decode_dev``: (major, minor)."""
    return (raw & 0xFFF00) >> 8, (raw & 0xFF) | ((raw >> 12) & 0xFFF00)


# -- xxh32 (the xattr name filter's hash; seed + name index) ----------------------------------
_P1, _P2, _P3, _P4, _P5 = 2654435761, 2246822519, 3266489917, 668265263, 374761393
_M = 0xFFFFFFFF


def _rotl(x: int, r: int) -> int:
    return ((x << r) | (x >> (32 - r))) & _M


def _round(v: int, lane: int) -> int:
    return (_rotl((v + lane * _P2) & _M, 13) * _P1) & _M


def xxh32(data: bytes, seed: int) -> int:
    """xxHash32 as the kernel's lib/xxhash.c computes it."""
    n = len(data)
    i = 0
    if n >= 16:
        v1 = (seed + _P1 + _P2) & _M
        v2 = (seed + _P2) & _M
        v3 = seed & _M
        v4 = (seed - _P1) & _M
        while i <= n - 16:
            a, b, c, d = struct.unpack_from("<IIII", data, i)
            v1, v2, v3, v4 = _round(v1, a), _round(v2, b), _round(v3, c), _round(v4, d)
            i += 16
        h = (_rotl(v1, 1) + _rotl(v2, 7) + _rotl(v3, 12) + _rotl(v4, 18)) & _M
    else:
        h = (seed + _P5) & _M
    h = (h + n) & _M
    while i + 4 <= n:
        (lane,) = struct.unpack_from("<I", data, i)
        h = (_rotl((h + lane * _P3) & _M, 17) * _P4) & _M
        i += 4
    while i < n:
        h = (_rotl((h + data[i] * _P5) & _M, 11) * _P1) & _M
        i += 1
    h ^= h >> 15
    h = (h * _P2) & _M
    h ^= h >> 13
    h = (h * _P3) & _M
    h ^= h >> 16
    return h


def filter_bit(index: int, suffix: bytes) -> int:
    """The bloom bit of one xattr name (clear in ``h_name_filter`` when the name is there)."""
    return 1 << (xxh32(suffix, XATTR_FILTER_SEED + index) & (XATTR_FILTER_BITS - 1))
