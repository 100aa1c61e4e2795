"""Transformer stages on a 2-layer BERT built here, fp16 fallback, static INT8 search."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from deployopt.errors import DataError, NoViableVariantError
from tests.models import assert_contract, ok_variants, optimize_only


@pytest.fixture(scope="module")
def bert_run(tiny_bert_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bert-out")
    return optimize_only(str(tiny_bert_dir), out)


def test_tiny_bert_export_matches_pytorch_on_untraced_shapes(bert_run, tiny_bert_dir):
    import onnxruntime as ort
    from transformers import AutoModel, AutoTokenizer

    fp32 = bert_run.by_name("fp32")
    assert fp32.ok
    tok = AutoTokenizer.from_pretrained(str(tiny_bert_dir))
    model = AutoModel.from_pretrained(str(tiny_bert_dir)).eval()
    enc = tok(
        ["how do i test a model", "rain", "the stock market is fast today and the price"],
        padding=True,
        return_tensors="np",
    )  # batch 3, length unlike the traced 2 x 16
    sess = ort.InferenceSession(str(fp32.path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids")})
    with torch.no_grad():
        ref = model(**{k: torch.from_numpy(v) for k, v in enc.items()}).last_hidden_state
    np.testing.assert_allclose(got[0], ref.numpy(), atol=1e-4)
    names = [o.name for o in sess.get_outputs()]
    assert names == ["last_hidden_state"]
    graph_input = onnx.load(str(fp32.path)).graph.input[0]
    dims = [d.dim_param for d in graph_input.type.tensor_type.shape.dim]
    assert dims == ["batch", "sequence"]


def test_tiny_bert_fusion_counts(bert_run):
    fuse = bert_run.by_name("fuse")
    assert fuse.ok, fuse.reason
    fused = fuse.metrics["fused"]
    assert fused.get("Attention", 0) + fused.get("MultiHeadAttention", 0) == 2  # one per layer
    assert fused.get("SkipLayerNormalization", 0) >= 3
    assert not fuse.warnings
    ops = {n.op_type for n in onnx.load(str(fuse.path)).graph.node}
    assert "Softmax" not in ops


def test_tiny_bert_all_variants_within_tolerance(bert_run):
    assert_contract(bert_run)
    for stage in ("fuse", "int8-dynamic", "int8-static", "fp16"):
        assert ok_variants(bert_run, stage), stage
    # mixed precision: the MatMuls kept fp32 are the ones the ranking put first, and the
    # worst sample is no worse than with every MatMul in int8
    mixed = [v for v in bert_run.variants if v.params.get("fp32_matmuls")]
    assert mixed and all(len(v.metrics["fp32_nodes"]) == v.params["fp32_matmuls"] for v in mixed)
    assert bert_run.meta["data"]["eval"].startswith("bundled eval sentences (240")


def test_text_classifier_records_argmax_agreement(tiny_bert_classifier_dir, tmp_path):
    res = optimize_only(str(tiny_bert_classifier_dir), tmp_path, variants=["int8-dynamic"])
    assert res.meta["task"] == "text-classification"
    dyn = [v for v in res.variants if v.stage == "int8-dynamic" and v.parity]
    assert dyn and all(v.parity["argmax_agreement"] is not None for v in dyn)
    assert_contract(res)
    assert ok_variants(res, "int8-dynamic")


class Overflow(nn.Module):
    """An intermediate beyond fp16's range (|x| > 65504) that the output scales back down."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.up = nn.Linear(8, 8)
        self.down = nn.Linear(8, 3)
        with torch.no_grad():
            self.up.weight.mul_(1e5)

    def forward(self, x):
        return self.down(self.up(x) * 1e-5)


def test_fp16_keeps_overflowing_nodes_in_fp32(tmp_path):
    res = optimize_only(Overflow(), tmp_path, input_shapes={"x": (1, 8)}, variants=["fp16"])
    v = res.by_name("fp16")
    assert v.ok, v.reason
    assert v.metrics["fp32_fallback_nodes"], "the overflowing node was not detected"
    assert v.parity["nonfinite"] == 0
    m = onnx.load(str(v.path))
    assert m.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # keep_io_types


def test_static_search_failure_reports_every_configuration(tmp_path, monkeypatch):
    from deployopt.parity import Tolerance
    from deployopt.stages import quantize

    monkeypatch.setattr(
        quantize.StaticQuantStage, "tolerance", Tolerance(min_mean_cosine=1.01)
    )  # unreachable on purpose
    with pytest.raises(NoViableVariantError, match="no variant passed its checks") as e:
        optimize_only(
            "tests.models:mlp", tmp_path, input_shapes={"x": (1, 16)}, variants=["int8-static"]
        )
    res = e.value.result
    (v,) = [v for v in res.variants if v.stage == "int8-static"]  # its name follows the CPU
    assert v.status == "failed"
    assert "no static configuration met mean cosine >= 1.01" in v.reason
    tried = v.metrics["search"]
    assert len(tried) == len(quantize.DEFAULT_SEARCH)
    assert all("mean_cosine" in t or "error" in t for t in tried)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    entry = [e for e in manifest["variants"] if e["name"] == v.name][0]
    assert entry["status"] == "failed" and entry["path"] is None


def test_calibration_from_text_file_and_bad_jsonl(tiny_bert_dir, tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_text("\n".join(f"the model is fast day {i}" for i in range(24)))
    res = optimize_only(
        str(tiny_bert_dir), tmp_path / "o", variants=["int8-static"], calibration=calib
    )
    assert ok_variants(res, "int8-static")
    assert "calib.txt (24 texts)" in res.meta["data"]["calibration"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "fine too"}\nnot json\n')
    with pytest.raises(DataError, match=r"bad.jsonl:3: not a JSON object"):
        optimize_only(str(tiny_bert_dir), tmp_path / "o2", calibration=bad)


def test_uniform_batches_pads_and_drops_ragged_tail():
    from deployopt.stages.quantize import uniform_batches

    b = [
        {"ids": np.ones((2, 3), np.int64)},
        {"ids": np.ones((2, 5), np.int64)},
        {"ids": np.ones((1, 4), np.int64)},
    ]
    out = uniform_batches(b)
    assert [x["ids"].shape for x in out] == [(2, 5), (2, 5)]
    assert out[0]["ids"][:, 3:].sum() == 0 and out[0]["ids"][:, :3].sum() == 6


def test_hf_image_classifier_folder(tmp_path):
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(
        image_size=16,
        patch_size=4,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=64,
        num_labels=4,
        architectures=["ViTForImageClassification"],
    )
    torch.manual_seed(0)
    ViTForImageClassification(cfg).eval().save_pretrained(tmp_path / "vit")
    res = optimize_only(str(tmp_path / "vit"), tmp_path / "out", variants=["fuse", "int8-dynamic"])
    assert res.meta["task"] == "image-classification"
    assert_contract(res)
    assert res.by_name("fuse").ok
    dyn = ok_variants(res, "int8-dynamic")
    assert dyn and all(v.parity["argmax_agreement"] >= 0.95 for v in dyn)


def test_fused_attention_is_quantizable_and_split_layernorm_is_exact(bert_run, tiny_bert_dir):
    """The fuse stage leaves Attention with an initializer QKV weight and the raw padding mask,
    so the quantizer can make QAttention; splitting SkipLayerNormalization is an exact rewrite."""
    import onnxruntime as ort
    from transformers import AutoTokenizer

    from deployopt.stages.fuse import split_skip_layernorm

    fuse = bert_run.by_name("fuse")
    model = onnx.load(str(fuse.path))
    inits = {i.name for i in model.graph.initializer}
    att = [n for n in model.graph.node if n.op_type == "Attention"]
    assert att and all(n.input[1] in inits for n in att)
    assert not any(a.name == "qkv_hidden_sizes" for n in att for a in n.attribute)
    cast = next(n for n in model.graph.node if n.output[0] == att[0].input[3])
    assert cast.op_type == "Cast" and cast.input[0] == "attention_mask"
    fused_int8 = bert_run.by_name("int8-dynamic/fused")
    ops = {n.op_type for n in onnx.load(str(fused_int8.path)).graph.node}
    assert "QAttention" in ops and fused_int8.ok, fused_int8.reason
    # padded batch: the mask must still apply
    tok = AutoTokenizer.from_pretrained(str(tiny_bert_dir))
    enc = tok(["a short one", "a much longer sentence about the stock market"], padding=True,
              return_tensors="np")  # fmt: skip
    feeds = {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    n_skip = sum(n.op_type == "SkipLayerNormalization" for n in model.graph.node)
    assert split_skip_layernorm(model) == n_skip > 0
    assert not any(n.op_type == "SkipLayerNormalization" for n in model.graph.node)
    split_path = fuse.path.parent.parent / "split-test.onnx"
    onnx.save(model, str(split_path))
    so = ort.SessionOptions()
    so.add_session_config_entry(
        "optimization.disable_specified_optimizers", "SkipLayerNormFusion"
    )  # keep the split ops as they are
    (want,) = ort.InferenceSession(str(fuse.path), providers=["CPUExecutionProvider"]).run(
        None, feeds
    )
    (got,) = ort.InferenceSession(str(split_path), so, providers=["CPUExecutionProvider"]).run(
        None, feeds
    )
    split_path.unlink()
    np.testing.assert_allclose(got, want, atol=1e-5)
    (ref,) = ort.InferenceSession(
        str(bert_run.by_name("fp32").path), providers=["CPUExecutionProvider"]
    ).run(None, feeds)
    np.testing.assert_allclose(want, ref, atol=1e-4)  # the mask_index rewrite is exact too


def test_constant_weights_and_old_opsets_are_made_quantizable(tmp_path):
    """PaddleOCR-style graphs keep weights in Constant nodes at opset 12: the quantizer sees
    only initializers, and per-channel QDQ needs opset 13. The working copy fixes both and
    computes the same outputs."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from deployopt.stages.quantize import QDQ_MIN_OPSET, weights_as_initializers
    from tests.models import run_onnx

    w = np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32)
    nodes = [
        helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(w, "w")),
        helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4, 8, 8])],
    )  # fmt: skip
    src = tmp_path / "m.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 12)]), src)
    dynamic = weights_as_initializers(src, tmp_path)  # dynamic int8: no QDQ, opset kept
    assert onnx.load(str(dynamic)).opset_import[0].version == 12
    assert [i.name for i in onnx.load(str(dynamic)).graph.initializer] == ["w"]
    fixed = weights_as_initializers(src, tmp_path, min_opset=QDQ_MIN_OPSET)
    assert fixed != src and fixed.name.startswith(".")  # a scratch file the runner removes
    m = onnx.load(str(fixed))
    assert [i.name for i in m.graph.initializer] == ["w"]
    assert [n.op_type for n in m.graph.node] == ["Conv"]
    assert m.opset_import[0].version == QDQ_MIN_OPSET
    x = np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32)
    np.testing.assert_array_equal(run_onnx(fixed, {"x": x})[0], run_onnx(src, {"x": x})[0])
    clean = tmp_path / "clean"
    clean.mkdir()
    # nothing to do: the file as it is
    assert weights_as_initializers(fixed, clean, min_opset=QDQ_MIN_OPSET) == fixed
