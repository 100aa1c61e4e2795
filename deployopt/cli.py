"""Command line. The ONLY place that maps errors and verdicts to exit codes.

Exit codes: 0 success (gate PASS), 1 gate FAIL, 2 usage or config error, 3 gate INCONCLUSIVE,
4 run invalid (runtime missing, EP fallback, crash; gate INVALID), 5 input model rejected, 6 no
viable variant, 7 unsafe input refused, 8 export parity failed, 70 internal error.
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.text import Text

from deployopt import errors

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


def _width(stream) -> int | None:
    """Logs and CI pages are wider than rich's 80-column default for a non-terminal."""
    return None if stream.isatty() or "COLUMNS" in os.environ else 132


# markup off: messages carry user text (file names, TOML tables such as [[budgets]], reasons
# from libraries) that rich would read as tags and eat (issue 12); styled parts go through
# styled(), which never parses text
err_console = Console(stderr=True, width=_width(sys.stderr), markup=False)
console = Console(width=_width(sys.stdout), markup=False)


def styled(label: str, style: str, rest: str = "") -> Text:
    """``label`` in ``style`` followed by ``rest``, both printed literally (no markup)."""
    return Text.assemble((label, style), rest)


_state = {"verbose": False}

TimeoutOpt = Annotated[float, typer.Option(help="Seconds before a hung measurement is killed.")]
HistoryOpt = Annotated[
    Path | None,
    typer.Option(
        help="Results database (default .deployopt/history.sqlite or $DEPLOYOPT_HISTORY)."
    ),
]
NoHistoryOpt = Annotated[bool, typer.Option("--no-history", help="Do not record the results.")]
SessionOpt = Annotated[
    Path | None,
    typer.Option(
        help="Session file (OUT/best.session.json of optimize): its threads, graph optimization "
        "and session config replace the target's (default: the folder's, for a MODEL folder)."
    ),
]


@app.callback()
def _root(
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Show tracebacks and debug logs.")
    ] = False,
) -> None:
    _state["verbose"] = verbose


@app.command(
    epilog="Examples:\n\n"
    "  deployopt optimize minilm -o out\n\n"
    "  deployopt optimize ./my-bert-folder -o out --variants fuse,int8-dynamic\n\n"
    "  deployopt optimize model.onnx -o out --calibration calib.npz\n\n"
    "  deployopt optimize detector.onnx -o out --calibration images/ --eval val-images/\n\n"
    "  deployopt optimize detector.onnx -o out --input-shape images=1x3x640x640\n\n"
    "  deployopt optimize mypkg.models:make_cnn --input-shape x=1x3x32x32 -o out"
)
def optimize(
    source: Annotated[
        str,
        typer.Argument(
            help="HF model folder, .onnx file, pkg.module:factory, or 'minilm' (bundled)."
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")],
    variants: Annotated[
        str, typer.Option(help="Comma-separated: fuse,int8-dynamic,int8-static,fp16.")
    ] = "fuse,int8-dynamic,int8-static,fp16",
    calibration: Annotated[
        Path | None,
        typer.Option(
            help="Calibration data: text file (one example a line), .jsonl/.csv with 'text', "
            ".npz, or a folder of images (resized to the model's input, normalised as "
            "preprocessor_config.json or --image-mean/--image-std say)."
        ),
    ] = None,
    evaluation: Annotated[
        Path | None,
        typer.Option(
            "--eval",
            help="Evaluation data for parity (same formats). Default: bundled sentences for "
            "text models, seeded synthetic inputs otherwise (the report warns when an image "
            "model was judged on noise).",
        ),
    ] = None,
    opset: Annotated[int, typer.Option(help="ONNX opset for the export.")] = 18,
    input_shape: Annotated[
        list[str] | None,
        typer.Option(
            "--input-shape",
            help="NAME=DIMS, repeat per input. Required for a PyTorch factory "
            "(x=1x3x32x32). For an .onnx file it settles symbolic dims (the first, the batch, "
            "comes from --batch-size and --batch); without it an image input's symbolic "
            "height/width is the size in the model's metadata, else the first of "
            "224, 256, 320, 384, 448, 512, 640 the model runs at.",
        ),
    ] = None,
    image_mean: Annotated[
        str | None,
        typer.Option(
            help="Per-channel mean for image folders, after scaling pixels to [0, 1], e.g. "
            "0.485,0.456,0.406 (default: preprocessor_config.json beside the model, else 0)."
        ),
    ] = None,
    image_std: Annotated[
        str | None,
        typer.Option(help="Per-channel std for image folders, e.g. 0.229,0.224,0.225 (default 1)."),
    ] = None,
    weights: Annotated[
        Path | None,
        typer.Option(
            help="State dict for a factory's module: .safetensors, or a tensors-only torch pickle."
        ),
    ] = None,
    pooling: Annotated[
        str | None,
        typer.Option(
            help="Feature extractors: mean, cls or none (default: read from a sentence-transformers folder, else none)."
        ),
    ] = None,
    trust_remote_code: Annotated[
        bool,
        typer.Option("--trust-remote-code", help="Allow a model folder's own Python code to run."),
    ] = False,
    threads: Annotated[
        int | None,
        typer.Option(
            help="onnxruntime intra-op threads for parity and the benchmark (default: all cores)."
        ),
    ] = None,
    calibration_samples: Annotated[
        int, typer.Option(help="Most samples used to calibrate static INT8.")
    ] = 64,
    max_length: Annotated[int, typer.Option(help="Token limit for text data.")] = 128,
    per_channel: Annotated[
        bool,
        typer.Option(
            "--per-channel/--per-tensor",
            help="INT8 weight scales per output channel (default) or per tensor.",
        ),
    ] = True,
    calibration_methods: Annotated[
        str,
        typer.Option(
            help="Static INT8 calibration methods the search may use: minmax,entropy,percentile."
        ),
    ] = "minmax,entropy,percentile",
    fp16_block_ops: Annotated[
        str,
        typer.Option(
            help="Op types to keep in fp32 in the fp16 variant, comma-separated (added to onnxruntime's default block list)."
        ),
    ] = "",
    force: Annotated[
        bool,
        typer.Option(
            "--force", help="Rebuild variants even when a finished one with the same id exists."
        ),
    ] = False,
    bench: Annotated[
        bool,
        typer.Option(
            "--bench/--no-bench",
            help="Benchmark the variants, choose one, write best.onnx (default), or stop after building them.",
            rich_help_panel="Benchmark and selection",
        ),
    ] = True,
    target: Annotated[
        str | None,
        typer.Option(
            help="Named target to benchmark on: cpu (all cores), cpu-1t, cuda, or one from --config.",
            rich_help_panel="Benchmark and selection",
        ),
    ] = None,
    ep: Annotated[
        str | None,
        typer.Option(
            help="Execution provider for an ad-hoc target (with --threads): cpu, cuda, tensorrt, ...",
            rich_help_panel="Benchmark and selection",
        ),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(
            help="TOML file with [targets.NAME] tables.", rich_help_panel="Benchmark and selection"
        ),
    ] = None,
    batch: Annotated[
        str,
        typer.Option(
            help="Batch sizes to benchmark, comma-separated; the first one decides the choice.",
            rich_help_panel="Benchmark and selection",
        ),
    ] = "1",
    seq: Annotated[
        int,
        typer.Option(
            help="Sequence length for text models' benchmark inputs.",
            rich_help_panel="Benchmark and selection",
        ),
    ] = 128,
    bench_samples: Annotated[
        int,
        typer.Option(
            help="Least timed runs per variant and batch size.",
            rich_help_panel="Benchmark and selection",
        ),
    ] = 60,
    bench_seconds: Annotated[
        float,
        typer.Option(
            help="Least timed seconds per variant and batch size.",
            rich_help_panel="Benchmark and selection",
        ),
    ] = 3.0,
    rounds: Annotated[
        int,
        typer.Option(
            help="Interleaved rounds the samples are spread over.",
            rich_help_panel="Benchmark and selection",
        ),
    ] = 3,
    min_cosine: Annotated[
        float,
        typer.Option(
            help="Least mean cosine to the fp32 reference a variant must keep.",
            rich_help_panel="Benchmark and selection",
        ),
    ] = 0.99,
    max_accuracy_drop: Annotated[
        float | None,
        typer.Option(
            help="Most task-metric drop (points) allowed vs the original.",
            rich_help_panel="Benchmark and selection",
        ),
    ] = None,
    max_size_mb: Annotated[
        float | None,
        typer.Option(
            help="Largest file size (MB) allowed.", rich_help_panel="Benchmark and selection"
        ),
    ] = None,
    max_latency_ms: Annotated[
        float | None,
        typer.Option(
            help="Latency budget (ms) on --metric at the first batch size.",
            rich_help_panel="Benchmark and selection",
        ),
    ] = None,
    metric: Annotated[
        str,
        typer.Option(
            help="Latency percentile the choice minimises: p50, p90, p95 or p99.",
            rich_help_panel="Benchmark and selection",
        ),
    ] = "p50",
    min_min_cosine: Annotated[
        float | None,
        typer.Option(
            help="Least cosine of the WORST evaluation sample a variant must keep (a worst-case "
            "bound; mixed-precision candidates, which keep the most error-prone MatMuls fp32, "
            "can meet it where plain INT8 cannot).",
            rich_help_panel="Benchmark and selection",
        ),
    ] = None,
    search: Annotated[
        str,
        typer.Option(
            help="Search effort. quick: one INT8 recipe per kind (the safe one for this CPU), "
            "no screening, winner-only session search. default: recipes derived from the CPU "
            "(fused parent, reduce-range and u8u8 where the CPU lacks VNNI, mixed precision), a "
            "short screening run, the 3 fastest measured in full, session search for the "
            "winner and a close runner-up. exhaustive: every recipe combination, the 5 "
            "fastest measured in full.",
            rich_help_panel="Benchmark and selection",
        ),
    ] = "default",
    tune_session: Annotated[
        bool,
        typer.Option(
            "--tune-session/--no-tune-session",
            help="CPU: search onnxruntime session settings (intra-op threads, spinning, "
            "SkipLayerNormFusion, graph optimization level) for the winner and close "
            "runners-up, measured interleaved; write the fastest to OUT/best.session.json.",
            rich_help_panel="Benchmark and selection",
        ),
    ] = True,
) -> None:
    """Export a model, build validated variants, benchmark them and ship the best one.

    Every variant is proved against its reference on an evaluation set; one outside tolerance
    is kept out and recorded with its numbers. The variants that pass are measured on the
    target in interleaved rounds, and the fastest one meeting the constraints is copied to
    OUT/best.onnx. Results: OUT/best.onnx, OUT/best.session.json (the session settings the
    chosen model was measured fastest with), OUT/report.{json,md,html}, OUT/manifest.json and
    OUT/variants/<id>/. Exit 6 when no variant qualifies, with every rejection's reason (then
    nothing is shipped). Exit 4 when OUT cannot be written (checked first) or the disk fills up.
    """
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from deployopt.api import optimize as run_optimize
    from deployopt.inputs import parse_shape_overrides

    names = tuple(v.strip() for v in variants.split(",") if v.strip())
    shapes = parse_shape_overrides(input_shape or [])
    batches = _batches(batch)
    steps = ["load", "export", *names]
    tail = len(batches) * rounds + 1 if bench else 1
    total = len(steps) + tail
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=err_console,
        transient=True,
    ) as progress:
        task = progress.add_task("loading model", total=total)

        def log(msg: str) -> None:
            progress.console.print(f"  {msg}", highlight=False)
            name, _, rest = msg.partition(": ")
            if name == "candidates":  # the quantization recipes, derived once fusion is done
                recipes = [r for r in rest.partition("): ")[2].split(", ") if r]
                rest_steps = [n for n in steps if not n.startswith("int8-")]
                at = rest_steps.index("fp16") if "fp16" in rest_steps else len(rest_steps)
                steps[:] = rest_steps[:at] + recipes + rest_steps[at:]
                progress.update(task, total=len(steps) + tail)
            if name in steps and rest.split(" ")[0] in ("ok", "FAILED", "skipped"):
                progress.advance(task)
                later = steps[steps.index(name) + 1 :]
                progress.update(
                    task,
                    description=f"building {later[0]} ..." if later else "benchmarking ...",
                )
            elif name == "bench" and rest.startswith("round "):
                progress.advance(task)
            elif name == "report":
                progress.advance(task)

        progress.advance(task)
        progress.update(task, description="exporting")
        result = run_optimize(
            source,
            out,
            variants=names,
            calibration=calibration,
            evaluation=evaluation,
            opset=opset,
            input_shapes=shapes,
            weights=weights,
            pooling=pooling,
            trust_remote_code=trust_remote_code,
            threads=threads,
            force=force,
            log=log,
            calibration_samples=calibration_samples,
            max_length=max_length,
            per_channel=per_channel,
            calibration_methods=tuple(
                m.strip() for m in calibration_methods.split(",") if m.strip()
            ),
            fp16_op_block_list=tuple(o.strip() for o in fp16_block_ops.split(",") if o.strip()),
            bench=bench,
            target=target,
            ep=ep,
            config_file=config,
            bench_batches=tuple(batches),
            bench_seq=seq,
            bench_min_samples=bench_samples,
            bench_min_seconds=bench_seconds,
            bench_rounds=rounds,
            min_cosine=min_cosine,
            max_accuracy_drop=max_accuracy_drop,
            max_size_mb=max_size_mb,
            max_latency_ms=max_latency_ms,
            metric=metric,
            tune_session=tune_session,
            min_min_cosine=min_min_cosine,
            search=search,
            image_mean=_floats(image_mean, "--image-mean"),
            image_std=_floats(image_std, "--image-std"),
        )
    _print_table(result)
    if result.failure is not None:  # decided before shipping: nothing was shipped
        raise result.failure


def _floats(text: str | None, flag: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise errors.UsageError(
            f"bad {flag} {text!r}", hint=f"write numbers, e.g. {flag} 0.5,0.5,0.5"
        ) from None


def _batches(text: str) -> list[int]:
    try:
        batches = [int(b) for b in text.split(",") if b.strip()]
        if not batches or min(batches) < 1:
            raise ValueError
    except ValueError:
        raise errors.UsageError(f"bad --batch {text!r}", hint="write e.g. --batch 1,8,32") from None
    return batches


@app.command(
    epilog="Examples:\n\n  deployopt bench model.onnx --batch 1,8 --seq 128 --threads 2\n\n"
    "  deployopt bench fp32.onnx int8.onnx --target cpu-1t --json bench.json\n\n"
    "  deployopt bench model.onnx --shape x=4x3x224x224 --ep cuda\n\n"
    "  deployopt bench out/ --target cpu  # out/best.onnx under out/best.session.json"
)
def bench(
    models: Annotated[
        list[Path],
        typer.Argument(
            help="One or more .onnx models; several are measured in interleaved rounds. An "
            "optimize output folder stands for its best.onnx under its best.session.json."
        ),
    ],
    target: Annotated[
        str | None, typer.Option(help="Named target: cpu, cpu-1t, cuda, or one from --config.")
    ] = None,
    ep: Annotated[
        str | None,
        typer.Option(
            help="Execution provider for an ad-hoc target: cpu, cuda, tensorrt, openvino, ..."
        ),
    ] = None,
    threads: Annotated[
        int | None, typer.Option(help="Intra-op threads (default: all cores).")
    ] = None,
    config: Annotated[
        Path | None, typer.Option(help="TOML file with [targets.NAME] tables.")
    ] = None,
    session: SessionOpt = None,
    batch: Annotated[
        str, typer.Option(help="Batch sizes for the symbolic batch dim, comma-separated.")
    ] = "1",
    seq: Annotated[int, typer.Option(help="Length for a symbolic sequence dim.")] = 128,
    shape: Annotated[
        list[str] | None,
        typer.Option("--shape", help="NAME=DIMS to set one input's shape exactly."),
    ] = None,
    min_samples: Annotated[int, typer.Option(help="Least timed runs per model and shape.")] = 60,
    min_seconds: Annotated[
        float, typer.Option(help="Least timed seconds per model and shape.")
    ] = 3.0,
    rounds: Annotated[
        int, typer.Option(help="Interleaved rounds the samples are spread over.")
    ] = 3,
    include_copies: Annotated[
        bool,
        typer.Option(
            "--include-copies",
            help="GPU EPs: time host<->device copies too (default: IO binding, copies not timed).",
        ),
    ] = False,
    json_out: Annotated[
        Path | None,
        typer.Option("--json", help="Write the results (samples included) to this JSON file."),
    ] = None,
    timeout: TimeoutOpt = 600.0,
    history: HistoryOpt = None,
    no_history: NoHistoryOpt = False,
) -> None:
    """Measure latency (p50/p90/p95/p99 with a CI of the median, cold start) and throughput.

    Each model runs in its own worker process; a crash or hang makes that result INVALID, never
    a dead run. A session that does not run on the requested provider is INVALID too (exit 4).
    """
    from deployopt.api import bench as run_bench
    from deployopt.inputs import parse_shape_overrides
    from deployopt.workspace import write_json

    batches = _batches(batch)
    with err_console.status("measuring ...") as status:
        results = run_bench(
            models,
            target=target,
            ep=ep,
            threads=threads,
            config=config,
            session=session,
            batch=batches,
            seq=seq,
            shapes=parse_shape_overrides(shape or []),
            min_samples=min_samples,
            min_seconds=min_seconds,
            rounds=rounds,
            include_copies=include_copies,
            timeout_s=timeout,
            history=False if no_history else history,
            log=lambda m: status.update(m),
        )
    tgt = _target_of(results)
    _print_bench(results, tgt)
    for line in _session_lines(results):
        console.print(line, highlight=False, soft_wrap=True)
    if json_out:
        write_json(
            json_out,
            {
                "schema": "deployopt.bench/1",
                "target": tgt,
                "results": [r.to_json() for r in results],
            },
        )
    if any(not r.valid for r in results):
        sys.exit(errors.EXIT_INVALID_RUN)


def _session_line(env) -> str | None:
    """The session settings a measurement used, when they came from a session file."""
    if "session_file" not in env:
        return None
    entries = [f"{k[len('session:') :]}={v}" for k, v in env.items() if k.startswith("session:")]
    threads, opt = env.get("threads", "all"), env.get("graph_optimization", "?")
    parts = [f"{threads} threads", f"graph optimization {opt}", *entries]
    return f"session settings from {env['session_file']}: {', '.join(parts)}"


def _session_lines(results) -> list[str]:
    """One line per session file the results were measured under (the model named when the
    models were measured under different ones)."""
    lines = {r.name: _session_line(r.env) for r in results}
    if len(set(lines.values())) == 1:
        return [ln for ln in lines.values() if ln][:1]
    return [f"{name}: {ln}" if ln else f"{name}: no session file" for name, ln in lines.items()]


def _target_of(results) -> str:
    env = results[0].env if results else {}
    return f"{env.get('target', '?')} ({env.get('ep', '?')}, {env.get('threads', 'all')} threads)"


def _print_bench(results, tgt) -> None:
    from rich.table import Table

    from deployopt.benchmark import drift_warnings
    from deployopt.report import fmt_ms

    t = Table(title=f"on {tgt}")
    cols = (
        "model",
        "shape",
        "p50 ms",
        "p50 95% CI",
        "p90 ms",
        "p99 ms",
        "drift",
        "cold ms",
        "items/s",
    )
    for col in cols:
        t.add_column(col, justify="left" if col in ("model", "shape") else "right")
    for r in results:
        dims = {"x".join(map(str, v)) for v in r.shapes.values()}
        label = (
            dims.pop()
            if len(dims) == 1
            else " ".join(f"{k}={'x'.join(map(str, v))}" for k, v in r.shapes.items())
        )
        s = r.stats
        if s is None:
            t.add_row(r.name, label, styled("INVALID", "red"), "", "", "", "", "", "")
            continue
        t.add_row(
            r.name,
            label,
            fmt_ms(s.p50_ms),
            f"{fmt_ms(s.p50_ci_low_ms)}-{fmt_ms(s.p50_ci_high_ms)}",
            fmt_ms(s.p90_ms),
            fmt_ms(s.p99_ms),
            f"{r.drift:.0%}" if r.drift is not None else "-",
            f"{r.cold_ms:.0f}" if r.cold_ms else "-",
            f"{r.throughput:.1f}",
        )
    console.print(t)
    for w in drift_warnings(results):
        console.print(styled("warning:", "yellow", f" {w}"), highlight=False, soft_wrap=True)
    for r in results:
        if r.invalid:
            console.print(
                styled("INVALID", "red", f" {r.name}: {'; '.join(r.invalid)}"), highlight=False
            )
    env = results[0].env if results else {}
    console.print(
        f"{env.get('cpu')} ({env.get('cpu_flags')}), {env.get('cores')} cores, "
        f"threads={env.get('threads')}; onnxruntime {env.get('onnxruntime')}"
        + (f"; GPU {env['gpu']} driver {env.get('gpu_driver')}" if "gpu" in env else ""),
        highlight=False,
    )


def _print_table(result) -> None:
    from rich.table import Table

    from deployopt.report import fmt_ms

    t = Table(title=f"deployopt: {result.out_dir}")
    cols = ["variant", "status", "size MB", "mean cos", "min cos", "max |diff|"]
    if result.bench:
        cols += ["p50 ms", "p99 ms", "items/s"]
    for col in cols:
        t.add_column(
            col, justify="right" if col not in ("variant", "status") else "left", no_wrap=True
        )
    winner = result.choice.winner.name if result.choice and result.choice.winner else None
    notes = []
    for v in result.variants:
        p = v.parity or {}
        size = v.metrics.get("size_bytes")
        note = v.reason or "; ".join(v.warnings)
        if note:
            notes.append(f"{v.name}: {note}")
        colour = {"ok": "green", "failed": "red", "skipped": "yellow"}[v.status]
        row = [
            styled(v.name, "bold") if v.name == winner else v.name,
            styled("chosen", "bold green") if v.name == winner else styled(v.status, colour),
            f"{size / 1e6:.3g}" if size else "-",
            f"{p['mean_cosine']:.5f}" if p else "-",
            f"{p['min_cosine']:.5f}" if p else "-",
            f"{p['max_abs_diff']:.2e}" if p else "-",
        ]
        if result.bench:
            b = (result.bench.get(v.name) or [None])[0]
            s = b.stats if b is not None else None
            if b is not None and not b.valid:
                row += [styled("INVALID", "red"), "", ""]
            else:
                row += [
                    fmt_ms(s.p50_ms if s else None),
                    fmt_ms(s.p99_ms if s else None),
                    f"{b.throughput:.1f}" if b and b.throughput else "-",
                ]
        t.add_row(*row)
    console.print(t)
    for n in notes:
        console.print(f"  {n}", highlight=False, soft_wrap=True)
    from deployopt.benchmark import drift_warnings

    for w in drift_warnings([rs[0] for rs in result.bench.values() if rs]):
        console.print(styled("  warning:", "yellow", f" {w}"), highlight=False, soft_wrap=True)
    ch = result.choice
    if ch is not None:
        for name, why in ch.rejected.items():
            console.print(f"  not chosen: {name}: {why}", highlight=False, soft_wrap=True)
        if ch.pareto:
            console.print(f"  Pareto front (latency, cosine, size): {', '.join(ch.pareto)}")
        env = next(iter(result.bench.values()))[0].env if result.bench else {}
        console.print(
            f"  measured on {env.get('target')} ({env.get('threads')} threads), "
            f"{env.get('cpu')}; onnxruntime {env.get('onnxruntime')}",
            highlight=False,
        )
    if result.best:
        console.print(styled("best:", "bold", f" {result.best}  ({winner})"))
    if result.session:
        from deployopt.report import session_line

        console.print(f"session: {session_line(result.session)}", highlight=False, soft_wrap=True)
    for kind, path in result.reports.items():
        console.print(f"report ({kind}): {path}", highlight=False)
    console.print(f"manifest: {result.manifest}")


GATE_EPILOG = (
    "Verdicts and exit codes: 0 PASS; 1 FAIL (a limit broken with confidence); "
    "3 INCONCLUSIVE (the confidence interval straddles a limit: the machine was too noisy to "
    "decide); 4 INVALID (EP fallback, crash, timeout, too few samples for the percentile, a "
    "result from another target); 2 usage error. The worst check decides: FAIL > INVALID > "
    "INCONCLUSIVE > PASS.\n\n"
    "Examples:\n\n"
    "  deployopt gate out/best.onnx --p50-ms 12 --p99-ms 30 --target cpu --junit gate.xml\n\n"
    "  deployopt gate --report out/report.json --budget budgets.toml\n\n"
    "  deployopt gate new.onnx --baseline old.onnx --max-slowdown 5%\n\n"
    "  deployopt gate new.onnx --baseline last-pass --target cpu-1t\n\n"
    "  deployopt gate out/ --budget budgets.toml  # out/best.onnx under out/best.session.json\n\n"
    "Budget file: [[budgets]] tables with target, batch, seq (or shape = { x = [1, 16] }), "
    "p50_ms, p90_ms, p95_ms, p99_ms, min_throughput, max_size_mb, min_cosine (mean cosine), "
    "min_min_cosine (the worst sample's cosine); [targets.NAME] tables as in --config."
)


@app.command(epilog=GATE_EPILOG)
def gate(
    model: Annotated[
        Path | None,
        typer.Argument(
            help="The .onnx model to measure and judge now, or an optimize output folder "
            "(its best.onnx under its best.session.json)."
        ),
    ] = None,
    budget: Annotated[
        Path | None, typer.Option(help="TOML budget file ([[budgets]] tables).")
    ] = None,
    report: Annotated[
        Path | None,
        typer.Option(help="Judge the results recorded in this report.json instead of measuring."),
    ] = None,
    variant: Annotated[
        str | None,
        typer.Option(help="With --report: the variant to judge (default: the chosen one)."),
    ] = None,
    p50_ms: Annotated[
        float | None, typer.Option("--p50-ms", help="Limit on p50 latency (ms).")
    ] = None,
    p90_ms: Annotated[
        float | None, typer.Option("--p90-ms", help="Limit on p90 latency (ms).")
    ] = None,
    p95_ms: Annotated[
        float | None, typer.Option("--p95-ms", help="Limit on p95 latency (ms).")
    ] = None,
    p99_ms: Annotated[
        float | None, typer.Option("--p99-ms", help="Limit on p99 latency (ms).")
    ] = None,
    min_throughput: Annotated[
        float | None, typer.Option(help="Least throughput (items/s at the median latency).")
    ] = None,
    max_size_mb: Annotated[float | None, typer.Option(help="Largest model size (MB).")] = None,
    min_cosine: Annotated[
        float | None,
        typer.Option(help="Least mean cosine to --reference (or, with --report, to fp32)."),
    ] = None,
    min_min_cosine: Annotated[
        float | None,
        typer.Option(help="Least cosine of the worst single sample, as --min-cosine."),
    ] = None,
    target: Annotated[
        str | None,
        typer.Option(help="Target of the flag limits, and the only budgets judged (default cpu)."),
    ] = None,
    config: Annotated[Path | None, typer.Option(help="TOML file with [targets.NAME].")] = None,
    session: Annotated[
        Path | None,
        typer.Option(
            help="Session file (OUT/best.session.json of optimize; default: the MODEL folder's) "
            "whose threads, graph optimization and session config replace those of every "
            "budget's target and of the --baseline measurement: both models are measured under "
            "the same settings."
        ),
    ] = None,
    batch: Annotated[int, typer.Option(help="Batch size of the flag limits and --baseline.")] = 1,
    seq: Annotated[int, typer.Option(help="Sequence length for text models.")] = 128,
    reference: Annotated[
        Path | None, typer.Option(help="Reference .onnx for --min-cosine when measuring.")
    ] = None,
    baseline: Annotated[
        str | None,
        typer.Option(
            help="OLD.onnx (or an optimize output folder: its best.onnx) measured in the same "
            "job, interleaved, or 'last-pass' (the last passing gate result of this model on "
            "this target, from the history)."
        ),
    ] = None,
    max_slowdown: Annotated[
        str, typer.Option(help="Slowdown vs --baseline that fails, e.g. 5%.")
    ] = "5%",
    processes: Annotated[
        int, typer.Option(help="Worker process pairs for --baseline (order alternating).")
    ] = 3,
    min_samples: Annotated[
        int, typer.Option(help="Least timed runs per measurement (raised for p99 budgets).")
    ] = 60,
    min_seconds: Annotated[float, typer.Option(help="Least timed seconds per measurement.")] = 3.0,
    rounds: Annotated[int, typer.Option(help="Interleaved rounds per measurement.")] = 3,
    junit: Annotated[
        Path | None, typer.Option(help="Write JUnit XML (one testcase per check).")
    ] = None,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Write the verdict as JSON.")
    ] = None,
    markdown: Annotated[
        Path | None,
        typer.Option(help='Write a Markdown summary (e.g. "$GITHUB_STEP_SUMMARY").'),
    ] = None,
    name: Annotated[
        str | None, typer.Option(help="Model name in the history (default: from the file).")
    ] = None,
    history: HistoryOpt = None,
    no_history: NoHistoryOpt = False,
    timeout: TimeoutOpt = 600.0,
) -> None:
    """Fail a CI job when a model breaks its latency budget or regresses.

    Measures MODEL.onnx (or reads --report) and judges every budget with a confidence
    interval: FAIL only when a limit is broken with confidence, INCONCLUSIVE when the machine
    was too noisy to decide. With --baseline, both models are measured interleaved in several
    worker processes and the ratio of medians is tested (paired by round, bootstrap CI).
    """
    from deployopt import judge as g
    from deployopt.api import gate as run_gate
    from deployopt.workspace import write_json, write_text

    limits = {
        k: v
        for k, v in dict(
            p50_ms=p50_ms,
            p90_ms=p90_ms,
            p95_ms=p95_ms,
            p99_ms=p99_ms,
            min_throughput=min_throughput,
            max_size_mb=max_size_mb,
            min_cosine=min_cosine,
            min_min_cosine=min_min_cosine,
        ).items()
        if v is not None
    }
    with err_console.status("gate: measuring ...") as status:
        result = run_gate(
            model,
            report=report,
            variant=variant,
            budget=budget,
            limits=limits,
            target=target,
            config=config,
            session=session,
            batch=batch,
            seq=seq,
            reference=reference,
            baseline=baseline,
            max_slowdown=g.parse_percent(max_slowdown),
            processes=processes,
            min_samples=min_samples,
            min_seconds=min_seconds,
            rounds=rounds,
            timeout_s=timeout,
            name=name,
            history=False if no_history else history,
            log=lambda m: status.update(m),
        )
    _print_checks(result)
    line = _session_line(result.environment)
    if line:
        console.print(line, highlight=False, soft_wrap=True)
    if junit:
        write_text(junit, g.junit_xml(result))
    if json_out:
        write_json(json_out, result.to_json())
    if markdown:
        write_text(markdown, g.markdown(result))
    colour = {"PASS": "green", "FAIL": "red", "INCONCLUSIVE": "yellow", "INVALID": "magenta"}
    err_console.print(
        styled(result.summary_line(), f"bold {colour[result.verdict.value]}"),
        highlight=False,
        soft_wrap=True,
    )
    sys.exit(result.verdict.exit_code)


def _print_checks(result) -> None:
    from rich.table import Table

    t = Table(title=f"deployopt gate: {result.model}")
    for col in ("budget", "check", "limit", "measured", "95% CI", "verdict"):
        t.add_column(col, justify="right" if col in ("limit", "measured", "95% CI") else "left")
    colour = {"PASS": "green", "FAIL": "red", "INCONCLUSIVE": "yellow", "INVALID": "magenta"}
    for c in result.checks:
        t.add_row(
            c.budget,
            c.metric,
            f"{c.limit:.4g}",
            f"{c.measured:.4g}" if c.measured is not None else "-",
            f"{c.ci[0]:.4g}-{c.ci[1]:.4g}" if c.ci else "-",
            styled(c.verdict.value, colour[c.verdict.value]),
        )
    console.print(t)
    for c in result.checks:
        if c.verdict.value != "PASS":
            console.print(
                f"  {c.verdict.value} {c.budget} {c.metric}: {c.message}",
                highlight=False,
                soft_wrap=True,
            )


@app.command(
    "history",
    epilog="Examples:\n\n  deployopt history --model best --target cpu --limit 20\n\n"
    "  deployopt history --compare\n\n  deployopt history --model best --plot p50.png",
)
def history_cmd(
    model: Annotated[str | None, typer.Option(help="Only this model name.")] = None,
    target: Annotated[str | None, typer.Option(help="Only this target.")] = None,
    kind: Annotated[str | None, typer.Option(help="Only bench or gate results.")] = None,
    batch: Annotated[int | None, typer.Option(help="Only this batch size.")] = None,
    verdict: Annotated[
        str | None, typer.Option(help="Only gate results with this verdict.")
    ] = None,
    since: Annotated[
        str | None, typer.Option(help="Only results since this date (YYYY-MM-DD).")
    ] = None,
    limit: Annotated[int, typer.Option(help="Most rows to list (newest first).")] = 30,
    compare: Annotated[
        bool,
        typer.Option(
            "--compare", help="The latest p50 of each model on each target, side by side."
        ),
    ] = False,
    plot: Annotated[Path | None, typer.Option(help="Write a PNG of p50 over time.")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the rows as JSON.")] = None,
    history: HistoryOpt = None,
) -> None:
    """List, filter and compare recorded bench and gate results across targets and over time."""
    from dataclasses import asdict

    from deployopt import history as hist
    from deployopt.workspace import write_json

    if kind is not None and kind not in ("bench", "gate"):
        raise errors.UsageError(f"bad --kind {kind!r}", hint="bench or gate")
    db = hist.History(history)
    rows = db.query(
        model=model,
        target=target,
        kind=kind,
        batch=batch,
        verdict=verdict.upper() if verdict else None,
        since=since,
    )
    if not rows:
        console.print(
            f"no results in {db.path}"
            + (" matching the filters" if any((model, target, kind, batch, verdict, since)) else "")
        )
        return
    if compare:
        hist.print_compare(console, rows)
    else:
        hist.print_rows(console, rows[:limit])
    if plot:
        hist.plot_p50(rows, plot)
        console.print(f"plot: {plot}")
    if json_out:
        write_json(json_out, [asdict(r) for r in rows[:limit]])


@app.command(
    epilog="Examples:\n\n"
    "  deployopt distill --teacher minilm --data reuters-r8 -o student-out --student-layers 0,2,5\n\n"
    "  deployopt distill --teacher ./bert-clf --data train.csv --labels-column label -o out "
    "--student-layers 0,11 --loss kd\n\n"
    "  deployopt distill --teacher models.fashion:teacher --student models.fashion:student "
    "--input-shape x=1x1x28x28 --data fashion-mnist --eval-data fashion-mnist-test -o out\n\n"
    "  torchrun --nproc_per_node 2 -m deployopt distill ...   (DistributedDataParallel)\n\n"
    "Packaged datasets for --data: fashion-mnist, fashion-mnist-test, reuters-r8, "
    "reuters-r8-test, reuters-r52, reuters-r52-test, 20newsgroups, 20newsgroups-test, bbc-news."
)
def distill(
    teacher: Annotated[
        str, typer.Option(help="Teacher: HF folder, 'minilm', or pkg.module:factory.")
    ],
    data: Annotated[
        str,
        typer.Option(
            help="Training data: a text file (one example a line), .csv, .jsonl, an image "
            "folder (FOLDER/<class>/<image>), or a packaged dataset name."
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")],
    student_layers: Annotated[
        str | None,
        typer.Option(
            help="Keep these teacher layers, weights copied (e.g. 0,2,4). Default: half, evenly spread."
        ),
    ] = None,
    student: Annotated[
        str | None, typer.Option(help="Your own student: HF folder or pkg.module:factory.")
    ] = None,
    student_size: Annotated[
        str | None,
        typer.Option(
            help="A smaller config of the teacher's architecture, fresh weights: "
            "layers=3,heads=4,hidden=256,ffn=1024 (any subset)."
        ),
    ] = None,
    loss: Annotated[
        str | None,
        typer.Option(
            help="Losses with weights: embedding (MSE), cosine (1 - cos), kd, ce, hidden, "
            "attention (e.g. embedding,hidden:0.5). Default: cosine,hidden for sentence encoders "
            "(hidden alone for a narrower student), kd for classifiers."
        ),
    ] = None,
    epochs: Annotated[int, typer.Option(help="Training epochs.")] = 3,
    batch_size: Annotated[
        int | None,
        typer.Option(
            help="Examples per step (per process under torchrun). Default: 8 for sentence "
            "encoders (more steps on a small corpus), 32 for classifiers."
        ),
    ] = None,
    lr: Annotated[
        float | None,
        typer.Option(
            help="AdamW learning rate. Default: 5e-4 for sentence encoders, 5e-5 for classifiers."
        ),
    ] = None,
    weight_decay: Annotated[
        float, typer.Option(help="AdamW weight decay (not on biases and norms).")
    ] = 0.01,
    warmup: Annotated[float, typer.Option(help="Fraction of steps for linear warm-up.")] = 0.1,
    max_grad_norm: Annotated[float, typer.Option(help="Gradient clipping norm (0: off).")] = 1.0,
    patience: Annotated[
        int, typer.Option(help="Epochs without a better eval score before stopping.")
    ] = 2,
    temperature: Annotated[float, typer.Option(help="KD softmax temperature T.")] = 4.0,
    alpha: Annotated[float, typer.Option(help="KD: weight of the soft loss vs hard labels.")] = 0.9,
    labels_column: Annotated[
        str | None, typer.Option(help="Label column/field in .csv/.jsonl data.")
    ] = None,
    text_column: Annotated[
        str, typer.Option(help="Text column/field in .csv/.jsonl data.")
    ] = "text",
    eval_data: Annotated[
        str | None,
        typer.Option(help="Evaluation data (same forms as --data). Default: 10% held out."),
    ] = None,
    max_examples: Annotated[
        int | None, typer.Option(help="Use at most this many training examples.")
    ] = None,
    max_length: Annotated[int, typer.Option(help="Token limit for text.")] = 128,
    windows: Annotated[
        bool,
        typer.Option(
            "--windows/--no-windows",
            help="Sentence encoders: a text longer than --max-length trains as several "
            "windows, so all of it teaches the student (--no-windows: its first window only).",
        ),
    ] = True,
    freeze_embeddings: Annotated[
        bool,
        typer.Option(
            "--freeze-embeddings/--train-embeddings",
            help="Transformers: keep the token-embedding table as the teacher's.",
        ),
    ] = False,
    input_shape: Annotated[
        list[str] | None,
        typer.Option("--input-shape", help="NAME=DIMS for a factory teacher, e.g. x=1x1x28x28."),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed for initialisation, data order and dropout.")] = 0,
    checkpoint_every: Annotated[int, typer.Option(help="Steps between checkpoints.")] = 100,
) -> None:
    """Distil a teacher into a smaller student that `deployopt optimize` takes as is.

    Soft-label KD (Hinton et al.: T^2-scaled KL, mixed with hard labels by alpha), hidden-state
    MSE through a learned projection, attention-distribution KL, and pooled-embedding
    distillation for sentence encoders (unlabelled text is enough). Checkpoints go to
    OUT/work; run the same command again to resume after an interruption.
    """
    from deployopt.api import distill as run_distill
    from deployopt.inputs import parse_shape_overrides
    from deployopt.torchside.train import TrainConfig, dist_info

    size = None
    if student_size:
        names = {"layers": "num_hidden_layers", "heads": "num_attention_heads",
                 "hidden": "hidden_size", "ffn": "intermediate_size"}  # fmt: skip
        size = {}
        for part in student_size.split(","):
            k, _, v = part.partition("=")
            if k.strip() not in names or not v.strip().isdigit():
                raise errors.UsageError(
                    f"bad --student-size part {part!r}", hint="write e.g. layers=3,heads=4"
                )
            size[names[k.strip()]] = int(v)
    cfg = TrainConfig(
        epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
        warmup_ratio=warmup, max_grad_norm=max_grad_norm, patience=patience, seed=seed,
        checkpoint_every=checkpoint_every,
    )  # fmt: skip
    rank, _ = dist_info()
    res = run_distill(
        teacher, data, out, student_layers=student_layers, student=student, student_size=size,
        losses=loss, eval_data=eval_data, labels_column=labels_column, text_column=text_column,
        input_shape=parse_shape_overrides(input_shape or []), max_examples=max_examples,
        max_length=max_length, windows=windows, freeze_embeddings=freeze_embeddings, temperature=temperature, alpha=alpha, train=cfg,
        log=(lambda m: err_console.print(f"  {m}", highlight=False)) if rank == 0 else (lambda m: None),
    )  # fmt: skip
    if rank != 0:
        return
    from rich.table import Table

    t = Table(title=f"deployopt distill: {res.out}")
    metrics = [k for k in res.student if k not in ("params", "score")]
    for col in ("model", "params (M)", *metrics):
        t.add_column(col, justify="left" if col == "model" else "right")
    for name, m in (("teacher", res.teacher), ("student", res.student)):
        t.add_row(name, f"{m['params'] / 1e6:.2f}", *(f"{m[k]:.4f}" for k in metrics))
    console.print(t)
    for h in res.history:
        console.print(
            "  "
            + " ".join(
                f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in h.items()
            ),
            highlight=False,
        )
    console.print(f"student: {res.out / 'student'}\nreport: {res.report}")
    console.print(f"next: deployopt optimize {res.out / 'student'} -o OUT", highlight=False)


def _ratio(flag: str):
    def parse(value: str | None) -> float | None:
        if value is None:
            return None
        try:
            return float(value)
        except ValueError:
            raise errors.UsageError(
                f"{flag} {value!r} is not a number", hint=f"write e.g. {flag} 0.5"
            ) from None

    return parse


@app.command(
    epilog="Examples:\n\n"
    "  deployopt prune minilm -o pruned --heads 0.33 --ffn 0.5 --data 20newsgroups "
    "--recover-epochs 2\n\n"
    "  deployopt prune ./bert-clf -o small --drop-layers 10,11 --ffn 0.3 --data train.csv "
    "--labels-column label --importance gradient\n\n"
    "  deployopt prune models.cnn:make --input-shape x=1x3x32x32 -o cnn-half --channels 0.5 "
    "--data images/ --recover-epochs 3\n\n"
    "  deployopt prune minilm -o small --target-params 0.7 --data reuters-r8 --steps 2 "
    "--recover-epochs 2\n\n"
    "  deployopt prune minilm -o sparse --unstructured 0.5   (zeros: smaller when "
    "compressed, not faster)\n\n"
    "Then: deployopt optimize OUT -o OUT-onnx"
)
def prune(
    model: Annotated[
        str,
        typer.Argument(
            help="HF folder, 'minilm', pkg.module:factory (with --input-shape), or a folder "
            "written by deployopt distill/prune."
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output model folder.")],
    heads: Annotated[
        str | None, typer.Option(help="Fraction of attention heads to remove, in each layer.")
    ] = None,
    ffn: Annotated[
        str | None, typer.Option(help="Fraction of FFN (intermediate) neurons to remove.")
    ] = None,
    drop_layers: Annotated[
        str | None, typer.Option(help="Transformer layers to delete, e.g. 1,3.")
    ] = None,
    channels: Annotated[
        str | None,
        typer.Option(help="CNNs: fraction of channels to remove (dependency-aware)."),
    ] = None,
    unstructured: Annotated[
        str | None,
        typer.Option(
            help="Fraction of single weights to zero (size after compression only; a dense "
            "runtime is not faster)."
        ),
    ] = None,
    target_params: Annotated[
        str | None,
        typer.Option(
            help="Instead of ratios: keep this fraction of the parameters (one ratio for heads "
            "and FFN, or for channels, found by search)."
        ),
    ] = None,
    target_latency: Annotated[
        str | None,
        typer.Option(
            help="Instead of ratios: keep this fraction of the PyTorch latency (batch 1, x seq "
            "128 for text; timed on this machine, interleaved with the original)."
        ),
    ] = None,
    importance: Annotated[
        str | None,
        typer.Option(
            help="gradient (Michel et al. 2019; needs --data) or magnitude. "
            "Default: gradient when --data is given."
        ),
    ] = None,
    scope: Annotated[
        str,
        typer.Option(
            help="layer: the same share from every layer (uniform shapes); global: rank all "
            "layers together."
        ),
    ] = "layer",
    data: Annotated[
        str | None,
        typer.Option(
            help="Data for importance and recovery: text file, .csv, .jsonl, image folder, or a "
            "packaged dataset name."
        ),
    ] = None,
    labels_column: Annotated[
        str | None, typer.Option(help="Label column/field in .csv/.jsonl data.")
    ] = None,
    text_column: Annotated[str, typer.Option(help="Text column/field.")] = "text",
    max_examples: Annotated[
        int | None, typer.Option(help="Use at most this many examples of --data.")
    ] = None,
    importance_examples: Annotated[
        int, typer.Option(help="Examples used to score heads/neurons/channels.")
    ] = 256,
    steps: Annotated[
        int, typer.Option(help="Iterative pruning: prune -> recover this many times.")
    ] = 1,
    recover_epochs: Annotated[
        int,
        typer.Option(
            help="Fine-tuning epochs after pruning (split across steps). One epoch brought "
            "MiniLM with a third of its heads and half its FFN pruned back to a held-out cosine "
            "of 0.91 on 3,000 texts (0.67 before recovery)."
        ),
    ] = 0,
    kd: Annotated[
        bool,
        typer.Option(
            "--kd/--no-kd", help="Recover with knowledge distillation from the unpruned model."
        ),
    ] = True,
    lr: Annotated[
        float | None,
        typer.Option(
            help="Recovery learning rate (AdamW). Default: 5e-4 for sentence encoders, 5e-5 "
            "for classifiers."
        ),
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option(help="Recovery examples per step. Default: 32.")
    ] = None,
    max_length: Annotated[int, typer.Option(help="Token limit for text.")] = 128,
    input_shape: Annotated[
        list[str] | None,
        typer.Option("--input-shape", help="NAME=DIMS for a factory, e.g. x=1x1x28x28."),
    ] = None,
    weights: Annotated[
        Path | None, typer.Option(help="State dict for a factory's module (.safetensors).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed for data order and importance.")] = 0,
) -> None:
    """Prune a model so its tensors really shrink, and recover its accuracy.

    Transformers (BERT family): attention heads, FFN neurons and whole layers are removed, so
    the ONNX file is smaller and runs faster. CNNs: channels, through Torch-Pruning's
    dependency graph (residuals, BatchNorm and grouped convolutions stay consistent).
    Unstructured: single weights set to zero, which only helps compressed size. The output
    folder goes straight into `deployopt optimize`; OUT/prune_report.json records what was
    removed and the metrics before and after recovery.
    """
    from deployopt.api import prune as run_prune
    from deployopt.inputs import parse_shape_overrides
    from deployopt.torchside.train import TrainConfig

    cfg = TrainConfig(
        epochs=max(1, recover_epochs), batch_size=batch_size, lr=lr, seed=seed,
        patience=max(2, recover_epochs),
    )  # fmt: skip
    res = run_prune(
        model, out, heads=_ratio("--heads")(heads), ffn=_ratio("--ffn")(ffn),
        drop_layers=drop_layers, channels=_ratio("--channels")(channels),
        unstructured=_ratio("--unstructured")(unstructured),
        target_params=_ratio("--target-params")(target_params),
        target_latency=_ratio("--target-latency")(target_latency), importance=importance,
        scope=scope, data=data, labels_column=labels_column, text_column=text_column,
        input_shape=parse_shape_overrides(input_shape or []), weights=weights,
        max_examples=max_examples, importance_examples=importance_examples, max_length=max_length, steps=steps,
        recover_epochs=recover_epochs, recover_kd=kd, train=cfg,
        log=lambda m: err_console.print(f"  {m}", highlight=False),
    )  # fmt: skip
    from rich.table import Table

    t = Table(title=f"deployopt prune: {res.out}")
    keys = sorted({k for m in res.metrics.values() for k in m if k != "score"})
    for col in ("model", *keys):
        t.add_column(col, justify="left" if col == "model" else "right")
    for name, m in res.metrics.items():
        t.add_row(name, *(f"{m[k]:.4f}" if k in m else "-" for k in keys))
    if res.metrics:
        console.print(t)
    console.print(
        f"parameters: {res.params_before:,} -> {res.params_after:,} "
        f"({res.params_after / res.params_before:.3f}); {res.removed['summary']}",
        highlight=False,
    )
    if "unstructured" in res.removed:
        from deployopt.stages.prune import DENSE_NOTE

        console.print(f"note: {DENSE_NOTE}", highlight=False)
    console.print(f"model: {res.out}\nreport: {res.report}")
    console.print(f"next: deployopt optimize {res.out} -o OUT", highlight=False)


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app, map errors to exit codes in one place."""
    try:
        rc = app(args=argv, standalone_mode=False)
    except errors.DeployoptError as e:
        if _state["verbose"]:
            traceback.print_exc()
        err_console.print(styled("error:", "bold red", f" {e.message}"), highlight=False)
        if e.hint:
            err_console.print(styled("hint:", "bold", f" {e.hint}"), highlight=False)
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
        err_console.print(
            styled(
                "error:",
                "bold red",
                " interrupted (exit 130); finished variants are kept, nothing half-written",
            )
        )
    sys.exit(rc if isinstance(rc, int) else 0)


def _internal_error() -> None:
    traceback.print_exc()
    err_console.print(
        styled(
            "internal error",
            "bold red",
            " (a bug in deployopt: please report it with the traceback above)",
        )
    )
    sys.exit(errors.EXIT_INTERNAL)
