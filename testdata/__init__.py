"""A cached corpus of real data written by real tools, for the tests and benchmarks.

Nothing in here is written by layerstore: every byte comes from Debian tools (debootstrap, apt,
GNU tar, gzip, zstd, umoci, skopeo), so tests can check layerstore against data its real partners
produce.  Everything is built once per machine and cached.

Artifacts (name → function → what it returns):

``minbase-v1`` → :func:`minbase_rootfs`
    Directory: ``debootstrap --variant=minbase bookworm DIR MIRROR``, kept exactly as debootstrap
    left it (device nodes, hardlinks, symlinks, setuid files, apt lists and the downloaded .debs).
    MIRROR is the Debian archive configured for apt on this machine (see :func:`apt_mirror`).
``minbase-v1.tar`` / ``.tar.gz`` / ``.tar.zst`` → :func:`minbase_tar`, :func:`minbase_tar_gz`,
:func:`minbase_tar_zst`
    GNU tar of that tree (``--numeric-owner --xattrs --xattrs-include=* --sort=name``), then
    ``gzip -n`` and ``zstd`` of the same tar.
``minbase-v2`` → :func:`minbase_v2_rootfs`
    Directory: ``cp -a`` of v1, then, like a typical Dockerfile step, in a chroot (nothing
    mounted): ``apt-get install -y --no-install-recommends less netbase``, ``apt-get clean``
    (deletes the .debs v1 carries), ``useradd -m alice``, a line appended to ``etc/motd``,
    ``rm -rf usr/share/doc/apt`` and ``rm -rf var/lib/apt/lists/*``.
    *Fallback*: if apt in the chroot fails (no mirror, no DNS ...), the copy is discarded and
    deterministic file-level edits are made instead: new files under ``usr/local`` (a script, text,
    pseudo-random binary data, a duplicate of a licence text, a symlink and a hardlink), then the
    same user, motd and deletion steps (``useradd`` falls back to editing ``etc/passwd`` & co).
    ``build.json`` says which path was taken (``"v2_method": "apt" | "fallback"``).  Setting
    ``LAYERSTORE_CORPUS_NO_APT=1`` forces the fallback.
``oci-umoci`` → :func:`umoci_layout`
    OCI image layout written by umoci 0.4 (gzip layers, blobs mode 0600) with two tags: ``v1`` = one
    layer holding minbase v1; ``v2`` = v1's layer plus one layer with the v1→v2 difference, computed
    by ``umoci repack`` (whiteouts ``.wh.NAME`` for the deletions).
``oci-<gzip|zstd|zstd-chunked>-v<1|2>`` → :func:`oci_layout`
    ``skopeo copy --dest-compress-format C oci:UMOCI:vN oci:OUT:vN``: one layout per version and
    compression, holding only tag ``vN``.  For ``gzip`` skopeo keeps umoci's gzip blobs as they
    are (same digests); ``zstd`` and ``zstd:chunked`` are recompressed by skopeo (1.9 writes the
    older zstd:chunked variant, with ``io.containers.zstd-chunked.*`` layer annotations).
``oci-buildah-zstd-chunked-v<1|2>`` → :func:`buildah_chunked_layout`
    A second, independent zstd:chunked writer: ``buildah from scratch``, ``cp -a`` of minbase vN
    into the container's (vfs) root, ``buildah commit``, then ``buildah push --compression-format
    zstd:chunked`` to ``oci:OUT:vN``.  Unlike the skopeo layouts, **both versions are a single
    layer holding the whole root filesystem** (v2 is not stacked on v1's layer), so v2's layer
    shares most of its files with v1's layer only file by file: the shape a file-level dedup or a
    zstd:chunked partial pull has to find.  buildah 1.28 writes the older variant.  The build
    checks every layer (see :func:`zstd_chunked_info`: TOC checksum, footer, DiffID) and records
    it in ``build.json`` under ``"zstd_chunked"``; v2's ``"shared_with_v1"`` counts the regular
    files (name and sha256) its layer shares with v1's.  buildah runs hermetically: see
    :func:`private_ns_prefix` and :func:`containers_storage_conf`.

Cache: ``$LAYERSTORE_CORPUS_DIR`` or ``~/.cache/layerstore-corpus``, under ``r<RECIPE_VERSION>/``.
Every artifact is a directory ``<cache>/r<N>/<name>/`` holding the data and a ``build.json``
(build time in seconds, tool versions, statistics).  Builds take a per-artifact ``fcntl.flock``
lock, so concurrent pytest workers wait instead of building twice, and are built in a temporary
directory next to the final one that is renamed into place only when complete: an interrupted build
leaves no half artifact (its leftover is removed, after unmounting anything under it, by the next
build).  Building needs root (debootstrap, chroot, device nodes); reading a built cache does not.
Tests should catch :class:`CorpusError` and skip.

Command line (from the repository root)::

    python -m testdata build [-j N]   # build everything; print paths, sizes, counts
    python -m testdata path NAME      # print one artifact's path (building it if needed)
    python -m testdata list           # names and whether they are built
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import fcntl
import functools
import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

#: Bump when a recipe changes; old caches are then ignored (they live in another subdirectory).
RECIPE_VERSION = 1
SUITE = "bookworm"
VARIANT = "minbase"
#: Compressions accepted by :func:`oci_layout` (skopeo ``--dest-compress-format`` values).
COMPRESSIONS = ("gzip", "zstd", "zstd:chunked")
VERSIONS = (1, 2)
V2_PACKAGES = ("less", "netbase")
V2_USER = "alice"
V2_MOTD_LINE = "layerstore corpus: image version 2\n"
#: The first of these that exists in v1 is deleted (a whole directory) in v2.
V2_DELETED_DIRS = ("usr/share/doc/apt", "usr/share/doc/debconf", "usr/share/doc/dpkg")

ENV_DIR = "LAYERSTORE_CORPUS_DIR"
ENV_MIRROR = "LAYERSTORE_CORPUS_MIRROR"
ENV_NO_APT = "LAYERSTORE_CORPUS_NO_APT"

_SYS_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: tool → Debian package that provides it.
_PACKAGES = {
    "debootstrap": "debootstrap",
    "skopeo": "skopeo",
    "buildah": "buildah",
    "umoci": "umoci",
    "tar": "tar",
    "gzip": "gzip",
    "zstd": "zstd",
    "cp": "coreutils",
    "chroot": "coreutils",
    "unshare": "util-linux",
    "mount": "mount",
    "umount": "mount",
}
_PRINT_LOCK = threading.Lock()


class CorpusError(RuntimeError):
    """The corpus cannot be built here (missing tool, not root, a tool failed)."""


class MissingToolError(CorpusError):
    """A required command is not installed; the message names the apt package."""


# --------------------------------------------------------------------------------------------
# small helpers


def _log(msg: str) -> None:
    with _PRINT_LOCK:
        print(f"corpus: {msg}", file=sys.stderr, flush=True)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = env.get("PATH", "") + ":" + _SYS_PATH
    env.setdefault("LC_ALL", "C")
    return env


def tool(name: str) -> str:
    """Return the absolute path of command ``name``, or raise :class:`MissingToolError`."""
    found = shutil.which(name, path=_env()["PATH"])
    if found is None:
        how = (
            f"run `apt-get install {_PACKAGES[name]}`"
            if name in _PACKAGES
            else "install the Debian package that provides it"
        )
        raise MissingToolError(f"testdata needs the `{name}` command; {how}")
    return found


def _require_root() -> None:
    if os.geteuid() != 0:
        raise CorpusError(
            "building the corpus needs root (debootstrap, chroot, device nodes); "
            "build it once as root with `python -m testdata build`"
        )


def _run(cmd: list[str], log: Path, **kwargs: Any) -> None:
    """Run ``cmd`` (first word resolved with :func:`tool`), appending its output to ``log``."""
    argv = [tool(cmd[0]), *cmd[1:]]
    with open(log, "ab") as out:
        out.write(f"\n$ {' '.join(argv)}\n".encode())
        out.flush()
        proc = subprocess.run(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, **kwargs
        )
    if proc.returncode != 0:
        tail = log.read_text(errors="replace").splitlines()[-15:]
        raise CorpusError(
            f"command failed (exit {proc.returncode}): {' '.join(argv)}\n"
            f"  log: {log}\n  " + "\n  ".join(tail)
        )


def _package_version(pkg: str) -> str | None:
    try:
        proc = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", pkg], capture_output=True, text=True, check=False
        )
    except OSError:
        return None
    return proc.stdout.strip() or None


def _mounts_under(path: Path) -> list[str]:
    """Mount points at or below ``path``, deepest first."""
    real = os.path.realpath(path)
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mnt = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), line.split()[4])
            if mnt == real or mnt.startswith(real.rstrip("/") + "/"):
                found.append(mnt)
    return sorted(found, key=len, reverse=True)


def _remove_tree(path: Path) -> None:
    """``rm -rf path``, after unmounting anything under it (an interrupted debootstrap can leave
    ``proc``/``sys`` mounted in its target); refuses if something stays mounted."""
    if not os.path.lexists(path):
        return
    if path.is_symlink() or not path.is_dir():
        path.unlink()
        return
    for mnt in _mounts_under(path):
        subprocess.run(["umount", "-l", mnt], env=_env(), check=False, capture_output=True)
    left = _mounts_under(path)
    if left:
        raise CorpusError(f"refusing to delete {path}: still mounted below it: {left}")
    shutil.rmtree(path)


@contextlib.contextmanager
def _locked(lock_path: Path, what: str) -> Iterator[None]:
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _log(f"{what}: being built by another process or thread; waiting")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def cache_dir() -> Path:
    """The cache directory for the current recipe version (not created)."""
    base = os.environ.get(ENV_DIR) or str(Path.home() / ".cache" / "layerstore-corpus")
    return Path(base).expanduser().absolute() / f"r{RECIPE_VERSION}"


def _artifact(name: str, build: Callable[[Path, Path], dict[str, Any]]) -> Path:
    """Return ``<cache>/<name>``, building it first if it does not exist.

    ``build(tmp, log)`` fills the empty directory ``tmp`` and returns metadata for build.json.
    Dependencies must be resolved by the caller *before* this (no lock is held while waiting for
    another artifact, so there is no lock ordering to get wrong).
    """
    root = cache_dir()
    final = root / name
    if final.is_dir():
        return final
    _require_root()
    root.mkdir(parents=True, exist_ok=True)
    (root / ".logs").mkdir(exist_ok=True)
    with _locked(root / f".lock@{name}", name):
        if final.is_dir():
            return final
        for stale in root.glob(f".tmp@{name}@*"):
            _log(f"{name}: removing leftover of an interrupted build: {stale}")
            _remove_tree(stale)
        log = root / ".logs" / f"{name}.log"
        log.write_text(f"# build of {name} started {_now()}\n")
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp@{name}@", dir=root))
        _log(f"{name}: building (log: {log})")
        start = time.monotonic()
        try:
            meta = build(tmp, log)
            seconds = round(time.monotonic() - start, 2)
            meta = {
                "artifact": name,
                "recipe_version": RECIPE_VERSION,
                "built_at": _now(),
                "seconds": seconds,
                **meta,
            }
            (tmp / "build.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
            os.chmod(tmp, 0o755)
            os.sync()  # the data is on disk before the rename makes it visible
            os.rename(tmp, final)
        except BaseException:
            _remove_tree(tmp)
            raise
        _log(f"{name}: built in {seconds:.1f} s -> {final}")
    return final


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def build_info(name: str) -> dict[str, Any]:
    """The ``build.json`` of a built artifact (see :data:`ARTIFACTS` for names)."""
    return json.loads((cache_dir() / name / "build.json").read_text())


# --------------------------------------------------------------------------------------------
# statistics


def _tree_stats(root: Path) -> dict[str, int]:
    counts = {"regular": 0, "dir": 0, "symlink": 0, "char": 0, "block": 0, "fifo": 0, "socket": 0}
    counts |= {"hardlinked": 0, "setuid": 0, "bytes": 0}
    seen: set[int] = set()
    for dirpath, dirnames, filenames in os.walk(root):
        for entry in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, entry))
            mode = st.st_mode
            if stat.S_ISREG(mode):
                counts["regular"] += 1
                counts["setuid"] += bool(mode & stat.S_ISUID)
                if st.st_nlink > 1:
                    counts["hardlinked"] += 1
                    if st.st_ino in seen:
                        continue
                    seen.add(st.st_ino)
                counts["bytes"] += st.st_size
            elif stat.S_ISDIR(mode):
                counts["dir"] += 1
            elif stat.S_ISLNK(mode):
                counts["symlink"] += 1
            elif stat.S_ISCHR(mode):
                counts["char"] += 1
            elif stat.S_ISBLK(mode):
                counts["block"] += 1
            elif stat.S_ISFIFO(mode):
                counts["fifo"] += 1
            elif stat.S_ISSOCK(mode):
                counts["socket"] += 1
    return counts


def _tar_stats(path: Path) -> dict[str, int]:
    counts = {"members": 0, "regular": 0, "dir": 0, "symlink": 0, "hardlink": 0, "char": 0}
    counts |= {"block": 0, "fifo": 0, "setuid": 0, "whiteouts": 0}
    with tarfile.open(path, "r:") as tar:
        for m in tar:
            counts["members"] += 1
            if m.isreg():
                counts["regular"] += 1
                counts["setuid"] += bool(m.mode & stat.S_ISUID)
            elif m.isdir():
                counts["dir"] += 1
            elif m.issym():
                counts["symlink"] += 1
            elif m.islnk():
                counts["hardlink"] += 1
            elif m.ischr():
                counts["char"] += 1
            elif m.isblk():
                counts["block"] += 1
            elif m.isfifo():
                counts["fifo"] += 1
            if os.path.basename(m.name).startswith(".wh."):
                counts["whiteouts"] += 1
    return counts


def _layout_info(layout: Path) -> dict[str, Any]:
    """Tags, manifests and layers of an OCI layout, plus blob totals."""
    blobs = layout / "blobs" / "sha256"

    def load(digest: str) -> Any:
        return json.loads((blobs / digest.split(":", 1)[1]).read_bytes())

    tags: dict[str, Any] = {}
    for desc in json.loads((layout / "index.json").read_text())["manifests"]:
        tag = desc.get("annotations", {}).get("org.opencontainers.image.ref.name", "")
        manifest = load(desc["digest"])
        tags[tag] = {
            "manifest": desc["digest"],
            "config": manifest["config"]["digest"],
            "layers": [
                {
                    "digest": layer["digest"],
                    "size": layer["size"],
                    "mediaType": layer["mediaType"],
                    "annotations": sorted(layer.get("annotations", {})),
                }
                for layer in manifest["layers"]
            ],
        }
    files = [p for p in blobs.iterdir() if p.is_file()]
    return {
        "tags": tags,
        "blobs": len(files),
        "blob_bytes": sum(p.stat().st_size for p in files),
    }


# --------------------------------------------------------------------------------------------
# apt mirror


def _one_line_sources(text: str) -> Iterator[tuple[str, list[str], list[str]]]:
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line.startswith("deb ") and not line.startswith("deb\t"):
            continue
        rest = line[3:].strip()
        if rest.startswith("["):
            end = rest.find("]")
            if end < 0:
                continue
            rest = rest[end + 1 :].strip()
        words = rest.split()
        if len(words) >= 2:
            yield words[0], [words[1]], words[2:]


def _deb822_sources(text: str) -> Iterator[tuple[str, list[str], list[str]]]:
    for para in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        key = None
        for raw in para.splitlines():
            if raw.startswith("#"):
                continue
            if raw[:1] in (" ", "\t") and key is not None:
                fields[key] += " " + raw.strip()
            elif ":" in raw:
                key, _, value = raw.partition(":")
                key = key.strip().lower()
                fields[key] = value.strip()
        if "deb" not in fields.get("types", "").split():
            continue
        if fields.get("enabled", "yes").lower() in ("no", "false", "0"):
            continue
        suites = fields.get("suites", "").split()
        for uri in fields.get("uris", "").split():
            yield uri, suites, fields.get("components", "").split()


def _apt_sources() -> Iterator[tuple[str, list[str], list[str]]]:
    """(uri, suites, components) of every enabled ``deb`` source, in apt's reading order."""
    main = Path("/etc/apt/sources.list")
    if main.is_file():
        yield from _one_line_sources(main.read_text(errors="replace"))
    parts = Path("/etc/apt/sources.list.d")
    if parts.is_dir():
        for path in sorted(parts.iterdir()):
            if path.suffix == ".list":
                yield from _one_line_sources(path.read_text(errors="replace"))
            elif path.suffix == ".sources":
                yield from _deb822_sources(path.read_text(errors="replace"))


def apt_mirror(suite: str = SUITE) -> str:
    """The Debian archive URI this machine's apt uses for ``suite`` (not debian-security).

    ``$LAYERSTORE_CORPUS_MIRROR`` overrides it.  The first enabled ``deb`` source whose suites
    include ``suite`` itself (``bookworm``, so neither ``bookworm-security`` nor
    ``bookworm-updates``) with component ``main`` wins, preferring URIs whose path ends in
    ``/debian``.
    """
    override = os.environ.get(ENV_MIRROR)
    if override:
        return override
    candidates = [
        uri
        for uri, suites, comps in _apt_sources()
        if suite in suites
        and "main" in comps
        and uri.split(":", 1)[0] in ("http", "https", "ftp", "file")
        and "security" not in uri.rstrip("/").rsplit("/", 1)[-1]
    ]
    for uri in candidates:
        if uri.rstrip("/").endswith("/debian"):
            return uri
    if candidates:
        return candidates[0]
    raise CorpusError(
        f"no Debian archive for suite {suite!r} with component main found in "
        f"/etc/apt/sources.list or /etc/apt/sources.list.d/; set ${ENV_MIRROR}"
    )


# --------------------------------------------------------------------------------------------
# minbase v1


def minbase_rootfs() -> Path:
    """Directory with a ``debootstrap --variant=minbase bookworm`` root filesystem (v1).

    Left exactly as debootstrap wrote it.  ``build.json`` next to it (in the parent directory)
    records the mirror, debootstrap's version and how long it took.
    """

    def build(tmp: Path, log: Path) -> dict[str, Any]:
        tool("debootstrap")
        tool("chroot")
        mirror = apt_mirror()
        rootfs = tmp / "rootfs"
        start = time.monotonic()
        try:
            _run(
                ["debootstrap", f"--variant={VARIANT}", SUITE, str(rootfs), mirror], log, env=_env()
            )
        finally:
            for mnt in _mounts_under(rootfs):  # debootstrap mounts proc/sys in its target
                subprocess.run(["umount", "-l", mnt], env=_env(), check=False)
        took = round(time.monotonic() - start, 2)
        return {
            "suite": SUITE,
            "variant": VARIANT,
            "mirror": mirror,
            "debootstrap_version": _package_version("debootstrap"),
            "debootstrap_seconds": took,
            "stats": _tree_stats(rootfs),
        }

    return _artifact("minbase-v1", build) / "rootfs"


# --------------------------------------------------------------------------------------------
# tarballs


def minbase_tar() -> Path:
    """Uncompressed GNU tar of :func:`minbase_rootfs` (numeric owners, xattrs, sorted names)."""
    rootfs = minbase_rootfs()

    def build(tmp: Path, log: Path) -> dict[str, Any]:
        out = tmp / "minbase-v1.tar"
        cmd = ["tar", "--numeric-owner", "--xattrs", "--xattrs-include=*", "--sort=name"]
        _run([*cmd, "-C", str(rootfs), "-cf", str(out), "."], log, env=_env())
        return {
            "tar_version": _package_version("tar"),
            "bytes": out.stat().st_size,
            "stats": _tar_stats(out),
        }

    return _artifact("minbase-v1.tar", build) / "minbase-v1.tar"


def _compressed_tar(suffix: str, cmd: Callable[[Path, Path], list[str]], pkg: str) -> Path:
    src = minbase_tar()
    name = f"minbase-v1.tar.{suffix}"

    def build(tmp: Path, log: Path) -> dict[str, Any]:
        out = tmp / name
        _run(cmd(src, out), log, env=_env())
        return {
            f"{pkg}_version": _package_version(pkg),
            "bytes": out.stat().st_size,
            "uncompressed_bytes": src.stat().st_size,
        }

    return _artifact(name, build) / name


def minbase_tar_gz() -> Path:
    """``gzip -n`` of :func:`minbase_tar` (no name or timestamp in the header)."""

    def cmd(src: Path, out: Path) -> list[str]:
        # gzip writes to stdout; let sh do the redirection so _run can log stderr.
        tool("gzip")
        return ["sh", "-c", 'exec gzip -n -c -- "$1" > "$2"', "sh", str(src), str(out)]

    return _compressed_tar("gz", cmd, "gzip")


def minbase_tar_zst() -> Path:
    """``zstd`` (default level) of :func:`minbase_tar`."""

    def cmd(src: Path, out: Path) -> list[str]:
        return ["zstd", "-q", "--no-progress", str(src), "-o", str(out)]

    return _compressed_tar("zst", cmd, "zstd")


# --------------------------------------------------------------------------------------------
# minbase v2


_CHROOT_ENV = {
    "PATH": _SYS_PATH,
    "HOME": "/root",
    "LC_ALL": "C",
    "DEBIAN_FRONTEND": "noninteractive",
    "DEBCONF_NONINTERACTIVE_SEEN": "true",
}


def _chroot(rootfs: Path, cmd: list[str], log: Path) -> None:
    _run(["chroot", str(rootfs), *cmd], log, env=_CHROOT_ENV)


@contextlib.contextmanager
def _host_resolv_conf(rootfs: Path) -> Iterator[None]:
    """Give the chroot the host's resolv.conf for the duration, restoring the original after."""
    host = Path("/etc/resolv.conf")
    inner = rootfs / "etc" / "resolv.conf"
    saved = rootfs / "etc" / ".resolv.conf.corpus-saved"
    try:
        wanted = host.read_bytes()
    except OSError:
        yield
        return
    try:
        if inner.is_file() and not inner.is_symlink() and inner.read_bytes() == wanted:
            yield
            return
    except OSError:
        pass
    had = os.path.lexists(inner)
    if had:
        os.rename(inner, saved)
    try:
        inner.write_bytes(wanted)
        yield
    finally:
        inner.unlink(missing_ok=True)
        if had:
            os.rename(saved, inner)


def _apt_install(rootfs: Path, log: Path) -> None:
    apt = ["apt-get", "-o", "Dpkg::Use-Pty=0", "-o", "APT::Color=0"]
    install = [*apt, "install", "-y", "--no-install-recommends", *V2_PACKAGES]
    with _host_resolv_conf(rootfs):
        try:
            _chroot(rootfs, install, log)
        except CorpusError:
            _log("minbase-v2: apt-get install failed with debootstrap's lists; running update")
            _chroot(rootfs, [*apt, "update"], log)
            _chroot(rootfs, install, log)
        _chroot(rootfs, [*apt, "clean"], log)


def _fallback_packages(rootfs: Path) -> list[str]:
    """Deterministic stand-in for the apt step: new files (and a symlink and a hardlink)."""
    base = rootfs / "usr" / "local" / "share" / "corpus-v2"
    base.mkdir(parents=True)
    (base / "README").write_text("Files added by the layerstore corpus v2 fallback recipe.\n")
    stream = bytearray()
    counter = 0
    while len(stream) < 256 * 1024:
        stream += hashlib.sha256(b"layerstore-corpus-v2-%d" % counter).digest()
        counter += 1
    (base / "random.bin").write_bytes(bytes(stream))
    licence = rootfs / "usr" / "share" / "common-licenses" / "GPL-3"
    if licence.is_file():
        shutil.copy2(licence, base / "GPL-3.copy")
    os.symlink("README", base / "README.link")
    os.link(base / "random.bin", base / "random.hardlink")
    script = rootfs / "usr" / "local" / "bin" / "corpus-hello"
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text("#!/bin/sh\necho hello from layerstore corpus v2\n")
    script.chmod(0o755)
    return ["usr/local/share/corpus-v2/", "usr/local/bin/corpus-hello"]


def _add_user(rootfs: Path, log: Path) -> str:
    try:
        _chroot(rootfs, ["useradd", "-m", "-s", "/bin/bash", V2_USER], log)
        return "useradd"
    except CorpusError:
        pass
    etc = rootfs / "etc"
    uid = 1000
    with open(etc / "passwd", "a") as f:
        f.write(f"{V2_USER}:x:{uid}:{uid}::/home/{V2_USER}:/bin/bash\n")
    with open(etc / "group", "a") as f:
        f.write(f"{V2_USER}:x:{uid}:\n")
    for name, line in (
        ("shadow", f"{V2_USER}:!:19500:0:99999:7:::\n"),
        ("gshadow", f"{V2_USER}:!::\n"),
    ):
        if (etc / name).exists():
            with open(etc / name, "a") as f:
                f.write(line)
    home = rootfs / "home" / V2_USER
    shutil.copytree(etc / "skel", home, symlinks=True)
    for dirpath, dirnames, filenames in os.walk(home):
        for entry in [dirpath, *(os.path.join(dirpath, n) for n in dirnames + filenames)]:
            os.lchown(entry, uid, uid)
    return "edit-files"


def minbase_v2_rootfs() -> Path:
    """Directory with minbase v2: v1 plus 2 packages, a user, a changed file, deleted directories.

    See the module docstring for the exact recipe and its fallback.
    """
    v1 = minbase_rootfs()

    def build(tmp: Path, log: Path) -> dict[str, Any]:
        tool("cp")
        tool("chroot")
        rootfs = tmp / "rootfs"
        _run(["cp", "-a", "--", str(v1), str(rootfs)], log)
        meta: dict[str, Any] = {"v2_method": "apt", "packages": list(V2_PACKAGES)}
        try:
            if os.environ.get(ENV_NO_APT):
                raise CorpusError(f"${ENV_NO_APT} is set")
            _apt_install(rootfs, log)
        except CorpusError as exc:
            _log(f"minbase-v2: apt in the chroot failed, using the file-level fallback: {exc}")
            _remove_tree(rootfs)
            _run(["cp", "-a", "--", str(v1), str(rootfs)], log)
            meta = {
                "v2_method": "fallback",
                "fallback_reason": str(exc).splitlines()[0],
                "added": _fallback_packages(rootfs),
            }
        meta["user"] = {"name": V2_USER, "method": _add_user(rootfs, log)}
        motd = rootfs / "etc" / "motd"
        with open(motd, "a") as f:
            f.write(V2_MOTD_LINE)
        meta["changed"] = ["etc/motd"]
        deleted = next((d for d in V2_DELETED_DIRS if (rootfs / d).is_dir()), None)
        if deleted is None:
            raise CorpusError(f"none of {V2_DELETED_DIRS} exists in {v1}; cannot delete one")
        _remove_tree(rootfs / deleted)
        lists = rootfs / "var" / "lib" / "apt" / "lists"
        for entry in sorted(lists.iterdir()) if lists.is_dir() else []:
            _remove_tree(entry)
        meta["deleted"] = [deleted + "/", "var/lib/apt/lists/*"]
        meta["stats"] = _tree_stats(rootfs)
        return meta

    return _artifact("minbase-v2", build) / "rootfs"


# --------------------------------------------------------------------------------------------
# OCI layouts


def _round_mtimes_to_seconds(root: Path) -> None:
    """Round every mtime under ``root`` to the nearest second, as Go's archive/tar does.

    umoci's layer tarballs carry whole-second mtimes (rounded), so a tree unpacked by umoci differs
    from debootstrap's originals (nanosecond mtimes).  ``umoci repack`` compares the bundle with
    the mtree it recorded at unpack time, so without this about half of all files (those whose
    fraction is >= .5) would land in the v2 layer again although they did not change.  The
    rounding loses nothing: the layer stores whole seconds anyway.
    """

    def fix(path: str) -> None:
        st = os.lstat(path)
        sec, frac = divmod(abs(st.st_mtime_ns), 1_000_000_000)
        if frac == 0:
            return
        rounded = (sec + (frac >= 500_000_000)) * 1_000_000_000
        if st.st_mtime_ns < 0:
            rounded = -rounded
        os.utime(path, ns=(st.st_atime_ns, rounded), follow_symlinks=False)

    fix(str(root))
    for dirpath, dirnames, filenames in os.walk(root):
        for entry in dirnames + filenames:
            fix(os.path.join(dirpath, entry))


def umoci_layout() -> Path:
    """OCI layout written by umoci with tags ``v1`` (1 layer) and ``v2`` (v1's layer + diff)."""
    v1 = minbase_rootfs()
    v2 = minbase_v2_rootfs()

    def build(tmp: Path, log: Path) -> dict[str, Any]:
        tool("umoci")
        layout = tmp / "layout"
        _run(["umoci", "init", "--layout", str(layout)], log)
        _run(["umoci", "new", "--image", f"{layout}:v1"], log)
        for tag, rootfs, created_by in (
            ("v1", v1, f"debootstrap --variant={VARIANT} {SUITE}"),
            ("v2", v2, "apt-get install " + " ".join(V2_PACKAGES) + f"; useradd {V2_USER}; ..."),
        ):
            # v2 is unpacked from v1 so that repack diffs against v1's layer.
            bundle = tmp / f"bundle-{tag}"
            _run(["umoci", "unpack", "--image", f"{layout}:v1", str(bundle)], log)
            _remove_tree(bundle / "rootfs")
            _run(["cp", "-a", "--", str(rootfs), str(bundle / "rootfs")], log)
            if tag == "v2":
                _round_mtimes_to_seconds(bundle / "rootfs")
            repack = ["umoci", "repack", "--history.created_by", created_by]
            _run([*repack, "--image", f"{layout}:{tag}", str(bundle)], log)
            _remove_tree(bundle)
        return {"umoci_version": _package_version("umoci"), "layout": _layout_info(layout)}

    return _artifact("oci-umoci", build) / "layout"


@functools.cache
def _can_unshare_mounts() -> bool:
    """Whether this process may create a private mount namespace (needs CAP_SYS_ADMIN)."""
    unshare = shutil.which("unshare", path=_env()["PATH"])
    if unshare is None:
        return False
    probe = [unshare, "-m", "--propagation", "private", "true"]
    return subprocess.run(probe, capture_output=True, check=False).returncode == 0


def _skopeo(args: list[str], scratch: Path, log: Path) -> bool:
    """Run skopeo in a private mount namespace where ``/var`` is an overlay onto ``scratch``.

    As root skopeo keeps a blob-info cache in /var/lib/containers/cache; the overlay keeps that
    out of the machine.  Falls back to a plain run (returning False) when the namespace cannot
    be set up or a path involved lives under /var.
    """
    skopeo = tool("skopeo")
    cmd = [skopeo, "--insecure-policy", *args]
    involved = [cache_dir(), scratch]
    under_var = any(os.path.realpath(p).startswith("/var/") for p in involved)
    safe_chars = not any(c in str(scratch) for c in ",:\\")
    if not under_var and safe_chars and _can_unshare_mounts():
        upper, work = scratch / "upper", scratch / "work"
        upper.mkdir(parents=True)
        work.mkdir()
        script = (
            'mount -t overlay overlay -o "lowerdir=/var,upperdir=$1,workdir=$2" /var || exit 97\n'
            'shift 2\nexec "$@"\n'
        )
        wrapped = ["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh"]
        try:
            _run([*wrapped, str(upper), str(work), *cmd], log, env=_env())
            return True
        except CorpusError as exc:
            if "(exit 97)" not in str(exc).splitlines()[0]:
                raise
            _log("skopeo: cannot isolate /var in a mount namespace; running it plainly")
        finally:
            _remove_tree(scratch)
    _run(cmd, log, env=_env())
    return False


def _check_oci_args(version: int, compression: str) -> None:
    if version not in VERSIONS:
        raise ValueError(f"version must be one of {VERSIONS}, not {version!r}")
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression must be one of {COMPRESSIONS}, not {compression!r}")


def oci_layout_name(version: int, compression: str) -> str:
    """Artifact name of :func:`oci_layout` (``oci-zstd-chunked-v2`` ...)."""
    _check_oci_args(version, compression)
    return f"oci-{compression.replace(':', '-')}-v{version}"


def oci_layout(version: int, compression: str) -> Path:
    """OCI layout written by skopeo holding one image, tag ``v{version}``, whose layers are
    compressed with ``compression`` (one of :data:`COMPRESSIONS`)."""
    name = oci_layout_name(version, compression)
    src = umoci_layout()

    def build(tmp: Path, log: Path) -> dict[str, Any]:
        out = tmp / "layout"
        if ":" in str(src) or ":" in str(out):
            raise CorpusError(f"skopeo oci: references cannot hold ':' in paths ({src}, {out})")
        ref = f"v{version}"
        isolated = _skopeo(
            [
                "copy",
                "--quiet",
                "--dest-compress-format",
                compression,
                f"oci:{src}:{ref}",
                f"oci:{out}:{ref}",
            ],
            tmp / "scratch",
            log,
        )
        return {
            "skopeo_version": _package_version("skopeo"),
            "skopeo_isolated_var": isolated,
            "compression": compression,
            "source": f"oci:{src}:{ref}",
            "layout": _layout_info(out),
        }

    return _artifact(name, build) / "layout"


def oci_image_ref(version: int, compression: str) -> str:
    """``oci:PATH:vN`` reference of :func:`oci_layout`, for skopeo/umoci/layerstore."""
    return f"oci:{oci_layout(version, compression)}:v{version}"


# --------------------------------------------------------------------------------------------
# zstd:chunked: verification, hermetic buildah


#: Layer annotation prefixes of the two zstd:chunked variants (older: every Debian 12 writer).
CHUNKED_PREFIXES = {
    "older": "io.containers.zstd-chunked.",
    "current": "io.github.containers.zstd-chunked.",
}
_SKIPPABLE_MAGIC = b"\x50\x2a\x4d\x18"
_FOOTER_MAGIC = {"older": b"GnUlInUx", "current": b"GNUlInUx"}
_FOOTER_SIZE = {"older": 48, "current": 72}
#: Refuse TOCs larger than this (containers/storage's cap).
_TOC_CAP = 150 << 20


def _blob_path(layout: Path, digest: str) -> Path:
    algo, _, hexd = digest.partition(":")
    if algo != "sha256" or not re.fullmatch(r"[0-9a-f]{64}", hexd):
        raise CorpusError(f"{layout}: unexpected digest {digest!r}")
    return layout / "blobs" / algo / hexd


def _layout_image(layout: Path, tag: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(manifest, config) of ``tag`` in an OCI layout."""
    index = json.loads((layout / "index.json").read_text())
    for desc in index["manifests"]:
        if desc.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag:
            manifest = json.loads(_blob_path(layout, desc["digest"]).read_bytes())
            config = json.loads(_blob_path(layout, manifest["config"]["digest"]).read_bytes())
            return manifest, config
    raise CorpusError(f"{layout}: no image tagged {tag!r}")


def _zstd_decompress(data: bytes) -> bytes:
    proc = subprocess.run(
        [tool("zstd"), "-d", "-c", "-q"], input=data, capture_output=True, env=_env(), check=False
    )
    if proc.returncode != 0:
        raise CorpusError(f"zstd -d failed: {proc.stderr.decode(errors='replace').strip()}")
    return proc.stdout


def _zstd_sha256(path: Path) -> tuple[str, int]:
    """sha256 and size of the decompressed stream of ``path`` (every frame, skippable skipped)."""
    h = hashlib.sha256()
    size = 0
    with subprocess.Popen(
        [tool("zstd"), "-d", "-c", "-q", "--", str(path)], stdout=subprocess.PIPE, env=_env()
    ) as proc:
        assert proc.stdout is not None
        while chunk := proc.stdout.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    if proc.returncode != 0:
        raise CorpusError(f"zstd -d {path} failed (exit {proc.returncode})")
    return "sha256:" + h.hexdigest(), size


def read_chunked_toc(
    blob: Path, annotations: dict[str, str]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read and check the TOC of a zstd:chunked blob; returns ``(toc, facts)``.

    Checks, raising :class:`CorpusError` on any failure: the annotations name a variant, the
    sha256 of the compressed TOC bytes at ``manifest-position`` equals ``manifest-checksum``, the
    bytes just before it are a skippable-frame header of that length, and the footer (magic and
    fields) agrees with the annotations.  ``facts`` says what was found.
    """
    variant = next(
        (v for v, pre in CHUNKED_PREFIXES.items() if pre + "manifest-checksum" in annotations),
        None,
    )
    if variant is None:
        raise CorpusError(f"{blob.name}: no zstd:chunked manifest-checksum annotation")
    pre = CHUNKED_PREFIXES[variant]
    checksum = annotations[pre + "manifest-checksum"]
    fields = annotations.get(pre + "manifest-position", "").split(":")
    if len(fields) != 4 or not all(f.isdigit() for f in fields):
        raise CorpusError(f"{blob.name}: bad manifest-position {fields!r}")
    offset, length, ulength, mtype = map(int, fields)
    size = blob.stat().st_size
    if mtype != 1 or length > _TOC_CAP or ulength > _TOC_CAP or offset + length > size:
        raise CorpusError(f"{blob.name}: implausible manifest-position {fields!r} (size {size})")
    with open(blob, "rb") as f:
        f.seek(offset - 8)
        header = f.read(8)
        compressed = f.read(length)
        footer_size = _FOOTER_SIZE[variant]
        f.seek(size - footer_size)
        footer = f.read(footer_size)
    actual = "sha256:" + hashlib.sha256(compressed).hexdigest()
    if actual != checksum:
        raise CorpusError(f"{blob.name}: TOC checksum {actual} != annotation {checksum}")
    if header[:4] != _SKIPPABLE_MAGIC or int.from_bytes(header[4:], "little") != length:
        raise CorpusError(f"{blob.name}: no skippable frame header of length {length} before TOC")
    if (
        footer[:4] != _SKIPPABLE_MAGIC
        or int.from_bytes(footer[4:8], "little") != footer_size - 8
        or footer[-8:] != _FOOTER_MAGIC[variant]
    ):
        raise CorpusError(f"{blob.name}: no {variant}-variant footer")
    words = [int.from_bytes(footer[i : i + 8], "little") for i in range(8, footer_size - 8, 8)]
    if words[:4] != [offset, length, ulength, mtype]:
        raise CorpusError(f"{blob.name}: footer {words[:4]} disagrees with annotation {fields}")
    raw = _zstd_decompress(compressed)
    if len(raw) != ulength:
        raise CorpusError(f"{blob.name}: TOC is {len(raw)} bytes, annotation says {ulength}")
    toc = json.loads(raw)
    entries = toc.get("entries", [])
    facts = {
        "variant": variant,
        "annotation_prefix": pre,
        "manifest_checksum": checksum,
        "manifest_position": annotations[pre + "manifest-position"],
        "toc_checksum_ok": True,
        "footer_bytes": footer_size,
        "toc_version": toc.get("version"),
        "toc_entries": len(entries),
        "toc_regular_files": sum(e.get("type") == "reg" for e in entries),
        "toc_chunk_entries": sum(e.get("type") == "chunk" for e in entries),
        "has_tar_split": pre + "tarsplit-position" in annotations,
    }
    return toc, facts


def zstd_chunked_info(layout: Path, tag: str, verify_diff_ids: bool = True) -> list[dict[str, Any]]:
    """Check every layer of ``tag`` in an OCI layout is zstd:chunked; one dict per layer.

    Beyond :func:`read_chunked_toc`: the media type is ``tar+zstd`` and (``verify_diff_ids``)
    the sha256 of the whole decompressed blob equals the config's DiffID.
    """
    manifest, config = _layout_image(layout, tag)
    diff_ids = config["rootfs"]["diff_ids"]
    if len(diff_ids) != len(manifest["layers"]):
        raise CorpusError(
            f"{layout}:{tag}: {len(manifest['layers'])} layers, {len(diff_ids)} DiffIDs"
        )
    out = []
    for desc, diff_id in zip(manifest["layers"], diff_ids, strict=True):
        if desc["mediaType"] != "application/vnd.oci.image.layer.v1.tar+zstd":
            raise CorpusError(f"{layout}:{tag}: layer media type {desc['mediaType']}")
        blob = _blob_path(layout, desc["digest"])
        _, facts = read_chunked_toc(blob, desc.get("annotations", {}))
        info = {"digest": desc["digest"], "size": desc["size"], "diff_id": diff_id, **facts}
        if verify_diff_ids:
            got, tar_bytes = _zstd_sha256(blob)
            if got != diff_id:
                raise CorpusError(f"{blob}: decompressed sha256 {got} != DiffID {diff_id}")
            info |= {"diff_id_verified": True, "tar_bytes": tar_bytes}
        out.append(info)
    return out


def _toc_files(layout: Path, tag: str) -> dict[str, tuple[str, int]]:
    """Regular files of every layer of ``tag``: normalized name → (sha256 digest, size)."""
    manifest, _ = _layout_image(layout, tag)
    files: dict[str, tuple[str, int]] = {}
    for desc in manifest["layers"]:
        toc, _ = read_chunked_toc(_blob_path(layout, desc["digest"]), desc.get("annotations", {}))
        for e in toc.get("entries", []):
            if e.get("type") == "reg":
                name = os.path.normpath("/" + e["name"]).lstrip("/")
                files[name] = (e.get("digest", ""), int(e.get("size", 0)))
    return files


def _shared_files(
    old: dict[str, tuple[str, int]], new: dict[str, tuple[str, int]]
) -> dict[str, Any]:
    same = [n for n, v in new.items() if old.get(n) == v]
    by_digest = {d for d, _ in old.values()}
    content = [n for n, (d, _) in new.items() if d in by_digest]
    return {
        "files": len(new),
        "same_name_and_content": len(same),
        "same_content": len(content),
        "bytes": sum(s for _, s in new.values()),
        "same_content_bytes": sum(new[n][1] for n in content),
        "fraction_same_content": round(len(content) / max(1, len(new)), 4),
    }


def private_ns_prefix(
    scratch: Path, dirs: tuple[str, ...] = ("/var", "/run"), keep: tuple[Path, ...] = ()
) -> list[str] | None:
    """argv prefix running a command in a private mount namespace in which each of ``dirs`` is
    an overlay (lower: the real directory, upper: a new directory under ``scratch``).

    Whatever the command writes there (as root, containers tools write
    ``/var/lib/containers/cache``, ``/var/tmp``, ``/run/containers``, ``/run/libpod`` ...) lands in
    ``scratch`` and disappears with it; the mounts die with the namespace.  Returns None when
    that is impossible here (no CAP_SYS_ADMIN, no ``unshare``), or when ``scratch`` or a path in
    ``keep`` (something the command must really write) lies inside one of ``dirs``.
    """
    if not _can_unshare_mounts():
        return None
    involved = [os.path.realpath(p) for p in (scratch, *keep)]
    wanted = [d for d in dirs if os.path.isdir(d)]
    if any(p == d or p.startswith(d + "/") for p in involved for d in wanted):
        return None
    if any(c in str(scratch) for c in ",:\\"):
        return None
    args: list[str] = []
    for i, d in enumerate(wanted):
        upper, work = scratch / f"ns-upper-{i}", scratch / f"ns-work-{i}"
        upper.mkdir(parents=True)
        work.mkdir()
        args += [d, str(upper), str(work)]
    script = (
        'n=$1; shift; while [ "$n" -gt 0 ]; do\n'
        '  mount -t overlay overlay -o "lowerdir=$1,upperdir=$2,workdir=$3" "$1" || exit 97\n'
        "  shift 3; n=$((n - 1)); done\n"
        'exec "$@"\n'
    )
    unshare = tool("unshare")
    return [
        unshare,
        "-m",
        "--propagation",
        "private",
        "sh",
        "-c",
        script,
        "sh",
        str(len(wanted)),
        *args,
    ]


def containers_storage_conf(
    scratch: Path, driver: str = "vfs", partial: bool | None = None
) -> dict[str, str]:
    """Write a storage.conf, containers.conf and policy.json under ``scratch`` (graph root and run
    root inside it) and return the environment that points buildah/podman/skopeo at them.

    ``partial`` sets ``[storage.options.pull_options] enable_partial_images``.
    """
    scratch.mkdir(parents=True, exist_ok=True)
    for sub in ("graph", "runroot", "tmp"):
        (scratch / sub).mkdir(exist_ok=True)
    lines = [
        "[storage]",
        f'driver = "{driver}"',
        f'graphroot = "{scratch / "graph"}"',
        f'runroot = "{scratch / "runroot"}"',
    ]
    if partial is not None:
        lines += [
            "[storage.options.pull_options]",
            f'enable_partial_images = "{str(partial).lower()}"',
        ]
    (scratch / "storage.conf").write_text("\n".join(lines) + "\n")
    (scratch / "containers.conf").write_text(
        "[engine]\n"
        f'tmp_dir = "{scratch / "tmp"}"\n'
        'events_logger = "none"\n'
        'cgroup_manager = "cgroupfs"\n'
    )
    (scratch / "policy.json").write_text(
        json.dumps({"default": [{"type": "insecureAcceptAnything"}]}) + "\n"
    )
    env = _env()
    env |= {
        "CONTAINERS_STORAGE_CONF": str(scratch / "storage.conf"),
        "CONTAINERS_CONF": str(scratch / "containers.conf"),
        "TMPDIR": str(scratch / "tmp"),
    }
    return env


_BUILDAH_SCRIPT = """set -eu
rootfs=$1 out=$2 ref=$3 created_by=$4 policy=$5 root=$6 runroot=$7
b() { buildah --root "$root" --runroot "$runroot" --storage-driver vfs "$@"; }
ctr=$(b from --quiet --signature-policy "$policy" --name corpus scratch)
mnt=$(b mount "$ctr")
cp -a -- "$rootfs/." "$mnt/"
b umount "$ctr"
b config --created-by "$created_by" "$ctr"
b commit --quiet --format oci --signature-policy "$policy" "$ctr" "localhost/corpus:$ref"
b push --quiet --signature-policy "$policy" --compression-format zstd:chunked \
  "localhost/corpus:$ref" "oci:$out:$ref"
b rm "$ctr"
b rmi --all
"""


def buildah_chunked_layout_name(version: int) -> str:
    """Artifact name of :func:`buildah_chunked_layout` (``oci-buildah-zstd-chunked-v2`` ...)."""
    _check_oci_args(version, "zstd:chunked")
    return f"oci-buildah-zstd-chunked-v{version}"


def buildah_chunked_layout(version: int) -> Path:
    """OCI layout written by buildah holding one image, tag ``v{version}``: a single zstd:chunked
    layer with the whole minbase v{version} root filesystem (see the module docstring)."""
    name = buildah_chunked_layout_name(version)
    rootfs = minbase_rootfs() if version == 1 else minbase_v2_rootfs()
    v1 = buildah_chunked_layout(1) if version == 2 else None

    def build(tmp: Path, log: Path) -> dict[str, Any]:
        tool("buildah")
        tool("cp")
        out = tmp / "layout"
        if ":" in str(out):
            raise CorpusError(f"buildah oci: references cannot hold ':' in paths ({out})")
        scratch = tmp / "scratch"
        env = containers_storage_conf(scratch, driver="vfs")
        prefix = private_ns_prefix(scratch, keep=(out, rootfs))
        created_by = (
            f"debootstrap --variant={VARIANT} {SUITE}"
            if version == 1
            else "apt-get install " + " ".join(V2_PACKAGES) + f"; useradd {V2_USER}; ..."
        )
        ref = f"v{version}"
        args = [str(rootfs), str(out), ref, created_by, str(scratch / "policy.json")]
        args += [str(scratch / "graph"), str(scratch / "runroot")]
        cmd = ["sh", "-c", _BUILDAH_SCRIPT, "sh", *args]
        try:
            if prefix is None:
                _log(f"{name}: cannot isolate /var and /run in a mount namespace; running plainly")
                _run(cmd, log, env=env)
            else:
                _run([*prefix, *cmd], log, env=env)
        finally:
            _remove_tree(scratch)
        meta: dict[str, Any] = {
            "buildah_version": _package_version("buildah"),
            "buildah_isolated": prefix is not None,
            "compression": "zstd:chunked",
            "source": str(rootfs),
            "layout": _layout_info(out),
            "zstd_chunked": zstd_chunked_info(out, ref),
        }
        if v1 is not None:
            shared = _shared_files(_toc_files(v1, "v1"), _toc_files(out, ref))
            if shared["fraction_same_content"] < 0.5:
                raise CorpusError(f"{name}: v2 shares too few files with v1: {shared}")
            meta["shared_with_v1"] = shared
        return meta

    return _artifact(name, build) / "layout"


def buildah_chunked_image_ref(version: int) -> str:
    """``oci:PATH:vN`` reference of :func:`buildah_chunked_layout`."""
    return f"oci:{buildah_chunked_layout(version)}:v{version}"


# --------------------------------------------------------------------------------------------
# registry of artifacts and command line


def _oci_builder(version: int, compression: str) -> Callable[[], Path]:
    def build() -> Path:
        return oci_layout(version, compression)

    build.__name__ = f"oci_layout({version}, {compression!r})"
    return build


def _buildah_builder(version: int) -> Callable[[], Path]:
    def build() -> Path:
        return buildah_chunked_layout(version)

    build.__name__ = f"buildah_chunked_layout({version})"
    return build


#: artifact name → function returning its path (building it if needed), in build order.
ARTIFACTS: dict[str, Callable[[], Path]] = {
    "minbase-v1": minbase_rootfs,
    "minbase-v1.tar": minbase_tar,
    "minbase-v1.tar.gz": minbase_tar_gz,
    "minbase-v1.tar.zst": minbase_tar_zst,
    "minbase-v2": minbase_v2_rootfs,
    "oci-umoci": umoci_layout,
    **{oci_layout_name(v, c): _oci_builder(v, c) for c in COMPRESSIONS for v in VERSIONS},
    **{buildah_chunked_layout_name(v): _buildah_builder(v) for v in VERSIONS},
}


def build_all(jobs: int = 2) -> dict[str, Path]:
    """Build (or find) every artifact; returns name → path."""
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = {name: pool.submit(fn) for name, fn in ARTIFACTS.items()}
        return {name: fut.result() for name, fut in futures.items()}


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _describe(name: str) -> str:
    info = build_info(name)
    if "stats" in info and "members" not in info["stats"]:
        s = info["stats"]
        return (
            f"{_human(s['bytes'])} in {s['regular']} files, {s['dir']} dirs, "
            f"{s['symlink']} symlinks, {s['char']} char devs, {s['hardlinked']} hardlinked, "
            f"{s['setuid']} setuid"
        )
    if "stats" in info:
        s = info["stats"]
        return (
            f"{_human(info['bytes'])}, {s['members']} members: {s['regular']} files, "
            f"{s['hardlink']} hardlinks, {s['symlink']} symlinks, {s['char']} char devs, "
            f"{s['setuid']} setuid"
        )
    if "layout" in info:
        lay = info["layout"]
        tags = ", ".join(
            f"{tag}: {len(t['layers'])} layer(s) "
            + "+".join(_human(layer["size"]) for layer in t["layers"])
            for tag, t in sorted(lay["tags"].items())
        )
        return f"{_human(lay['blob_bytes'])} in {lay['blobs']} blobs; {tags}"
    return f"{_human(info['bytes'])} (from {_human(info['uncompressed_bytes'])})"


def main(argv: list[str] | None = None) -> int:
    """Command line entry point; see the module docstring."""
    parser = argparse.ArgumentParser(prog="python -m testdata", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_build = sub.add_parser("build", help="build every artifact, print paths, sizes, counts")
    p_build.add_argument("-j", "--jobs", type=int, default=2, help="parallel builds (default 2)")
    p_path = sub.add_parser("path", help="print the path of one artifact (building it if needed)")
    p_path.add_argument("name", choices=sorted(ARTIFACTS))
    sub.add_parser("list", help="list artifact names and whether they are built")
    args = parser.parse_args(argv)

    try:
        if args.command == "path":
            print(ARTIFACTS[args.name]())
        elif args.command == "list":
            for name in ARTIFACTS:
                built = (cache_dir() / name / "build.json").is_file()
                print(f"{name:28} {'built' if built else '-'}")
        else:
            was_built = {n: (cache_dir() / n).is_dir() for n in ARTIFACTS}
            start = time.monotonic()
            paths = build_all(args.jobs)
            total = time.monotonic() - start
            print(f"cache: {cache_dir()}")
            for name, path in paths.items():
                info = build_info(name)
                how = "cached" if was_built[name] else f"built in {info['seconds']:.1f} s"
                print(f"{name:28} {how:18} {path}\n{'':28} {_describe(name)}")
            print(f"total: {total:.1f} s")
    except CorpusError as exc:
        print(f"corpus: error: {exc}", file=sys.stderr)
        return 1
    return 0
