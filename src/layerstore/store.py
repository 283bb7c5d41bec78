"""The public face of layerstore: :class:`Store`, a thin porcelain over the core.

A ``Store`` resolves what the caller names (a layer reference, an image name, a path or URL),
runs one operation of :mod:`layerstore.ops` on the core handle (:class:`layerstore.core.repo.Repo`)
and returns its result.  It holds no logic of its own: the layout, the identity and the index
are the core's (:mod:`layerstore.core.repo`), every pin, removal and deferral is
:mod:`layerstore.core.protocol`'s, and the work is the operations'.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO, Final

from .core import images, layers, protocol
from .core.digests import parse_hex
from .core.index import Index, ObjectRecord
from .core.layers import LayerInfo
from .core.leases import Lease
from .core.manifest import Entry
from .core.repo import FORMAT_FILE, FORMAT_VERSION, Repo
from .errors import DestinationError
from .ops import chunkindex, export, fsck, gc, ingest, materialize, oci, partial
from .ops.gc import GcPlan, GcResult
from .ops.ingest import ImportResult
from .ops.materialize import MaterializeResult
from .ops.oci import ImageResult
from .sources.base import RangeSource
from .sources.open import open_source

ENV_STORE: Final = "LAYERSTORE_STORE"

__all__ = ["ENV_STORE", "FORMAT_FILE", "FORMAT_VERSION", "LayerInfo", "Store", "default_store_path"]


def default_store_path() -> str:
    """``$LAYERSTORE_STORE``, else ``$XDG_DATA_HOME/layerstore``, else ``~/.local/share/...``."""
    env = os.environ.get(ENV_STORE)
    if env:
        return env
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "share"
    )
    return os.path.join(base, "layerstore")


class Store:
    """A layerstore at ``root``.  Open one per process (LMDB environments do not cross fork).

    Use as a context manager, or call :meth:`close`: closing releases this process's lease.
    ``repo`` is the core handle, for tools that need the plumbing (``root``, ``index``,
    ``lease``, ``object_path`` and the directory names are its, shown here for them).
    """

    def __init__(self, root: str, *, create: bool = False, for_fsck: bool = False) -> None:
        """Open (``create``: create if absent) the store at ``root``; see :class:`Repo`."""
        self.repo = Repo(root, create=create, for_fsck=for_fsck)

    # -- the core handle's fields ------------------------------------------------------------
    @property
    def root(self) -> str:
        return self.repo.root

    @property
    def index(self) -> Index:
        return self.repo.index

    @property
    def lease(self) -> Lease:
        return self.repo.lease

    @property
    def objects_dir(self) -> str:
        return self.repo.objects_dir

    @property
    def staging_dir(self) -> str:
        return self.repo.staging_dir

    @property
    def leases_dir(self) -> str:
        return self.repo.leases_dir

    @property
    def layers_dir(self) -> str:
        return self.repo.layers_dir

    @property
    def index_dir(self) -> str:
        return self.repo.index_dir

    @property
    def quarantine_dir(self) -> str:
        return self.repo.quarantine_dir

    def object_path(self, b3: bytes) -> str:
        return self.repo.object_path(b3)

    def new_staging_dir(self, kind: str) -> str:
        return self.repo.new_staging_dir(kind)

    # -- lifecycle -------------------------------------------------------------------------
    @classmethod
    def init(cls, root: str) -> Store:
        return cls(root, create=True)

    def close(self) -> None:
        self.repo.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- import ----------------------------------------------------------------------------
    def import_tar(
        self,
        stream: BinaryIO,
        progress: Callable[[int], None] | None = None,
        source: str = "",
        image_owned: bool = False,
    ) -> ImportResult:
        """Import a layer from a tar stream (plain, gzip or zstd, detected by magic bytes)."""
        return ingest.import_tar(self.repo, stream, progress, source, image_owned=image_owned)

    def import_path(
        self,
        path: str,
        progress: Callable[[int], None] | None = None,
        shortcut: bool = True,
        image_owned: bool = False,
    ) -> ImportResult:
        """Import from a tar file, ``-`` (stdin), or a directory.

        A tar file whose sha256 is already a stored layer's compressed digest is recognised
        without being parsed (``shortcut=False`` forces the full import)."""
        if path == "-":
            return ingest.import_tar(self.repo, sys.stdin.buffer, progress, source="stdin")
        return ingest.import_path(
            self.repo, path, progress, shortcut=shortcut, image_owned=image_owned
        )

    def import_chunked(
        self,
        source: str | os.PathLike[str] | RangeSource,
        annotations: dict[str, str] | None = None,
        *,
        expected_diff_id: str | None = None,
        progress: Callable[[int], None] | None = None,
        image_owned: bool = False,
        toc_only: bool = False,
        source_name: str = "",
    ) -> ImportResult:
        """Partially import a zstd:chunked blob: read only what the store lacks.

        ``source`` is a path to a local blob, an http(s) URL of a blob (read with range
        requests, :class:`layerstore.sources.http.HttpSource`), or any
        :class:`layerstore.sources.base.RangeSource`; ``annotations`` are the OCI descriptor's,
        which make the TOC trusted by checksum.  The result's ``partial`` reports bytes read
        vs the blob size.
        ``toc_only`` reads no header frames (podman's byte count) at the price of an unproved
        DiffID (see ``layerstore.ops.partial.import_chunked``).  ``source_name`` is recorded for
        a RangeSource (a path or URL names itself).
        """
        opened = (
            open_source(source)
            if isinstance(source, str | os.PathLike)
            else contextlib.nullcontext((source, source_name))
        )
        with opened as (src, name):
            return partial.import_chunked(
                self.repo,
                src,
                annotations,
                expected_diff_id=expected_diff_id,
                progress=progress,
                source_name=name,
                image_owned=image_owned,
                toc_only=toc_only,
            )

    def import_oci(
        self,
        layout: str,
        ref: str | None = None,
        name: str | None = None,
        platform: str | None = None,
        on_layer: Callable[[int, int, dict[str, Any]], None] | None = None,
        partial: bool = True,
        toc_only: bool = False,
    ) -> ImageResult:
        """Import an image from an OCI image layout or a ``docker save`` archive (see
        ``layerstore.ops.oci``); ``on_layer`` reports each layer as it is done; ``partial``:
        read zstd:chunked layers partially."""
        if os.path.isfile(layout):  # a `docker save` archive
            return oci.import_docker_archive(self.repo, layout, name=name)
        return oci.import_layout(
            self.repo,
            layout,
            ref=ref,
            name=name,
            plat=platform,
            on_layer=on_layer,
            partial=partial,
            toc_only=toc_only,
        )

    # -- queries ---------------------------------------------------------------------------
    def layers(self, include_deleted: bool = False) -> list[LayerInfo]:
        return layers.list_layers(self.repo, include_deleted)

    def resolve(self, ref: str) -> bytes:
        """A layer's DiffID from: a full or prefixed DiffID, or a compressed-blob digest."""
        return layers.resolve(self.repo, ref)

    def layer(self, ref: str) -> LayerInfo:
        diff_id = self.resolve(ref)
        return LayerInfo.from_record(diff_id, layers.record(self.repo, diff_id, ref))

    def _layer_record(self, ref: str) -> dict[str, Any]:
        return layers.record(self.repo, self.resolve(ref), ref)

    def entries(self, ref: str) -> Iterator[Entry]:
        """Stream a layer's manifest entries (in tar order)."""
        return self.repo.manifest_entries(parse_hex(self.layer(ref).manifest))

    def get_object(self, b3: bytes) -> ObjectRecord | None:
        return self.repo.get_object(b3)

    def lookup_sha256(self, sha: bytes) -> bytes | None:
        """blake3 name of the object whose sha256 is ``sha`` (OCI / TOC digests)."""
        return self.repo.lookup_sha256(sha)

    def images(self) -> list[dict[str, Any]]:
        """Every image; ``unproved`` lists the layers whose DiffID nothing verified."""
        return images.list_images(self.repo)

    def image(self, name: str) -> dict[str, Any]:
        return images.get_image(self.repo, name)

    # -- materialize and export -------------------------------------------------------------
    def materialize(
        self,
        ref: str,
        dest: str,
        *,
        mode: str = "reflink",
        progress: Callable[[int], None] | None = None,
        workers: int = 0,
        sync: bool = True,
    ) -> MaterializeResult:
        """Build the layer as a directory tree at ``dest`` (which must not exist)."""
        diff_id = self.resolve(ref)
        with protocol.pinned_layers(self.repo, [diff_id], ref=ref) as (layer,):
            return materialize.materialize(
                self.repo,
                layer.manifest,
                dest,
                mode=mode,
                progress=progress,
                workers=workers,
                sync=sync,
                total_files=layer.record["files"],
                ordered=bool(layer.record.get("replaces")),
            )

    def materialize_image(
        self,
        name: str,
        dest: str,
        *,
        mode: str = "reflink",
        progress: Callable[[int], None] | None = None,
        sync: bool = True,
        diff_dirs: bool = False,
    ) -> MaterializeResult | list[MaterializeResult]:
        """Build image ``name`` as one flattened root filesystem at ``dest`` (whiteouts and
        opaque directories resolved) -- or, with ``diff_dirs``, one overlayfs-ready lower
        directory per layer under ``dest/`` (``0``, ``1``, ... bottom first)."""
        im = self.image(name)
        diff_ids = [bytes.fromhex(h) for h in im["layers"]]
        with protocol.pinned_layers(self.repo, diff_ids, image=name) as pinned:
            manifests = [p.manifest for p in pinned]
            if not diff_dirs:
                return materialize.materialize_flat(
                    self.repo, manifests, dest, mode=mode, progress=progress, sync=sync
                )
            if os.path.lexists(dest):
                raise DestinationError(f"{dest} exists; materialize creates a new directory")
            return materialize.materialize_diff_dirs(
                self.repo, manifests, dest, mode=mode, progress=progress, sync=sync
            )

    def export_layer(
        self, ref: str, out: BinaryIO, progress: Callable[[int], None] | None = None
    ) -> int:
        """Write the layer's exact original tar (sha256 == DiffID, verified) to ``out``.

        The layer is pinned while it is read, like a materialization.
        """
        return export.export_layer(self.repo, self.resolve(ref), out, progress, ref=ref)

    def export_chunked(self, ref: str, out: BinaryIO) -> Any:
        """Write a layer as a zstd:chunked blob (current upstream variant); returns the
        descriptor facts (digest, size, annotations).  See ``layerstore.chunked.writer``."""
        return export.export_chunked(self.repo, self.resolve(ref), out, ref=ref)

    def export_oci(self, name: str, path: str, compression: str = "gzip") -> dict[str, Any]:
        """Write image ``name`` as an OCI image layout (see ``layerstore.ops.oci``)."""
        return oci.export_layout(self.repo, name, path, compression)

    # -- remove ----------------------------------------------------------------------------
    def remove(self, ref: str) -> dict[str, Any]:
        """Drop a layer's references in one transaction.  Never unlinks a file (gc does).

        If a live process is materializing the layer, the layer disappears from listings now
        and its references are dropped when that process unpins it (or dies).
        """
        import time

        t0 = time.monotonic()
        diff_id = self.resolve(ref)
        deferred = protocol.remove_layer(self.repo, diff_id, ref)
        return {
            "diff_id": "sha256:" + diff_id.hex(),
            "deferred": deferred,
            "seconds": time.monotonic() - t0,
        }

    def rmi(self, name: str) -> dict[str, Any]:
        """Remove an image: drops its references; layers no other image uses go with it."""
        return {"image": name, "layers_removed": images.remove_image(self.repo, name)}

    def tag(self, src: str, dst: str) -> None:
        """Give image ``src`` another name ``dst`` (both then reference its layers)."""
        images.tag(self.repo, src, dst)

    # -- maintenance -----------------------------------------------------------------------
    def gc(self, dry_run: bool = False, progress: Callable[[int], None] | None = None) -> GcResult:
        """Unlink unreferenced, unpinned objects and crash leftovers (see ``layerstore.ops.gc``):
        a plan, then its execution.  ``dry_run``: the plan's figures, nothing changed."""
        return gc.collect(self.repo, dry_run=dry_run, progress=progress)

    def gc_plan(self) -> GcPlan:
        """What :meth:`gc` would do now, item by item (and what it keeps, and why); writes
        nothing.  ``layerstore.ops.gc.execute(st.repo, plan)`` carries a plan out."""
        return gc.plan(self.repo)

    def fsck(
        self,
        *,
        full: bool = True,
        deep: bool = False,
        repair: bool = False,
        sources: list[str] | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> Any:
        """Check the store (see ``layerstore.ops.fsck``); ``repair`` fixes what it can."""
        return fsck.fsck(
            self.repo, full=full, deep=deep, repair=repair, sources=sources, progress=progress
        )

    def chunk_index(self, refs: list[str] | None = None) -> dict[str, int]:
        """Cut the objects of these layers (default: all live layers) with the
        containers/storage chunker and index their chunks, so partial imports can reuse chunks
        of files that changed.  Objects done before are skipped (a marker per object)."""
        total = {"layers": 0, "objects_chunked": 0, "bytes_chunked": 0, "chunks_indexed": 0}
        infos = [self.layer(r) for r in refs] if refs else self.layers()
        for info in infos:
            for k, v in chunkindex.index_layer(self.repo, parse_hex(info.manifest)).items():
                total[k] += v
            total["layers"] += 1
        return total

    # -- accounting ------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Logical bytes (what layers contain) vs physical bytes (what objects hold)."""
        idx = self.index
        objects = physical = unreferenced = unreferenced_bytes = 0
        with idx.read() as txn:
            for _k, v in txn.cursor(db=idx.db[b"objects"]):
                rec = ObjectRecord.unpack(v)
                objects += 1
                physical += rec.size
                if rec.refs == 0:
                    unreferenced += 1
                    unreferenced_bytes += rec.size
            infos = [LayerInfo.from_record(k, r) for k, r in idx.iter_layers(txn)]
        live = [li for li in infos if li.state == "live"]
        logical = sum(li.bytes for li in live)
        return {
            "store": self.root,
            "layers": len(live),
            "layers_pending_delete": len(infos) - len(live),
            "files": sum(li.files for li in live),
            "logical_bytes": logical,
            "objects": objects,
            "physical_bytes": physical,
            "unreferenced_objects": unreferenced,
            "unreferenced_bytes": unreferenced_bytes,
            "dedup_ratio": round(logical / physical, 3) if physical else None,
        }
