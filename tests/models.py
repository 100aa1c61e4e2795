"""Tiny seeded models built in the tests: milliseconds per inference, no downloads."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

WORDS = (
    "the a an is are was were be to of and in on at for with by from this that it as or not "
    "model data test sentence short long fast slow small large good bad new old day time year "
    "people water rain sun city market price stock team game music food phone battery light "
    "how what why when where who do does did can will would should i you we they he she "
    "deployopt traces one shorter second"
).split()


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))


def deep_mlp() -> nn.Module:
    """Five Linear layers: enough weighted MatMuls for the mixed-precision candidates."""
    torch.manual_seed(0)
    dims = [16, 32, 32, 32, 32, 4]
    layers: list[nn.Module] = []
    for a, b in zip(dims, dims[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1]).eval()


def outlier_mlp() -> nn.Module:
    """deep_mlp with one outlier feature in the third layer's input: the second layer's output
    unit 0 scaled up 1000x and the third layer's weights on it scaled down as much. ReLU is
    positively homogeneous, so the function is the same; per-tensor activation quantization
    of that input is not (every other feature falls under one quantization step)."""
    model = deep_mlp()
    second, third = model[2], model[4]
    with torch.no_grad():
        second.weight[0] *= 1000.0
        second.bias[0] *= 1000.0
        third.weight[:, 0] /= 1000.0
    return model


class ConvBnRelu(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
        )
        self.head = nn.Linear(8, 5)
        with torch.no_grad():  # non-trivial BatchNorm statistics
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.5, 0.5)
                    m.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        return self.head(self.body(x).mean(dim=(2, 3)))


def cnn() -> nn.Module:
    return ConvBnRelu()


def conv_only() -> nn.Module:
    """Convolutions and activations alone (a segmentation head's shape): no MatMul or Gemm."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 2, 1), nn.Sigmoid()
    ).eval()


class ResidualNet(nn.Module):
    """Residual additions, BatchNorm, a grouped and a depthwise convolution: channel pruning
    must keep all of them consistent."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.grouped = nn.Sequential(
            nn.Conv2d(16, 16, 3, padding=1, groups=4, bias=False), nn.BatchNorm2d(16), nn.ReLU()
        )
        self.depthwise = nn.Sequential(
            nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), nn.BatchNorm2d(16), nn.ReLU()
        )
        self.widen = nn.Sequential(nn.Conv2d(16, 32, 1), nn.BatchNorm2d(32), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32))
        self.head = nn.Linear(32, 5)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.grouped(x)  # residual over a grouped conv
        x = x + self.depthwise(x)  # residual over a depthwise conv
        x = self.widen(x)
        x = torch.relu(x + self.block(x))
        return self.head(x.mean(dim=(2, 3)))


def resnet() -> nn.Module:
    return ResidualNet()


def not_a_module():
    return 42


def write_vocab(folder: Path) -> Path:
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    vocab += [c for c in "abcdefghijklmnopqrstuvwxyz0123456789.,?!'"]
    vocab += ["##" + c for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    path = folder / "vocab.txt"
    path.write_text("\n".join(dict.fromkeys(vocab)) + "\n")
    return path


def tiny_bert_config(classifier: bool = False, vocab_size: int = 200):
    from transformers import BertConfig

    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=3,
        architectures=["BertForSequenceClassification" if classifier else "BertModel"],
    )


def save_tiny_bert(folder: Path, classifier: bool = False) -> Path:
    """A 2-layer BERT with random (seeded) weights and a real WordPiece tokenizer, as an HF folder."""
    from transformers import BertForSequenceClassification, BertModel, BertTokenizerFast

    folder = Path(folder)
    vocab = write_vocab(folder)
    tok = BertTokenizerFast(vocab_file=str(vocab), do_lower_case=True)
    cfg = tiny_bert_config(classifier, vocab_size=len(vocab.read_text().split()))
    torch.manual_seed(0)
    model = (BertForSequenceClassification if classifier else BertModel)(cfg).eval()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def optimize_only(*args, **kwargs):
    """deployopt.optimize without the benchmark/selection step (for tests of the variants)."""
    import deployopt

    return deployopt.optimize(*args, bench=False, **kwargs)


def run_onnx(path, feeds) -> list:
    """Outputs of an ONNX file on onnxruntime's CPU provider (the test's reference runner)."""
    import onnxruntime as ort

    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return s.run(None, feeds)


def tiny_onnx_model():
    """Y = X @ W + B with a 16x4 float initializer (256 bytes) and a 4-float bias."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((16, 4)).astype(np.float32), "W")
    b = numpy_helper.from_array(rng.standard_normal((4,)).astype(np.float32), "B")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["X", "W"], ["XW"]),
            helper.make_node("Add", ["XW", "B"], ["Y"]),
        ],
        "tiny",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["batch", 4])],
        initializer=[w, b],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


ROOT = Path(__file__).resolve().parents[1]


def run_cli(*argv: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m deployopt ARGV`` from the repository root, offline, wide plain output;
    the history database is the session's temporary one (conftest)."""
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        COLUMNS="500",
        NO_COLOR="1",
        TERM="dumb",
    )
    return subprocess.run(
        [sys.executable, "-m", "deployopt", *argv],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def flat(text: str) -> str:
    """Rich wraps long lines: compare with runs of whitespace collapsed."""
    return " ".join(text.split())


def ok_variants(res, stage: str) -> list:
    """The proved candidates of one stage (e.g. every ``int8-dynamic*`` that passed parity).
    Which recipe of a stage passes depends on the CPU (u8s8 kernels saturate without VNNI), so
    tests ask that one does, never which."""
    return [v for v in res.variants if v.stage == stage and v.ok]


def assert_contract(res) -> None:
    """Every ``ok`` variant meets its stage's tolerance; every failed one says why, with the
    numbers it was judged on."""
    from deployopt.parity import EXACT, FP16, INT8

    tolerances = {"export": EXACT, "fuse": EXACT, "fp16": FP16}
    for v in res.variants:
        tol = tolerances.get(v.stage, INT8 if v.stage.startswith("int8-") else None)
        p = v.parity or {}
        if v.ok:
            if v.stage == "input":
                continue
            assert tol is not None and p, (v.name, "no parity")
            assert p["nonfinite"] == 0, v.name
            assert p["mean_cosine"] >= tol.min_mean_cosine, (v.name, p["mean_cosine"])
            assert p["min_cosine"] >= tol.min_cosine, (v.name, p["min_cosine"])
            if tol.rel_atol is not None:
                for o in p["outputs"]:
                    assert o["max_abs_diff"] <= tol.rel_atol * o["scale"], (v.name, o)
            if tol.min_argmax_agreement is not None and p.get("argmax_agreement") is not None:
                assert p["argmax_agreement"] >= tol.min_argmax_agreement, v.name
        elif v.status == "failed":
            assert v.reason, v.name
            assert p or v.metrics.get("search") or "cannot" in v.reason or ":" in v.reason, v.name
            if p:  # a parity failure names the numbers that failed
                assert p["failures"] and all(f.split(":")[0] for f in p["failures"]), v.name
