"""THE timing loop. Every latency number deployopt reports is measured by :func:`measure`."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class LatencyStats:
    samples: int
    p50_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float
    stdev_ms: float
    min_ms: float

    @classmethod
    def from_samples(cls, samples_ms: list[float]) -> LatencyStats:
        a = np.asarray(samples_ms, dtype=np.float64)
        p50, p90, p95, p99 = np.percentile(a, [50, 90, 95, 99])
        return cls(
            samples=len(a),
            p50_ms=float(p50),
            p90_ms=float(p90),
            p95_ms=float(p95),
            p99_ms=float(p99),
            mean_ms=float(a.mean()),
            stdev_ms=float(statistics.stdev(a)) if len(a) > 1 else 0.0,
            min_ms=float(a.min()),
        )

    def to_json(self) -> dict:
        return asdict(self)


def measure(
    fn: Callable[[], object],
    warmup: int = 5,
    min_samples: int = 30,
    min_seconds: float = 1.0,
    max_seconds: float = 60.0,
    clock: Callable[[], float] = time.perf_counter,
) -> list[float]:
    """Call ``fn`` ``warmup`` times untimed, then time it until both ``min_samples`` calls and
    ``min_seconds`` have passed (or ``max_seconds``). Returns the samples in milliseconds."""
    for _ in range(warmup):
        fn()
    samples: list[float] = []
    start = clock()
    while True:
        t0 = clock()
        fn()
        t1 = clock()
        samples.append((t1 - t0) * 1e3)
        elapsed = t1 - start
        if (len(samples) >= min_samples and elapsed >= min_seconds) or elapsed >= max_seconds:
            return samples
