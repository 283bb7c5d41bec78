"""Fuzzing OCI image layout import: mutated ``index.json``, manifest, config and ``oci-layout``.

A small valid layout (one layer) is written, one document is changed -- a value anywhere in it
replaced by arbitrary JSON, a key dropped, or its bytes cut or flipped -- and the digests of
the documents that point at it are fixed up (unless the change was to those very descriptor
fields), so the import gets past the digest checks to the field the change hit.  The property:
``import_oci`` either works or raises a :class:`LayerstoreError`, never another exception, and
a refused import leaves the store as it was.
"""

from __future__ import annotations

import copy
import gzip
import hashlib
import json
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fuzzing import examples
from hypothesis import event, given
from hypothesis import strategies as st
from test_fuzz_parsers import json_values
from test_fuzz_tar import store_state
from test_hostile import make_tar, reg

from layerstore import LayerstoreError, Store

LAYER_TAR = make_tar(reg("etc/hostname", b"fuzz\n"), reg("bin/sh", b"#!" * 50))
LAYER = gzip.compress(LAYER_TAR, mtime=0)
DIFF_ID = "sha256:" + hashlib.sha256(LAYER_TAR).hexdigest()
CHUNKED = "io.github.containers.zstd-chunked."


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def base_docs() -> dict[str, Any]:
    config = {
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [DIFF_ID]},
        "config": {"Env": ["PATH=/bin"]},
    }
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json"},
        "layers": [
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": sha(LAYER),
                "size": len(LAYER),
            }
        ],
    }
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "annotations": {"org.opencontainers.image.ref.name": "v1"},
                "platform": {"os": "linux", "architecture": "amd64"},
            }
        ],
    }
    return {
        "oci-layout": {"imageLayoutVersion": "1.0.0"},
        "index": index,
        "manifest": manifest,
        "config": config,
    }


# Values that mean something to the importer, besides arbitrary JSON.
TELLING = [
    None,
    [],
    {},
    "",
    0,
    -1,
    1 << 64,
    True,
    1.5,
    "sha256:" + "0" * 64,
    sha(LAYER),
    "../../etc/passwd",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    {
        CHUNKED + "manifest-checksum": "sha256:" + "1" * 64,
        CHUNKED + "manifest-position": "8:9:10:1",
    },
    {CHUNKED + "manifest-checksum": 5, CHUNKED + "manifest-position": ["x"]},
    {"org.opencontainers.image.ref.name": ["v1"]},
    ["x"],
]


def paths(doc: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every place in a JSON document: the root, each key of an object, each list item."""
    yield prefix
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from paths(v, (*prefix, i))


@dataclass
class Mutation:
    doc: str
    path: tuple[Any, ...]
    op: str  # "set", "drop", "add" (a new key), "bytes" (cut/flip the serialized document)
    value: Any = None


def apply(docs: dict[str, Any], mu: Mutation) -> None:
    if mu.op == "bytes":
        return
    if not mu.path:
        if mu.op == "set":
            docs[mu.doc] = mu.value
        return
    parent = docs[mu.doc]
    for k in mu.path[:-1]:
        parent = parent[k]
    last = mu.path[-1]
    if mu.op == "set":
        parent[last] = mu.value
    elif mu.op == "drop":
        del parent[last]
    elif mu.op == "add" and isinstance(parent[last], dict):
        parent[last]["fuzz"] = mu.value


def under(mu: Mutation | None, doc: str, *prefix: Any) -> bool:
    return (
        mu is not None and mu.doc == doc and mu.op != "bytes" and mu.path[: len(prefix)] == prefix
    )


def write_layout(root: Path, mu: Mutation | None, mangle: tuple[int, int] = (0, 0)) -> None:
    """The base layout with ``mu`` applied, digests fixed up along the chain."""
    docs = base_docs()
    if mu is not None:
        apply(docs, mu)
    blobs = root / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def serialize(name: str) -> bytes:
        data = json.dumps(docs[name]).encode()
        if mu is not None and mu.op == "bytes" and mu.doc == name:
            pos, how = mangle
            pos %= len(data)
            data = (
                data[:pos] if how == 0 else data[:pos] + bytes([data[pos] ^ how]) + data[pos + 1 :]
            )
        return data

    def put(data: bytes) -> dict[str, Any]:
        (blobs / sha(data)[7:]).write_bytes(data)
        return {"digest": sha(data), "size": len(data)}

    put(LAYER)
    cfg = put(serialize("config"))
    m = docs["manifest"]
    if (
        isinstance(m, dict)
        and isinstance(m.get("config"), dict)
        and not under(mu, "manifest", "config")
    ):
        m["config"].update(cfg)
    man = put(serialize("manifest"))
    ix = docs["index"]
    if (
        isinstance(ix, dict)
        and isinstance(ix.get("manifests"), list)
        and ix["manifests"]
        and isinstance(ix["manifests"][0], dict)
        and not under(mu, "index", "manifests", 0)
    ):
        ix["manifests"][0].update(man)
    (root / "index.json").write_bytes(serialize("index"))
    (root / "oci-layout").write_bytes(serialize("oci-layout"))


@st.composite
def mutations(draw: st.DrawFn) -> tuple[Mutation, tuple[int, int]]:
    docs = base_docs()
    name = draw(st.sampled_from(["index", "index", "manifest", "manifest", "config", "oci-layout"]))
    where = draw(st.sampled_from(list(paths(docs[name]))))
    op = draw(st.sampled_from(["set", "set", "set", "drop", "add", "bytes"]))
    if op == "drop" and not where:
        op = "set"
    value = draw(st.one_of(st.sampled_from(TELLING), json_values))
    mangle = (draw(st.integers(0, 1 << 16)), draw(st.integers(0, 255)))
    return Mutation(name, where, op, copy.deepcopy(value)), mangle


@pytest.fixture(scope="module")
def oci_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    st_ = Store.init(str(tmp_path_factory.mktemp("fuzz-oci") / "store"))
    yield st_
    st_.close()


def check_import(
    store: Store,
    mu: Mutation | None,
    mangle: tuple[int, int],
    ref: str | None,
    note: Callable[[str], object] = event,
) -> None:
    before = store_state(store)
    with tempfile.TemporaryDirectory(prefix="layerstore-fuzz-oci-") as tmp:
        layout = Path(tmp) / "layout"
        write_layout(layout, mu, mangle)
        try:
            res = store.import_oci(str(layout), ref=ref, platform="linux/amd64")
        except LayerstoreError as exc:  # anything else fails the test as it is
            assert store_state(store) == before, f"a refused import changed the store: {exc}"
            note(f"refused: {type(exc).__name__}")
            return
        note("imported")
        assert res.layers == [DIFF_ID]
        store.rmi(res.name)
        store.gc()
        assert store.layers() == []


def test_base_layout_imports(oci_store: Store) -> None:
    for ref in ("v1", None):
        seen: list[str] = []
        check_import(oci_store, None, (0, 0), ref, seen.append)
        assert seen == ["imported"]


@examples(60)
@given(mu_mangle=mutations(), ref=st.sampled_from([None, "v1"]))
def test_mutated_layout_refused_cleanly(
    oci_store: Store, mu_mangle: tuple[Mutation, tuple[int, int]], ref: str | None
) -> None:
    mu, mangle = mu_mangle
    check_import(oci_store, mu, mangle, ref)
