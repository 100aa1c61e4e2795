"""The timing loop on a fake clock, and real measurements of a tiny model in a worker."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest

from deployopt.benchmark import BenchSpec, LatencyStats, bench_feeds, bench_models, measure
from deployopt.presets import BUILTIN_TARGETS, Target
from tests.models import run_cli


class FakeClock:
    """Each call to the timed function advances time by the next scripted delay."""

    def __init__(self, delays_s):
        self.now = 0.0
        self.delays = list(delays_s)
        self.calls = 0

    def clock(self):
        return self.now

    def fn(self):
        self.calls += 1
        self.now += self.delays[(self.calls - 1) % len(self.delays)]


def test_measure_excludes_warmup_and_times_each_call():
    fc = FakeClock([1.0, 1.0, 0.010, 0.020, 0.030])
    samples = measure(fc.fn, warmup=2, min_samples=3, min_seconds=0.0, clock=fc.clock)
    assert samples == pytest.approx([10.0, 20.0, 30.0])
    assert fc.calls == 5


def test_measure_runs_until_both_count_and_duration():
    fc = FakeClock([0.125])
    samples = measure(fc.fn, warmup=0, min_samples=3, min_seconds=1.0, clock=fc.clock)
    assert len(samples) == 8  # 3 samples would be 0.375 s: the duration rules
    fc = FakeClock([0.5])
    samples = measure(fc.fn, warmup=0, min_samples=6, min_seconds=1.0, clock=fc.clock)
    assert len(samples) == 6  # 2 samples reach 1 s: the count rules


def test_measure_stops_at_max_seconds():
    fc = FakeClock([1.0])
    samples = measure(
        fc.fn, warmup=0, min_samples=1000, min_seconds=0, max_seconds=5, clock=fc.clock
    )
    assert len(samples) == 5


def test_latency_stats_percentiles():
    st = LatencyStats.from_samples([float(x) for x in range(1, 101)])
    assert st.p50_ms == pytest.approx(50.5)
    assert st.p90_ms == pytest.approx(90.1)
    assert st.p99_ms == pytest.approx(99.01)
    assert st.min_ms == 1.0 and st.samples == 100


def test_median_ci_brackets_the_median():
    st = LatencyStats.from_samples([float(x) for x in range(1, 101)])
    # n=100: ranks 50 -+ 9.8 -> order statistics 40 and 60 (1-based 41 and 60)
    assert st.p50_ci_low_ms == 41.0 and st.p50_ci_high_ms == 60.0
    assert st.p50_ci_low_ms <= st.p50_ms <= st.p50_ci_high_ms
    one = LatencyStats.from_samples([5.0])
    assert one.p50_ci_low_ms == one.p50_ci_high_ms == 5.0 and one.stdev_ms == 0.0


def test_bench_feeds_text_model_gets_token_ids_and_mask():
    from deployopt.inputs import InputSpec

    specs = [
        InputSpec("input_ids", "int64", ("batch", "seq")),
        InputSpec("attention_mask", "int64", ("batch", "seq")),
        InputSpec("pixels", "float32", ("batch", 3, 8, 8)),
    ]
    f = bench_feeds(specs, BenchSpec(batch=2, seq=16, shapes=(("pixels", (1, 3, 4, 4)),)))
    assert f["input_ids"].shape == (2, 16) and f["input_ids"].dtype == np.int64
    assert (f["input_ids"][:, 0] == 101).all() and (f["input_ids"][:, -1] == 102).all()
    assert (f["input_ids"][:, 1:-1] >= 1996).all()
    assert (f["attention_mask"] == 1).all()
    assert f["pixels"].shape == (1, 3, 4, 4) and f["pixels"].dtype == np.float32


@pytest.fixture(scope="module")
def mlp_onnx(tmp_path_factory):
    from tests.models import optimize_only

    out = tmp_path_factory.mktemp("b")
    res = optimize_only("tests.models:mlp", out, input_shapes={"x": (1, 16)}, variants=[])
    return res.by_name("fp32").path


FAST = BenchSpec(batch=4, min_samples=20, min_seconds=0.05, rounds=2)


def test_bench_models_reports_real_measurements(mlp_onnx):
    res = bench_models({"a": str(mlp_onnx), "b": str(mlp_onnx)}, BUILTIN_TARGETS["cpu-1t"], FAST)
    assert list(res) == ["a", "b"]
    for r in res.values():
        assert r.valid, r.invalid
        assert r.providers[0] == "CPUExecutionProvider" and r.target == "cpu-1t"
        assert r.shapes == {"x": [4, 16]}
        assert len(r.samples_ms) >= 20 and all(s > 0 for s in r.samples_ms)
        assert r.stats.p50_ms <= r.stats.p99_ms
        assert r.throughput == pytest.approx(4 / (r.stats.p50_ms / 1e3))
        assert r.cold_ms > 0 and r.peak_rss_mb > 0
        assert r.env["onnxruntime"] and r.env["cores"] and r.env["threads"] == "1"
        assert len(r.round_p50_ms) == FAST.rounds and r.drift >= 0
        doc = json.loads(json.dumps(r.to_json()))
        assert doc["valid"] is True and doc["stats"]["samples"] == len(r.samples_ms)


def test_target_session_settings_are_used_and_recorded(mlp_onnx):
    tgt = Target(
        name="quiet",
        threads=1,
        graph_optimization="disable",
        session_config={"session.intra_op.allow_spinning": "0"},
    )
    r = bench_models({"m": str(mlp_onnx)}, tgt, FAST)["m"]
    assert r.valid and r.target == "quiet"
    assert r.env["session:session.intra_op.allow_spinning"] == "0"
    assert r.env["graph_optimization"] == "disable" and r.env["threads"] == "1"


def test_missing_ep_is_invalid_with_the_reason(mlp_onnx):
    tgt = Target(name="trt", ep="tensorrt")
    r = bench_models({"m": str(mlp_onnx)}, tgt, FAST)["m"]
    assert not r.valid and r.stats is None
    assert "TensorrtExecutionProvider is not available here" in r.invalid[0]
    assert "CPUExecutionProvider" in r.invalid[0]  # the list of what is available


def crash_serve(conn, path, target, spec):
    """A worker that dies of SIGSEGV for one model, as a crashing onnxruntime would."""
    if "crash" in path:
        os.kill(os.getpid(), signal.SIGSEGV)
    from deployopt.benchmark import _serve

    _serve(conn, path, target, spec)


def test_crashing_worker_is_invalid_and_the_others_go_on(mlp_onnx, tmp_path, monkeypatch):
    crash = tmp_path / "crash.onnx"
    crash.write_bytes(mlp_onnx.read_bytes())
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a model")
    monkeypatch.setattr("deployopt.benchmark._serve", crash_serve)
    res = bench_models(
        {"crash": str(crash), "ok": str(mlp_onnx), "garbage": str(garbage)},
        BUILTIN_TARGETS["cpu"],
        FAST,
        timeout_s=60,
    )
    assert not res["crash"].valid
    assert "worker died from signal SIGSEGV" in res["crash"].invalid[0]
    assert not res["garbage"].valid and res["garbage"].invalid[0].startswith("session:")
    assert res["ok"].valid and len(res["ok"].samples_ms) >= 20


def test_api_bench_several_batches(mlp_onnx):
    import deployopt

    rs = deployopt.bench(mlp_onnx, batch=[1, 3], min_samples=5, min_seconds=0.0, rounds=1)
    assert [r.batch for r in rs] == [1, 3] and all(r.valid for r in rs)
    with pytest.raises(deployopt.errors.UsageError, match="bad batch sizes"):
        deployopt.bench(mlp_onnx, batch=[0])


def test_bench_cli_json_and_missing_ep(mlp_onnx, tmp_path):
    r = run_cli(
        "bench",
        str(mlp_onnx),
        "--batch",
        "1,3",
        "--min-samples",
        "10",
        "--min-seconds",
        "0.05",
        "--json",
        str(tmp_path / "b.json"),
    )
    assert r.returncode == 0, r.stderr
    data = json.loads((tmp_path / "b.json").read_text())
    assert [res["shapes"]["x"][0] for res in data["results"]] == [1, 3]
    assert all(len(res["samples_ms"]) >= 10 for res in data["results"])
    r = run_cli("bench", str(mlp_onnx), "--ep", "tensorrt")
    assert r.returncode == 4
    assert "execution provider 'tensorrt'" in r.stderr and "CPUExecutionProvider" in r.stderr
    assert "Traceback" not in r.stderr


def test_targets_from_toml_and_their_errors(tmp_path):
    from deployopt.errors import ConfigError, UsageError
    from deployopt.presets import load_targets, resolve_target

    cfg = tmp_path / "targets.toml"
    cfg.write_text(
        '[targets.edge-2t]\nep = "cpu"\nthreads = 2\ngraph_optimization = "basic"\n'
        'session_config = { "session.intra_op.allow_spinning" = "0" }\n'
    )
    t = resolve_target("edge-2t", None, None, cfg)
    assert (t.name, t.ep, t.threads, t.graph_optimization) == ("edge-2t", "cpu", 2, "basic")
    assert t.session_config == {"session.intra_op.allow_spinning": "0"}
    assert set(load_targets(cfg)) == {"cpu", "cpu-1t", "cuda", "edge-2t"}
    assert resolve_target("cpu-1t", None, None).threads == 1
    assert resolve_target(None, "cuda", 4).name == "cuda-4t"
    assert resolve_target(None, None, None).name == "cpu"
    with pytest.raises(UsageError, match="unknown target 'tpu'") as e:
        resolve_target("tpu", None, None, cfg)
    assert "cpu-1t" in e.value.hint and "edge-2t" in e.value.hint
    cfg.write_text("[targets.x]\nthreads = 0\n")
    with pytest.raises(ConfigError, match=r"targets.toml: \[targets.x\] threads: Input should be"):
        load_targets(cfg)
    cfg.write_text("[targets.x]\nflavour = 'mint'\n")
    with pytest.raises(ConfigError, match=r"\[targets.x\] flavour: Extra inputs"):
        load_targets(cfg)
    cfg.write_text("[targets.x\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_targets(cfg)
    with pytest.raises(ConfigError, match="no such config file"):
        load_targets(tmp_path / "missing.toml")


def test_drift_of_round_medians_warns_past_ten_percent():
    from deployopt.benchmark import BenchResult, drift_warnings

    def res(name, rounds):
        return BenchResult(
            name=name,
            model="m",
            target="cpu",
            providers=(),
            shapes={},
            cold_ms=None,
            samples_ms=(),
            stats=None,
            throughput=None,
            peak_rss_mb=None,
            env={},
            round_p50_ms=rounds,
        )

    steady, drifting, single = res("a", (10.0, 10.5, 10.2)), res("b", (8.0, 12.0)), res("c", (9.0,))
    assert steady.drift == pytest.approx(0.05) and drifting.drift == pytest.approx(0.5)
    assert single.drift is None
    (w,) = drift_warnings([steady, drifting, single])
    assert w.startswith("b: round medians varied by 50% (8-12 ms)")


def test_a_target_can_switch_off_the_skip_layernorm_fusion(tmp_path):
    """The README's CPU tip: the session config entry that keeps onnxruntime from fusing a
    residual Add + LayerNormalization into SkipLayerNormalization, and that a target's
    session_config reaches the session (the benchmark runs the model either way)."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    d = 8
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["x", "s"], ["a"]),
            helper.make_node("LayerNormalization", ["a", "g", "b"], ["y"], axis=-1),
        ],
        "residual_ln",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["B", "S", d]) for n in "xs"],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "S", d])],
        [
            numpy_helper.from_array(np.ones(d, np.float32), "g"),
            numpy_helper.from_array(np.zeros(d, np.float32), "b"),
        ],
    )
    path = tmp_path / "ln.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    entry = {"optimization.disable_specified_optimizers": "SkipLayerNormFusion"}

    def optimized_ops(config):
        so = ort.SessionOptions()
        for k, v in config.items():
            so.add_session_config_entry(k, v)
        so.optimized_model_filepath = str(tmp_path / "opt.onnx")
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        return [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]

    assert optimized_ops({}) == ["SkipLayerNormalization"]
    assert optimized_ops(entry) == ["Add", "LayerNormalization"]
    target = Target(name="cpu-nosln", ep="cpu", threads=1, session_config=entry)
    spec = BenchSpec(batch=1, shapes=(("x", (1, 4, d)), ("s", (1, 4, d))), min_samples=5,
                     min_seconds=0.0, rounds=1)  # fmt: skip
    res = bench_models({"ln": str(path)}, target, spec)["ln"]
    assert res.valid, res.invalid
    assert res.env["session:optimization.disable_specified_optimizers"] == "SkipLayerNormFusion"


# ------------------------------------------------------------------ session files

SPIN = {"session.intra_op.allow_spinning": "0"}


def write_session_file(folder, threads=1, optimization="basic", config=None, ep="cpu"):
    """``folder/best.session.json`` as ``deployopt optimize`` writes it (ship.write_session)."""
    from deployopt.ship import write_session

    target = Target(name="t", ep=ep, threads=threads, graph_optimization=optimization)
    tuning = {"session_config": dict(SPIN if config is None else config), "chosen": "default"}
    return write_session(folder, target, {**tuning, "p50_ms": {"default": 1.0}})


def optimize_folder(tmp_path, model, **session):
    """An optimize output folder: best.onnx and (unless ``session`` is None) its session file."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "best.onnx").write_bytes(model.read_bytes())
    write_session_file(out, **session)
    return out


def test_session_file_applied_to_a_target_keeps_name_and_ep(tmp_path):
    from deployopt.benchmark import fingerprint
    from deployopt.presets import apply_session, read_session

    path = write_session_file(tmp_path, threads=2, optimization="basic")
    doc = json.loads(path.read_text())
    doc.update(inter_op_num_threads=1, search={"trials": 3})  # newer keys: ignored
    path.write_text(json.dumps(doc))
    s = read_session(path)
    assert (s.path, s.execution_provider, s.threads, s.chosen) == (path, "cpu", 2, "default")
    assert s.describe() == "2 threads, graph optimization basic, session.intra_op.allow_spinning=0"
    base = Target(name="edge", threads=4, session_config={"x.y": "1"}, include_copies=True)
    t = apply_session(base, path)
    assert (t.name, t.ep, t.threads, t.graph_optimization) == ("edge", "cpu", 2, "basic")
    assert t.session_config == SPIN and t.include_copies  # the file's config replaces the target's
    env = fingerprint(t)
    assert env["threads"] == "2" and env["session:session.intra_op.allow_spinning"] == "0"
    assert "session:x.y" not in env
    all_cores = write_session_file(tmp_path, threads=None, optimization="all", config={})
    t = apply_session(BUILTIN_TARGETS["cpu-1t"], all_cores)
    assert (t.name, t.threads, t.session_config) == ("cpu-1t", None, {})
    # the EP is compared by provider, not by spelling
    doc.update(execution_provider="CPUExecutionProvider")
    path.write_text(json.dumps(doc))
    assert apply_session(BUILTIN_TARGETS["cpu"], path).threads == 2


def test_a_session_from_another_ep_is_refused(tmp_path):
    from deployopt.errors import UsageError
    from deployopt.presets import apply_session

    path = write_session_file(tmp_path, ep="cuda")
    with pytest.raises(
        UsageError, match="measured on execution provider 'cuda', target 'cpu'"
    ) as e:
        apply_session(BUILTIN_TARGETS["cpu"], path)
    assert str(path) in e.value.message and "pick a target on 'cuda'" in e.value.hint
    assert apply_session(BUILTIN_TARGETS["cuda"], path).session_config == SPIN


GOOD = {
    "schema": "deployopt.session/1",
    "model": "best.onnx",
    "execution_provider": "cpu",
    "intra_op_num_threads": 1,
    "graph_optimization": "all",
    "session_config": {},
}


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "no such session file"),
        ("{not json", "not a JSON session file (Expecting property name"),
        ("[1, 2]", "not a deployopt session file (schema None"),
        ({**GOOD, "schema": "deployopt.report/1"}, "(schema 'deployopt.report/1', expected"),
        ({**GOOD, "intra_op_num_threads": "2"}, "intra_op_num_threads: Input should be a valid"),
        ({**GOOD, "intra_op_num_threads": 0}, "intra_op_num_threads: Input should be greater"),
        ({**GOOD, "graph_optimization": "max"}, "graph_optimization: String should match"),
        ({**GOOD, "session_config": {"k": 1}}, "session_config.k: Input should be a valid string"),
        ({k: v for k, v in GOOD.items() if k != "execution_provider"}, "execution_provider: Field"),
    ],
)
def test_bad_session_files_name_the_file(tmp_path, content, message):
    from deployopt.errors import ConfigError
    from deployopt.presets import read_session

    path = tmp_path / "s.json"
    if content is not None:
        path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(ConfigError) as e:
        read_session(path)
    assert e.value.message.startswith(f"{path}: ") and message in e.value.message
    assert "\n" not in e.value.message and "best.session.json" in e.value.hint
    assert e.value.exit_code == 2


def test_an_optimize_folder_is_its_best_onnx_and_session(tmp_path):
    from deployopt.errors import UsageError
    from deployopt.presets import resolve_model

    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(UsageError, match=f"{out}: a folder without best.onnx") as e:
        resolve_model(out)
    assert "output folder of `deployopt optimize`" in e.value.hint
    (out / "best.onnx").write_bytes(b"")
    assert resolve_model(out) == (out / "best.onnx", None)
    write_session_file(out)
    assert resolve_model(out) == (out / "best.onnx", out / "best.session.json")
    assert resolve_model(out, tmp_path / "s.json") == (out / "best.onnx", tmp_path / "s.json")
    assert resolve_model(tmp_path / "m.onnx") == (tmp_path / "m.onnx", None)
    assert resolve_model("m.onnx", "s.json") == (Path("m.onnx"), Path("s.json"))


def test_api_bench_measures_a_folder_under_its_session(mlp_onnx, tmp_path):
    import deployopt

    out = optimize_folder(tmp_path, mlp_onnx, threads=1, optimization="basic")
    fast = dict(min_samples=5, min_seconds=0.0, rounds=1, history=False)
    (r,) = deployopt.bench(out, **fast)
    assert r.valid, r.invalid
    assert r.model == str(out / "best.onnx") and r.target == "cpu"  # budgets still match
    assert (r.env["threads"], r.env["graph_optimization"]) == ("1", "basic")
    assert r.env["session:session.intra_op.allow_spinning"] == "0"
    assert r.env["session_file"] == str(out / "best.session.json")
    # an explicit session file wins over the folder's, for every model
    other = tmp_path / "other"
    other.mkdir()
    explicit = write_session_file(other, threads=2, optimization="disable", config={})
    rs = deployopt.bench([out, mlp_onnx], session=explicit, **fast)
    for r in rs:
        assert r.valid and r.env["session_file"] == str(explicit)
        assert (r.env["threads"], r.env["graph_optimization"]) == ("2", "disable")
        assert not any(k.startswith("session:") for k in r.env)
    # a folder and a plain model side by side: each under its own settings
    folder, plain = deployopt.bench([out, mlp_onnx], threads=1, **fast)
    assert folder.env["session_file"] == str(out / "best.session.json")
    assert "session_file" not in plain.env and plain.env["graph_optimization"] == "all"
    with pytest.raises(deployopt.errors.UsageError, match="--threads 3 and .* disagree"):
        deployopt.bench(out, threads=3, **fast)


def test_bench_cli_folder_prints_the_session(mlp_onnx, tmp_path):
    out = optimize_folder(tmp_path, mlp_onnx, threads=1)
    r = run_cli(
        "bench", str(out), "--min-samples", "5", "--min-seconds", "0", "--rounds", "1",
        "--no-history", "--json", str(tmp_path / "b.json"),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert (
        f"session settings from {out / 'best.session.json'}: 1 threads, graph optimization "
        "basic, session.intra_op.allow_spinning=0"
    ) in r.stdout
    (res,) = json.loads((tmp_path / "b.json").read_text())["results"]
    assert res["model"] == str(out / "best.onnx") and res["env"]["threads"] == "1"


@pytest.mark.parametrize(
    "args, code, text",
    [
        (["--session", "{dir}/none.json"], 2, "{dir}/none.json: no such session file"),
        (["--session", "{dir}/bad.json"], 2, "{dir}/bad.json: not a JSON session file"),
        (["--session", "{dir}/report.json"], 2, "{dir}/report.json: not a deployopt session"),
        (["--session", "{dir}/cuda/best.session.json"], 2, "measured on execution provider 'cuda'"),
        (["{dir}"], 2, "{dir}: a folder without best.onnx"),
    ],
)
def test_bench_cli_session_errors(mlp_onnx, tmp_path, args, code, text):
    (tmp_path / "bad.json").write_text("{")
    (tmp_path / "report.json").write_text('{"schema": "deployopt.report/1"}')
    (tmp_path / "cuda").mkdir()
    write_session_file(tmp_path / "cuda", ep="cuda")
    argv = [a.replace("{dir}", str(tmp_path)) for a in args]
    model = [] if argv[0] == str(tmp_path) else [str(mlp_onnx)]
    r = run_cli("bench", *model, *argv, "--no-history")
    assert r.returncode == code, r.stdout + r.stderr
    assert text.replace("{dir}", str(tmp_path)) in " ".join(r.stderr.split())
    assert "Traceback" not in r.stderr
