"""The EROFS writer (layerstore.erofs): images of generated trees, read back three ways.

* by the real kernel: the image is mounted (file-backed EROFS, as root) and the mounted tree is
  compared with the input -- modes, owners, mtimes (ns), xattrs via os.getxattr, symlink
  targets, device numbers, hardlink identity (st_ino), file contents;
* by ``fsck.erofs`` (erofs-utils, an independent implementation) -- it must accept every image;
* by a small reader in the tests (tests/erofs_reader.py), without root: round trips and
  hypothesis property tests over random trees.
"""

from __future__ import annotations

import os
import random
import shutil
import stat
import subprocess
from pathlib import Path

import erofs_reader
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from layerstore.erofs import format as F
from layerstore.erofs.tree import Device, Dir, Fifo, File, Inode, Socket, Symlink, whiteout
from layerstore.erofs.writer import ImageError, write_image

IS_ROOT = os.geteuid() == 0
T0 = 1_700_000_000_000_000_000


# -- what a tree should look like, from the input -----------------------------------------------
def expected(root: Dir) -> tuple[dict[bytes, tuple], list[list[bytes]]]:
    """path -> (st_mode, uid, gid, mtime_ns, nlink, content, xattrs); hardlink groups."""
    out: dict[bytes, tuple] = {}
    links: dict[int, list[bytes]] = {}
    counts: dict[int, int] = {}
    stack: list[tuple[bytes, Dir]] = [(b".", root)]
    order: list[tuple[bytes, Inode]] = [(b".", root)]
    while stack:
        path, d = stack.pop()
        for name, child in d.entries.items():
            p = name if path == b"." else path + b"/" + name
            order.append((p, child))
            if isinstance(child, Dir):
                stack.append((p, child))
            else:
                counts[id(child)] = counts.get(id(child), 0) + 1
                links.setdefault(id(child), []).append(p)
    for p, i in order:
        if isinstance(i, Dir):
            nlink = 2 + sum(isinstance(c, Dir) for c in i.entries.values())
            content: object = None
        else:
            nlink = counts[id(i)]
            if isinstance(i, File):
                content = i.data if i.data is not None else ("hole", i.size)
            elif isinstance(i, Symlink):
                content = i.target
            elif isinstance(i, Device):
                content = (i.major, i.minor)
            else:
                content = None
        xattrs = dict(i.xattrs)
        if isinstance(i, File) and i.data is None and i.size and i.redirect is not None:
            xattrs[b"trusted.overlay.metacopy"] = F_metacopy(i.verity)
            xattrs[b"trusted.overlay.redirect"] = b"/" + i.redirect.lstrip(b"/")
        out[p] = (stat.S_IFMT(i.st_mode), i.mode, i.uid, i.gid, i.mtime_ns, nlink, content, xattrs)
    groups = sorted(sorted(v) for v in links.values() if len(v) > 1)
    return out, groups


def F_metacopy(verity: bytes | None) -> bytes:
    return b"" if verity is None else bytes((0, 36, 0, 1)) + verity


def from_reader(raw: bytes) -> tuple[dict[bytes, tuple], list[list[bytes]]]:
    out: dict[bytes, tuple] = {}
    by_nid: dict[int, list[bytes]] = {}
    for p, e in erofs_reader.read(raw).items():
        kind = stat.S_IFMT(e.mode)
        if kind == stat.S_IFREG:
            content: object = e.data if not e.sparse else ("hole", e.size)
            by_nid.setdefault(e.nid, []).append(p)
        elif kind == stat.S_IFLNK:
            content = e.target
            by_nid.setdefault(e.nid, []).append(p)
        elif kind in (stat.S_IFCHR, stat.S_IFBLK):
            content = e.rdev
            by_nid.setdefault(e.nid, []).append(p)
        else:
            content = None
            if kind != stat.S_IFDIR:
                by_nid.setdefault(e.nid, []).append(p)
        out[p] = (kind, stat.S_IMODE(e.mode), e.uid, e.gid, e.mtime_ns, e.nlink, content, e.xattrs)
    return out, sorted(sorted(v) for v in by_nid.values() if len(v) > 1)


def from_mount(mnt: str, holes: set[bytes]) -> tuple[dict[bytes, tuple], list[list[bytes]]]:
    """The mounted tree; ``holes``: paths of external files (read as zeros, checked at their
    ends only: they may be terabytes)."""
    out: dict[bytes, tuple] = {}
    by_ino: dict[tuple[int, int], list[bytes]] = {}
    root = os.fsencode(mnt)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [b".", *dirnames, *filenames] if dirpath == root else [*dirnames, *filenames]:
            full = os.path.normpath(os.path.join(dirpath, name))
            rel = os.path.relpath(full, root)
            st_ = os.lstat(full)
            kind = stat.S_IFMT(st_.st_mode)
            content: object = None
            if kind == stat.S_IFREG and rel in holes:
                with open(full, "rb") as f:
                    head = f.read(65536)
                    f.seek(max(0, st_.st_size - 65536))
                    tail = f.read()
                    assert head.count(0) == len(head) and tail.count(0) == len(tail)
                content = ("hole", st_.st_size)
            elif kind == stat.S_IFREG:
                with open(full, "rb") as f:
                    content = f.read()
            elif kind == stat.S_IFLNK:
                content = os.readlink(full)
            elif kind in (stat.S_IFCHR, stat.S_IFBLK):
                content = (os.major(st_.st_rdev), os.minor(st_.st_rdev))
            if kind != stat.S_IFDIR:
                by_ino.setdefault((st_.st_dev, st_.st_ino), []).append(rel)
            xattrs = {}
            for n in os.listxattr(full, follow_symlinks=False):
                try:
                    xattrs[os.fsencode(n)] = os.getxattr(full, n, follow_symlinks=False)
                except OSError:  # listed but not readable: user.* on a special file
                    assert not (stat.S_ISREG(kind) or stat.S_ISDIR(kind)) and n.startswith("user.")
            out[rel] = (
                kind,
                stat.S_IMODE(st_.st_mode),
                st_.st_uid,
                st_.st_gid,
                st_.st_mtime_ns,
                st_.st_nlink,
                content,
                xattrs,
            )
    return out, sorted(sorted(v) for v in by_ino.values() if len(v) > 1)


# -- generated trees -----------------------------------------------------------------------------
def random_tree(seed: int, n: int = 400) -> Dir:
    """A tree with every inode type, hardlinks, shared and inline xattrs, odd owners/times."""
    rnd = random.Random(seed)
    root = Dir(0o755, mtime_ns=T0)
    dirs = [root]
    files: list[Inode] = []
    names = ["a", "bin", "lib", "x" * 255, "é-ü", "-dash", "+plus", "..dots", "sp ace", "z"]

    def meta() -> dict:
        return {
            "uid": rnd.choice([0, 0, 1000, 65534, 70000, 2**32 - 2]),
            "gid": rnd.choice([0, 0, 100, 65535, 123456]),
            "mtime_ns": rnd.choice([T0, T0, T0 + rnd.randrange(10**12), -(10**18) - 7, 0]),
            "xattrs": rnd.choice(
                [
                    {},
                    {},
                    {b"user.shared": b"same"},
                    {b"user.k%d" % rnd.randrange(5): rnd.randbytes(rnd.randrange(40))},
                    {b"security.capability": b"\x01\x00\x00\x02" + bytes(16)},
                    {b"trusted.t": b"v", b"user.a": b"", b"user.shared": b"same"},
                ]
            ),
        }

    for i in range(n):
        parent = rnd.choice(dirs)
        name = f"{rnd.choice(names)[:200]}-{i}"
        kind = rnd.choices(
            ["dir", "file", "ext", "link", "sym", "chr", "blk", "fifo", "sock", "wh"],
            [10, 30, 15, 6, 8, 2, 2, 2, 1, 2],
        )[0]
        m = meta()
        if kind == "dir":
            dirs.append(parent.add(name, Dir(rnd.choice([0o755, 0o700, 0o1777, 0o2755]), **m)))
        elif kind == "file":
            size = rnd.choice([0, 1, 64, 100, 2047, 2049, 4096, 5000, 12000])
            data = rnd.randbytes(size)
            files.append(parent.add(name, File(rnd.choice([0o644, 0o4755, 0o600]), data=data, **m)))
        elif kind == "ext":
            size = rnd.choice([1, 4096, 10**6, 5 * 2**30])
            red = f"{rnd.randrange(256):02x}/{rnd.randbytes(32).hex()}".encode()
            ver = rnd.choice([None, rnd.randbytes(32)])
            parent.add(name, File(0o644, size=size, redirect=red, verity=ver, **m))
        elif kind == "link" and files:
            parent.add(name, rnd.choice(files))
        elif kind == "sym":
            parent.add(name, Symlink(rnd.choice(["t", "../" * 30 + "x", "y" * 4095]), **m))
        elif kind == "chr":
            parent.add(name, Device(rnd.randrange(256), rnd.randrange(1 << 20), mode=0o620, **m))
        elif kind == "blk":
            parent.add(name, Device(8, rnd.randrange(300), block=True, **m))
        elif kind == "fifo":
            parent.add(name, Fifo(0o644, **m))
        elif kind == "sock":
            parent.add(name, Socket(0o755, **m))
        elif kind == "wh":
            parent.add(name, whiteout(**m))
    return root


def _mount(img: Path, mnt: Path) -> None:
    mnt.mkdir(exist_ok=True)
    r = subprocess.run(
        ["mount", "-t", "erofs", "-o", "ro", str(img), str(mnt)], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr


def _fsck(img: Path, tmp: Path) -> None:
    if shutil.which("fsck.erofs") is None:
        if IS_ROOT:
            raise AssertionError("fsck.erofs is missing (./dev installs erofs-utils)")
        pytest.skip("REAL-TOOL TEST SKIPPED: fsck.erofs (erofs-utils) is not installed")
    out = tmp / "fsck-extract"
    r = subprocess.run(["fsck.erofs", f"--extract={out}", str(img)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    shutil.rmtree(out, ignore_errors=True)


needs_root = pytest.mark.skipif(not IS_ROOT, reason="mounting EROFS needs root")


def _check_mounted(root: Dir, tmp_path: Path, name: str = "img") -> bytes:
    raw = write_image(root, composefs=False)
    img = tmp_path / f"{name}.erofs"
    img.write_bytes(raw)
    _fsck(img, tmp_path)
    mnt = tmp_path / f"{name}-mnt"
    _mount(img, mnt)
    try:
        want, want_links = expected(root)
        holes = {p for p, w in want.items() if isinstance(w[6], tuple) and w[6][0] == "hole"}
        got, got_links = from_mount(str(mnt), holes)
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    for p, w in want.items():
        if w[0] not in (stat.S_IFREG, stat.S_IFDIR):
            # the VFS shows user.* xattrs only on files and directories (xattr_permission)
            want[p] = (*w[:7], {k: v for k, v in w[7].items() if not k.startswith(b"user.")})
    assert sorted(got) == sorted(want)
    for p in want:
        assert got[p] == want[p], p
    assert got_links == want_links
    return raw


# -- the kernel reads what we wrote -------------------------------------------------------------
@needs_root
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_generated_tree_mounts_as_written(tmp_path: Path, seed: int) -> None:
    _check_mounted(random_tree(seed), tmp_path)


@needs_root
def test_large_directory_spans_many_dirent_blocks(tmp_path: Path) -> None:
    root = Dir(0o755, mtime_ns=T0)
    d = root.add("big", Dir(0o755, mtime_ns=T0))
    assert isinstance(d, Dir)
    for i in range(6000):  # ~60 dirent blocks; names of every length sort across blocks
        d.add(f"{i % 97:02d}-{'n' * (i % 200)}-{i}", File(0o644, data=b"%d" % i, mtime_ns=T0))
    raw = _check_mounted(root, tmp_path)
    ent = erofs_reader.read(raw)[b"big"]
    assert ent.size > 50 * 4096  # really many blocks, looked up by the kernel's binary search
    mnt = tmp_path / "look"
    (tmp_path / "img.erofs").write_bytes(raw)
    _mount(tmp_path / "img.erofs", mnt)
    try:
        for i in (0, 1, 2999, 5999):
            name = f"{i % 97:02d}-{'n' * (i % 200)}-{i}"
            assert (mnt / "big" / name).read_bytes() == b"%d" % i
        assert not (mnt / "big" / "absent").exists()
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


@needs_root
def test_deep_tree_long_names_and_long_symlinks(tmp_path: Path) -> None:
    root = Dir(0o755, mtime_ns=T0)
    d = root
    for i in range(120):  # deeper than any real image; PATH_MAX is the kernel walk's limit
        d = d.add(f"{i:03d}", Dir(0o755, mtime_ns=T0 + i))  # type: ignore[assignment]
    d.add("n" * 255, File(0o644, data=b"deep"))
    root.add("s" * 255, Symlink("t" * 4095))
    root.add("m" * 254, Symlink("/" + "u" * 2000))
    _check_mounted(root, tmp_path)


@needs_root
def test_many_xattrs_shared_and_inline(tmp_path: Path) -> None:
    root = Dir(0o755, mtime_ns=T0, xattrs={b"user.root": b"r"})
    shared = {b"user.s%02d" % i: b"shared value %d" % i for i in range(40)}
    for i in range(50):
        own = {b"user.own%03d" % j: os.urandom(j) for j in range(60)}
        own[b"trusted.big"] = os.urandom(3000)
        own[b"security.selinux"] = b"system_u:object_r:etc_t:s0\0"
        root.add(f"f{i}", File(0o644, data=b"x", xattrs={**shared, **own}))
    raw = _check_mounted(root, tmp_path)
    img = erofs_reader.Image(raw)
    # the 40 shared pairs (and the selinux label) are stored once, not 50 times
    assert img.xattr_blk > 0
    assert raw.count(b"shared value 7") == 1


@needs_root
def test_inline_data_across_sizes(tmp_path: Path) -> None:
    root = Dir(0o755, mtime_ns=T0)
    for size in [0, 1, 63, 64, 65, 2047, 2048, 2049, 4095, 4096, 4097, 8192, 10_000, 100_000]:
        root.add(f"f{size}", File(0o644, data=os.urandom(size), mtime_ns=T0 + size))
    root.add("ext", File(0o644, size=6 * 2**40, redirect=b"ab/cd"))  # > 4 GiB: extended inode
    _check_mounted(root, tmp_path)


def test_escaped_composefs_layout(tmp_path: Path) -> None:
    """composefs=True: overlay xattrs escaped, whiteouts escaped, root opaque + 00..ff."""
    root = Dir(0o755, mtime_ns=T0)
    sub = root.add("d", Dir(0o755, mtime_ns=T0))
    assert isinstance(sub, Dir)
    sub.add("gone", whiteout(mtime_ns=T0))
    sub.add("f", File(0o644, data=b"", xattrs={b"trusted.overlay.opaque": b"y"}))
    root.add("ab", File(0o644, size=5, redirect=b"ab/cd"))  # a root name that is also a fan-out
    ls = erofs_reader.read(write_image(root))
    assert ls[b"."].xattrs[b"trusted.overlay.opaque"] == b"y"
    fans = {p for p in ls if stat.S_ISCHR(ls[p].mode) and ls[p].rdev == (0, 0)}
    assert fans == {b"%02x" % i for i in range(256)} - {b"ab"}
    assert stat.S_ISREG(ls[b"ab"].mode)
    assert stat.S_ISREG(ls[b"d/gone"].mode)  # escaped: overlayfs must not apply it
    assert ls[b"d/gone"].xattrs == {
        b"trusted.overlay.overlay.whiteout": b"",
        b"user.overlay.whiteout": b"",
    }
    assert ls[b"d"].xattrs[b"trusted.overlay.overlay.whiteouts"] == b""
    assert ls[b"d"].xattrs[b"trusted.overlay.overlay.opaque"] == b"x"
    assert ls[b"d/f"].xattrs == {b"trusted.overlay.overlay.opaque": b"y"}
    hdr = erofs_reader.Image(write_image(root)).header
    assert hdr == (F.COMPOSEFS_MAGIC, 1, 0, 1)


# -- fsck.erofs, determinism, refusals ------------------------------------------------------------
@pytest.mark.parametrize("seed", [4, 5])
def test_fsck_erofs_accepts_every_image(tmp_path: Path, seed: int) -> None:
    for composefs in (False, True):
        img = tmp_path / f"{seed}-{composefs}.erofs"
        img.write_bytes(write_image(random_tree(seed), composefs=composefs))
        _fsck(img, tmp_path)


def test_same_tree_same_bytes() -> None:
    a = write_image(random_tree(7))
    assert write_image(random_tree(7)) == a
    # insertion order of entries and xattrs does not matter
    t1 = Dir(0o755)
    t1.add("b", File(0o644, data=b"1", xattrs={b"user.y": b"1", b"user.x": b"2"}))
    t1.add("a", Dir(0o700))
    t2 = Dir(0o755)
    t2.add("a", Dir(0o700))
    t2.add("b", File(0o644, data=b"1", xattrs={b"user.x": b"2", b"user.y": b"1"}))
    assert write_image(t1) == write_image(t2)
    assert write_image(random_tree(8)) != a


@pytest.mark.parametrize(
    "build",
    [
        lambda r: r.add("a/b", File()),
        lambda r: r.add("n" * 256, File()),
        lambda r: r.add("s", Symlink("")),
        lambda r: r.add("s", Symlink("x" * 4096)),
        lambda r: r.add("x", File(xattrs={b"user.v": bytes(65536)})),
        lambda r: r.add("x", File(xattrs={b"user." + b"n" * 256: b""})),
        lambda r: r.add("d", r),
    ],
)
def test_trees_the_format_cannot_hold_are_refused(build) -> None:
    root = Dir()
    build(root)
    with pytest.raises(ImageError):
        write_image(root)


# -- round trips without root, and properties over random trees ---------------------------------
@pytest.mark.parametrize("seed", range(10, 16))
def test_reader_round_trip(seed: int) -> None:
    root = random_tree(seed, n=300)
    got, got_links = from_reader(write_image(root, composefs=False))
    want, want_links = expected(root)
    assert got == want
    assert got_links == want_links


_name = st.binary(min_size=1, max_size=40).filter(lambda b: b"/" not in b and b"\0" not in b)
_name = _name.filter(lambda b: b not in (b".", b".."))
_meta = st.fixed_dictionaries(
    {
        "uid": st.integers(0, 2**32 - 1),
        "gid": st.integers(0, 2**32 - 1),
        "mtime_ns": st.sampled_from([0, T0]) | st.integers(-(2**62), 2**62),
        "xattrs": st.dictionaries(
            st.sampled_from([b"user.", b"trusted.", b"security.", b"user.a", b"user.same"]).map(
                lambda p: p + b"k"
            )
            | st.just(b"user.same"),
            st.binary(max_size=64) | st.just(b"v"),
            max_size=4,
        ),
    }
)
_leaf = st.one_of(
    st.builds(
        lambda d, m, mode: File(mode, data=d, **m),
        st.binary(max_size=5000),
        _meta,
        st.integers(0, 0o7777),
    ),
    st.builds(
        lambda s, m: File(0o644, size=s, redirect=b"aa/" + b"b" * 62, **m),
        st.integers(1, 2**45),
        _meta,
    ),
    st.builds(lambda t, m: Symlink(t, **m), _name, _meta),
    st.builds(
        lambda a, b, blk, m: Device(a, b, block=blk, **m),
        st.integers(0, 0xFFF),
        st.integers(0, 0xFFFFF),
        st.booleans(),
        _meta,
    ),
    st.builds(lambda m: Fifo(0o644, **m), _meta),
    st.builds(lambda m: Socket(0o644, **m), _meta),
)


@st.composite
def trees(draw: st.DrawFn) -> Dir:
    root = Dir(0o755, **draw(_meta))
    dirs = [root]
    leaves: list[Inode] = []
    for _ in range(draw(st.integers(0, 60))):
        parent = draw(st.sampled_from(dirs))
        name = draw(_name)
        what = draw(st.sampled_from(["dir", "leaf", "leaf", "link"]))
        if what == "dir":
            d = Dir(draw(st.integers(0, 0o7777)), **draw(_meta))
            if name not in parent.entries:
                dirs.append(d)
            parent.entries[name] = d
        elif what == "link" and leaves:
            parent.entries[name] = draw(st.sampled_from(leaves))
        else:
            leaf = draw(_leaf)
            leaves.append(leaf)
            parent.entries[name] = leaf
    return root


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(trees())
def test_property_round_trip(root: Dir) -> None:
    raw = write_image(root, composefs=False)
    got, got_links = from_reader(raw)
    want, want_links = expected(root)
    assert got == want
    assert got_links == want_links
    assert write_image(root, composefs=False) == raw
    assert len(raw) % 4096 == 0


@settings(max_examples=60, deadline=None)
@given(trees())
def test_property_composefs_adds_only_what_composefs_adds(root: Dir) -> None:
    listing = erofs_reader.read(write_image(root))
    assert listing[b"."].xattrs[b"trusted.overlay.opaque"] == b"y"
    for p, e in listing.items():
        for name in e.xattrs:
            # every user trusted.overlay.* xattr is escaped; only ours are not
            if name.startswith(b"trusted.overlay.") and not name.startswith(
                b"trusted.overlay.overlay."
            ):
                assert name in (
                    b"trusted.overlay.opaque",
                    b"trusted.overlay.metacopy",
                    b"trusted.overlay.redirect",
                ), (p, name)
