"""After the variants are built and proved: benchmark them, choose one, write it and the report.

``OUT/best.onnx`` (with ``best.onnx.data`` when the weights are external) is the chosen variant;
``OUT/best.session.json`` the onnxruntime session settings it was measured fastest with;
``OUT/report.{json,md,html}`` say why.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, replace
from pathlib import Path

from deployopt.benchmark import BenchSpec, bench_models, fingerprint
from deployopt.config import OptimizeConfig
from deployopt.events import Event, Shipped
from deployopt.presets import BEST_MODEL, BEST_SESSION, Target, resolve_target
from deployopt.runner import OptimizeResult, manifest_entry
from deployopt.select import Candidate, Choice, Constraints, choose
from deployopt.stages.base import EXTERNAL_DATA_FILE
from deployopt.workspace import TMP_PREFIX, atomic_path, write_json

BEST = BEST_MODEL
SESSION_FILE = BEST_SESSION
# session search: models whose full-run latency is within this share of the winner's
RUNNER_UP_WITHIN = 0.10


def target_of(cfg: OptimizeConfig) -> Target:
    return resolve_target(cfg.target, cfg.ep, cfg.threads, cfg.config_file)


def constraints_of(cfg: OptimizeConfig) -> Constraints:
    return Constraints(
        min_cosine=cfg.min_cosine,
        min_min_cosine=cfg.min_min_cosine,
        max_accuracy_drop=cfg.max_accuracy_drop,
        max_size_mb=cfg.max_size_mb,
        max_latency_ms=cfg.max_latency_ms,
        metric=cfg.metric,
        prefer=cfg.prefer,
    )


def _dims(result: OptimizeResult) -> tuple[tuple[str, int], ...]:
    """The symbolic dims the run settled (an image's height and width), for the benchmark."""
    return tuple(sorted((result.meta.get("input_dims") or {}).items()))


def spec_of(result: OptimizeResult, cfg: OptimizeConfig, batch: int) -> BenchSpec:
    return BenchSpec(
        batch=batch,
        seq=cfg.bench_seq,
        dims=_dims(result),
        min_samples=cfg.bench_min_samples,
        min_seconds=cfg.bench_min_seconds,
        rounds=cfg.bench_rounds,
    )


def short_spec(result: OptimizeResult, cfg: OptimizeConfig, batch: int) -> BenchSpec:
    """A third of the full measurement in as many rounds, for screening and the session
    search (whose decisions use per-round ratios)."""
    return BenchSpec(
        batch=batch,
        seq=cfg.bench_seq,
        dims=_dims(result),
        min_samples=max(5, cfg.bench_min_samples // 3),
        min_seconds=cfg.bench_min_seconds / 3,
        rounds=cfg.bench_rounds,
    )


def bench_variants(
    result: OptimizeResult,
    cfg: OptimizeConfig,
    target: Target,
    log: Callable[[str], None],
    names: Sequence[str] | None = None,
    on_event: Callable[[Event], None] | None = None,
) -> dict[str, list]:
    """The ok variants (``names``, default all) on ``target`` at each batch size, interleaved,
    in worker processes; ``on_event`` hears each round (BenchRound)."""
    models = {
        v.name: str(v.path)
        for v in result.variants
        if v.ok and v.path is not None and (names is None or v.name in names)
    }
    per_variant: dict[str, list] = {name: [] for name in models}
    for batch in cfg.bench_batches:
        log(f"bench: {len(models)} variants on {target.describe()}, batch {batch}")
        res = bench_models(
            models,
            target,
            spec_of(result, cfg, batch),
            log=log,
            timeout_s=cfg.worker_timeout_s,
            on_event=on_event,
        )
        for name, r in res.items():
            per_variant[name].append(r)
            if not r.valid:
                log(f"bench: {name} invalid: {'; '.join(r.invalid)}")
    return per_variant


def candidates(
    result: OptimizeResult,
    bench: Mapping[str, list],
    metric: str,
    screened_out: Mapping[str, str] | None = None,
) -> list[Candidate]:
    out = []
    for v in result.variants:
        first = (bench.get(v.name) or [None])[0]
        out.append(
            Candidate(
                id=v.id,
                name=v.name,
                status=v.status,
                reason=v.reason,
                latency_ms=first.stats.percentile(metric) if first and first.stats else None,
                bench_valid=first.valid if first else True,
                bench_reason="; ".join(first.invalid) if first else "",
                mean_cosine=_cosine(v),
                min_cosine=_cosine(v, "min_cosine"),
                screened_out=(screened_out or {}).get(v.name, ""),
                accuracy_drop=v.metrics.get("accuracy_drop"),
                size_mb=v.metrics["size_bytes"] / 1e6 if v.metrics.get("size_bytes") else None,
            )
        )
    return out


def _cosine(v, key: str = "mean_cosine") -> float | None:
    cos = (v.parity or {}).get(key)
    return 1.0 if cos is None and v.stage == "input" else cos  # the input is the reference


def write_best(out: Path, model_path: Path) -> Path:
    """Copy the winner to ``out/best.onnx`` atomically, its external data as best.onnx.data."""
    final = out / BEST
    data = model_path.with_name(EXTERNAL_DATA_FILE)
    if data.exists():
        import onnx
        from onnx.external_data_helper import _get_all_tensors, uses_external_data

        # the weights are copied byte for byte; only the graph's pointers to them are renamed
        model = onnx.load(str(model_path), load_external_data=False)
        for t in _get_all_tensors(model):
            if uses_external_data(t):
                for entry in t.external_data:
                    if entry.key == "location":
                        entry.value = BEST + ".data"
        staging = Path(tempfile.mkdtemp(prefix=TMP_PREFIX + "best.", dir=out))
        try:
            shutil.copyfile(data, staging / (BEST + ".data"))
            onnx.save_model(model, str(staging / BEST))
            final.unlink(missing_ok=True)  # never a best.onnx pointing at the wrong data
            os.replace(staging / (BEST + ".data"), out / (BEST + ".data"))
            os.replace(staging / BEST, final)  # the model last: it marks the pair finished
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return final
    with atomic_path(final) as tmp:
        shutil.copyfile(model_path, tmp)
    (out / (BEST + ".data")).unlink(missing_ok=True)
    return final


def write_session(out: Path, target: Target, tuning: Mapping) -> Path:
    """``best.session.json``: how to create the session that gives the measured numbers."""
    path = out / SESSION_FILE
    write_json(
        path,
        {
            "schema": "deployopt.session/1",
            "model": BEST,
            "execution_provider": target.ep,
            "intra_op_num_threads": target.threads,
            "graph_optimization": target.graph_optimization,
            "session_config": tuning["session_config"],
            "measured_p50_ms": tuning["p50_ms"],
            "chosen": tuning["chosen"],
            "variant": tuning.get("model"),
        },
    )
    return path


def screen(
    result: OptimizeResult,
    cfg: OptimizeConfig,
    target: Target,
    constraints: Constraints,
    log: Callable[[str], None],
    on_event: Callable[[Event], None] | None = None,
) -> tuple[list[str], dict[str, str]]:
    """A short interleaved run of every proved variant; the fastest few that meet the accuracy
    and size constraints (``SCREEN_KEEP`` by search effort) go on to the full measurement, with
    the input graph as the reference. Returns (names to measure in full, screened-out reasons);
    fills ``result.screening`` and ``result.funnel``. Skipped (all measured in full) when
    ``constraints.prefer`` is "smallest"."""
    from deployopt.candidates import SCREEN_KEEP

    ok = [v for v in result.variants if v.ok and v.path is not None]
    keep = SCREEN_KEEP[cfg.search]
    result.funnel.update(candidates=len(result.variants), parity_passed=len(ok))
    # prefer=smallest: no screening. Keeping the few fastest would drop the smallest; keeping
    # the few smallest instead could drop the smallest one that meets --max-latency-ms, which
    # only the full measurement decides. Measuring all in full is simple and always right.
    if keep == 0 or len(ok) <= keep + 1 or constraints.prefer == "smallest":
        result.funnel.update(screened=0, measured=len(ok))
        return [v.name for v in ok], {}
    log(f"screen: {len(ok)} variants, short interleaved run")
    res = bench_models(
        {v.name: str(v.path) for v in ok},
        target,
        short_spec(result, cfg, cfg.bench_batches[0]),
        log=log,
        timeout_s=cfg.worker_timeout_s,
        on_event=on_event,
    )
    result.screening = res
    pre = choose(
        candidates(result, {k: [r] for k, r in res.items()}, cfg.metric),
        replace(constraints, max_latency_ms=None),
    )
    top = [c.name for c in pre.ranked[:keep]]
    base = [v.name for v in ok if v.stage in ("export", "input")]
    full = list(dict.fromkeys(base + top))
    limit = pre.ranked[len(top) - 1].latency_ms if top else None
    out = {}
    for name, r in res.items():
        if name in full or name in pre.rejected:
            continue
        p = f"{r.stats.percentile(cfg.metric):.3g} ms" if r.valid and r.stats else "invalid"
        out[name] = (
            f"screening {cfg.metric} {p}; only the {keep} fastest qualifying "
            + (f"(<= {limit:.3g} ms) " if limit is not None else "")
            + "were measured in full"
        )
    result.funnel.update(screened=len(ok), measured=len(full))
    log(f"screen: {len(full)} of {len(ok)} go on to the full measurement: {', '.join(full)}")
    return full, out


def tune_sessions(
    result: OptimizeResult,
    cfg: OptimizeConfig,
    target: Target,
    log: Callable[[str], None],
    on_event: Callable[[Event], None] | None = None,
) -> tuple[str, Target, dict] | None:
    """Search session settings for the winner and its close runners-up, then measure each
    model under its best setting (and the winner under the target's) in one interleaved run.
    With ``cfg.prefer == "smallest"`` only the winner is searched: a faster runner-up is a
    larger model and must not replace it. Returns (model to ship, its tuned target, the
    record for the report), or None; ``on_event`` hears the final run's rounds."""
    from deployopt.candidates import SESSION_MODELS
    from deployopt.hardware import detect_cpu
    from deployopt.tuning import (
        SESSION_MIN_GAIN,
        describe,
        is_cpu,
        pick_paired,
        search_sessions,
    )

    ch = result.choice
    if ch is None or ch.winner is None or not is_cpu(target):
        return None
    w = ch.winner
    models = [
        c.name
        for c in ch.ranked[: SESSION_MODELS[cfg.search]]
        if c.latency_ms <= w.latency_ms * (1 + RUNNER_UP_WITHIN)
    ]
    if cfg.prefer == "smallest":
        models = [w.name]
    paths = {m: str(result.by_name(m).path) for m in models}
    log(f"session: searching settings for {', '.join(models)}")
    layernorm = {m: _add_feeds_layernorm(Path(p)) for m, p in paths.items()}
    found = search_sessions(
        paths,
        target,
        short_spec(result, cfg, cfg.bench_batches[0]),
        detect_cpu().cores,
        cfg.search,
        layernorm,
        log,
        cfg.worker_timeout_s,
    )
    final = {f"{m} | tuned": m for m in models if m != w.name or found.tuned[m] != target}
    final[f"{w.name} | default"] = w.name
    targets = {k: found.tuned[m] for k, m in final.items()}
    targets[f"{w.name} | default"] = target
    log(f"session: final interleaved run of {len(final)} model and setting pairs")
    res = bench_models(
        {k: paths[m] for k, m in final.items()},
        target,
        spec_of(result, cfg, cfg.bench_batches[0]),
        log=log,
        timeout_s=cfg.worker_timeout_s,
        targets=targets,
        on_event=on_event,
    )
    p50 = {k: r.stats.percentile(cfg.metric) for k, r in res.items() if r.valid and r.stats}
    baseline = f"{w.name} | default"
    if baseline not in p50:
        return None
    # the final run decides, by the same rule: a tuned setting (or a runner-up under its own)
    # must beat the winner under the target's settings clearly, round by round
    best, ratios = pick_paired(res, baseline)
    model, tuned = final[best], targets[best]
    label = describe(tuned, target)
    measured = {"default": p50[baseline]}
    if best != baseline:
        measured[label if model == w.name else f"{model}: {label}"] = p50[best]
    record = {
        "chosen": label,
        "model": model,
        "session_config": dict(tuned.session_config),
        "threads": tuned.threads,
        "graph_optimization": tuned.graph_optimization,
        "p50_ms": measured,
        "metric": cfg.metric,
        "final_run_ms": p50,
        "final_run_ratio": ratios,
        "steps": found.steps,
        "searched": models,
        "min_gain": SESSION_MIN_GAIN,
    }
    if model != w.name:
        record["replaced"] = (
            f"{model} under {label} ({p50[best]:.3g} ms) beat {w.name} "
            f"({p50[baseline]:.3g} ms under the target's settings"
            + (
                f", {p50[f'{w.name} | tuned']:.3g} ms under its best"
                if f"{w.name} | tuned" in p50
                else ""
            )
            + ")"
        )
        log(f"session: {record['replaced']}")
    return model, tuned, record


def _add_feeds_layernorm(path: Path) -> bool:
    """Whether onnxruntime's SkipLayerNormFusion has something to fuse in the graph."""
    import onnx

    nodes = onnx.load(str(path), load_external_data=False).graph.node
    adds = {o for n in nodes if n.op_type == "Add" for o in n.output}
    return any(n.op_type == "LayerNormalization" and n.input[0] in adds for n in nodes)


def ship(
    result: OptimizeResult,
    cfg: OptimizeConfig,
    log: Callable[[str], None],
    on_event: Callable[[Event], None] | None = None,
) -> None:
    """Screen, benchmark, choose, tune the session, copy the winner and write the reports.
    ``on_event`` hears a BenchRound per benchmark round and, last, Shipped (the winner's name,
    or None when nothing was shipped)."""
    from deployopt import report

    target = None
    constraints = constraints_of(cfg)
    if cfg.bench and any(v.ok for v in result.variants):
        target = target_of(cfg)
        full, screened_out = screen(result, cfg, target, constraints, log, on_event)
        result.bench = bench_variants(result, cfg, target, log, names=full, on_event=on_event)
        cands = candidates(result, result.bench, cfg.metric, screened_out)
        result.choice = choose(cands, constraints)
        (result.out_dir / SESSION_FILE).unlink(missing_ok=True)  # never a stale one
        result.failure = failure(result, cfg)  # the exit code is decided before shipping
        if result.failure is not None:  # the report and the table show nothing chosen
            result.choice = replace(result.choice, winner=None)
        if result.choice.winner is not None:
            tuning = tune_sessions(result, cfg, target, log, on_event) if cfg.tune_session else None
            if tuning is not None:
                model, tuned, record = tuning
                if model != result.choice.winner.name:
                    result.choice = _promote(result.choice, model)
                result.funnel["session_searched"] = len(record["searched"])
            winner = result.by_name(result.choice.winner.name)
            result.best = write_best(result.out_dir, winner.path)
            log(f"chosen: {winner.name} -> {result.best}")
            if tuning is not None:
                result.session = record
                write_session(result.out_dir, tuned, record)
                log(f"session: {record['chosen']} recommended -> {SESSION_FILE}")
    else:
        result.failure = failure(result, cfg)
    # a failing run (no winner among the benchmarked ones included) leaves no best.onnx,
    # not even a stale one
    if result.failure is not None:
        for name in (BEST, BEST + ".data", SESSION_FILE):
            (result.out_dir / name).unlink(missing_ok=True)
    doc = report.build(
        source=str(result.meta.get("source", "")),
        task=str(result.meta.get("task", "")),
        config=cfg.model_dump(mode="json"),
        environment=fingerprint(target),
        target=target.model_dump() if target else None,
        bench_spec=asdict(spec_of(result, cfg, cfg.bench_batches[0])) if target else None,
        constraints=asdict(constraints) if target else None,
        data=result.meta.get("data", {}),
        variants=[
            {**manifest_entry(v, result.out_dir), "metrics": dict(v.metrics)}
            for v in result.variants
        ],
        bench={k: [r.to_json() for r in rs] for k, rs in result.bench.items()},
        choice=_choice_json(
            result.choice, cfg.metric, result.best, result.out_dir, result.session, cfg.prefer
        ),
        model_lineage=result.meta.get("lineage", []),
        search={
            "effort": cfg.search,
            "cpu": result.meta.get("cpu"),
            "candidates": result.meta.get("candidates", []),
            "funnel": dict(result.funnel),
            "screening": {k: r.to_json() for k, r in result.screening.items()},
        },
        warnings=result.meta.get("warnings", []),
    )
    result.reports = report.write_all(result.out_dir, doc)
    log(f"report: {result.reports['md']}")
    if on_event is not None:
        winner = result.choice.winner if result.choice is not None else None
        on_event(Shipped(winner.name if winner is not None and result.best else None))


def failure(result: OptimizeResult, cfg: OptimizeConfig):
    """The :class:`~deployopt.errors.NoViableVariantError` the run ends with, or None; pure, and
    decided before anything is shipped (a failing exit code never leaves a ``best.onnx``):
    variants were asked for and none but the input passed its checks, or none meets the
    constraints."""
    from deployopt.errors import NoViableVariantError

    built = [v for v in result.variants if v.stage not in ("input", "export")]
    if cfg.variants and not any(v.ok for v in built):
        return NoViableVariantError(
            "no variant passed its checks: "
            + "; ".join(f"{v.name}: {v.status} ({v.reason})" for v in built)
            if built
            else "no variant was built",
            hint=f"each variant's reason is in {result.manifest}; nothing was shipped "
            "(the input model is the only one that ran)",
        )
    choice = result.choice
    if choice is not None and choice.winner is None:
        return NoViableVariantError(
            "no variant meets the constraints: "
            + "; ".join(f"{k}: {why}" for k, why in choice.rejected.items()),
            hint="relax --min-cosine/--max-size-mb/--max-latency-ms, or see "
            + str(result.out_dir / "report.md"),
        )
    return None


def _promote(choice: Choice, name: str) -> Choice:
    """``choice`` with ``name`` (a ranked candidate) as the winner and first in the ranking."""
    first = next(c for c in choice.ranked if c.name == name)
    ranked = (first, *(c for c in choice.ranked if c.name != name))
    return replace(choice, winner=first, ranked=ranked)


def _choice_json(
    choice: Choice | None,
    metric: str,
    best: Path | None,
    out: Path,
    session: dict | None,
    prefer: str = "fastest",
):
    if choice is None:
        return None
    return {
        "session": session,
        "winner": choice.winner.name if choice.winner else None,
        "ranked": [c.name for c in choice.ranked],
        "rejected": dict(choice.rejected),
        "pareto": list(choice.pareto),
        "metric": metric,
        "prefer": prefer,  # the rule that ranked: fastest on metric, or smallest
        "best_path": str(best.relative_to(out)) if best else None,
    }
