"""Reports: ``report.json`` (versioned schema), ``report.md`` and a self-contained
``report.html`` with plots inlined as PNG data (no external URL)."""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
import json
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from deployopt.benchmark import DRIFT_WARN
from deployopt.workspace import write_json, write_text

SCHEMA_ID = "deployopt.report/2"  # 2: latency samples in a side file (SAMPLES_FILE)
READABLE_SCHEMAS = ("deployopt.report/1", SCHEMA_ID)  # 1 inlined every sample
SAMPLES_FILE = "samples.npz"


def schema() -> dict:
    return json.loads(resources.files("deployopt.data").joinpath("report.schema.json").read_text())


def lineage(variants: Sequence[Mapping[str, Any]], vid: str) -> list[str]:
    """Names from the root to the variant ``vid``: e.g. ["fp32", "fuse", "fp16"]."""
    by_id = {v["id"]: v for v in variants}
    chain = []
    cur = by_id.get(vid)
    while cur is not None:
        chain.append(cur["name"])
        cur = by_id.get(cur.get("parent"))
    return chain[::-1]


def session_line(session: dict) -> str:
    """One line for the recommended session settings (terminal, report.md)."""
    p50 = ", ".join(f"{k} {v:.2f} ms" for k, v in session["p50_ms"].items())
    parts = [f"{k}={v}" for k, v in session["session_config"].items()]
    if session.get("threads"):
        parts.insert(0, f"{session['threads']} intra-op threads")
    if session.get("graph_optimization", "all") != "all":
        parts.insert(0, f"graph optimization {session['graph_optimization']}")
    return (
        f"{session['chosen']} ({'; '.join(parts) or 'onnxruntime defaults'}); p50 {p50}; "
        "settings in best.session.json"
    )


def build(
    *,
    source: str,
    task: str,
    config: Mapping[str, Any],
    environment: Mapping[str, str],
    target: Mapping[str, Any] | None,
    bench_spec: Mapping[str, Any] | None,
    constraints: Mapping[str, Any] | None,
    data: Mapping[str, str],
    variants: Sequence[Mapping[str, Any]],
    bench: Mapping[str, Sequence[Mapping]] | None,
    choice: Mapping[str, Any] | None,
    model_lineage: Sequence[Mapping[str, Any]] = (),
    search: Mapping[str, Any] | None = None,
    warnings: Sequence[str] = (),
) -> dict:
    """Assemble the report document (plain JSON data, every latency sample inlined;
    :func:`write_all` moves the samples to a side file)."""
    from deployopt import __version__

    rows = []
    for v in variants:
        row = dict(v)
        row["chain"] = lineage(variants, v["id"])
        row["bench"] = list((bench or {}).get(v["name"], []))
        rows.append(row)
    return {
        "schema": SCHEMA_ID,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "deployopt_version": __version__,
        "source": source,
        "task": task,
        "config": dict(config),
        "environment": dict(environment),
        "target": dict(target) if target else None,
        "bench_spec": dict(bench_spec) if bench_spec else None,
        "constraints": dict(constraints) if constraints else None,
        "data": dict(data),
        "variants": rows,
        "choice": dict(choice) if choice else None,
        "lineage": [dict(x) for x in model_lineage],
        "search": dict(search) if search else None,
        "warnings": list(warnings),
    }


def _ranked(report: Mapping[str, Any], ch: Mapping[str, Any]) -> list[str]:
    """``name p50 ms`` for each qualifying variant, as ranked by the choice."""
    metric = ch.get("metric", "p50")
    out = []
    for name in ch["ranked"]:
        v = next((x for x in report["variants"] if x["name"] == name), {})
        b = (v.get("bench") or [{}])[0]
        ms = ((b.get("stats") or {}).get(f"{metric}_ms")) if b else None
        out.append(f"{name} {fmt_ms(ms)} ms" if ms is not None else name)
    return out


def funnel_text(funnel: Mapping[str, int]) -> str:
    """How many candidates each step of the search kept, one line."""
    steps = [
        ("candidates", "candidates"),
        ("parity_passed", "passed parity"),
        ("screened", "screened"),
        ("measured", "measured in full"),
        ("session_searched", "session-searched"),
    ]
    return " -> ".join(f"{funnel[k]} {label}" for k, label in steps if k in funnel)


def search_lines(search: Mapping[str, Any] | None) -> list[str]:
    """The search section of report.md: effort, CPU, funnel, each candidate and its reason."""
    if not search:
        return []
    cpu = search.get("cpu") or {}
    lines = [
        "",
        f"Search ({search.get('effort')}): {funnel_text(search.get('funnel') or {})}. "
        f"Candidates derived for {cpu.get('model', '?')} "
        f"({', '.join(cpu.get('features', [])) or 'no SIMD features'}; int8 dot product: "
        f"{'yes' if cpu.get('int8_dot') else 'no'}):",
    ]
    lines += [f"- {c['name']}: {c.get('why', '')}" for c in search.get("candidates", [])]
    return lines


def lineage_text(report: Mapping[str, Any]) -> str | None:
    """How the input model was made (distill / prune steps before ONNX), one line, or None."""
    steps = []
    for s in report.get("lineage") or []:
        if s.get("stage") == "prune":
            steps.append(f"prune ({s.get('summary', '')})")
        elif s.get("stage") == "distill":
            steps.append(f"distill from {s.get('from', '?')} ({s.get('params', '?'):,} params)")
        else:
            steps.append(str(s.get("stage")))
    return " > ".join(steps) if steps else None


def _first_bench(v: Mapping[str, Any]) -> Mapping[str, Any] | None:
    return v["bench"][0] if v.get("bench") else None


def _fmt(x: Any, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def fmt_ms(x: float | None) -> str:
    """Milliseconds with the digits that matter: 123, 17.04, 0.0512."""
    if x is None:
        return "-"
    return f"{x:.0f}" if x >= 100 else (f"{x:.2f}" if x >= 1 else f"{x:.4f}")


def task_metric(report: Mapping[str, Any]) -> str | None:
    """The primary task metric the variants were measured on (``--labels-column``), or None."""
    return next((v["task"]["metric"] for v in report["variants"] if v.get("task")), None)


def header(report: Mapping[str, Any]) -> list[str]:
    """The table's columns: :data:`HEADER`, with the task metric and its drop after the
    cosines when the variants were measured on labels."""
    metric = task_metric(report)
    if metric is None:
        return list(HEADER)
    i = HEADER.index("min cos") + 1
    return [*HEADER[:i], metric, "drop pts", *HEADER[i:]]


def table_rows(report: Mapping[str, Any]) -> list[list[str]]:
    metric = task_metric(report)
    rows = []
    for v in report["variants"]:
        p = v.get("parity") or {}
        b = _first_bench(v) or {}
        st = b.get("stats") or {}
        status = v["status"]
        if b and not b.get("valid", True):
            status = "bench invalid"
        if report.get("choice") and report["choice"].get("winner") == v["name"]:
            status = "**chosen**"
        rows.append(
            [
                v["name"],
                " > ".join(v["chain"]),
                _fmt(v["size_bytes"] / 1e6 if v.get("size_bytes") else None, ".3g"),
                _fmt(p.get("mean_cosine"), ".5f"),
                _fmt(p.get("min_cosine"), ".5f"),
                *(_task_cells(v, metric) if metric else []),
                fmt_ms(st.get("p50_ms")),
                fmt_ms(st.get("p90_ms")),
                fmt_ms(st.get("p99_ms")),
                _fmt(b.get("throughput"), ".1f"),
                status,
            ]
        )
    return rows


def _task_cells(v: Mapping[str, Any], metric: str) -> list[str]:
    t = v.get("task") or {}
    return [_fmt(t.get(metric), ".2f"), _fmt(t.get("accuracy_drop"), ".2f")]


def task_lines(report: Mapping[str, Any]) -> list[str]:
    """The task metrics section of report.md: how the labels were read, then every measured
    variant's metrics (points) and its drop vs the original."""
    measured = [v for v in report["variants"] if v.get("task")]
    if not measured:
        return []
    lines = ["", f"Task metrics (points): {(report.get('data') or {}).get('labels', '')}"]
    for v in measured:
        t = v["task"]
        skip = ("metric", "samples", "accuracy_drop")
        parts = [f"{k} {x:.2f}" for k, x in t.items() if k not in skip and isinstance(x, float)]
        drop = t.get("accuracy_drop")
        tail = f"; drop {drop:.2f}" if drop is not None else ""
        lines.append(f"- {v['name']}: {', '.join(parts)}{tail}")
    return lines


HEADER = [
    "variant",
    "chain",
    "size MB",
    "mean cos",
    "min cos",
    "p50 ms",
    "p90 ms",
    "p99 ms",
    "items/s",
    "status",
]


def render_md(report: Mapping[str, Any]) -> str:
    env = report.get("environment", {})
    t = report.get("target") or {}
    lines = [f"# deployopt report: {report['source']}", ""]
    lines.append(
        f"- task: {report['task']}; created {report['created']}, deployopt "
        f"{report['deployopt_version']}"
    )
    if t:
        spec = report.get("bench_spec") or {}
        lines.append(
            f"- target: {t.get('name')} ({t.get('ep')}, {t.get('threads') or 'all'} "
            f"threads); batch {spec.get('batch')} x seq {spec.get('seq')}"
        )
    made = lineage_text(report)
    if made:
        lines.append(f"- model made by: {made}")
    lines.append(
        f"- machine: {env.get('cpu', '?')} ({env.get('cpu_flags', '')}), "
        f"{env.get('cores', '?')} cores" + (f", GPU {env['gpu']}" if "gpu" in env else "")
    )
    lines.append(
        f"- versions: onnxruntime {env.get('onnxruntime', '?')}, onnx "
        f"{env.get('onnx', '?')}, torch {env.get('torch', '-')}"
    )
    cols = header(report)
    lines += ["", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(report)]
    lines += task_lines(report)
    ch = report.get("choice")
    if ch:
        lines += [""]
        smallest = ch.get("prefer") == "smallest"
        rule = "smallest file" if smallest else f"fastest on {ch.get('metric', 'p50')}"
        if ch.get("winner"):
            lines.append(
                f"**Chosen: {ch['winner']}** → `{ch.get('best_path')}` "
                f"({rule} meeting the constraints)"
            )
            if ch.get("session"):
                lines += ["", f"Session: {session_line(ch['session'])}"]
                if ch["session"].get("replaced"):
                    lines.append(f"({ch['session']['replaced']})")
        else:
            lines.append("**No variant qualifies.**")
        lines.append(
            f"Pareto front (latency, cosine, size): {', '.join(ch.get('pareto', [])) or '-'}"
        )
        if len(ch.get("ranked", [])) > 1:
            order = "smallest first" if smallest else f"fastest first on {ch.get('metric', 'p50')}"
            lines.append(f"Qualifying, {order}: " + ", ".join(_ranked(report, ch)))
        if ch.get("rejected"):
            lines += ["", "Rejected:"]
            lines += [f"- {k}: {why}" for k, why in ch["rejected"].items()]
    lines += search_lines(report.get("search"))
    drifted = [
        (v["name"], b["drift"])
        for v in report["variants"]
        for b in v.get("bench", [])[:1]
        if b.get("drift") is not None and b["drift"] > DRIFT_WARN
    ]
    if drifted:
        lines += [
            "",
            f"Machine drift (round medians more than {DRIFT_WARN:.0%} apart; compare models "
            "within this run, not absolute numbers across runs):",
        ]
        lines += [f"- {n}: {d:.0%}" for n, d in drifted]
    lines += warning_lines(report)
    failed = [v for v in report["variants"] if v["status"] != "ok"]
    if failed:
        lines += ["", "Variants not built or failed:"]
        lines += [f"- {v['name']} ({v['status']}): {v['reason']}" for v in failed]
    return "\n".join(lines) + "\n"


def warning_lines(report: Mapping[str, Any]) -> list[str]:
    """The run's warnings and each variant's, as a report.md section (empty when none)."""
    found = list(report.get("warnings") or [])
    found += [f"{v['name']}: {w}" for v in report["variants"] for w in v.get("warnings") or []]
    return ["", "Warnings:", *(f"- {w}" for w in found)] if found else []


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def plots(report: Mapping[str, Any]) -> dict[str, str]:
    """PNG data URIs: latency vs accuracy with the Pareto front; latency distributions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = {}
    ch = report.get("choice") or {}
    pareto = set(ch.get("pareto", []))
    pts = []
    for v in report["variants"]:
        b = _first_bench(v)
        p = v.get("parity") or {}
        if b and b.get("stats") and p.get("mean_cosine") is not None:
            pts.append((v["name"], b["stats"]["p50_ms"], p["mean_cosine"]))
    if pts:
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for name, ms, cos in pts:
            on = name in pareto
            ax.scatter(
                ms,
                cos,
                s=70 if on else 40,
                marker="*" if on else "o",
                color="tab:red"
                if name == ch.get("winner")
                else ("tab:orange" if on else "tab:blue"),
                zorder=3,
            )
            ax.annotate(name, (ms, cos), textcoords="offset points", xytext=(5, 4), fontsize=8)
        front = sorted((ms, cos) for name, ms, cos in pts if name in pareto)
        if len(front) > 1:
            ax.plot(*zip(*front), "--", color="tab:orange", lw=1, label="Pareto front")
            ax.legend(loc="lower right", fontsize=8)
        ax.set_xlabel("p50 latency (ms)")
        ax.set_ylabel("mean cosine vs fp32")
        ax.set_title("latency vs accuracy")
        ax.grid(alpha=0.3)
        out["latency_vs_accuracy"] = _png(fig)
        plt.close(fig)
    dists = [
        (v["name"], _first_bench(v)["samples_ms"])
        for v in report["variants"]
        if _first_bench(v) and _first_bench(v).get("samples_ms")
    ]
    if dists:
        fig, ax = plt.subplots(figsize=(6.4, 0.5 + 0.45 * len(dists)))
        ax.boxplot([d for _, d in dists], vert=False, showfliers=True)
        ax.set_yticks(range(1, len(dists) + 1), [n for n, _ in dists])
        ax.set_xlabel("latency per run (ms)")
        ax.set_title("latency distributions")
        ax.grid(alpha=0.3, axis="x")
        out["latency_distributions"] = _png(fig)
        plt.close(fig)
    return out


def render_html(report: Mapping[str, Any]) -> str:
    md = render_md(report)
    imgs = plots(report)
    esc = html.escape
    head = "".join(f"<th>{esc(h)}</th>" for h in header(report))
    body = "".join(
        "<tr>" + "".join(f"<td>{esc(c.replace('**', ''))}</td>" for c in r) + "</tr>"
        for r in table_rows(report)
    )
    intro = "".join(f"<li>{esc(ln[2:])}</li>" for ln in md.splitlines()[2:7] if ln.startswith("- "))
    ch = report.get("choice") or {}
    chosen = (
        (
            f"<p><b>Chosen: {esc(ch['winner'])}</b> → <code>{esc(str(ch.get('best_path')))}"
            f"</code></p>"
            + (f"<p>Session: {esc(session_line(ch['session']))}</p>" if ch.get("session") else "")
        )
        if ch.get("winner")
        else "<p><b>No variant qualifies.</b></p>"
    )
    rejected = "".join(
        f"<li>{esc(k)}: {esc(v)}</li>" for k, v in (ch.get("rejected") or {}).items()
    )
    figures = "".join(
        f'<figure><img alt="{esc(k)}" src="{v}"><figcaption>{esc(k)}</figcaption></figure>'
        for k, v in imgs.items()
    )
    search = search_lines(report.get("search"))
    search_html = (
        f"<h2>Search</h2><p>{esc(search[1])}</p><ul>"
        + "".join(f"<li>{esc(ln[2:])}</li>" for ln in search[2:])
        + "</ul>"
        if search
        else ""
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>deployopt report: {esc(report["source"])}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; font-size: 14px; }}
th, td {{ border: 1px solid #ccc; padding: 4px 8px; text-align: right; }}
td:nth-child(1), td:nth-child(2), td:last-child {{ text-align: left; }}
figure {{ display: inline-block; margin: 1em; }}
</style></head><body>
<h1>deployopt report</h1>
<p>{esc(report["source"])}</p>
<ul>{intro}</ul>
{chosen}
<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>
<h2>Rejected</h2><ul>{rejected or "<li>none</li>"}</ul>
{search_html}
<h2>Plots</h2>
{figures or "<p>no benchmark results to plot</p>"}
</body></html>
"""


def write_all(out: Path, report: Mapping[str, Any]) -> dict[str, Path]:
    """Write report.json, its latency samples (``samples.npz``), report.md and report.html,
    each atomically. report.json stays small whatever the sample counts: every ``samples_ms``
    list is replaced by a ``samples_ref`` key into the side file, whose name and sha256 the
    report records (:func:`load_samples` puts them back)."""
    paths = {"json": out / "report.json", "md": out / "report.md", "html": out / "report.html"}
    small, arrays = split_samples(report)
    if arrays:
        paths["samples"] = out / SAMPLES_FILE
        small["samples_file"] = SAMPLES_FILE
        small["samples_sha256"] = write_samples(paths["samples"], arrays)
    else:
        (out / SAMPLES_FILE).unlink(missing_ok=True)  # never a stale one beside a new report
    write_json(paths["json"], small)
    write_text(paths["md"], render_md(report))
    write_text(paths["html"], render_html(report))
    return paths


def split_samples(report: Mapping[str, Any]) -> tuple[dict, dict[str, Any]]:
    """A copy of ``report`` with every non-empty ``samples_ms`` list (bench results, wherever
    they sit) replaced by ``samples_ref``, and the arrays by key."""
    import numpy as np

    arrays: dict[str, Any] = {}

    def walk(x: Any) -> Any:
        if isinstance(x, Mapping):
            d = {k: walk(v) for k, v in x.items()}
            if isinstance(d.get("samples_ms"), list | tuple) and d["samples_ms"]:
                key = f"s{len(arrays):05d}"
                arrays[key] = np.asarray(d.pop("samples_ms"), dtype=np.float64)
                d["samples_ref"] = key
            return d
        if isinstance(x, list | tuple):
            return [walk(v) for v in x]
        return x

    return walk(report), arrays


def write_samples(path: Path, arrays: Mapping[str, Any]) -> str:
    """``arrays`` as a compressed .npz written atomically; returns its sha256."""
    import numpy as np

    from deployopt.workspace import atomic_path, sha256_file

    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)
    return sha256_file(path)


def load_samples(doc: dict, folder: Path) -> dict:
    """Put the samples of the side file back into ``doc`` (in place; also returned): every
    ``samples_ref`` becomes ``samples_ms`` again. A report without a side file (schema 1, or
    no samples) is returned as it is. Raises ConfigError when the file is missing, altered or
    lacks a sample set the report refers to."""
    import numpy as np

    from deployopt.errors import ConfigError
    from deployopt.workspace import sha256_file

    name = doc.get("samples_file")
    if not name:
        return doc
    path = Path(folder) / Path(name).name  # beside the report, never elsewhere
    hint = "keep the report's samples.npz beside report.json (they are written together)"
    if not path.is_file():
        raise ConfigError(f"{path}: the report's latency samples file is missing", hint=hint)
    if doc.get("samples_sha256") and sha256_file(path) != doc["samples_sha256"]:
        raise ConfigError(f"{path}: does not match the report (sha256 differs)", hint=hint)
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (ValueError, OSError) as e:
        raise ConfigError(f"{path}: not a readable samples file ({e})", hint=hint) from None

    def walk(x: Any) -> None:
        if isinstance(x, dict):
            ref = x.get("samples_ref")
            if ref is not None:
                if ref not in arrays:
                    raise ConfigError(f"{path}: no sample set {ref!r}", hint=hint)
                x["samples_ms"] = arrays[ref].tolist()
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    walk(doc)
    return doc
