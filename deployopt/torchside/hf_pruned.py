"""Pruned BERT-family models that transformers rebuilds, with no remote code.

A pruned layer keeps fewer attention heads (of the same head size) and a narrower FFN than the
config's ``num_attention_heads`` and ``intermediate_size`` say, and transformers 5 has no
``pruned_heads``: ``AutoModel.from_pretrained`` of such a folder fails with a size mismatch
(issue 12, finding 8). So each supported architecture gets here

- a config class, model type ``deployopt_pruned_<type>`` (``deployopt_pruned_bert``, ...),
  that records the sizes per layer: ``heads_per_layer``, ``ffn_per_layer`` and ``head_dim``;
- model classes (``PrunedBertModel``, ``PrunedBertForSequenceClassification``,
  ``PrunedBertForTokenClassification``, ...) that build exactly those sizes.

Importing this module registers them with AutoConfig, AutoModel,
AutoModelForSequenceClassification, AutoModelForTokenClassification and AutoTokenizer, so the
Auto classes, and sentence-transformers, load a pruned folder::

    import deployopt.torchside.hf_pruned  # registers model type deployopt_pruned_bert, ...
    from transformers import AutoModel

    model = AutoModel.from_pretrained("pruned")

Without the import, transformers says it does not recognise model type
``deployopt_pruned_bert``. A pruned model whose sizes a plain config can still describe (only
layers dropped, or the same FFN width in every layer with all heads kept) is saved as the plain
architecture, which loads anywhere. :func:`for_saving` picks the form; :func:`readme` writes
the README.md that says, in the folder, what loads it.
"""

from __future__ import annotations

import json
from pathlib import Path

import transformers
from torch import nn
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING,
    MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING,
    MODEL_MAPPING,
)
from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING

from deployopt.errors import ConfigError
from deployopt.torchside import pruning

PREFIX = "deployopt_pruned_"
IMPORT = "import deployopt.torchside.hf_pruned"
# transformers model types whose layers are BERT-style (attention.self.query/key/value,
# attention.output.dense, intermediate.dense, output.dense): the layout pruning.blocks() cuts
BASE_TYPES = (
    "bert", "roberta", "xlm-roberta", "camembert", "electra", "data2vec-text", "ernie",
    "megatron-bert", "xlm-roberta-xl", "roc_bert",
)  # fmt: skip
_AUTO = (
    ("AutoModel", MODEL_MAPPING),
    ("AutoModelForSequenceClassification", MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING),
    ("AutoModelForTokenClassification", MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING),
)
_PRUNED: dict[type, type] = {}  # base model class -> its pruned class
_AUTO_OF: dict[type, str] = {}  # base model class -> the Auto class that loads it
CONFIGS: dict[str, type] = {}  # base model type -> pruned config class

__all__ = ["BASE_TYPES", "CONFIGS", "for_saving", "is_pruned_config", "readme", "register"]


# ------------------------------------------------------------------ classes


def _config_class(base_type: str, base: type) -> type:
    ns = {
        "__module__": __name__,
        "__qualname__": "Pruned" + base.__name__,
        "__doc__": f"{base.__name__} plus the sizes of a pruned model's layers: "
        "heads_per_layer, ffn_per_layer and head_dim (deployopt).",
        "__annotations__": {
            "heads_per_layer": list[int] | None,
            "ffn_per_layer": list[int] | None,
            "head_dim": int | None,
        },
        "model_type": PREFIX + base_type,
        "pruned_from": base_type,
        "heads_per_layer": None,
        "ffn_per_layer": None,
        "head_dim": None,
    }
    return type("Pruned" + base.__name__, (base,), ns)


def _sizes(config, layers: int) -> tuple[list[int], list[int], int]:
    head_dim = config.head_dim or config.hidden_size // config.num_attention_heads
    heads = list(config.heads_per_layer or [config.num_attention_heads] * layers)
    ffn = list(config.ffn_per_layer or [config.intermediate_size] * layers)
    if len(heads) != layers or len(ffn) != layers:
        raise ValueError(
            f"{config.model_type} config: heads_per_layer ({len(heads)}) and ffn_per_layer "
            f"({len(ffn)}) must give one entry for each of the {layers} layers"
        )
    return heads, ffn, head_dim


def _resize(model: nn.Module, config) -> None:
    """Give every layer of a freshly built ``model`` the sizes ``config`` records (new, not yet
    initialised Linear layers where they differ)."""
    from deployopt.torchside.students import _layer_list

    _, _, layers = _layer_list(model)
    heads, ffn, d = _sizes(config, len(layers))

    def linear(old: nn.Linear, n_in: int, n_out: int) -> nn.Linear:
        return nn.Linear(n_in, n_out, bias=old.bias is not None)

    for layer, h, f in zip(layers, heads, ffn):
        attn, out = layer.attention.self, layer.attention.output
        hidden = attn.query.in_features
        if h * d != attn.query.out_features:
            for name in ("query", "key", "value"):
                setattr(attn, name, linear(getattr(attn, name), hidden, h * d))
            out.dense = linear(out.dense, h * d, out.dense.out_features)
        attn.num_attention_heads, attn.attention_head_size, attn.all_head_size = h, d, h * d
        if f != layer.intermediate.dense.out_features:
            layer.intermediate.dense = linear(layer.intermediate.dense, hidden, f)
            layer.output.dense = linear(layer.output.dense, f, layer.output.dense.out_features)


def _model_class(base: type, config_class: type) -> type:
    def __init__(self, config, *args, **kwargs):
        base.__init__(self, config, *args, **kwargs)
        _resize(self, config)
        self.init_weights()  # initialises only the new layers (the rest are marked done)

    ns = {
        "__module__": __name__,
        "__qualname__": "Pruned" + base.__name__,
        "__doc__": f"{base.__name__} with the per-layer head counts and FFN sizes of "
        f"{config_class.__name__} (a model pruned by deployopt).",
        "__init__": __init__,
        "config_class": config_class,
    }
    return type("Pruned" + base.__name__, (base,), ns)


def register() -> None:
    """Register the pruned config and model classes with transformers' Auto classes (done on
    import; calling it again does nothing)."""
    from transformers import AutoConfig, AutoTokenizer

    for base_type in BASE_TYPES:
        if base_type in CONFIGS or base_type not in transformers.CONFIG_MAPPING:
            continue
        base_cfg = transformers.CONFIG_MAPPING[base_type]
        cfg_cls = _config_class(base_type, base_cfg)
        AutoConfig.register(cfg_cls.model_type, cfg_cls, exist_ok=True)
        globals()[cfg_cls.__name__] = cfg_cls
        for auto_name, mapping in _AUTO:
            if base_cfg not in mapping:
                continue
            model_cls = _model_class(mapping[base_cfg], cfg_cls)
            getattr(transformers, auto_name).register(cfg_cls, model_cls, exist_ok=True)
            globals()[model_cls.__name__] = model_cls
            _PRUNED[mapping[base_cfg]] = model_cls
            _AUTO_OF[mapping[base_cfg]] = auto_name
        if base_cfg in TOKENIZER_MAPPING:  # folders whose tokenizer_config names no class
            AutoTokenizer.register(cfg_cls, TOKENIZER_MAPPING[base_cfg], exist_ok=True)
        CONFIGS[base_type] = cfg_cls


def is_pruned_config(config) -> bool:
    return str(getattr(config, "model_type", "")).startswith(PREFIX)


# ------------------------------------------------------------------ saving


def _base_class(model: nn.Module) -> type:
    cls = type(model)
    return cls.__mro__[1] if cls in _PRUNED.values() else cls


def for_saving(model: nn.Module) -> tuple[nn.Module, str]:
    """The model to ``save_pretrained`` and the form it has on disk:

    - ``"plain"``: the sizes fit the architecture's own config (``intermediate_size`` is set to
      the FFN width when every layer has the same); ``model`` itself, loads anywhere;
    - ``"pruned"``: an instance of the architecture's pruned class, built from a config that
      records every layer's sizes, holding ``model``'s weights (``model`` is left as it is;
      a model that already is one has its config brought up to date and is returned);
    - ``"unsupported"``: ``model`` itself; an architecture with no pruned class here (the
      caller records the module shapes instead, which only deployopt reads back).
    """
    cfg = getattr(model, "config", None)
    try:
        shape = pruning.transformer_shape(model)
    except (ConfigError, AttributeError, TypeError):  # not BERT-style: nothing to describe
        return model, "plain"
    heads, ffn, d = shape["heads_per_layer"], shape["ffn_per_layer"], shape["head_dim"]
    if type(model) in _PRUNED.values():
        cfg.heads_per_layer, cfg.ffn_per_layer, cfg.head_dim = heads, ffn, d
        cfg.num_hidden_layers = len(heads)
        return model, "pruned"
    full = cfg.num_attention_heads
    if d * full == cfg.hidden_size and set(heads) == {full} and len(set(ffn)) <= 1:
        if ffn:
            cfg.intermediate_size = ffn[0]
        return model, "plain"
    pruned_cls = _PRUNED.get(type(model))
    if pruned_cls is None:
        if len(set(ffn)) == 1:
            cfg.intermediate_size = ffn[0]
        return model, "unsupported"
    values = {k: v for k, v in cfg.to_dict().items() if k not in ("model_type", "architectures")}
    if len(set(ffn)) == 1:
        values["intermediate_size"] = ffn[0]
    new_cfg = pruned_cls.config_class.from_dict(
        {**values, "heads_per_layer": heads, "ffn_per_layer": ffn, "head_dim": d}
    )
    new_cfg._attn_implementation = getattr(cfg, "_attn_implementation", None) or "eager"
    new = pruned_cls(new_cfg)
    state = model.state_dict()
    new.load_state_dict(state, strict=True)  # the config rebuilds every shape, or this raises
    first = next(iter(state.values()), None)
    if first is not None:
        new.to(first.dtype)
    return new.eval() if not model.training else new, "pruned"


# ------------------------------------------------------------------ the folder's README


def readme(
    model: nn.Module, form: str, folder: Path, *, sentence_transformers: bool, summary: str = ""
) -> str:
    """The README.md of a folder that ``deployopt prune`` writes: what it holds, the code that
    loads it (copy-paste, with the folder's final path ``folder``), and what does not load it.
    ``model`` and ``form`` are what :func:`for_saving` returned."""
    folder = Path(folder).resolve()
    cfg = model.config
    has_st = sentence_transformers
    base = _base_class(model)
    auto = _AUTO_OF.get(base, "AutoModel")
    cls = "Pruned" + base.__name__ if form == "pruned" else base.__name__
    shape = pruning.transformer_shape(model) if form != "plain" else None
    base_type = getattr(cfg, "pruned_from", None) or cfg.model_type
    path = json.dumps(str(folder))
    lines = [
        f"# {folder.name}: a {base_type} model pruned by deployopt",
        "",
        f"Written by `deployopt prune`{f' ({summary})' if summary else ''}. "
        "`prune_report.json` says what was removed and how well the model matches the "
        "original; `config.json` carries the lineage (`deployopt_lineage`).",
        "",
    ]
    if shape is not None:
        lines += [
            f"Heads per layer: {shape['heads_per_layer']} (of {shape['head_dim']} dims each); "
            f"FFN width per layer: {shape['ffn_per_layer']}.",
            "",
        ]
    if form == "pruned":
        lines += _pruned_section(cfg, auto, cls, path, has_st)
    elif form == "plain":
        lines += _plain_section(cfg, auto, path, has_st)
    else:
        lines += _deployopt_only_section(cfg, path)
    lines += [
        "## deployopt",
        "",
        "```sh",
        f"deployopt optimize {folder} -o OUT",
        "```",
        "",
        "exports this folder to ONNX (its tokenizer files make the evaluation inputs), builds "
        "and checks the optimised variants, and ships the fastest to OUT.",
        "",
    ]
    return "\n".join(lines)


def _pruned_section(cfg, auto: str, cls: str, path: str, has_st: bool) -> list[str]:
    lines = [
        "## Load it",
        "",
        f"The layers no longer have the sizes a `{cfg.pruned_from}` config builds, so the model "
        f"is saved as model type `{cfg.model_type}`: deployopt's own classes, which record the "
        "heads and FFN width of every layer. Importing `deployopt.torchside.hf_pruned` "
        "registers them with transformers' Auto classes (no `trust_remote_code`: no code is "
        "read from this folder). It needs `pip install deployopt` (with torch and "
        "transformers).",
        "",
        *_auto_snippet(
            auto, path, f"{IMPORT}  # registers model type {cfg.model_type} with transformers"
        ),
        f"The class itself works too: `from deployopt.torchside.hf_pruned import {cls}` and "
        f"`{cls}.from_pretrained(folder)`.",
        "",
    ]
    if has_st:
        lines += [
            "sentence-transformers loads it as well, after the same import:",
            "",
            "```python",
            f"{IMPORT}",
            "from sentence_transformers import SentenceTransformer",
            "",
            f"folder = {path}",
            "encoder = SentenceTransformer(folder)",
            "```",
            "",
        ]
    lines += [
        "## What does not load it",
        "",
        f"- `{auto}.from_pretrained(folder)` (or sentence-transformers) *without* "
        f"`{IMPORT}` first: transformers does not recognise model type `{cfg.model_type}`.",
        f"- The original architecture's class (`{cls.removeprefix('Pruned')}"
        ".from_pretrained(folder)`): its layers have the unpruned sizes, and loading stops with "
        "a size mismatch. transformers 5 has no `pruned_heads` to describe removed heads.",
        "",
    ]
    return lines


def _auto_snippet(auto: str, path: str, first_line: str | None = None) -> list[str]:
    """The README's code block loading the folder with transformers' ``auto`` class (and its
    tokenizer), after ``first_line`` (the registering import) when one is needed."""
    return [
        "```python",
        *([first_line] if first_line else []),
        f"from transformers import AutoTokenizer, {auto}",
        "",
        f"folder = {path}  # this folder; change it if you move the folder",
        f"model = {auto}.from_pretrained(folder).eval()",
        "tokenizer = AutoTokenizer.from_pretrained(folder)",
        "```",
        "",
    ]


def _plain_section(cfg, auto: str, path: str, has_st: bool) -> list[str]:
    lines = [
        "## Load it",
        "",
        f"Every layer still has the sizes a plain `{cfg.model_type}` config describes, so "
        "transformers loads it on its own (no deployopt import needed):",
        "",
        *_auto_snippet(auto, path),
    ]
    if has_st:
        lines += [
            "sentence-transformers: `SentenceTransformer(folder)`.",
            "",
        ]
    return lines


def _deployopt_only_section(cfg, path: str) -> list[str]:
    return [
        "## Load it",
        "",
        f"deployopt has no pruned class for model type `{cfg.model_type}`, so the pruned sizes "
        "are recorded as `deployopt_pruning` in config.json and only deployopt reads them back:",
        "",
        "```python",
        "from deployopt.sources import load_source",
        "",
        f"folder = {path}  # this folder; change it if you move the folder",
        "model = load_source(folder).module.model  # the pruned PyTorch model",
        "```",
        "",
        "## What does not load it",
        "",
        "- `AutoModel.from_pretrained(folder)` and sentence-transformers: the layers no longer "
        "have the sizes config.json describes, and loading stops with a size mismatch.",
        "",
    ]


register()
