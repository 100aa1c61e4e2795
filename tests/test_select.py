"""Selection on synthetic results: no runtime involved."""

import pytest

from deployopt.select import Candidate, Constraints, choose, pareto_front


def cand(name, ms, cos=0.999, mb=10.0, **kw):
    return Candidate(id=name, name=name, latency_ms=ms, mean_cosine=cos, size_mb=mb, **kw)


def test_fastest_qualifying_wins_and_rejections_have_reasons():
    cands = [
        cand("fp32", 20.0, 1.0, 90),
        cand("int8", 8.0, 0.985, 23),  # too inaccurate
        cand("fp16", 17.0, 1.0, 45),
        Candidate(id="s", name="static", status="failed", reason="parity vs fp32 failed"),
        cand("slow-gpu", 5.0, 1.0, 90, bench_valid=False, bench_reason="fell back to CPU"),
    ]
    ch = choose(cands, Constraints(min_cosine=0.99))
    assert ch.winner.name == "fp16"
    assert [c.name for c in ch.ranked] == ["fp16", "fp32"]
    assert ch.rejected["int8"] == "mean cosine 0.98500 < 0.99"
    assert ch.rejected["static"] == "variant failed: parity vs fp32 failed"
    assert ch.rejected["slow-gpu"] == "benchmark invalid: fell back to CPU"


def test_ties_go_to_smaller_then_more_accurate_then_name():
    ch = choose([cand("b", 10.0, 0.999, 20), cand("a", 10.0, 0.999, 30)], Constraints())
    assert ch.winner.name == "b"
    ch = choose([cand("b", 10.0, 0.995, 20), cand("a", 10.0, 0.999, 20)], Constraints())
    assert ch.winner.name == "a"
    ch = choose([cand("b", 10.0), cand("a", 10.0)], Constraints())
    assert ch.winner.name == "a"


def test_all_rejected_gives_no_winner():
    ch = choose([cand("x", 10.0, 0.5), cand("y", 12.0, 0.6)], Constraints(min_cosine=0.99))
    assert ch.winner is None and ch.ranked == ()
    assert set(ch.rejected) == {"x", "y"}


def test_missing_metrics_are_rejected_not_crashing():
    cands = [
        Candidate(id="a", name="a", mean_cosine=1.0, size_mb=1.0),  # not benchmarked
        Candidate(id="b", name="b", latency_ms=3.0),  # no parity
        cand("c", 9.0, mb=None),
    ]
    ch = choose(cands, Constraints(max_size_mb=50))
    assert ch.rejected == {
        "a": "not benchmarked",
        "b": "no parity measurement",
        "c": "size unknown",
    }
    ch = choose([cand("c", 9.0)], Constraints(max_accuracy_drop=1.0))
    assert ch.rejected["c"] == "no task metric to check --max-accuracy-drop against"


@pytest.mark.parametrize(
    "kw, reason",
    [
        ({"max_size_mb": 5}, "size 10 MB > 5 MB"),
        ({"max_latency_ms": 9.5}, "p50 10 ms > budget 9.5 ms"),
        ({"max_accuracy_drop": 0.5}, "accuracy drop 1.20 > 0.5"),
    ],
)
def test_each_constraint(kw, reason):
    ch = choose([cand("x", 10.0, accuracy_drop=1.2)], Constraints(**kw))
    assert ch.rejected == {"x": reason}


def test_pareto_front():
    cands = [
        cand("fast-inaccurate", 5.0, 0.99, 20),
        cand("slow-exact", 20.0, 1.0, 90),
        cand("dominated", 21.0, 0.999, 95),
        cand("small", 25.0, 0.999, 10),
    ]
    assert pareto_front(cands) == ("fast-inaccurate", "slow-exact", "small")


def test_unknown_metric():
    with pytest.raises(ValueError, match="metric must be one of"):
        Constraints(metric="p42")


def test_worst_sample_constraint_and_screened_out_reasons():
    a = Candidate(id="a", name="a", latency_ms=5.0, mean_cosine=0.995, min_cosine=0.97, size_mb=1)
    b = Candidate(id="b", name="b", latency_ms=7.0, mean_cosine=0.998, min_cosine=0.992, size_mb=1)
    c = Candidate(
        id="c", name="c", mean_cosine=0.999, min_cosine=0.999, size_mb=1, screened_out="x"
    )
    d = Candidate(id="d", name="d", latency_ms=4.0, mean_cosine=0.999, size_mb=1)  # no min
    assert choose([a, b, c], Constraints()).winner.name == "a"
    ch = choose([a, b, c, d], Constraints(min_min_cosine=0.99))
    assert ch.winner.name == "b"
    assert ch.rejected["a"] == "min cosine 0.97000 < 0.99"
    assert ch.rejected["c"] == "screened out: x"
    assert ch.rejected["d"] == "no per-sample cosine to check --min-min-cosine against"
    # accuracy is judged before the screening verdict: the reason that does not depend on timing
    worse = Candidate(id="e", name="e", mean_cosine=0.9, min_cosine=0.9, screened_out="x")
    assert choose([worse], Constraints()).rejected["e"] == "mean cosine 0.90000 < 0.99"


def test_prefer_smallest_ranks_by_size_then_latency_cosine_name():
    cands = [
        cand("fp32", 20.0, 1.0, 90),
        cand("int8", 8.0, 0.995, 23),
        cand("int8-small", 12.0, 0.995, 12),
        cand("tiny-bad", 30.0, 0.9, 5),  # smallest, but fails the cosine constraint
        cand("tiny-slow", 50.0, 0.999, 6, bench_valid=False, bench_reason="crashed"),
        cand("fp16", 17.0, 1.0, 45),
    ]
    fastest = choose(cands, Constraints())
    assert fastest.winner.name == "int8"
    ch = choose(cands, Constraints(prefer="smallest"))
    assert ch.winner.name == "int8-small"
    assert [c.name for c in ch.ranked] == ["int8-small", "int8", "fp16", "fp32"]
    # the same rejections and front, whichever rule ranks
    assert ch.rejected == fastest.rejected and ch.pareto == fastest.pareto
    assert set(ch.rejected) == {"tiny-bad", "tiny-slow"}
    # the budgets still apply: a latency budget rejects the smallest, the next smallest wins
    ch = choose(cands, Constraints(prefer="smallest", max_latency_ms=10))
    assert ch.winner.name == "int8" and ch.rejected["int8-small"] == "p50 12 ms > budget 10 ms"


def test_prefer_smallest_ties():
    k = Constraints(prefer="smallest")
    ch = choose([cand("b", 12.0, 0.999, 20), cand("a", 10.0, 0.999, 20)], k)
    assert ch.winner.name == "a"  # same size: the faster
    ch = choose([cand("b", 10.0, 0.995, 20), cand("a", 10.0, 0.999, 20)], k)
    assert ch.winner.name == "a"  # same size and latency: the more accurate
    ch = choose([cand("b", 10.0), cand("a", 10.0)], k)
    assert ch.winner.name == "a"  # then the name
    ch = choose([cand("unknown", 1.0, mb=None), cand("known", 9.0, mb=50)], k)
    assert ch.winner.name == "known"  # an unknown size ranks last


def test_unknown_prefer():
    with pytest.raises(ValueError, match="prefer must be one of fastest, smallest"):
        Constraints(prefer="cheapest")
