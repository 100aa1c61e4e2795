"""deployopt search on a tiny BERT classifier: a 2 x 2 x 2 space whose shared stages are built
once (from the stage events), a resumed search that runs no trial twice, early rejection after
distillation, and the bad inputs refused before any work."""

from __future__ import annotations

import json

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
    r = rc.from_dict(_recipe(model, data, max_accuracy_drop=100.0))
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


BAD = [
    ({"search": {}}, "[search] has no dimension"),
    ({"search": {"heads": [0.5]}, "optimize": {"eval": None}}, "needs labelled evaluation data"),
    ({"search": {"heads": [1.5]}}, "prune ratios are in [0, 1)"),
    ({"search": {"heads": [0.5], "max_trials": 0}}, "max_trials: Input should be greater than"),
    ({"search": {"student_layers": ["half"]}}, 'a list of layers or "none"'),
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
        rc.from_dict(d)
    assert message in e.value.message


def test_a_search_recipe_prints_and_reads_back_the_same(labelled, tmp_path):
    model, data = labelled
    r = rc.from_dict(_recipe(model, data))
    p = tmp_path / "r.toml"
    p.write_text(rc.to_toml(r))
    assert rc.load(p) == r
