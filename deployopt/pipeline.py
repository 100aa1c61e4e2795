"""``deployopt run``: a recipe's stages in order, each output cached by a content id.

Plan: source -> [distill] -> [prune] -> [optimize] -> [bench] -> [gate]. A stage's id is the
sha256 of (its parent's id, the stage, its version, its options, the sha256 of every data file
it reads), so an unchanged stage is found in ``OUT/stages/<stage>-<id>/`` and reused, and a
change re-runs that stage and everything after it (their parents changed). A stage is finished
when its ``stage.json`` exists, written last; a run killed mid-stage re-enters the same folder,
where distillation resumes from its checkpoint and optimize reuses its finished variants.

The runner emits typed events (deployopt.events) and writes one report for the whole run,
last and atomically: ``OUT/report.json`` and ``OUT/report.md``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from deployopt import commands
from deployopt import events as ev
from deployopt.errors import DeployoptError, UsageError
from deployopt.recipe import STAGE_TABLES, Recipe
from deployopt.workspace import TMP_PREFIX, canonical_json, sha256_file, write_json, write_text

SCHEMA = "deployopt.run/1"
STAGES = tuple(STAGE_TABLES)
# bump a stage's version when what it writes for the same inputs changes
VERSIONS = {"distill": 1, "prune": 1, "optimize": 1, "bench": 1, "gate": 1}
MARKER = "stage.json"


@dataclass(frozen=True)
class PlannedStage:
    stage: str
    id: str
    parent: str
    params: dict[str, Any]
    data: dict[str, str]  # option key -> sha256 of what it names (or the name itself)

    def folder(self, out: Path) -> Path:
        return out / "stages" / f"{self.stage}-{self.id}"


@dataclass
class StageRecord:
    stage: str
    id: str
    parent: str
    status: str  # done | cached | failed | not run
    seconds: float = 0.0
    summary: str = ""
    folder: str = ""
    error: str = ""
    outputs: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunResult:
    out: Path
    source_id: str
    stages: list[StageRecord]
    exit_code: int  # 0, or the gate's verdict, or 4 for an invalid benchmark
    verdict: str | None = None
    best: Path | None = None
    report: Path | None = None

    def by_stage(self, name: str) -> StageRecord:
        return next(s for s in self.stages if s.stage == name)


# ---------------------------------------------------------------- ids


def content_hash(path: Path) -> str:
    """sha256 of a file, or of a folder's files (relative names and contents, sorted)."""
    if path.is_file():
        return sha256_file(path)
    h = hashlib.sha256()
    for p in sorted(q for q in path.rglob("*") if q.is_file()):
        h.update(str(p.relative_to(path)).encode() + b"\0" + sha256_file(p).encode())
    return h.hexdigest()


def _data_hash(value: Any) -> str:
    """What a data option names: a path's content hash, else the name itself (a packaged
    dataset, a bundled model, a factory)."""
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return ",".join(_data_hash(v) for v in value)
    if not isinstance(value, (str, Path)):
        return hashlib.sha256(canonical_json(value).encode()).hexdigest()
    p = Path(value)
    if p.exists():
        return content_hash(p)
    if str(value) == "minilm":
        from deployopt.sources import bundled_path

        return content_hash(bundled_path("minilm"))
    module = _factory_file(str(value))
    if module is not None:  # pkg.mod:factory: an edit of the module's code is a new model
        return f"factory:{value}:{sha256_file(module)}"
    return f"name:{value}"


def _factory_file(value: str) -> Path | None:
    """The source file of ``pkg.mod`` in ``pkg.mod:factory``, found without running it."""
    mod, sep, attr = value.partition(":")
    if not sep or not mod or not attr:
        return None
    import importlib.util

    try:
        spec = importlib.util.find_spec(mod)
    except (ImportError, ValueError):
        return None
    origin = getattr(spec, "origin", None)
    return Path(origin) if origin and Path(origin).is_file() else None


def _hash(obj: Any) -> str:
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()[:16]


def effective(recipe: Recipe, stage: str):
    """A stage's options with the recipe's top-level ``target`` filled in."""
    opts = getattr(recipe, stage)
    if recipe.target and "target" in type(opts).model_fields and opts.target is None:
        opts = opts.model_copy(update={"target": recipe.target})
    return opts


def _params(opts) -> tuple[dict[str, Any], dict[str, str]]:
    params, data = {}, {}
    dumped = opts.model_dump(mode="json", by_alias=True)
    for name, f in type(opts).model_fields.items():
        key = f.alias or name
        extra = f.json_schema_extra or {}
        if extra.get("output"):
            continue  # where a copy of the results goes does not change them
        if extra.get("data"):
            data[key] = _data_hash(getattr(opts, name))
        else:
            params[key] = dumped[key]
    return params, data


def plan(recipe: Recipe) -> tuple[str, list[PlannedStage]]:
    """The source's id and the stages with their ids, in order."""
    src_params, src_data = _params(recipe.source) if recipe.source else ({}, {})
    parent = _hash(["source", src_params, src_data])
    source_id = parent
    out = []
    for stage in recipe.stages():
        params, data = _params(effective(recipe, stage))
        if stage in ("optimize", "bench", "gate") and recipe.targets:
            params["targets"] = recipe.targets
        sid = _hash([parent, stage, VERSIONS[stage], params, data])
        out.append(PlannedStage(stage, sid, parent, params, data))
        parent = sid
    return source_id, out


# ---------------------------------------------------------------- running


def run(
    recipe: Recipe,
    out: str | Path,
    *,
    force: tuple[str, ...] | list[str] = (),
    on_event: Callable[[ev.Event], None] | None = None,
    ship: bool = True,
    after_stage: Callable[[StageRecord], None] | None = None,
) -> RunResult:
    """Run ``recipe`` into ``out``. ``force``: stages rebuilt with everything after them.
    Raises the failing stage's error after writing the report (the stages before it stay
    cached); a gate verdict is returned, not raised. ``ship=False`` (a search trial): no
    ``OUT/best.onnx`` and no run report; ``after_stage`` hears each finished stage and may
    raise to stop the run there."""
    out = Path(out)
    emit = on_event or (lambda e: None)
    bad = [s for s in force if s not in STAGES]
    if bad:
        raise UsageError(f"--force {bad[0]!r}: no such stage",
                         hint="stages: " + ", ".join(STAGES))  # fmt: skip
    source_id, stages = plan(recipe)
    forced_from = min((i for i, s in enumerate(stages) if s.stage in force), default=None)
    from deployopt.workspace import check_output_dir

    check_output_dir(out, None)
    out.mkdir(parents=True, exist_ok=True)
    config = _targets_file(recipe, out)
    records = [StageRecord(s.stage, s.id, s.parent, "not run") for s in stages]
    result = RunResult(out=out, source_id=source_id, stages=records, exit_code=0)
    model: Any = recipe.source.path if recipe.source else None
    try:
        for i, (st, rec) in enumerate(zip(stages, records)):
            folder = st.folder(out)
            rec.folder = str(folder)
            if forced_from is not None and i >= forced_from and (folder / MARKER).exists():
                shutil.rmtree(folder)
            _run_stage(st, rec, recipe, model, folder, config, emit, first=i == 0)
            model = _next_model(st.stage, folder, rec.outputs, model)
            _copy_outputs(recipe, st.stage, folder, out)
            result.exit_code = _worse(result.exit_code, int(rec.outputs.get("exit_code", 0)))
            if st.stage == "gate":
                result.verdict = rec.outputs.get("verdict")
            if after_stage is not None:
                after_stage(rec)
        result.best = _ship(stages, records, out) if ship else None
    finally:
        if ship:
            result.report = _write_report(recipe, result, stages)
    return result


def _run_stage(st: PlannedStage, rec: StageRecord, recipe, model, folder, config, emit,
               first: bool) -> None:  # fmt: skip
    """Reuse the stage's finished output, or run it and mark it finished (``stage.json``)."""
    done = _read_marker(folder, st.id)
    if done is not None:
        rec.status, rec.summary, rec.outputs = "cached", done["summary"], done["outputs"]
        rec.seconds = done.get("seconds", 0.0)
        emit(ev.StageCached(st.stage, st.id))
        return
    emit(ev.StageStarted(st.stage, st.id))
    t0 = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    log = _logger(st.stage, emit)
    try:
        rec.summary, rec.outputs = _execute(st.stage, recipe, model, folder, config, log, emit,
                                            first)  # fmt: skip
    except BaseException as e:
        rec.status, rec.seconds = "failed", time.perf_counter() - t0
        rec.error = getattr(e, "message", None) or f"{type(e).__name__}: {e}"
        emit(ev.StageFailed(st.stage, st.id, rec.error))
        raise
    rec.status, rec.seconds = "done", time.perf_counter() - t0
    marker = {"schema": SCHEMA, "id": st.id, "stage": st.stage, "parent": st.parent,
              "params": st.params, "data": st.data, "seconds": rec.seconds,
              "summary": rec.summary, "outputs": rec.outputs}  # fmt: skip
    write_json(folder / MARKER, marker)  # last: it marks the stage finished
    emit(ev.StageDone(st.stage, st.id, rec.seconds, rec.summary))


SEVERITY = (1, 4, 3, 0)  # FAIL, INVALID, INCONCLUSIVE, PASS: the worst decides (as gate)


def _worse(a: int, b: int) -> int:
    return min(a, b, key=lambda c: SEVERITY.index(c) if c in SEVERITY else -1)


def _targets_file(recipe: Recipe, out: Path) -> Path | None:
    if not recipe.targets:
        return None
    import tomli_w

    path = out / "targets.toml"
    write_text(path, tomli_w.dumps({"targets": recipe.targets}))
    return path


def _read_marker(folder: Path, sid: str) -> dict | None:
    try:
        doc = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return doc if doc.get("id") == sid else None


def _logger(stage: str, emit) -> Callable[[str], None]:
    return lambda m: emit(ev.StageLog(stage, m))


def _next_model(stage: str, folder: Path, outputs: dict, model: Any) -> Any:
    if stage in ("bench", "gate"):
        return model
    return outputs.get("model", str(folder))


def _with_config(opts, config: Path | None):
    """``opts`` with the recipe's targets file as its ``config`` option, unless it names one
    (the option's field may be named otherwise: optimize's is ``config_file``)."""
    name = next((n for n, f in type(opts).model_fields.items() if (f.alias or n) == "config"), None)
    if config is not None and name is not None and getattr(opts, name) is None:
        return opts.model_copy(update={name: config})
    return opts


def _execute(stage, recipe, model, folder, config, log, emit, first) -> tuple[str, dict]:
    """Run one stage into ``folder``: (a one-line summary, outputs for the marker)."""
    opts = _with_config(effective(recipe, stage), config)
    weights = recipe.source.weights if first and recipe.source else None
    if stage == "distill":
        res = commands.distill(model, recipe.source, opts, folder, log)
        s = res.student
        return (f"{s['params'] / 1e6:.2f}M params, score {s.get('score', float('nan')):.4f}",
                {"model": str(res.out / "student"), "student": _floats(s),
                 "teacher": _floats(res.teacher)})  # fmt: skip
    if stage == "prune":
        res = commands.prune(model, recipe.source, opts, folder / "model", log, weights)
        return (f"{res.params_before:,} -> {res.params_after:,} params",
                {"model": str(folder / "model"), "params_before": res.params_before,
                 "params_after": res.params_after,
                 "metrics": {k: _floats(v) for k, v in res.metrics.items()}})  # fmt: skip
    if stage == "optimize":
        res = commands.optimize(model, recipe.source, opts, folder, log, weights, on_event=emit)
        return _optimize_summary(res, folder)
    if stage == "bench":
        results = commands.bench([model], opts, log)
        write_json(folder / "bench.json", commands.bench_document(results))
        invalid = [r.name for r in results if not r.valid]
        first_r = results[0]
        p50 = first_r.stats.p50_ms if first_r.stats else None
        return (f"p50 {p50:.3g} ms" if p50 else "INVALID",
                {"exit_code": 4 if invalid else 0, "invalid": invalid,
                 "p50_ms": p50})  # fmt: skip
    if stage == "gate":
        result = commands.gate(model, opts, folder, log)
        write_json(folder / "gate.json", result.to_json())
        from deployopt import judge

        write_text(folder / "junit.xml", judge.junit_xml(result))
        write_text(folder / "gate.md", judge.markdown(result))
        return (result.summary_line(),
                {"verdict": result.verdict.value,
                 "exit_code": result.verdict.exit_code})  # fmt: skip
    raise AssertionError(stage)


def _optimize_summary(res, folder: Path) -> tuple[str, dict]:
    """The chosen variant with what it measured: size, latency on the choice's metric, and the
    task metric against the stage's input (with --labels-column)."""
    win = res.choice.winner if res.choice and res.choice.winner else None
    outputs: dict[str, Any] = {"model": str(folder), "chosen": win.name if win else None,
                               "best": str(res.best) if res.best else None}  # fmt: skip
    metric = res.variants[0].metrics.get("task.metric")  # the stage's input, as exported
    if metric:
        outputs["task"] = {"metric": metric,
                           "original": res.variants[0].metrics.get(f"task.{metric}")}  # fmt: skip
    if win is None:
        return "variants built (no benchmark)", outputs
    m = res.by_name(win.name).metrics
    outputs.update(latency_ms=win.latency_ms, size_mb=win.size_mb, mean_cosine=win.mean_cosine)
    parts = [f"chosen {win.name}", f"{win.size_mb:.3g} MB"]
    if win.latency_ms is not None:
        parts.append(f"{win.latency_ms:.3g} ms")
    if metric:
        outputs["task"].update(value=m.get(f"task.{metric}"), drop=m.get("accuracy_drop"))
        parts.append(f"{metric} {m.get(f'task.{metric}'):.2f} (drop {m.get('accuracy_drop'):.2f})")
    return ", ".join(parts), outputs


def _floats(d: dict) -> dict:
    return {k: v for k, v in d.items() if isinstance(v, (int, float, str))}


def _copy_outputs(recipe: Recipe, stage: str, folder: Path, out: Path) -> None:
    """The copies a stage's options ask for (``json``, ``junit``, ``markdown``), from its
    cached results, relative paths under ``out``."""
    if stage == "gate":
        opts = recipe.gate
        for path, name in ((opts.junit, "junit.xml"), (opts.json_out, "gate.json"),
                           (opts.markdown, "gate.md")):  # fmt: skip
            if path is not None:
                _copy(folder / name, path if path.is_absolute() else out / path)
    if stage == "bench" and recipe.bench.json_out is not None:
        p = recipe.bench.json_out
        _copy(folder / "bench.json", p if p.is_absolute() else out / p)


def _copy(src: Path, dst: Path) -> None:
    from deployopt.workspace import atomic_path

    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def _ship(stages: list[PlannedStage], records: list[StageRecord], out: Path) -> Path | None:
    """The optimize stage's best.onnx and session file, copied into ``out``."""
    rec = next((r for r in records if r.stage == "optimize"), None)
    if rec is None or not rec.outputs.get("best"):
        return None
    return ship_folder(Path(rec.folder), out)


def ship_folder(folder: Path, out: Path) -> Path:
    """An optimize output folder's best.onnx (+ external data) and best.session.json,
    copied atomically into ``out`` (a session file left from another model is removed)."""
    from deployopt.presets import BEST_SESSION
    from deployopt.ship import write_best

    best = write_best(out, folder / "best.onnx")
    session = folder / BEST_SESSION
    if session.exists():
        _copy(session, out / BEST_SESSION)
    else:
        (out / BEST_SESSION).unlink(missing_ok=True)
    return best


def _write_report(recipe: Recipe, result: RunResult, stages: list[PlannedStage]) -> Path:
    from deployopt.recipe import to_dict

    failed = next((r for r in result.stages if r.status == "failed"), None)
    doc = {
        "schema": SCHEMA,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "recipe": to_dict(recipe),
        "source": {
            "path": recipe.source.path if recipe.source else None,
            "id": result.source_id,
        },  # fmt: skip
        "lineage": [
            {**asdict(r), "params": s.params, "data": s.data} for r, s in zip(result.stages, stages)
        ],  # fmt: skip
        "verdict": result.verdict,
        "exit_code": result.exit_code,
        "best": str(result.best) if result.best else None,
        "stopped_at": failed.stage if failed else None,
        "error": failed.error if failed else None,
        "versions": _versions(),
    }
    write_json(result.out / "report.json", doc)
    write_text(result.out / "report.md", _markdown(doc))
    return result.out / "report.json"


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("deployopt", "onnxruntime", "onnx", "torch", "transformers"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    import platform

    out["python"] = platform.python_version()
    out["machine"] = f"{platform.machine()} {platform.processor() or ''}".strip()
    return out


def _markdown(doc: dict) -> str:
    lines = [
        "# deployopt run",
        "",
        f"Source: `{doc['source']['path']}` (id {doc['source']['id']})",
        "",
    ]
    lines += ["| stage | id | status | seconds | summary |", "|---|---|---|---|---|"]
    for r in doc["lineage"]:
        secs = f"{r['seconds']:.1f}" if r["status"] in ("done", "cached") else "-"
        text = r["summary"] or r["error"]
        lines.append(f"| {r['stage']} | `{r['id']}` | {r['status']} | {secs} | {text} |")
    lines.append("")
    if doc["stopped_at"]:
        lines.append(f"Stopped at **{doc['stopped_at']}**: {doc['error']}")
    if doc["verdict"]:
        lines.append(f"Gate verdict: **{doc['verdict']}** (exit {doc['exit_code']})")
    if doc["best"]:
        lines.append(f"Shipped: `{doc['best']}`")
    lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in doc["versions"].items()), ""]
    return "\n".join(lines)


def run_path(path: str | Path | Recipe | dict, out: str | Path, *, sets=(), force=(),
             on_event=None) -> RunResult:  # fmt: skip
    """The API: a recipe file, a dict or a Recipe, run into ``out``."""
    from deployopt import recipe as rc

    if isinstance(path, Recipe):
        recipe = path
    elif isinstance(path, dict):
        recipe = rc.from_dict(path, sets)
    else:
        recipe = rc.load(path, sets)
    return run(recipe, out, force=force, on_event=on_event)


__all__ = ["DeployoptError", "RunResult", "plan", "run", "run_path", "TMP_PREFIX"]
