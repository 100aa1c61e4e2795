"""Knowledge distillation: a teacher, a student built from it (or given), data, losses, the
training loop; out comes a student folder that ``deployopt optimize`` takes as is, with
``distill_report.json``.

Student output: an HF folder (config, safetensors weights, tokenizer, sentence-transformers
pooling files copied from the teacher) for HF teachers; ``model.safetensors`` plus
``student.json`` naming the factory for module students (``deployopt optimize
pkg.mod:factory --weights OUT/model.safetensors``).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deployopt.errors import ConfigError, DataError
from deployopt.torchside import students as st
from deployopt.torchside.data import ImageData, TextData, load_data
from deployopt.torchside.device import check_precision, describe, resolve_device
from deployopt.torchside.lossnames import parse_losses
from deployopt.torchside.tasks import (
    WINDOW_OVERLAP,
    ClassifierTask,
    EmbeddingTask,
    projections_for,
)
from deployopt.torchside.train import TrainConfig, Trainer, barrier, dist_info, task_defaults
from deployopt.workspace import write_json

# Sentence encoders, measured by benchmarks/defaults_minilm.py (see the README's table). The
# hidden states carry three times the pooled cosine's weight: dense per-token targets at every
# student layer are what a small corpus can teach. defaults_minilm.py --texts 600 --held-out
# 300 --score-each-epoch (layers 0,2,4, 2 epochs, no dropout): hidden weight 1: 0.7465
# held-out cosine, 2: 0.7504, 4: 0.7509.
SENTENCE_LOSSES = "cosine,hidden:3"
ST_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")


@dataclass
class DistillResult:
    out: Path
    history: list[dict]
    teacher: dict[str, Any]
    student: dict[str, Any]
    report: Path
    stopped_early: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def _params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _split(n: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    k = max(1, int(n * fraction))
    return order[k:], order[:k]


def distill(
    teacher: Any,
    data: str | Path,
    out: str | Path,
    *,
    student_layers: str | Sequence[int] | None = None,
    student: Any = None,
    student_size: dict[str, int] | None = None,
    losses: str | dict | None = None,
    eval_data: str | Path | None = None,
    eval_fraction: float = 0.1,
    labels_column: str | None = None,
    text_column: str = "text",
    input_shape: dict[str, Sequence[int]] | None = None,
    max_examples: int | None = None,
    max_length: int = 128,
    windows: bool = True,
    freeze_embeddings: bool = False,
    temperature: float = 4.0,
    alpha: float = 0.9,
    train: TrainConfig | None = None,
    device: str = "auto",
    log: Callable[[str], None] = print,
    progress: bool = True,
    stop_after_steps: int | None = None,
) -> DistillResult:
    """Distil ``teacher`` into a smaller student on ``data`` and write it to ``out``.

    Teacher: an HF folder, ``"minilm"``, ``"pkg.mod:factory"`` (with ``input_shape``) or a module.
    Student: ``student_layers`` (keep these teacher layers, weights copied), ``student_size``
    (same architecture, smaller, fresh weights) or ``student`` (a factory or module).
    ``losses``: default ``cosine,hidden:3`` for sentence encoders (``hidden`` for a narrower
    student), ``kd`` for classifiers; ``windows``: long texts train as overlapping windows.
    A run interrupted after a checkpoint resumes when called again with the same ``out``, on
    this device or another. ``device``: ``auto`` (CUDA when available), ``cpu``, ``cuda``,
    ``cuda:N``; ``train.precision``: ``fp32``, ``bf16`` or ``fp16`` (autocast).
    """
    from deployopt.sources import load_source

    cfg = train or TrainConfig()
    dev = resolve_device(device)
    check_precision(cfg.precision, dev)
    out = Path(out)
    shapes = {k: tuple(v) for k, v in (input_shape or {}).items()}
    src = load_source(teacher, input_shapes=shapes)
    t_model = unwrap(src.module)
    t_model.eval()
    for p in t_model.parameters():
        p.requires_grad_(False)
    torch.manual_seed(cfg.seed)  # a fresh student's initialisation follows --seed
    s_model, how = _student(t_model, src, student_layers, student, student_size)
    s_model.train()
    for p in s_model.parameters():
        p.requires_grad_(True)
    frozen = freeze_embeddings and _freeze_token_embeddings(s_model)
    dataset = load_data(data, labels_column, text_column)
    if max_examples:
        dataset = _head(dataset, max_examples)
    evalset = load_data(eval_data, labels_column, text_column) if eval_data else None

    s_model.to(dev)
    if isinstance(dataset, TextData) and src.meta.task == "feature-extraction":
        task, loss_w, extra = embedding_task(
            t_model, s_model, src, dataset, evalset, losses, how, max_length, eval_fraction, cfg,
            progress, windows, dev,
        )  # fmt: skip
    else:
        task, loss_w, extra = classifier_task(
            t_model, s_model, src, dataset, evalset, losses, max_length, eval_fraction, cfg,
            temperature, alpha, progress, dev,
        )  # fmt: skip
    cfg = task_defaults(cfg, isinstance(task, EmbeddingTask))
    log(
        f"distill: teacher {_params(t_model) / 1e6:.2f}M params -> student "
        f"{_params(s_model) / 1e6:.2f}M ({how}); losses {loss_w}; {task_size(task)} examples; "
        f"{describe(dev)}, {cfg.precision}"
    )
    note = small_corpus_note(task_size(task), cfg.epochs, isinstance(task, EmbeddingTask))
    if note:
        log(f"warning: {note}")
    teacher_metrics = task.evaluate(t_model)
    t0 = time.perf_counter()
    trainer = Trainer(
        s_model, task.loss, task_size(task), task.evaluate, cfg, out / "work",
        extra_modules=extra, log=log, progress=progress, stop_after_steps=stop_after_steps,
        device=dev,
    )  # fmt: skip
    state = trainer.fit()
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        student_metrics = task.evaluate(s_model)
    rank, _ = dist_info()
    result = DistillResult(
        out=out,
        history=state.history,
        teacher={"params": _params(t_model), **teacher_metrics},
        student={"params": _params(s_model), **student_metrics},
        report=out / "distill_report.json",
        stopped_early=state.stopped_early,
        extra=dict(trainer.stats),
    )
    if trainer.stats.get("skipped_steps"):
        log(f"warning: {trainer.stats['skipped_steps']} step(s) skipped for a non-finite loss")
    if rank == 0:
        s_model.to("cpu")  # the saved student is device-independent
        _save_student(s_model, src, teacher, student, out)
        write_json(
            result.report,
            {
                "schema": "deployopt.distill/1",
                "teacher": {"source": src.label, **result.teacher},
                "student": {"how": how, **result.student},
                "losses": loss_w,
                "frozen_token_embeddings": bool(frozen),
                "examples": task_size(task),
                "data": getattr(dataset, "source", str(data)),
                "train": cfg.__dict__,
                **trainer.stats,  # device, precision, peak memory, skipped steps
                "temperature": temperature,
                "alpha": alpha,
                "history": state.history,
                "stopped_early": state.stopped_early,
                "train_seconds": seconds,
                "size_ratio": _params(s_model) / _params(t_model),
                "student_bytes": sum(
                    f.stat().st_size for f in (out / "student").iterdir() if f.is_file()
                ),
            },
        )
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        barrier(dev)  # rank 0 has written the student before anyone leaves
        dist.destroy_process_group()
    return result


def unwrap(module: nn.Module) -> nn.Module:
    """The trainable model inside deployopt's export wrappers."""
    from deployopt.torchside import wrappers

    kinds = (wrappers.HFTextWrapper, wrappers.HFImageWrapper, wrappers.TupleOutputWrapper)
    return module.model if isinstance(module, kinds) else module


def task_size(task) -> int:
    return task.n


def _head(d, n):
    if isinstance(d, ImageData):
        return ImageData(d.images[:n], d.labels[:n], d.classes, d.source)
    return TextData(d.texts[:n], d.labels[:n] if d.labels else None, d.classes, d.source)


def _student(t_model, src, layers, student, size) -> tuple[nn.Module, str]:
    chosen = [x is not None for x in (layers, student, size)]
    if sum(chosen) > 1:
        raise ConfigError("give one of --student-layers, --student or a student size")
    if student is not None:
        from deployopt.sources import load_source

        if isinstance(student, nn.Module):
            return student, f"user module {type(student).__name__}"
        s_src = load_source(student, input_shapes={n: tuple(s.shape) for n, s in zip(
            src.input_names, src.example_inputs)})  # fmt: skip
        return unwrap(s_src.module), f"user model {student}"
    total = st.num_layers(t_model)
    if size is not None:
        cfg = st.smaller_config(t_model.config, **size)
        return type(t_model)(cfg), "smaller config " + ", ".join(
            f"{k}={v}" for k, v in size.items()
        )
    keep = (
        st.parse_layers(layers, total)
        if layers is not None
        else st.every_kth(total, max(1, total // 2))
    )
    return st.select_layers(t_model, keep), f"teacher layers {keep} of {total}"


# Example passes (examples x epochs) under which a student stays well short of its teacher.
# Measured by benchmarks/defaults_minilm.py (AMD EPYC, 2 cores): all-MiniLM-L6-v2 -> teacher
# layers 0,2,4 with the defaults on 3,000 20 Newsgroups posts (19,997 overlapping windows) x 2
# epochs (39,994 passes) reached a held-out cosine of 0.8569; the 12,000-text, 3-epoch run of
# benchmarks/distill_minilm.py (36,000 passes of whole texts, layers 0,2,5) reached 0.91.
SMALL_CORPUS_PASSES = 50_000
SMALL_CORPUS_COSINE = 0.85


def small_corpus_note(examples: int, epochs: int, sentence_encoder: bool) -> str | None:
    """What to expect when the data is small for distillation, or None."""
    passes = examples * epochs
    if passes >= SMALL_CORPUS_PASSES:
        return None
    expect = (
        f"a 3-of-6-layer MiniLM student reached a held-out cosine of about "
        f"{SMALL_CORPUS_COSINE} to its teacher on 3,000 texts x 2 epochs"
        if sentence_encoder
        else "the student will trail the teacher by more than with a larger corpus"
    )
    return (
        f"{examples:,} training examples x {epochs} epoch(s) is a small budget for distillation: "
        f"{expect}; more in-domain data (unlabelled text is enough for sentence encoders) or "
        "more epochs bring the student closer"
    )


def _freeze_token_embeddings(model: nn.Module) -> bool:
    """Keep a transformer's token-embedding table as it is (most of a small BERT's weights:
    11.7M of a 3-layer MiniLM student's 17.4M); True when there was one to freeze."""
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if get is not None else None
    if not isinstance(emb, nn.Embedding):
        return False
    emb.weight.requires_grad_(False)
    return True


def block_ends(kept: Sequence[int] | None, n_student: int, n_teacher: int) -> list[int]:
    """The teacher layer whose output each student layer learns to reproduce.

    A student made of kept teacher layers stands in for the whole teacher: kept layer ``k`` takes
    over the block of teacher layers up to the next kept one, so it learns the output at that
    block's end, and the last student layer the teacher's last layer (whose output is the
    embedding). Mapping a kept layer to its own old output instead would pull the last student
    layer towards layer 4's output while the embedding loss pulls it towards layer 5's.

    >>> block_ends([0, 2, 4], 3, 6), block_ends(None, 3, 12)
    ([1, 3, 5], [3, 7, 11])
    """
    if kept:
        return [nxt - 1 for nxt in [*kept[1:], n_teacher]]
    return [round((i + 1) * n_teacher / n_student) - 1 for i in range(n_student)]


def embedding_task(
    t_model, s_model, src, data, evalset, losses, how, max_length, frac, cfg, progress=False,
    windows=True, device="cpu", window_overlap=WINDOW_OVERLAP,
):  # fmt: skip
    t_dim, s_dim = t_model.config.hidden_size, s_model.config.hidden_size
    # the pooled-embedding losses need the teacher's width: a narrower student learns the hidden
    # states through a projection when the user named no loss
    loss_w = parse_losses(losses or (SENTENCE_LOSSES if t_dim == s_dim else "hidden"))
    if "kd" in loss_w or "ce" in loss_w:
        raise ConfigError("a sentence encoder has no logits: use embedding, hidden, attention")
    texts = list(data.texts)
    if evalset is not None:
        train_texts, eval_texts = texts, list(evalset.texts)
    else:
        tr, ev = _split(len(texts), frac, cfg.seed)
        train_texts, eval_texts = [texts[i] for i in tr], [texts[i] for i in ev]
    if ("embedding" in loss_w or "cosine" in loss_w) and t_dim != s_dim:
        raise ConfigError(
            f"embedding distillation needs the teacher's width ({t_dim}), the student has {s_dim}",
            hint="shrink layers, heads or ffn instead of hidden, or use the hidden loss alone",
        )
    layer_map: list[tuple[int, int]] = []
    if "hidden" in loss_w or "attention" in loss_w:
        n_s, n_t = st.num_layers(s_model), st.num_layers(t_model)
        kept = [int(x) for x in how.split("[")[1].split("]")[0].split(",")] if "[" in how else None
        layer_map = list(zip(range(n_s), block_ends(kept, n_s, n_t)))
    projs = None
    if "hidden" in loss_w:
        projs = projections_for(layer_map, s_dim, t_dim).to(device)
    task = EmbeddingTask(
        t_model, src.tokenizer, train_texts, eval_texts, loss_w, layer_map, max_length,
        projections=projs, progress=progress, windows=windows, device=device,
        window_overlap=window_overlap,
    )  # fmt: skip
    return task, loss_w, [projs] if projs is not None else []


def classifier_task(
    t_model, s_model, src, data, evalset, losses, max_length, frac, cfg, t, a, progress=False,
    device="cpu",
):  # fmt: skip
    loss_w = parse_losses(losses or "kd")
    if {"embedding", "cosine", "hidden", "attention"} & set(loss_w):
        raise ConfigError("classifier distillation takes the kd and ce losses")
    if isinstance(data, ImageData):
        x, y = torch.from_numpy(data.images), torch.from_numpy(data.labels)
        ex = torch.from_numpy(evalset.images) if evalset else None
        ey = torch.from_numpy(evalset.labels) if evalset else None
    else:
        if src.tokenizer is None:
            raise DataError(f"{data.source}: text data needs a text model with a tokenizer")
        enc = src.tokenizer(list(data.texts), truncation=True, max_length=max_length,
                            padding="max_length", return_tensors="pt")  # fmt: skip
        x = {k: v for k, v in enc.items()}
        y = torch.tensor(data.labels) if data.labels is not None else None
        ex = ey = None
        if evalset is not None:
            e = src.tokenizer(list(evalset.texts), truncation=True, max_length=max_length,
                              padding="max_length", return_tensors="pt")  # fmt: skip
            ex, ey = dict(e.items()), torch.tensor(evalset.labels)
    if "ce" in loss_w and y is None:
        raise DataError(f"{data.source}: the ce loss needs labels (--labels-column)")
    if ex is None:
        n = len(y) if y is not None else len(next(iter(x.values())) if isinstance(x, dict) else x)
        tr, ev = _split(n, frac, cfg.seed)
        pick = (lambda v, i: {k: t_[i] for k, t_ in v.items()}) if isinstance(x, dict) else (
            lambda v, i: v[i])  # fmt: skip
        x, ex = pick(x, tr), pick(x, ev)
        y, ey = (y[tr], y[ev]) if y is not None else (None, None)
    if ey is None:
        raise DataError("evaluation needs labels: give --labels-column or --eval-data with labels")
    return ClassifierTask(t_model, x, y, ex, ey, loss_w, t, a, progress, device), loss_w, []


def _save_student(model: nn.Module, src, teacher, student, out: Path) -> None:
    """Atomically write the student where ``deployopt optimize`` can take it."""
    factory = student if isinstance(student, str) else (
        teacher if isinstance(teacher, str) else None)  # fmt: skip
    lineage = [{"stage": "distill", "from": src.label, "params": _params(model)}]
    save_model_folder(model, src, out / "student", factory=factory, lineage=lineage)


def save_model_folder(
    model: nn.Module,
    src,
    final: Path,
    *,
    factory: str | None = None,
    lineage: list[dict] | None = None,
    config_extra: dict | None = None,
    extra_files: dict[str, bytes] | None = None,
) -> None:
    """Write ``model`` to the folder ``final`` atomically (built beside it, then renamed in).

    HF models: ``save_pretrained`` (config + safetensors), the source's tokenizer and
    sentence-transformers pooling files; ``config_extra`` and the ``lineage`` (appended to the
    source's own) go into config.json. Other modules: ``model.safetensors`` and ``module.json``
    naming the factory, the input shapes and every module's shape (a pruned module no longer
    matches what its factory builds). Either folder is what ``deployopt optimize`` takes as is.
    """
    from deployopt.torchside.pruning import module_shapes
    from deployopt.workspace import atomic_dir

    full_lineage = [*getattr(src.meta, "lineage", []), *(lineage or [])]
    with atomic_dir(Path(final)) as tmp:
        if hasattr(model, "save_pretrained"):
            from deployopt.torchside.hf_pruned import for_saving

            model, _ = for_saving(model)  # pruned layer sizes: deployopt's registered class
            cfg = model.config
            cfg.deployopt_lineage = full_lineage
            for k, v in (config_extra or {}).items():
                setattr(cfg, k, v)
            model.save_pretrained(tmp, safe_serialization=True)
            if src.tokenizer is not None:
                src.tokenizer.save_pretrained(tmp)
            folder = Path(src.label)
            for name in ST_FILES:
                if (folder / name).is_file():
                    shutil.copy2(folder / name, tmp / name)
            if (folder / "1_Pooling").is_dir():
                shutil.copytree(folder / "1_Pooling", tmp / "1_Pooling")
        else:
            from safetensors.torch import save_model

            save_model(model, str(tmp / "model.safetensors"))
            shapes = {n: list(t.shape) for n, t in zip(src.input_names, src.example_inputs)}
            manifest = {
                "schema": "deployopt.module/1",
                "factory": factory,
                "input_shapes": {n: [1, *s[1:]] for n, s in shapes.items()},
                "shapes": module_shapes(model),
                "lineage": full_lineage,
            }
            (tmp / "module.json").write_text(json.dumps(manifest, indent=2))
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)
