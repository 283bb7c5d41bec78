"""OCI image layouts: import an image (index → manifest → config → layers) as a named image.

An *image* is a reference: a name pointing at its manifest and config (both kept as objects)
and at its ordered layers.  Layers imported for an image are owned by images; removing the last
image that uses such a layer removes the layer (references only, gc frees the space).  A layer
the user imported directly stays until removed directly.

Everything read from a layout is untrusted: blob paths are built only from validated sha256
digests (never from names in the layout), every blob's size and digest are checked, every
layer's DiffID must equal the config's ``rootfs.diff_ids`` entry, and JSON documents are capped
in size.  These checks run before the layer they concern commits (a refused layer leaves
nothing); a failure a later layer reveals removes the layers this import created, so nothing
half-imported stays referenced (docs/concurrency.md, "Image import").
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

from ..core import images
from ..core.images import check_image_name
from ..core.repo import Repo
from ..errors import InvalidInputError, NotFoundError
from ..sources.base import FileSource
from . import export
from .ingest import Expected, import_tar
from .partial import import_chunked

MAX_JSON: Final = 4 << 20
INDEX_TYPES: Final = {
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
}
MANIFEST_TYPES: Final = {
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
}
LAYER_TYPES: Final = {
    "application/vnd.oci.image.layer.v1.tar": "none",
    "application/vnd.oci.image.layer.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd": "zstd",
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "gzip",
}
_DIGEST = re.compile(r"^sha256:([0-9a-f]{64})$")
_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "ppc64le": "ppc64le"}


@dataclass
class ImageResult:
    name: str
    manifest: str
    config: str
    layers: list[str]
    new_layers: int = 0
    reused_layers: int = 0
    seconds: float = 0.0
    per_layer: list[dict[str, Any]] = field(default_factory=list)
    # Layers of the image whose DiffID nothing verified (TOC-only imports), "sha256:..."
    unproved: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _obj(doc: dict[str, Any], key: str, what: str) -> dict[str, Any]:
    """``doc[key]`` where the OCI spec has an optional JSON object (annotations, platform,
    rootfs): ``{}`` when absent, and anything else than an object refused by name -- the
    documents are untrusted, so a list there must be a clean error, not an AttributeError."""
    value = doc.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidInputError(f"{what}: {key!r} is not a JSON object")
    return value


def _media_type(desc: dict[str, Any]) -> str | None:
    """A descriptor's ``mediaType`` if it is a string (any other JSON value is unhashable or
    meaningless as a type, and is reported as unsupported by the caller)."""
    mt = desc.get("mediaType")
    return mt if isinstance(mt, str) else None


def host_platform() -> str:
    return f"linux/{_ARCH.get(platform.machine(), platform.machine())}"


class _Layout:
    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        try:
            with open(os.path.join(self.root, "oci-layout")) as f:
                marker = json.load(f)
        except (OSError, ValueError):
            raise InvalidInputError(f"{root} is not an OCI image layout (no oci-layout)") from None
        if not isinstance(marker, dict) or marker.get("imageLayoutVersion") != "1.0.0":
            raise InvalidInputError(f"{root}: unsupported imageLayoutVersion")

    def blob_path(self, desc: dict[str, Any]) -> str:
        """Path of a descriptor's blob, from its digest alone (never a path from the layout)."""
        digest = desc.get("digest")
        m = _DIGEST.match(digest) if isinstance(digest, str) else None
        if m is None:
            raise InvalidInputError(f"descriptor digest {digest!r} is not a sha256 digest")
        size = desc.get("size")
        if not isinstance(size, int) or size < 0:
            raise InvalidInputError(f"descriptor {digest} has no valid size")
        path = os.path.join(self.root, "blobs", "sha256", m.group(1))
        if not os.path.isfile(path):
            raise InvalidInputError(f"blob {digest} is missing from the layout")
        real = os.path.realpath(path)
        if not real.startswith(os.path.realpath(self.root) + os.sep):
            raise InvalidInputError(f"blob {digest} resolves outside the layout")
        return path

    def read_json(self, desc: dict[str, Any]) -> tuple[dict[str, Any], bytes]:
        path = self.blob_path(desc)
        size = desc["size"]
        if size > MAX_JSON:
            raise InvalidInputError(f"{desc['digest']}: a {size}-byte JSON document is too big")
        with open(path, "rb") as f:
            data = f.read(MAX_JSON + 1)
        if len(data) != size:
            raise InvalidInputError(f"blob {desc['digest']} is {len(data)} bytes, not {size}")
        if "sha256:" + hashlib.sha256(data).hexdigest() != desc["digest"]:
            raise InvalidInputError(f"blob {desc['digest']} does not match its digest")
        try:
            doc = json.loads(data)
        except ValueError as exc:
            raise InvalidInputError(f"blob {desc['digest']} is not JSON: {exc}") from None
        if not isinstance(doc, dict):
            raise InvalidInputError(f"blob {desc['digest']} is not a JSON object")
        return doc, data


def _select(
    layout: _Layout, index: dict[str, Any], ref: str | None, plat: str, depth: int = 0
) -> dict[str, Any]:
    """Pick the image manifest descriptor: by ref name at the top, by platform in lists."""
    if depth > 4:
        raise InvalidInputError("image indexes nest too deeply")
    manifests = index.get("manifests")
    if not isinstance(manifests, list) or not manifests:
        raise InvalidInputError("image index has no manifests")
    cands = manifests
    if depth == 0 and ref is not None:
        cands = [
            m
            for m in manifests
            if isinstance(m, dict)
            and _obj(m, "annotations", "image index").get("org.opencontainers.image.ref.name")
            == ref
        ]
        if not cands:
            raise NotFoundError(f"the layout has no image tagged {ref!r}")
    if len(cands) > 1:
        os_, _, arch = plat.partition("/")
        cands = [
            m
            for m in cands
            if isinstance(m, dict)
            and _obj(m, "platform", "image index").get("os", os_) == os_
            and _obj(m, "platform", "image index").get("architecture", arch) == arch
        ]
        if len(cands) != 1:
            raise InvalidInputError(
                f"the layout has {len(cands)} images for platform {plat}; name one with a tag"
            )
    desc = cands[0]
    if not isinstance(desc, dict):
        raise InvalidInputError("bad descriptor in the image index")
    mt = _media_type(desc)
    if mt in INDEX_TYPES:
        nested, _ = layout.read_json(desc)
        return _select(layout, nested, None, plat, depth + 1)
    if mt not in MANIFEST_TYPES:
        raise InvalidInputError(f"unsupported manifest media type {mt!r}")
    return desc


def is_chunked(desc: dict[str, Any]) -> bool:
    """A tar+zstd layer descriptor with zstd:chunked TOC annotations (either variant)."""
    ann = desc.get("annotations")
    return (
        desc.get("mediaType") == _LAYER_MT["zstd"]
        and isinstance(ann, dict)
        and any(k.endswith("zstd-chunked.manifest-checksum") for k in ann)
    )


def _diff_ids(config: dict[str, Any], what: str, n: int) -> list[str]:
    """The config's ``rootfs.diff_ids``: one sha256 digest per layer (checked up front)."""
    diff_ids = _obj(config, "rootfs", f"config {what}").get("diff_ids")
    if not isinstance(diff_ids, list) or len(diff_ids) != n:
        k = len(diff_ids) if isinstance(diff_ids, list) else 0
        raise InvalidInputError(f"config {what} lists {k} diff_ids for {n} layers")
    for d in diff_ids:
        if not isinstance(d, str) or _DIGEST.match(d) is None:
            raise InvalidInputError(f"config {what}: diff_id {d!r} is not a sha256 digest")
    return diff_ids


def _absent(repo: Repo, diff_id: str) -> bool:
    with repo.index.read() as txn:
        return repo.index.get_layer(txn, bytes.fromhex(diff_id[7:])) is None


def _check_layer(r: Any, i: int, label: str, want: str, created: list[str]) -> None:
    """Record a layer this import created (for rollback), then hold it to the config.

    The pipeline refuses a blob whose digest, size or DiffID differs before it commits
    (``ingest.Expected``); this catches what a shortcut answered without committing."""
    if not r.already_present and r.diff_id not in created:
        created.append(r.diff_id)
    if r.diff_id != want:
        raise InvalidInputError(
            f"layer {i} ({label}) has DiffID {r.diff_id}, but the config says {want}"
        )


def import_layout(
    repo: Repo,
    path: str,
    ref: str | None = None,
    name: str | None = None,
    plat: str | None = None,
    on_layer: Callable[[int, int, dict[str, Any]], None] | None = None,
    partial: bool = True,
    toc_only: bool = False,
) -> ImageResult:
    """Import the image ``ref`` (or the only image) of an OCI layout as image ``name``.

    ``on_layer(i, n, info)`` is called after each layer (the CLI's per-layer progress).
    ``partial``: zstd:chunked layers are read partially (only what the store lacks; the TOC is
    trusted by the checksum in the digest-verified manifest, and the replayed DiffID must equal
    the config's); ``False`` reads and hashes every blob whole.  ``toc_only``: older-variant
    layers skip their header frames and are keyed by the config's DiffID, unproved."""
    t0 = time.monotonic()
    layout = _Layout(path)
    with open(os.path.join(layout.root, "index.json"), "rb") as f:
        raw = f.read(MAX_JSON + 1)
    if len(raw) > MAX_JSON:
        raise InvalidInputError("index.json is too big")
    try:
        index = json.loads(raw)
    except ValueError as exc:
        raise InvalidInputError(f"index.json is not JSON: {exc}") from None
    if not isinstance(index, dict):
        raise InvalidInputError("index.json is not a JSON object")
    mdesc = _select(layout, index, ref, plat or host_platform())
    manifest, mbytes = layout.read_json(mdesc)
    cdesc = manifest.get("config")
    layers = manifest.get("layers")
    if not isinstance(cdesc, dict) or not isinstance(layers, list):
        raise InvalidInputError(f"manifest {mdesc['digest']} lacks config or layers")
    config, cbytes = layout.read_json(cdesc)
    diff_ids = _diff_ids(config, cdesc["digest"], len(layers))
    for d in layers:
        if not isinstance(d, dict) or _media_type(d) not in LAYER_TYPES:
            mt = d.get("mediaType") if isinstance(d, dict) else d
            raise InvalidInputError(f"layer media type {mt!r} is not supported")
        layout.blob_path(d)  # validate every path before importing anything
    for i, d in enumerate(layers):  # and every size: the cheapest lie to catch
        if os.path.getsize(layout.blob_path(d)) != d["size"]:
            raise InvalidInputError(
                f"layer {i} ({d['digest']}): the blob's size differs from its descriptor's "
                f"{d['size']}; the layout is damaged or tampered with, nothing was imported"
            )
    name = name or ref or mdesc["digest"]
    check_image_name(name)
    result = ImageResult(name=name, manifest=mdesc["digest"], config=cdesc["digest"], layers=[])
    created: list[str] = []
    try:
        for i, (d, want) in enumerate(zip(layers, diff_ids, strict=True)):
            blob = layout.blob_path(d)
            ann = d.get("annotations")
            if _absent(repo, want):
                # Listed before the import, so an interrupt between the layer's commit and
                # the return of the import still rolls it back (only if nothing holds it).
                created.append(want)
            if partial and is_chunked(d):
                # The TOC is trusted by the manifest's checksum, the replayed DiffID must equal
                # the config's before the layer commits (partial.py); the whole blob is never
                # read, so its digest cannot be checked.
                with FileSource(blob) as src:
                    r = import_chunked(
                        repo,
                        src,
                        ann,
                        expected_diff_id=want,
                        source_name=f"file:{os.path.abspath(blob)}",
                        image_owned=True,
                        toc_only=toc_only,
                    )
            else:
                expect = Expected(
                    what=f"layer {i} ({d['digest']})",
                    digest=bytes.fromhex(d["digest"][7:]),
                    size=d["size"],
                    diff_id=bytes.fromhex(want[7:]),
                )
                try:
                    f = open(blob, "rb")
                except OSError as exc:
                    raise InvalidInputError(f"cannot open {blob}: {exc.strerror}") from None
                with f:
                    r = import_tar(repo, f, source=blob, image_owned=True, expect=expect)
            _check_layer(r, i, d["digest"], want, created)
            result.layers.append(r.diff_id)
            info = {
                "digest": d["digest"],
                "diff_id": r.diff_id,
                "new": not r.already_present,
                "new_bytes": r.new_bytes,
                "seconds": round(r.seconds, 3),
            }
            if r.partial is not None:
                info["partial"] = r.partial
            result.per_layer.append(info)
            if on_layer is not None:
                on_layer(i, len(layers), info)
        images.commit_image(repo, name, mbytes, cbytes, result.layers, mdesc.get("mediaType", ""))
    except BaseException:
        images.rollback_layers(repo, created)
        raise
    result.unproved = ["sha256:" + h for h in images.get_image(repo, name)["unproved"]]
    result.new_layers = sum(1 for x in result.per_layer if x["new"])
    result.reused_layers = len(result.layers) - result.new_layers
    result.seconds = time.monotonic() - t0
    return result


__all__ = ["ImageResult", "host_platform", "import_layout"]


_LAYER_MT: Final = {
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
    "zstd:chunked": "application/vnd.oci.image.layer.v1.tar+zstd",
    "none": "application/vnd.oci.image.layer.v1.tar",
}


def export_layout(repo: Repo, name: str, path: str, compression: str = "gzip") -> dict[str, Any]:
    """Write image ``name`` as an OCI image layout at ``path`` (created; tag = the name).

    Layers are rebuilt byte for byte from their tar-splits (so the config's diff_ids hold) and
    compressed deterministically (gzip without a timestamp, or zstd level 3): exporting the
    same image twice gives the same blobs.  The config is the original document.
    """
    import base64
    import gzip
    import shutil
    import tempfile

    import zstandard

    if compression not in _LAYER_MT:
        raise InvalidInputError(f"compression must be one of {', '.join(_LAYER_MT)}")
    im = images.get_image(repo, name)
    if os.path.lexists(path):
        raise InvalidInputError(f"{path} exists; export writes a new layout directory")
    parent_dir = os.path.dirname(os.path.abspath(path)) or "."
    stage = tempfile.mkdtemp(prefix=".layerstore-export-", dir=parent_dir)
    try:
        blobs = os.path.join(stage, "blobs", "sha256")
        os.makedirs(blobs)

        def put_file(tmp: str) -> dict[str, Any]:
            h = hashlib.sha256()
            with open(tmp, "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
            size = os.path.getsize(tmp)
            os.rename(tmp, os.path.join(blobs, h.hexdigest()))
            return {"digest": "sha256:" + h.hexdigest(), "size": size}

        def put_bytes(data: bytes) -> dict[str, Any]:
            d = hashlib.sha256(data).hexdigest()
            with open(os.path.join(blobs, d), "wb") as f:
                f.write(data)
            return {"digest": "sha256:" + d, "size": len(data)}

        layers = []
        for h in im["layers"]:
            tmp = os.path.join(stage, "layer.tmp")
            extra: dict[str, Any] = {}
            with open(tmp, "wb") as raw:
                if compression == "zstd:chunked":
                    extra["annotations"] = export.export_chunked(
                        repo, bytes.fromhex(h), raw
                    ).annotations
                elif compression == "gzip":
                    with gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, compresslevel=6) as z:
                        export.export_layer(repo, bytes.fromhex(h), z)  # type: ignore[arg-type]
                elif compression == "zstd":
                    cctx = zstandard.ZstdCompressor(level=3, write_checksum=True)
                    with cctx.stream_writer(raw, closefd=False) as z:
                        export.export_layer(repo, bytes.fromhex(h), z)  # type: ignore[arg-type]
                else:
                    export.export_layer(repo, bytes.fromhex(h), raw)
            layers.append({"mediaType": _LAYER_MT[compression], **put_file(tmp), **extra})
        config = base64.b64decode(im["config_json"])
        cdesc = put_bytes(config)
        manifest = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **cdesc},
            "layers": layers,
        }
        mdesc = put_bytes(json.dumps(manifest, indent=None, separators=(",", ":")).encode())
        with open(os.path.join(stage, "oci-layout"), "w") as f:
            json.dump({"imageLayoutVersion": "1.0.0"}, f)
        with open(os.path.join(stage, "index.json"), "w") as f:
            json.dump(
                {
                    "schemaVersion": 2,
                    "mediaType": "application/vnd.oci.image.index.v1+json",
                    "manifests": [
                        {
                            "mediaType": "application/vnd.oci.image.manifest.v1+json",
                            **mdesc,
                            "annotations": {"org.opencontainers.image.ref.name": name},
                        }
                    ],
                },
                f,
            )
        os.rename(stage, path)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return {"image": name, "layout": path, "manifest": mdesc["digest"], "layers": layers}


def import_docker_archive(repo: Repo, path: str, name: str | None = None) -> ImageResult:
    """Import the (first) image of a ``docker save`` archive.

    The archive is a tar holding ``manifest.json`` (``Config``, ``RepoTags``, ``Layers``), the
    config JSON and one tar per layer.  Member names come from the archive: they are only ever
    looked up among its members, never used as paths.  Layers are verified against the
    config's diff_ids, exactly as for OCI layouts.
    """
    import tarfile

    t0 = time.monotonic()
    try:
        tf = tarfile.open(path, "r:")
    except (OSError, tarfile.TarError) as exc:
        raise InvalidInputError(f"{path} is not a docker-save archive: {exc}") from None
    with tf:
        members = {m.name.removeprefix("./"): m for m in tf.getmembers() if m.isreg()}

        def read_small(member_name: str) -> bytes:
            m = members.get(member_name)
            if m is None:
                raise InvalidInputError(f"{path}: the archive has no {member_name!r}")
            if m.size > MAX_JSON:
                raise InvalidInputError(f"{path}: {member_name} is implausibly large")
            f = tf.extractfile(m)
            assert f is not None
            return f.read()

        try:
            manifest = json.loads(read_small("manifest.json"))
            entry = manifest[0]
            cfg_bytes = read_small(entry["Config"])
            config = json.loads(cfg_bytes)
            layer_names = list(entry["Layers"])
            if not isinstance(config, dict):
                raise TypeError("the config is not a JSON object")
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise InvalidInputError(f"{path}: malformed docker-save manifest: {exc}") from None
        diff_ids = _diff_ids(config, f"{path}:{entry['Config']}", len(layer_names))
        tags = entry.get("RepoTags") or []
        name = name or (tags[0] if tags else "sha256:" + hashlib.sha256(cfg_bytes).hexdigest())
        check_image_name(name)
        result = ImageResult(
            name=name,
            manifest="",
            config="sha256:" + hashlib.sha256(cfg_bytes).hexdigest(),
            layers=[],
        )
        created: list[str] = []
        try:
            for i, (lname, want) in enumerate(zip(layer_names, diff_ids, strict=True)):
                m = members.get(lname)
                if m is None:
                    raise InvalidInputError(f"{path}: layer {i} ({lname!r}) is not in the archive")
                f = tf.extractfile(m)
                assert f is not None
                if _absent(repo, want):
                    created.append(want)  # as in import_layout: rolled back however it ends
                expect = Expected(what=f"layer {i} ({lname!r})", diff_id=bytes.fromhex(want[7:]))
                r = import_tar(repo, f, source=f"{path}:{lname}", image_owned=True, expect=expect)
                _check_layer(r, i, lname, want, created)
                result.layers.append(r.diff_id)
            mbytes = json.dumps(entry, sort_keys=True).encode()
            result.manifest = "sha256:" + hashlib.sha256(mbytes).hexdigest()
            images.commit_image(
                repo, name, mbytes, cfg_bytes, result.layers, "application/x-docker-save-entry"
            )
        except BaseException:
            images.rollback_layers(repo, created)
            raise
    result.new_layers = len(created)
    result.reused_layers = len(result.layers) - len(created)
    result.seconds = time.monotonic() - t0
    return result
