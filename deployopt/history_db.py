"""Where the results history lives: database URLs, the schema and its migrations.

One schema, declared once as SQLAlchemy Core tables, serves SQLite (the default, one machine)
and PostgreSQL (shared by many machines, through psycopg 3). ``meta`` holds the application
name and the schema version; a database at an older version is brought up to date in place
by the ordered steps in ``MIGRATIONS``, all in one transaction, so an interrupted migration
leaves the database as it was. A database that is not a deployopt history is an error naming
it, never reset.

>>> where("sqlite:///ci/history.sqlite").path
PosixPath('ci/history.sqlite')
>>> where("postgresql://ci:s3cret@db.internal/bench").display
'postgresql://ci:***@db.internal/bench'
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import URL, Connection, Engine, make_url

from deployopt.errors import EXIT_USAGE, DeployoptError

APP = "deployopt.history"
SCHEMA_VERSION = 2
URL_HINT = (
    "give a file path, sqlite:///PATH or postgresql://USER@HOST[:PORT]/DB "
    "(--history or $DEPLOYOPT_HISTORY)"
)
LEFT_AS_IS = "point --history (or $DEPLOYOPT_HISTORY) at another database; this one is left as is"
_LOCK_ID = 0x6465706C6F79  # pg_advisory_xact_lock key: schema set-up and migration, one at a time


class HistoryError(DeployoptError):
    """The history database cannot be used as it is."""

    exit_code = EXIT_USAGE


# ---------------------------------------------------------------- the schema (version 2)

metadata = sa.MetaData()

meta = sa.Table(
    "meta",
    metadata,
    sa.Column("key", sa.Text, primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)

results = sa.Table(
    "results",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("created", sa.Text, nullable=False),  # ISO 8601 UTC: sorts as text
    sa.Column("kind", sa.Text, nullable=False),  # bench | gate | optimize
    sa.Column("model_name", sa.Text, nullable=False),
    sa.Column("model_path", sa.Text, nullable=False),
    sa.Column("model_sha256", sa.Text),
    sa.Column("lineage", sa.JSON, nullable=False),  # ["fp32", "int8-dynamic"]
    sa.Column("target", sa.Text, nullable=False),
    sa.Column("shapes", sa.JSON, nullable=False),  # {input: dims}
    sa.Column("batch", sa.Integer, nullable=False),
    sa.Column("valid", sa.Boolean, nullable=False),
    sa.Column("invalid", sa.JSON, nullable=False),  # reasons
    sa.Column("verdict", sa.Text),  # gate results: PASS | FAIL | INCONCLUSIVE | INVALID
    sa.Column("p50_ms", sa.Float),
    sa.Column("p90_ms", sa.Float),
    sa.Column("p95_ms", sa.Float),
    sa.Column("p99_ms", sa.Float),
    sa.Column("throughput", sa.Float),
    sa.Column("samples", sa.Integer, nullable=False),
    sa.Column("samples_ms", sa.JSON, nullable=False),  # a later regression check uses them
    sa.Column("git_commit", sa.Text),
    sa.Column("fingerprint", sa.JSON, nullable=False),  # machine, versions, settings
    # version 2: one id per result (a re-sent result is stored once) and where it ran
    sa.Column("uid", sa.Text),
    sa.Column("node_id", sa.Text),  # the cluster node that measured it; NULL: this machine
    sa.Column("node_versions", sa.JSON(none_as_null=True)),  # {onnxruntime, deployopt} there
    sa.Column("driver_versions", sa.JSON(none_as_null=True)),  # ... and on the driver
    sa.Column("version_mismatch", sa.Boolean, nullable=False, server_default=sa.false()),
    sqlite_autoincrement=True,  # ids never reused, as version 1 declared them
)
sa.Index(
    "results_lookup", results.c.model_name, results.c.target, results.c.batch, results.c.created
)
UID_INDEX = sa.Index("results_uid", results.c.uid, unique=True)


def _add_columns(conn: Connection, names: list[str]) -> None:
    from sqlalchemy.schema import CreateColumn

    for name in names:
        spec = CreateColumn(results.c[name]).compile(dialect=conn.dialect)
        conn.exec_driver_sql(f"ALTER TABLE results ADD COLUMN {spec}")


def _v2(conn: Connection) -> None:
    """Version 1 -> 2: result uids (old rows get ``v1-<id>``), node id and versions."""
    _add_columns(conn, ["uid", "node_id", "node_versions", "driver_versions", "version_mismatch"])
    uid = sa.literal("v1-") + sa.cast(results.c.id, sa.Text)
    conn.execute(sa.update(results).values(uid=uid))
    UID_INDEX.create(conn)


# version N is reached by MIGRATIONS[N] from version N - 1
MIGRATIONS = {2: _v2}


# ---------------------------------------------------------------- where: URLs and paths


@dataclass(frozen=True)
class Where:
    """A parsed history location: the SQLAlchemy URL, a display form with the password masked,
    and the file for SQLite (None for a server)."""

    url: URL
    display: str
    path: Path | None

    @property
    def backend(self) -> str:
        return "SQLite" if self.path is not None else "PostgreSQL"


def mask(url: URL) -> str:
    """``url`` as text with any password shown as ``***``."""
    if url.query.get("password"):
        url = url.update_query_dict({"password": "***"})
    return url.render_as_string(hide_password=bool(url.password))


def where(location: str | Path) -> Where:
    """Parse ``--history``: a file path, ``sqlite:///PATH`` or ``postgresql://...``
    (``postgres://`` and ``postgresql+psycopg://`` too; psycopg 3 is the driver)."""
    text = str(location)
    if isinstance(location, Path) or "://" not in text:
        if not text.strip():
            raise HistoryError("--history: an empty path", hint=URL_HINT)
        path = Path(text).expanduser()
        return Where(URL.create("sqlite", database=str(path)), str(path), path)
    try:
        url = make_url(text)
    except (sa.exc.ArgumentError, ValueError) as e:
        raise HistoryError(
            f"--history {_scrub(text)}: not a database URL ({e})", hint=URL_HINT
        ) from None
    shown = mask(url)
    if url.drivername in ("sqlite", "sqlite+pysqlite"):
        if not url.database or url.database == ":memory:" or url.database.startswith("file:"):
            raise HistoryError(
                f"--history {shown}: names no file (an in-memory history would be lost)",
                hint="use sqlite:///relative/path.sqlite or sqlite:////absolute/path.sqlite",
            )
        path = Path(url.database).expanduser()
        return Where(URL.create("sqlite", database=str(path)), str(path), path)
    if url.drivername in ("postgresql", "postgres", "postgresql+psycopg"):
        if not url.database:
            raise HistoryError(
                f"--history {shown}: names no database", hint="postgresql://USER@HOST/DB"
            )
        return Where(url.set(drivername="postgresql+psycopg"), shown, None)
    raise HistoryError(
        f"--history {shown}: unsupported database scheme {url.drivername!r}",
        hint="sqlite:///PATH, or postgresql://USER@HOST/DB (psycopg 3 is the driver)",
    )


def _scrub(text: str) -> str:
    """A URL that did not parse, with what looks like a password masked."""
    head, sep, rest = text.partition("://")
    cred, at, host = rest.rpartition("@")
    if at and ":" in cred:
        cred = cred.split(":", 1)[0] + ":***"
    return head + sep + cred + at + host if sep else text


# ---------------------------------------------------------------- engines


def engine(w: Where) -> Engine:
    """An engine for ``w``. SQLite: transactions begun by deployopt (``BEGIN``, or
    ``BEGIN IMMEDIATE`` under the ``deployopt_begin`` execution option, so writers queue for
    the lock instead of failing), a 60 s busy timeout. PostgreSQL: a 10 s connect timeout, a
    pre-ping on each checkout, and no server-side prepared statements, so a pgbouncer in
    transaction mode in front of the server works."""
    if w.path is not None:
        eng = sa.create_engine(w.url, connect_args={"timeout": 60})  # the busy timeout

        @sa.event.listens_for(eng, "connect")
        def _connect(dbapi_con, _record):
            # the sqlite3 module's own transaction handling defers BEGIN and commits before DDL;
            # see SQLAlchemy's pysqlite notes, "Serializable isolation / Transactional DDL"
            dbapi_con.isolation_level = None

        @sa.event.listens_for(eng, "begin")
        def _begin(conn):
            conn.exec_driver_sql(conn.get_execution_options().get("deployopt_begin", "BEGIN"))

        return eng
    return sa.create_engine(
        w.url,
        pool_pre_ping=True,
        connect_args={"connect_timeout": 10, "prepare_threshold": None},
    )


def use_wal(dbapi_con, w: Where, timeout_s: float = 60.0) -> None:
    """Put a SQLite file in the WAL journal (readers never wait for the writer; the mode
    persists in the file). Changing the mode waits for no busy timeout, so while another
    process holds a lock on the file (it is creating the schema) this retries."""
    import sqlite3

    deadline, delay = time.monotonic() + timeout_s, 0.01
    while True:
        try:
            if dbapi_con.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                dbapi_con.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() > deadline:
                raise HistoryError(f"{w.display}: cannot write the history database: {e}") from None
            time.sleep(delay)
            delay = min(2 * delay, 0.5)


def reason(e: BaseException, w: Where) -> str:
    """The driver's one-line reason for ``e``, without the password."""
    text = str(getattr(e, "orig", None) or e).strip().splitlines()
    line = text[0] if text else type(e).__name__
    if w.url.password:
        line = line.replace(str(w.url.password), "***")
    return line


# ---------------------------------------------------------------- checking and migrating


def version(conn: Connection, w: Where) -> int | None:
    """The schema version of the database ``conn`` is on, or None when it is empty (ours to
    set up). A database of something else is an error naming it."""
    try:
        tables = set(sa.inspect(conn).get_table_names())
    except sa.exc.DatabaseError as e:
        raise HistoryError(
            f"{w.display}: not a deployopt history database ({reason(e, w)})", hint=LEFT_AS_IS
        ) from None
    if not tables:
        return None
    if "meta" not in tables or "results" not in tables:
        raise HistoryError(
            f"{w.display}: a {w.backend} database of something else "
            f"(tables: {', '.join(sorted(tables))})",
            hint=LEFT_AS_IS,
        )
    rows = dict(conn.execute(sa.select(meta.c.key, meta.c.value)).all())
    if rows.get("app") != APP:
        raise HistoryError(f"{w.display}: not a deployopt history database", hint=LEFT_AS_IS)
    try:
        v = int(rows.get("schema_version", "0"))
    except ValueError:
        v = 0
    if v > SCHEMA_VERSION:
        raise HistoryError(
            f"{w.display}: written by a newer deployopt (schema {v}; this one reads "
            f"{SCHEMA_VERSION})",
            hint="upgrade deployopt",
        )
    if v < 1:
        raise HistoryError(f"{w.display}: a history with no schema version", hint=LEFT_AS_IS)
    return v


def ensure(conn: Connection, w: Where) -> list[int]:
    """Create the schema in an empty database or migrate an older one, inside the caller's
    transaction (which holds the write lock on SQLite; an advisory lock here on PostgreSQL).
    Returns the migration steps run."""
    if conn.dialect.name == "postgresql":
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _LOCK_ID})
    v = version(conn, w)
    if v is None:
        metadata.create_all(conn)
        version_row = {"key": "schema_version", "value": str(SCHEMA_VERSION)}
        conn.execute(sa.insert(meta), [{"key": "app", "value": APP}, version_row])
        return []
    steps = list(range(v + 1, SCHEMA_VERSION + 1))
    for step in steps:
        MIGRATIONS[step](conn)
    if steps:
        conn.execute(
            sa.update(meta).where(meta.c.key == "schema_version").values(value=str(SCHEMA_VERSION))
        )
    return steps


def row_values(row: Any) -> dict[str, Any]:
    """A results row as a plain dict with Python types (SQLite's 0/1 as bools)."""
    d = dict(row._mapping)
    d["valid"] = bool(d["valid"])
    d["version_mismatch"] = bool(d["version_mismatch"])
    return d
