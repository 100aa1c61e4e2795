"""Release gate: budgets, verdicts and the regression test. Judging is pure (no runtime).

Verdicts, from worst: FAIL (a limit is broken with confidence), INVALID (the measurement can't
be trusted: EP fallback, crash, timeout, too few samples for the percentile, wrong target),
INCONCLUSIVE (the confidence interval straddles the limit: the machine was too noisy to
decide), PASS. A gate's verdict is the worst of its checks.

Budget file (TOML)::

    [targets.edge-2t]          # optional: targets besides the built-in cpu, cpu-1t, cuda
    ep = "cpu"
    threads = 2

    [[budgets]]
    target = "edge-2t"
    batch = 1
    seq = 128                  # or shape = { x = [1, 3, 224, 224] }
    p50_ms = 12
    p99_ms = 30
    min_throughput = 70        # items/s
    max_size_mb = 30
    min_cosine = 0.99          # mean cosine to the reference over the evaluation samples
    min_min_cosine = 0.95      # the worst single sample's cosine
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from deployopt.config import first_error, read_toml
from deployopt.errors import (
    EXIT_GATE_FAIL,
    EXIT_INCONCLUSIVE,
    EXIT_INVALID_RUN,
    EXIT_OK,
    ConfigError,
)
from deployopt.stats import Ratio, min_samples_for, quantile_ci

# `deployopt gate --help` epilog: the verdicts, their exit codes and the budget file
GATE_HELP = (
    "Verdicts and exit codes: 0 PASS; 1 FAIL (a limit broken with confidence); "
    "3 INCONCLUSIVE (the confidence interval straddles a limit: the machine was too noisy to "
    "decide); 4 INVALID (EP fallback, crash, timeout, too few samples for the percentile, a "
    "result from another target); 2 usage error. The worst check decides: FAIL > INVALID > "
    "INCONCLUSIVE > PASS.\n\n"
    "Examples:\n\n"
    "  deployopt gate out/best.onnx --p50-ms 12 --p99-ms 30 --target cpu --junit gate.xml\n\n"
    "  deployopt gate --report out/report.json --budget budgets.toml\n\n"
    "  deployopt gate new.onnx --baseline old.onnx --max-slowdown 5%\n\n"
    "  deployopt gate new.onnx --baseline last-pass --target cpu-1t\n\n"
    "  deployopt gate out/ --budget budgets.toml  # out/best.onnx under out/best.session.json\n\n"
    "  deployopt gate model.onnx --budget budgets.toml --cluster auto --junit gate.xml  # each "
    "target's budgets on its Ray node (ray_labels)\n\n"
    "Budget file: [[budgets]] tables with target, batch, seq (or shape = { x = [1, 16] }), "
    "p50_ms, p90_ms, p95_ms, p99_ms, min_throughput, max_size_mb, min_cosine (mean cosine), "
    "min_min_cosine (the worst sample's cosine); [targets.NAME] tables as in --config (with "
    "ray_labels for --cluster)."
)


class Verdict(enum.StrEnum):
    PASS = "PASS"
    FAIL = "FAIL"
    INCONCLUSIVE = "INCONCLUSIVE"
    INVALID = "INVALID"

    @property
    def exit_code(self) -> int:
        return {
            Verdict.PASS: EXIT_OK,
            Verdict.FAIL: EXIT_GATE_FAIL,
            Verdict.INCONCLUSIVE: EXIT_INCONCLUSIVE,
            Verdict.INVALID: EXIT_INVALID_RUN,
        }[self]


SEVERITY = (Verdict.FAIL, Verdict.INVALID, Verdict.INCONCLUSIVE, Verdict.PASS)
PERCENTILES = {"p50_ms": 0.50, "p90_ms": 0.90, "p95_ms": 0.95, "p99_ms": 0.99}
# cosine limits and what each judges: the mean over the samples, the worst single sample
COSINES = {"min_cosine": "mean cosine", "min_min_cosine": "worst-sample cosine"}


class Budget(BaseModel):
    """Limits for one target and input shape."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    target: str = "cpu"
    batch: int = Field(1, ge=1)
    seq: int = Field(128, ge=1)
    shape: dict[str, list[int]] | None = None
    # the limits; `deployopt gate` declares its limit flags with these fields (options.py)
    p50_ms: float | None = Field(None, gt=0, description="Limit on p50 latency (ms).")
    p90_ms: float | None = Field(None, gt=0, description="Limit on p90 latency (ms).")
    p95_ms: float | None = Field(None, gt=0, description="Limit on p95 latency (ms).")
    p99_ms: float | None = Field(None, gt=0, description="Limit on p99 latency (ms).")
    min_throughput: float | None = Field(
        None, gt=0, description="Least throughput (items/s at the median latency)."
    )
    max_size_mb: float | None = Field(None, gt=0, description="Largest model size (MB).")
    min_cosine: float | None = Field(
        None, ge=-1, le=1,
        description="Least mean cosine to --reference (or, with --report, to fp32).",
    )  # fmt: skip
    min_min_cosine: float | None = Field(
        None, ge=-1, le=1, description="Least cosine of the worst single sample, as --min-cosine."
    )

    @model_validator(mode="after")
    def _has_a_limit(self) -> Budget:
        if not self.limits():
            raise ValueError(
                "a budget needs at least one limit: p50_ms, p90_ms, p95_ms, p99_ms, "
                "min_throughput, max_size_mb, min_cosine or min_min_cosine"
            )
        return self

    def limits(self) -> dict[str, float]:
        keys = (*PERCENTILES, "min_throughput", "max_size_mb", *COSINES)
        return {k: getattr(self, k) for k in keys if getattr(self, k) is not None}

    @property
    def label(self) -> str:
        if self.shape:
            dims = " ".join(f"{k}={'x'.join(map(str, v))}" for k, v in self.shape.items())
            return f"{self.target} {dims}"
        seq = f" seq {self.seq}" if "seq" in self.model_fields_set else ""
        return f"{self.target} batch {self.batch}{seq}"

    def needs_latency(self) -> bool:
        return any(k in PERCENTILES or k == "min_throughput" for k in self.limits())

    def min_samples(self) -> int:
        """Samples the percentiles asked for need: twice the least for a CI at each."""
        qs = [PERCENTILES[k] for k in self.limits() if k in PERCENTILES] or [0.5]
        return 2 * max(min_samples_for(q) for q in qs)

    def bench_shapes(self) -> tuple[tuple[str, tuple[int, ...]], ...]:
        return tuple((k, tuple(v)) for k, v in (self.shape or {}).items())


def load_budgets(path: Path) -> list[Budget]:
    """``[[budgets]]`` tables of a TOML file (targets in the same file: presets.load_targets)."""
    data = read_toml(Path(path), "budget file")
    unknown = set(data) - {"budgets", "targets"}
    if unknown:
        raise ConfigError(
            f"{path}: unknown table(s) {', '.join(sorted(unknown))}",
            hint="a budget file holds [[budgets]] and optionally [targets.NAME]",
        )
    raw = data.get("budgets")
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{path}: no [[budgets]] tables", hint="see `deployopt gate --help`")
    out = []
    for i, body in enumerate(raw, 1):
        try:
            out.append(Budget(**body))
        except ValidationError as e:
            raise ConfigError(f"{path}: budget #{i}: {first_error(e)}") from None
    return out


@dataclass(frozen=True)
class Check:
    """One limit judged: what was measured against what, and the verdict."""

    budget: str  # the budget's label: target and shape
    metric: str  # p50_ms, ..., min_throughput, max_size_mb, min_cosine, min_min_cosine, ...
    limit: float
    measured: float | None
    ci: tuple[float, float] | None
    verdict: Verdict
    message: str

    def to_json(self) -> dict:
        d = asdict(self)
        d["verdict"] = self.verdict.value
        return d


@dataclass(frozen=True)
class Measurement:
    """What a budget is judged on: one model's latency samples at one target and shape."""

    target: str
    shapes: Mapping[str, Sequence[int]]
    samples_ms: Sequence[float] = ()
    batch: int = 1
    invalid: Sequence[str] = ()
    size_mb: float | None = None
    cosine: float | None = None  # mean cosine to the reference over the samples
    worst_cosine: float | None = None  # the worst single sample's cosine (parity's min_cosine)
    cosine_note: str = ""  # why cosine is missing, or what it was measured against


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def judge_upper(label: str, metric: str, samples: Sequence[float], limit: float) -> Check:
    """A latency percentile must stay at or under ``limit`` (ms)."""
    q = PERCENTILES[metric]
    name = metric.removesuffix("_ms")
    ci = quantile_ci(samples, q)
    if ci is None:
        need = min_samples_for(q)
        return Check(
            label,
            metric,
            limit,
            None,
            None,
            Verdict.INVALID,
            f"{len(samples)} samples are too few for a {name} confidence interval "
            f"(needs at least {need}); measure longer",
        )
    import numpy as np

    value = float(np.percentile(samples, q * 100))
    lo, hi = ci
    where = f"{name} {_fmt(value)} ms (95% CI {_fmt(lo)}-{_fmt(hi)})"
    if hi <= limit:
        v, msg = Verdict.PASS, f"{where} <= limit {_fmt(limit)} ms"
    elif lo > limit:
        v, msg = Verdict.FAIL, f"{where} > limit {_fmt(limit)} ms"
    else:
        v, msg = (
            Verdict.INCONCLUSIVE,
            f"{where} straddles the limit {_fmt(limit)} ms: too noisy to decide",
        )
    return Check(label, metric, limit, value, ci, v, msg)


def judge_throughput(label: str, samples: Sequence[float], batch: int, limit: float) -> Check:
    """Items/s at the median latency must reach ``limit``."""
    ci = quantile_ci(samples, 0.5)
    if ci is None:
        return Check(
            label,
            "min_throughput",
            limit,
            None,
            None,
            Verdict.INVALID,
            f"{len(samples)} samples are too few for a throughput confidence interval",
        )
    import numpy as np

    value = batch / (float(np.median(samples)) / 1e3)
    lo, hi = batch / (ci[1] / 1e3), batch / (ci[0] / 1e3)
    where = f"throughput {_fmt(value)} items/s (95% CI {_fmt(lo)}-{_fmt(hi)})"
    if lo >= limit:
        v, msg = Verdict.PASS, f"{where} >= limit {_fmt(limit)}"
    elif hi < limit:
        v, msg = Verdict.FAIL, f"{where} < limit {_fmt(limit)}"
    else:
        v, msg = Verdict.INCONCLUSIVE, f"{where} straddles the limit {_fmt(limit)}"
    return Check(label, "min_throughput", limit, value, (lo, hi), v, msg)


def judge_exact(label: str, metric: str, value: float | None, limit: float, note: str) -> Check:
    """Size and cosine are measured exactly (no sampling noise): PASS or FAIL."""
    if value is None:
        return Check(label, metric, limit, None, None, Verdict.INVALID, note or "not measured")
    if metric == "max_size_mb":
        ok = value <= limit
        msg = f"size {_fmt(value)} MB {'<=' if ok else '>'} limit {_fmt(limit)} MB"
    else:
        ok = value >= limit
        what = COSINES.get(metric, metric)
        msg = f"{what} {value:.5f} {'>=' if ok else '<'} limit {limit}" + (
            f" ({note})" if note else ""
        )
    return Check(label, metric, limit, value, None, Verdict.PASS if ok else Verdict.FAIL, msg)


def judge_budget(budget: Budget, m: Measurement | None) -> list[Check]:
    """Every limit of ``budget`` on measurement ``m`` (None: nothing measured at that shape)."""
    label = budget.label
    limits = budget.limits()

    def all_invalid(reason: str) -> list[Check]:
        return [Check(label, k, v, None, None, Verdict.INVALID, reason) for k, v in limits.items()]

    if m is None:
        return all_invalid("no result at this target and shape")
    if m.target != budget.target:
        return all_invalid(
            f"measured on target {m.target!r}, the budget is for {budget.target!r}: "
            "never judged across targets"
        )
    exact = {"max_size_mb": m.size_mb, "min_cosine": m.cosine, "min_min_cosine": m.worst_cosine}
    checks = []
    for metric, limit in limits.items():
        if metric in exact:
            checks.append(judge_exact(label, metric, exact[metric], limit, m.cosine_note))
        elif m.invalid:
            reason = "measurement invalid: " + "; ".join(m.invalid)
            checks.append(Check(label, metric, limit, None, None, Verdict.INVALID, reason))
        elif metric == "min_throughput":
            checks.append(judge_throughput(label, m.samples_ms, m.batch, limit))
        else:
            checks.append(judge_upper(label, metric, m.samples_ms, limit))
    return checks


def judge_regression(label: str, ratio: Ratio | None, max_slowdown: float, why: str = "") -> Check:
    """Fail only when the slowdown exceeds ``max_slowdown`` with confidence: the lower bound of
    the ratio's CI lies above 1 + max_slowdown. Pass when the upper bound lies at or under it;
    in between the run could not decide."""
    limit = 1 + max_slowdown
    if ratio is None:
        return Check(label, "max_slowdown", max_slowdown, None, None, Verdict.INVALID, why)
    pct = ratio.estimate - 1
    where = (
        f"new/baseline {ratio.estimate:.3f} ({pct:+.1%}; 90% CI {ratio.low:.3f}-{ratio.high:.3f}, "
        f"{ratio.method}, n={ratio.n})"
    )
    if ratio.low > limit:
        v, msg = Verdict.FAIL, f"{where}: slower than the allowed {max_slowdown:.1%}"
    elif ratio.high <= limit:
        v, msg = Verdict.PASS, f"{where}: within the allowed {max_slowdown:.1%}"
    else:
        v, msg = (
            Verdict.INCONCLUSIVE,
            f"{where}: the interval straddles +{max_slowdown:.1%}; too noisy to decide",
        )
    return Check(
        label, "max_slowdown", max_slowdown, ratio.estimate, (ratio.low, ratio.high), v, msg
    )


def overall(checks: Sequence[Check]) -> Verdict:
    if not checks:
        return Verdict.INVALID
    present = {c.verdict for c in checks}
    return next(v for v in SEVERITY if v in present)


def parse_percent(text: str) -> float:
    """'5%' -> 0.05, '0.05' -> 0.05 (deployopt.config.parse_percent), as a slowdown limit."""
    from deployopt.config import parse_percent as parse

    try:
        value = parse(text)
    except ValueError:
        raise ConfigError(f"bad percentage {text!r}", hint="write e.g. 5% or 0.05") from None
    if not 0 <= value < 10 or math.isnan(value):
        raise ConfigError(f"bad percentage {text!r}", hint="a slowdown between 0% and 1000%")
    return value


@dataclass
class GateResult:
    model: str
    checks: list[Check]
    verdict: Verdict
    environment: dict[str, str] = field(default_factory=dict)
    results: list[dict[str, Any]] = field(default_factory=list)  # bench results (JSON)
    mode: str = "measure"  # measure | report | regression

    def summary_line(self) -> str:
        counts = {v: sum(c.verdict == v for c in self.checks) for v in Verdict}
        parts = [f"{n} {v.value.lower()}" for v, n in counts.items() if n]
        worst = [c for c in self.checks if c.verdict == self.verdict and c.verdict != Verdict.PASS]
        detail = f": {worst[0].budget}: {worst[0].message}" if worst else ""
        return (
            f"gate {self.verdict.value}: {self.model}, {len(self.checks)} checks "
            f"({', '.join(parts) or 'none'}){detail}"
        )

    def to_json(self) -> dict:
        return {
            "schema": "deployopt.gate/1",
            "model": self.model,
            "mode": self.mode,
            "verdict": self.verdict.value,
            "exit_code": self.verdict.exit_code,
            "checks": [c.to_json() for c in self.checks],
            "environment": self.environment,
            "results": self.results,
        }


def junit_xml(g: GateResult) -> str:
    """One testcase per check: FAIL -> <failure>, INVALID -> <error>, INCONCLUSIVE ->
    <skipped>; the measured value and the limit in the message."""
    import xml.etree.ElementTree as ET

    n = len(g.checks)
    fails = sum(c.verdict == Verdict.FAIL for c in g.checks)
    errors = sum(c.verdict == Verdict.INVALID for c in g.checks)
    skipped = sum(c.verdict == Verdict.INCONCLUSIVE for c in g.checks)
    root = ET.Element(
        "testsuites",
        name="deployopt gate",
        tests=str(n),
        failures=str(fails),
        errors=str(errors),
        skipped=str(skipped),
    )
    suite = ET.SubElement(
        root,
        "testsuite",
        name=f"deployopt gate {g.model}",
        tests=str(n),
        failures=str(fails),
        errors=str(errors),
        skipped=str(skipped),
        time="0",
    )
    props = ET.SubElement(suite, "properties")
    for k, v in sorted(g.environment.items()):
        ET.SubElement(props, "property", name=k, value=str(v))
    for c in g.checks:
        case = ET.SubElement(
            suite,
            "testcase",
            classname=f"deployopt.gate.{c.budget.replace(' ', '_')}",
            name=f"{c.metric} limit {_fmt(c.limit)}",
            time="0",
        )
        tag = {Verdict.FAIL: "failure", Verdict.INVALID: "error", Verdict.INCONCLUSIVE: "skipped"}
        if c.verdict in tag:
            el = ET.SubElement(case, tag[c.verdict], message=c.message, type=c.verdict.value)
            el.text = f"measured {c.measured} limit {c.limit} ci {c.ci}"
        out = ET.SubElement(case, "system-out")
        out.text = f"{c.verdict.value}: {c.message}"
    ET.indent(root)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode")


def markdown(g: GateResult) -> str:
    """A summary fit for a CI job page (e.g. ``--markdown "$GITHUB_STEP_SUMMARY"``)."""
    env = g.environment
    lines = [
        f"## deployopt gate: {g.verdict.value}",
        "",
        f"`{g.model}` · {len(g.checks)} checks · {env.get('cpu', '?')}, "
        f"{env.get('cores', '?')} cores"
        + (f", GPU {env['gpu']}" if "gpu" in env else "")
        + f" · onnxruntime {env.get('onnxruntime', '?')}",
        "",
        "| budget | check | limit | measured | 95% CI | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for c in g.checks:
        ci = f"{_fmt(c.ci[0])}-{_fmt(c.ci[1])}" if c.ci else "-"
        measured = _fmt(c.measured) if c.measured is not None else "-"
        lines.append(
            f"| {c.budget} | {c.metric} | {_fmt(c.limit)} | {measured} | {ci} | "
            f"**{c.verdict.value}** |"
        )
    bad = [c for c in g.checks if c.verdict != Verdict.PASS]
    if bad:
        lines += [""] + [f"- {c.verdict.value} {c.budget} {c.metric}: {c.message}" for c in bad]
    return "\n".join(lines) + "\n"
