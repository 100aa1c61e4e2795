"""The Python API: one function per CLI command, same records."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from deployopt.benchmark import BenchResult
from deployopt.config import make_config
from deployopt.events import Event
from deployopt.runner import OptimizeResult, Runner
from deployopt.sources import load_source


def optimize(
    source: Any,
    out: str | Path,
    *,
    variants: Sequence[str] | None = None,
    calibration: str | Path | None = None,
    evaluation: str | Path | None = None,
    opset: int | None = None,
    input_shapes: dict[str, Sequence[int]] | None = None,
    weights: str | Path | None = None,
    trust_remote_code: bool = False,
    pooling: str | None = None,
    threads: int | None = None,
    force: bool = False,
    log: Callable[[str], None] | None = None,
    cpu: Any = None,
    on_event: Callable[[Event], None] | None = None,
    **options: Any,
) -> OptimizeResult:
    """Export ``source`` to ONNX and build validated variants in ``out``.

    ``source`` is a Hugging Face folder, an ``.onnx`` file, ``"pkg.mod:factory"``, ``"minilm"``
    or a ``torch.nn.Module`` (then ``input_shapes={"x": (1, 3, 32, 32)}`` is required).

    >>> result = optimize("minilm", "out", variants=["fuse", "int8-dynamic"])  # doctest: +SKIP
    >>> result.by_name("int8-dynamic").parity["mean_cosine"] >= 0.99  # doctest: +SKIP
    True

    ``cpu``: a :class:`~deployopt.hardware.CpuDescriptor` to derive the quantization
    candidates for (default: this machine's); ``search="quick"|"default"|"exhaustive"``
    sets the candidate space and measurement effort.

    ``prefer="smallest"`` ships the smallest qualifying variant instead of the fastest.

    ``on_event`` hears the run's progress as :mod:`deployopt.events` records, in order:
    VariantStarted/VariantFinished for each variant (status ok, failed, skipped or reused),
    VariantsPlanned (every variant name, in build order) once the candidate plan is known,
    BenchRound after each benchmark round, and Shipped (the winner, or None) last.

    Raises :class:`~deployopt.errors.NoViableVariantError` when the run ships nothing (no
    variant passed its checks, or none meets the constraints), as the CLI exits 6; it is
    raised after the manifest and the reports are written, with the
    :class:`~deployopt.runner.OptimizeResult` as its ``result`` (variants, ``choice.rejected``
    with each reason, ``reports``). It is decided before ``best.onnx`` is written, so a failed
    run never leaves one behind. The output folder is checked before any work (a file, not
    writable, overlapping the input).

    >>> try:  # doctest: +SKIP
    ...     optimize("minilm", "out", max_size_mb=1)
    ... except NoViableVariantError as e:
    ...     print(e.result.choice.rejected)
    """
    cfg = make_config(
        variants=tuple(variants) if variants is not None else None,
        calibration=Path(calibration) if calibration else None,
        evaluation=Path(evaluation) if evaluation else None,
        opset=opset,
        trust_remote_code=trust_remote_code,
        pooling=pooling,
        threads=threads,
        **options,
    )
    if cfg.bench:  # a target that cannot run here fails before any variant is built
        from deployopt.runtime.session import resolve_provider
        from deployopt.ship import target_of

        resolve_provider(target_of(cfg).ep)
    from deployopt.workspace import check_output_dir, disk_error

    check_output_dir(Path(out), _source_path(source))  # a file, read-only, overlapping input
    shapes = {k: tuple(v) for k, v in (input_shapes or {}).items()}
    src = load_source(
        source,
        input_shapes=shapes,
        weights=Path(weights) if weights else None,
        trust_remote_code=cfg.trust_remote_code,
        pooling=cfg.pooling,
    )
    log = log or (lambda s: None)
    from deployopt.ship import ship

    try:
        runner = Runner(src, Path(out), cfg, log=log, force=force, cpu=cpu, on_event=on_event)
        result = runner.run()
        ship(result, cfg, log, on_event)  # decides result.failure before anything is shipped
    except OSError as e:  # a full disk or read-only mount mid-run: stop, name the path
        err = disk_error(e, Path(out))
        if err is None:
            raise
        raise err from e
    if result.failure is not None:  # the reports say why; the caller gets them on the error
        result.failure.result = result
        raise result.failure
    return result


def _source_path(source: Any) -> Path | None:
    """The file or folder ``source`` reads from, when it is one (for the output-folder checks)."""
    from deployopt.errors import InputModelError
    from deployopt.sources import BUNDLED, bundled_path

    if isinstance(source, (str, Path)):
        if str(source) in BUNDLED:
            try:
                return bundled_path(str(source))
            except InputModelError:  # not installed: load_source says so, naming the package
                return None
        p = Path(source)
        return p if p.exists() else None
    return None


def bench(
    models: str | Path | Sequence[str | Path],
    *,
    target: str | None = None,
    ep: str | None = None,
    threads: int | None = None,
    config: str | Path | None = None,
    session: str | Path | None = None,
    batch: Sequence[int] = (1,),
    seq: int = 128,
    shapes: dict[str, Sequence[int]] | None = None,
    min_samples: int = 60,
    min_seconds: float = 3.0,
    rounds: int = 3,
    include_copies: bool = False,
    timeout_s: float = 600.0,
    history: str | Path | bool | None = None,
    log: Callable[[str], None] | None = None,
    targets: Sequence[str] | None = None,
    cluster: str | None = None,
    schedule_timeout_s: float = 60.0,
) -> list[BenchResult]:
    """Measure one or more ``.onnx`` models on a target, interleaved, each in its own worker.

    A model that is an ``optimize`` output folder is measured as its ``best.onnx`` under its
    ``best.session.json`` (when there is one); ``session`` (a session file) applies to every
    model instead. A session file sets the target's threads, graph optimization and session
    config; the results' ``env`` records them and the file (``session_file``).

    Returns one :class:`~deployopt.benchmark.BenchResult` per model and batch size, in that order.
    A result whose provider fell back, whose worker crashed or hung is returned with
    ``valid == False`` and the reason in ``invalid``; nothing is raised for it. Every result
    is appended to the history database (``history``: a path, ``None`` for the default
    ``.deployopt/history.sqlite`` or ``$DEPLOYOPT_HISTORY``, ``False`` for none).

    >>> [r.stats.p50_ms for r in bench("model.onnx", batch=[1, 8])]  # doctest: +SKIP
    >>> bench("out", min_samples=20)[0].env["session_file"]  # doctest: +SKIP
    'out/best.session.json'

    ``cluster`` (``"auto"`` or an address) measures on a Ray cluster instead: one task per
    target of ``targets`` (or ``target``) on a node with the target's ``ray_labels``, the
    targets in parallel (deployopt.fleet); results are target by target, each with its node's
    fingerprint in ``env``. A target with no node, or whose node died, gets INVALID results.

    >>> bench(["a.onnx", "b.onnx"], targets=["edge", "x86"], cluster="auto")  # doctest: +SKIP
    """
    from deployopt.benchmark import BenchSpec, bench_models
    from deployopt.errors import UsageError
    from deployopt.presets import apply_session, read_session, resolve_model, resolve_target
    from deployopt.runtime.session import resolve_provider
    from deployopt.sources import read_onnx

    args = [models] if isinstance(models, (str, Path)) else list(models)
    if not args:
        raise UsageError("no model to benchmark")
    if targets and cluster is None:
        raise UsageError(
            "--targets measures on a Ray cluster: add --cluster auto (or HOST:PORT)",
            hint="on this machine, measure one target at a time with --target NAME",
        )
    if targets and target is not None:
        raise UsageError("give --target NAME or --targets A,B, not both")
    resolved = [resolve_model(m, session) for m in args]  # folders: best.onnx + session file
    paths = [m for m, _ in resolved]
    for p in paths:
        read_onnx(p)  # missing, truncated or unsafe files fail here, naming the file
    tgt = resolve_target(target, ep, threads, Path(config) if config else None)
    if include_copies:
        tgt = tgt.model_copy(update={"include_copies": True})
    names = unique_names(paths)
    session_of = {n: f for n, (_, f) in zip(names, resolved) if f is not None}
    settings = {f: read_session(f) for f in dict.fromkeys(session_of.values())}
    for s in settings.values():
        if threads is not None and s.threads != threads:
            raise UsageError(
                f"--threads {threads} and {s.path} ({s.threads or 'all'} threads) disagree",
                hint="drop --threads to measure with the session file's, or pass MODEL.onnx "
                "itself (not its folder) without --session",
            )
    per_model = {n: apply_session(tgt, settings[f]) for n, f in session_of.items()}
    if cluster is None:  # on a cluster the nodes have the providers, not this machine
        resolve_provider(tgt.ep)  # a missing provider is an error listing the available ones
    batches = list(batch)
    if not batches or min(batches) < 1:
        raise UsageError(f"bad batch sizes {batches}", hint="use positive integers, e.g. 1,8,32")
    if min_samples < 1 or min_seconds < 0 or rounds < 1:
        raise UsageError("min_samples and rounds must be >= 1, min_seconds >= 0")
    db = _history(history)  # a bad database fails before anything is measured
    fixed = tuple((k, tuple(int(d) for d in v)) for k, v in (shapes or {}).items())
    specs = [BenchSpec(batch=b, seq=seq, shapes=fixed, min_samples=min_samples,
                       min_seconds=min_seconds, rounds=rounds) for b in batches]  # fmt: skip
    if cluster is not None:
        from deployopt import fleet

        cfg = Path(config) if config else None
        on = [resolve_target(n, None, threads, cfg) for n in targets] if targets else [tgt]
        on = [t.model_copy(update={"include_copies": True}) if include_copies else t for t in on]
        path_of = dict(zip(names, paths))

        def session_file(r: BenchResult) -> BenchResult:
            return _with_session_file(r, session_of.get(r.name))

        def record(rs: list[BenchResult]) -> None:  # each as its target finishes
            for r in map(session_file, rs):
                record_results(db, "bench", path_of[r.name], [r])

        results, _ = fleet.bench(
            path_of, on, specs, cluster=cluster, timeout_s=timeout_s,
            schedule_timeout_s=schedule_timeout_s, on_results=record, log=log or (lambda s: None),
            per_model={t.name: {n: apply_session(t, settings[f]) for n, f in session_of.items()}
                       for t in on},
        )  # fmt: skip
        return [session_file(r) for r in results]
    results: list[BenchResult] = []
    for spec in specs:
        res = bench_models(
            dict(zip(names, map(str, paths))),
            tgt,
            spec,
            log=log or (lambda s: None),
            timeout_s=timeout_s,
            targets=per_model,
        )
        res = {n: _with_session_file(r, session_of.get(n)) for n, r in res.items()}
        results += list(res.values())
        for path, r in zip(paths, res.values()):
            record_results(db, "bench", path, [r])
    return results


def _with_session_file(result: BenchResult, session: Path | None) -> BenchResult:
    """``result`` with the session file it was measured under named in its env."""
    if session is None:
        return result
    from dataclasses import replace

    return replace(result, env={**result.env, "session_file": str(session)})


def unique_names(paths: Sequence[Path]) -> list[str]:
    """Short labels: the file name, or parent/file where names repeat."""
    names = [p.name for p in paths]
    if len(set(names)) == len(names):
        return names
    return [f"{p.parent.name}/{p.name}" if names.count(p.name) > 1 else p.name for p in paths]


def _history(history: str | Path | bool | None):
    """``None``: the default database; ``False``: none; a path: that one."""
    if history is False:
        return None
    from deployopt.history import History

    return History(None if history in (None, True) else history)  # a path or a URL


def record_results(
    history,
    kind: str,
    model: Path,
    results: Sequence[BenchResult],
    verdict: str | None = None,
    name: str | None = None,
) -> None:
    """Append ``results`` of ``model`` to the history database (if any)."""
    if history is None or not results:
        return
    from deployopt.gating import identify
    from deployopt.history import git_commit

    ident = identify(model, name)
    commit = git_commit()
    for r in results:
        history.record(
            kind=kind,
            model_name=ident.name,
            model_path=str(Path(model).resolve()),
            model_sha256=ident.sha256,
            lineage=ident.lineage,
            result=r.to_json(),
            verdict=verdict,
            commit=commit,
        )


def gate(
    model: str | Path | None = None,
    *,
    report: str | Path | None = None,
    variant: str | None = None,
    budget: str | Path | None = None,
    limits: dict[str, float] | None = None,
    target: str | None = None,
    config: str | Path | None = None,
    session: str | Path | None = None,
    batch: int = 1,
    seq: int = 128,
    reference: str | Path | None = None,
    baseline: str | Path | None = None,
    max_slowdown: float = 0.05,
    processes: int = 3,
    min_samples: int = 60,
    min_seconds: float = 3.0,
    rounds: int = 3,
    timeout_s: float = 600.0,
    name: str | None = None,
    history: str | Path | bool | None = None,
    log: Callable[[str], None] | None = None,
    cluster: str | None = None,
    schedule_timeout_s: float = 60.0,
    allow_version_mismatch: bool = False,
):
    """Judge ``model`` (measured now) or a recorded ``report`` against budgets, and/or compare
    ``model`` with a ``baseline`` (.onnx, measured in the same job, or ``"last-pass"`` from the
    history). Returns a :class:`~deployopt.judge.GateResult`; its ``verdict.exit_code`` is what
    the CLI exits with.

    ``limits``: one budget from keyword limits (``p50_ms``, ``p99_ms``, ``min_throughput``,
    ``max_size_mb``, ``min_cosine``, ``min_min_cosine``, ...) on ``target``/``batch``/``seq``.

    ``model`` may be an ``optimize`` output folder: its ``best.onnx`` is measured under its
    ``best.session.json``; ``session`` (a session file) wins over the folder's. The session's
    threads, graph optimization and session config are applied to every budget's target and to
    the ``baseline`` measurement, so both models are measured under the same settings.

    >>> g = gate("best.onnx", limits={"p50_ms": 12}, target="cpu")  # doctest: +SKIP
    >>> g.verdict  # doctest: +SKIP
    <Verdict.PASS: 'PASS'>

    ``cluster`` (``"auto"`` or an address) judges each budget's target on a node of that
    target (its ``ray_labels``), the targets in parallel, into one result with a check per
    (target, limit); a node whose onnxruntime or deployopt version differs from this
    machine's makes its checks INVALID unless ``allow_version_mismatch`` (deployopt.fleet).
    """
    from pydantic import ValidationError

    from deployopt import gating
    from deployopt.benchmark import fingerprint
    from deployopt.config import first_error
    from deployopt.errors import ConfigError, UsageError
    from deployopt.judge import Budget, GateResult, load_budgets, overall
    from deployopt.presets import load_targets, read_session, resolve_model
    from deployopt.sources import read_onnx

    log = log or (lambda s: None)
    if (model is None) == (report is None):
        raise UsageError("give either MODEL.onnx (measured now) or --report REPORT.json")
    if cluster is not None and (report is not None or baseline is not None):
        raise UsageError(
            "--cluster measures budgets on the targets' nodes: not with --report or --baseline",
            hint="judge a report or a baseline comparison on one machine, without --cluster",
        )
    if report is not None and session is not None:
        raise UsageError(
            "--session needs a model measured now, not --report",
            hint="a report's numbers were measured with the settings it records",
        )
    budgets = load_budgets(Path(budget)) if budget else []
    if target is not None:
        budgets = [b for b in budgets if b.target == target]
    if limits:
        try:
            budgets.append(Budget(target=target or "cpu", batch=batch, seq=seq, **limits))
        except ValidationError as e:
            raise ConfigError(first_error(e)) from None
    if not budgets and baseline is None:
        raise UsageError(
            "nothing to judge",
            hint="give --budget FILE, a limit (--p50-ms, --max-size-mb, ...) or --baseline",
        )
    targets = {
        **load_targets(Path(config) if config else None),
        **(load_targets(Path(budget)) if budget else {}),
    }
    db = _history(history)
    if report is not None:
        if baseline is not None:
            raise UsageError("--baseline needs a model measured now, not --report")
        checks, judged, results = gating.judge_report(Path(report), budgets, variant)
        env = next((r.get("env", {}) for r in results), {})
        return GateResult(
            model=f"{report} ({judged})",
            checks=checks,
            verdict=overall(checks),
            environment=dict(env),
            results=results,
            mode="report",
        )

    model, session_file = resolve_model(model, session)
    read_onnx(model)
    if session_file is not None:
        settings = read_session(session_file)
        used = {b.target for b in budgets} | ({target or "cpu"} if baseline is not None else set())
        targets = gating.with_session(targets, used, settings)
        log(f"gate: session settings from {session_file}: {settings.describe()}")
    if cluster is not None:
        return _gate_on_cluster(model, budgets, targets, db, cluster, session_file, name, log,
                                reference=Path(reference) if reference else None,
                                min_samples=min_samples, min_seconds=min_seconds, rounds=rounds,
                                timeout_s=timeout_s, schedule_timeout_s=schedule_timeout_s,
                                allow_version_mismatch=allow_version_mismatch)  # fmt: skip
    checks, measured = gating.measure_budgets(
        model,
        budgets,
        targets,
        min_samples=min_samples,
        min_seconds=min_seconds,
        rounds=rounds,
        reference=Path(reference) if reference else None,
        timeout_s=timeout_s,
        log=log,
    )
    baseline_results: list[BenchResult] = []
    old: Path | None = None  # the baseline model file, when one is measured now
    tgt = targets.get(target or "cpu")
    if baseline is not None:
        if tgt is None:
            raise UsageError(f"unknown target {target!r}", hint=", ".join(sorted(targets)))
        from deployopt.benchmark import BenchSpec

        spec = BenchSpec(
            batch=batch,
            seq=seq,
            min_samples=min_samples,
            min_seconds=min_seconds,
            rounds=max(rounds, 10),  # paired rounds are the regression test's sample
        )
        if str(baseline) == "last-pass":
            ident = gating.identify(model, name)
            rec = db.last_pass(ident.name, tgt.name, batch) if db else None
            if rec is None:
                from deployopt.judge import judge_regression

                where = db.path if db else "history (disabled)"
                checks.append(
                    judge_regression(
                        f"{tgt.name} batch {batch} vs last-pass",
                        None,
                        max_slowdown,
                        f"no passing gate result of {ident.name!r} on {tgt.name} at batch "
                        f"{batch} in {where}",
                    )
                )
            else:
                check, new_results = gating.regression_vs_samples(
                    model,
                    rec.samples_ms,
                    f"last-pass #{rec.id} ({rec.created[:19]})",
                    tgt,
                    spec,
                    max_slowdown,
                    timeout_s,
                    log,
                )
                checks.append(check)
                measured += new_results
        else:
            old, _ = resolve_model(baseline)  # a folder: its best.onnx, under the new settings
            read_onnx(old)
            check, res = gating.regression(
                model, old, tgt, spec, max_slowdown, processes, timeout_s, log
            )
            checks.append(check)
            measured += [r for r in res if r.name == "new"]
            baseline_results = [r for r in res if r.name == "baseline"]
    measured = [_with_session_file(r, session_file) for r in measured]
    baseline_results = [_with_session_file(r, session_file) for r in baseline_results]
    verdict = overall(checks)
    record_results(db, "gate", model, measured, verdict.value, name)
    if old is not None and baseline_results:
        record_results(db, "bench", old, baseline_results)
    env = dict(measured[0].env if measured else fingerprint(tgt))
    if session_file is not None:
        env["session_file"] = str(session_file)
    return GateResult(
        model=str(model),
        checks=checks,
        verdict=verdict,
        environment=dict(env),
        results=[r.to_json() for r in measured + baseline_results],
        mode="regression" if baseline is not None else "measure",
    )


def _gate_on_cluster(model, budgets, targets, db, cluster, session_file, name, log, **kw):
    """The fleet gate (deployopt.fleet.gate): each target's checks and results are recorded
    with that target's verdict as soon as its task is in."""
    from deployopt import fleet
    from deployopt.judge import GateResult, overall

    def record(checks, results) -> None:
        results = [_with_session_file(r, session_file) for r in results]
        record_results(db, "gate", model, results, overall(checks).value, name)

    checks, measured, outcomes = fleet.gate(
        model, budgets, targets, cluster=cluster, on_results=record, log=log, **kw
    )
    env = {"cluster": cluster, **{f"driver_{k}": v for k, v in fleet.driver_versions().items()}}
    for n, o in outcomes.items():
        env[f"node:{n}"] = (
            f"{o.node['hostname']} {o.node['node_id'][:12]} onnxruntime {o.node['onnxruntime']} "
            f"deployopt {o.node['deployopt']}"
            if o.node
            else (o.error or "no node")
        )
    if session_file is not None:
        env["session_file"] = str(session_file)
    measured = [_with_session_file(r, session_file) for r in measured]
    return GateResult(model=str(model), checks=checks, verdict=overall(checks),
                      environment=env, results=[r.to_json() for r in measured],
                      mode="fleet")  # fmt: skip


def distill(teacher: Any, data: str | Path, out: str | Path, **kwargs: Any):
    """Distil ``teacher`` into a smaller student on ``data``; see
    :func:`deployopt.stages.distill.distill` for the options.

    >>> res = distill("minilm", "reuters-r8", "out", student_layers="0,2,5")  # doctest: +SKIP
    >>> res.student["mean_cosine"]  # doctest: +SKIP
    """
    from deployopt.stages.distill import distill as run

    return run(teacher, data, out, **kwargs)


def prune(model: Any, out: str | Path, **kwargs: Any):
    """Prune ``model`` and write the smaller model folder ``out`` (which ``optimize`` takes as
    is); see :func:`deployopt.stages.prune.prune` for the options.

    >>> res = prune("minilm", "pruned", heads=0.33, ffn=0.5, data="reuters-r8",
    ...             recover_epochs=2)  # doctest: +SKIP
    >>> res.params_after / res.params_before  # doctest: +SKIP
    """
    from deployopt.stages.prune import prune as run

    return run(model, out, **kwargs)
