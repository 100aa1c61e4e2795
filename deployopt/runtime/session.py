"""The only place that creates ``onnxruntime.InferenceSession``.

Execution providers are named by short aliases (``cpu``, ``cuda``, ``tensorrt``, ...). A session
reports the providers it really uses so callers can refuse a silent CPU fallback.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from deployopt.errors import InputModelError, RuntimeUnavailableError

EP_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "dml": "DmlExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "rocm": "ROCMExecutionProvider",
    "migraphx": "MIGraphXExecutionProvider",
    "qnn": "QNNExecutionProvider",
    "xnnpack": "XnnpackExecutionProvider",
}


_LEVELS = {
    "all": lambda rt: rt.GraphOptimizationLevel.ORT_ENABLE_ALL,
    "extended": lambda rt: rt.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "basic": lambda rt: rt.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "disable": lambda rt: rt.GraphOptimizationLevel.ORT_DISABLE_ALL,
}


def ort():
    """Import onnxruntime with an actionable error when neither build is installed."""
    try:
        import onnxruntime
    except ImportError:
        raise RuntimeUnavailableError("onnxruntime is not installed") from None
    return onnxruntime


def available_providers() -> list[str]:
    return list(ort().get_available_providers())


def resolve_provider(name: str) -> str:
    full = EP_ALIASES.get(name.lower(), name)
    avail = available_providers()
    if full not in avail:
        raise RuntimeUnavailableError(
            f"execution provider {name!r} ({full}) is not available in this onnxruntime",
            hint="available here: " + ", ".join(avail),
        )
    return full


def create_session(
    path: Path,
    provider: str = "cpu",
    threads: int | None = None,
    optimization: str = "all",
    session_config: dict[str, str] | None = None,
):
    """An InferenceSession on one EP (CPU as the fallback for unsupported nodes).

    ``optimization``: ``all`` (ORT default), ``extended`` (no layout transformations),
    ``basic`` or ``disable``; ``session_config``:
    onnxruntime session config entries (``session.intra_op.allow_spinning``, ...).
    """
    rt = ort()
    so = rt.SessionOptions()
    so.graph_optimization_level = _LEVELS[optimization](rt)
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    for key, value in (session_config or {}).items():
        so.add_session_config_entry(key, str(value))
    full = resolve_provider(provider)
    providers = [full] if full == "CPUExecutionProvider" else [full, "CPUExecutionProvider"]
    try:
        return rt.InferenceSession(str(path), so, providers=providers)
    except Exception as e:  # onnxruntime raises its own exception types (Fail, InvalidGraph...)
        raise InputModelError(
            f"{path}: onnxruntime cannot load the model: {str(e).splitlines()[0][:300]}"
        ) from None


def offline_optimize(src: Path, dst: Path, optimization: str = "extended") -> None:
    """Write onnxruntime's graph optimization of ``src`` at level ``optimization`` to ``dst``
    (a session is created for that and dropped); callers run it in a worker process."""
    rt = ort()
    so = rt.SessionOptions()
    so.graph_optimization_level = _LEVELS[optimization](rt)
    so.optimized_model_filepath = str(dst)
    so.log_severity_level = 3
    try:
        rt.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types
        raise InputModelError(
            f"{src}: onnxruntime cannot optimize the model: {str(e).splitlines()[0][:300]}"
        ) from None


def run_batches(session, batches: Sequence[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """Run every batch; return one dict of named outputs per batch."""
    names = [o.name for o in session.get_outputs()]
    wanted = {i.name for i in session.get_inputs()}
    out = []
    for b in batches:
        res = session.run(names, {k: v for k, v in b.items() if k in wanted})
        out.append(dict(zip(names, res)))
    return out


def intermediate_tensors(
    model, names: Sequence[str], batches: Sequence[dict[str, np.ndarray]], reduce=None
) -> dict[str, list]:
    """Run ``model`` (a path, or a ModelProto that is not modified) with the tensors ``names``
    made graph outputs, unoptimized so every tensor exists, on ``batches``; return each
    tensor's values per batch, passed through ``reduce(name, array)`` when given (to keep
    memory bounded). The probe model lives in a temporary folder that is removed afterwards.
    Callers run it in a worker process (``Context.isolated``)."""
    import tempfile

    import onnx

    probe = onnx.ModelProto()
    probe.CopyFrom(model if isinstance(model, onnx.ModelProto) else onnx.load(str(model)))
    have = {o.name for o in probe.graph.output}
    for t in dict.fromkeys(names):
        if t and t not in have:
            probe.graph.output.append(onnx.ValueInfoProto(name=t))
    wanted = set(names)
    out: dict[str, list] = {}
    with tempfile.TemporaryDirectory(prefix="deployopt-probe-") as tmp:
        path = Path(tmp) / "probe.onnx"
        onnx.save_model(probe, str(path))
        sess = create_session(path, optimization="disable")
        outputs = [o.name for o in sess.get_outputs()]
        feeds = {i.name for i in sess.get_inputs()}
        for b in batches:
            res = sess.run(outputs, {k: v for k, v in b.items() if k in feeds})
            for name, arr in zip(outputs, res):
                if name in wanted:
                    out.setdefault(name, []).append(reduce(name, arr) if reduce else arr)
    return out


def model_outputs(
    path: Path, batches: Sequence[dict[str, np.ndarray]], threads: int | None = None
) -> list[dict[str, np.ndarray]]:
    """Create a session on ``path`` and run ``batches``: the unit of work a worker process does."""
    return run_batches(create_session(path, threads=threads), batches)


def runner(session, feeds: dict[str, np.ndarray], device_io: bool = True):
    """A zero-argument callable that runs ``session`` once on ``feeds``.

    On a GPU provider with ``device_io``, inputs are copied to the device once and outputs stay
    there (IO binding), so host copies are not timed.
    """
    provider = session.get_providers()[0]
    device = {
        "CUDAExecutionProvider": "cuda",
        "TensorrtExecutionProvider": "cuda",
        "ROCMExecutionProvider": "cuda",
        "MIGraphXExecutionProvider": "cuda",
    }.get(provider)
    if device is None or not device_io:
        names = [o.name for o in session.get_outputs()]
        return lambda: session.run(names, feeds)
    rt = ort()
    binding = session.io_binding()
    for name, arr in feeds.items():
        binding.bind_ortvalue_input(name, rt.OrtValue.ortvalue_from_numpy(arr, device, 0))
    for out in session.get_outputs():
        binding.bind_output(out.name, device)
    return lambda: session.run_with_iobinding(binding)


def node_providers(path: Path, target, feeds: dict[str, np.ndarray]) -> dict[str, int]:
    """How many graph nodes each execution provider ran, from one profiled run."""
    import json
    import os
    import tempfile

    rt = ort()
    so = rt.SessionOptions()
    so.enable_profiling = True
    so.log_severity_level = 3
    with tempfile.TemporaryDirectory(prefix="deployopt-prof-") as tmp:
        so.profile_file_prefix = os.path.join(tmp, "p")
        full = resolve_provider(target.ep)
        sess = rt.InferenceSession(str(path), so, providers=[full, "CPUExecutionProvider"])
        sess.run(None, feeds)
        prof = sess.end_profiling()
        with open(prof) as f:
            events = json.load(f)
    counts: dict[str, int] = {}
    seen = set()
    for ev in events:
        args = ev.get("args") or {}
        if ev.get("cat") == "Node" and "provider" in args and ev["name"] not in seen:
            seen.add(ev["name"])
            counts[args["provider"]] = counts.get(args["provider"], 0) + 1
    return counts
