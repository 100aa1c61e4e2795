"""Output layout, hashing and atomic writes.

Nothing reaches a final path except by ``os.replace`` of a finished temporary file or folder in
the same directory, so an interrupted run never leaves a half-written file that looks finished.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TMP_PREFIX = ".tmp-"
# errors that say the output folder cannot take a write (not the stage's fault): never cached
DISK_ERRNOS = frozenset(
    e for e in (errno.ENOSPC, getattr(errno, "EDQUOT", None), errno.EROFS) if e is not None
)


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


# ---------------------------------------------------------------- output folder checks


def check_output_dir(out: Path, source: Path | None = None) -> None:
    """Refuse an output folder that cannot work, before any work: a file, a folder that cannot
    be written (checked with ``os.access`` and a real probe write, so a read-only file system is
    caught even for root), or one that overlaps the input (``source``: a model folder or file).

    >>> check_output_dir(Path("/etc/passwd"))  # doctest: +SKIP
    UsageError: /etc/passwd: the output path is a file, not a folder
    """
    from deployopt.errors import OutputError, UsageError

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(
            f"{out}: the output path is a file, not a folder",
            hint="give -o a folder (new or existing); deployopt writes best.onnx and the "
            "reports inside it",
        )
    if source is not None:
        _check_overlap(out, Path(source))
    # the folder itself when it exists, else the nearest existing parent it will be made in
    probe_dir = out
    while not probe_dir.exists() and probe_dir != probe_dir.parent:
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        raise UsageError(
            f"{out}: {probe_dir} is a file, so the output folder cannot be made",
            hint="give -o a folder path whose parents are folders",
        )
    why = _probe_write(probe_dir)
    if why:
        where = "" if probe_dir == out else f" (its parent {probe_dir})"
        raise OutputError(f"{out}: the output folder cannot be written{where}: {why}")


def _check_overlap(out: Path, source: Path) -> None:
    from deployopt.errors import UsageError

    o, s = out.resolve(), source.resolve()
    if source.is_dir() and (o == s or o.is_relative_to(s)):
        raise UsageError(
            f"{out}: the output folder is inside the input model folder {source}",
            hint="write the output elsewhere, e.g. -o " + str(s.parent / (s.name + "-optimized")),
        )
    if s.is_relative_to(o):
        raise UsageError(
            f"{out}: the output folder holds the input model {source}; the run would "
            "write over what it reads",
            hint="copy the model out first, or choose another -o folder",
        )


def _probe_write(folder: Path) -> str | None:
    """Why ``folder`` cannot take a new file, or None. ``os.access`` answers for the mode bits
    (root passes it); the probe write answers for read-only mounts, quotas and ACLs."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX + "probe.", dir=folder)
        try:
            os.write(fd, b"deployopt write probe\n")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(tmp)
    except OSError as e:
        return os.strerror(e.errno) if e.errno else str(e)
    if not os.access(folder, os.W_OK | os.X_OK):  # the probe passed, the mode bits say no
        return "permission denied (no write access)"
    return None


def disk_cause(e: BaseException | None) -> OSError | None:
    """The ``OSError`` that says the disk cannot take a write (full, over quota, read-only)
    somewhere in ``e``'s chain of causes (a stage may wrap it in its own error), or None."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in DISK_ERRNOS:
            return e
        e = e.__cause__ or e.__context__
    return None


def disk_error(e: BaseException, where: Path):
    """An :class:`~deployopt.errors.OutputError` for an error caused by an ``OSError`` that says
    the disk cannot take the write (full, over quota, read-only), naming the file (or ``where``)
    and the free space; else None (the error is the stage's own)."""
    from deployopt.errors import OutputError

    e = disk_cause(e)
    if e is None:
        return None
    where = Path(where)
    probe = where
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = f"{shutil.disk_usage(probe).free / 2**20:.1f} MiB free"
    except OSError:
        free = "free space unknown"
    path = getattr(e, "filename", None) or where
    return OutputError(
        f"{path}: write failed: {os.strerror(e.errno)} ({free} on the file system of {probe}); "
        "the run stopped and nothing of it was cached",
        hint="free some space (or choose another -o folder) and run again; finished variants "
        "are reused",
    )
