"""The zstd:chunked layouts of the corpus really are zstd:chunked, checked independently of the
corpus code: annotations, TOC checksum at the annotated position, and a whole-blob decode (every
frame, skippable frames skipped) that yields a tar whose sha256 is the config's DiffID.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from pathlib import Path
from typing import Any

import pytest
import zstandard
from conftest import need_corpus

import testdata as corpus

pytestmark = pytest.mark.realdata

PREFIX = "io.containers.zstd-chunked."  # the older variant: what skopeo 1.9 / buildah 1.28 write


def _image(layout: Path, tag: str) -> tuple[list[dict[str, Any]], list[str]]:
    """(layer descriptors with their blob path, config diff_ids) of ``tag``."""
    index = json.loads((layout / "index.json").read_text())
    (desc,) = [
        m
        for m in index["manifests"]
        if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag
    ]

    def blob(d: dict[str, Any]) -> Path:
        algo, hexd = d["digest"].split(":")
        return layout / "blobs" / algo / hexd

    manifest = json.loads(blob(desc).read_bytes())
    config = json.loads(blob(manifest["config"]).read_bytes())
    return [{**d, "path": blob(d)} for d in manifest["layers"]], config["rootfs"]["diff_ids"]


def _toc(layer: dict[str, Any]) -> dict[str, Any]:
    """The layer's TOC, after checking its sha256 against the manifest-checksum annotation."""
    ann = layer["annotations"]
    offset, length, ulength, kind = map(int, ann[PREFIX + "manifest-position"].split(":"))
    assert kind == 1
    with open(layer["path"], "rb") as f:
        f.seek(offset)
        compressed = f.read(length)
    assert "sha256:" + hashlib.sha256(compressed).hexdigest() == ann[PREFIX + "manifest-checksum"]
    raw = zstandard.ZstdDecompressor().decompress(compressed, max_output_size=ulength)
    assert len(raw) == ulength
    return json.loads(raw)


class _HashingReader:
    """A file-like reader that hashes everything read through it."""

    def __init__(self, raw: Any) -> None:
        self.raw = raw
        self.sha256 = hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.sha256.update(data)
        return data


@pytest.mark.parametrize("version", [1, 2])
def test_buildah_layout_is_zstd_chunked(version: int) -> None:
    layout = need_corpus(corpus.buildah_chunked_layout, version)
    assert layout.parent.name == f"oci-buildah-zstd-chunked-v{version}"
    info = json.loads((layout.parent / "build.json").read_text())
    assert info["buildah_version"].startswith("1.")
    layers, diff_ids = _image(layout, f"v{version}")
    assert len(layers) == len(diff_ids) == 1  # the whole root filesystem in one layer
    (layer,) = layers
    assert layer["mediaType"] == "application/vnd.oci.image.layer.v1.tar+zstd"
    assert os.path.getsize(layer["path"]) == layer["size"]
    toc = _toc(layer)
    regular = [e for e in toc["entries"] if e["type"] == "reg"]
    assert len(regular) > 5000
    assert all(e["digest"].startswith("sha256:") for e in regular if e.get("size"))
    assert any(e["type"] == "chunk" for e in toc["entries"])  # large files are chunked
    # The recorded metadata agrees with what we found.
    (meta,) = info["zstd_chunked"]
    assert meta["digest"] == layer["digest"] and meta["diff_id"] == diff_ids[0]
    assert meta["toc_checksum_ok"] and meta["variant"] == "older"
    assert meta["toc_regular_files"] == len(regular)


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: (corpus.buildah_chunked_layout(1), "v1"), id="buildah-v1"),
        pytest.param(lambda: (corpus.buildah_chunked_layout(2), "v2"), id="buildah-v2"),
        pytest.param(lambda: (corpus.oci_layout(2, "zstd:chunked"), "v2"), id="skopeo-v2"),
    ],
)
def test_whole_blob_decodes_to_the_diff_id(make: Any) -> None:
    layout, tag = need_corpus(make)
    layers, diff_ids = _image(layout, tag)
    for layer, diff_id in zip(layers, diff_ids, strict=True):
        toc = _toc(layer)
        with open(layer["path"], "rb") as f:
            reader = _HashingReader(
                zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True)
            )
            with tarfile.open(fileobj=reader, mode="r|") as tar:  # type: ignore[call-overload]
                regular = sum(m.isreg() for m in tar)
            while reader.read(1 << 20):  # the end-of-archive padding tarfile leaves unread
                pass
        assert "sha256:" + reader.sha256.hexdigest() == diff_id
        assert regular == sum(e["type"] == "reg" for e in toc["entries"])


def test_buildah_v2_shares_most_files_with_v1() -> None:
    tocs = [
        _toc(_image(need_corpus(corpus.buildah_chunked_layout, v), f"v{v}")[0][0]) for v in (1, 2)
    ]
    v1, v2 = (
        {
            os.path.normpath("/" + e["name"]): e.get("digest")
            for e in t["entries"]
            if e["type"] == "reg"
        }
        for t in tocs
    )
    same = sum(v1.get(name) == digest for name, digest in v2.items())
    assert same > 0.9 * len(v2)
    assert same < len(v2)  # and v2 did change something
