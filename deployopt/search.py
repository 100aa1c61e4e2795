"""``deployopt search``: the fastest chain of distillation, pruning and quantization within an
accuracy budget, over a recipe's ``[search]`` space.

Each trial is the recipe with one point of the space filled in (student depth or none, prune
ratios or none, the optimize variants), run by :mod:`deployopt.pipeline` into the same output
folder, so stages that trials share (one student under several prune ratios) are built once
and found by their content id after. Accuracy is the optimize stage's task metric on the
recipe's labelled evaluation set (``[optimize] eval`` and ``labels_column``), judged against
the original model's on the same data; latency is the chosen variant's on the target.

Trials are driven by Optuna, its storage ``OUT/search.db``: a killed search resumes (finished
trials are not run again; a trial cut short runs again and finds its finished stages in the
cache). When the space fits in ``max_trials`` every point is queued, smallest model first;
otherwise TPE samples them (NSGA-II for ``objective = "pareto"``, which optimises task metric
and latency together; the winner is still the fastest trial within the budget). A trial stops
early when its student, right after distillation, already lost more than the budget, and
(``prune_dominated``) before any work when a trial within the budget keeps no more layers and
prunes at least as much under the same variants and session: it cannot be faster. Session
settings are a dimension too: ``tuned`` (optimize searches them), ``default``, or a table.

The winner's model is written to ``OUT/best.onnx`` with its session file; ``OUT/search.json``
and ``OUT/search.md`` list every trial with its chain, task metric, latency, size and why it
lost, and ``OUT/search.png`` plots task metric against latency with the Pareto front.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from deployopt import events as ev
from deployopt import pipeline
from deployopt.errors import ConfigError, NoViableVariantError
from deployopt.recipe import Recipe
from deployopt.select import points_warning
from deployopt.workspace import write_json, write_text

NONE = "none"  # a choice that leaves the stage out


@dataclass
class Trial:
    number: int
    params: dict[str, Any]
    status: str  # ok | over budget | stopped early | failed
    metric: float | None = None
    drop: float | None = None
    latency_ms: float | None = None
    size_mb: float | None = None
    chosen: str | None = None
    folder: str | None = None
    reason: str = ""


def space(recipe: Recipe) -> dict[str, list[Any]]:
    """The search dimensions that have choices, in a fixed order."""
    s = recipe.search
    dims = {
        "student_layers": s.student_layers,
        "heads": s.heads,
        "ffn": s.ffn,
        "channels": s.channels,
        "variants": s.variants,
        "sessions": s.sessions,
    }
    return {k: list(v) for k, v in dims.items() if v}


def check(recipe: Recipe, where: str) -> None:
    """Before any work: the space has a point, and the accuracy can be measured."""
    dims = space(recipe)
    if not dims:
        raise ConfigError(
            f"{where}: [search] has no dimension",
            hint="give student_layers, heads, ffn, channels or variants choices",
        )
    opt = recipe.optimize
    if opt is None or opt.evaluation is None or opt.labels_column is None:
        raise ConfigError(
            f"{where}: [search] needs labelled evaluation data",
            hint="add eval = FILE and labels_column = NAME to [optimize]",
        )
    if "student_layers" in dims and any(v != NONE for v in dims["student_layers"]):
        if recipe.distill is None:
            raise ConfigError(
                f"{where}: [search] student_layers needs a [distill] table",
                hint="[distill] gives the training data and settings",
            )
        _check_students(recipe, dims["student_layers"], where)
    pruning = [k for k in ("heads", "ffn", "channels") if k in dims]
    if pruning and recipe.prune is None:
        raise ConfigError(
            f"{where}: [search] {pruning[0]} needs a [prune] table",
            hint="[prune] gives the data and recovery settings",
        )


def _check_students(recipe: Recipe, students: list, where: str) -> None:
    """Every student keeps layers the teacher has (read from an HF folder's config.json;
    other sources are checked when their trial loads them)."""
    from deployopt.torchside.students import parse_layers

    path = Path(recipe.source.path) if recipe.source and recipe.source.path else None
    try:
        total = json.loads((path / "config.json").read_text())["num_hidden_layers"]
    except (TypeError, OSError, ValueError, KeyError):
        return
    for layers in students:
        if layers == NONE:
            continue
        try:
            parse_layers(layers, total)
        except ConfigError as e:
            raise ConfigError(
                f"{where}: [search] student_layers {layers}: {e.message}",
                hint=f"a student keeps some of the teacher's layers 0-{total - 1}",
            ) from None


def trial_recipe(recipe: Recipe, point: dict[str, Any]) -> Recipe:
    """The recipe of one point: stages left out where the point says none or 0."""
    update: dict[str, Any] = {"search": None}
    if "student_layers" in point:
        layers = point["student_layers"]
        update["distill"] = (
            None
            if layers == NONE
            else recipe.distill.model_copy(update={"student_layers": tuple(layers)})
        )
    ratios = {k: point[k] for k in ("heads", "ffn", "channels") if k in point}
    if ratios:
        given = {k: (v or None) for k, v in ratios.items()}
        if all(v is None for v in given.values()) and not _prunes_otherwise(recipe):
            update["prune"] = None
        else:
            update["prune"] = recipe.prune.model_copy(update=given)
    if "variants" in point:
        update["optimize"] = recipe.optimize.model_copy(
            update={"variants": tuple(point["variants"])}
        )
    if "sessions" in point:
        opt = update.get("optimize", recipe.optimize)
        update["optimize"], targets = _with_session(recipe, opt, point["sessions"])
        if targets is not None:
            update["targets"] = targets
    return recipe.model_copy(update=update)


def _with_session(recipe: Recipe, opt, choice):
    """optimize's options (and the recipe's targets) for one session choice: ``tuned`` lets
    optimize search the settings, ``default`` keeps the target's, a table overrides them on a
    target of its own (named after the settings, so each has its own stage id)."""
    if choice == "tuned":
        return opt.model_copy(update={"tune_session": True}), None
    if choice == "default":
        return opt.model_copy(update={"tune_session": False}), None
    from deployopt.presets import BUILTIN_TARGETS

    base = opt.target or recipe.target or "cpu"
    if base in recipe.targets:
        body = dict(recipe.targets[base])
    elif base in BUILTIN_TARGETS:
        body = BUILTIN_TARGETS[base].model_dump(exclude={"name"})
    else:
        raise ConfigError(
            f"recipe: [search] sessions: target {base!r} is not defined",
            hint=f"add a [targets.{base}] table",
        )
    merged = {
        **body,
        **choice,
        "session_config": {**body.get("session_config", {}), **choice.get("session_config", {})},
    }
    tag = hashlib.sha256(json.dumps(choice, sort_keys=True).encode()).hexdigest()[:8]
    name = f"{base}+session-{tag}"
    return (
        opt.model_copy(update={"target": name, "tune_session": False}),
        {**recipe.targets, name: merged},
    )


def _prunes_otherwise(recipe: Recipe) -> bool:
    p = recipe.prune
    return any(
        x is not None for x in (p.drop_layers, p.unstructured, p.target_params, p.target_latency)
    )


def baseline(recipe: Recipe, out: Path, emit) -> float:
    """The original model's task metric on the evaluation set (an optimize stage of the source
    that builds no variant and measures nothing: cached like any stage)."""
    opt = recipe.optimize.model_copy(update={"variants": (), "bench": False})
    base = recipe.model_copy(
        update={
            "distill": None,
            "prune": None,
            "optimize": opt,
            "bench": None,
            "gate": None,
            "search": None,
        }
    )
    res = pipeline.run(base, out, on_event=emit, ship=False)
    value = (res.by_stage("optimize").outputs.get("task") or {}).get("original")
    if value is None:
        raise ConfigError(
            "recipe: the original has no task metric",
            hint="check [optimize] eval and labels_column",
        )
    return float(value)


def _encode(v: Any) -> Any:
    return json.dumps(v, sort_keys=True) if isinstance(v, (list, tuple, dict)) else v


def _decode(v: Any) -> Any:
    return json.loads(v) if isinstance(v, str) and v[:1] in ("[", "{") else v


def _depth(point: dict[str, Any]) -> float:
    """Layers a point keeps: a student's count, or all of them (the original)."""
    layers = point.get("student_layers", NONE)
    return math.inf if layers == NONE else len(layers)


def keeps_at_least(p: dict[str, Any], q: dict[str, Any]) -> bool:
    """``p`` computes at least what ``q`` does: the same variants and session, no fewer
    layers, and no higher prune ratio in any component. Then ``p`` cannot be faster than ``q``
    (beyond measurement noise)."""
    if any(p.get(k) != q.get(k) for k in ("variants", "sessions")):
        return False
    if _depth(p) < _depth(q):
        return False
    return all(p.get(k, 0.0) <= q.get(k, 0.0) for k in ("heads", "ffn", "channels"))


def _size_order(point: dict[str, Any], dims: dict[str, list]) -> tuple:
    """Grid order: the smallest models first (fewest layers, most pruned), so that under
    ``prune_dominated`` a fast trial within budget rules out the larger ones before they run."""
    ratios = sum(point.get(k, 0.0) for k in ("heads", "ffn", "channels"))
    rest = tuple(dims[k].index(point[k]) for k in ("variants", "sessions") if k in point)
    return (_depth(point), -ratios, *rest)


FINISHED = ("COMPLETE", "PRUNED", "FAIL")


def _resume(study, storage) -> None:
    """A trial still RUNNING when the search starts was cut short by a kill: mark it failed
    (and interrupted), so its point is queued again; its finished stages are in the cache."""
    from optuna.trial import TrialState

    study_id = storage.get_study_id_from_name(study.study_name)
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        tid = storage.get_trial_id_from_study_id_trial_number(study_id, t.number)
        storage.set_trial_user_attr(tid, "interrupted", True)
        storage.set_trial_state_values(tid, TrialState.FAIL)


def _counts(t) -> bool:
    """Whether a trial counts: finished, and not interrupted by a kill (those run again)."""
    return t.state.name in FINISHED and not t.user_attrs.get("interrupted")


def _counted(study) -> list:
    return [t for t in study.get_trials(deepcopy=False) if _counts(t)]


def run(recipe: Recipe, out: str | Path, *, on_event: Callable | None = None) -> dict[str, Any]:
    """Run the search; returns the document written to ``OUT/search.json``. Raises
    NoViableVariantError (exit 6) when no trial meets the accuracy budget."""
    import optuna

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    emit = on_event or (lambda e: None)
    s = recipe.search
    check(recipe, "recipe")
    warnings = [w for w in [points_warning(s.max_accuracy_drop, "max_accuracy_drop")] if w]
    dims = space(recipe)
    reference = baseline(recipe, out, emit)
    grid = [dict(zip(dims, combo)) for combo in itertools.product(*dims.values())]
    encoded = {k: [_encode(v) for v in vals] for k, vals in dims.items()}
    pareto = s.objective == "pareto"
    use_grid = s.sampler == "grid" or (s.sampler == "auto" and len(grid) <= s.max_trials)
    kind = "grid" if use_grid else ("nsga2" if s.sampler == "nsga2" or pareto else "tpe")
    sampler = (
        optuna.samplers.NSGAIISampler(seed=s.seed)
        if kind == "nsga2"
        else optuna.samplers.TPESampler(seed=s.seed)  # a grid's points are all queued
    )
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.RDBStorage(f"sqlite:///{out / 'search.db'}")
    try:
        study = optuna.create_study(
            study_name="deployopt",
            storage=storage,
            load_if_exists=True,
            directions=["minimize", "maximize"] if pareto else ["minimize"],
            sampler=sampler,
        )
    except ValueError as e:
        raise ConfigError(f"{out / 'search.db'}: {e}") from None
    if len(study.directions) != (2 if pareto else 1):
        raise ConfigError(
            f"{out / 'search.db'}: this search was run with the other objective",
            hint="a search keeps its objective: use a new -o folder to change it",
        )
    _resume(study, storage)
    counted = _counted(study)
    if use_grid:
        queued = {
            json.dumps(t.system_attrs.get("fixed_params", t.params), sort_keys=True)
            for t in study.get_trials(deepcopy=False)
            if t.state.name == "WAITING" or _counts(t)
        }
        for point in sorted(grid, key=lambda p: _size_order(p, dims)):
            params = {k: _encode(v) for k, v in point.items()}
            if json.dumps(params, sort_keys=True) not in queued:
                study.enqueue_trial(params)
    total = min(s.max_trials, len(grid)) if use_grid else s.max_trials
    budget = total - len(counted)
    deadline = time.monotonic() + s.max_minutes * 60

    def objective(trial):
        point = {k: _decode(trial.suggest_categorical(k, encoded[k])) for k in dims}
        return _objective(trial, recipe, point, reference, out, emit, study)

    if budget > 0:
        study.optimize(objective, n_trials=budget, timeout=max(1.0, deadline - time.monotonic()))
    trials = [_record(t) for t in _counted(study)]
    return _finish(recipe, out, trials, reference, kind, warnings)


def _dominator(study, point: dict[str, Any], limit: float):
    """A finished trial within the budget that ``point`` keeps at least as much as."""
    for t in study.get_trials(deepcopy=False):
        a = t.user_attrs
        if (
            t.state.name == "COMPLETE"
            and a.get("drop") is not None
            and a["drop"] <= limit
            and a.get("latency_ms") is not None
            and keeps_at_least(point, a.get("point", {}))
        ):
            return t
    return None


def _chain(point: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in point.items())


def _objective(trial, recipe, point, reference, out, emit, study):
    """One trial, announced by TrialStarted and closed by TrialFinished events."""
    emit(ev.TrialStarted(trial.number, _chain(point)))
    try:
        value = _run_trial(trial, recipe, point, reference, out, emit, study)
    except BaseException as e:
        import optuna

        if isinstance(e, optuna.TrialPruned):
            reason = trial.user_attrs.get("reason", "")
            emit(ev.TrialFinished(trial.number, _status("PRUNED", reason), reason))
        else:
            emit(ev.TrialFinished(trial.number, "failed", f"{type(e).__name__}: {e}"))
        raise
    a = trial.user_attrs
    reason = a.get("reason", "")
    if not reason:
        reason = f"{a.get('chosen')}: {a['latency_ms']:.3g} ms, metric {a['metric']:.2f} (drop "
        reason += f"{a['drop']:.2f})"
    emit(ev.TrialFinished(trial.number, _status("COMPLETE", a.get("reason", "")), reason))
    return value


def _status(state: str, reason: str) -> str:
    """A trial's status in the report, from its Optuna state and the reason it recorded."""
    if state == "PRUNED":
        return "dominated" if reason.startswith("dominated") else "stopped early"
    if state != "COMPLETE":
        return "failed" if state == "FAIL" else state.lower()
    if reason:
        return "no variant" if reason.startswith("no variant") else "over budget"
    return "ok"


def _run_trial(trial, recipe, point, reference, out, emit, study):
    import optuna

    s = recipe.search
    limit = s.max_accuracy_drop
    pareto = s.objective == "pareto"
    trial.set_user_attr("point", point)
    if s.prune_dominated and not pareto:
        w = _dominator(study, point, limit)
        if w is not None:
            reason = (
                f"dominated by trial {w.number} ({w.user_attrs['latency_ms']:.3g} ms, within "
                "budget): no fewer layers and no more pruning under the same variants and "
                "session, so no faster"
            )
            trial.set_user_attr("reason", reason)
            raise optuna.TrialPruned(reason)

    def early_stop(rec) -> None:  # after distillation, before export
        if rec.stage != "distill":
            return
        st, t = rec.outputs.get("student", {}), rec.outputs.get("teacher", {})
        if "accuracy" in st and "accuracy" in t:
            drop = (t["accuracy"] - st["accuracy"]) * 100
            if drop > limit:
                reason = f"student accuracy drop {drop:.2f} > {limit:g} points after distillation"
                trial.set_user_attr("reason", reason)
                raise optuna.TrialPruned(reason)

    def result(latency: float, metric: float):
        return (latency, metric) if pareto else latency

    try:
        res = pipeline.run(
            trial_recipe(recipe, point), out, on_event=emit, ship=False, after_stage=early_stop
        )
    except optuna.TrialPruned:
        raise
    except NoViableVariantError as e:
        trial.set_user_attr("reason", f"no variant: {e.message}")
        return result(math.inf, -math.inf)
    opt = res.by_stage("optimize")
    o = opt.outputs
    task = o.get("task") or {}
    value = task.get("value")
    trial.set_user_attr("folder", opt.folder)
    trial.set_user_attr("chosen", o.get("chosen"))
    trial.set_user_attr("size_mb", o.get("size_mb"))
    trial.set_user_attr("latency_ms", o.get("latency_ms"))
    trial.set_user_attr("metric", value)
    drop = reference - value if value is not None else math.inf
    trial.set_user_attr("drop", drop)
    latency = float(o.get("latency_ms") or math.inf)
    if drop > limit:
        trial.set_user_attr("reason", f"accuracy drop {drop:.2f} > {limit:g} points")
        if not pareto:
            return math.inf
    return result(latency, value if value is not None else -math.inf)


def _record(t) -> Trial:
    a = t.user_attrs
    reason = a.get("reason", "")
    status = _status(t.state.name, reason)
    return Trial(
        number=t.number,
        params=a.get("point", {}),
        status=status,
        metric=a.get("metric"),
        drop=a.get("drop"),
        latency_ms=a.get("latency_ms"),
        size_mb=a.get("size_mb"),
        chosen=a.get("chosen"),
        folder=a.get("folder"),
        reason=reason,
    )


def pareto_front(trials: list[Trial]) -> list[int]:
    """Numbers of the trials no other trial beats on both latency and task metric."""
    pts = [
        t
        for t in trials
        if t.latency_ms is not None and t.metric is not None and math.isfinite(t.latency_ms)
    ]

    def beats(a: Trial, b: Trial) -> bool:
        return (
            a.latency_ms <= b.latency_ms
            and a.metric >= b.metric
            and (a.latency_ms < b.latency_ms or a.metric > b.metric)
        )

    return sorted(t.number for t in pts if not any(beats(o, t) for o in pts))


def _finish(recipe, out: Path, trials: list[Trial], reference: float, sampler: str,
            warnings: list[str]) -> dict:  # fmt: skip
    ok = [t for t in trials if t.status == "ok" and t.latency_ms is not None]
    winner = min(ok, key=lambda t: (t.latency_ms, t.size_mb or 0, t.number), default=None)
    for t in ok:
        if t is not winner:
            t.reason = f"slower: {t.latency_ms:.3g} ms > {winner.latency_ms:.3g} ms"
    doc = {
        "schema": "deployopt.search/1",
        "sampler": sampler,
        "objective": recipe.search.objective,
        "original_metric": reference,
        "max_accuracy_drop": recipe.search.max_accuracy_drop,
        "warnings": warnings,
        "winner": asdict(winner) if winner else None,
        "pareto": pareto_front(trials),
        "trials": [asdict(t) for t in trials],
    }
    if winner is not None:
        from deployopt.pipeline import ship_folder

        doc["best"] = str(ship_folder(Path(winner.folder), out))
    write_json(out / "search.json", doc)
    write_text(out / "search.md", _markdown(doc))
    _plot(trials, reference, doc["pareto"], out / "search.png")
    if winner is None:
        closest = sorted((t for t in trials if t.reason), key=lambda t: t.drop or math.inf)[:3]
        why = "; ".join(f"trial {t.number} {t.params}: {t.reason}" for t in closest)
        raise NoViableVariantError(
            f"no trial within {recipe.search.max_accuracy_drop:g} points of the original: {why}"
        )
    return doc


def _markdown(doc: dict) -> str:
    lines = [
        "# deployopt search",
        "",
        f"Original task metric {doc['original_metric']:.2f}; budget: a drop of at most "
        f"{doc['max_accuracy_drop']:g} points. Objective: {doc['objective']}; sampler: "
        f"{doc['sampler']}. Pareto front (metric against latency): trials "
        f"{', '.join(map(str, doc['pareto'])) or 'none'}.",
        "",
        *[f"Warning: {w}\n" for w in doc["warnings"]],
        "| trial | chain | metric | drop | p50 ms | size MB | status | why not chosen |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def f(x, fmt):
        return format(x, fmt) if isinstance(x, (int, float)) and math.isfinite(x) else "-"

    for t in doc["trials"]:
        chain = ", ".join(f"{k}={v}" for k, v in t["params"].items())
        lines.append(
            f"| {t['number']} | {chain} | {f(t['metric'], '.2f')} | {f(t['drop'], '.2f')}"
            f" | {f(t['latency_ms'], '.3g')} | {f(t['size_mb'], '.3g')} | {t['status']} "
            f"| {t['reason']} |"
        )
    w = doc["winner"]
    lines += [
        "",
        f"**Winner: trial {w['number']}** ({w['chosen']}) → `{doc['best']}`"
        if w
        else "**No trial within the budget.**",
        "",
    ]
    return "\n".join(lines)


def _plot(trials: list[Trial], reference: float, front: list[int], path: Path) -> None:
    pts = [
        t
        for t in trials
        if t.latency_ms is not None and t.metric is not None and math.isfinite(t.latency_ms)
    ]
    if not pts:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from deployopt.workspace import atomic_path

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter(
        [t.latency_ms for t in pts],
        [t.metric for t in pts],
        c=["tab:green" if t.status == "ok" else "tab:red" for t in pts],
    )
    for t in pts:
        ax.annotate(str(t.number), (t.latency_ms, t.metric), fontsize=8)
    edge = sorted((t for t in pts if t.number in front), key=lambda t: t.latency_ms)
    if len(edge) > 1:
        ax.step([t.latency_ms for t in edge], [t.metric for t in edge], where="post",
                color="tab:blue", linewidth=1, label="Pareto front")  # fmt: skip
    ax.axhline(reference, color="gray", linestyle="--", label="original")
    ax.set_xlabel("latency (ms)")
    ax.set_ylabel("task metric (points)")
    ax.legend()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
