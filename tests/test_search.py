"""deployopt search on a tiny BERT classifier: a 2 x 2 x 2 space whose shared stages are built
once (from the stage events), a resumed search that runs no trial twice, early rejection after
distillation, and the bad inputs refused before any work."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from deployopt import events as ev
from deployopt import recipe as rc
from deployopt import search
from deployopt.errors import ConfigError, NoViableVariantError

FAST = {"bench_samples": 5, "bench_seconds": 0.0, "rounds": 1, "tune_session": False,
        "search": "quick", "seq": 16}  # fmt: skip


@pytest.fixture(scope="module")
def labelled(tiny_bert_classifier_dir, tmp_path_factory):
    from tests.test_task_metrics import sentences, torch_logits, write_csv

    tmp = tmp_path_factory.mktemp("search")
    texts = sentences(40)
    labels = [int(p) for p in torch_logits(tiny_bert_classifier_dir, texts).argmax(axis=1)]
    data = write_csv(tmp / "data.csv", ["text", "label"], list(zip(texts, labels)))
    return tiny_bert_classifier_dir, data


def _recipe(model, data, **search_over):
    return {
        "source": {"path": str(model)},
        "distill": {"data": str(data), "labels_column": "label", "epochs": 1, "max_length": 16},
        "prune": {"data": str(data), "labels_column": "label", "max_length": 16},
        "optimize": {**FAST, "eval": str(data), "labels_column": "label"},
        "search": {"student_layers": ["none", [0]], "heads": [0.0, 0.5],
                   "variants": [["int8-dynamic"], ["fp16"]], **search_over},
    }  # fmt: skip


def test_a_grid_search_builds_shared_stages_once_and_resumes(labelled, tmp_path):
    model, data = labelled
    r = rc.from_dict(_recipe(model, data, max_accuracy_drop=100.0, prune_dominated=False))
    seen: list = []
    doc = search.run(r, tmp_path / "out", on_event=seen.append)
    assert doc["sampler"] == "grid" and len(doc["trials"]) == 8
    done = [(e.stage, e.id) for e in seen if isinstance(e, ev.StageDone)]
    assert len(done) == len(set(done))  # no stage output was built twice
    # one student for the four trials that distil; one pruned model per (student, heads > 0)
    assert sum(1 for s, _ in done if s == "distill") == 1
    assert sum(1 for s, _ in done if s == "prune") == 2
    assert sum(1 for s, _ in done if s == "optimize") == 1 + 8  # the baseline and every trial
    w = doc["winner"]
    assert w["latency_ms"] == min(t["latency_ms"] for t in doc["trials"] if t["status"] == "ok")
    assert (tmp_path / "out" / "best.onnx").exists()
    md = (tmp_path / "out" / "search.md").read_text()
    assert md.count("\n| ") == 9 and "Winner: trial" in md
    # run again: the finished trials are not run again, nothing is rebuilt
    seen.clear()
    again = search.run(r, tmp_path / "out", on_event=seen.append)
    assert not [e for e in seen if isinstance(e, ev.StageDone)]
    assert again["winner"]["number"] == w["number"]


def test_early_rejection_after_distillation_and_no_viable_trial(labelled, tmp_path):
    model, data = labelled
    d = _recipe(model, data, max_accuracy_drop=1.0)
    d["search"] = {"heads": [0.0], "max_accuracy_drop": 1.0}
    # a fresh one-layer student that learns nothing (lr 1e-9) is near chance, while the labels
    # are the teacher's own predictions: the trial stops before export
    d["distill"].update(student_size={"layers": 1}, lr=1e-9)
    seen: list = []
    with pytest.raises(NoViableVariantError) as e:
        search.run(rc.from_dict(d), tmp_path / "out", on_event=seen.append)
    trials = json.loads((tmp_path / "out" / "search.json").read_text())["trials"]
    assert [t["status"] for t in trials] == ["stopped early"]
    assert "student accuracy drop" in trials[0]["reason"] and "points" in e.value.message
    optimized = [x for x in seen if isinstance(x, ev.StageDone) and x.stage == "optimize"]
    assert len(optimized) == 1  # the baseline's only: the trial never reached export


def test_trials_dominated_by_a_smaller_one_within_budget_never_run(labelled, tmp_path):
    model, data = labelled
    r = rc.from_dict(_recipe(model, data, max_accuracy_drop=100.0))
    seen: list = []
    doc = search.run(r, tmp_path / "out", on_event=seen.append)
    by_status: dict[str, list] = {}
    for t in doc["trials"]:
        by_status.setdefault(t["status"], []).append(t)
    # smallest first: the pruned one-layer student under each variant list runs and is within
    # the budget; every other point keeps at least its layers and heads, so it is skipped
    assert [t["params"]["student_layers"] for t in by_status["ok"]] == [[0], [0]]
    assert all(t["params"]["heads"] == 0.5 for t in by_status["ok"])
    assert len(by_status["dominated"]) == 6
    for t in by_status["dominated"]:
        assert t["reason"].startswith("dominated by trial") and t["folder"] is None
    done = [e.stage for e in seen if isinstance(e, ev.StageDone)]
    assert done.count("optimize") == 1 + 2 and done.count("distill") == 1
    # each trial announced and closed by events, with the status the report gives it
    started = [e.number for e in seen if isinstance(e, ev.TrialStarted)]
    finished = {e.number: e.status for e in seen if isinstance(e, ev.TrialFinished)}
    assert sorted(started) == sorted(finished) == sorted(t["number"] for t in doc["trials"])
    assert finished == {t["number"]: t["status"] for t in doc["trials"]}
    assert done.count("prune") == 1  # the student's; the original is never pruned


def test_keeps_at_least_compares_layers_ratios_variants_and_sessions():
    small = {"student_layers": [0, 2], "heads": 0.5, "variants": ["int8-dynamic"]}
    assert search.keeps_at_least({**small, "heads": 0.0}, small)
    assert search.keeps_at_least({**small, "student_layers": "none"}, small)
    assert not search.keeps_at_least({**small, "student_layers": [0]}, small)
    assert not search.keeps_at_least({**small, "variants": ["fp16"]}, small)
    assert not search.keeps_at_least({**small, "sessions": "tuned"}, small)


def test_session_choices_and_a_pareto_objective(labelled, tmp_path):
    model, data = labelled
    d = _recipe(model, data, max_accuracy_drop=100.0)
    d["search"] = {"variants": [["int8-dynamic"]], "objective": "pareto",
                   "sessions": ["default", {"threads": 1, "graph_optimization": "basic"}],
                   "max_accuracy_drop": 100.0}  # fmt: skip
    r = rc.from_dict(d)
    table = search.trial_recipe(r, {"variants": ["int8-dynamic"], "sessions": d["search"]
                                    ["sessions"][1]})  # fmt: skip
    name = table.optimize.target
    assert name.startswith("cpu+session-") and not table.optimize.tune_session
    assert table.targets[name]["threads"] == 1
    assert table.targets[name]["graph_optimization"] == "basic"
    assert search.trial_recipe(r, {"sessions": "default"}).optimize.tune_session is False
    doc = search.run(r, tmp_path / "out")
    assert doc["objective"] == "pareto" and len(doc["trials"]) == 2
    assert all(t["status"] == "ok" for t in doc["trials"])
    assert doc["pareto"] and set(doc["pareto"]) <= {t["number"] for t in doc["trials"]}
    folders = {t["folder"] for t in doc["trials"]}
    assert len(folders) == 2  # each session choice has its own optimize stage
    w = doc["winner"]
    assert w["latency_ms"] == min(t["latency_ms"] for t in doc["trials"])
    # the objective is part of the stored study: changing it needs a new folder
    d["search"]["objective"] = "latency"
    with pytest.raises(ConfigError) as e:
        search.run(rc.from_dict(d), tmp_path / "out")
    assert "new -o folder" in e.value.hint


DRIVER = """
import json, os, signal, sys
from deployopt import events as ev, recipe as rc, search
recipe, out, log = json.loads(sys.argv[1]), sys.argv[2], open(sys.argv[3], "a")
seen = []
def on(e):
    if isinstance(e, ev.StageDone):
        log.write(f"{e.stage} {e.id}\\n"); log.flush()
        seen.append(e.stage)
        if seen.count("optimize") == 2:  # the baseline's, then the first trial's
            os.kill(os.getpid(), signal.SIGKILL)
search.run(rc.from_dict(recipe), out, on_event=on)
"""


def test_a_killed_search_resumes_without_rebuilding_or_repeating(labelled, tmp_path):
    model, data = labelled
    d = _recipe(model, data, max_accuracy_drop=100.0, prune_dominated=False)
    d["search"] = {"heads": [0.0, 0.5], "variants": [["int8-dynamic"]],
                   "max_accuracy_drop": 100.0, "prune_dominated": False}  # fmt: skip
    out, log = tmp_path / "out", tmp_path / "done.log"
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    p = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(d), str(out), str(log)],
                       env=env, cwd=root, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    before = log.read_text().split("\n")
    assert sum(1 for x in before if x.startswith("optimize ")) == 2
    assert not (out / "search.json").exists()
    seen: list = []
    doc = search.run(rc.from_dict(d), out, on_event=seen.append)
    again = [f"{e.stage} {e.id}" for e in seen if isinstance(e, ev.StageDone)]
    assert not set(again) & set(before)  # nothing the killed run finished is built again
    assert sorted(t["params"]["heads"] for t in doc["trials"]) == [0.0, 0.5]
    assert all(t["status"] == "ok" for t in doc["trials"])


def test_the_cli_prints_each_trial_and_the_table(labelled, tmp_path):
    model, data = labelled
    d = _recipe(model, data)
    d["search"] = {"variants": [["int8-dynamic"]], "max_accuracy_drop": 100.0}
    path = tmp_path / "search.toml"
    path.write_text(rc.to_toml(rc.from_dict(d)))
    root = Path(__file__).resolve().parents[1]
    p = subprocess.run([sys.executable, "-m", "deployopt", "search", str(path), "-o",
                        str(tmp_path / "out")], cwd=root, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(root)}, timeout=600)  # fmt: skip
    assert p.returncode == 0, p.stderr[-2000:]
    err = " ".join(p.stderr.split())
    assert "trial 0 variants=['int8-dynamic']" in err and " ok " in err and " ms, metric " in err
    assert "| 0 | variants=['int8-dynamic'] |" in p.stdout and "Winner: trial 0" in p.stdout


def test_an_accuracy_budget_that_looks_like_a_fraction_is_warned_about(labelled, tmp_path):
    model, data = labelled
    d = _recipe(model, data)
    d["search"] = {"variants": [["int8-dynamic"]], "max_accuracy_drop": 0.01}
    try:
        doc = search.run(rc.from_dict(d), tmp_path / "out")
        warnings = doc["warnings"]
    except NoViableVariantError:
        warnings = json.loads((tmp_path / "out" / "search.json").read_text())["warnings"]
    assert len(warnings) == 1 and "0.01 is in points" in warnings[0]
    assert "give max_accuracy_drop 1" in warnings[0]
    assert "Warning: max_accuracy_drop 0.01" in (tmp_path / "out" / "search.md").read_text()


BAD = [
    ({"search": {}}, "[search] has no dimension"),
    ({"search": {"heads": [0.5]}, "optimize": {"eval": None}}, "needs labelled evaluation data"),
    ({"search": {"heads": [1.5]}}, "prune ratios are in [0, 1)"),
    ({"search": {"heads": [0.5], "max_trials": 0}}, "max_trials: Input should be greater than"),
    ({"search": {"student_layers": ["half"]}}, 'a list of layers or "none"'),
    ({"search": {"heads": [0.5], "max_minutes": 0}}, "max_minutes: Input should be greater"),
    ({"search": {"sessions": ["fast"]}}, 'a session is "tuned", "default" or a table'),
    ({"search": {"sessions": [{"spin": 1}]}}, "a session table takes graph_optimization"),
    ({"search": {"sessions": [{"threads": 0}]}}, "threads"),
    ({"search": {"heads": [0.5], "objective": "speed"}}, "objective"),
    ({"search": {"student_layers": [[0, 9]]}}, "[search] student_layers [0, 9]: layer list"),
]


@pytest.mark.parametrize("change,message", BAD)
def test_bad_search_input_is_refused_before_any_work(labelled, change, message, tmp_path):
    model, data = labelled
    d = _recipe(model, data)
    for table, body in change.items():
        d[table] = {k: v for k, v in {**d[table], **body}.items() if v is not None}
        if table == "search" and not body:
            d["search"] = {}
    with pytest.raises(ConfigError) as e:
        search.check(rc.from_dict(d), "recipe")
    assert message in e.value.message


def test_a_search_recipe_prints_and_reads_back_the_same(labelled, tmp_path):
    model, data = labelled
    r = rc.from_dict(_recipe(model, data))
    p = tmp_path / "r.toml"
    p.write_text(rc.to_toml(r))
    assert rc.load(p) == r
