"""FP16 conversion with fp32 inputs/outputs, an op block list and automatic fallback.

Every node whose output overflows fp16 (|x| > 65504) or goes NaN/inf on the calibration data,
measured on the fp32 graph (graph outputs included), stays in fp32, and so do the consumers of
that output: they would read it as inf. The converter round-trips the values between two fp32
nodes through fp16 (Cast to fp16, Cast back); those round trips are removed, so a tensor kept
in fp32 never passes through fp16.

onnxruntime's CPU provider has no fp16 kernel for most ops and computes them in fp32 (it
inserts Casts and removes the inner ones), so CPU parity does not see fp16 overflow (issue 12:
``x*60000 + x*60000`` passed parity with max diff 110 while true fp16 gives inf). The variant
is therefore also run in true fp16 arithmetic with the ONNX reference evaluator (numpy, every
op rounded to fp16) on a few calibration samples; where that evaluator lacks an op (contrib
ops of fused graphs) the variant carries a warning that its parity was measured upcast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from deployopt.graphs import order_nodes
from deployopt.inputs import batch_rows, count_samples
from deployopt.parity import FP16
from deployopt.stages.base import Context, StageOutput, save_model

FP16_MAX = 65504.0


class Fp16Stage:
    name: ClassVar[str] = "fp16"
    label = "fp16"
    version: ClassVar[int] = 3  # 2: topologically sorted; 3: consumers fp32, no round trips
    tolerance = FP16
    parent: ClassVar[tuple[str, ...]] = ("fuse", "fp32")

    def __init__(self, op_block_list: tuple[str, ...] = ()):
        self.op_block_list = tuple(sorted(set(op_block_list)))

    def params(self) -> dict[str, Any]:
        return {"keep_io_types": True, "op_block_list": list(self.op_block_list)}

    def skip_reason(self, src: Path, ctx: Context) -> str | None:
        return None

    def apply(self, src: Path, out_dir: Path, ctx: Context) -> StageOutput:
        import onnx
        from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

        model = onnx.load(str(src))
        for i, node in enumerate(model.graph.node):  # the block list addresses nodes by name
            if not node.name:
                node.name = f"{node.op_type}_{i}"
        produced = {o: n.name for n in model.graph.node for o in n.output if o}
        hot = (
            ctx.isolated(
                overflowing_tensors, src, list(produced), ctx.calibration[:4], label="fp16 probe"
            )
            if ctx.calibration
            else []
        )
        overflow = fp32_nodes(model.graph, hot)
        blocked_ops = sorted(set(DEFAULT_OP_BLOCK_LIST) | set(self.op_block_list))
        fp16 = convert_float_to_float16(
            model,
            keep_io_types=True,
            op_block_list=blocked_ops,
            node_block_list=overflow,
        )
        # the converter leaves value_info entries with their fp32 types, which full shape
        # inference (onnx.checker) rejects; the graph's own inputs and outputs carry the types
        del fp16.graph.value_info[:]
        kept = set(overflow) | {n.name for n in fp16.graph.node if n.op_type in blocked_ops}
        drop_fp16_round_trips(fp16.graph, kept)
        order_nodes(fp16.graph)  # the converter appends its input Casts at the end
        path = save_model(fp16, out_dir)
        out = StageOutput()
        out.metrics["fp32_fallback_nodes"] = overflow
        out.metrics["overflowing_tensors"] = list(hot)
        out.metrics["op_block_list"] = list(self.op_block_list)
        sample = _first_samples(ctx.calibration, TRUE_FP16_SAMPLES)
        if sample:
            check = ctx.isolated(true_fp16_check, src, path, sample, label="fp16 arithmetic")
            out.metrics["fp16_arithmetic"] = check
            _judge_true_fp16(check, out)
        return out


TRUE_FP16_SAMPLES = 4  # the reference evaluator is numpy, op by op: a few samples only
UPCAST_NOTE = (
    "parity was measured with onnxruntime's CPU provider, which computes fp16 ops without an "
    "fp16 kernel in fp32 (it upcasts), so fp16 overflow on a GPU can go unseen"
)


def fp32_nodes(graph, hot: list[str]) -> list[str]:
    """Names of the nodes that stay fp32 for the overflowing tensors ``hot``: each one's
    producer (graph outputs included) and every consumer, which would read it as inf."""
    names = set()
    hot_set = set(hot)
    for n in graph.node:
        if hot_set.intersection(n.output) or hot_set.intersection(n.input):
            names.add(n.name)
    return sorted(names)


def drop_fp16_round_trips(graph, kept: set[str]) -> int:
    """Replace ``Cast(to=fp32)(Cast(to=fp16)(t))`` by ``Identity(t)`` where ``t`` is known to be
    fp32 (a float graph input or initializer, a Cast to fp32, or the output of a node kept in
    fp32): the converter puts such a round trip between two fp32 nodes, and it turns a value
    beyond 65504 into inf. Casts left without a consumer are removed. Returns the count."""
    from onnx import TensorProto

    def cast_to(n) -> int | None:
        if n.op_type != "Cast":
            return None
        return next((a.i for a in n.attribute if a.name == "to"), None)

    producer = {o: n for n in graph.node for o in n.output if o}
    fp32 = {i.name for i in graph.input if i.type.tensor_type.elem_type == TensorProto.FLOAT}
    fp32 |= {i.name for i in graph.initializer if i.data_type == TensorProto.FLOAT}
    for n in graph.node:
        if n.name in kept or cast_to(n) == TensorProto.FLOAT:
            fp32.update(n.output)
    changed = 0
    for n in graph.node:
        inner = producer.get(n.input[0]) if cast_to(n) == TensorProto.FLOAT else None
        if inner is None or cast_to(inner) != TensorProto.FLOAT16 or inner.input[0] not in fp32:
            continue
        src = inner.input[0]
        del n.attribute[:]
        n.op_type, n.domain = "Identity", ""
        n.input[0] = src
        changed += 1
    outputs = {o.name for o in graph.output}
    while True:  # the inner Casts that fed only round trips
        used = {i for n in graph.node for i in n.input} | outputs
        dead = [n for n in graph.node if n.op_type == "Cast" and not used.intersection(n.output)]
        if not dead:
            return changed
        for n in dead:
            graph.node.remove(n)


def _first_samples(batches, n: int) -> list:
    """The leading batches holding ``n`` samples; the last one cut to size where every input
    leads with the batch (never a scalar or a state tensor, whose first axis is not it)."""
    out, left = [], n
    for b in batches:
        if left <= 0:
            break
        leading = {np.shape(a)[0] if np.ndim(a) else None for a in b.values()}
        if len(leading) == 1 and None not in leading and batch_rows(b) > left:
            b = {k: v[:left] for k, v in b.items()}
        out.append(b)
        left -= batch_rows(b)
    return out


def _judge_true_fp16(check: dict, out: StageOutput) -> None:
    """Fail the variant when true fp16 arithmetic overflows or misses the fp16 tolerance; warn
    plainly when it could not be run."""
    from deployopt.errors import StageError

    if check.get("unsupported"):
        out.warnings.append(
            f"{UPCAST_NOTE}; true fp16 arithmetic was not checked: the ONNX reference evaluator "
            f"cannot run the model ({check['unsupported']})"
        )
        return
    where = f"in true fp16 arithmetic (ONNX reference evaluator, {check['samples']} samples)"
    bad = check.get("overflow")
    if bad:
        raise StageError(
            f"fp16: tensor {bad['tensor']!r} (node {bad['node']!r}, {bad['op']}) goes inf/NaN "
            f"{where}",
            hint=f"keep that op in fp32: --fp16-block-ops {bad['op']}",
        )
    if check.get("failures"):
        raise StageError(f"fp16: parity vs fp32 {where} failed: " + "; ".join(check["failures"]))


def true_fp16_check(fp32_path: Path, fp16_path: Path, batches) -> dict:
    """Run the fp32 and the fp16 model with the ONNX reference evaluator (every op in its own
    dtype: fp16 ops round to fp16) on ``batches``; for a worker process. Returns
    ``{"samples", "unsupported"}`` where the evaluator cannot run a model, else the first tensor
    that goes non-finite with finite inputs (``overflow``: tensor, node, op) and the parity of
    the outputs against fp32 at the fp16 tolerance (``failures``, ``max_abs_diff``,
    ``mean_cosine``)."""
    import warnings

    import onnx
    from onnx.reference import ReferenceEvaluator

    from deployopt.parity import compare

    n = count_samples(batches)
    result: dict[str, Any] = {"samples": n, "unsupported": None, "overflow": None}
    try:
        ref32 = ReferenceEvaluator(str(fp32_path))
        ref16 = ReferenceEvaluator(str(fp16_path))
    except Exception as e:  # an op it has no implementation of, e.g. a com.microsoft one
        result["unsupported"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        return result
    model = onnx.load(str(fp16_path), load_external_data=False)
    outs = [o.name for o in model.graph.output]
    want32 = [o.name for o in onnx.load(str(fp32_path), load_external_data=False).graph.output]
    refs, cands = [], []
    for b in batches:
        with warnings.catch_warnings():  # numpy's "overflow encountered": measured below
            warnings.simplefilter("ignore", RuntimeWarning)
            try:
                values = ref16.run(None, dict(b), intermediate=True)
                r32 = ref32.run(want32, dict(b))
            except Exception as e:
                result["unsupported"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                return result
        if result["overflow"] is None:
            result["overflow"] = first_nonfinite(model.graph, values)
        refs.append(dict(zip(want32, r32)))
        cands.append({k: np.asarray(values[k]) for k in outs})
    from deployopt.parity import FP16

    rep = compare(refs, cands, FP16)
    s = rep.summary()
    result.update(
        failures=list(rep.failures), max_abs_diff=s["max_abs_diff"], mean_cosine=s["mean_cosine"]
    )
    return result


def first_nonfinite(graph, values: dict) -> dict | None:
    """The first node, in graph order, writing a NaN/inf float tensor from finite inputs."""

    def bad(name: str) -> bool:
        a = values.get(name)
        if a is None:
            return False
        a = np.asarray(a)
        return np.issubdtype(a.dtype, np.floating) and a.size > 0 and not np.isfinite(a).all()

    for node in graph.node:
        if any(bad(i) for i in node.input if i):
            continue
        hit = next((o for o in node.output if o and bad(o)), None)
        if hit is not None:
            return {"tensor": hit, "node": node.name, "op": node.op_type}
    return None


def overflowing_tensors(src: Path, names: list[str], batches) -> list[str]:
    """The tensors among ``names`` of the model at ``src`` with a float value beyond the fp16
    range (or non-finite) on ``batches``; for a worker process (it runs onnxruntime)."""
    from deployopt.runtime.session import intermediate_tensors

    seen = intermediate_tensors(src, names, batches, reduce=_overflows)
    return sorted(t for t, flags in seen.items() if any(flags))


def _overflows(_name: str, arr) -> bool:
    a = np.asarray(arr)
    if not np.issubdtype(a.dtype, np.floating) or not a.size:
        return False
    return bool(not np.isfinite(a).all() or np.abs(a).max() > FP16_MAX)
