"""Whiteouts can never remove anything outside the tree being built (issue 11, item 1).

A whiteout ``.wh.NAME`` hides ``NAME`` of the lower layers.  Before the fix a layer with an entry
``.wh...`` (the whiteout of ``..``) made a flattening materialize delete the *parent of the
destination*; ``.wh..`` emptied the staging tree, and a whiteout under a lower layer's symlink
crashed with ELOOP.  Two guards now: the import refuses such names like ``..``
(:func:`layerstore.core.paths.normalize`), and materialization checks every whiteout again with the
same openat2 confinement as creation -- for manifests an older version accepted, which the
tests below recreate by switching the import's check off.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_hostile import dir_, make_tar, reg, reject, sandbox, sym  # noqa: F401 (fixture)
from test_oci import _layout

from layerstore import Store, UnsafePathError
from layerstore.core import paths

BAD_NAMES = [".wh...", ".wh..", ".wh.", "etc/.wh...", "etc/.wh..", "a/.wh../b"]


def _lower() -> bytes:
    return make_tar(dir_("etc"), reg("etc/passwd", b"root:x:0:0\n"), reg("keep", b"kept\n"))


def _cli(store: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, "LAYERSTORE_STORE": str(store)}
    return subprocess.run(
        [sys.executable, "-m", "layerstore", *args], capture_output=True, env=env, timeout=120
    )


def _victim(tmp_path: Path) -> Path:
    """``out/`` with files a deleting whiteout would take with it; the destination is
    ``out/dest``."""
    out = tmp_path / "out"
    (out / "precious").mkdir(parents=True)
    (out / "precious" / "data").write_bytes(b"do not delete\n")
    (out / "sibling").write_bytes(b"nor this\n")
    return out


def _assert_victim_intact(out: Path) -> None:
    assert (out / "precious" / "data").read_bytes() == b"do not delete\n"
    assert (out / "sibling").read_bytes() == b"nor this\n"
    assert sorted(os.listdir(out)) == ["precious", "sibling"], "dest or staging left behind"


@pytest.mark.parametrize("name", BAD_NAMES)
def test_import_refuses_whiteouts_of_dot_and_dotdot(store, sandbox, name):  # noqa: F811
    parts = [dir_("etc"), dir_("a")] if "/" in name else []
    blob = make_tar(*parts, reg(name, b""))
    reject(store, sandbox, blob, UnsafePathError, match="whiteout")


def test_ordinary_whiteouts_and_aufs_names_still_accepted(store):
    blob = make_tar(dir_("d"), reg("d/.wh.x", b""), reg(".wh..wh..opq", b""), reg(".wh.a.b", b""))
    store.import_tar(io.BytesIO(blob))


@pytest.mark.parametrize("name", BAD_NAMES)
def test_oci_layer_with_escaping_whiteout_refused_by_cli(tmp_path, name):
    parts = [dir_("etc"), dir_("a")] if "/" in name else []
    layout = _layout(tmp_path / "lay", [_lower(), make_tar(*parts, reg(name, b""))])
    st = tmp_path / "store"
    assert _cli(st, "init").returncode == 0
    p = _cli(st, "import-oci", f"{layout}:t")
    assert p.returncode == 2, p.stderr.decode()
    assert b"Traceback" not in p.stderr and b"whiteout" in p.stderr


def _import_unchecked(store: Store, tmp_path: Path, layers: list[bytes], mp) -> None:
    """Import as a version without the import-time check would have (see module doc)."""
    with mp.context() as m:
        m.setattr(paths, "_BAD_WHITEOUTS", frozenset(), raising=False)
        store.import_oci(str(_layout(tmp_path / "lay", layers)), ref="t")


@pytest.mark.parametrize("name", BAD_NAMES[:5])
@pytest.mark.parametrize("diff_dirs", [False, True])
def test_materialize_never_deletes_outside_the_tree(store, tmp_path, monkeypatch, name, diff_dirs):
    parts = [dir_("etc")] if "/" in name else []
    _import_unchecked(store, tmp_path, [_lower(), make_tar(*parts, reg(name, b""))], monkeypatch)
    out = _victim(tmp_path)
    with pytest.raises(UnsafePathError, match="whiteout"):
        store.materialize_image("t", str(out / "dest"), diff_dirs=diff_dirs)
    _assert_victim_intact(out)  # and, with diff_dirs, no half-built dest/ left


@pytest.mark.parametrize("marker", ["etc/.wh.passwd", "etc/.wh..wh..opq"])
def test_whiteout_through_a_lower_symlink_refused(tmp_path, marker):
    """A lower layer turns ``etc`` into a symlink to a directory outside; the upper layer's
    whiteout under ``etc/`` must not follow it (was: ELOOP traceback, exit 1)."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "passwd").write_bytes(b"host file\n")
    low = make_tar(sym("etc", str(outside)), reg("keep", b"kept\n"))
    up = make_tar(dir_("etc"), reg(marker, b""))
    layout = _layout(tmp_path / "lay", [low, up])
    st = tmp_path / "store"
    assert _cli(st, "init").returncode == 0
    assert _cli(st, "import-oci", f"{layout}:t").returncode == 0
    out = _victim(tmp_path)
    p = _cli(st, "materialize", "t", str(out / "dest"))
    assert p.returncode == 2, p.stderr.decode()
    assert b"Traceback" not in p.stderr and b"symlink" in p.stderr
    assert (outside / "passwd").read_bytes() == b"host file\n"
    _assert_victim_intact(out)


def test_diff_dirs_whiteouts_are_devices_inside_each_layer(store, tmp_path):
    """The overlay form of the same layers is fine: each layer is its own tree, so the symlink
    of the lower one is not on the upper one's path."""
    outside = tmp_path / "outside"
    outside.mkdir()
    low = make_tar(sym("etc", str(outside)), reg("keep", b"kept\n"))
    up = make_tar(dir_("etc"), reg("etc/.wh.passwd", b""))
    store.import_oci(str(_layout(tmp_path / "lay", [low, up])), ref="t")
    store.materialize_image("t", str(tmp_path / "dd"), diff_dirs=True)
    assert os.path.islink(tmp_path / "dd" / "0" / "etc")
    assert (tmp_path / "dd" / "1" / "etc").is_dir()
    assert os.listdir(outside) == []
