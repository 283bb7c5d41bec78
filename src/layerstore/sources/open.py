"""Open a blob named by a path or an http(s) URL as a :class:`~.base.RangeSource`."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from .base import FileSource, RangeSource
from .http import HttpSource


@contextlib.contextmanager
def open_source(source: str | os.PathLike[str]) -> Iterator[tuple[RangeSource, str]]:
    """A blob path or an http(s) blob URL as an open :class:`RangeSource`, with the name an
    import records as its source."""
    if isinstance(source, str) and source.startswith(("http://", "https://")):
        with HttpSource(source) as hs:
            yield hs, source
    else:
        with FileSource(os.fspath(source)) as fs:
            yield fs, f"file:{os.path.abspath(source)}"
