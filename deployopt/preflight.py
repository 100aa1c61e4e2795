"""Checks on an input model before anything is allocated or run: declared sizes against a
memory budget, and the load-and-run probe's verdict turned into one precise line.

An input declared ``[1, 2**40]`` would make the synthetic data 4 TiB; a ``ConstantOfShape`` of
``2**40`` would ask onnxruntime for as much at the first run. Both are refused (exit 5) naming
the input or node and its size, before any work. Then the model is loaded and run once in a
worker (:func:`deployopt.runtime.session.probe_model`): a model onnxruntime cannot load is
refused (exit 5) naming the op, domain or opset; one that loads but does not run on the inputs
deployopt made for it is a usage error (exit 2) naming the inputs given.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from deployopt.errors import InputModelError, InputShapeError
from deployopt.inputs import InputSpec

BUDGET_SHARE = 4  # synthetic data and any one tensor may take a quarter of the machine's memory
FALLBACK_MEMORY = 16 * 2**30


def memory_budget_bytes() -> int:
    """A quarter of this machine's physical memory (16 GiB assumed where it can't be read)."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = FALLBACK_MEMORY
    return max(total, 2**30) // BUDGET_SHARE


def human_bytes(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"  # pragma: no cover


def _budget_line(budget: int) -> str:
    return f"the memory budget of {human_bytes(budget)} (a quarter of this machine's memory)"


def check_declared_sizes(
    model: Path | str,
    specs: Sequence[InputSpec],
    batch_size: int,
    default_dim: int = 16,
    budget: int | None = None,
) -> None:
    """Refuse inputs whose declared size makes one synthetic batch exceed the memory budget,
    before anything is allocated. Symbolic dims count as ``default_dim``, the first as
    ``batch_size``."""
    budget = budget or memory_budget_bytes()
    total = 0
    worst = None
    for s in specs:
        rest = [d if isinstance(d, int) and d > 0 else default_dim for d in s.shape[1:]]
        per_sample = math.prod(rest) * np.dtype(s.dtype).itemsize
        nbytes = per_sample * (batch_size if s.shape else 1)
        total += nbytes
        if worst is None or nbytes > worst[1]:
            worst = (s, nbytes, per_sample)
    if worst is None or total <= budget:
        return
    s, nbytes, per_sample = worst
    raise InputModelError(
        f"{model}: input {s.name!r} is declared {list(s.shape)} ({s.dtype}): one sample is "
        f"{human_bytes(per_sample)}, a batch of {batch_size} {human_bytes(nbytes)}, over "
        + _budget_line(budget),
        hint="a model input this size cannot be fed on this machine: re-export the model with "
        "its real (or a symbolic) input size",
    )


def check_graph_sizes(path: Path, budget: int | None = None) -> None:
    """Refuse a graph with a tensor whose shape is known before running (a ``ConstantOfShape``
    of a constant shape, or any shape ONNX shape inference can compute) and whose size exceeds
    the memory budget, naming the node. A graph shape inference cannot read is left to the
    load probe."""
    import onnx
    from onnx import numpy_helper

    budget = budget or memory_budget_bytes()
    model = onnx.load(str(path), load_external_data=False)
    producer = {o: n for n in model.graph.node for o in n.output}
    consts = {t.name: t for t in model.graph.initializer if not t.external_data}

    def refuse(node, tensor: str, dims: list[int], dtype: str, nbytes: int):
        name = node.name if node is not None else ""
        op = node.op_type if node is not None else "?"
        raise InputModelError(
            f"{path}: node {name!r} ({op}) makes tensor {tensor!r} of shape {dims} ({dtype}): "
            f"{human_bytes(nbytes)}, over " + _budget_line(budget),
            hint="the graph asks for more memory than this machine has; fix the shape it "
            "computes (re-export the model)",
        )

    for node in model.graph.node:  # direct: no shape inference needed
        if node.op_type == "ConstantOfShape" and node.input and node.input[0] in consts:
            dims = [int(x) for x in numpy_helper.to_array(consts[node.input[0]]).reshape(-1)]
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            dt = onnx.helper.tensor_dtype_to_np_dtype(value.data_type) if value else np.float32
            nbytes = math.prod(dims) * np.dtype(dt).itemsize
            if nbytes > budget:
                refuse(node, node.output[0], dims, np.dtype(dt).name, nbytes)
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # noqa: BLE001 - onnx raises many types; the load probe judges the model
        return
    for vi in [*inferred.graph.value_info, *inferred.graph.output]:
        tt = vi.type.tensor_type
        if not vi.type.HasField("tensor_type") or not tt.HasField("shape"):
            continue
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
        if any(d is None or d <= 0 for d in dims):
            continue
        try:
            item = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)).itemsize
        except (KeyError, TypeError, ValueError):
            continue
        nbytes = math.prod(dims) * item
        if nbytes > budget:
            dt = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)).name
            refuse(producer.get(vi.name), vi.name, dims, dt, nbytes)


def judge_probe(path: Path, verdict: tuple[str, object], inputs: str):
    """The outputs of a probe that ran, or the typed error for one that did not: exit 5 for a
    model onnxruntime cannot load, exit 2 for one that does not run on ``inputs`` (a
    description of the feed)."""
    status, payload = verdict
    if status == "ok":
        return payload
    if status == "load":
        raise InputModelError(
            f"{path}: onnxruntime cannot load the model: {payload}",
            hint="the model needs an op, domain or opset this onnxruntime does not have: "
            "re-export it for a released opset with standard ops, or upgrade onnxruntime",
        )
    raise InputShapeError(f"{path}: the model does not run on the inputs {inputs}: {payload}")
