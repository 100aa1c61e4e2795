"""After the variants are built and proved: benchmark them, choose one, write it and the report.

``OUT/best.onnx`` (with ``best.onnx.data`` when the weights are external) is the chosen variant;
``OUT/best.session.json`` the onnxruntime session settings it was measured fastest with;
``OUT/report.{json,md,html}`` say why.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import asdict
from pathlib import Path

from deployopt.benchmark import BenchSpec, bench_models, fingerprint
from deployopt.config import OptimizeConfig
from deployopt.presets import Target, resolve_target
from deployopt.run import OptimizeResult, manifest_entry
from deployopt.select import Candidate, Choice, Constraints, choose
from deployopt.stages.base import EXTERNAL_DATA_FILE
from deployopt.workspace import TMP_PREFIX, atomic_path, write_json

BEST = "best.onnx"
SESSION_FILE = "best.session.json"
# Session settings tried for the winner on the CPU EP, besides the target's own. onnxruntime
# fuses every residual Add + LayerNormalization into SkipLayerNormalization when it creates a
# session; that CPU kernel is a scalar loop, measured 3x slower than the two ops it replaces
# (onnxruntime 1.32, 1 x 128 x 384: 216 vs 68 us), so a transformer may run faster without it.
SESSION_CANDIDATES: dict[str, dict[str, str]] = {
    "no-skip-layernorm-fusion": {
        "optimization.disable_specified_optimizers": "SkipLayerNormFusion"
    },
}
SESSION_MIN_GAIN = 0.03  # a setting must beat the default p50 by this much to be recommended


def target_of(cfg: OptimizeConfig) -> Target:
    return resolve_target(cfg.target, cfg.ep, cfg.threads, cfg.config_file)


def constraints_of(cfg: OptimizeConfig) -> Constraints:
    return Constraints(
        min_cosine=cfg.min_cosine,
        max_accuracy_drop=cfg.max_accuracy_drop,
        max_size_mb=cfg.max_size_mb,
        max_latency_ms=cfg.max_latency_ms,
        metric=cfg.metric,
    )


def spec_of(cfg: OptimizeConfig, batch: int) -> BenchSpec:
    return BenchSpec(
        batch=batch,
        seq=cfg.bench_seq,
        min_samples=cfg.bench_min_samples,
        min_seconds=cfg.bench_min_seconds,
        rounds=cfg.bench_rounds,
    )


def bench_variants(
    result: OptimizeResult, cfg: OptimizeConfig, target: Target, log: Callable[[str], None]
) -> dict[str, list]:
    """Every ok variant on ``target`` at each batch size, interleaved, in worker processes."""
    models = {v.name: str(v.path) for v in result.variants if v.ok and v.path is not None}
    per_variant: dict[str, list] = {name: [] for name in models}
    for batch in cfg.bench_batches:
        log(f"bench: {len(models)} variants on {target.describe()}, batch {batch}")
        res = bench_models(
            models, target, spec_of(cfg, batch), log=log, timeout_s=cfg.worker_timeout_s
        )
        for name, r in res.items():
            per_variant[name].append(r)
            if not r.valid:
                log(f"bench: {name} invalid: {'; '.join(r.invalid)}")
    return per_variant


def candidates(result: OptimizeResult, bench: dict[str, list], metric: str) -> list[Candidate]:
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
                accuracy_drop=v.metrics.get("accuracy_drop"),
                size_mb=v.metrics["size_bytes"] / 1e6 if v.metrics.get("size_bytes") else None,
            )
        )
    return out


def _cosine(v) -> float | None:
    cos = (v.parity or {}).get("mean_cosine")
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


def pick_session(p50_ms: Mapping[str, float], min_gain: float = SESSION_MIN_GAIN) -> str:
    """The setting to recommend: ``"default"`` unless another one's p50 is at least
    ``min_gain`` lower (within that, measurement noise could have picked it).

    >>> pick_session({"default": 10.0, "b": 9.8}), pick_session({"default": 10.0, "b": 9.0})
    ('default', 'b')
    """
    best = min(p50_ms, key=p50_ms.__getitem__)
    return best if p50_ms[best] <= p50_ms["default"] * (1 - min_gain) else "default"


def session_targets(target: Target) -> dict[str, Target]:
    """The target itself (``default``) and each candidate setting added to it. Only for the CPU
    EP, and never over a setting the target already makes."""
    from deployopt.runtime.session import EP_ALIASES

    out = {"default": target}
    if EP_ALIASES.get(target.ep.lower(), target.ep) != "CPUExecutionProvider":
        return out
    for name, entries in SESSION_CANDIDATES.items():
        if not set(entries) & set(target.session_config):
            cfg = {**target.session_config, **entries}
            out[name] = target.model_copy(update={"session_config": cfg})
    return out


def tune_session(
    model: Path, target: Target, cfg: OptimizeConfig, log: Callable[[str], None]
) -> dict | None:
    """Measure the chosen model under each session setting, interleaved, and recommend one."""
    targets = session_targets(target)
    if len(targets) == 1:
        return None
    log(f"bench: the chosen model under {len(targets)} session settings")
    res = bench_models(
        {n: str(model) for n in targets},
        target,
        spec_of(cfg, cfg.bench_batches[0]),
        log=log,
        timeout_s=cfg.worker_timeout_s,
        targets=targets,
    )
    p50 = {n: r.stats.p50_ms for n, r in res.items() if r.valid and r.stats is not None}
    if "default" not in p50:
        return None
    chosen = pick_session(p50)
    return {
        "chosen": chosen,
        "session_config": dict(targets[chosen].session_config),
        "p50_ms": p50,
        "min_gain": SESSION_MIN_GAIN,
    }


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
        },
    )
    return path


def ship(result: OptimizeResult, cfg: OptimizeConfig, log: Callable[[str], None]) -> None:
    """Benchmark, choose, copy the winner and write the reports into ``result``."""
    from deployopt import report

    target = None
    constraints = constraints_of(cfg)
    if cfg.bench and any(v.ok for v in result.variants):
        target = target_of(cfg)
        result.bench = bench_variants(result, cfg, target, log)
        result.choice = choose(candidates(result, result.bench, cfg.metric), constraints)
        best = result.out_dir / BEST
        (result.out_dir / SESSION_FILE).unlink(missing_ok=True)  # never a stale one
        if result.choice.winner is not None:
            winner = result.by_name(result.choice.winner.name)
            result.best = write_best(result.out_dir, winner.path)
            log(f"chosen: {winner.name} -> {result.best}")
            tuning = tune_session(winner.path, target, cfg, log) if cfg.tune_session else None
            if tuning is not None:
                result.session = tuning
                write_session(result.out_dir, target, tuning)
                log(f"session: {tuning['chosen']} recommended -> {SESSION_FILE}")
        else:
            best.unlink(missing_ok=True)
            (result.out_dir / (BEST + ".data")).unlink(missing_ok=True)
    doc = report.build(
        source=str(result.meta.get("source", "")),
        task=str(result.meta.get("task", "")),
        config=cfg.model_dump(mode="json"),
        environment=fingerprint(target),
        target=target.model_dump() if target else None,
        bench_spec=asdict(spec_of(cfg, cfg.bench_batches[0])) if target else None,
        constraints=asdict(constraints) if target else None,
        data=result.meta.get("data", {}),
        variants=[
            {
                **manifest_entry(v, result.out_dir),
                "params": dict(v.params),
                "metrics": dict(v.metrics),
            }
            for v in result.variants
        ],
        bench={k: [r.to_json() for r in rs] for k, rs in result.bench.items()},
        choice=_choice_json(result.choice, cfg.metric, result.best, result.out_dir, result.session),
        model_lineage=result.meta.get("lineage", []),
    )
    result.reports = report.write_all(result.out_dir, doc)
    log(f"report: {result.reports['md']}")


def _choice_json(
    choice: Choice | None, metric: str, best: Path | None, out: Path, session: dict | None
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
        "best_path": str(best.relative_to(out)) if best else None,
    }
