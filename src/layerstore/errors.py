"""The exception hierarchy of layerstore.

Every error a user can cause or meet derives from :class:`LayerstoreError`, so a caller (or the
CLI) can catch one class and print ``str(exc)``: messages name the thing that is wrong and, where
there is one, what to do about it.  Each subclass carries an ``exit_code`` that the CLI returns,
so scripts can tell "you gave me bad input" from "the store is damaged" without parsing text.
"""

from __future__ import annotations


class LayerstoreError(Exception):
    """Base class of every error layerstore raises on purpose."""

    exit_code = 1


class StoreError(LayerstoreError):
    """The store cannot be opened or used (missing, wrong format version, not writable)."""

    exit_code = 3


class FormatVersionError(StoreError):
    """The store was written by a different (usually newer) layerstore on-disk format."""


class NotFoundError(LayerstoreError):
    """A layer, image or object that was asked for is not in the store."""

    exit_code = 4


class AmbiguousError(LayerstoreError):
    """A short id prefix matches more than one layer."""

    exit_code = 4


class InvalidInputError(LayerstoreError):
    """The input (a tar stream, a directory, a manifest) is malformed or hostile.

    Raised before anything the input describes becomes visible in the store: the store is left
    exactly as it was, except for staging leftovers that gc removes.
    """

    exit_code = 2


class UnsafePathError(InvalidInputError):
    """An entry name escapes the layer root, or an entry would be written through a symlink."""


class SourceError(InvalidInputError):
    """The input could not be read: a URL whose server refuses or drops the connection, times
    out, redirects in a loop, or answers outside the bounds layerstore reads (exit 2, like any
    bad input; a separate class so a caller can tell a retryable network failure from a
    hostile blob)."""


class CorruptObjectError(LayerstoreError):
    """An object's content does not match its digest, or an object the index lists is missing."""

    exit_code = 5


class DestinationError(LayerstoreError):
    """A materialization target exists already or lies on an unusable filesystem."""

    exit_code = 6


class ConcurrencyError(LayerstoreError):
    """An operation could not complete because of concurrent work (e.g. gc holding a digest)."""

    exit_code = 7


class InUseError(LayerstoreError):
    """The thing to remove is still used (a layer by an image)."""

    exit_code = 9


class ChunkedError(InvalidInputError):
    """A zstd:chunked blob's footer, TOC, tar-split or ranges are malformed or lie."""
