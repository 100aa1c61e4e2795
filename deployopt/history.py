"""Results history: every bench and gate result in a local SQLite database.

Default path ``.deployopt/history.sqlite`` (``$DEPLOYOPT_HISTORY`` or ``--history`` override).
Concurrent writers lose nothing: WAL journal, a busy timeout, one short transaction per
insert. A file that is not SQLite, or a SQLite database that is not a deployopt history, is an
error naming the file; it is never reset or overwritten.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import sqlite3
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deployopt.errors import EXIT_USAGE, DeployoptError

APP = "deployopt.history"
SCHEMA_VERSION = 1
DEFAULT_PATH = Path(".deployopt") / "history.sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS results (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created TEXT NOT NULL,
    kind TEXT NOT NULL,              -- bench | gate | optimize
    model_name TEXT NOT NULL,
    model_path TEXT NOT NULL,
    model_sha256 TEXT,
    lineage TEXT NOT NULL,           -- JSON list, e.g. ["fp32", "int8-dynamic"]
    target TEXT NOT NULL,
    shapes TEXT NOT NULL,            -- JSON {input: dims}
    batch INTEGER NOT NULL,
    valid INTEGER NOT NULL,
    invalid TEXT NOT NULL,           -- JSON list of reasons
    verdict TEXT,                    -- gate results: PASS | FAIL | INCONCLUSIVE | INVALID
    p50_ms REAL, p90_ms REAL, p95_ms REAL, p99_ms REAL, throughput REAL,
    samples INTEGER NOT NULL,
    samples_ms TEXT NOT NULL,        -- JSON list: a later regression check can use them
    git_commit TEXT,
    fingerprint TEXT NOT NULL        -- JSON: machine, versions, settings
);
CREATE INDEX IF NOT EXISTS results_lookup ON results (model_name, target, batch, created);
"""


class HistoryError(DeployoptError):
    """The history database cannot be used as it is."""

    exit_code = EXIT_USAGE


def default_path() -> Path:
    env = os.environ.get("DEPLOYOPT_HISTORY")
    return Path(env) if env else DEFAULT_PATH


def git_commit(cwd: Path | None = None) -> str | None:
    """The current commit (with ``+dirty`` when the tree has changes), or None outside git."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10
        )
        if head.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.TimeoutExpired):
        return None


@dataclass(frozen=True)
class Record:
    id: int
    created: str
    kind: str
    model_name: str
    model_path: str
    model_sha256: str | None
    lineage: list[str]
    target: str
    shapes: dict[str, list[int]]
    batch: int
    valid: bool
    invalid: list[str]
    verdict: str | None
    p50_ms: float | None
    p90_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    throughput: float | None
    samples: int
    samples_ms: list[float]
    git_commit: str | None
    fingerprint: dict[str, str]


_JSON_COLS = ("lineage", "shapes", "invalid", "samples_ms", "fingerprint")


class History:
    """One history database. Opening checks it; nothing is created until the first write."""

    def __init__(self, path: Path | str | None = None):
        self.path = Path(path) if path else default_path()
        if self.path.exists():
            with closing(self._connect()) as con:
                self._check(con)

    def _connect(self) -> sqlite3.Connection:
        try:
            con = sqlite3.connect(self.path, timeout=60, isolation_level=None)
            con.execute("PRAGMA busy_timeout = 60000")
            return con
        except sqlite3.Error as e:
            raise HistoryError(f"{self.path}: cannot open the history database: {e}") from None

    def _check(self, con: sqlite3.Connection) -> None:
        hint = "point --history (or $DEPLOYOPT_HISTORY) at another file; this one is left as is"
        try:
            tables = {
                r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")
            }
        except sqlite3.DatabaseError as e:
            raise HistoryError(
                f"{self.path}: not a deployopt history database ({e})", hint=hint
            ) from None
        if not tables:
            return  # an empty SQLite file: ours to set up
        if "meta" not in tables or "results" not in tables:
            raise HistoryError(
                f"{self.path}: a SQLite database of something else "
                f"(tables: {', '.join(sorted(tables))})",
                hint=hint,
            )
        meta = dict(con.execute("SELECT key, value FROM meta"))
        if meta.get("app") != APP:
            raise HistoryError(f"{self.path}: not a deployopt history database", hint=hint)
        if int(meta.get("schema_version", 0)) > SCHEMA_VERSION:
            raise HistoryError(
                f"{self.path}: written by a newer deployopt (schema {meta['schema_version']})",
                hint="upgrade deployopt",
            )

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        con = self._connect()
        try:
            self._check(con)
            con.execute("PRAGMA journal_mode = WAL")
            con.execute("BEGIN IMMEDIATE")  # one writer at a time; others wait busy_timeout
            for stmt in _SCHEMA.split(";"):
                if stmt.strip():
                    con.execute(stmt)
            con.execute(
                "INSERT OR IGNORE INTO meta VALUES ('app', ?), ('schema_version', ?)",
                (APP, str(SCHEMA_VERSION)),
            )
            yield con
            con.execute("COMMIT")
        except sqlite3.Error as e:
            if con.in_transaction:
                con.execute("ROLLBACK")
            raise HistoryError(f"{self.path}: cannot write the history database: {e}") from None
        except BaseException:
            if con.in_transaction:
                con.execute("ROLLBACK")
            raise
        finally:
            con.close()

    def record(
        self,
        *,
        kind: str,
        model_name: str,
        model_path: str,
        model_sha256: str | None,
        lineage: Sequence[str],
        result: Mapping[str, Any],
        verdict: str | None = None,
        commit: str | None = None,
    ) -> int:
        """Append one benchmark result (``BenchResult.to_json()``); returns its row id."""
        st = result.get("stats") or {}
        shapes = dict(result.get("shapes") or {})
        batch = next(iter(shapes.values()))[0] if shapes else 1
        row = {
            "created": dt.datetime.now(dt.UTC).isoformat(timespec="microseconds"),
            "kind": kind,
            "model_name": model_name,
            "model_path": model_path,
            "model_sha256": model_sha256,
            "lineage": list(lineage),
            "target": result.get("target", ""),
            "shapes": shapes,
            "batch": int(batch),
            "valid": int(bool(result.get("valid"))),
            "invalid": list(result.get("invalid") or []),
            "verdict": verdict,
            "p50_ms": st.get("p50_ms"),
            "p90_ms": st.get("p90_ms"),
            "p95_ms": st.get("p95_ms"),
            "p99_ms": st.get("p99_ms"),
            "throughput": result.get("throughput"),
            "samples": len(result.get("samples_ms") or []),
            "samples_ms": list(result.get("samples_ms") or []),
            "git_commit": commit,
            "fingerprint": dict(result.get("env") or {}),
        }
        for col in _JSON_COLS:
            row[col] = json.dumps(row[col])
        cols = ", ".join(row)
        marks = ", ".join(f":{k}" for k in row)
        with self._write() as con:
            cur = con.execute(f"INSERT INTO results ({cols}) VALUES ({marks})", row)
            return int(cur.lastrowid)

    def query(
        self,
        model: str | None = None,
        target: str | None = None,
        kind: str | None = None,
        batch: int | None = None,
        verdict: str | None = None,
        since: str | None = None,
        limit: int | None = None,
        newest_first: bool = True,
    ) -> list[Record]:
        """Results matching every filter given."""
        if not self.path.exists():
            return []
        where, args = [], []
        for col, val in (
            ("model_name", model),
            ("target", target),
            ("kind", kind),
            ("batch", batch),
            ("verdict", verdict),
        ):
            if val is not None:
                where.append(f"{col} = ?")
                args.append(val)
        if since:
            where.append("created >= ?")
            args.append(since)
        sql = "SELECT * FROM results" + (" WHERE " + " AND ".join(where) if where else "")
        sql += f" ORDER BY id {'DESC' if newest_first else 'ASC'}"
        if limit:
            sql += f" LIMIT {int(limit)}"
        with closing(self._connect()) as con:
            self._check(con)
            con.row_factory = sqlite3.Row
            try:
                rows = con.execute(sql, args).fetchall()
            except sqlite3.OperationalError as e:
                if "no such table" in str(e):
                    return []
                raise HistoryError(f"{self.path}: cannot read the history: {e}") from None
        out = []
        for r in rows:
            d = dict(r)
            for col in _JSON_COLS:
                d[col] = json.loads(d[col])
            d["valid"] = bool(d["valid"])
            out.append(Record(**d))
        return out

    def last_pass(self, model: str, target: str, batch: int) -> Record | None:
        """The newest passing gate result of ``model`` on ``target`` at ``batch``."""
        rows = self.query(model=model, target=target, kind="gate", batch=batch, verdict="PASS")
        return next((r for r in rows if r.samples_ms), None)


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
            r.target,
            str(r.batch),
            _ms(r.p50_ms) if r.valid else "INVALID",
            _ms(r.p99_ms),
            f"{r.throughput:.1f}" if r.throughput else "-",
            r.verdict or "-",
            (r.git_commit or "-")[:12],
        )
    console.print(t)


def print_compare(console, rows: Sequence[Record]) -> None:
    """The latest valid p50 of each (model, batch) on each target, side by side, with the
    change since the one before it on the same target."""
    from rich.table import Table

    latest: dict[tuple[str, int], dict[str, list[Record]]] = {}
    for r in sorted(rows, key=lambda r: r.id, reverse=True):
        if r.valid and r.p50_ms is not None:
            latest.setdefault((r.model_name, r.batch), {}).setdefault(r.target, []).append(r)
    targets = sorted({t for per in latest.values() for t in per})
    t = Table(title="latest p50 (ms) per target; change vs the previous result")
    t.add_column("model")
    t.add_column("batch", justify="right")
    for tg in targets:
        t.add_column(tg, justify="right")
    for (model, batch), per in sorted(latest.items()):
        cells = []
        for tg in targets:
            rs = per.get(tg, [])
            if not rs:
                cells.append("-")
                continue
            cell = _ms(rs[0].p50_ms)
            if len(rs) > 1 and rs[1].p50_ms:
                cell += f" ({rs[0].p50_ms / rs[1].p50_ms - 1:+.0%})"
            cells.append(cell)
        t.add_row(model, str(batch), *cells)
    console.print(t)


def plot_p50(rows: Sequence[Record], path: Path) -> Path:
    """p50 over time, one line per (model, target, batch); a PNG written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from deployopt.workspace import atomic_path

    series: dict[str, list[tuple[dt.datetime, float]]] = {}
    for r in sorted(rows, key=lambda r: r.id):
        if r.valid and r.p50_ms is not None:
            key = f"{r.model_name} @ {r.target}, batch {r.batch}"
            series.setdefault(key, []).append((dt.datetime.fromisoformat(r.created), r.p50_ms))
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for key, pts in series.items():
        xs, ys = zip(*pts)
        ax.plot(xs, ys, marker="o", ms=3, lw=1, label=key)
    ax.set_ylabel("p50 latency (ms)")
    ax.set_title("deployopt history")
    ax.grid(alpha=0.3)
    if series:
        ax.legend(fontsize=7)
    fig.autofmt_xdate()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def show(console, path, filters: dict, limit: int, compare: bool, plot, json_out) -> None:
    """``deployopt history``: the filtered rows (or the side-by-side comparison), a p50 plot
    and a JSON copy when asked."""
    from dataclasses import asdict

    from deployopt.workspace import write_json

    db = History(path)
    rows = db.query(**filters)
    if not rows:
        filtered = any(v is not None for v in filters.values())
        console.print(f"no results in {db.path}" + (" matching the filters" if filtered else ""))
        return
    if compare:
        print_compare(console, rows)
    else:
        print_rows(console, rows[:limit])
    if plot:
        plot_p50(rows, plot)
        console.print(f"plot: {plot}")
    if json_out:
        write_json(json_out, [asdict(r) for r in rows[:limit]])
