"""Shipping: screening and the choice rule (prefer fastest or smallest)."""

from __future__ import annotations

import json

import jsonschema

from deployopt import report, ship
from deployopt.benchmark import BenchResult, LatencyStats
from deployopt.config import make_config
from deployopt.runner import OptimizeResult
from deployopt.variant import Variant

FAST = {"bench_min_samples": 5, "bench_min_seconds": 0.0, "bench_rounds": 1}


def _result(tmp_path, n: int) -> OptimizeResult:
    """``n`` proved variants: v0 the input; v1 the fastest and largest ... the last the slowest
    and smallest."""
    variants = [
        Variant(
            id=f"id{i}",
            name=f"v{i}",
            stage="input" if i == 0 else "int8-dynamic",
            parent=None if i == 0 else "id0",
            params={},
            path=tmp_path / f"v{i}.onnx",
            metrics={"size_bytes": (n - i) * 1_000_000},
            parity={"mean_cosine": 1.0, "min_cosine": 1.0},
        )
        for i in range(n)
    ]
    return OptimizeResult(tmp_path, variants, tmp_path / "manifest.json")


def _measured(name: str, ms: float) -> BenchResult:
    stats = LatencyStats.from_samples([ms] * 5)
    return BenchResult(name, "", "cpu", ("CPUExecutionProvider",), {}, 1.0, (ms,) * 5, stats,
                       None, None, {})  # fmt: skip


def _fake_bench(calls):
    """bench_models measuring v1 at 1 ms, v2 at 2 ms, ... (the later, the slower)."""

    def bench_models(models, target, spec, **kw):
        calls.append(list(models))
        return {name: _measured(name, float(i)) for i, name in enumerate(models, start=1)}

    return bench_models


def test_screening_keeps_the_fastest(tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setattr(ship, "bench_models", _fake_bench(calls))
    cfg = make_config(search="default")
    res = _result(tmp_path, 7)
    full, out = ship.screen(res, cfg, ship.target_of(cfg), ship.constraints_of(cfg), print)
    assert calls == [[f"v{i}" for i in range(7)]]
    assert full == ["v0", "v1", "v2"] and set(out) == {"v3", "v4", "v5", "v6"}
    assert "only the 3 fastest qualifying" in out["v6"]


def test_prefer_smallest_measures_every_variant_in_full(tmp_path, monkeypatch):
    """Screening keeps the fastest few, which would drop the smallest: with prefer=smallest
    it is skipped, and the smallest (here the slowest) is measured and chosen."""
    calls: list = []
    monkeypatch.setattr(ship, "bench_models", _fake_bench(calls))
    cfg = make_config(search="default", prefer="smallest")
    k = ship.constraints_of(cfg)
    assert k.prefer == "smallest"
    res = _result(tmp_path, 7)
    full, out = ship.screen(res, cfg, ship.target_of(cfg), k, print)
    assert calls == [] and out == {}
    assert full == [f"v{i}" for i in range(7)]
    assert res.funnel["screened"] == 0 and res.funnel["measured"] == 7
    bench = {n: [_measured(n, float(i))] for i, n in enumerate(full, start=1)}
    ch = ship.choose(ship.candidates(res, bench, cfg.metric), k)
    assert ch.winner.name == "v6"
    doc = ship._choice_json(ch, cfg.metric, None, tmp_path, None, cfg.prefer)
    assert doc["prefer"] == "smallest" and doc["metric"] == "p50"


def test_prefer_smallest_ships_the_smallest_passing_variant(tmp_path):
    """End to end on a tiny MLP: fp16 is the smallest file, the fused fp32 graph the fastest;
    with prefer=smallest fp16 ships, and the report says which rule chose it."""
    import deployopt

    out = tmp_path / "out"
    res = deployopt.optimize(
        "tests.models:deep_mlp", out, input_shapes={"x": (1, 16)},
        variants=["fuse", "int8-dynamic", "fp16"], prefer="smallest", **FAST,
    )  # fmt: skip
    ch = res.choice
    proved = {v.name: v.metrics["size_bytes"] for v in res.variants if v.ok}
    qualifying = {c.name for c in ch.ranked}
    assert len(proved) > 4  # enough for screening (default search keeps 3), which was skipped
    assert res.funnel["screened"] == 0 and qualifying == set(proved)
    smallest = min(qualifying, key=proved.get)
    assert ch.winner.name == smallest == "fp16"
    assert [c.name for c in ch.ranked] == sorted(qualifying, key=lambda n: (proved[n], n))
    assert (out / "best.onnx").read_bytes() == res.by_name(smallest).path.read_bytes()
    if res.session is not None:  # session settings searched for the winner alone
        assert res.session["searched"] == [smallest] and res.session["model"] == smallest
    doc = json.loads((out / "report.json").read_text())
    jsonschema.validate(doc, report.schema())
    assert doc["choice"]["prefer"] == "smallest" and doc["choice"]["winner"] == "fp16"
    assert doc["constraints"]["prefer"] == "smallest"
