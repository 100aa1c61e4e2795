"""Task metrics with ``--labels-column``: measured for every variant on labelled evaluation
data, checked against PyTorch, judged by ``--max-accuracy-drop``, and bad labels refused with
one line naming the file."""

from __future__ import annotations

import csv
import json
import random
import shutil
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import torch
from torch import nn

import deployopt
from deployopt import report
from deployopt.errors import ConfigError, DataError
from tests.models import WORDS, flat, ok_variants, optimize_only, run_cli

FAST = {"bench_min_samples": 5, "bench_min_seconds": 0.0, "bench_rounds": 1,
        "tune_session": False, "search": "quick"}  # fmt: skip


def sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(n)]


def write_csv(path: Path, header: list[str], rows: list) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def torch_logits(folder: Path, texts: list[str]) -> np.ndarray:
    from transformers import AutoTokenizer, BertForSequenceClassification

    tok = AutoTokenizer.from_pretrained(str(folder))
    model = BertForSequenceClassification.from_pretrained(str(folder)).eval()
    enc = tok(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
    with torch.no_grad():
        return model(**enc).logits.numpy()


@pytest.fixture(scope="module")
def labelled_run(tiny_bert_classifier_dir, tmp_path_factory):
    """The tiny classifier on 30 texts whose labels are PyTorch's argmax for the first 20 and
    the next class for the last 10: accuracy 2/3 by construction."""
    tmp = tmp_path_factory.mktemp("labelled")
    texts = sentences(30)
    pred = torch_logits(tiny_bert_classifier_dir, texts).argmax(axis=1)
    labels = [int(p) if i < 20 else int(p + 1) % 3 for i, p in enumerate(pred)]
    data = write_csv(tmp / "eval.csv", ["sentence", "label"], list(zip(texts, labels)))
    res = optimize_only(str(tiny_bert_classifier_dir), tmp / "out", evaluation=data,
                        labels_column="label", text_column="sentence",
                        variants=["int8-dynamic", "fp16"], search="quick")  # fmt: skip
    return res, pred, np.asarray(labels)


def test_fp32_accuracy_is_pytorch_accuracy(labelled_run):
    res, pred, labels = labelled_run
    fp32 = res.by_name("fp32").metrics
    ours = float((pred == labels).mean() * 100)
    assert ours == pytest.approx(200 / 3)
    assert fp32["task.accuracy"] == pytest.approx(ours, abs=1e-6)
    assert fp32["task.argmax_agreement"] == 100.0 and fp32["accuracy_drop"] == 0.0
    assert fp32["task.metric"] == "accuracy" and fp32["task.samples"] == 30
    # macro-F1 from the confusion of PyTorch's predictions, per class present
    f1 = []
    for c in np.union1d(pred, labels):
        tp = np.sum((pred == c) & (labels == c))
        f1.append(2 * tp / (np.sum(pred == c) + np.sum(labels == c)))
    assert fp32["task.macro_f1"] == pytest.approx(np.mean(f1) * 100, abs=1e-4)
    assert "eval.csv: 30 labelled samples" in res.meta["data"]["labels"]


def test_every_proved_variant_carries_its_drop(labelled_run, tmp_path):
    res, _, _ = labelled_run
    base = res.by_name("fp32").metrics["task.accuracy"]
    measured = ok_variants(res, "int8-dynamic") + ok_variants(res, "fp16")
    assert measured and ok_variants(res, "int8-dynamic")
    for v in measured:
        m = v.metrics
        assert m["accuracy_drop"] == pytest.approx(base - m["task.accuracy"], abs=1e-5), v.name
        assert 95 <= m["task.argmax_agreement"] <= 100, v.name  # parity passed: >= 0.95
        # variant.json and the manifest carry them
        saved = json.loads((v.path.parent / "variant.json").read_text())["metrics"]
        assert saved["accuracy_drop"] == m["accuracy_drop"]
    manifest = json.loads(res.manifest.read_text())
    by = {e["name"]: e for e in manifest["variants"]}
    assert by["fp32"]["task"]["accuracy"] == pytest.approx(base)
    assert all(e["task"] is None for e in manifest["variants"] if e["status"] != "ok")
    # the report: schema-valid, the metric beside the cosines, a section with every number
    doc = json.loads(res.reports["json"].read_text())
    jsonschema.validate(doc, report.schema())
    md = res.reports["md"].read_text()
    head = next(ln for ln in md.splitlines() if ln.startswith("| variant"))
    assert head.split(" | ")[3:7] == ["mean cos", "min cos", "accuracy", "drop pts"]
    assert f"- fp32: accuracy {base:.2f}, macro_f1 " in md and "; drop 0.00" in md


def test_a_rerun_without_labels_drops_the_old_metrics(
    labelled_run, tiny_bert_classifier_dir, tmp_path
):
    res, _, _ = labelled_run
    out = shutil.copytree(res.out_dir, tmp_path / "out")  # the variants cached, measured
    again = optimize_only(str(tiny_bert_classifier_dir), out, variants=["int8-dynamic"],
                          search="quick")  # fmt: skip
    assert any(v.metrics.get("build_s") is not None for v in again.variants)
    assert all("accuracy_drop" not in v.metrics for v in again.variants)
    assert all(v.metrics.get("task.accuracy") is None for v in again.variants)


class Tie(nn.Module):
    """Two logits that differ by one part in 4096: fp32 tells them apart, fp16 weights (10
    mantissa bits) round both to 1.0, so the fp16 variant ties and argmax picks class 0."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2, bias=False)
        with torch.no_grad():
            self.fc.weight.zero_()
            self.fc.weight[0, 0] = 1.0
            self.fc.weight[1, 0] = 1.0 + 2.0**-12

    def forward(self, x):
        return self.fc(x)


def tie() -> nn.Module:
    return Tie().eval()


def test_max_accuracy_drop_rejects_the_variant_that_loses_accuracy(tmp_path):
    # 8 samples: x0 > 0 on two -> fp32 says class 1, fp16 ties to class 0: 75 vs 100
    x = np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)
    x[:, 0] = [1, 2, -1, -2, -3, -1, -0.5, -4]
    np.savez(tmp_path / "eval.npz", x=x, label=np.array([1, 1, 0, 0, 0, 0, 0, 0]))
    res = deployopt.optimize("tests.test_task_metrics:tie", tmp_path / "out",
                             input_shapes={"x": (1, 4)}, evaluation=tmp_path / "eval.npz",
                             labels_column="label", variants=["fp16"], max_accuracy_drop=0.01,
                             **FAST)  # fmt: skip
    assert res.by_name("fp32").metrics["task.accuracy"] == 100.0
    fp16 = res.by_name("fp16")
    assert fp16.ok and fp16.metrics["task.accuracy"] == 75.0
    assert fp16.metrics["accuracy_drop"] == 25.0 and fp16.metrics["task.argmax_agreement"] == 75.0
    assert res.choice.rejected["fp16"] == "accuracy drop 25.00 > 0.01"
    assert res.choice.winner is not None and res.choice.winner.name == "fp32"
    # 0.01 reads like a fraction: the run says it is points
    assert any("--max-accuracy-drop 0.01 is in points" in w for w in res.meta["warnings"])
    assert "- fp16: accuracy 75.00, macro_f1" in res.reports["md"].read_text()


def test_image_folder_labels_are_class_folders_taken_in_turn(tmp_path):
    from PIL import Image

    from deployopt import images
    from deployopt.inputs import InputSpec
    from tests.models import cnn

    rng = np.random.default_rng(0)
    for c, n in (("cat", 4), ("dog", 2), ("frog", 3)):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(n):
            a = rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)
            Image.fromarray(a).save(tmp_path / "imgs" / c / f"{i}.png")
    res = optimize_only("tests.models:cnn", tmp_path / "out", input_shapes={"x": (1, 3, 32, 32)},
                        evaluation=tmp_path / "imgs", labels_column="folder", variants=[],
                        eval_samples=7)  # fmt: skip
    files, names = images.labelled_files(tmp_path / "imgs", 7)
    assert names == ["cat", "dog", "frog", "cat", "dog", "frog", "cat"]
    spec = [InputSpec("x", "float32", ("batch", 3, 32, 32))]
    batches, _ = images.read_images(tmp_path / "imgs", spec, {}, 64, 7, images.Normalization(),
                                    labelled=True)  # fmt: skip
    with torch.no_grad():
        pred = cnn().eval()(torch.from_numpy(batches[0]["x"])).argmax(1).numpy()
    y = np.array([["cat", "dog", "frog"].index(n) for n in names])
    m = res.by_name("fp32").metrics
    assert m["task.samples"] == 7
    assert m["task.accuracy"] == pytest.approx((pred == y).mean() * 100)
    assert "3 class folders taken in turn" in res.meta["data"]["eval"]
    assert any("mapped in sorted order (cat=0, dog=1, frog=2)" in w for w in res.meta["warnings"])
    with pytest.raises(DataError, match=r"imgs: an image folder's labels are its class folders"):
        optimize_only("tests.models:cnn", tmp_path / "out2", input_shapes={"x": (1, 3, 32, 32)},
                      evaluation=tmp_path / "imgs", labels_column="label", variants=[])  # fmt: skip


def test_sentence_encoder_knn_and_sts(tiny_bert_dir, tmp_path):
    texts = sentences(12, seed=1)
    data = write_csv(tmp_path / "topics.csv", ["text", "label"],
                     [(t, "ab"[i % 2]) for i, t in enumerate(texts)])  # fmt: skip
    res = optimize_only(str(tiny_bert_dir), tmp_path / "o1", evaluation=data,
                        labels_column="label", variants=[])  # fmt: skip
    m = res.by_name("fp32").metrics
    assert m["task.metric"] == "knn_accuracy" and m["task.samples"] == 12
    assert 0 <= m["task.knn_accuracy"] <= 100 and m["accuracy_drop"] == 0.0
    # pairs with a similarity score: each text embedded alone, Spearman of the pair's cosine
    pairs = write_csv(tmp_path / "sts.csv", ["a", "b", "score"],
                      [(t, texts[(i + 1) % 12], i % 5) for i, t in enumerate(texts)])  # fmt: skip
    res = optimize_only(str(tiny_bert_dir), tmp_path / "o2", evaluation=pairs, text_column="a",
                        text_pair_column="b", labels_column="score", variants=[])  # fmt: skip
    m = res.by_name("fp32").metrics
    assert m["task.metric"] == "spearman" and m["task.samples"] == 12
    assert -100 <= m["task.spearman"] <= 100
    assert res.meta["data"]["eval"].endswith("(12 text pairs)")


# ---------------------------------------------------------------- bad labels


@pytest.fixture(scope="module")
def named_classifier(tiny_bert_classifier_dir, tmp_path_factory):
    """The tiny classifier with class names in config.json."""
    folder = tmp_path_factory.mktemp("named") / "clf"
    shutil.copytree(tiny_bert_classifier_dir, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["id2label"] = {"0": "neg", "1": "neutral", "2": "pos"}
    cfg["label2id"] = {"neg": 0, "neutral": 1, "pos": 2}
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def test_class_names_map_by_id2label(named_classifier, tmp_path):
    texts = sentences(6)
    pred = torch_logits(named_classifier, texts).argmax(axis=1)
    names = ["neg", "neutral", "pos"]
    data = write_csv(tmp_path / "d.csv", ["text", "label"],
                     [(t, names[p]) for t, p in zip(texts, pred)])  # fmt: skip
    res = optimize_only(str(named_classifier), tmp_path / "out", evaluation=data,
                        labels_column="label", variants=[])  # fmt: skip
    assert res.by_name("fp32").metrics["task.accuracy"] == 100.0
    assert "classes by id2label" in res.meta["data"]["labels"]


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (["pos", "meh", "neg"], r"d\.csv: label\(s\) 'meh' are not classes of the model "
                                r"\(config\.json id2label: neg, neutral, pos\)"),
        (["0", "5", "1"], r"d\.csv: label 5 is not a class of the model, which has 3 output "
                          r"classes \(0\.\.2\)"),
    ],
)  # fmt: skip
def test_labels_that_are_not_the_models_classes(named_classifier, tmp_path, labels, message):
    data = write_csv(tmp_path / "d.csv", ["text", "label"], list(zip(sentences(3), labels)))
    with pytest.raises(DataError, match=message) as e:
        optimize_only(str(named_classifier), tmp_path / "out", evaluation=data,
                      labels_column="label", variants=[])  # fmt: skip
    assert e.value.exit_code == 2


def test_more_distinct_labels_than_classes(tiny_bert_classifier_dir, tmp_path):
    data = write_csv(tmp_path / "d.csv", ["text", "label"],
                     list(zip(sentences(4), ["w", "x", "y", "z"])))  # fmt: skip
    with pytest.raises(DataError, match=r"d\.csv: 4 distinct labels, but the model has 3 output"):
        optimize_only(str(tiny_bert_classifier_dir), tmp_path / "out", evaluation=data,
                      labels_column="label", variants=[])  # fmt: skip


def test_empty_set_and_options_without_labelled_data(tiny_bert_classifier_dir, tmp_path):
    empty = write_csv(tmp_path / "empty.csv", ["text", "label"], [])
    with pytest.raises(DataError, match=r"empty\.csv: no examples found"):
        optimize_only(str(tiny_bert_classifier_dir), tmp_path / "out", evaluation=empty,
                      labels_column="label", variants=[])  # fmt: skip
    with pytest.raises(ConfigError, match="labels_column: needs labelled evaluation data"):
        optimize_only(str(tiny_bert_classifier_dir), tmp_path / "out", labels_column="label")
    txt = tmp_path / "plain.txt"
    txt.write_text("one\ntwo\n")
    with pytest.raises(DataError, match=r"plain\.txt: a \.txt file holds no labels"):
        optimize_only(str(tiny_bert_classifier_dir), tmp_path / "out", evaluation=txt,
                      labels_column="label", variants=[])  # fmt: skip


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--labels-column", "nope"],
         "data.csv: CSV has no 'nope' column (columns: text, label)"),
        (["--max-accuracy-drop", "1"],
         "--max-accuracy-drop: needs task metrics, measured on labelled evaluation data"),
    ],
    ids=["missing-column", "drop-without-labels"],
)  # fmt: skip
def test_cli_refuses_bad_label_options(tiny_bert_classifier_dir, tmp_path, extra, message):
    data = write_csv(tmp_path / "data.csv", ["text", "label"], [("a day", 0)])
    out = tmp_path / "out"
    r = run_cli("optimize", str(tiny_bert_classifier_dir), "--eval", str(data), *extra,
                "-o", str(out))  # fmt: skip
    assert r.returncode == 2, r.stderr
    assert message in flat(r.stderr) and "Traceback" not in r.stderr
    assert not (out / "best.onnx").exists()


def test_npz_labels_are_an_array_with_one_label_per_sample(tmp_path):
    from deployopt.config import make_config
    from deployopt.taskeval import read_labels

    path = tmp_path / "e.npz"
    np.savez(path, x=np.zeros((4, 2), np.float32), label=np.arange(3))
    with pytest.raises(DataError, match=r"e\.npz: 3 labels in 'label' for 4 samples"):
        read_labels(make_config(evaluation=path, labels_column="label"))
    with pytest.raises(DataError, match=r"e\.npz: no array 'y' \(arrays: x, label\)"):
        read_labels(make_config(evaluation=path, labels_column="y"))
    np.savez(path, x=np.zeros((3, 2), np.float32), label=np.array([2, 0, 1]))
    got = read_labels(make_config(evaluation=path, labels_column="label"))
    assert got.labels == ("2", "0", "1") and not got.pairs
