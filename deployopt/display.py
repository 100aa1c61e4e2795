"""What the CLI prints: tables, progress and result lines (rich, no markup parsing).

Everything here reads records (results, events); nothing here decides an outcome or an exit
code (deployopt.cli does).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from rich.console import Console
from rich.text import Text

from deployopt import events as ev


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


def session_line(env) -> str | None:
    """The session settings a measurement used, when they came from a session file."""
    if "session_file" not in env:
        return None
    entries = [f"{k[len('session:') :]}={v}" for k, v in env.items() if k.startswith("session:")]
    threads, opt = env.get("threads", "all"), env.get("graph_optimization", "?")
    parts = [f"{threads} threads", f"graph optimization {opt}", *entries]
    return f"session settings from {env['session_file']}: {', '.join(parts)}"


def session_lines(results) -> list[str]:
    """One line per session file the results were measured under (the model named when the
    models were measured under different ones)."""
    lines = {r.name: session_line(r.env) for r in results}
    if len(set(lines.values())) == 1:
        return [ln for ln in lines.values() if ln][:1]
    return [f"{name}: {ln}" if ln else f"{name}: no session file" for name, ln in lines.items()]


def target_of(results) -> str:
    env = results[0].env if results else {}
    return f"{env.get('target', '?')} ({env.get('ep', '?')}, {env.get('threads', 'all')} threads)"


def print_bench(results, tgt) -> None:
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


def print_table(result) -> None:
    from rich.table import Table

    from deployopt.report import fmt_ms

    t = Table(title=f"deployopt: {result.out_dir}")
    cols = ["variant", "status", "size MB", "mean cos", "min cos", "max |diff|"]
    metric = next((v.metrics["task.metric"] for v in result.variants
                   if "task.metric" in v.metrics), None)  # fmt: skip
    if metric:  # --labels-column: the task metric (points) and its drop vs the original
        cols += [metric, "drop"]
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
        if metric:
            m, drop = v.metrics.get(f"task.{metric}"), v.metrics.get("accuracy_drop")
            row += [f"{x:.2f}" if x is not None else "-" for x in (m, drop)]
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


def print_checks(result) -> None:
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


def print_gate(result) -> None:
    print_checks(result)
    line = session_line(result.environment)
    if line:
        console.print(line, highlight=False, soft_wrap=True)
    colour = {"PASS": "green", "FAIL": "red", "INCONCLUSIVE": "yellow", "INVALID": "magenta"}
    err_console.print(
        styled(result.summary_line(), f"bold {colour[result.verdict.value]}"),
        highlight=False,
        soft_wrap=True,
    )


def print_bench_results(results) -> None:
    tgt = target_of(results)
    print_bench(results, tgt)
    for line in session_lines(results):
        console.print(line, highlight=False, soft_wrap=True)
    for r in results:  # flagged, not invalid: e.g. some nodes fell back from a GPU EP
        for w in getattr(r, "warnings", ()):
            console.print(f"warning: {Path(r.model).name}: {w}", highlight=False, soft_wrap=True)


def print_distill(res) -> None:
    from rich.table import Table

    t = Table(title=f"deployopt distill: {res.out}")
    metrics = [k for k in res.student if k not in ("params", "score")]
    for col in ("model", "params (M)", *metrics):
        t.add_column(col, justify="left" if col == "model" else "right")
    for name, m in (("teacher", res.teacher), ("student", res.student)):
        t.add_row(name, f"{m['params'] / 1e6:.2f}", *(f"{m[k]:.4f}" for k in metrics))
    console.print(t)
    for h in res.history:
        parts = [f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in h.items()]
        console.print("  " + " ".join(parts), highlight=False)
    console.print(f"student: {res.out / 'student'}\nreport: {res.report}")
    console.print(f"next: deployopt optimize {res.out / 'student'} -o OUT", highlight=False)


def print_prune(res) -> None:
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


def log_line(msg: str) -> None:
    err_console.print(f"  {msg}", highlight=False)


class OptimizeProgress:
    """A progress bar for optimize, driven by typed events (deployopt.events): one step per
    variant built, one per benchmark round."""

    def __init__(self, variants: tuple[str, ...], bench_steps: int):
        from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self.progress = Progress(
            SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
            TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
            console=err_console, transient=True,
        )  # fmt: skip
        self.bench_steps = bench_steps
        self.task = self.progress.add_task("exporting", total=len(variants) + 1 + bench_steps)

    def __enter__(self) -> OptimizeProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def log(self, msg: str) -> None:
        self.progress.console.print(f"  {msg}", highlight=False)

    def event(self, e: ev.Event) -> None:
        p, t = self.progress, self.task
        if isinstance(e, ev.VariantsPlanned):
            p.update(t, total=len(e.names) + self.bench_steps)
        elif isinstance(e, ev.VariantStarted):
            p.update(t, description=f"building {e.name} ...")
        elif isinstance(e, ev.VariantFinished):
            p.update(t, advance=1, description="benchmarking ...")
        elif isinstance(e, ev.BenchRound):
            p.update(t, advance=1, description=f"benchmark round {e.done}/{e.total}")
        elif isinstance(e, ev.Shipped):
            p.update(t, completed=p.tasks[0].total)


class StageLines:
    """``deployopt run``: one line per stage ("cached", or how long it took), and a status
    line with what the running stage is doing."""

    def __init__(self):
        self.status = None

    def __enter__(self) -> StageLines:
        self.status = err_console.status("")
        self.status.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.status.__exit__(*exc)

    def event(self, e: ev.Event) -> None:
        if isinstance(e, ev.StageCached):
            err_console.print(styled("  cached ", "green", f" {e.stage:<9} {e.id}"))
        elif isinstance(e, ev.StageStarted):
            self.status.update(f"{e.stage} {e.id} ...")
        elif isinstance(e, ev.StageDone):
            err_console.print(
                styled(f"{e.seconds:7.1f} s", "bold", f" {e.stage:<9} {e.id}  {e.summary}"),
                highlight=False,
                soft_wrap=True,
            )
        elif isinstance(e, ev.StageFailed):
            err_console.print(styled("  FAILED ", "bold red", f" {e.stage:<9} {e.id}  {e.error}"),
                              highlight=False, soft_wrap=True)  # fmt: skip
        elif isinstance(e, ev.StageLog):
            self.status.update(f"{e.stage}: {e.message[:100]}")
        elif isinstance(e, ev.TrialStarted):
            err_console.print(styled(f"trial {e.number}", "bold", f"  {e.chain}"), highlight=False,
                              soft_wrap=True)  # fmt: skip
        elif isinstance(e, ev.TrialFinished):
            style = "green" if e.status == "ok" else "yellow"
            err_console.print(styled(f"  {e.status}", style, f"  {e.summary}"), highlight=False,
                              soft_wrap=True)  # fmt: skip
        elif isinstance(e, ev.VariantStarted):
            self.status.update(f"optimize: building {e.name} ...")
        elif isinstance(e, ev.BenchRound):
            self.status.update(f"optimize: benchmark round {e.done}/{e.total}")
