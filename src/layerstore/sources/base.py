"""Byte-range sources: what a partial import reads from (a local blob, an HTTP blob URL).

A source knows nothing of the formats it carries; :mod:`layerstore.chunked.toc` decides which
ranges to read and :mod:`layerstore.ops.partial` what to fetch.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Final, Protocol

from ..errors import ChunkedError


class RangeSource(Protocol):
    """Anything a partial import can read byte ranges of: a local blob, an HTTP blob URL.

    ``read_ranges`` gets sorted, non-overlapping ``(start, end)`` half-open ranges and yields
    ``(offset, data)`` pieces covering each range completely and in order (pieces may be smaller
    than a range, never span two).  A registry source sends them as one multi-range request.
    """

    def size(self) -> int: ...

    def read_ranges(self, ranges: Sequence[tuple[int, int]]) -> Iterator[tuple[int, bytes]]: ...


class FileSource:
    """A local blob file as a :class:`RangeSource`; counts the bytes it hands out."""

    PIECE: Final = 4 << 20
    # A local file has no per-request cost worth merging ranges for (HTTP sources do).
    max_ranges: int = 1 << 30
    merge_gap: int = 0

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self._size = os.fstat(self.fd).st_size
        self.bytes_read = 0
        self.requests = 0

    def size(self) -> int:
        return self._size

    def read_ranges(self, ranges: Sequence[tuple[int, int]]) -> Iterator[tuple[int, bytes]]:
        self.requests += 1
        for a, b in ranges:
            if not 0 <= a <= b <= self._size:
                raise ChunkedError(f"range {a}-{b} lies outside the {self._size}-byte blob")
            while a < b:
                data = os.pread(self.fd, min(self.PIECE, b - a), a)
                if not data:
                    raise ChunkedError(f"{self.path}: blob shrank while reading at {a}")
                self.bytes_read += len(data)
                yield a, data
                a += len(data)

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> FileSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_range(source: RangeSource, a: int, b: int) -> bytes:
    return b"".join(d for _, d in source.read_ranges([(a, b)]))


def coalesce(
    ranges: Iterable[tuple[int, int]], gap: int = 1024, max_ranges: int = 1024
) -> list[tuple[int, int]]:
    """Merge ranges closer than ``gap`` bytes, then the closest until at most ``max_ranges``.

    Fewer, larger ranges cost a few wasted bytes and save round trips and per-range overhead
    (upstream uses the same two rules).  Input need not be sorted; overlaps are merged.
    """
    out: list[list[int]] = []
    for a, b in sorted(r for r in ranges if r[1] > r[0]):
        if out and a - out[-1][1] <= gap:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    if len(out) > max_ranges:
        # Merge across the smallest gaps until the count fits.
        by_size = sorted(range(len(out) - 1), key=lambda i: out[i + 1][0] - out[i][1])
        bridge = set(by_size[: len(out) - max_ranges])
        merged: list[list[int]] = [out[0]]
        for i in range(1, len(out)):
            if i - 1 in bridge:
                merged[-1][1] = out[i][1]
            else:
                merged.append(out[i])
        out = merged
    return [(a, b) for a, b in out]
