"""Task metrics on a model's evaluation outputs: pure numpy, no model, no I/O.

Every score is in points (0..100) except :func:`spearman`, which is a correlation (-1..1).
Callers (deployopt.taskeval) turn the outputs of each variant into these numbers; the
difference between the original's and a variant's primary metric is the accuracy drop that
``--max-accuracy-drop`` judges (deployopt.select).
"""

from __future__ import annotations

import numpy as np


def _labels(labels, n: int) -> np.ndarray:
    y = np.asarray(labels).reshape(-1)
    if y.shape[0] != n:
        raise ValueError(f"{y.shape[0]} labels for {n} samples")
    return y


def classification(
    logits: np.ndarray, labels, reference_logits: np.ndarray | None = None
) -> dict[str, float]:
    """Accuracy and macro-F1 (points) of ``argmax(logits)`` against integer ``labels``, and
    ``argmax_agreement`` (points): how often the argmax equals the reference model's (100 when
    no reference is given). Macro-F1 averages the per-class F1 over every class that occurs in
    the labels or the predictions (scikit-learn's convention); a class with no true positive
    scores 0."""
    z = np.asarray(logits, dtype=np.float64)
    z = z.reshape(z.shape[0], -1)
    y = _labels(labels, z.shape[0]).astype(np.int64)
    pred = z.argmax(axis=1)
    accuracy = float((pred == y).mean() * 100) if y.size else 0.0
    f1s = []
    for c in np.union1d(y, pred):
        tp = float(((pred == c) & (y == c)).sum())
        fp = float(((pred == c) & (y != c)).sum())
        fn = float(((pred != c) & (y == c)).sum())
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    agreement = 100.0
    if reference_logits is not None:
        r = np.asarray(reference_logits, dtype=np.float64)
        r = r.reshape(r.shape[0], -1)
        if r.shape != z.shape:
            raise ValueError(f"reference logits {r.shape} vs logits {z.shape}")
        agreement = float((r.argmax(axis=1) == pred).mean() * 100) if y.size else 100.0
    return {
        "accuracy": accuracy,
        "macro_f1": float(np.mean(f1s) * 100) if f1s else 0.0,
        "argmax_agreement": agreement,
    }


def topk(logits: np.ndarray, labels, k: int) -> float:
    """Top-``k`` accuracy (points): the label is among the ``k`` highest logits; equal logits
    rank by class index (the lower first)."""
    z = np.asarray(logits, dtype=np.float64)
    z = z.reshape(z.shape[0], -1)
    y = _labels(labels, z.shape[0]).astype(np.int64)
    if not y.size:
        return 0.0
    top = np.argsort(-z, axis=1, kind="stable")[:, : max(1, k)]
    return float((top == y[:, None]).any(axis=1).mean() * 100)


def knn_accuracy(embeddings: np.ndarray, labels, k: int = 5) -> float:
    """Leave-one-out k-nearest-neighbour accuracy (points) of ``embeddings`` on the labelled
    set itself: each sample's label is predicted by the majority label of its ``k`` most
    cosine-similar other samples. Deterministic: neighbours of equal similarity rank by index
    (the lower first), and a tied vote goes to the label of the nearest neighbour among the
    tied labels. ``k`` is capped at n - 1; fewer than 2 samples score 0."""
    e = np.asarray(embeddings, dtype=np.float64)
    e = e.reshape(e.shape[0], -1)
    y = _labels(labels, e.shape[0])
    n = e.shape[0]
    if n < 2:
        return 0.0
    k = max(1, min(k, n - 1))
    norm = np.linalg.norm(e, axis=1, keepdims=True)
    unit = np.divide(e, norm, out=np.zeros_like(e), where=norm > 0)
    sim = unit @ unit.T
    np.fill_diagonal(sim, -np.inf)  # never its own neighbour
    correct = 0
    for i in range(n):
        near = np.argsort(-sim[i], kind="stable")[:k]
        votes: dict = {}
        for rank, j in enumerate(near):
            count, first = votes.get(y[j], (0, rank))
            votes[y[j]] = (count + 1, first)
        best = max(votes.items(), key=lambda kv: (kv[1][0], -kv[1][1]))[0]
        correct += int(best == y[i])
    return float(correct / n * 100)


def _ranks(a: np.ndarray) -> np.ndarray:
    """1-based ranks, ties given their average rank."""
    order = np.argsort(a, kind="stable")
    ranks = np.empty(len(a), dtype=np.float64)
    sorted_a = a[order]
    i = 0
    while i < len(a):
        j = i
        while j + 1 < len(a) and sorted_a[j + 1] == sorted_a[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(pred_scores, gold_scores) -> float:
    """Spearman's rank correlation (-1..1) of predicted scores (e.g. the cosine of a pair's two
    embeddings) with the gold scores; ties take their average rank. 0.0 when either side is
    constant or there are fewer than 2 pairs (the correlation is undefined)."""
    p = np.asarray(pred_scores, dtype=np.float64).reshape(-1)
    g = _labels(gold_scores, p.shape[0]).astype(np.float64)
    if p.shape[0] < 2:
        return 0.0
    rp, rg = _ranks(p), _ranks(g)
    rp, rg = rp - rp.mean(), rg - rg.mean()
    denom = float(np.sqrt((rp**2).sum() * (rg**2).sum()))
    return float((rp * rg).sum() / denom) if denom > 0 else 0.0


def pair_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine of two embedding matrices (0 where a row is all zeros)."""
    a = np.asarray(a, dtype=np.float64).reshape(len(a), -1)
    b = np.asarray(b, dtype=np.float64).reshape(len(b), -1)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    denom = na * nb
    dot = (a * b).sum(axis=1)
    return np.divide(dot, denom, out=np.zeros_like(dot), where=denom > 0)
