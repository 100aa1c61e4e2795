"""The only place that creates ``onnxruntime.InferenceSession``.

Execution providers are named by short aliases (``cpu``, ``cuda``, ``tensorrt``, ...). A session
reports the providers it really uses so callers can refuse a silent CPU fallback.

GPU execution providers, and what a result says about them:
- a session on a GPU EP lists the CPU EP after it, for the nodes the GPU EP has no kernel for
  (onnxruntime itself also places shape computations on the CPU). Which EP ran each node comes
  from one profiled run (:func:`node_providers`): no node on the requested EP makes a benchmark
  INVALID; some nodes on the CPU is *flagged* (:func:`fallback_note`, the counts per EP in the
  result), not INVALID, since a mixed placement is what deploys;
- strict mode: a target whose session config sets ``session.disable_cpu_ep_fallback = "1"``
  gets a session on the GPU EP alone, and onnxruntime refuses to create it when any node would
  run on the CPU: :class:`EpFallbackError` (exit 4; the benchmark records it as INVALID);
- timing uses IO binding (:func:`runner`), parity may run on the target's EP
  (:func:`parity_provider`, :func:`model_outputs`) so an fp16 model is proven where it runs.

The onnxruntime-gpu wheel cannot be installed on the borrowed GPU machine (it is 255 MB), so
these paths are covered by unit tests with a faked provider list and session
(tests/test_cuda_paths.py) and by the ``cuda``-marked tests where a CUDA EP exists.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
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


# onnxruntime's session config key that forbids placing nodes on the CPU EP
# (include/onnxruntime/core/session/onnxruntime_session_options_config_keys.h)
STRICT_KEY = "session.disable_cpu_ep_fallback"
_STRICT_REFUSAL = "fallback to CPU EP has been explicitly disabled"
# the device an EP's inputs and outputs live on, for IO binding
DEVICE_OF_EP = {
    "CUDAExecutionProvider": "cuda",
    "TensorrtExecutionProvider": "cuda",
    "ROCMExecutionProvider": "cuda",
    "MIGraphXExecutionProvider": "cuda",
}


class EpFallbackError(RuntimeUnavailableError):
    """Strict mode: onnxruntime refused a session because some nodes would run on the CPU."""

    default_hint = (
        f'the EP has no kernel for some ops: drop {STRICT_KEY} = "1" from the target\'s '
        "session_config to let them run on the CPU (the result then counts the nodes per EP)"
    )


def is_gpu_provider(name: str) -> bool:
    """Whether the EP (alias or full name) keeps its tensors on a GPU."""
    return EP_ALIASES.get(name.lower(), name) in DEVICE_OF_EP


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


def session_options(
    threads: int | None = None,
    optimization: str = "all",
    session_config: dict[str, str] | None = None,
    log_severity: int = 3,
):
    """onnxruntime SessionOptions: the optimization level, ``threads`` intra-op threads (one
    inter-op), config entries, and log severity (3: errors; 4: fatal only)."""
    rt = ort()
    so = rt.SessionOptions()
    so.graph_optimization_level = _LEVELS[optimization](rt)
    so.log_severity_level = log_severity
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    for key, value in (session_config or {}).items():
        so.add_session_config_entry(key, str(value))
    return so


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
    onnxruntime session config entries (``session.intra_op.allow_spinning``, ...). With
    ``session.disable_cpu_ep_fallback = "1"`` (strict mode) a non-CPU EP runs alone: the CPU EP
    is not listed (onnxruntime rejects listing it with that key set), and a model with nodes
    the EP cannot run raises :class:`EpFallbackError`.
    """
    rt = ort()
    so = session_options(threads, optimization, session_config)
    full = resolve_provider(provider)
    strict = str((session_config or {}).get(STRICT_KEY, "0")) == "1"
    if full == "CPUExecutionProvider" or strict:
        providers = [full]
    else:
        providers = [full, "CPUExecutionProvider"]
    try:
        return rt.InferenceSession(str(path), so, providers=providers)
    except Exception as e:  # onnxruntime raises its own exception types (Fail, InvalidGraph...)
        if strict and _STRICT_REFUSAL in str(e):
            raise EpFallbackError(
                f"{path}: strict mode ({STRICT_KEY}=1): some nodes would run on the CPU, not "
                f"on {full}"
            ) from None
        raise InputModelError(
            f"{path}: onnxruntime cannot load the model: {explain_ort_error(str(e))}"
        ) from None


def offline_optimize(src: Path, dst: Path, optimization: str = "extended") -> None:
    """Write onnxruntime's graph optimization of ``src`` at level ``optimization`` to ``dst``
    (a session is created for that and dropped); callers run it in a worker process."""
    rt = ort()
    so = session_options(optimization=optimization)
    so.optimized_model_filepath = str(dst)
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
    path: Path,
    batches: Sequence[dict[str, np.ndarray]],
    threads: int | None = None,
    provider: str = "cpu",
) -> list[dict[str, np.ndarray]]:
    """Create a session on ``path`` (on ``provider``, CPU by default) and run ``batches``: the
    unit of work a worker process does."""
    return run_batches(create_session(path, provider=provider, threads=threads), batches)


def parity_provider(target_ep: str | None) -> str:
    """The EP parity runs on for a run benchmarked on ``target_ep``: the target's own EP when it
    is a GPU EP (an fp16 model is proven where it runs: the CPU EP computes most fp16 ops in
    fp32, which says little about a GPU's fp16 kernels), else the CPU."""
    if target_ep and is_gpu_provider(target_ep):
        return target_ep
    return "cpu"


def runner(session, feeds: dict[str, np.ndarray], device_io: bool = True):
    """A zero-argument callable that runs ``session`` once on ``feeds``.

    On a GPU provider with ``device_io``, inputs are copied to the device once and outputs stay
    there (IO binding), so host copies are not timed.

    The timing loop measures the wall time of this callable, which is the GPU's work only if
    the call waits for it. It does: a session run synchronizes the execution providers with the
    CPU before it returns (for the CUDA EP, cudaStreamSynchronize on its compute stream) unless
    the run option ``disable_synchronize_execution_providers`` is "1" (onnxruntime,
    include/onnxruntime/core/session/onnxruntime_run_options_config_keys.h: "Set to '1' to not
    synchronize execution providers with CPU at the end of session run. Per default it will be
    set to '0'"). ``run_with_iobinding`` is such a run and deployopt never sets that option, so
    each call returns after the kernels have finished.
    """
    provider = session.get_providers()[0]
    device = DEVICE_OF_EP.get(provider)
    if device is None or not device_io:
        names = [o.name for o in session.get_outputs()]
        return lambda: session.run(names, feeds)
    rt = ort()
    binding = session.io_binding()
    for name, arr in feeds.items():  # copied to the device once, before any timed run
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
    so = session_options()
    so.enable_profiling = True
    with tempfile.TemporaryDirectory(prefix="deployopt-prof-") as tmp:
        so.profile_file_prefix = os.path.join(tmp, "p")
        full = resolve_provider(target.ep)
        providers = list(dict.fromkeys([full, "CPUExecutionProvider"]))
        sess = rt.InferenceSession(str(path), so, providers=providers)
        sess.run(None, feeds)
        prof = sess.end_profiling()
        with open(prof) as f:
            events = json.load(f)
    return count_node_providers(events)


def count_node_providers(events: Sequence[dict]) -> dict[str, int]:
    """Nodes per execution provider in an onnxruntime profile (its ``Node`` events, each node
    counted once)."""
    counts: dict[str, int] = {}
    seen = set()
    for ev in events:
        args = ev.get("args") or {}
        if ev.get("cat") == "Node" and "provider" in args and ev["name"] not in seen:
            seen.add(ev["name"])
            counts[args["provider"]] = counts.get(args["provider"], 0) + 1
    return counts


def fallback_note(counts: dict[str, int], wanted: str) -> str | None:
    """One line when some (not all) nodes ran on another EP than ``wanted``, else None:
    ``"3 of 40 nodes ran on CPUExecutionProvider, not CUDAExecutionProvider"``."""
    total = sum(counts.values())
    others = {ep: n for ep, n in counts.items() if ep != wanted and n}
    if not counts.get(wanted) or not others:
        return None
    where = ", ".join(f"{n} on {ep}" for ep, n in sorted(others.items()))
    moved = sum(others.values())
    return f"{moved} of {total} nodes ran off {wanted} ({where}): partial fallback"


# ---------------------------------------------------------------- the input model's probe

_ORT_PREFIX = re.compile(r"\s*\[ONNXRuntimeError\] : \d+ : \w+ : ")
_SOURCE_LOC = re.compile(r"(?:/onnxruntime_src/)?[\w/.-]+\.(?:cc|h|cpp):\d+\s+")
# a C++ signature onnxruntime puts before its message: "void* onnxruntime::X::Y(args) Message"
_SIGNATURE = re.compile(
    r"(?:(?:virtual|const|static)\s+)*(?:[\w:*&<>]+\s+)?onnxruntime::[\w:<>~]+"
    r"\((?:[^()]|\([^()]*\))*\)(?:\s*const)?\s*"
)
_RULES: tuple[tuple[re.Pattern, Callable[[re.Match], str]], ...] = (
    (
        re.compile(r"Opset (\d+) is under development.*?domain ([\w.]+) is till opset (\d+)", re.S),
        lambda m: (
            f"the model imports opset {m[1]} of the default domain ({m[2]}); this "
            f"onnxruntime supports up to opset {m[3]}"
        ),
    ),
    (
        re.compile(r"([\w.]*):(\w+)\((-?\d+)\) is not a registered function/op"),
        lambda m: (
            f"op {m[2]} of domain {m[1] or 'ai.onnx'!r} is not known to this "
            "onnxruntime (no kernel or function registered for it)"
        ),
    ),
    (
        re.compile(r"Could not find an implementation for (\w+)\((\d+)\) node with name '([^']*)'"),
        lambda m: f"no kernel for op {m[1]} (opset {m[2]}) of node {m[3]!r}",
    ),
    (
        re.compile(
            r"running (\w+) node\. Name:'([^']*)'.*?Failed to allocate memory for requested "
            r"buffer of size (\d+)",
            re.S,
        ),
        lambda m: (
            f"node {m[2]!r} ({m[1]}) asks for {int(m[3]):,} bytes, more than can be allocated"
        ),
    ),
    (
        re.compile(r"running (\w+) node\. Name:'([^']*)' Status Message: (.*)", re.S),
        lambda m: f"node {m[2]!r} ({m[1]}) failed: {_clean(m[3])}",
    ),
    (
        re.compile(r"invalid dimensions for input: (\S+) for the following indices\s+(.*)", re.S),
        lambda m: f"input {m[1]!r} has the wrong shape ({_clean(m[2]).split(' Please')[0]})",
    ),
)


def _clean(msg: str) -> str:
    msg = _ORT_PREFIX.sub(" ", msg)
    msg = re.sub(r"Load model from \S+ failed:\s*", "", msg)
    msg = _SIGNATURE.sub("", _SOURCE_LOC.sub("", msg))
    msg = msg.replace("Fatal error: ", "")
    return " ".join(msg.split())


_NODE = re.compile(r"running (\w+) node\. Name:'([^']*)' Status Message: ")


def _node_chain(msg: str) -> str | None:
    """``node 'If_0' (If) > node '' (Sigmoid) failed: <innermost message>`` for an error inside
    a subgraph (onnxruntime nests one status message in another)."""
    found = list(_NODE.finditer(msg))
    if len(found) < 2:
        return None
    chain = " > ".join(f"node {m[2]!r} ({m[1]})" for m in found)
    return f"{chain} failed: {_clean(msg[found[-1].end() :])}"


def explain_ort_error(msg: str, limit: int = 240) -> str:
    """One line for an onnxruntime error: which op, domain, opset, node or input, without the
    C++ source locations and signatures; cut at a word boundary when long."""
    nested = _node_chain(msg)
    for pattern, say in () if nested else _RULES:
        m = pattern.search(msg)
        if m:
            line = say(m)
            break
    else:
        line = nested or _clean(msg)
    if len(line) > limit:
        line = line[:limit].rsplit(" ", 1)[0] + " ..."
    return line


def first_runnable(
    path: Path, feeds: Sequence[dict[str, np.ndarray]], threads: int | None = None
) -> tuple[str, int | None, list[str]]:
    """Load ``path`` once and run each feed until one runs: ``("ok", index, reasons)`` with
    the one-line reasons of the feeds before it, ``("none", None, reasons)`` when none ran, or
    ``("load", None, [reason])``. The unit of work of the image-size probe (deployopt.images),
    run in a worker process."""
    rt = ort()
    so = session_options(threads, log_severity=4)
    try:
        sess = rt.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types
        return "load", None, [explain_ort_error(str(e))]
    wanted = {i.name for i in sess.get_inputs()}
    reasons: list[str] = []
    for i, feed in enumerate(feeds):
        try:
            sess.run(None, {k: v for k, v in feed.items() if k in wanted})
            return "ok", i, reasons
        except Exception as e:  # noqa: BLE001 - a run failure is the answer
            reasons.append(explain_ort_error(str(e)))
    return "none", None, reasons


def probe_model(
    path: Path, batches: Sequence[dict[str, np.ndarray]], threads: int | None = None
) -> tuple[str, object]:
    """Load ``path`` and run ``batches``: ``("ok", outputs)``, ``("load", reason)`` or
    ``("run", reason)``, the reason one line (:func:`explain_ort_error`). The unit of work of
    the input model's probe, run in a worker process before anything is called ok."""
    rt = ort()
    so = session_options(threads, log_severity=4)  # the reason comes back in the answer
    try:
        sess = rt.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types
        return "load", explain_ort_error(str(e))
    try:
        return "ok", run_batches(sess, batches)
    except Exception as e:  # noqa: BLE001 - a run failure is the answer
        return "run", explain_ort_error(str(e))
