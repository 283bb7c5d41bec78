"""The store as an unprivileged user uses it: its own default store under its home (issue 11).

Run as a real non-root uid (``setpriv`` to nobody), not by faking ``geteuid``: what matters is
what the kernel refuses.  Import must record ownership, setuid bits and devices exactly as the
layer says (export gives the same tar back); materialize creates what the user may create and
*reports* the rest (ownership, device nodes) instead of faking it silently -- what rootless
podman's storage does without a user namespace.  Needs root to switch users, so CI (root) runs
it; elsewhere it is skipped loudly.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

NOBODY = 65534


def _layer() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:

        def add(name: str, type_: bytes, data: bytes = b"", **kw: object) -> None:
            ti = tarfile.TarInfo(name)
            ti.type, ti.mtime, ti.size = type_, 1_700_000_000, len(data)
            for k, v in {"mode": 0o644, "uid": 0, "gid": 0, **kw}.items():
                setattr(ti, k, v)
            tf.addfile(ti, io.BytesIO(data) if data else None)

        add("etc", tarfile.DIRTYPE, mode=0o755)
        add("etc/shadow", tarfile.REGTYPE, b"root:*:19000::::::\n" * 10, mode=0o640, gid=42)
        add("usr", tarfile.DIRTYPE, mode=0o755)
        add("usr/su", tarfile.REGTYPE, b"\x7fELF" + bytes(200), mode=0o4755)
        add("home", tarfile.DIRTYPE, mode=0o755)
        add("home/alice", tarfile.REGTYPE, b"alice's file " * 20, uid=1000, gid=1000)
        add("dev", tarfile.DIRTYPE, mode=0o755)
        add("dev/null", tarfile.CHRTYPE, mode=0o666, devmajor=1, devminor=3)
        add("dev/sda", tarfile.BLKTYPE, mode=0o660, devmajor=8, devminor=0, gid=6)
        add("run.fifo", tarfile.FIFOTYPE, mode=0o600)
        add("link", tarfile.SYMTYPE, linkname="usr/su")
    return buf.getvalue()


@pytest.fixture
def home() -> Iterator[Path]:
    if os.geteuid() != 0:
        if os.environ.get("LAYERSTORE_REQUIRE_LOOPFS") == "1":
            raise AssertionError("the rootless test needs root to switch to a real user")
        pytest.skip("ROOTLESS TEST SKIPPED: needs root to run as a real unprivileged user")
    if shutil.which("setpriv") is None:
        raise AssertionError("setpriv (util-linux) is missing: ./dev test installs it")
    base = Path(tempfile.mkdtemp(prefix="layerstore-rootless-", dir="/tmp"))
    base.chmod(0o755)  # pytest's own tmp dirs are 0700 root: nobody could not enter them
    h = base / "home"
    h.mkdir()
    os.chown(h, NOBODY, NOBODY)
    try:
        yield h
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _as_nobody(home: Path, *args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LAYERSTORE_", "XDG_"))}
    env.update(HOME=str(home), PYTHONDONTWRITEBYTECODE="1")
    return subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
        + [sys.executable, "-m", "layerstore", *args],
        input=stdin,
        capture_output=True,
        env=env,
        cwd=home,
        timeout=120,
    )


def _ok(p: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert p.returncode == 0, p.stderr.decode()
    return p


def test_rootless_store_records_faithfully_and_reports_what_it_cannot_create(home: Path):
    blob = _layer()
    diff = "sha256:" + hashlib.sha256(blob).hexdigest()
    imp = json.loads(_ok(_as_nobody(home, "--json", "import", "-", stdin=blob)).stdout)
    assert imp["diff_id"] == diff
    store = home / ".local" / "share" / "layerstore"
    assert store.is_dir() and store.stat().st_uid == NOBODY  # its own default store

    # Import keeps what the layer says, not what this user could create.
    show = json.loads(_ok(_as_nobody(home, "--json", "show", diff, "--entries")).stdout)
    ents = {e["path"]: e for e in show["entries_list"]}
    assert (ents["etc/shadow"]["uid"], ents["etc/shadow"]["gid"]) == (0, 42)
    assert ents["home/alice"]["uid"] == 1000
    assert int(ents["usr/su"]["mode"], 8) & 0o7777 == 0o4755
    assert ents["dev/null"]["type"] == "char"
    assert ents["dev/sda"]["type"] == "block" and ents["dev/sda"]["gid"] == 6

    # The exact tar comes back (ownership and devices were recorded, not dropped).
    out = home / "back.tar"
    _ok(_as_nobody(home, "export", diff, "-o", str(out)))
    assert hashlib.sha256(out.read_bytes()).hexdigest() == diff[7:]

    # Materialize: what nobody may create is created, the rest is reported, never faked.
    dest = home / "rootfs"
    mat = _as_nobody(home, "--json", "materialize", diff, str(dest), "--mode", "copy")
    res = json.loads(_ok(mat).stdout)
    assert res["skipped"].get("ownership", 0) >= 4, res["skipped"]
    assert res["skipped"].get("device") == 2, res["skipped"]
    for p in dest.rglob("*"):
        assert p.lstat().st_uid == NOBODY, p  # no file pretends to belong to root
    assert not (dest / "dev" / "null").exists() and not (dest / "dev" / "sda").exists()
    assert stat.S_ISFIFO((dest / "run.fifo").lstat().st_mode)
    assert os.readlink(dest / "link") == "usr/su"
    assert (dest / "etc" / "shadow").read_bytes() == b"root:*:19000::::::\n" * 10

    # The maintenance tools work for that user on that store.
    assert _ok(_as_nobody(home, "fsck")).returncode == 0
    _ok(_as_nobody(home, "rm", diff))
    gc = json.loads(_ok(_as_nobody(home, "--json", "gc")).stdout)
    assert gc["objects_freed"] >= 3
    assert _ok(_as_nobody(home, "fsck")).returncode == 0
