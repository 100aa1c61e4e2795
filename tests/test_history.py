"""The results history on SQLite: round trip, filters, database URLs, the v1 -> v2 migration,
four processes writing at once, files it must refuse, and ``history --compare``.
The same contracts on a real PostgreSQL server are in test_history_pg.py."""

from __future__ import annotations

import json
import multiprocessing as mp
import sqlite3

import pytest

from deployopt.history import History, HistoryError, git_commit
from deployopt.history_db import SCHEMA_VERSION, where
from deployopt.history_view import compare, plot_compare


def run_cli(*argv):
    from tests.models import run_cli  # imports torch: not in the writer processes

    return run_cli(*argv)


def flat(text):
    return " ".join(text.split())


def result(p50=10.0, target="cpu", batch=1, valid=True):
    samples = [p50 - 0.5, p50, p50 + 0.5]
    return {
        "target": target,
        "shapes": {"input_ids": [batch, 128]},
        "valid": valid,
        "invalid": [] if valid else ["crashed"],
        "stats": {"p50_ms": p50, "p90_ms": p50 + 0.4, "p95_ms": p50 + 0.45, "p99_ms": p50 + 0.5},
        "throughput": batch / (p50 / 1e3),
        "samples_ms": samples,
        "env": {"cpu": "test cpu", "onnxruntime": "1.0"},
    }


def add(h, name="m", verdict=None, kind="gate", uid=None, node=None, **kw):
    return h.record(
        kind=kind,
        model_name=name,
        model_path=f"/x/{name}.onnx",
        model_sha256="ab" * 32,
        lineage=["fp32", "int8-dynamic"],
        result=result(**kw),
        verdict=verdict,
        commit="c0ffee",
        uid=uid,
        **(node or {}),
    )


def test_round_trip_and_filters(tmp_path):
    h = History(tmp_path / "h" / "history.sqlite")
    assert h.query() == [] and h.count() == 0  # nothing written yet, nothing created
    assert not h.path.exists()
    add(h, verdict="PASS", p50=10.0)
    add(h, verdict="FAIL", p50=14.0)
    add(h, name="other", verdict="PASS", target="cpu-1t", batch=8)
    add(h, kind="bench", p50=9.0)
    rows = History(h.path).query()
    assert [r.p50_ms for r in rows] == [9.0, 10.0, 14.0, 10.0]  # newest first
    r = rows[-1]
    assert r.model_name == "m" and r.lineage == ["fp32", "int8-dynamic"]
    assert r.shapes == {"input_ids": [1, 128]} and r.batch == 1 and r.valid is True
    assert r.samples_ms == [9.5, 10.0, 10.5] and r.samples == 3
    assert r.fingerprint["cpu"] == "test cpu" and r.git_commit == "c0ffee"
    assert r.node_id is None and r.version_mismatch is False and len(r.uid) == 32
    assert len({x.uid for x in rows}) == 4
    assert [x.target for x in h.query(batch=8)] == ["cpu-1t"]
    assert len(h.query(model="m", kind="gate")) == 2
    assert [x.p50_ms for x in h.query(limit=2, newest_first=False)] == [10.0, 14.0]
    assert h.last_pass("m", "cpu", 1).p50_ms == 10.0
    assert h.last_pass("m", "cpu-1t", 1) is None
    assert h.count() == 4


def test_a_result_sent_twice_is_stored_once_and_node_versions_are_flagged(tmp_path):
    h = History(f"sqlite:///{tmp_path / 'h.sqlite'}")
    first = add(h, uid="run7-m-cpu")
    assert add(h, uid="run7-m-cpu", p50=99.0) == first
    assert [r.p50_ms for r in h.query()] == [10.0]
    same = {"onnxruntime": "1.22.0", "deployopt": "0.1.0"}
    add(h, node={"node_id": "n1", "node_versions": same, "driver_versions": same})
    add(h, node={"node_id": "n2", "node_versions": {**same, "onnxruntime": "1.20.1"},
                 "driver_versions": same})  # fmt: skip
    n2, n1, _ = h.query()
    assert (n1.node_id, n1.version_mismatch) == ("n1", False)
    assert (n2.node_id, n2.version_mismatch) == ("n2", True)
    assert n2.node_versions["onnxruntime"] == "1.20.1" and n2.driver_versions == same


def test_a_fleet_result_fills_the_node_columns_from_its_env(tmp_path):
    h = History(tmp_path / "h.sqlite")
    r = result(target="edge-arm")
    r["env"] |= {"node_id": "abc123", "node_hostname": "pi-7", "node_onnxruntime": "1.20.1",
                 "node_deployopt": "0.1.0", "driver_onnxruntime": "1.22.0",
                 "driver_deployopt": "0.1.0", "version_mismatch": "yes"}  # fmt: skip
    h.record(kind="bench", model_name="m", model_path="/m.onnx", model_sha256=None,
             lineage=["fp32"], result=r)  # fmt: skip
    r["env"]["version_mismatch"] = "no"
    r["env"]["node_onnxruntime"] = "1.22.0"
    h.record(kind="bench", model_name="m", model_path="/m.onnx", model_sha256=None,
             lineage=["fp32"], result=r)  # fmt: skip
    same, differs = h.query()
    assert (differs.node_id, differs.version_mismatch) == ("abc123", True)
    assert differs.node_versions == {"onnxruntime": "1.20.1", "deployopt": "0.1.0"}
    assert differs.driver_versions == {"onnxruntime": "1.22.0", "deployopt": "0.1.0"}
    assert differs.fingerprint["node_hostname"] == "pi-7"  # the whole env is kept as well
    assert same.version_mismatch is False and same.node_versions["onnxruntime"] == "1.22.0"


# ---------------------------------------------------------------- where the history lives


@pytest.mark.parametrize(
    "location, backend, shown",
    [
        ("h/history.sqlite", "SQLite", "h/history.sqlite"),
        ("sqlite:///h/history.sqlite", "SQLite", "h/history.sqlite"),
        ("sqlite:////abs/h.sqlite", "SQLite", "/abs/h.sqlite"),
        ("postgresql://ci@db.internal/bench", "PostgreSQL", "postgresql://ci@db.internal/bench"),
        ("postgres://ci:pw@db:5433/bench", "PostgreSQL", "postgres://ci:***@db:5433/bench"),
        ("postgresql+psycopg://ci:pw@db/b", "PostgreSQL", "postgresql+psycopg://ci:***@db/b"),
    ],
)
def test_history_locations(location, backend, shown):
    w = where(location)
    assert (w.backend, w.display) == (backend, shown)
    if backend == "PostgreSQL":
        assert w.url.drivername == "postgresql+psycopg" and w.path is None
        assert w.url.password in (None, "pw")  # kept for connecting, never shown
    else:
        assert str(w.path) == shown and w.url.database == shown


@pytest.mark.parametrize(
    "location, message",
    [
        (
            "mysql://root:topsecret@db/x",
            "--history mysql://root:***@db/x: unsupported database scheme 'mysql'",
        ),
        ("sqlite://", "--history sqlite://: names no file"),
        ("sqlite:///:memory:", "names no file (an in-memory history would be lost)"),
        ("postgresql://ci:topsecret@db", "--history postgresql://ci:***@db: names no database"),
        (
            "postgresql://ci:topsecret@db:notaport/x",
            "--history postgresql://ci:***@db:notaport/x: not a database URL",
        ),
    ],
)
def test_bad_locations_are_typed_errors_with_the_password_masked(location, message):
    with pytest.raises(HistoryError) as e:
        History(location)
    assert message in e.value.message and "topsecret" not in e.value.message
    assert e.value.hint and e.value.exit_code == 2


def test_a_history_whose_folder_cannot_be_made_is_a_typed_error(tmp_path):
    (tmp_path / "file").write_text("x")
    h = History(tmp_path / "file" / "h.sqlite")
    with pytest.raises(HistoryError, match=r"file/h.sqlite: cannot write the history database"):
        add(h)


def test_environment_variable_takes_a_url(tmp_path, monkeypatch):
    monkeypatch.setenv("DEPLOYOPT_HISTORY", f"sqlite:///{tmp_path}/env.sqlite")
    add(History())
    assert (tmp_path / "env.sqlite").exists() and History().count() == 1


def test_unreachable_server_is_an_error_naming_the_url_without_its_password(tmp_path):
    url = "postgresql://bob:hunter2@127.0.0.1:9/results"  # discard port: nothing listens
    with pytest.raises(HistoryError) as e:
        History(url)
    msg = e.value.message
    assert msg.startswith("postgresql://bob:***@127.0.0.1:9/results: cannot open the history")
    assert "hunter2" not in msg + e.value.hint and "PGPASSWORD" in e.value.hint
    r = run_cli("history", "--history", url)
    assert r.returncode == 2 and "hunter2" not in r.stdout + r.stderr
    assert "error: postgresql://bob:***@127.0.0.1:9/results: cannot open" in flat(r.stderr)
    r = run_cli("history", "--history", "mysql://u:hunter2@h/db")
    assert r.returncode == 2 and "unsupported database scheme 'mysql'" in flat(r.stderr)
    assert "hunter2" not in r.stderr


# ---------------------------------------------------------------- migration

V1_DDL = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE results (
    id INTEGER PRIMARY KEY AUTOINCREMENT, created TEXT NOT NULL, kind TEXT NOT NULL,
    model_name TEXT NOT NULL, model_path TEXT NOT NULL, model_sha256 TEXT, lineage TEXT NOT NULL,
    target TEXT NOT NULL, shapes TEXT NOT NULL, batch INTEGER NOT NULL, valid INTEGER NOT NULL,
    invalid TEXT NOT NULL, verdict TEXT,
    p50_ms REAL, p90_ms REAL, p95_ms REAL, p99_ms REAL, throughput REAL,
    samples INTEGER NOT NULL, samples_ms TEXT NOT NULL, git_commit TEXT, fingerprint TEXT NOT NULL
);
CREATE INDEX results_lookup ON results (model_name, target, batch, created);
INSERT INTO meta VALUES ('app', 'deployopt.history'), ('schema_version', '1');
"""


def v1_history(path, extra_ddl=""):
    """A history file exactly as deployopt with schema 1 wrote it, with two results."""
    con = sqlite3.connect(path)
    con.executescript(V1_DDL + extra_ddl)
    for i, (p50, verdict) in enumerate([(12.0, "PASS"), (11.0, None)]):
        con.execute(
            "INSERT INTO results (created, kind, model_name, model_path, lineage, target, shapes,"
            " batch, valid, invalid, verdict, p50_ms, samples, samples_ms, fingerprint) VALUES"
            " (?, ?, 'old', '/x/old.onnx', '[\"fp32\"]', 'cpu', '{\"x\": [1, 4]}', 1, 1, '[]', ?,"
            " ?, 2, '[1.5, 2.5]', '{\"cpu\": \"v1 cpu\"}')",
            (f"2025-01-0{i + 1}T00:00:00+00:00", "gate" if verdict else "bench", verdict, p50),
        )
    con.commit()
    con.execute("PRAGMA journal_mode = WAL")
    con.close()


def columns(path):
    with sqlite3.connect(path) as con:
        return {r[1] for r in con.execute("PRAGMA table_info(results)")}


def test_a_v1_file_is_migrated_in_place_and_keeps_its_results(tmp_path):
    path = tmp_path / "v1.sqlite"
    v1_history(path)
    h = History(path)
    assert h.migrated == [2] and SCHEMA_VERSION == 2
    assert {"uid", "node_id", "node_versions", "driver_versions", "version_mismatch"} <= columns(
        path
    )
    with sqlite3.connect(path) as con:
        assert dict(con.execute("SELECT * FROM meta"))["schema_version"] == "2"
        indexes = {r[1] for r in con.execute("PRAGMA index_list(results)")}
    assert {"results_lookup", "results_uid"} <= indexes
    old = h.query(newest_first=False)
    assert [(r.id, r.uid, r.p50_ms, r.verdict) for r in old] == [
        (1, "v1-1", 12.0, "PASS"), (2, "v1-2", 11.0, None)
    ]  # fmt: skip
    assert old[0].lineage == ["fp32"] and old[0].shapes == {"x": [1, 4]} and old[0].valid is True
    assert old[0].samples_ms == [1.5, 2.5] and old[0].version_mismatch is False
    assert h.last_pass("old", "cpu", 1).id == 1
    assert add(h, name="old", p50=10.0) == 3
    again = History(path)
    assert again.migrated == [] and again.count() == 3


def test_a_failed_migration_leaves_the_v1_file_as_it_was(tmp_path):
    path = tmp_path / "odd.sqlite"
    # a v1 file someone already gave a node_id column: step 2 fails half-way through
    v1_history(path, "ALTER TABLE results ADD COLUMN node_id TEXT;")
    before = columns(path)
    with pytest.raises(
        HistoryError, match=r"odd.sqlite: cannot write the history database: .*node_id"
    ):
        History(path)
    assert columns(path) == before and "uid" not in before
    with sqlite3.connect(path) as con:
        assert dict(con.execute("SELECT * FROM meta"))["schema_version"] == "1"
        assert con.execute("SELECT count(*) FROM results").fetchone() == (2,)


def test_a_history_from_a_newer_deployopt_is_refused(tmp_path):
    path = tmp_path / "new.sqlite"
    add(History(path))
    with sqlite3.connect(path) as con:
        con.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(HistoryError, match="written by a newer deployopt") as e:
        History(path)
    assert e.value.hint == "upgrade deployopt"


# ---------------------------------------------------------------- concurrent writers


def _writer(location, name, n, start):
    h = History(location)
    start.wait()
    for i in range(n):
        add(h, name=name, p50=float(i + 1), uid=f"{name}-{i}")


def write_at_once(location, writers=4, n=50):
    """``writers`` processes, each recording ``n`` results at the same time; then every one
    of them is there exactly once."""
    ctx = mp.get_context("spawn")
    start = ctx.Event()
    procs = [
        ctx.Process(target=_writer, args=(location, f"w{i}", n, start)) for i in range(writers)
    ]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(240)
        assert p.exitcode == 0
    rows = History(location).query()
    assert len(rows) == writers * n == History(location).count()
    assert len({r.id for r in rows}) == len({r.uid for r in rows}) == writers * n
    for w in range(writers):
        got = sorted((r.uid, r.p50_ms) for r in rows if r.model_name == f"w{w}")
        assert got == sorted((f"w{w}-{i}", float(i + 1)) for i in range(n))


def test_four_processes_writing_at_once_lose_nothing(tmp_path):
    write_at_once(tmp_path / "history.sqlite")


# ---------------------------------------------------------------- files it must refuse


def test_corrupt_file_is_an_error_and_is_left_alone(tmp_path):
    path = tmp_path / "history.sqlite"
    junk = b"this is not a database at all" * 200
    path.write_bytes(junk)
    with pytest.raises(HistoryError, match="history.sqlite: not a deployopt history database") as e:
        History(path)
    assert "left as is" in e.value.hint
    assert path.read_bytes() == junk


def test_foreign_sqlite_database_is_refused(tmp_path):
    path = tmp_path / "app.db"
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE users (id INTEGER, name TEXT)")
    con.commit()
    con.close()
    with pytest.raises(
        HistoryError, match=r"app.db: a SQLite database of something else \(tables: users\)"
    ):
        History(path)
    con = sqlite3.connect(path)
    assert con.execute("SELECT name FROM sqlite_master").fetchall() == [("users",)]


def test_git_commit_outside_and_inside_a_repo(tmp_path):
    import subprocess

    assert git_commit(tmp_path) is None
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / "f").write_text("x")
    env = ["-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "-C", str(tmp_path), "add", "f"], check=True)
    subprocess.run(["git", "-C", str(tmp_path), *env, "commit", "-qm", "x"], check=True)
    head = git_commit(tmp_path)
    assert len(head) == 40
    (tmp_path / "f").write_text("y")
    assert git_commit(tmp_path) == head + "+dirty"


# ---------------------------------------------------------------- compare


def fill_for_compare(h):
    """Two models on two targets: a history whose comparison is known exactly."""
    add(h, name="a", target="edge", p50=20.0)
    add(h, name="a", target="edge", p50=10.0)  # previous on edge
    add(h, name="a", target="edge", p50=11.0)  # latest on edge: +10 %
    add(h, name="a", target="cloud", p50=4.0)  # only one on cloud
    add(h, name="a", target="cloud", p50=1.0, valid=False)  # invalid: never compared
    add(h, name="b", target="cloud", p50=3.0)
    add(h, name="b", target="cloud", p50=2.4)  # -20 %
    add(h, name="b", target="cloud", p50=2.4, batch=8)


def test_compare_latest_per_model_and_target(tmp_path):
    h = History(tmp_path / "h.sqlite")
    fill_for_compare(h)
    latest = h.latest(2)
    assert len(latest) == 6  # at most two per (model, batch, target), invalid ones left out
    assert compare(latest) == compare(h.query())  # the database's pick is the full scan's
    table = compare(latest)
    assert list(table) == [("a", 1), ("b", 1), ("b", 8)]
    edge = table["a", 1]["edge"]
    assert (edge.p50_ms, edge.previous_ms) == (11.0, 10.0)
    assert edge.change == pytest.approx(0.10)
    assert table["a", 1]["cloud"].change is None and "edge" not in table["b", 1]
    assert table["b", 1]["cloud"].change == pytest.approx(-0.20)
    assert [r.p50_ms for r in h.latest(1, target="cloud")] == [2.4, 2.4, 4.0]


def test_history_compare_command_prints_plots_and_writes_json(tmp_path):
    import matplotlib.image as mpimg

    db = tmp_path / "h.sqlite"
    fill_for_compare(History(db))
    png, js = tmp_path / "cmp.png", tmp_path / "cmp.json"
    r = run_cli("history", "--history", str(db), "--compare", "--plot", str(png), "--json", str(js))
    assert r.returncode == 0, r.stderr
    header = next(ln for ln in r.stdout.splitlines() if "model" in ln and "batch" in ln)
    assert header.index("cloud") < header.index("edge")
    row_a = next(ln for ln in r.stdout.splitlines() if ln.strip("│┃ ").startswith("a "))
    assert "11" in row_a and "(+10%)" in row_a
    assert "(-20%)" in r.stdout
    image = mpimg.imread(png)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    doc = json.loads(js.read_text())
    assert {(d["model"], d["batch"], d["target"]) for d in doc} == {
        ("a", 1, "edge"), ("a", 1, "cloud"), ("b", 1, "cloud"), ("b", 8, "cloud")
    }  # fmt: skip
    assert next(d for d in doc if d["target"] == "edge")["change"] == pytest.approx(0.1)
    r = run_cli("history", "--history", str(db), "--compare", "--model", "nope")
    assert r.returncode == 0 and "no valid results with a p50" in flat(r.stdout)
    assert "matching the filters" in flat(r.stdout)


def test_compare_plot_is_written_atomically_and_loads(tmp_path):
    import matplotlib.image as mpimg

    h = History(tmp_path / "h.sqlite")
    add(h, name="tiny", target="gpu", p50=0.05)
    add(h, name="big", target="edge", p50=400.0)  # 8000x apart: a logarithmic axis
    out = plot_compare(h.latest(2), tmp_path / "log.png")
    assert mpimg.imread(out).shape[2] in (3, 4)
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".png"] == ["log.png"]
    assert not list(tmp_path.glob(".tmp-*"))  # no temporary file left beside it
