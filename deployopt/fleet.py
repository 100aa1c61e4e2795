"""Benchmark and gate many hardware targets at once on a Ray cluster.

A target names where it runs with ``ray_labels`` (deployopt.presets.Target), Ray node labels
such as ``{"deployopt/target" = "edge-arm"}``. Each target gets ONE Ray task, scheduled by Ray
itself with ``label_selector`` (Ray >= 2.49; labels replace the older custom-resource pattern,
see Ray's "Use labels to control scheduling"). Inside the task the models are measured by the
same code as on this machine: :func:`deployopt.benchmark.bench_models` (interleaved rounds, one
spawned worker process per model, so a crashing model is still one INVALID result) or, for a
gate, :func:`deployopt.gating.measure_budgets`. Different targets run in parallel.

The task is a Ray streaming generator: its first item says it started (node id, host, versions),
its last carries the results. What can go wrong gets a reason and the run goes on:

- no node matches a target's labels, or none is free, within the scheduling timeout: the
  task is cancelled and the target's results are INVALID "no node for target X ...";
- the node (or the task's worker) dies while the task runs: INVALID "node lost: ...";
- the node's onnxruntime or deployopt version differs from the driver's: the result records
  both (env keys ``node_*`` and ``driver_*``) and ``version_mismatch = "yes"``; the fleet gate
  judges such a target INVALID unless ``allow_version_mismatch``.

The model files travel through Ray's object store (put once, read by every task), so nodes
need deployopt and onnxruntime installed, not a shared file system.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from deployopt.errors import RuntimeUnavailableError, UsageError
from deployopt.presets import Target

DEFAULT_SCHEDULE_TIMEOUT_S = 60.0
# result env keys a fleet result carries (the history's fingerprint columns read these)
NODE_KEYS = ("node_id", "node_hostname", "node_ip", "node_onnxruntime", "node_deployopt",
             "driver_onnxruntime", "driver_deployopt", "version_mismatch")  # fmt: skip
VERSIONED = ("onnxruntime", "deployopt")  # what must match between a node and the driver
ORT_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino",
                     "onnxruntime-directml", "onnxruntime-qnn")  # fmt: skip


class ClusterUnavailableError(RuntimeUnavailableError):
    """No Ray cluster to connect to (exit 4, like a missing runtime): deployopt never runs a
    fleet measurement locally under a remote target's name."""

    default_hint = (
        "start one (`ray start --head --labels deployopt/target=NAME` on each node), set "
        "RAY_ADDRESS=HOST:PORT, or pass --cluster HOST:6379"
    )


# ---------------------------------------------------------------- versions and the connection


def driver_versions() -> dict[str, str]:
    """The versions a node must match: onnxruntime ("none" when the driver has none) and
    deployopt."""
    from importlib import metadata

    import deployopt

    ort = "none"
    for dist in ORT_DISTRIBUTIONS:  # read from the installed package: onnxruntime not loaded
        try:
            ort = metadata.version(dist)
            break
        except metadata.PackageNotFoundError:
            continue
    return {"onnxruntime": ort, "deployopt": deployopt.__version__}


def node_facts() -> dict[str, str]:
    """Run on a node: its Ray node id, host name, IP and versions."""
    import socket

    import ray

    return {
        "node_id": ray.get_runtime_context().get_node_id(),
        "hostname": socket.gethostname(),
        "ip": ray.util.get_node_ip_address(),
        "ray": ray.__version__,
        **driver_versions(),
    }


def _require_ray():
    try:
        import ray
    except ImportError:
        raise ClusterUnavailableError(
            "--cluster needs Ray, which is not installed", hint="pip install 'ray>=2.49'"
        ) from None
    return ray


@contextmanager
def connected(cluster: str):
    """Connect this process to ``cluster`` as a Ray driver for the block: ``auto`` (the
    cluster RAY_ADDRESS names or the one started on this machine, found by Ray), or an
    address (``HOST:PORT``, the head's GCS; a ``ray://`` Ray Client address is refused: Ray
    Client has no streaming generators). An existing connection of this process is used as it
    is. Never starts a cluster."""
    ray = _require_ray()
    if ray.is_initialized():
        yield ray
        return
    if not cluster.strip():
        raise UsageError("--cluster is empty", hint="use auto or HOST:PORT (the head's GCS)")
    import logging

    where = cluster if cluster != "auto" else os.environ.get("RAY_ADDRESS") or _found(cluster)
    if where.startswith("ray://"):
        # tried against a real head with ray[client]: Ray Client cannot carry the streaming
        # generator a target's task is ('ObjectRefGenerator' object has no attribute 'binary')
        raise UsageError(
            f"--cluster {cluster}: {where} is a Ray Client address, and Ray Client does not "
            "support the streaming tasks deployopt runs per target",
            hint="give the head's GCS address (--cluster HOST:6379) from a machine on the "
            "cluster's network, or run the command on the cluster as a Ray job: `ray job submit "
            "--address http://HEAD:8265 -- deployopt bench ... --cluster auto`",
        )
    _probe(cluster, where)
    try:
        ray.init(
            address=where,
            log_to_driver=False,
            logging_level=logging.WARNING,
            configure_logging=True,
        )
    except (ConnectionError, RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        what = "no running Ray cluster found" if where == "auto" else f"cannot reach {where}"
        raise ClusterUnavailableError(f"--cluster {cluster}: {what} ({first[:200]})") from None
    try:
        yield ray
    finally:
        ray.shutdown()


def _found(cluster: str) -> str:
    """The address ``auto`` stands for, found as ``ray.init`` finds it (a cluster started on
    this machine), so that a stale address file is probed like any address."""
    try:  # Ray's own lookup; not a public API, so any change falls back to ray.init's
        from ray._private.services import canonicalize_bootstrap_address

        found = canonicalize_bootstrap_address("auto")
    except ConnectionError:
        raise ClusterUnavailableError(
            f"--cluster {cluster}: no running Ray cluster found (RAY_ADDRESS is not set and "
            "none runs on this machine)"
        ) from None
    except Exception:  # noqa: BLE001
        return "auto"
    return found or "auto"


def _probe(cluster: str, address: str, timeout_s: float = 5.0) -> None:
    """Fail fast on an address nothing listens on: Ray's own connect retries for minutes."""
    import socket

    if address == "auto":
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise UsageError(
            f"--cluster {cluster}: {address!r} is not an address",
            hint="use auto or HOST:PORT (the head's GCS port)",
        )
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as e:
        what = f"--cluster {cluster}: cannot reach {address} ({e})"
        raise ClusterUnavailableError(what) from None


def check_targets(targets: Sequence[Target]) -> None:
    """Every fleet target must say where it runs; a target without labels could land on any
    node and be reported under a name it does not deserve."""
    for t in targets:
        if not t.ray_labels:
            raise UsageError(
                f"target {t.name!r} has no ray_labels: the cluster cannot tell which node it is",
                hint=f'add ray_labels = {{ "deployopt/target" = "{t.name}" }} to [targets.'
                f"{t.name}] in the --config (or budget) file, and start that node with "
                f"`ray start --labels deployopt/target={t.name}`",
            )
    names = [t.name for t in targets]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UsageError(f"target(s) named twice: {', '.join(dup)}")


# ---------------------------------------------------------------- model files


def pack(paths: Mapping[str, Path]) -> dict[str, dict[str, bytes]]:
    """The files each model needs on a node: the .onnx and any external data it names
    (relative to its folder), as ``{key: {relative name: bytes}}``; the .onnx comes first."""
    import onnx

    out: dict[str, dict[str, bytes]] = {}
    for key, path in paths.items():
        path = Path(path)
        files = {path.name: path.read_bytes()}
        proto = onnx.load_model(str(path), load_external_data=False)
        for t in proto.graph.initializer:
            if t.data_location == onnx.TensorProto.EXTERNAL:
                loc = next(e.value for e in t.external_data if e.key == "location")
                if loc not in files:
                    files[loc] = (path.parent / loc).read_bytes()
        out[key] = files
    return out


def unpack(files: Mapping[str, Mapping[str, bytes]], folder: Path) -> dict[str, Path]:
    """Write packed models under ``folder`` (one sub-folder each); their .onnx paths."""
    paths = {}
    for i, (key, named) in enumerate(files.items()):
        sub = folder / str(i)
        for rel, data in named.items():
            p = sub / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
        paths[key] = sub / next(iter(named))
    return paths


# ---------------------------------------------------------------- the task on a node


def node_task(job: dict, files: dict):
    """A Ray task (a streaming generator) on the target's node: says it started, measures,
    returns the results. ``job["kind"]`` is ``bench`` or ``gate``."""
    import tempfile

    yield {"event": "started", "node": node_facts(), "at": time.time()}
    with tempfile.TemporaryDirectory(prefix="deployopt-fleet-") as d:
        paths = unpack(files, Path(d))
        if job["kind"] == "bench":
            from deployopt.benchmark import bench_models

            models = {name: str(paths[key]) for name, key in job["models"].items()}
            results = []
            for spec in job["specs"]:
                res = bench_models(
                    models, job["target"], spec, timeout_s=job["timeout_s"],
                    targets=job.get("per_model") or None,
                )  # fmt: skip
                results += list(res.values())
            yield {"event": "done", "results": results, "at": time.time()}
        else:
            from deployopt.gating import measure_budgets

            t = job["target"]
            checks, results = measure_budgets(
                paths["model"], job["budgets"], {t.name: t}, min_samples=job["min_samples"],
                min_seconds=job["min_seconds"], rounds=job["rounds"],
                reference=paths.get("reference"), timeout_s=job["timeout_s"],
            )  # fmt: skip
            yield {"event": "done", "checks": checks, "results": results, "at": time.time()}


@dataclass
class Outcome:
    """What became of one target's task: its node, its value, or why there is none."""

    target: Target
    submitted_at: float
    node: dict[str, str] | None = None
    started_at: float | None = None  # on the node's clock
    received_at: float | None = None  # when the driver heard the start
    value: dict | None = None
    error: str | None = None
    versions: dict[str, str] = field(default_factory=dict)  # the driver's

    @property
    def mismatch(self) -> list[str]:
        """``onnxruntime 1.20.0 on the node, 1.21.0 on the driver`` for each that differs."""
        if self.node is None:
            return []
        return [
            f"{k} {self.node.get(k)} on the node, {self.versions.get(k)} on the driver"
            for k in VERSIONED
            if self.node.get(k) != self.versions.get(k)
        ]

    def env(self) -> dict[str, str]:
        """The fleet keys of a result's env (see NODE_KEYS)."""
        env = {f"driver_{k}": self.versions.get(k, "?") for k in VERSIONED}
        if self.node is not None:
            env.update(node_id=self.node["node_id"], node_hostname=self.node["hostname"],
                       node_ip=self.node["ip"], ray=self.node["ray"],
                       **{f"node_{k}": self.node[k] for k in VERSIONED})  # fmt: skip
            env["version_mismatch"] = "yes" if self.mismatch else "no"
        return env


def _lost(ray, e: BaseException) -> str | None:
    """The "node lost" reason for a Ray error that means the node or the task's worker died."""
    lost = (ray.exceptions.NodeDiedError, ray.exceptions.WorkerCrashedError,
            ray.exceptions.ObjectLostError, ray.exceptions.ActorDiedError)  # fmt: skip
    if isinstance(e, lost):
        first = (str(e).strip().splitlines() or [""])[0]
        return f"node lost: {type(e).__name__}: {first[:200]}"
    return None


def _no_node(ray, target: Target, timeout_s: float) -> str:
    """Why a target's task did not start: no alive node has its labels, or none was free."""
    alive = [n for n in ray.nodes() if n.get("Alive")]
    match = [n for n in alive if all(n.get("Labels", {}).get(k) == v
                                     for k, v in target.ray_labels.items())]  # fmt: skip
    labels = ", ".join(f"{k}={v}" for k, v in target.ray_labels.items())
    if not match:
        return (f"no node for target {target.name}: no alive node has the labels {labels} "
                f"(waited {timeout_s:g} s)")  # fmt: skip
    return (f"no node for target {target.name} free within {timeout_s:g} s: {len(match)} "
            f"node(s) have the labels {labels} but stayed busy")  # fmt: skip


def run(
    jobs: Mapping[str, dict],
    targets: Mapping[str, Target],
    files: dict,
    *,
    schedule_timeout_s: float = DEFAULT_SCHEDULE_TIMEOUT_S,
    on_started: Callable[[Outcome], None] | None = None,
    on_done: Callable[[Outcome], None] | None = None,
    log: Callable[[str], None] = lambda s: None,
) -> dict[str, Outcome]:
    """Submit one task per target (``jobs[name]``) on the connected cluster and follow them
    until each has finished, failed, or not started within ``schedule_timeout_s``. Returns an
    :class:`Outcome` per target; ``on_started``/``on_done`` hear each as it happens."""
    import ray

    remote = ray.remote(node_task)
    ref = ray.put(files)
    versions = driver_versions()
    pending: dict[str, Any] = {}
    outcomes: dict[str, Outcome] = {}
    try:
        for name, job in jobs.items():
            t = targets[name]
            outcomes[name] = Outcome(t, time.time(), versions=versions)
            pending[name] = remote.options(
                label_selector=dict(t.ray_labels), num_cpus=1, max_retries=0,
                name=f"deployopt-{job['kind']}-{name}",
            ).remote(job, ref)  # fmt: skip
        while pending:
            now = time.time()
            waiting = [outcomes[n].submitted_at + schedule_timeout_s - now
                       for n in pending if outcomes[n].node is None]  # fmt: skip
            wait_s = max(0.05, min([1.0, *waiting]))
            ready, _ = ray.wait(list(pending.values()), num_returns=1, timeout=wait_s)
            for name in [n for n, g in pending.items() if any(g is r for r in ready)]:
                _step(ray, name, pending, outcomes[name], on_started, on_done, log)
            now = time.time()
            for name in [n for n in pending if outcomes[n].node is None]:
                o = outcomes[name]
                if now - o.submitted_at >= schedule_timeout_s:
                    ray.cancel(pending.pop(name), force=False)
                    o.error = _no_node(ray, o.target, schedule_timeout_s)
                    log(f"fleet: {o.error}")
                    if on_done:
                        on_done(o)
    finally:  # interrupted: nothing left running for a driver that is gone
        for gen in pending.values():
            try:
                ray.cancel(gen, force=True)
            except Exception:  # noqa: BLE001 - best effort on the way out
                pass
    return outcomes


def _step(ray, name, pending, o: Outcome, on_started, on_done, log) -> None:
    """Take the next item of target ``name``'s task."""
    try:
        msg = ray.get(next(pending[name]))
    except StopIteration:
        msg = None
    except ray.exceptions.RayError as e:
        o.error = _lost(ray, e) or f"the task failed on the node: {_first_line(e)}"
        msg = None
    if msg is not None and msg["event"] == "started":
        o.node, o.started_at, o.received_at = msg["node"], msg["at"], time.time()
        log(f"fleet: {name} started on {o.node['hostname']} (node {o.node['node_id'][:8]})")
        if on_started:
            on_started(o)
        return
    pending.pop(name)
    if msg is not None:
        o.value = msg
    elif o.error is None:
        o.error = "the task ended without results"
    log(f"fleet: {name} {'done' if o.error is None else o.error}")
    if on_done:
        on_done(o)


def _first_line(e: BaseException) -> str:
    cause = getattr(e, "cause", None) or e
    text = f"{type(cause).__name__}: {cause}".strip().splitlines()
    return text[0][:300] if text else type(cause).__name__


# ---------------------------------------------------------------- bench and gate on a fleet


def invalid_result(name: str, model: str, target: Target, reason: str, env: dict):
    """A result that has no measurement, only the reason."""
    from deployopt.benchmark import BenchResult

    base = {"target": target.name, "ep": target.ep, "threads": str(target.threads or "all")}
    return BenchResult(name=name, model=model, target=target.name, providers=(), shapes={},
                       cold_ms=None, samples_ms=(), stats=None, throughput=None,
                       peak_rss_mb=None, env={**base, **env}, invalid=(reason,))  # fmt: skip


def bench_results(o: Outcome, models: Mapping[str, str], n_specs: int) -> list:
    """A finished bench task's results with the driver's model paths and the node's facts;
    INVALID ones with the reason when the task had none."""
    env = o.env()
    if o.error is not None or o.value is None:
        reason = o.error or "no results"
        return [invalid_result(n, p, o.target, reason, env)
                for _ in range(n_specs) for n, p in models.items()]  # fmt: skip
    return [replace(r, model=models[r.name], env={**r.env, **env}) for r in o.value["results"]]


def bench(
    models: Mapping[str, Path],
    targets: Sequence[Target],
    specs: Sequence,
    *,
    cluster: str = "auto",
    per_model: Mapping[str, Mapping[str, Target]] | None = None,
    timeout_s: float = 600.0,
    schedule_timeout_s: float = DEFAULT_SCHEDULE_TIMEOUT_S,
    on_results: Callable[[list], None] | None = None,
    on_started: Callable[[Outcome], None] | None = None,
    log: Callable[[str], None] = lambda s: None,
) -> tuple[list, dict[str, Outcome]]:
    """Measure every model on every target, one task per target on its node: the models of a
    target interleaved in that task, the targets in parallel. ``per_model[target][model]``:
    another target setting for one model (its session file). ``on_results`` hears each
    target's results as soon as they are in (the caller records them: a result is written
    whole or not at all). Returns the results (target by target, in ``targets`` order) and
    the outcomes."""
    check_targets(targets)
    by_name = {t.name: t for t in targets}
    keys = {name: f"m{i}" for i, name in enumerate(models)}
    files = pack({keys[n]: p for n, p in models.items()})
    jobs = {t.name: {"kind": "bench", "target": t, "specs": list(specs), "models": keys,
                     "per_model": dict((per_model or {}).get(t.name, {})),
                     "timeout_s": timeout_s} for t in targets}  # fmt: skip
    paths = {n: str(p) for n, p in models.items()}
    done: dict[str, list] = {}

    def finished(o: Outcome) -> None:
        done[o.target.name] = bench_results(o, paths, len(specs))
        if on_results:
            on_results(done[o.target.name])

    with connected(cluster) as _:
        outcomes = run(jobs, by_name, files, schedule_timeout_s=schedule_timeout_s,
                       on_started=on_started, on_done=finished, log=log)  # fmt: skip
    return [r for t in targets for r in done.get(t.name, [])], outcomes


def gate(
    model: Path,
    budgets: Sequence,
    targets: Mapping[str, Target],
    *,
    cluster: str = "auto",
    reference: Path | None = None,
    min_samples: int = 60,
    min_seconds: float = 3.0,
    rounds: int = 3,
    timeout_s: float = 600.0,
    schedule_timeout_s: float = DEFAULT_SCHEDULE_TIMEOUT_S,
    allow_version_mismatch: bool = False,
    on_results: Callable[[list, list], None] | None = None,
    log: Callable[[str], None] = lambda s: None,
) -> tuple[list, list, dict[str, Outcome]]:
    """Judge each target's budgets on a node of that target (the budgets name their targets).
    Returns the checks (target by target), the bench results and the outcomes. A target whose
    task did not run gets every check INVALID with the reason; one whose node runs other
    versions than the driver gets its latency checks INVALID unless
    ``allow_version_mismatch``. ``on_results(checks, results)`` hears each target's."""
    from deployopt.judge import Check, Verdict

    names = list(dict.fromkeys(b.target for b in budgets))
    for n in names:
        if n not in targets:
            raise UsageError(f"budget for unknown target {n!r}",
                             hint="known targets: " + ", ".join(sorted(targets)))  # fmt: skip
    used = [targets[n] for n in names]
    check_targets(used)
    files = pack({"model": model, **({"reference": reference} if reference else {})})
    jobs = {n: {"kind": "gate", "target": targets[n], "timeout_s": timeout_s,
                "budgets": [b for b in budgets if b.target == n], "min_samples": min_samples,
                "min_seconds": min_seconds, "rounds": rounds} for n in names}  # fmt: skip
    checks_of: dict[str, list] = {}
    results_of: dict[str, list] = {}

    def invalid(o: Outcome, reason: str, keep=lambda c: False) -> list:
        return [c if keep(c) else Check(c.budget, c.metric, c.limit, c.measured, c.ci,
                                        Verdict.INVALID, reason)
                for c in o.value["checks"]]  # fmt: skip

    def finished(o: Outcome) -> None:
        n = o.target.name
        env = o.env()
        if o.error is not None or o.value is None:
            reason = o.error or "no results"
            checks_of[n] = [Check(b.label, k, v, None, None, Verdict.INVALID, reason)
                            for b in jobs[n]["budgets"] for k, v in b.limits().items()]  # fmt: skip
            results_of[n] = [invalid_result(model.name, str(model), o.target, reason, env)]
        else:
            checks_of[n] = list(o.value["checks"])
            if o.mismatch and not allow_version_mismatch:
                why = ("version mismatch: " + "; ".join(o.mismatch) + " (pass "
                       "--allow-version-mismatch to judge it anyway)")  # fmt: skip
                checks_of[n] = invalid(o, why, keep=lambda c: c.metric == "max_size_mb")
            results_of[n] = [replace(r, model=str(model), env={**r.env, **env})
                             for r in o.value["results"]]  # fmt: skip
        if on_results:
            on_results(checks_of[n], results_of[n])

    with connected(cluster) as _:
        outcomes = run(jobs, targets, files, schedule_timeout_s=schedule_timeout_s,
                       on_done=finished, log=log)  # fmt: skip
    checks = [c for n in names for c in checks_of.get(n, [])]
    results = [r for n in names for r in results_of.get(n, [])]
    return checks, results, outcomes
