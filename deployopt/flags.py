"""CLI flags derived from the option models: one declaration per option.

:func:`params` turns the fields of an option model (deployopt.config, deployopt.options) into
typer parameters: the flag is ``--`` + the field's key (its alias, else its name) with dashes,
``--key/--no-key`` for booleans, unless the field names its own; the help is the field's
description with its bounds; every flag defaults to None, so that the command knows which
options were given (those go into the recipe, the rest keep the model's defaults, shown in
``--help``). Lists are comma-separated (``--batch 1,8``); NAME=DIMS options repeat.
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import BaseModel
from pydantic.fields import FieldInfo


def key_of(name: str, field: FieldInfo) -> str:
    """A field's key in a recipe table."""
    return field.alias or name


def flag_of(name: str, field: FieldInfo) -> str:
    """A field's flag declaration: ``--key`` (``--key/--no-key`` for a boolean)."""
    extra = field.json_schema_extra or {}
    if isinstance(extra, dict) and extra.get("flag"):
        return str(extra["flag"])
    flag = "--" + key_of(name, field).replace("_", "-")
    return f"{flag}/--no-{flag[2:]}" if cli_type(field) is bool else flag


def _extra(field: FieldInfo, key: str) -> Any:
    extra = field.json_schema_extra
    return extra.get(key) if isinstance(extra, dict) else None


def cli_type(field: FieldInfo) -> Any:
    """The type the CLI parses a field's flag as (the model validates the rest)."""
    if _extra(field, "repeat"):
        return list[str]
    if any(type(m).__name__ == "BeforeValidator" for m in field.metadata):
        return str  # comma-separated lists, percentages, NAME=VALUE pairs
    ann = field.annotation
    args = [a for a in typing.get_args(ann) if a is not type(None)] if _is_union(ann) else [ann]
    if Path in args:
        return Path
    if args == [bool]:
        return bool
    for t in (int, float, str):
        if t in args:
            return t
    return str


def _base(field: FieldInfo) -> Any:
    """A field's type without None."""
    ann = field.annotation
    if _is_union(ann):
        args = [a for a in typing.get_args(ann) if a is not type(None)]
        return args[0] if len(args) == 1 else ann
    return ann


def _is_union(ann: Any) -> bool:
    return typing.get_origin(ann) in (typing.Union, types.UnionType)


def _bounds(field: FieldInfo) -> str:
    parts = []
    for m in field.metadata:
        for attr, sym in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            v = getattr(m, attr, None)
            if v is not None:
                parts.append(f"{sym} {v}")
    return f" [{', '.join(parts)}]" if parts else ""


def _shown_default(field: FieldInfo) -> str | bool:
    d = field.default
    if d is None or d == () or d == {} or field.is_required():
        return False
    if isinstance(d, bool):
        return False  # the flag's two spellings say it
    if isinstance(d, tuple):
        return ",".join(map(str, d))
    return str(d)


@dataclass(frozen=True)
class Flag:
    """One derived flag: the command parameter and the model field it fills."""

    param: str  # the command function's parameter name
    section: str  # the recipe table / option model it belongs to
    key: str  # the field's key in that table
    decl: str  # e.g. --min-cosine


def params(
    section: str,
    model: type[BaseModel],
    skip: tuple[str, ...] = (),
    rename: dict[str, str] | None = None,
) -> tuple[list[inspect.Parameter], list[Flag]]:
    """typer parameters for every field of ``model`` except ``skip``; ``rename`` gives a field
    another flag (``{"path": "--teacher"}``)."""
    out, flags = [], []
    own = [n for n in model.__annotations__ if n in model.model_fields]
    order = own + [n for n in model.model_fields if n not in own]  # the command's own first
    for name in order:
        field = model.model_fields[name]
        if name in skip:
            continue
        decl = (rename or {}).get(name) or flag_of(name, field)
        typ = cli_type(field)
        shown = _shown_default(field)
        help_text = (field.description or "") + _bounds(field)
        help_text += f" [default: {shown}]" if shown else ""
        metavar = "NAME=DIMS" if _extra(field, "repeat") else None
        if typ is str and typing.get_origin(_base(field)) in (tuple, list):
            metavar = "A,B,..."
        option = typer.Option(
            decl,
            help=help_text,
            metavar=metavar,
            show_default=False,
            rich_help_panel=_extra(field, "panel"),
        )
        required = field.is_required()
        ann = Annotated[typ if required else typ | None, option]
        default = inspect.Parameter.empty if required else None
        out.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                     annotation=ann))  # fmt: skip
        flags.append(Flag(param=name, section=section, key=key_of(name, field), decl=decl))
    return out, flags


def command(
    app: typer.Typer,
    name: str,
    sections: list[tuple[list[inspect.Parameter], list[Flag]]],
    extra: list[inspect.Parameter],
    body: Callable[..., Any],
    **command_kw: Any,
) -> list[Flag]:
    """Register ``body`` as command ``name`` with the derived flags of ``sections`` and the
    command's own parameters ``extra``. ``body(given, **extra)`` receives ``given``: section ->
    {key: value} for the flags the user gave. Returns the flags (the coverage test reads
    them)."""
    all_params = list(extra)
    flags: list[Flag] = []
    for ps, fs in sections:
        all_params += ps
        flags += fs
    names = [p.name for p in all_params]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise RuntimeError(f"{name}: parameters declared twice: {', '.join(sorted(dup))}")
    by_param = {f.param: f for f in flags}

    def wrapper(**kwargs: Any) -> Any:
        given: dict[str, dict[str, Any]] = {}
        for p, f in by_param.items():
            v = kwargs.pop(p, None)
            if v is not None and v != []:
                given.setdefault(f.section, {})[f.key] = v
        return body(given, **kwargs)

    # keyword-only parameters: a required one may follow one with a default; typer lists the
    # options in this order in --help
    wrapper.__signature__ = inspect.Signature(all_params)  # type: ignore[attr-defined]
    wrapper.__name__ = body.__name__
    wrapper.__doc__ = body.__doc__
    app.command(name, **command_kw)(wrapper)
    return flags
