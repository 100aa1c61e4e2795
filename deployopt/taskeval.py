"""Task metrics for ``--labels-column``: labels read beside the evaluation data, and each
variant's evaluation outputs scored against them (deployopt.metrics).

The labels follow the evaluation samples one for one: the same file, the same order and the
same ``--eval-samples`` cut as the batches deployopt.runner builds (for an image folder,
:func:`deployopt.images.labelled_files`, which takes the classes in turn). What is measured
depends on the model:

* a classifier (logits): accuracy, macro-F1, argmax agreement with the original and, past 5
  classes, top-5 accuracy; primary: accuracy. One output class (a regressor, e.g. an STS
  cross-encoder) with numeric labels: Spearman x 100;
* a sentence encoder with labels: leave-one-out 5-NN accuracy of its embeddings; with
  ``--text-pair-column`` and numeric labels (similarity scores): Spearman x 100 of each pair's
  cosine against the score.

Every metric is in points; ``accuracy_drop`` (deployopt.runner) is the original's primary
metric minus the variant's.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from deployopt import metrics
from deployopt.errors import DataError
from deployopt.inputs import Batch

FOLDER = "folder"  # --labels-column for an image folder: the labels are its class folders
KNN_K = 5
TOP_K = 5

PRIMARY = {"classification": "accuracy", "regression": "spearman", "knn": "knn_accuracy",
           "sts": "spearman"}  # fmt: skip


@dataclass(frozen=True)
class Labelled:
    """The labels of the evaluation samples as read (strings, in sample order), every label
    of the whole data set (``universe``: for a stable class order under --eval-samples), where
    they came from, and whether each sample is a text pair."""

    labels: tuple[str, ...]
    universe: tuple[str, ...]
    source: str
    pairs: bool = False


@dataclass(frozen=True)
class Task:
    """What to measure: ``kind`` (classification, regression, knn, sts), the output judged,
    the targets (class indexes or scores, one per labelled sample or pair) and a line for the
    report saying how the labels were read."""

    kind: str
    output: str
    targets: np.ndarray
    source: str
    note: str

    @property
    def primary(self) -> str:
        return PRIMARY[self.kind]

    @property
    def samples(self) -> int:
        return len(self.targets)

    def describe(self) -> str:
        return f"{self.source}: {self.samples} labelled samples, {self.note}"


def joint_pairs(meta) -> bool:
    """Sentence pairs are read together (one sample) by a classifier, and one at a time (two
    embeddings) by a sentence encoder."""
    return bool(meta.classifier_outputs) or meta.task == "text-classification"


def read_labels(cfg) -> Labelled:
    """The labels of ``cfg.evaluation`` by ``cfg.labels_column``, aligned with the evaluation
    samples deployopt.runner.build_data reads. DataError (naming the file) for a column that
    is not there (listing those that are), an empty set, or data that cannot hold labels."""
    from deployopt import images
    from deployopt.inputs import read_labelled

    path, column = Path(cfg.evaluation), cfg.labels_column
    if path.is_dir():
        if column != FOLDER:
            raise DataError(
                f"{path}: an image folder's labels are its class folders, not a column {column!r}",
                hint=f"give --labels-column {FOLDER} and lay out FOLDER/<class>/<image>",
            )
        limit = cfg.eval_samples or cfg.calibration_samples  # as build_data reads it
        _, labels = images.labelled_files(path, limit)
        return Labelled(tuple(labels), tuple(images.class_folders(path)), str(path))
    suffix = path.suffix.lower()
    if suffix == ".npz":
        return _npz_labels(path, column)
    if suffix in (".csv", ".jsonl"):
        ex = read_labelled(path, cfg.text_column, column, cfg.text_pair_column)
        mine = ex.head(cfg.eval_samples)
        assert ex.labels is not None and mine.labels is not None
        return Labelled(
            tuple(mine.labels), tuple(ex.labels), str(path), cfg.text_pair_column is not None
        )
    if not path.exists():
        raise DataError(f"{path}: no such data file", hint="give an existing file path")
    raise DataError(
        f"{path}: a {suffix or 'plain'} file holds no labels",
        hint="give labelled data: a .csv/.jsonl with a label column, an .npz with a label "
        f"array, or an image folder FOLDER/<class>/<image> with --labels-column {FOLDER}",
    )


def _npz_labels(path: Path, column: str) -> Labelled:
    if not path.is_file():
        raise DataError(f"{path}: no such data file", hint="give an existing file path")
    try:
        with np.load(path, allow_pickle=False) as z:
            names = list(z.files)
            arr = z[column] if column in names else None
            sizes = {len(z[k]) for k in names if k != column and z[k].ndim > 0}
    except (ValueError, OSError) as e:
        raise DataError(f"{path}: not a readable .npz file ({e})") from None
    if arr is None:
        raise DataError(
            f"{path}: no array {column!r} (arrays: {', '.join(names) or 'none'})",
            hint="name the label array with --labels-column",
        )
    labels = tuple(str(x.item()) if hasattr(x, "item") else str(x) for x in arr.reshape(-1))
    if not labels:
        raise DataError(f"{path}: the label array {column!r} is empty")
    if sizes and len(labels) not in sizes:
        raise DataError(
            f"{path}: {len(labels)} labels in {column!r} for {', '.join(map(str, sorted(sizes)))} "
            "samples in the input arrays",
            hint="give one label per sample, in the samples' order",
        )
    return Labelled(labels, labels, str(path))


def prepare(
    lab: Labelled,
    meta,
    reference: Sequence[Batch],
    text: bool,
    warn: Callable[[str], None] | None = None,
) -> Task:
    """The task to measure, from the labels, the model's facts and the original's outputs on
    the evaluation set (``reference``): which output, which metric, the labels as numbers.
    DataError when the labels cannot be the model's classes: more distinct labels than output
    classes, an index out of range, or names that config.json's id2label does not have."""
    names = list(reference[0]) if reference else []
    src = lab.source
    if meta.task == "token-classification":
        raise DataError(
            f"{src}: --labels-column labels whole samples; a token classifier labels tokens",
            hint="task metrics cover sequence and image classifiers and sentence encoders",
        )
    encoder = text and not joint_pairs(meta)
    if encoder:
        output = _embedding_output(reference, src)
        if lab.pairs:
            return Task("sts", output, _scores(lab, src), src, "Spearman x 100 of each pair's "
                        "cosine against its score")  # fmt: skip
        targets, how = _sorted_classes(lab)
        return Task("knn", output, targets, src, f"leave-one-out {KNN_K}-NN accuracy ({how})")
    output = next((o for o in meta.classifier_outputs if o in names), None)
    if output is None:
        two_d = [o for o in names if np.ndim(reference[0][o]) == 2]
        if len(two_d) != 1:
            raise DataError(
                f"{src}: labels need the model's class scores, and none of its outputs "
                f"({', '.join(names) or 'none'}) is a single (batch, classes) array",
                hint="export the model with one logits output",
            )
        output = two_d[0]
    width = int(np.shape(reference[0][output])[-1])
    if width == 1:
        return Task("regression", output, _scores(lab, src), src,
                    "Spearman x 100 of the one output against the score")  # fmt: skip
    targets, how = _class_indexes(lab, meta.class_names, width, warn)
    more = f", top-{TOP_K} accuracy" if width > TOP_K else ""
    return Task("classification", output, targets, src,
                f"accuracy, macro-F1, argmax agreement{more} ({how})")  # fmt: skip


def _embedding_output(reference: Sequence[Batch], src: str) -> str:
    names = list(reference[0]) if reference else []
    for o in ("sentence_embedding", *names):
        if o in names and np.ndim(reference[0][o]) in (2, 3):
            return o
    raise DataError(f"{src}: no embedding output among {', '.join(names) or 'none'}")


def _scores(lab: Labelled, src: str) -> np.ndarray:
    out = []
    for i, x in enumerate(lab.labels):
        try:
            out.append(float(x))
        except ValueError:
            raise DataError(
                f"{src}: label {x!r} of sample {i + 1} is not a number; sentence pairs scored "
                "by similarity (and a one-output model) need numeric labels",
                hint="give similarity scores, e.g. 0 to 5",
            ) from None
    return np.asarray(out, dtype=np.float64)


def _sorted_classes(lab: Labelled) -> tuple[np.ndarray, str]:
    classes = sorted(set(lab.universe))
    index = {c: i for i, c in enumerate(classes)}
    return np.asarray([index[x] for x in lab.labels], np.int64), f"{len(classes)} classes"


def _as_int(x: str) -> int | None:
    try:
        return int(x.strip())
    except ValueError:
        return None


def _class_indexes(
    lab: Labelled, class_names: Sequence[str], width: int, warn: Callable[[str], None] | None
) -> tuple[np.ndarray, str]:
    """Labels as class indexes: names of config.json's id2label (when it names the classes),
    else integers 0..width-1, else names in sorted order."""
    src = lab.source
    names = list(class_names) if len(class_names) == width else []
    named = bool(names) and names != [f"LABEL_{i}" for i in range(width)]
    distinct = sorted(set(lab.universe))
    if named and set(distinct) <= set(names):
        index = {n: i for i, n in enumerate(names)}
        return np.asarray([index[x] for x in lab.labels], np.int64), "classes by id2label"
    ints = [_as_int(x) for x in distinct]
    if all(i is not None for i in ints):
        bad = [i for i in ints if i is not None and not 0 <= i < width]
        if bad:
            raise DataError(
                f"{src}: label {bad[0]} is not a class of the model, which has {width} output "
                f"classes (0..{width - 1})",
                hint="give class indexes the model was trained with, or its class names",
            )
        return np.asarray([int(x) for x in lab.labels], np.int64), "labels are class indexes"
    if named:
        unknown = [x for x in distinct if x not in names]
        raise DataError(
            f"{src}: label(s) {', '.join(repr(x) for x in unknown[:5])} are not classes of the "
            f"model (config.json id2label: {', '.join(names[:10])}"
            + (", ..." if len(names) > 10 else "") + ")",
            hint="give the model's class names or indexes",
        )  # fmt: skip
    if len(distinct) > width:
        raise DataError(
            f"{src}: {len(distinct)} distinct labels, but the model has {width} output classes",
            hint="check --labels-column names the class column of this model's data",
        )
    if warn is not None:
        shown = ", ".join(f"{c}={i}" for i, c in enumerate(distinct[:10]))
        warn(
            f"labels of {src} are names and the model's config names no classes: mapped in "
            f"sorted order ({shown}{', ...' if len(distinct) > 10 else ''}); give class "
            "indexes to be explicit"
        )
    index = {c: i for i, c in enumerate(distinct)}
    return np.asarray([index[x] for x in lab.labels], np.int64), "class names in sorted order"


def extract(task: Task, outputs: Sequence[Batch], evaluation: Sequence[Batch]) -> np.ndarray:
    """The rows of the judged output for the labelled samples, in order: logits, scores or
    embeddings (a per-token output mean-pooled over its attention mask). Only this array is
    kept per variant, never the whole outputs."""
    rows = []
    for out, batch in zip(outputs, evaluation):
        a = np.asarray(out[task.output], dtype=np.float64)
        if a.ndim == 3:  # (batch, tokens, hidden): mean over the real tokens
            mask = batch.get("attention_mask")
            m = np.ones(a.shape[:2]) if mask is None else np.asarray(mask, np.float64)
            a = (a * m[..., None]).sum(axis=1) / np.maximum(m.sum(axis=1, keepdims=True), 1)
        rows.append(a.reshape(a.shape[0], -1))
    need = task.samples * (2 if task.kind == "sts" else 1)
    values = np.concatenate(rows) if rows else np.zeros((0, 1))
    if len(values) < need:
        raise DataError(
            f"{task.source}: {need} labelled samples but {len(values)} evaluation samples"
        )
    return values[:need]


def score(task: Task, values: np.ndarray, reference: np.ndarray | None) -> dict[str, float]:
    """The task metrics of one variant (``values`` from :func:`extract`; ``reference``: the
    original's, for argmax agreement), keyed ``task.NAME``, plus ``task.metric`` (the primary
    one's name) and ``task.samples``."""
    y = task.targets
    if task.kind == "classification":
        out = metrics.classification(values, y, reference)
        if values.shape[1] > TOP_K:
            out[f"top{TOP_K}_accuracy"] = metrics.topk(values, y, TOP_K)
    elif task.kind == "regression":
        out = {"spearman": metrics.spearman(values[:, 0], y) * 100}
    elif task.kind == "knn":
        out = {"knn_accuracy": metrics.knn_accuracy(values, y, KNN_K)}
    else:
        n = task.samples
        cos = metrics.pair_cosine(values[:n], values[n : 2 * n])
        out = {"spearman": metrics.spearman(cos, y) * 100}
    return {
        **{f"task.{k}": round(float(v), 6) for k, v in out.items()},
        "task.metric": task.primary,
        "task.samples": task.samples,
    }


def is_task_key(key: str) -> bool:
    """Keys of a variant's metrics that this module writes (dropped before measuring again)."""
    return key.startswith("task.") or key == "accuracy_drop"


@dataclass(frozen=True)
class Meter:
    """The task and the original's numbers on it: measures every variant against them."""

    task: Task
    reference: np.ndarray  # the original's extracted outputs (for argmax agreement)
    original: dict[str, float]  # the original's task metrics

    @classmethod
    def start(cls, lab: Labelled, meta, reference: Sequence[Batch], evaluation: Sequence[Batch],
              text: bool, warn: Callable[[str], None] | None = None) -> Meter:  # fmt: skip
        """Settle the task from the original's evaluation outputs (``reference``)."""
        task = prepare(lab, meta, reference, text, warn)
        values = extract(task, reference, evaluation)
        return cls(task, values, score(task, values, values))

    def metrics(self, outputs: Sequence[Batch], evaluation: Sequence[Batch]) -> dict:
        """A variant's task metrics and its ``accuracy_drop`` (points) vs the original."""
        measured = score(self.task, extract(self.task, outputs, evaluation), self.reference)
        key = "task." + self.task.primary
        return {**measured, "accuracy_drop": round(self.original[key] - measured[key], 6)}

    def line(self, metrics: Mapping) -> str:
        """``accuracy 91.67 (drop 0.83)``: the log's words for a measured variant."""
        key = "task." + self.task.primary
        if key not in metrics:
            return ""
        return f"{self.task.primary} {metrics[key]:.2f} (drop {metrics['accuracy_drop']:.2f})"


def merged(old: Mapping, new: Mapping | None) -> dict:
    """A variant's metrics with the task metrics of an earlier run dropped and ``new`` (this
    run's, or None when nothing is measured) added."""
    return {**{k: x for k, x in old.items() if not is_task_key(k)}, **(new or {})}


def entry(variant_metrics: Mapping) -> dict | None:
    """The task metrics of a variant for the manifest and report (``task.`` dropped from the
    keys, ``accuracy_drop`` kept), or None when none was measured."""
    found = {k.removeprefix("task."): x for k, x in variant_metrics.items() if is_task_key(k)}
    return found or None
