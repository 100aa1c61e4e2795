"""Compare a candidate model's outputs with a reference's.

Pure numpy: per output max abs diff, per-sample cosine (mean and min), NaN/inf count, and argmax
agreement for classifier logits. :func:`compare` returns a :class:`ParityReport`; the caller
decides what a failure means (the runner makes it fatal for that variant).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

Batch = Mapping[str, np.ndarray]


@dataclass(frozen=True)
class Tolerance:
    """What a candidate must meet against its reference.

    ``rel_atol`` is an absolute tolerance expressed relative to the reference output's scale
    (max |ref|, at least 1), so one value serves logits and unit-norm embeddings alike.
    """

    min_mean_cosine: float = 0.0
    min_cosine: float = -1.0
    rel_atol: float | None = None
    min_argmax_agreement: float | None = None

    def describe(self) -> str:
        parts = [f"mean cosine >= {self.min_mean_cosine}"]
        if self.min_cosine > -1:
            parts.append(f"min cosine >= {self.min_cosine}")
        if self.rel_atol is not None:
            parts.append(f"max abs diff <= {self.rel_atol} x output scale")
        if self.min_argmax_agreement is not None:
            parts.append(f"argmax agreement >= {self.min_argmax_agreement}")
        return ", ".join(parts)


# Starting tolerances (DESIGN.md), calibrated on all-MiniLM-L6-v2 (see README "Parity"):
# export and fusion are exact rewrites up to float reassociation; fp16 keeps ~3 decimal digits;
# int8 is judged by direction (cosine) and decisions (argmax), never by abs diff.
EXACT = Tolerance(min_mean_cosine=0.9999, min_cosine=0.999, rel_atol=1e-4)
FP16 = Tolerance(min_mean_cosine=0.999, min_cosine=0.99, rel_atol=1e-2)
INT8 = Tolerance(min_mean_cosine=0.99, min_cosine=0.9, min_argmax_agreement=0.95)


@dataclass(frozen=True)
class OutputParity:
    name: str
    samples: int
    max_abs_diff: float
    scale: float
    mean_cosine: float
    min_cosine: float
    nonfinite: int
    argmax_agreement: float | None
    # the reference is the same for every input: agreement on it proves nothing
    constant: bool = False


@dataclass(frozen=True)
class ParityReport:
    outputs: tuple[OutputParity, ...]
    failures: tuple[str, ...]

    @property
    def passed(self) -> bool:
        return not self.failures

    def summary(self) -> dict:
        """Worst case over outputs: the numbers the manifest shows."""
        o = self.outputs
        agree = [x.argmax_agreement for x in o if x.argmax_agreement is not None]
        return {
            "passed": self.passed,
            "mean_cosine": min(x.mean_cosine for x in o),
            "min_cosine": min(x.min_cosine for x in o),
            "max_abs_diff": max(x.max_abs_diff for x in o),
            "nonfinite": sum(x.nonfinite for x in o),
            "argmax_agreement": min(agree) if agree else None,
            "samples": o[0].samples if o else 0,
            "outputs": [asdict(x) for x in o],
            "failures": list(self.failures),
        }


def _rows(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    return a.reshape(a.shape[0], -1) if a.ndim > 1 else a.reshape(-1, 1)


def _cosine_rows(ref: np.ndarray, cand: np.ndarray) -> np.ndarray:
    nr = np.linalg.norm(ref, axis=1)
    nc = np.linalg.norm(cand, axis=1)
    dot = (ref * cand).sum(axis=1)
    both_zero = (nr == 0) & (nc == 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        cos = dot / (nr * nc)
    cos = np.where(both_zero, 1.0, cos)
    return np.nan_to_num(cos, nan=-1.0)


def compare(
    reference: Sequence[Batch],
    candidate: Sequence[Batch],
    tolerance: Tolerance,
    classifier_outputs: Sequence[str] = (),
) -> ParityReport:
    """Compare batches of outputs, output by output.

    Both sequences hold the same batches in the same order (dicts name -> array, batch first).
    Cosine is taken per sample over the flattened sample, so a per-token output weighs every
    token of a sample together.
    """
    if len(reference) != len(candidate):
        raise ValueError(
            f"{len(reference)} reference batches vs {len(candidate)} candidate batches"
        )
    if not reference:
        raise ValueError("parity needs at least one batch")
    outputs = []
    failures = []
    constant = constant_outputs(reference)
    for name in reference[0]:
        refs, cands, cos, agree = [], [], [], []
        max_abs = 0.0
        nonfinite = 0
        for rb, cb in zip(reference, candidate):
            if name not in cb:
                raise ValueError(f"candidate has no output {name!r}")
            r, c = _rows(rb[name]), _rows(cb[name])
            if r.shape != c.shape:
                failures.append(f"{name}: shape {tuple(cb[name].shape)} != {tuple(rb[name].shape)}")
                break
            nonfinite += int((~np.isfinite(c)).sum())
            diff = np.abs(np.nan_to_num(c, nan=np.inf) - r)
            max_abs = max(max_abs, float(diff.max()) if diff.size else 0.0)
            cos.append(_cosine_rows(r, np.nan_to_num(c)))
            refs.append(float(np.abs(r).max()) if r.size else 0.0)
            if name in classifier_outputs:
                agree.append(r.argmax(axis=1) == c.argmax(axis=1))
            cands.append(c.shape[0])
        if not cos:
            continue
        allcos = np.concatenate(cos)
        scale = max(refs + [1.0])
        op = OutputParity(
            name=name,
            samples=int(allcos.size),
            max_abs_diff=max_abs,
            scale=scale,
            mean_cosine=float(allcos.mean()),
            min_cosine=float(allcos.min()),
            nonfinite=nonfinite,
            argmax_agreement=float(np.concatenate(agree).mean()) if agree else None,
            constant=name in constant,
        )
        outputs.append(op)
        failures.extend(_check(op, tolerance))
    return ParityReport(outputs=tuple(outputs), failures=tuple(failures))


def constant_outputs(
    batches: Sequence[Batch], inputs: Sequence[Batch] | None = None
) -> dict[str, str]:
    """The outputs that do not vary across the samples of ``batches`` (reference outputs on
    the evaluation inputs), each with what it always is (``"all zeros"``, ``"always 3.5"``,
    ``"the same array for every input"``). Parity on such an output passes whatever the
    candidate computes from its input (cosine 1.0 for a model that outputs zeros), so callers
    warn. Needs two samples at least, and ``inputs`` (when given) that vary themselves; values
    within 1e-6 of the output's scale count as equal."""
    if sum(len(next(iter(b.values()))) for b in batches if b) < 2:
        return {}
    if inputs and len(constant_outputs(inputs)) == len(inputs[0]):
        return {}  # the same input every time: nothing to vary
    out = {}
    for name in batches[0]:
        rows = [_rows(b[name]) for b in batches if name in b]
        first = rows[0][0]
        if not first.size or not np.isfinite(first).all():
            continue
        tol = 1e-6 * max(max(float(np.abs(r).max()) if r.size else 0.0 for r in rows), 1.0)
        flat = float(np.ptp(first)) <= tol  # one value throughout, whatever the shape

        def same(r: np.ndarray, first=first, tol=tol, flat=flat) -> bool:
            if r.shape[1:] == first.shape:
                return bool(np.all(np.abs(r - first) <= tol))
            return flat and bool(np.all(np.abs(r - first[0]) <= tol))  # e.g. another seq len

        if not all(same(r) for r in rows):
            continue
        if flat:
            value = float(first[0])
            out[name] = "all zeros" if value == 0 else f"always {value:.6g}"
        else:
            out[name] = "the same array for every input"
    return out


def _check(op: OutputParity, tol: Tolerance) -> list[str]:
    bad = []
    if op.nonfinite:
        bad.append(f"{op.name}: {op.nonfinite} NaN/inf values")
    if op.mean_cosine < tol.min_mean_cosine:
        bad.append(f"{op.name}: mean cosine {op.mean_cosine:.6f} < {tol.min_mean_cosine}")
    if op.min_cosine < tol.min_cosine:
        bad.append(f"{op.name}: min cosine {op.min_cosine:.6f} < {tol.min_cosine}")
    if tol.rel_atol is not None and op.max_abs_diff > tol.rel_atol * op.scale:
        bad.append(
            f"{op.name}: max abs diff {op.max_abs_diff:.3g} > {tol.rel_atol} x scale {op.scale:.3g}"
        )
    if (
        tol.min_argmax_agreement is not None
        and op.argmax_agreement is not None
        and op.argmax_agreement < tol.min_argmax_agreement
    ):
        bad.append(
            f"{op.name}: argmax agreement {op.argmax_agreement:.4f} < {tol.min_argmax_agreement}"
        )
    return bad
