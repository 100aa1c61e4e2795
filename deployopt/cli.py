"""Command line. The ONLY place that maps errors and verdicts to exit codes.

Exit codes: 0 success, 2 usage or config error, 4 run invalid (runtime missing), 5 input model
rejected, 6 no viable variant, 7 unsafe input refused, 8 export parity failed, 70 internal error.
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from deployopt import errors

app = typer.Typer(
    name="deployopt",
    help="Make a model smaller and faster for deployment with ONNX Runtime, and prove it is "
    "still right.",
    no_args_is_help=True,
    epilog="Exit codes: 0 success, 2 usage/config error, 4 runtime unavailable, 5 input model "
    "rejected, 6 no viable variant, 7 unsafe input refused, 8 export parity failed, "
    "70 internal error.",
    add_completion=False,
    pretty_exceptions_enable=False,
)
err_console = Console(stderr=True)
console = Console()
_state = {"verbose": False}


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
            help="Calibration data: text file (one example a line), .jsonl/.csv with 'text', or .npz."
        ),
    ] = None,
    evaluation: Annotated[
        Path | None,
        typer.Option(
            "--eval",
            help="Evaluation data for parity (same formats). Default: bundled sentences for text models, seeded synthetic inputs otherwise.",
        ),
    ] = None,
    opset: Annotated[int, typer.Option(help="ONNX opset for the export.")] = 18,
    input_shape: Annotated[
        list[str] | None,
        typer.Option(
            "--input-shape",
            help="NAME=DIMS for a PyTorch factory, e.g. x=1x3x32x32 (repeat per input).",
        ),
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
        int | None, typer.Option(help="onnxruntime intra-op threads (default: all cores).")
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
) -> None:
    """Export a model to ONNX and build validated variants (fuse, int8-dynamic, int8-static, fp16).

    Every variant is proved against its reference on an evaluation set; one outside tolerance
    is kept out and recorded with its numbers. Results: OUT/manifest.json and OUT/variants/<id>/.
    """
    from deployopt.inputs import parse_shape_overrides

    names = tuple(v.strip() for v in variants.split(",") if v.strip())
    shapes = parse_shape_overrides(input_shape or [])
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from deployopt.api import optimize as run_optimize

    steps = ["load", "export", *names]
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=err_console,
        transient=True,
    ) as progress:
        task = progress.add_task("loading model", total=len(steps))

        def log(msg: str) -> None:
            progress.console.print(f"  {msg}", highlight=False)
            name, _, rest = msg.partition(": ")
            if name in steps and rest.split(" ")[0] in ("ok", "FAILED", "skipped"):
                progress.advance(task)
                later = steps[steps.index(name) + 1 :]
                if later:
                    progress.update(task, description=f"building {later[0]} ...")

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
        )
    _print_table(result)
    if not any(v.ok and v.name != "fp32" for v in result.variants) and names:
        raise errors.NoViableVariantError(f"no variant passed its checks; see {result.manifest}")


@app.command(
    epilog="Examples:\n\n  deployopt bench model.onnx --batch 1,8 --seq 128 --threads 2\n\n"
    "  deployopt bench model.onnx --shape x=4x3x224x224 --json bench.json"
)
def bench(
    model: Annotated[Path, typer.Argument(help="The .onnx model to measure.")],
    ep: Annotated[
        str, typer.Option(help="Execution provider: cpu, cuda, tensorrt, openvino, ...")
    ] = "cpu",
    threads: Annotated[
        int | None, typer.Option(help="Intra-op threads (default: all cores).")
    ] = None,
    batch: Annotated[
        str, typer.Option(help="Batch sizes for the symbolic batch dim, comma-separated.")
    ] = "1",
    seq: Annotated[int, typer.Option(help="Length for a symbolic sequence dim.")] = 128,
    shape: Annotated[
        list[str] | None,
        typer.Option("--shape", help="NAME=DIMS to set one input's shape exactly."),
    ] = None,
    min_samples: Annotated[int, typer.Option(help="Least timed runs per shape.")] = 50,
    min_seconds: Annotated[float, typer.Option(help="Least timed seconds per shape.")] = 2.0,
    json_out: Annotated[
        Path | None,
        typer.Option("--json", help="Write the results (samples included) to this JSON file."),
    ] = None,
    timeout: Annotated[
        float, typer.Option(help="Seconds before a hung measurement is killed.")
    ] = 600.0,
) -> None:
    """Measure latency (p50/p90/p95/p99, cold start) and throughput of one ONNX model.

    Each measurement runs in a worker process; a crash or hang is an error, never a dead run.
    A result whose session did not run on the requested provider is marked INVALID.
    """
    from deployopt.bench import BenchSpec, bench_model
    from deployopt.errors import UsageError
    from deployopt.inputs import parse_shape_overrides
    from deployopt.runtime.session import resolve_provider
    from deployopt.runtime.worker import run_in_worker
    from deployopt.sources import read_onnx
    from deployopt.workspace import write_json

    read_onnx(model)
    resolve_provider(ep)
    try:
        batches = [int(b) for b in batch.split(",") if b.strip()]
    except ValueError:
        raise UsageError(f"bad --batch {batch!r}", hint="write e.g. --batch 1,8,32") from None
    shapes = tuple(parse_shape_overrides(shape or []).items())
    results = []
    with err_console.status("measuring ...") as status:
        for b in batches:
            status.update(f"measuring batch {b} ...")
            spec = BenchSpec(
                provider=ep,
                threads=threads,
                batch=b,
                seq=seq,
                shapes=shapes,
                min_samples=min_samples,
                min_seconds=min_seconds,
            )
            results.append(
                run_in_worker(
                    bench_model, str(model), spec, timeout_s=timeout, label=f"bench {model}"
                )
            )
    from rich.table import Table

    t = Table(title=f"{model} on {ep}")
    for col in ("shapes", "p50 ms", "p90 ms", "p95 ms", "p99 ms", "cold ms", "items/s", "valid"):
        t.add_column(col, justify="left" if col == "shapes" else "right")
    for r in results:
        s = r.stats
        dims = {"x".join(map(str, v)) for v in r.shapes.values()}
        label = (
            dims.pop()
            if len(dims) == 1
            else " ".join(f"{k}={'x'.join(map(str, v))}" for k, v in r.shapes.items())
        )
        t.add_row(
            label,
            f"{s.p50_ms:.2f}",
            f"{s.p90_ms:.2f}",
            f"{s.p95_ms:.2f}",
            f"{s.p99_ms:.2f}",
            f"{r.cold_ms:.0f}",
            f"{r.throughput:.1f}",
            "yes" if r.valid else "[red]INVALID: " + "; ".join(r.invalid) + "[/]",
        )
    console.print(t)
    env = results[0].env if results else {}
    console.print(
        f"{env.get('cpu')} ({env.get('cpu_flags')}), {env.get('cores')} cores, "
        f"threads={env.get('threads')}; onnxruntime {env.get('onnxruntime')}",
        highlight=False,
    )
    if json_out:
        write_json(json_out, {"schema": 1, "results": [r.to_json() for r in results]})
    if any(not r.valid for r in results):
        sys.exit(errors.EXIT_INVALID_RUN)


def _print_table(result) -> None:
    from rich.table import Table

    t = Table(title=f"deployopt: {result.out_dir}")
    for col in ("variant", "status", "size MB", "mean cos", "min cos", "max |diff|"):
        t.add_column(
            col, justify="right" if col not in ("variant", "status") else "left", no_wrap=True
        )
    notes = []
    for v in result.variants:
        p = v.parity or {}
        size = v.metrics.get("size_bytes")
        note = v.reason or "; ".join(v.warnings)
        if note:
            notes.append(f"{v.name}: {note}")
        t.add_row(
            v.name,
            {"ok": "[green]ok[/]", "failed": "[red]failed[/]", "skipped": "[yellow]skipped[/]"}[
                v.status
            ],
            f"{size / 1e6:.1f}" if size else "-",
            f"{p['mean_cosine']:.5f}" if p else "-",
            f"{p['min_cosine']:.5f}" if p else "-",
            f"{p['max_abs_diff']:.2e}" if p else "-",
        )
    console.print(t)
    for n in notes:
        console.print(f"  {n}", highlight=False, soft_wrap=True)
    console.print(f"manifest: {result.manifest}")


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app, map errors to exit codes in one place."""
    try:
        app(args=argv, standalone_mode=False)
    except errors.DeployoptError as e:
        if _state["verbose"]:
            traceback.print_exc()
        err_console.print(f"[bold red]error:[/] {e.message}", highlight=False)
        if e.hint:
            err_console.print(f"[bold]hint:[/] {e.hint}", highlight=False)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        err_console.print(
            "[bold red]error:[/] interrupted; finished variants are kept, nothing half-written"
        )
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as e:
        # Usage errors from click (typer vendors its own copy, so match by shape, not class).
        if callable(getattr(e, "show", None)) and isinstance(getattr(e, "exit_code", None), int):
            e.show()
            sys.exit(errors.EXIT_USAGE)
        if type(e).__name__ == "Abort":
            sys.exit(130)
        traceback.print_exc()
        err_console.print(
            "[bold red]internal error[/] (a bug in deployopt: please report it "
            "with the traceback above)"
        )
        sys.exit(errors.EXIT_INTERNAL)
    sys.exit(0)
