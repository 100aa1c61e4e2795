"""Shared by the MiniLM demos: sentence embeddings of any model folder deployopt can load
(plain, distilled or pruned) and a logistic-regression probe on them."""

from __future__ import annotations

import numpy as np
import torch

from deployopt.sources import load_source
from deployopt.torchside.tasks import mean_pool


def embed(folder, texts: list[str], max_length: int = 128) -> np.ndarray:
    """Mean-pooled last hidden states, as the sentence-transformers pooling of MiniLM does."""
    src = load_source(str(folder))
    model, tok = src.module.model.eval(), src.tokenizer
    out = []
    with torch.no_grad():
        for i in range(0, len(texts), 64):
            b = tok(texts[i : i + 64], truncation=True, max_length=max_length, padding=True,
                    return_tensors="pt")  # fmt: skip
            out.append(mean_pool(model(**b).last_hidden_state, b["attention_mask"]))
    return torch.cat(out).numpy()


def mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))


def probe(train_x, train_y, test_x, test_y) -> float:
    """Accuracy of a logistic-regression probe trained on ``train_x`` embeddings."""
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(max_iter=2000, C=10.0)
    clf.fit(train_x, train_y)
    return float(clf.score(test_x, test_y))


def machine_line(target) -> str:
    """The machine and versions behind a demo's figures."""
    from deployopt.benchmark import fingerprint

    env = fingerprint(target)
    return (
        f"machine: {env.get('cpu')} ({env.get('cpu_flags')}), {env.get('cores')} cores, "
        f"threads={target.threads}; torch {env.get('torch')}, onnxruntime {env.get('onnxruntime')}"
    )


def paired_ratio(new, baseline, target, processes: int = 3, rounds: int = 10):
    """Latency ratio new/baseline at batch 1 x seq 128 with its 90% interval, measured as the
    release gate measures a regression: ``processes`` pairs of fresh workers (order alternating),
    ``rounds`` interleaved rounds each, a two-stage bootstrap over pairs and rounds."""
    from deployopt.benchmark import BenchSpec
    from deployopt.gating import regression

    spec = BenchSpec(batch=1, seq=128, min_samples=10 * rounds, min_seconds=6.0, rounds=rounds)
    check, results = regression(new, baseline, target, spec, max_slowdown=0.0, processes=processes)
    if check.measured is None or check.ci is None:
        raise RuntimeError(f"paired measurement failed: {check.message}")
    return check.measured, check.ci[0], check.ci[1], results
