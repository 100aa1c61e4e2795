"""deployopt bench on a Ray fleet, measured on a local two-node cluster.

Usage:  python benchmarks/fleet.py [--min-seconds 2] [--rounds 3] [--history-n 200]

Starts a Ray cluster on this machine (``ray.cluster_utils.Cluster``): a head node labelled
``deployopt/target=fleet-a`` and a second node labelled ``fleet-b``, one CPU each. Three models
(chains of 2, 4 and 8 MatMul+Relu layers, 512 wide, batch 16: about 1 : 2 : 4 in work) are
measured on both targets (one thread each) and the script reports:

1. wall time: both targets at once through the cluster (one task per target, in parallel),
   the same two tasks one after the other, and the same work on this machine without Ray;
2. Ray's per-task overhead: from submission to the task's first line on its node (the same
   clock here), and to the driver hearing that it started;
3. the latency ratios between the models (p50 of each / p50 of the 2-layer chain), run by
   run: four through the cluster (both targets in parallel, then each alone) and four on this
   machine without Ray (each target twice; the two targets have the same settings, so all
   eight runs measure the same thing). A run's own bootstrap CI is far narrower than the
   run-to-run spread, so the noise is judged across runs: the cluster is "within noise" when
   its mean ratio differs from the local mean by no more than the local runs span. The
   one-at-a-time runs test Ray's path itself; the parallel ones add two "nodes" sharing this
   machine's cores and caches, which a real fleet (a machine per node) does not have;
4. history write throughput (one transaction per result) on SQLite and on PostgreSQL
   (pgserver), with 1 and 4 writers, through ``benchmarks/history_throughput.measure``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))  # beside: gate_power, history_throughput

from gate_power import chain  # noqa: E402
from history_throughput import measure, start_postgres, versions  # noqa: E402

from deployopt import fleet  # noqa: E402
from deployopt.benchmark import BenchSpec, bench_models  # noqa: E402
from deployopt.presets import Target  # noqa: E402
from deployopt.stats import ratio_ci  # noqa: E402

LABEL = "deployopt/target"
LAYERS = {"chain2": 2, "chain4": 4, "chain8": 8}
TARGETS = [Target(name=n, threads=1, ray_labels={LABEL: n}) for n in ("fleet-a", "fleet-b")]


def start_cluster():
    import ray
    from ray.cluster_utils import Cluster

    node = {"num_cpus": 1, "object_store_memory": 80 * 2**20}
    c = Cluster(
        initialize_head=True,
        head_node_args={**node, "include_dashboard": False, "labels": {LABEL: "fleet-a"}},
    )
    c.add_node(**node, labels={LABEL: "fleet-b"})
    ray.init(address=c.address, log_to_driver=False, logging_level=logging.WARNING)
    return c


def ratios(results, conf: float = 0.90) -> dict[str, tuple[float, float, float]]:
    """model -> (estimate, low, high) of p50(model) / p50(chain2), unpaired bootstrap."""
    base = next(r for r in results if r.name == "chain2.onnx")
    out = {}
    for r in results:
        if r.name != base.name:
            x = ratio_ci(list(r.samples_ms), list(base.samples_ms), paired=False, conf=conf)
            out[r.name] = (x.estimate, x.low, x.high)
    return out


def timed(fn):
    t0 = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--min-seconds", type=float, default=2.0, help="per model and target")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--history-n", type=int, default=200, help="results per throughput run")
    args = ap.parse_args(argv)
    spec = BenchSpec(batch=16, min_samples=60, min_seconds=args.min_seconds, rounds=args.rounds)
    with tempfile.TemporaryDirectory(prefix="dofleet-") as tmp:
        models = {}
        for name, layers in LAYERS.items():
            models[f"{name}.onnx"] = Path(tmp) / f"{name}.onnx"
            onnx.save(chain(layers), models[f"{name}.onnx"])
        paths = {n: str(p) for n, p in models.items()}

        import ray

        print(versions(), f"ray {ray.__version__}", sep="; ")
        t0 = time.perf_counter()
        cluster = start_cluster()
        print(f"cluster up in {time.perf_counter() - t0:.1f} s (head fleet-a + node fleet-b)")
        try:
            warm = BenchSpec(min_samples=1, min_seconds=0, rounds=1)  # imports on each node
            _, cold = fleet.bench(models, TARGETS, [warm])
            (par, outcomes), wall_par = timed(lambda: fleet.bench(models, TARGETS, [spec]))
            (ser_a, _), wall_a = timed(lambda: fleet.bench(models, TARGETS[:1], [spec]))
            (ser_b, _), wall_b = timed(lambda: fleet.bench(models, TARGETS[1:], [spec]))
            local, walls = [], []
            for _ in range(2):  # the same work on this machine, no Ray, target by target
                for t in TARGETS:
                    res, s = timed(lambda t=t: list(bench_models(paths, t, spec).values()))
                    local.append(res)
                    walls.append(s)
        finally:
            ray.shutdown()
            cluster.shutdown()
        print("\n1. wall time, 3 models x 2 targets")
        print(f"   cluster, targets in parallel   {wall_par:6.1f} s")
        print(f"   cluster, one target at a time  {wall_a + wall_b:6.1f} s "
              f"({wall_a:.1f} + {wall_b:.1f})")  # fmt: skip
        print(f"   this machine, no Ray, serial   {sum(walls[:2]):6.1f} s "
              f"(again: {sum(walls[2:]):.1f} s)")  # fmt: skip
        print("\n2. Ray overhead per task (submission -> start on the node; -> driver heard it)")
        for when, outs in (("first task", cold), ("warm", outcomes)):
            for n, o in outs.items():
                print(f"   {when:<10} {n}: {1e3 * (o.started_at - o.submitted_at):6.0f} ms; "
                      f"{1e3 * (o.received_at - o.submitted_at):6.0f} ms")  # fmt: skip
        print("\n3. p50 ratio to chain2 per run (90% bootstrap CI of the run); the targets have")
        print("   the same settings, so every run below measures the same thing")
        cluster_runs = [
            ("cluster parallel fleet-a", [r for r in par if r.target == "fleet-a"]),
            ("cluster parallel fleet-b", [r for r in par if r.target == "fleet-b"]),
            ("cluster serial   fleet-a", ser_a),
            ("cluster serial   fleet-b", ser_b),
        ]
        local_runs = [(f"local run {i // 2 + 1}    {TARGETS[i % 2].name}", res)
                      for i, res in enumerate(local)]  # fmt: skip
        for m in ("chain4.onnx", "chain8.onnx"):
            got = {}
            for label, res in cluster_runs + local_runs:
                est, low, high = ratios(res)[m]
                got[label] = est
                print(f"   {m} {label}: {est:.3f} ({low:.3f}-{high:.3f})")
            lo = [v for k, v in got.items() if k.startswith("local")]
            ml, spread = sum(lo) / len(lo), max(lo) - min(lo)
            print(f"   {m}: local mean {ml:.3f}, the local runs span {spread:.3f} "
                  f"({spread / ml:.1%})")  # fmt: skip
            for group in ("cluster serial", "cluster parallel"):
                cl = [v for k, v in got.items() if k.startswith(group)]
                mc = sum(cl) / len(cl)
                verdict = "within" if abs(mc - ml) <= spread else "OUTSIDE"
                print(f"   {m}: {group} mean {mc:.3f} ({mc / ml - 1:+.1%} vs local): {verdict} "
                      "the local noise")  # fmt: skip
        print("\n4. history writes, one transaction per result")
        server, pg = start_postgres(Path(tmp))
        try:
            print("   " + versions(server))
            for url in (f"sqlite:///{tmp}/history.sqlite", pg):
                for w in (1, 4):
                    m = measure(url, args.history_n, w)
                    print(f"   {m['backend']:<11} {w} writer(s): {m['results']} results in "
                          f"{m['seconds']:.2f} s = {m['results_per_s']:.0f}/s")  # fmt: skip
        finally:
            server.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
