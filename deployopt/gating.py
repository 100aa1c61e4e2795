"""The gate's measuring side: measure a model against budgets, read recorded results from a
report, and compare a model with a baseline. Judging itself is in :mod:`deployopt.judge`."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from deployopt.benchmark import BenchResult, BenchSpec, bench_models, resolve_shapes
from deployopt.errors import ConfigError, UsageError
from deployopt.judge import COSINES, Budget, Check, Measurement, judge_budget, judge_regression
from deployopt.presets import SessionSettings, Target, apply_session
from deployopt.stats import ratio_ci


@dataclass(frozen=True)
class ModelId:
    """What the history records of a model: a name, its content hash and its lineage."""

    name: str
    path: Path
    sha256: str
    lineage: tuple[str, ...]


def identify(path: Path, name: str | None = None) -> ModelId:
    """Name (``--name`` or the file stem), sha256 of the model file, and the chain of variants
    that made it when it sits in a deployopt output folder."""
    from deployopt.workspace import sha256_file

    path = Path(path)
    lineage: list[str] = []
    meta = path.with_name("variant.json")
    if meta.exists():  # OUT/variants/<id>/model.onnx: walk the parents
        cur = json.loads(meta.read_text())
        while cur:
            lineage.insert(0, cur["name"])
            parent = cur.get("parent")
            nxt = path.parent.parent / str(parent) / "variant.json" if parent else None
            cur = json.loads(nxt.read_text()) if nxt and nxt.exists() else None
    elif path.name == "best.onnx" and path.with_name("report.json").exists():
        doc = json.loads(path.with_name("report.json").read_text())
        winner = (doc.get("choice") or {}).get("winner")
        chain = next((v["chain"] for v in doc.get("variants", []) if v["name"] == winner), [])
        lineage = list(chain)
    label = name or (path.parent.name if path.stem in ("model", "best") else path.stem)
    return ModelId(label, path, sha256_file(path), tuple(lineage) or (path.name,))


def spec_for(budget: Budget, min_samples: int, min_seconds: float, rounds: int) -> BenchSpec:
    return BenchSpec(
        batch=budget.batch,
        seq=budget.seq,
        shapes=budget.bench_shapes(),
        min_samples=max(min_samples, budget.min_samples()),
        min_seconds=min_seconds,
        rounds=rounds,
    )


def with_session(
    targets: Mapping[str, Target], names: Iterable[str], session: SessionSettings | None
) -> dict[str, Target]:
    """``targets`` with ``session`` applied to those named in ``names`` (the ones a gate
    measures on; applying it to the others could refuse an EP nobody asked for)."""
    if session is None:
        return dict(targets)
    wanted = set(names)
    return {n: apply_session(t, session) if n in wanted else t for n, t in targets.items()}


def cosine_to_reference(
    model: Path, reference: Path, threads: int | None, timeout_s: float
) -> tuple[dict[str, float], str]:
    """Cosine of ``model``'s outputs to ``reference``'s on the evaluation data that ``optimize``
    would use for the reference (bundled sentences for text models with a tokenizer beside
    them, seeded synthetic inputs otherwise): ``{"mean_cosine": mean over the samples,
    "min_cosine": the worst sample}`` (worst output for both), and what it was measured on."""
    from deployopt.config import make_config
    from deployopt.inputs import specs_from_onnx
    from deployopt.parity import EXACT, compare
    from deployopt.runner import build_data
    from deployopt.runtime.session import model_outputs
    from deployopt.runtime.worker import run_in_worker
    from deployopt.sources import load_source

    src = load_source(str(reference))
    specs = specs_from_onnx(src.path)
    evaluation, _, desc = build_data(src, specs, make_config(threads=threads))
    ref = run_in_worker(
        model_outputs, src.path, evaluation, threads, timeout_s=timeout_s, label="reference"
    )
    got = run_in_worker(
        model_outputs, model, evaluation, threads, timeout_s=timeout_s, label="model"
    )
    summary = compare(ref, got, EXACT).summary()
    cosines = {k: float(summary[k]) for k in ("mean_cosine", "min_cosine")}
    return cosines, f"vs {reference.name} on {desc['eval']}"


def measure_budgets(
    model: Path,
    budgets: Sequence[Budget],
    targets: Mapping[str, Target],
    *,
    min_samples: int = 60,
    min_seconds: float = 3.0,
    rounds: int = 3,
    reference: Path | None = None,
    timeout_s: float = 600.0,
    log: Callable[[str], None] = lambda s: None,
) -> tuple[list[Check], list[BenchResult]]:
    """Measure ``model`` at each budget's target and shape, then judge every budget."""
    from deployopt.stages.base import size_bytes

    size_mb = size_bytes(model) / 1e6
    cosines: dict[str, float] = {}
    note = "no reference to measure cosine against: pass --reference REF.onnx"
    if reference is not None and any(set(b.limits()) & set(COSINES) for b in budgets):
        log(f"gate: cosine of {model.name} vs {reference.name}")
        cosines, note = cosine_to_reference(model, reference, None, timeout_s)
    for b in budgets:
        if b.target not in targets:
            raise UsageError(
                f"budget for unknown target {b.target!r}",
                hint="known targets: " + ", ".join(sorted(targets)),
            )
    checks: list[Check] = []
    results: list[BenchResult] = []
    measured: dict[tuple, BenchResult] = {}
    for b in budgets:
        target = targets[b.target]
        spec = spec_for(b, min_samples, min_seconds, rounds)
        r = None
        if b.needs_latency():
            key = (b.target, spec)
            if key not in measured:
                log(f"gate: measuring {model.name} on {target.describe()}, {b.label}")
                measured[key] = bench_models(
                    {model.name: str(model)}, target, spec, log=log, timeout_s=timeout_s
                )[model.name]
                results.append(measured[key])
            r = measured[key]
        m = Measurement(
            target=b.target,
            shapes=r.shapes if r else {},
            samples_ms=r.samples_ms if r else (),
            batch=r.batch if r else b.batch,
            invalid=r.invalid if r else (),
            size_mb=size_mb,
            cosine=cosines.get("mean_cosine"),
            worst_cosine=cosines.get("min_cosine"),
            cosine_note=note,
        )
        checks += judge_budget(b, m)
    return checks, results


def read_report(path: Path) -> dict:
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"{path}: no such report") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not a JSON report ({e})") from None
    from deployopt.report import READABLE_SCHEMAS, load_samples

    found = doc.get("schema") if isinstance(doc, dict) else None
    if found not in READABLE_SCHEMAS:
        raise ConfigError(
            f"{path}: not a deployopt report (schema {found!r})",
            hint="pass the report.json that `deployopt optimize` wrote",
        )
    return load_samples(doc, Path(path).parent)  # the latency samples from samples.npz


def judge_report(
    path: Path, budgets: Sequence[Budget], variant: str | None = None
) -> tuple[list[Check], str, list[dict]]:
    """Judge budgets on the results a report recorded, without measuring again. Returns the
    checks, the variant judged and its bench results (JSON)."""
    from deployopt.inputs import specs_from_onnx

    doc = read_report(path)
    name = variant or (doc.get("choice") or {}).get("winner")
    if not name:
        raise UsageError(
            f"{path}: the report chose no variant", hint="name one with --variant NAME"
        )
    v = next((x for x in doc["variants"] if x["name"] == name), None)
    if v is None:
        names = ", ".join(x["name"] for x in doc["variants"])
        raise UsageError(f"{path}: no variant {name!r}", hint=f"variants: {names}")
    target = (doc.get("target") or {}).get("name")
    model = Path(path).parent / v["path"] if v.get("path") else None
    specs = specs_from_onnx(model) if model and model.exists() else None
    parity = v.get("parity") or {}
    cosine, worst = parity.get("mean_cosine"), parity.get("min_cosine")
    note = (
        f"vs {parity.get('against', 'its reference')}, recorded"
        if cosine is not None
        else ("the report has no parity for this variant")
    )
    size_mb = v["size_bytes"] / 1e6 if v.get("size_bytes") else None
    checks: list[Check] = []
    for b in budgets:
        want = None
        if specs is not None:
            spec = BenchSpec(batch=b.batch, seq=b.seq, shapes=b.bench_shapes())
            want = {k: list(d) for k, d in resolve_shapes(specs, spec).items()}
        r = next((r for r in v.get("bench", []) if want is None or r["shapes"] == want), None)
        shapes = r["shapes"] if r else {}
        m = Measurement(
            target=target or "none (the report has no benchmark)",
            shapes=shapes,
            samples_ms=r["samples_ms"] if r else (),
            batch=next(iter(shapes.values()))[0] if shapes else b.batch,
            invalid=r["invalid"] if r else (f"the report has no result at {b.label}",),
            size_mb=size_mb,
            cosine=cosine,
            worst_cosine=worst,
            cosine_note=note,
        )
        checks += judge_budget(b, m)
    return checks, name, list(v.get("bench", []))


def regression(
    new: Path,
    baseline: Path,
    target: Target,
    spec: BenchSpec,
    max_slowdown: float,
    processes: int = 3,
    timeout_s: float = 600.0,
    log: Callable[[str], None] = lambda s: None,
) -> tuple[Check, list[BenchResult]]:
    """Measure ``new`` and ``baseline`` interleaved in ``processes`` pairs of fresh workers
    (the order alternating), pair their rounds, and judge the ratio of medians."""
    label = f"{target.name} {'batch ' + str(spec.batch) if not spec.shapes else 'shape'}"
    new_rounds: list[float] = []
    old_rounds: list[float] = []
    pairs: list[int] = []
    results: list[BenchResult] = []
    for p in range(processes):
        pair = [("new", new), ("baseline", baseline)]
        order = dict(pair if p % 2 == 0 else pair[::-1])
        log(f"gate: regression, process pair {p + 1}/{processes}")
        res = bench_models(
            {k: str(v) for k, v in order.items()}, target, spec, log=log, timeout_s=timeout_s
        )
        results += list(res.values())
        bad = [f"{k}: {'; '.join(r.invalid)}" for k, r in res.items() if not r.valid]
        if bad:
            return judge_regression(label, None, max_slowdown, "; ".join(bad)), results
        n = min(len(res["new"].round_p50_ms), len(res["baseline"].round_p50_ms))
        new_rounds += res["new"].round_p50_ms[:n]
        old_rounds += res["baseline"].round_p50_ms[:n]
        pairs += [p] * n
    if len(new_rounds) < 2:
        return judge_regression(label, None, max_slowdown, "fewer than 2 rounds"), results
    return judge_regression(
        label, ratio_ci(new_rounds, old_rounds, paired=True, groups=pairs), max_slowdown
    ), results


def regression_vs_samples(
    new: Path,
    baseline_samples: Sequence[float],
    baseline_label: str,
    target: Target,
    spec: BenchSpec,
    max_slowdown: float,
    timeout_s: float = 600.0,
    log: Callable[[str], None] = lambda s: None,
) -> tuple[Check, list[BenchResult]]:
    """Measure ``new`` now and compare its median with recorded samples (unpaired: machine
    drift since the baseline was measured is not cancelled, so the interval is wider)."""
    label = f"{target.name} batch {spec.batch} vs {baseline_label}"
    r = bench_models({"new": str(new)}, target, spec, log=log, timeout_s=timeout_s)["new"]
    if not r.valid:
        return judge_regression(label, None, max_slowdown, "; ".join(r.invalid)), [r]
    ratio = ratio_ci(list(r.samples_ms), list(baseline_samples), paired=False)
    return judge_regression(label, ratio, max_slowdown), [r]
