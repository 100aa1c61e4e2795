"""Candidate generation and the session search's pure parts, on faked CPU descriptors: what is
proposed depends on the CPU; which candidate wins is never decided here."""

from __future__ import annotations

import pytest

from deployopt.candidates import ModelFacts, QuantRecipe, mixed_counts, quant_candidates
from deployopt.hardware import CpuDescriptor, parse_cpuinfo
from deployopt.presets import Target
from deployopt.tuning import alternatives, describe, pick_session, thread_options

AVX2 = CpuDescriptor(model="EPYC avx2", arch="x86_64", cores=2, features=("avx2", "fma"))
VNNI = CpuDescriptor(
    model="Xeon", arch="x86_64", cores=2, features=("avx2", "avx512f", "avx512_vnni", "amx_int8")
)
ARM = CpuDescriptor(model="Neoverse", arch="aarch64", cores=4, features=("neon", "dotprod", "i8mm"))
BERT = ModelFacts(transformer=True, fused_attention=True, weighted_matmuls=36, has_gather=True)
MLP = ModelFacts(weighted_matmuls=2)


def names(recipes):
    return [r.name for r in recipes]


def test_cpuinfo_parsing_x86_and_arm():
    x86 = "processor : 0\nmodel name : AMD EPYC\nflags : fpu sse2 avx2 fma avx512f avx512_vnni\n"
    cpu = parse_cpuinfo(x86 + x86.replace("0", "1"), "x86_64", 2)
    assert cpu.model == "AMD EPYC" and cpu.cores == 2
    assert cpu.features == ("avx2", "fma", "avx512f", "avx512_vnni") and cpu.int8_dot
    arm = "processor : 0\nFeatures : fp asimd evtstrm asimddp sve i8mm\nCPU part : 0xd40\n"
    a = parse_cpuinfo(arm, "aarch64", 8)
    assert a.features == ("neon", "dotprod", "i8mm", "sve") and a.int8_dot
    old = parse_cpuinfo("model name : Old\nflags : sse2 avx avx2\n", "x86_64", 2)
    assert old.features == ("avx2",) and not old.int8_dot
    assert parse_cpuinfo("", "x86_64", 1).features == ()
    assert AVX2.to_json()["int8_dot"] is False and VNNI.to_json()["features"][-1] == "amx_int8"


def test_reduce_range_and_u8u8_always_tried_without_vnni():
    got = quant_candidates(BERT, AVX2)
    rr = [r for r in got if r.reduce_range]
    assert {r.name for r in rr} >= {
        "int8-dynamic/reduce-range",
        "int8-dynamic/fused/reduce-range",
        "int8-static/reduce-range",
    }
    assert "int8-dynamic/u8u8" in names(got)
    # mixed precision on such a CPU builds on the safe weights
    assert all(r.reduce_range for r in got if r.fp32_matmuls)
    for fx in (MLP, BERT):
        for effort in ("quick", "default", "exhaustive"):
            assert any(r.reduce_range for r in quant_candidates(fx, AVX2, effort)), (fx, effort)


def test_vnni_cpus_get_no_reduce_range_by_default():
    for cpu in (VNNI, ARM):
        got = quant_candidates(BERT, cpu)
        assert not any(r.reduce_range or r.weight_type == "uint8" for r in got), names(got)
        assert names(got)[:3] == [
            "int8-dynamic",
            "int8-dynamic/fused",
            "int8-dynamic/fused/split-ln",
        ]
    # the exhaustive search still covers them
    ex = quant_candidates(BERT, VNNI, "exhaustive")
    assert {"int8-dynamic/reduce-range", "int8-dynamic/u8u8", "int8-dynamic/per-tensor"} <= set(
        names(ex)
    )


def test_fused_parent_only_where_attention_fused():
    unfused = ModelFacts(transformer=True, fused_attention=False, weighted_matmuls=36)
    assert not any(r.parent == "fuse" for r in quant_candidates(unfused, VNNI, "exhaustive"))
    fused = [r for r in quant_candidates(BERT, VNNI) if r.parent == "fuse"]
    assert [r.name for r in fused] == ["int8-dynamic/fused", "int8-dynamic/fused/split-ln"]
    assert all("Attention" in r.op_types for r in fused)  # QAttention
    assert [r.split_skip_layernorm for r in fused] == [False, True]


def test_effort_levels_and_names_are_unique():
    quick = quant_candidates(BERT, VNNI, "quick")
    assert names(quick) == ["int8-dynamic", "int8-static"]
    assert names(quant_candidates(BERT, AVX2, "quick")) == [
        "int8-dynamic/reduce-range",
        "int8-static/reduce-range",
    ]
    sizes = [len(quant_candidates(BERT, AVX2, e)) for e in ("quick", "default", "exhaustive")]
    assert sizes[0] < sizes[1] < sizes[2]
    for e in ("quick", "default", "exhaustive"):
        got = quant_candidates(BERT, AVX2, e)
        assert len(set(names(got))) == len(got)
        assert all(r.why for r in got)
    only_dynamic = quant_candidates(BERT, VNNI, kinds=("dynamic",))
    assert all(r.kind == "dynamic" for r in only_dynamic)
    with pytest.raises(ValueError, match="effort must be one of"):
        quant_candidates(BERT, VNNI, "fast")


def test_mixed_precision_counts():
    assert mixed_counts(36, "default") == [9, 18]
    assert mixed_counts(36, "exhaustive") == [4, 9, 14, 18]
    assert mixed_counts(3, "default") == [] and mixed_counts(36, "quick") == []
    got = quant_candidates(BERT, VNNI)
    assert [r.fp32_matmuls for r in got if r.fp32_matmuls] == [9, 18]
    assert "int8-dynamic/mixed-9" in names(got)
    assert not any(r.fp32_matmuls for r in quant_candidates(MLP, VNNI))


def test_recipe_params_identify_the_model_not_the_commentary():
    a = QuantRecipe("dynamic", why="one reason")
    b = QuantRecipe("dynamic", why="another")
    assert a.params() == b.params() and "why" not in a.params()
    assert "quant_format" not in a.params() and "fp32_matmuls" not in QuantRecipe("static").params()
    assert QuantRecipe("static", quant_format="qoperator", activation_symmetric=True).name == (
        "int8-static/qoperator/symmetric"
    )
    assert QuantRecipe("dynamic", op_types=("MatMul",), per_channel=False).name == (
        "int8-dynamic/per-tensor/no-gather"
    )


def test_thread_options():
    assert thread_options(1) == [] and thread_options(2) == [1]
    assert thread_options(4) == [1, 2, 3]
    assert thread_options(16) == [1, 4, 8]
    assert thread_options(16, "exhaustive") == [1, 2, 3, 4, 5, 6, 7, 8]


def test_session_alternatives_respect_what_the_target_sets():
    base = Target(name="cpu", ep="cpu")
    assert set(alternatives("threads", base, base, 2)) == {"threads=1"}
    assert alternatives("spinning", base, base, 2)["spinning=off"].session_config == {
        "session.intra_op.allow_spinning": "0"
    }
    assert "SkipLayerNormFusion=off" in alternatives("skip-layernorm", base, base, 2)
    assert alternatives("skip-layernorm", base, base, 2, has_layernorm=False) == {}
    ext = alternatives("graph-optimization", base, base, 2)["graph_optimization=extended"]
    assert ext.graph_optimization == "extended"
    # the user's own thread count and entries are never searched over; nor a GPU target
    fixed = Target(
        name="t", ep="cpu", threads=2, session_config={"session.intra_op.allow_spinning": "1"}
    )
    assert alternatives("threads", fixed, fixed, 2) == {}
    assert alternatives("spinning", fixed, fixed, 2) == {}
    assert (
        alternatives("threads", Target(name="g", ep="cuda"), Target(name="g", ep="cuda"), 2) == {}
    )
    # one thread: spinning cannot matter
    one = base.model_copy(update={"threads": 1})
    assert alternatives("spinning", one, base, 2) == {}


def test_describe_and_pick():
    base = Target(name="cpu", ep="cpu")
    tuned = base.model_copy(
        update={
            "threads": 1,
            "session_config": {
                "session.intra_op.allow_spinning": "0",
                "optimization.disable_specified_optimizers": "SkipLayerNormFusion",
            },
        }
    )
    assert describe(tuned, base) == "threads=1, spinning=off, SkipLayerNormFusion=off"
    assert describe(base, base) == "default"
    assert pick_session({"current": 10.0, "x": 9.8}, baseline="current") == "current"
    assert pick_session({"current": 10.0, "x": 9.0, "y": 9.5}, baseline="current") == "x"
