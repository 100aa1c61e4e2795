"""deployopt bench/gate --cluster on a real local Ray cluster: two nodes on this machine
(``ray.cluster_utils.Cluster``, one CPU each), labelled as two targets, started once for the
test session. Each test checks where the measurement ran by the node id in the result."""

from __future__ import annotations

import json
import logging
import xml.etree.ElementTree as ET

import onnx
import pytest

from deployopt import fleet
from deployopt.cli import main
from deployopt.history import History
from tests.models import run_cli, tiny_onnx_model

pytestmark = pytest.mark.cluster
LABEL = "deployopt/target"
MB = 2**20
QUICK = ["--min-samples", "20", "--min-seconds", "0.2", "--rounds", "2"]


def target_table(*names: str) -> str:
    return "".join(
        f'[targets.{n}]\nep = "cpu"\nthreads = 1\nray_labels = {{ "{LABEL}" = "{n}" }}\n\n'
        for n in names
    )


@pytest.fixture(scope="session")
def cluster():
    """A head node labelled fleet-a and a worker node labelled fleet-b; this process is the
    driver (connected before the tests' network guard, which only allows loopback)."""
    import ray
    from ray.cluster_utils import Cluster

    node = {"num_cpus": 1, "object_store_memory": 80 * MB}
    c = Cluster(
        initialize_head=True,
        head_node_args={**node, "include_dashboard": False, "labels": {LABEL: "fleet-a"}},
    )
    b = c.add_node(**node, labels={LABEL: "fleet-b"})
    ray.init(address=c.address, log_to_driver=False, logging_level=logging.WARNING)
    c.ids = {"fleet-a": c.head_node.node_id, "fleet-b": b.node_id}
    yield c
    ray.shutdown()
    c.shutdown()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("fleet")
    for name in ("m1.onnx", "m2.onnx"):
        onnx.save(tiny_onnx_model(), d / name)
    (d / "targets.toml").write_text(target_table("fleet-a", "fleet-b", "fleet-c", "fleet-none"))
    return d


def cli(*argv: str) -> int:
    """The CLI in this process (the driver is connected already): its exit code."""
    with pytest.raises(SystemExit) as e:
        main(list(argv))
    return e.value.code


def test_cluster_auto_without_a_cluster_says_so(files, monkeypatch, tmp_path):
    """A separate process with no RAY_ADDRESS and a temp dir where no cluster wrote its
    address: exit 4, never a local run under the target's name. First in the file: Ray's
    "auto" also finds any cluster running on this machine, as the session's soon will."""
    from ray._private.services import find_gcs_addresses

    if find_gcs_addresses():
        pytest.skip("a Ray cluster runs on this machine: auto would find it")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    r = run_cli("bench", str(files / "m1.onnx"), "--targets", "fleet-a", "--config",
                str(files / "targets.toml"), "--cluster", "auto", "--no-history", timeout=60)  # fmt: skip
    assert r.returncode == 4, r.stderr
    assert "--cluster auto: no running Ray cluster found" in " ".join(r.stderr.split())


@pytest.mark.parametrize(
    "args, text",
    [
        (["--targets", "fleet-a"], "--targets measures on a Ray cluster: add --cluster auto"),
        (["--targets", "cpu", "--cluster", "auto"], "target 'cpu' has no ray_labels"),
        (["--targets", "nope", "--cluster", "auto"], "unknown target 'nope'"),
        (["--cluster", "127.0.0.1:1", "--targets", "fleet-a"], "cannot reach 127.0.0.1:1"),
        (["--cluster", "ray://127.0.0.1:1", "--targets", "fleet-a"], "is a Ray Client address"),
    ],
)
def test_fleet_usage_errors(files, args, text):
    code = 4 if "cannot reach" in text else 2
    r = run_cli("bench", str(files / "m1.onnx"), "--config", str(files / "targets.toml"),
                "--no-history", *args, timeout=60)  # fmt: skip
    assert r.returncode == code, r.stderr
    assert text in " ".join(r.stderr.split())


def test_each_target_on_its_own_node_and_a_target_without_node_invalid(cluster, files, monkeypatch):
    """A separate driver process that finds the cluster through RAY_ADDRESS, as in CI."""
    monkeypatch.setenv("RAY_ADDRESS", cluster.address)
    out, db = files / "bench.json", files / "bench.sqlite"
    proc = run_cli("bench", str(files / "m1.onnx"), str(files / "m2.onnx"), "--targets",
                   "fleet-a,fleet-b,fleet-none", "--config", str(files / "targets.toml"),
                   "--cluster", "auto", "--schedule-timeout", "3", "--json", str(out),
                   "--history", str(db), *QUICK, timeout=300)  # fmt: skip
    code = proc.returncode
    assert code == 4, proc.stderr  # fleet-none has no node: its results are INVALID
    for t in ("fleet-a", "fleet-b"):
        assert f"({cluster.ids[t][:12]}), onnxruntime" in proc.stdout  # each table names its node
    results = json.loads(out.read_text())["results"]
    assert [(r["target"], r["name"]) for r in results] == [
        (t, m) for t in ("fleet-a", "fleet-b", "fleet-none") for m in ("m1.onnx", "m2.onnx")
    ]
    for r in results[:4]:  # measured, on the node that carries the target's label
        assert r["valid"] and r["stats"]["samples"] >= 20, r
        assert r["env"]["node_id"] == cluster.ids[r["target"]]
        assert r["env"]["node_onnxruntime"] == r["env"]["driver_onnxruntime"]
        assert r["env"]["version_mismatch"] == "no"
        assert r["model"] == str(files / r["name"])  # the driver's path, not the node's copy
    for r in results[4:]:
        assert not r["valid"] and r["stats"] is None
        assert r["invalid"][0].startswith("no node for target fleet-none: no alive node has the "
                                          "labels deployopt/target=fleet-none (waited 3 s)")  # fmt: skip
    # no hang: the run ended (within the subprocess timeout) because the 3 s scheduling
    # timeout ended the wait, as the reason says
    rows = History(db).query()
    assert len(rows) == 6  # every result, the invalid ones with their reason
    assert {r.fingerprint.get("node_id") for r in rows if r.valid} == set(cluster.ids.values())


def test_node_lost_mid_run_invalid_while_the_other_target_finishes(cluster, files, monkeypatch):
    """fleet-c's node is removed as soon as its task reports it started (a 3 s measurement
    lies ahead of it), so the kill lands mid-run every time."""
    node_c = cluster.add_node(num_cpus=1, object_store_memory=80 * MB, labels={LABEL: "fleet-c"})
    started: dict[str, str] = {}
    real_run = fleet.run

    def kill_c(o: fleet.Outcome) -> None:
        started[o.target.name] = o.node["node_id"]
        if o.target.name == "fleet-c":
            cluster.remove_node(node_c)

    monkeypatch.setattr(fleet, "run", lambda *a, **kw: real_run(*a, **{**kw, "on_started": kill_c}))
    out = files / "lost.json"
    code = cli("bench", str(files / "m1.onnx"), "--targets", "fleet-a,fleet-c", "--config",
               str(files / "targets.toml"), "--cluster", "auto", "--json", str(out),
               "--no-history", "--min-samples", "20", "--min-seconds", "3", "--rounds", "1")  # fmt: skip
    assert code == 4
    assert started == {"fleet-a": cluster.ids["fleet-a"], "fleet-c": node_c.node_id}
    a, c = json.loads(out.read_text())["results"]
    assert a["target"] == "fleet-a" and a["valid"] and a["stats"]["samples"] >= 20
    assert c["target"] == "fleet-c" and not c["valid"]
    assert c["invalid"][0].startswith("node lost: ")
    assert c["env"]["node_id"] == node_c.node_id  # it had started there


def test_an_interrupted_driver_records_nothing_and_leaves_no_task(cluster, files, monkeypatch):
    """Ctrl-C in the driver while fleet-a's task measures (raised as it reports it started,
    with a 60 s measurement ahead): exit 130, no history row, and the task cancelled: its CPU
    on fleet-a's node is free again well before the measurement could have ended (the cluster
    runs no dashboard to list tasks by)."""
    import ray

    real_run = fleet.run

    def interrupt(o: fleet.Outcome) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(
        fleet, "run", lambda *a, **kw: real_run(*a, **{**kw, "on_started": interrupt})
    )
    db = files / "interrupted.sqlite"
    code = cli("bench", str(files / "m1.onnx"), "--targets", "fleet-a", "--config",
               str(files / "targets.toml"), "--cluster", "auto", "--history", str(db),
               "--min-samples", "20", "--min-seconds", "60", "--rounds", "1")  # fmt: skip
    assert code == 130
    assert not db.exists() or History(db).count() == 0
    # fleet-a's node has one CPU, which the cancelled task held: a one-CPU probe task on that
    # node runs only once it is free, and had the task not been cancelled it would hold it for
    # its 60 s measurement. (Cluster-wide totals lag a node removed by an earlier test.)
    probe = ray.remote(num_cpus=1)(lambda: "free").options(label_selector={LABEL: "fleet-a"})
    assert ray.get(probe.remote(), timeout=30) == "free"


BUDGETS = target_table("fleet-a", "fleet-b") + "".join(
    f'[[budgets]]\ntarget = "{t}"\nbatch = 1\np50_ms = 1000\nmax_size_mb = 1\n\n'
    for t in ("fleet-a", "fleet-b")
)


def junit_cases(path) -> dict[tuple[str, str], str]:
    """(budget, check) -> the verdict the JUnit file gives it."""
    out = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        bad = [el.tag for el in case if el.tag in ("failure", "error", "skipped")]
        out[(case.get("classname"), case.get("name"))] = bad[0] if bad else "pass"
    return out


def test_fleet_gate_one_junit_and_version_mismatch(cluster, files, monkeypatch):
    """The driver's onnxruntime version is faked (the nodes report the real one): installing a
    second onnxruntime for one node would take a second environment of several hundred MB; the
    comparison, the flag and the gate's treatment are what is under test, and they only see
    the two version strings."""
    budget = files / "budgets.toml"
    budget.write_text(BUDGETS)
    real = fleet.driver_versions()
    monkeypatch.setattr(fleet, "driver_versions", lambda: {**real, "onnxruntime": "0.0.1"})
    junit, db = files / "gate.xml", files / "gate.sqlite"
    args = ["gate", str(files / "m1.onnx"), "--budget", str(budget), "--cluster", "auto",
            "--junit", str(junit), "--history", str(db), *QUICK]  # fmt: skip
    assert cli(*args) == 4  # INVALID: the nodes run another onnxruntime than the driver
    cases = junit_cases(junit)
    p50 = {k: v for k, v in cases.items() if k[1].startswith("p50_ms")}
    size = {k: v for k, v in cases.items() if k[1].startswith("max_size_mb")}
    assert sorted(k[0] for k in cases) == sorted(
        f"deployopt.gate.{t}_batch_1" for t in ("fleet-a", "fleet-b") for _ in range(2)
    )  # one JUnit file, a testcase per (target, check)
    assert set(p50.values()) == {"error"} and set(size.values()) == {"pass"}
    message = next(iter(ET.parse(junit).getroot().iter("error"))).get("message")
    assert f"onnxruntime {real['onnxruntime']} on the node, 0.0.1 on the driver" in message
    assert "--allow-version-mismatch" in message
    rows = History(db).query()
    assert len(rows) == 2 and {r.verdict for r in rows} == {"INVALID"}
    assert {r.fingerprint["version_mismatch"] for r in rows} == {"yes"}
    assert {r.fingerprint["node_id"] for r in rows} == set(cluster.ids.values())

    assert cli(*args, "--allow-version-mismatch") == 0  # judged: 1000 ms is far above a tiny model
    assert set(junit_cases(junit).values()) == {"pass"} and len(junit_cases(junit)) == 4
