"""What is distilled, and how it is scored. A task owns its data, its teacher and the teacher's
cache (the teacher runs once per example for the cached outputs), and gives the trainer a
``loss(model, indices)`` and an ``evaluate(model)`` with a ``score``.

A task works on its ``device``: it moves the teacher there, keeps the teacher's cached outputs
there, and moves each batch there as it is used (the inputs themselves stay in host memory, so
a corpus larger than the GPU's memory trains)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from deployopt.torchside.device import to_device
from deployopt.torchside.losses import (
    Projection,
    attention_kl,
    embedding_loss,
    hidden_mse,
    kd_loss,
)


def _logits(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the real tokens, in fp32 (a half-precision sum over a long text loses digits)."""
    hidden = hidden.float()
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


@torch.no_grad()
def _in_chunks(fn, n: int, size: int = 64, desc: str | None = None) -> torch.Tensor:
    """``fn`` over the indices ``0..n`` in chunks; ``desc`` shows a progress bar (teacher caching
    over tens of thousands of examples takes minutes)."""
    starts = range(0, n, size)
    if desc is not None:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=desc, unit="batch", leave=False)
    return torch.cat([fn(torch.arange(i, min(n, i + size))) for i in starts])


@dataclass
class ClassifierTask:
    """Logit distillation for classifiers (images, tensors, or tokenized text as a dict).

    ``losses``: ``{"kd": w}`` soft labels (+ hard labels by ``alpha`` when labels exist), or
    ``{"ce": w}`` hard labels only (the no-KD baseline). ``inputs`` is a tensor or a dict of
    tensors with the example index first.
    """

    teacher: nn.Module
    inputs: torch.Tensor | Mapping[str, torch.Tensor]
    labels: torch.Tensor | None
    eval_inputs: torch.Tensor | Mapping[str, torch.Tensor]
    eval_labels: torch.Tensor | None
    losses: Mapping[str, float]
    temperature: float = 4.0
    alpha: float = 0.9
    progress: bool = False
    device: torch.device | str = "cpu"

    def __post_init__(self):
        self.device = torch.device(self.device)
        self.teacher.to(self.device).eval()
        if self.labels is not None:
            self.labels = self.labels.to(self.device)
        if self.eval_labels is not None:
            self.eval_labels = self.eval_labels.to(self.device)
        self.cache = _in_chunks(
            lambda i: _logits(self._run(self.teacher, self.inputs, i)).float(),
            self.n,
            desc="teacher outputs" if self.progress else None,
        )

    @property
    def n(self) -> int:
        x = self.inputs
        return len(next(iter(x.values())) if isinstance(x, Mapping) else x)

    def _run(self, model, inputs, idx):
        """``model`` on the examples ``idx`` of ``inputs`` (host tensors), moved to the device."""
        if isinstance(inputs, Mapping):
            return model(**{k: to_device(v[idx], self.device) for k, v in inputs.items()})
        return model(to_device(inputs[idx], self.device))

    def loss(self, model: nn.Module, idx: torch.Tensor) -> torch.Tensor:
        logits = _logits(self._run(model, self.inputs, idx)).float()
        idx = idx.to(self.device)
        labels = self.labels[idx] if self.labels is not None else None
        total = logits.new_zeros(())
        if "kd" in self.losses:
            total = total + self.losses["kd"] * kd_loss(
                logits, self.cache[idx], self.temperature, self.alpha, labels
            )
        if "ce" in self.losses:
            if labels is None:
                raise ValueError("the ce loss needs labels")
            total = total + self.losses["ce"] * nn.functional.cross_entropy(logits, labels)
        return total

    def accuracy(self, model: nn.Module) -> float:
        n = len(self.eval_labels)
        preds = _in_chunks(
            lambda i: _logits(self._run(model, self.eval_inputs, i)).argmax(-1), n, 256
        )
        return float((preds == self.eval_labels).float().mean())

    def evaluate(self, model: nn.Module) -> dict:
        acc = self.accuracy(model)
        return {"score": acc, "accuracy": acc}


MIN_WINDOW = 16  # tokens: a shorter trailing window of a long text is not trained on
# Consecutive windows of a long text share this fraction of their tokens. Measured by
# benchmarks/defaults_minilm.py (3,000 posts, layers 0,2,4, 2 epochs): no overlap 0.822
# held-out cosine, half 0.835 (both with dropout, hidden weight 1); with today's losses half
# 0.8429, three quarters 0.8569. A small corpus is what limits a student: more windows of it
# are more optimizer steps on new contexts, at more training time (1.7x the windows of half).
WINDOW_OVERLAP = 0.75


@dataclass
class EmbeddingTask:
    """Sentence-embedding distillation on unlabelled text: pooled-embedding loss (``embedding``:
    MSE; ``cosine``: 1 - cosine), optionally hidden-state MSE and attention KL on a layer
    mapping. The teacher's pooled embeddings are cached once when only they are needed; with
    the hidden or attention losses the teacher runs on each batch and brings them along.
    Scored by the mean cosine between student and teacher embeddings on held-out text, each
    text cut at ``max_length`` tokens as the model is used.

    ``windows``: a training text longer than ``max_length`` tokens gives one example per
    ``max_length`` window, each overlapping the one before by ``window_overlap`` (3/4),
    so all of it teaches the student, every token in several contexts, not only its first
    window (2,700 20 Newsgroups posts: 7.4 examples a text; a trailing window under 16 tokens
    is dropped)."""

    teacher: nn.Module
    tokenizer: object
    texts: Sequence[str]
    eval_texts: Sequence[str]
    losses: Mapping[str, float]
    layer_map: Sequence[tuple[int, int]] = ()  # (student layer, teacher layer)
    max_length: int = 128
    embedding_kind: str = "mse"
    projections: nn.ModuleList | None = None
    progress: bool = False
    windows: bool = False
    window_overlap: float = WINDOW_OVERLAP
    device: torch.device | str = "cpu"

    def __post_init__(self):
        self.device = torch.device(self.device)
        self.teacher.to(self.device).eval()
        self.enc = self._encode(self.texts, self.windows)
        self.eval_enc = self._encode(self.eval_texts)
        desc = "teacher outputs" if self.progress else None
        # the hidden and attention losses run the teacher on every batch, and its pooled
        # embedding comes with that run: a cache of it would be one more teacher pass
        self.cache = (
            None
            if self._teacher_per_batch
            else _in_chunks(
                lambda i: self._embed(self.teacher, self.enc, i), len(self.enc), desc=desc
            )
        )
        self.eval_cache = _in_chunks(
            lambda i: self._embed(self.teacher, self.eval_enc, i), len(self.eval_texts), desc=desc
        )

    @property
    def _teacher_per_batch(self) -> bool:
        return bool(self.layer_map) and ("hidden" in self.losses or "attention" in self.losses)

    @property
    def n(self) -> int:
        """Training examples (windows of the texts when ``windows``)."""
        return len(self.enc)

    def _encode(self, texts, windows: bool = False):
        if not windows:
            return self.tokenizer(
                list(texts), truncation=True, max_length=self.max_length, padding=False
            )["input_ids"]
        enc = self.tokenizer(
            list(texts), truncation=True, max_length=self.max_length, padding=False,
            return_overflowing_tokens=True, stride=int(self.max_length * self.window_overlap),
        )  # fmt: skip
        ids, owner = enc["input_ids"], enc["overflow_to_sample_mapping"]
        # a short tail window says little; every text keeps its first window
        first = [k == 0 or owner[k - 1] != owner[k] for k in range(len(ids))]
        return [x for x, f in zip(ids, first) if f or len(x) >= MIN_WINDOW]

    def _batch(self, enc, idx):
        feats = [{"input_ids": enc[int(i)]} for i in idx]
        return to_device(dict(self.tokenizer.pad(feats, return_tensors="pt")), self.device)

    def _embed(self, model, enc, idx, **kw):
        b = self._batch(enc, idx)
        out = model(**b, **kw)
        return mean_pool(out.last_hidden_state, b["attention_mask"])

    def loss(self, model: nn.Module, idx: torch.Tensor) -> torch.Tensor:
        need_h = "hidden" in self.losses and self.layer_map
        need_a = "attention" in self.losses and self.layer_map
        b = self._batch(self.enc, idx)
        out = model(**b, output_hidden_states=bool(need_h), output_attentions=bool(need_a))
        mask = b["attention_mask"]
        emb = mean_pool(out.last_hidden_state, mask)
        total = emb.new_zeros(())
        if self.cache is None:
            with torch.no_grad():
                t_out = self.teacher(
                    **b, output_hidden_states=bool(need_h), output_attentions=bool(need_a)
                )
            t_emb = mean_pool(t_out.last_hidden_state, mask)
        else:
            t_emb = self.cache[idx.to(self.device)]
        if "embedding" in self.losses:
            total = total + self.losses["embedding"] * embedding_loss(
                emb, t_emb, self.embedding_kind
            )
        if "cosine" in self.losses:  # 1 - cosine: the direction alone, what retrieval uses
            total = total + self.losses["cosine"] * embedding_loss(emb, t_emb, "cosine")
        if need_h or need_a:
            for k, (s_l, t_l) in enumerate(self.layer_map):
                if need_h:  # hidden_states[0] is the embeddings: layer L's output is L + 1
                    proj = self.projections[k] if self.projections is not None else None
                    total = total + self.losses["hidden"] * hidden_mse(
                        out.hidden_states[s_l + 1], t_out.hidden_states[t_l + 1], proj, mask
                    ) / len(self.layer_map)
                if need_a:
                    total = total + self.losses["attention"] * attention_kl(
                        out.attentions[s_l], t_out.attentions[t_l], mask
                    ) / len(self.layer_map)
        return total

    def evaluate(self, model: nn.Module) -> dict:
        emb = _in_chunks(lambda i: self._embed(model, self.eval_enc, i), len(self.eval_texts))
        if emb.shape[-1] != self.eval_cache.shape[-1] and self.projections is not None:
            # a narrower student is scored through its last layer's learned projection (the
            # pooled projection: the projection is linear, so it commutes with mean pooling)
            with torch.no_grad():
                emb = self.projections[-1](emb)
        cos = nn.functional.cosine_similarity(emb, self.eval_cache, dim=-1)
        return {"score": float(cos.mean()), "mean_cosine": float(cos.mean())}


def projections_for(layer_map, student_dim: int, teacher_dim: int) -> nn.ModuleList:
    return nn.ModuleList(Projection(student_dim, teacher_dim) for _ in layer_map)
