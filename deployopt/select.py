"""Choose the variant to ship: pure functions over measured results.

Among valid, parity-passing candidates that meet every constraint, the fastest on the chosen
metric wins; ties go to the smaller file, then the higher cosine, then the name. With
``prefer="smallest"`` the smallest file wins instead; ties go to the lower latency, then the
higher cosine, then the name. The Pareto front over (latency, accuracy, size) is listed, and
every rejected variant with its reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

METRICS = ("p50", "p90", "p95", "p99")
PREFER = ("fastest", "smallest")  # the rule that ranks qualifying candidates


def points_warning(drop: float | None, name: str) -> str | None:
    """A warning when an accuracy budget in points looks like a fraction (0.01 for 1 point)."""
    if drop is None or not 0 < drop < 1:
        return None
    return (
        f"{name} {drop:g} is in points: it allows a drop of {drop:g} percentage points "
        f"(accuracy 90.00 -> {90 - drop:.2f}), not a fraction; for {drop * 100:g} points give "
        f"{name} {drop * 100:g}"
    )


@dataclass(frozen=True)
class Candidate:
    id: str
    name: str
    status: str = "ok"  # the variant's own status: ok | failed | skipped
    reason: str = ""
    latency_ms: float | None = None  # on the chosen metric and target
    bench_valid: bool = True
    bench_reason: str = ""
    mean_cosine: float | None = None
    min_cosine: float | None = None  # the worst sample's cosine
    accuracy_drop: float | None = None  # task metric drop vs the original, in points
    size_mb: float | None = None
    screened_out: str = ""  # why the screening run kept it out of the full measurement


@dataclass(frozen=True)
class Constraints:
    min_cosine: float = 0.99
    min_min_cosine: float | None = None  # the worst sample's cosine
    max_accuracy_drop: float | None = None
    max_size_mb: float | None = None
    max_latency_ms: float | None = None
    metric: str = "p50"
    prefer: str = "fastest"

    def __post_init__(self):
        if self.metric not in METRICS:
            raise ValueError(f"metric must be one of {', '.join(METRICS)}")
        if self.prefer not in PREFER:
            raise ValueError(f"prefer must be one of {', '.join(PREFER)}")


@dataclass(frozen=True)
class Choice:
    winner: Candidate | None
    ranked: tuple[Candidate, ...]  # every qualifying candidate, best first
    rejected: dict[str, str] = field(default_factory=dict)  # name -> reason
    pareto: tuple[str, ...] = ()  # names on the (latency, cosine, size) front


def rejection(c: Candidate, k: Constraints) -> str | None:
    """Why ``c`` cannot be chosen, or None. Accuracy and size come first: they do not depend
    on the measurement."""
    if c.status != "ok":
        return f"variant {c.status}: {c.reason}" if c.reason else f"variant {c.status}"
    if c.mean_cosine is None:
        return "no parity measurement"
    if c.mean_cosine < k.min_cosine:
        return f"mean cosine {c.mean_cosine:.5f} < {k.min_cosine}"
    if k.min_min_cosine is not None:
        if c.min_cosine is None:
            return "no per-sample cosine to check --min-min-cosine against"
        if c.min_cosine < k.min_min_cosine:
            return f"min cosine {c.min_cosine:.5f} < {k.min_min_cosine}"
    if k.max_accuracy_drop is not None:
        if c.accuracy_drop is None:
            return "no task metric to check --max-accuracy-drop against"
        if c.accuracy_drop > k.max_accuracy_drop:
            return f"accuracy drop {c.accuracy_drop:.2f} > {k.max_accuracy_drop}"
    if k.max_size_mb is not None:
        if c.size_mb is None:
            return "size unknown"
        if c.size_mb > k.max_size_mb:
            return f"size {c.size_mb:.3g} MB > {k.max_size_mb:g} MB"
    if c.screened_out:
        return f"screened out: {c.screened_out}"
    if not c.bench_valid:
        return f"benchmark invalid: {c.bench_reason}"
    if c.latency_ms is None:
        return "not benchmarked"
    if k.max_latency_ms is not None and c.latency_ms > k.max_latency_ms:
        return f"{k.metric} {c.latency_ms:.3g} ms > budget {k.max_latency_ms:g} ms"
    return None


def _size(c: Candidate) -> float:
    return c.size_mb if c.size_mb is not None else float("inf")


def _key(c: Candidate):
    return (c.latency_ms, _size(c), -(c.mean_cosine or 0.0), c.name)


def _smallest_key(c: Candidate):
    return (_size(c), c.latency_ms, -(c.mean_cosine or 0.0), c.name)


def pareto_front(cands: Sequence[Candidate]) -> tuple[str, ...]:
    """Names not dominated in (lower latency, higher cosine, smaller size)."""
    pts = [c for c in cands if c.latency_ms is not None and c.mean_cosine is not None]

    def dominates(a: Candidate, b: Candidate) -> bool:
        sa, sb = _size(a), _size(b)
        le = a.latency_ms <= b.latency_ms and a.mean_cosine >= b.mean_cosine and sa <= sb
        lt = a.latency_ms < b.latency_ms or a.mean_cosine > b.mean_cosine or sa < sb
        return le and lt

    return tuple(
        sorted(
            (c.name for c in pts if not any(dominates(o, c) for o in pts)),
            key=lambda n: next(_key(c) for c in pts if c.name == n),
        )
    )


def choose(candidates: Sequence[Candidate], constraints: Constraints) -> Choice:
    """The best qualifying candidate by ``constraints.prefer`` (fastest, or smallest), the
    ranking, the rejections and the Pareto front."""
    rejected = {}
    ok = []
    for c in candidates:
        why = rejection(c, constraints)
        if why is None:
            ok.append(c)
        else:
            rejected[c.name] = why
    ranked = tuple(sorted(ok, key=_smallest_key if constraints.prefer == "smallest" else _key))
    valid = [c for c in candidates if c.status == "ok" and c.bench_valid]
    return Choice(
        winner=ranked[0] if ranked else None,
        ranked=ranked,
        rejected=rejected,
        pareto=pareto_front(valid),
    )
