"""Typed progress events of optimize (deployopt.events): their order agrees with the result."""

from __future__ import annotations

import pytest

from deployopt.events import (
    BenchRound,
    Shipped,
    VariantFinished,
    VariantsPlanned,
    VariantStarted,
)

FAST = {"bench_min_samples": 5, "bench_min_seconds": 0.0}
MLP = {"input_shapes": {"x": (1, 16)}}


def _variant_events(events) -> list[tuple[str, str, str]]:
    """(name, status, reason) per variant, checking each start is finished before the next."""
    out = []
    open_ = None
    for e in events:
        if isinstance(e, VariantStarted):
            assert open_ is None, f"{e.name} started while {open_} runs"
            open_ = e.name
        elif isinstance(e, VariantFinished):
            assert e.name == open_, f"{e.name} finished, {open_} was started"
            open_ = None
            out.append((e.name, e.status, e.reason))
    assert open_ is None, f"{open_} started and never finished"
    return out


def _rounds(events) -> list[list[BenchRound]]:
    """The BenchRound events, one list per measurement (done runs 1..total)."""
    runs: list[list[BenchRound]] = []
    for e in events:
        if isinstance(e, BenchRound):
            if e.done == 1:
                runs.append([])
            assert runs, "a measurement did not start at round 1"
            runs[-1].append(e)
    for run in runs:
        assert [r.done for r in run] == list(range(1, run[0].total + 1)), run
        assert {r.total for r in run} == {run[0].total}
    return runs


def test_events_follow_the_run(tmp_path):
    import deployopt

    events = []
    res = deployopt.optimize(
        "tests.models:mlp", tmp_path / "out", variants=["fuse", "int8-dynamic"],
        bench_batches=(1, 4), bench_rounds=2, search="quick", tune_session=False,
        on_event=events.append, **MLP, **FAST,
    )  # fmt: skip
    names = [v.name for v in res.variants]
    (planned,) = [e for e in events if isinstance(e, VariantsPlanned)]
    assert list(planned.names) == names
    assert names[:2] == ["fp32", "fuse"] and any(n.startswith("int8-dynamic") for n in names)
    # every variant started and finished once, in the result's order, with its status
    assert _variant_events(events) == [(v.name, v.status, v.reason) for v in res.variants]
    # the plan is announced once fusion is done (its facts shape the candidates), before the
    # first planned candidate starts
    at = events.index(planned)
    before = [e.name for e in events[:at] if isinstance(e, VariantStarted)]
    assert before == names[: len(before)] and before == ["fp32", "fuse"]
    # benchmark rounds: after every variant, one complete measurement per batch size
    runs = _rounds(events)
    assert len(runs) == 2 and all(r[0].total == 2 for r in runs)
    first_round = next(i for i, e in enumerate(events) if isinstance(e, BenchRound))
    assert not [e for e in events[first_round:] if isinstance(e, VariantStarted)]
    # shipped last, naming the winner
    assert events[-1] == Shipped(res.choice.winner.name)
    assert sum(isinstance(e, Shipped) for e in events) == 1


def test_rerun_reports_reused_variants(tmp_path):
    from tests.models import optimize_only

    out = tmp_path / "out"
    first = []
    a = optimize_only("tests.models:mlp", out, variants=["fuse"], on_event=first.append, **MLP)
    assert [s for _, s, _ in _variant_events(first)] == [v.status for v in a.variants]
    assert events_end_unshipped(first)
    again = []
    b = optimize_only("tests.models:mlp", out, variants=["fuse"], on_event=again.append, **MLP)
    got = _variant_events(again)
    assert [n for n, _, _ in got] == [v.name for v in b.variants] == ["fp32", "fuse"]
    assert [s for _, s, _ in got] == ["reused", "reused"]


def events_end_unshipped(events) -> bool:
    """Without a benchmark nothing is chosen: Shipped(None) comes last."""
    return events[-1] == Shipped(None) and not any(isinstance(e, BenchRound) for e in events)


def test_failed_and_skipped_variants_finish_with_their_status(tmp_path, monkeypatch):
    """A stage failure finishes that variant 'failed' with its reason; a run where nothing
    qualifies raises, after Shipped(None)."""
    from deployopt.errors import NoViableVariantError, StageError
    from deployopt.stages.fuse import FuseStage
    from tests.models import optimize_only

    def broken(self, src, out_dir, ctx):
        raise StageError("fuse: simulated failure")

    monkeypatch.setattr(FuseStage, "apply", broken)
    events = []
    with pytest.raises(NoViableVariantError) as e:
        optimize_only(
            "tests.models:mlp", tmp_path / "o", variants=["fuse"], on_event=events.append, **MLP
        )
    res = e.value.result
    assert _variant_events(events) == [(v.name, v.status, v.reason) for v in res.variants]
    assert ("fuse", "failed", "fuse: simulated failure") in _variant_events(events)
    assert events_end_unshipped(events)


def test_a_run_stopped_mid_variant_finishes_it_failed(tmp_path, monkeypatch):
    """An error that ends the run inside a variant still closes that variant's events."""
    from deployopt.errors import OutputError
    from deployopt.stages.fuse import FuseStage
    from tests.models import optimize_only

    def disk(self, src, out_dir, ctx):
        raise OutputError("out: write failed: simulated")

    monkeypatch.setattr(FuseStage, "apply", disk)
    events = []
    with pytest.raises(OutputError):
        optimize_only(
            "tests.models:mlp", tmp_path / "o", variants=["fuse"], on_event=events.append, **MLP
        )
    assert _variant_events(events)[-1] == ("fuse", "failed", "out: write failed: simulated")
    assert not any(isinstance(e, (VariantsPlanned, Shipped)) for e in events)
