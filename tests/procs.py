"""Worker processes for the multi-process tests: run as ``python tests/procs.py CMD ...``.

Each worker opens its own Store (LMDB environments must not cross fork) and reports progress on
stdout as JSON lines, flushed, so the parent can synchronize with it and kill it at a chosen
moment.  Nothing here is mocked: these are the real code paths in separate processes.
"""

from __future__ import annotations

import json
import os
import random
import sys
import threading
import time
import traceback

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from layerstore import LayerstoreError, Store
from layerstore.core import leases


def say(**kw: object) -> None:
    print(json.dumps(kw), flush=True)


def cmd_pin_and_wait(store: str, *hexes: str) -> None:
    """Pin objects (as an import or partial pull would), then wait to be killed."""
    st = Store(store)
    with st.index.write() as txn:
        leases.pin_objects(st.index, txn, st.lease.id, [bytes.fromhex(h) for h in hexes])
    say(event="pinned")
    time.sleep(3600)


def cmd_materialize(store: str, layer: str, dest: str, delay: str = "0") -> None:
    """Materialize slowly (a sleep per file) so others can race it."""
    st = Store(store)
    d = float(delay)
    first = [True]
    lock = threading.Lock()

    def progress(n: int) -> None:  # called from the materializer's worker threads
        with lock:
            if first[0]:
                say(event="started")
                first[0] = False
        if d:
            time.sleep(d * n)  # progress arrives per batch of files

    try:
        r = st.materialize(layer, dest, progress=progress)
        say(event="done", files=r.files, methods=r.methods)
    except LayerstoreError as exc:
        say(event="error", error=str(exc))
        sys.exit(1)


def cmd_loop(store: str, op: str, arg: str, dest_base: str) -> None:
    """Repeat one operation forever (the crash tests kill it at a random moment).

    ``import``: import each tar of directory ``arg`` in turn, report it, remove it, report that.
    ``materialize``: materialize layer ``arg`` again and again under ``dest_base``.
    ``gc``: import a tar, remove it, gc -- so gc always has garbage to collect.
    ``partial``: like ``import``, from the zstd:chunked blob ``NAME.zst`` beside each tar.
    """
    st = Store(store)
    say(event="ready")
    tars = (
        sorted(os.path.join(arg, t) for t in os.listdir(arg) if t.endswith(".tar"))
        if op != "materialize"
        else []
    )
    i = 0
    while True:
        i += 1
        if op == "import":
            t = tars[i % len(tars)]
            r = st.import_path(t)
            say(event="imported", diff_id=r.diff_id, tar=t)
            say(event="removing", diff_id=r.diff_id)  # a kill may land after its commit
            st.remove(r.diff_id)
            say(event="removed", diff_id=r.diff_id)
        elif op == "partial":
            t = tars[i % len(tars)]
            r = st.import_chunked(t[:-4] + ".zst")
            say(event="imported", diff_id=r.diff_id, tar=t)
            say(event="removing", diff_id=r.diff_id)
            st.remove(r.diff_id)
            say(event="removed", diff_id=r.diff_id)
        elif op == "materialize":
            dest = f"{dest_base}/m{os.getpid()}-{i}"
            st.materialize(arg, dest)
            say(event="materialized", dest=dest)
        elif op == "gc":
            r = st.import_path(tars[i % len(tars)])
            st.remove(r.diff_id)
            st.gc()
            say(event="gc")
        else:
            raise SystemExit(f"unknown op {op}")


def cmd_stress(store: str, seed: str, duration: str, tars: str, dest_base: str, log: str) -> None:
    """Random imports, materializations, removals and gc for ``duration`` seconds.

    Every successful materialization is logged with the layer it came from; the parent checks
    each of them byte for byte afterwards.
    """
    rnd = random.Random(int(seed))
    st = Store(store)
    tarfiles = sorted(os.path.join(tars, t) for t in os.listdir(tars) if t.endswith(".tar"))
    end = time.monotonic() + float(duration)
    n = 0
    with open(log, "a") as logf:

        def record(**kw: object) -> None:
            logf.write(json.dumps(kw) + "\n")
            logf.flush()

        while time.monotonic() < end:
            n += 1
            op = rnd.choices(["import", "materialize", "remove", "gc"], [4, 4, 2, 1])[0]
            try:
                if op == "import":
                    t = rnd.choice(tarfiles)
                    r = st.import_path(t)
                    record(op="import", tar=t, diff_id=r.diff_id)
                elif op == "materialize":
                    layers = st.layers()
                    if not layers:
                        continue
                    li = rnd.choice(layers)
                    dest = f"{dest_base}/{os.getpid()}-{n}"
                    st.materialize(li.diff_id, dest)
                    record(op="materialize", diff_id=li.diff_id, dest=dest)
                elif op == "remove":
                    layers = st.layers()
                    if layers:
                        li = rnd.choice(layers)
                        st.remove(li.diff_id)
                        record(op="remove", diff_id=li.diff_id)
                else:
                    r = st.gc()
                    record(op="gc", freed=r.objects_freed, orphans=r.orphans_removed)
            except LayerstoreError as exc:
                # Racing removals make "not found" a normal outcome; anything else is a bug.
                if type(exc).__name__ not in ("NotFoundError",):
                    record(op=op, error=f"{type(exc).__name__}: {exc}")
            except Exception:
                record(op=op, error=traceback.format_exc())
    st.close()
    say(event="done", ops=n)


def cmd_partial_slow(store: str, blob: str, annotations: str, marker: str, delay: str) -> None:
    """Partially import a zstd:chunked blob, stalling (after the plan and its pins) before the
    first fetched byte, so another process can remove the layer whose chunks it reuses and gc."""
    from layerstore.sources.base import FileSource

    class Slow(FileSource):
        def read_ranges(self, ranges):  # type: ignore[no-untyped-def]
            self.calls = getattr(self, "calls", 0) + 1
            first = True
            for piece in super().read_ranges(ranges):
                if first and self.calls == 2:  # the fetch after planning (1: TOC + tar-split)
                    say(event="planned")
                    open(marker, "w").close()
                    time.sleep(float(delay))
                first = False
                yield piece

    st = Store(store)
    try:
        with Slow(blob) as src:
            r = st.import_chunked(src, json.loads(annotations))
        say(event="done", diff_id=r.diff_id, partial=r.partial)
    except LayerstoreError as exc:
        say(event="error", error=str(exc))
        sys.exit(1)


def cmd_pin_layer_and_wait(store: str, diff_id: str) -> None:
    """Pin a layer as a materialization reading it does, then wait to be killed."""
    st = Store(store)
    with st.index.write() as txn:
        leases.pin_layer(st.index, txn, st.lease.id, bytes.fromhex(diff_id.removeprefix("sha256:")))
    say(event="pinned")
    time.sleep(3600)


def cmd_import_oci_stall(store: str, layout: str, ref: str) -> None:
    """Import an image, stalling after its first layer is committed (to be interrupted with
    SIGINT, as Ctrl-C does, or killed)."""
    st = Store(store)

    def on_layer(i: int, n: int, info: dict) -> None:  # type: ignore[type-arg]
        if i == 0:
            say(event="layer", diff_id=info["diff_id"], new=info["new"])
            time.sleep(3600)

    try:
        st.import_oci(layout, ref=ref, on_layer=on_layer)
    except KeyboardInterrupt:
        say(event="interrupted")
        st.close()
        sys.exit(130)
    say(event="done")


if __name__ == "__main__":
    globals()["cmd_" + sys.argv[1].replace("-", "_")](*sys.argv[2:])
