"""Distillation losses. Each takes student and teacher tensors and returns a scalar.

- :func:`kd_loss`: Hinton et al. 2015, "Distilling the Knowledge in a Neural Network":
  ``alpha * T^2 * KL(p_T || q_T) + (1 - alpha) * CE(student, labels)``, where p_T and q_T are the
  teacher's and the student's softmax at temperature T. The T^2 keeps the soft term's gradient
  on the same scale as the hard term's when T changes (the soft gradients scale as 1/T^2).
  KL is averaged over the batch (``batchmean``), not over classes: averaging over classes, a
  common slip, divides the loss by the number of classes.
- :func:`hidden_mse`: MSE between hidden states, through a learned projection when widths
  differ (TinyBERT, Jiao et al. 2020).
- :func:`attention_kl`: KL between attention distributions per head (MiniLM, Wang et al. 2020).
- :func:`embedding_loss`: MSE or 1 - cosine between pooled sentence embeddings; needs no labels.

Every loss computes in fp32 whatever its inputs' dtype: under bf16/fp16 autocast the model's
outputs arrive in half precision, and a softmax at temperature T in fp16 loses the soft targets
(the small probabilities underflow), so each loss casts its inputs to float32 first.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 2.0,
    alpha: float = 1.0,
    labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """Soft-label KD mixed with hard-label cross-entropy (``alpha`` = weight of the soft part).

    Without labels the hard part is dropped and the soft part keeps its full weight.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    t = temperature
    student_logits = student_logits.float()
    log_q = F.log_softmax(student_logits / t, dim=-1)
    log_p = F.log_softmax(teacher_logits.detach().float() / t, dim=-1)
    soft = F.kl_div(log_q, log_p, reduction="batchmean", log_target=True) * (t * t)
    if labels is None:
        return soft
    hard = F.cross_entropy(student_logits, labels)
    return alpha * soft + (1 - alpha) * hard


class Projection(nn.Module):
    """Learned linear map from the student's width to the teacher's (identity when equal)."""

    def __init__(self, student_dim: int, teacher_dim: int):
        super().__init__()
        self.proj = nn.Linear(student_dim, teacher_dim) if student_dim != teacher_dim else None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h if self.proj is None else self.proj(h)


def hidden_mse(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    projection: Projection | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """MSE between hidden states (batch, seq, dim); padded positions (mask 0) are ignored."""
    s = projection(student_hidden) if projection is not None else student_hidden
    s, t = s.float(), teacher_hidden.detach().float()
    if s.shape != t.shape:
        raise ValueError(
            f"hidden state shapes differ: student {tuple(s.shape)} vs teacher {tuple(t.shape)}; "
            "a projection is needed"
        )
    err = (s - t).pow(2).mean(dim=-1)
    if mask is None:
        return err.mean()
    m = mask.to(err.dtype)
    return (err * m).sum() / m.sum().clamp(min=1)


def attention_kl(
    student_attn: torch.Tensor, teacher_attn: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """KL(teacher || student) between attention distributions (batch, heads, q, k), averaged
    over heads and real query positions. Head counts must match."""
    if student_attn.shape != teacher_attn.shape:
        raise ValueError(
            f"attention shapes differ: student {tuple(student_attn.shape)} vs teacher "
            f"{tuple(teacher_attn.shape)}; attention transfer needs the same heads and length"
        )
    eps = 1e-12
    p = teacher_attn.detach().float().clamp(min=eps)
    q = student_attn.float().clamp(min=eps)
    kl = (p * (p.log() - q.log())).sum(dim=-1)  # (batch, heads, q)
    if mask is None:
        return kl.mean()
    m = mask[:, None, :].to(kl.dtype).expand_as(kl)
    return (kl * m).sum() / m.sum().clamp(min=1)


def embedding_loss(
    student_emb: torch.Tensor, teacher_emb: torch.Tensor, kind: str = "mse"
) -> torch.Tensor:
    """MSE, or 1 - cosine similarity, between pooled embeddings (batch, dim)."""
    student_emb, t = student_emb.float(), teacher_emb.detach().float()
    if kind == "mse":
        return F.mse_loss(student_emb, t)
    if kind == "cosine":
        return (1 - F.cosine_similarity(student_emb, t, dim=-1)).mean()
    raise ValueError(f"embedding loss must be mse or cosine, got {kind!r}")
