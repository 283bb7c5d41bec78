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

Names are returned as ``str`` decoded UTF-8 with ``surrogateescape``: the original bytes of a
non-UTF-8 name survive a round trip through ``os`` functions.
"""

from __future__ import annotations

import base64
import urllib.parse
from collections.abc import Iterator
from decimal import Decimal, InvalidOperation
from typing import Any, Final

from .errors import InvalidInputError

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


def _num(b: bytes, what: str) -> int:
    """Octal ASCII (space/NUL padded) or GNU base-256 (high bit set)."""
    if b and b[0] & 0x80:
        return _num256(b)
    i = b.find(b"\x00")
    s = b if i < 0 else b[:i]
    try:
        return int(s, 8)  # int() itself ignores the space padding
    except ValueError:
        if not s.strip(b" "):
            return 0  # an empty field
        raise InvalidInputError(f"tar header field {what} is not a number: {b!r}") from None


def _num256(b: bytes) -> int:
    """GNU base-256: big-endian binary after the marker bit; 0xFF marks a negative value."""
    if b[0] == 0xFF:  # negative: two's complement over the whole field
        return int.from_bytes(b, "big") - (1 << (8 * len(b)))
    return int.from_bytes(b[1:], "big") | ((b[0] & 0x3F) << (8 * (len(b) - 1)))


_ZERO_BLOCK: Final = bytes(BLOCK)


def _checksum_ok(h: bytes) -> bool:
    stored = _num(h[148:156], "chksum")
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
        try:
            length = int(data[pos:sp])
        except ValueError:
            raise InvalidInputError(f"PAX header record length {data[pos:sp]!r} is bad") from None
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
    try:
        x = int(v)
    except ValueError:
        raise InvalidInputError(f"PAX {key}={v!r} is not an integer") from None
    if x < 0:
        raise InvalidInputError(f"PAX {key}={v!r} is negative")
    return x


def _pax_time_ns(v: bytes) -> int:
    try:
        d = Decimal(v.decode("ascii"))
    except (InvalidOperation, UnicodeDecodeError):
        raise InvalidInputError(f"PAX mtime {v!r} is not a number") from None
    if not d.is_finite():
        raise InvalidInputError(f"PAX mtime {v!r} is not finite")
    return int(d * 1_000_000_000)


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
        while True:
            self._fill(BLOCK)
            if len(self._buf) - self._pos == 0:
                raise InvalidInputError(
                    f"tar stream ends at byte {self.offset} without an end-of-archive block "
                    "(truncated)"
                )
            h = self._take(BLOCK, "a header")
            if h == _ZERO_BLOCK:
                return None  # end of archive (a second zero block, if any, is trailing data)
            if not _checksum_ok(h):
                raise InvalidInputError(
                    f"tar header at byte {self.offset - BLOCK} has a bad checksum (corrupt)"
                )
            typ = h[156:157]
            size = _num(h[124:136], "size")
            if size < 0:
                raise InvalidInputError("tar header has a negative size")
            if typ in (b"x", b"g", b"L", b"K"):
                if size > MAX_META:
                    raise InvalidInputError(f"tar metadata header of {size} bytes is implausible")
                data = self._take(size, "a PAX/GNU long-name header")
                self._skip((-size) % BLOCK, "header padding")
                if typ == b"x":
                    pax.update(_parse_pax(data))
                elif typ == b"g":
                    self._global.update(_parse_pax(data))
                elif typ == b"L":
                    longname = _field_str(data)
                else:
                    longlink = _field_str(data)
                continue
            if typ in (b"V", b"M", b"N"):
                raise InvalidInputError(
                    f"tar entry type {typ!r} (volume label / multi-volume) is not a layer entry"
                )
            if self.rec is not None:
                self.rec.entry += 1
            return self._member(h, typ, size, {**self._global, **pax}, longname, longlink)

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
        magic = h[257:263]
        name = _field_str(h[0:100])
        if magic == b"ustar\x00":  # POSIX ustar: prefix field
            prefix = _field_str(h[345:500])
            if prefix:
                name = prefix + b"/" + name
        if longname is not None:
            name = longname
        link = _field_str(h[157:257]) if longlink is None else longlink
        m.type = b"0" if typ == b"\x00" else typ
        m.mode = _num(h[100:108], "mode") & 0o7777
        m.uid = _num(h[108:116], "uid")
        m.gid = _num(h[116:124], "gid")
        m.mtime_ns = _num(h[136:148], "mtime") * 1_000_000_000
        m.devmajor = _num(h[329:337], "devmajor")
        m.devminor = _num(h[337:345], "devminor")
        m.stored = size
        m.size = size
        for key, v in pax.items():
            if key == "path":
                name = v
            elif key == "linkpath":
                link = v
            elif key == "size":
                m.stored = m.size = _pax_int(v, key)
            elif key == "uid":
                m.uid = _pax_int(v, key)
            elif key == "gid":
                m.gid = _pax_int(v, key)
            elif key == "mtime":
                m.mtime_ns = _pax_time_ns(v)
            elif key.startswith("SCHILY.xattr."):
                m.xattrs[key[13:]] = v
            elif key.startswith("LIBARCHIVE.xattr."):
                xname = urllib.parse.unquote(key[17:])
                try:
                    m.xattrs.setdefault(xname, base64.b64decode(v + b"=" * (-len(v) % 4)))
                except ValueError:
                    raise InvalidInputError(f"bad base64 in PAX {key}") from None
        if typ == b"S":
            self._gnu_old_sparse(h, m)
        elif "GNU.sparse.major" in pax or "GNU.sparse.map" in pax or "GNU.sparse.map0" in pax:
            name = self._pax_sparse(pax, m, name)
        if m.type == b"D":  # GNU dumpdir: a directory whose payload lists names; ignore it
            m.type = b"5"
        m.name = _dec(name)
        m.linkname = _dec(link)
        if m.type in (b"1", b"2", b"3", b"4", b"5", b"6"):
            # Only regular files carry data; skip whatever a hostile header claims.
            payload = m.stored
            m.size = 0
            m.stored = 0
            self._left, self._pad = payload, (-payload) % BLOCK
            self._skip_rest()
            self._skip(self._pad, "member padding")
            self._pad = 0
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

    def _pax_sparse(self, pax: dict[str, bytes], m: TarMember, name: bytes) -> bytes:
        if "GNU.sparse.name" in pax:
            name = pax["GNU.sparse.name"]
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
        return name

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
