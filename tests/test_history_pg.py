"""The results history on a real PostgreSQL server (pgserver, started once per session by
conftest's ``pg_server``): schema creation, four processes writing at once, a database of
something else, and ``history --compare``."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from deployopt.history import History, HistoryError
from deployopt.history_db import APP, SCHEMA_VERSION
from tests.test_history import add, fill_for_compare, run_cli, write_at_once

pytestmark = pytest.mark.db


def test_the_schema_is_created_on_the_first_write_and_matches_sqlite(pg_url, tmp_path):
    h = History(pg_url)
    assert h.where.backend == "PostgreSQL" and h.query() == [] and h.count() == 0
    engine = sa.create_engine(h.where.url)
    with engine.connect() as conn:
        assert sa.inspect(conn).get_table_names() == []  # opening created nothing
    add(h, verdict="PASS", uid="u1", node={"node_id": "n1", "node_versions": {"deployopt": "9"},
                                          "driver_versions": {"deployopt": "0.1.0"}})  # fmt: skip
    add(h, name="b", target="edge", batch=4, p50=3.5, valid=False)
    with engine.connect() as conn:
        insp = sa.inspect(conn)
        assert set(insp.get_table_names()) == {"meta", "results"}
        pg_cols = {c["name"] for c in insp.get_columns("results")}
        meta = dict(conn.execute(sa.text("SELECT key, value FROM meta")).all())
        indexes = {i["name"] for i in insp.get_indexes("results")}
    engine.dispose()
    assert meta == {"app": APP, "schema_version": str(SCHEMA_VERSION)}
    assert {"results_lookup", "results_uid"} <= indexes
    local = History(tmp_path / "h.sqlite")
    add(local)
    with sa.create_engine(local.where.url).connect() as conn:
        assert {c["name"] for c in sa.inspect(conn).get_columns("results")} == pg_cols
    b, a = h.query()
    assert (a.uid, a.verdict, a.node_id, a.version_mismatch) == ("u1", "PASS", "n1", True)
    assert a.lineage == ["fp32", "int8-dynamic"] and a.shapes == {"input_ids": [1, 128]}
    assert a.samples_ms == [9.5, 10.0, 10.5] and a.fingerprint["cpu"] == "test cpu"
    assert (b.valid, b.invalid, b.batch, b.target) == (False, ["crashed"], 4, "edge")
    assert add(h, uid="u1", p50=50.0) == a.id and h.count() == 2  # sent again: stored once
    assert h.last_pass("m", "cpu", 1).id == a.id
    with h._eng().connect() as conn:  # no named prepared statements: pgbouncer-transaction safe
        assert conn.connection.driver_connection.prepare_threshold is None
    h.close()


def test_four_processes_writing_at_once_lose_nothing(pg_url):
    write_at_once(pg_url)


def test_a_database_of_something_else_is_refused_and_left_alone(pg_url):
    engine = sa.create_engine(History(pg_url).where.url)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE users (id integer, name text)"))
    with pytest.raises(
        HistoryError, match=r"a PostgreSQL database of something else \(tables: users\)"
    ):
        History(pg_url)
    with engine.connect() as conn:
        assert sa.inspect(conn).get_table_names() == ["users"]
    engine.dispose()


def test_history_compare_on_postgresql(pg_url, tmp_path):
    import matplotlib.image as mpimg

    h = History(pg_url)
    fill_for_compare(h)
    sqlite = History(tmp_path / "h.sqlite")
    fill_for_compare(sqlite)
    pick = [(r.model_name, r.batch, r.target, r.p50_ms) for r in h.latest(2)]
    assert pick == [(r.model_name, r.batch, r.target, r.p50_ms) for r in sqlite.latest(2)]
    h.close()
    png = tmp_path / "cmp.png"
    r = run_cli("history", "--history", pg_url, "--compare", "--plot", str(png))
    assert r.returncode == 0, r.stderr
    assert "(+10%)" in r.stdout and "(-20%)" in r.stdout
    assert mpimg.imread(png).ndim == 3
