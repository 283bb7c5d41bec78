"""An unproved DiffID (a TOC-only partial import) must never stand in for the real layer.

``import --partial --toc-only --diff-id X`` keys a layer by whatever DiffID its caller names:
the tar is synthesized from the TOC, so nothing proves X.  Whoever supplies such a blob could
otherwise squat on the DiffID of a layer they do not have.  The rules tested here, end to end
through the CLI: a proving import of X (a full tar, a header-frame replay, an OCI import)
replaces the unproved record; an unproved record is never what a compressed digest maps to;
images say when they rest on unproved layers; the replaced content is gc-able garbage.
"""

from __future__ import annotations

from pathlib import Path

import chunkedblob as cb
import pytest
from test_cli import cli, js
from test_lifecycle import spawn, wait_event
from test_oci import _layout

from layerstore import Store
from layerstore.core.index import blob_size_key

GENUINE = {"etc/motd": b"genuine motd\n" * 20, "bin/tool": b"\x7fELF genuine tool" * 50}
EVIL = {"etc/motd": b"attacker motd\n" * 20, "bin/tool": b"\x7fELF attacker tool" * 50}
ZSTD_MT = "application/vnd.oci.image.layer.v1.tar+zstd"


def _members(files: dict[str, bytes]) -> list[cb.Member]:
    return [cb.dir_("bin"), cb.dir_("etc")] + [cb.reg(n, d) for n, d in files.items()]


def _chunked(files: dict[str, bytes]) -> cb.ChunkedBlob:
    """An older-variant zstd:chunked blob (no tar-split: what --toc-only applies to)."""
    return cb.build(_members(files), "old")


@pytest.fixture
def blobs(tmp_path: Path) -> tuple[Path, Path, str]:
    """The genuine tar, the attacker's older-variant zstd:chunked blob, the genuine DiffID."""
    genuine = cb.make_tar(_members(GENUINE))
    evil = _chunked(EVIL)
    assert evil.diff_id != cb.sha(genuine)
    g = tmp_path / "genuine.tar"
    g.write_bytes(genuine)
    return g, evil.write(tmp_path / "evil.zst"), cb.sha(genuine)


def _objects(st: Path, diff_id: str) -> set[str]:
    """The object files a layer's manifest names (as paths under the store)."""
    show = js(cli(st, "--json", "show", diff_id, "--entries"))
    objs = {e["object"] for e in show["entries_list"] if "object" in e}
    objs.add(show["manifest"])
    return {f"objects/{h[:2]}/{h}" for h in objs}


def _tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _fsck_clean(st: Path) -> None:
    rep = js(cli(st, "--json", "fsck"))
    assert rep["exit_code"] == 0 and rep["problems"] == [], rep


def test_unproved_diff_id_never_shadows_the_genuine_layer(
    tmp_path: Path, blobs: tuple[Path, Path, str]
) -> None:
    genuine, evil, x = blobs
    st = tmp_path / "store"
    squat = js(cli(st, "--json", "import", "--partial", "--toc-only", "--diff-id", x, str(evil)))
    assert squat["diff_id"] == x and squat["partial"]["diff_id_proof"] == "unverified (TOC only)"
    attacker_objects = _objects(st, x)
    ls_squat = cli(st, "ls").stdout.decode()

    # The genuine tar of X proves it: it replaces the squatter instead of meeting "already
    # stored".
    p = cli(st, "import", str(genuine))
    assert p.returncode == 0, p.stderr.decode()
    out = tmp_path / "out"
    js(cli(st, "--json", "materialize", x, str(out)))
    assert _tree(out) == GENUINE
    assert "replaces the unproved layer" in p.stdout.decode()
    assert "[unproved DiffID]" in ls_squat
    [li] = js(cli(st, "--json", "ls"))
    assert li["unproved"] is False and li["tarsplit"] and li["partial"] is None
    exported = tmp_path / "x.tar"
    js(cli(st, "--json", "export", x, "-o", str(exported)))
    assert exported.read_bytes() == genuine.read_bytes()
    _fsck_clean(st)

    # The attacker's objects lost their references: gc collects them, and only them.
    genuine_objects = _objects(st, x)
    assert attacker_objects and not attacker_objects & genuine_objects
    assert all((st / o).exists() for o in attacker_objects)
    gc = js(cli(st, "--json", "gc"))
    assert gc["objects_freed"] >= len(attacker_objects)
    assert not any((st / o).exists() for o in attacker_objects)
    assert all((st / o).exists() for o in genuine_objects)
    _fsck_clean(st)
    out2 = tmp_path / "out2"
    js(cli(st, "--json", "materialize", x, str(out2)))
    assert _tree(out2) == GENUINE

    # A second TOC-only squat on a proved DiffID is "already stored" and changes nothing.
    again = js(cli(st, "--json", "import", "--partial", "--toc-only", "--diff-id", x, str(evil)))
    assert again["already_present"] is True
    assert js(cli(st, "--json", "show", x))["unproved"] is False
    out3 = tmp_path / "out3"
    js(cli(st, "--json", "materialize", x, str(out3)))
    assert _tree(out3) == GENUINE


def test_a_header_frame_replay_proves_and_replaces(
    tmp_path: Path, blobs: tuple[Path, Path, str]
) -> None:
    """The genuine layer as a zstd:chunked blob: a partial import (not TOC-only) with the same
    --diff-id must not be answered "already stored" by the squatter's record."""
    _genuine, evil, x = blobs
    good = _chunked(GENUINE)
    assert good.diff_id == x
    st = tmp_path / "store"
    js(cli(st, "--json", "import", "--partial", "--toc-only", "--diff-id", x, str(evil)))
    r = js(
        cli(
            st, "--json", "import", "--partial", "--diff-id", x, str(good.write(tmp_path / "g.zst"))
        )
    )
    out = tmp_path / "out"
    js(cli(st, "--json", "materialize", x, str(out)))
    assert _tree(out) == GENUINE
    assert r["proved_unproved"] is True and r["partial"]["diff_id_proof"] == "header-frame replay"
    _fsck_clean(st)


def test_images_say_they_rest_on_unproved_layers_and_import_oci_proves_them(
    tmp_path: Path, blobs: tuple[Path, Path, str]
) -> None:
    genuine, evil, x = blobs
    st = tmp_path / "store"
    ann = _chunked(EVIL).annotations  # the builder is deterministic: evil.zst's annotations
    squat = _layout(
        tmp_path / "squat",
        [evil.read_bytes()],
        diff_ids=[x],
        descs=[{"mediaType": ZSTD_MT, "annotations": ann}],
    )
    p = cli(st, "import-oci", f"{squat}:t", "--name", "squat", "--toc-only")
    assert p.returncode == 0, p.stderr.decode()
    assert "unproved DiffID" in p.stderr.decode()
    [im] = js(cli(st, "--json", "images"))
    assert im["unproved"] == [x[7:]]
    assert "[1 unproved]" in cli(st, "images").stdout.decode()

    # Without --toc-only the same layout is refused: the replayed DiffID is not the config's.
    p = cli(st, "import-oci", f"{squat}:t", "--name", "squat2")
    assert p.returncode == 2 and b"Traceback" not in p.stderr, p.stderr.decode()

    # An image whose layer X is genuine: already stored, but only unproved, so it is proved.
    real = _layout(tmp_path / "real", [genuine.read_bytes()])
    r = js(cli(st, "--json", "import-oci", f"{real}:t", "--name", "real"))
    assert r["per_layer"][0]["new"] is True and r["unproved"] == []
    ims = {im["name"]: im for im in js(cli(st, "--json", "images"))}
    assert ims["real"]["unproved"] == [] and ims["squat"]["unproved"] == []
    assert js(cli(st, "--json", "show", x))["unproved"] is False
    out = tmp_path / "out"
    js(cli(st, "--json", "materialize", "squat", str(out)))  # X is the real layer now
    assert _tree(out) == GENUINE
    _fsck_clean(st)
    js(cli(st, "--json", "gc"))
    _fsck_clean(st)
    # Both images keep the (one) layer: removing one leaves it for the other.
    js(cli(st, "--json", "rmi", "squat"))
    assert [li["diff_id"] for li in js(cli(st, "--json", "ls"))] == [x]
    js(cli(st, "--json", "rmi", "real"))
    assert js(cli(st, "--json", "ls")) == []


def test_reimport_shortcut_never_maps_a_blob_to_an_unproved_layer(
    tmp_path: Path, blobs: tuple[Path, Path, str]
) -> None:
    """A store from before this rule may hold a compressed alias on an unproved record (a full
    import of the genuine tar was answered "already stored" and attached its digest there).
    The shortcut must not trust it: the blob is read, proves X, and replaces the record."""
    genuine, evil, x = blobs
    st = tmp_path / "store"
    js(cli(st, "--json", "import", "--partial", "--toc-only", "--diff-id", x, str(evil)))
    comp = bytes.fromhex(x[7:])  # an uncompressed tar: its blob digest is its DiffID
    with Store(str(st)) as s:
        with s.index.write() as txn:
            rec = s.index.get_layer(txn, comp)
            rec["compressed"] = [comp.hex()]
            s.index.put_layer(txn, comp, rec)
            txn.put(comp, comp, db=s.index.db[b"compressed"])
            size = genuine.stat().st_size
            txn.put(blob_size_key(size, comp), b"", db=s.index.db[b"blob_sizes"])
    r = js(cli(st, "--json", "import", str(genuine)))
    out = tmp_path / "out"
    js(cli(st, "--json", "materialize", x, str(out)))
    assert _tree(out) == GENUINE
    assert r["stats"].get("shortcut") is None and r["proved_unproved"] is True
    again = js(cli(st, "--json", "import", str(genuine)))  # the shortcut, now to the proof
    assert again["stats"] == {"shortcut": 1} and again["already_present"] is True
    _fsck_clean(st)


def test_proof_waits_for_a_live_reader_of_the_unproved_layer(
    tmp_path: Path, blobs: tuple[Path, Path, str]
) -> None:
    """A process reading the unproved layer keeps its objects referenced (invariant 5): the
    proving import is refused with "retry" (exit 7), changes nothing, and succeeds after."""
    genuine, evil, x = blobs
    st = tmp_path / "store"
    js(cli(st, "--json", "import", "--partial", "--toc-only", "--diff-id", x, str(evil)))
    reader = spawn("pin-layer-and-wait", str(st), x)
    try:
        wait_event(reader, "pinned")
        p = cli(st, "import", str(genuine))
        assert p.returncode == 7 and b"Traceback" not in p.stderr, p.stderr.decode()
        assert b"being read by another process" in p.stderr
        assert js(cli(st, "--json", "show", x))["unproved"] is True
    finally:
        reader.kill()
        reader.wait()
    r = js(cli(st, "--json", "import", str(genuine)))
    assert r["proved_unproved"] is True
    js(cli(st, "--json", "gc"))
    _fsck_clean(st)


def test_library_toc_only_import_never_replaces_a_proved_layer(
    tmp_path: Path, blobs: tuple[Path, Path, str]
) -> None:
    genuine, evil, x = blobs
    with Store.init(str(tmp_path / "s")) as st:
        first = st.import_path(str(genuine))
        assert not first.already_present
        r = st.import_chunked(str(evil), expected_diff_id=x, toc_only=True)
        assert r.already_present and not st.layer(x).unproved
        assert st.layer(x).manifest == first.manifest
        st.gc()
        assert st.fsck().exit_code == 0
