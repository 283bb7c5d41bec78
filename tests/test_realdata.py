"""Interop with data real tools wrote: debootstrap + GNU tar, umoci, skopeo.

Every input here was produced by Debian's tools (tests/corpus.py builds and caches it), and every
expectation comes from them too: trees from GNU ``tar -x``, DiffIDs from the image configs umoci
and skopeo wrote.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import LoopFS, gnu_untar, need_corpus
from treecmp import diff_trees

import testdata as corpus
from layerstore import Store

pytestmark = pytest.mark.realdata


def _layout_layers(layout: Path, tag: str) -> tuple[list[dict], list[str]]:
    """(layer descriptors, config diff_ids) of tag in an OCI layout, read as the spec says."""
    index = json.loads((layout / "index.json").read_text())
    desc = next(
        m
        for m in index["manifests"]
        if m["annotations"]["org.opencontainers.image.ref.name"] == tag
    )

    def blob(d: dict) -> Path:
        algo, hexd = d["digest"].split(":")
        return layout / "blobs" / algo / hexd

    manifest = json.loads(blob(desc).read_text())
    config = json.loads(blob(manifest["config"]).read_text())
    layers = [{**d, "path": blob(d)} for d in manifest["layers"]]
    return layers, config["rootfs"]["diff_ids"]


@pytest.mark.loopfs
def test_minbase_tarball_materializes_like_tar_x(loopfs: LoopFS, loopdir: Path) -> None:
    tgz = need_corpus(corpus.minbase_tar_gz)
    with Store.init(str(loopdir / "store")) as st:
        res = st.import_path(str(tgz))
        assert res.diff_id == "sha256:" + hashlib.sha256(gzip.open(tgz).read()).hexdigest()
        assert res.files > 5000
        m = st.materialize(res.diff_id, str(loopdir / "mat"))
        assert m.methods.get("reflink", 0) + m.methods.get("inline", 0) == m.files
        assert m.devices >= 8 and m.hardlinks >= 2
        expected = gnu_untar(tgz, loopdir / "tar-x")
        assert diff_trees(str(expected), str(loopdir / "mat")) == []
        assert st.fsck(full=True).problems == []


def test_umoci_layers_verify_against_their_config(tmp_path: Path, store: Store) -> None:
    """umoci wrote these blobs and the config's diff_ids: our DiffIDs must equal them, and
    the diff layer's whiteouts are kept as entries."""
    layout = need_corpus(corpus.umoci_layout)
    layers, diff_ids = _layout_layers(layout, "v2")
    assert len(layers) == 2
    results = [store.import_path(str(d["path"])) for d in layers]
    assert [r.diff_id for r in results] == diff_ids
    assert [r.compressed_digest for r in results] == [d["digest"] for d in layers]
    names = [e.path for e in store.entries(results[1].diff_id)]
    assert any(n.rsplit("/", 1)[-1].startswith(".wh.") for n in names)
    # The v2 diff layer reuses almost everything: it adds little beyond its own new content.
    assert results[1].new_bytes < results[0].new_bytes * 0.05
    out = tmp_path / "diff"
    store.materialize(results[1].diff_id, str(out))
    expected = gnu_untar(layers[1]["path"], tmp_path / "diff-tar-x")
    listed = set(names)
    implicit = (
        frozenset(
            str(p.relative_to(out))
            for p in [out, *out.rglob("*")]
            if p.is_dir() and not p.is_symlink()
        )
        - listed
    )
    assert diff_trees(str(expected), str(out), implicit=implicit) == []


@pytest.mark.parametrize("compression", ["zstd", "zstd:chunked"])
def test_skopeo_zstd_layers_import_with_matching_diff_ids(store: Store, compression: str) -> None:
    """skopeo recompressed these; zstd:chunked blobs carry skippable TOC frames that a plain
    import must skip while still producing the tar's DiffID."""
    layout = need_corpus(corpus.oci_layout, 2, compression)
    layers, diff_ids = _layout_layers(layout, "v2")
    for d, want in zip(layers, diff_ids, strict=True):
        assert d["mediaType"].endswith("tar+zstd")
        r = store.import_path(str(d["path"]))
        assert r.compression == "zstd"
        assert r.diff_id == want
        assert r.compressed_digest == d["digest"]


def test_same_layer_in_three_compressions_is_one_layer(store: Store) -> None:
    digests = set()
    for comp in ("gzip", "zstd", "zstd:chunked"):
        layers, diff_ids = _layout_layers(need_corpus(corpus.oci_layout, 1, comp), "v1")
        r = store.import_path(str(layers[0]["path"]))
        digests.add(r.diff_id)
        assert r.diff_id == diff_ids[0]
    assert len(digests) == 1 and len(store.layers()) == 1
    info = store.layers()[0]
    assert len(info.compressed) == 3  # findable by each compressed digest
    for c in info.compressed:
        assert store.resolve(c) == bytes.fromhex(info.diff_id[7:])


def test_cli_import_and_materialize_real_layer(tmp_path: Path) -> None:
    tgz = need_corpus(corpus.minbase_tar_gz)
    store = tmp_path / "s"
    run = [sys.executable, "-m", "layerstore", "--store", str(store), "--json"]
    out = subprocess.run([*run, "import", str(tgz)], capture_output=True, text=True, check=True)
    res = json.loads(out.stdout)
    ls = json.loads(subprocess.run([*run, "ls"], capture_output=True, text=True).stdout)
    assert [li["diff_id"] for li in ls] == [res["diff_id"]]
    mat = subprocess.run(
        [*run, "materialize", res["diff_id"][7:19], str(tmp_path / "m")],
        capture_output=True,
        text=True,
    )
    assert mat.returncode == 0, mat.stderr
    assert json.loads(mat.stdout)["files"] == res["files"]
    du = json.loads(subprocess.run([*run, "du"], capture_output=True, text=True).stdout)
    assert du["layers"] == 1 and du["logical_bytes"] == res["logical_bytes"]
    shutil.rmtree(tmp_path / "m")
