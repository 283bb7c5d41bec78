"""Compare two directory trees the way a container runtime would notice differences.

Names, types, content, permission bits (incl. setuid/setgid/sticky), owners, mtimes (ns),
xattrs, symlink targets, hardlink groups and device numbers.  Returns a list of human-readable
differences (empty means equal) so a failing test shows exactly what differs.
"""

from __future__ import annotations

import hashlib
import os
import stat


def _xattrs(path: str) -> dict[str, bytes]:
    out = {}
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return out
    for n in names:
        try:
            out[n] = os.getxattr(path, n, follow_symlinks=False)
        except OSError:
            pass
    return out


def _digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def snapshot(
    root: str,
    *,
    times: bool = True,
    root_meta: bool = True,
    implicit: frozenset[str] = frozenset(),
) -> dict[str, tuple]:
    """Map relative path -> comparable tuple, plus hardlink groups under key '#links'."""
    snap: dict[str, tuple] = {}
    inodes: dict[tuple[int, int], list[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in [*dirnames, *sorted(filenames)] + ([] if dirpath != root else ["."]):
            full = os.path.normpath(os.path.join(dirpath, name))
            rel = os.path.relpath(full, root)
            if rel == "." and not root_meta:
                continue
            st = os.lstat(full)
            mode = stat.S_IMODE(st.st_mode)
            kind = stat.S_IFMT(st.st_mode)
            extra: object = None
            if stat.S_ISREG(kind):
                extra = (st.st_size, _digest(full))
                if st.st_nlink > 1:
                    inodes.setdefault((st.st_dev, st.st_ino), []).append(rel)
            elif stat.S_ISLNK(kind):
                extra = os.readlink(full)
                mode = 0  # symlink modes are meaningless on Linux
            elif stat.S_ISCHR(kind) or stat.S_ISBLK(kind):
                extra = (os.major(st.st_rdev), os.minor(st.st_rdev))
            # Directories the archive never lists (created implicitly by the extractor) carry
            # the time of extraction: not comparable between two extractions.
            mtime = st.st_mtime_ns if times and rel not in implicit else None
            snap[rel] = (kind, mode, st.st_uid, st.st_gid, mtime, extra, _xattrs(full))
    groups = sorted(tuple(sorted(v)) for v in inodes.values() if len(v) > 1)
    snap["#links"] = tuple(groups)
    return snap


def diff_trees(a: str, b: str, **kw: object) -> list[str]:
    sa, sb = snapshot(a, **kw), snapshot(b, **kw)  # type: ignore[arg-type]
    out = []
    for k in sorted(set(sa) | set(sb)):
        if k not in sa:
            out.append(f"only in {b}: {k}")
        elif k not in sb:
            out.append(f"only in {a}: {k}")
        elif sa[k] != sb[k]:
            out.append(f"{k}: {sa[k]!r} != {sb[k]!r}")
    return out
