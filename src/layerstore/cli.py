"""The ``layerstore`` command line (click for parsing, tqdm for progress).

Exit codes: 0 success; 2 bad input; 3 store unusable; 4 not found; 5 corrupt object; 6 bad
destination; 7 concurrency conflict (retry); 9 in use; 70 internal error (a bug: please
report it); 130 interrupted.  ``fsck`` and ``gc`` add
their own (docs/operations.md).  ``--json`` prints one JSON document on stdout and nothing else.
"""

from __future__ import annotations

import errno
import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, BinaryIO, NoReturn

import click
import lmdb
from tqdm import tqdm

from .core.index import UNPROVED, index_error
from .errors import LayerstoreError
from .sources.open import open_source
from .store import ENV_STORE, Store, default_store_path

EXIT_INTERNAL = 70  # an unexpected exception: a bug (sysexits' EX_SOFTWARE)


# The store root of this invocation: main() classifies an OS error nobody anticipated by it
# and names its index in an LMDB error.
_store_root: str | None = None


class Ctx:
    def __init__(self, store: str, as_json: bool, quiet: bool) -> None:
        global _store_root
        _store_root = os.path.abspath(store)
        self.store_path = store
        self.json = as_json
        self.quiet = quiet

    def open(self, create: bool = False, for_fsck: bool = False) -> Store:
        return Store(self.store_path, create=create, for_fsck=for_fsck)

    def out(self, data: Any, human: Callable[[], None]) -> None:
        if self.json:
            click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))
        elif not self.quiet:
            human()

    @contextmanager
    def progress(self, total: int | None, unit: str, desc: str) -> Iterator[Any]:
        show = not (self.json or self.quiet) and sys.stderr.isatty()
        with tqdm(
            total=total,
            unit=unit,
            unit_scale=True,
            desc=desc,
            disable=not show,
            file=sys.stderr,
            leave=False,
        ) as bar:
            yield bar.update


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--store",
    "store",
    envvar=ENV_STORE,
    default=default_store_path,
    show_default=f"${ENV_STORE} or ~/.local/share/layerstore",
    help="Store root directory.",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress, no human output.")
@click.pass_context
def cli(ctx: click.Context, store: str, as_json: bool, quiet: bool) -> None:
    """Content-addressed store for container image layers."""
    ctx.obj = Ctx(store, as_json, quiet)


@cli.command()
@click.pass_obj
def init(c: Ctx) -> None:
    """Create the store (idempotent)."""
    with c.open(create=True) as st:
        c.out({"store": st.root}, lambda: click.echo(f"initialized {st.root}"))


@cli.command("import")
@click.argument("sources", nargs=-1, required=True)
@click.option(
    "--partial",
    is_flag=True,
    help="zstd:chunked blobs (files or http(s) blob URLs, read with range requests): read "
    "only what the store lacks (TOC found by the footer).",
)
@click.option(
    "--toc-only",
    is_flag=True,
    help="With --partial, older-variant blobs: skip the header frames (fewest bytes); the "
    "layer is keyed by --diff-id, which cannot then be proved.",
)
@click.option("--diff-id", help="The layer's DiffID from its image config (sha256:...).")
@click.pass_obj
def import_(
    c: Ctx, sources: tuple[str, ...], partial: bool, toc_only: bool, diff_id: str | None
) -> None:
    """Import layers from tar files (plain/gzip/zstd), directories, or - for stdin."""
    results = []
    with c.open(create=True) as st:
        for src in sources:
            if partial:
                # One open source: its size scales the bar, so the bar shows what is skipped.
                with (
                    open_source(src) as (rs, name),
                    c.progress(rs.size(), "B", f"read (partial) {os.path.basename(src)}") as upd,
                ):
                    r = st.import_chunked(
                        rs,
                        progress=upd,
                        expected_diff_id=diff_id,
                        toc_only=toc_only,
                        source_name=name,
                    )
            else:
                total = os.path.getsize(src) if src != "-" and os.path.isfile(src) else None
                with c.progress(total, "B", f"import {os.path.basename(src)}") as upd:
                    r = st.import_path(src, progress=upd)
            results.append(r.to_json())
            for w in r.warnings:  # accepted as GNU tar accepts it; worth a word (on stderr)
                if not c.quiet:
                    click.echo(f"warning: {src}: {w}", err=True)
            if not c.json and not c.quiet:
                state = "already stored" if r.already_present else "imported"
                if r.proved_unproved:
                    state = "imported (proved: replaces the unproved layer of that DiffID)"
                elif r.partial is not None and r.partial.get("diff_id_proof") == UNPROVED:
                    state += " (DiffID UNPROVED: a full or header-frame import proves it)"
                if r.partial is not None:
                    click.echo(_partial_line(r.partial))
                click.echo(
                    f"{r.diff_id}  {state}: {r.entries} entries, {r.files} files, "
                    f"{_human_bytes(r.logical_bytes)}; new {r.new_objects} objects "
                    f"({_human_bytes(r.new_bytes)}), reused {r.reused_objects}, "
                    f"inline {r.inline_files}; {r.seconds:.2f}s"
                )
    if c.json:
        click.echo(json.dumps(results if len(results) > 1 else results[0], indent=2))


@contextmanager
def _atomic_output(path: str) -> Iterator[BinaryIO]:
    """Write to a temporary name beside ``path``; rename only if everything succeeded (an
    export verifies its DiffID at the very end)."""
    tmp = f"{path}.layerstore-tmp"
    try:
        with open(tmp, "wb") as f:
            yield f
        os.rename(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _partial_line(p: dict[str, Any]) -> str:
    proof = p.get("diff_id_proof", "")
    trust = (
        "TOC checksum verified" if p.get("toc_verified") else "TOC from the footer (no checksum)"
    )
    return (
        f"  zstd:chunked ({p.get('variant')}): read {_human_bytes(p['bytes_read'])} of "
        f"{_human_bytes(p['blob_size'])}, skipped {p['skipped_pct']:.1f}%; files reused "
        f"{p['files_reused']}, assembled {p['files_assembled']}, fetched {p['files_fetched']}; "
        f"chunks reused {p['chunks_reused']}, fetched {p['chunks_fetched']}; {trust}; "
        f"DiffID: {proof}"
    )


@cli.command("chunk-index")
@click.argument("layers", nargs=-1)
@click.pass_obj
def chunk_index(c: Ctx, layers: tuple[str, ...]) -> None:
    """Index the chunks of LAYERS' files (default: all) for zstd:chunked partial imports."""
    with c.open() as st:
        r = st.chunk_index(list(layers) or None)
    c.out(
        r,
        lambda: click.echo(
            f"{r['layers']} layers: chunked {r['objects_chunked']} objects "
            f"({_human_bytes(r['bytes_chunked'])}), {r['chunks_indexed']} chunks indexed"
        ),
    )


@cli.command("ls")
@click.pass_obj
def ls(c: Ctx) -> None:
    """List layers."""
    with c.open() as st:
        layers = st.layers()

    def human() -> None:
        click.echo(f"{'DIFF ID':<20} {'FILES':>8} {'SIZE':>11}  SOURCE")
        for li in layers:
            flag = "  [unproved DiffID]" if li.unproved else ""
            click.echo(
                f"{li.diff_id[7:26]:<20} {li.files:>8} {_human_bytes(li.bytes):>11}  "
                f"{li.source}{flag}"
            )

    c.out([li.to_json() for li in layers], human)


@cli.command()
@click.argument("layer")
@click.option("--entries/--no-entries", default=False, help="List every entry.")
@click.pass_obj
def show(c: Ctx, layer: str, entries: bool) -> None:
    """Show a layer (by DiffID prefix or compressed digest)."""
    with c.open() as st:
        info = st.layer(layer)
        data: dict[str, Any] = info.to_json()
        if entries:
            data["entries_list"] = [e.to_json() for e in st.entries(info.diff_id)]

    def human() -> None:
        for k, v in info.to_json().items():
            click.echo(f"{k:>12}: {v}")
        for e in data.get("entries_list", []):
            click.echo(f"  {e['type']:<8} {e['mode']} {e['uid']}:{e['gid']} {e['path']}")

    c.out(data, human)


@cli.command()
@click.argument("layer")
@click.argument("dest")
@click.option(
    "--mode",
    type=click.Choice(["reflink", "copy", "hardlink"]),
    default="reflink",
    show_default=True,
    help="reflink: new inodes sharing data (falls back to copying); hardlink: shared inodes.",
)
@click.option("--no-sync", is_flag=True, help="Skip the syncfs before publishing the tree.")
@click.option(
    "--diff-dirs", is_flag=True, help="IMAGE: one overlayfs lower dir per layer, not flattened."
)
@click.pass_obj
def materialize(c: Ctx, layer: str, dest: str, mode: str, no_sync: bool, diff_dirs: bool) -> None:
    """Build LAYER (or IMAGE, flattened) as a new directory DEST."""
    with c.open() as st:
        if layer in {im["name"] for im in st.images()}:
            rr = st.materialize_image(layer, dest, mode=mode, sync=not no_sync, diff_dirs=diff_dirs)
            out = [x.to_json() for x in rr] if isinstance(rr, list) else rr.to_json()
            c.out(out, lambda: click.echo(f"{dest}: image {layer} materialized"))
            return
        info = st.layer(layer)
        with c.progress(info.files, "files", "materialize") as upd:
            r = st.materialize(info.diff_id, dest, mode=mode, progress=upd, sync=not no_sync)

    def human() -> None:
        methods = ", ".join(f"{k} {v}" for k, v in sorted(r.methods.items()))
        click.echo(f"{r.dest}: {r.entries} entries in {r.seconds:.2f}s ({methods})")
        if r.skipped:
            click.echo(f"skipped (not permitted here): {r.skipped}", err=True)

    c.out(r.to_json(), human)


@cli.command()
@click.argument("layer")
@click.option("-o", "--output", default="-", help="File to write (default: stdout).")
@click.option(
    "--zstd-chunked",
    "chunked",
    is_flag=True,
    help="Write a zstd:chunked blob (current upstream variant); prints its annotations.",
)
@click.pass_obj
def export(c: Ctx, layer: str, output: str, chunked: bool) -> None:
    """Write LAYER's original tar (byte for byte: its sha256 is the DiffID)."""
    with c.open() as st:
        info = st.layer(layer)
        if chunked:
            if output == "-":
                raise click.UsageError("--zstd-chunked needs -o FILE")
            with _atomic_output(output) as f:
                blob = st.export_chunked(info.diff_id, f)
            c.out(
                {"output": output, **blob.to_json()},
                lambda: click.echo(
                    f"{output}: {blob.size} bytes, {blob.digest}, DiffID {blob.diff_id}, "
                    f"{blob.files} files in {blob.chunks} chunks\n"
                    + json.dumps(blob.annotations, indent=2)
                ),
            )
            return
        if output == "-":
            n = st.export_layer(info.diff_id, sys.stdout.buffer)
            return
        with _atomic_output(output) as f, c.progress(info.bytes, "B", "export") as upd:
            n = st.export_layer(info.diff_id, f, progress=upd)
    c.out(
        {"diff_id": info.diff_id, "output": output, "bytes": n},
        lambda: click.echo(f"{output}: {n} bytes, sha256 verified = {info.diff_id}"),
    )


@cli.command("import-oci")
@click.argument("layout")
@click.option("--ref", help="Tag in the layout (org.opencontainers.image.ref.name).")
@click.option("--name", help="Name of the image in the store (default: the tag).")
@click.option("--platform", help="os/arch to pick from an index (default: this machine's).")
@click.option(
    "--no-partial",
    is_flag=True,
    help="Read zstd:chunked layers whole instead of only what the store lacks.",
)
@click.option(
    "--toc-only",
    is_flag=True,
    help="zstd:chunked layers without tar-split: skip the header frames (podman's byte "
    "count); their DiffIDs are then taken from the config, unproved.",
)
@click.pass_obj
def import_oci(
    c: Ctx,
    layout: str,
    ref: str | None,
    name: str | None,
    platform: str | None,
    no_partial: bool,
    toc_only: bool,
) -> None:
    """Import an image from an OCI image layout directory (LAYOUT or LAYOUT:TAG)."""
    if ref is None and ":" in layout and not os.path.isdir(layout):
        layout, ref = layout.rsplit(":", 1)

    def on_layer(i: int, n: int, info: dict[str, Any]) -> None:
        if not (c.json or c.quiet):
            state = f"new, {_human_bytes(info['new_bytes'])}" if info["new"] else "already stored"
            click.echo(
                f"  layer {i + 1}/{n} {info['digest'][:19]} -> {info['diff_id'][:19]} "
                f"({state}, {info['seconds']:.2f}s)",
                err=True,
            )
            if info.get("partial") and info["new"]:
                click.echo("  " + _partial_line(info["partial"]), err=True)

    with c.open(create=True) as st:
        r = st.import_oci(
            layout,
            ref=ref,
            name=name,
            platform=platform,
            on_layer=on_layer,
            partial=not no_partial,
            toc_only=toc_only,
        )

    def human() -> None:
        click.echo(
            f"image {r.name}: {len(r.layers)} layers ({r.new_layers} new, "
            f"{r.reused_layers} already stored), manifest {r.manifest}; {r.seconds:.2f}s"
        )
        if r.unproved:
            click.echo(
                f"warning: image {r.name} rests on {len(r.unproved)} layer(s) with an unproved "
                "DiffID (TOC only): " + ", ".join(d[:19] for d in r.unproved) + "; import it "
                "again without --toc-only to prove them",
                err=True,
            )

    c.out(r.to_json(), human)


@cli.command("export-oci")
@click.argument("image")
@click.argument("layout")
@click.option(
    "--compression",
    type=click.Choice(["gzip", "zstd", "zstd:chunked", "none"]),
    default="gzip",
    show_default=True,
)
@click.pass_obj
def export_oci(c: Ctx, image: str, layout: str, compression: str) -> None:
    """Write IMAGE as a new OCI image layout directory LAYOUT (tag = IMAGE)."""
    with c.open() as st:
        r = st.export_oci(image, layout, compression)
    c.out(r, lambda: click.echo(f"{layout}: {image} ({len(r['layers'])} layers, {compression})"))


@cli.command("images")
@click.pass_obj
def images(c: Ctx) -> None:
    """List images."""
    with c.open() as st:
        ims = st.images()

    def human() -> None:
        for im in ims:
            flag = f"  [{len(im['unproved'])} unproved]" if im["unproved"] else ""
            click.echo(
                f"{im['name']:<30} {len(im['layers'])} layers  {im['manifest_digest']}{flag}"
            )

    c.out(ims, human)


@cli.command("rmi")
@click.argument("names", nargs=-1, required=True)
@click.pass_obj
def rmi(c: Ctx, names: tuple[str, ...]) -> None:
    """Remove images (their layers go when no other image uses them)."""
    with c.open() as st:
        out = [st.rmi(n) for n in names]
    c.out(out, lambda: [click.echo(f"removed image {o['image']}") for o in out])


@cli.command("tag")
@click.argument("src")
@click.argument("dst")
@click.pass_obj
def tag(c: Ctx, src: str, dst: str) -> None:
    """Name image SRC also DST."""
    with c.open() as st:
        st.tag(src, dst)
    c.out({"src": src, "dst": dst}, lambda: click.echo(f"{dst} -> {src}"))


@cli.command("rm")
@click.argument("layers", nargs=-1, required=True)
@click.pass_obj
def rm(c: Ctx, layers: tuple[str, ...]) -> None:
    """Remove layers (drops references; `gc` frees the space)."""
    out = []
    with c.open() as st:
        for ref in layers:
            out.append(st.remove(ref))

    def human() -> None:
        for r in out:
            note = " (in use: references dropped when readers finish)" if r["deferred"] else ""
            click.echo(f"removed {r['diff_id']}{note}")

    c.out(out, human)


@cli.command("du")
@click.pass_obj
def du(c: Ctx) -> None:
    """Logical vs physical bytes and the dedup ratio (alias: stats)."""
    with c.open() as st:
        s = st.stats()

    def human() -> None:
        click.echo(f"layers        {s['layers']}  ({s['files']} files)")
        click.echo(f"logical       {_human_bytes(s['logical_bytes'])}")
        click.echo(f"physical      {_human_bytes(s['physical_bytes'])} in {s['objects']} objects")
        click.echo(
            f"unreferenced  {_human_bytes(s['unreferenced_bytes'])} in "
            f"{s['unreferenced_objects']} objects (gc frees these)"
        )
        click.echo(f"dedup ratio   {s['dedup_ratio']}")

    c.out(s, human)


cli.add_command(du, "stats")


@cli.command()
@click.option("--dry-run", is_flag=True, help="Report what would be freed; change nothing.")
@click.pass_obj
def gc(c: Ctx, dry_run: bool) -> None:
    """Free objects no layer references and no running operation pins."""
    with c.open() as st:
        if dry_run:  # the plan: what would go, what stays and why (--json: every item)
            plan = st.gc_plan()
            r, doc = plan.summary(), plan.to_json()
        else:
            with c.progress(None, "objects", "gc") as upd:
                r = st.gc(progress=upd)
            doc = r.to_json()

    def human() -> None:
        verb = "would free" if dry_run else "freed"
        click.echo(
            f"{verb} {r.objects_freed} objects ({_human_bytes(r.bytes_freed)}), "
            f"{r.orphans_removed} orphan files ({_human_bytes(r.orphan_bytes)}); "
            f"{r.dead_leases} dead leases, {r.layers_finalized} deferred removals finished, "
            f"{r.skipped_pinned} pinned objects kept; {r.seconds:.2f}s"
        )

    c.out(doc, human)


@cli.command()
@click.option("--quick", is_flag=True, help="Metadata only: do not re-hash object contents.")
@click.option("--deep", is_flag=True, help="Also recompute every object's sha256.")
@click.option("--repair", is_flag=True, help="Fix what can be fixed (never deletes data).")
@click.option(
    "--source",
    "sources",
    multiple=True,
    help="Where to re-fetch missing/corrupt objects: a store root, a layer tarball, an OCI layout.",
)
@click.option("--rebuild-index", is_flag=True, help="Recreate a lost/unreadable index.")
@click.pass_obj
def fsck(
    c: Ctx, quick: bool, deep: bool, repair: bool, sources: tuple[str, ...], rebuild_index: bool
) -> None:
    """Check the store; exit 0 clean, 1 repaired, 4 damage left, 8 could not check."""
    from .ops.fsck import EXIT_ERROR
    from .ops.fsck import rebuild_index as rebuild

    def could_not_check(exc: BaseException, index_dir: str = "index/") -> NoReturn:
        # fsck's contract is its own exit codes: whatever stopped it is "could not check" (8),
        # said on stderr even with -q (an unattended run must leave a reason in its log).
        if isinstance(exc, lmdb.Error):  # a damaged page deeper in the index than opening reads
            err = str(index_error(exc, "fsck", index_dir))
        elif isinstance(exc, OSError):
            err = _os_error(exc)[0]
        else:
            err = str(exc)
        if c.json:
            click.echo(json.dumps({"exit_code": EXIT_ERROR, "error": err}, indent=2))
        click.echo(
            f"fsck: could not check the store: {err}"
            + (
                ""
                if "--rebuild-index" in err
                else "\nIf the index is damaged or lost, `layerstore fsck --rebuild-index` "
                "recreates it from objects/ and layers/."
            ),
            err=True,
        )
        sys.exit(EXIT_ERROR)

    try:
        if rebuild_index:
            out = rebuild(c.store_path)
            c.out(out, lambda: click.echo(json.dumps(out, indent=2)))
            sys.exit(0 if not out["problems_after_rebuild"] else 4)
        st = c.open(for_fsck=True)
    except (LayerstoreError, OSError, lmdb.Error) as exc:
        could_not_check(exc)
    with st:
        try:
            with c.progress(None, "objects", "fsck") as upd:
                r = st.fsck(
                    full=not quick, deep=deep, repair=repair, sources=list(sources), progress=upd
                )
        except (LayerstoreError, OSError, lmdb.Error) as exc:
            could_not_check(exc, st.index_dir)

    def human() -> None:
        for p in r.problems:
            mark = "REPAIRED" if p.repaired else "DAMAGE  "
            click.echo(f"{mark} [{p.code}] {p.message}")
        rate = r.bytes_hashed / r.seconds / 1e6 if r.seconds else 0
        click.echo(
            f"{r.mode} fsck: {r.objects_checked} objects ({rate:.0f} MB/s hashed), "
            f"{r.layers_checked} layers, {len(r.problems)} problems "
            f"({sum(p.repaired for p in r.problems)} repaired) in {r.seconds:.1f}s"
        )

    c.out(r.to_json(), human)
    sys.exit(r.exit_code)


def _os_error(exc: OSError) -> tuple[str, int]:
    """An OS error no code path diagnosed, as a message and a documented exit code.

    Every expected failure is raised as a LayerstoreError where it happens; this is the net
    under them, so that a user never sees a traceback (issue 11).  The exit code follows the
    path the error names: inside the store it is the store that is unusable (3), anywhere else
    it is the input or destination the user named (2).  ``LAYERSTORE_DEBUG=1`` re-raises.
    """
    name = exc.filename if isinstance(exc.filename, str) else None
    what = exc.strerror or str(exc)
    inside = (
        name is not None
        and _store_root is not None
        and (os.path.abspath(name) + "/").startswith(_store_root.rstrip("/") + "/")
    )
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        hint = "free space (`layerstore gc` removes what this left behind) and retry"
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        hint = "run as a user who may write there, or check how it is mounted"
    elif inside:
        hint = "the store's layout is damaged: run `layerstore fsck`"
    else:
        hint = "check the path and retry"
    where = f" ({name})" if name else ""
    return f"{what}{where}: {hint}", 3 if inside else 2


def main() -> None:
    debug = os.environ.get("LAYERSTORE_DEBUG") == "1"
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(2)
    except LayerstoreError as exc:
        click.echo(f"layerstore: error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except lmdb.Error as exc:  # an index failure the operation itself did not anticipate
        where = os.path.join(_store_root, "index") if _store_root else "index/"
        err = index_error(exc, "the operation", where)
        click.echo(f"layerstore: error: {err}", err=True)
        sys.exit(err.exit_code)
    except BrokenPipeError:
        sys.exit(141)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except OSError as exc:
        if debug:
            raise
        msg, code = _os_error(exc)
        click.echo(f"layerstore: error: {msg}", err=True)
        sys.exit(code)
    except Exception as exc:  # a bug: say so plainly, keep the traceback for LAYERSTORE_DEBUG
        if debug:
            raise
        click.echo(
            f"layerstore: internal error: {type(exc).__name__}: {exc}\n"
            "This is a bug in layerstore; please report it with the command that caused it "
            "(LAYERSTORE_DEBUG=1 prints the traceback).",
            err=True,
        )
        sys.exit(EXIT_INTERNAL)


if __name__ == "__main__":
    main()
