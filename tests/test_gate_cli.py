"""deployopt gate on the command line: exit codes as table rows (on a recorded report, no
measuring), then real measurements of a tiny model: budgets, JUnit, regression, last-pass."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from deployopt.stats import quantile_ci
from tests.models import flat, run_cli
from tests.test_report import synthetic


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    path = tmp_path_factory.mktemp("rep") / "report.json"
    path.write_text(json.dumps(synthetic()))
    return path


def winner_samples(report):
    doc = json.loads(report.read_text())
    v = next(v for v in doc["variants"] if v["name"] == doc["choice"]["winner"])
    return v["bench"][0]["samples_ms"]


def test_report_judged_and_inconclusive_inside_the_ci(report):
    s = winner_samples(report)
    lo, hi = quantile_ci(s, 0.5)
    inside = (lo + hi) / 2
    r = run_cli("gate", "--report", str(report), "--p50-ms", str(inside), "--no-history")
    assert r.returncode == 3, r.stdout + r.stderr
    assert "gate INCONCLUSIVE" in r.stderr and "too noisy to decide" in flat(r.stdout)
    r = run_cli("gate", "--report", str(report), "--p50-ms", str(hi * 1.01), "--no-history")
    assert r.returncode == 0 and "gate PASS" in r.stderr
    r = run_cli("gate", "--report", str(report), "--p50-ms", str(lo * 0.99), "--no-history")
    assert r.returncode == 1 and "gate FAIL" in r.stderr
    assert f"p50 {np.percentile(s, 50):.4g} ms" in flat(r.stderr)


@pytest.mark.parametrize(
    "args, code, text",
    [
        (["--max-size-mb", "30", "--min-cosine", "0.99"], 0, "gate PASS"),
        (["--max-size-mb", "10"], 1, "size 23 MB > limit 10 MB"),
        (["--min-cosine", "0.995"], 1, "mean cosine 0.99300 < limit 0.995"),
        (["--min-min-cosine", "0.98", "--min-cosine", "0.99"], 0, "gate PASS"),
        (["--min-min-cosine", "0.985"], 1, "worst-sample cosine 0.98300 < limit 0.985"),
        (["--session", "s.json", "--p50-ms", "100"], 2, "--session needs a model measured now"),
        (["--p50-ms", "100", "--target", "cpu-1t"], 4, "never judged across targets"),
        (["--p99-ms", "100"], 4, "40 samples are too few for a p99 confidence interval"),
        (["--p50-ms", "100", "--variant", "int8-static"], 4, "measurement invalid"),
        (["--p50-ms", "100", "--variant", "nope"], 2, "no variant 'nope'"),
        (["--baseline", "x.onnx"], 2, "--baseline needs a model measured now"),
        ([], 2, "nothing to judge"),
        (["--p50-ms", "-3"], 2, "--p50-ms: Input should be greater than 0"),
    ],
)
def test_exit_codes(report, args, code, text):
    r = run_cli("gate", "--report", str(report), "--no-history", *args)
    assert r.returncode == code, r.stdout + r.stderr
    assert text in flat(r.stdout + r.stderr)
    assert "Traceback" not in r.stderr


def test_usage_errors_without_a_report(tmp_path):
    for args, text in [
        ([], "give either MODEL.onnx"),
        (
            ["--budget", str(tmp_path / "none.toml"), "--report", "r.json"],
            "none.toml': no such file",
        ),
        (["m.onnx", "--report", "r.json", "--p50-ms", "1"], "give either MODEL.onnx"),
        (["--report", str(tmp_path / "r.json"), "--p50-ms", "1"], "r.json': no such file"),
    ]:
        r = run_cli("gate", "--no-history", *args)
        assert r.returncode == 2, (args, r.stderr)
        assert text in flat(r.stderr)
    bad = tmp_path / "r.json"
    bad.write_text('{"schema": "something/9"}')
    r = run_cli("gate", "--report", str(bad), "--p50-ms", "1")
    assert r.returncode == 2 and "not a deployopt report (schema 'something/9')" in flat(r.stderr)
    r = run_cli("gate", "m.onnx", "--baseline", "o.onnx", "--max-slowdown", "fast")
    assert r.returncode == 2 and "bad percentage 'fast'" in flat(r.stderr)


def test_help_documents_the_exit_codes():
    r = run_cli("gate", "--help")
    text = flat(r.stdout)
    for fragment in ("0 PASS", "1 FAIL", "3 INCONCLUSIVE", "4 INVALID", "2 usage error"):
        assert fragment in text


# ------------------------------------------------------------------ measured on a tiny model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from tests.models import optimize_only

    out = tmp_path_factory.mktemp("g")
    res = optimize_only(
        "tests.models:mlp", out, input_shapes={"x": (1, 16)}, variants=["int8-dynamic"]
    )
    return res.by_name("fp32").path, res.by_name("int8-dynamic").path


FAST = ["--min-samples", "20", "--min-seconds", "0.2"]


def test_measured_budgets_with_ci_outputs(models, tmp_path):
    fp32, _ = models
    budget = tmp_path / "budgets.toml"
    budget.write_text(
        "[targets.one]\nep = 'cpu'\nthreads = 1\n\n"
        "[[budgets]]\ntarget = 'one'\nbatch = 2\np50_ms = 1000\np90_ms = 1000\nmax_size_mb = 1\n"
        "\n[[budgets]]\ntarget = 'cpu'\nmin_cosine = 0.99\nmin_min_cosine = 0.99\n"
    )
    history = tmp_path / "h.sqlite"
    out = {k: tmp_path / f"g.{k}" for k in ("xml", "json", "md")}
    r = run_cli(
        "gate",
        str(fp32),
        "--budget",
        str(budget),
        *FAST,
        "--history",
        str(history),
        "--junit",
        str(out["xml"]),
        "--json",
        str(out["json"]),
        "--markdown",
        str(out["md"]),
        "--reference",
        str(fp32),
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("gate PASS:")
    doc = json.loads(out["json"].read_text())
    assert doc["verdict"] == "PASS" and doc["exit_code"] == 0
    by = {c["metric"]: c for c in doc["checks"]}
    assert by["min_cosine"]["measured"] == pytest.approx(1.0)
    assert by["min_min_cosine"]["measured"] == pytest.approx(1.0)
    assert by["min_min_cosine"]["message"].startswith("worst-sample cosine 1.00000 >= limit")
    assert doc["results"][0]["target"] == "one" and doc["results"][0]["shapes"]["x"] == [2, 16]
    # p90 needs 35 samples for its CI: the gate measured at least twice that
    assert len(doc["results"][0]["samples_ms"]) >= 70
    suite = ET.parse(out["xml"]).getroot().find("testsuite")
    assert suite.get("tests") == "5" and suite.get("failures") == "0"
    assert out["md"].read_text().startswith("## deployopt gate: PASS")
    from deployopt.history import History

    rows = History(history).query()
    assert [(r.kind, r.verdict, r.target) for r in rows] == [("gate", "PASS", "one")]


def test_regression_against_a_baseline_and_last_pass(models, tmp_path):
    fp32, int8 = models
    history = str(tmp_path / "h.sqlite")
    r = run_cli(
        "gate",
        str(fp32),
        "--baseline",
        str(fp32),
        "--max-slowdown",
        "900%",
        "--processes",
        "2",
        *FAST,
        "--history",
        history,
        "--json",
        str(tmp_path / "g.json"),
    )
    assert r.returncode == 0, r.stdout + r.stderr
    (check,) = json.loads((tmp_path / "g.json").read_text())["checks"]
    assert check["metric"] == "max_slowdown" and "paired rounds, n=20" in check["message"]
    # timings on a shared runner vary too much to assert a ratio near 1 here (the statistic's
    # power is measured by benchmarks/gate_power.py); the interval must be well-formed and judged
    lo, hi = check["ci"]
    assert 0 < lo <= hi < 10.0 and check["measured"] > 0 and check["verdict"] == "PASS"
    r = run_cli("gate", str(int8), "--baseline", "last-pass", *FAST, "--history", history)
    assert r.returncode == 4
    assert "no passing gate result of" in flat(r.stdout)
    r = run_cli("gate", str(fp32), "--p50-ms", "1000", *FAST, "--history", history)
    assert r.returncode == 0
    r = run_cli(
        "gate",
        str(fp32),
        "--baseline",
        "last-pass",
        "--max-slowdown",
        "900%",
        *FAST,
        "--history",
        history,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "vs last-pass #" in flat(r.stdout)


def test_history_command_lists_compares_and_plots(models, tmp_path):
    fp32, _ = models
    history = str(tmp_path / "h.sqlite")
    for tgt in ("cpu", "cpu-1t"):
        r = run_cli("bench", str(fp32), "--target", tgt, *FAST, "--history", history)
        assert r.returncode == 0, r.stderr
    r = run_cli("history", "--history", history, "--target", "cpu-1t")
    assert r.returncode == 0 and "cpu-1t" in r.stdout and "1 results" in r.stdout
    plot = tmp_path / "p.png"
    r = run_cli("history", "--history", history, "--compare", "--plot", str(plot))
    assert r.returncode == 0
    header = next(ln for ln in r.stdout.splitlines() if "model" in ln and "batch" in ln)
    assert "cpu" in header and "cpu-1t" in header
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    corrupt = tmp_path / "bad.sqlite"
    corrupt.write_bytes(b"garbage" * 100)
    r = run_cli("history", "--history", str(corrupt))
    assert r.returncode == 2 and "not a deployopt history database" in flat(r.stderr)
    assert corrupt.read_bytes() == b"garbage" * 100


def test_a_folder_is_gated_under_its_session_and_so_is_the_baseline(models, tmp_path):
    from tests.test_bench import optimize_folder

    fp32, _ = models
    out = optimize_folder(tmp_path, fp32, threads=2)
    session = str(out / "best.session.json")
    r = run_cli(
        "gate", str(out), "--target", "cpu-1t", "--p50-ms", "1000", *FAST, "--no-history",
        "--json", str(tmp_path / "g.json"),
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"session settings from {session}: 2 threads, graph optimization basic" in r.stdout
    doc = json.loads((tmp_path / "g.json").read_text())
    assert doc["model"] == str(out / "best.onnx") and doc["environment"]["session_file"] == session
    (res,) = doc["results"]
    assert res["target"] == "cpu-1t" and doc["checks"][0]["verdict"] == "PASS"  # budget matched
    assert res["env"]["threads"] == "2" and res["env"]["graph_optimization"] == "basic"
    assert res["env"]["session:session.intra_op.allow_spinning"] == "0"
    # with --baseline both models run under the session's settings (a folder: its best.onnx)
    r = run_cli(
        "gate", str(fp32), "--session", session, "--baseline", str(out), "--processes", "1",
        "--max-slowdown", "900%", *FAST, "--no-history", "--json", str(tmp_path / "r.json"),
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    doc = json.loads((tmp_path / "r.json").read_text())
    by = {res["name"]: res for res in doc["results"]}
    assert by["baseline"]["model"] == str(out / "best.onnx") and by["new"]["model"] == str(fp32)
    for res in doc["results"]:
        assert (res["env"]["threads"], res["env"]["session_file"]) == ("2", session)
        assert res["env"]["session:session.intra_op.allow_spinning"] == "0"


@pytest.mark.parametrize(
    "args, code, text",
    [
        (["--session", "{dir}/none.json"], 2, "{dir}/none.json: no such session file"),
        (["--session", "{dir}/bad.json"], 2, "{dir}/bad.json: intra_op_num_threads: Input should"),
        (["--session", "{dir}/best.session.json"], 2, "measured on execution provider 'cuda'"),
        (["{dir}"], 2, "{dir}: a folder without best.onnx"),
    ],
)
def test_gate_session_errors(models, tmp_path, args, code, text):
    from tests.test_bench import write_session_file

    path = write_session_file(tmp_path, ep="cuda")
    doc = {**json.loads(path.read_text()), "intra_op_num_threads": "2"}
    (tmp_path / "bad.json").write_text(json.dumps(doc))
    argv = [a.replace("{dir}", str(tmp_path)) for a in args]
    model = [] if argv[0] == str(tmp_path) else [str(models[0])]
    r = run_cli("gate", *model, *argv, "--p50-ms", "1000", "--no-history")
    assert r.returncode == code, r.stdout + r.stderr
    assert text.replace("{dir}", str(tmp_path)) in flat(r.stderr)
    assert "Traceback" not in r.stderr
