"""Wrap models so that export sees positional tensor inputs and a tuple of named outputs."""

from __future__ import annotations

import torch
from torch import nn

POOLINGS = ("mean", "cls", "none")


class HFTextWrapper(nn.Module):
    """A transformers text model called with positional inputs in ``input_names`` order.

    Outputs: ``sentence_embedding`` for a pooled feature extractor (mean pooling over real
    tokens, as sentence-transformers does), ``last_hidden_state`` unpooled, ``logits`` for
    classifiers.
    """

    def __init__(self, model: nn.Module, input_names: list[str], output: str, pooling: str):
        super().__init__()
        self.model = model
        self.input_names = list(input_names)
        self.output = output
        self.pooling = pooling

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        kwargs = dict(zip(self.input_names, inputs))
        out = self.model(**kwargs)
        if self.output == "logits":
            return out.logits
        hidden = out.last_hidden_state
        if self.pooling == "mean":
            mask = kwargs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        if self.pooling == "cls":
            return hidden[:, 0]
        return hidden


class HFImageWrapper(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).logits


class TupleOutputWrapper(nn.Module):
    """A user module whose output may be a tensor, tuple/list or dict: always return a tuple."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *inputs: torch.Tensor):
        out = self.model(*inputs)
        if isinstance(out, torch.Tensor):
            return (out,)
        if isinstance(out, dict):
            return tuple(out.values())
        return tuple(out)
