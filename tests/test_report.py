"""Report on synthetic results (schema, HTML plots, no external URL), and optimize end to end:
bench -> select -> best.onnx -> report on a tiny model."""

from __future__ import annotations

import json
import re

import jsonschema
import numpy as np
import onnx
import pytest

from deployopt import report
from deployopt.benchmark import LatencyStats
from deployopt.errors import NoViableVariantError
from tests.models import ok_variants


def _bench(ms: float, valid: bool = True, n: int = 40) -> dict:
    rng = np.random.default_rng(int(ms * 10))
    samples = list(ms + rng.gamma(2.0, 0.05 * ms, size=n))
    return {
        "name": "x",
        "model": "m.onnx",
        "target": "cpu",
        "providers": ["CPUExecutionProvider"],
        "shapes": {"x": [1, 16]},
        "cold_ms": 12.0,
        "samples_ms": samples if valid else [],
        "stats": LatencyStats.from_samples(samples).to_json() if valid else None,
        "throughput": 1e3 / ms if valid else None,
        "peak_rss_mb": 80.0,
        "env": {"cpu": "test cpu", "cores": "2"},
        "node_providers": {},
        "invalid": [] if valid else ["requested CUDAExecutionProvider but ..."],
        "valid": valid,
    }


def _variant(vid, name, parent, cos, mb, status="ok", reason=""):
    parity = (
        None
        if cos is None
        else {"mean_cosine": cos, "min_cosine": cos - 0.01, "max_abs_diff": 0.1, "samples": 10}
    )
    return {
        "id": vid,
        "name": name,
        "stage": name,
        "parent": parent,
        "status": status,
        "reason": reason,
        "warnings": [],
        "path": f"variants/{vid}/model.onnx" if status == "ok" else None,
        "size_bytes": int(mb * 1e6) if mb else None,
        "parity": parity,
        "params": {},
        "metrics": {},
    }


def synthetic(winner: str | None = "int8-dynamic") -> dict:
    variants = [
        _variant("a", "fp32", None, None, 90),
        _variant("b", "fuse", "a", 1.0, 90),
        _variant("c", "int8-dynamic", "a", 0.993, 23),
        _variant("d", "int8-static", "a", 0.95, 80),
        _variant("e", "fp16", "b", None, None, status="failed", reason="parity failed"),
    ]
    bench = {"fp32": [_bench(18.0)], "fuse": [_bench(17.0)], "int8-dynamic": [_bench(8.6)]}
    bench["int8-static"] = [_bench(15.0, valid=False)]
    choice = {
        "winner": winner,
        "ranked": [winner, "fuse", "fp32"] if winner else [],
        "rejected": {"int8-static": "benchmark invalid: fell back", "fp16": "variant failed"},
        "pareto": ["int8-dynamic", "fuse"],
        "metric": "p50",
        "best_path": "best.onnx" if winner else None,
        "session": {
            "chosen": "no-skip-layernorm-fusion",
            "session_config": {"optimization.disable_specified_optimizers": "SkipLayerNormFusion"},
            "p50_ms": {"default": 8.6, "no-skip-layernorm-fusion": 7.5},
            "min_gain": 0.03,
        }
        if winner
        else None,
    }
    return report.build(
        source="tests:model",
        task="feature-extraction",
        config={"variants": ["fuse"]},
        environment={"cpu": "test cpu", "cores": "2", "onnxruntime": "1.0"},
        target={"name": "cpu", "ep": "cpu", "threads": 2},
        bench_spec={"batch": 1, "seq": 128},
        constraints={"min_cosine": 0.99},
        data={},
        variants=variants,
        bench=bench,
        choice=choice,
    )


def test_report_json_validates_against_its_schema():
    doc = json.loads(json.dumps(synthetic()))
    jsonschema.validate(doc, report.schema())
    assert [v["chain"] for v in doc["variants"]][-1] == ["fp32", "fuse", "fp16"]
    broken = json.loads(json.dumps(doc))
    broken["variants"][1]["bench"][0]["stats"]["samples"] = 0
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, report.schema())


def test_html_is_self_contained_with_both_plots():
    page = report.render_html(synthetic())
    imgs = re.findall(
        r'<img alt="([a-z_]+)" src="data:image/png;base64,[A-Za-z0-9+/=]{200,}"', page
    )
    assert imgs == ["latency_vs_accuracy", "latency_distributions"]
    refs = re.findall(r'(?:src|href)\s*=\s*"([^"]*)"', page)
    assert refs and all(r.startswith("data:") for r in refs)
    text = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", page)
    assert "http" not in text and "//" not in text and "@import" not in text
    assert "<b>Chosen: int8-dynamic</b>" in page
    assert "int8-static: benchmark invalid: fell back" in page


def test_markdown_table_and_no_winner():
    md = report.render_md(synthetic())
    header = next(ln for ln in md.splitlines() if ln.startswith("| variant"))
    assert header.split(" | ")[1:5] == ["chain", "size MB", "mean cos", "min cos"]
    row = next(ln for ln in md.splitlines() if ln.startswith("| int8-dynamic "))
    assert "**chosen**" in row and "fp32 > int8-dynamic" in row
    assert "bench invalid" in next(ln for ln in md.splitlines() if ln.startswith("| int8-static"))
    assert (
        "Session: no-skip-layernorm-fusion (optimization.disable_specified_optimizers="
        "SkipLayerNormFusion); p50 default 8.60 ms, no-skip-layernorm-fusion 7.50 ms" in md
    )
    assert "Session: no-skip-layernorm-fusion" in report.render_html(synthetic())
    none = report.render_md(synthetic(winner=None))
    assert "**No variant qualifies.**" in none and "**chosen**" not in none


def test_report_without_bench_results_renders():
    doc = synthetic()
    for v in doc["variants"]:
        v["bench"] = []
    doc["choice"] = None
    jsonschema.validate(json.loads(json.dumps(doc)), report.schema())
    page = report.render_html(doc)
    assert "no benchmark results to plot" in page and "data:image" not in page


FAST = {"bench_min_samples": 5, "bench_min_seconds": 0.0, "bench_rounds": 1}


def test_optimize_ends_with_best_onnx_and_reports(tmp_path):
    import deployopt

    out = tmp_path / "out"
    logs = []
    res = deployopt.optimize(
        "tests.models:mlp",
        out,
        input_shapes={"x": (1, 16)},
        variants=["fuse", "int8-dynamic"],
        bench_batches=(1, 4),
        log=logs.append,
        **FAST,
    )
    ch = res.choice
    assert ch.winner is not None and res.best == out / "best.onnx"
    winner = res.by_name(ch.winner.name)
    assert (out / "best.onnx").read_bytes() == winner.path.read_bytes()
    onnx.checker.check_model(str(out / "best.onnx"))
    # every proved variant is benchmarked (which int8 recipes pass parity follows the CPU)
    assert set(res.bench) == {v.name for v in res.variants if v.ok and v.stage != "input"}
    assert {"fp32", "fuse"} < set(res.bench) and ok_variants(res, "int8-dynamic")
    assert all([r.batch for r in rs] == [1, 4] for rs in res.bench.values())
    assert all(r.valid for rs in res.bench.values() for r in rs)
    # the winner is the fastest qualifying one on p50 at the first batch size, unless the
    # session search's final run measured a runner-up under its best setting clearly faster
    p50 = {c.name: c.latency_ms for c in ch.ranked}
    if res.session and res.session.get("replaced"):
        from deployopt.tuning import SESSION_MIN_GAIN

        key = f"{ch.winner.name} | tuned"
        assert res.session["model"] == ch.winner.name and ch.ranked[0] == ch.winner
        assert res.session["final_run_ratio"][key] <= 1 - SESSION_MIN_GAIN
    else:
        assert ch.winner.latency_ms == min(p50.values())
    assert any(m.startswith("chosen: ") for m in logs)
    doc = json.loads((out / "report.json").read_text())
    jsonschema.validate(doc, report.schema())
    assert doc["choice"]["winner"] == ch.winner.name
    assert doc["environment"]["target"] == "cpu" and doc["target"]["ep"] == "cpu"
    assert "data:image/png" in (out / "report.html").read_text()
    assert f"**Chosen: {ch.winner.name}**" in (out / "report.md").read_text()
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp-")]
    # session settings searched for the winner and close runners-up; the file says what the
    # final interleaved run chose, by the rule, and how to create that session
    from deployopt.tuning import SESSION_MIN_GAIN, pick_session

    session = json.loads((out / "best.session.json").read_text())
    rec = doc["choice"]["session"]
    assert session["schema"] == "deployopt.session/1" and session["model"] == "best.onnx"
    assert session["execution_provider"] == "cpu" and session["variant"] == ch.winner.name
    assert session["chosen"] == rec["chosen"] and rec["model"] == ch.winner.name
    assert session["session_config"] == rec["session_config"]
    assert session["intra_op_num_threads"] == rec["threads"]
    assert "default" in session["measured_p50_ms"]
    assert all(v > 0 for v in session["measured_p50_ms"].values())
    ratios = rec["final_run_ratio"]
    baseline = f"{rec['searched'][0]} | default"
    assert ratios[baseline] == 1.0
    assert pick_session(ratios, baseline=baseline).startswith(rec["model"] + " | ")
    if rec["chosen"] != "default" or rec["model"] != rec["searched"][0]:
        assert min(ratios.values()) <= 1 - SESSION_MIN_GAIN
    for step in rec["steps"]:  # every step kept its current setting unless beaten clearly
        assert step["ratio"]["current"] == 1.0
        assert step["chosen"] == pick_session(step["ratio"], baseline="current")
    assert "Session: " in (out / "report.md").read_text()
    assert any(m.startswith("session: ") for m in logs)
    # the search: the CPU it was derived for, each candidate, and what each step kept
    search = doc["search"]
    assert search["effort"] == "default" and search["cpu"]["cores"] >= 1
    funnel = search["funnel"]
    assert funnel["candidates"] == len(res.variants)
    assert funnel["parity_passed"] == sum(v.ok for v in res.variants)
    assert funnel["measured"] == len(res.bench)
    names = [c["name"] for c in search["candidates"]]
    assert names == [v.name for v in res.variants if v.stage.startswith("int8-")]
    assert (
        f"Search (default): {funnel['candidates']} candidates -> "
        in (out / "report.md").read_text()
    )
    assert "<h2>Search</h2>" in (out / "report.html").read_text()
    # what is shipped is readable like any file the user writes (not mkstemp's 0600)
    import os

    mask = os.umask(0)
    os.umask(mask)
    for f in ("best.onnx", "best.session.json", "report.json", "report.html", "manifest.json"):
        assert (out / f).stat().st_mode & 0o777 == 0o666 & ~mask, f
    assert winner.path.parent.stat().st_mode & 0o777 == 0o777 & ~mask
    assert winner.path.stat().st_mode & 0o777 == 0o666 & ~mask


def test_session_line_names_threads_and_entries():
    line = report.session_line(
        {
            "chosen": "threads=1, SkipLayerNormFusion=off",
            "threads": 1,
            "graph_optimization": "all",
            "session_config": {"optimization.disable_specified_optimizers": "SkipLayerNormFusion"},
            "p50_ms": {"default": 10.0, "threads=1, SkipLayerNormFusion=off": 9.0},
        }
    )
    assert line.startswith("threads=1, SkipLayerNormFusion=off (1 intra-op threads; ")
    assert "optimization.disable_specified_optimizers=SkipLayerNormFusion" in line
    assert "p50 default 10.00 ms, threads=1, SkipLayerNormFusion=off 9.00 ms" in line


def test_no_session_tuning_when_asked(tmp_path):
    import deployopt

    out = tmp_path / "out"
    res = deployopt.optimize(
        "tests.models:mlp", out, input_shapes={"x": (1, 16)}, variants=["int8-dynamic"],
        tune_session=False, **FAST,
    )  # fmt: skip
    assert res.best is not None and res.session is None
    assert not (out / "best.session.json").exists()
    assert json.loads((out / "report.json").read_text())["choice"]["session"] is None


def test_no_viable_variant_removes_stale_best(tmp_path):
    import deployopt

    out = tmp_path / "out"
    out.mkdir()
    (out / "best.onnx").write_bytes(b"stale")
    (out / "best.session.json").write_text("{}")
    with pytest.raises(NoViableVariantError) as e:  # as the CLI exits 6
        deployopt.optimize(
            "tests.models:mlp",
            out,
            input_shapes={"x": (1, 16)},
            variants=["int8-dynamic"],
            max_size_mb=1e-6,
            **FAST,
        )
    assert e.value.exit_code == 6 and str(e.value).startswith("no variant meets the constraints")
    res = e.value.result  # the run's result rides on the error: the table and every reason
    assert res.failure is e.value and res.reports["md"] == out / "report.md"
    assert res.choice.winner is None and res.best is None
    assert not (out / "best.onnx").exists() and not (out / "best.session.json").exists()
    proved = {v.name for v in res.variants if v.ok}
    assert proved and {n for n in proved if n in res.choice.rejected} == proved
    assert all(res.choice.rejected[n].startswith("size ") for n in proved)
    assert "**No variant qualifies.**" in (out / "report.md").read_text()


def test_write_best_carries_external_data(tmp_path):
    from deployopt.ship import write_best
    from deployopt.stages.base import EXTERNAL_DATA_FILE
    from tests.models import tiny_onnx_model

    src = tmp_path / "v"
    src.mkdir()
    model = tiny_onnx_model()
    onnx.save_model(
        model,
        str(src / "model.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=EXTERNAL_DATA_FILE,
        size_threshold=0,
    )
    out = tmp_path / "out"
    out.mkdir()
    best = write_best(out, src / "model.onnx")
    assert (out / "best.onnx.data").exists()
    loaded = onnx.load(str(best))
    ext = [i for i in loaded.graph.initializer if i.data_location == onnx.TensorProto.EXTERNAL]
    assert ext == []  # loaded with its data from best.onnx.data
    got = onnx.numpy_helper.to_array(loaded.graph.initializer[0])
    want = onnx.numpy_helper.to_array(tiny_onnx_model().graph.initializer[0])
    np.testing.assert_array_equal(got, want)


def test_cli_no_variant_qualifies_exits_6_with_reasons(tmp_path):
    from tests.models import run_cli

    r = run_cli(
        *["optimize", "tests.models:mlp", "--input-shape", "x=1x16", "-o", str(tmp_path / "o")],
        *["--variants", "int8-dynamic", "--bench-samples", "5", "--bench-seconds", "0"],
        *["--rounds", "1", "--max-latency-ms", "0.000001"],
    )
    assert r.returncode == 6, r.stderr
    assert "error: no variant meets the constraints" in r.stderr
    assert re.search(r"int8-dynamic\S*: p50 ", r.stderr) and "> budget 1e-06 ms" in r.stderr
    assert "Traceback" not in r.stderr
    assert (tmp_path / "o" / "report.html").exists() and not (tmp_path / "o" / "best.onnx").exists()
