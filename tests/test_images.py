"""Image models with symbolic height/width: the size is probed at sizes the model runs at,
an input that runs at none is refused naming the input and the flag, --input-shape settles it
for an .onnx file, and a folder of images feeds calibration and evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from deployopt import images
from deployopt.errors import UsageError
from deployopt.inputs import specs_from_onnx
from tests.models import optimize_only, run_cli


def stride32_detector(path: Path) -> Path:
    """A detector neck in miniature: a stride-16 feature map, a stride-32 one upsampled x2,
    concatenated. Runs only where 32 divides height and width (at 16x16 the stride-32 map is
    empty; at 240 the upsampled 14 meets 15)."""
    rng = np.random.default_rng(0)

    def w(name, *shape):
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.2).astype(np.float32), name)

    inits = [w("w16", 8, 3, 16, 16), w("w32", 8, 8, 2, 2), w("wh", 4, 16, 1, 1)]
    scales = numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")
    nodes = [
        helper.make_node("Conv", ["images", "w16"], ["f16"], strides=[16, 16], name="c16"),
        helper.make_node("Relu", ["f16"], ["r16"], name="r16"),
        helper.make_node("Conv", ["r16", "w32"], ["f32"], strides=[2, 2], name="c32"),
        helper.make_node("Relu", ["f32"], ["r32"], name="r32"),
        helper.make_node("Resize", ["r32", "", "scales"], ["up"], mode="nearest", name="up"),
        helper.make_node("Concat", ["r16", "up"], ["cat"], axis=1, name="cat"),
        helper.make_node("Conv", ["cat", "wh"], ["boxes"], name="head"),
    ]
    graph = helper.make_graph(
        nodes,
        "det",
        [
            helper.make_tensor_value_info(
                "images", TensorProto.FLOAT, ["batch", 3, "height", "width"]
            )
        ],
        [helper.make_tensor_value_info("boxes", TensorProto.FLOAT, ["batch", 4, "h16", "w16"])],
        [*inits, scales],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


def fixed_size_model(path: Path, h: int = 100, w: int = 60) -> Path:
    """Symbolic height/width that only ``h`` x ``w`` satisfies (an Add with a fixed-size bias)."""
    bias = numpy_helper.from_array(np.ones((1, 3, h, w), np.float32), "bias")
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "bias"], ["y"], name="add")],
        "fixed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, "h", "w"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3, "h", "w"])],
        [bias],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return path


def test_layout_and_candidates_follow_the_dims(tmp_path):
    specs = specs_from_onnx(stride32_detector(tmp_path / "det.onnx"))
    lay = images.image_layout(specs[0])
    assert lay is not None and lay.channel_axis == 1 and lay.spatial_axes == (2, 3)
    cands = images.candidates(specs, {}, [(640, 640)])
    assert cands[0] == {"height": 640, "width": 640}  # the metadata's size first
    assert {"height": 224, "width": 224} in cands
    assert {"height": 48, "width": 320} in cands  # text-line sizes after the squares
    # a height and width sharing one name stay square
    shared = [images.InputSpec("x", "float32", ("n", 3, "?", "?"))]
    assert all(len(c) == 1 for c in images.candidates(shared, {}, []))


def test_metadata_size_hint_is_read(tmp_path):
    path = stride32_detector(tmp_path / "det.onnx")
    model = onnx.load(str(path))
    helper.set_model_props(model, {"imgsz": "[320, 320]", "stride": "32"})
    onnx.save(model, str(path))
    assert images.size_hints(path) == [(320, 320)]
    dims, note = images.resolve_dims(path, specs_from_onnx(path), {}, 1, 120)
    assert dims == {"height": 320, "width": 320}
    assert "metadata" in note


def test_stride32_detector_optimizes_at_a_size_it_runs(tmp_path):
    path = stride32_detector(tmp_path / "det.onnx")
    logs: list[str] = []
    result = optimize_only(
        str(path), tmp_path / "out", variants=["fuse", "int8-static"], log=logs.append
    )
    assert result.meta["input_dims"] == {"height": 224, "width": 224}
    assert any("symbolic image size of images" in m for m in logs)
    assert result.by_name("fp32").ok and result.by_name("fuse").ok
    # judged on noise: the report says so
    warned = " ".join(result.meta["warnings"])
    assert "seeded noise, not images" in warned and "--eval FOLDER" in warned
    int8 = [v for v in result.variants if v.name.startswith("int8-static")]
    assert int8 and any(v.ok for v in int8), [(v.name, v.reason) for v in int8]


def test_unrunnable_size_is_refused_with_the_flag(tmp_path):
    path = fixed_size_model(tmp_path / "fixed.onnx")
    with pytest.raises(UsageError) as e:
        optimize_only(str(path), tmp_path / "out", variants=["fuse"])
    msg = str(e.value)
    assert "input x" in msg and "224x224" in msg and "48x320" in msg
    assert "--input-shape x=1x3x" in e.value.hint
    assert not (tmp_path / "out" / "best.onnx").exists()
    r = run_cli("optimize", str(path), "-o", str(tmp_path / "cli"), "--no-bench")
    assert r.returncode == 2, r.stderr
    assert "--input-shape" in r.stderr


def test_input_shape_settles_an_onnx_input(tmp_path):
    path = fixed_size_model(tmp_path / "fixed.onnx")
    result = optimize_only(
        str(path), tmp_path / "out", variants=["fuse"], input_shapes={"x": (1, 3, 100, 60)}
    )
    assert result.meta["input_dims"] == {"h": 100, "w": 60}
    assert result.by_name("fuse").ok
    with pytest.raises(UsageError, match="dim 1 is fixed at 3"):
        optimize_only(
            str(path), tmp_path / "o2", variants=["fuse"], input_shapes={"x": (1, 4, 9, 9)}
        )
    with pytest.raises(UsageError, match="has no input 'y'"):
        optimize_only(
            str(path), tmp_path / "o3", variants=["fuse"], input_shapes={"y": (1, 3, 9, 9)}
        )


def test_image_folder_feeds_calibration_and_evaluation(tmp_path):
    from PIL import Image

    folder = tmp_path / "imgs" / "cats"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (50 + i, 70, 3), dtype=np.uint8)).save(
            folder / f"{i}.png"
        )
    path = stride32_detector(tmp_path / "det.onnx")
    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25]})
    )
    specs = specs_from_onnx(path)
    norm = images.normalization(path)
    assert norm.mean == (0.5, 0.5, 0.5) and "preprocessor_config.json" in norm.describe()
    batches, desc = images.read_images(
        tmp_path / "imgs", specs, {"height": 64, "width": 96}, 4, 60, norm
    )
    x = np.concatenate([b["images"] for b in batches])
    assert x.shape == (6, 3, 64, 96) and x.dtype == np.float32
    # the first pixel, by hand: resized with PIL, then (p / 255 - 0.5) / 0.25
    first = np.asarray(Image.open(folder / "0.png").convert("RGB").resize((96, 64), Image.BILINEAR))
    np.testing.assert_allclose(x[0, :, 0, 0], (first[0, 0] / 255 - 0.5) / 0.25, rtol=1e-5)
    assert "6 images, resized to 64x96" in desc
    result = optimize_only(
        str(path),
        tmp_path / "out",
        variants=["fuse"],
        calibration=tmp_path / "imgs",
        evaluation=tmp_path / "imgs",
    )
    assert "6 images" in result.meta["data"]["eval"]
    assert not any("seeded noise" in w for w in result.meta["warnings"])
    (tmp_path / "empty").mkdir()
    from deployopt.errors import DataError

    with pytest.raises(DataError, match="no images found"):
        optimize_only(str(path), tmp_path / "o2", variants=["fuse"], evaluation=tmp_path / "empty")
