"""Results-history write throughput on SQLite and PostgreSQL, with several writers at once.

Usage:  python benchmarks/history_throughput.py [--n 400] [--writers 1,4] [--url URL ...]

Without ``--url`` it measures a SQLite file in a temporary folder and a PostgreSQL server it
starts itself (the ``pgserver`` wheel, ``pip install -e .[dev]``), each first with one writer,
then with four processes writing at once. Each result is what ``deployopt bench`` records (a
200-sample result with this machine's fingerprint), written as ``History.record`` writes it:
one transaction per result. After each run the history is counted: every result must be there
exactly once.

``measure(url, n, writers)`` is the function other benchmarks call (benchmarks/fleet.py).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import platform
import sys
import tempfile
import time
import uuid
from pathlib import Path

SAMPLES = 200  # timed runs per result, as a default bench records


def _result(env: dict[str, str], i: int) -> dict:
    p50 = 5.0 + (i % 7) * 0.1
    return {
        "target": "cpu",
        "shapes": {"input_ids": [1, 128]},
        "valid": True,
        "invalid": [],
        "stats": {"p50_ms": p50, "p90_ms": p50 * 1.1, "p95_ms": p50 * 1.15, "p99_ms": p50 * 1.3},
        "throughput": 1e3 / p50,
        "samples_ms": [p50 + 0.001 * k for k in range(SAMPLES)],
        "env": env,
    }


def _writer(url: str, tag: str, n: int, ready, go, out) -> None:
    from deployopt.benchmark import fingerprint
    from deployopt.history import History

    env = fingerprint()
    rows = [_result(env, i) for i in range(n)]
    h = History(url)
    ready.wait()
    go.wait()
    t0 = time.monotonic()  # CLOCK_MONOTONIC: one clock for every process on the machine
    for i, r in enumerate(rows):
        h.record(kind="bench", model_name=f"model-{i % 3}", model_path="/bench/model.onnx",
                 model_sha256=None, lineage=["fp32"], result=r, uid=f"{tag}-{i}")  # fmt: skip
    out.put((t0, time.monotonic()))
    h.close()


def measure(url: str | Path, n: int = 400, writers: int = 4) -> dict:
    """Write ``n`` results in all (``n // writers`` each) from ``writers`` processes started
    together, one transaction per result, into the history at ``url`` (a path or a URL).
    Returns ``{"backend", "writers", "results", "seconds", "results_per_s"}``; the seconds
    run from the first write to the last commit. Raises ``AssertionError`` if the history did
    not gain exactly ``n`` results with ``n`` distinct uids."""
    from deployopt.history import History

    url = str(url)
    per = n // writers
    n = per * writers
    run = uuid.uuid4().hex[:8]
    with History(url) as h:
        before = h.count()
        backend = h.where.backend
    ctx = mp.get_context("spawn")
    ready, go, out = ctx.Barrier(writers + 1), ctx.Event(), ctx.Queue()
    procs = [
        ctx.Process(target=_writer, args=(url, f"{run}-w{w}", per, ready, go, out))
        for w in range(writers)
    ]
    for p in procs:
        p.start()
    ready.wait()  # every writer imported, connected and built its rows
    go.set()
    spans = [out.get(timeout=600) for _ in procs]
    for p in procs:
        p.join(60)
        assert p.exitcode == 0, f"writer exited {p.exitcode}"
    seconds = max(e for _, e in spans) - min(s for s, _ in spans)
    with History(url) as h:
        mine = [r for r in h.query() if r.uid and r.uid.startswith(run)]
        assert h.count() - before == n == len(mine) == len({r.uid for r in mine}), "lost results"
    return {
        "backend": backend,
        "writers": writers,
        "results": n,
        "seconds": seconds,
        "results_per_s": n / seconds,
    }


def start_postgres(folder: Path):
    """A throwaway PostgreSQL server (pgserver) with its data in ``folder``: (server, URL)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pgserver

    server = pgserver.get_server(folder / "pg", cleanup_mode="delete")
    server.psql("CREATE DATABASE history_bench;")
    from sqlalchemy.engine import make_url

    url = make_url(server.get_uri()).set(database="history_bench")
    return server, url.render_as_string(hide_password=False)


def versions(server=None) -> str:
    import importlib.metadata as md
    import sqlite3

    from deployopt.hardware import detect_cpu

    cpu = detect_cpu()
    parts = [
        f"machine: {cpu.describe()}",
        f"python {platform.python_version()}",
        f"SQLAlchemy {md.version('sqlalchemy')}",
        f"psycopg {md.version('psycopg')}",
        f"SQLite {sqlite3.sqlite_version}",
    ]
    if server is not None:
        pg = server.psql("SHOW server_version;").split("\n")[2].strip()
        parts.append(f"PostgreSQL {pg} (pgserver {md.version('pgserver')}, fsync on)")
    return "; ".join(parts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=400, help="results per run (split over writers)")
    ap.add_argument("--writers", default="1,4", help="writer counts, comma-separated")
    ap.add_argument("--url", action="append", help="measure this history instead (repeatable)")
    args = ap.parse_args(argv)
    counts = [int(w) for w in args.writers.split(",")]
    server = None
    with tempfile.TemporaryDirectory(prefix="dohist-") as tmp:
        urls = args.url
        if not urls:
            server, pg = start_postgres(Path(tmp))
            urls = [f"sqlite:///{tmp}/history.sqlite", pg]
        print(versions(server))
        print(f"{'backend':<11} {'writers':>7} {'results':>7} {'seconds':>8} {'results/s':>10}")
        try:
            for url in urls:
                for w in counts:
                    m = measure(url, args.n, w)
                    print(f"{m['backend']:<11} {w:>7} {m['results']:>7} {m['seconds']:>8.2f} "
                          f"{m['results_per_s']:>10.0f}", flush=True)  # fmt: skip
        finally:
            if server is not None:
                server.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
