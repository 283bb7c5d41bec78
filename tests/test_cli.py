"""The CLI as a user runs it: every command, --json, stdin, and the documented exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import gnu_tar
from test_roundtrip import build_tree


def cli(store: Path, *args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "LAYERSTORE_STORE": str(store)}
    return subprocess.run(
        [sys.executable, "-m", "layerstore", *args],
        input=stdin,
        capture_output=True,
        env=env,
        timeout=300,
    )


def js(p: subprocess.CompletedProcess) -> object:
    assert p.returncode == 0, p.stderr.decode()
    return json.loads(p.stdout)


@pytest.fixture(scope="module")
def tarball(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("cli")
    return gnu_tar(build_tree(base / "src"), base / "layer.tar")


def test_every_command(tmp_path: Path, tarball: Path) -> None:
    st = tmp_path / "store"  # chosen by the environment variable, as documented
    assert cli(st, "init").returncode == 0
    imp = js(cli(st, "--json", "import", "-", stdin=tarball.read_bytes()))
    assert imp["compression"] == "none" and not imp["already_present"]
    short = imp["diff_id"][7:19]
    assert [li["diff_id"] for li in js(cli(st, "--json", "ls"))] == [imp["diff_id"]]
    show = js(cli(st, "--json", "show", short, "--entries"))
    assert {e["path"] for e in show["entries_list"]} >= {".", "etc/hostname", "usr/bin/su"}
    human = cli(st, "show", short).stdout.decode()
    assert imp["diff_id"] in human
    out = tmp_path / "exported.tar"
    js(cli(st, "--json", "export", short, "-o", str(out)))
    assert out.read_bytes() == tarball.read_bytes()
    mat = js(cli(st, "--json", "materialize", short, str(tmp_path / "m")))
    assert mat["files"] == imp["files"]
    du = js(cli(st, "--json", "du"))
    assert du["layers"] == 1 and du["logical_bytes"] == imp["logical_bytes"]
    assert js(cli(st, "--json", "stats")) == du
    assert js(cli(st, "--json", "fsck"))["exit_code"] == 0
    dry = js(cli(st, "--json", "gc", "--dry-run"))
    assert dry["objects_freed"] == 0
    js(cli(st, "--json", "rm", short))
    assert js(cli(st, "--json", "ls")) == []
    gc = js(cli(st, "--json", "gc"))
    assert gc["objects_freed"] == du["objects"]


@pytest.mark.parametrize(
    "args, stdin, code, words",
    [
        (["import", "-"], b"this is not a tar at all" * 50, 2, "tar"),
        (["show", "abcdef"], None, 4, "no layer"),
        (["show", "not-hex"], None, 2, "not a layer id"),
        (["materialize", "abcdef", "/nonexistent/dir/x"], None, 4, "no layer"),
    ],
)
def test_exit_codes(tmp_path: Path, args, stdin, code, words) -> None:
    st = tmp_path / "store"
    cli(st, "init")
    p = cli(st, *args, stdin=stdin)
    assert p.returncode == code, p.stderr.decode()
    assert words in p.stderr.decode()
    assert "Traceback" not in p.stderr.decode()


def test_missing_store_and_bad_destination(tmp_path: Path, tarball: Path) -> None:
    p = cli(tmp_path / "nothing", "ls")
    assert p.returncode == 3 and b"layerstore init" in p.stderr
    st = tmp_path / "store"
    imp = js(cli(st, "--json", "import", str(tarball)))
    (tmp_path / "taken").mkdir()
    p = cli(st, "materialize", imp["diff_id"], str(tmp_path / "taken"))
    assert p.returncode == 6 and b"exists" in p.stderr


def test_zstd_chunked_export_and_partial_import(tmp_path: Path, tarball: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    imp = js(cli(a, "--json", "import", str(tarball)))
    blob = tmp_path / "layer.zst"
    out = js(cli(a, "--json", "export", imp["diff_id"], "--zstd-chunked", "-o", str(blob)))
    assert out["diff_id"] == imp["diff_id"] and blob.stat().st_size == out["size"]
    assert any(k.endswith("manifest-checksum") for k in out["annotations"])
    r = js(cli(b, "--json", "import", "--partial", str(blob)))
    assert r["diff_id"] == imp["diff_id"] and r["manifest"] == imp["manifest"]
    assert r["partial"]["variant"] == "new" and r["partial"]["toc_verified"] is False
    human = cli(b, "import", "--partial", str(blob))
    assert human.returncode == 0 and b"skipped" in human.stdout, human.stdout
    # not a zstd:chunked blob: a clear error and exit code 2
    bad = cli(b, "import", "--partial", str(tarball))
    assert bad.returncode == 2 and b"no zstd:chunked footer" in bad.stderr


def test_the_readme_main_job_runs(tmp_path: Path) -> None:
    """`./dev demo` runs tools/demo.py: the README's main job, end to end, must succeed."""
    demo = Path(__file__).parent.parent / "tools" / "demo.py"
    p = subprocess.run(
        [sys.executable, str(demo), "--store", str(tmp_path / "store")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "verified against the source: OK" in p.stdout
    assert "skipped 9" in p.stdout  # the partial pull read almost nothing
    assert "0 problems" in p.stdout
