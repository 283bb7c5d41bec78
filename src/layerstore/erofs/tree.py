"""The in-memory tree an EROFS image is written from: typed inodes, linked by name.

A directory maps names (bytes, as the kernel sees them) to inodes.  The same non-directory
object under two names *is* a hardlink: the writer gives it one inode and counts its links.
Every inode carries permission bits (``mode``, 0o7777: the type comes from the class), owner,
an mtime in nanoseconds since the epoch (negative: before 1970) and xattrs (name -> value,
bytes).

Regular files hold their bytes (``data``) or are *external*: ``size`` bytes whose content lives
elsewhere, named by ``redirect`` (a path inside the data directory an overlay mount reads it
from), optionally with the fs-verity digest of that content.  A whiteout is what overlayfs
means by one: a character device 0:0 (:func:`whiteout`).

The tree knows nothing of layerstore's store: :mod:`layerstore.ops.mount` builds one from
manifests, the tests build them by hand.
"""

from __future__ import annotations

from typing import Final

S_IFMT: Final = 0o170000
S_IFSOCK: Final = 0o140000
S_IFLNK: Final = 0o120000
S_IFREG: Final = 0o100000
S_IFBLK: Final = 0o060000
S_IFDIR: Final = 0o040000
S_IFCHR: Final = 0o020000
S_IFIFO: Final = 0o010000


class Inode:
    """Metadata every inode has.  Subclasses give the type (``IFMT``) and the content."""

    __slots__ = ("gid", "mode", "mtime_ns", "uid", "xattrs")
    IFMT = 0

    def __init__(
        self,
        mode: int,
        uid: int = 0,
        gid: int = 0,
        mtime_ns: int = 0,
        xattrs: dict[bytes, bytes] | None = None,
    ) -> None:
        self.mode = mode & 0o7777
        self.uid = uid
        self.gid = gid
        self.mtime_ns = mtime_ns
        self.xattrs: dict[bytes, bytes] = xattrs if xattrs is not None else {}

    @property
    def st_mode(self) -> int:
        return self.IFMT | self.mode


class Dir(Inode):
    __slots__ = ("entries",)
    IFMT = S_IFDIR

    def __init__(self, mode: int = 0o755, **kw: object) -> None:
        super().__init__(mode, **kw)  # type: ignore[arg-type]
        self.entries: dict[bytes, Inode] = {}

    def add(self, name: bytes | str, inode: Inode) -> Inode:
        """Link ``inode`` as ``name`` (replacing what was there); returns it."""
        if isinstance(name, str):
            name = name.encode("utf-8", "surrogateescape")
        self.entries[name] = inode
        return inode


class File(Inode):
    """A regular file: ``data`` (its bytes) or external (``redirect``, ``size``, ``verity``)."""

    __slots__ = ("data", "redirect", "size", "verity")
    IFMT = S_IFREG

    def __init__(
        self,
        mode: int = 0o644,
        *,
        data: bytes | None = None,
        size: int | None = None,
        redirect: bytes | None = None,
        verity: bytes | None = None,
        **kw: object,
    ) -> None:
        super().__init__(mode, **kw)  # type: ignore[arg-type]
        if data is None and size is None:
            data = b""
        self.data = data
        self.size = len(data) if data is not None else int(size or 0)
        self.redirect = redirect
        self.verity = verity


class Symlink(Inode):
    __slots__ = ("target",)
    IFMT = S_IFLNK

    def __init__(self, target: bytes | str, mode: int = 0o777, **kw: object) -> None:
        super().__init__(mode, **kw)  # type: ignore[arg-type]
        if isinstance(target, str):
            target = target.encode("utf-8", "surrogateescape")
        self.target = target


class Device(Inode):
    """A character (``block=False``) or block device."""

    __slots__ = ("block", "major", "minor")

    def __init__(
        self, major: int, minor: int, *, block: bool = False, mode: int = 0o600, **kw: object
    ) -> None:
        super().__init__(mode, **kw)  # type: ignore[arg-type]
        self.major = major
        self.minor = minor
        self.block = block

    @property
    def st_mode(self) -> int:
        return (S_IFBLK if self.block else S_IFCHR) | self.mode


class Fifo(Inode):
    __slots__ = ()
    IFMT = S_IFIFO


class Socket(Inode):
    __slots__ = ()
    IFMT = S_IFSOCK


def whiteout(**kw: object) -> Device:
    """An overlay whiteout: a character device 0:0."""
    return Device(0, 0, **kw)  # type: ignore[arg-type]


def is_whiteout(inode: Inode) -> bool:
    return isinstance(inode, Device) and not inode.block and inode.major == inode.minor == 0


def walk(root: Dir, prefix: bytes = b"") -> list[tuple[bytes, Inode]]:
    """Every (path, inode) below ``root``, depth first, names sorted; the root is ``b"."``."""
    out: list[tuple[bytes, Inode]] = [(prefix or b".", root)]
    stack: list[tuple[bytes, Dir]] = [(prefix, root)]
    while stack:
        path, d = stack.pop()
        subdirs = []
        for name in sorted(d.entries):
            child = d.entries[name]
            p = path + b"/" + name if path else name
            out.append((p, child))
            if isinstance(child, Dir):
                subdirs.append((p, child))
        stack.extend(reversed(subdirs))
    return out
