"""The statistics behind every latency claim: quantile confidence intervals and the ratio of
medians between two models. Pure numpy, seeded, no I/O.

- :func:`quantile_ci`: distribution-free CI of a quantile from order statistics (the binomial
  normal approximation). It needs enough samples in the tail: p99 needs far more than p50, and
  :func:`min_samples_for` says how many.
- :func:`ratio_ci`: bootstrap CI of new/baseline latency. Paired by round when both were
  measured in the same interleaved rounds (machine drift cancels within a round); unpaired
  (ratio of medians of two sample sets) otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

Z95 = 1.959963984540054  # two-sided 95%


def _ranks(n: int, q: float, z: float) -> tuple[int, int]:
    """0-based ranks of the order statistics bounding the q-quantile of n samples."""
    half = z * math.sqrt(n * q * (1 - q))
    return int(math.floor(n * q - half)), int(math.ceil(n * q + half)) - 1


def quantile_ci(samples: Sequence[float], q: float, z: float = Z95) -> tuple[float, float] | None:
    """The (low, high) order statistics that bracket the ``q`` quantile with ~95% confidence,
    or None when there are too few samples for the interval to lie inside the sample."""
    if not 0 < q < 1:
        raise ValueError(f"quantile must be in (0, 1), got {q}")
    a = np.sort(np.asarray(samples, dtype=np.float64))
    n = a.size
    if n == 0:
        return None
    lo, hi = _ranks(n, q, z)
    if lo < 0 or hi > n - 1 or hi < lo:
        return None
    return float(a[lo]), float(a[hi])


def min_samples_for(q: float, z: float = Z95) -> int:
    """The fewest samples for which :func:`quantile_ci` gives an interval at ``q``:
    p50 -> 4, p90 -> 35, p95 -> 73, p99 -> 381."""
    n = 2
    while True:
        lo, hi = _ranks(n, q, z)
        if lo >= 0 and hi <= n - 1:
            return n
        n += 1


TRIM = 0.2


def trimmed_mean(a: np.ndarray, trim: float) -> np.ndarray | float:
    """Mean of the last axis after dropping ``trim`` of the values at each end."""
    a = np.sort(a, axis=-1)
    k = int(a.shape[-1] * trim)
    return a[..., k : a.shape[-1] - k].mean(axis=-1)


@dataclass(frozen=True)
class Ratio:
    """new / baseline latency: the point estimate and its bootstrap confidence interval."""

    estimate: float
    low: float
    high: float
    method: str  # "paired rounds" | "unpaired medians"
    n: int  # rounds (paired) or samples of the smaller set (unpaired)


def ratio_ci(
    new: Sequence[float],
    baseline: Sequence[float],
    paired: bool,
    conf: float = 0.90,
    n_boot: int = 2000,
    seed: int = 0,
    groups: Sequence[int] | None = None,
) -> Ratio:
    """Bootstrap CI of the latency ratio new/baseline.

    ``paired``: ``new`` and ``baseline`` are the medians of rounds, round i of one measured next
    to round i of the other. The statistic is the 20%-trimmed mean over rounds of
    log(new_i/baseline_i), so a round that a machine hiccup hit on one side only does not
    move it; rounds are resampled. ``groups`` (paired only) names the process pair each round
    came from: rounds of one pair share that pair's placement on the machine, so they are not
    independent; the bootstrap then resamples pairs, and rounds within each chosen pair (a
    two-stage cluster bootstrap), and a pair-to-pair difference widens the interval instead of
    passing for a slowdown. Otherwise both are flat sample lists and the
    statistic is median(new)/median(baseline), each set resampled on its own.

    ``conf`` is two-sided; a one-sided test at (1+conf)/2 reads only one bound.
    """
    rng = np.random.default_rng(seed)
    alpha = (1 - conf) / 2
    if paired:
        if len(new) != len(baseline) or len(new) < 2:
            raise ValueError("paired comparison needs the same number (>= 2) of rounds")
        logs = np.log(np.asarray(new, dtype=np.float64) / np.asarray(baseline, dtype=np.float64))
        if groups is not None and len(set(groups)) > 1:
            if len(groups) != logs.size:
                raise ValueError("groups needs one entry per round")
            g = np.asarray(groups)
            members = [np.flatnonzero(g == k) for k in np.unique(g)]
            boots = np.empty(n_boot)
            for b in range(n_boot):
                picked = rng.integers(0, len(members), size=len(members))
                rows = [members[k][rng.integers(0, members[k].size, members[k].size)]
                        for k in picked]  # fmt: skip
                boots[b] = trimmed_mean(logs[np.concatenate(rows)], TRIM)
        else:
            idx = rng.integers(0, logs.size, size=(n_boot, logs.size))
            boots = trimmed_mean(logs[idx], TRIM)
        est = float(np.exp(trimmed_mean(logs, TRIM)))
        method, n = "paired rounds", int(logs.size)
    else:
        a = np.asarray(new, dtype=np.float64)
        b = np.asarray(baseline, dtype=np.float64)
        if a.size < 2 or b.size < 2:
            raise ValueError("unpaired comparison needs at least 2 samples on each side")
        ma = np.median(a[rng.integers(0, a.size, size=(n_boot, a.size))], axis=1)
        mb = np.median(b[rng.integers(0, b.size, size=(n_boot, b.size))], axis=1)
        boots = np.log(ma / mb)
        est = float(np.median(a) / np.median(b))
        method, n = "unpaired medians", int(min(a.size, b.size))
    lo, hi = np.quantile(boots, [alpha, 1 - alpha])
    return Ratio(estimate=est, low=float(np.exp(lo)), high=float(np.exp(hi)), method=method, n=n)
