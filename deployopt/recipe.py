"""Recipes: one TOML file describing a run from a model to a gated release.

::

    preset = "cpu-int8"            # optional: start from a named fragment (deployopt presets)
    target = "cpu"                 # the target optimize, bench and gate use unless they name one

    [source]
    path = "minilm"                # HF folder, .onnx, pkg.mod:factory (with input_shape)

    [distill]                      # optional: the keys of `deployopt distill`'s flags
    data = "corpus.txt"
    student_layers = [0, 2, 4]

    [prune]                        # optional: the keys of `deployopt prune`'s flags
    heads = 0.33

    [optimize]                     # the keys of `deployopt optimize`'s flags
    variants = ["fuse", "int8-dynamic"]

    [gate]                         # optional: the keys of `deployopt gate`'s flags
    p50_ms = 20

    [[gate.budget]]                # or budget = "budgets.toml"
    target = "cpu"
    p99_ms = 40

    [targets.edge-2t]              # as in a --config file
    ep = "cpu"
    threads = 2

Every key has the name, type, bounds and meaning of the matching flag (deployopt.config and
deployopt.options declare both). Relative paths are read against the recipe's folder; the
paths a stage writes (``json``, ``junit``, ``markdown``) against the run's output folder.
"""

from __future__ import annotations

import copy
import difflib
import tomllib
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, ValidationError, field_validator

from deployopt.config import OptimizeConfig, Options, first_error, read_toml
from deployopt.errors import ConfigError
from deployopt.options import (
    BenchOptions,
    DistillOptions,
    GateOptions,
    PruneOptions,
    SearchOptions,
    SourceOptions,
)

STAGE_TABLES: dict[str, type[Options]] = {
    "distill": DistillOptions,
    "prune": PruneOptions,
    "optimize": OptimizeConfig,
    "bench": BenchOptions,
    "gate": GateOptions,
}
INT8 = ["fuse", "int8-dynamic", "int8-static"]

# Named recipe fragments. A recipe naming one starts from it; its own keys win.
PRESETS: dict[str, dict[str, Any]] = {
    "cpu-int8": {
        "target": "cpu",
        "optimize": {"variants": INT8, "tune_session": True},
    },
    "edge-1t": {
        "target": "cpu-1t",
        # one core; the file must fit a small device (override max_size_mb for yours), and
        # the session search is off so the shipped settings keep the target's one thread
        "optimize": {"variants": INT8, "max_size_mb": 50.0, "tune_session": False},
    },
    "cuda-fp16": {
        "target": "cuda",
        "optimize": {"variants": ["fuse", "fp16"]},
        "targets": {"cuda": {"ep": "cuda", "io_binding": True}},
    },
    "smallest": {
        "optimize": {"prefer": "smallest"},
    },
}
PRESET_HELP = {
    "cpu-int8": "dynamic and static INT8 (recipes derived from the CPU), the target's session "
    "search",
    "edge-1t": "one thread, INT8, a 50 MB size limit, the target's one thread kept",
    "cuda-fp16": "fp16 on the cuda target, inputs and outputs bound on the device",
    "smallest": "the smallest file that meets the accuracy constraints",
}


class Recipe(Options):
    """A whole run. ``source`` and at least one stage table."""

    preset: str | None = Field(None, description="A named fragment the recipe starts from.")
    target: str | None = Field(
        None, description="Target of optimize, bench and gate, unless they name their own."
    )
    targets: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="[targets.NAME] tables, as in a --config file."
    )
    source: SourceOptions | None = None  # only a gate that reads a report needs none
    distill: DistillOptions | None = None
    prune: PruneOptions | None = None
    optimize: OptimizeConfig | None = None
    bench: BenchOptions | None = None
    gate: GateOptions | None = None
    search: SearchOptions | None = None  # run by `deployopt search`, not `deployopt run`

    @field_validator("targets")
    @classmethod
    def _targets(cls, v: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        from deployopt.presets import Target

        for name, body in v.items():
            try:
                Target(name=name, **body)
            except (ValidationError, TypeError) as e:
                msg = first_error(e) if isinstance(e, ValidationError) else str(e)
                raise ValueError(f"[targets.{name}] {msg}") from None
        return v

    def stages(self) -> list[str]:
        return [s for s in STAGE_TABLES if getattr(self, s) is not None]


def keys_of(model: type[BaseModel]) -> dict[str, str]:
    """A model's recipe keys -> field names."""
    return {(f.alias or n): n for n, f in model.model_fields.items()}


def _suggest(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return f"did you mean {close[0]!r}?" if close else "known keys: " + ", ".join(sorted(known))


FLAGS = "flags"  # ``where`` of a recipe compiled from a command's flags
TOP_KEYS = ["preset", "target", "targets", "source", *STAGE_TABLES, "search"]


def check_keys(data: dict[str, Any], where: str) -> None:
    """Unknown tables or keys as a ConfigError with the closest known key."""
    for key, value in data.items():
        if key not in TOP_KEYS:
            raise ConfigError(f"{_prefix(where)}unknown key {key!r}", hint=_suggest(key, TOP_KEYS))
        model = {"source": SourceOptions, "search": SearchOptions}.get(key) or STAGE_TABLES.get(key)
        if model is None:
            continue
        if not isinstance(value, dict):
            raise ConfigError(f"{_prefix(where)}[{key}] must be a table, not {value!r}")
        known = list(keys_of(model))
        for k in value:
            if k not in known:
                raise ConfigError(
                    f"{_prefix(where)}[{key}] unknown key {k!r}", hint=_suggest(k, known)
                )


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` on top of ``base``, tables merged key by key."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def parse_value(text: str) -> Any:
    """A ``--set`` value: TOML (``0.5``, ``true``, ``[0, 2]``, ``"x"``), else the string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_sets(data: dict[str, Any], sets: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``--set table.key=value`` overrides; a key that does not exist is a ConfigError."""
    out = copy.deepcopy(data)
    for item in sets:
        path, sep, value = item.partition("=")
        parts = [p for p in path.strip().split(".") if p]
        if not sep or not parts:
            raise ConfigError(f"bad --set {item!r}", hint="write --set table.key=value")
        head = parts[0]
        if len(parts) == 1:
            if head not in ("preset", "target"):
                raise ConfigError(f"--set {item!r}: unknown key {head!r}",
                                  hint=_suggest(head, ["preset", "target"]))  # fmt: skip
            out[head] = parse_value(value)
            continue
        if head == "targets" and len(parts) == 3:
            out.setdefault("targets", {}).setdefault(parts[1], {})[parts[2]] = parse_value(value)
            continue
        model = SourceOptions if head == "source" else STAGE_TABLES.get(head)
        if model is None or len(parts) != 2:
            raise ConfigError(f"--set {item!r}: unknown key {path!r}",
                              hint="write TABLE.KEY, e.g. --set prune.heads=0.5")  # fmt: skip
        if parts[1] not in keys_of(model):
            raise ConfigError(f"--set {item!r}: [{head}] has no key {parts[1]!r}",
                              hint=_suggest(parts[1], list(keys_of(model))))  # fmt: skip
        out.setdefault(head, {})[parts[1]] = parse_value(value)
    return out


def _resolve_paths(data: dict[str, Any], base: Path) -> dict[str, Any]:
    """Relative input paths against ``base`` (the recipe's folder). Strings that may name a
    packaged model or dataset (``minilm``, ``20newsgroups``, ``pkg.mod:make``) are resolved
    only when that path exists."""
    out = copy.deepcopy(data)
    for table, model in (("source", SourceOptions), *STAGE_TABLES.items()):
        body = out.get(table)
        if not isinstance(body, dict):
            continue
        fields = {k: model.model_fields[n] for k, n in keys_of(model).items()}
        for key, value in list(body.items()):
            f = fields.get(key)
            if f is None or (f.json_schema_extra or {}).get("output"):
                continue
            body[key] = _resolve_one(value, base, f)
    return out


def _mentions(ann: Any, t: type) -> bool:
    """Whether type ``t`` appears in annotation ``ann`` (``Path | None``, ``tuple[Path, ...]``)."""
    return ann is t or any(_mentions(a, t) for a in typing.get_args(ann))


def _resolve_one(value: Any, base: Path, field: Any) -> Any:
    if isinstance(value, Path):
        value = str(value)
    if isinstance(value, (list, tuple)):
        return [_resolve_one(v, base, field) for v in value]
    if not isinstance(value, str) or not value or Path(value).is_absolute():
        return value
    is_path = _mentions(field.annotation, Path)
    candidate = base / value
    if is_path or ((field.json_schema_extra or {}).get("data") and candidate.exists()):
        return str(candidate)
    return value


def validate(data: dict[str, Any], where: str) -> Recipe:
    """A recipe from a dict: keys checked with suggestions, values by the option models."""
    check_keys(data, where)
    name = data.get("preset")
    if name is not None:
        if name not in PRESETS:
            raise ConfigError(f"{_prefix(where)}unknown preset {name!r}",
                              hint="presets: " + ", ".join(PRESETS))  # fmt: skip
        data = merge(PRESETS[name], data)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = [str(x) for x in err["loc"]]
        if where == FLAGS and len(loc) > 1:  # a command's flags: name the flag
            flag = "--" + loc[1].replace("_", "-")
            rest = ValidationError.from_exception_data(e.title, [{**err, "loc": ()}])
            raise ConfigError(f"{flag}: {first_error(rest)}") from None
        table = f"[{loc[0]}] " if len(loc) > 1 else ""
        rest = ValidationError.from_exception_data(e.title, [{**err, "loc": tuple(loc[1:])}])
        raise ConfigError(f"{_prefix(where)}{table}{first_error(rest)}") from None
    if not recipe.stages():
        raise ConfigError(f"{_prefix(where)}nothing to do",
                          hint="add an [optimize], [bench] or [gate] table")  # fmt: skip
    if recipe.source is None and recipe.stages() != ["gate"]:  # gate may judge a report
        raise ConfigError(
            f"{_prefix(where)}no [source] table", hint="add [source] with path = MODEL"
        )
    check_data(recipe, where)
    if recipe.search is not None:
        from deployopt.search import check

        check(recipe, where)
    return recipe


def check_data(recipe: Recipe, where: str) -> None:
    """Before any work: the files a stage reads exist, and a stage has the data it needs."""
    if recipe.gate is not None and recipe.gate.report is not None and recipe.source is not None:
        raise ConfigError(
            f"{_prefix(where)}give either MODEL.onnx (measured now) or --report REPORT.json"
            if where == FLAGS
            else f"{_prefix(where)}[gate] report judges recorded results: drop [source] or it",
        )
    eq = "" if where == FLAGS else " ="
    for table in ("source", *recipe.stages()):
        body = getattr(recipe, table)
        if body is None:
            continue
        for name, f in type(body).model_fields.items():
            extra = f.json_schema_extra or {}
            value = getattr(body, name)
            if not extra.get("data") or value is None or (table, name) == ("source", "path"):
                continue  # the source itself: its loader names what is wrong with it (exit 5)
            for v in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(v, (str, Path)) and _looks_like_path(str(v)) and not Path(v).exists():
                    raise ConfigError(
                        f"{_at(where, table, f.alias or name)}{eq} {str(v)!r}: no such file",
                        hint="paths are read against the recipe's folder"
                        if where != FLAGS
                        else "paths are read against the working folder",
                    )
    if recipe.prune is not None and recipe.search is None and not recipe.prune.prunes():
        raise ConfigError(
            f"{_prefix(where)}nothing to prune: give heads, ffn, drop_layers, channels, "
            "unstructured, target_params or target_latency"
        )
    if recipe.prune is not None and recipe.prune.recover_epochs and recipe.prune.data is None:
        raise ConfigError(
            f"{_at(where, 'prune', 'recover_epochs')} needs data",
            hint="give --data FILE (or a packaged dataset)"
            if where == FLAGS
            else "add data = FILE (or a packaged dataset) to [prune]",
        )
    if recipe.prune is not None and recipe.prune.importance == "gradient" and not recipe.prune.data:
        raise ConfigError(
            f"{_at(where, 'prune', 'importance')} 'gradient' needs data",
            hint="give data, or importance magnitude",
        )
    onnx_in = recipe.source is None or recipe.source.path.endswith(".onnx")
    torch_stages = [s for s in ("distill", "prune") if getattr(recipe, s) is not None]
    if onnx_in and torch_stages:
        raise ConfigError(
            f"{_prefix(where)}[{torch_stages[0]}] needs a PyTorch model, the source is .onnx",
            hint="give the HF folder or factory as [source] path",
        )
    needs_onnx = [s for s in ("bench", "gate") if getattr(recipe, s) is not None]
    torch_out = bool(torch_stages) or (recipe.source is not None and _is_torch(recipe.source.path))
    if needs_onnx and recipe.optimize is None and torch_out:
        raise ConfigError(
            f"{_prefix(where)}[{needs_onnx[0]}] measures an ONNX model",
            hint="add an [optimize] table, or give an .onnx file as [source] path",
        )
    if recipe.gate is not None and recipe.source is None and recipe.gate.report is None:
        raise ConfigError(
            f"{_prefix(where)}give either MODEL.onnx (measured now) or --report REPORT.json"
            if where == FLAGS
            else f"{_prefix(where)}[gate] has no model: add [source] or report",
        )
    if recipe.gate is not None and recipe.gate.report is None and not recipe.gate.limits() \
            and recipe.gate.budget is None and recipe.gate.baseline is None:  # fmt: skip
        raise ConfigError(
            f"{_prefix(where)}[gate] has nothing to judge",
            hint="give budget, a limit (p50_ms, max_size_mb, ...) or baseline",
        )


def _prefix(where: str) -> str:
    """How a message starts: the recipe file, or nothing for a command's flags."""
    return "" if where == FLAGS else f"{where}: "


def _is_torch(path: str) -> bool:
    """A source that is surely a PyTorch model: the bundled name or a factory (a folder may
    be an optimize output holding best.onnx: its loader decides)."""
    from deployopt.sources import BUNDLED

    return path in BUNDLED or (":" in path and not Path(path).exists())


def _at(where: str, table: str, key: str) -> str:
    """Where a value came from: ``--key`` (a command's flags) or ``FILE: [table] key =``."""
    if where == FLAGS:
        return "--" + key.replace("_", "-")
    return f"{where}: [{table}] {key}"


def _looks_like_path(s: str) -> bool:
    return "/" in s or Path(s).suffix.lower() in (
        ".txt",
        ".csv",
        ".jsonl",
        ".json",
        ".npz",
        ".npy",
        ".onnx",
        ".toml",
        ".safetensors",
    )


def load(path: str | Path, sets: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, merge with its preset, override with ``sets`` and validate a recipe file."""
    path = Path(path)
    data = read_toml(path, "recipe")
    data = apply_sets(data, sets)
    data = _resolve_paths(data, path.resolve().parent)
    return validate(data, str(path))


def from_dict(data: dict[str, Any], sets: list[str] | tuple[str, ...] = (),
              base: Path | None = None, where: str = "recipe") -> Recipe:  # fmt: skip
    """A recipe from a dict (the API, and commands' flags); relative paths against ``base``
    (default: the working folder)."""
    data = apply_sets(data, sets)
    data = _resolve_paths(data, (base or Path.cwd()).resolve())
    return validate(data, where)


def to_dict(recipe: Recipe) -> dict[str, Any]:
    """The recipe as TOML-ready data: the values that differ from the defaults, paths
    absolute, the preset folded in (what ``run`` would do is all in the file)."""
    doc = recipe.model_dump(mode="json", by_alias=True, exclude_defaults=True, exclude_none=True)
    doc.pop("preset", None)
    for table in ("source", *STAGE_TABLES):
        if getattr(recipe, table) is not None:
            doc.setdefault(table, {})
    return {k: v for k, v in doc.items() if v is not None}


def to_toml(recipe: Recipe) -> str:
    import tomli_w

    doc = to_dict(recipe)
    head = {k: doc.pop(k) for k in list(doc) if not isinstance(doc[k], dict)}
    order = ["targets", "source", *STAGE_TABLES, "search"]
    body = {k: doc[k] for k in order if k in doc}
    return tomli_w.dumps({**head, **body})


def preset_toml(name: str) -> str:
    import tomli_w

    return tomli_w.dumps(PRESETS[name])
