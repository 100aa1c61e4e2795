"""FP16 conversion with fp32 inputs/outputs, an op block list and automatic fallback.

Nodes whose outputs overflow fp16 (|x| > 65504) or go NaN/inf on the calibration data, measured
on the fp32 graph, stay in fp32.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from deployopt.parity import FP16
from deployopt.stages.base import Context, StageOutput, save_model

FP16_MAX = 65504.0


class Fp16Stage:
    name: ClassVar[str] = "fp16"
    version: ClassVar[int] = 1
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
        overflow = overflowing_nodes(out_dir, model, ctx.calibration[:4])
        blocked_ops = sorted(set(DEFAULT_OP_BLOCK_LIST) | set(self.op_block_list))
        fp16 = convert_float_to_float16(
            model,
            keep_io_types=True,
            op_block_list=blocked_ops,
            node_block_list=overflow,
        )
        save_model(fp16, out_dir)
        out = StageOutput()
        out.metrics["fp32_fallback_nodes"] = overflow
        out.metrics["op_block_list"] = list(self.op_block_list)
        return out


def overflowing_nodes(scratch: Path, model, batches) -> list[str]:
    """Names of nodes with a float output beyond the fp16 range (or non-finite) on ``batches``."""
    import onnx

    from deployopt.runtime.session import create_session

    if not batches:
        return []
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    produced = {}
    existing = {o.name for o in probe.graph.output}
    for node in probe.graph.node:
        for o in node.output:
            if o and o not in existing:
                produced[o] = node.name
                probe.graph.output.append(onnx.ValueInfoProto(name=o))
    tmp = scratch / ".fp16-probe.onnx"
    try:
        onnx.save_model(probe, str(tmp))
        sess = create_session(tmp, optimization="disable")
        names = [o.name for o in sess.get_outputs()]
        wanted = {i.name for i in sess.get_inputs()}
        bad: set[str] = set()
        for b in batches:
            res = sess.run(names, {k: v for k, v in b.items() if k in wanted})
            for name, arr in zip(names, res):
                if name in produced and np.issubdtype(np.asarray(arr).dtype, np.floating):
                    a = np.asarray(arr)
                    if a.size and (not np.isfinite(a).all() or np.abs(a).max() > FP16_MAX):
                        bad.add(produced[name])
        return sorted(bad)
    finally:
        tmp.unlink(missing_ok=True)
