"""A strict, streaming tar reader (ustar, GNU and PAX, including GNU sparse files).

Why not ``tarfile``: its stream mode copies every payload byte through several buffers, keeps a
list of every member, stops quietly on truncated or garbage headers, and hides the raw header
bytes.  Layers are untrusted and large, so this reader is written for that job:

* one pass, bounded memory, payload handed out in large slices;
* every header checksum verified, every number parsed strictly (octal or GNU base-256);
* truncation anywhere -- inside a header, a PAX record, a payload or its padding -- is an
  error, and the archive must end with a zero block;
* PAX extended/global headers, GNU long names/links (``L``/``K``), GNU old sparse (``S``) and
  PAX sparse formats 0.0, 0.1 and 1.0 are understood; sparse files are expanded (holes read as
  zeros), which is what ``tar -x`` produces.

Where tar writers disagree, GNU tar is the oracle: the tree a layer gives must be the tree
``tar -x`` gives for the same bytes, never a different one in silence (docs/format.md, "Tar
dialects").  So only regular files (and the few metadata types that have a body) carry data:
the size field of a link, symlink, device, fifo or directory is ignored as GNU tar, libarchive
and Go ignore it; an old-style entry whose name ends in ``/`` is a directory; a GNU volume label
is skipped; a Solaris ACL header is skipped when the entry it describes follows; a malformed
PAX ``mtime`` falls back to the header's (with a warning in :attr:`TarReader.warnings`).

Names are returned as ``str`` decoded UTF-8 with ``surrogateescape``: the original bytes of a
non-UTF-8 name survive a round trip through ``os`` functions.
"""

from __future__ import annotations

import base64
import re
import urllib.parse
from collections.abc import Iterator
from typing import Any, Final

from ..errors import InvalidInputError

BLOCK: Final = 512
# Caps that separate "large" from "hostile" for metadata held in memory.
MAX_META: Final = 16 << 20  # one PAX header or GNU long name
MAX_SPARSE_ENTRIES: Final = 1 << 20
# Bytes after the end-of-archive block: tar writers add the second zero block and pad to their
# record size (GNU tar and bsdtar: 10 KiB; a blocking factor of 2048 is 1 MiB).  More than this
# is no tar writer's output but a decompression bomb's (zeros compress to nothing), which the
# DiffID, the tar-split and an export would otherwise carry to the last byte.
MAX_TRAILING: Final = 1 << 20

REGTYPES: Final = (b"0", b"\x00", b"7")
# Types that never carry data, whatever their size field says (GNU tar, libarchive and Go all
# read the next header right after them; see the module docstring).
NODATA_TYPES: Final = (b"1", b"2", b"3", b"4", b"5", b"6")
# Warnings kept per stream (the rest are only counted): bounded memory for hostile input.
MAX_WARNINGS: Final = 100


class TarMember:
    __slots__ = (
        "name",
        "type",
        "mode",
        "uid",
        "gid",
        "mtime_ns",
        "size",
        "linkname",
        "devmajor",
        "devminor",
        "xattrs",
        "sparse",
        "stored",
    )

    def __init__(self) -> None:
        self.name = ""
        self.type = b"0"
        self.mode = 0
        self.uid = 0
        self.gid = 0
        self.mtime_ns = 0
        self.size = 0  # logical (expanded) size of a regular file
        self.linkname = ""
        self.devmajor = 0
        self.devminor = 0
        self.xattrs: dict[str, bytes] = {}
        self.sparse: list[tuple[int, int]] | None = None
        self.stored = 0  # payload bytes in the archive

    def isreg(self) -> bool:
        return self.type in REGTYPES


def _dec(b: bytes) -> str:
    return b.decode("utf-8", "surrogateescape")


def _field_str(b: bytes) -> bytes:
    i = b.find(b"\x00")
    return b if i < 0 else b[:i]


# The bytes GNU tar's from_header() skips before a number and accepts after one (C isspace).
_SPACE: Final = frozenset(b" \t\n\v\f\r")
_PAX_INT: Final = re.compile(rb"[ \t\n\v\f\r]*\+?([0-9]+)")
_PAX_TIME: Final = re.compile(rb"(-?)([0-9]+)(?:\.([0-9]*))?")


def _num(b: bytes, what: str, octal_only: bool = False) -> int:
    """A numeric header field, read exactly as GNU tar's ``from_header`` reads it.

    One leading NUL is skipped ("buggy tar of unknown vintage" writing a NUL when the previous
    field overflowed), then blanks; then octal digits, or GNU base-256 (a first byte of 0x80,
    or 0xFF for a negative number), or nothing (an empty field: 0).  What follows the number
    must be the end of the field, a NUL or a blank -- anything after that is ignored, so
    ``"12 34"`` is 10.  Everything GNU tar reports as an error is refused, so the value is
    never one ``tar -x`` would not use: a field of nothing but blanks ("Blanks in header"),
    other bytes after the digits, a base-256 marker other than 0x80/0xFF.  A leading sign is
    refused too: GNU tar reads it as the obsolete base-64 of tar 1.13.6-1.13.11 (1999), a
    dialect no layer writer uses.  ``octal_only`` (the checksum) admits no base-256.
    """
    n = len(b)
    i = 1 if b[:1] == b"\x00" else 0
    while i < n and b[i] in _SPACE:
        i += 1
    if i == n:
        raise InvalidInputError(
            f"tar header field {what} is blank: {b!r} (GNU tar: 'Blanks in header')"
        )
    c = b[i]
    end = i
    value = 0
    if 0x30 <= c <= 0x37:
        while end < n and 0x30 <= b[end] <= 0x37:
            end += 1
        value = int(b[i:end], 8)
    elif octal_only:
        pass
    elif c in b"+-":
        raise InvalidInputError(
            f"tar header field {what} is not an octal number: {b!r} (a sign: GNU tar's "
            "obsolete base-64 of 1999, not a number any layer writer writes)"
        )
    elif c in (0x80, 0xFF) and i <= n - 2:
        return _num256(b[i:])
    if end != n and b[end] != 0 and b[end] not in _SPACE:
        raise InvalidInputError(f"tar header field {what} is not an octal number: {b!r}")
    return value


def _num256(b: bytes) -> int:
    """GNU base-256: big-endian binary after the marker byte 0x80; 0xFF marks a negative
    value (two's complement over the whole field)."""
    if b[0] == 0xFF:
        return int.from_bytes(b, "big") - (1 << (8 * len(b)))
    return int.from_bytes(b[1:], "big")


_ZERO_BLOCK: Final = bytes(BLOCK)


def _checksum_ok(h: bytes) -> bool:
    try:  # (a checksum field GNU tar cannot read is a bad header to it, not another error)
        stored = _num(h[148:156], "chksum", octal_only=True)
    except InvalidInputError:
        return False
    unsigned = sum(h) - sum(h[148:156]) + 8 * 32  # the field itself counts as spaces
    if stored == unsigned:
        return True
    signed = sum((c - 256 if c > 127 else c) for c in h[:148] + b" " * 8 + h[156:])
    return stored == signed


def _parse_pax(data: bytes) -> dict[str, bytes]:
    """PAX records "LEN key=value\\n"; values stay bytes (xattrs may be binary)."""
    out: dict[str, bytes] = {}
    pos = 0
    n = len(data)
    while pos < n:
        if data[pos] == 0:  # some writers pad with NULs
            break
        sp = data.find(b" ", pos)
        if sp < 0:
            raise InvalidInputError("PAX header record has no length")
        if not data[pos:sp].isdigit() or sp - pos > 9:
            raise InvalidInputError(f"PAX header record length {data[pos:sp]!r} is bad")
        length = int(data[pos:sp])
        end = pos + length
        if length <= sp - pos + 1 or end > n or data[end - 1 : end] != b"\n":
            raise InvalidInputError("PAX header record is malformed or truncated")
        rec = data[sp + 1 : end - 1]
        eq = rec.find(b"=")
        if eq <= 0:
            raise InvalidInputError("PAX header record has no key")
        key = rec[:eq].decode("utf-8", "surrogateescape")
        if key.startswith("GNU.sparse.") and key in ("GNU.sparse.offset", "GNU.sparse.numbytes"):
            # format 0.0 repeats these keys: keep them all, in order
            prev = out.get("GNU.sparse.map0", b"")
            out["GNU.sparse.map0"] = prev + (b"," if prev else b"") + rec[eq + 1 :]
        else:
            out[key] = rec[eq + 1 :]
        pos = end
    return out


def _pax_int(v: bytes, key: str) -> int:
    """A decimal PAX number, read as GNU tar reads it (strtoumax: leading blanks and ``+``)."""
    m = _PAX_INT.fullmatch(v)
    if m is None or len(m.group(1)) > 4000:  # (Python refuses longer digit strings anyway)
        raise InvalidInputError(f"PAX {key}={v[:40]!r} is not a non-negative integer")
    return int(m.group(1))


def _pax_time_ns(v: bytes) -> int | None:
    """A PAX time in nanoseconds, as GNU tar reads it; ``None`` if it is not a number.

    GNU tar takes the longest prefix of the form ``-?DIGITS[.DIGITS]`` (so ``12.5x`` is 12.5
    and ``1e5`` is 1), drops fraction digits past the ninth rounding toward minus infinity,
    and ignores a value with no such prefix (warning "Malformed extended header").  Matching
    it exactly is what keeps the tree equal to ``tar -x``'s.
    """
    m = _PAX_TIME.match(v)
    if m is None:
        return None
    neg, whole, frac = m.group(1), m.group(2), m.group(3) or b""
    if len(whole) > 30:
        return 1 << 70  # far out of range: refused by the importer's range check
    ns = int(whole) * 1_000_000_000 + int(frac[:9].ljust(9, b"0"))
    if neg:
        ns = -ns
        if frac[9:].strip(b"0"):
            ns -= 1  # floor, as GNU tar rounds
    return ns


def _entry_name(h: bytes, pax: dict[str, bytes], longname: bytes | None) -> bytes:
    """An entry's name: PAX ``path``, else a GNU long name, else the header's (with the
    POSIX ustar prefix)."""
    if "path" in pax:
        return pax["path"]
    if longname is not None:
        return longname
    name = _field_str(h[0:100])
    if h[257:263] == b"ustar\x00":  # POSIX ustar: prefix field
        prefix = _field_str(h[345:500])
        if prefix:
            name = prefix + b"/" + name
    return name


def _acl_alone(acl: bytes, nxt: bytes | None) -> InvalidInputError:
    what = "the end of the archive" if nxt is None else f"entry {_dec(nxt)!r}"
    return InvalidInputError(
        f"Solaris ACL header {_dec(acl)!r} is followed by {what}, not by the entry it "
        "describes (GNU tar would extract the ACL as a file of that name); refused"
    )


def _norm_name(name: bytes) -> bytes:
    """A tar name without empty and ``.`` components (to compare two names for one entry)."""
    return b"/".join(c for c in name.split(b"/") if c not in (b"", b"."))


class TarReader:
    """Iterate members of a tar stream; read each regular file's data with :meth:`read`."""

    def __init__(self, src: Any, recorder: Any = None) -> None:
        self.src = src
        # A TarSplitWriter (or None): told about every byte consumed, as raw bytes or as a
        # range of the current member's content, so the exact tar can be rebuilt later.
        self.rec = recorder
        self._buf = b""
        self._pos = 0
        self.offset = 0  # bytes consumed from the stream
        self._left = 0  # payload bytes of the current member not yet read (stored bytes)
        self._pad = 0
        self._sparse: list[tuple[int, int]] | None = None
        self._logical_left = 0
        self._logical_pos = 0
        self._global: dict[str, bytes] = {}
        # What was accepted but differs from a strict reading (a malformed PAX mtime, a
        # Solaris ACL skipped): the first MAX_WARNINGS messages, and how many there were.
        self.warnings: list[str] = []
        self.warning_count = 0
        # The last entry, if it was a non-file with a nonzero size (ignored): named in the
        # error if the next block turns out not to be a header.
        self._sized_nodata: str | None = None

    def _warn(self, msg: str) -> None:
        self.warning_count += 1
        if len(self.warnings) < MAX_WARNINGS:
            self.warnings.append(msg)

    # low-level --------------------------------------------------------------------------------
    def _fill(self, n: int) -> None:
        have = len(self._buf) - self._pos
        if have >= n:
            return
        if not have:  # the common case: no leftover to join (no copy of the new chunk)
            chunk = self.src.read(max(n, 1 << 20))
            if len(chunk) >= n:
                self._buf = chunk
                self._pos = 0
                return
            self._buf, self._pos, have = chunk, 0, len(chunk)
            if not chunk:
                return
        parts = [self._buf[self._pos :]]
        while have < n:
            chunk = self.src.read(max(n - have, 1 << 20))
            if not chunk:
                break
            parts.append(chunk)
            have += len(chunk)
        self._buf = b"".join(parts)
        self._pos = 0

    def _take(self, n: int, what: str) -> bytes:
        self._fill(n)
        if len(self._buf) - self._pos < n:
            raise InvalidInputError(f"tar stream is truncated inside {what}")
        b = self._buf[self._pos : self._pos + n]
        self._pos += n
        self.offset += n
        if self.rec is not None:
            self.rec.raw(b)
        return b

    def _take_upto(self, n: int) -> bytes:
        """Up to n payload bytes without copying more than needed (large reads pass through)."""
        if self._pos < len(self._buf):
            b = self._buf[self._pos : self._pos + n]
            self._pos += len(b)
        else:
            b = self.src.read(n)
        self.offset += len(b)
        return b

    def _skip(self, n: int, what: str) -> None:
        while n:
            b = self._take_upto(min(n, 1 << 20))
            if not b:
                raise InvalidInputError(f"tar stream is truncated inside {what}")
            if self.rec is not None:
                self.rec.raw(b)
            n -= len(b)

    def drain_rest(self, limit: int | None = MAX_TRAILING) -> None:
        """Consume whatever follows the end-of-archive block (recorded: it is in the DiffID).

        More than ``limit`` bytes there is refused (``None``: no limit, for a layer already
        in the store)."""
        left = limit
        while True:
            b = self._take_upto(1 << 20 if left is None else min(1 << 20, left + 1))
            if not b:
                return
            if left is not None:
                left -= len(b)
                if left < 0:
                    raise InvalidInputError(
                        f"the tar stream goes on for more than {limit} bytes after its "
                        "end-of-archive block (tar writers add at most a record of padding "
                        "there): refused as corrupt or a decompression bomb"
                    )
            if self.rec is not None:
                self.rec.raw(b)

    # members ----------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[TarMember]:
        while True:
            m = self.next()
            if m is None:
                return
            yield m

    def next(self) -> TarMember | None:
        # finish the previous member's payload and padding
        if self._left or self._logical_left:
            self._skip_rest()
        if self._pad:
            self._skip(self._pad, "member padding")
            self._pad = 0
        pax: dict[str, bytes] = {}
        longname: bytes | None = None
        longlink: bytes | None = None
        acl_for: bytes | None = None  # the name a Solaris ACL header just described
        while True:
            self._fill(BLOCK)
            if len(self._buf) - self._pos == 0:
                raise InvalidInputError(
                    f"tar stream ends at byte {self.offset} without an end-of-archive block "
                    "(truncated)"
                )
            h = self._take(BLOCK, "a header")
            at = self.offset - BLOCK
            if h == _ZERO_BLOCK:
                if acl_for is not None:
                    raise _acl_alone(acl_for, None)
                return None  # end of archive (a second zero block, if any, is trailing data)
            if not _checksum_ok(h):
                hint = ""
                if self._sized_nodata is not None:
                    # e.g. a pax "hardlink with data": GNU tar reads that data as a header too
                    hint = (
                        f"; the entry before it, {self._sized_nodata!r}, is not a file but has "
                        "a size: an archive that stores data for such entries is not supported"
                    )
                raise InvalidInputError(
                    f"tar header at byte {at} has a bad checksum (corrupt){hint}"
                )
            self._sized_nodata = None
            typ = h[156:157]
            size = _num(h[124:136], f"size of the header at byte {at}")
            if size < 0:
                raise InvalidInputError(f"tar header at byte {at} has a negative size")
            if typ in (b"x", b"X", b"g", b"L", b"K"):  # "X": Solaris' name for "x"
                if size > MAX_META:
                    raise InvalidInputError(f"tar metadata header of {size} bytes is implausible")
                data = self._take(size, "a PAX/GNU long-name header")
                self._skip((-size) % BLOCK, "header padding")
                if typ in (b"x", b"X"):
                    pax.update(_parse_pax(data))
                elif typ == b"g":
                    self._global.update(_parse_pax(data))
                elif typ == b"L":
                    longname = _field_str(data)
                else:
                    longlink = _field_str(data)
                continue
            if typ in (b"V", b"A"):
                # Not entries, but headers with a body that GNU tar reads past: a volume label
                # (skipped without a word) and a Solaris ACL for the entry that follows (GNU
                # tar extracts it as a file that entry then replaces; layers carry no ACLs).
                name = _entry_name(h, {**self._global, **pax}, longname)
                self._skip(size + (-size) % BLOCK, "a volume label or ACL header")
                if typ == b"A":
                    if acl_for is not None:
                        raise _acl_alone(acl_for, name)
                    acl_for = name
                pax, longname, longlink = {}, None, None
                continue
            if typ in (b"M", b"N"):
                raise InvalidInputError(
                    f"tar entry type {typ!r} (multi-volume continuation / old GNU names) "
                    "is not a layer entry"
                )
            if self.rec is not None:
                self.rec.entry += 1
            m = self._member(h, typ, size, {**self._global, **pax}, longname, longlink)
            if acl_for is not None:
                if _norm_name(acl_for) != _norm_name(m.name.encode("utf-8", "surrogateescape")):
                    raise _acl_alone(acl_for, m.name.encode("utf-8", "surrogateescape"))
                self._warn(
                    f"entry {m.name!r}: its Solaris ACL (tar type 'A') was ignored; "
                    "layers carry no ACLs"
                )
            return m

    def _member(
        self,
        h: bytes,
        typ: bytes,
        size: int,
        pax: dict[str, bytes],
        longname: bytes | None,
        longlink: bytes | None,
    ) -> TarMember:
        m = TarMember()
        name = _entry_name(h, pax, longname)
        shown = _dec(name)
        link = _field_str(h[157:257]) if longlink is None else longlink
        m.type = b"0" if typ == b"\x00" else typ
        m.mode = _num(h[100:108], f"mode of entry {shown!r}") & 0o7777
        m.uid = _num(h[108:116], f"uid of entry {shown!r}")
        m.gid = _num(h[116:124], f"gid of entry {shown!r}")
        m.mtime_ns = _num(h[136:148], f"mtime of entry {shown!r}") * 1_000_000_000
        if typ in (b"3", b"4"):  # only devices have them (GNU tar reads them for no other)
            m.devmajor = _num(h[329:337], f"devmajor of entry {shown!r}")
            m.devminor = _num(h[337:345], f"devminor of entry {shown!r}")
        m.stored = size
        m.size = size
        for key, v in pax.items():
            if key == "linkpath":
                link = v
            elif key == "size":
                m.stored = m.size = _pax_int(v, key)
            elif key == "uid":
                m.uid = _pax_int(v, key)
            elif key == "gid":
                m.gid = _pax_int(v, key)
            elif key == "mtime":
                t = _pax_time_ns(v)
                if t is None:
                    self._warn(
                        f"entry {shown!r}: PAX mtime {v[:40]!r} is not a number; the "
                        "header's mtime was used (as GNU tar does)"
                    )
                else:
                    m.mtime_ns = t
            elif key.startswith("SCHILY.xattr."):
                m.xattrs[key[13:]] = v
            elif key.startswith("LIBARCHIVE.xattr."):
                xname = urllib.parse.unquote(key[17:])
                try:
                    m.xattrs.setdefault(xname, base64.b64decode(v + b"=" * (-len(v) % 4)))
                except ValueError:
                    raise InvalidInputError(f"bad base64 in PAX {key}") from None
        pax_sparse = (
            "GNU.sparse.major" in pax or "GNU.sparse.map" in pax or "GNU.sparse.map0" in pax
        )
        if pax_sparse and "GNU.sparse.name" in pax:
            name = pax["GNU.sparse.name"]
        # Which entries have a body is decided as GNU tar decides it: only regular files
        # (and a GNU dumpdir's listing).  A pre-POSIX writer marked a directory by the
        # trailing slash of a regular-typed entry ("name/", type NUL); its size is ignored
        # like that of every other non-file.
        # (GNU tar asks gnulib's strip_trailing_slashes, for which the name "/" alone has
        # no trailing slash: it is a file named "/", i.e. ".", which tar -x fails to create.)
        no_data = typ in NODATA_TYPES
        if m.type in REGTYPES and name.endswith(b"/") and name != b"/":
            m.type = b"5"
            no_data = True
        if pax_sparse and m.type not in REGTYPES:
            raise InvalidInputError(f"entry {shown!r} has PAX sparse keys but is not a file")
        if typ == b"S":
            self._gnu_old_sparse(h, m)
        elif pax_sparse:
            self._pax_sparse(pax, m)
        m.name = _dec(name)
        m.linkname = _dec(link)
        if no_data:
            if m.stored:
                self._sized_nodata = m.name
            m.size = m.stored = 0
        elif m.type == b"D":  # GNU dumpdir: a directory whose body lists names; skip it
            m.type = b"5"
            self._skip(m.stored + (-m.stored) % BLOCK, "a GNU dumpdir listing")
            m.size = m.stored = 0
        elif m.type not in REGTYPES:
            raise InvalidInputError(f"entry {shown!r} has unsupported tar type {typ!r}")
        else:
            self._left = m.stored
            self._pad = (-m.stored) % BLOCK
            self._logical_left = m.size
            self._logical_pos = 0
            self._sparse = m.sparse
        return m

    def _gnu_old_sparse(self, h: bytes, m: TarMember) -> None:
        entries = []
        blk = h[386:482]
        for i in range(4):
            off = _num(blk[i * 24 : i * 24 + 12], "sparse offset")
            n = _num(blk[i * 24 + 12 : i * 24 + 24], "sparse numbytes")
            if off or n:
                entries.append((off, n))
        extended = h[482]
        while extended:
            x = self._take(BLOCK, "a GNU sparse extension header")
            for i in range(21):
                off = _num(x[i * 24 : i * 24 + 12], "sparse offset")
                n = _num(x[i * 24 + 12 : i * 24 + 24], "sparse numbytes")
                if off or n:
                    entries.append((off, n))
                if len(entries) > MAX_SPARSE_ENTRIES:
                    raise InvalidInputError("GNU sparse map is implausibly large")
            extended = x[504]
        m.type = b"0"
        m.size = _num(h[483:495], "sparse realsize")
        m.sparse = self._check_sparse(entries, m)

    def _pax_sparse(self, pax: dict[str, bytes], m: TarMember) -> None:
        real = pax.get("GNU.sparse.realsize") or pax.get("GNU.sparse.size")
        if real is None:
            raise InvalidInputError("PAX sparse file without GNU.sparse.realsize")
        m.size = _pax_int(real, "GNU.sparse.realsize")
        if pax.get("GNU.sparse.major") == b"1":  # format 1.0: the map leads the payload
            nums: list[int] = []
            consumed = 0
            line = b""
            want: int | None = None
            while want is None or len(nums) < 1 + 2 * want:
                blk = self._take(BLOCK, "a PAX sparse map")
                consumed += BLOCK
                for part in (line + blk).split(b"\n")[:-1]:
                    nums.append(_pax_int(part, "GNU.sparse map"))
                line = (line + blk).split(b"\n")[-1]
                if want is None and nums:
                    want = nums[0]
                    if want > MAX_SPARSE_ENTRIES:
                        raise InvalidInputError("PAX sparse map is implausibly large")
            entries = [(nums[1 + 2 * i], nums[2 + 2 * i]) for i in range(want or 0)]
            m.stored -= consumed
            if m.stored < 0:
                raise InvalidInputError("PAX sparse map is larger than the entry")
        else:
            raw = pax.get("GNU.sparse.map") or pax.get("GNU.sparse.map0") or b""
            vals = [_pax_int(x, "GNU.sparse.map") for x in raw.split(b",") if x]
            if len(vals) % 2:
                raise InvalidInputError("PAX sparse map has an odd number of values")
            entries = list(zip(vals[::2], vals[1::2], strict=True))
        m.sparse = self._check_sparse(entries, m)

    @staticmethod
    def _check_sparse(entries: list[tuple[int, int]], m: TarMember) -> list[tuple[int, int]]:
        pos = 0
        total = 0
        for off, n in entries:
            if off < pos or off + n > m.size:
                raise InvalidInputError("sparse map has overlapping or out-of-range segments")
            pos = off + n
            total += n
        if total != m.stored:
            raise InvalidInputError(
                f"sparse map covers {total} bytes but the entry stores {m.stored}"
            )
        return entries

    # payload ----------------------------------------------------------------------------------
    def read(self, n: int) -> bytes:
        """Up to n bytes of the current regular file (holes of sparse files as zeros)."""
        if self._logical_left <= 0:
            return b""
        n = min(n, self._logical_left)
        if self._sparse is None:
            b = self._take_upto(min(n, self._left))
            if not b:
                raise InvalidInputError("tar stream ends inside a file's data (truncated)")
            if self.rec is not None:
                self.rec.content(self._logical_pos, len(b))
            self._left -= len(b)
            self._logical_left -= len(b)
            self._logical_pos += len(b)
            return b
        return self._read_sparse(n)

    def _read_sparse(self, n: int) -> bytes:
        assert self._sparse is not None
        pos = self._logical_pos
        while self._sparse and self._sparse[0][0] + self._sparse[0][1] <= pos:
            self._sparse.pop(0)
        if not self._sparse or pos < self._sparse[0][0]:
            nxt = self._sparse[0][0] if self._sparse else pos + self._logical_left
            out = bytes(min(n, nxt - pos))
        else:
            off, length = self._sparse[0]
            want = min(n, off + length - pos)
            out = self._take_upto(min(want, self._left))
            if not out:
                raise InvalidInputError("tar stream ends inside a sparse file's data (truncated)")
            if self.rec is not None:
                self.rec.content(pos, len(out))
            self._left -= len(out)
        self._logical_pos += len(out)
        self._logical_left -= len(out)
        return out

    def read_exact(self, n: int, name: str) -> bytes:
        parts = []
        while n:
            b = self.read(n)
            if not b:
                raise InvalidInputError(f"tar stream ends inside {name!r} (truncated)")
            parts.append(b)
            n -= len(b)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _skip_rest(self) -> None:
        self._skip(self._left, "a file's data")
        self._left = 0
        self._logical_left = 0
        self._sparse = None
