"""Materialize: build a layer as a real directory tree, by reflink where the filesystem can.

The tree is built in a staging directory next to the destination (so the final rename is atomic
and on the same filesystem), then renamed into place with RENAME_NOREPLACE.  Three streaming
passes over the manifest keep memory independent of the layer size:

1. directories, symlinks, devices, fifos (main thread) and regular files (a small thread pool:
   FICLONE, chown, chmod, xattrs and utimensat release the GIL, so two cores really work);
2. hardlinks (their targets exist now);
3. directory metadata, times last (nothing modifies a directory after its times are set).

A layer in which a later entry replaces an earlier one (``ordered``) is built strictly in tar
order on one thread instead, hardlinks included: a hardlink made after the whole layer would
link to whatever its target path held *last* (or replace the file a later entry put at its
own path), where ``tar -x`` links to what the target held at that point of the archive.

Safety: every path is opened beneath the staging root with openat2(RESOLVE_BENEATH |
RESOLVE_NO_SYMLINKS), so a symlink in the tree can never redirect a write outside it.
Descriptors are bounded: at most ~2 per worker plus a small cache of parent directories,
whatever the size of the layer.  Regular files are never hardlinked to objects unless the
caller asks for ``mode="hardlink"`` (shared inodes: a chmod through the tree would change the
object), and then the objects' own metadata is left untouched.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import os
import shutil
import stat
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from ..core.fsutil import Cloner, CopyMethod, open_beneath, rename_noreplace, syncfs
from ..core.manifest import BLOCK, CHAR, DIR, FIFO, HARDLINK, REG, SYMLINK, Entry, read_manifest
from ..core.paths import WHITEOUT_PREFIX, parent, whiteout_target
from ..core.repo import Repo
from ..errors import CorruptObjectError, DestinationError, InvalidInputError, UnsafePathError

try:  # the optional C fast path (src/layerstore/_fastpath.c); same results without it
    from .. import _fastpath  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - depends on the build
    _fastpath = None
# LAYERSTORE_FASTPATH=0 forces the pure-Python path (the tests compare both).
_METHODS = {
    1: CopyMethod.REFLINK,
    2: CopyMethod.COPY_FILE_RANGE,
    3: CopyMethod.COPY,
    4: CopyMethod.INLINE,
}
_STAGES = {1: "create", 2: "open object", 3: "copy data", 4: "chown", 5: "chmod", 6: "times"}


MODES = ("reflink", "copy", "hardlink")
_DIR_CACHE = 16
_MAX_INFLIGHT = 1024
_BATCH = 64


@dataclass
class MaterializeResult:
    dest: str
    entries: int = 0
    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    hardlinks: int = 0
    devices: int = 0
    fifos: int = 0
    methods: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


class _Builder:
    def __init__(self, repo: Repo, root_fd: int, mode: str, result: MaterializeResult) -> None:
        self.repo = repo
        self.root_fd = root_fd
        self.mode = mode
        self.result = result
        self.cloner = Cloner(allow_reflink=(mode != "copy"))
        self.is_root = os.geteuid() == 0
        self.ids = (os.geteuid(), os.getegid())
        self.umask = _current_umask()
        self.lock = threading.Lock()
        self.dirfds: collections.OrderedDict[str, int] = collections.OrderedDict()
        self.progress: Callable[[int], None] | None = None
        self.ordered = False  # the layer has replacing entries: clear a path before creating
        self.opaque: list[str] = []  # overlay mode: directories to mark opaque at the end

    # helpers ---------------------------------------------------------------------------------
    def unprivileged_mode(self, e: Entry, count: bool = True) -> None:
        """As a non-root user, drop setuid and setgid from ``e.mode``, as GNU tar does.

        Without root the tree's owners cannot be the layer's: every file belongs to the user
        materializing.  A setuid bit would then grant *that* user's rights (a setuid-root
        binary becomes setuid-alice), which is not what the layer asked for, so ``tar -x`` as
        an ordinary user drops it.  (GNU tar then also applies the umask; materialize keeps
        the other permission bits exactly, like ``tar -xp``, so a tree does not depend on who
        built it beyond what cannot be built.)  Each drop is reported in ``skipped``.
        """
        if self.is_root or not e.mode & 0o6000 or e.kind in (SYMLINK, HARDLINK):
            return
        e.mode &= ~0o6000
        if count:
            self.skip("setuid/setgid")

    def skip(self, what: str) -> None:
        with self.lock:
            self.result.skipped[what] = self.result.skipped.get(what, 0) + 1

    def dir_fd(self, path: str) -> int:
        """An O_PATH descriptor of a directory in the tree (small LRU cache, main thread)."""
        fd = self.dirfds.get(path)
        if fd is not None:
            self.dirfds.move_to_end(path)
            return fd
        try:
            fd = open_beneath(self.root_fd, path, os.O_PATH | os.O_DIRECTORY)
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                self.makedirs(path)
                fd = open_beneath(self.root_fd, path, os.O_PATH | os.O_DIRECTORY)
            elif exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.EXDEV):
                raise UnsafePathError(
                    f"{path!r} is not a directory inside the tree (symlink or file in the way)"
                ) from None
            else:
                raise
        self.dirfds[path] = fd
        if len(self.dirfds) > _DIR_CACHE:
            _, old = self.dirfds.popitem(last=False)
            os.close(old)
        return fd

    def makedirs(self, path: str) -> None:
        """Create missing parents (mode 0755, like tar does for implicit directories)."""
        if path == ".":
            return
        pfd = self.dir_fd(parent(path))
        try:
            os.mkdir(os.path.basename(path), 0o755, dir_fd=pfd)
        except FileExistsError:
            pass

    def close(self) -> None:
        for fd in self.dirfds.values():
            os.close(fd)
        self.dirfds.clear()

    def _xattrs_fd(self, fd: int, e: Entry) -> None:
        for k, v in e.xattrs.items():
            try:
                os.setxattr(fd, k, v)
            except OSError as exc:
                if exc.errno in (errno.ENOTSUP, errno.EPERM, errno.EACCES, errno.EINVAL):
                    self.skip(f"xattr:{k}")
                else:
                    raise

    def _meta_fd(self, fd: int, e: Entry, created_mode: int | None = None) -> None:
        """Ownership, then mode (chown clears setuid), xattrs (after chown: it drops
        security.capability), times last.  Calls that would change nothing are skipped: the
        creator is ``self.uid:self.gid`` and ``created_mode`` is what open() already set."""
        owner_changed = (e.uid, e.gid) != self.ids
        if owner_changed:
            if self.is_root:
                os.fchown(fd, e.uid, e.gid)
            else:
                self.skip("ownership")
        if owner_changed or created_mode != e.mode:
            os.fchmod(fd, e.mode)
        if e.xattrs:
            self._xattrs_fd(fd, e)
        os.utime(fd, ns=(e.mtime_ns, e.mtime_ns))

    def _meta_nofollow(self, pfd: int, name: str, e: Entry) -> None:
        """Metadata for entries we cannot open (symlinks, devices): *at calls, never followed."""
        if self.is_root:
            os.chown(name, e.uid, e.gid, dir_fd=pfd, follow_symlinks=False)
        elif (e.uid, e.gid) != (os.geteuid(), os.getegid()):
            self.skip("ownership")
        if e.kind != SYMLINK:
            os.chmod(f"/proc/self/fd/{pfd}/{name}", e.mode)  # devices/fifos: not a symlink
        if e.xattrs:
            for k, v in e.xattrs.items():
                try:
                    os.setxattr(f"/proc/self/fd/{pfd}/{name}", k, v, follow_symlinks=False)
                except OSError as exc:
                    if exc.errno in (errno.ENOTSUP, errno.EPERM, errno.EACCES, errno.EINVAL):
                        self.skip(f"xattr:{k}")
                    else:
                        raise
        os.utime(name, ns=(e.mtime_ns, e.mtime_ns), dir_fd=pfd, follow_symlinks=False)

    def _clear(self, pfd: int, name: str) -> None:
        """A later entry replaces an earlier one of the same name (tar semantics; across
        layers a directory may be replaced too).  Never follows symlinks."""
        try:
            os.unlink(name, dir_fd=pfd)
        except FileNotFoundError:
            pass
        except IsADirectoryError:
            shutil.rmtree(name, dir_fd=pfd)

    def apply_whiteouts(self, manifest: str) -> None:
        """Flattening: remove what this layer's whiteouts hide in the layers below.

        The whiteout's directory is opened with the same confinement as creation
        (:func:`open_beneath`: no symlink on the path, nothing outside the tree), and its
        target must be one name inside that directory (:func:`whiteout_target`), so neither a
        name like ``.wh...`` nor a lower layer's symlink can make this delete anything outside
        the staging tree.  A directory that does not exist below hides nothing.
        """
        with open(manifest, "rb") as mf:
            for e in read_manifest(mf):
                if e.kind != REG:
                    continue
                target = whiteout_target(e.path)
                if target is None:
                    continue
                par = parent(e.path)
                try:
                    pfd = open_beneath(self.root_fd, par, os.O_RDONLY | os.O_DIRECTORY)
                except (FileNotFoundError, NotADirectoryError):
                    continue  # nothing below to hide
                except OSError as exc:
                    if exc.errno in (errno.ELOOP, errno.EXDEV):
                        raise UnsafePathError(
                            f"whiteout {e.path!r} is reached through a symlink of a lower "
                            "layer; layers may not write through symlinks"
                        ) from None
                    raise
                try:
                    if target == "":
                        for child in os.listdir(pfd):
                            self._clear(pfd, child)
                    else:
                        self._clear(pfd, target)
                finally:
                    os.close(pfd)
                self.dirfds_invalidate()

    def dirfds_invalidate(self) -> None:
        """Cached directory descriptors may name removed directories now."""
        self.close()

    def make_overlay_whiteout(self, e: Entry) -> None:
        """overlay lower-dir form: a 0/0 char device, or the opaque xattr on the directory."""
        target = whiteout_target(e.path)
        assert target is not None  # the caller checked _is_whiteout
        par = parent(e.path)
        pfd = self.dir_fd(par)  # confined: refuses a symlink or file on the path
        if target == "":
            self.opaque.append(par)  # set after directory metadata (chown drops xattrs)
            return
        try:
            os.mknod(target, 0o020000 | 0o600, os.makedev(0, 0), dir_fd=pfd)
        except PermissionError:
            self.skip("whiteout-device")
            return
        self._meta_nofollow(pfd, target, e)

    def apply_opaque_marks(self) -> None:
        for par in self.opaque:
            try:
                fd = open_beneath(self.root_fd, par, os.O_RDONLY | os.O_DIRECTORY)
            except OSError as exc:
                raise UnsafePathError(
                    f"opaque directory {par!r} is no longer a directory inside the tree ({exc})"
                ) from None
            try:
                os.setxattr(fd, "trusted.overlay.opaque", b"y")
            except PermissionError:
                self.skip("opaque-xattr")
            finally:
                os.close(fd)

    # entry kinds -----------------------------------------------------------------------------
    def make_files(self, batch: list[Entry]) -> None:
        """Worker: create a batch of regular files (usually siblings: tar order groups them).

        Each parent directory is resolved once per run of siblings with openat2 (no symlink
        anywhere on the path); files are then created relative to it with O_CREAT|O_EXCL|
        O_NOFOLLOW.  Method counts are merged once per batch, not per file.  With the C fast
        path the syscalls of the whole batch run without the GIL.
        """
        if _fastpath is not None and os.environ.get("LAYERSTORE_FASTPATH", "1") != "0":
            self._make_files_fast(batch)
        else:
            self._make_files_py(batch)
        if self.progress is not None:
            self.progress(len(batch))

    def _make_files_py(self, batch: list[Entry]) -> None:
        counts: dict[CopyMethod, int] = {}
        pdir = ""
        pfd = -1
        try:
            for e in batch:
                par = parent(e.path)
                if par != pdir or pfd < 0:
                    if pfd >= 0:
                        os.close(pfd)
                        pfd = -1
                    pfd = self._open_parent(par, e.path)
                    pdir = par
                m = self.make_file(e, pfd)
                counts[m] = counts.get(m, 0) + 1
        finally:
            if pfd >= 0:
                os.close(pfd)
            for m, n in counts.items():
                self.cloner.count(m, n)

    def _make_files_fast(self, batch: list[Entry]) -> None:
        """The same as :meth:`_make_files_py`, the per-file syscalls done in C.  Entries
        with xattrs (rare) and any file the C side reports a problem with go through the
        Python path, which raises the same errors it always does."""
        pfds: dict[str, int] = {}
        counts: dict[CopyMethod, int] = {}
        items: list[tuple[Any, ...]] = []
        fast: list[Entry] = []
        slow: list[Entry] = []
        is_root, ids, umask = self.is_root, self.ids, self.umask
        try:
            for e in batch:
                if e.xattrs:
                    slow.append(e)
                    continue
                par, _, name = e.path.rpartition("/")
                par = par or "."
                pfd = pfds.get(par)
                if pfd is None:
                    pfd = pfds[par] = self._open_parent(par, e.path)
                perm = e.mode & 0o777
                create_mode = perm if perm == e.mode and not perm & umask else 0o600
                owner_changed = (e.uid, e.gid) != ids
                if owner_changed and not is_root:
                    self.skip("ownership")
                if e.digest is not None and e.inline is None:
                    src: bytes | None = os.fsencode(self.repo.object_path(e.digest))
                    inline = None
                else:
                    src, inline = None, e.inline or b""
                items.append(
                    (
                        pfd,
                        name.encode("utf-8", "surrogateescape"),
                        src,
                        e.size,
                        create_mode,
                        e.mode,
                        e.uid,
                        e.gid,
                        e.mtime_ns,
                        owner_changed and is_root,
                        owner_changed or create_mode != e.mode,
                        inline,
                    )
                )
                fast.append(e)
            c = self.cloner
            results, c.reflink_ok, c.cfr_ok = _fastpath.run_batch(items, c.reflink_ok, c.cfr_ok)
            for e, (method, err, stage) in zip(fast, results, strict=True):
                if method:
                    m = _METHODS[method]
                    counts[m] = counts.get(m, 0) + 1
                elif stage == 1 and err == errno.EEXIST:
                    slow.append(e)  # replaced by a later entry: the Python path clears it
                elif stage == 2 and err == errno.ENOENT:
                    raise CorruptObjectError(
                        f"object {e.digest.hex() if e.digest else '?'} for {e.path!r} is "
                        "missing from the store; run `layerstore fsck --repair`"
                    )
                else:
                    raise OSError(err, f"{os.strerror(err)} ({_STAGES.get(stage, stage)})", e.path)
        finally:
            for fd in pfds.values():
                os.close(fd)
            for m, n in counts.items():
                self.cloner.count(m, n)
        if slow:
            self._make_files_py(slow)

    def _open_parent(self, par: str, path: str) -> int:
        try:
            return open_beneath(self.root_fd, par, os.O_PATH | os.O_DIRECTORY)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.EXDEV, errno.ENOTDIR):
                raise UnsafePathError(f"refusing to write {path!r} through a symlink") from None
            raise

    def make_file(self, e: Entry, pfd: int) -> CopyMethod:
        """Create one regular file (in the directory ``pfd``) with its content and metadata."""
        name = e.path.rpartition("/")[2]
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        # Create with the final permission bits when the umask lets them through unchanged
        # and no special bits are involved: saves an fchmod for most files.
        perm = e.mode & 0o777
        create_mode = perm if perm == e.mode and not perm & self.umask else 0o600
        try:
            fd = os.open(name, flags, create_mode, dir_fd=pfd)
        except FileExistsError:  # a later entry replaces an earlier one (tar semantics)
            self._clear(pfd, name)
            fd = os.open(name, flags, create_mode, dir_fd=pfd)
        try:
            if e.inline is not None:
                if e.inline:
                    os.write(fd, e.inline)
                method = CopyMethod.INLINE
            elif e.digest is not None:
                try:
                    sfd = os.open(self.repo.object_path(e.digest), os.O_RDONLY | os.O_CLOEXEC)
                except FileNotFoundError:
                    raise CorruptObjectError(
                        f"object {e.digest.hex()} for {e.path!r} is missing from the store; "
                        "run `layerstore fsck --repair`"
                    ) from None
                try:
                    method = self.cloner.clone(fd, sfd, e.size)
                finally:
                    os.close(sfd)
            else:
                method = CopyMethod.INLINE
            self._meta_fd(fd, e, create_mode)
        finally:
            os.close(fd)
        return method

    def make_hardlinked_object(self, e: Entry) -> None:
        """mode=hardlink: share the object's inode (its metadata stays the object's)."""
        pfd = self.dir_fd(parent(e.path))
        if e.digest is None:
            self.cloner.count(self.make_file(e, pfd))
            return
        name = os.path.basename(e.path)
        self._clear(pfd, name)
        try:
            os.link(self.repo.object_path(e.digest), name, dst_dir_fd=pfd)
        except OSError as exc:
            if exc.errno in (errno.EXDEV, errno.EMLINK, errno.EPERM):
                # other fs / link limit: fall back to a real file
                self.cloner.count(self.make_file(e, pfd))
                return
            if exc.errno == errno.ENOENT:
                raise CorruptObjectError(
                    f"object {e.digest.hex()} for {e.path!r} is missing from the store"
                ) from None
            raise
        self.cloner.count(CopyMethod.HARDLINK)

    def make_special(self, e: Entry) -> None:
        pfd = self.dir_fd(parent(e.path))
        name = os.path.basename(e.path)
        if self.ordered:
            self._clear(pfd, name)
        if e.kind == SYMLINK:
            os.symlink(e.linkname, name, dir_fd=pfd)
            self.result.symlinks += 1
        elif e.kind == FIFO:
            os.mkfifo(name, 0o600, dir_fd=pfd)
            self.result.fifos += 1
        else:
            fmt = 0o020000 if e.kind == CHAR else 0o060000
            try:
                os.mknod(name, fmt | 0o600, os.makedev(e.devmajor, e.devminor), dir_fd=pfd)
            except PermissionError:
                self.skip("device")
                return
            self.result.devices += 1
        self._meta_nofollow(pfd, name, e)

    def make_dir(self, e: Entry) -> None:
        if e.path == ".":
            return
        pfd = self.dir_fd(parent(e.path))
        name = os.path.basename(e.path)
        try:
            os.mkdir(name, 0o700, dir_fd=pfd)
        except FileExistsError:
            if self.ordered and not stat.S_ISDIR(os.lstat(name, dir_fd=pfd).st_mode):
                os.unlink(name, dir_fd=pfd)  # a directory replaces a file of a lower layer
                os.mkdir(name, 0o700, dir_fd=pfd)
        self.result.dirs += 1

    def make_hardlink(self, e: Entry) -> None:
        pfd = self.dir_fd(parent(e.path))
        tfd = self.dir_fd(parent(e.linkname))
        name = os.path.basename(e.path)
        if self.ordered:
            self._clear(pfd, name)
        try:
            os.link(
                os.path.basename(e.linkname),
                name,
                src_dir_fd=tfd,
                dst_dir_fd=pfd,
                follow_symlinks=False,
            )
        except FileNotFoundError:
            raise InvalidInputError(
                f"hardlink {e.path!r} -> {e.linkname!r}: target does not exist in the layer"
            ) from None
        self.result.hardlinks += 1

    def dir_meta(self, e: Entry) -> None:
        fd = open_beneath(self.root_fd, e.path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            self._meta_fd(fd, e)
        finally:
            os.close(fd)


def _current_umask() -> int:
    """The process umask, read without changing it (os.umask would race other threads)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o777  # unknown: assume the worst, so every file gets an explicit fchmod


@dataclass
class _Place:
    """Where a tree is built and published: the destination's parent, opened once.

    Staging, publishing and clean-up all go through ``parent_fd``, never through the parent's
    path again: if the parent is renamed away and replaced (by a symlink elsewhere, say) while
    the tree is built, nothing is created, renamed or removed anywhere but in the directory
    that was opened, and the swap is reported instead of followed."""

    dest: str  # absolute
    parent: str  # its directory, as the caller named it
    parent_fd: int  # O_PATH descriptor of that directory
    parent_id: tuple[int, int]  # (st_dev, st_ino) when it was opened
    name: str  # dest's last component
    stage: str  # the staging directory's name, inside parent_fd


def _prepare(repo: Repo, dest: str, mode: str) -> _Place:
    if mode not in MODES:
        raise InvalidInputError(f"materialize mode must be one of {', '.join(MODES)}")
    dest = os.path.abspath(dest)
    dparent = os.path.dirname(dest)
    if os.path.lexists(dest):
        raise DestinationError(f"{dest} exists; materialize creates a new directory")
    try:
        pfd = os.open(dparent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        raise DestinationError(f"parent directory {dparent} does not exist") from None
    st = os.fstat(pfd)
    name = os.path.basename(dest)
    stage = f".{name}.layerstore-{repo.lease.id.hex()[:12]}-{os.getpid()}"
    try:
        os.mkdir(stage, 0o700, dir_fd=pfd)
    except BaseException:
        os.close(pfd)
        raise
    return _Place(dest, dparent, pfd, (st.st_dev, st.st_ino), name, stage)


def _is_whiteout(e: Entry) -> bool:
    return e.path.rpartition("/")[2].startswith(WHITEOUT_PREFIX)


def _apply_layer(
    b: _Builder,
    manifest: str,
    mode: str,
    nworkers: int,
    progress: Callable[[int], None] | None,
    whiteouts: str,
) -> Entry | None:
    """Create one layer's entries in the tree; returns its root ("." ) entry, if any.

    ``whiteouts``: "keep" (as the regular files they are in the tar), "skip" (flattening:
    they were applied before this pass), or "overlay" (as overlayfs expects in a lower dir: a
    0/0 character device for ``.wh.NAME``, ``trusted.overlay.opaque=y`` for the opaque marker).
    """
    result = b.result
    links: list[Entry] = []
    root_entry: Entry | None = None
    inflight: collections.deque[Future[None]] = collections.deque()
    batch: list[Entry] = []
    ordered = b.ordered

    def flush() -> None:
        # Files go to the workers in batches: one future per ~64 files keeps the
        # scheduling overhead well below the cost of the syscalls themselves.
        inflight.append(pool.submit(b.make_files, list(batch)))
        batch.clear()
        while len(inflight) > _MAX_INFLIGHT // _BATCH:
            inflight.popleft().result()

    with ThreadPoolExecutor(max_workers=nworkers) as pool, open(manifest, "rb") as mf:
        for e in read_manifest(mf):
            result.entries += 1
            b.unprivileged_mode(e)
            if e.kind == REG:
                if whiteouts != "keep" and _is_whiteout(e):
                    if whiteouts == "overlay":
                        b.make_overlay_whiteout(e)
                    continue
                result.files += 1
                b.dir_fd(parent(e.path))  # make sure the parent exists before the worker
                if mode == "hardlink":
                    b.make_hardlinked_object(e)
                    if progress:
                        progress(1)
                elif ordered:
                    # a later entry may replace this path: keep tar order, one thread
                    b.cloner.count(b.make_file(e, b.dir_fd(parent(e.path))))
                    if progress:
                        progress(1)
                else:
                    batch.append(e)
                    if len(batch) >= _BATCH:
                        flush()
            elif e.kind == DIR:
                if e.path == ".":
                    root_entry = e
                b.make_dir(e)
            elif e.kind == HARDLINK:
                if ordered:
                    # In tar order: the target is what that path holds at this point of the
                    # archive, and a later entry at either path replaces, as with tar -x.
                    b.make_hardlink(e)
                else:
                    links.append(e)  # made after every file exists; O(hardlinks) memory
            elif e.kind in (SYMLINK, CHAR, BLOCK, FIFO):
                b.make_special(e)
        if batch:
            flush()
        while inflight:
            inflight.popleft().result()
    for e in links:
        b.make_hardlink(e)
    return root_entry


def _dir_metadata(b: _Builder, manifest: str, missing_ok: bool) -> None:
    b.close()  # directory metadata: open fresh descriptors, the cache is done
    with open(manifest, "rb") as mf:
        for e in read_manifest(mf):
            if e.kind == DIR and e.path != ".":
                b.unprivileged_mode(e, count=False)  # counted in _apply_layer
                try:
                    b.dir_meta(e)
                except (FileNotFoundError, NotADirectoryError):
                    if not missing_ok:  # flattening: an upper layer removed or replaced it
                        raise


def _publish(
    b: _Builder, root_fd: int, root_entry: Entry | None, place: _Place, sync: bool
) -> None:
    if root_entry is not None:
        b._meta_fd(root_fd, root_entry)
    else:
        os.fchmod(root_fd, 0o755)
    if sync:
        syncfs(root_fd)
    try:
        st = os.stat(place.parent)
        same = (st.st_dev, st.st_ino) == place.parent_id
    except OSError:
        same = False
    if not same:
        raise DestinationError(
            f"{place.parent} was moved or replaced while materializing into it; nothing was "
            f"published at {place.dest} and the partial tree was removed. Make sure nothing "
            "else renames that directory, and retry"
        )
    try:
        rename_noreplace(
            place.stage, place.name, src_dir_fd=place.parent_fd, dst_dir_fd=place.parent_fd
        )
    except FileExistsError:
        raise DestinationError(
            f"{place.dest} appeared while materializing; left it alone"
        ) from None


@contextlib.contextmanager
def _building(
    repo: Repo,
    dest: str,
    mode: str,
    progress: Callable[[int], None] | None,
    ordered: bool,
    sync: bool,
) -> Iterator[tuple[_Builder, Callable[[Entry | None], None]]]:
    """Staging tree + builder for one materialization; yields (builder, publish).

    On any error the staging tree is removed and nothing appears at ``dest``; ``publish``
    applies the root's metadata, syncs and renames the tree into place.
    """
    t0 = time.monotonic()
    place = _prepare(repo, dest, mode)
    pfd = place.parent_fd
    try:
        root_fd = os.open(
            place.stage, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd
        )
    except BaseException:
        shutil.rmtree(place.stage, dir_fd=pfd, ignore_errors=True)
        os.close(pfd)
        raise
    result = MaterializeResult(dest=place.dest)
    b = _Builder(repo, root_fd, mode, result)
    b.progress = progress
    b.ordered = ordered

    def publish(root_entry: Entry | None) -> None:
        _publish(b, root_fd, root_entry, place, sync)

    try:
        yield b, publish
    except BaseException:
        b.close()
        shutil.rmtree(place.stage, dir_fd=pfd, ignore_errors=True)
        raise
    finally:
        os.close(root_fd)
        os.close(pfd)
    result.methods = dict(b.cloner.counts)
    result.seconds = time.monotonic() - t0


def materialize(
    repo: Repo,
    manifest_b3: bytes,
    dest: str,
    *,
    mode: str = "reflink",
    progress: Callable[[int], None] | None = None,
    workers: int = 0,
    sync: bool = True,
    total_files: int = 0,
    ordered: bool = False,
    overlay: bool = False,
) -> MaterializeResult:
    """See the module docstring.  The caller has pinned the layer.

    ``ordered``: the layer has entries that replace earlier ones (recorded at import); files are
    then created in tar order on one thread, so the last entry for a path wins as with tar -x.
    ``overlay``: write whiteouts the way overlayfs reads them in a lower directory.
    """
    nworkers = workers or min(4, (os.cpu_count() or 1) + 1)
    with _building(repo, dest, mode, progress, ordered, sync) as (b, publish):
        manifest = repo.object_path(manifest_b3)
        root_entry = _apply_layer(
            b, manifest, mode, nworkers, progress, "overlay" if overlay else "keep"
        )
        _dir_metadata(b, manifest, missing_ok=False)
        b.apply_opaque_marks()
        publish(root_entry)
    return b.result


def materialize_flat(
    repo: Repo,
    manifests: list[bytes],
    dest: str,
    *,
    mode: str = "reflink",
    progress: Callable[[int], None] | None = None,
    sync: bool = True,
) -> MaterializeResult:
    """Materialize an image's layers, in order, as one flattened root filesystem.

    For each layer: its whiteouts are applied first (``.wh.NAME`` removes NAME from the lower
    layers; ``.wh..wh..opq`` empties its directory of what the lower layers put there), then
    its entries are created in tar order (a later entry replaces an earlier one, a directory
    replaces a non-directory and vice versa), then its hardlinks.  Directory metadata is
    applied last, lowest layer first, so the top-most definition of a directory wins.  The
    caller has pinned the layers.
    """
    # Paths are replaced across layers: strict order, one thread.
    with _building(repo, dest, mode, progress, True, sync) as (b, publish):
        root_entry: Entry | None = None
        paths = [repo.object_path(m) for m in manifests]
        for manifest in paths:
            b.apply_whiteouts(manifest)
            root_entry = _apply_layer(b, manifest, mode, 1, progress, "skip") or root_entry
        for manifest in paths:
            _dir_metadata(b, manifest, missing_ok=True)
        publish(root_entry)
    return b.result


def materialize_diff_dirs(
    repo: Repo,
    manifests: list[bytes],
    dest: str,
    *,
    mode: str = "reflink",
    progress: Callable[[int], None] | None = None,
    sync: bool = True,
) -> list[MaterializeResult]:
    """One overlayfs-ready lower directory per layer under ``dest/`` (``0``, ``1``, ...
    bottom first), whiteouts written as overlayfs reads them.  All or nothing, like the
    flattened form: a failing layer drops the ones already built.  The caller has pinned the
    layers and checked that ``dest`` does not exist."""
    os.mkdir(dest, 0o755)
    try:
        return [
            materialize(
                repo,
                m,
                os.path.join(dest, str(i)),
                mode=mode,
                progress=progress,
                sync=sync,
                ordered=True,
                overlay=True,
            )
            for i, m in enumerate(manifests)
        ]
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise
