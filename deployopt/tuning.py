"""Session settings searched on the target, for the chosen model and its close runners-up.

A latency only holds under the session settings it was measured with, and the best settings
depend on the CPU and the model. The search varies one factor at a time from the target's
settings, every alternative of every model in one interleaved run, over these dimensions:

- ``threads``: intra-op threads (1 ... cores), only when the target leaves them to onnxruntime;
- ``spinning``: ``session.intra_op.allow_spinning`` off (worker threads sleep between runs);
- ``skip-layernorm``: onnxruntime's SkipLayerNormFusion off. It fuses each residual
  Add + LayerNormalization at session creation, and its CPU kernel was measured 3x slower than
  the two ops on an Intel Xeon (onnxruntime 1.32, 1 x 128 x 384: 216 vs 68 us), while on an
  AMD EPYC the fused graph was the faster; only for graphs with an Add feeding a
  LayerNormalization;
- ``graph-optimization``: ``extended`` instead of ``all`` (no layout transformations).

An alternative replaces the target's setting only when it is at least ``SESSION_MIN_GAIN``
faster (:func:`pick_session`), judged on the median of per-round paired ratios
(:func:`paired_ratio`), so noise and machine drift do not pick settings. A setting the
target already makes is never searched over.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from deployopt.benchmark import BenchSpec, bench_models
from deployopt.presets import Target

SESSION_MIN_GAIN = 0.03  # a setting must beat the current p50 by this much to replace it
SPINNING = "session.intra_op.allow_spinning"
DISABLE_OPTIMIZERS = "optimization.disable_specified_optimizers"
DIMENSIONS = ("threads", "spinning", "skip-layernorm", "graph-optimization")


def pick_session(
    p50_ms: Mapping[str, float], min_gain: float = SESSION_MIN_GAIN, baseline: str = "default"
) -> str:
    """The setting to keep: ``baseline`` unless another one's p50 is at least ``min_gain``
    lower (within that, measurement noise could have picked it).

    >>> pick_session({"default": 10.0, "b": 9.8}), pick_session({"default": 10.0, "b": 9.0})
    ('default', 'b')
    """
    best = min(p50_ms, key=p50_ms.__getitem__)
    return best if p50_ms[best] <= p50_ms[baseline] * (1 - min_gain) else baseline


def paired_ratio(base, other) -> float:
    """``other``'s latency relative to ``base``'s, measured in the same interleaved run: the
    median over rounds of the ratio of the two round medians. Each round's pair ran close in
    time, so a slow drift of the machine cancels out of the ratio (it does not out of p50s)."""
    pairs = [o / b for b, o in zip(base.round_p50_ms, other.round_p50_ms) if b > 0]
    if not pairs:
        return other.stats.p50_ms / base.stats.p50_ms
    return float(statistics.median(pairs))


def pick_paired(results: Mapping[str, object], baseline: str) -> tuple[str, dict[str, float]]:
    """:func:`pick_session` on latencies relative to ``baseline`` (:func:`paired_ratio`);
    returns the pick and the ratios. Invalid results take no part."""
    valid = {k: r for k, r in results.items() if r.valid and r.stats is not None}
    ratios = {k: paired_ratio(valid[baseline], r) for k, r in valid.items()}
    return pick_session(ratios, baseline=baseline), ratios


def is_cpu(target: Target) -> bool:
    from deployopt.runtime.session import EP_ALIASES

    return EP_ALIASES.get(target.ep.lower(), target.ep) == "CPUExecutionProvider"


def thread_options(cores: int, effort: str = "default") -> list[int]:
    """Intra-op thread counts to try besides onnxruntime's default (all physical cores).

    >>> thread_options(2), thread_options(16), thread_options(16, "exhaustive")[:4]
    ([1], [1, 4, 8], [1, 2, 3, 4])
    """
    if cores <= 1:
        return []
    if cores <= 4 or effort == "exhaustive":
        return list(range(1, cores))[:8]
    return sorted({1, max(1, cores // 4), cores // 2} - {cores})


def alternatives(
    dimension: str,
    current: Target,
    base: Target,
    cores: int,
    effort: str = "default",
    has_layernorm: bool = True,
) -> dict[str, Target]:
    """The settings that dimension tries instead of ``current``; none for a setting the user's
    target ``base`` already makes (or one that cannot matter)."""
    if not is_cpu(base):
        return {}
    cfg = dict(current.session_config)

    def with_(**update) -> Target:
        return current.model_copy(update=update)

    if dimension == "threads" and base.threads is None:
        return {f"threads={t}": with_(threads=t) for t in thread_options(cores, effort)}
    if dimension == "spinning" and SPINNING not in base.session_config:
        if (current.threads or cores) > 1:
            return {"spinning=off": with_(session_config={**cfg, SPINNING: "0"})}
    if dimension == "skip-layernorm" and DISABLE_OPTIMIZERS not in base.session_config:
        if has_layernorm:
            entries = {**cfg, DISABLE_OPTIMIZERS: "SkipLayerNormFusion"}
            return {"SkipLayerNormFusion=off": with_(session_config=entries)}
    if dimension == "graph-optimization" and base.graph_optimization == "all":
        return {"graph_optimization=extended": with_(graph_optimization="extended")}
    return {}


def describe(tuned: Target, base: Target) -> str:
    """How ``tuned`` differs from ``base``, e.g. ``threads=1, spinning=off``; ``default``."""
    parts = []
    if tuned.threads != base.threads:
        parts.append(f"threads={tuned.threads}")
    if tuned.graph_optimization != base.graph_optimization:
        parts.append(f"graph_optimization={tuned.graph_optimization}")
    for k, v in tuned.session_config.items():
        if base.session_config.get(k) != v:
            parts.append(
                "spinning=off"
                if k == SPINNING and v == "0"
                else f"{v}=off"
                if k == DISABLE_OPTIMIZERS
                else f"{k}={v}"
            )
    return ", ".join(parts) or "default"


@dataclass
class SessionSearch:
    """What the search found: each model's best setting and every step's measurements."""

    tuned: dict[str, Target]
    steps: list[dict] = field(default_factory=list)


def search_sessions(
    models: Mapping[str, str],
    target: Target,
    spec: BenchSpec,
    cores: int,
    effort: str = "default",
    has_layernorm: Mapping[str, bool] | None = None,
    log: Callable[[str], None] = lambda s: None,
    timeout_s: float = 600.0,
) -> SessionSearch:
    """One factor at a time, all in one interleaved run: every model under the target's
    settings and under each alternative of each of :data:`DIMENSIONS`. Per model, each
    dimension keeps the target's setting unless an alternative wins by :func:`pick_paired`;
    the winning changes are combined into the model's tuned target. The caller measures the
    combination against the target's settings before trusting it."""
    configs: dict[str, tuple[str, str, str, Target]] = {}  # key -> (model, dim, label, target)
    for m in models:
        configs[f"{m} | current"] = (m, "", "current", target)
        for dim in DIMENSIONS:
            ln = (has_layernorm or {}).get(m, True)
            for label, t in alternatives(dim, target, target, cores, effort, ln).items():
                configs[f"{m} | {label}"] = (m, dim, label, t)
    if len(configs) == len(models):
        return SessionSearch(tuned={m: target for m in models})
    log(f"session: {len(configs)} settings of {len(models)} model(s), one interleaved run")
    res = bench_models(
        {k: models[m] for k, (m, _, _, _) in configs.items()},
        target,
        spec,
        log=log,
        timeout_s=timeout_s,
        targets={k: t for k, (_, _, _, t) in configs.items()},
    )
    tuned, steps = {}, []
    for m in models:
        tuned[m] = target
        for dim in DIMENSIONS:
            mine = {
                label: res[k]
                for k, (mm, d, label, _) in configs.items()
                if mm == m and d in (dim, "")
            }
            if len(mine) < 2 or not mine["current"].valid:
                continue
            chosen, ratios = pick_paired(mine, "current")
            p50 = {k: r.stats.p50_ms for k, r in mine.items() if r.valid and r.stats}
            steps.append(
                {"dimension": dim, "model": m, "p50_ms": p50, "ratio": ratios, "chosen": chosen}
            )
            if chosen != "current":
                ln = (has_layernorm or {}).get(m, True)
                alt = alternatives(dim, tuned[m], target, cores, effort, ln).get(chosen)
                if alt is not None:  # e.g. spinning is moot once one thread was chosen
                    tuned[m] = alt
                log(f"session: {m}: {chosen} ({ratios[chosen]:.3f}x the target's settings)")
    return SessionSearch(tuned=tuned, steps=steps)


__all__ = [
    "DIMENSIONS",
    "SESSION_MIN_GAIN",
    "SessionSearch",
    "alternatives",
    "describe",
    "paired_ratio",
    "pick_paired",
    "pick_session",
    "search_sessions",
    "thread_options",
]
