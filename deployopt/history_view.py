"""What ``deployopt history`` shows: the rows, the targets side by side (``--compare``) and
their plots. The store itself is :mod:`deployopt.history`."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deployopt.history import History, Record


def _ms(x: float | None) -> str:
    from deployopt.report import fmt_ms

    return fmt_ms(x)


def print_rows(console, rows: Sequence[Record]) -> None:
    """The rows, newest first, as a table."""
    from rich.table import Table

    t = Table(title=f"{len(rows)} results")
    cols = (
        "id",
        "when (UTC)",
        "kind",
        "model",
        "lineage",
        "target",
        "batch",
        "p50 ms",
        "p99 ms",
        "items/s",
        "verdict",
        "commit",
    )
    for c in cols:
        t.add_column(
            c, justify="right" if c in ("id", "batch", "p50 ms", "p99 ms", "items/s") else "left"
        )
    for r in rows:
        t.add_row(
            str(r.id),
            r.created[:19].replace("T", " "),
            r.kind,
            r.model_name,
            " > ".join(r.lineage),
            r.target + (f" @ {r.node_id[:12]}" if r.node_id else ""),
            str(r.batch),
            _ms(r.p50_ms) if r.valid else "INVALID",
            _ms(r.p99_ms),
            f"{r.throughput:.1f}" if r.throughput else "-",
            (r.verdict or "-") + (" (versions differ)" if r.version_mismatch else ""),
            (r.git_commit or "-")[:12],
        )
    console.print(t)


@dataclass(frozen=True)
class Latest:
    """The newest valid p50 of one model on one target, and the one before it."""

    model: str
    batch: int
    target: str
    p50_ms: float
    previous_ms: float | None
    id: int
    version_mismatch: bool

    @property
    def change(self) -> float | None:
        """Relative change since the previous result (+0.1: 10 % slower), None if none."""
        return self.p50_ms / self.previous_ms - 1 if self.previous_ms else None


def compare(rows: Sequence[Record]) -> dict[tuple[str, int], dict[str, Latest]]:
    """``{(model, batch): {target: Latest}}`` from any rows (e.g. :meth:`History.latest`):
    per (model, batch, target) the newest valid p50 and the one before it."""
    seen: dict[tuple[str, int, str], list[Record]] = {}
    for r in sorted(rows, key=lambda r: r.id, reverse=True):
        if r.valid and r.p50_ms is not None:
            seen.setdefault((r.model_name, r.batch, r.target), []).append(r)
    out: dict[tuple[str, int], dict[str, Latest]] = {}
    for (model, batch, target), rs in sorted(seen.items()):
        prev = rs[1].p50_ms if len(rs) > 1 else None
        out.setdefault((model, batch), {})[target] = Latest(
            model, batch, target, rs[0].p50_ms, prev, rs[0].id, rs[0].version_mismatch
        )
    return out


def print_compare(console, rows: Sequence[Record]) -> None:
    """The latest valid p50 of each (model, batch) on each target, side by side, with the
    change since the one before it on the same target (``!``: measured with other versions)."""
    from rich.table import Table

    table = compare(rows)
    targets = sorted({t for per in table.values() for t in per})
    t = Table(title="latest p50 (ms) per target; change vs the previous result")
    t.add_column("model")
    t.add_column("batch", justify="right")
    for tg in targets:
        t.add_column(tg, justify="right")
    mismatch = False
    for (model, batch), per in table.items():
        cells = []
        for tg in targets:
            c = per.get(tg)
            if c is None:
                cells.append("-")
                continue
            cell = _ms(c.p50_ms) + (f" ({c.change:+.0%})" if c.change is not None else "")
            mismatch |= c.version_mismatch
            cells.append(cell + (" !" if c.version_mismatch else ""))
        t.add_row(model, str(batch), *cells)
    if mismatch:
        t.caption = "! measured on a node whose onnxruntime or deployopt differs from the driver's"
    console.print(t)


def compare_json(rows: Sequence[Record]) -> list[dict[str, Any]]:
    """The comparison as plain data, one entry per (model, batch, target)."""
    return [
        {**c.__dict__, "change": c.change} for per in compare(rows).values() for c in per.values()
    ]


def _figure(width: float = 7.5):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(width, 4.2))
    return plt, fig, ax


def _save(plt, fig, path: Path) -> Path:
    from deployopt.workspace import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_p50(rows: Sequence[Record], path: Path) -> Path:
    """p50 over time, one line per (model, target, batch); a PNG written atomically."""
    series: dict[str, list[tuple[dt.datetime, float]]] = {}
    for r in sorted(rows, key=lambda r: r.id):
        if r.valid and r.p50_ms is not None:
            key = f"{r.model_name} @ {r.target}, batch {r.batch}"
            series.setdefault(key, []).append((dt.datetime.fromisoformat(r.created), r.p50_ms))
    plt, fig, ax = _figure()
    for key, pts in series.items():
        xs, ys = zip(*pts)
        ax.plot(xs, ys, marker="o", ms=3, lw=1, label=key)
    ax.set_ylabel("p50 latency (ms)")
    ax.set_title("deployopt history")
    ax.grid(alpha=0.3)
    if series:
        ax.legend(fontsize=7)
    fig.autofmt_xdate()
    return _save(plt, fig, path)


def plot_compare(rows: Sequence[Record], path: Path) -> Path:
    """The latest p50 of each (model, batch) across targets: grouped bars, one colour per
    target, each labelled with its change since the previous result; a PNG written atomically.
    The axis is logarithmic when the p50s span more than 20x."""
    table = compare(rows)
    groups = list(table)
    targets = sorted({t for per in table.values() for t in per})
    plt, fig, ax = _figure(max(6.0, 1.2 + 0.5 * len(groups) * max(1, len(targets))))
    width = 0.8 / max(1, len(targets))
    values = [c.p50_ms for per in table.values() for c in per.values()]
    for i, tg in enumerate(targets):
        xs = [g + (i - (len(targets) - 1) / 2) * width for g in range(len(groups))]
        cells = [table[k].get(tg) for k in groups]
        bars = ax.bar(
            [x for x, c in zip(xs, cells) if c], [c.p50_ms for c in cells if c], width, label=tg
        )
        labels = [f"{c.change:+.0%}" if c.change is not None else "" for c in cells if c]
        ax.bar_label(bars, labels=labels, fontsize=7, padding=2)
    if values and max(values) / max(min(values), 1e-9) > 20:
        ax.set_yscale("log")
    ax.set_xticks(range(len(groups)), [f"{m}\nbatch {b}" for m, b in groups], fontsize=8)
    ax.set_ylabel("latest p50 latency (ms)")
    ax.set_title("deployopt history: targets side by side (label: change vs previous)")
    ax.grid(axis="y", alpha=0.3)
    if targets:
        ax.legend(fontsize=7, title="target", title_fontsize=7)
    return _save(plt, fig, path)


def show(console, path, filters: dict, limit: int, compare: bool, plot, json_out) -> None:
    """``deployopt history``: the filtered rows, or with ``compare`` the targets side by side
    (the latest p50 per model and target and its change); a plot (p50 over time, or the
    comparison) and a JSON copy when asked."""
    from dataclasses import asdict

    from deployopt.workspace import write_json

    db = History(path)
    rows = db.latest(2, **filters) if compare else db.query(**filters)
    if not rows:
        filtered = any(v is not None for v in filters.values())
        what = "no valid results with a p50" if compare else "no results"
        console.print(f"{what} in {db.path}" + (" matching the filters" if filtered else ""))
        return
    if compare:
        print_compare(console, rows)
    else:
        print_rows(console, rows[:limit])
    if plot:
        (plot_compare if compare else plot_p50)(rows, plot)
        console.print(f"plot: {plot}")
    if json_out:
        write_json(json_out, compare_json(rows) if compare else [asdict(r) for r in rows[:limit]])
