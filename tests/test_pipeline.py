"""deployopt run: stages cached by content id, judged from the runner's typed events (never
from timings): unchanged -> all cached; a budget change -> only the gate; a prune change ->
prune onward; --force; a failing stage stops the run, keeps what was done, and the report says
where it stopped."""

from __future__ import annotations

import json

import onnx
import pytest

from deployopt import events as ev
from deployopt import pipeline
from deployopt import recipe as rc
from deployopt.errors import NoViableVariantError

BASE = {
    "target": "cpu",
    "source": {"path": "tests.models:cnn", "input_shape": {"x": [1, 3, 32, 32]}},
    "prune": {"channels": 0.5},
    "optimize": {"variants": ["fuse"], "bench_samples": 5, "bench_seconds": 0.0, "rounds": 1,
                 "tune_session": False, "search": "quick"},
    "gate": {"max_size_mb": 50.0, "no_history": True, "junit": "gate.xml"},
}  # fmt: skip


def _run(data, out, **kw):
    seen: list = []
    result = pipeline.run(rc.from_dict(data), out, on_event=seen.append, **kw)
    return result, seen


def _kinds(seen) -> dict[str, str]:
    """stage -> cached | done | failed, from the events."""
    out = {}
    for e in seen:
        if isinstance(e, ev.StageCached):
            out[e.stage] = "cached"
        elif isinstance(e, ev.StageDone):
            out[e.stage] = "done"
        elif isinstance(e, ev.StageFailed):
            out[e.stage] = "failed"
    return out


def _with(data, table, **values):
    new = json.loads(json.dumps(data))
    new[table].update(values)
    return new


def test_stages_rerun_only_from_what_changed(tmp_path):
    out = tmp_path / "out"
    first, seen = _run(BASE, out)
    assert _kinds(seen) == {"prune": "done", "optimize": "done", "gate": "done"}
    assert first.exit_code == 0 and first.verdict == "PASS"
    best = out / "best.onnx"
    onnx.checker.check_model(onnx.load(str(best)))
    assert (out / "gate.xml").read_text().startswith("<?xml")  # the recipe's junit, under OUT
    report = json.loads((out / "report.json").read_text())
    assert [s["stage"] for s in report["lineage"]] == ["prune", "optimize", "gate"]
    assert report["lineage"][1]["parent"] == report["lineage"][0]["id"]
    assert report["stopped_at"] is None and report["verdict"] == "PASS"
    # nothing changed: every stage cached, same ids
    again, seen = _run(BASE, out)
    assert _kinds(seen) == {"prune": "cached", "optimize": "cached", "gate": "cached"}
    assert [s.id for s in again.stages] == [s.id for s in first.stages]
    assert not any(isinstance(e, ev.StageStarted) for e in seen)
    # a budget change: only the gate runs, and its verdict is the exit code
    tight, seen = _run(_with(BASE, "gate", max_size_mb=1e-6), out)
    assert _kinds(seen) == {"prune": "cached", "optimize": "cached", "gate": "done"}
    assert tight.verdict == "FAIL" and tight.exit_code == 1
    # a prune change: prune and everything after it
    _, seen = _run(_with(BASE, "prune", channels=0.25), out)
    assert _kinds(seen) == {"prune": "done", "optimize": "done", "gate": "done"}
    # --force optimize: optimize and the gate after it, not prune
    _, seen = _run(BASE, out, force=("optimize",))
    assert _kinds(seen) == {"prune": "cached", "optimize": "done", "gate": "done"}


def test_a_failing_stage_stops_the_run_and_keeps_what_was_done(tmp_path):
    out = tmp_path / "out"
    data = _with(BASE, "optimize", max_size_mb=1e-6)  # no variant can qualify
    seen: list = []
    with pytest.raises(NoViableVariantError):
        pipeline.run(rc.from_dict(data), out, on_event=seen.append)
    assert _kinds(seen) == {"prune": "done", "optimize": "failed"}
    report = json.loads((out / "report.json").read_text())
    assert (
        report["stopped_at"] == "optimize" and "max_size_mb" in report["error"] or report["error"]
    )
    assert [s["status"] for s in report["lineage"]] == ["done", "failed", "not run"]
    assert not (out / "best.onnx").exists()
    # fixed: the finished prune is reused
    _, seen = _run(BASE, out)
    assert _kinds(seen)["prune"] == "cached"


def test_data_content_is_part_of_the_id(tmp_path):
    data_file = tmp_path / "calib.npz"
    import numpy as np

    np.savez(data_file, x=np.zeros((2, 3, 32, 32), np.float32))
    d = _with(BASE, "optimize", calibration=str(data_file))
    _, before = pipeline.plan(rc.from_dict(d))
    np.savez(data_file, x=np.ones((2, 3, 32, 32), np.float32))
    _, after = pipeline.plan(rc.from_dict(d))
    assert before[0].id == after[0].id  # prune reads no data
    assert before[1].id != after[1].id and before[2].id != after[2].id
    # where a copy of the results goes is not part of any id
    _, moved = pipeline.plan(rc.from_dict(_with(d, "gate", junit="elsewhere.xml")))
    assert moved[2].id == after[2].id


def test_the_cli_prints_one_line_per_stage(tmp_path):
    import tomli_w

    from tests.models import run_cli, tiny_onnx_model

    model = tmp_path / "tiny.onnx"
    onnx.save(tiny_onnx_model(), str(model))
    p = tmp_path / "recipe.toml"
    p.write_text(tomli_w.dumps({"source": {"path": "tiny.onnx"},
                                "gate": {"max_size_mb": 10.0, "no_history": True}}))  # fmt: skip
    r = run_cli("run", str(p), "-o", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    assert [ln.split()[2] for ln in r.stderr.splitlines() if " s " in ln] == ["gate"]
    r = run_cli("run", str(p), "-o", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    lines = [ln.split() for ln in r.stderr.splitlines() if ln.strip().startswith("cached")]
    assert [ln[1] for ln in lines] == ["gate"]
    assert "gate: PASS" in r.stderr
    p.write_text(tomli_w.dumps({"source": {"path": "tiny.onnx"},
                                "gate": {"max_size_mb": 1e-6, "no_history": True}}))  # fmt: skip
    r = run_cli("run", str(p), "-o", str(tmp_path / "out"))
    assert r.returncode == 1 and "gate: FAIL" in r.stderr, r.stderr


def test_the_api_runs_a_recipe_file_as_the_cli_does(tmp_path):
    import tomli_w

    import deployopt
    from tests.models import tiny_onnx_model

    onnx.save(tiny_onnx_model(), str(tmp_path / "tiny.onnx"))
    p = tmp_path / "recipe.toml"
    p.write_text(tomli_w.dumps({"source": {"path": "tiny.onnx"},
                                "gate": {"max_size_mb": 1e-6, "no_history": True}}))  # fmt: skip
    res = deployopt.run(p, tmp_path / "out")
    assert res.verdict == "FAIL" and res.exit_code == 1  # returned, as the CLI exits 1
    assert res.by_stage("gate").status == "done"
    again = deployopt.run(p, tmp_path / "out", sets=["gate.max_size_mb=10"])
    assert again.verdict == "PASS" and again.exit_code == 0
    assert again.stages[0].id != res.stages[0].id
    doc = json.loads(res.report.read_text())
    assert doc["schema"] == "deployopt.run/1" and doc["verdict"] == "PASS"  # the latest run's


def test_a_killed_run_resumes_inside_the_stage_it_stopped_in(tmp_path):
    out = tmp_path / "out"

    def kill_after_first_variant(e):
        if isinstance(e, ev.VariantFinished) and e.status == "ok":
            raise KeyboardInterrupt  # as a Ctrl-C in the middle of optimize

    with pytest.raises(KeyboardInterrupt):
        pipeline.run(rc.from_dict(BASE), out, on_event=kill_after_first_variant)
    report = json.loads((out / "report.json").read_text())
    assert report["stopped_at"] == "optimize"
    _, seen = _run(BASE, out)
    assert _kinds(seen) == {"prune": "cached", "optimize": "done", "gate": "done"}
    finished = [e for e in seen if isinstance(e, ev.VariantFinished)]
    assert finished[0].status == "reused"  # the variant built before the kill is not rebuilt


def test_a_factory_s_code_is_part_of_the_source_id(tmp_path, monkeypatch):
    pkg = tmp_path / "mymodels.py"
    pkg.write_text("def make():\n    return None\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    d = {"source": {"path": "mymodels:make"}, "optimize": {}}
    before, _ = pipeline.plan(rc.from_dict(d))
    pkg.write_text("def make():\n    return 1\n")
    after, _ = pipeline.plan(rc.from_dict(d))
    assert before != after


def test_a_recipe_judges_the_task_metric_and_reports_it(tiny_bert_classifier_dir, tmp_path):
    from tests.test_task_metrics import sentences, torch_logits, write_csv

    texts = sentences(24)
    labels = [int(p) for p in torch_logits(tiny_bert_classifier_dir, texts).argmax(axis=1)]
    data = write_csv(tmp_path / "eval.csv", ["text", "label"], list(zip(texts, labels)))
    recipe = {
        "source": {"path": str(tiny_bert_classifier_dir)},
        "optimize": {**BASE["optimize"], "variants": ["int8-dynamic"], "eval": str(data),
                     "labels_column": "label", "max_accuracy_drop": 5.0, "seq": 16},
    }  # fmt: skip
    res, _ = _run(recipe, tmp_path / "out")
    task = res.by_stage("optimize").outputs["task"]
    assert task["metric"] == "accuracy" and task["original"] == pytest.approx(100.0)
    assert task["drop"] == pytest.approx(task["original"] - task["value"]) and task["drop"] <= 5
    summary = res.by_stage("optimize").summary
    assert f"accuracy {task['value']:.2f} (drop {task['drop']:.2f})" in summary
    assert summary in (tmp_path / "out" / "report.md").read_text()
