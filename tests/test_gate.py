"""judge() at every edge, on synthetic samples; the regression test's power; CI outputs."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from dataclasses import replace

import numpy as np
import pytest

from deployopt.errors import ConfigError
from deployopt.judge import (
    Budget,
    GateResult,
    Measurement,
    Verdict,
    judge_budget,
    judge_regression,
    junit_xml,
    load_budgets,
    markdown,
    overall,
    parse_percent,
)
from deployopt.stats import min_samples_for, quantile_ci, ratio_ci

# 1..200 ms: p50 = 100.5; the 95% CI of the median is [87, 114] (order statistics)
RAMP = [float(x) for x in range(1, 201)]


def test_quantile_ci_and_sample_needs():
    assert quantile_ci(RAMP, 0.5) == (87.0, 114.0)
    assert [min_samples_for(q) for q in (0.5, 0.9, 0.95, 0.99)] == [4, 35, 73, 381]
    assert quantile_ci(RAMP, 0.99) is None  # 200 samples cannot bound p99
    assert quantile_ci(RAMP * 2, 0.99) is not None
    with pytest.raises(ValueError):
        quantile_ci(RAMP, 1.0)


def m(samples, target="cpu", **kw):
    return Measurement(target=target, shapes={"x": [1, 16]}, samples_ms=samples, **kw)


@pytest.mark.parametrize(
    "limit, verdict",
    [
        (114.0, Verdict.PASS),  # just at the CI's upper bound: under the limit with confidence
        (113.9, Verdict.INCONCLUSIVE),  # just under it: the CI straddles
        (100.0, Verdict.INCONCLUSIVE),  # under the point estimate, inside the CI
        (87.0, Verdict.INCONCLUSIVE),  # the lower bound equal to the limit: not over it
        (86.9, Verdict.FAIL),  # just over: the whole CI is above the limit
    ],
)
def test_p50_limit_edges(limit, verdict):
    (c,) = judge_budget(Budget(p50_ms=limit), m(RAMP))
    assert c.verdict == verdict, c.message
    assert c.measured == pytest.approx(100.5) and c.ci == (87.0, 114.0)
    assert f"{limit:.4g}" in c.message


def test_too_few_samples_for_p99_is_invalid_but_p50_is_judged():
    checks = judge_budget(Budget(p50_ms=500, p99_ms=500), m(RAMP))
    by = {c.metric: c for c in checks}
    assert by["p50_ms"].verdict == Verdict.PASS
    assert by["p99_ms"].verdict == Verdict.INVALID
    assert "200 samples are too few for a p99" in by["p99_ms"].message
    assert "needs at least 381" in by["p99_ms"].message
    assert overall(checks) == Verdict.INVALID
    assert Budget(p99_ms=1).min_samples() == 762 and Budget(p50_ms=1).min_samples() == 8


def test_throughput_size_and_cosine():
    samples = [10.0] * 50  # batch 8 at 10 ms: 800 items/s
    b = Budget(batch=8, min_throughput=800, max_size_mb=25, min_cosine=0.99)
    checks = judge_budget(b, m(samples, batch=8, size_mb=25.0, cosine=0.98999))
    by = {c.metric: c for c in checks}
    assert by["min_throughput"].verdict == Verdict.PASS
    assert by["min_throughput"].measured == pytest.approx(800)
    assert by["max_size_mb"].verdict == Verdict.PASS  # equal to the limit passes
    assert by["min_cosine"].verdict == Verdict.FAIL
    assert by["min_cosine"].message.startswith("mean cosine 0.98999 < limit 0.99")
    slow = judge_budget(Budget(batch=8, min_throughput=801), m(samples, batch=8))
    assert slow[0].verdict == Verdict.FAIL


def test_missing_cosine_is_invalid_with_the_reason():
    (c,) = judge_budget(
        Budget(min_cosine=0.99), m(RAMP, cosine_note="no reference: pass --reference")
    )
    assert c.verdict == Verdict.INVALID and c.message == "no reference: pass --reference"


def test_never_judged_on_another_target():
    checks = judge_budget(Budget(target="cpu-1t", p50_ms=1000, max_size_mb=100), m(RAMP))
    assert {c.verdict for c in checks} == {Verdict.INVALID}
    assert "measured on target 'cpu', the budget is for 'cpu-1t'" in checks[0].message


def test_invalid_measurement_makes_latency_checks_invalid():
    meas = m(
        [], invalid=["requested CUDAExecutionProvider but the session runs on CPU"], size_mb=1.0
    )
    checks = judge_budget(Budget(p50_ms=5, max_size_mb=10), meas)
    assert [c.verdict for c in checks] == [Verdict.INVALID, Verdict.PASS]
    assert "runs on CPU" in checks[0].message


def test_overall_precedence_and_exit_codes():
    def c(v):
        return replace(judge_regression("x", None, 0.05, "why"), verdict=v)

    assert overall([c(Verdict.PASS), c(Verdict.INCONCLUSIVE)]) == Verdict.INCONCLUSIVE
    assert overall([c(Verdict.INCONCLUSIVE), c(Verdict.INVALID)]) == Verdict.INVALID
    assert overall([c(Verdict.INVALID), c(Verdict.FAIL), c(Verdict.PASS)]) == Verdict.FAIL
    assert overall([]) == Verdict.INVALID
    assert [v.exit_code for v in Verdict] == [0, 1, 3, 4]


def test_budget_file_and_its_errors(tmp_path):
    f = tmp_path / "budgets.toml"
    f.write_text(
        '[targets.edge]\nep = "cpu"\nthreads = 1\n\n'
        '[[budgets]]\ntarget = "edge"\nbatch = 4\np50_ms = 12\np99_ms = 30\n\n'
        "[[budgets]]\nshape = { x = [2, 16] }\nmax_size_mb = 1\n"
    )
    b1, b2 = load_budgets(f)
    assert b1.label == "edge batch 4" and b1.limits() == {"p50_ms": 12, "p99_ms": 30}
    assert b2.label == "cpu x=2x16" and b2.bench_shapes() == (("x", (2, 16)),)
    f.write_text("[[budgets]]\ntarget = 'cpu'\n")
    with pytest.raises(ConfigError, match="budget #1: a budget needs at least one limit"):
        load_budgets(f)
    f.write_text("[[budgets]]\np50_ms = -1\n")
    with pytest.raises(ConfigError, match="budget #1: p50_ms: Input should be greater than 0"):
        load_budgets(f)
    f.write_text("[budget]\np50_ms = 1\n")
    with pytest.raises(ConfigError, match="unknown table"):
        load_budgets(f)
    with pytest.raises(ConfigError, match="no such budget file"):
        load_budgets(tmp_path / "nope.toml")
    assert parse_percent("5%") == 0.05 and parse_percent("0.3") == 0.3
    with pytest.raises(ConfigError, match="bad percentage"):
        parse_percent("fast")


# ------------------------------------------------------------------ regression statistics


def drifting_rounds(rng, n_rounds, slow=1.0, base=10.0, drift=0.3, noise=0.04):
    """Round medians of two models measured side by side on a machine whose speed wanders by
    up to ``drift`` between rounds; each model's round median also has its own noise."""
    speed = 1 + drift * rng.random(n_rounds)
    a = base * speed * (1 + noise * rng.standard_normal(n_rounds))
    b = base * slow * speed * (1 + noise * rng.standard_normal(n_rounds))
    return b, a


def rates(slow, trials=200, rounds=30):
    rng = np.random.default_rng(7)
    verdicts = []
    for t in range(trials):
        new, old = drifting_rounds(rng, rounds, slow=slow)
        r = ratio_ci(new, old, paired=True, seed=t)
        verdicts.append(judge_regression("cpu", r, 0.05).verdict)
    return {v: verdicts.count(v) / trials for v in Verdict}


def test_regression_power_on_synthetic_drifting_machine():
    same = rates(1.0)
    assert same[Verdict.PASS] >= 0.95 and same[Verdict.FAIL] == 0
    slower = rates(1.3)
    assert slower[Verdict.FAIL] >= 0.95 and slower[Verdict.PASS] == 0


def test_pair_level_offsets_widen_the_interval_instead_of_failing():
    """Two process pairs timing the same model, each steady within itself, one 25% slow and one
    3% fast (where each process landed on the machine): rounds taken as independent give a
    narrow interval that excludes 1, a false slowdown; resampling the pairs first includes 1."""
    rng = np.random.default_rng(3)
    old = list(10 * (1 + 0.01 * rng.standard_normal(20)))
    new = [o * (1.25 if i < 10 else 0.97) * (1 + 0.01 * rng.standard_normal()) for i, o in
           enumerate(old)]  # fmt: skip
    flat_ci = ratio_ci(new, old, paired=True)
    pairs = ratio_ci(new, old, paired=True, groups=[0] * 10 + [1] * 10)
    assert flat_ci.low > 1.0  # "surely slower", for the same model
    assert flat_ci.high - flat_ci.low < 0.7 * (pairs.high - pairs.low)
    assert pairs.low < 1.0 < pairs.high and pairs.estimate == flat_ci.estimate
    assert judge_regression("cpu", pairs, 0.05).verdict == Verdict.INCONCLUSIVE
    # one group (or none) is the plain round bootstrap
    same = ratio_ci(new, old, paired=True, groups=[0] * 20)
    assert (same.low, same.high) == (flat_ci.low, flat_ci.high)
    with pytest.raises(ValueError, match="one entry per round"):
        ratio_ci(new, old, paired=True, groups=[0, 1])


def test_regression_edges():
    old = [10.0, 10.0, 10.0, 10.0]
    c = judge_regression("cpu", ratio_ci([10.4] * 4, old, paired=True), 0.05)
    assert c.verdict == Verdict.PASS and c.measured == pytest.approx(1.04)
    c = judge_regression("cpu", ratio_ci([10.6] * 4, old, paired=True), 0.05)
    assert c.verdict == Verdict.FAIL and "+6.0%" in c.message
    straddle = ratio_ci([10.0, 11.2, 10.1, 11.1], old, paired=True)
    c = judge_regression("cpu", straddle, 0.05)
    assert c.verdict == Verdict.INCONCLUSIVE and "straddles +5.0%" in c.message
    unpaired = ratio_ci(list(np.full(50, 13.0)), list(np.full(50, 10.0)), paired=False)
    assert unpaired.method == "unpaired medians" and unpaired.low == pytest.approx(1.3)
    with pytest.raises(ValueError, match="same number"):
        ratio_ci([1.0, 2.0], [1.0], paired=True)


# ------------------------------------------------------------------ CI outputs


def a_gate() -> GateResult:
    checks = judge_budget(Budget(p50_ms=113.9, p90_ms=500, max_size_mb=1), m(RAMP, size_mb=2.0))
    return GateResult(
        model="m.onnx",
        checks=checks,
        verdict=overall(checks),
        environment={"cpu": "test cpu", "cores": "2", "onnxruntime": "1.0"},
    )


def test_junit_has_what_ci_systems_read():
    g = a_gate()
    root = ET.fromstring(junit_xml(g))
    suite = root.find("testsuite")
    assert root.tag == "testsuites" and suite.get("tests") == "3"
    assert (suite.get("failures"), suite.get("errors"), suite.get("skipped")) == ("1", "0", "1")
    cases = suite.findall("testcase")
    assert [c.get("name") for c in cases] == [
        "p50_ms limit 113.9",
        "p90_ms limit 500",
        "max_size_mb limit 1",
    ]
    assert all(c.get("classname") == "deployopt.gate.cpu_batch_1" for c in cases)
    assert cases[0].find("skipped").get("message").startswith("p50 100.5 ms (95% CI 87-114)")
    assert cases[1].find("failure") is None and cases[1].find("skipped") is None
    assert cases[2].find("failure").get("message") == "size 2 MB > limit 1 MB"
    props = {p.get("name"): p.get("value") for p in suite.find("properties")}
    assert props["cpu"] == "test cpu"


def test_markdown_and_summary_line():
    g = a_gate()
    md = markdown(g)
    assert md.startswith("## deployopt gate: FAIL")
    assert "| cpu batch 1 | max_size_mb | 1 | 2 | - | **FAIL** |" in md
    assert g.summary_line().startswith(
        "gate FAIL: m.onnx, 3 checks (1 pass, 1 fail, 1 inconclusive)"
    )
    assert g.to_json()["exit_code"] == 1


# ------------------------------------------------------------------ worst-sample cosine


def test_min_min_cosine_judges_the_worst_sample():
    b = Budget(min_cosine=0.99, min_min_cosine=0.95)
    assert b.limits() == {"min_cosine": 0.99, "min_min_cosine": 0.95}
    assert not b.needs_latency()
    by = {
        c.metric: c
        for c in judge_budget(b, m((), cosine=0.995, worst_cosine=0.94, cosine_note="vs ref"))
    }
    assert by["min_cosine"].verdict == Verdict.PASS and by["min_cosine"].measured == 0.995
    assert by["min_min_cosine"].verdict == Verdict.FAIL and by["min_min_cosine"].measured == 0.94
    assert by["min_min_cosine"].message == "worst-sample cosine 0.94000 < limit 0.95 (vs ref)"
    (c,) = judge_budget(Budget(min_min_cosine=0.95), m((), worst_cosine=0.95))
    assert c.verdict == Verdict.PASS  # equal to the limit passes
    assert c.message.startswith("worst-sample cosine 0.95000 >= limit 0.95")
    (c,) = judge_budget(Budget(min_min_cosine=0.9), m((), cosine=0.99, cosine_note="no reference"))
    assert c.verdict == Verdict.INVALID and c.message == "no reference"
    (c,) = judge_budget(Budget(target="cpu-1t", min_min_cosine=0.9), m((), worst_cosine=1.0))
    assert c.verdict == Verdict.INVALID and "never judged across targets" in c.message


def test_min_min_cosine_in_a_budget_file(tmp_path):
    f = tmp_path / "budgets.toml"
    f.write_text("[[budgets]]\nmin_min_cosine = 0.97\n")
    (b,) = load_budgets(f)
    assert b.limits() == {"min_min_cosine": 0.97}
    f.write_text("[[budgets]]\nmin_min_cosine = 1.5\n")
    with pytest.raises(ConfigError, match="budget #1: min_min_cosine: Input should be less"):
        load_budgets(f)
    with pytest.raises(ValueError, match="max_size_mb, min_cosine or min_min_cosine"):
        Budget()


def test_min_min_cosine_judged_on_a_report(tmp_path):
    """A report's variant carries parity.min_cosine (the worst sample) beside mean_cosine."""
    from deployopt.gating import judge_report
    from tests.test_report import synthetic

    path = tmp_path / "report.json"
    path.write_text(json.dumps(synthetic()))  # int8-dynamic: mean .993, min .983
    checks, name, _ = judge_report(path, [Budget(min_cosine=0.99, min_min_cosine=0.98)])
    assert name == "int8-dynamic" and [c.verdict for c in checks] == [Verdict.PASS] * 2
    assert [c.measured for c in checks] == [pytest.approx(0.993), pytest.approx(0.983)]
    (c,) = judge_report(path, [Budget(min_min_cosine=0.985)])[0]
    assert c.verdict == Verdict.FAIL
    assert c.message == "worst-sample cosine 0.98300 < limit 0.985 (vs its reference, recorded)"
    (c,) = judge_report(path, [Budget(min_min_cosine=0.5)], variant="fp32")[0]
    assert c.verdict == Verdict.INVALID and c.message == "the report has no parity for this variant"


def test_a_session_is_applied_to_the_measured_targets_only(tmp_path):
    from deployopt.gating import with_session
    from deployopt.presets import BUILTIN_TARGETS, read_session
    from tests.test_bench import write_session_file

    s = read_session(write_session_file(tmp_path, threads=2))
    got = with_session(BUILTIN_TARGETS, {"cpu", "cpu-1t", "nope"}, s)
    assert set(got) == set(BUILTIN_TARGETS)
    assert (got["cpu"].threads, got["cpu-1t"].threads, got["cpu-1t"].name) == (2, 2, "cpu-1t")
    assert got["cpu"].session_config == {"session.intra_op.allow_spinning": "0"}
    assert got["cuda"] == BUILTIN_TARGETS["cuda"]  # not measured on: its EP is not checked
    assert with_session(BUILTIN_TARGETS, {"cpu"}, None) == BUILTIN_TARGETS
