"""Inputs for models whose inputs do not all lead with a batch axis: int64 scalars (a voice
model's ``sr``), recurrent state (``state: [2, batch, 128]``) and dims written as 0.

The ordinary path (:func:`deployopt.inputs.synthetic_batches`) puts the batch first in every
input. That is wrong for a scalar (it has no axis) and for a state tensor (its first axis is
fixed), so a model with either is fed here instead:

* a *batched* input leads with an unknown dim, which is the batch;
* in any other input, an unknown dim that is unnamed (or written as 0) or named like a batched
  input's leading dim is the batch too (recurrent state carries one row per sequence); a dim
  with another name gets the default size;
* a scalar gets the constant it is compared with in the graph (``Equal(sr, 16000)`` feeding
  an ``If`` gives 16000, so the branch the model is meant for runs), else 1;
* evaluation batches hold one sample each: how a state's rows pair with the other inputs' is
  the model's business, and batch 1 is the case every such model supports.

Dims written as 0 (or negative) on the graph's inputs and outputs are read as unknown:
onnxruntime would otherwise insist on empty tensors. :func:`unknown_zero_dims` rewrites them
as named dims in deployopt's working copy of the model, and says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from deployopt.inputs import Batch, InputSpec

DEFAULT_DIM = 16
UNKNOWN_PREFIX = "unk_"  # dims deployopt named because the model gave them no name (or 0)
_COMPARES = ("Equal", "Greater", "Less", "GreaterOrEqual", "LessOrEqual")


def unknown_zero_dims(model) -> list[str]:
    """Rewrite dims written as 0 (or negative) as named unknown dims, in place, on the graph's
    inputs and outputs and on every declared value of it and its subgraphs (``If``/``Loop``/
    ``Scan`` bodies: onnxruntime checks their outputs too); return one line per rewritten graph
    input or output (for the fp32 variant's warnings)."""
    changed: list[str] = []

    def fix(vi, kind: str | None) -> None:
        if not vi.type.HasField("tensor_type"):
            return
        axes = []
        for i, d in enumerate(vi.type.tensor_type.shape.dim):
            if d.HasField("dim_value") and d.dim_value <= 0:
                d.dim_param = f"{UNKNOWN_PREFIX}{vi.name}_{i}"  # clears dim_value (a oneof)
                axes.append(str(i))
        if axes and kind:
            changed.append(
                f"{kind} {vi.name!r}: dim(s) {', '.join(axes)} written as 0, read as unknown"
            )

    def walk(graph, top: bool) -> None:
        for vi in graph.input:
            fix(vi, "input" if top else None)
        for vi in graph.output:
            fix(vi, "output" if top else None)
        for vi in graph.value_info:
            fix(vi, None)
        for node in graph.node:
            for attr in node.attribute:
                if attr.HasField("g"):
                    walk(attr.g, False)
                for g in attr.graphs:
                    walk(g, False)

    walk(model.graph, True)
    return changed


def _batched(s: InputSpec) -> bool:
    return len(s.shape) >= 1 and not isinstance(s.shape[0], int)


def is_stateful(specs: Sequence[InputSpec]) -> bool:
    """Whether the inputs need this module: a scalar input, or batched inputs beside one whose
    first axis is fixed (recurrent state)."""
    if any(len(s.shape) == 0 for s in specs):
        return True
    return any(_batched(s) for s in specs) and any(not _batched(s) for s in specs)


def scalar_values(model, specs: Sequence[InputSpec]) -> dict[str, float]:
    """For each scalar input, the constant the graph compares it with (first found, subgraphs
    included), when there is one."""
    from onnx import numpy_helper

    scalars = {s.name for s in specs if len(s.shape) == 0}
    consts: dict[str, np.ndarray] = {}
    found: dict[str, float] = {}

    def walk(graph) -> None:
        for t in graph.initializer:
            consts[t.name] = numpy_helper.to_array(t)
        for node in graph.node:
            if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
                consts[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
        for node in graph.node:
            if node.op_type in _COMPARES and len(node.input) == 2:
                a, b = node.input
                for x, c in ((a, b), (b, a)):
                    if x in scalars and x not in found and c in consts and consts[c].size == 1:
                        found[x] = float(consts[c].reshape(-1)[0])
            for attr in node.attribute:
                if attr.HasField("g"):
                    walk(attr.g)
                for g in attr.graphs:
                    walk(g)

    walk(model.graph)
    return found


def feed_shapes(
    specs: Sequence[InputSpec], batch: int, other: int = DEFAULT_DIM
) -> dict[str, tuple[int, ...]]:
    """Concrete shapes under the rules of the module docstring."""
    leading = {s.shape[0] for s in specs if _batched(s)}
    shapes = {}
    for s in specs:
        dims = []
        for i, d in enumerate(s.shape):
            if isinstance(d, int) and d > 0:
                dims.append(d)
            elif _batched(s) and i == 0:
                dims.append(batch)
            elif not _batched(s) and (
                not isinstance(d, str)
                or d in leading
                or d.startswith(UNKNOWN_PREFIX)
                or d == f"dim{i}"  # specs_from_onnx's name for a dim with no name at all
            ):
                dims.append(batch)
            else:
                dims.append(other)
        shapes[s.name] = tuple(dims)
    return shapes


def stateful_feed(
    specs: Sequence[InputSpec],
    values: dict[str, float],
    batch: int,
    rng: np.random.Generator,
    other: int = DEFAULT_DIM,
) -> Batch:
    """One feed: batched inputs first (``len(feed[first])`` is the sample count), floats
    ~ N(0, 1), ints in [0, 100), masks of ones, scalars from ``values`` (else 1)."""
    shapes = feed_shapes(specs, batch, other)
    feed: Batch = {}
    for s in sorted(specs, key=lambda s: not _batched(s)):
        dt = np.dtype(s.dtype)
        shape = shapes[s.name]
        if not shape:
            feed[s.name] = np.array(values.get(s.name, 1), dtype=dt)
        elif s.name == "attention_mask" or dt == np.bool_:
            feed[s.name] = np.ones(shape, dtype=dt)
        elif np.issubdtype(dt, np.integer):
            feed[s.name] = rng.integers(0, 100, size=shape).astype(dt)
        else:
            feed[s.name] = rng.standard_normal(shape).astype(dt)
    return feed


def stateful_batches(
    specs: Sequence[InputSpec], model_path: Path, samples: int, seed: int = 0
) -> list[Batch]:
    """``samples`` seeded single-sample feeds for a model with scalar or state inputs."""
    import onnx

    values = scalar_values(onnx.load(str(model_path), load_external_data=False), specs)
    rng = np.random.default_rng(seed)
    return [stateful_feed(specs, values, 1, rng) for _ in range(samples)]


def bench_feed(path: Path, specs: Sequence[InputSpec], batch: int, seq: int) -> Batch | None:
    """Benchmark inputs for a model with scalar or state inputs (None for any other model):
    the batch at ``batch``, other unknown dims at ``seq``."""
    if not is_stateful(specs):
        return None
    import onnx

    values = scalar_values(onnx.load(str(path), load_external_data=False), specs)
    return stateful_feed(specs, values, batch, np.random.default_rng(0), other=seq)


def describe(batch: Batch) -> str:
    """``input [1, 16] float32, sr 16000 int64``: the shapes (and scalar values) of a feed."""
    parts = []
    for k, v in batch.items():
        what = f"{v.item():g}" if v.ndim == 0 else str(list(v.shape))
        parts.append(f"{k} {what} {v.dtype}")
    return ", ".join(parts)


def unknown_zero_specs(specs: Sequence[InputSpec]) -> list[InputSpec]:
    """``specs`` with dims written as 0 (or negative) named as :func:`unknown_zero_dims` names
    them in the working copy."""
    return [
        InputSpec(
            s.name,
            s.dtype,
            tuple(
                f"{UNKNOWN_PREFIX}{s.name}_{i}" if isinstance(d, int) and d <= 0 else d
                for i, d in enumerate(s.shape)
            ),
        )
        for s in specs
    ]
