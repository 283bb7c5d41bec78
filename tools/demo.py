"""The main job, end to end, on the default local store with data every machine has.

    ./dev demo [--store DIR]

Imports this Python's standard library (real files, present wherever this runs) as a gzip
layer, a second version of it with a few files changed as a directory layer (dedup: only the
changed files are new), re-imports the first (already stored), materializes it by reflink (or
the copy fallback, reported) and verifies the tree file by file against its source, writes the
second version as a zstd:chunked blob, removes it and runs gc, pulls it back from the blob
partially (only the changed files are read), then prints what the store holds and runs fsck.
Everything goes through the ``layerstore`` CLI, as a user would run it.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile


def run(store: str, *args: str) -> dict:
    cmd = [sys.executable, "-m", "layerstore", "--store", store, "--json", *args]
    print("$ layerstore", " ".join(args), flush=True)
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"layerstore {args[0]} failed ({out.returncode}): {out.stderr.strip()}")
    return json.loads(out.stdout)


def same_tree(a: str, b: str) -> list[str]:
    bad = []
    for dirpath, _dirs, files in os.walk(a):
        rel = os.path.relpath(dirpath, a)
        for f in files:
            pa, pb = os.path.join(dirpath, f), os.path.join(b, rel, f)
            if os.path.islink(pa):
                if os.readlink(pa) != os.readlink(pb):
                    bad.append(pa)
            elif not filecmp.cmp(pa, pb, shallow=False):
                bad.append(pa)
    return bad


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--store", default=None, help="store root (default: layerstore's default)")
    args = ap.parse_args()
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
    from layerstore import default_store_path

    store = args.store or default_store_path()
    stdlib = sysconfig.get_paths()["stdlib"]
    skip = {"site-packages", "dist-packages", "__pycache__", "test"}
    print(f"store: {store}\n")
    run(store, "init")
    with tempfile.TemporaryDirectory(prefix="layerstore-demo-") as tmp:
        # Layer v1: this Python's standard library, as a gzip tarball (like a pulled layer).
        v1 = os.path.join(tmp, "v1")
        shutil.copytree(stdlib, v1, symlinks=True, ignore=lambda d, names: skip & set(names))
        tgz = os.path.join(tmp, "v1.tar.gz")
        with tarfile.open(tgz, "w:gz", compresslevel=1) as tf:
            tf.add(v1, arcname=".")
        a = run(store, "import", tgz)
        print(f"  v1: {a['files']} files, {a['new_objects']} new objects, {a['seconds']:.2f}s")
        # Layer v2: the same tree with a few files changed, imported as a directory.
        v2 = os.path.join(tmp, "v2")
        shutil.copytree(v1, v2, symlinks=True)
        for name in ("os.py", "json/__init__.py", "email/utils.py"):
            with open(os.path.join(v2, name), "a") as f:
                f.write("\n# changed in v2\n")
        b = run(store, "import", v2)
        print(
            f"  v2: {b['files']} files, {b['new_objects']} new objects "
            f"({b['reused_objects']} reused: content is stored once)"
        )
        c = run(store, "import", tgz)
        print(f"  v1 again: already stored = {c['already_present']}")
        dest = os.path.join(tmp, "rootfs")
        m = run(store, "materialize", a["diff_id"], dest)
        print(f"  materialized {m['files']} files in {m['seconds']:.2f}s via {m['methods']}")
        bad = same_tree(v1, dest)
        print(f"  verified against the source: {'OK' if not bad else f'{len(bad)} differ'}")
        # zstd:chunked: write v2 as a chunked blob, drop it, then pull it back partially --
        # only what the store lacks (v2's changed files) is read from the blob.
        blob = os.path.join(tmp, "v2.zst")
        run(store, "export", b["diff_id"], "--zstd-chunked", "-o", blob)
        run(store, "rm", b["diff_id"])
        g = run(store, "gc")
        print(f"  removed v2; gc freed {g['objects_freed']} objects ({g['bytes_freed']} bytes)")
        p = run(store, "import", "--partial", blob)["partial"]
        print(
            f"  v2 back from its zstd:chunked blob: read {p['bytes_read']:,} of "
            f"{p['blob_size']:,} bytes (skipped {p['skipped_pct']}%), "
            f"DiffID by {p['diff_id_proof']}"
        )
        run(store, "rm", b["diff_id"])
        run(store, "gc")
    du = run(store, "du")
    print(
        f"\nlogical {du['logical_bytes']:,} bytes in {du['layers']} layers; physical "
        f"{du['physical_bytes']:,} bytes in {du['objects']} objects (dedup {du['dedup_ratio']})"
    )
    fsck = subprocess.run(
        [sys.executable, "-m", "layerstore", "--store", store, "fsck"],
        capture_output=True,
        text=True,
    )
    print(fsck.stdout.strip().splitlines()[-1])
    sys.exit(1 if bad or fsck.returncode else 0)


if __name__ == "__main__":
    main()
