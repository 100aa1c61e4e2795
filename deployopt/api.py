"""The Python API: one function per CLI command, same records."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

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
    runner = Runner(src, Path(out), cfg, log=log or (lambda s: None), force=force)
    return runner.run()
