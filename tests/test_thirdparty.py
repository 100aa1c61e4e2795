"""Real models nobody on this project wrote: the PP-OCRv4 text recogniser and detector that
rapidocr-onnxruntime ships (installed --no-deps by the Makefile), fed images of printed text
rendered in the test. They go through optimize as a user's files would: symbolic height and
width settled by running the model, images resized and normalised as PaddleOCR does."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.models import optimize_only, run_onnx

pytestmark = pytest.mark.slow


def _models() -> Path:
    from deployopt.demos.text_images import rapidocr_models

    folder = rapidocr_models()
    if folder is None:
        pytest.skip("make installs rapidocr-onnxruntime --no-deps")
    return folder


def _images(tmp_path: Path, kind: str, n: int = 8) -> tuple[Path, Path]:
    from deployopt.demos.text_images import write_text_images

    size = (320, 320) if kind == "page" else None  # smaller pages keep the test quick
    write_text_images(tmp_path / "calib", n, kind, size=size, seed=0)
    write_text_images(tmp_path / "eval", n, kind, size=size, seed=1)
    return tmp_path / "calib", tmp_path / "eval"


def _check_int8(res, stage: str, feeds_from) -> None:
    ok = [v for v in res.variants if v.stage == stage and v.ok]
    assert ok, [(v.name, v.status, v.reason) for v in res.variants]
    v = ok[0]
    assert v.parity["mean_cosine"] >= 0.99
    import onnx

    ops = [n.op_type for n in onnx.load(str(v.path)).graph.node]
    int8_ops = {"MatMulInteger", "ConvInteger", "DynamicQuantizeMatMul", "QLinearConv",
                "QLinearMatMul", "DequantizeLinear"}  # fmt: skip
    assert int8_ops & set(ops), f"{v.name} holds no int8 op: {sorted(set(ops))}"
    fp32 = res.by_name("fp32")
    feeds = feeds_from()
    (ref,) = run_onnx(fp32.path, feeds)[:1]
    (got,) = run_onnx(v.path, feeds)[:1]
    assert got.shape == ref.shape and np.isfinite(got).all()


def test_ocr_recogniser_gets_a_proved_int8_variant(tmp_path):
    calib, evald = _images(tmp_path, "line")
    res = optimize_only(
        str(_models() / "ch_PP-OCRv4_rec_infer.onnx"), tmp_path / "out",
        variants=["int8-dynamic"], calibration=calib, evaluation=evald, search="quick",
        image_mean=(0.5,), image_std=(0.5,),
    )  # fmt: skip
    rng = np.random.default_rng(0)
    _check_int8(res, "int8-dynamic", lambda: {"x": rng.random((2, 3, 48, 320), np.float32)})


def test_ocr_detector_with_dynamic_height_and_width_gets_a_proved_int8_variant(tmp_path):
    calib, evald = _images(tmp_path, "page")
    res = optimize_only(
        str(_models() / "ch_PP-OCRv4_det_infer.onnx"), tmp_path / "out",
        variants=["int8-static"], calibration=calib, evaluation=evald, search="quick",
        input_shapes={"x": (1, 3, 320, 320)},
        image_mean=(0.485, 0.456, 0.406), image_std=(0.229, 0.224, 0.225),
    )  # fmt: skip
    rng = np.random.default_rng(0)
    # another size than calibrated: the graph stays dynamic in height and width
    _check_int8(res, "int8-static", lambda: {"x": rng.random((1, 3, 256, 384), np.float32)})
