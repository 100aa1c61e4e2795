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
    label = "fuse"
    version: ClassVar[int] = 2  # 2: Attention weights folded, padding mask as mask_index
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
        fold_attention_weights(opt.model)
        if model_type == "bert":  # encoders: the additive bias is a padding mask only
            padding_mask_as_mask_index(opt.model)
        return opt.model, f"onnxscript ort_fusions + onnxruntime.transformers ({model_type})"

    @staticmethod
    def _generic(src: Path, out_dir: Path, ctx: Context):
        import onnx

        from deployopt.runtime.session import offline_optimize

        # EXTENDED, not ALL: ALL adds layout transforms tied to this machine's CPU.
        tmp = out_dir / "ort-optimized.onnx"
        ctx.isolated(offline_optimize, src, tmp, "extended", label="fuse")
        model = onnx.load(str(tmp))
        tmp.unlink()
        return model


def fold_attention_weights(model) -> int:
    """Give each fused ``Attention`` its packed QKV weight and bias as initializers.

    onnxscript's fusion packs Q, K and V with a ``Concat`` of three initializers evaluated at
    run time, and writes ``qkv_hidden_sizes`` even when the three are equal. onnxruntime's
    quantizer turns Attention into QAttention only when the weight is an initializer and that
    attribute is absent, so the packing is folded here (exact) and the redundant attribute
    dropped. Returns the number of Attention nodes changed."""
    import numpy as np
    from onnx import numpy_helper

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    uses: dict[str, int] = {}
    for n in g.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    dead, changed = [], 0
    for node in (n for n in g.node if n.op_type == "Attention"):
        for idx in (1, 2):
            name = node.input[idx] if len(node.input) > idx else ""
            cat = producer.get(name)
            if cat is None or cat.op_type != "Concat" or uses.get(name) != 1:
                continue
            if not all(i in inits for i in cat.input):
                continue
            axis = next((a.i for a in cat.attribute if a.name == "axis"), 0)
            arr = np.concatenate([numpy_helper.to_array(inits[i]) for i in cat.input], axis=axis)
            g.initializer.append(numpy_helper.from_array(arr, name))
            dead.append(cat)
            changed += 1
        sizes = next((a for a in node.attribute if a.name == "qkv_hidden_sizes"), None)
        if sizes is not None and len(set(sizes.ints)) == 1:
            node.attribute.remove(sizes)
    for cat in dead:
        g.node.remove(cat)
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    for init in [i for i in g.initializer if i.name not in used]:
        g.initializer.remove(init)
    return changed


def padding_mask_as_mask_index(model, mask_input: str = "attention_mask") -> int:
    """Feed each fused ``Attention`` the graph's 2-D padding mask as its ``mask_index`` instead
    of the additive ``attention_bias`` the dynamo export builds from it.

    The dynamo export of a BERT encoder turns ``attention_mask`` into a [batch, 1, seq, seq]
    additive bias; onnxruntime's quantizer drops that input when it makes QAttention (measured
    on all-MiniLM-L6-v2: mean cosine 0.87, padding no longer masked), while the raw mask is an
    input both kernels take. Only for encoder graphs (no causal part in the bias), only where
    the bias is computed from ``mask_input``; the fuse parity against fp32 proves the result.
    Returns the number of Attention nodes rewired."""
    from onnx import TensorProto, helper

    g = model.graph
    if not any(i.name == mask_input for i in g.input):
        return 0
    producer = {o: n for n in g.node for o in n.output}

    def depends_on_mask(name: str) -> bool:
        seen, todo = set(), [name]
        while todo:
            t = todo.pop()
            if t == mask_input:
                return True
            if t in seen or t not in producer:
                continue
            seen.add(t)
            todo.extend(producer[t].input)
        return False

    mask32 = f"{mask_input}_int32"
    changed = 0
    for node in (n for n in g.node if n.op_type == "Attention"):
        ins = list(node.input) + [""] * (6 - len(node.input))
        if ins[3] or ins[4] or not ins[5] or len(node.input) > 6 or not depends_on_mask(ins[5]):
            continue
        del node.input[:]
        node.input.extend([*ins[:3], mask32])
        changed += 1
    if changed:
        cast = helper.make_node(
            "Cast", [mask_input], [mask32], name=f"{mask_input}_to_int32", to=TensorProto.INT32
        )
        g.node.insert(0, cast)
        used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
        for n in [n for n in g.node if not any(o in used for o in n.output)]:
            _remove_dead(g, n)
    return changed


def _remove_dead(graph, node) -> None:
    """Remove ``node`` and, transitively, producers left without consumers."""
    todo = [node]
    while todo:
        n = todo.pop()
        if n not in graph.node:
            continue
        graph.node.remove(n)
        used = {i for m in graph.node for i in m.input} | {o.name for o in graph.output}
        producer = {o: m for m in graph.node for o in m.output}
        todo += [producer[i] for i in n.input if i in producer and i not in used]


def split_skip_layernorm(model) -> int:
    """Rewrite each ``SkipLayerNormalization`` back into ``Add`` (+ bias ``Add``) and
    ``LayerNormalization`` (exact). Its CPU kernel was measured slower than the two ops it
    replaces (onnxruntime 1.32, 1 x 128 x 384: 216 vs 68 us), so on a CPU target a fused graph
    may run faster without it; whether it does is measured, never assumed. Nodes whose mean or
    inverse-std outputs are consumed are left alone. Returns the number of nodes split."""
    from onnx import helper

    g = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 17:  # LayerNormalization is an ONNX op from opset 17
        return 0
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    nodes, split = [], 0
    for n in g.node:
        outs = list(n.output) + [""] * (4 - len(n.output))
        if n.op_type != "SkipLayerNormalization" or any(o in used for o in outs[1:3] if o):
            nodes.append(n)
            continue
        eps = next((a.f for a in n.attribute if a.name == "epsilon"), 1e-12)
        ins = list(n.input) + [""] * (5 - len(n.input))
        # residual Add first, then the bias Add: onnxruntime 1.32 does not fuse this order back
        # into SkipLayerNormalization at session creation (bias first, it does; measured)
        total = outs[3] or f"{n.name}_sum"  # the sum output, where the graph uses it
        skip_sum = f"{n.name}_skip_sum" if ins[4] else total
        nodes.append(helper.make_node("Add", ins[:2], [skip_sum], name=f"{n.name}_add"))
        if ins[4]:
            nodes.append(
                helper.make_node("Add", [skip_sum, ins[4]], [total], name=f"{n.name}_bias")
            )
        ln_in = [total, ins[2]] + ([ins[3]] if ins[3] else [])
        nodes.append(
            helper.make_node(
                "LayerNormalization", ln_in, [outs[0]], name=f"{n.name}_ln", axis=-1, epsilon=eps
            )
        )
        split += 1
    del g.node[:]
    g.node.extend(nodes)
    return split
