"""Linux file-system primitives: clone ioctls, copy fallbacks, syncfs, FIEMAP, openat2.

These are the few system calls the store's guarantees rest on, kept in one place with the
errno rules that decide when to fall back.  Any clone failure means "copy instead", never a fatal
error: some filesystems accept a probe and refuse real clones later (linux-fs.md).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import json
import os
import struct
import threading
from enum import StrEnum
from typing import Any, Final

FICLONE: Final = 0x40049409
FICLONERANGE: Final = 0x4020940D
FS_IOC_FIEMAP: Final = 0xC020660B
FIEMAP_FLAG_SYNC: Final = 1
FIEMAP_EXTENT_LAST: Final = 0x1
FIEMAP_EXTENT_SHARED: Final = 0x2000

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.syncfs.argtypes = [ctypes.c_int]
_libc.syscall.restype = ctypes.c_long

# errnos that mean "this pair of files cannot be cloned here": fall back to copying.
_NO_CLONE: Final = {
    errno.EOPNOTSUPP,
    errno.ENOTSUP,
    errno.EXDEV,
    errno.EINVAL,
    errno.ENOTTY,
    errno.ENOSYS,
    errno.EPERM,
    errno.ETXTBSY,
    errno.EBADF,
    errno.EISDIR,
}


class CopyMethod(StrEnum):
    """How a file's data reached its destination (reported per materialization)."""

    REFLINK = "reflink"
    COPY_FILE_RANGE = "copy_file_range"
    COPY = "copy"
    HARDLINK = "hardlink"
    INLINE = "inline"


def syncfs(fd: int) -> None:
    """Flush the whole filesystem that ``fd`` lives on: one call instead of a fsync per file."""
    if _libc.syncfs(fd) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"syncfs: {os.strerror(e)}")


_RENAME_NOREPLACE: Final = 1
_libc.renameat2.argtypes = [
    ctypes.c_int,
    ctypes.c_char_p,
    ctypes.c_int,
    ctypes.c_char_p,
    ctypes.c_uint,
]


_AT_FDCWD: Final = -100


def write_json_durable(path: str, doc: dict[str, Any], tag: str) -> None:
    """Replace ``path`` with ``doc`` as JSON: written to ``path.<tag>.tmp`` (``tag`` unique to
    the writer, e.g. its lease, so two processes never share a temporary), fsynced, renamed
    over ``path``.  A crash leaves the old file or the new one, never a torn one."""
    tmp = f"{path}.{tag}.tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)


def rename_noreplace(
    src: str, dst: str, *, src_dir_fd: int = _AT_FDCWD, dst_dir_fd: int = _AT_FDCWD
) -> None:
    """Atomically rename, failing with EEXIST instead of replacing an existing ``dst``.

    With directory descriptors the names are resolved relative to them (renameat2), so a
    directory swapped for a symlink after it was opened cannot redirect the rename."""
    if _libc.renameat2(
        src_dir_fd, os.fsencode(src), dst_dir_fd, os.fsencode(dst), _RENAME_NOREPLACE
    ):
        e = ctypes.get_errno()
        if e in (errno.ENOSYS, errno.EINVAL):
            try:
                os.lstat(dst, dir_fd=None if dst_dir_fd == _AT_FDCWD else dst_dir_fd)
            except FileNotFoundError:
                # old kernel or fs without RENAME_NOREPLACE: best effort
                os.rename(
                    src,
                    dst,
                    src_dir_fd=None if src_dir_fd == _AT_FDCWD else src_dir_fd,
                    dst_dir_fd=None if dst_dir_fd == _AT_FDCWD else dst_dir_fd,
                )
                return
            e = errno.EEXIST
        raise OSError(e, os.strerror(e), dst)


def try_ficlone(dst_fd: int, src_fd: int) -> bool:
    """Clone all of src into dst (O(1) in data size).  False if this fs pair cannot."""
    try:
        fcntl.ioctl(dst_fd, FICLONE, src_fd)
        return True
    except OSError as exc:
        if exc.errno in _NO_CLONE:
            return False
        raise


def clone_range(dst_fd: int, src_fd: int, src_offset: int, length: int, dst_offset: int) -> bool:
    """FICLONERANGE: share ``length`` bytes of src at ``src_offset`` into dst at ``dst_offset``.

    Offsets and length must be block-aligned (the kernel says EINVAL otherwise); False means
    "copy instead" (no reflink support, different filesystems, unaligned).
    """
    arg = struct.pack("=qQQQ", src_fd, src_offset, length, dst_offset)
    try:
        fcntl.ioctl(dst_fd, FICLONERANGE, arg)
        return True
    except OSError as exc:
        if exc.errno in _NO_CLONE:
            return False
        raise


def copy_range(dst_fd: int, src_fd: int, size: int) -> bool:
    """copy_file_range the whole of src; reflinks where the kernel can.  False if unsupported."""
    done = 0
    while done < size:
        try:
            n = os.copy_file_range(src_fd, dst_fd, size - done, done, done)
        except OSError as exc:
            if exc.errno in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL) and (
                done == 0
            ):
                return False
            raise
        if n == 0:
            raise OSError(errno.EIO, f"source shrank while copying ({done} of {size} bytes)")
        done += n
    return True


def plain_copy(dst_fd: int, src_fd: int, bufsize: int = 1 << 20) -> int:
    """read/write copy: the last resort, works everywhere."""
    total = 0
    os.lseek(src_fd, 0, os.SEEK_SET)
    while True:
        buf = os.read(src_fd, bufsize)
        if not buf:
            return total
        view = memoryview(buf)
        while view:
            n = os.write(dst_fd, view)
            view = view[n:]
        total += len(buf)


class Cloner:
    """Copies object data into new files with the cheapest method the fs pair allows.

    Remembers, per instance, a method that failed for lack of support so a materialization of
    100k files on ext4 does not try (and fail) FICLONE 100k times.  Counts what it used.
    """

    def __init__(self, allow_reflink: bool = True) -> None:
        self.reflink_ok = allow_reflink
        self.cfr_ok = True
        self.counts: dict[str, int] = {}
        self._lock = threading.Lock()

    def count(self, method: CopyMethod, n: int = 1) -> None:
        with self._lock:
            self.counts[method.value] = self.counts.get(method.value, 0) + n

    def clone(self, dst_fd: int, src_fd: int, size: int) -> CopyMethod:
        """Copy src into the empty dst; returns the method used (the caller counts)."""
        if size == 0:
            return CopyMethod.REFLINK if self.reflink_ok else CopyMethod.COPY
        if self.reflink_ok:
            if try_ficlone(dst_fd, src_fd):
                return CopyMethod.REFLINK
            self.reflink_ok = False
        if self.cfr_ok:
            if copy_range(dst_fd, src_fd, size):
                return CopyMethod.COPY_FILE_RANGE
            self.cfr_ok = False
        plain_copy(dst_fd, src_fd)
        return CopyMethod.COPY


def fiemap(fd: int, max_extents: int = 512) -> list[tuple[int, int, int, int]]:
    """Extents of a file as (logical, physical, length, flags); used to prove block sharing."""
    hdr = struct.Struct("=QQIIII")
    ext = struct.Struct("=QQQQQIIII")
    out: list[tuple[int, int, int, int]] = []
    start = 0
    while True:
        buf = bytearray(hdr.size + ext.size * max_extents)
        hdr.pack_into(buf, 0, start, (1 << 64) - 1 - start, FIEMAP_FLAG_SYNC, 0, max_extents, 0)
        fcntl.ioctl(fd, FS_IOC_FIEMAP, buf)
        mapped = hdr.unpack_from(buf, 0)[3]
        last = False
        for i in range(mapped):
            logical, physical, length, _r1, _r2, flags, *_ = ext.unpack_from(
                buf, hdr.size + i * ext.size
            )
            out.append((logical, physical, length, flags))
            start = logical + length
            last = bool(flags & FIEMAP_EXTENT_LAST)
        if mapped == 0 or last:
            return out


def shared_bytes(path: str) -> tuple[int, int]:
    """(bytes in extents flagged SHARED, bytes in all extents) of a file."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        extents = fiemap(fd)
    finally:
        os.close(fd)
    total = sum(e[2] for e in extents)
    shared = sum(e[2] for e in extents if e[3] & FIEMAP_EXTENT_SHARED)
    return shared, total


# -- openat2: resolve a path beneath a directory without following any symlink ------------
_SYS_OPENAT2: Final = 437
RESOLVE_NO_MAGICLINKS: Final = 0x02
RESOLVE_NO_SYMLINKS: Final = 0x04
RESOLVE_BENEATH: Final = 0x08


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_openat2_ok: bool | None = None


def open_beneath(dir_fd: int, path: str, flags: int, mode: int = 0) -> int:
    """Open ``path`` relative to ``dir_fd`` refusing symlinks in *every* component.

    Uses openat2(RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS) where the kernel has it (5.6+, one
    syscall); otherwise walks component by component with O_NOFOLLOW.  Either way a symlink
    planted in the tree being built cannot redirect a write outside it.
    """
    global _openat2_ok
    if _openat2_ok is not False:
        how = _OpenHow(flags | os.O_CLOEXEC, mode, RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)
        fd = _libc.syscall(
            _SYS_OPENAT2, dir_fd, os.fsencode(path), ctypes.byref(how), ctypes.sizeof(how)
        )
        if fd >= 0:
            _openat2_ok = True
            return int(fd)
        e = ctypes.get_errno()
        if e != errno.ENOSYS:
            raise OSError(e, os.strerror(e), path)
        _openat2_ok = False
    return _open_walk(dir_fd, path, flags, mode)


def _open_walk(dir_fd: int, path: str, flags: int, mode: int) -> int:
    parts = [p for p in path.split("/") if p and p != "."]
    if not parts:
        return os.open(".", flags | os.O_CLOEXEC, mode, dir_fd=dir_fd)
    cur = dir_fd
    try:
        for comp in parts[:-1]:
            nxt = os.open(
                comp, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=cur
            )
            if cur != dir_fd:
                os.close(cur)
            cur = nxt
        return os.open(parts[-1], flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=cur)
    finally:
        if cur != dir_fd:
            os.close(cur)
