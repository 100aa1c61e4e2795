"""Structured and unstructured pruning on the torch side.

*What* to prune (importance), *how* to cut (the surgery) and *when* (the schedule, in
``stages/prune.py``) are kept apart:

- Transformers (BERT family: ``attention.self.{query,key,value}``, ``attention.output.dense``,
  ``intermediate.dense``, ``output.dense``): attention heads and FFN neurons are removed for real
  (smaller Linear weights, fewer heads); whole layers are dropped.
  Importance is ``gradient`` (Michel et al. 2019: the expected absolute derivative of a loss with
  respect to a gate on the head's or neuron's output, accumulated from activation x gradient on a
  data sample) or ``magnitude`` (the norm of the value path times the norm of the output columns:
  a head or neuron whose output weights are zero scores zero under both).
- CNNs: channel pruning through Torch-Pruning's dependency graph (DepGraph), which keeps
  residual additions, BatchNorm, grouped and depthwise convolutions consistent.
- Unstructured magnitude pruning with ``torch.nn.utils.prune`` (global or per layer), made
  permanent. Zeros do not make a dense runtime faster: they only compress.

A pruned model no longer matches the shapes its config or factory builds, so the shapes travel
with it: :func:`module_shapes` records every resized module, and :func:`restore_shapes`
resizes a freshly built model before its weights are loaded.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from deployopt.errors import ConfigError

# ------------------------------------------------------------------ transformer layout


@dataclass
class Block:
    """One BERT-style transformer layer's prunable Linear layers."""

    index: int
    attn: nn.Module  # the self-attention module (query, key, value; num_attention_heads)
    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    o: nn.Linear  # attention output projection
    ffn_in: nn.Linear
    ffn_out: nn.Linear
    head_dim: int

    @property
    def heads(self) -> int:
        return self.q.out_features // self.head_dim

    @property
    def ffn(self) -> int:
        return self.ffn_in.out_features


def blocks(model: nn.Module) -> list[Block]:
    """The transformer layers of a BERT-family model, or a ConfigError saying what is missing."""
    from deployopt.torchside.students import _layer_list

    _, _, layers = _layer_list(model)
    cfg = getattr(model, "config", None)
    out = []
    for i, layer in enumerate(layers):
        try:
            attn = layer.attention.self
            q, k, v = attn.query, attn.key, attn.value
            o = layer.attention.output.dense
            f_in, f_out = layer.intermediate.dense, layer.output.dense
        except AttributeError:
            raise ConfigError(
                f"{type(model).__name__}: layer {i} is not BERT-style "
                "(attention.self.query/key/value, attention.output.dense, intermediate.dense, "
                "output.dense)",
                hint="transformer pruning supports the BERT family (BERT, RoBERTa, MiniLM, ...)",
            ) from None
        head_dim = getattr(attn, "attention_head_size", None)
        if head_dim is None and cfg is not None:
            head_dim = cfg.hidden_size // cfg.num_attention_heads
        out.append(Block(i, attn, q, k, v, o, f_in, f_out, int(head_dim)))
    return out


# ------------------------------------------------------------------ importance


def _head_view(t: torch.Tensor, head_dim: int) -> torch.Tensor:
    """(..., heads * head_dim) -> (..., heads, head_dim)."""
    return t.reshape(*t.shape[:-1], -1, head_dim)


def magnitude_importance(bl: Sequence[Block]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer: head scores (||value rows|| x ||output columns||) and FFN neuron scores
    (||input row|| x ||output column||)."""
    heads, ffn = [], []
    with torch.no_grad():
        for b in bl:
            v = _head_view(b.v.weight.T, b.head_dim).pow(2).sum((0, 2)).sqrt()
            o = _head_view(b.o.weight, b.head_dim).pow(2).sum((0, 2)).sqrt()
            heads.append(v * o)
            ffn.append(b.ffn_in.weight.norm(dim=1) * b.ffn_out.weight.norm(dim=0))
    return heads, ffn


def gradient_importance(
    model: nn.Module,
    bl: Sequence[Block],
    batches: Iterable,
    loss_fn: Callable[[nn.Module, object], torch.Tensor],
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Michel et al. (2019): I_h = E_x |dL(x)/d xi_h| for a gate xi_h = 1 on each head's output
    (and each FFN neuron's), computed as the sum over tokens and the head's dimensions of
    activation x gradient, made absolute per example. ``loss_fn(model, batch)`` returns the
    per-example losses summed (so one example's gradient holds only its own loss)."""
    # the scores accumulate on the model's device (activations and gradients live there)
    heads = [torch.zeros(b.heads, device=b.q.weight.device) for b in bl]
    ffn = [torch.zeros(b.ffn, device=b.ffn_in.weight.device) for b in bl]
    handles = []

    def grab(store: list, index: int, per: int | None):
        def hook(tensor: torch.Tensor):
            act = tensor.detach()

            def on_grad(g: torch.Tensor):
                prod = act * g
                if per is not None:
                    prod = _head_view(prod, per).sum(-1)  # (batch, seq, heads)
                store[index] += prod.sum(1).abs().sum(0).detach()

            tensor.register_hook(on_grad)

        return hook

    for i, b in enumerate(bl):
        pre = grab(heads, i, b.head_dim)
        handles.append(b.o.register_forward_pre_hook(lambda m, a, f=pre: f(a[0])))
        post = grab(ffn, i, None)
        handles.append(b.ffn_out.register_forward_pre_hook(lambda m, a, f=post: f(a[0])))
    was_training = model.training
    model.eval()
    needs = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(True)
    try:
        for batch in batches:
            model.zero_grad(set_to_none=True)
            loss_fn(model, batch).backward()
    finally:
        for h in handles:
            h.remove()
        model.zero_grad(set_to_none=True)
        for p, n in zip(model.parameters(), needs):
            p.requires_grad_(n)
        model.train(was_training)
    return heads, ffn


# ------------------------------------------------------------------ planning


def count_to_remove(ratio: float, total: int, what: str) -> int:
    check_ratio(ratio, what)
    return min(total, int(round(ratio * total)))


def check_ratio(ratio: float, what: str) -> None:
    if not (isinstance(ratio, (int, float)) and 0 < ratio < 1) or math.isnan(ratio):
        raise ConfigError(
            f"--{what} {ratio}: a pruning ratio must be between 0 and 1 (exclusive)",
            hint=f"e.g. --{what} 0.33 removes a third",
        )


def plan_removal(
    scores: Sequence[torch.Tensor], ratio: float, what: str, scope: str = "layer"
) -> list[list[int]]:
    """Which units to remove in each layer: the lowest-scoring ``ratio`` of each layer
    (``scope="layer"``: every layer keeps the same count, which keeps fused kernels uniform) or of
    all layers together (``"global"``, scores normalised per layer as in Michel et al.). A plan
    that would empty a layer is refused."""
    check_ratio(ratio, what)
    if scope == "layer":
        plan = []
        for s in scores:
            n = count_to_remove(ratio, len(s), what)
            plan.append(sorted(torch.argsort(s, stable=True)[:n].tolist()))
    elif scope == "global":
        norm = [s / s.norm().clamp(min=1e-12) for s in scores]
        flat = torch.cat(norm)
        n = count_to_remove(ratio, len(flat), what)
        cut = set(torch.argsort(flat, stable=True)[:n].tolist())
        plan, start = [], 0
        for s in norm:
            plan.append([i for i in range(len(s)) if start + i in cut])
            start += len(s)
    else:
        raise ConfigError(f"unknown pruning scope {scope!r}", hint="choose layer or global")
    for layer, (s, rm) in enumerate(zip(scores, plan)):
        if len(rm) >= len(s):
            raise ConfigError(
                f"--{what} {ratio} would remove all {len(s)} {what} of layer {layer}",
                hint="lower the ratio, or drop the layer with --drop-layers",
            )
    return plan


# ------------------------------------------------------------------ surgery


def _keep_linear(lin: nn.Linear, keep: torch.Tensor, dim: int) -> nn.Linear:
    """A new Linear keeping ``keep`` output rows (dim 0) or input columns (dim 1)."""
    keep = keep.to(lin.weight.device)
    w = lin.weight.detach().index_select(dim, keep).clone()
    new = nn.Linear(
        w.shape[1], w.shape[0], bias=lin.bias is not None, device=w.device, dtype=w.dtype
    )
    with torch.no_grad():
        new.weight.copy_(w)
        if lin.bias is not None:
            new.bias.copy_(lin.bias.detach() if dim == 1 else lin.bias.detach()[keep])
    new.train(lin.training)
    return new


def _replace(root: nn.Module, old: nn.Module, new: nn.Module) -> None:
    for parent in root.modules():
        for name, child in parent.named_children():
            if child is old:
                setattr(parent, name, new)
                return
    raise RuntimeError("module to replace not found")  # internal: blocks() found it


def prune_heads(model: nn.Module, remove: Sequence[Sequence[int]]) -> None:
    """Remove heads ``remove[layer]`` from every layer, in place."""
    for b, rm in zip(blocks(model), remove):
        if not rm:
            continue
        keep_h = [h for h in range(b.heads) if h not in set(rm)]
        if not keep_h:
            raise ConfigError(f"cannot remove every head of layer {b.index}")
        idx = torch.tensor(
            [h * b.head_dim + j for h in keep_h for j in range(b.head_dim)], dtype=torch.long
        )
        for name in ("query", "key", "value"):
            setattr(b.attn, name, _keep_linear(getattr(b.attn, name), idx, 0))
        _replace(model, b.o, _keep_linear(b.o, idx, 1))
        b.attn.num_attention_heads = len(keep_h)
        b.attn.all_head_size = len(keep_h) * b.head_dim


def prune_ffn(model: nn.Module, remove: Sequence[Sequence[int]]) -> None:
    """Remove FFN neurons ``remove[layer]`` from every layer, in place."""
    for b, rm in zip(blocks(model), remove):
        if not rm:
            continue
        keep = torch.tensor([i for i in range(b.ffn) if i not in set(rm)], dtype=torch.long)
        if len(keep) == 0:
            raise ConfigError(f"cannot remove every FFN neuron of layer {b.index}")
        _replace(model, b.ffn_in, _keep_linear(b.ffn_in, keep, 0))
        _replace(model, b.ffn_out, _keep_linear(b.ffn_out, keep, 1))


def transformer_shape(model: nn.Module) -> dict:
    """What the config cannot say: heads and FFN width per layer."""
    bl = blocks(model)
    return {
        "heads_per_layer": [b.heads for b in bl],
        "head_dim": bl[0].head_dim if bl else None,
        "ffn_per_layer": [b.ffn for b in bl],
    }


# ------------------------------------------------------------------ shapes on disk

_SHAPE_ATTRS = {
    nn.Linear: ("in_features", "out_features"),
    nn.Conv1d: ("in_channels", "out_channels", "groups"),
    nn.Conv2d: ("in_channels", "out_channels", "groups"),
    nn.Conv3d: ("in_channels", "out_channels", "groups"),
    nn.BatchNorm1d: ("num_features",),
    nn.BatchNorm2d: ("num_features",),
    nn.BatchNorm3d: ("num_features",),
    nn.LayerNorm: ("normalized_shape",),
    nn.GroupNorm: ("num_groups", "num_channels"),
}
_EXTRA_ATTRS = ("num_attention_heads", "all_head_size")  # HF attention modules


def module_shapes(model: nn.Module) -> dict[str, dict]:
    """Every module's shape-bearing attributes, by module name (JSON-safe)."""
    out = {}
    for name, m in model.named_modules():
        attrs = {}
        for a in _SHAPE_ATTRS.get(type(m), ()):
            val = getattr(m, a)
            attrs[a] = list(val) if isinstance(val, tuple) else val
        for a in _EXTRA_ATTRS:
            if isinstance(getattr(m, a, None), int):
                attrs[a] = getattr(m, a)
        if attrs:
            out[name] = attrs
    return out


def restore_shapes(model: nn.Module, shapes: dict[str, dict], state: dict) -> None:
    """Resize a freshly built ``model`` to a pruned one's ``shapes`` so that ``state`` (its
    state dict) loads strictly: every parameter and buffer whose saved shape differs is
    replaced by an empty tensor of that shape; shape attributes are set from ``shapes``."""
    modules = dict(model.named_modules())
    for name, attrs in shapes.items():
        m = modules.get(name)
        if m is None:
            raise ConfigError(f"the saved shapes name a module {name!r} the model does not have")
        for a, val in attrs.items():
            setattr(m, a, tuple(val) if isinstance(val, list) else val)
    for key, tensor in state.items():
        mod_name, _, attr = key.rpartition(".")
        m = modules.get(mod_name)
        if m is None:
            continue  # load_state_dict(strict=True) will name it
        cur = getattr(m, attr, None)
        if isinstance(cur, torch.Tensor) and tuple(cur.shape) != tuple(tensor.shape):
            empty = torch.empty(tensor.shape, dtype=cur.dtype, device=cur.device)
            if isinstance(cur, nn.Parameter):
                m._parameters[attr] = nn.Parameter(empty, requires_grad=cur.requires_grad)
            else:
                m._buffers[attr] = empty


# ------------------------------------------------------------------ CNN channels


def prune_channels(
    model: nn.Module,
    example: torch.Tensor,
    ratio: float,
    importance: str = "magnitude",
    grad_batches: Iterable | None = None,
    loss_fn: Callable[[nn.Module, object], torch.Tensor] | None = None,
    global_pruning: bool = False,
) -> int:
    """Remove ``ratio`` of the channels of every prunable group (Torch-Pruning's DepGraph keeps
    coupled layers consistent); the final classifier's outputs are kept. Returns the number of
    parameters removed."""
    import torch_pruning as tp

    check_ratio(ratio, "channels")
    if importance == "gradient":
        imp = tp.importance.GroupTaylorImportance()
    elif importance == "magnitude":
        imp = tp.importance.GroupMagnitudeImportance(p=2)
    else:
        raise ConfigError(f"unknown importance {importance!r}", hint="magnitude or gradient")
    first = next(model.parameters(), None)
    if first is not None:
        example = example.to(first.device)  # DepGraph traces the model on its own device
    last = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    ignored = last[-1:]  # the output layer: its outputs are the classes
    before = sum(p.numel() for p in model.parameters())
    model.eval()
    pruner = tp.pruner.MetaPruner(
        model,
        example,
        importance=imp,
        pruning_ratio=ratio,
        ignored_layers=ignored,
        global_pruning=global_pruning,
    )
    if importance == "gradient":
        if grad_batches is None or loss_fn is None:
            raise ConfigError("gradient importance needs data", hint="pass --data")
        model.zero_grad(set_to_none=True)
        for batch in grad_batches:
            loss_fn(model, batch).backward()
    pruner.step()
    model.zero_grad(set_to_none=True)
    return before - sum(p.numel() for p in model.parameters())


def conv_channels(model: nn.Module) -> list[int]:
    return [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]


# ------------------------------------------------------------------ unstructured


def prunable_weights(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """The weights unstructured pruning acts on: Linear and Conv weights (not embeddings,
    norms or biases)."""
    kinds = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
    return [(m, "weight") for m in model.modules() if isinstance(m, kinds)]


def prune_unstructured(model: nn.Module, ratio: float, scope: str = "global") -> dict:
    """Zero the ``ratio`` smallest-magnitude weights, over all prunable weights together
    (``global``) or in each layer (``layer``), and make it permanent."""
    from torch.nn.utils import prune

    check_ratio(ratio, "unstructured")
    params = prunable_weights(model)
    if not params:
        raise ConfigError("the model has no Linear or Conv weights to prune")
    if scope == "global":
        prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=ratio)
    elif scope == "layer":
        for m, n in params:
            prune.l1_unstructured(m, n, amount=ratio)
    else:
        raise ConfigError(f"unknown pruning scope {scope!r}", hint="choose layer or global")
    for m, n in params:
        prune.remove(m, n)
    return sparsity(model)


def sparsity(model: nn.Module) -> dict:
    params = prunable_weights(model)
    total = sum(getattr(m, n).numel() for m, n in params)
    zeros = sum(int((getattr(m, n) == 0).sum()) for m, n in params)
    return {"weights": total, "zeros": zeros, "sparsity": zeros / max(1, total)}
