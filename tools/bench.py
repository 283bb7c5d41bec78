#!/usr/bin/env python3
"""layerstore benchmark harness: every figure is a ratio against a reference run.

Rules (from the project brief):

* performance is reported as a RATIO against a reference tool run in the same invocation, on the
  same filesystem, never as an absolute time alone (the aims that are absolute by nature -- gc
  wall time and RSS, layer removal time -- are shown next to a reference anyway);
* every figure is run ``--repeat`` times (default 5) after ``--warmup`` untimed rounds; the
  median is the figure, min and max are shown;
* reference and subject runs are interleaved (the order alternates every round) so noise hits
  both, and the page cache is dropped (``sync; echo 3 > /proc/sys/vm/drop_caches``) before every
  timed run of either side;
* everything runs on a private XFS loop filesystem with reflink (``truncate -s 8G``,
  ``mkfs.xfs -m reflink=1``, ``mount -o loop``) made in a temp dir and removed at exit, even on
  Ctrl-C / SIGTERM -- unless ``--dir`` names an existing directory to work in.

Subcommands::

    python3 tools/bench.py core      [--repeat N]   # issue 2: import, materialize, dedup
    python3 tools/bench.py lifecycle [--objects N]  # issue 3: gc of 1M objects, remove, pin
    python3 tools/bench.py all                      # both, then rewrite docs/benchmarks.md

``--json OUT`` writes every sample and every derived figure.  Needs root (loop mount, page-cache
drop).  If the tool is killed with SIGKILL, clean up with ``umount /tmp/layerstore-bench-*/mnt``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import json
import os
import platform
import random
import re
import shlex
import shutil
import signal
import stat
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # temporary: until tools/bench is a package

import layerstore  # noqa: E402
import testdata as corpus  # noqa: E402
from layerstore import Store  # noqa: E402
from layerstore.core import leases as ls_leases  # noqa: E402
from layerstore.core import protocol  # noqa: E402
from layerstore.ops.materialize import materialize as raw_materialize  # noqa: E402

# GNU tar the way a container engine extracts a layer (as root it also keeps owners and modes).
TAR_X = ["tar", "--numeric-owner", "--xattrs", "--xattrs-include=*"]
# How tests/corpus.py makes its tarballs; used for the dedup variant layer.
TAR_C = ["tar", "--numeric-owner", "--xattrs", "--xattrs-include=*", "--sort=name"]
INLINE_MAX = 64  # layerstore.ops.ingest.INLINE_MAX: smaller files live in the manifest
GIB = 1 << 30
BEGIN = "<!-- bench:begin -->"
END = "<!-- bench:end -->"


def log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# statistics, goals, rows


@dataclass
class Summary:
    samples: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def lo(self) -> float:
        return min(self.samples)

    @property
    def hi(self) -> float:
        return max(self.samples)

    def to_json(self) -> dict[str, Any]:
        return {
            "samples": [round(s, 6) for s in self.samples],
            "median": round(self.median, 6),
            "min": round(self.lo, 6),
            "max": round(self.hi, 6),
        }


@dataclass(frozen=True)
class Goal:
    op: str  # "<=" or ">="
    value: float
    unit: str = "×"

    def met(self, x: float) -> bool:
        return x <= self.value if self.op == "<=" else x >= self.value

    def __str__(self) -> str:
        return f"{'≤' if self.op == '<=' else '≥'}{self.value:g}{self.unit}"


@dataclass
class Row:
    """One line of a results table.

    ``kind``: ``time`` (ratio = subject time / reference time, lower is better), ``rate``
    (ratio = subject files/s / reference files/s = reference time / subject time, higher is
    better), or ``value`` (a measured quantity compared with its own goal; ``checked`` is it).
    """

    subject: str
    reference: str
    kind: str
    subj: Summary | None = None
    ref: Summary | None = None
    subj_cell: str = ""
    ref_cell: str = ""
    ratio: float | None = None
    paired: float | None = None
    checked: float | None = None
    target: Goal | None = None
    aim: Goal | None = None
    note: str = ""
    headline: bool = False
    ratio_text: str = ""

    def __post_init__(self) -> None:
        if self.subj is not None and self.ref is not None and self.ratio is None:
            s, r = self.subj, self.ref
            pairs = list(zip(s.samples, r.samples, strict=False))
            if self.kind == "time":
                self.ratio = s.median / r.median
                self.paired = statistics.median(a / b for a, b in pairs) if pairs else None
            elif self.kind == "rate":
                self.ratio = r.median / s.median
                self.paired = statistics.median(b / a for a, b in pairs) if pairs else None
        if self.checked is None:
            self.checked = self.ratio
        if not self.subj_cell and self.subj is not None:
            self.subj_cell = fmt_summary(self.subj)
        if not self.ref_cell and self.ref is not None:
            self.ref_cell = fmt_summary(self.ref)

    @property
    def status(self) -> str:
        x = self.checked
        if x is None or (self.target is None and self.aim is None):
            return "info"
        parts = []
        if self.target is not None:
            parts.append("PASS" if self.target.met(x) else "MISS")
        if self.aim is not None:
            parts.append("aim met" if self.aim.met(x) else "aim missed")
        return ", ".join(parts)

    def ratio_cell(self) -> str:
        if self.ratio_text:
            return self.ratio_text
        if self.ratio is None:
            return "–" if self.checked is None or self.kind != "value" else f"{self.checked:.3g}"
        return f"{self.ratio:.2f}×"

    def goal_cell(self) -> str:
        goals = []
        if self.target is not None:
            goals.append(str(self.target))
        if self.aim is not None:
            goals.append(f"aim {self.aim}")
        return "; ".join(goals) or "–"

    def to_json(self) -> dict[str, Any]:
        return {
            "subject": self.subject,
            "reference": self.reference,
            "kind": self.kind,
            "subject_seconds": self.subj.to_json() if self.subj else None,
            "reference_seconds": self.ref.to_json() if self.ref else None,
            "subject_cell": self.subj_cell,
            "reference_cell": self.ref_cell,
            "ratio_of_medians": None if self.ratio is None else round(self.ratio, 4),
            "median_of_paired_ratios": None if self.paired is None else round(self.paired, 4),
            "checked_value": None if self.checked is None else round(self.checked, 6),
            "target": str(self.target) if self.target else None,
            "target_met": (
                self.target.met(self.checked) if self.target and self.checked is not None else None
            ),
            "aim": str(self.aim) if self.aim else None,
            "aim_met": (
                self.aim.met(self.checked) if self.aim and self.checked is not None else None
            ),
            "status": self.status,
            "headline": self.headline,
            "note": self.note,
        }


@dataclass
class Section:
    key: str
    title: str
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "title": self.title,
            "rows": [r.to_json() for r in self.rows],
            "notes": self.notes,
            "extra": self.extra,
        }


def fmt_s(x: float) -> str:
    if x >= 100:
        return f"{x:.0f} s"
    if x >= 10:
        return f"{x:.1f} s"
    if x >= 0.1:
        return f"{x:.2f} s"
    return f"{x * 1000:.1f} ms"


def fmt_summary(s: Summary) -> str:
    if len(s.samples) == 1:
        return fmt_s(s.median)
    return f"{fmt_s(s.median)} [{fmt_s(s.lo)}–{fmt_s(s.hi)}]"


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


# --------------------------------------------------------------------------------------------
# processes, caches, signals


def run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(cmd, check=True, stdin=subprocess.DEVNULL, **kw)


def sh_out(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return ""


class Caches:
    """``sync; echo 3 > /proc/sys/vm/drop_caches`` before every timed run (if allowed)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.works = enabled
        if enabled:
            self.drop()

    def drop(self) -> None:
        os.sync()
        if not self.works:
            return
        try:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("3\n")
        except OSError as exc:
            log(f"cannot drop the page cache ({exc}); timings are WARM-cache from now on")
            self.works = False

    @property
    def mode(self) -> str:
        return "dropped before every timed run" if self.works else "warm (not dropped)"


class _Terminate(KeyboardInterrupt):
    """SIGTERM/SIGHUP, turned into an exception so every ``finally`` cleans up."""


def _on_signal(signum: int, _frame: object) -> None:
    raise _Terminate(f"signal {signum}")


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Cleanup must not be interrupted half-way (a second Ctrl-C would leave a mount)."""
    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    old = {s: signal.signal(s, signal.SIG_IGN) for s in sigs}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def rm_rf(path: Path) -> None:
    if os.path.lexists(path):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


# --------------------------------------------------------------------------------------------
# the filesystem under test


@dataclass
class Workspace:
    path: Path
    description: str
    image: Path | None = None

    def discard(self, path: Path) -> None:
        """Remove a finished section's files; on our own loop filesystem, unmounting at exit
        throws everything away anyway (rm -rf of a million objects would take minutes)."""
        if self.image is not None and path.name == "lifecycle":
            return
        with signals_deferred():
            shutil.rmtree(path, ignore_errors=True)


def _fs_type(path: Path) -> tuple[str, str]:
    """(fstype, source) of the mount holding ``path``."""
    real = os.path.realpath(path)
    best = ("", "", "")
    with open("/proc/self/mounts") as f:
        for line in f:
            src, mnt, typ = line.split()[:3]
            mnt = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), mnt)
            if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best[1]):
                best = (src, mnt, typ)
    return best[2], best[0]


def _umount(mnt: Path, image: Path) -> None:
    for attempt in range(10):
        r = subprocess.run(["umount", str(mnt)], capture_output=True, text=True, check=False)
        if r.returncode == 0 or not os.path.ismount(mnt):
            break
        log(f"umount {mnt} failed ({r.stderr.strip()}); retrying ({attempt + 1}/10)")
        time.sleep(0.5)
    else:
        log(f"umount {mnt} still failing: lazy unmount")
        subprocess.run(["umount", "-l", str(mnt)], check=False)
    # mount -o loop sets autoclear, but detach explicitly if the device is still bound.
    for dev in sh_out(["losetup", "-j", str(image)]).splitlines():
        subprocess.run(["losetup", "-d", dev.split(":", 1)[0]], check=False)


@contextlib.contextmanager
def workspace(dir_arg: str | None, size: int) -> Iterator[Workspace]:
    if dir_arg:
        base = Path(dir_arg).resolve()
        if not base.is_dir():
            raise SystemExit(f"bench: --dir {dir_arg} is not an existing directory")
        work = Path(tempfile.mkdtemp(prefix="layerstore-bench-", dir=base))
        typ, src = _fs_type(work)
        try:
            yield Workspace(work, f"{typ} ({src}), existing directory {base}")
        finally:
            with signals_deferred():
                shutil.rmtree(work, ignore_errors=True)
        return
    if os.geteuid() != 0:
        raise SystemExit("bench: making the XFS loop filesystem needs root (or pass --dir DIR)")
    tmp = Path(tempfile.mkdtemp(prefix="layerstore-bench-"))
    image, mnt = tmp / "fs.img", tmp / "mnt"
    mounted = False
    try:
        mnt.mkdir()
        run(["truncate", "-s", str(size), str(image)])
        run(["mkfs.xfs", "-q", "-f", "-m", "reflink=1", str(image)], capture_output=True)
        run(["mount", "-o", "loop", str(image), str(mnt)])
        mounted = True
        btyp, _ = _fs_type(tmp)
        desc = (
            f"xfs (reflink=1, {size / GIB:.1f} GiB sparse image, loop device) on the "
            f"{btyp} filesystem holding {tmp}"
        )
        log(f"workspace: {desc}, mounted at {mnt}")
        yield Workspace(mnt, desc, image)
    finally:
        with signals_deferred():
            if mounted or os.path.ismount(mnt):
                _umount(mnt, image)
            if os.path.ismount(mnt):
                log(f"WARNING: {mnt} is still mounted; not deleting {tmp}")
            else:
                shutil.rmtree(tmp, ignore_errors=True)
                log("workspace: unmounted and removed")


# --------------------------------------------------------------------------------------------
# interleaved measurement


@dataclass
class Case:
    """One side of a comparison; ``run`` is timed, ``setup``/``teardown`` are not."""

    name: str
    run: Callable[[], Any]
    setup: Callable[[], None] | None = None
    teardown: Callable[[], None] | None = None
    samples: list[float] = field(default_factory=list)
    last: Any = None

    @property
    def summary(self) -> Summary:
        return Summary(list(self.samples))


def measure(cases: list[Case], repeat: int, warmup: int, caches: Caches, label: str) -> None:
    """Run all cases once per round, alternating the order each round; caches dropped before
    every timed run."""
    for rnd in range(-warmup, repeat):
        order = cases if rnd % 2 == 0 else cases[::-1]
        for c in order:
            if c.setup is not None:
                c.setup()
            try:
                caches.drop()
                t0 = time.perf_counter()
                c.last = c.run()
                took = time.perf_counter() - t0
            finally:  # also on Ctrl-C: close the store, so the filesystem can be unmounted
                if c.teardown is not None:
                    c.teardown()
            if rnd >= 0:
                c.samples.append(took)
            tag = "warm-up" if rnd < 0 else f"round {rnd + 1}/{repeat}"
            log(f"[{label}] {tag}: {c.name}: {fmt_s(took)}")


def count_regular(root: Path) -> tuple[int, int]:
    """(regular file names, bytes of distinct regular inodes) below ``root``."""
    n = 0
    size = 0
    seen: set[int] = set()
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            st = os.lstat(os.path.join(dirpath, name))
            if stat.S_ISREG(st.st_mode):
                n += 1
                if st.st_ino not in seen:
                    seen.add(st.st_ino)
                    size += st.st_size
    return n, size


def du_bytes(path: Path) -> int:
    out = sh_out(["du", "-s", "--block-size=1", str(path)])
    return int(out.split()[0]) if out else 0


# --------------------------------------------------------------------------------------------
# core (issue 2)


def tar_extract(archive: Path, dest: Path, zflag: list[str]) -> None:
    run([*TAR_X, *zflag, "-C", str(dest), "-xf", str(archive)])


def bench_core(ws: Workspace, args: argparse.Namespace, caches: Caches) -> list[Section]:
    root = ws.path / "core"
    root.mkdir()
    try:
        return _bench_core(root, args, caches)
    finally:
        ws.discard(root)


def _bench_core(root: Path, args: argparse.Namespace, caches: Caches) -> list[Section]:
    rep, warm = args.repeat, args.warmup
    inputs = root / "inputs"
    inputs.mkdir()
    src = {
        "tar.gz": corpus.minbase_tar_gz(),
        "tar": corpus.minbase_tar(),
        "tar.zst": corpus.minbase_tar_zst(),
    }
    arch: dict[str, Path] = {}
    for fmt, p in src.items():
        arch[fmt] = inputs / p.name
        shutil.copyfile(p, arch[fmt])  # inputs live on the filesystem under test too
    zflags = {"tar.gz": ["-z"], "tar": [], "tar.zst": ["--zstd"]}
    tree = root / "tree"  # tar -x of the layer: the cp -a source and the file count
    tree.mkdir()
    tar_extract(arch["tar"], tree, [])
    nfiles, nbytes = count_regular(tree)
    log(f"minbase layer: {nfiles} regular files, {fmt_bytes(nbytes)} (distinct inodes)")
    sections = [
        _core_import(root, arch, zflags, rep, warm, caches),
        _core_materialize(root, arch, tree, nfiles, rep, warm, caches),
        _core_dedup(root, arch["tar"], tree, args.seed),
    ]
    sections[0].extra.update(
        {
            "regular_files": nfiles,
            "regular_bytes": nbytes,
            "inputs": {k: str(v) for k, v in src.items()},
        }
    )
    return sections


def _store_case(
    name: str,
    root: Path,
    prepare: Callable[[Store], None] | None,
    body: Callable[[Store], Any],
    fresh: bool,
) -> Case:
    """A case whose timed part runs ``body(store)`` on a store opened (or made) in setup."""
    holder: dict[str, Store] = {}

    def setup() -> None:
        if fresh:
            rm_rf(root)
        holder["st"] = Store.init(str(root)) if fresh or not root.exists() else Store(str(root))
        if prepare is not None:
            prepare(holder["st"])

    def teardown() -> None:
        st = holder.pop("st", None)
        if st is not None:
            st.close()
        if fresh:
            rm_rf(root)

    return Case(name, lambda: body(holder["st"]), setup, teardown)


def _floor_case(archive: Path, work: Path) -> Case:
    """The work a durable content-addressed import cannot skip, with no parsing at all.

    The layer's file contents (> 64 bytes) are split out of the tar before the timed part, so
    tar parsing, name validation, manifests, tar-split and every index write cost nothing here.
    Timed: the DiffID (sha256 over the tar, read cold), blake3 + sha256 of every file and its
    staging write on two threads (batches of 64 through ``_fastpath.stage_files`` when built)
    with a background ``syncfs`` every 16 MiB written (the import's early writeback), then
    ``syncfs``, a rename per object on two threads, ``syncfs``.  layerstore's import does all
    of this plus the parsing and bookkeeping, so this is a floor for its design on this machine.
    """
    import threading

    import blake3 as _b3

    from layerstore.core import fsutil
    from layerstore.tar.reader import TarReader

    try:
        from layerstore import _fastpath  # type: ignore[attr-defined]
    except ImportError:
        _fastpath = None
    contents: list[bytes] = []

    def setup() -> None:
        if not contents:
            with open(archive, "rb") as f:
                tr = TarReader(f)
                for m in tr:
                    if m.isreg() and m.size > 64:
                        contents.append(tr.read_exact(m.size, m.name))
        rm_rf(work)
        (work / "s").mkdir(parents=True)
        (work / "o").mkdir()

    def write(paths: list[tuple[bytes, bytes]]) -> None:
        if _fastpath is not None:
            _fastpath.stage_files(paths)
            return
        for path, data in paths:
            with open(path, "xb") as out:
                out.write(data)

    written = [0]
    kick = threading.Event()
    done = threading.Event()

    def flusher() -> None:  # a syncfs per 16 MiB written, one at a time
        fd = os.open(work, os.O_RDONLY | os.O_DIRECTORY)
        try:
            while kick.wait() and not done.is_set():
                kick.clear()
                fsutil.syncfs(fd)
        finally:
            os.close(fd)

    def writer(part: list[int]) -> None:
        batch: list[tuple[bytes, bytes]] = []
        nbytes = 0
        for i in part:
            data = contents[i]
            _b3.blake3(data).digest()
            hashlib.sha256(data).digest()
            batch.append((str(work / "s" / str(i)).encode(), data))
            nbytes += len(data)
            if len(batch) == 64:
                write(batch)
                batch = []
                written[0] += nbytes
                nbytes = 0
                if written[0] >= 16 << 20:
                    written[0] = 0
                    kick.set()
        write(batch)

    def diff_id() -> None:
        h = hashlib.sha256()
        with open(archive, "rb", buffering=0) as f:
            while b := f.read(1 << 20):
                h.update(b)

    def rename(part: list[int]) -> None:
        for i in part:
            os.rename(work / "s" / str(i), work / "o" / str(i))

    def body() -> None:
        idx = list(range(len(contents)))
        done.clear()
        kick.clear()
        fl = threading.Thread(target=flusher)
        fl.start()
        threads = [
            threading.Thread(target=diff_id),
            threading.Thread(target=writer, args=(idx[0::2],)),
            threading.Thread(target=writer, args=(idx[1::2],)),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        done.set()
        kick.set()
        fl.join()
        fd = os.open(work, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fsutil.syncfs(fd)
            threads = [threading.Thread(target=rename, args=(idx[k::2],)) for k in (0, 1)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            fsutil.syncfs(fd)
        finally:
            os.close(fd)

    return Case("floor: hash + stage + syncfs + rename, no parsing", body, setup, lambda: None)


def _dir_case(name: str, dest: Path, body: Callable[[], None], mkdir: bool = True) -> Case:
    def setup() -> None:
        rm_rf(dest)
        if mkdir:
            dest.mkdir()

    return Case(name, body, setup, lambda: rm_rf(dest))


def _core_import(
    root: Path,
    arch: dict[str, Path],
    zflags: dict[str, list[str]],
    rep: int,
    warm: int,
    caches: Caches,
) -> Section:
    sec = Section(
        "import",
        "core: import a layer (debootstrap minbase) vs GNU tar -x into an empty directory",
    )
    sec.notes += [
        "Subject: `Store.import_path(FILE)` in this process, store opened (empty, or holding the "
        "layer already for re-import) before the timed part.  layerstore makes the import "
        "durable (2× syncfs + LMDB commits); plain `tar -x` does not, hence the second reference "
        "`tar -x; sync -f DIR`.  Ratio = subject time / reference time (lower is better).",
        f"Reference command: `{shlex.join(TAR_X)} [-z|--zstd] -C DIR -xf FILE`.",
        "Floor (plain tar only): the part of a durable content-addressed import that no "
        "implementation of this design can skip -- the DiffID, blake3 and sha256 of every file, "
        "its staging write (two threads, C batches, a background syncfs every 16 MiB), syncfs, a "
        "rename per object, syncfs -- "
        "timed on the same tar with the file contents split out beforehand (no parsing, no "
        "manifest, no index).  tools/bench.py `_floor_case` is the code.",
    ]
    x = root / "x"
    for fmt, path in arch.items():
        zf = zflags[fmt]
        opt = " ".join(zf) + " " if zf else ""
        ref_name = f"tar {opt}-xf minbase.{fmt}"

        def tar_body(path: Path = path, zf: list[str] = zf) -> None:
            tar_extract(path, x, zf)

        def tar_sync(path: Path = path, zf: list[str] = zf) -> None:
            tar_extract(path, x, zf)
            run(["sync", "-f", str(x)])

        re_root = root / f"store-re-{fmt}"
        with Store.init(str(re_root)) as st:
            prep = st.import_path(str(path))
        log(f"re-import store prepared: {prep.diff_id[:19]}…, {prep.new_objects} objects")
        ref = _dir_case(ref_name, x, tar_body)
        ref_sync = _dir_case(ref_name + "; sync -f", x, tar_sync)
        first = _store_case(
            f"import minbase.{fmt} (empty store)",
            root / "store-first",
            None,
            lambda st, path=path: st.import_path(str(path)),
            fresh=True,
        )
        again = _store_case(
            f"re-import minbase.{fmt}",
            re_root,
            None,
            lambda st, path=path: st.import_path(str(path)),
            fresh=False,
        )
        cases = [ref, first, ref_sync, again]
        floor = _floor_case(path, root / "floor") if fmt == "tar" else None
        if floor is not None:
            cases.append(floor)
        measure(cases, rep, warm, caches, f"import {fmt}")
        res_first, res_again = first.last, again.last
        note_first = (
            f"{res_first.files} files, {res_first.new_objects} new objects "
            f"({fmt_bytes(res_first.new_bytes)}), {res_first.inline_files} inline"
        )
        sec.rows += [
            Row(
                f"first import, .{fmt}",
                ref_name,
                "time",
                first.summary,
                ref.summary,
                target=Goal("<=", 1.5),
                aim=Goal("<=", 1.0),
                note=note_first,
                headline=True,
            ),
            Row(
                f"first import, .{fmt}",
                ref_name + "; sync -f",
                "time",
                first.summary,
                ref_sync.summary,
                note="like-for-like durability",
            ),
            Row(
                f"re-import (layer already stored), .{fmt}",
                ref_name,
                "time",
                again.summary,
                ref.summary,
                target=Goal("<=", 0.5),
                note=(
                    f"already_present={res_again.already_present}, "
                    f"{res_again.new_objects} new objects, {res_again.reused_objects} reused"
                ),
                headline=True,
            ),
        ]
        if floor is not None:
            rm_rf(root / "floor")
            sec.rows.append(
                Row(
                    "floor of the design (see note)",
                    ref_name,
                    "time",
                    floor.summary,
                    ref.summary,
                    note="DiffID + blake3/sha256 per file + staging writes (early syncfs) + "
                    "syncfs + renames; no parsing, manifests or index",
                )
            )
        sec.extra[fmt] = {"first": res_first.to_json(), "reimport": res_again.to_json()}
        with signals_deferred():
            rm_rf(re_root)
    return sec


def _core_materialize(
    root: Path,
    arch: dict[str, Path],
    tree: Path,
    nfiles: int,
    rep: int,
    warm: int,
    caches: Caches,
) -> Section:
    auto = min(4, (os.cpu_count() or 1) + 1)
    sec = Section(
        "materialize",
        "core: materialize the minbase layer vs cp -a --reflink=always and tar -xf",
    )
    sec.notes += [
        f"files/s counts regular files (names, hardlinks included): {nfiles} per tree.  "
        "Ratio = subject files/s / reference files/s (higher is better).",
        "Headline: `Store.materialize(..., workers=0, sync=True)`, the API default (durable: one "
        "syncfs before the rename).  `cp -a` and `tar -x` do not sync; `sync=False` is the "
        "like-for-like comparison and `cp -a; sync -f` is shown for the other direction.",
        f"workers=0 means auto: min(4, nproc + 1) = {auto} here.",
    ]
    store_root = root / "store-mat"
    with Store.init(str(store_root)) as st:
        diff_id = st.import_path(str(arch["tar.gz"])).diff_id
    dest = root / "m"
    cp = _dir_case(
        "cp -a --reflink=always",
        dest,
        lambda: run(["cp", "-a", "--reflink=always", str(tree), str(dest)]),
        mkdir=False,
    )

    def cp_sync() -> None:
        run(["cp", "-a", "--reflink=always", str(tree), str(dest)])
        run(["sync", "-f", str(dest)])

    cps = _dir_case("cp -a --reflink=always; sync -f", dest, cp_sync, mkdir=False)
    tx = _dir_case("tar -xf minbase.tar", dest, lambda: tar_extract(arch["tar"], dest, []))

    def mat(workers: int, sync: bool) -> Case:
        c = _store_case(
            f"materialize workers={workers} sync={sync}",
            store_root,
            None,
            lambda st: st.materialize(diff_id, str(dest), workers=workers, sync=sync),
            fresh=False,
        )
        inner_setup, inner_teardown = c.setup, c.teardown
        assert inner_setup is not None and inner_teardown is not None

        def setup() -> None:
            rm_rf(dest)
            inner_setup()

        def teardown() -> None:
            inner_teardown()
            rm_rf(dest)

        c.setup, c.teardown = setup, teardown
        return c

    subjects = {
        (0, True): mat(0, True),
        (0, False): mat(0, False),
        (1, True): mat(1, True),
        (2, True): mat(2, True),
        (4, True): mat(4, True),
    }
    refs = [cp, cps, tx]
    measure([*refs, *subjects.values()], rep, warm, caches, "materialize")

    def rate(c: Case) -> str:
        return f"{nfiles / c.summary.median:,.0f} files/s"

    for (w, sync), c in subjects.items():
        label = f"materialize workers={w}{f' (auto={auto})' if w == 0 else ''} sync={sync}"
        res = c.last
        methods = ", ".join(f"{k}={v}" for k, v in sorted(res.methods.items()))
        head = (w, sync) == (0, True)
        main = w == 0
        sec.rows.append(
            Row(
                label + (" [headline]" if head else ""),
                cp.name,
                "rate",
                c.summary,
                cp.summary,
                subj_cell=f"{fmt_summary(c.summary)}; {rate(c)}",
                ref_cell=f"{fmt_summary(cp.summary)}; {rate(cp)}",
                target=Goal(">=", 1.0) if main else None,
                aim=Goal(">=", 1.2) if main else None,
                note=methods,
                headline=head,
            )
        )
        if main:
            sec.rows.append(
                Row(
                    label + (" [headline]" if head else ""),
                    tx.name,
                    "rate",
                    c.summary,
                    tx.summary,
                    subj_cell=f"{fmt_summary(c.summary)}; {rate(c)}",
                    ref_cell=f"{fmt_summary(tx.summary)}; {rate(tx)}",
                    target=Goal(">=", 1.5),
                    headline=head,
                )
            )
        if head:
            sec.rows.append(
                Row(
                    label,
                    cps.name,
                    "rate",
                    c.summary,
                    cps.summary,
                    subj_cell=f"{fmt_summary(c.summary)}; {rate(c)}",
                    ref_cell=f"{fmt_summary(cps.summary)}; {rate(cps)}",
                    note="like-for-like durability",
                )
            )
    sec.extra["results"] = {
        f"workers={w},sync={s}": c.last.to_json() for (w, s), c in subjects.items()
    }
    with signals_deferred():
        rm_rf(store_root)
    return sec


def _content_digests(root: Path) -> dict[bytes, int]:
    """sha256 -> size of every distinct regular-file content below ``root``."""
    out: dict[bytes, int] = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            if not stat.S_ISREG(st.st_mode):
                continue
            h = hashlib.sha256()
            with open(p, "rb") as f:
                while buf := f.read(1 << 20):
                    h.update(buf)
            out[h.digest()] = st.st_size
    return out


def make_variant(src: Path, dst: Path, fraction: float, seed: int) -> tuple[int, int, int]:
    """Copy ``src`` to ``dst`` and overwrite ~``fraction`` of its regular-file bytes with new
    random bytes (same sizes, same mtimes); files are chosen with a seeded RNG among regular,
    non-hardlinked files larger than the inline limit.  Returns (files, bytes changed, total)."""
    run(["cp", "-a", "--reflink=always", str(src), str(dst)])
    files: list[tuple[str, int]] = []
    total = 0
    for dirpath, _dirs, names in os.walk(dst):
        for name in names:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            if stat.S_ISREG(st.st_mode):
                total += st.st_size if st.st_nlink == 1 else 0
                if st.st_nlink == 1 and st.st_size > INLINE_MAX:
                    files.append((p, st.st_size))
    files.sort()
    rng = random.Random(seed)
    rng.shuffle(files)
    budget = fraction * total
    changed = nbytes = 0
    for p, size in files:
        if nbytes + size > budget:
            continue
        st = os.lstat(p)
        with open(p, "r+b") as f:
            f.write(rng.randbytes(size))
        os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
        changed += 1
        nbytes += size
        if nbytes >= 0.999 * budget:
            break
    return changed, nbytes, total


def _core_dedup(root: Path, tar_a: Path, tree_a: Path, seed: int) -> Section:
    sec = Section("dedup", "core: dedup of two layers sharing 95% of their content")
    work = root / "dedup"
    work.mkdir()
    tree_b = work / "b"
    changed, changed_bytes, total = make_variant(tree_a, tree_b, 0.05, seed)
    tar_b = work / "b.tar"
    run([*TAR_C, "-C", str(tree_b), "-cf", str(tar_b), "."])
    da, db = _content_digests(tree_a), _content_digests(tree_b)
    a_bytes = sum(da.values())
    union = {**da, **db}
    unique = sum(union.values())
    b_new = sum(size for d, size in db.items() if d not in da)
    store_root = work / "store"
    with Store.init(str(store_root)) as st:
        ra = st.import_path(str(tar_a))
        rb = st.import_path(str(tar_b))
        stats = st.stats()
        manifests = 0
        for li in st.layers():
            rec = st.get_object(bytes.fromhex(li.manifest))
            manifests += rec.size if rec else 0
    os.sync()
    du_objects = du_bytes(store_root / "objects")
    du_index = du_bytes(store_root / "index")
    du_trees = du_bytes(tree_a) + du_bytes(tree_b)  # no dedup at all (du ignores reflinks)
    phys = stats["physical_bytes"]
    sec.notes += [
        f"Layer A = minbase.tar; layer B = a copy of its tree with {changed} files "
        f"({fmt_bytes(changed_bytes)}, {100 * changed_bytes / total:.2f}% of "
        f"{fmt_bytes(total)} regular-file bytes; seed {seed}) overwritten with new random bytes "
        "of equal size, tarred with GNU tar like the corpus.  Import A, then B.",
        f"Unique content = A's distinct file contents ({fmt_bytes(a_bytes)}) + B's new contents "
        f"({fmt_bytes(b_new)}) = {fmt_bytes(unique)} ({unique:,} bytes).  physical_bytes counts "
        f"object sizes, manifests included ({fmt_bytes(manifests)} for the two layers); files "
        f"≤{INLINE_MAX} B live inside the manifests.  du rounds every object up to a 4 KiB block.",
    ]
    sec.rows += [
        Row(
            "st.stats()['physical_bytes']",
            "unique content bytes",
            "value",
            subj_cell=f"{phys:,} B ({fmt_bytes(phys)})",
            ref_cell=f"{unique:,} B",
            ratio=phys / unique,
            target=Goal("<=", 1.05),
            note=f"objects={stats['objects']}, dedup_ratio={stats['dedup_ratio']}",
            headline=True,
        ),
        Row(
            "du -s --block-size=1 objects/",
            "unique content bytes",
            "value",
            subj_cell=f"{du_objects:,} B ({fmt_bytes(du_objects)})",
            ref_cell=f"{unique:,} B",
            ratio=du_objects / unique,
            target=Goal("<=", 1.05),
            note=f"index/ (LMDB) adds {fmt_bytes(du_index)}",
        ),
        Row(
            "du objects/ + index/",
            "du of both trees extracted (no dedup)",
            "value",
            subj_cell=f"{du_objects + du_index:,} B",
            ref_cell=f"{du_trees:,} B",
            ratio=(du_objects + du_index) / du_trees,
            note="context: what two plain directories would take",
        ),
        Row(
            "new bytes written by the import of B",
            "bytes changed in B",
            "value",
            subj_cell=f"{rb.new_bytes:,} B ({rb.new_objects} objects)",
            ref_cell=f"{changed_bytes:,} B ({changed} files)",
            ratio=rb.new_bytes / changed_bytes,
            note=f"B reused {rb.reused_objects} objects; includes B's manifest",
        ),
    ]
    sec.extra = {
        "changed_files": changed,
        "changed_bytes": changed_bytes,
        "regular_bytes": total,
        "a_distinct_bytes": a_bytes,
        "b_new_bytes": b_new,
        "unique_bytes": unique,
        "manifest_bytes": manifests,
        "du_objects": du_objects,
        "du_index": du_index,
        "du_trees": du_trees,
        "stats": stats,
        "import_a": ra.to_json(),
        "import_b": rb.to_json(),
    }
    return sec


# --------------------------------------------------------------------------------------------
# lifecycle (issue 3)


def _ustar(name: str, size: int, typ: bytes = b"0", mode: int = 0o644) -> bytes:
    """One POSIX ustar header block (names < 100 bytes, numeric owner 0:0)."""
    h = bytearray(512)
    raw = name.encode()
    h[0 : len(raw)] = raw
    h[100:108] = b"%07o\0" % mode
    h[108:116] = b"%07o\0" % 0
    h[116:124] = b"%07o\0" % 0
    h[124:136] = b"%011o\0" % size
    h[136:148] = b"%011o\0" % 1_700_000_000
    h[148:156] = b" " * 8
    h[156:157] = typ
    h[257:263] = b"ustar\0"
    h[263:265] = b"00"
    h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h)


def write_small_files_tar(path: Path, layer: int, nfiles: int, seed: int) -> int:
    """A tar of ``nfiles`` unique 65..200-byte files in directories of 1000; returns bytes."""
    rng = random.Random(seed * 1_000_003 + layer)
    total = 0
    with open(path, "wb", buffering=1 << 20) as f:
        for i in range(nfiles):
            if i % 1000 == 0:
                f.write(_ustar(f"d{i // 1000:04d}/", 0, b"5", 0o755))
            size = rng.randint(INLINE_MAX + 1, 200)
            head = b"layer %d file %d\n" % (layer, i)
            data = head + rng.randbytes(size - len(head))
            f.write(_ustar(f"d{i // 1000:04d}/f{i:07d}", size))
            f.write(data)
            f.write(b"\0" * (-size % 512))
            total += size
        f.write(b"\0" * 10240)
    return total


def _vm_hwm_kb() -> int:
    """Peak RSS of this process image (VmHWM).  Unlike ``ru_maxrss`` it starts afresh at
    exec(): Linux carries the *parent's* RSS high-water mark into a fork+exec'd child's
    ``ru_maxrss``, so a child of this (large) benchmark process would report our peak, not its
    own."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def _status_kb(*keys: str) -> dict[str, int]:
    out: dict[str, int] = {}
    with open("/proc/self/status") as f:
        for line in f:
            k = line.split(":", 1)[0]
            if k in keys:
                out[k] = int(line.split()[1])
    return out


def _gc_child(root: str) -> None:
    """Hidden subcommand ``_gc``: one gc in a fresh process; prints JSON on stdout."""
    hwm0 = _vm_hwm_kb()
    with Store(root) as st:
        hwm1 = _vm_hwm_kb()
        t0 = time.perf_counter()
        res = st.gc()
        took = time.perf_counter() - t0
        hwm2 = _vm_hwm_kb()
        rss_now = _status_kb("VmRSS", "RssAnon", "RssFile", "RssShmem")
    json.dump(
        {
            "gc": res.to_json(),
            "seconds": took,
            "hwm_kb_start": hwm0,
            "hwm_kb_store_open": hwm1,
            "hwm_kb_after_gc": hwm2,
            "rss_kb_after_gc": rss_now,
        },
        sys.stdout,
    )


def run_gc_child(root: Path, scratch: Path) -> dict[str, Any]:
    """Run ``_gc`` in a fresh interpreter.  Peak RSS: the child's own VmHWM, cross-checked with
    ``/usr/bin/time -f %M`` when installed (time forks the child from its own small image, so
    that ``ru_maxrss`` is not inflated by ours)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "_gc", str(root)]
    tfile = scratch / "gc-time.out"
    gnu_time = shutil.which("time", path="/usr/bin:/bin")
    if gnu_time:
        cmd = [gnu_time, "-f", "%M", "-o", str(tfile), *cmd]
    t0 = time.perf_counter()
    out = run(cmd, stdout=subprocess.PIPE).stdout
    wall = time.perf_counter() - t0
    data = json.loads(out)
    data["wall"] = wall
    data["maxrss_kb"] = data["hwm_kb_after_gc"]
    data["time_maxrss_kb"] = None
    if gnu_time:
        with contextlib.suppress(OSError, ValueError):
            data["time_maxrss_kb"] = int(tfile.read_text().split()[-1])
    return data


def bench_lifecycle(ws: Workspace, args: argparse.Namespace, caches: Caches) -> list[Section]:
    root = ws.path / "lifecycle"
    root.mkdir()
    try:
        return _bench_lifecycle(root, args, caches)
    finally:
        ws.discard(root)


def _bench_lifecycle(root: Path, args: argparse.Namespace, caches: Caches) -> list[Section]:
    rep = args.repeat
    nobj, nlayers = args.objects, args.layers
    per = nobj // nlayers
    store_root = root / "store"
    gen = root / "gen"
    gen.mkdir()
    garbage_tar = gen / "garbage.tar"
    t_setup = time.perf_counter()
    t_gen = t_imp = 0.0
    layer_ids: list[str] = []
    import_times: list[float] = []
    with Store.init(str(store_root)) as st:
        for layer in range(nlayers):
            path = garbage_tar if layer == nlayers - 1 else gen / f"layer{layer}.tar"
            t0 = time.perf_counter()
            write_small_files_tar(path, layer, per, args.seed)
            t1 = time.perf_counter()
            res = st.import_path(str(path))
            t2 = time.perf_counter()
            t_gen += t1 - t0
            t_imp += t2 - t1
            import_times.append(t2 - t1)
            layer_ids.append(res.diff_id)
            if path != garbage_tar:
                path.unlink()
            log(
                f"setup: layer {layer + 1}/{nlayers}: {per} files, {res.new_objects} new objects; "
                f"tar {fmt_s(t1 - t0)}, import {fmt_s(t2 - t1)} "
                f"({per / (t2 - t1):,.0f} files/s)"
            )
        minbase = st.import_path(str(corpus.minbase_tar_gz()))
        total_objects = st.stats()["objects"]
    setup_s = time.perf_counter() - t_setup
    log(
        f"setup took {fmt_s(setup_s)} (tar generation {fmt_s(t_gen)}, imports {fmt_s(t_imp)}); "
        f"store holds {total_objects:,} objects"
    )
    garbage_id = layer_ids[-1]
    ref_tree = root / "rmref"
    rm_samples: list[float] = []
    rmref_samples: list[float] = []
    gc_samples: list[float] = []
    gc_wall: list[float] = []
    rss: list[int] = []
    find_samples: list[float] = []
    gc_results: list[dict[str, Any]] = []
    reimport: list[float] = []
    for rnd in range(rep):
        tag = f"round {rnd + 1}/{rep}"
        if rnd > 0:  # bring the garbage back: re-import the layer gc just collected
            with Store(str(store_root)) as st:
                t0 = time.perf_counter()
                st.import_path(str(garbage_tar))
                reimport.append(time.perf_counter() - t0)
        ref_tree.mkdir()
        tar_extract(garbage_tar, ref_tree, [])

        def do_remove(tag: str = tag) -> None:
            with Store(str(store_root)) as st:
                caches.drop()
                t0 = time.perf_counter()
                st.remove(garbage_id)
                rm_samples.append(time.perf_counter() - t0)
            log(f"[lifecycle] {tag}: st.remove() of {per} files: {fmt_s(rm_samples[-1])}")

        def do_rmref(tag: str = tag) -> None:
            caches.drop()
            t0 = time.perf_counter()
            run(["rm", "-rf", str(ref_tree)])
            run(["sync", "-f", str(root)])
            rmref_samples.append(time.perf_counter() - t0)
            log(f"[lifecycle] {tag}: rm -rf + sync of {per} files: {fmt_s(rmref_samples[-1])}")

        for step in (do_remove, do_rmref) if rnd % 2 == 0 else (do_rmref, do_remove):
            step()
        caches.drop()
        t0 = time.perf_counter()
        run(["find", str(store_root / "objects"), "-type", "f"], stdout=subprocess.DEVNULL)
        find_samples.append(time.perf_counter() - t0)
        log(f"[lifecycle] {tag}: find objects -type f: {fmt_s(find_samples[-1])}")
        caches.drop()
        g = run_gc_child(store_root, root)
        gc_results.append(g)
        gc_samples.append(g["seconds"])
        gc_wall.append(g["wall"])
        rss.append(g["maxrss_kb"])
        log(
            f"[lifecycle] {tag}: gc {fmt_s(g['seconds'])} (child wall {fmt_s(g['wall'])}), "
            f"freed {g['gc']['objects_freed']:,} objects, peak RSS {g['maxrss_kb'] / 1024:.0f} MiB"
        )
    sec = Section("gc", f"lifecycle: gc and remove on a store of {total_objects:,} objects")
    freed = gc_results[-1]["gc"]["objects_freed"]
    sec.notes += [
        f"Store built through the real import path: {nlayers} tars of {per:,} unique "
        f"{INLINE_MAX + 1}..200-byte files each, plus the minbase layer; then one layer "
        f"({per:,} files, {100 * freed / total_objects:.1f}% of the objects) is removed and gc "
        "runs in a fresh interpreter (peak RSS = its VmHWM, cross-checked with "
        f"`/usr/bin/time -f %M`).  Setup took "
        f"{fmt_s(setup_s)} (tar generation {fmt_s(t_gen)}, imports {fmt_s(t_imp)}, median "
        f"{per / statistics.median(import_times):,.0f} files/s per import).",
        "Each round re-imports the collected layer (untimed) so gc always faces the same "
        "garbage.  References: `rm -rf` + sync of the same layer extracted by tar (what deleting "
        "a layer costs a plain-directory store); `find objects -type f` (one scan of the object "
        "directories, which gc's orphan pass must also do).",
    ]
    rss_mib = Summary([r / 1024 for r in rss])
    base_mib = statistics.median(g["hwm_kb_store_open"] for g in gc_results) / 1024
    tmax = [g["time_maxrss_kb"] for g in gc_results if g["time_maxrss_kb"]]
    tnote = f"; /usr/bin/time %M: {statistics.median(tmax) / 1024:.0f} MiB" if tmax else ""
    last = gc_results[-1]["rss_kb_after_gc"]
    mdb = os.path.getsize(store_root / "index" / "data.mdb")
    tnote += (
        f"; at the end of gc RssAnon {last.get('RssAnon', 0) / 1024:.0f} MiB, RssFile "
        f"{last.get('RssFile', 0) / 1024:.0f} MiB (index data.mdb is {fmt_bytes(mdb)})"
    )
    sec.rows += [
        Row(
            f"gc (in-child time of st.gc()), {freed:,} objects freed",
            "find objects -type f",
            "time",
            Summary(gc_samples),
            Summary(find_samples),
            checked=statistics.median(gc_samples),
            aim=Goal("<=", 60, " s"),
            note=f"child wall incl. interpreter start {fmt_summary(Summary(gc_wall))}",
            headline=True,
        ),
        Row(
            "gc peak RSS (child VmHWM)",
            "RSS of the child before gc",
            "value",
            subj_cell=f"{rss_mib.median:.0f} MiB [{rss_mib.lo:.0f}–{rss_mib.hi:.0f}]",
            ref_cell=f"{base_mib:.0f} MiB",
            checked=rss_mib.median,
            aim=Goal("<=", 500, " MiB"),
            ratio=rss_mib.median / base_mib,
            note="before = after importing layerstore and opening the store" + tnote,
            headline=True,
        ),
        Row(
            f"st.remove() of a {per:,}-file layer",
            f"rm -rf + sync of its {per:,}-file tree",
            "time",
            Summary(rm_samples),
            Summary(rmref_samples),
            checked=statistics.median(rm_samples),
            aim=Goal("<=", 2, " s"),
            headline=True,
        ),
    ]
    sec.extra = {
        "objects": total_objects,
        "index_data_mdb_bytes": mdb,
        "layers": nlayers,
        "files_per_layer": per,
        "setup_seconds": setup_s,
        "tar_generation_seconds": t_gen,
        "import_seconds": import_times,
        "reimport_seconds": reimport,
        "gc_results": gc_results,
        "minbase_diff_id": minbase.diff_id,
    }
    pin = _pin_cost(root, store_root, minbase.diff_id, total_objects, args, caches)
    return [sec, pin]


def _pin_cost(
    root: Path,
    store_root: Path,
    diff_id: str,
    nobj: int,
    args: argparse.Namespace,
    caches: Caches,
) -> Section:
    sec = Section("pin", "lifecycle: cost of pinning a layer during materialization")
    dest = root / "m"
    with Store(str(store_root)) as st:
        info = st.layer(diff_id)
        mb3 = bytes.fromhex(info.manifest)
        raw_diff = st.resolve(diff_id)

        def api() -> Any:
            return st.materialize(diff_id, str(dest))

        def direct() -> Any:
            return raw_materialize(st.repo, mb3, str(dest))

        cases = [
            Case(
                "materialize, public API (pin + unpin)",
                api,
                lambda: rm_rf(dest),
                lambda: rm_rf(dest),
            ),
            Case(
                "layerstore.ops.materialize.materialize() (no pin)",
                direct,
                lambda: rm_rf(dest),
                lambda: rm_rf(dest),
            ),
        ]
        measure(cases, 3 * args.repeat, args.warmup, caches, "pin")
        # The pin itself, isolated: the two write transactions the API adds (store warm).
        idx = st.index
        txn_samples = []
        for _ in range(max(20, 4 * args.repeat)):
            t0 = time.perf_counter()
            with idx.write() as txn:
                ls_leases.pin_layer(idx, txn, st.lease.id, raw_diff)
            protocol.unpin_layer(st.repo, raw_diff)
            txn_samples.append(time.perf_counter() - t0)
    api_s, direct_s = cases[0].summary, cases[1].summary
    overhead = 100 * (api_s.median / direct_s.median - 1)
    txn = Summary(txn_samples)
    paired = statistics.median(a / b for a, b in zip(api_s.samples, direct_s.samples, strict=True))
    sec.notes += [
        f"Same layer (minbase, {info.files} files) in the lifecycle store ({nobj:,} objects), "
        f"default workers and sync=True on both sides, {3 * args.repeat} interleaved runs each, "
        "caches dropped before each run.  Overhead = API median / direct median - 1; the "
        "pin + unpin write transactions are also timed alone (warm, 20+ runs) because their "
        "cost is far below the run-to-run noise of a whole materialization.",
    ]
    sec.rows += [
        Row(
            cases[0].name,
            cases[1].name,
            "time",
            api_s,
            direct_s,
            checked=overhead,
            target=Goal("<=", 5, " %"),
            ratio_text=f"{overhead:+.1f} %",
            note=(
                f"ratio {api_s.median / direct_s.median:.3f}×; median of paired ratios "
                f"{paired:.3f}×"
            ),
            headline=True,
        ),
        Row(
            "pin + unpin transactions alone",
            "direct materialize (median)",
            "value",
            subj_cell=fmt_summary(txn),
            ref_cell=fmt_s(direct_s.median),
            ratio=txn.median / direct_s.median,
            ratio_text=f"{100 * txn.median / direct_s.median:.2f} %",
            checked=100 * txn.median / direct_s.median,
            target=Goal("<=", 5, " %"),
            note=f"= {100 * txn.median / direct_s.median:.2f}% of a materialization",
        ),
    ]
    sec.extra = {"pin_txn_seconds": txn.to_json()}
    return sec


# --------------------------------------------------------------------------------------------
# fsck (issue 4)


def _raw_blake3_mb_s(size: int = 256 << 20, rounds: int = 3) -> float:
    """Single-thread blake3 speed of this machine on an in-memory buffer (best of rounds)."""
    import blake3

    buf = os.urandom(size)
    best = 0.0
    for _ in range(rounds):
        t0 = time.perf_counter()
        blake3.blake3(buf).digest()
        best = max(best, size / (time.perf_counter() - t0) / 1e6)
    return best


def _mixed_tree(root: Path, total: int, seed: int) -> int:
    """~``total`` bytes of mixed files: many small (1-64 KiB), some medium, a few large."""
    rnd = random.Random(seed)
    made = 0
    i = 0
    while made < total:
        r = rnd.random()
        size = (
            rnd.randint(1 << 10, 64 << 10)
            if r < 0.85
            else rnd.randint(64 << 10, 4 << 20)
            if r < 0.99
            else rnd.randint(16 << 20, 64 << 20)
        )
        d = root / f"d{i % 97}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i}").write_bytes(rnd.randbytes(size))
        made += size
        i += 1
    return i


def bench_fsck(ws: Workspace, args: argparse.Namespace, caches: Caches) -> list[Section]:
    root = ws.path / "fsck"
    root.mkdir()
    try:
        return [_bench_fsck(root, args, caches)]
    finally:
        ws.discard(root)


def _bench_fsck(root: Path, args: argparse.Namespace, caches: Caches) -> Section:
    from layerstore.ops.fsck import fsck as run_fsck

    mixed = root / "mixed"
    nfiles = _mixed_tree(mixed, args.fsck_bytes, args.seed)
    st = Store.init(str(root / "store"))
    try:
        st.import_path(str(corpus.minbase_tar_gz()))
        st.import_path(str(mixed))
        stats = st.stats()
        jobs = 1  # fsck's default: one checking thread; blake3 itself uses every core on large
        cores = os.cpu_count() or 1
        raw = _raw_blake3_mb_s()
        cold: list[float] = []
        warm: list[float] = []
        hashed = 0
        for rnd in range(-args.warmup, args.repeat):
            for mode, bucket in (("cold", cold), ("warm", warm)):
                if mode == "cold":
                    caches.drop()
                t0 = time.perf_counter()
                rep = run_fsck(st.repo, full=True, jobs=jobs)
                took = time.perf_counter() - t0
                if rep.problems:
                    raise RuntimeError(f"fsck found problems in a fresh store: {rep.problems}")
                hashed = rep.bytes_hashed
                if rnd >= 0:
                    bucket.append(took)
                log(f"[fsck] {mode}: {fmt_s(took)} ({hashed / took / 1e6:.0f} MB/s)")
    finally:
        st.close()
    sec = Section(
        "fsck",
        "fsck: full check (every object re-hashed) vs the raw blake3 speed of this machine",
    )
    sec.notes = [
        f"Store: the debootstrap minbase layer plus {fmt_bytes(args.fsck_bytes)} of mixed files "
        f"({nfiles} files: 85% 1-64 KiB, 14% 64 KiB-4 MiB, 1% 16-64 MiB); "
        f"{stats['objects']} objects, {fmt_bytes(stats['physical_bytes'])}.",
        f"Reference: single-thread blake3 of a 256 MiB in-memory buffer, {raw:,.0f} MB/s, "
        f"measured in this run.  fsck (default settings) checks objects on one thread and lets "
        f"blake3 hash objects of 1 MiB and more on all {cores} cores; the aim is fsck MB/s >= "
        "80% of raw single-thread blake3 (one core's worth; large objects may exceed it).",
        "warm = objects in the page cache (measures the checker, not the disk); cold = page "
        "cache dropped before the run (adds the disk read).",
    ]
    for mode, samples in (("warm", warm), ("cold", cold)):
        summ = Summary(samples)
        rate = hashed / summ.median / 1e6
        per_core = rate / raw
        sec.rows.append(
            Row(
                subject=f"full fsck, {mode} cache",
                reference="raw single-thread blake3",
                kind="value",
                subj=summ,
                subj_cell=f"{fmt_summary(summ)}; {rate:,.0f} MB/s",
                ref_cell=f"{raw:,.0f} MB/s",
                ratio=per_core,
                ratio_text=f"{per_core:.2f}",
                checked=per_core,
                aim=Goal(">=", 0.8, ""),
                note=f"{fmt_bytes(hashed)} hashed",
                headline=mode == "warm",
            )
        )
    return sec


# --------------------------------------------------------------------------------------------
# OCI images (issue 5)

OCI_BEGIN = "<!-- bench-oci:begin -->"
OCI_END = "<!-- bench-oci:end -->"


def bench_oci(ws: Workspace, args: argparse.Namespace, caches: Caches) -> list[Section]:
    root = ws.path / "oci"
    root.mkdir()
    try:
        return [_bench_oci(root, args, caches)]
    finally:
        ws.discard(root)


def _bench_oci(root: Path, args: argparse.Namespace, caches: Caches) -> Section:
    layout = root / "layout"
    shutil.copytree(corpus.oci_layout(1, "gzip"), layout)  # v1 and v2 side by side
    v2 = corpus.oci_layout(2, "gzip")
    for p in (v2 / "blobs" / "sha256").iterdir():
        if not (layout / "blobs" / "sha256" / p.name).exists():
            shutil.copyfile(p, layout / "blobs" / "sha256" / p.name)
    i1 = json.loads((layout / "index.json").read_text())
    i2 = json.loads((v2 / "index.json").read_text())
    i1["manifests"] += i2["manifests"]
    (layout / "index.json").write_text(json.dumps(i1))
    store_dir = root / "store"
    added: dict[str, int] = {}

    def ls_import() -> None:
        rm_rf(store_dir)
        with Store.init(str(store_dir)) as st:
            st.import_oci(str(layout), ref="v1")
            b1 = st.stats()["physical_bytes"]
            st.import_oci(str(layout), ref="v2")
            added["v1"] = b1
            added["v2"] = st.stats()["physical_bytes"] - b1

    def umoci_both() -> None:
        for tag in ("v1", "v2"):
            rm_rf(root / f"bundle-{tag}")
            run(["umoci", "unpack", "--image", f"{layout}:{tag}", str(root / f"bundle-{tag}")])

    cases = [
        Case("layerstore import-oci v1 then v2", ls_import),
        Case("umoci unpack v1, v2", umoci_both),
    ]
    measure(cases, args.repeat, args.warmup, caches, "oci import")
    flat = root / "flat"

    def ls_flat() -> None:
        rm_rf(flat)
        with Store(str(store_dir)) as st:
            st.materialize_image("v2", str(flat))

    def umoci_v2() -> None:
        rm_rf(root / "bundle-v2")
        run(["umoci", "unpack", "--image", f"{layout}:v2", str(root / "bundle-v2")])

    cases2 = [
        Case("layerstore materialize v2 (flattened)", ls_flat),
        Case("umoci unpack v2", umoci_v2),
    ]
    measure(cases2, args.repeat, args.warmup, caches, "oci flatten")
    sec = Section("oci", "OCI images: import v1 then v2 (gzip layout) and flatten v2, vs umoci")
    sec.notes = [
        "The skopeo gzip layouts of the debootstrap minbase image: v1 (one layer) and v2 (v1's "
        "layer + a diff layer with whiteouts), merged into one layout.  umoci 0.4.7 as packaged.",
        f"v2 added {fmt_bytes(added['v2'])} to the store after v1's {fmt_bytes(added['v1'])} "
        f"({100 * added['v2'] / added['v1']:.2f}%; aim < 5%).",
    ]
    sec.rows = [
        Row(
            "import-oci v1 then v2",
            "umoci unpack v1, v2",
            "time",
            cases[0].summary,
            cases[1].summary,
            aim=Goal("<=", 1.0),
            headline=True,
        ),
        Row(
            "v2 bytes added / v1 bytes",
            "–",
            "value",
            subj_cell=f"{fmt_bytes(added['v2'])}",
            ref_cell=f"{fmt_bytes(added['v1'])}",
            ratio_text=f"{100 * added['v2'] / added['v1']:.2f} %",
            checked=100 * added["v2"] / added["v1"],
            aim=Goal("<=", 5, " %"),
        ),
        Row(
            "materialize v2 flattened",
            "umoci unpack v2",
            "time",
            cases2[0].summary,
            cases2[1].summary,
            aim=Goal("<=", 0.5),
            note="aim: >= 2x faster",
        ),
    ]
    return sec


# --------------------------------------------------------------------------------------------
# reporting


def machine_info(ws: Workspace) -> dict[str, Any]:
    cpu = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = ""
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = fmt_bytes(int(line.split()[1]) * 1024)
    commit = sh_out(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    dirty = sh_out(["git", "-C", str(REPO), "status", "--porcelain", "--", "src"])
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu or platform.processor(),
        "memory": mem,
        "kernel": platform.release(),
        "filesystem": ws.description,
        "python": platform.python_version(),
        "layerstore": f"{layerstore.__version__} (git {commit}{', src/ dirty' if dirty else ''})",
        "tar": sh_out(["tar", "--version"]).splitlines()[0] if sh_out(["tar", "--version"]) else "",
    }


def table(rows: list[Row], markdown: bool) -> str:
    head = [
        "Subject",
        "Reference",
        "Subject median [min–max]",
        "Reference median [min–max]",
        "Ratio",
        "Target",
        "Status",
        "Notes",
    ]
    body = [
        [
            r.subject,
            r.reference,
            r.subj_cell,
            r.ref_cell,
            r.ratio_cell(),
            r.goal_cell(),
            r.status,
            r.note,
        ]
        for r in rows
    ]
    if markdown:

        def esc(s: str) -> str:
            return s.replace("|", "\\|")

        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in body]
        return "\n".join(lines)
    cols = head[:-1]
    widths = [max(len(x[i]) for x in [cols, *[b[:-1] for b in body]]) for i in range(len(cols))]
    out = ["  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True))]
    out.append("  ".join("-" * w for w in widths))
    for b in body:
        out.append("  ".join(c.ljust(w) for c, w in zip(b[:-1], widths, strict=True)))
        if b[-1]:
            out.append("    ↳ " + b[-1])
    return "\n".join(out)


def print_sections(sections: list[Section]) -> None:
    for s in sections:
        print(f"\n== {s.title}")
        for n in s.notes:
            print(f"   {n}")
        print(table(s.rows, markdown=False))
    print()


def report(
    args: argparse.Namespace, ws: Workspace, caches: Caches, sections: list[Section], started: str
) -> dict[str, Any]:
    return {
        "tool": "tools/bench.py",
        "date": started,
        "command": "python3 tools/bench.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "machine": machine_info(ws),
        "settings": {
            "repeat": args.repeat,
            "warmup": args.warmup,
            "page_cache": caches.mode,
            "seed": args.seed,
            **({"objects": args.objects, "layers": args.layers} if "objects" in args else {}),
        },
        "sections": [s.to_json() for s in sections],
    }


def markdown_block(
    doc: dict[str, Any],
    sections: list[Section],
    begin: str = BEGIN,
    end: str = END,
    title: str = "Results",
) -> str:
    m = doc["machine"]
    out = [
        begin,
        f"<!-- Generated by `{doc['command']}`; everything between these markers is "
        "rewritten on every run.  Edit outside them. -->",
        "",
        f"## {title}",
        "",
        f"- **Date:** {doc['date']}",
        f"- **Command:** `{doc['command']}`",
        f"- **Machine:** {m['nproc']} CPUs ({m['cpu']}), {m['memory']} RAM, Linux {m['kernel']}",
        f"- **Filesystem:** {m['filesystem']}",
        f"- **Software:** layerstore {m['layerstore']}, Python {m['python']}, {m['tar']}",
        f"- **Method:** median of {doc['settings']['repeat']} interleaved runs after "
        f"{doc['settings']['warmup']} warm-up round(s); page cache "
        f"{doc['settings']['page_cache']}; [min–max] in brackets.  Ratios are ratios of medians.",
        "",
    ]
    for s in sections:
        out += [f"### {s.title}", ""]
        out += [f"- {n}" for n in s.notes]
        out += ["", table(s.rows, markdown=True), ""]
    out += [
        "### How to reproduce",
        "",
        "As root, from the repository root (the corpus is built and cached on first use by "
        "`tests/corpus.py`; mkfs.xfs and zstd must be installed, `./dev setup` installs them):",
        "",
        "```sh",
        "python3 tools/bench.py core --repeat 5 --json core.json       # issue 2 figures",
        "python3 tools/bench.py lifecycle --objects 1000000            # issue 3 figures",
        "python3 tools/bench.py all                                    # both + this file",
        "```",
        "",
        "Each subcommand makes (and removes) its own XFS loop filesystem; `--dir DIR` runs in an "
        "existing directory instead.  `--json OUT` keeps every sample.  Compare ratios between "
        "machines, not absolute times.",
        end,
    ]
    return "\n".join(out)


def update_markdown(path: Path, block: str, begin: str = BEGIN, end: str = END) -> None:
    if path.exists():
        text = path.read_text()
        i, j = text.find(begin), text.find(end)
        if i >= 0 and j > i:
            text = text[:i] + block + text[j + len(end) :]
        else:
            text = text.rstrip("\n") + "\n\n" + block + "\n"
    else:
        text = (
            "# Benchmarks\n\n"
            "Performance of layerstore measured against the tools a plain-directory layer store "
            "would use (GNU tar, `cp -a --reflink=always`, `rm -rf`), always as ratios against a "
            "reference run in the same invocation on the same filesystem.  `tools/bench.py` "
            "writes the section between the markers below; prose outside them is kept.\n\n"
            + block
            + "\n"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# main


def fs_size(args: argparse.Namespace) -> int:
    size = parse_size(args.fs_size)
    if args.command in ("lifecycle", "all"):
        # ~4 KiB block + 512 B inode + index records per small object, plus the kept tar.
        need = args.objects * 6 * 1024 + 4 * GIB
        if need > size:
            log(f"--objects {args.objects} needs ~{need / GIB:.0f} GiB: growing the image")
            size = need
    return size


def parse_size(text: str) -> int:
    m = re.fullmatch(r"(\d+)([KMGT]?)", text.strip().upper())
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (e.g. 8G)")
    return int(m.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30, "T": 40}[m.group(2)]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_gc"]:
        _gc_child(argv[1])
        return 0
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--repeat", type=int, default=5, help="timed runs per figure (5)")
    common.add_argument("--warmup", type=int, default=1, help="untimed rounds first (1)")
    common.add_argument("--json", metavar="OUT", help="write all samples and figures here")
    common.add_argument("--dir", help="work in this existing directory, no loop filesystem")
    common.add_argument("--fs-size", default="8G", help="loop image size (8G; grown if needed)")
    common.add_argument("--seed", type=int, default=20240501, help="RNG seed for generated data")
    common.add_argument(
        "--no-drop-caches", action="store_true", help="do not drop the page cache (warm runs)"
    )
    life = argparse.ArgumentParser(add_help=False)
    life.add_argument("--objects", type=int, default=1_000_000, help="store size (1000000)")
    life.add_argument("--layers", type=int, default=10, help="layers to spread them over (10)")
    fsck_p = argparse.ArgumentParser(add_help=False)
    fsck_p.add_argument(
        "--fsck-bytes", type=parse_size, default=1 << 30, help="mixed data for fsck (1G)"
    )
    parser = argparse.ArgumentParser(
        prog="tools/bench.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("core", parents=[common], help="issue 2: import, materialize, dedup")
    sub.add_parser("lifecycle", parents=[common, life], help="issue 3: gc, remove, pinning")
    sub.add_parser("fsck", parents=[common, fsck_p], help="issue 4: fsck MB/s vs raw blake3")
    p_oci = sub.add_parser("oci", parents=[common], help="issue 5: images vs umoci")
    p_oci.add_argument(
        "--markdown", default=str(REPO / "docs" / "benchmarks.md"), help="file to update"
    )
    p_all = sub.add_parser(
        "all", parents=[common, life, fsck_p], help="everything, then docs/benchmarks.md"
    )
    p_all.add_argument(
        "--markdown", default=str(REPO / "docs" / "benchmarks.md"), help="file to update"
    )
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if "layers" in args and args.objects // args.layers < 1:
        parser.error("--objects must be at least --layers")

    # Ctrl-C even when started from a non-interactive shell in the background (which would
    # otherwise leave SIGINT ignored); SIGTERM/SIGHUP clean up the same way.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for s in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, _on_signal)
    started = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    t0 = time.monotonic()
    sections: list[Section] = []
    try:
        with workspace(args.dir, fs_size(args)) as ws:
            caches = Caches(not args.no_drop_caches)
            if args.command in ("core", "all"):
                sections += bench_core(ws, args, caches)
            if args.command in ("lifecycle", "all"):
                sections += bench_lifecycle(ws, args, caches)
            if args.command in ("fsck", "all"):
                sections += bench_fsck(ws, args, caches)
            if args.command == "oci":
                sections += bench_oci(ws, args, caches)
            doc = report(args, ws, caches, sections, started)
    except KeyboardInterrupt as exc:
        log(f"interrupted ({exc or 'Ctrl-C'}); workspace cleaned up")
        return 130
    doc["total_seconds"] = round(time.monotonic() - t0, 1)
    print_sections(sections)
    log(f"total {fmt_s(doc['total_seconds'])}")
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
        log(f"wrote {args.json}")
    if args.command == "all":
        update_markdown(Path(args.markdown), markdown_block(doc, sections))
        log(f"updated {args.markdown}")
    if args.command == "oci":
        block = markdown_block(doc, sections, OCI_BEGIN, OCI_END, "Results: OCI images")
        update_markdown(Path(args.markdown), block, OCI_BEGIN, OCI_END)
        log(f"updated {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
