#!/usr/bin/env python3
"""Benchmark zstd:chunked partial imports against podman 4.3's partial pulls (issue 6).

Same machine, same two image versions (buildah 1.28's single-layer zstd:chunked minbase v1 and
v2 from the test corpus), side by side:

* layerstore, on an XFS reflink loop filesystem: v1 imported, then v2 timed -- partially
  (``import-oci`` default), whole after v1 (``partial=False``) and whole into an empty store;
  bytes read are counted by a wrapper around the blob source;
* podman 4.3 with ``enable_partial_images`` pulling the same v2 (after v1) from a local
  docker-registry through a counting proxy (``tools/podman_partial.py``), plus its full pulls;
* the chunker's MB/s, and what the chunk index of a plain-tar v1 import brings to the v2 pull.

podman reads over loopback HTTP and we read a local file: the byte counts compare exactly, the
times include podman's HTTP and process start-up (measured: ~0.3 s for a no-op pull).
Writes the block between ``<!-- bench-chunked:begin -->`` and ``<!-- bench-chunked:end -->``
of docs/benchmarks.md (``--no-doc`` to skip) and prints JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent), str(HERE.parent / "src")]  # temporary

import bench  # noqa: E402

import testdata as corpus  # noqa: E402
from layerstore import Store  # noqa: E402
from layerstore.sources.base import FileSource  # noqa: E402

BEGIN = "<!-- bench-chunked:begin -->"
END = "<!-- bench-chunked:end -->"


class Counting(FileSource):
    """A file source that counts what it hands out (our own count, not the import's)."""

    counted = 0

    def read_ranges(self, ranges):  # type: ignore[no-untyped-def]
        for off, data in super().read_ranges(ranges):
            Counting.counted += len(data)
            yield off, data


def _layer(layout: Path, tag: str) -> tuple[Path, dict[str, str], str, int]:
    def blob(d: str) -> Path:
        return layout / "blobs" / "sha256" / d.split(":", 1)[1]

    index = json.loads((layout / "index.json").read_text())
    ref = "org.opencontainers.image.ref.name"
    desc = next(m for m in index["manifests"] if m["annotations"][ref] == tag)
    man = json.loads(blob(desc["digest"]).read_bytes())
    cfg = json.loads(blob(man["config"]["digest"]).read_bytes())
    (lay,) = man["layers"]
    return blob(lay["digest"]), lay["annotations"], cfg["rootfs"]["diff_ids"][0], lay["size"]


def ours(root: Path, repeat: int) -> dict[str, Any]:
    l1 = corpus.buildah_chunked_layout(1)
    l2 = corpus.buildah_chunked_layout(2)
    b2, ann2, did2, size2 = _layer(l2, "v2")
    samples: dict[str, list[float]] = {
        "partial": [],
        "toc_only": [],
        "full_after_v1": [],
        "full_fresh": [],
    }
    last: dict[str, Any] = {}
    for i in range(repeat):
        for mode in samples:
            store = root / f"s-{mode}-{i}"
            with Store.init(str(store)) as st:
                if mode != "full_fresh":
                    st.import_oci(str(l1), ref="v1", toc_only=mode == "toc_only")
                os.sync()
                Counting.counted = 0
                t0 = time.perf_counter()
                if mode in ("partial", "toc_only"):
                    with Counting(str(b2)) as src:
                        r = st.import_chunked(
                            src, ann2, expected_diff_id=did2, toc_only=mode == "toc_only"
                        )
                    last[mode] = r.partial
                    last[mode + "_counted"] = Counting.counted
                else:
                    r = st.import_path(str(b2))
                samples[mode].append(time.perf_counter() - t0)
                assert r.diff_id == did2
            shutil.rmtree(store)
    return {
        "blob_size": size2,
        "seconds": {k: statistics.median(v) for k, v in samples.items()},
        "samples": samples,
        "partial": last["partial"],
        "bytes_counted": last["partial_counted"],
        "toc_only": last["toc_only"],
        "toc_only_counted": last["toc_only_counted"],
    }


def ours_http(root: Path, repeat: int) -> dict[str, Any]:
    """The partial import of v2 over HTTP range requests from a local docker-registry (v2
    pushed by skopeo, as for podman), v1 imported from its layout first."""
    import podman_partial

    from layerstore.sources.http import HttpSource

    l1 = corpus.buildah_chunked_layout(1)
    l2 = corpus.buildah_chunked_layout(2)
    b1, ann1, did1, _ = _layer(l1, "v1")
    b2, ann2, did2, size2 = _layer(l2, "v2")
    digest = "sha256:" + b2.name
    out: dict[str, Any] = {"samples": {}, "blob_size": size2}
    with podman_partial.registry(root / "registry") as port:
        podman_partial.push(
            f"oci:{l2}:v2", f"docker://127.0.0.1:{port}/bench/img:v2", root, root / "log", l2
        )
        url = f"http://127.0.0.1:{port}/v2/bench/img/blobs/{digest}"
        for mode in ("partial", "toc_only"):
            samples = []
            for i in range(repeat):
                store = root / f"h-{mode}-{i}"
                with Store.init(str(store)) as st:
                    st.import_chunked(
                        str(b1), ann1, expected_diff_id=did1, toc_only=mode == "toc_only"
                    )
                    with HttpSource(url) as src:
                        t0 = time.perf_counter()
                        r = st.import_chunked(
                            src, ann2, expected_diff_id=did2, toc_only=mode == "toc_only"
                        )
                        samples.append(time.perf_counter() - t0)
                        out[mode] = {
                            **r.partial,
                            "requests": src.requests,
                            "wire_bytes": src.wire_bytes,
                        }
                shutil.rmtree(store)
            out["samples"][mode] = samples
            out[mode]["seconds"] = statistics.median(samples)
    return out


def chunk_index_gain(root: Path) -> dict[str, Any]:
    """v1 imported from its plain tar: what chunking it costs and what it saves for v2."""
    tar = corpus.minbase_tar()
    l2 = corpus.buildah_chunked_layout(2)
    b2, ann2, did2, _ = _layer(l2, "v2")
    out: dict[str, Any] = {}
    for indexed in (False, True):
        store = root / f"ci-{indexed}"
        with Store.init(str(store)) as st:
            st.import_path(str(tar))
            if indexed:
                t0 = time.perf_counter()
                c = st.chunk_index()
                secs = time.perf_counter() - t0
                out["chunk_index"] = {**c, "seconds": round(secs, 3)}
                out["chunker_mb_s"] = round(c["bytes_chunked"] / secs / 1e6, 1)
            with FileSource(str(b2)) as src:
                r = st.import_chunked(src, ann2, expected_diff_id=did2)
            out["with_index" if indexed else "without_index"] = r.partial
        shutil.rmtree(store)
    return out


def markdown(res: dict[str, Any]) -> str:
    o, pod, ci = res["ours"], res.get("podman"), res["chunk_index"]
    p = o["partial"]
    lines = [
        BEGIN,
        "",
        f"Generated by `python3 tools/bench_chunked.py` on {res['date']} "
        f"({res['workspace']}); medians of {res['repeat']} runs, page cache warm.  "
        "Pair: buildah 1.28 zstd:chunked single-layer minbase v1 -> v2 "
        f"(v2 blob {bench.fmt_bytes(o['blob_size'])}).",
        "",
        "| v2 after v1 | bytes read | of the blob | wall time |",
        "|---|---:|---:|---:|",
        f"| layerstore partial import (file source) | {bench.fmt_bytes(o['bytes_counted'])} | "
        f"{100 * o['bytes_counted'] / o['blob_size']:.2f}% | {o['seconds']['partial']:.2f} s |",
        f"| layerstore partial import, `--toc-only` (DiffID unproved) | "
        f"{bench.fmt_bytes(o['toc_only_counted'])} | "
        f"{100 * o['toc_only_counted'] / o['blob_size']:.2f}% | {o['seconds']['toc_only']:.2f} s |",
    ]
    h = res.get("http")
    if h:
        for mode, label in (("partial", ""), ("toc_only", ", `--toc-only`")):
            lines.append(
                f"| layerstore partial import over HTTP (local registry){label} | "
                f"{bench.fmt_bytes(h[mode]['wire_bytes'])} on the wire "
                f"({bench.fmt_bytes(h[mode]['bytes_read'])} content) | "
                f"{100 * h[mode]['wire_bytes'] / h['blob_size']:.2f}% | "
                f"{h[mode]['seconds']:.2f} s ({h[mode]['requests']} requests) |"
            )
    if pod:
        pp = pod["pairs"]["buildah"]
        lines.append(
            f"| podman 4.3 partial pull (local registry; bytes on the wire) | "
            f"{bench.fmt_bytes(pp['v2_layer_bytes_fetched'])} | "
            f"{100 * pp['v2_fetched_fraction']:.2f}% | {pp['v2_pull_seconds']:.2f} s |"
        )
    lines += [
        f"| layerstore full import, after v1 | {bench.fmt_bytes(o['blob_size'])} | 100% | "
        f"{o['seconds']['full_after_v1']:.2f} s |",
        f"| layerstore full import, empty store | {bench.fmt_bytes(o['blob_size'])} | 100% | "
        f"{o['seconds']['full_fresh']:.2f} s |",
    ]
    if pod:
        pp = pod["pairs"]["buildah"]
        lines += [
            f"| podman full pull, after v1 | | | {pp['full_pull_after_v1']['seconds']:.2f} s |",
            f"| podman full pull, empty storage | | | {pp['full_pull_fresh']['seconds']:.2f} s |",
        ]
    lines += [
        "",
        f"layerstore's partial import: {p['files_reused']} files reused whole, "
        f"{p['files_assembled']} assembled from chunks, {p['files_fetched']} fetched; "
        f"{p['ranges']} ranges; DiffID proved by {p['diff_id_proof']} "
        f"(TOC checksum verified: {p['toc_verified']}).",
        "",
        f"Chunker: {ci['chunker_mb_s']} MB/s (`chunk-index` of the plain-tar v1 import: "
        f"{ci['chunk_index']['objects_chunked']} objects, "
        f"{bench.fmt_bytes(ci['chunk_index']['bytes_chunked'])} in "
        f"{ci['chunk_index']['seconds']:.2f} s, {ci['chunk_index']['chunks_indexed']} chunks "
        "indexed).  v2 after that v1 -- without the chunk index: "
        f"{bench.fmt_bytes(ci['without_index']['bytes_read'])} read, "
        f"{ci['without_index']['chunks_reused']} chunks reused; with it: "
        f"{bench.fmt_bytes(ci['with_index']['bytes_read'])} read, "
        f"{ci['with_index']['chunks_reused']} chunks reused "
        f"({ci['with_index']['files_assembled']} files assembled).",
        "",
        END,
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-podman", action="store_true", help="skip the podman side")
    ap.add_argument("--no-doc", action="store_true", help="do not update docs/benchmarks.md")
    ap.add_argument("--json", type=Path, help="write the results here too")
    ap.add_argument("--dir", help="run in this directory instead of a new XFS loop fs")
    args = ap.parse_args(argv)
    res: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    res["repeat"] = args.repeat
    with bench.workspace(args.dir, 6 << 30) as ws:
        res["workspace"] = ws.description
        res["ours"] = ours(ws.path, args.repeat)
        bench.log(f"ours: {json.dumps(res['ours']['seconds'])}")
        res["chunk_index"] = chunk_index_gain(ws.path)
        if not args.no_podman:  # the registry comes with the podman side's tools
            res["http"] = ours_http(ws.path, args.repeat)
    if not args.no_podman:
        import podman_partial

        res["podman"] = podman_partial.measure(("buildah",), repeat=args.repeat)
    text = json.dumps(res, indent=2, default=str)
    if args.json:
        args.json.write_text(text)
    block = markdown(res)
    print(block)
    if not args.no_doc:
        bench.update_markdown(HERE.parent / "docs" / "benchmarks.md", block, BEGIN, END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
