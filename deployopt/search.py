"""``deployopt search``: the fastest chain of distillation, pruning and quantization within an
accuracy budget, over a recipe's ``[search]`` space.

Each trial is the recipe with one point of the space filled in (student depth or none, prune
ratios or none, the optimize variants), run by :mod:`deployopt.pipeline` into the same output
folder, so stages that trials share (one student under several prune ratios) are built once
and found by their content id after. Accuracy is the optimize stage's task metric on the
recipe's labelled evaluation set (``[optimize] eval`` and ``labels_column``), judged against
the original model's on the same data; latency is the chosen variant's on the target.

Trials are driven by Optuna: a grid when the space fits in ``max_trials``, else TPE; its
storage is ``OUT/search.db``, so a killed search resumes (finished trials are not run again,
and a trial cut short finds its finished stages in the cache). A trial stops early when its
student, right after distillation, already lost more than the budget. The winner's model is
written to ``OUT/best.onnx`` with its session file; ``OUT/search.json`` and ``OUT/search.md``
list every trial with its chain, task metric, latency, size and why it lost.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from deployopt import pipeline
from deployopt.errors import ConfigError, NoViableVariantError
from deployopt.recipe import Recipe
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
    pruning = [k for k in ("heads", "ffn", "channels") if k in dims]
    if pruning and recipe.prune is None:
        raise ConfigError(
            f"{where}: [search] {pruning[0]} needs a [prune] table",
            hint="[prune] gives the data and recovery settings",
        )


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
    return recipe.model_copy(update=update)


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
    return json.dumps(v) if isinstance(v, (list, tuple)) else v


def _decode(v: Any) -> Any:
    return json.loads(v) if isinstance(v, str) and v.startswith("[") else v


def run(recipe: Recipe, out: str | Path, *, on_event: Callable | None = None) -> dict[str, Any]:
    """Run the search; returns the document written to ``OUT/search.json``. Raises
    NoViableVariantError (exit 6) when no trial meets the accuracy budget."""
    import optuna

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    emit = on_event or (lambda e: None)
    s = recipe.search
    check(recipe, "recipe")
    dims = space(recipe)
    reference = baseline(recipe, out, emit)
    grid = [dict(zip(dims, combo)) for combo in itertools.product(*dims.values())]
    encoded = {k: [_encode(v) for v in vals] for k, vals in dims.items()}
    use_grid = s.sampler == "grid" or (s.sampler == "auto" and len(grid) <= s.max_trials)
    sampler = (
        optuna.samplers.GridSampler(encoded, seed=s.seed)
        if use_grid
        else optuna.samplers.TPESampler(seed=s.seed)
    )
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name="deployopt",
        storage=f"sqlite:///{out / 'search.db'}",
        load_if_exists=True,
        direction="minimize",
        sampler=sampler,
    )
    done = [t for t in study.trials if t.state.is_finished()]
    budget = min(s.max_trials, len(grid) if use_grid else s.max_trials) - len(done)
    deadline = time.monotonic() + s.max_minutes * 60

    def objective(trial) -> float:
        point = {k: _decode(trial.suggest_categorical(k, encoded[k])) for k in dims}
        return _objective(trial, recipe, point, reference, out, emit)

    if budget > 0:
        study.optimize(objective, n_trials=budget, timeout=max(1.0, deadline - time.monotonic()))
    trials = [_record(t) for t in study.trials]
    return _finish(recipe, out, trials, reference, use_grid)


def _objective(trial, recipe, point, reference, out, emit) -> float:
    import optuna

    limit = recipe.search.max_accuracy_drop
    trial.set_user_attr("point", point)

    def early_stop(rec) -> None:  # after distillation, before export
        if rec.stage != "distill":
            return
        s, t = rec.outputs.get("student", {}), rec.outputs.get("teacher", {})
        if "accuracy" in s and "accuracy" in t:
            drop = (t["accuracy"] - s["accuracy"]) * 100
            if drop > limit:
                reason = f"student accuracy drop {drop:.2f} > {limit:g} points after distillation"
                trial.set_user_attr("reason", reason)
                raise optuna.TrialPruned(reason)

    try:
        res = pipeline.run(
            trial_recipe(recipe, point), out, on_event=emit, ship=False, after_stage=early_stop
        )
    except optuna.TrialPruned:
        raise
    except NoViableVariantError as e:
        trial.set_user_attr("reason", f"no variant: {e.message}")
        return math.inf
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
    if drop > limit:
        trial.set_user_attr("reason", f"accuracy drop {drop:.2f} > {limit:g} points")
        return math.inf
    return float(o.get("latency_ms") or math.inf)


def _record(t) -> Trial:
    a = t.user_attrs
    status = {"COMPLETE": "ok", "PRUNED": "stopped early", "FAIL": "failed"}.get(
        t.state.name, t.state.name.lower()
    )
    if status == "ok" and a.get("reason"):
        status = "no variant" if a["reason"].startswith("no variant") else "over budget"
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
        reason=a.get("reason", ""),
    )


def _finish(recipe, out: Path, trials: list[Trial], reference: float, grid: bool) -> dict:
    ok = [t for t in trials if t.status == "ok" and t.latency_ms is not None]
    winner = min(ok, key=lambda t: (t.latency_ms, t.size_mb or 0, t.number), default=None)
    for t in ok:
        if t is not winner:
            t.reason = f"slower: {t.latency_ms:.3g} ms > {winner.latency_ms:.3g} ms"
    doc = {
        "schema": "deployopt.search/1",
        "sampler": "grid" if grid else "tpe",
        "original_metric": reference,
        "max_accuracy_drop": recipe.search.max_accuracy_drop,
        "winner": asdict(winner) if winner else None,
        "trials": [asdict(t) for t in trials],
    }
    if winner is not None:
        from deployopt.pipeline import ship_folder

        doc["best"] = str(ship_folder(Path(winner.folder), out))
    write_json(out / "search.json", doc)
    write_text(out / "search.md", _markdown(doc))
    _plot(trials, reference, out / "search.png")
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
        f"{doc['max_accuracy_drop']:g} points. Sampler: {doc['sampler']}.",
        "",
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


def _plot(trials: list[Trial], reference: float, path: Path) -> None:
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
    ax.axhline(reference, color="gray", linestyle="--", label="original")
    ax.set_xlabel("latency (ms)")
    ax.set_ylabel("task metric (points)")
    ax.legend()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
