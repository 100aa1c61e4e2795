"""The worker process turns crashes, hangs and errors of model work into typed errors."""

from __future__ import annotations

import os
import signal
import time

import pytest

from deployopt.runtime.worker import WorkerCrashed, WorkerFailed, WorkerTimeout, run_in_worker


def add(a, b):
    return a + b


def segfault():
    os.kill(os.getpid(), signal.SIGSEGV)


def hang():
    time.sleep(60)


def boom():
    raise ValueError("bad graph")


def test_result_comes_back():
    assert run_in_worker(add, 2, 3) == 5


def test_signal_death_is_a_typed_error():
    with pytest.raises(WorkerCrashed, match="worker died from signal SIGSEGV") as e:
        run_in_worker(segfault, label="fuse parity")
    assert e.value.exit_code == 4
    assert str(e.value).startswith("fuse parity:")


def test_hang_is_killed_at_the_limit():
    t0 = time.monotonic()
    with pytest.raises(WorkerTimeout, match="no answer within 1 s"):
        run_in_worker(hang, timeout_s=1)
    assert time.monotonic() - t0 < 10


def test_child_exception_is_reported():
    with pytest.raises(WorkerFailed, match="ValueError: bad graph"):
        run_in_worker(boom)


def test_crashing_variant_fails_and_the_run_goes_on(tmp_path, monkeypatch):
    """A variant whose parity session kills its worker is failed; the others finish."""
    from tests.models import optimize_only

    # spawned children import modules fresh: the crash lives in an importable function
    monkeypatch.setattr("deployopt.runner.Runner._outputs", _patched_outputs)
    res = optimize_only(
        "tests.models:mlp", tmp_path, input_shapes={"x": (1, 16)}, variants=["fuse", "int8-dynamic"]
    )
    fuse = res.by_name("fuse")
    assert fuse.status == "failed"
    assert "worker died from signal SIGSEGV" in fuse.reason
    assert any(v.ok for v in res.variants if v.stage == "int8-dynamic")


def crash_if_fuse(path, batches, threads=None):
    import json

    from deployopt.runtime.session import model_outputs

    meta = path.parent / "variant.json"
    if meta.exists() and json.loads(meta.read_text())["name"] == "fuse":
        os.kill(os.getpid(), signal.SIGSEGV)
    return model_outputs(path, batches, threads)


def _patched_outputs(self, path, label):
    return run_in_worker(
        crash_if_fuse,
        path,
        self._evaluation,
        self.cfg.threads,
        timeout_s=60,
        label=f"{label} parity",
    )


def crash_now(*args, **kwargs):
    """Stands in for a stage's onnxruntime work: dies the way a native crash does."""
    os.kill(os.getpid(), signal.SIGSEGV)


def test_a_native_crash_in_any_stage_fails_that_variant_only(tmp_path, monkeypatch):
    """fuse's offline optimization, the static search (calibration runs onnxruntime) and the
    fp16 overflow probe all run in worker processes: a crash there fails that variant, with
    the signal, and the run goes on."""
    from tests.models import optimize_only

    monkeypatch.setattr("deployopt.runtime.session.offline_optimize", crash_now)
    monkeypatch.setattr("deployopt.stages.quantize.quantize_static_and_run", crash_now)
    monkeypatch.setattr("deployopt.stages.fp16.overflowing_tensors", crash_now)
    res = optimize_only(
        "tests.models:mlp",
        tmp_path,
        input_shapes={"x": (1, 16)},
        variants=["fuse", "int8-dynamic", "int8-static", "fp16"],
    )
    assert res.by_name("fp32").ok
    for v in res.variants:
        if v.stage in ("fuse", "int8-static", "fp16"):
            assert v.status == "failed", v.name
            assert "worker died from signal SIGSEGV" in v.reason, v.reason
    static = next(v for v in res.variants if v.stage == "int8-static")
    assert all("SIGSEGV" in t["error"] for t in static.metrics["search"])
    assert any(v.ok for v in res.variants if v.stage == "int8-dynamic")
    assert (tmp_path / "manifest.json").exists()
