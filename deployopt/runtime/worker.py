"""Run untrusted-model work in a spawned subprocess with a time limit.

onnxruntime can crash (segfault) or hang on a malformed or hostile model. Parity and benchmark
sessions therefore run in a child process: a signal death becomes :class:`WorkerCrashed`, an
overrun becomes :class:`WorkerTimeout`, and the parent run goes on with that variant failed.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from deployopt.errors import EXIT_INVALID_RUN, StageError

DEFAULT_TIMEOUT_S = 600.0


class WorkerError(StageError):
    exit_code = EXIT_INVALID_RUN


class WorkerCrashed(WorkerError):
    """The child died from a signal or exited without answering."""


class WorkerTimeout(WorkerError):
    """The child ran past its time limit and was killed."""


class WorkerFailed(WorkerError):
    """The child raised; the message carries the child's error."""


def _child(conn, fn: Callable[..., Any], args: tuple, kwargs: dict) -> None:
    try:
        conn.send(("ok", fn(*args, **kwargs)))
    except BaseException as e:  # report everything to the parent, which decides
        from deployopt.errors import DeployoptError
        from deployopt.workspace import disk_cause

        kind = "deployopt" if isinstance(e, DeployoptError) else "error"
        detail = str(e) if kind == "deployopt" else f"{type(e).__name__}: {e}"
        disk = disk_cause(e)
        if disk is not None:  # the disk, not the model: the parent stops the run
            kind, detail = "disk", (disk.errno, disk.filename and str(disk.filename))
        conn.send((kind, (detail, traceback.format_exc())))
    finally:
        conn.close()


def run_in_worker(
    fn: Callable[..., Any],
    *args: Any,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    label: str = "worker",
    **kwargs: Any,
) -> Any:
    """Call ``fn(*args, **kwargs)`` in a spawned process; return its result.

    ``fn`` must be importable (a module-level function) and its result picklable.
    """
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(child, fn, args, kwargs), daemon=True)
    proc.start()
    child.close()
    try:
        if not parent.poll(timeout_s):
            if not proc.is_alive():  # died before answering
                proc.join(5)
                raise WorkerCrashed(f"{label}: worker died {death_reason(proc.exitcode)}")
            proc.kill()
            raise WorkerTimeout(f"{label}: no answer within {timeout_s:g} s; killed")
        try:
            status, payload = parent.recv()
        except EOFError:
            proc.join(5)
            raise WorkerCrashed(f"{label}: worker died {death_reason(proc.exitcode)}") from None
    finally:
        parent.close()
        if proc.is_alive():
            proc.kill()
        proc.join(5)
    if status == "ok":
        return payload
    detail, _tb = payload
    if status == "disk":  # a full disk stops the run; it is never a failed variant
        from deployopt.workspace import disk_error

        code, filename = detail
        err = disk_error(OSError(code, os.strerror(code), filename), Path(filename or "."))
        raise err
    raise WorkerFailed(f"{label}: {detail}")


def death_reason(code: int | None) -> str:
    if code is None:
        return "without an exit code"
    if code < 0:
        try:
            return f"from signal {signal.Signals(-code).name}"
        except ValueError:
            return f"from signal {-code}"
    return f"with exit code {code}"
