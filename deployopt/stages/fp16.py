"""FP16 conversion with fp32 inputs/outputs, an op block list and automatic fallback.

Nodes whose outputs overflow fp16 (|x| > 65504) or go NaN/inf on the calibration data, measured
on the fp32 graph, stay in fp32.
"""

from __future__ import annotations

import heapq
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from deployopt.parity import FP16
from deployopt.stages.base import Context, StageOutput, save_model

FP16_MAX = 65504.0


class Fp16Stage:
    name: ClassVar[str] = "fp16"
    label = "fp16"
    version: ClassVar[int] = 2  # 2: topologically sorted, no stale value_info
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
        overflow = sorted({produced[t] for t in hot})
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
        topological_sort(fp16.graph)  # the converter appends its input Casts at the end
        save_model(fp16, out_dir)
        out = StageOutput()
        out.metrics["fp32_fallback_nodes"] = overflow
        out.metrics["op_block_list"] = list(self.op_block_list)
        return out


def topological_sort(graph) -> None:
    """Reorder ``graph.node`` so every node comes after the producers of its inputs, keeping
    the original order where it already holds (stable Kahn's algorithm)."""
    nodes = list(graph.node)
    producer = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    deps = [{producer[x] for x in n.input if x in producer and producer[x] != i}
            for i, n in enumerate(nodes)]  # fmt: skip
    users: dict[int, list[int]] = {}
    for i, d in enumerate(deps):
        for j in d:
            users.setdefault(j, []).append(i)
    left = [len(d) for d in deps]
    ready = [i for i, n in enumerate(left) if n == 0]
    order: list[int] = []
    heapq.heapify(ready)
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for u in users.get(i, []):
            left[u] -= 1
            if left[u] == 0:
                heapq.heappush(ready, u)
    if len(order) != len(nodes):
        return  # a cycle: leave the graph as it is, the checker will say so
    del graph.node[:]
    graph.node.extend(nodes[i] for i in order)


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
