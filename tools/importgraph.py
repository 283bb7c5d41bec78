#!/usr/bin/env python3
"""The import graph of ``src/layerstore``: modules, who imports whom, cycles, layer breaches.

    python3 tools/importgraph.py            # summary: modules, edges, cycles, breaches
    python3 tools/importgraph.py --edges    # also every edge, one per line

Every import counts, also one inside a function (a lazy import is still a dependency; it only
hides a cycle from Python).  ``if TYPE_CHECKING:`` imports count too.  The layers, bottom up
(docs/architecture.md):

    errors  <  core  <  tar, sources, erofs  <  chunked  <  ops  <  store  <  cli, __init__

A module may import its own layer and those below it, never one above.  ``tests/
test_architecture.py`` holds the tree to that and to "no cycles"; this script prints the
picture for a human (and for the issue notes: before/after).
"""

from __future__ import annotations

import argparse
import ast
import os
import sys
from collections.abc import Iterable

SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")

# Rank of each layer; a module's layer is its first package component under layerstore.
RANK = {
    "errors": 0,
    "_fastpath": 0,
    "core": 1,
    "tar": 2,
    "sources": 2,
    "erofs": 2,
    "chunked": 3,
    "ops": 4,
    "store": 5,
    "cli": 6,
    "__main__": 6,
    "": 6,  # the package itself (layerstore/__init__.py): the public names
}


def modules(src: str = SRC) -> dict[str, str]:
    """Dotted module name -> file, for every module of the package (the C fast path too)."""
    out = {"layerstore._fastpath": os.path.join(src, "layerstore", "_fastpath.c")}
    for dirpath, _, files in os.walk(os.path.join(src, "layerstore")):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(dirpath, f), src)[:-3].replace(os.sep, ".")
                out[rel.removesuffix(".__init__")] = os.path.join(dirpath, f)
    return out


def imports(mods: dict[str, str]) -> dict[str, set[str]]:
    """Module -> the package modules it imports (anywhere in its body)."""
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        if not path.endswith(".py"):
            graph[name] = set()
            continue
        package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
        deps: set[str] = set()
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in mods]
                targets = subs if subs and len(subs) == len(node.names) else [base, *subs]
            for t in targets:
                while t and t not in mods:  # "a.b.c" imported as a name: its module
                    t = t.rpartition(".")[0]
                if t.startswith("layerstore") and t != name:
                    deps.add(t)
        graph[name] = deps
    return graph


def layer(module: str) -> str:
    return module.removeprefix("layerstore").removeprefix(".").partition(".")[0]


def breaches(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """Edges that go up the layers (a lower layer importing a higher one); modules outside
    the known layers (an older flat layout) are not judged."""
    out = []
    for m, deps in graph.items():
        for d in deps:
            lm, ld = RANK.get(layer(m)), RANK.get(layer(d))
            if lm is not None and ld is not None and ld > lm:
                out.append((m, d))
    return sorted(out)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work: list[tuple[str, Iterable[str]]] = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(iter(it), None)  # type: ignore[call-overload]
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--edges", action="store_true", help="print every edge")
    ap.add_argument("--src", default=SRC, help="the src/ directory (default: this checkout's)")
    args = ap.parse_args(argv)
    graph = imports(modules(args.src))
    n_edges = sum(len(d) for d in graph.values())
    cyc = cycles(graph)
    up = breaches(graph)
    print(f"{len(graph)} modules, {n_edges} import edges")
    print(f"cycles: {len(cyc)}")
    for c in cyc:
        print("  " + " <-> ".join(c))
    print(f"upward imports: {len(up)}")
    for m, d in up:
        print(f"  {m} -> {d}")
    if args.edges:
        for m in sorted(graph):
            for d in sorted(graph[m]):
                print(f"{m} -> {d}")
    return 1 if cyc or up else 0


if __name__ == "__main__":
    sys.exit(main())
