"""The CUDA paths of the onnxruntime harness, checked without a GPU: a faked provider list and a
faked InferenceSession stand in for onnxruntime-gpu (whose 255 MB wheel the borrowed GPU
machine cannot take). Covered: target resolution, strict no-fallback mode, per-node EP counts
and partial fallback in a benchmark result, IO binding, and parity on the target's EP. The
``cuda``-marked tests at the end run the real thing where a GPU is usable (skipped here)."""

from __future__ import annotations

import multiprocessing as mp

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

from deployopt.benchmark import BenchSpec, _serve
from deployopt.errors import EXIT_INVALID_RUN, InputModelError, RuntimeUnavailableError
from deployopt.presets import Target
from deployopt.runtime import session as rs
from tests.models import tiny_onnx_model

CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"


@pytest.fixture
def model_path(tmp_path):
    path = tmp_path / "tiny.onnx"
    onnx.save_model(tiny_onnx_model(), str(path))
    return path


@pytest.fixture
def gpu_ort(monkeypatch):
    """onnxruntime as onnxruntime-gpu reports itself: CUDA and CPU providers. Sessions are
    fakes that record how they were made."""
    made = []

    class FakeSession:
        def __init__(self, path, so=None, providers=()):
            self.path, self.so, self.providers = path, so, list(providers)
            made.append(self)
            if FakeSession.refuse:
                raise RuntimeError(FakeSession.refuse)

        def get_providers(self):
            return self.providers

        def get_inputs(self):
            return [type("I", (), {"name": "X"})()]

        def get_outputs(self):
            return [type("O", (), {"name": "Y"})()]

        def run(self, names, feeds):
            return [feeds["X"] @ np.ones((16, 4), np.float32)]

    FakeSession.refuse = None
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: [CUDA, CPU])
    monkeypatch.setattr(onnxruntime, "InferenceSession", FakeSession)
    return FakeSession, made


# ------------------------------------------------------------------ target resolution


def test_cuda_resolves_to_the_cuda_ep_when_onnxruntime_has_it(gpu_ort):
    assert rs.resolve_provider("cuda") == CUDA
    assert rs.resolve_provider("CUDA") == CUDA
    assert rs.is_gpu_provider("cuda") and rs.is_gpu_provider("tensorrt")
    assert not rs.is_gpu_provider("cpu") and not rs.is_gpu_provider("openvino")


def test_a_missing_ep_exits_4_naming_the_available_ones(monkeypatch):
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: [CPU])
    with pytest.raises(RuntimeUnavailableError) as e:
        rs.resolve_provider("cuda")
    assert e.value.exit_code == EXIT_INVALID_RUN == 4
    assert "'cuda' (CUDAExecutionProvider) is not available" in e.value.message
    assert e.value.hint == f"available here: {CPU}"


# ------------------------------------------------------------------ strict mode


def test_a_gpu_session_lists_the_cpu_ep_after_it_by_default(gpu_ort, model_path):
    _, made = gpu_ort
    rs.create_session(model_path, "cuda")
    assert made[-1].providers == [CUDA, CPU]
    with pytest.raises(RuntimeError, match="does not have configuration"):
        made[-1].so.get_session_config_entry(rs.STRICT_KEY)  # not set
    rs.create_session(model_path, "cpu")
    assert made[-1].providers == [CPU]


def test_strict_mode_sets_the_key_and_runs_the_gpu_ep_alone(gpu_ort, model_path):
    """onnxruntime rejects the CPU EP in the provider list when the key is set ("Conflicting
    session configuration"), so strict mode lists the GPU EP alone."""
    _, made = gpu_ort
    rs.create_session(model_path, "cuda", session_config={rs.STRICT_KEY: "1"})
    assert made[-1].providers == [CUDA]
    assert made[-1].so.get_session_config_entry(rs.STRICT_KEY) == "1"
    rs.create_session(model_path, "cpu", session_config={rs.STRICT_KEY: "1"})
    assert made[-1].providers == [CPU]  # the CPU EP is the EP itself: nothing to refuse


def test_a_strict_refusal_is_a_typed_fallback_error(gpu_ort, model_path):
    fake, _ = gpu_ort
    fake.refuse = (
        "[ONNXRuntimeError] : 1 : FAIL : This session contains graph nodes that are assigned to "
        "the default CPU EP, but fallback to CPU EP has been explicitly disabled by the user."
    )
    with pytest.raises(rs.EpFallbackError) as e:
        rs.create_session(model_path, "cuda", session_config={rs.STRICT_KEY: "1"})
    assert e.value.exit_code == 4 and str(model_path) in e.value.message
    assert "some nodes would run on the CPU, not on CUDAExecutionProvider" in e.value.message
    assert rs.STRICT_KEY in e.value.hint
    fake.refuse = "[ONNXRuntimeError] : 10 : INVALID_GRAPH : broken"  # any other failure
    with pytest.raises(InputModelError, match="cannot load the model"):
        rs.create_session(model_path, "cuda", session_config={rs.STRICT_KEY: "1"})


# ------------------------------------------------------------------ per-node EP counts


def test_node_counts_come_from_the_profile_each_node_once():
    events = [
        {"cat": "Session", "name": "model_run"},
        {"cat": "Node", "name": "MatMul_0_kernel_time", "args": {"provider": CUDA}},
        {"cat": "Node", "name": "MatMul_0_kernel_time", "args": {"provider": CUDA}},
        {"cat": "Node", "name": "Add_1_kernel_time", "args": {"provider": CUDA}},
        {"cat": "Node", "name": "Shape_2_kernel_time", "args": {"provider": CPU}},
        {"cat": "Node", "name": "Gather_3_fence_before", "args": {}},
    ]
    assert rs.count_node_providers(events) == {CUDA: 2, CPU: 1}


def test_the_real_profile_of_a_cpu_run_counts_its_nodes(model_path):
    feeds = {"X": np.ones((2, 16), np.float32)}
    # MatMul + Add become one fused node at the "all" optimization level
    assert rs.node_providers(model_path, Target(name="cpu"), feeds) == {CPU: 1}


def test_partial_fallback_is_a_note_and_total_fallback_is_not_partial():
    assert rs.fallback_note({CUDA: 37, CPU: 3}, CUDA) == (
        f"3 of 40 nodes ran off {CUDA} (3 on {CPU}): partial fallback"
    )
    assert rs.fallback_note({CUDA: 40}, CUDA) is None
    assert rs.fallback_note({CPU: 40}, CUDA) is None  # nothing on the EP: INVALID, not a note


def _serve_once(monkeypatch, model_path, counts, providers=(CUDA, CPU)):
    """The benchmark worker's main, in this process, on a faked CUDA session whose profile
    gives ``counts``: returns the info it reports when ready."""
    monkeypatch.setattr(rs, "available_providers", lambda: [CUDA, CPU])

    class Sess:
        def get_providers(self):
            return list(providers)

    monkeypatch.setattr(rs, "create_session", lambda *a, **k: Sess())
    monkeypatch.setattr(rs, "runner", lambda sess, feeds, device_io=True: lambda: None)
    monkeypatch.setattr(rs, "node_providers", lambda path, target, feeds: dict(counts))
    parent, child = mp.Pipe()
    parent.send(("stop", None))  # answered after "ready"
    _serve(child, str(model_path), Target(name="cuda", ep="cuda"), BenchSpec(batch=2))
    kind, info = parent.recv()
    assert kind == "ready"
    return info


def test_a_benchmark_with_some_nodes_on_the_cpu_is_flagged_not_invalid(monkeypatch, model_path):
    info = _serve_once(monkeypatch, model_path, {CUDA: 37, CPU: 3})
    assert info["invalid"] == []
    assert info["node_providers"] == {CUDA: 37, CPU: 3}
    assert info["warnings"] == [f"3 of 40 nodes ran off {CUDA} (3 on {CPU}): partial fallback"]


def test_a_benchmark_with_no_node_on_the_ep_is_invalid(monkeypatch, model_path):
    info = _serve_once(monkeypatch, model_path, {CPU: 2})
    assert info["invalid"] == [f"no node was assigned to {CUDA}"]
    info = _serve_once(monkeypatch, model_path, {CPU: 2}, providers=(CPU,))
    assert f"requested {CUDA} but the session runs on {CPU}" in info["invalid"]


def test_the_result_carries_the_counts_and_the_warning():
    from deployopt.benchmark import BenchWorker

    w = BenchWorker.__new__(BenchWorker)  # the parent-side record, without a process
    w.name, w.path, w.target = "m", "m.onnx", Target(name="cuda", ep="cuda")
    w.samples, w.round_p50, w.peak_rss_mb, w.errors = [1.0, 1.1, 0.9], [1.0], None, []
    w.info = {"providers": [CUDA, CPU], "shapes": {"X": [1, 16]},
              "node_providers": {CUDA: 37, CPU: 3}, "warnings": ["3 of 40 nodes ..."]}  # fmt: skip
    r = w.result({})
    assert r.valid and r.node_providers == {CUDA: 37, CPU: 3}
    assert list(r.to_json()["warnings"]) == ["3 of 40 nodes ..."]
    from deployopt import display

    with display.console.capture() as cap:
        display.print_bench_results([r])
    assert "warning: m.onnx: 3 of 40 nodes ..." in cap.get()


# ------------------------------------------------------------------ IO binding


def test_io_binding_copies_inputs_once_and_keeps_outputs_on_the_device(monkeypatch):
    calls = []

    class Binding:
        def bind_ortvalue_input(self, name, value):
            calls.append(("input", name, value))

        def bind_output(self, name, device):
            calls.append(("output", name, device))

    class Sess:
        def get_providers(self):
            return [CUDA, CPU]

        def get_outputs(self):
            return [type("O", (), {"name": "Y"})()]

        def io_binding(self):
            return Binding()

        def run_with_iobinding(self, binding):
            calls.append(("run_with_iobinding", binding))

        def run(self, *a):
            calls.append(("run",))

    def to_device(arr, device, device_id):
        calls.append(("copy", device, device_id))
        return ("ortvalue", device)

    monkeypatch.setattr(onnxruntime.OrtValue, "ortvalue_from_numpy", staticmethod(to_device))
    feeds = {"X": np.ones((1, 16), np.float32)}
    run = rs.runner(Sess(), feeds)
    assert calls == [("copy", "cuda", 0), ("input", "X", ("ortvalue", "cuda")),
                     ("output", "Y", "cuda")]  # fmt: skip
    calls.clear()
    for _ in range(3):
        run()
    assert [c[0] for c in calls] == ["run_with_iobinding"] * 3  # no copies in the timed call
    calls.clear()
    rs.runner(Sess(), feeds, device_io=False)()  # --include-copies: a plain run
    assert calls == [("run",)]


def test_the_io_binding_comment_cites_the_synchronising_run_option():
    import inspect

    doc = inspect.getdoc(rs.runner)
    assert "disable_synchronize_execution_providers" in doc
    assert "onnxruntime_run_options_config_keys.h" in doc


# ------------------------------------------------------------------ parity on the target EP


def test_parity_runs_on_a_gpu_target_ep_and_on_the_cpu_otherwise(gpu_ort, model_path):
    _, made = gpu_ort
    assert rs.parity_provider("cuda") == "cuda" and rs.parity_provider("tensorrt") == "tensorrt"
    assert rs.parity_provider("cpu") == "cpu" and rs.parity_provider(None) == "cpu"
    feeds = [{"X": np.ones((2, 16), np.float32)}]
    out = rs.model_outputs(model_path, feeds, provider=rs.parity_provider("cuda"))
    assert made[-1].providers == [CUDA, CPU]
    assert out[0]["Y"].shape == (2, 4)
    rs.model_outputs(model_path, feeds)
    assert made[-1].providers == [CPU]


def test_optimize_runs_its_parity_sessions_on_the_targets_gpu_ep(gpu_ort, model_path, monkeypatch):
    from types import SimpleNamespace

    from deployopt.config import OptimizeConfig
    from deployopt.runner import Runner
    from deployopt.runtime import worker

    _, made = gpu_ort
    # in process (the fake onnxruntime lives here), the worker's arguments kept as given
    monkeypatch.setattr(worker, "run_in_worker", lambda fn, *a, **kw: fn(*a))
    feeds = [{"X": np.ones((2, 16), np.float32)}]
    for target, providers in (("cuda", [CUDA, CPU]), ("cpu", [CPU])):
        cfg = OptimizeConfig(target=target)
        me = SimpleNamespace(cfg=cfg, _evaluation=feeds)
        me._parity_ep = Runner._parity_ep.func(me)  # the Runner's property, on this stand-in
        out = Runner._outputs(me, model_path, "fp32")
        assert made[-1].providers == providers and out[0]["Y"].shape == (2, 4)


# ------------------------------------------------------------------ real CUDA (skipped here)


@pytest.mark.cuda
def test_distillation_on_cuda_in_bf16_and_fp16(tiny_bert_dir, tmp_path):
    from deployopt.stages.distill import distill
    from deployopt.torchside.train import TrainConfig
    from tests.models import WORDS

    rng = np.random.default_rng(0)
    data = tmp_path / "d.txt"
    data.write_text("\n".join(" ".join(rng.choice(WORDS, size=8)) for _ in range(64)))
    got = {}
    for prec in ("fp32", "bf16", "fp16"):
        cfg = TrainConfig(epochs=2, batch_size=8, lr=1e-3, patience=3, precision=prec)
        res = distill(tiny_bert_dir, data, tmp_path / prec, student_size={"num_hidden_layers": 1},
                      losses="cosine", train=cfg, device="cuda", progress=False,
                      log=lambda s: None)  # fmt: skip
        assert res.extra["device"].startswith("cuda:0") and res.extra["skipped_steps"] == 0
        assert res.extra["peak_memory_kind"] == "cuda max_memory_allocated"
        got[prec] = res.student["mean_cosine"]
    assert abs(got["bf16"] - got["fp32"]) <= 0.005 and abs(got["fp16"] - got["fp32"]) <= 0.005


@pytest.mark.cuda
def test_a_gpu_checkpoint_resumes_on_the_cpu(tiny_bert_dir, tmp_path):
    from deployopt.stages.distill import distill
    from deployopt.torchside.train import Interrupted, TrainConfig
    from tests.models import WORDS

    data = tmp_path / "d.txt"
    data.write_text("\n".join(" ".join(WORDS[i : i + 6]) for i in range(64)))
    cfg = TrainConfig(epochs=2, batch_size=8, lr=1e-3, patience=3, precision="bf16")
    kw = dict(student_layers="1", losses="cosine", train=cfg, progress=False, log=lambda s: None)
    with pytest.raises(Interrupted):
        distill(tiny_bert_dir, data, tmp_path / "o", device="cuda", stop_after_steps=5, **kw)
    saved = torch.load(tmp_path / "o" / "work" / "checkpoint" / "trainer_state.pt",
                       weights_only=True)  # fmt: skip
    assert all(t.device.type == "cpu" for g in saved["optimizer"]["state"].values()
               for t in g.values())  # fmt: skip
    res = distill(tiny_bert_dir, data, tmp_path / "o", device="cpu", **kw)
    assert res.extra["device"] == "cpu" and len(res.history) == 2


@pytest.mark.cuda(ep=True)
def test_a_cuda_ep_session_runs_the_model_on_the_gpu(model_path):
    feeds = {"X": np.ones((2, 16), np.float32)}
    counts = rs.node_providers(model_path, Target(name="cuda", ep="cuda"), feeds)
    assert counts.get(CUDA)
    sess = rs.create_session(model_path, "cuda", session_config={rs.STRICT_KEY: "1"})
    rs.runner(sess, feeds)()
