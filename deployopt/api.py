"""The Python API: one function per CLI command, same records."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from deployopt.benchmark import BenchResult
from deployopt.config import make_config
from deployopt.run import OptimizeResult, Runner
from deployopt.sources import load_source


def optimize(
    source: Any,
    out: str | Path,
    *,
    variants: Sequence[str] | None = None,
    calibration: str | Path | None = None,
    evaluation: str | Path | None = None,
    opset: int | None = None,
    input_shapes: dict[str, Sequence[int]] | None = None,
    weights: str | Path | None = None,
    trust_remote_code: bool = False,
    pooling: str | None = None,
    threads: int | None = None,
    force: bool = False,
    log: Callable[[str], None] | None = None,
    **options: Any,
) -> OptimizeResult:
    """Export ``source`` to ONNX and build validated variants in ``out``.

    ``source`` is a Hugging Face folder, an ``.onnx`` file, ``"pkg.mod:factory"``, ``"minilm"``
    or a ``torch.nn.Module`` (then ``input_shapes={"x": (1, 3, 32, 32)}`` is required).

    >>> result = optimize("minilm", "out", variants=["fuse", "int8-dynamic"])  # doctest: +SKIP
    >>> result.by_name("int8-dynamic").parity["mean_cosine"] >= 0.99  # doctest: +SKIP
    True
    """
    cfg = make_config(
        variants=tuple(variants) if variants is not None else None,
        calibration=Path(calibration) if calibration else None,
        evaluation=Path(evaluation) if evaluation else None,
        opset=opset,
        trust_remote_code=trust_remote_code,
        pooling=pooling,
        threads=threads,
        **options,
    )
    shapes = {k: tuple(v) for k, v in (input_shapes or {}).items()}
    src = load_source(
        source,
        input_shapes=shapes,
        weights=Path(weights) if weights else None,
        trust_remote_code=cfg.trust_remote_code,
        pooling=cfg.pooling,
    )
    log = log or (lambda s: None)
    result = Runner(src, Path(out), cfg, log=log, force=force).run()
    from deployopt.ship import ship

    ship(result, cfg, log)
    return result


def bench(
    models: str | Path | Sequence[str | Path],
    *,
    target: str | None = None,
    ep: str | None = None,
    threads: int | None = None,
    config: str | Path | None = None,
    batch: Sequence[int] = (1,),
    seq: int = 128,
    shapes: dict[str, Sequence[int]] | None = None,
    min_samples: int = 60,
    min_seconds: float = 3.0,
    rounds: int = 3,
    include_copies: bool = False,
    timeout_s: float = 600.0,
    log: Callable[[str], None] | None = None,
) -> list[BenchResult]:
    """Measure one or more ``.onnx`` models on a target, interleaved, each in its own worker.

    Returns one :class:`~deployopt.benchmark.BenchResult` per model and batch size, in that order.
    A result whose provider fell back, whose worker crashed or hung is returned with
    ``valid == False`` and the reason in ``invalid``; nothing is raised for it.

    >>> [r.stats.p50_ms for r in bench("model.onnx", batch=[1, 8])]  # doctest: +SKIP
    """
    from deployopt.benchmark import BenchSpec, bench_models
    from deployopt.errors import UsageError
    from deployopt.presets import resolve_target
    from deployopt.runtime.session import resolve_provider
    from deployopt.sources import read_onnx

    paths = [Path(models)] if isinstance(models, (str, Path)) else [Path(m) for m in models]
    if not paths:
        raise UsageError("no model to benchmark")
    for p in paths:
        read_onnx(p)  # missing, truncated or unsafe files fail here, naming the file
    tgt = resolve_target(target, ep, threads, Path(config) if config else None)
    if include_copies:
        tgt = tgt.model_copy(update={"include_copies": True})
    resolve_provider(tgt.ep)  # a missing provider is an error listing the available ones
    batches = list(batch)
    if not batches or min(batches) < 1:
        raise UsageError(f"bad batch sizes {batches}", hint="use positive integers, e.g. 1,8,32")
    if min_samples < 1 or min_seconds < 0 or rounds < 1:
        raise UsageError("min_samples and rounds must be >= 1, min_seconds >= 0")
    names = unique_names(paths)
    fixed = tuple((k, tuple(int(d) for d in v)) for k, v in (shapes or {}).items())
    results: list[BenchResult] = []
    for b in batches:
        spec = BenchSpec(
            batch=b,
            seq=seq,
            shapes=fixed,
            min_samples=min_samples,
            min_seconds=min_seconds,
            rounds=rounds,
        )
        res = bench_models(
            dict(zip(names, map(str, paths))),
            tgt,
            spec,
            log=log or (lambda s: None),
            timeout_s=timeout_s,
        )
        results += list(res.values())
    return results


def unique_names(paths: Sequence[Path]) -> list[str]:
    """Short labels: the file name, or parent/file where names repeat."""
    names = [p.name for p in paths]
    if len(set(names)) == len(names):
        return names
    return [f"{p.parent.name}/{p.name}" if names.count(p.name) > 1 else p.name for p in paths]
