"""End-to-end optimize on tiny models built here: export parity, variants, output layout."""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest
import torch

from deployopt.errors import NoViableVariantError, ParityError
from tests.models import assert_contract, cnn, mlp, ok_variants, optimize_only, run_onnx


def test_mlp_factory_all_variants(tmp_path):
    res = optimize_only("tests.models:mlp", tmp_path, input_shapes={"x": (1, 16)})
    names = [v.name for v in res.variants]
    assert names[:3] == ["fp32", "fuse", "int8-dynamic"] and names[-1] == "fp16"
    assert any(n.startswith("int8-static") for n in names)
    fp32 = res.by_name("fp32")
    assert fp32.ok and fp32.parity["against"] == "PyTorch"
    # the exported graph reproduces PyTorch on a batch size that was never traced
    x = np.random.default_rng(3).standard_normal((5, 16)).astype(np.float32)
    with torch.no_grad():
        ref = mlp()(torch.from_numpy(x)).numpy()
    (got,) = run_onnx(fp32.path, {"x": x})
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-5)
    assert_contract(res)
    for stage in ("fuse", "int8-dynamic", "int8-static", "fp16"):
        assert ok_variants(res, stage), stage  # at least one recipe of each kind holds here
    for v in res.variants:
        if v.ok:
            assert onnx.load(str(v.path)) is not None
    assert res.by_name("fp16").metrics["size_bytes"] < fp32.metrics["size_bytes"]


def test_manifest_and_variant_files(tmp_path):
    res = optimize_only(
        "tests.models:mlp", tmp_path, input_shapes={"x": (1, 16)}, variants=["fp16"]
    )
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    entry = {e["name"]: e for e in manifest["variants"]}["fp16"]
    assert entry["status"] == "ok" and entry["reason"] == ""
    assert set(entry["parity"]) >= {"mean_cosine", "min_cosine", "max_abs_diff"}
    folder = tmp_path / entry["path"]
    assert folder.name == "model.onnx" and folder.parent.name == entry["id"]
    meta = json.loads((folder.parent / "variant.json").read_text())
    assert meta["parent"] == res.by_name("fp32").id
    assert meta["stage"] == "fp16"
    from deployopt.workspace import sha256_file

    assert meta["sha256"] == sha256_file(folder)
    assert not [p for p in tmp_path.rglob(".tmp-*")]


def test_rerun_reuses_variants_by_id(tmp_path):
    logs: list[str] = []
    a = optimize_only("tests.models:mlp", tmp_path, input_shapes={"x": (1, 16)}, variants=["fuse"])
    mtime = a.by_name("fuse").path.stat().st_mtime_ns
    b = optimize_only(
        "tests.models:mlp",
        tmp_path,
        input_shapes={"x": (1, 16)},
        variants=["fuse"],
        log=logs.append,
    )
    assert [v.id for v in a.variants] == [v.id for v in b.variants]
    assert b.by_name("fuse").path.stat().st_mtime_ns == mtime
    assert any("reusing" in m for m in logs)


def test_cnn_conv_bn_relu(tmp_path):
    res = optimize_only(
        "tests.models:cnn",
        tmp_path,
        input_shapes={"x": (1, 3, 16, 16)},
        variants=["fuse", "int8-static"],
    )
    fuse = res.by_name("fuse")
    assert fuse.ok and fuse.metrics["nodes"] <= fuse.metrics["nodes_before"]
    x = np.random.default_rng(1).standard_normal((3, 3, 16, 16)).astype(np.float32)
    with torch.no_grad():
        ref = cnn().eval()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(run_onnx(fuse.path, {"x": x})[0], ref, atol=1e-4)
    (st,) = [v for v in res.variants if v.stage == "int8-static"]  # its name follows the CPU
    assert st.ok, st.reason
    assert st.parity["argmax_agreement"] is not None and st.parity["argmax_agreement"] >= 0.95


def test_dynamic_int8_of_a_model_with_nothing_to_quantize_is_skipped(tmp_path):
    """A conv-only model has no MatMul/Gemm/Gather: a dynamic "int8" copy of fp32 would be
    listed as int8 while being fp32, so it is skipped with the reason and the static hint."""
    with pytest.raises(NoViableVariantError, match="no variant passed its checks") as e:
        optimize_only(
            "tests.models:conv_only", tmp_path, input_shapes={"x": (1, 3, 16, 16)},
            variants=["int8-dynamic"],
        )  # fmt: skip
    dyn = [v for v in e.value.result.variants if v.stage == "int8-dynamic"]
    assert dyn and all(v.status == "skipped" and v.path is None for v in dyn)
    assert all("nothing to quantize" in v.reason and "int8-static" in v.reason for v in dyn)


def test_module_object_through_the_api(tmp_path):
    res = optimize_only(mlp(), tmp_path, input_shapes={"x": (1, 16)}, variants=["fp16"])
    assert res.by_name("fp16").ok


def test_export_parity_failure_is_fatal_and_lists_outputs(tmp_path, monkeypatch):
    """An exporter that writes a wrong graph must fail the run with the measured numbers."""
    from deployopt.stages import export as export_stage

    real = export_stage.export

    def wrong_export(source, out_dir, opset=18):
        path = real(source, out_dir, opset)
        m = onnx.load(str(path))
        for init in m.graph.initializer:  # corrupt the last layer's bias
            if init.dims == [4]:
                arr = onnx.numpy_helper.to_array(init) + 5.0
                init.CopyFrom(onnx.numpy_helper.from_array(arr, init.name))
        onnx.save(m, str(path))
        return path

    monkeypatch.setattr(export_stage, "export", wrong_export)
    with pytest.raises(ParityError) as e:
        optimize_only("tests.models:mlp", tmp_path, input_shapes={"x": (1, 16)})
    assert "parity vs PyTorch failed" in str(e.value)
    assert "output: max abs diff" in str(e.value)
    assert e.value.failures and e.value.exit_code == 8
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert [(v["name"], v["status"]) for v in manifest["variants"]] == [("fp32", "failed")]
    assert manifest["variants"][0]["path"] is None


def test_interrupted_stage_leaves_nothing_that_looks_finished(tmp_path, monkeypatch):
    from deployopt.stages import fuse

    def killed(self, src, out_dir, ctx):
        (out_dir / "model.onnx").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(fuse.FuseStage, "apply", killed)
    with pytest.raises(KeyboardInterrupt):
        optimize_only("tests.models:mlp", tmp_path, input_shapes={"x": (1, 16)}, variants=["fuse"])
    models = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("model.onnx"))
    assert len(models) == 1  # only the finished fp32 export
    assert not (tmp_path / "manifest.json").exists()
    assert not [p for p in tmp_path.rglob(".tmp-*") if p.name != ".tmp-"]
    # the next run cleans up and finishes
    monkeypatch.undo()
    res = optimize_only(
        "tests.models:mlp", tmp_path, input_shapes={"x": (1, 16)}, variants=["fuse"]
    )
    assert res.by_name("fuse").ok


def test_failing_stage_marks_variant_failed_and_run_goes_on(tmp_path, monkeypatch):
    from deployopt.stages import fuse

    def broken(self, src, out_dir, ctx):
        raise ValueError("simulated library failure")

    monkeypatch.setattr(fuse.FuseStage, "apply", broken)
    res = optimize_only(
        "tests.models:mlp", tmp_path, input_shapes={"x": (1, 16)}, variants=["fuse", "int8-dynamic"]
    )
    f = res.by_name("fuse")
    assert f.status == "failed" and "simulated library failure" in f.reason
    dyn = ok_variants(res, "int8-dynamic")
    assert dyn and all(v.parent == res.by_name("fp32").id for v in dyn)  # built from fp32


def test_npz_eval_data_and_bad_npz(tmp_path):
    x = np.random.default_rng(0).standard_normal((20, 16)).astype(np.float32)
    np.savez(tmp_path / "eval.npz", x=x)
    res = optimize_only(
        "tests.models:mlp",
        tmp_path / "o",
        input_shapes={"x": (1, 16)},
        variants=["fuse"],
        evaluation=tmp_path / "eval.npz",
    )
    assert res.by_name("fuse").parity["samples"] == 21  # 20 + the single-sample batch
    np.savez(tmp_path / "bad.npz", y=x)
    from deployopt.errors import DataError

    with pytest.raises(DataError, match="no array for input"):
        optimize_only(
            "tests.models:mlp",
            tmp_path / "o2",
            input_shapes={"x": (1, 16)},
            evaluation=tmp_path / "bad.npz",
        )
    assert not os.path.exists(tmp_path / "o2" / "manifest.json")


def test_onnx_file_as_source(tmp_path):
    first = optimize_only(
        "tests.models:mlp", tmp_path / "a", input_shapes={"x": (1, 16)}, variants=[]
    )
    onnx_path = first.by_name("fp32").path
    res = optimize_only(str(onnx_path), tmp_path / "b", variants=["fuse", "int8-dynamic"])
    root = res.by_name("fp32")
    assert root.stage == "input" and root.ok
    dyn = ok_variants(res, "int8-dynamic")
    assert dyn and all(v.parent == root.id for v in dyn)


def test_per_tensor_option_reaches_the_quantizer(tmp_path):
    res = optimize_only(
        "tests.models:mlp",
        tmp_path,
        input_shapes={"x": (1, 16)},
        variants=["int8-dynamic"],
        per_channel=False,
    )
    dyn = [v for v in res.variants if v.stage == "int8-dynamic"]
    assert dyn and all(v.params["per_channel"] is False for v in dyn)
    assert all("per-tensor" in v.name for v in dyn)


AVX2_ONLY = dict(model="faked AVX2 CPU", arch="x86_64", cores=2, features=("avx2", "fma"))
WITH_VNNI = dict(model="faked VNNI CPU", arch="x86_64", cores=2, features=("avx2", "avx512_vnni"))


@pytest.mark.parametrize("cpu", [AVX2_ONLY, WITH_VNNI], ids=["avx2", "vnni"])
def test_candidates_follow_the_cpu_descriptor_and_hold_their_contract(tmp_path, cpu):
    """The recipes come from the descriptor; the numerics from this machine's kernels. Either
    way every ok variant meets its tolerance and at least one INT8 recipe passes."""
    from deployopt.hardware import CpuDescriptor, detect_cpu

    desc = CpuDescriptor(**cpu)
    res = optimize_only(
        "tests.models:mlp",
        tmp_path,
        input_shapes={"x": (1, 16)},
        variants=["int8-dynamic", "int8-static"],
        cpu=desc,
    )
    names = [v.name for v in res.variants]
    rr = {"int8-dynamic/reduce-range", "int8-static/reduce-range", "int8-dynamic/u8u8"}
    if desc.int8_dot:
        assert not rr & set(names) and "int8-static" in names
    else:
        assert rr <= set(names)
        assert all(v.params["reduce_range"] for v in res.variants if v.stage == "int8-static")
    assert "int8-dynamic" in names  # the plain recipe is always tried and recorded
    assert_contract(res)
    if desc.int8_dot == detect_cpu().int8_dot:
        # the descriptor tells the truth about this machine's kernels: a recipe must hold
        assert ok_variants(res, "int8-dynamic") and ok_variants(res, "int8-static")
    assert res.meta["cpu"]["model"] == desc.model
    listed = [c["name"] for c in res.meta["candidates"]]
    assert listed == [n for n in names if n.startswith("int8-")]
    assert all(c["why"] for c in res.meta["candidates"])


def test_mixed_precision_keeps_the_ranked_matmuls_fp32(tmp_path):
    """An MLP whose third layer sees an outlier feature (the function is unchanged): the
    ranking puts that layer first, and the mixed recipes leave exactly the top-ranked MatMuls
    unquantized."""
    from deployopt.candidates import QuantRecipe
    from deployopt.stages.quantize import matmul_sensitivity

    res = optimize_only(
        "tests.models:outlier_mlp",
        tmp_path,
        input_shapes={"x": (1, 16)},
        variants=["int8-dynamic"],
    )
    fp32 = res.by_name("fp32")
    model = onnx.load(str(fp32.path))
    inits = {i.name for i in model.graph.initializer}
    weighted = [
        n.name
        for n in model.graph.node
        if n.op_type in ("MatMul", "Gemm") and any(i in inits for i in n.input[1:2])
    ]
    assert len(weighted) == 5
    mixed = sorted(
        (v for v in res.variants if v.params.get("fp32_matmuls")),
        key=lambda v: v.params["fp32_matmuls"],
    )
    scheme = {k: mixed[0].params[k] for k in ("per_channel", "reduce_range", "weight_type")}
    ranking = matmul_sensitivity(fp32.path, res_calibration(res), **scheme)
    assert sorted(n for n, _ in ranking) == sorted(weighted)
    errors = [e for _, e in ranking]
    assert errors == sorted(errors, reverse=True) and errors[-1] > 0
    assert ranking[0][0] == weighted[2]  # the layer fed by the outlier feature
    assert errors[0] > 10 * errors[1]
    assert [v.params["fp32_matmuls"] for v in mixed] == [1, 2]
    for v in mixed:
        assert v.ok, v.reason
        kept = v.metrics["fp32_nodes"]
        assert kept == [n for n, _ in ranking[: v.params["fp32_matmuls"]]]
        ops = {n.name: n.op_type for n in onnx.load(str(v.path)).graph.node}
        # kept as it was, or as the MatMul + Add the quantizer rewrites a Gemm into
        assert all(ops.get(k) == "Gemm" or ops.get(f"{k}_MatMul") == "MatMul" for k in kept)
        quantized = [n for n, op in ops.items() if op == "MatMulInteger"]
        assert len(quantized) == len(weighted) - len(kept)
    # keeping the outlier layer fp32 repairs what plain int8 breaks there
    plain = res.by_name(mixed[0].name.rsplit("/mixed-", 1)[0])  # same scheme, nothing fp32
    assert mixed[0].parity["min_cosine"] > plain.parity["min_cosine"]
    assert QuantRecipe("dynamic", fp32_matmuls=2).name == "int8-dynamic/mixed-2"


def res_calibration(res):
    """Seeded synthetic batches like the ones the run calibrated on."""
    from deployopt.inputs import specs_from_onnx, synthetic_batches

    return synthetic_batches(specs_from_onnx(res.by_name("fp32").path), 32, 8, {"*": 16}, seed=1)


def test_a_stage_writing_an_invalid_graph_fails_that_variant(tmp_path, monkeypatch):
    """Every written variant gets onnx's full check before it can be called ok."""
    from onnx import TensorProto, helper

    from deployopt.stages import fuse

    def broken(self, src, out_dir, ctx):
        node = helper.make_node("Add", ["x", "nowhere"], ["y"])
        graph = helper.make_graph(
            [node],
            "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16])],
        )
        onnx.save(helper.make_model(graph), str(out_dir / "model.onnx"))

    monkeypatch.setattr(fuse.FuseStage, "apply", broken)
    res = optimize_only(
        "tests.models:mlp", tmp_path, input_shapes={"x": (1, 16)}, variants=["fuse", "fp16"]
    )
    f = res.by_name("fuse")
    assert f.status == "failed" and "the written model fails onnx.checker" in f.reason
    assert "nowhere" in f.reason
    assert res.by_name("fp16").ok  # built from fp32 instead, and it passes the full check
    onnx.checker.check_model(str(res.by_name("fp16").path), full_check=True)
