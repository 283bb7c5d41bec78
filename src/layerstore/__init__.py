"""layerstore: a content-addressed object store for container image layers.

The public API lives here::

    from layerstore import Store
    with Store.init("/var/lib/mystore") as st:
        res = st.import_path("layer.tar.gz")
        st.materialize(res.diff_id, "/tmp/rootfs")

Plumbing (manifests, index, file-system primitives) is importable from the submodules for tools
that need it, but only the names below are the stable API.
"""

from .core.manifest import Entry
from .errors import (
    AmbiguousError,
    ConcurrencyError,
    CorruptObjectError,
    DestinationError,
    FormatVersionError,
    InUseError,
    InvalidInputError,
    LayerstoreError,
    NotFoundError,
    SourceError,
    StoreError,
    UnsafePathError,
)
from .ops.ingest import ImportResult
from .ops.materialize import MaterializeResult
from .ops.oci import ImageResult
from .store import LayerInfo, Store, default_store_path

__version__ = "0.1.0"

__all__ = [
    "AmbiguousError",
    "ConcurrencyError",
    "CorruptObjectError",
    "DestinationError",
    "Entry",
    "FormatVersionError",
    "ImageResult",
    "ImportResult",
    "InUseError",
    "InvalidInputError",
    "LayerInfo",
    "LayerstoreError",
    "MaterializeResult",
    "NotFoundError",
    "SourceError",
    "Store",
    "StoreError",
    "UnsafePathError",
    "default_store_path",
]
