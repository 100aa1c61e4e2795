"""Output layout, hashing and atomic writes.

Nothing reaches a final path except by ``os.replace`` of a finished temporary file or folder in
the same directory, so an interrupted run never leaves a half-written file that looks finished.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TMP_PREFIX = ".tmp-"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: the form that ids are hashed from."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def normal_permissions(path: Path) -> None:
    """Give ``path`` the mode a plain ``open()`` / ``mkdir()`` would under the process umask
    (0644 / 0755 under 022); temporary files and folders are created 0600 / 0700. A folder's
    contents are set too, so a staged folder renamed into place is readable like any other."""
    mask = _umask()
    path = Path(path)
    if path.is_dir():
        for p in [path, *path.rglob("*")]:
            p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)
    else:
        path.chmod(0o666 & ~mask)


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; rename it over ``final`` only on success."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX + final.name + ".", dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        normal_permissions(tmp_path)
        os.replace(tmp_path, final)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``final``; it replaces ``final`` only on success.

    A finished folder already at ``final`` is replaced whole.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX + final.name + ".", dir=final.parent))
    try:
        yield tmp
        normal_permissions(tmp)
        if final.exists():
            old = final.with_name(TMP_PREFIX + final.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def clean_stale_temps(folder: Path) -> None:
    """Remove temporary leftovers of an earlier interrupted run in ``folder`` (not recursive)."""
    if not folder.is_dir():
        return
    for p in folder.glob(TMP_PREFIX + "*"):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
