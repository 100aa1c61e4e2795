"""Pruned Hugging Face folders load the way their README.md says (issue 12, finding 8): the
snippet in the folder's README, executed in a fresh interpreter, rebuilds the pruned model and
gives the in-memory pruned model's outputs; plain transformers (without deployopt's import) is
refused as the README says; deployopt's own loader reads new and old pruned folders."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import deployopt
from deployopt.sources import load_source
from deployopt.torchside import pruning as pr
from tests.models import WORDS, save_tiny_bert

TEXTS = [" ".join(WORDS[i : i + n]) for i, n in ((0, 5), (3, 12), (7, 2))]
IMPORT = "import deployopt.torchside.hf_pruned"

# Runs the README's snippets in a fresh interpreter: first the transformers one without its
# deployopt import (must fail as the README says), then as written; then the
# sentence-transformers one when there is one. Writes what they compute.
RUNNER = r"""
import json, re, sys
import numpy as np, torch
readme, texts, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
blocks = re.findall(r"```python\n(.*?)```", open(readme).read(), re.S)
result = {}
try:
    exec("\n".join(l for l in blocks[0].splitlines() if "deployopt" not in l), {})
    result["without_import"] = "loaded"
except Exception as e:
    result["without_import"] = f"{type(e).__name__}: {e}"
ns = {}
exec(blocks[0], ns)
model, tok = ns["model"], ns["tokenizer"]
result["class"] = type(model).__name__
enc = tok(texts, padding=True, return_tensors="pt")
with torch.no_grad():
    np.save(out + "/hidden.npy", model(**enc).last_hidden_state.numpy())
if len(blocks) > 1:
    ns = {}
    exec(blocks[1], ns)
    np.save(out + "/st.npy", ns["encoder"].encode(texts, convert_to_numpy=True))
json.dump(result, open(out + "/result.json", "w"))
"""


def _bert_with_dead_units(folder: Path) -> Path:
    """The tiny BERT with heads 0, 1 of layer 0 and 20 FFN neurons of layer 1 silenced, so that
    global magnitude pruning removes exactly those: layers end up with different sizes."""
    from transformers import BertModel

    save_tiny_bert(folder)
    model = BertModel.from_pretrained(folder)
    d = model.config.hidden_size // model.config.num_attention_heads
    with torch.no_grad():
        model.encoder.layer[0].attention.output.dense.weight[:, : 2 * d] = 0
        model.encoder.layer[1].output.dense.weight[:, :20] = 0
    model.save_pretrained(folder)
    return folder


def _as_sentence_transformer(folder: Path, dim: int) -> None:
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]))  # fmt: skip
    (folder / "sentence_bert_config.json").write_text('{"max_seq_length": 64}')
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(
        json.dumps({"word_embedding_dimension": dim, "pooling_mode_mean_tokens": True})
    )


def _hidden(model, tok) -> np.ndarray:
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**enc).last_hidden_state.numpy(), enc["attention_mask"].numpy()


def _python_blocks(readme: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", readme.read_text(), re.S)


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    src = _bert_with_dead_units(tmp_path_factory.mktemp("bert"))
    _as_sentence_transformer(src, 32)
    out = tmp_path_factory.mktemp("p") / "pruned"
    res = deployopt.prune(
        str(src), out, heads=0.25, ffn=20 / 128, scope="global", log=lambda s: None
    )
    return src, out, res


def test_readme_snippet_loads_the_pruned_folder_with_its_outputs(pruned, tmp_path):
    from transformers import AutoTokenizer

    _, out, res = pruned
    assert res.removed["heads_per_layer"] == [2, 4] and res.removed["ffn_per_layer"] == [64, 44]
    readme = out / "README.md"
    text = readme.read_text()
    assert f"{IMPORT}  # registers model type deployopt_pruned_bert" in text
    assert "AutoModel.from_pretrained(folder)" in text and "PrunedBertModel" in text
    assert "without* `import deployopt.torchside.hf_pruned`" in text  # what does not work
    assert json.dumps(str(out.resolve())) in text  # the snippet names this folder
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "deployopt_pruned_bert" and "auto_map" not in cfg
    assert cfg["heads_per_layer"] == [2, 4] and cfg["ffn_per_layer"] == [64, 44]
    assert (out / "tokenizer.json").is_file() and (out / "modules.json").is_file()

    r = subprocess.run(
        [sys.executable, "-c", RUNNER, str(readme), json.dumps(TEXTS), str(tmp_path)],
        capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[1],
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    # as the README says: plain transformers does not know the model type
    assert "deployopt_pruned_bert" in result["without_import"], result["without_import"]
    assert result["class"] == "PrunedBertModel"
    want, mask = _hidden(res.model.eval(), AutoTokenizer.from_pretrained(out))
    got = np.load(tmp_path / "hidden.npy")
    assert got.shape == want.shape and np.isfinite(got).all()
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    # sentence-transformers: mean pooling of the same hidden states
    m = mask[..., None].astype(np.float32)
    np.testing.assert_allclose(
        np.load(tmp_path / "st.npy"), (want * m).sum(1) / m.sum(1), atol=1e-5, rtol=1e-5
    )


def test_deployopt_reads_the_pruned_folder_back(pruned):
    from transformers import AutoTokenizer

    _, out, res = pruned
    src = load_source(out)
    assert type(src.module.model).__name__ == "PrunedBertModel"
    assert src.meta.model_type == "bert" and src.meta.num_heads == 0  # fusers read the graph
    assert src.tokenizer is not None
    tok = AutoTokenizer.from_pretrained(out)
    np.testing.assert_allclose(
        _hidden(src.module.model, tok)[0], _hidden(res.model.eval(), tok)[0], atol=1e-5
    )


def test_a_pruned_folder_pruned_again_and_a_layer_subset_keep_their_sizes(pruned, tmp_path):
    """A pruned model's config follows its modules: pruning it again, or keeping some of its
    layers (a distillation student), saves the sizes the layers really have."""
    from deployopt.stages.distill import save_model_folder
    from deployopt.torchside.students import select_layers

    _, out, _ = pruned
    again = deployopt.prune(str(out), tmp_path / "again", ffn=0.5, log=lambda s: None)
    cfg = json.loads((tmp_path / "again" / "config.json").read_text())
    assert cfg["heads_per_layer"] == [2, 4] and cfg["ffn_per_layer"] == [32, 22]
    assert again.removed["ffn_per_layer"] == [32, 22]
    src = load_source(out)
    student = select_layers(src.module.model, [1])
    save_model_folder(student, src, tmp_path / "student")
    cfg = json.loads((tmp_path / "student" / "config.json").read_text())
    assert cfg["heads_per_layer"] == [4] and cfg["ffn_per_layer"] == [44]
    reloaded = load_source(tmp_path / "student").module.model
    assert pr.transformer_shape(reloaded)["ffn_per_layer"] == [44]


def test_a_pruning_that_plain_transformers_describes_stays_plain(tmp_path):
    """The same FFN width in every layer and all heads kept: a plain BERT config says it, so the
    folder loads with plain transformers, and its README says so."""
    from transformers import AutoTokenizer

    (tmp_path / "bert").mkdir()
    src = save_tiny_bert(tmp_path / "bert")
    out = tmp_path / "ffn"
    res = deployopt.prune(str(src), out, ffn=0.5, log=lambda s: None)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "bert" and cfg["intermediate_size"] == 32
    (block,) = _python_blocks(out / "README.md")
    assert "deployopt" not in block and "AutoModel.from_pretrained(folder)" in block
    ns: dict = {}
    exec(block, ns)
    assert type(ns["model"]).__name__ == "BertModel"
    tok = AutoTokenizer.from_pretrained(out)
    np.testing.assert_allclose(
        _hidden(ns["model"], tok)[0], _hidden(res.model.eval(), tok)[0], atol=1e-5
    )


def test_a_pruned_folder_of_the_older_layout_still_loads(tmp_path):
    """Folders written before the pruned classes (model type bert plus the resized modules in
    ``deployopt_pruning``) load through deployopt as before."""
    from transformers import AutoTokenizer, BertModel

    (tmp_path / "bert").mkdir()
    src = save_tiny_bert(tmp_path / "bert")
    model = BertModel.from_pretrained(src, attn_implementation="eager").eval()
    fresh = pr.module_shapes(model)
    pr.prune_heads(model, [[0], [1, 3]])
    pr.prune_ffn(model, [[0, 1], list(range(30))])
    resized = {k: v for k, v in pr.module_shapes(model).items() if fresh.get(k) != v}
    old = tmp_path / "old"
    model.config.deployopt_pruning = {**pr.transformer_shape(model), "modules": resized}
    model.save_pretrained(old)
    for f in src.glob("tok*.json"):
        (old / f.name).write_bytes(f.read_bytes())
    loaded = load_source(old)
    assert loaded.meta.num_heads == 0
    tok = AutoTokenizer.from_pretrained(old)
    np.testing.assert_allclose(
        _hidden(loaded.module.model, tok)[0], _hidden(model, tok)[0], atol=1e-5
    )


def test_a_pruned_module_folder_has_a_readme_naming_its_loader(tmp_path):
    out = tmp_path / "cnn"
    deployopt.prune(
        "tests.models:resnet", out, channels=0.5, input_shape={"x": (1, 3, 16, 16)},
        log=lambda s: None,
    )  # fmt: skip
    (block,) = _python_blocks(out / "README.md")
    assert "tests.models:resnet" in (out / "README.md").read_text()
    ns: dict = {}
    exec(block, ns)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert ns["model"](x).shape == (2, 5)
