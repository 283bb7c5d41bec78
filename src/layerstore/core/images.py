"""Image records: a name, the manifest and config documents, and the layers they list.

An image holds one *image reference* on each of its layers (``images`` in the layer record); a
layer imported only for images (``standalone`` false) goes when the last image using it goes.
The layer side of that -- drop now or defer to a live reader -- is
:func:`layerstore.core.protocol.drop_or_defer`.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import time
from typing import Any

import lmdb

from ..errors import ConcurrencyError, InvalidInputError, LayerstoreError, NotFoundError
from . import layers, protocol
from .fsutil import write_json_durable
from .index import layer_unproved
from .repo import Repo


def check_image_name(name: str) -> None:
    """An image name is an LMDB key and a tag: 1-255 bytes of UTF-8, no NUL.  Checked before
    an image import reads any layer, so a bad name cannot cost a whole import."""
    try:
        raw = name.encode()
    except UnicodeEncodeError:
        raw = b""
    if not raw or len(raw) > 255 or "\x00" in name:
        raise InvalidInputError(f"bad image name {name!r} (1-255 bytes of UTF-8, no NUL)")


def _unproved_of(repo: Repo, txn: lmdb.Transaction, diff_ids: list[str]) -> list[str]:
    """The DiffIDs (hex) among an image's layers that rest on no proof (TOC-only imports):
    computed at each query, so a later proving import clears them."""
    out = []
    for h in diff_ids:
        rec = repo.index.get_layer(txn, bytes.fromhex(h))
        if rec is not None and layer_unproved(rec):
            out.append(h)
    return out


def list_images(repo: Repo) -> list[dict[str, Any]]:
    """Every image; ``unproved`` lists the layers whose DiffID nothing verified."""
    with repo.index.read() as txn:
        out = [
            {
                "name": n,
                **{k: v for k, v in im.items() if k not in ("manifest_json", "config_json")},
                "unproved": _unproved_of(repo, txn, im["layers"]),
            }
            for n, im in repo.index.iter_images(txn)
        ]
    return sorted(out, key=lambda im: im["name"])


def get_image(repo: Repo, name: str) -> dict[str, Any]:
    with repo.index.read() as txn:
        im = repo.index.get_image(txn, name)
        if im is None:
            raise NotFoundError(f"no image {name!r}; `layerstore images` lists them")
        im["unproved"] = _unproved_of(repo, txn, im["layers"])
    return {"name": name, **im}


def commit_image(
    repo: Repo, name: str, manifest: bytes, config: bytes, diff_ids: list[str], media_type: str
) -> None:
    """One transaction: the image record, +1 image reference per layer it lists (a moved tag
    releases what the old image held)."""
    check_image_name(name)
    idx = repo.index
    with idx.write() as txn:
        old = idx.get_image(txn, name)
        for d in diff_ids:
            rec = idx.get_layer(txn, bytes.fromhex(d[7:]))
            if rec is None or rec.get("state") != "live":
                raise ConcurrencyError(f"layer {d} was removed during the import; retry")
            rec["images"] = rec.get("images", 0) + 1
            idx.put_layer(txn, bytes.fromhex(d[7:]), rec)
        record = {
            "manifest_digest": "sha256:" + hashlib.sha256(manifest).hexdigest(),
            "config_digest": "sha256:" + hashlib.sha256(config).hexdigest(),
            "media_type": media_type,
            "layers": [d[7:] for d in diff_ids],
            "created": time.time(),
            "manifest_json": base64.b64encode(manifest).decode(),
            "config_json": base64.b64encode(config).decode(),
        }
        idx.put_image(txn, name, record)
        if old is not None:  # a tag moved: release what the old image held
            for h in old["layers"]:
                _release_in_txn(repo, txn, bytes.fromhex(h))
    write_backup(repo, name, record)
    layers.remove_dropped_backups(repo)


# -- backups: derived copies of image records, for rebuilding a lost index --------------------
# Image names hold "/" and ":", so a backup is named by the sha256 of the name and carries the
# name inside.  Written after the index commit, like layer backups (the index is
# authoritative; fsck reconciles: image-backup-missing / image-backup-extra).
def backup_path(repo: Repo, name: str) -> str:
    return os.path.join(repo.images_dir, hashlib.sha256(name.encode()).hexdigest() + ".json")


def write_backup(repo: Repo, name: str, record: dict[str, Any]) -> None:
    os.makedirs(repo.images_dir, exist_ok=True)  # a store made before image backups existed
    write_json_durable(backup_path(repo, name), {"name": name, **record}, repo.lease.id.hex())


def remove_backup(repo: Repo, name: str) -> None:
    """After the removal committed; re-checked, so a name re-created meanwhile keeps it."""
    with repo.index.read() as txn:
        if repo.index.get_image(txn, name) is not None:
            return
    with contextlib.suppress(FileNotFoundError):
        os.unlink(backup_path(repo, name))


def read_backups(repo: Repo) -> list[tuple[str, dict[str, Any]]]:
    """Every readable image backup as (name, record), sorted by name; a backup that is not
    valid JSON of an image record, or whose file name is not its name's, is skipped (fsck
    reports it as image-backup-extra)."""
    out: list[tuple[str, dict[str, Any]]] = []
    try:
        names = os.listdir(repo.images_dir)
    except FileNotFoundError:
        return out
    for fn in names:
        if not fn.endswith(".json"):
            continue
        try:
            with open(os.path.join(repo.images_dir, fn)) as f:
                rec = json.load(f)
            name = rec.pop("name")
            if not isinstance(name, str) or os.path.basename(backup_path(repo, name)) != fn:
                continue
            if not isinstance(rec.get("layers"), list):
                continue
        except (OSError, ValueError, KeyError, AttributeError, TypeError):
            continue
        out.append((name, rec))
    return sorted(out, key=lambda t: t[0])


def _release_in_txn(repo: Repo, txn: lmdb.Transaction, diff_id: bytes) -> None:
    rec = repo.index.get_layer(txn, diff_id)
    if rec is None:
        return
    rec["images"] = max(0, rec.get("images", 0) - 1)
    if rec["images"] == 0 and not rec.get("standalone", True):
        if rec.get("state") == "live":
            protocol.drop_or_defer(repo, txn, diff_id, rec)
    else:
        repo.index.put_layer(txn, diff_id, rec)


def rollback_layers(repo: Repo, created: list[str]) -> None:
    """A failed image import removes the layers it created: nothing half-imported stays.

    Only layers that nothing holds (no image, not imported directly) are dropped; their
    objects are then gc-able garbage.  Errors are swallowed: the import's own error is the
    one to report, and what could not be dropped is fsck-clean garbage."""
    for text in created:
        diff_id = bytes.fromhex(text[7:])
        try:
            with repo.index.write() as txn:
                rec = repo.index.get_layer(txn, diff_id)
                if rec is not None and rec.get("images", 0) == 0 and not rec.get("standalone"):
                    protocol.drop_or_defer(repo, txn, diff_id, rec)
            layers.remove_dropped_backups(repo)
        except LayerstoreError:
            pass


def remove_image(repo: Repo, name: str) -> int:
    """Drop an image's record and its references; layers no other image uses (and not
    imported directly) go with it.  Returns how many layers went."""
    idx = repo.index
    with idx.write() as txn:
        im = idx.get_image(txn, name)
        if im is None:
            raise NotFoundError(f"no image {name!r}; `layerstore images` lists them")
        idx.delete_image(txn, name)
        before = {k for k, _ in idx.iter_layers(txn)}
        for h in im["layers"]:
            _release_in_txn(repo, txn, bytes.fromhex(h))
        after = {k for k, r in idx.iter_layers(txn) if r.get("state") == "live"}
    remove_backup(repo, name)
    layers.remove_dropped_backups(repo)
    return len(before - after)


def tag(repo: Repo, src: str, dst: str) -> None:
    """Give image ``src`` another name ``dst`` (both then reference its layers)."""
    im = get_image(repo, src)
    commit_image(
        repo,
        dst,
        base64.b64decode(im["manifest_json"]),
        base64.b64decode(im["config_json"]),
        ["sha256:" + h for h in im["layers"]],
        im.get("media_type", ""),
    )
