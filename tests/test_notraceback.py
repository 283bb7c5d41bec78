"""No traceback, ever: every subcommand against a table of broken environments (issue 11).

Each row breaks a copy of one small store (one layer, one image) in one way an operator meets
(a lost directory, a file where a directory belongs, a garbage index, a read-only mount, a full
disk); every subcommand then runs against it as a user would (a real process).  The test fails
on any traceback, on an exit code the README does not document for that command, on exit 1
("unexpected": an error nobody diagnosed), and on a failure that says nothing.  Rows that need
root (mounts) are skipped loudly without it; CI runs as root.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from test_cli import cli
from test_hostile import dir_, make_tar, reg, sym
from test_oci import _layout

IS_ROOT = os.geteuid() == 0

LAYER = make_tar(dir_("etc"), reg("etc/hostname", b"box\n"), reg("big", os.urandom(9000)))
UPPER = make_tar(reg("etc/.wh.hostname", b""), sym("link", "big"))
DIFF = "sha256:" + hashlib.sha256(LAYER).hexdigest()

# Exit codes the README documents, per command.  1 ("unexpected error") is never acceptable
# for a broken environment: it means the failure was not diagnosed.
COMMON = {0, 2, 3, 4, 5, 6, 7, 9}
FSCK = {0, 1, 4, 8}


def _commands(tmp: Path) -> list[tuple[str, list[str], set[int]]]:
    short = DIFF[7:19]
    return [
        ("init", ["init"], COMMON),
        ("import", ["import", str(tmp / "layer.tar")], COMMON),
        ("import-stdin", ["import", "-"], COMMON),
        ("import-oci", ["import-oci", f"{tmp / 'layout'}:t", "--name", "other"], COMMON),
        ("ls", ["ls"], COMMON),
        ("show", ["show", short, "--entries"], COMMON),
        ("images", ["images"], COMMON),
        ("materialize", ["materialize", short, str(tmp / "out" / "m")], COMMON),
        ("materialize-image", ["materialize", "app", str(tmp / "out" / "i")], COMMON),
        ("export", ["export", short, "-o", str(tmp / "out" / "l.tar")], COMMON),
        ("export-oci", ["export-oci", "app", str(tmp / "out" / "lay")], COMMON),
        ("tag", ["tag", "app", "app:two"], COMMON),
        ("rmi", ["rmi", "app"], COMMON),
        ("rm", ["rm", short], COMMON),
        ("du", ["du"], COMMON),
        ("chunk-index", ["chunk-index"], COMMON),
        ("gc-dry", ["gc", "--dry-run"], COMMON),
        ("gc", ["gc"], COMMON),
        ("fsck-quick", ["fsck", "--quick"], FSCK),
        ("fsck", ["fsck"], FSCK),
        ("fsck-repair", ["fsck", "--repair", "--source", str(tmp / "layer.tar")], FSCK),
        ("fsck-rebuild", ["fsck", "--rebuild-index"], FSCK),
    ]


def _run(store: Path, args: list[str], stdin: bytes) -> subprocess.CompletedProcess[bytes]:
    return cli(store, *args, stdin=stdin)


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A healthy store with a layer and an image, made once and copied per case."""
    base = tmp_path_factory.mktemp("tmpl")
    (base / "layer.tar").write_bytes(LAYER)
    _layout(base / "layout", [LAYER, UPPER])
    st = base / "store"
    for args in (["init"], ["import", str(base / "layer.tar")]):
        assert _run(st, args, b"").returncode == 0
    p = _run(st, ["import-oci", f"{base / 'layout'}:t", "--name", "app"], b"")
    assert p.returncode == 0, p.stderr.decode()
    return base


def _rm(rel: str) -> Callable[[Path], None]:
    def f(st: Path) -> None:
        p = st / rel
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()

    return f


def _file_for(rel: str) -> Callable[[Path], None]:
    def f(st: Path) -> None:
        _rm(rel)(st)
        (st / rel).write_bytes(b"not a directory\n")

    return f


def _garbage(rel: str) -> Callable[[Path], None]:
    def f(st: Path) -> None:
        p = st / rel
        n = p.stat().st_size
        p.write_bytes(os.urandom(max(n, 8192)))

    return f


def _dir_for(rel: str) -> Callable[[Path], None]:
    def f(st: Path) -> None:
        (st / rel).unlink()
        (st / rel).mkdir()

    return f


def _text(rel: str, data: bytes) -> Callable[[Path], None]:
    def f(st: Path) -> None:
        (st / rel).write_bytes(data)

    return f


def _whole_store_gone(st: Path) -> None:
    shutil.rmtree(st)


def _store_is_file(st: Path) -> None:
    shutil.rmtree(st)
    st.write_bytes(b"oops\n")


def _object_files(st: Path) -> list[Path]:
    return [p for p in (st / "objects").rglob("*") if p.is_file()]


def _lose_an_object(st: Path) -> None:
    max(_object_files(st), key=lambda p: p.stat().st_size).unlink()


ROWS: dict[str, Callable[[Path], None]] = {
    "store-missing": _whole_store_gone,
    "store-is-a-file": _store_is_file,
    "objects-missing": _rm("objects"),
    "objects-is-a-file": _file_for("objects"),
    "index-missing": _rm("index"),
    "index-is-a-file": _file_for("index"),
    "data.mdb-garbage": _garbage("index/data.mdb"),
    "data.mdb-empty": _text("index/data.mdb", b""),
    "data.mdb-is-a-dir": _dir_for("index/data.mdb"),
    "layers-missing": _rm("layers"),
    "layers-is-a-file": _file_for("layers"),
    "staging-is-a-file": _file_for("staging"),
    "leases-is-a-file": _file_for("leases"),
    "format-file-garbage": _text("layerstore.json", b"{\n"),
    "format-file-missing": _rm("layerstore.json"),
    "an-object-lost": _lose_an_object,
}


def _check_all(case: Path, store: Path, row: str) -> None:
    """Run every subcommand on its own copy of the broken store, report every bad outcome."""
    cmds = _commands(case)
    (case / "out").mkdir(exist_ok=True)

    def one(cmd: tuple[str, list[str], set[int]]) -> str | None:
        name, args, allowed = cmd
        own = case / f"s-{name}"
        if os.path.lexists(store):
            subprocess.run(["cp", "-a", str(store), str(own)], check=True)
        p = _run(own, [a.replace(str(store), str(own)) for a in args], LAYER)
        err = p.stderr.decode(errors="replace")
        if "Traceback" in err:
            return f"{name}: traceback (exit {p.returncode}):\n{err[-1500:]}"
        if p.returncode not in allowed:
            return f"{name}: exit {p.returncode} is not documented here: {err[-400:]}"
        if p.returncode not in (0, 1) and not (err.strip() or p.stdout.strip()):
            return f"{name}: exit {p.returncode} with no message"
        return None

    with ThreadPoolExecutor(4) as pool:
        bad = [r for r in pool.map(one, cmds) if r]
    assert not bad, f"row {row!r}:\n" + "\n".join(bad)


def _case(template: Path, tmp_path: Path) -> tuple[Path, Path]:
    shutil.copy(template / "layer.tar", tmp_path / "layer.tar")
    shutil.copytree(template / "layout", tmp_path / "layout")
    st = tmp_path / "store"
    subprocess.run(["cp", "-a", str(template / "store"), str(st)], check=True)
    return tmp_path, st


@pytest.mark.parametrize("row", list(ROWS))
def test_every_command_in_a_broken_store(template: Path, tmp_path: Path, row: str) -> None:
    case, st = _case(template, tmp_path)
    ROWS[row](st)
    _check_all(case, st, row)


def _need_root(what: str) -> None:
    if not IS_ROOT:
        if os.environ.get("LAYERSTORE_REQUIRE_LOOPFS") == "1":
            raise AssertionError(f"{what} needs root, and CI requires it")
        pytest.skip(f"ROOT-ONLY TEST SKIPPED: {what} needs root (mount)")


@pytest.mark.parametrize("kind", ["read-only", "full"])
def test_every_command_on_a_readonly_or_full_store(template: Path, tmp_path: Path, kind: str):
    """The store on its own small tmpfs, mounted read-only or filled to the last block."""
    _need_root(f"the {kind} store row")
    case, st = _case(template, tmp_path)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)], check=True)
    try:
        subprocess.run(["cp", "-a", f"{st}/.", str(mnt)], check=True)
        if kind == "read-only":
            subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        else:
            for i, chunk in enumerate((1 << 20, 4096, 1)):  # to the last byte
                try:
                    with open(mnt / f"filler{i}", "wb") as f:
                        while True:
                            f.write(b"\0" * chunk)
                            f.flush()
                except OSError:
                    pass
        _check_all_on_mount(case, mnt, kind)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _check_all_on_mount(case: Path, mnt: Path, row: str) -> None:
    """Like _check_all, but every command runs on the one mounted store, in turn (a copy
    would not be read-only or full)."""
    (case / "out").mkdir(exist_ok=True)
    bad = []
    for name, args, allowed in _commands(case):
        p = _run(mnt, args, LAYER)
        err = p.stderr.decode(errors="replace")
        if "Traceback" in err:
            bad.append(f"{name}: traceback (exit {p.returncode}):\n{err[-1500:]}")
        elif p.returncode not in allowed:
            bad.append(f"{name}: exit {p.returncode} is not documented here: {err[-400:]}")
        elif p.returncode not in (0, 1) and not (err.strip() or p.stdout.strip()):
            bad.append(f"{name}: exit {p.returncode} with no message")
    assert not bad, f"row {row!r}:\n" + "\n".join(bad)
