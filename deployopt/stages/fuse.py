"""Graph fusion: onnxruntime's transformer optimizer for transformers, ORT's offline
optimization otherwise.

The dynamo exporter writes attention as MatMul/Softmax with a boolean-mask pattern that
onnxruntime's BERT fuser does not match, so transformer graphs first go through onnxscript's
ORT fusion rules (which know the dynamo patterns: Attention, SkipLayerNormalization, BiasGelu),
then through ``onnxruntime.transformers.optimizer`` for what is left.
"""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path
from typing import Any, ClassVar

from deployopt.parity import EXACT
from deployopt.stages.base import Context, StageOutput, op_counts, save_model

FUSED_OPS = (
    "Attention",
    "MultiHeadAttention",
    "SkipLayerNormalization",
    "EmbedLayerNormalization",
    "FastGelu",
    "BiasGelu",
    "Gelu",
    "LayerNormalization",
)
# transformers model_type -> onnxruntime.transformers optimizer model_type
ORT_MODEL_TYPES = {
    "bert": "bert",
    "roberta": "bert",
    "xlm-roberta": "bert",
    "distilbert": "bert",
    "electra": "bert",
    "albert": "bert",
    "mpnet": "bert",
    "camembert": "bert",
    "gpt2": "gpt2",
    "bart": "bart",
    "t5": "t5",
    "vit": "vit",
    "swin": "swin",
    "clip": "clip",
}


def looks_like_transformer(model) -> bool:
    ops = op_counts(model)
    return ops["Softmax"] > 0 and (ops["LayerNormalization"] > 0 or ops["ReduceMean"] > 0)


class FuseStage:
    name: ClassVar[str] = "fuse"
    version: ClassVar[int] = 1
    tolerance = EXACT
    parent: ClassVar[tuple[str, ...]] = ("fp32",)

    def params(self) -> dict[str, Any]:
        return {}

    def skip_reason(self, src: Path, ctx: Context) -> str | None:
        return None

    def apply(self, src: Path, out_dir: Path, ctx: Context) -> StageOutput:
        import onnx

        model = onnx.load(str(src))
        meta = ctx.meta
        transformer = meta.is_transformer or looks_like_transformer(model)
        out = StageOutput()
        if transformer:
            fused, how = self._transformer(model, meta)
            out.metrics["method"] = how
        else:
            fused = self._generic(src, out_dir, ctx)
            out.metrics["method"] = "onnxruntime offline optimization (extended)"
        counts = op_counts(fused)
        out.metrics["fused"] = {op: counts[op] for op in FUSED_OPS if counts[op]}
        out.metrics["nodes"] = len(fused.graph.node)
        out.metrics["nodes_before"] = len(model.graph.node)
        if transformer and counts["Attention"] + counts["MultiHeadAttention"] == 0:
            out.warnings.append(
                "transformer graph got no attention fusion: attention runs as unfused "
                "MatMul/Softmax (export with eager attention, or check model_type)"
            )
        save_model(fused, out_dir)
        return out

    @staticmethod
    def _transformer(model, meta):
        import onnx_ir as ir
        from onnxruntime.transformers.optimizer import optimize_model
        from onnxscript.rewriter import ort_fusions

        ir_model = ir.serde.deserialize_model(model)
        ir_model, _ = ort_fusions.optimize_for_ort(ir_model)
        pre = ir.serde.serialize_model(ir_model)
        model_type = ORT_MODEL_TYPES.get(meta.model_type or "", "bert")
        # onnxruntime's optimizer logs at WARNING for every pattern it does not find
        logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)
        with contextlib.redirect_stdout(io.StringIO()):
            opt = optimize_model(
                pre,
                model_type=model_type,
                num_heads=meta.num_heads or 0,  # 0: read from the graph
                hidden_size=meta.hidden_size or 0,
                opt_level=0,
            )
        return opt.model, f"onnxscript ort_fusions + onnxruntime.transformers ({model_type})"

    @staticmethod
    def _generic(src: Path, out_dir: Path, ctx: Context):
        import onnx

        from deployopt.runtime.session import ort

        rt = ort()
        so = rt.SessionOptions()
        # EXTENDED, not ALL: ALL adds layout transforms tied to this machine's CPU.
        so.graph_optimization_level = rt.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        tmp = out_dir / "ort-optimized.onnx"
        so.optimized_model_filepath = str(tmp)
        rt.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])
        model = onnx.load(str(tmp))
        tmp.unlink()
        return model
