"""Entry-name normalization and a compact path set.

Tar names are untrusted.  The rule, applied identically to entry names and hardlink targets:

* a leading ``/`` and ``./`` components are dropped (what GNU tar does: a documented, safe
  normalization -- the entry stays inside the layer);
* ``..`` anywhere is refused (:class:`UnsafePathError`): no normalization can make its meaning
  inside the layer certain once symlinks are involved;
* empty names, NUL bytes, names over 4096 bytes or components over 255 bytes are refused;
* a component ``.wh.``, ``.wh..`` or ``.wh...`` is refused: as a file it would be the overlay
  whiteout of the empty name, of ``.`` or of ``..`` -- the directory itself or its parent, i.e.
  a path outside the entry's directory.  No real layer has such a name; a hostile one uses it
  to make a flattening materialize delete the destination's parent (issue 11).

The layer root itself is the path ``"."``.
"""

from __future__ import annotations

from array import array
from typing import Final

from ..errors import UnsafePathError

PATH_MAX: Final = 4096
NAME_MAX: Final = 255

WHITEOUT_PREFIX: Final = ".wh."
OPAQUE_MARKER: Final = ".wh..wh..opq"
# Components whose whiteout target is not a name inside their directory.
_BAD_WHITEOUTS: Final = frozenset((".wh.", ".wh..", ".wh..."))


def normalize(name: str, what: str = "entry") -> str:
    """Return the normalized relative path of a tar name, or raise UnsafePathError."""
    if "\x00" in name:
        raise UnsafePathError(f"{what} name {name!r} contains a NUL byte")
    parts = []
    for comp in name.split("/"):
        if comp in ("", "."):
            continue
        if comp == "..":
            raise UnsafePathError(
                f"{what} name {name!r} contains '..'; layers may not refer outside their root"
            )
        if comp in _BAD_WHITEOUTS:
            raise UnsafePathError(
                f"{what} name {name!r} contains {comp!r}: a whiteout of "
                f"{comp[len(WHITEOUT_PREFIX) :]!r} would hide a path outside its directory"
            )
        if len(comp.encode("utf-8", "surrogateescape")) > NAME_MAX:
            raise UnsafePathError(f"{what} name {name!r} has a component over {NAME_MAX} bytes")
        parts.append(comp)
    path = "/".join(parts) or "."
    if len(path.encode("utf-8", "surrogateescape")) > PATH_MAX:
        raise UnsafePathError(f"{what} name {name[:80]!r}... is longer than {PATH_MAX} bytes")
    return path


def whiteout_target(path: str) -> str | None:
    """The name a whiteout entry at ``path`` hides in its directory, or None.

    ``.wh.NAME`` hides ``NAME``; the opaque marker ``.wh..wh..opq`` returns ``""`` (it hides
    the whole directory's lower contents).  A target that is not a single name inside the
    directory (empty, ``.``, ``..``, or with a ``/``) raises UnsafePathError: the import refuses
    such names already (:func:`normalize`), and materialization checks again because a
    manifest may come from an older version that did not.
    """
    base = path.rpartition("/")[2]
    if not base.startswith(WHITEOUT_PREFIX):
        return None
    if base == OPAQUE_MARKER:
        return ""
    target = base[len(WHITEOUT_PREFIX) :]
    if target in ("", ".", "..") or "/" in target or "\x00" in target:
        raise UnsafePathError(
            f"whiteout {path!r} would hide {target!r}, which is not a name inside its directory"
        )
    return target


def parent(path: str) -> str:
    i = path.rfind("/")
    return "." if i < 0 else path[:i]


def ancestors(path: str) -> list[str]:
    """Proper ancestors of a normalized path, outermost first, excluding ".": a/b/c -> [a, a/b]."""
    out = []
    i = path.find("/")
    while i >= 0:
        out.append(path[:i])
        i = path.find("/", i + 1)
    return out


class PathSet:
    """A set of paths stored as 64-bit hashes in one flat array (open addressing).

    Validating a layer needs "have we seen this path?" for every entry.  A Python ``set`` of a
    million strings costs ~100 MB and a million objects; this costs 16 bytes per path in one
    array.  A false positive needs a 64-bit collision among the layer's paths (~1e-8 for 1M).
    """

    __slots__ = ("_table", "_mask", "_count")

    def __init__(self, capacity: int = 1024) -> None:
        size = 1
        while size < capacity * 2:
            size <<= 1
        self._table = array("Q", bytes(8 * size))
        self._mask = size - 1
        self._count = 0

    @staticmethod
    def _key(path: str) -> int:
        # Python's own 64-bit string hash (SipHash, keyed per process): fast, and a set only
        # lives for one import, so per-process keying is fine.
        return (hash(path) & 0xFFFFFFFFFFFFFFFF) or 1  # 0 marks an empty slot

    def __len__(self) -> int:
        return self._count

    def add(self, path: str) -> bool:
        """Add; returns True if the path was new."""
        if (self._count + 1) * 2 > len(self._table):
            self._grow()
        return self._insert(self._key(path))

    def _insert(self, key: int) -> bool:
        t, m = self._table, self._mask
        i = key & m
        while True:
            v = t[i]
            if v == 0:
                t[i] = key
                self._count += 1
                return True
            if v == key:
                return False
            i = (i + 1) & m

    def __contains__(self, path: str) -> bool:
        key = self._key(path)
        t, m = self._table, self._mask
        i = key & m
        while True:
            v = t[i]
            if v == 0:
                return False
            if v == key:
                return True
            i = (i + 1) & m

    def _grow(self) -> None:
        old = self._table
        self._table = array("Q", bytes(16 * len(old)))
        self._mask = 2 * len(old) - 1
        self._count = 0
        for v in old:
            if v:
                self._insert(v)
