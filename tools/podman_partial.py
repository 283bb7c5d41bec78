#!/usr/bin/env python3
"""Reference measurement: podman 4.3's zstd:chunked partial pull of image v2 after v1.

What it does (as root; everything hermetic and cleaned up at the end):

1. starts a real registry (``docker-registry serve``, CNCF distribution 2.8) on 127.0.0.1 with its
   storage in a temporary directory, and in front of it a small counting reverse proxy (this
   file, stdlib only) that logs every request's method, path, ``Range`` header, status and the
   response body bytes it passed on;
2. pushes the v1 and v2 zstd:chunked layouts of the corpus (tests/corpus.py) to the registry with
   ``skopeo copy --preserve-digests`` and checks the registry serves the very same manifest and
   layer digests (the blobs went up unchanged, TOC annotations included);
3. podman, with a fresh storage root (overlay driver) and ``enable_partial_images = "true"``,
   pulls v1 through the proxy, then v2 (timed); the proxy's counts for v2 say how many bytes of
   v2's layer(s) podman really fetched; podman's own figures (``Missing N bytes out of M`` from
   containers/storage's debug log, and the ``skipped:`` note of its progress bar) are reported
   next to them;
4. for comparison: a full (non-partial) pull of v2 into a fresh storage, and a non-partial pull of
   v2 after v1.

Pairs: ``skopeo`` = ``oci_layout(1|2, "zstd:chunked")`` (v2 = v1's layer + a small diff layer, so
podman reuses v1's layer by digest and partial-pulls only the diff layer) and ``buildah`` =
``buildah_chunked_layout(1|2)`` (one layer each, the whole root filesystem: v2's layer has to be
deduplicated against v1's file by file).

Hermeticity: podman and skopeo run in a private mount namespace in which ``/var`` and ``/run``
are overlays whose upper directories are in the scratch directory (``corpus.private_ns_prefix``),
with ``CONTAINERS_STORAGE_CONF``/``CONTAINERS_CONF`` pointing at a storage root, run root and tmp
dir in the scratch directory (``corpus.containers_storage_conf``).  Nothing lands in
``/var/lib/containers``, ``/run/containers`` or ``/run/libpod``; mounts die with the namespace.

    python3 tools/podman_partial.py [--pairs skopeo,buildah] [--keep DIR] [-o out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import http.client
import http.server
import json
import os
import re
import select
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # temporary
import testdata as corpus

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
}


# --------------------------------------------------------------------------------------------
# counting reverse proxy


class CountingProxy:
    """HTTP/1.1 reverse proxy on 127.0.0.1 that forwards to ``upstream`` and records requests."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.records: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                conn = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=120)
                try:
                    # One putheader per header: clients repeat some (podman sends several Accept).
                    skip = {"skip_host": True, "skip_accept_encoding": True}
                    conn.putrequest(self.command, self.path, **skip)
                    conn.putheader("Host", f"127.0.0.1:{proxy.upstream_port}")
                    for k, v in self.headers.items():
                        if k.lower() not in _HOP_BY_HOP and k.lower() not in ("host",):
                            conn.putheader(k, v)
                    conn.endheaders(body)
                    resp = conn.getresponse()
                    self.send_response_only(resp.status, resp.reason)
                    known = resp.getheader("Content-Length")
                    for k, v in resp.getheaders():
                        if k.lower() not in _HOP_BY_HOP and k.lower() != "content-length":
                            self.send_header(k, v)
                    sent = 0
                    if self.command == "HEAD" or resp.status in (204, 304):
                        if known is not None:
                            self.send_header("Content-Length", known)
                        self.end_headers()
                    elif known is not None:
                        self.send_header("Content-Length", known)
                        self.end_headers()
                        while chunk := resp.read(1 << 16):
                            self.wfile.write(chunk)
                            sent += len(chunk)
                    else:
                        data = resp.read()
                        self.send_header("Content-Length", str(len(data)))
                        self.end_headers()
                        self.wfile.write(data)
                        sent = len(data)
                    rng = self.headers.get("Range")
                    proxy._record(
                        {
                            "method": self.command,
                            "path": self.path,
                            "status": resp.status,
                            "content_type": resp.getheader("Content-Type", ""),
                            "range": rng,
                            **_range_stats(rng),
                            "body_bytes": sent,
                        }
                    )
                finally:
                    conn.close()

            do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _record(self, rec: dict[str, Any]) -> None:
        with self.lock:
            self.records.append(rec)

    def take(self) -> list[dict[str, Any]]:
        """Return the records so far and start afresh."""
        with self.lock:
            out, self.records = self.records, []
        return out

    def __enter__(self) -> CountingProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def _range_stats(header: str | None) -> dict[str, int]:
    """Number of ranges and requested bytes in a ``Range: bytes=a-b,c-d,...`` header."""
    if not header or not header.startswith("bytes="):
        return {"ranges": 0, "range_bytes": 0}
    n = total = 0
    for part in header[6:].split(","):
        a, _, b = part.strip().partition("-")
        n += 1
        if a and b:
            total += int(b) - int(a) + 1
        elif b:  # suffix range
            total += int(b)
    return {"ranges": n, "range_bytes": total}


# --------------------------------------------------------------------------------------------
# registry


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def registry(workdir: Path) -> Iterator[int]:
    """Run ``docker-registry serve`` on 127.0.0.1 (storage in ``workdir``); yield its port and
    stop it (by PID) afterwards."""
    exe = shutil.which("docker-registry") or shutil.which("registry")
    if exe is None:
        raise corpus.CorpusError("needs `docker-registry` (apt-get install docker-registry)")
    port = _free_port()
    (workdir / "storage").mkdir(parents=True)
    config = workdir / "config.yml"
    config.write_text(
        "version: 0.1\n"
        "log:\n  level: info\n  accesslog:\n    disabled: false\n"
        "storage:\n"
        f"  filesystem:\n    rootdirectory: {workdir / 'storage'}\n"
        "  delete:\n    enabled: true\n"
        f"http:\n  addr: 127.0.0.1:{port}\n"
    )
    with open(workdir / "registry.log", "wb") as log:
        proc = subprocess.Popen(
            [exe, "serve", str(config)], stdout=log, stderr=subprocess.STDOUT, cwd=workdir
        )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = (workdir / "registry.log").read_text(errors="replace")[-2000:]
                raise corpus.CorpusError(f"docker-registry did not come up:\n{tail}")
            time.sleep(0.1)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _registry_get(port: int, path: str, accept: str = OCI_MANIFEST) -> tuple[int, dict, bytes]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers={"Accept": accept})
    with urllib.request.urlopen(req, timeout=30) as r:
        return r.status, dict(r.headers), r.read()


# --------------------------------------------------------------------------------------------
# hermetic tool runs


def _sandboxed(
    cmd: list[str], scratch: Path, env: dict[str, str], log: Path, keep: tuple[Path, ...] = ()
) -> tuple[float, str]:
    """Run ``cmd`` in a private mount namespace (``/var``, ``/run`` overlaid onto ``scratch``);
    return (wall seconds, combined output).  Raises :class:`corpus.CorpusError` on failure."""
    ns = scratch / "ns"
    prefix = corpus.private_ns_prefix(ns, keep=keep)
    if prefix is None:
        raise corpus.CorpusError("cannot create a private mount namespace (need root)")
    argv = [*prefix, *cmd]
    start = time.monotonic()
    out = _run_pty(argv, env)
    seconds = time.monotonic() - start
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n{out.text}\n(exit {out.rc}, {seconds:.2f} s)\n")
    shutil.rmtree(ns, ignore_errors=True)
    if out.rc != 0:
        tail = "\n".join(out.text.splitlines()[-20:])
        raise corpus.CorpusError(f"failed (exit {out.rc}): {' '.join(cmd)}\n{tail}")
    return seconds, out.text


class _Out:
    def __init__(self, rc: int, text: str) -> None:
        self.rc = rc
        self.text = text


def _run_pty(argv: list[str], env: dict[str, str]) -> _Out:
    """Run ``argv`` with stdout and stderr on a pseudo-terminal (podman prints the ``skipped:``
    note of a partial pull only in its progress bars, which it draws only on a terminal)."""
    import pty

    master, slave = pty.openpty()
    # A real size: with the default 0x0 the progress bars shrink to an ellipsis.
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 220, 0, 0))
    try:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, env=env, close_fds=True
        )
    finally:
        os.close(slave)
    chunks: list[bytes] = []
    try:
        while True:
            ready, _, _ = select.select([master], [], [], 1.0)
            if ready:
                try:
                    data = os.read(master, 1 << 16)
                except OSError:  # EIO: the other side is closed
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
    finally:
        rc = proc.wait()
        os.close(master)
    text = b"".join(chunks).decode(errors="replace")
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text).replace("\r\n", "\n")
    return _Out(rc, text)


def push(ref: str, dest: str, scratch: Path, log: Path, layout: Path) -> None:
    """``skopeo copy --preserve-digests`` of an ``oci:`` reference to the registry, hermetic."""
    env = corpus.containers_storage_conf(scratch / "skopeo")
    cmd = [corpus.tool("skopeo"), "--insecure-policy", "copy", "--quiet", "--preserve-digests"]
    cmd += ["--dest-tls-verify=false", ref, dest]
    _sandboxed(cmd, scratch / "skopeo", env, log, keep=(layout,))


def check_pushed(port: int, repo: str, layout: Path, tag: str) -> dict[str, Any]:
    """The registry serves the layout's manifest digest and every layer blob unchanged."""
    index = json.loads((layout / "index.json").read_text())
    (desc,) = [
        m
        for m in index["manifests"]
        if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag
    ]
    _, headers, body = _registry_get(port, f"/v2/{repo}/manifests/{tag}")
    served = headers.get("Docker-Content-Digest")
    if served != desc["digest"]:
        raise corpus.CorpusError(f"{repo}:{tag}: registry serves {served}, layout has {desc}")
    manifest = json.loads(body)
    for layer in manifest["layers"]:
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/v2/{repo}/blobs/{layer['digest']}", method="HEAD"
        )
        with urllib.request.urlopen(req, timeout=30) as r:
            if int(r.headers["Content-Length"]) != layer["size"]:
                raise corpus.CorpusError(f"{repo}: blob {layer['digest']} has another size")
            if r.headers.get("Docker-Content-Digest") != layer["digest"]:
                raise corpus.CorpusError(f"{repo}: blob {layer['digest']} served under another")
    return manifest


def podman_pull(ref: str, storage: Path, partial: bool, log: Path) -> tuple[float, dict[str, Any]]:
    """Pull ``ref`` with podman into the storage under ``storage``; (seconds, podman's figures)."""
    env = corpus.containers_storage_conf(storage, driver="overlay", partial=partial)
    cmd = [corpus.tool("podman"), "--log-level=debug", "pull", "--tls-verify=false", ref]
    seconds, out = _sandboxed(cmd, storage, env, log)
    missing = [
        {"missing_bytes": int(a), "total_bytes": int(b), "percent": float(c)}
        for a, b, c in re.findall(r"Missing (\d+) bytes out of (\d+) \(([\d.]+) %\)", out)
    ]
    skipped: dict[str, str] = {}  # blob → the last "skipped:" note its progress bar showed
    for blob, note in re.findall(r"^Copying blob (\w+) .*?skipped: ([^)\n]*?) *\)?$", out, re.M):
        skipped[blob] = note.strip()
    return seconds, {
        "chunked_missing": missing,  # containers/storage debug log, one per partial layer
        "progress_skipped": skipped,
        "partial_layers": len(missing),
        "partial_failed": sorted(
            set(re.findall(r"Failed to retrieve partial blob: (.*?) *$", out, re.M))
        ),
    }


# --------------------------------------------------------------------------------------------
# the measurement


def _pair_layouts(pair: str) -> tuple[Path, Path]:
    if pair == "skopeo":
        return corpus.oci_layout(1, "zstd:chunked"), corpus.oci_layout(2, "zstd:chunked")
    if pair == "buildah":
        return corpus.buildah_chunked_layout(1), corpus.buildah_chunked_layout(2)
    raise ValueError(f"unknown pair {pair!r} (skopeo, buildah)")


def _blob_traffic(records: list[dict[str, Any]], digests: set[str]) -> dict[str, Any]:
    blob_gets = [
        r
        for r in records
        if r["method"] == "GET"
        and "/blobs/" in r["path"]
        and r["path"].rsplit("/", 1)[1] in digests
    ]
    return {
        "bytes": sum(r["body_bytes"] for r in blob_gets),
        "requests": len(blob_gets),
        "range_requests": sum(r["range"] is not None for r in blob_gets),
        "ranges": sum(r["ranges"] for r in blob_gets),
        "statuses": sorted({r["status"] for r in blob_gets}),
    }


def _summarize_requests(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {
            "method": r["method"],
            "path": r["path"].split("/v2/", 1)[-1],
            "status": r["status"],
            "ranges": r["ranges"],
            "range_bytes": r["range_bytes"],
            "body_bytes": r["body_bytes"],
            "range_head": (r["range"] or "")[:80] or None,
        }
        for r in records
    ]


def measure_pair(
    pair: str, port: int, proxy: CountingProxy, work: Path, log: Path, repeat: int = 1
) -> dict[str, Any]:
    """Push the pair, then the partial and the full pulls (each ``repeat`` times, each time into
    a fresh storage; seconds are the median, bytes are from the last run); figures for v2."""
    layouts = _pair_layouts(pair)
    repo = f"corpus/{pair}"
    manifests = []
    for v, layout in zip((1, 2), layouts, strict=True):
        push(f"oci:{layout}:v{v}", f"docker://127.0.0.1:{port}/{repo}:v{v}", work, log, layout)
        manifests.append(check_pushed(port, repo, layout, f"v{v}"))
    v1_layers = {d["digest"] for d in manifests[0]["layers"]}
    v2_layers = [d for d in manifests[1]["layers"] if d["digest"] not in v1_layers]
    new = {d["digest"] for d in v2_layers}
    every_v2 = {d["digest"] for d in manifests[1]["layers"]}
    src = f"127.0.0.1:{proxy.port}/{repo}"

    def pulls(name: str, partial: bool, with_v1: bool) -> dict[str, Any]:
        samples = []
        for i in range(repeat):
            storage = work / f"podman-{pair}-{name}-{i}"
            try:
                proxy.take()
                if with_v1:
                    podman_pull(f"{src}:v1", storage, partial, log)
                proxy.take()
                seconds, reported = podman_pull(f"{src}:v2", storage, partial, log)
                records = proxy.take()
            finally:
                corpus._remove_tree(storage)
            samples.append(round(seconds, 3))
        new_traffic = _blob_traffic(records, new)
        return {
            "seconds": statistics.median(samples),
            "seconds_samples": samples,
            "new_layer_bytes_fetched": new_traffic["bytes"],
            "new_layer_traffic": new_traffic,
            "all_v2_blob_traffic": _blob_traffic(records, every_v2),
            "response_body_bytes_total": sum(r["body_bytes"] for r in records),
            "podman_reported": reported,
            "requests": _summarize_requests(records),
        }

    partial = pulls("partial", partial=True, with_v1=True)
    full_fresh = pulls("full-fresh", partial=False, with_v1=False)
    full_after_v1 = pulls("full-after-v1", partial=False, with_v1=True)
    t = partial["new_layer_traffic"]
    return {
        "pair": pair,
        "layouts": [str(p) for p in layouts],
        "v2_layers": [d["digest"] for d in manifests[1]["layers"]],
        "v2_layers_not_in_v1": [d["digest"] for d in v2_layers],
        "v2_pull_seconds": partial["seconds"],
        "v2_layer_bytes_fetched": partial["new_layer_bytes_fetched"],
        "v2_blob_size": sum(d["size"] for d in v2_layers),
        "v2_fetched_fraction": round(
            partial["new_layer_bytes_fetched"] / max(1, sum(d["size"] for d in v2_layers)), 4
        ),
        "podman_reported": partial["podman_reported"],
        "ranges_requests": t["range_requests"],
        "ranges": t["ranges"],
        "partial": partial,
        "full_pull_fresh": full_fresh,
        "full_pull_after_v1": full_after_v1,
    }


def measure(
    pairs: tuple[str, ...] = ("skopeo", "buildah"), keep: Path | None = None, repeat: int = 1
) -> dict[str, Any]:
    """Run the whole measurement (see the module docstring) and return the results."""
    if os.geteuid() != 0:
        raise corpus.CorpusError("needs root (private mount namespaces, podman storage)")
    for pair in pairs:
        _pair_layouts(pair)  # build the corpus first, outside the timed parts
    work = Path(tempfile.mkdtemp(prefix="podman-partial-", dir=keep))
    log = work / "commands.log"
    results: dict[str, Any] = {
        "podman_version": corpus._package_version("podman"),
        "skopeo_version": corpus._package_version("skopeo"),
        "registry_version": corpus._package_version("docker-registry"),
        "notes": {
            "bytes_fetched": "response body bytes the counting proxy passed on for GETs of the "
            "v2 layer blobs not in v1 (TOC range + data ranges; multipart framing included)",
            "chunked_missing": "containers/storage debug log 'Missing N bytes out of M': "
            "uncompressed file bytes it had to fetch, out of all file bytes in the layer",
            "progress_skipped": "the last 'skipped:' note of podman's progress bar, per blob",
            "seconds": "wall time of the `podman pull` process of v2 (startup included)",
        },
        "pairs": {},
    }
    try:
        with registry(work / "registry") as port, CountingProxy(port) as proxy:
            results["registry"] = f"127.0.0.1:{port} (via counting proxy 127.0.0.1:{proxy.port})"
            for pair in pairs:
                results["pairs"][pair] = measure_pair(pair, port, proxy, work, log, repeat)
        return results
    finally:
        if keep is None:
            corpus._remove_tree(work)
        else:
            results["workdir"] = str(work)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", default="skopeo,buildah", help="comma list: skopeo, buildah")
    ap.add_argument("--keep", type=Path, help="keep the work dir (logs) under this directory")
    ap.add_argument("--requests", action="store_true", help="keep per-request logs in the JSON")
    ap.add_argument("--repeat", type=int, default=1, help="pulls per figure (median seconds)")
    ap.add_argument("-o", "--output", type=Path, help="also write the JSON here")
    args = ap.parse_args(argv)
    try:
        res = measure(tuple(p for p in args.pairs.split(",") if p), args.keep, args.repeat)
    except corpus.CorpusError as exc:
        print(f"podman_partial: error: {exc}", file=sys.stderr)
        return 1
    if not args.requests:
        for pair in res["pairs"].values():
            for k in ("partial", "full_pull_fresh", "full_pull_after_v1"):
                pair[k].pop("requests", None)
    text = json.dumps(res, indent=2)
    print(text)
    if args.output:
        args.output.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
