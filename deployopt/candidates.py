"""Which quantization recipes to try: a pure function of the model's facts, the target's CPU and
the search effort. Which one ships is decided later, by parity and by measurement on the target.

Each recipe becomes one candidate variant with a readable name: ``int8-dynamic`` is the plain
recipe (per-channel int8 weights of the fp32 graph), and tags say how another one differs:
``int8-dynamic/fused`` (quantizes the fused graph), ``/reduce-range`` (7-bit weights),
``/u8u8`` (uint8 weights), ``/per-tensor``, ``/no-gather`` (embeddings left fp32),
``/mixed-9`` (the 9 most error-prone MatMuls kept fp32); ``int8-static`` likewise with
``/qoperator``, ``/const-b``, ``/symmetric``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from deployopt.hardware import CpuDescriptor

EFFORTS = ("quick", "default", "exhaustive")
DYNAMIC_OPS = ("MatMul", "Gemm", "Gather")
# Mixed precision: shares of the weighted MatMuls kept fp32, most error-prone first. On
# all-MiniLM-L6-v2 (36 weighted MatMuls) 4, 9 and 18 kept fp32 gave min cosine 0.984, 0.990 and
# 0.998 against 0.977 for none (measured on the bundled evaluation set, AMD EPYC, VNNI).
MIXED_SHARES = {"quick": (), "default": (0.25, 0.5), "exhaustive": (0.125, 0.25, 0.375, 0.5)}
SCREEN_KEEP = {"quick": 0, "default": 3, "exhaustive": 5}  # fully measured after screening
SESSION_MODELS = {"quick": 1, "default": 2, "exhaustive": 3}  # session search: winner + runners-up


@dataclass(frozen=True)
class ModelFacts:
    """What the candidate generator needs to know of the model."""

    transformer: bool = False
    fused_attention: bool = False  # the fuse variant exists and fused attention
    weighted_matmuls: int = 0  # MatMul/Gemm nodes with a constant weight (mixed precision)
    has_gather: bool = False  # embedding tables a dynamic recipe may quantize


@dataclass(frozen=True)
class QuantRecipe:
    """One quantization candidate. ``kind`` is ``dynamic`` or ``static``."""

    kind: str
    parent: str = "fp32"  # "fp32" or "fuse"
    per_channel: bool = True
    reduce_range: bool = False
    weight_type: str = "int8"  # "int8" (u8s8 kernels) or "uint8" (u8u8)
    op_types: tuple[str, ...] = DYNAMIC_OPS
    fp32_matmuls: int = 0  # mixed precision: the most error-prone weighted MatMuls kept fp32
    split_skip_layernorm: bool = False  # fused parent: SkipLayerNormalization back to Add + LN
    quant_format: str = "qdq"  # static: "qdq" or "qoperator"
    matmul_const_b_only: bool = False  # static: quantize only MatMuls with a constant weight
    activation_symmetric: bool = False  # static
    why: str = ""  # why the generator proposed it

    @property
    def stage(self) -> str:
        return f"int8-{self.kind}"

    @property
    def name(self) -> str:
        tags = []
        if self.parent == "fuse":
            tags.append("fused")
        if self.kind == "static":
            if self.quant_format == "qoperator":
                tags.append("qoperator")
            if self.matmul_const_b_only:
                tags.append("const-b")
            if self.activation_symmetric:
                tags.append("symmetric")
        if not self.per_channel:
            tags.append("per-tensor")
        if self.reduce_range:
            tags.append("reduce-range")
        if self.weight_type == "uint8":
            tags.append("u8u8")
        if self.kind == "dynamic" and not {"Gather", "EmbedLayerNormalization"} & set(
            self.op_types
        ):
            tags.append("no-gather")
        if self.split_skip_layernorm:
            tags.append("split-ln")
        if self.fp32_matmuls:
            tags.append(f"mixed-{self.fp32_matmuls}")
        return "/".join([self.stage, *tags])

    def params(self) -> dict[str, Any]:
        """What identifies the built model (``why`` is commentary, not a parameter)."""
        d = asdict(self)
        d.pop("why")
        d["op_types"] = list(self.op_types)
        if self.kind == "dynamic":
            for k in ("quant_format", "matmul_const_b_only", "activation_symmetric"):
                d.pop(k)
        else:
            d.pop("fp32_matmuls")
            d.pop("op_types")
            d.pop("split_skip_layernorm")
        return d


def quant_candidates(
    facts: ModelFacts,
    cpu: CpuDescriptor,
    effort: str = "default",
    kinds: Sequence[str] = ("dynamic", "static"),
) -> list[QuantRecipe]:
    """The recipes to build and prove, plain recipe first, duplicates removed.

    Derived from the CPU: without an int8 dot-product instruction (VNNI, AMX, Arm dotprod),
    reduce-range and u8u8 recipes are always tried, since u8s8 kernels can saturate there.
    """
    if effort not in EFFORTS:
        raise ValueError(f"effort must be one of {', '.join(EFFORTS)}")
    out: list[QuantRecipe] = []
    if "dynamic" in kinds:
        out += _dynamic(facts, cpu, effort)
    if "static" in kinds:
        out += _static(facts, cpu, effort)
    seen: dict[str, QuantRecipe] = {}
    for r in out:
        seen.setdefault(r.name, r)
    return list(seen.values())


def _dynamic(facts: ModelFacts, cpu: CpuDescriptor, effort: str) -> list[QuantRecipe]:
    ops = DYNAMIC_OPS if facts.has_gather or effort != "exhaustive" else ("MatMul", "Gemm")
    base = QuantRecipe("dynamic", op_types=ops, why="per-channel int8 weights of the fp32 graph")
    saturating = not cpu.int8_dot
    rr_why = "no VNNI-class int8 dot product: 7-bit weights avoid u8s8 saturation"
    out = [base]
    if saturating:
        out.append(replace(base, reduce_range=True, why=rr_why))
    if effort == "quick":
        return out[-1:] if saturating else out  # one recipe, the safe one for this CPU
    parents = ["fp32"]
    if facts.fused_attention:
        parents.append("fuse")
        fused = replace(
            base,
            parent="fuse",
            op_types=(*ops, "Attention"),
            why="int8 of the fused graph, attention as QAttention",
        )
        out.append(fused)
        if saturating:
            out.append(replace(fused, reduce_range=True, why=rr_why))
        out.append(
            replace(
                fused,
                split_skip_layernorm=True,
                why="fused graph with SkipLayerNormalization split back into Add + "
                "LayerNormalization (its CPU kernel can be the slower one)",
            )
        )
    if saturating:
        out.append(replace(base, weight_type="uint8", why="no VNNI: u8u8 kernels do not saturate"))
    if effort == "exhaustive":
        op_sets = (DYNAMIC_OPS, ("MatMul", "Gemm")) if facts.has_gather else (ops,)
        for parent in parents:
            attention = ("Attention",) if parent == "fuse" else ()
            for per_channel in (True, False):
                for rr in (False, True):
                    for wt in ("int8", "uint8"):
                        for op_types in op_sets:
                            out.append(
                                QuantRecipe(
                                    "dynamic",
                                    parent=parent,
                                    per_channel=per_channel,
                                    reduce_range=rr,
                                    weight_type=wt,
                                    op_types=(*op_types, *attention),
                                    why="exhaustive search",
                                )
                            )
    mixed_base = replace(base, reduce_range=saturating)
    for n in mixed_counts(facts.weighted_matmuls, effort):
        out.append(
            replace(
                mixed_base,
                fp32_matmuls=n,
                why=f"mixed precision: the {n} most error-prone MatMuls kept fp32",
            )
        )
    return out


def mixed_counts(weighted_matmuls: int, effort: str) -> list[int]:
    """How many MatMuls each mixed-precision candidate keeps fp32 (none for small models).

    >>> mixed_counts(36, "default"), mixed_counts(3, "default")
    ([9, 18], [])
    """
    if weighted_matmuls < 4:
        return []
    counts = [max(1, round(s * weighted_matmuls)) for s in MIXED_SHARES[effort]]
    return sorted({c for c in counts if c < weighted_matmuls})


def _static(facts: ModelFacts, cpu: CpuDescriptor, effort: str) -> list[QuantRecipe]:
    base = QuantRecipe(
        "static",
        reduce_range=not cpu.int8_dot,
        why="QDQ, calibrated; the search keeps the most sensitive nodes fp32 as needed",
    )
    out = [base]
    if effort != "exhaustive":
        return out
    for fmt in ("qdq", "qoperator"):
        for const_b in (False, True):
            for sym in (False, True):
                out.append(
                    replace(
                        base,
                        quant_format=fmt,
                        matmul_const_b_only=const_b,
                        activation_symmetric=sym,
                        why="exhaustive search",
                    )
                )
    return out


__all__ = ["EFFORTS", "ModelFacts", "QuantRecipe", "mixed_counts", "quant_candidates"]
