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


@dataclass(frozen=True)
class BenchSpec:
    """What to measure: one model on one execution provider at one input shape."""

    provider: str = "cpu"
    threads: int | None = None
    batch: int = 1
    seq: int = 128
    shapes: tuple[tuple[str, tuple[int, ...]], ...] = ()  # explicit NAME=DIMS overrides
    warmup: int = 5
    min_samples: int = 50
    min_seconds: float = 2.0
    max_seconds: float = 60.0


@dataclass(frozen=True)
class BenchResult:
    model: str
    target: str
    providers: tuple[str, ...]  # what the session really used
    shapes: dict
    cold_ms: float  # session creation + first run
    samples_ms: tuple[float, ...]
    stats: LatencyStats
    throughput: float  # items/s at this batch
    peak_rss_mb: float
    env: dict
    invalid: tuple[str, ...] = ()

    @property
    def valid(self) -> bool:
        return not self.invalid

    def to_json(self) -> dict:
        d = asdict(self)
        d["stats"] = self.stats.to_json()
        return d


def bench_feeds(specs, spec: BenchSpec) -> dict[str, np.ndarray]:
    """Inputs for a signature: symbolic batch/sequence dims from the spec; text models get
    token ids drawn from the ordinary-word range of a BERT vocabulary, [CLS]/[SEP] at the ends,
    a full attention mask."""
    overrides = dict(spec.shapes)
    rng = np.random.default_rng(0)
    feeds = {}
    for s in specs:
        if s.name in overrides:
            shape = overrides[s.name]
        else:
            shape = tuple(
                d if isinstance(d, int) else (spec.batch if i == 0 else spec.seq)
                for i, d in enumerate(s.shape)
            )
        dt = np.dtype(s.dtype)
        if s.name == "input_ids":
            a = rng.integers(1996, 20000, size=shape)
            a[..., 0], a[..., -1] = 101, 102
        elif s.name == "attention_mask":
            a = np.ones(shape)
        elif s.name == "token_type_ids":
            a = np.zeros(shape)
        elif np.issubdtype(dt, np.integer):
            a = rng.integers(0, 100, size=shape)
        else:
            a = rng.standard_normal(shape)
        feeds[s.name] = a.astype(dt)
    return feeds


def bench_model(path: str, spec: BenchSpec) -> BenchResult:
    """Measure one model. Runs in the calling process: call it through the worker."""
    import resource
    from pathlib import Path

    from deployopt.inputs import specs_from_onnx
    from deployopt.runtime.session import EP_ALIASES, create_session

    feeds = bench_feeds(specs_from_onnx(Path(path)), spec)
    t0 = time.perf_counter()
    sess = create_session(Path(path), provider=spec.provider, threads=spec.threads)
    sess.run(None, feeds)
    cold_ms = (time.perf_counter() - t0) * 1e3
    used = tuple(sess.get_providers())
    wanted = EP_ALIASES.get(spec.provider, spec.provider)
    invalid = []
    if not used or used[0] != wanted:
        invalid.append(f"requested {wanted} but the session runs on {used[0] if used else '?'}")
    samples = measure(
        lambda: sess.run(None, feeds),
        warmup=spec.warmup,
        min_samples=spec.min_samples,
        min_seconds=spec.min_seconds,
        max_seconds=spec.max_seconds,
    )
    stats = LatencyStats.from_samples(samples)
    batch = next(iter(feeds.values())).shape[0] if feeds else 1
    return BenchResult(
        model=str(path),
        target=f"{spec.provider}-{spec.threads or 'all'}t",
        providers=used,
        shapes={k: list(v.shape) for k, v in feeds.items()},
        cold_ms=cold_ms,
        samples_ms=tuple(samples),
        stats=stats,
        throughput=batch / (stats.p50_ms / 1e3),
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        env=fingerprint(spec.threads),
        invalid=tuple(invalid),
    )


def fingerprint(threads: int | None = None) -> dict:
    """The machine and versions a number was measured on."""
    import os
    import platform

    env = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cores": str(os.cpu_count()),
        "threads": str(threads or "all"),
    }
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
        model = next(
            (
                ln.split(":", 1)[1].strip()
                for ln in info.splitlines()
                if ln.startswith("model name")
            ),
            "unknown",
        )
        flags = next(
            (ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), []
        )
        env["cpu"] = model
        env["cpu_flags"] = ",".join(
            f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags
        )
    except OSError:
        env["cpu"] = platform.processor() or "unknown"
    for mod in ("onnxruntime", "onnx", "torch", "numpy"):
        try:
            env[mod] = __import__(mod).__version__
        except ImportError:
            pass
    return env
