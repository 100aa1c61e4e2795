"""The load-time and output-side fault catalogue of issue 12: each bad model or output folder
ends with its documented exit code and one precise line, before any work where it can, and
leaves nothing half-written or cached as ok.

The bad models are built here with onnx.helper; each CLI row costs an interpreter start, the
models that reach onnxruntime one worker more.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from tests.models import flat, run_cli, tiny_onnx_model

HUGE = 2**40


def _model(nodes, inputs, outputs, inits=(), opsets=(("", 17),)):
    graph = h.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    return h.make_model(
        graph, opset_imports=[h.make_opsetid(d, v) for d, v in opsets], ir_version=8
    )


def _x(shape=("b", 4), name="X"):
    return h.make_tensor_value_info(name, T.FLOAT, list(shape))


def _y(shape=("b", 4), name="Y"):
    return h.make_tensor_value_info(name, T.FLOAT, list(shape))


def huge_input():
    return _model([h.make_node("Relu", ["X"], ["Y"])], [_x([1, HUGE])], [_y([1, HUGE])])


def opset_99():
    return _model([h.make_node("Relu", ["X"], ["Y"])], [_x()], [_y()], opsets=[("", 99)])


def unknown_domain():
    node = h.make_node("Frobnicate", ["X"], ["Y"], domain="com.example")
    return _model([node], [_x()], [_y()], opsets=[("", 17), ("com.example", 1)])


def constant_of_shape_huge():
    value = h.make_tensor("v", T.FLOAT, [1], [0.0])
    nodes = [
        h.make_node("ConstantOfShape", ["S"], ["C"], name="big", value=value),
        h.make_node("ReduceSum", ["C"], ["R"], keepdims=0),
        h.make_node("Add", ["X", "R"], ["Y"]),
    ]
    shape = nh.from_array(np.array([HUGE], dtype=np.int64), "S")
    return _model(nodes, [_x()], [_y()], [shape])


def fails_at_run():
    """Loads, but its Reshape to a fixed 3 elements fails on any real batch."""
    to = nh.from_array(np.array([3], dtype=np.int64), "to")
    nodes = [h.make_node("Reshape", ["X", "to"], ["R"], name="squash")]
    nodes.append(h.make_node("Relu", ["R"], ["Y"]))
    return _model(nodes, [_x()], [_y([3])], [to])


def external_data_model(folder: Path, key: str, value: str) -> Path:
    """tiny_onnx_model with its weights external, and ``key`` of W's entry set to ``value``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    onnx.save(
        tiny_onnx_model(),
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="model.onnx.data",
        size_threshold=0,
    )
    model = onnx.load(str(path), load_external_data=False)
    w = next(t for t in model.graph.initializer if t.name == "W")
    entry = next((e for e in w.external_data if e.key == key), None) or w.external_data.add()
    entry.key, entry.value = key, value
    onnx.save(model, str(path))
    return path


@pytest.fixture
def bad(tmp_path) -> dict[str, Path]:
    paths = {"tmp": tmp_path, "out": tmp_path / "out"}
    for name, build in [
        ("huge", huge_input),
        ("opset99", opset_99),
        ("domain", unknown_domain),
        ("cos", constant_of_shape_huge),
        ("runfail", fails_at_run),
    ]:
        paths[name] = tmp_path / f"{name}.onnx"
        onnx.save(build(), str(paths[name]))
    paths["neglen"] = external_data_model(tmp_path / "neglen", "length", "-5")
    paths["negoff"] = external_data_model(tmp_path / "negoff", "offset", "-64")
    paths["tiny"] = tmp_path / "tiny.onnx"
    onnx.save(tiny_onnx_model(), str(paths["tiny"]))
    paths["file"] = tmp_path / "a-file"
    paths["file"].write_text("not a folder\n")
    paths["hf"] = tmp_path / "hf"
    paths["hf"].mkdir()
    shutil.copy(paths["tiny"], paths["hf"] / "model.onnx")
    return paths


def assert_nothing_left(out: Path) -> None:
    """No model, no variant cached as ok, no temporary leftover in a failed run's folder."""
    if not out.exists():
        return
    assert not list(out.rglob("*.onnx")), sorted(out.rglob("*"))
    assert not (out / "best.session.json").exists()
    assert not list(out.rglob(".tmp-*")), sorted(out.rglob(".tmp-*"))
    for meta in out.rglob("variant.json"):
        assert json.loads(meta.read_text())["status"] != "ok", meta


ROWS = [
    pytest.param(
        ("{huge}",),
        5,
        "{huge}: input 'X' is declared [1, 1099511627776] (float32): one sample is 4.0 TiB",
        id="input-declared-2**40",
    ),
    pytest.param(
        ("{cos}",),
        5,
        "{cos}: node 'big' (ConstantOfShape) makes tensor 'C' of shape [1099511627776] "
        "(float32): 4.0 TiB, over the memory budget",
        id="constant-of-shape-2**40",
    ),
    pytest.param(
        ("{opset99}",),
        5,
        "{opset99}: onnxruntime cannot load the model: the model imports opset 99 of the "
        "default domain",
        id="opset-99",
    ),
    pytest.param(
        ("{domain}",),
        5,
        "{domain}: onnxruntime cannot load the model: op Frobnicate of domain 'com.example' "
        "is not known",
        id="unknown-domain",
    ),
    pytest.param(
        ("{runfail}",),
        2,
        "{runfail}: the model does not run on the inputs X [8, 4] float32 (synthetic seeded "
        "inputs (64 samples, seed 0)): node 'squash' (Reshape) failed",
        id="loads-but-does-not-run",
    ),
    pytest.param(
        ("{neglen}",),
        5,
        "{neglen}: external data of tensor 'W' is malformed (offset '0', length '-5'",
        id="external-data-negative-length",
    ),
    pytest.param(
        ("{negoff}",),
        5,
        "{negoff}: external data of tensor 'W' is malformed (offset '-64'",
        id="external-data-negative-offset",
    ),
    pytest.param(
        ("{tiny}", "-o", "{file}"),
        2,
        "{file}: the output path is a file, not a folder",
        id="out-is-a-file",
    ),
    pytest.param(
        ("{tiny}", "-o", "{file}/sub"),
        2,
        "{file}/sub: {file} is a file, so the output folder cannot be made",
        id="out-under-a-file",
    ),
    pytest.param(
        ("{hf}", "-o", "{hf}/out"),
        2,
        "{hf}/out: the output folder is inside the input model folder {hf}",
        id="out-inside-the-input-folder",
    ),
    pytest.param(
        ("{hf}/model.onnx", "-o", "{hf}"),
        2,
        "{hf}: the output folder holds the input model {hf}/model.onnx",
        id="out-holds-the-input",
    ),
]


@pytest.mark.parametrize(("argv", "code", "fragment"), ROWS)
def test_fault(bad, argv, code, fragment):
    argv = [a.format(**bad) for a in argv]
    if "-o" not in argv:
        argv += ["-o", str(bad["out"])]
    out = Path(argv[argv.index("-o") + 1])
    r = run_cli("optimize", *argv, "--no-bench")
    err = flat(r.stderr)
    assert r.returncode == code, f"exit {r.returncode}, stderr: {r.stderr}"
    assert "Traceback" not in r.stderr + r.stdout, r.stderr
    assert flat(fragment.format(**bad)) in err, r.stderr
    # one precise line: no onnxruntime internals, never called ok first
    line = next(ln for ln in r.stderr.split("\nhint:")[0].split("error:")[1:])
    assert len(flat(line)) < 400, line
    for noise in ("[ONNXRuntimeError]", "onnxruntime_src", "onnxruntime::", "fp32: ok"):
        assert noise not in r.stderr, r.stderr
    if out.is_dir() and out != bad["hf"]:
        assert_nothing_left(out)
    assert (bad["hf"] / "model.onnx").is_file()  # the input is never touched


def test_rerun_after_refusal_refuses_again_and_caches_nothing(bad):
    """The load probe runs before the input's working copy is called ok: a rerun finds
    nothing cached and refuses the same way."""
    for _ in range(2):
        r = run_cli("optimize", str(bad["domain"]), "-o", str(bad["out"]), "--no-bench")
        assert r.returncode == 5, r.stderr
        assert_nothing_left(bad["out"])
        assert not list((bad["out"] / "variants").iterdir())


# ---------------------------------------------------------------- read-only output folders


def _ro_bind_available() -> bool:
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(
        ["unshare", "-rm", "sh", "-c", "mount -t tmpfs none /mnt 2>/dev/null || true; true"],
        capture_output=True,
    )
    return probe.returncode == 0


@pytest.mark.skipif(not _ro_bind_available(), reason="needs unshare -rm (user namespaces)")
def test_read_only_file_system_exits_4_before_any_work(bad):
    """A read-only bind mount (a real EROFS, which mode bits and root cannot get round):
    exit 4 before the model is even loaded."""
    ro = bad["tmp"] / "ro"
    ro.mkdir()
    script = (
        f"mount --bind {ro} {ro} && mount -o remount,bind,ro {ro} {ro} && "
        f"exec {sys.executable} -m deployopt optimize {bad['tiny']} -o {ro / 'out'} --no-bench"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "500", "NO_COLOR": "1"}
    r = subprocess.run(
        ["unshare", "-rm", "sh", "-c", script],
        capture_output=True,
        text=True,
        env=env,
        cwd=Path(__file__).resolve().parents[1],
        timeout=300,
    )
    if "mount:" in r.stderr:
        pytest.skip(f"bind mounts not permitted here: {r.stderr.strip()}")
    assert r.returncode == 4, r.stderr
    err = flat(r.stderr)
    assert f"{ro / 'out'}: the output folder cannot be written (its parent {ro}): Read-only" in err
    assert "Traceback" not in r.stderr
    assert not list(ro.iterdir())


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores mode bits")
def test_folder_without_write_permission_exits_4(bad):
    locked = bad["tmp"] / "locked"
    locked.mkdir(mode=0o555)
    try:
        r = run_cli("optimize", str(bad["tiny"]), "-o", str(locked), "--no-bench")
    finally:
        locked.chmod(0o755)
    assert r.returncode == 4, r.stderr
    assert f"{locked}: the output folder cannot be written: Permission denied" in flat(r.stderr)
    assert not list(locked.iterdir())


def test_check_output_dir_uses_a_real_probe_write(tmp_path, monkeypatch):
    """Where os.access says yes (root, or an ACL) a failing probe write still refuses."""
    from deployopt.errors import OutputError
    from deployopt.workspace import check_output_dir

    check_output_dir(tmp_path / "new")  # fine, and makes nothing
    assert not (tmp_path / "new").exists()

    def erofs(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr("deployopt.workspace.tempfile.mkstemp", erofs)
    with pytest.raises(OutputError, match="cannot be written: Read-only file system") as e:
        check_output_dir(tmp_path)
    assert e.value.exit_code == 4
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------- exit 6 decided before shipping


def _optimize_argv(model: Path, out: Path, *extra: str) -> list[str]:
    return [
        "optimize",
        str(model),
        "-o",
        str(out),
        "--bench-samples",
        "5",
        "--bench-seconds",
        "0",
        "--rounds",
        "1",
        "--no-tune-session",
        *extra,
    ]


def _main(argv) -> int:
    from deployopt import cli

    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    return e.value.code


def test_no_viable_variant_ships_nothing(bad, monkeypatch, capsys):
    """Every requested variant fails: the selection would take fp32, but the run exits 6, so
    nothing is shipped (and a best.onnx of an earlier run is removed, not left beside a
    failing exit code). The report says why."""
    from deployopt.errors import StageError
    from deployopt.stages.quantize import DynamicQuantStage

    def broken(self, src, out_dir, ctx):
        raise StageError("int8-dynamic: simulated failure")

    monkeypatch.setattr(DynamicQuantStage, "apply", broken)
    out = bad["out"]
    out.mkdir()
    for stale in ("best.onnx", "best.session.json"):
        (out / stale).write_text("from an earlier run\n")
    code = _main(_optimize_argv(bad["tiny"], out, "--variants", "int8-dynamic"))
    err = flat(capsys.readouterr().err)
    assert code == 6, err
    assert "no variant passed its checks: int8-dynamic" in err
    assert "simulated failure" in err
    assert "chosen:" not in err
    assert not (out / "best.onnx").exists() and not (out / "best.session.json").exists()
    report = json.loads((out / "report.json").read_text())
    assert report["choice"]["winner"] is None and report["choice"]["best_path"] is None
    assert "**No variant qualifies.**" in (out / "report.md").read_text()


def test_constraints_nobody_meets_ship_nothing(bad, capsys):
    out = bad["out"]
    code = _main(_optimize_argv(bad["tiny"], out, "--variants", "fuse", "--max-size-mb", "1e-6"))
    err = flat(capsys.readouterr().err)
    assert code == 6, err
    assert "no variant meets the constraints" in err
    assert not (out / "best.onnx").exists() and not (out / "best.session.json").exists()


def test_failure_is_decided_before_shipping(bad, monkeypatch):
    """ship.failure runs before write_best: when it names a failure, write_best never runs."""
    from deployopt import api, ship
    from deployopt.errors import NoViableVariantError

    calls = []
    monkeypatch.setattr(ship, "write_best", lambda *a: calls.append(a))
    monkeypatch.setattr(ship, "failure", lambda result, cfg: NoViableVariantError("decided"))
    with pytest.raises(NoViableVariantError, match="^decided$") as e:
        api.optimize(
            str(bad["tiny"]), bad["out"], variants=["fuse"], bench_min_samples=5,
            bench_min_seconds=0, bench_rounds=1, tune_session=False,
        )  # fmt: skip
    assert calls == [] and e.value.result.best is None
    assert e.value.result.failure is e.value


# ---------------------------------------------------------------- a full disk


@pytest.mark.parametrize("wrapped", [False, True], ids=["oserror", "wrapped-in-stage-error"])
def test_full_disk_stops_the_run_and_caches_nothing(bad, monkeypatch, capsys, wrapped):
    """ENOSPC inside a stage is the machine's state, not the variant's: exit 4 naming the
    path and the free space, no failed entry in the cache, and a rerun builds the variant.
    Also when the stage wrapped the OSError in its own error."""
    from deployopt.errors import StageError
    from deployopt.stages.fuse import FuseStage

    real = FuseStage.apply

    def full(self, src, out_dir, ctx):
        e = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(out_dir / "model.onnx"))
        if not wrapped:
            raise e
        raise StageError("fuse: could not save") from e

    monkeypatch.setattr(FuseStage, "apply", full)
    out = bad["out"]
    code = _main(_optimize_argv(bad["tiny"], out, "--variants", "fuse", "--no-bench"))
    err = flat(capsys.readouterr().err)
    assert code == 4, err
    assert "model.onnx: write failed: No space left on device (" in err
    assert " MiB free on the file system of " in err
    assert "Traceback" not in err
    names = [json.loads(p.read_text())["name"] for p in out.rglob("variant.json")]
    assert names == ["fp32"], names  # no failed fuse entry
    assert not list(out.rglob(".tmp-*"))
    assert not (out / "best.onnx").exists()

    monkeypatch.setattr(FuseStage, "apply", real)
    from tests.models import optimize_only

    logs: list[str] = []
    res = optimize_only(str(bad["tiny"]), out, variants=["fuse"], log=logs.append)
    assert res.by_name("fuse").ok
    assert not any(m.startswith("fuse: reusing") for m in logs)


def enospc(path: str):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)


def test_full_disk_in_a_worker_is_not_a_failed_variant(tmp_path):
    from deployopt.errors import OutputError, StageError
    from deployopt.runtime.worker import run_in_worker

    with pytest.raises(OutputError) as e:
        run_in_worker(enospc, str(tmp_path / "x.onnx"), timeout_s=60)
    assert not isinstance(e.value, StageError)  # stages catch StageError: this gets through
    assert f"{tmp_path / 'x.onnx'}: write failed: No space left on device" in str(e.value)
    assert e.value.exit_code == 4


# ---------------------------------------------------------------- control flow and state


def vad_like(zero_dims: bool = True) -> onnx.ModelProto:
    """Mimics a voice-activity model: ``input [batch, samples]``, a recurrent
    ``state [2, batch, 16]`` with its ``stateN`` output, an int64 scalar ``sr`` choosing an
    ``If`` branch (``sr == 16000``), and every unknown dim written as 0."""
    rng = np.random.default_rng(0)

    def w(*shape):
        return (rng.standard_normal(shape) * 0.5).astype(np.float32)

    B, S = (0, 0) if zero_dims else ("batch", "samples")
    inits = [
        nh.from_array(w(16, 16), "Wh"),
        nh.from_array(w(1, 16), "Wf"),
        nh.from_array(w(16), "bz"),
        nh.from_array(np.array([1], np.int64), "ax1"),
        nh.from_array(np.array([0], np.int64), "ax0"),
        nh.from_array(np.array(0, np.int64), "i0"),
        nh.from_array(np.array(16000, np.int64), "sr16k"),
    ]

    def branch(name, weight):
        nodes = [
            h.make_node("MatMul", ["z", f"{name}_W"], [f"{name}_m"]),
            h.make_node("Sigmoid", [f"{name}_m"], [f"{name}_out"]),
        ]
        outs = [h.make_tensor_value_info(f"{name}_out", T.FLOAT, [B, 1])]
        return h.make_graph(nodes, name, [], outs, [nh.from_array(weight, f"{name}_W")])

    nodes = [
        h.make_node("ReduceMean", ["input", "ax1"], ["feat"], keepdims=1),
        h.make_node("Gather", ["state", "i0"], ["h"], axis=0),
        h.make_node("MatMul", ["h", "Wh"], ["hw"]),
        h.make_node("Mul", ["feat", "Wf"], ["fw"]),
        h.make_node("Add", ["hw", "fw"], ["s1"]),
        h.make_node("Add", ["s1", "bz"], ["s2"]),
        h.make_node("Tanh", ["s2"], ["z"]),
        h.make_node("Unsqueeze", ["z", "ax0"], ["zs"]),
        h.make_node("Unsqueeze", ["h", "ax0"], ["hs"]),
        h.make_node("Concat", ["zs", "hs"], ["stateN"], axis=0),
        h.make_node("Equal", ["sr", "sr16k"], ["is16k"]),
        h.make_node(
            "If",
            ["is16k"],
            ["output"],
            name="rate",
            then_branch=branch("then", w(16, 1)),
            else_branch=branch("else", w(16, 1)),
        ),
    ]
    inputs = [
        h.make_tensor_value_info("input", T.FLOAT, [B, S]),
        h.make_tensor_value_info("state", T.FLOAT, [2, B, 16]),
        h.make_tensor_value_info("sr", T.INT64, []),
    ]
    outputs = [
        h.make_tensor_value_info("output", T.FLOAT, [B, 1]),
        h.make_tensor_value_info("stateN", T.FLOAT, [2, B, 16]),
    ]
    model = _model(nodes, inputs, outputs, inits, opsets=[("", 18)])
    onnx.checker.check_model(model, full_check=True)
    return model


def vad_reference(model: onnx.ModelProto, feed: dict) -> dict:
    """The mimic's outputs in numpy, from its initializers (the then branch is 16 kHz)."""
    g = {t.name: nh.to_array(t) for t in model.graph.initializer}
    rate = next(n for n in model.graph.node if n.op_type == "If")
    branch = {a.name: a.g for a in rate.attribute}["then_branch" if feed["sr"] == 16000 else
                                                     "else_branch"]  # fmt: skip
    wout = nh.to_array(branch.initializer[0])
    hid = feed["state"][0]
    z = np.tanh(hid @ g["Wh"] + feed["input"].mean(axis=1, keepdims=True) * g["Wf"] + g["bz"])
    return {"output": 1 / (1 + np.exp(-(z @ wout))), "stateN": np.stack([z, hid])}


def test_feeds_for_scalars_and_state():
    from deployopt.feeds import feed_shapes, is_stateful, scalar_values, unknown_zero_specs
    from deployopt.inputs import InputSpec

    model = vad_like()
    specs = unknown_zero_specs(
        [
            InputSpec("input", "float32", (0, 0)),
            InputSpec("state", "float32", (2, 0, 16)),
            InputSpec("sr", "int64", ()),
        ]
    )
    assert is_stateful(specs)
    assert not is_stateful([InputSpec("x", "float32", ("batch", 16))])
    assert scalar_values(model, specs) == {"sr": 16000.0}
    assert feed_shapes(specs, batch=4, other=32) == {
        "input": (4, 32),
        "state": (2, 4, 16),
        "sr": (),
    }
    named = [
        InputSpec("input", "float32", ("batch", "samples")),
        InputSpec("state", "float32", (2, "batch", 16)),
    ]
    assert feed_shapes(named, batch=3) == {"input": (3, 16), "state": (2, 3, 16)}


def test_voice_activity_like_model_optimizes(tmp_path):
    """If on an int64 scalar, a state input/output pair, dims written as 0: the run feeds
    ``sr`` the constant its If compares with, the state one row per sample, reads the zeros
    as unknown dims; the variants are proved and the working copy computes what the numpy
    reference does."""
    import onnxruntime as ort

    import deployopt
    from tests.models import optimize_only

    model = vad_like()
    path = tmp_path / "vad.onnx"
    onnx.save(model, str(path))
    res = optimize_only(str(path), tmp_path / "out", variants=["fuse", "int8-dynamic", "fp16"])
    fp32 = res.by_name("fp32")
    assert fp32.ok
    assert any("input 'state': dim(s) 1 written as 0" in w for w in fp32.warnings)
    assert res.by_name("fuse").ok and res.by_name("fp16").ok
    assert any(v.ok for v in res.variants if v.stage == "int8-dynamic")
    assert "scalar inputs set to the constants" in res.meta["data"]["eval"]
    rng = np.random.default_rng(1)
    for sr in (16000, 8000):
        feed = {
            "input": rng.standard_normal((1, 40)).astype(np.float32),
            "state": rng.standard_normal((2, 1, 16)).astype(np.float32),
            "sr": np.array(sr, dtype=np.int64),
        }
        want = vad_reference(model, feed)
        for name in ("fp32", "fuse"):
            sess = ort.InferenceSession(str(res.by_name(name).path))
            got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feed)))
            for k in want:
                np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-5)
    # the benchmark feeds it by the same rules (a batch of 2 here) and measures it
    [r] = deployopt.bench(
        res.by_name("fp32").path, batch=[2], min_samples=5, min_seconds=0, rounds=1,
        history=False,
    )  # fmt: skip
    assert r.valid, r.invalid
    assert r.shapes == {"input": [2, 128], "state": [2, 2, 16], "sr": []}


def test_control_flow_out_of_order_is_sorted_for_the_checker():
    """A body that reads an outer tensor makes its If depend on that tensor's producer even
    though the If does not list it; a stage that wrote the If first is sorted, not failed."""
    from deployopt.graphs import order_nodes

    model = vad_like(zero_dims=False)
    nodes = list(model.graph.node)
    rate = next(n for n in nodes if n.op_type == "If")
    del model.graph.node[:]
    model.graph.node.extend([rate] + [n for n in nodes if n is not rate])
    with pytest.raises(onnx.checker.ValidationError, match="topologically sorted"):
        onnx.checker.check_model(model, full_check=True)
    assert order_nodes(model.graph)
    onnx.checker.check_model(model, full_check=True)
    names = [n.output[0] for n in model.graph.node]
    assert names.index("z") < names.index("output")
    assert not order_nodes(model.graph)  # already in order: untouched


# ---------------------------------------------------------------- the pieces, without a run


def test_declared_sizes_against_a_given_budget():
    from deployopt.errors import InputModelError
    from deployopt.inputs import InputSpec
    from deployopt.preflight import check_declared_sizes

    specs = [InputSpec("x", "float32", ("batch", 1000))]
    check_declared_sizes("m.onnx", specs, batch_size=8, budget=32_000)
    with pytest.raises(InputModelError, match=r"input 'x' is declared \['batch', 1000\]") as e:
        check_declared_sizes("m.onnx", specs, batch_size=8, budget=31_999)
    assert "a batch of 8 31.2 KiB" in str(e.value) and e.value.exit_code == 5


def test_probe_explains_what_onnxruntime_refuses(tmp_path):
    """The probe's one line, from onnxruntime's real messages: op, domain, opset, node."""
    from deployopt.runtime.session import probe_model

    feed = [{"X": np.ones((2, 4), np.float32)}]
    cases = {
        "opset99": (opset_99(), "load", "opset 99 of the default domain"),
        "domain": (unknown_domain(), "load", "op Frobnicate of domain 'com.example'"),
        "runfail": (fails_at_run(), "run", "node 'squash' (Reshape) failed"),
    }
    for name, (model, status, fragment) in cases.items():
        path = tmp_path / f"{name}.onnx"
        onnx.save(model, str(path))
        got, reason = probe_model(path, feed)
        assert got == status and fragment in reason, (name, reason)
        assert "onnxruntime::" not in reason and "[ONNXRuntimeError]" not in reason
        assert len(reason) <= 250
    path = tmp_path / "ok.onnx"
    onnx.save(tiny_onnx_model(), str(path))
    status, outputs = probe_model(path, [{"X": np.ones((3, 16), np.float32)}])
    assert status == "ok" and outputs[0]["Y"].shape == (3, 4)
