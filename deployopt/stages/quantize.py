"""INT8 quantization with onnxruntime: dynamic (weights int8, activations at run time) and
static QDQ with calibration and an accuracy-holding configuration search.

References: onnxruntime quantization docs ("Quantize ONNX models"), method choice and the
``DefaultTensorType`` extra option needed on graphs whose fused ops lack type information.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from deployopt.candidates import QuantRecipe
from deployopt.errors import StageError, UsageError
from deployopt.inputs import Batch, count_samples
from deployopt.parity import INT8, Tolerance, compare
from deployopt.stages.base import MODEL_FILE, Context, StageOutput

CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
LINEAR_OPS = ("MatMul", "Gemm", "Conv")


@contextlib.contextmanager
def _quiet():
    """onnxruntime.quantization logs advice on every call; keep the terminal for our progress."""
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # numpy overflow chatter from histogram calibration
            yield
    finally:
        logger.setLevel(level)


class DynamicQuantStage:
    """Weights int8 ahead of time, activations quantized at run time, as one
    :class:`~deployopt.candidates.QuantRecipe` says: parent graph, per-channel, reduce-range,
    weight type, op set, and for mixed precision the most error-prone MatMuls kept fp32.
    Per-channel is the plain recipe: on all-MiniLM-L6-v2, per-tensor gave mean cosine 0.963,
    per-channel 0.993. Gather quantizes embedding tables: 59 -> 23 MB for mean cosine
    0.99317 -> 0.99293 (measured on the bundled evaluation set)."""

    name: ClassVar[str] = "int8-dynamic"
    version: ClassVar[int] = 3
    tolerance = INT8

    def __init__(self, recipe: QuantRecipe | None = None):
        self.recipe = recipe or QuantRecipe("dynamic")
        if self.recipe.kind != "dynamic":
            raise ValueError("DynamicQuantStage takes a dynamic recipe")
        self.label = self.recipe.name
        self.parent = (self.recipe.parent,)

    def params(self) -> dict[str, Any]:
        return self.recipe.params()

    def skip_reason(self, src: Path, ctx: Context) -> str | None:
        ops = self.recipe.op_types
        if weighted_nodes(src, ops):
            return None
        # a variant identical to its parent would be listed as an int8 model that is not one
        return (
            f"nothing to quantize: no {', '.join(ops)} node with a constant weight (dynamic int8 "
            "covers those; a convolutional model is quantized by int8-static with --calibration)"
        )

    def apply(self, src: Path, out_dir: Path, ctx: Context) -> StageOutput:
        import onnx
        from onnxruntime.quantization import quantize_dynamic

        r = self.recipe
        exclude: list[str] = []
        if r.fp32_matmuls:
            ranking = matmul_ranking(src, ctx, r)
            exclude = [name for name, _ in ranking[: r.fp32_matmuls]]
        metrics: dict[str, Any] = {}
        if exclude:
            metrics["fp32_nodes"] = list(exclude)
            # the quantizer first rewrites Gemm as MatMul + Add, named "<gemm>_MatMul"
            gemms = {
                n.name
                for n in onnx.load(str(src), load_external_data=False).graph.node
                if n.op_type == "Gemm"
            }
            exclude += [f"{name}_MatMul" for name in exclude if name in gemms]
        src = weights_as_initializers(src, out_dir)
        if r.split_skip_layernorm:
            from deployopt.stages.fuse import split_skip_layernorm

            model = onnx.load(str(src))
            metrics["split_skip_layernorm"] = split_skip_layernorm(model)
            src = out_dir / ".split.onnx"  # a scratch file: the runner removes it
            onnx.save_model(model, str(src))
        with _quiet():
            quantize_dynamic(
                str(src),
                str(out_dir / MODEL_FILE),
                per_channel=r.per_channel,
                reduce_range=r.reduce_range,
                weight_type=_quant_type(r.weight_type),
                op_types_to_quantize=list(r.op_types),
                nodes_to_exclude=exclude,
                # fused contrib ops carry no type info; without this the quantizer fails on them
                extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
            )
        metrics["quantized_nodes"] = _count_quantized(out_dir / MODEL_FILE)
        return StageOutput(metrics=metrics)


def _quant_type(name: str):
    from onnxruntime.quantization import QuantType

    return {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}[name]


def matmul_ranking(src: Path, ctx: Context, r: QuantRecipe):
    """The weighted MatMuls of ``src`` ranked by their quantization error (most first),
    computed once per (model, weight scheme) in a worker process and shared by the run."""
    key = ("matmul_ranking", str(src), r.per_channel, r.reduce_range, r.weight_type)
    if key not in ctx.cache:
        ctx.log(f"{r.name}: ranking MatMuls by quantization error")
        ctx.cache[key] = ctx.isolated(
            matmul_sensitivity,
            src,
            ctx.calibration[:8],
            r.per_channel,
            r.reduce_range,
            r.weight_type,
            label=f"{r.name} sensitivity",
        )
    return ctx.cache[key]


def matmul_sensitivity(
    src: Path,
    batches: list[Batch],
    per_channel: bool = True,
    reduce_range: bool = False,
    weight_type: str = "int8",
    max_rows: int = 4096,
) -> list[tuple[str, float]]:
    """Rank MatMul/Gemm nodes with a constant weight by the relative squared error that dynamic
    quantization adds to their output, ``||XW - q(X)q(W)||^2 / ||XW||^2``, with X the node's
    activations on ``batches`` (run on the fp32 graph; per-batch uint8 like onnxruntime's
    DynamicQuantizeLinear) and W quantized as the recipe does. Most error-prone first.

    A local error, not the model's: cheap (one fp32 run) and, on all-MiniLM-L6-v2, keeping the
    top quarter fp32 raised the worst sample's cosine from 0.977 to 0.990."""
    import onnx
    from onnx import numpy_helper

    from deployopt.runtime.session import intermediate_tensors

    model = onnx.load(str(src))
    inits = {i.name: i for i in model.graph.initializer}
    nodes = [
        n
        for n in model.graph.node
        if n.op_type in ("MatMul", "Gemm") and len(n.input) > 1 and n.input[1] in inits
    ]
    nodes = [n for n in nodes if not _gemm_attr(n, "transA")]

    def rows(_name: str, a) -> np.ndarray:
        a = np.asarray(a, dtype=np.float32)
        return a.reshape(-1, a.shape[-1])[:max_rows]

    acts = intermediate_tensors(model, [n.input[0] for n in nodes], batches, reduce=rows)
    out = []
    for n in nodes:
        w = numpy_helper.to_array(inits[n.input[1]]).astype(np.float32)
        if w.ndim != 2 or n.input[0] not in acts:
            continue
        if _gemm_attr(n, "transB"):
            w = w.T  # [out, in] -> [in, out]: scales stay per output channel
        wq = _fake_quant_weight(w, per_channel, reduce_range, weight_type)
        num = den = 0.0
        for x in acts[n.input[0]]:
            y = x @ w
            d = y - _fake_quant_uint8(x) @ wq
            num += float((d * d).sum())
            den += float((y * y).sum())
        out.append((n.name, num / den if den else 0.0))
    return sorted(out, key=lambda t: -t[1])


def _gemm_attr(node, name: str) -> bool:
    return node.op_type == "Gemm" and any(a.name == name and a.i for a in node.attribute)


def _fake_quant_uint8(x: np.ndarray) -> np.ndarray:
    """Asymmetric per-tensor uint8 over x's range (zero included), back to float."""
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    if hi == lo:
        return x
    scale = (hi - lo) / 255.0
    zp = np.round(-lo / scale)
    return (np.clip(np.round(x / scale) + zp, 0, 255) - zp) * scale


def _fake_quant_weight(w: np.ndarray, per_channel: bool, reduce_range: bool, wtype: str):
    """Weights as onnxruntime's dynamic quantizer stores them: int8 symmetric, or uint8
    asymmetric; 7 bits with ``reduce_range``; one scale per output column when per-channel."""
    axis = 0 if per_channel else None
    if wtype == "int8":
        qmax = 63.0 if reduce_range else 127.0
        scale = np.abs(w).max(axis=axis, keepdims=True) / qmax
        scale = np.where(scale == 0, 1.0, scale)
        return np.clip(np.round(w / scale), -qmax, qmax) * scale
    levels = 127.0 if reduce_range else 255.0
    lo = np.minimum(w.min(axis=axis, keepdims=True), 0.0)
    hi = np.maximum(w.max(axis=axis, keepdims=True), 0.0)
    scale = np.where(hi == lo, 1.0, (hi - lo) / levels)
    zp = np.round(-lo / scale)
    return (np.clip(np.round(w / scale) + zp, 0, levels) - zp) * scale


QDQ_MIN_OPSET = 13  # per-channel DequantizeLinear (its axis attribute) needs opset 13


def weights_as_initializers(src: Path, out_dir: Path, min_opset: int | None = None) -> Path:
    """``src``, or a scratch copy in ``out_dir`` (the runner removes it) that the quantizer can
    work on: Constant-node weights of MatMul/Gemm/Conv made initializers (the quantizer looks
    for weights there only), and, with ``min_opset``, a default-domain opset under it converted
    (static per-channel QDQ weights need 13; onnxruntime rejects the quantized model otherwise).
    Parity against the fp32 model judges the result, conversion included."""
    import onnx

    from deployopt.graphs import constant_weights_to_initializers

    model = onnx.load(str(src), load_external_data=False)
    moved = constant_weights_to_initializers(model.graph, LINEAR_OPS)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    upgrade = min_opset is not None and opset is not None and opset < min_opset
    if not moved and not upgrade:
        return src
    onnx.load_external_data_for_model(model, str(src.parent))
    if upgrade:
        from onnx import version_converter

        model = version_converter.convert_version(model, min_opset)
    scratch = out_dir / ".weights.onnx"
    onnx.save_model(model, str(scratch))
    return scratch


def weighted_nodes(path: Path, op_types: tuple[str, ...]) -> int:
    """Nodes of ``op_types`` (subgraphs included) with an initializer among their inputs."""
    import onnx

    from deployopt.graphs import all_nodes

    m = onnx.load(str(path), load_external_data=False)
    consts = {i.name for i in m.graph.initializer}
    consts |= {o for n in all_nodes(m.graph) if n.op_type == "Constant" for o in n.output}
    return sum(
        1 for n in all_nodes(m.graph) if n.op_type in op_types and consts.intersection(n.input)
    )


def _count_quantized(path: Path) -> int:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    return sum(
        n.op_type
        in (
            "MatMulInteger",
            "ConvInteger",
            "QLinearMatMul",
            "DynamicQuantizeMatMul",
            "MatMulIntegerToFloat",
            "QAttention",
            "QuantizeLinear",
        )
        for n in m.graph.node
    )


@dataclass(frozen=True)
class StaticConfig:
    """One point of the static-quantization search."""

    label: str
    method: str = "minmax"
    per_channel: bool = True
    scope: str = "linear"  # "all": every quantizable op; "linear": MatMul/Gemm/Conv with weights
    exclude_fraction: float = 0.0  # most sensitive quantized nodes left in fp32

    def params(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "per_channel": self.per_channel,
            "scope": self.scope,
            "exclude_fraction": self.exclude_fraction,
        }


def static_search(effort: str, transformer: bool) -> tuple[StaticConfig, ...]:
    """The static search for an effort level. On transformers, quantizing every op and the
    histogram calibrators lose (all-MiniLM-L6-v2: all ops 0.36 mean cosine, percentile 0.83,
    entropy fails, minmax 0.94), so the default effort goes from minmax straight to keeping
    the most sensitive nodes fp32; the exhaustive effort tries everything."""
    if effort == "exhaustive" or (effort == "default" and not transformer):
        return DEFAULT_SEARCH
    keep = [c for c in DEFAULT_SEARCH if c.method == "minmax"]
    if transformer:
        keep = [c for c in keep if c.scope == "linear"]
    if effort == "quick":
        keep = [c for c in keep if c.exclude_fraction in (0.0, 0.25, 0.5)]
    return tuple(keep)


DEFAULT_SEARCH = (
    StaticConfig("all ops, minmax", scope="all"),
    StaticConfig("linear ops, minmax"),
    StaticConfig("linear ops, percentile", method="percentile"),
    StaticConfig("linear ops, entropy", method="entropy"),
    StaticConfig("linear ops, best method, 10% most sensitive nodes fp32", exclude_fraction=0.1),
    StaticConfig("linear ops, best method, 25% most sensitive nodes fp32", exclude_fraction=0.25),
    StaticConfig("linear ops, best method, 50% most sensitive nodes fp32", exclude_fraction=0.5),
)


class StaticQuantStage:
    """QDQ static quantization, searching for a configuration that holds accuracy.

    Each configuration is calibrated on the calibration set and judged on a held-out part of
    it (never on the evaluation set, which stays for the final parity). The search stops at
    the first configuration within tolerance; if none is, the stage fails and reports every
    configuration tried with its measured cosine.
    """

    name: ClassVar[str] = "int8-static"
    version: ClassVar[int] = 2
    tolerance = INT8

    def __init__(
        self,
        methods: Sequence[str] = CALIBRATION_METHODS,
        max_samples: int = 64,
        search: Sequence[StaticConfig] = DEFAULT_SEARCH,
        recipe: QuantRecipe | None = None,
    ):
        self.recipe = recipe or QuantRecipe("static")
        if self.recipe.kind != "static":
            raise ValueError("StaticQuantStage takes a static recipe")
        self.label = self.recipe.name
        self.parent = (self.recipe.parent,)
        bad = [m for m in methods if m not in CALIBRATION_METHODS]
        if bad:
            raise UsageError(
                f"unknown calibration method(s) {bad}",
                hint=f"choose from {', '.join(CALIBRATION_METHODS)}",
            )
        self.methods = tuple(methods)
        self.max_samples = max_samples
        self.search = tuple(c for c in search if c.method in self.methods)

    def params(self) -> dict[str, Any]:
        return {
            **self.recipe.params(),
            "methods": list(self.methods),
            "max_samples": self.max_samples,
            "search": [c.params() for c in self.search],
        }

    def skip_reason(self, src: Path, ctx: Context) -> str | None:
        if not ctx.calibration:
            return "no calibration data (pass --calibration)"
        return None

    def apply(self, src: Path, out_dir: Path, ctx: Context) -> StageOutput:
        from deployopt.runtime.session import model_outputs

        src = weights_as_initializers(src, out_dir, min_opset=QDQ_MIN_OPSET)
        calib, judge = _split(ctx.calibration, self.max_samples)
        calib = uniform_batches(calib)
        ref = ctx.isolated(model_outputs, src, judge, ctx.threads, label=f"{self.label} reference")
        tried: list[dict[str, Any]] = []
        best_method, sensitivity = "minmax", None
        best_method_cos = -2.0
        tmp = out_dir / ".candidate.onnx"
        for cfg in self.search:
            method = cfg.method if cfg.exclude_fraction == 0 else best_method
            exclude: list[str] = []
            if cfg.exclude_fraction:
                if sensitivity is None:
                    ctx.log(f"{self.label}: measuring per-node sensitivity")
                    sensitivity = ctx.isolated(
                        node_sensitivity, src, calib, label=f"{self.label} sensitivity"
                    )
                k = max(1, int(round(cfg.exclude_fraction * len(sensitivity))))
                exclude = [name for name, _ in sensitivity[:k]]
            ctx.log(f"{self.label}: trying {cfg.label}")
            try:
                cand = ctx.isolated(
                    quantize_static_and_run,
                    src,
                    tmp,
                    calib,
                    method,
                    cfg,
                    exclude,
                    self.recipe,
                    judge,
                    ctx.threads,
                    label=f"{self.label} {cfg.label}",
                )
            except StageError as e:
                tried.append({**cfg.params(), "method": method, "error": str(e)})
                ctx.log(f"{self.label}:   {e}")
                continue
            rep = compare(ref, cand, self.tolerance)
            s = rep.summary()
            tried.append(
                {
                    **cfg.params(),
                    "method": method,
                    "excluded_nodes": len(exclude),
                    "mean_cosine": round(s["mean_cosine"], 6),
                    "min_cosine": round(s["min_cosine"], 6),
                    "passed": rep.passed,
                }
            )
            ctx.log(
                f"{self.label}:   mean cosine {s['mean_cosine']:.5f}, min {s['min_cosine']:.5f}"
            )
            if (
                cfg.scope == "linear"
                and cfg.exclude_fraction == 0
                and s["mean_cosine"] > best_method_cos
            ):
                best_method, best_method_cos = method, s["mean_cosine"]
            if rep.passed:
                tmp.replace(out_dir / MODEL_FILE)
                return StageOutput(
                    metrics={
                        "search": tried,
                        "calibration_samples": count_samples(calib),
                        "search_samples": count_samples(judge),
                        "fp32_nodes": exclude,
                    },
                    chosen={**cfg.params(), "method": method},
                )
        tmp.unlink(missing_ok=True)
        lines = "; ".join(
            f"{t['scope']}/{t['method']}/excl {t.get('excluded_nodes', 0)}: "
            + (f"mean cos {t['mean_cosine']}" if "mean_cosine" in t else t.get("error", "?"))
            for t in tried
        )
        raise SearchFailed(
            f"no static configuration met {self.tolerance.describe()} ({lines})", tried
        )


class SearchFailed(StageError):
    def __init__(self, message: str, tried: list[dict[str, Any]]):
        super().__init__(message)
        self.tried = tried


def _split(batches: list[Batch], max_samples: int) -> tuple[list[Batch], list[Batch]]:
    """Calibrate on the first part (<= max_samples), judge the search on the last quarter."""
    if len(batches) < 2:
        return batches, batches
    n_judge = max(1, len(batches) // 4)
    calib, judge = batches[:-n_judge], batches[-n_judge:]
    kept, total = [], 0
    for b in calib:
        if total >= max_samples:
            break
        kept.append(b)
        total += len(next(iter(b.values())))
    return kept, judge


def uniform_batches(batches: list[Batch]) -> list[Batch]:
    """Same shape for every batch: histogram calibrators stack all batches of a tensor.

    Drops a smaller last batch, pads every non-batch axis with zeros to the largest size
    (zero is the pad token id, attention mask and token type of BERT-style tokenizers).
    """
    if len(batches) > 1:
        first = len(next(iter(batches[0].values())))
        batches = [b for b in batches if len(next(iter(b.values()))) == first]
    out = []
    for name in batches[0] if batches else []:
        target = np.max([b[name].shape for b in batches], axis=0)
        for i, b in enumerate(batches):
            pad = [(0, int(t - s)) for t, s in zip(target, b[name].shape)]
            if i == len(out):
                out.append({})
            out[i][name] = np.pad(b[name], pad) if any(p[1] for p in pad) else b[name]
    return out


class _Reader:
    """onnxruntime CalibrationDataReader over in-memory batches."""

    def __init__(self, batches: list[Batch], input_names: set[str]):
        self._it = iter([{k: v for k, v in b.items() if k in input_names} for b in batches])

    def get_next(self):
        return next(self._it, None)


def _weighted_linear_nodes(model) -> list[str]:
    inits = {i.name for i in model.graph.initializer}
    return [
        n.name
        for n in model.graph.node
        if n.op_type in LINEAR_OPS and any(i in inits for i in n.input[1:2])
    ]


def _quantize_static(
    src: Path,
    dst: Path,
    calib: list[Batch],
    method: str,
    cfg: StaticConfig,
    exclude: list[str],
    recipe: QuantRecipe,
) -> None:
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    model = onnx.load(str(src), load_external_data=False)
    inputs = {i.name for i in model.graph.input}
    nodes = _weighted_linear_nodes(model) if cfg.scope == "linear" else None
    methods = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }
    try:
        with _quiet():
            quantize_static(
                str(src),
                str(dst),
                _Reader(calib, inputs),
                quant_format=QuantFormat.QOperator
                if recipe.quant_format == "qoperator"
                else QuantFormat.QDQ,
                activation_type=QuantType.QUInt8,
                weight_type=_quant_type(recipe.weight_type),
                per_channel=cfg.per_channel and recipe.per_channel,
                reduce_range=recipe.reduce_range,
                calibrate_method=methods[method],
                nodes_to_quantize=nodes,
                nodes_to_exclude=exclude,
                extra_options={
                    "DefaultTensorType": onnx.TensorProto.FLOAT,
                    "MatMulConstBOnly": recipe.matmul_const_b_only,
                    "ActivationSymmetric": recipe.activation_symmetric,
                    # Memory is bounded by max_samples and the token limit, not by
                    # CalibMaxIntermediateOutputs: onnxruntime drops the collected data when
                    # that bound is reached instead of reducing it.
                    "CalibPercentile": 99.99,
                },
            )
    except Exception as e:  # onnxruntime raises assorted internal errors
        raise StageError(f"static quantization failed: {str(e).splitlines()[0][:200]}") from e


def quantize_static_and_run(
    src: Path,
    dst: Path,
    calib: list[Batch],
    method: str,
    cfg: StaticConfig,
    exclude: list[str],
    recipe: QuantRecipe,
    judge: list[Batch],
    threads: int | None,
):
    """One point of the static search, for a worker process: calibrate and quantize (the
    calibrator runs onnxruntime on the model), then the candidate's outputs on ``judge``."""
    from deployopt.runtime.session import model_outputs

    _quantize_static(src, dst, calib, method, cfg, exclude, recipe)
    return model_outputs(dst, judge, threads)


def node_sensitivity(src: Path, calib: list[Batch]) -> list[tuple[str, float]]:
    """Rank weighted linear nodes by the error that 8-bit per-tensor quantization of their
    activation input adds, measured on the fp32 graph: ||x - qdq(x)||^2 / ||x||^2 with the
    calibration min/max. Long-tailed inputs (GELU outputs, LayerNorm outlier features) rank
    first. Most sensitive first."""
    import onnx

    from deployopt.runtime.session import intermediate_tensors

    model = onnx.load(str(src))
    linear = set(_weighted_linear_nodes(model))
    act = {n.name: n.input[0] for n in model.graph.node if n.name in linear}

    def flat(_name: str, a) -> np.ndarray:
        return np.asarray(a, dtype=np.float32).ravel()

    values = intermediate_tensors(model, list(act.values()), calib, reduce=flat)
    err = {t: _qdq_error(np.concatenate(v)) for t, v in values.items()}
    return sorted(((n, err.get(t, 0.0)) for n, t in act.items()), key=lambda x: -x[1])


def _qdq_error(x: np.ndarray) -> float:
    """Relative squared error of asymmetric uint8 per-tensor quantization over x's range."""
    d = x - _fake_quant_uint8(x)
    denom = float(np.dot(x, x))
    return float(np.dot(d, d) / denom) if denom else 0.0


__all__ = [
    "DynamicQuantStage",
    "StaticQuantStage",
    "StaticConfig",
    "SearchFailed",
    "Tolerance",
    "matmul_sensitivity",
]
