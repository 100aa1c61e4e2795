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
):
    """An InferenceSession on one EP (CPU as the fallback for unsupported nodes).

    ``optimization``: ``all`` (ORT default), ``basic`` or ``disable``.
    """
    rt = ort()
    so = rt.SessionOptions()
    levels = {
        "all": rt.GraphOptimizationLevel.ORT_ENABLE_ALL,
        "basic": rt.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "disable": rt.GraphOptimizationLevel.ORT_DISABLE_ALL,
    }
    so.graph_optimization_level = levels[optimization]
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    full = resolve_provider(provider)
    providers = [full] if full == "CPUExecutionProvider" else [full, "CPUExecutionProvider"]
    try:
        return rt.InferenceSession(str(path), so, providers=providers)
    except Exception as e:  # onnxruntime raises its own exception types (Fail, InvalidGraph...)
        raise InputModelError(
            f"{path}: onnxruntime cannot load the model: {str(e).splitlines()[0][:300]}"
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


def model_outputs(
    path: Path, batches: Sequence[dict[str, np.ndarray]], threads: int | None = None
) -> list[dict[str, np.ndarray]]:
    """Create a session on ``path`` and run ``batches``: the unit of work a worker process does."""
    return run_batches(create_session(path, threads=threads), batches)
