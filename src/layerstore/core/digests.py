"""Digests: blake3 names objects, sha256 is what OCI speaks.

Objects are named by blake3 (fast, and tree-hashed so large files can be hashed on several
cores); every object also records its sha256 because OCI manifests, DiffIDs and zstd:chunked TOCs
identify content by sha256 and a pull must be able to ask "do we have sha256:X?" in one lookup.
Inside the index digests are raw 32-byte strings; on disk and in user-facing text they are lower
case hex (``blake3:`` / ``sha256:`` prefixed where the algorithm is not obvious from context).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from typing import Final

import blake3 as _blake3

from ..errors import InvalidInputError

DIGEST_SIZE: Final = 32
# Hashing below this size is not worth a thread hop; above it blake3 can use its own threads.
_BLAKE3_MT_THRESHOLD: Final = 4 << 20


class DualHasher:
    """Computes blake3 and sha256 of the same byte stream in one pass over it."""

    __slots__ = ("_b3", "_sha", "size")

    def __init__(self, size_hint: int = 0) -> None:
        # blake3's own threads only pay off for large inputs.
        threads = _blake3.blake3.AUTO if size_hint >= _BLAKE3_MT_THRESHOLD else 1
        self._b3 = _blake3.blake3(max_threads=threads)
        self._sha = hashlib.sha256()
        self.size = 0

    def update(self, data: bytes | bytearray | memoryview) -> None:
        """Feed more bytes; both hashes release the GIL for large buffers."""
        self._b3.update(data)
        self._sha.update(data)
        self.size += len(data)

    def blake3(self) -> bytes:
        return self._b3.digest()

    def sha256(self) -> bytes:
        return self._sha.digest()


def blake3_of(data: bytes | bytearray | memoryview) -> bytes:
    """blake3 of an in-memory buffer (32 raw bytes); multi-threaded for large buffers."""
    if len(data) >= _BLAKE3_MT_THRESHOLD:
        return _blake3.blake3(data, max_threads=_blake3.blake3.AUTO).digest()
    return _blake3.blake3(data).digest()


def sha256_of(data: bytes | bytearray | memoryview) -> bytes:
    """sha256 of an in-memory buffer (32 raw bytes)."""
    return hashlib.sha256(data).digest()


_HEX: Final = frozenset("0123456789abcdef")


def is_hex_name(name: str, length: int = 64) -> bool:
    """Is ``name`` exactly ``length`` lowercase hex digits -- the name of an object (64), a
    fan-out directory (2)?  Directory walks use it to tell store files from anything else."""
    return len(name) == length and _HEX.issuperset(name)


def parse_hex(text: str, algo: str = "") -> bytes:
    """Parse ``hex`` or ``algo:hex`` into 32 raw bytes, with an error a user can act on."""
    if ":" in text:
        prefix, _, text = text.partition(":")
        if algo and prefix != algo:
            raise InvalidInputError(f"expected a {algo} digest, got {prefix}:{text}")
    if len(text) != 2 * DIGEST_SIZE:
        raise InvalidInputError(f"a digest is {2 * DIGEST_SIZE} hex characters, got {text!r}")
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise InvalidInputError(f"not a hex digest: {text!r}") from None


class DigestSet:
    """An exact set of 32-byte digests in one flat bytearray (open addressing).

    An import of a million-file layer pins up to a million objects; a Python ``set`` of them
    would be a million bytes objects (~90 MB).  This keeps 64 bytes per digest in one buffer.
    """

    __slots__ = ("_t", "_mask", "_n")
    _EMPTY = bytes(32)

    def __init__(self, capacity: int = 1024) -> None:
        size = 1
        while size < capacity * 2:
            size <<= 1
        self._t = bytearray(32 * size)
        self._mask = size - 1
        self._n = 0

    def __len__(self) -> int:
        return self._n

    def _slot(self, d: bytes) -> tuple[int, bool]:
        t, m = self._t, self._mask
        i = int.from_bytes(d[:8], "little") & m
        while True:
            cur = t[32 * i : 32 * i + 32]
            if cur == d:
                return i, True
            if cur == self._EMPTY:
                return i, False
            i = (i + 1) & m

    def __contains__(self, d: bytes) -> bool:
        if d == self._EMPTY:
            raise ValueError("the all-zero digest cannot be stored")
        return self._slot(d)[1]

    def add(self, d: bytes) -> None:
        if (self._n + 1) * 2 > len(self._t) // 32:
            self._grow()
        i, found = self._slot(d)
        if not found:
            self._t[32 * i : 32 * i + 32] = d
            self._n += 1

    def update(self, items: Iterable[bytes]) -> None:
        for d in items:
            self.add(d)

    def __iter__(self) -> Iterator[bytes]:
        t = self._t
        for i in range(len(t) // 32):
            cur = bytes(t[32 * i : 32 * i + 32])
            if cur != self._EMPTY:
                yield cur

    def clear(self) -> None:
        self.__init__()  # type: ignore[misc]

    def _grow(self) -> None:
        old = list(self)
        size = 2 * (self._mask + 1)
        self._t = bytearray(32 * size)
        self._mask = size - 1
        self._n = 0
        for d in old:
            self.add(d)
