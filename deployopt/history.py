"""Results history: every bench and gate result in one database, local or shared.

``--history`` (or ``$DEPLOYOPT_HISTORY``) takes a file path or ``sqlite:///PATH`` (default
``.deployopt/history.sqlite``) or ``postgresql://USER@HOST/DB`` for a history shared by many
machines; :mod:`deployopt.history_db` parses it and owns the schema and its migrations, and
:mod:`deployopt.history_view` draws what ``deployopt history`` shows.
Concurrent writers lose nothing: each result is one short transaction (SQLite: WAL journal,
``BEGIN IMMEDIATE`` and a busy timeout), and each carries a uid, so a result sent twice is
stored once. A database that is not a deployopt history is an error naming it; it is never
reset or overwritten. An older history is migrated in place when it is opened.

>>> h = History("postgresql://ci@db.internal/bench")  # doctest: +SKIP
>>> h.record(kind="bench", model_name="m", model_path="/m.onnx", model_sha256=None,
...          lineage=["fp32"], result=bench_result.to_json())  # doctest: +SKIP
>>> h.query(model="m", limit=1)[0].p50_ms  # doctest: +SKIP
"""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from deployopt import history_db as hdb
from deployopt.history_db import APP, SCHEMA_VERSION, HistoryError  # noqa: F401 (public names)

DEFAULT_PATH = Path(".deployopt") / "history.sqlite"
VERSIONED = ("onnxruntime", "deployopt")  # a node's versions that must match the driver's
_PG_HINT = (
    "check that the server is up and the URL's user, host, port and database; keep the "
    "password out of the URL with ~/.pgpass or $PGPASSWORD"
)


_FILE_HINT = "check that the file and its folder are writable; the transaction was rolled back"


def default_path() -> Path | str:
    """``$DEPLOYOPT_HISTORY`` (a path or a URL), else ``.deployopt/history.sqlite``."""
    env = os.environ.get("DEPLOYOPT_HISTORY")
    return (env if "://" in env else Path(env)) if env else DEFAULT_PATH


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
    """One stored result. ``node_*``, ``driver_versions`` and ``version_mismatch`` are set for
    results measured on a cluster node (schema 2); ``uid`` is unique per result."""

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
    uid: str | None = None
    node_id: str | None = None
    node_versions: dict[str, str] | None = None
    driver_versions: dict[str, str] | None = None
    version_mismatch: bool = False

    @classmethod
    def from_row(cls, row: Any) -> Record:
        d = hdb.row_values(row)
        return cls(**{k: d[k] for k in _FIELDS})


_FIELDS = tuple(f.name for f in fields(Record))


def versions_differ(node: Mapping[str, str] | None, driver: Mapping[str, str] | None) -> bool:
    """True when a version named on both sides differs (onnxruntime, deployopt, ...)."""
    if not node or not driver:
        return False
    return any(node[k] != driver[k] for k in node.keys() & driver.keys())


def _prefixed(env: Mapping[str, Any], prefix: str) -> dict[str, str] | None:
    found = {k: str(env[prefix + k]) for k in VERSIONED if env.get(prefix + k) is not None}
    return found or None


def node_of(env: Mapping[str, Any]) -> dict[str, Any]:
    """Where a result ran, from its ``env`` as deployopt.fleet writes it (``node_id``,
    ``node_onnxruntime``, ``driver_deployopt``, ``version_mismatch = "yes"``...): the
    ``record`` keywords. A result measured on this machine has none of them."""
    flag = env.get("version_mismatch")
    return {
        "node_id": env.get("node_id"),
        "node_versions": _prefixed(env, "node_"),
        "driver_versions": _prefixed(env, "driver_"),
        "version_mismatch": None if flag is None else str(flag).lower() in ("yes", "true", "1"),
    }


class History:
    """One history database: ``History()`` (the default), ``History("path.sqlite")``,
    ``History("sqlite:///path")`` or ``History("postgresql://user@host/db")``.

    Opening checks the database (and connects to a server, so a wrong URL fails before
    anything is measured) and migrates an older schema in place; nothing is created until
    the first write. Attributes: ``where`` (the parsed location), ``path`` (the SQLite file,
    or the URL with its password masked), ``migrated`` (the migration steps opening ran).
    """

    def __init__(self, location: str | Path | None = None):
        self.where = hdb.where(location if location not in (None, "") else default_path())
        self.path: Path | str = self.where.path or self.where.display
        self.migrated: list[int] = []
        self._engine: sa.Engine | None = None
        self._ready = False
        if self._exists():
            with self._errors("open"), self._eng().connect() as conn:
                v = hdb.version(conn, self.where)
            if v is not None and v < SCHEMA_VERSION:
                self._setup()

    def __enter__(self) -> History:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Close the pooled connections (a later call opens new ones)."""
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None

    def _exists(self) -> bool:
        return self.where.path is None or self.where.path.exists()

    def _eng(self) -> sa.Engine:
        if self._engine is None:
            self._engine = hdb.engine(self.where)
        return self._engine

    def _error(self, action: str, e: BaseException) -> HistoryError:
        return HistoryError(
            f"{self.where.display}: cannot {action} the history database: "
            f"{hdb.reason(e, self.where)}",
            hint=_PG_HINT if self.where.path is None else _FILE_HINT if action == "write" else None,
        )

    @contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        try:
            yield
        except (sa.exc.SQLAlchemyError, OSError) as e:  # OSError: the file's folder
            raise self._error(action, e) from None

    def _setup(self) -> None:
        """Create or migrate the schema (once per object), in one locked transaction."""
        if self._ready:
            return
        with self._errors("write"):
            if self.where.path is not None:
                self.where.path.parent.mkdir(parents=True, exist_ok=True)
                with self._eng().connect() as conn:
                    hdb.version(conn, self.where)  # refuse a foreign file before touching it
                    conn.rollback()  # the journal mode changes outside a transaction
                    hdb.use_wal(conn.connection.driver_connection, self.where)
            write = self._eng().execution_options(deployopt_begin="BEGIN IMMEDIATE")
            with write.begin() as conn:
                self.migrated = hdb.ensure(conn, self.where)
        self._ready = True

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
        uid: str | None = None,
        node_id: str | None = None,
        node_versions: Mapping[str, str] | None = None,
        driver_versions: Mapping[str, str] | None = None,
        version_mismatch: bool | None = None,
    ) -> int:
        """Append one benchmark result (``BenchResult.to_json()``) in one transaction; returns
        its row id. ``uid`` names the result (default: a new one): a result recorded again
        under the same uid is stored once and its first id returned. ``node_id`` and
        ``node_versions`` say where a cluster measured it, ``driver_versions`` the caller's
        versions; ``version_mismatch`` defaults to whether the two differ. Each defaults to
        what ``result["env"]`` says of its node (see :func:`node_of`)."""
        st = result.get("stats") or {}
        shapes = dict(result.get("shapes") or {})
        batch = next(iter(shapes.values()))[0] if shapes else 1
        node = node_of(result.get("env") or {})  # what a fleet result says of its node
        node_id = node_id or node["node_id"]
        node_versions = node_versions or node["node_versions"]
        driver_versions = driver_versions or node["driver_versions"]
        if version_mismatch is None:
            version_mismatch = node["version_mismatch"]
        if version_mismatch is None:
            version_mismatch = versions_differ(node_versions, driver_versions)
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
            "valid": bool(result.get("valid")),
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
            "uid": uid or uuid.uuid4().hex,
            "node_id": node_id,
            "node_versions": dict(node_versions) if node_versions else None,
            "driver_versions": dict(driver_versions) if driver_versions else None,
            "version_mismatch": bool(version_mismatch),
        }
        self._setup()
        return self._insert(row)

    def _insert(self, row: dict[str, Any]) -> int:
        """One INSERT, one transaction. A dropped connection is retried; the uid makes the
        retry safe when the first attempt did commit."""
        write = self._eng().execution_options(deployopt_begin="BEGIN IMMEDIATE")
        t = hdb.results
        for attempt in range(3):
            try:
                with write.begin() as conn:
                    return int(conn.execute(sa.insert(t).values(row)).inserted_primary_key[0])
            except sa.exc.IntegrityError as e:
                found = self._id_of(row["uid"])
                if found is None:
                    raise self._error("write", e) from None
                return found
            except sa.exc.DBAPIError as e:
                if not e.connection_invalidated or attempt == 2:
                    raise self._error("write", e) from None
                time.sleep(0.5 * (attempt + 1))
        raise AssertionError("unreachable")

    def _id_of(self, uid: str) -> int | None:
        t = hdb.results
        with self._errors("read"), self._eng().connect() as conn:
            return conn.execute(sa.select(t.c.id).where(t.c.uid == uid)).scalar()

    def _where(self, model, target, kind, batch, verdict, since) -> list:
        t = hdb.results
        conds = [
            t.c[col] == val
            for col, val in (
                ("model_name", model),
                ("target", target),
                ("kind", kind),
                ("batch", batch),
                ("verdict", verdict),
            )
            if val is not None
        ]
        if since:
            conds.append(t.c.created >= since)
        return conds

    def _select(self, stmt) -> list[Record]:
        if not self._exists():
            return []
        with self._errors("read"), self._eng().connect() as conn:
            if hdb.version(conn, self.where) is None:
                return []
            return [Record.from_row(r) for r in conn.execute(stmt)]

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
        """Results matching every filter given, newest first (``since``: an ISO date)."""
        t = hdb.results
        stmt = sa.select(t).where(*self._where(model, target, kind, batch, verdict, since))
        stmt = stmt.order_by(t.c.id.desc() if newest_first else t.c.id.asc())
        if limit:
            stmt = stmt.limit(int(limit))
        return self._select(stmt)

    def latest(self, n: int = 2, **filters: Any) -> list[Record]:
        """The ``n`` newest valid results with a p50 of each (model, batch, target), newest
        first; the database picks them (a window function), so the cost grows with the pairs
        shown, not with the length of the history. ``filters``: as :meth:`query`."""
        t = hdb.results
        keys = ("model", "target", "kind", "batch", "verdict", "since")
        conds = self._where(**{k: filters.get(k) for k in keys})
        rank = sa.func.row_number().over(
            partition_by=(t.c.model_name, t.c.batch, t.c.target), order_by=t.c.id.desc()
        )
        ranked = (
            sa.select(t, rank.label("rank_"))
            .where(t.c.valid == sa.true(), t.c.p50_ms.is_not(None), *conds)
            .subquery()
        )
        cols = [ranked.c[name] for name in t.c.keys()]
        stmt = sa.select(*cols).where(ranked.c.rank_ <= n).order_by(ranked.c.id.desc())
        return self._select(stmt)

    def count(self) -> int:
        """How many results the history holds."""
        t = hdb.results
        if not self._exists():
            return 0
        with self._errors("read"), self._eng().connect() as conn:
            if hdb.version(conn, self.where) is None:
                return 0
            return int(conn.execute(sa.select(sa.func.count()).select_from(t)).scalar_one())

    def last_pass(self, model: str, target: str, batch: int) -> Record | None:
        """The newest passing gate result of ``model`` on ``target`` at ``batch``."""
        rows = self.query(model=model, target=target, kind="gate", batch=batch, verdict="PASS")
        return next((r for r in rows if r.samples_ms), None)
