import numpy as np
import pytest

from deployopt.parity import EXACT, INT8, Tolerance, compare


def batches(arrs, name="y"):
    return [{name: a} for a in arrs]


def test_identical_outputs_pass_with_cosine_one():
    a = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
    rep = compare(batches([a]), batches([a.copy()]), EXACT)
    assert rep.passed
    s = rep.summary()
    assert s["mean_cosine"] == pytest.approx(1.0, abs=1e-12)
    assert s["max_abs_diff"] == 0.0
    assert s["samples"] == 4


def test_cosine_and_max_abs_match_hand_computation():
    ref = np.array([[1.0, 0.0], [0.0, 2.0]])
    cand = np.array([[1.0, 1.0], [0.0, 2.0]])
    rep = compare(batches([ref]), batches([cand]), Tolerance(min_mean_cosine=0.9))
    out = rep.outputs[0]
    assert out.min_cosine == pytest.approx(1 / np.sqrt(2))
    assert out.mean_cosine == pytest.approx((1 / np.sqrt(2) + 1) / 2)
    assert out.max_abs_diff == pytest.approx(1.0)
    assert not rep.passed
    assert "mean cosine 0.853553 < 0.9" in rep.failures[0]


def test_nan_in_candidate_fails_and_is_counted():
    ref = np.ones((2, 3), np.float32)
    cand = ref.copy()
    cand[0, 1] = np.nan
    cand[1, 2] = np.inf
    rep = compare(batches([ref]), batches([cand]), Tolerance())
    assert rep.outputs[0].nonfinite == 2
    assert any("2 NaN/inf" in f for f in rep.failures)


def test_abs_tolerance_is_relative_to_output_scale():
    ref = np.full((2, 4), 100.0)
    cand = ref + 0.005  # 5e-5 of scale 100
    assert compare(batches([ref]), batches([cand]), Tolerance(rel_atol=1e-4)).passed
    cand = ref + 0.02  # 2e-4 of scale
    rep = compare(batches([ref]), batches([cand]), Tolerance(rel_atol=1e-4))
    assert not rep.passed and "max abs diff" in rep.failures[0]


def test_argmax_agreement_for_classifiers():
    ref = np.array([[2.0, 1.0], [0.0, 1.0], [3.0, 0.0], [0.0, 5.0]])
    cand = np.array([[1.0, 2.0], [0.0, 1.0], [3.0, 0.0], [0.0, 5.0]])  # first flips
    rep = compare(
        batches([ref], "logits"), batches([cand], "logits"), INT8, classifier_outputs=("logits",)
    )
    assert rep.outputs[0].argmax_agreement == pytest.approx(0.75)
    assert any("argmax agreement 0.7500 < 0.95" in f for f in rep.failures)


def test_shape_mismatch_is_a_failure_not_a_crash():
    rep = compare(batches([np.ones((2, 3))]), batches([np.ones((2, 4))]), Tolerance())
    assert not rep.passed and "shape" in rep.failures[0]


def test_every_failing_output_is_listed():
    ref = [{"a": np.ones((2, 2)), "b": np.ones((2, 2))}]
    cand = [{"a": -np.ones((2, 2)), "b": -np.ones((2, 2))}]
    rep = compare(ref, cand, Tolerance(min_mean_cosine=0.5))
    assert {f.split(":")[0] for f in rep.failures} == {"a", "b"}
