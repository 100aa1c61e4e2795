"""Benchmarks: THE timing loop (:func:`measure`), worker sessions, interleaved rounds.

Every latency number deployopt reports is measured by :func:`measure`, inside a worker process
that holds one session (:class:`BenchWorker`). Several models are measured in interleaved rounds
(every model once per round) so that machine drift hits all alike.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from deployopt.events import BenchRound
from deployopt.presets import Target
from deployopt.stats import quantile_ci


@dataclass(frozen=True)
class LatencyStats:
    samples: int
    p50_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float
    stdev_ms: float
    min_ms: float
    p50_ci_low_ms: float  # 95% CI of the median (order statistics; min-max under 4 samples)
    p50_ci_high_ms: float

    @classmethod
    def from_samples(cls, samples_ms: Sequence[float]) -> LatencyStats:
        a = np.sort(np.asarray(samples_ms, dtype=np.float64))
        if a.size == 0:
            raise ValueError("no samples")
        p50, p90, p95, p99 = np.percentile(a, [50, 90, 95, 99])
        lo, hi = quantile_ci(a, 0.5) or (float(a[0]), float(a[-1]))
        return cls(
            samples=int(a.size),
            p50_ms=float(p50),
            p90_ms=float(p90),
            p95_ms=float(p95),
            p99_ms=float(p99),
            mean_ms=float(a.mean()),
            stdev_ms=float(statistics.stdev(a)) if a.size > 1 else 0.0,
            min_ms=float(a[0]),
            p50_ci_low_ms=lo,
            p50_ci_high_ms=hi,
        )

    def percentile(self, name: str) -> float:
        return float(getattr(self, f"{name}_ms"))

    def to_json(self) -> dict:
        return asdict(self)


def measure(
    fn: Callable[[], object],
    warmup: int = 5,
    min_samples: int = 30,
    min_seconds: float = 1.0,
    max_seconds: float = 60.0,
    clock: Callable[[], float] = time.perf_counter,
) -> list[float]:
    """Call ``fn`` ``warmup`` times untimed, then time it until both ``min_samples`` calls and
    ``min_seconds`` have passed (or ``max_seconds``). Returns the samples in milliseconds."""
    for _ in range(warmup):
        fn()
    samples: list[float] = []
    start = clock()
    while True:
        t0 = clock()
        fn()
        t1 = clock()
        samples.append((t1 - t0) * 1e3)
        elapsed = t1 - start
        if (len(samples) >= min_samples and elapsed >= min_seconds) or elapsed >= max_seconds:
            return samples


@dataclass(frozen=True)
class BenchSpec:
    """Input shape and sampling of a measurement. ``min_samples`` and ``min_seconds`` are per
    model in total, spread over ``rounds`` interleaved rounds."""

    batch: int = 1
    seq: int = 128
    shapes: tuple[tuple[str, tuple[int, ...]], ...] = ()  # explicit NAME=DIMS overrides
    dims: tuple[tuple[str, int], ...] = ()  # symbolic dims by name (an image's height, width)
    warmup: int = 5
    min_samples: int = 60
    min_seconds: float = 3.0
    max_seconds: float = 120.0
    rounds: int = 3


DRIFT_WARN = 0.10  # round medians further apart than this: the machine drifted


def drift_warnings(results: Sequence[BenchResult]) -> list[str]:
    """One line per result whose rounds disagree by more than DRIFT_WARN."""
    return [
        f"{r.name}: round medians varied by {r.drift:.0%} "
        f"({min(r.round_p50_ms):.3g}-{max(r.round_p50_ms):.3g} ms): the machine drifted; "
        "compare models within this run, not absolute numbers across runs"
        for r in results
        if r.drift is not None and r.drift > DRIFT_WARN
    ]


@dataclass(frozen=True)
class BenchResult:
    name: str
    model: str
    target: str
    providers: tuple[str, ...]  # what the session really used
    shapes: Mapping[str, list[int]]
    cold_ms: float | None  # session creation + first run
    samples_ms: tuple[float, ...]
    stats: LatencyStats | None
    throughput: float | None  # items/s at this batch, from p50
    peak_rss_mb: float | None
    env: Mapping[str, str]
    node_providers: Mapping[str, int] = field(default_factory=dict)
    invalid: tuple[str, ...] = ()
    round_p50_ms: tuple[float, ...] = ()  # the median of each interleaved round
    # flagged, not invalid: e.g. some nodes fell back from a GPU EP to the CPU (node_providers
    # has the counts per EP; see deployopt.runtime.session)
    warnings: tuple[str, ...] = ()

    @property
    def valid(self) -> bool:
        return not self.invalid and self.stats is not None

    @property
    def drift(self) -> float | None:
        """How far apart the rounds' medians are (max/min - 1): the machine's own drift while
        this model was measured. Large drift means absolute numbers will not repeat across
        runs; ratios between models of the same interleaved run still hold."""
        r = self.round_p50_ms
        return max(r) / min(r) - 1 if len(r) > 1 and min(r) > 0 else None

    @property
    def batch(self) -> int:
        return next(iter(self.shapes.values()))[0] if self.shapes else 1

    def to_json(self) -> dict:
        d = asdict(self)
        d["stats"] = self.stats.to_json() if self.stats else None
        d["valid"] = self.valid
        d["drift"] = self.drift
        return d


def resolve_shapes(specs, spec: BenchSpec) -> dict[str, tuple[int, ...]]:
    """Concrete input shapes: ``spec.shapes`` where given, else symbolic dims become the batch
    (first dim), the size ``spec.dims`` names, or the sequence length (any other)."""
    overrides = dict(spec.shapes)
    named = dict(spec.dims)
    return {
        s.name: tuple(overrides[s.name])
        if s.name in overrides
        else tuple(
            d if isinstance(d, int) else (spec.batch if i == 0 else named.get(d, spec.seq))
            for i, d in enumerate(s.shape)
        )
        for s in specs
    }


BERT_VOCAB = 30522  # bert-base-uncased: ids 1996.. are ordinary words, 101/102 [CLS]/[SEP]


def bench_feeds(specs, spec: BenchSpec, vocab: int | None = None) -> dict[str, np.ndarray]:
    """Inputs for a signature: symbolic batch/sequence dims from the spec; text models get
    token ids from the model's vocabulary of ``vocab`` tokens (the embedding table's rows,
    :func:`deployopt.inputs.vocab_size`): a BERT-sized one gets the ordinary-word range of a
    BERT vocabulary with [CLS]/[SEP] at the ends, a smaller one ids in [1, vocab); a full
    attention mask."""
    rng = np.random.default_rng(0)
    feeds = {}
    shapes = resolve_shapes(specs, spec)
    vocab = vocab or BERT_VOCAB
    for s in specs:
        shape = shapes[s.name]
        dt = np.dtype(s.dtype)
        if s.name == "input_ids" and vocab >= BERT_VOCAB:
            a = rng.integers(1996, 20000, size=shape)
            a[..., 0], a[..., -1] = 101, 102
        elif s.name == "input_ids":  # a small vocabulary: never an id past its table
            a = rng.integers(min(1, vocab - 1), vocab, size=shape)
        elif s.name == "attention_mask":
            a = np.ones(shape)
        elif s.name == "token_type_ids":
            a = np.zeros(shape)
        elif np.issubdtype(dt, np.integer):
            a = rng.integers(0, 100, size=shape)
        else:
            a = rng.standard_normal(shape)
        feeds[s.name] = a.astype(dt)
    return feeds


# ---------------------------------------------------------------- the worker side


def _serve(conn, path: str, target: Target, spec: BenchSpec) -> None:
    """Worker main: open one session, answer ``measure`` requests until ``stop``."""
    from pathlib import Path

    from deployopt.inputs import specs_from_onnx
    from deployopt.runtime import session as rs

    try:
        from deployopt.feeds import bench_feed
        from deployopt.inputs import vocab_size

        specs = specs_from_onnx(Path(path))
        # scalars and recurrent state get their own rules (deployopt.feeds); others the usual
        feeds = bench_feed(Path(path), specs, spec.batch, spec.seq) or bench_feeds(
            specs, spec, vocab=vocab_size(Path(path)) if any(s.is_text for s in specs) else None
        )
        info = {"shapes": {k: list(v.shape) for k, v in feeds.items()}, "invalid": []}
        wanted = rs.EP_ALIASES.get(target.ep.lower(), target.ep)
        if wanted not in rs.available_providers():
            info["invalid"].append(
                f"{wanted} is not available here (available: {', '.join(rs.available_providers())})"
            )
            conn.send(("ready", info))
            return
        t0 = time.perf_counter()
        sess = rs.create_session(
            Path(path),
            provider=target.ep,
            threads=target.threads,
            optimization=target.graph_optimization,
            session_config=target.session_config,
        )
        run = rs.runner(sess, feeds, device_io=target.io_binding and not target.include_copies)
        run()
        info["cold_ms"] = (time.perf_counter() - t0) * 1e3
        info["providers"] = list(sess.get_providers())
        if not info["providers"] or info["providers"][0] != wanted:
            info["invalid"].append(
                f"requested {wanted} but the session runs on "
                f"{info['providers'][0] if info['providers'] else 'nothing'}"
            )
        if wanted != "CPUExecutionProvider":
            info["node_providers"] = rs.node_providers(Path(path), target, feeds)
            if not info["node_providers"].get(wanted):
                info["invalid"].append(f"no node was assigned to {wanted}")
            note = rs.fallback_note(info["node_providers"], wanted)
            if note:
                info["warnings"] = [note]
        serve_requests(conn, run, info)
    except Exception as e:  # the parent turns it into an invalid result
        send_error(conn, e)
    finally:
        conn.close()


def serve_requests(conn, run: Callable[[], object], info: dict) -> None:
    """The worker's side of the protocol once ``run`` is ready: report ``info``, then time
    ``run`` with :func:`measure` on each ``measure`` request until ``stop``."""
    import resource

    conn.send(("ready", info))
    while True:
        cmd, arg = conn.recv()
        if cmd == "stop":
            break
        samples = measure(run, **arg)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        conn.send(("samples", {"samples": samples, "peak_rss_mb": rss}))


def send_error(conn, e: BaseException) -> None:
    try:
        conn.send(("error", f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"))
    except (OSError, IndexError):
        pass


class BenchWorker:
    """Parent-side handle of a worker process that holds one session."""

    def __init__(
        self,
        name: str,
        path: str,
        target: Target,
        spec: BenchSpec,
        timeout_s: float = 600.0,
        serve: Callable | None = None,
    ):
        """``serve(conn, path, target, spec)`` is the worker's main (default: an onnxruntime
        session on ``path``); it must be importable, since the worker is spawned."""
        import multiprocessing as mp

        self.name, self.path, self.target, self.spec = name, path, target, spec
        self.timeout_s = timeout_s
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(
            target=serve or _serve, args=(child, path, target, spec), daemon=True
        )
        self.proc.start()
        child.close()
        self.info: dict = {}
        self.samples: list[float] = []
        self.round_p50: list[float] = []
        self.peak_rss_mb: float | None = None
        self.errors: list[str] = []

    def _recv(self, what: str):
        from deployopt.runtime.worker import death_reason

        if not self.conn.poll(self.timeout_s):
            self.proc.kill()
            raise TimeoutError(f"no answer to {what} within {self.timeout_s:g} s; killed")
        try:
            kind, payload = self.conn.recv()
        except EOFError:
            self.proc.join(5)
            raise ChildProcessError(f"worker died {death_reason(self.proc.exitcode)}") from None
        if kind == "error":
            raise RuntimeError(payload)
        return payload

    @property
    def alive(self) -> bool:
        return not self.errors

    def start(self) -> None:
        try:
            self.info = self._recv("session creation")
        except (TimeoutError, ChildProcessError, RuntimeError) as e:
            self.errors.append(f"session: {e}")
            return
        if self.info.get("invalid"):
            self.errors.extend(self.info["invalid"])

    def measure(self, rounds_left: int) -> None:
        spec = self.spec
        per_round = {
            "warmup": spec.warmup,
            "min_samples": max(1, math.ceil(spec.min_samples / spec.rounds)),
            "min_seconds": spec.min_seconds / spec.rounds,
            "max_seconds": spec.max_seconds / spec.rounds,
        }
        try:
            self.conn.send(("measure", per_round))
            got = self._recv("measure")
        except (TimeoutError, ChildProcessError, RuntimeError, OSError) as e:
            self.errors.append(f"measuring: {e}")
            return
        self.samples += got["samples"]
        self.round_p50.append(float(np.median(got["samples"])))
        self.peak_rss_mb = got["peak_rss_mb"]

    def close(self) -> None:
        try:
            if self.proc.is_alive():
                self.conn.send(("stop", None))
        except OSError:
            pass
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)
        self.conn.close()

    def result(self, env: Mapping[str, str]) -> BenchResult:
        stats = LatencyStats.from_samples(self.samples) if self.samples else None
        invalid = tuple(self.errors)
        if stats is None and not invalid:
            invalid = ("no samples",)
        shapes = self.info.get("shapes", {})
        batch = next(iter(shapes.values()))[0] if shapes else 1
        return BenchResult(
            name=self.name,
            model=self.path,
            target=self.target.name,
            providers=tuple(self.info.get("providers", ())),
            shapes=shapes,
            cold_ms=self.info.get("cold_ms"),
            samples_ms=tuple(self.samples),
            stats=stats,
            throughput=batch / (stats.p50_ms / 1e3) if stats else None,
            peak_rss_mb=self.peak_rss_mb,
            env=env,
            node_providers=self.info.get("node_providers", {}),
            invalid=invalid,
            round_p50_ms=tuple(self.round_p50),
            warnings=tuple(self.info.get("warnings", ())),
        )


def bench_models(
    models: Mapping[str, str],
    target: Target,
    spec: BenchSpec,
    log: Callable[[str], None] = lambda s: None,
    timeout_s: float = 600.0,
    serves: Mapping[str, Callable] | None = None,
    targets: Mapping[str, Target] | None = None,
    on_event: Callable[[BenchRound], None] | None = None,
) -> dict[str, BenchResult]:
    """Measure several models on one target in interleaved rounds; one worker per model.

    A model whose worker crashes, hangs or cannot run becomes an invalid result with the
    reason; the others are measured on. ``serves`` gives some models another worker main
    (see :class:`BenchWorker`), e.g. to time a PyTorch reference in the same rounds;
    ``targets`` gives some another target, e.g. the same model under other session options.
    ``on_event`` hears a :class:`~deployopt.events.BenchRound` after each round.
    """
    env = fingerprint(target)
    workers = []
    try:
        for name, path in models.items():  # sessions are created one at a time
            t = (targets or {}).get(name, target)
            w = BenchWorker(name, str(path), t, spec, timeout_s, (serves or {}).get(name))
            w.start()
            workers.append(w)
        for r in range(spec.rounds):
            # ABBA order: even rounds forwards, odd rounds backwards, so neither a model's place
            # in the round nor a steady drift favours one model
            for w in workers if r % 2 == 0 else workers[::-1]:
                if w.alive:
                    w.measure(spec.rounds - r)
            log(f"bench: round {r + 1}/{spec.rounds} done")
            if on_event is not None:
                on_event(BenchRound(r + 1, spec.rounds))
    finally:
        for w in workers:
            w.close()
    envs = {target.model_dump_json(): env}  # a worker on another target records that target
    results = {}
    for w in workers:
        key = w.target.model_dump_json()
        if key not in envs:
            envs[key] = fingerprint(w.target)
        results[w.name] = w.result(envs[key])
    return results


def fingerprint(target: Target | None = None) -> dict[str, str]:
    """The machine, versions and settings a number was measured with."""
    import os
    import platform
    import shutil
    import subprocess

    env = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cores": str(os.cpu_count()),
    }
    if target is not None:
        env.update(
            target=target.name,
            ep=target.ep,
            threads=str(target.threads or "all"),
            graph_optimization=target.graph_optimization,
        )
        env.update({f"session:{k}": str(v) for k, v in target.session_config.items()})
    from deployopt.hardware import detect_cpu

    cpu = detect_cpu()
    env["cpu"] = cpu.model
    env["cpu_flags"] = ",".join(cpu.features)
    env["cpu_int8_dot"] = "yes" if cpu.int8_dot else "no"
    if shutil.which("nvidia-smi"):
        try:
            out = (
                subprocess.run(
                    ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                    capture_output=True,
                    text=True,
                    timeout=10,
                )
                .stdout.strip()
                .splitlines()
            )
            if out:
                env["gpu"], _, env["gpu_driver"] = out[0].partition(", ")
        except (OSError, subprocess.TimeoutExpired):
            pass
    for mod in ("onnxruntime", "onnx", "torch", "numpy"):
        try:
            env[mod] = __import__(mod).__version__
        except ImportError:
            pass
    return env
