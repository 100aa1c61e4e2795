"""The results history: round trip, filters, two writers at once, and files it must refuse."""

from __future__ import annotations

import multiprocessing as mp
import sqlite3

import pytest

from deployopt.history import History, HistoryError, git_commit


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


def add(h, name="m", verdict=None, kind="gate", **kw):
    return h.record(
        kind=kind,
        model_name=name,
        model_path=f"/x/{name}.onnx",
        model_sha256="ab" * 32,
        lineage=["fp32", "int8-dynamic"],
        result=result(**kw),
        verdict=verdict,
        commit="c0ffee",
    )


def test_round_trip_and_filters(tmp_path):
    h = History(tmp_path / "h" / "history.sqlite")
    assert h.query() == []  # nothing written yet, nothing created
    assert not h.path.exists()
    add(h, verdict="PASS", p50=10.0)
    add(h, verdict="FAIL", p50=14.0)
    add(h, name="other", verdict="PASS", target="cpu-1t", batch=8)
    add(h, kind="bench", p50=9.0)
    rows = History(h.path).query()
    assert [r.p50_ms for r in rows] == [9.0, 10.0, 14.0, 10.0]  # newest first
    r = rows[-1]
    assert r.model_name == "m" and r.lineage == ["fp32", "int8-dynamic"]
    assert r.shapes == {"input_ids": [1, 128]} and r.batch == 1 and r.valid
    assert r.samples_ms == [9.5, 10.0, 10.5] and r.samples == 3
    assert r.fingerprint["cpu"] == "test cpu" and r.git_commit == "c0ffee"
    assert [x.target for x in h.query(batch=8)] == ["cpu-1t"]
    assert len(h.query(model="m", kind="gate")) == 2
    assert h.last_pass("m", "cpu", 1).p50_ms == 10.0
    assert h.last_pass("m", "cpu-1t", 1) is None


def _writer(path, name, n):
    h = History(path)
    for i in range(n):
        add(h, name=name, p50=float(i + 1))


def test_two_processes_writing_at_once_lose_nothing(tmp_path):
    path = tmp_path / "history.sqlite"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(path, f"w{i}", 40)) for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    rows = History(path).query()
    assert len(rows) == 80
    for w in ("w0", "w1"):
        assert sorted(r.p50_ms for r in rows if r.model_name == w) == [
            float(i) for i in range(1, 41)
        ]


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
