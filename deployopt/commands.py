"""Each command's options applied through the API: the one mapping from an option model
(deployopt.config, deployopt.options) to the function that does the work. The CLI commands and
the recipe runner (deployopt.pipeline) both call these, so a flag and a recipe key can never
mean two things."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from deployopt.config import OptimizeConfig
from deployopt.options import (
    SIZE_KEYS,
    BenchOptions,
    DistillOptions,
    GateOptions,
    PruneOptions,
    SourceOptions,
)

Log = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


def train_config(opts: DistillOptions | PruneOptions):
    """The training loop's settings from distill or prune options."""
    from deployopt.torchside.train import TrainConfig

    if isinstance(opts, DistillOptions):
        return TrainConfig(
            epochs=opts.epochs, batch_size=opts.batch_size, lr=opts.lr,
            weight_decay=opts.weight_decay, warmup_ratio=opts.warmup,
            max_grad_norm=opts.max_grad_norm, patience=opts.patience, seed=opts.seed,
            checkpoint_every=opts.checkpoint_every, precision=opts.precision,
            dropout=opts.dropout,
        )  # fmt: skip
    return TrainConfig(
        epochs=max(1, opts.recover_epochs), batch_size=opts.batch_size, lr=opts.lr,
        seed=opts.seed, patience=max(2, opts.recover_epochs), precision=opts.precision,
    )  # fmt: skip


def distill(model: Any, src: SourceOptions, opts: DistillOptions, out: Path, log: Log = _quiet):
    """``deployopt distill``: the student goes to ``out/student``."""
    from deployopt.api import distill as api_distill

    size = {SIZE_KEYS[k]: v for k, v in opts.student_size.items()} if opts.student_size else None
    return api_distill(
        model, opts.data, out,
        student_layers=list(opts.student_layers) if opts.student_layers else None,
        student=opts.student, student_size=size, losses=opts.loss, eval_data=opts.eval_data,
        labels_column=opts.labels_column, text_column=opts.text_column,
        input_shape=dict(src.input_shape), max_examples=opts.max_examples,
        max_length=opts.max_length, windows=opts.windows,
        freeze_embeddings=opts.freeze_embeddings, temperature=opts.temperature,
        alpha=opts.alpha, train=train_config(opts), device=opts.device, log=log,
    )  # fmt: skip


def prune(model: Any, src: SourceOptions, opts: PruneOptions, out: Path, log: Log = _quiet,
          weights: Path | None = None):  # fmt: skip
    """``deployopt prune``: the pruned model folder is ``out``."""
    from deployopt.api import prune as api_prune

    return api_prune(
        model, out, heads=opts.heads, ffn=opts.ffn,
        drop_layers=list(opts.drop_layers) if opts.drop_layers else None,
        channels=opts.channels, unstructured=opts.unstructured,
        target_params=opts.target_params, target_latency=opts.target_latency,
        importance=opts.importance, scope=opts.scope, data=opts.data,
        labels_column=opts.labels_column, text_column=opts.text_column,
        input_shape=dict(src.input_shape), weights=weights, max_examples=opts.max_examples,
        importance_examples=opts.importance_examples, max_length=opts.max_length,
        steps=opts.steps, recover_epochs=opts.recover_epochs, recover_kd=opts.kd,
        train=train_config(opts), device=opts.device, log=log,
    )  # fmt: skip


def optimize(model: Any, src: SourceOptions, cfg: OptimizeConfig, out: Path, log: Log = _quiet,
             weights: Path | None = None, force: bool = False, on_event=None):  # fmt: skip
    """``deployopt optimize``: variants, choice and reports in ``out``. Raises
    NoViableVariantError (with ``.result``) when nothing qualifies."""
    from deployopt.api import optimize as api_optimize

    kw: dict[str, Any] = {"on_event": on_event} if on_event is not None else {}
    return api_optimize(
        model, out, input_shapes=dict(src.input_shape), weights=weights, force=force, log=log,
        **kw, **cfg.model_dump(),
    )  # fmt: skip


def bench(models: list[Any], opts: BenchOptions, log: Log = _quiet):
    """``deployopt bench``: one result per model and batch size."""
    from deployopt.api import bench as api_bench

    return api_bench(
        [*models, *opts.compare], target=opts.target, ep=opts.ep, threads=opts.threads,
        config=opts.config, session=opts.session, batch=list(opts.batch), seq=opts.seq,
        shapes=dict(opts.shape), min_samples=opts.min_samples, min_seconds=opts.min_seconds,
        rounds=opts.rounds, include_copies=opts.include_copies, timeout_s=opts.timeout,
        history=False if opts.no_history else opts.history, log=log,
        targets=list(opts.targets) or None, cluster=opts.cluster,
        schedule_timeout_s=opts.schedule_timeout,
    )  # fmt: skip


def bench_document(results) -> dict:
    """The JSON a bench run writes (``--json``, and ``bench.json`` of a recipe's stage)."""
    from deployopt.display import target_of

    return {"schema": "deployopt.bench/1", "target": target_of(results),
            "results": [r.to_json() for r in results]}  # fmt: skip


def budget_file(opts: GateOptions, folder: Path) -> Path | None:
    """The budget file of gate options: its path, or inline tables written to ``folder``."""
    if opts.budget is None or isinstance(opts.budget, Path):
        return opts.budget
    import tomli_w

    from deployopt.workspace import write_text

    path = folder / "budgets.toml"
    rows = [b.model_dump(exclude_none=True, exclude_defaults=False) for b in opts.budget]
    write_text(path, tomli_w.dumps({"budgets": rows}))
    return path


def gate(model: Any, opts: GateOptions, folder: Path | None = None, log: Log = _quiet):
    """``deployopt gate``: a GateResult (its verdict's exit code is the CLI's)."""
    from deployopt.api import gate as api_gate

    return api_gate(
        model, report=opts.report, variant=opts.variant,
        budget=budget_file(opts, folder or Path.cwd()), limits=opts.limits(),
        target=opts.target, config=opts.config, session=opts.session, batch=opts.batch,
        seq=opts.seq, reference=opts.reference, baseline=opts.baseline,
        max_slowdown=opts.max_slowdown, processes=opts.processes,
        min_samples=opts.min_samples, min_seconds=opts.min_seconds, rounds=opts.rounds,
        timeout_s=opts.timeout, name=opts.name,
        history=False if opts.no_history else opts.history, log=log,
        cluster=opts.cluster, schedule_timeout_s=opts.schedule_timeout,
        allow_version_mismatch=opts.allow_version_mismatch,
    )  # fmt: skip


def write_gate_outputs(result, opts: GateOptions, base: Path | None = None) -> list[Path]:
    """The JUnit, JSON and Markdown files gate options ask for (``base``: folder of relative
    paths)."""
    from deployopt import judge
    from deployopt.workspace import write_json, write_text

    written = []
    for path, text in ((opts.junit, lambda: judge.junit_xml(result)),
                       (opts.markdown, lambda: judge.markdown(result))):  # fmt: skip
        if path is not None:
            p = path if base is None or path.is_absolute() else base / path
            write_text(p, text())
            written.append(p)
    if opts.json_out is not None:
        p = opts.json_out if base is None or opts.json_out.is_absolute() else base / opts.json_out
        write_json(p, result.to_json())
        written.append(p)
    return written
