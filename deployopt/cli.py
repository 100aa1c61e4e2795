"""Command line. The ONLY place that maps errors and verdicts to exit codes.

The flags of optimize, distill, prune, bench and gate are derived from the option models
(deployopt.config, deployopt.options) by deployopt.flags; each command compiles its flags into
a recipe (deployopt.recipe), which ``--print-recipe`` prints and ``deployopt run`` runs.

Exit codes: 0 success (gate PASS), 1 gate FAIL, 2 usage or config error, 3 gate INCONCLUSIVE,
4 run invalid (runtime missing, EP fallback, crash; gate INVALID), 5 input model rejected, 6 no
viable variant, 7 unsafe input refused, 8 export parity failed, 70 internal error.
"""

from __future__ import annotations

import inspect
import sys
import traceback
from pathlib import Path
from typing import Annotated, Any

import typer

from deployopt import errors
from deployopt import flags as fl
from deployopt.config import OptimizeConfig
from deployopt.display import console, err_console, styled
from deployopt.judge import GATE_HELP
from deployopt.options import (
    PACKAGED,
    BenchOptions,
    DistillOptions,
    GateOptions,
    PruneOptions,
    SourceOptions,
)

app = typer.Typer(
    name="deployopt",
    help="Make a model smaller and faster for deployment with ONNX Runtime, and prove it is "
    "still right.",
    no_args_is_help=True,
    epilog="Exit codes: 0 success (gate PASS), 1 gate FAIL, 2 usage/config error, 3 gate "
    "INCONCLUSIVE, 4 run invalid (runtime missing, EP fallback, crash; gate INVALID), 5 input "
    "model rejected, 6 no viable variant, 7 unsafe input refused, 8 export parity failed, "
    "70 internal error.",
    add_completion=False,
    rich_markup_mode="markdown",  # docstring paragraphs reflow to the terminal width
    pretty_exceptions_enable=False,
)
_state = {"verbose": False}
K = inspect.Parameter.KEYWORD_ONLY


def _param(name: str, ann: Any, default: Any = None) -> inspect.Parameter:
    return inspect.Parameter(name, K, default=default, annotation=ann)


def _arg(name: str, typ: Any, help: str, default: Any = inspect.Parameter.empty):
    return _param(name, Annotated[typ, typer.Argument(help=help, show_default=False)], default)


# the flags every derived command has besides its options (the coverage test lists them)
COMMON = [
    _param("out", Annotated[Path | None, typer.Option("--out", "-o", help="Output folder.")]),
    _param(
        "print_recipe",
        Annotated[
            bool,
            typer.Option(
                "--print-recipe",
                help="Print the recipe these flags make (for `deployopt run`), and exit.",
            ),
        ],
        False,
    ),  # fmt: skip
    _param(
        "sets",
        Annotated[
            list[str] | None,
            typer.Option(
                "--set", metavar="TABLE.KEY=VALUE", help="Override one recipe value (repeatable)."
            ),
        ],
    ),  # fmt: skip
]


@app.callback()
def _root(
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Show tracebacks and debug logs.")
    ] = False,
) -> None:
    _state["verbose"] = verbose


def _recipe(data: dict[str, Any], sets: list[str] | None):
    from deployopt import recipe as rc

    return rc.from_dict(data, sets or (), where=rc.FLAGS)


def _printed(recipe, print_recipe: bool) -> bool:
    if print_recipe:
        from deployopt.recipe import to_toml

        sys.stdout.write(to_toml(recipe))
    return print_recipe


def _need_out(out: Path | None) -> Path:
    if out is None:
        raise errors.UsageError("missing option --out / -o", hint="give the output folder")
    return out


# ---------------------------------------------------------------- optimize


def _optimize(given, source: str, out, print_recipe, sets, force: bool) -> None:
    """Export a model, build validated variants, benchmark them and ship the best one.

    Every variant is proved against its reference on an evaluation set; one outside tolerance
    is kept out and recorded with its numbers. The variants that pass are measured on the
    target in interleaved rounds, and the fastest one meeting the constraints is copied to
    OUT/best.onnx. Results: OUT/best.onnx, OUT/best.session.json (the session settings the
    chosen model was measured fastest with), OUT/report.{json,md,html}, OUT/manifest.json and
    OUT/variants/ID/. Exit 6 when no variant qualifies, with every rejection's reason (then
    nothing is shipped). Exit 4 when OUT cannot be written (checked first) or the disk fills up.
    """
    from deployopt import commands, display

    src = {"path": source, **given.get("source", {})}
    recipe = _recipe({"source": src, "optimize": given.get("optimize", {})}, sets)
    if _printed(recipe, print_recipe):
        return
    cfg = recipe.optimize
    steps = len(cfg.bench_batches) * cfg.bench_rounds + 1 if cfg.bench else 0
    try:
        with display.OptimizeProgress(cfg.variants, steps) as prog:
            result = commands.optimize(source, recipe.source, cfg, _need_out(out), prog.log,
                                       recipe.source.weights, force, on_event=prog.event)  # fmt: skip
    except errors.NoViableVariantError as e:  # the table says why, then the exit code
        if e.result is not None:
            display.print_table(e.result)
        raise
    display.print_table(result)


fl.command(
    app, "optimize",
    [fl.params("source", SourceOptions, skip=("path",)), fl.params("optimize", OptimizeConfig)],
    [_arg("source", str, SourceOptions.model_fields["path"].description), *COMMON,
     _param("force", Annotated[bool, typer.Option("--force", help="Rebuild variants even when "
            "a finished one with the same id exists.")], False)],
    _optimize,
    epilog="Examples:\n\n  deployopt optimize minilm -o out\n\n"
    "  deployopt optimize ./my-bert-folder -o out --variants fuse,int8-dynamic\n\n"
    "  deployopt optimize model.onnx -o out --calibration calib.npz\n\n"
    "  deployopt optimize detector.onnx -o out --calibration images/ --eval val-images/\n\n"
    "  deployopt optimize mypkg.models:make_cnn --input-shape x=1x3x32x32 -o out\n\n"
    "  deployopt optimize minilm -o out --print-recipe > recipe.toml",
)  # fmt: skip


# ---------------------------------------------------------------- bench


def _bench(given, models: list[Path], out, print_recipe, sets) -> None:
    """Measure latency (p50/p90/p95/p99 with a CI of the median, cold start) and throughput.

    Each model runs in its own worker process; a crash or hang makes that result INVALID, never
    a dead run. A session that does not run on the requested provider is INVALID too (exit 4).
    Several models are measured in interleaved rounds, so the ratios between them hold.
    """
    from deployopt import commands, display

    opts = dict(given.get("bench", {}))
    opts["compare"] = [*map(str, models[1:]), *opts.get("compare", [])]
    recipe = _recipe({"source": {"path": str(models[0])}, "bench": opts}, sets)
    if _printed(recipe, print_recipe):
        return
    with err_console.status("measuring ...") as status:
        results = commands.bench([recipe.source.path], recipe.bench, lambda m: status.update(m))
    for tgt in dict.fromkeys(r.target for r in results):  # a table per target (--targets)
        group = [r for r in results if r.target == tgt]
        display.print_bench_results(group)
        env = group[0].env
        if "node_id" in env:
            mismatch = " [yellow]VERSION MISMATCH with this machine[/]" * (
                env.get("version_mismatch") == "yes")  # fmt: skip
            console.print(f"node {env['node_hostname']} ({env['node_id'][:12]}), onnxruntime "
                          f"{env['node_onnxruntime']}, deployopt {env['node_deployopt']}"
                          + mismatch, highlight=False)  # fmt: skip
    if recipe.bench.json_out:
        from deployopt.workspace import write_json

        write_json(recipe.bench.json_out, commands.bench_document(results))
    if any(not r.valid for r in results):
        sys.exit(errors.EXIT_INVALID_RUN)


fl.command(
    app, "bench", [fl.params("bench", BenchOptions)],
    [_arg("models", list[Path], "One or more .onnx models; several are measured in interleaved "
          "rounds. An optimize output folder stands for its best.onnx under its "
          "best.session.json."), *COMMON],
    _bench,
    epilog="Examples:\n\n  deployopt bench model.onnx --batch 1,8 --seq 128 --threads 2\n\n"
    "  deployopt bench fp32.onnx int8.onnx --target cpu-1t --json bench.json\n\n"
    "  deployopt bench model.onnx --shape x=4x3x224x224 --ep cuda\n\n"
    "  deployopt bench out/ --target cpu  # out/best.onnx under out/best.session.json\n\n"
    "  deployopt bench a.onnx b.onnx --targets edge,x86 --config targets.toml --cluster auto",
)  # fmt: skip


# ---------------------------------------------------------------- gate


def _gate(given, model: Path | None, out, print_recipe, sets) -> None:
    """Fail a CI job when a model breaks its latency budget or regresses.

    Measures MODEL.onnx (or reads --report) and judges every budget with a confidence
    interval: FAIL only when a limit is broken with confidence, INCONCLUSIVE when the machine
    was too noisy to decide. With --baseline, both models are measured interleaved in several
    worker processes and the ratio of medians is tested (paired by round, bootstrap CI).
    """
    from deployopt import commands, display

    data: dict[str, Any] = {"gate": given.get("gate", {})}
    if model is not None:
        data["source"] = {"path": str(model)}
    recipe = _recipe(data, sets)
    if _printed(recipe, print_recipe):
        return
    path = recipe.source.path if recipe.source else None
    with err_console.status("gate: measuring ...") as status:
        result = commands.gate(path, recipe.gate, None, lambda m: status.update(m))
    display.print_gate(result)
    commands.write_gate_outputs(result, recipe.gate)
    sys.exit(result.verdict.exit_code)


fl.command(
    app, "gate", [fl.params("gate", GateOptions)],
    [_arg("model", Path | None, "The .onnx model to measure and judge now, or an optimize "
          "output folder (its best.onnx under its best.session.json).", None), *COMMON],
    _gate, epilog=GATE_HELP,
)  # fmt: skip


# ---------------------------------------------------------------- distill


def _distill(given, out, print_recipe, sets) -> None:
    """Distil a teacher into a smaller student that `deployopt optimize` takes as is.

    Soft-label KD (Hinton et al.: T^2-scaled KL, mixed with hard labels by alpha), hidden-state
    MSE through a learned projection, attention-distribution KL, and pooled-embedding
    distillation for sentence encoders (unlabelled text is enough). Checkpoints go to
    OUT/work; run the same command again to resume after an interruption.
    """
    from deployopt import commands, display
    from deployopt.torchside.train import dist_info

    data = {"source": given.get("source", {}), "distill": given.get("distill", {})}
    recipe = _recipe(data, sets)
    if _printed(recipe, print_recipe):
        return
    rank, _ = dist_info()
    log = display.log_line if rank == 0 else (lambda m: None)
    res = commands.distill(recipe.source.path, recipe.source, recipe.distill, _need_out(out), log)
    if rank == 0:
        display.print_distill(res)


fl.command(
    app, "distill",
    [fl.params("source", SourceOptions, skip=("weights",),
               rename={"path": "--teacher"}), fl.params("distill", DistillOptions)],
    COMMON, _distill,
    epilog="Examples:\n\n"
    "  deployopt distill --teacher minilm --data reuters-r8 -o student-out --student-layers 0,2,5\n\n"
    "  deployopt distill --teacher ./bert-clf --data train.csv --labels-column label -o out "
    "--student-layers 0,11 --loss kd\n\n"
    "  deployopt distill --teacher models.fashion:teacher --student models.fashion:student "
    "--input-shape x=1x1x28x28 --data fashion-mnist --eval-data fashion-mnist-test -o out\n\n"
    "  torchrun --nproc_per_node 2 -m deployopt distill ...   (DistributedDataParallel)\n\n"
    f"Packaged datasets for --data: {PACKAGED}.",
)  # fmt: skip


# ---------------------------------------------------------------- prune


def _prune(given, model: str, out, print_recipe, sets) -> None:
    """Prune a model so its tensors really shrink, and recover its accuracy.

    Transformers (BERT family): attention heads, FFN neurons and whole layers are removed, so
    the ONNX file is smaller and runs faster. CNNs: channels, through Torch-Pruning's
    dependency graph (residuals, BatchNorm and grouped convolutions stay consistent).
    Unstructured: single weights set to zero, which only helps compressed size. The output
    folder goes straight into `deployopt optimize`; OUT/prune_report.json records what was
    removed and the metrics before and after recovery.
    """
    from deployopt import commands, display

    src = {"path": model, **given.get("source", {})}
    recipe = _recipe({"source": src, "prune": given.get("prune", {})}, sets)
    if _printed(recipe, print_recipe):
        return
    res = commands.prune(model, recipe.source, recipe.prune, _need_out(out), display.log_line,
                         recipe.source.weights)  # fmt: skip
    display.print_prune(res)


fl.command(
    app, "prune",
    [fl.params("source", SourceOptions, skip=("path",)), fl.params("prune", PruneOptions)],
    [_arg("model", str, "HF folder, 'minilm', pkg.module:factory (with --input-shape), or a "
          "folder written by deployopt distill/prune."), *COMMON],
    _prune,
    epilog="Examples:\n\n"
    "  deployopt prune minilm -o pruned --heads 0.33 --ffn 0.5 --data 20newsgroups "
    "--recover-epochs 2\n\n"
    "  deployopt prune ./bert-clf -o small --drop-layers 10,11 --ffn 0.3 --data train.csv "
    "--labels-column label --importance gradient\n\n"
    "  deployopt prune models.cnn:make --input-shape x=1x3x32x32 -o cnn-half --channels 0.5 "
    "--data images/ --recover-epochs 3\n\n"
    "  deployopt prune minilm -o sparse --unstructured 0.5   (zeros: smaller when "
    "compressed, not faster)\n\nThen: deployopt optimize OUT -o OUT-onnx",
)  # fmt: skip


# ---------------------------------------------------------------- run, presets, history


@app.command(
    epilog="Examples:\n\n  deployopt run models/minilm/recipe.toml -o out\n\n"
    "  deployopt run recipe.toml -o out --set prune.heads=0.5\n\n"
    "  deployopt run recipe.toml -o out --force prune   (prune and everything after it)\n\n"
    "Tables: [source], [distill], [prune], [optimize], [bench], [gate], [targets.NAME]; "
    "their keys are the flags of the matching command (`deployopt optimize --help`, ...), "
    "with underscores. `deployopt presets` lists the presets a recipe can start from."
)
def run(
    recipe: Annotated[Path, typer.Argument(help="The recipe (TOML).", show_default=False)],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Output folder.")] = None,
    force: Annotated[
        list[str] | None,
        typer.Option(help="Rebuild this stage and everything after it (repeatable)."),
    ] = None,  # fmt: skip
    sets: Annotated[
        list[str] | None,
        typer.Option(
            "--set", metavar="TABLE.KEY=VALUE", help="Override one recipe value (repeatable)."
        ),
    ] = None,  # fmt: skip
    print_recipe: Annotated[
        bool,
        typer.Option(
            "--print-recipe",
            help="Print the recipe as it will run (preset and --set folded in), and exit.",
        ),
    ] = False,  # fmt: skip
) -> None:
    """Run a recipe: source -> [distill] -> [prune] -> [optimize] -> [bench] -> [gate].

    Each stage's output is cached under OUT/stages/ by a content id (its parent, its options,
    the data it read): an unchanged stage is reused, a changed one re-runs with everything
    after it, and a killed run resumes where it stopped. The exit code is the gate's verdict,
    or the usual codes when a stage fails. OUT/report.json and OUT/report.md trace the
    lineage from the source to best.onnx.
    """
    from deployopt import display, pipeline
    from deployopt import recipe as rc

    r = rc.load(recipe, sets or ())
    if _printed(r, print_recipe):
        return
    if r.search is not None:
        raise errors.UsageError(f"{recipe}: a [search] recipe", hint="run it with deployopt search")
    with display.StageLines() as lines:
        result = pipeline.run(r, _need_out(out), force=force or (), on_event=lines.event)
    for line in (f"report: {result.report}", f"best: {result.best}" if result.best else ""):
        if line:
            console.print(line, highlight=False)
    if result.verdict:
        colour = "green" if result.verdict == "PASS" else "red"
        err_console.print(styled(f"gate: {result.verdict}", f"bold {colour}"))
    sys.exit(result.exit_code)


@app.command(epilog="Example:\n\n  deployopt search search.toml -o out")
def search(
    recipe: Annotated[Path, typer.Argument(help="A recipe with a [search] table.")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Output folder.")] = None,
) -> None:
    """Find the fastest chain of distillation, pruning and quantization within an accuracy
    budget. [search] keys: student_layers, heads, ffn, channels, variants, sessions (each a
    list of choices), max_accuracy_drop (points vs the original on [optimize] eval +
    labels_column), objective (latency, or pareto: metric and latency with NSGA-II),
    prune_dominated, max_trials, max_minutes, sampler (auto, grid, tpe, nsga2), seed. Stages
    are cached and shared between trials; a killed search resumes. Writes OUT/best.onnx,
    OUT/search.{json,md,png}; exit 6 when no trial meets the budget."""
    from deployopt import display
    from deployopt import recipe as rc
    from deployopt import search as srch

    r = rc.load(recipe)
    if r.search is None:
        raise errors.UsageError(f"{recipe}: no [search] table", hint="run it with deployopt run")
    with display.StageLines() as lines:
        doc = srch.run(r, _need_out(out), on_event=lines.event)
    console.print(Path(_need_out(out) / "search.md").read_text(), highlight=False)
    console.print(f"best: {doc['best']}", highlight=False)


@app.command()
def presets() -> None:
    """List the presets a recipe can start from (`preset = "NAME"`), with their contents."""
    from deployopt.recipe import PRESET_HELP, PRESETS, preset_toml

    for name in PRESETS:
        console.print(styled(name, "bold", f": {PRESET_HELP[name]}"), highlight=False)
        console.print(preset_toml(name), highlight=False)


HistoryOpt = Annotated[str | None, typer.Option(
    help="Results database: a path, sqlite:///PATH or postgresql://USER@HOST/DB (default "
    ".deployopt/history.sqlite or $DEPLOYOPT_HISTORY).")]  # fmt: skip


@app.command(
    "history",
    epilog="Examples:\n\n  deployopt history --model best --target cpu --limit 20\n\n"
    "  deployopt history --compare\n\n  deployopt history --model best --plot p50.png\n\n"
    "  deployopt history --history postgresql://ci@db/deployopt --compare --plot targets.png",
)
def history_cmd(
    model: Annotated[str | None, typer.Option(help="Only this model name.")] = None,
    target: Annotated[str | None, typer.Option(help="Only this target.")] = None,
    kind: Annotated[str | None, typer.Option(help="Only bench or gate results.")] = None,
    batch: Annotated[int | None, typer.Option(help="Only this batch size.")] = None,
    verdict: Annotated[
        str | None, typer.Option(help="Only gate results with this verdict.")
    ] = None,
    since: Annotated[str | None, typer.Option(help="Only results since YYYY-MM-DD.")] = None,
    limit: Annotated[int, typer.Option(help="Most rows to list (newest first).")] = 30,
    compare: Annotated[
        bool,
        typer.Option(
            "--compare",
            help="The latest p50 of each model on each target, side by side, "
            "with the change since the previous result on that target.",
        ),
    ] = False,  # fmt: skip
    plot: Annotated[
        Path | None,
        typer.Option(
            help="Write a PNG of p50 over time (with --compare: the targets side by side)."
        ),
    ] = None,  # fmt: skip
    json_out: Annotated[
        Path | None,
        typer.Option("--json", help="Write the rows (with --compare: the comparison) as JSON."),
    ] = None,
    history: HistoryOpt = None,
) -> None:
    """List, filter and compare recorded bench and gate results across targets and over time."""
    from deployopt import history_view as hist

    if kind is not None and kind not in ("bench", "gate"):
        raise errors.UsageError(f"bad --kind {kind!r}", hint="bench or gate")
    filters = dict(model=model, target=target, kind=kind, batch=batch, since=since,
                   verdict=verdict.upper() if verdict else None)  # fmt: skip
    hist.show(console, history, filters, limit=limit, compare=compare, plot=plot, json_out=json_out)


# ---------------------------------------------------------------- entry point


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app, map errors to exit codes in one place."""
    try:
        rc = app(args=argv, standalone_mode=False)
    except errors.DeployoptError as e:
        if _state["verbose"]:
            traceback.print_exc()
        # soft_wrap: a long path is never broken across lines (CI logs are searched for it)
        err_console.print(styled("error:", "bold red", f" {e.message}"), soft_wrap=True)
        if e.hint:
            err_console.print(styled("hint:", "bold", f" {e.hint}"), soft_wrap=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        rc = 130
    except SystemExit:
        raise
    except Exception as e:
        # Usage errors from click (typer vendors its own copy, so match by shape, not class).
        if callable(getattr(e, "show", None)) and isinstance(getattr(e, "exit_code", None), int):
            e.show()
            sys.exit(errors.EXIT_USAGE)
        if type(e).__name__ == "Abort":
            rc = 130
        else:
            _internal_error()
    # click/typer turn Ctrl-C into a return value of 130 without standalone mode: never exit 0
    # for an interrupted run (a cancelled CI gate must not read as PASS)
    if rc == 130:
        err_console.print(styled("error:", "bold red", " interrupted (exit 130); finished "
                                 "variants are kept, nothing half-written"))  # fmt: skip
    sys.exit(rc if isinstance(rc, int) else 0)


def _internal_error() -> None:
    traceback.print_exc()
    err_console.print(styled("internal error", "bold red",
                             " (a bug in deployopt: please report it with the traceback above)"))  # fmt: skip
    sys.exit(errors.EXIT_INTERNAL)
