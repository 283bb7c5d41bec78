#!/usr/bin/env python3
"""Throughput of the zstd:chunked chunker and of CRC-64/GO-ISO, in MB/s, with sha256 as the
reference run on the same bytes (the project reports ratios against a reference tool).

Data sets, both held in memory so the figure is the chunker's own cost, not the disk's:

* ``real``: the regular files of the debootstrap minbase rootfs from the test corpus
  (``tests/corpus.py``), file by file as an import would chunk them, up to ``--mb`` MB;
* ``random``: ``--mb`` MB of random bytes as one stream through :func:`chunk_file`.

Each figure is the median of ``--repeat`` timed rounds after one warm-up round.  Prints one JSON
line (and ``--json OUT`` writes it to a file)::

    python3 tools/bench_chunker.py [--mb 200] [--repeat 3]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # temporary: until tools/bench is a package

import testdata as corpus  # noqa: E402
from layerstore.chunked.chunker import Chunker, chunk_file, crc64_iso  # noqa: E402


def real_files(limit: int) -> list[bytes]:
    """Contents of the rootfs' regular files (sorted by path, so runs are comparable)."""
    root = corpus.minbase_rootfs()
    out: list[bytes] = []
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            p = os.path.join(dirpath, name)
            if os.path.islink(p) or not os.path.isfile(p):
                continue
            with open(p, "rb") as f:
                data = f.read()
            out.append(data)
            total += len(data)
            if total >= limit:
                return out
    return out


def timed(fn: Callable[[], object], repeat: int) -> list[float]:
    """Seconds per run, after one untimed warm-up run."""
    fn()
    samples = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t)
    return samples


def chunk_all(files: list[bytes], digests: bool) -> int:
    n = 0
    for data in files:
        ch = Chunker(digests=digests)
        n += len(ch.update(data)) + len(ch.finish())
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=int, default=200, help="MB of data per data set (default 200)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", type=Path, help="also write the JSON line here")
    args = ap.parse_args()
    limit = args.mb * 1_000_000

    files = real_files(limit)
    rnd = os.urandom(limit)
    sets = {"real": files, "random": [rnd]}
    result: dict[str, object] = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "repeat": args.repeat,
    }
    for name, data in sets.items():
        size = sum(map(len, data))

        def sha(data: list[bytes] = data) -> None:
            for d in data:
                hashlib.sha256(d).digest()

        def crc(data: list[bytes] = data) -> None:
            for d in data:
                crc64_iso(d)

        if name == "random":

            def chunk(data: list[bytes] = data) -> None:
                list(chunk_file(io.BytesIO(data[0])))

        else:

            def chunk(data: list[bytes] = data) -> None:
                chunk_all(data, True)

        def bounds(data: list[bytes] = data) -> None:
            chunk_all(data, False)

        row: dict[str, object] = {"files": len(data), "mb": round(size / 1e6, 1)}
        med = {}
        for what, fn in (("sha256", sha), ("chunk", chunk), ("bounds", bounds), ("crc64", crc)):
            s = timed(fn, args.repeat)
            med[what] = statistics.median(s)
            row[f"{what}_mb_s"] = round(size / med[what] / 1e6, 1)
            row[f"{what}_mb_s_min_max"] = [round(size / max(s) / 1e6), round(size / min(s) / 1e6)]
        row["chunk_vs_sha256"] = round(med["sha256"] / med["chunk"], 3)
        row["chunks"] = chunk_all(data, False)
        result[name] = row
    line = json.dumps(result)
    print(line)
    if args.json:
        args.json.write_text(line + "\n")


if __name__ == "__main__":
    main()
