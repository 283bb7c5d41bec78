"""Shared fixtures: stores, real reflink loop filesystems (XFS, btrfs), tar builders.

Loop filesystems need root and mkfs.xfs / mkfs.btrfs (``./dev test`` installs them as root).
Where they cannot be made, the tests that need them are skipped *loudly*: a warning names the
reason, and with LAYERSTORE_REQUIRE_LOOPFS=1 (set by .ci/run) the skip becomes a failure so CI
can never pass without them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import fuzzing  # noqa: F401 - registers and loads the hypothesis profile (ci / long)
import pytest

from layerstore import Store

IS_ROOT = os.geteuid() == 0
REQUIRE_LOOPFS = os.environ.get("LAYERSTORE_REQUIRE_LOOPFS") == "1"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    st = Store.init(str(tmp_path / "store"))
    yield st
    st.close()


class LoopFS:
    """A mounted loop filesystem; ``path`` is its (writable) mount point."""

    def __init__(self, kind: str, path: Path, image: Path) -> None:
        self.kind = kind
        self.path = path
        self.image = image

    def free_bytes(self) -> int:
        subprocess.run(["sync", "-f", str(self.path)], check=False)
        st = os.statvfs(self.path)
        return st.f_bavail * st.f_frsize

    def __repr__(self) -> str:
        return f"LoopFS({self.kind})"


def _loopfs_unavailable(kind: str) -> str | None:
    if not IS_ROOT:
        return "not running as root (loop mounts need root)"
    tool = {"xfs": "mkfs.xfs", "btrfs": "mkfs.btrfs"}[kind]
    if shutil.which(tool) is None:
        pkg = "xfsprogs" if kind == "xfs" else "btrfs-progs"
        return f"{tool} is not installed (apt-get install {pkg})"
    return None


def _skip_loud(reason: str) -> None:
    msg = f"LOOP-FS TEST SKIPPED: {reason}. Reflink behaviour is NOT being tested."
    warnings.warn(msg, stacklevel=2)
    print("\n" + "!" * 20 + " " + msg, file=sys.stderr)
    if REQUIRE_LOOPFS:
        pytest.fail(msg + " (LAYERSTORE_REQUIRE_LOOPFS=1 forbids skipping)")
    pytest.skip(msg)


def make_loopfs(kind: str, base: Path, size: str = "3G") -> LoopFS:
    reason = _loopfs_unavailable(kind)
    if reason:
        _skip_loud(reason)
    image = base / f"{kind}.img"
    mnt = base / f"{kind}-mnt"
    mnt.mkdir()
    subprocess.run(["truncate", "-s", size, str(image)], check=True)
    mkfs = (
        ["mkfs.xfs", "-q", "-f", "-m", "reflink=1", str(image)]
        if kind == "xfs"
        else ["mkfs.btrfs", "-q", "-f", str(image)]
    )
    r = subprocess.run(mkfs, capture_output=True, text=True)
    if r.returncode:
        _skip_loud(f"{mkfs[0]} failed: {r.stderr.strip()}")
    r = subprocess.run(
        ["mount", "-o", "loop", str(image), str(mnt)], capture_output=True, text=True
    )
    if r.returncode:
        _skip_loud(f"mounting a {kind} loop filesystem failed: {r.stderr.strip()}")
    return LoopFS(kind, mnt, image)


def unmount(fs: LoopFS) -> None:
    subprocess.run(["umount", "-l", str(fs.path)], check=False)
    try:
        fs.image.unlink()
    except FileNotFoundError:
        pass


@pytest.fixture(scope="session", params=["xfs", "btrfs"])
def loopfs(request: pytest.FixtureRequest) -> Iterator[LoopFS]:
    """A real reflink-capable filesystem (XFS with reflink=1, or btrfs) for the session."""
    base = Path(tempfile.mkdtemp(prefix=f"layerstore-{request.param}-"))
    fs = make_loopfs(request.param, base)
    yield fs
    unmount(fs)
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def scratch_xfs(tmp_path: Path) -> Iterator[LoopFS]:
    """A private XFS (reflink) loop fs for one big test: unmounting beats deleting 100k files."""
    fs = make_loopfs("xfs", tmp_path, size="4G")
    yield fs
    unmount(fs)


@pytest.fixture
def loopdir(loopfs: LoopFS, request: pytest.FixtureRequest) -> Iterator[Path]:
    """A fresh directory on the loop filesystem for one test."""
    d = Path(tempfile.mkdtemp(dir=loopfs.path, prefix="t-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def gnu_tar(src: Path, out: Path, *extra: str, fmt: str = "pax") -> Path:
    """Make a tar with GNU tar (a real tool) from a directory, deterministic order."""
    subprocess.run(
        [
            "tar",
            f"--format={fmt}",
            "--numeric-owner",
            "--xattrs",
            "--xattrs-include=*",
            "--sort=name",
            *extra,
            "-C",
            str(src),
            "-cf",
            str(out),
            ".",
        ],
        check=True,
    )
    return out


def gnu_untar_cmd(tarball: Path, dest: Path) -> list[str]:
    """The ``tar -x`` command line of :func:`gnu_untar` (the fuzz tests' oracle runs it too)."""
    return [
        "tar",
        "--numeric-owner",
        "--same-owner",
        "-p",
        "--xattrs",
        "--xattrs-include=*",
        "-C",
        str(dest),
        "-xf",
        str(tarball),
    ]


def gnu_untar(tarball: Path, dest: Path) -> Path:
    """``tar -x`` the way a container engine would: owners, modes, xattrs preserved."""
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run(gnu_untar_cmd(tarball, dest), check=True)
    return dest


def need_corpus(fn, *args):  # type: ignore[no-untyped-def]
    """Build/fetch a real-data corpus artifact.  As root (CI) a build failure is a failure;
    elsewhere the test is skipped loudly."""
    import testdata as corpus

    try:
        return fn(*args)
    except corpus.CorpusError as exc:
        if IS_ROOT:
            raise
        pytest.skip(f"REAL-DATA TEST SKIPPED: {exc}")
