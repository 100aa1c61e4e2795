"""Student construction for distillation.

(a) :func:`select_layers`: a copy of the teacher keeping a chosen list of its transformer layers
    (DistilBERT's initialisation): embeddings, kept layers and pooler/head weights copied.
(b) :func:`smaller_config`: the same architecture with fewer layers, heads, hidden or FFN size,
    freshly initialised.
(c) the user's own module (a factory), used as is.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

from torch import nn

from deployopt.errors import ConfigError


def _layer_list(model: nn.Module) -> tuple[nn.Module, str, nn.ModuleList]:
    """The ModuleList holding a transformer's layers: (owner, attribute name, list)."""
    for owner_path in (
        "encoder",
        "bert.encoder",
        "roberta.encoder",
        "distilbert.transformer",
        "transformer",
        "model.encoder",
    ):
        owner = model
        try:
            for part in owner_path.split("."):
                owner = getattr(owner, part)
        except AttributeError:
            continue
        for attr in ("layer", "layers"):
            layers = getattr(owner, attr, None)
            if isinstance(layers, nn.ModuleList):
                return owner, attr, layers
    raise ConfigError(
        f"{type(model).__name__}: no transformer layer list found (encoder.layer)",
        hint="layer selection supports BERT-family models; pass --student for other models",
    )


def num_layers(model: nn.Module) -> int:
    return len(_layer_list(model)[2])


def parse_layers(text: str | Sequence[int], total: int) -> list[int]:
    """``"0,2,4"`` or ``[0, 2, 4]`` -> sorted unique layer indices, checked against ``total``."""
    try:
        idx = [
            int(x) for x in (text.split(",") if isinstance(text, str) else text) if str(x).strip()
        ]
    except ValueError:
        raise ConfigError(f"bad layer list {text!r}", hint="write e.g. 0,2,4") from None
    bad = [i for i in idx if not 0 <= i < total]
    if not idx or bad:
        raise ConfigError(
            f"layer list {text!r} is empty or out of range (the teacher has layers 0-{total - 1})"
        )
    return sorted(set(idx))


def every_kth(total: int, keep: int) -> list[int]:
    """``keep`` layers spread evenly from the first to the last (6 layers, keep 3 -> 0, 2, 5)."""
    if not 1 <= keep <= total:
        raise ConfigError(f"cannot keep {keep} of {total} layers")
    if keep == 1:
        return [total - 1]
    return sorted({round(i * (total - 1) / (keep - 1)) for i in range(keep)})


def select_layers(teacher: nn.Module, layers: Sequence[int]) -> nn.Module:
    """A deep copy of ``teacher`` with only ``layers`` kept (weights copied); the config, when the
    model has one, says the new depth so the student saves and reloads as an HF folder."""
    student = copy.deepcopy(teacher)
    owner, attr, old = _layer_list(student)
    setattr(owner, attr, nn.ModuleList([old[i] for i in layers]))
    cfg = getattr(student, "config", None)
    if cfg is not None and hasattr(cfg, "num_hidden_layers"):
        cfg.num_hidden_layers = len(layers)
        if getattr(cfg, "layer_types", None):
            cfg.layer_types = [cfg.layer_types[i] for i in layers]
    for i, layer in enumerate(getattr(owner, attr)):  # attention layer indices, for KV caches
        attn = getattr(layer, "attention", None)
        if attn is not None and hasattr(getattr(attn, "self", None), "layer_idx"):
            attn.self.layer_idx = i
    return student


def smaller_config(config, **changes):
    """A copy of an HF config with fewer layers/heads/hidden/FFN (``num_hidden_layers=3``,
    ``num_attention_heads=4``, ``hidden_size=256``, ``intermediate_size=1024``)."""
    known = {"num_hidden_layers", "num_attention_heads", "hidden_size", "intermediate_size"}
    unknown = set(changes) - known
    if unknown:
        raise ConfigError(f"unknown student size field(s): {', '.join(sorted(unknown))}")
    new = copy.deepcopy(config)
    for k, v in changes.items():
        if v is not None:
            if v < 1:
                raise ConfigError(f"{k} must be >= 1, got {v}")
            setattr(new, k, int(v))
    if new.hidden_size % new.num_attention_heads:
        raise ConfigError(
            f"hidden_size {new.hidden_size} is not divisible by {new.num_attention_heads} heads"
        )
    return new
