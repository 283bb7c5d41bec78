"""A refused or interrupted image import leaves the store as it was (apart from gc-able garbage).

Layouts are tampered the ways an attacker (or a bad copy) can: a layer blob whose bytes are not
its descriptor's digest, a descriptor whose size lies, a config whose DiffID lies.  Each is
imported through the CLI into a store that already holds an image sharing the first layer, and
``ls``, the images and the whole index must be as before -- exactly, when the bad layer is the
first new one (everything checkable is checked before anything is published), and after a gc
when a good new layer had committed before the bad one was found (it is rolled back).
"""

from __future__ import annotations

import hashlib
import signal
import tarfile
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from test_cli import cli, js
from test_hostile import index_dump, object_files
from test_lifecycle import spawn, wait_event
from test_oci import _layout, _tar

from layerstore import Store

L0 = _tar([("etc", None), ("etc/os-release", b"base layer\n" * 40), ("etc/tiny", b"t0")])
L1 = _tar([("usr", None), ("usr/app", b"the app, new in this image\n" * 40), ("usr/v", b"1")])
L2 = _tar([("srv", None), ("srv/data", b"data of the third layer\n" * 40)])


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _flip_content(tar: bytes) -> bytes:
    """One byte of a file's content changed: still a valid tar, but another blob and DiffID."""
    with tarfile.open(fileobj=BytesIO(tar)) as tf:
        m = next(m for m in tf.getmembers() if m.isreg() and m.size > 64)
    b = bytearray(tar)
    b[m.offset_data + 3] ^= 0x20
    return bytes(b)


def _hostile(root: Path, kind: str, k: int) -> Path:
    """A layout of [L0, L1, L2] whose layer ``k`` is bad in the way ``kind`` says."""
    layers = [L0, L1, L2]
    diff_ids = [_sha(t) for t in layers]
    descs: list[dict[str, Any]] = [{}, {}, {}]
    if kind == "digest":  # the blob is replaced; descriptor and config still name the original
        real = _layout(root / "real", layers)
        blob = real / "blobs" / "sha256" / _sha(layers[k])[7:]
        blob.write_bytes(_flip_content(layers[k]))
        return real
    if kind == "size":
        descs[k] = {"size": len(layers[k]) + 512}
    elif kind == "diff_id":
        diff_ids[k] = _sha(b"not this layer")
    return _layout(root / kind, layers, diff_ids=diff_ids, descs=descs)


def _tiny_hint(k: bytes, v: bytes) -> bool:
    """A tiny-file hint: ``b"i" + sha256 -> content`` (content-addressed, never a layer)."""
    return k[:1] == b"i" and len(k) == 33 and hashlib.sha256(v).digest() == k[1:]


def _state(st: Path) -> dict[str, Any]:
    """Everything a refused import must not change: listings, the index, objects, backups."""
    with Store(str(st)) as s:
        dump = index_dump(s)
        files = object_files(s)
        backups = sorted(p.name for p in Path(s.layers_dir).iterdir())
    return {
        "ls": js(cli(st, "--json", "ls")),
        "images": js(cli(st, "--json", "images")),
        "index": dump,
        "objects": files,
        "backups": backups,
    }


def _strip(state: dict[str, Any]) -> dict[str, Any]:
    """The state without the tiny-file hints a rolled-back layer leaves behind (bytes named by
    their sha256: no layer, no object; docs/concurrency.md, "Image import")."""
    out = dict(state)
    out["index"] = dict(state["index"])
    out["index"][b"chunks"] = [(k, v) for k, v in state["index"][b"chunks"] if not _tiny_hint(k, v)]
    return out


def _fsck_clean(st: Path) -> None:
    rep = js(cli(st, "--json", "fsck"))
    assert rep["exit_code"] == 0 and rep["problems"] == [], rep


@pytest.fixture
def based(tmp_path: Path) -> Path:
    """A store holding image ``base`` = [L0], gc'd, so its state is a fixed point."""
    st = tmp_path / "store"
    js(cli(st, "--json", "import-oci", f"{_layout(tmp_path / 'base', [L0])}:t", "--name", "base"))
    js(cli(st, "--json", "gc"))
    return st


@pytest.mark.parametrize("kind", ["digest", "size", "diff_id"])
@pytest.mark.parametrize("k", [1, 2])
def test_refused_layout_leaves_the_store_as_it_was(
    based: Path, tmp_path: Path, kind: str, k: int
) -> None:
    before = _state(based)
    layout = _hostile(tmp_path / "hostile", kind, k)
    p = cli(based, "import-oci", f"{layout}:t", "--name", "hostile")
    err = p.stderr.decode()
    assert p.returncode == 2 and "Traceback" not in err, err
    if k == 1 or kind == "size":
        # Refused before anything of it was published: not even garbage.
        assert _state(based) == before
    else:
        # L1 had committed and was rolled back: its objects are garbage until gc.
        after = _state(based)
        assert after["ls"] == before["ls"] and after["images"] == before["images"]
        assert after["backups"] == before["backups"]
    _fsck_clean(based)
    js(cli(based, "--json", "gc"))
    assert _strip(_state(based)) == _strip(before)
    _fsck_clean(based)
    assert f"layer {k} (sha256:" in err and "nothing was imported" in err, err
    # The store still works: the untampered image imports, the base image is intact.
    good = _layout(tmp_path / "good", [L0, L1, L2])
    r = js(cli(based, "--json", "import-oci", f"{good}:t", "--name", "good"))
    assert [x["new"] for x in r["per_layer"]] == [False, True, True]


def test_ctrl_c_between_layers_rolls_back(based: Path, tmp_path: Path) -> None:
    """SIGINT (what Ctrl-C sends) after a new layer committed and before the next: the import
    rolls that layer back (KeyboardInterrupt runs the same rollback as a refusal)."""
    before = _state(based)
    w = spawn("import-oci-stall", str(based), str(_layout(tmp_path / "l", [L1, L2])), "t")
    try:
        assert wait_event(w, "layer")["new"] is True  # L1 committed, L2 not started
        assert [li["diff_id"] for li in js(cli(based, "--json", "ls"))] == [_sha(L0), _sha(L1)]
        w.send_signal(signal.SIGINT)
        wait_event(w, "interrupted")
        assert w.wait(timeout=60) == 130
    finally:
        w.kill()
        w.wait()
    after = _state(based)
    assert after["ls"] == before["ls"] and after["images"] == before["images"]
    _fsck_clean(based)
    js(cli(based, "--json", "gc"))
    assert _strip(_state(based)) == _strip(before)


def test_kill_between_layers_leaves_listed_layers_that_a_retry_adopts(
    based: Path, tmp_path: Path
) -> None:
    """A process killed outright (kill -9, power loss) cannot roll back: the layers it had
    committed stay, listed by ``ls`` and owned by no image -- consistent (fsck clean after gc
    reaps the dead process), adopted by a retry of the import, removable with ``rm``."""
    before = _state(based)
    layout = _layout(tmp_path / "l", [L1, L2])
    w = spawn("import-oci-stall", str(based), str(layout), "t")
    try:
        wait_event(w, "layer")
        w.send_signal(signal.SIGKILL)
        w.wait(timeout=60)
    finally:
        w.kill()
        w.wait()
    assert [li["diff_id"] for li in js(cli(based, "--json", "ls"))] == [_sha(L0), _sha(L1)]
    assert [im["name"] for im in js(cli(based, "--json", "images"))] == ["base"]
    js(cli(based, "--json", "gc"))  # the dead process's pins and staging
    _fsck_clean(based)
    r = js(cli(based, "--json", "import-oci", f"{layout}:t", "--name", "retry"))
    assert [x["new"] for x in r["per_layer"]] == [False, True]  # L1 adopted
    js(cli(based, "--json", "rmi", "retry"))
    js(cli(based, "--json", "gc"))
    assert _strip(_state(based)) == _strip(before)
    _fsck_clean(based)
