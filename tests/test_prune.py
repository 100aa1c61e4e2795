"""Pruning: real shrinking of transformers and CNNs, exact unstructured sparsity, recovery,
reload from disk, export with parity, lineage in the optimize report, and clear errors."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from torch import nn

import deployopt
from deployopt.errors import ConfigError
from deployopt.sources import load_source
from deployopt.torchside import pruning as pr
from tests.models import WORDS, flat, optimize_only, run_cli, save_tiny_bert


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bert")
    return save_tiny_bert(folder)


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    rnd = random.Random(0)
    path = tmp_path_factory.mktemp("txt") / "texts.txt"
    path.write_text(
        "\n".join(" ".join(rnd.choices(WORDS, k=rnd.randint(4, 20))) for _ in range(96))
    )
    return path


def _inputs(src, batch=3, seq=11):
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(5, 60, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0  # a padded row
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


def _hidden(model, x):
    with torch.no_grad():
        return model(**x).last_hidden_state


def test_pruned_bert_shrinks_reloads_and_exports_with_parity(bert, tmp_path):
    from transformers import BertConfig

    cfg = BertConfig.from_pretrained(bert)
    out = tmp_path / "pruned"
    res = deployopt.prune(str(bert), out, heads=0.5, ffn=0.5, log=lambda s: None)
    # expected fall: per layer, half the heads' q/k/v rows (+ biases) and o columns, half the FFN
    d = cfg.hidden_size // cfg.num_attention_heads
    gone_heads = cfg.num_attention_heads // 2
    qkv = 3 * gone_heads * d * (cfg.hidden_size + 1)
    o = gone_heads * d * cfg.hidden_size
    f = cfg.intermediate_size // 2
    ffn = f * (cfg.hidden_size + 1) + f * cfg.hidden_size
    assert res.params_before - res.params_after == cfg.num_hidden_layers * (qkv + o + ffn)
    layer = res.model.encoder.layer[0]
    assert layer.attention.self.query.weight.shape == (gone_heads * d, cfg.hidden_size)
    assert layer.intermediate.dense.weight.shape == (f, cfg.hidden_size)
    # the folder says the new shape and reloads to the same function
    saved = json.loads((out / "config.json").read_text())
    assert saved["model_type"] == "deployopt_pruned_bert"  # see tests/test_hf_pruned.py
    assert saved["heads_per_layer"] == [gone_heads] * cfg.num_hidden_layers
    assert saved["intermediate_size"] == f
    assert saved["deployopt_lineage"][-1]["stage"] == "prune"
    src = load_source(out)
    x = _inputs(src)
    torch.testing.assert_close(_hidden(src.module.model, x), _hidden(res.model, x))
    report = json.loads((out / "prune_report.json").read_text())
    assert report["params_after"] == res.params_after and report["weights_bytes"] > 0
    # export + parity against its own PyTorch version (optimize raises if parity fails)
    opt = optimize_only(str(out), tmp_path / "opt", variants=["int8-dynamic"])
    fp32 = opt.by_name("fp32")
    assert fp32.status == "ok" and fp32.parity["max_abs_diff"] < 1e-4
    import onnx

    inits = {t.name: t for t in onnx.load(str(fp32.path)).graph.initializer}
    widths = sorted({tuple(t.dims) for t in inits.values() if len(t.dims) == 2})
    assert (cfg.hidden_size, gone_heads * d) in widths or (
        gone_heads * d,
        cfg.hidden_size,
    ) in widths


def test_zero_importance_heads_and_neurons_are_removed_without_changing_outputs(
    bert, texts, tmp_path
):
    """Heads whose output columns are zero, and FFN neurons whose output columns are zero,
    contribute nothing: both importances must rank them last, and removing them must leave the
    outputs as they were."""
    from transformers import BertModel

    model = BertModel.from_pretrained(bert, attn_implementation="eager").eval()
    dead_heads = [[1, 3], [0, 2]]
    d = model.config.hidden_size // model.config.num_attention_heads
    with torch.no_grad():
        for layer, heads in zip(model.encoder.layer, dead_heads):
            for h in heads:
                layer.attention.output.dense.weight[:, h * d : (h + 1) * d] = 0
            layer.output.dense.weight[:, ::2] = 0  # every even FFN neuron is dead
    folder = tmp_path / "dead"
    model.save_pretrained(folder)
    for f in ("vocab.txt", "tokenizer_config.json", "tokenizer.json", "special_tokens_map.json"):
        if (bert / f).exists():
            (folder / f).write_bytes((bert / f).read_bytes())
    x = _inputs(None)
    ref = _hidden(model, x)
    for importance in ("magnitude", "gradient"):
        res = deployopt.prune(
            str(folder), tmp_path / importance, heads=0.5, ffn=0.5, importance=importance,
            data=str(texts), log=lambda s: None, progress=False,
        )  # fmt: skip
        torch.testing.assert_close(_hidden(res.model, x), ref, atol=1e-5, rtol=1e-5)
        assert res.removed["heads_per_layer"] == [2, 2] and res.removed["ffn_per_layer"] == [32, 32]


def test_gradient_importance_matches_a_head_gate_derivative(bert, texts):
    """Michel et al.'s I_h = |dL/d xi_h| with xi_h a gate on head h: the hooks' activation x
    gradient must equal the derivative taken through an explicit gate."""
    from transformers import BertModel, BertTokenizerFast

    model = BertModel.from_pretrained(bert, attn_implementation="eager").eval()
    tok = BertTokenizerFast.from_pretrained(bert)
    enc = dict(tok(["alpha beta gamma", "delta"], padding=True, return_tensors="pt"))
    u = torch.randn(2, model.config.hidden_size, generator=torch.Generator().manual_seed(0))

    def loss(m, batch, rows=slice(None)):
        return (m(**batch[0]).last_hidden_state[:, 0] * u[rows]).sum()

    heads, _ = pr.gradient_importance(model, pr.blocks(model), [(enc, None)], loss)
    layer = model.encoder.layer[1]
    d = layer.attention.self.attention_head_size
    gate = torch.ones(model.config.num_attention_heads, requires_grad=True)
    per_example = []
    for i in range(2):
        one = {k: v[i : i + 1] for k, v in enc.items()}

        def gated(mod, args):
            x = args[0]
            return (pr._head_view(x, d) * gate[:, None]).reshape(x.shape)

        h = layer.attention.output.dense.register_forward_pre_hook(gated)
        (g,) = torch.autograd.grad(loss(model, (one, None), slice(i, i + 1)), gate)
        h.remove()
        per_example.append(g.abs())
    # padding changes nothing for the real tokens, so per-example gradients add up
    torch.testing.assert_close(heads[1], sum(per_example), atol=1e-5, rtol=1e-4)


def test_residual_cnn_keeps_valid_shapes_after_channel_pruning(tmp_path):
    out = tmp_path / "cnn"
    res = deployopt.prune(
        "tests.models:resnet", out, channels=0.5, input_shape={"x": (1, 3, 16, 16)},
        log=lambda s: None,
    )  # fmt: skip
    assert res.params_after < 0.5 * res.params_before
    after = res.removed["channels_after"]
    assert all(a < b for a, b in zip(after, res.removed["channels_before"]))
    m = res.model
    assert m.grouped[0].groups == 4 and m.grouped[0].in_channels % 4 == 0
    assert m.depthwise[0].groups == m.depthwise[0].in_channels == m.depthwise[0].out_channels
    assert m.stem[1].num_features == m.stem[0].out_channels
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        y = m(x)
    assert y.shape == (2, 5)  # classes kept
    src = load_source(out)  # module.json + safetensors, shapes restored
    with torch.no_grad():
        torch.testing.assert_close(src.module.model(x), y)
    manifest = json.loads((out / "module.json").read_text())
    assert manifest["factory"] == "tests.models:resnet" and manifest["lineage"][-1]["stage"] == (
        "prune"
    )
    opt = optimize_only(str(out), tmp_path / "opt", variants=[])
    assert opt.by_name("fp32").status == "ok"
    assert "prune" in json.dumps(json.loads((tmp_path / "opt" / "report.json").read_text()))


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_unstructured_pruning_reaches_the_sparsity_exactly(tmp_path, scope):
    from tests.models import cnn

    ref = cnn()
    ratio = 0.37
    res = deployopt.prune(
        "tests.models:cnn", tmp_path / scope, unstructured=ratio, scope=scope,
        input_shape={"x": (1, 3, 8, 8)}, log=lambda s: None,
    )  # fmt: skip
    weights = pr.prunable_weights(res.model)
    if scope == "global":
        total = sum(getattr(m, n).numel() for m, n in weights)
        assert res.removed["unstructured"]["zeros"] == round(ratio * total)
    else:
        for m, n in weights:
            w = getattr(m, n)
            assert int((w == 0).sum()) == round(ratio * w.numel())
    assert not any(hasattr(m, "weight_orig") for m, _ in weights)  # made permanent
    assert sum(p.numel() for p in res.model.parameters()) == sum(
        p.numel() for p in ref.parameters()
    )  # zeros, not smaller tensors
    rep = json.loads((tmp_path / scope / "prune_report.json").read_text())
    assert "runs them exactly as fast as before" in rep["note"]
    assert rep["compressed_bytes"] < rep["weights_bytes"]


def _image_folder(root, model, n=48):
    """Random images labelled by ``model``'s own predictions."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 3, 8, 8, generator=g)
    with torch.no_grad():
        logits = model(x)
    labels = logits.argmax(-1)
    for c in range(logits.shape[1]):  # every class folder, so folder order = class index
        (root / f"c{c}").mkdir(parents=True, exist_ok=True)
    for i, (img, y) in enumerate(zip(x, labels)):
        d = root / f"c{int(y)}"
        d.mkdir(parents=True, exist_ok=True)
        arr = (img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(arr).save(d / f"{i}.png")
    return root


def test_iterative_pruning_with_kd_recovery(tmp_path):
    from deployopt.torchside.train import TrainConfig
    from tests.models import cnn

    data = _image_folder(tmp_path / "imgs", cnn().eval())
    res = deployopt.prune(
        "tests.models:cnn", tmp_path / "out", channels=0.5, steps=2, recover_epochs=4,
        importance="gradient", data=str(data), input_shape={"x": (1, 3, 8, 8)},
        train=TrainConfig(epochs=4, batch_size=8, lr=1e-2, patience=4), log=lambda s: None,
        progress=False,
    )  # fmt: skip
    assert res.removed["channels_after"] == [4, 4]  # 8 -> 6 -> 4 over two steps
    assert len(res.history) == 4  # two recovery epochs after each step
    m = res.metrics
    assert set(m) == {"original", "pruned", "recovered"}
    assert m["recovered"]["accuracy"] >= m["pruned"]["accuracy"]
    # the KD loss falls within each step's recovery
    assert res.history[1]["train_loss"] < res.history[0]["train_loss"]
    assert res.history[3]["train_loss"] < res.history[2]["train_loss"]


def test_bisection_finds_the_smallest_ratio_that_meets_a_target():
    from deployopt.stages.prune import bisect_ratio

    calls = []

    def left(r):  # share left: 1 - 0.8 r (a floor of 0.2 that pruning cannot remove)
        calls.append(r)
        return 1 - 0.8 * r

    r, got = bisect_ratio(left, 0.6, hi=0.95)
    assert r == pytest.approx(0.5, abs=0.95 / 2**12) and got <= 0.6
    assert len(calls) == 13  # the upper bound, then 12 halvings
    with pytest.raises(ValueError):
        bisect_ratio(left, 0.1, hi=0.95)  # below the floor


def test_parameter_target_on_a_transformer(bert, tmp_path):
    res = deployopt.prune(str(bert), tmp_path / "t", target_params=0.8, log=lambda s: None)
    got = res.params_after / res.params_before
    assert got <= 0.8 and res.removed["target"]["params"] == 0.8
    assert res.removed["target"]["measured"] == pytest.approx(got)
    with pytest.raises(ConfigError, match="even the largest ratio"):
        deployopt.prune(str(bert), tmp_path / "u", target_params=0.1, log=lambda s: None)


def test_plan_refuses_to_empty_a_layer():
    scores = [torch.tensor([0.0, 0.0]), torch.tensor([1.0, 2.0])]  # layer 0 is dead
    with pytest.raises(ConfigError, match="would remove all 2 heads of layer 0"):
        pr.plan_removal(scores, 0.5, "heads", scope="global")
    assert pr.plan_removal(scores, 0.5, "heads", scope="layer") == [[0], [0]]


CASES = [
    (["--heads", "0"], "--heads: Input should be greater than 0 (got 0.0)"),
    (["--heads", "1.0"], "--heads: Input should be less than 1 (got 1.0)"),
    (["--ffn", "-0.2"], "--ffn: Input should be greater than 0 (got -0.2)"),
    (["--heads", "half"], "Invalid value for '--heads': Input should be a valid number"),
    (["--heads", "0.9"], "would remove all 4 heads of each layer"),
    (["--channels", "0.5"], "--channels is for CNNs"),
    (["--heads", "0.5", "--importance", "gradient"], "--importance 'gradient' needs data"),
    (["--drop-layers", "0,1"], "would remove all 2 layers"),
    (["--heads", "0.5", "--recover-epochs", "2"], "--recover-epochs needs data"),
    (["--target-latency", "1.5"], "--target-latency: Input should be less than 1"),
    (["--target-params", "0.5", "--heads", "0.5"], "give either a target or ratios"),
]


@pytest.mark.parametrize("args,fragment", CASES)
def test_bad_pruning_requests_exit_2_with_a_clear_error(bert, tmp_path, args, fragment):
    r = run_cli("prune", str(bert), "-o", str(tmp_path / "o"), *args)
    assert r.returncode == 2, r.stdout + r.stderr
    assert fragment in flat(r.stderr) and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()  # nothing half-written


def test_cnn_flags_on_a_cnn_and_transformer_flags_refused(tmp_path):
    r = run_cli(
        "prune", "tests.models:cnn", "--input-shape", "x=1x3x8x8", "-o", str(tmp_path / "o"),
        "--heads", "0.5",
    )  # fmt: skip
    assert r.returncode == 2 and "need a BERT-family transformer" in flat(r.stderr)
    r = run_cli(
        "prune", "tests.models:resnet", "--input-shape", "x=1x3x16x16", "-o",
        str(tmp_path / "o"), "--channels", "0.25",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "next: deployopt optimize" in r.stdout and (tmp_path / "o" / "module.json").exists()


def test_drop_layers_keeps_the_rest(bert, tmp_path):
    from transformers import BertModel

    ref = BertModel.from_pretrained(bert, attn_implementation="eager").eval()
    res = deployopt.prune(str(bert), tmp_path / "d", drop_layers="1", log=lambda s: None)
    assert len(res.model.encoder.layer) == 1 and res.removed["layers"] == [1]
    assert json.loads((tmp_path / "d" / "config.json").read_text())["num_hidden_layers"] == 1
    x = _inputs(None)
    with torch.no_grad():  # layer 0 is the original's layer 0: same hidden state after it
        got = res.model(**x, output_hidden_states=True).hidden_states[1]
        want = ref(**x, output_hidden_states=True).hidden_states[1]
    torch.testing.assert_close(got, want)
    assert isinstance(res.model.encoder.layer[0], nn.Module)


def test_sentence_encoder_recovery_uses_its_own_losses_and_the_models_dropout(
    bert, texts, tmp_path
):
    from deployopt.stages.prune import RECOVERY_LOSSES
    from deployopt.torchside.lossnames import parse_losses

    res = deployopt.prune(bert, tmp_path / "p", heads=0.5, ffn=0.5, data=texts, recover_epochs=1,
                          progress=False, log=lambda s: None)  # fmt: skip
    rep = json.loads(res.report.read_text())["recovery"]
    # hidden states at equal weight, not distillation's hidden:3; dropout stays the model's own
    assert rep["losses"] == parse_losses(RECOVERY_LOSSES) == {"cosine": 1.0, "hidden": 1.0}
    assert rep["train"]["dropout"] is None and rep["train"]["batch_size"] == 32
    assert rep["window_overlap"] == 0.5  # distillation's default is 0.75
    m = res.metrics
    assert 0 < m["pruned"]["score"] <= 1 and 0 < m["recovered"]["score"] <= 1
