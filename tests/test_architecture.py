"""The house keeps its shape: no import cycles, no layer importing one above it.

The layers and the rule are in ``tools/importgraph.py`` (and drawn in docs/architecture.md).
Every import counts, a lazy one inside a function too.  The planted-breach tests prove the
checker would notice: each writes a small package with the breach and expects it reported.
"""

from __future__ import annotations

from pathlib import Path

from tools import importgraph


def test_no_import_cycles() -> None:
    graph = importgraph.imports(importgraph.modules())
    assert importgraph.cycles(graph) == []


def test_no_layer_imports_a_layer_above_it() -> None:
    graph = importgraph.imports(importgraph.modules())
    assert importgraph.breaches(graph) == []


def test_the_core_knows_no_tar_oci_or_chunked() -> None:
    graph = importgraph.imports(importgraph.modules())
    core = {m: d for m, d in graph.items() if m.startswith("layerstore.core")}
    assert core, "layerstore.core has no modules?"
    for m, deps in core.items():
        # _fastpath: the C extension's batched syscalls (core.objects stages files with it);
        # it knows no format either.
        allowed = ("layerstore.errors", "layerstore._fastpath")
        assert all(d.startswith("layerstore.core") or d in allowed for d in deps), (
            m,
            deps,
        )


def _pkg(tmp_path: Path, files: dict[str, str]) -> str:
    for rel, text in {"layerstore/__init__.py": "", **files}.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return str(tmp_path)


def test_a_lazy_upward_import_is_caught(tmp_path: Path) -> None:
    src = _pkg(
        tmp_path,
        {
            "layerstore/core/__init__.py": "",
            "layerstore/core/repo.py": "def f():\n    from ..store import Store\n",
            "layerstore/store.py": "from .core import repo\n",
        },
    )
    graph = importgraph.imports(importgraph.modules(src))
    assert importgraph.breaches(graph) == [("layerstore.core.repo", "layerstore.store")]
    assert importgraph.cycles(graph) == [["layerstore.core.repo", "layerstore.store"]]


def test_a_cycle_inside_one_layer_is_caught(tmp_path: Path) -> None:
    src = _pkg(
        tmp_path,
        {
            "layerstore/ops/__init__.py": "",
            "layerstore/ops/a.py": "from . import b\n",
            "layerstore/ops/b.py": "from .c import x\n",
            "layerstore/ops/c.py": "from layerstore.ops import a\nx = 1\n",
        },
    )
    graph = importgraph.imports(importgraph.modules(src))
    assert importgraph.cycles(graph) == [
        ["layerstore.ops.a", "layerstore.ops.b", "layerstore.ops.c"]
    ]
    assert importgraph.breaches(graph) == []
