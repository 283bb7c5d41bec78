"""OCI image layouts written by umoci and skopeo: images as references; hostile layouts."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import need_corpus

import testdata as corpus
from layerstore import InUseError, InvalidInputError, NotFoundError, Store

pytestmark = pytest.mark.realdata


def test_v1_then_v2_stores_only_new_content(store: Store) -> None:
    layout = need_corpus(corpus.umoci_layout)
    v1 = store.import_oci(str(layout), ref="v1")
    before = store.stats()["physical_bytes"]
    v2 = store.import_oci(str(layout), ref="v2")
    added = store.stats()["physical_bytes"] - before
    assert v1.new_layers == 1 and v2.reused_layers == 1 and v2.new_layers == 1
    assert v2.layers[0] == v1.layers[0]
    assert added < 0.05 * before, (added, before)
    cfg = json.loads((layout / "blobs" / "sha256" / v2.config[7:]).read_text())
    assert v2.layers == cfg["rootfs"]["diff_ids"]
    assert [im["name"] for im in store.images()] == ["v1", "v2"]


def test_images_are_references(store: Store) -> None:
    layout = need_corpus(corpus.umoci_layout)
    v1 = store.import_oci(str(layout), ref="v1")
    v2 = store.import_oci(str(layout), ref="v2")
    with pytest.raises(InUseError, match="v1"):
        store.remove(v1.layers[0])  # used by both images
    assert store.rmi("v1")["layers_removed"] == 0  # v2 still uses the base layer
    assert {li.diff_id for li in store.layers()} == set(v2.layers)
    store.tag("v2", "latest")
    store.rmi("v2")
    assert {li.diff_id for li in store.layers()} == set(v2.layers)
    assert store.rmi("latest")["layers_removed"] == 2
    assert store.layers() == []
    store.gc()
    assert store.stats()["objects"] == 0
    assert store.fsck().problems == []


def test_a_directly_imported_layer_outlives_its_images(store: Store) -> None:
    layout = need_corpus(corpus.umoci_layout)
    v1 = store.import_oci(str(layout), ref="v1")
    blob = next((layout / "blobs" / "sha256").iterdir())  # any blob; find the layer's
    for p in (layout / "blobs" / "sha256").iterdir():
        if store.layers()[0].compressed[0].endswith(p.name):
            blob = p
    store.import_path(str(blob))  # now also wanted on its own
    store.rmi("v1")
    assert [li.diff_id for li in store.layers()] == v1.layers


@pytest.mark.parametrize("comp", ["gzip", "zstd", "zstd:chunked"])
def test_skopeo_layouts(store: Store, comp: str) -> None:
    layout = need_corpus(corpus.oci_layout, 2, comp)
    r = store.import_oci(str(layout), ref="v2", name=f"v2-{comp}")
    assert len(r.layers) == 2


def _copy_layout(tmp_path: Path) -> Path:
    src = need_corpus(corpus.umoci_layout)
    dst = tmp_path / "layout"
    shutil.copytree(src, dst)
    return dst


def _manifest_path(layout: Path, tag: str) -> Path:
    idx = json.loads((layout / "index.json").read_text())
    d = next(
        m for m in idx["manifests"] if m["annotations"]["org.opencontainers.image.ref.name"] == tag
    )
    return layout / "blobs" / "sha256" / d["digest"][7:]


def _assert_untouched(store: Store) -> None:
    assert store.layers() == [] and store.images() == []
    store.gc()
    assert store.stats()["objects"] == 0


def test_hostile_blob_digest_lies(store: Store, tmp_path: Path) -> None:
    layout = _copy_layout(tmp_path)
    m = json.loads(_manifest_path(layout, "v2").read_text())
    victim = layout / "blobs" / "sha256" / m["layers"][1]["digest"][7:]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.chmod(0o644)
    victim.write_bytes(bytes(data))
    with pytest.raises(InvalidInputError):
        store.import_oci(str(layout), ref="v2")
    _assert_untouched(store)


def test_hostile_manifest_pointing_outside(store: Store, tmp_path: Path) -> None:
    layout = _copy_layout(tmp_path)
    idx = json.loads((layout / "index.json").read_text())
    idx["manifests"][0]["digest"] = "sha256:../../../etc/passwd"
    (layout / "index.json").write_text(json.dumps(idx))
    ref = idx["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"]
    with pytest.raises(InvalidInputError, match="not a sha256 digest"):
        store.import_oci(str(layout), ref=ref)
    _assert_untouched(store)


def _rewrite_manifest(layout: Path, tag: str, edit) -> None:  # type: ignore[no-untyped-def]
    """Edit the tag's manifest (or config) and re-link digests so only the edit is wrong."""
    import hashlib

    idx_path = layout / "index.json"
    idx = json.loads(idx_path.read_text())
    desc = next(
        m for m in idx["manifests"] if m["annotations"]["org.opencontainers.image.ref.name"] == tag
    )
    manifest = json.loads((layout / "blobs" / "sha256" / desc["digest"][7:]).read_text())
    edit(layout, manifest)
    data = json.dumps(manifest).encode()
    digest = hashlib.sha256(data).hexdigest()
    (layout / "blobs" / "sha256" / digest).write_bytes(data)
    desc["digest"] = "sha256:" + digest
    desc["size"] = len(data)
    idx_path.write_text(json.dumps(idx))


def test_hostile_config_diff_ids_do_not_match(store: Store, tmp_path: Path) -> None:
    import hashlib

    layout = _copy_layout(tmp_path)

    def edit(layout: Path, manifest: dict) -> None:
        cpath = layout / "blobs" / "sha256" / manifest["config"]["digest"][7:]
        cfg = json.loads(cpath.read_text())
        cfg["rootfs"]["diff_ids"][1] = "sha256:" + "ab" * 32
        data = json.dumps(cfg).encode()
        d = hashlib.sha256(data).hexdigest()
        (layout / "blobs" / "sha256" / d).write_bytes(data)
        manifest["config"]["digest"] = "sha256:" + d
        manifest["config"]["size"] = len(data)

    _rewrite_manifest(layout, "v2", edit)
    with pytest.raises(InvalidInputError, match="layer 1 .*DiffID"):
        store.import_oci(str(layout), ref="v2")
    _assert_untouched(store)


def test_hostile_missing_blob_and_unknown_media_type(store: Store, tmp_path: Path) -> None:
    layout = _copy_layout(tmp_path)

    def missing(layout: Path, manifest: dict) -> None:
        manifest["layers"][1]["digest"] = "sha256:" + "cd" * 32

    _rewrite_manifest(layout, "v2", missing)
    with pytest.raises(InvalidInputError, match="missing"):
        store.import_oci(str(layout), ref="v2")
    _assert_untouched(store)

    layout2 = _copy_layout(tmp_path / "b")

    def odd_type(layout: Path, manifest: dict) -> None:
        manifest["layers"][0]["mediaType"] = "application/x-nobody-supports-this"

    _rewrite_manifest(layout2, "v2", odd_type)
    with pytest.raises(InvalidInputError, match="not supported"):
        store.import_oci(str(layout2), ref="v2")
    _assert_untouched(store)


def test_unknown_tag_and_not_a_layout(store: Store, tmp_path: Path) -> None:
    layout = need_corpus(corpus.umoci_layout)
    with pytest.raises(NotFoundError, match="nope"):
        store.import_oci(str(layout), ref="nope")
    with pytest.raises(InvalidInputError, match="not an OCI image layout"):
        store.import_oci(str(tmp_path))


def _umoci_unpack(layout: Path, tag: str, bundle: Path) -> Path:
    import subprocess

    subprocess.run(
        ["umoci", "unpack", "--image", f"{layout}:{tag}", str(bundle)],
        check=True,
        capture_output=True,
    )
    return bundle / "rootfs"


def test_flattened_v2_equals_umoci_unpack(store: Store, tmp_path: Path) -> None:
    """The flattened root filesystem (whiteouts and opaque dirs resolved) equals what umoci --
    a real, independent implementation -- unpacks for the same image."""
    from treecmp import diff_trees

    layout = need_corpus(corpus.umoci_layout)
    store.import_oci(str(layout), ref="v2")
    out = tmp_path / "flat"
    r = store.materialize_image("v2", str(out))
    assert r.files > 5000
    expected = _umoci_unpack(layout, "v2", tmp_path / "bundle")
    # umoci creates directories that the layers never list with the time of unpacking: not
    # comparable; everything listed in a layer is compared, times included.
    listed = {e.path for li in store.layers() for e in store.entries(li.diff_id)}
    implicit = (
        frozenset(
            str(p.relative_to(out))
            for p in [out, *out.rglob("*")]
            if p.is_dir() and not p.is_symlink()
        )
        - listed
    )
    assert diff_trees(str(expected), str(out), implicit=implicit) == []
    # the deletions of v2 really are gone
    assert not (out / "usr" / "share" / "doc" / "apt").exists()


def test_diff_dirs_for_overlay(store: Store, tmp_path: Path) -> None:
    import os
    import stat

    layout = need_corpus(corpus.umoci_layout)
    store.import_oci(str(layout), ref="v2")
    out = tmp_path / "diffs"
    dirs = store.materialize_image("v2", str(out), diff_dirs=True)
    assert len(dirs) == 2 and sorted(os.listdir(out)) == ["0", "1"]
    upper = out / "1"
    wh = upper / "usr" / "share" / "doc" / "apt"
    st = os.lstat(wh)
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(0, 0)
    assert not any(n.startswith(".wh.") for _, _, fs in os.walk(upper) for n in fs)


def _tar(entries: list[tuple[str, bytes | None]]) -> bytes:
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in entries:
            ti = tarfile.TarInfo(name)
            ti.mtime = 1_700_000_000
            if data is None:
                ti.type = tarfile.DIRTYPE
                ti.mode = 0o755
                tf.addfile(ti)
            else:
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def _layout(
    root: Path,
    layers: list[bytes],
    *,
    diff_ids: list[str] | None = None,
    descs: list[dict] | None = None,
) -> Path:
    """A minimal OCI layout, written by hand for synthetic cases (tag ``t``).

    By default the layers are uncompressed tars and the config's diff_ids their sha256s;
    ``diff_ids`` overrides the config's list (a lying config, or compressed blobs), ``descs``
    adds fields to each layer descriptor (``mediaType``, ``annotations``)."""
    import hashlib

    blobs = root / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def put(data: bytes) -> dict:
        d = hashlib.sha256(data).hexdigest()
        (blobs / d).write_bytes(data)
        return {"digest": "sha256:" + d, "size": len(data)}

    if diff_ids is None:
        diff_ids = ["sha256:" + hashlib.sha256(t).hexdigest() for t in layers]
    cfg = put(json.dumps({"rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode())
    mf = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **cfg},
        "layers": [
            {"mediaType": "application/vnd.oci.image.layer.v1.tar", **put(t), **extra}
            for t, extra in zip(layers, descs or [{}] * len(layers), strict=True)
        ],
    }
    m = put(json.dumps(mf).encode())
    (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (root / "index.json").write_text(
        json.dumps(
            {
                "schemaVersion": 2,
                "manifests": [
                    {
                        "mediaType": "application/vnd.oci.image.manifest.v1+json",
                        **m,
                        "annotations": {"org.opencontainers.image.ref.name": "t"},
                    }
                ],
            }
        )
    )
    return root


def test_flatten_opaque_dirs_and_type_changes(store: Store, tmp_path: Path) -> None:
    low = _tar(
        [
            ("d", None),
            ("d/a", b"lower a"),
            ("d/sub", None),
            ("d/sub/x", b"x"),
            ("f", b"a file that becomes a directory"),
            ("g", None),
            ("g/inner", b"a directory that becomes a file"),
            ("keep", b"kept"),
            ("gone", b"whited out"),
        ]
    )
    up = _tar(
        [
            ("d", None),
            ("d/.wh..wh..opq", b""),
            ("d/c", b"upper c"),
            ("f", None),
            ("f/now-a-dir", b"inside"),
            ("g", b"now a file"),
            (".wh.gone", b""),
        ]
    )
    store.import_oci(str(_layout(tmp_path / "lay", [low, up])), ref="t")
    out = tmp_path / "flat"
    store.materialize_image("t", str(out))
    names = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    assert names == ["d", "d/c", "f", "f/now-a-dir", "g", "keep"]
    assert (out / "g").read_bytes() == b"now a file"
    assert (out / "keep").read_bytes() == b"kept"


@pytest.mark.parametrize("comp", ["gzip", "zstd", "zstd:chunked"])
def test_exported_layout_accepted_by_skopeo(store: Store, tmp_path: Path, comp: str) -> None:
    import subprocess

    if shutil.which("skopeo") is None:
        if os.geteuid() == 0:
            raise AssertionError("skopeo is not installed (./dev test installs it)")
        pytest.skip("REAL-TOOL TEST SKIPPED: skopeo is not installed")
    layout = need_corpus(corpus.umoci_layout)
    v2 = store.import_oci(str(layout), ref="v2")
    out = tmp_path / "exported"
    store.export_oci("v2", str(out), comp)
    insp = subprocess.run(
        ["skopeo", "inspect", "--raw", f"oci:{out}:v2"], capture_output=True, text=True
    )
    assert insp.returncode == 0, insp.stderr
    cfg = subprocess.run(
        ["skopeo", "inspect", "--config", f"oci:{out}:v2"], capture_output=True, text=True
    )
    assert json.loads(cfg.stdout)["rootfs"]["diff_ids"] == v2.layers
    copied = subprocess.run(
        ["skopeo", "--insecure-policy", "copy", f"oci:{out}:v2", f"oci:{tmp_path / 'copy'}:v2"],
        capture_output=True,
        text=True,
    )
    assert copied.returncode == 0, copied.stderr
    # and back in: same layers, nothing new stored
    again = store.import_oci(str(tmp_path / "copy"), ref="v2", name="v2-roundtrip")
    assert again.layers == v2.layers and again.new_layers == 0
    # deterministic: a second export writes the same manifest
    out2 = tmp_path / "exported2"
    assert (
        store.export_oci("v2", str(out2), comp)["manifest"]
        == json.loads((out / "index.json").read_text())["manifests"][0]["digest"]
    )


def test_docker_save_archive_written_by_skopeo(store: Store, tmp_path: Path) -> None:
    import subprocess

    layout = need_corpus(corpus.umoci_layout)
    archive = tmp_path / "saved.tar"
    r = subprocess.run(
        [
            "skopeo",
            "--insecure-policy",
            "copy",
            f"oci:{layout}:v2",
            f"docker-archive:{archive}:example.org/minbase:v2",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    oci = store.import_oci(str(layout), ref="v2")
    res = store.import_oci(str(archive))
    assert res.name == "example.org/minbase:v2"
    assert res.layers == oci.layers and res.new_layers == 0  # same layers, stored once
    assert {im["name"] for im in store.images()} == {"v2", "example.org/minbase:v2"}


@pytest.mark.parametrize("comp", ["gzip", "zstd", "zstd:chunked"])
def test_exported_layout_pulled_by_podman(store: Store, tmp_path: Path, comp: str) -> None:
    """podman 4.3 pulls what we export (into a private --root), with our DiffIDs."""
    import subprocess

    if shutil.which("podman") is None:
        if os.geteuid() == 0:
            raise AssertionError("podman is not installed (./dev test installs it)")
        pytest.skip("REAL-TOOL TEST SKIPPED: podman is not installed")
    layout = need_corpus(corpus.umoci_layout)
    v2 = store.import_oci(str(layout), ref="v2")
    out = tmp_path / "exported"
    store.export_oci("v2", str(out), comp)
    import tempfile

    runroot = tempfile.mkdtemp(prefix="lsp-", dir="/tmp")  # podman: runroot ≤ 50 characters
    podman = [
        "podman",
        "--root",
        str(tmp_path / "proot"),
        "--runroot",
        runroot,
        "--storage-driver",
        "vfs",
    ]
    pulled = subprocess.run(
        [*podman, "pull", f"oci:{out}:v2"], capture_output=True, text=True, timeout=600
    )
    assert pulled.returncode == 0, pulled.stderr
    image_id = pulled.stdout.strip().splitlines()[-1]
    layers = subprocess.run(
        [*podman, "image", "inspect", image_id, "--format", "{{json .RootFS.Layers}}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert json.loads(layers.stdout) == v2.layers
    subprocess.run([*podman, "rmi", "-a", "-f"], capture_output=True, timeout=300)
    shutil.rmtree(runroot, ignore_errors=True)


def test_fsck_repairs_from_an_oci_layout(store: Store) -> None:
    import os

    layout = need_corpus(corpus.umoci_layout)
    v2 = store.import_oci(str(layout), ref="v2")
    victims = [e for e in store.entries(v2.layers[1]) if e.digest is not None][:2]
    for e in victims:
        os.unlink(store.object_path(e.digest))
    rep = store.fsck(repair=True, sources=[str(layout)])
    assert rep.exit_code == 1, [p.message for p in rep.problems if not p.repaired]
    assert store.fsck().problems == []
    assert {im["name"] for im in store.images()} == {"v2"}  # the repair added no image


def test_nested_index_and_platform_selection(store: Store, tmp_path: Path) -> None:
    """An index of a manifest list: the platform decides which image is imported."""
    import hashlib

    root = tmp_path / "multi"
    _layout(root / "amd", [_tar([("arch", b"amd64")])])
    _layout(root / "arm", [_tar([("arch", b"arm64")])])
    blobs = root / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    entries = []
    for sub, arch in (("amd", "amd64"), ("arm", "arm64")):
        for p in (root / sub / "blobs" / "sha256").iterdir():
            shutil.copyfile(p, blobs / p.name)
        desc = json.loads((root / sub / "index.json").read_text())["manifests"][0]
        desc.pop("annotations")
        entries.append({**desc, "platform": {"os": "linux", "architecture": arch}})
    nested = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": entries,
        }
    ).encode()
    d = hashlib.sha256(nested).hexdigest()
    (blobs / d).write_bytes(nested)
    (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (root / "index.json").write_text(
        json.dumps(
            {
                "schemaVersion": 2,
                "manifests": [
                    {
                        "mediaType": "application/vnd.oci.image.index.v1+json",
                        "digest": "sha256:" + d,
                        "size": len(nested),
                        "annotations": {"org.opencontainers.image.ref.name": "multi"},
                    }
                ],
            }
        )
    )
    for arch in ("amd64", "arm64"):
        r = store.import_oci(str(root), ref="multi", name=arch, platform=f"linux/{arch}")
        out = tmp_path / f"out-{arch}"
        store.materialize_image(r.name, str(out))
        assert (out / "arch").read_bytes() == arch.encode()
    with pytest.raises(InvalidInputError, match="platform"):
        store.import_oci(str(root), ref="multi", name="x", platform="linux/s390x")


def test_rebuild_index_restores_images(tmp_path: Path) -> None:
    """Images are backed up like layers (images/), so a lost index loses no image: after
    `fsck --rebuild-index`, `images` lists what it listed, each layer's image count is
    recomputed, and rmi + gc behave as on the original store."""
    base = _tar([("shared/", None), ("shared/a", b"a" * 200)])
    layout1 = _layout(tmp_path / "l1", [base, _tar([("one", b"1" * 300)])])
    layout2 = _layout(tmp_path / "l2", [base, _tar([("two", b"2" * 300)])])
    root = str(tmp_path / "store")
    with Store.init(root) as st:
        st.import_oci(str(layout1), ref="t", name="reg.example/app:v1")
        st.import_oci(str(layout2), ref="t", name="reg.example/app:v2")
        st.tag("reg.example/app:v1", "stable")
        before = st.images()
        counts = _image_counts(st)
    assert sorted(os.listdir(os.path.join(root, "images"))) != []
    shutil.rmtree(os.path.join(root, "index"))
    from layerstore.ops.fsck import rebuild_index

    out = rebuild_index(root)
    assert out["images"] == 3 and out["images_not_restored"] == [], out
    with Store(root) as st:
        assert st.images() == before
        assert _image_counts(st) == counts
        assert st.fsck().problems == []
        # The restored images hold their layers as the originals did.
        st.rmi("reg.example/app:v1")
        st.gc()
        st.materialize_image("stable", str(tmp_path / "m"))
        assert (tmp_path / "m" / "one").read_bytes() == b"1" * 300
        st.rmi("stable")
        st.rmi("reg.example/app:v2")
        assert st.layers() == [] and st.images() == []
        assert os.listdir(os.path.join(root, "images")) == []


def test_rebuild_of_a_store_without_image_backups_restores_layers(tmp_path: Path) -> None:
    """A store written before image backups existed (no images/): layers come back, images
    cannot, and the rebuild says so (``image_backups`` false) instead of inventing them."""
    layout = _layout(tmp_path / "l", [_tar([("f", b"x" * 100)])])
    root = str(tmp_path / "store")
    with Store.init(root) as st:
        st.import_oci(str(layout), ref="t", name="app")
        st.import_path(str(_write(tmp_path / "plain.tar", _tar([("p", b"p" * 100)]))))
    shutil.rmtree(os.path.join(root, "images"))
    shutil.rmtree(os.path.join(root, "index"))
    from layerstore.ops.fsck import rebuild_index

    out = rebuild_index(root)
    assert out["image_backups"] is False and out["images"] == 0
    with Store(root) as st:
        assert st.images() == []
        assert len(st.layers()) == 2


def _image_counts(st: Store) -> dict[bytes, int]:
    """Each layer record's image reference count, as the index holds it."""
    with st.index.read() as txn:
        return {d: r.get("images", 0) for d, r in st.index.iter_layers(txn)}


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path
