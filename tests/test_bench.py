"""The timing loop on a fake clock, and real measurements of a tiny model in a worker."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from deployopt.bench import BenchSpec, LatencyStats, bench_model, measure


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


@pytest.fixture(scope="module")
def mlp_onnx(tmp_path_factory):
    import deployopt

    out = tmp_path_factory.mktemp("b")
    res = deployopt.optimize("tests.models:mlp", out, input_shapes={"x": (1, 16)}, variants=[])
    return res.by_name("fp32").path


def test_bench_model_reports_real_measurements(mlp_onnx):
    r = bench_model(str(mlp_onnx), BenchSpec(batch=4, min_samples=20, min_seconds=0.05))
    assert r.valid and r.providers[0] == "CPUExecutionProvider"
    assert r.shapes == {"x": [4, 16]}
    assert len(r.samples_ms) >= 20 and all(s > 0 for s in r.samples_ms)
    assert r.stats.p50_ms <= r.stats.p99_ms
    assert r.throughput == pytest.approx(4 / (r.stats.p50_ms / 1e3))
    assert r.cold_ms > 0 and r.peak_rss_mb > 0
    assert r.env["onnxruntime"] and r.env["cores"]


def cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "deployopt", *args],
        capture_output=True,
        text=True,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )


def test_bench_cli_json_and_missing_ep(mlp_onnx, tmp_path):
    r = cli(
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
    r = cli("bench", str(mlp_onnx), "--ep", "tensorrt")
    assert r.returncode == 4
    assert "execution provider 'tensorrt'" in r.stderr and "CPUExecutionProvider" in r.stderr
    assert "Traceback" not in r.stderr
