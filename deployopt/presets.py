"""Named hardware targets: an execution provider, a thread count and session options.

Built-ins: ``cpu`` (all cores), ``cpu-1t`` (one core, edge-like), ``cuda``. More come from a
TOML config file::

    [targets.edge-2t]
    ep = "cpu"
    threads = 2
    graph_optimization = "all"
    session_config = { "session.intra_op.allow_spinning" = "0" }
    ray_labels = { "deployopt/target" = "edge-2t" }   # its node on a Ray cluster (--cluster)

A session file (``OUT/best.session.json``, written by ``deployopt optimize``) holds the session
settings a model was measured fastest with; :func:`apply_session` puts them on a target, so that
``bench`` and ``gate`` measure what deploys. :func:`resolve_model` reads an optimize output
folder as its ``best.onnx`` with that file.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from deployopt.config import first_error, read_toml
from deployopt.errors import ConfigError, UsageError


class Target(BaseModel):
    """Where a measurement runs. Frozen: the name identifies it in results and budgets."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    ep: str = "cpu"
    threads: int | None = Field(None, ge=1)
    graph_optimization: str = Field("all", pattern="^(all|extended|basic|disable)$")
    io_binding: bool = True  # device-resident inputs/outputs on GPU EPs: copies not timed
    include_copies: bool = False  # time host<->device copies too
    # onnxruntime session config entries, e.g. {"session.intra_op.allow_spinning" = "0"}
    session_config: dict[str, str] = Field(default_factory=dict)
    # where the target runs on a Ray cluster (deployopt.fleet): Ray node labels the node must
    # carry, e.g. {"deployopt/target" = "edge-arm"} for `ray start --labels
    # deployopt/target=edge-arm`; empty: this machine only
    ray_labels: dict[str, str] = Field(default_factory=dict)

    def describe(self) -> str:
        return f"{self.name} ({self.ep}, {self.threads or 'all'} threads)"


BUILTIN_TARGETS = {
    "cpu": Target(name="cpu", ep="cpu"),
    "cpu-1t": Target(name="cpu-1t", ep="cpu", threads=1),
    "cuda": Target(name="cuda", ep="cuda"),
}


def load_targets(config: Path | None) -> dict[str, Target]:
    """Built-in targets plus those of ``[targets.NAME]`` tables in a TOML config file."""
    targets = dict(BUILTIN_TARGETS)
    if config is None:
        return targets
    data = read_toml(Path(config))
    for name, body in (data.get("targets") or {}).items():
        if not isinstance(body, dict):
            raise ConfigError(f"{config}: [targets.{name}] must be a table")
        try:
            targets[name] = Target(name=name, **body)
        except ValidationError as e:
            raise ConfigError(f"{config}: [targets.{name}] {first_error(e)}") from None
    return targets


def resolve_target(
    name: str | None, ep: str | None, threads: int | None, config: Path | None = None
) -> Target:
    """``--target NAME`` or ``--ep X --threads N`` (an ad-hoc target); default ``cpu``."""
    targets = load_targets(config)
    if name is not None:
        if name not in targets:
            raise UsageError(
                f"unknown target {name!r}", hint="known targets: " + ", ".join(sorted(targets))
            )
        t = targets[name]
        return t if threads is None else t.model_copy(update={"threads": threads})
    ep = ep or "cpu"
    label = f"{ep}-{threads}t" if threads else ep
    return Target(name=label, ep=ep, threads=threads)


# ---------------------------------------------------------------- session files

SESSION_SCHEMA = "deployopt.session/1"
BEST_MODEL = "best.onnx"  # what an optimize output folder ships (deployopt.ship writes both)
BEST_SESSION = "best.session.json"
_SESSION_HINT = f"pass the {BEST_SESSION} that `deployopt optimize` wrote beside {BEST_MODEL}"


def _target_pattern(field: str) -> str:
    """A Target field's regex: a session file accepts exactly the values a target does."""
    return next(m.pattern for m in Target.model_fields[field].metadata if hasattr(m, "pattern"))


class _SessionFile(BaseModel):
    """The fields of a session file that a measurement needs; newer keys are ignored."""

    model_config = ConfigDict(extra="ignore", strict=True)

    execution_provider: str
    intra_op_num_threads: int | None = Field(..., ge=1)
    graph_optimization: str = Field(..., pattern=_target_pattern("graph_optimization"))
    session_config: dict[str, str]
    chosen: str | None = None


@dataclass(frozen=True)
class SessionSettings:
    """The onnxruntime session settings of a session file (``threads`` None: all cores)."""

    path: Path
    execution_provider: str
    threads: int | None
    graph_optimization: str
    session_config: Mapping[str, str]
    chosen: str | None = None  # the name optimize gave the setting, e.g. "default"

    def describe(self) -> str:
        """One line: ``2 threads, graph optimization all, KEY=VALUE``."""
        parts = [
            f"{self.threads or 'all'} threads",
            f"graph optimization {self.graph_optimization}",
        ]
        parts += [f"{k}={v}" for k, v in self.session_config.items()]
        return ", ".join(parts)


def read_session(path: str | Path) -> SessionSettings:
    """Read a session file (``deployopt.session/1``). A missing file, one that is not JSON or
    not a session file, or a field of the wrong type is a ConfigError naming the file.

    >>> read_session("out/best.session.json").threads  # doctest: +SKIP
    2
    """
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path}: a folder, not a session file", hint=_SESSION_HINT)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such session file", hint=_SESSION_HINT) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not a JSON session file ({e})", hint=_SESSION_HINT) from None
    found = doc.get("schema") if isinstance(doc, dict) else None
    if found != SESSION_SCHEMA:
        raise ConfigError(
            f"{path}: not a deployopt session file (schema {found!r}, expected {SESSION_SCHEMA!r})",
            hint=_SESSION_HINT,
        )
    try:
        body = _SessionFile.model_validate(doc)
    except ValidationError as e:
        raise ConfigError(f"{path}: {first_error(e)}", hint=_SESSION_HINT) from None
    return SessionSettings(
        path=path,
        execution_provider=body.execution_provider,
        threads=body.intra_op_num_threads,
        graph_optimization=body.graph_optimization,
        session_config=dict(body.session_config),
        chosen=body.chosen,
    )


def _provider(ep: str) -> str:
    from deployopt.runtime.session import EP_ALIASES

    return EP_ALIASES.get(ep.lower(), ep)


def apply_session(target: Target, session: SessionSettings | str | Path) -> Target:
    """``target`` with the threads, graph optimization and session config of ``session`` (a
    :class:`SessionSettings` or the path of a session file); its name, EP and IO options stay,
    so budgets for the target still match it (results record the settings in their env).

    A session measured on another execution provider than the target's is a UsageError.

    >>> apply_session(BUILTIN_TARGETS["cpu"], "out/best.session.json").threads  # doctest: +SKIP
    2
    """
    s = session if isinstance(session, SessionSettings) else read_session(session)
    if _provider(s.execution_provider) != _provider(target.ep):
        raise UsageError(
            f"{s.path}: measured on execution provider {s.execution_provider!r}, "
            f"target {target.name!r} runs on {target.ep!r}",
            hint="session settings hold only on the EP they were measured on: pick a target on "
            f"{s.execution_provider!r}, or run `deployopt optimize` for this one",
        )
    return Target(
        **{
            **target.model_dump(),
            "threads": s.threads,
            "graph_optimization": s.graph_optimization,
            "session_config": dict(s.session_config),
        }
    )


def resolve_model(path: str | Path, session: str | Path | None = None) -> tuple[Path, Path | None]:
    """A model argument as (model file, session file or None). An optimize output folder is its
    ``best.onnx`` with its ``best.session.json`` when there is one; an explicit ``session``
    wins over the folder's. A folder without ``best.onnx`` is a UsageError naming it.

    >>> resolve_model("out")  # doctest: +SKIP
    (PosixPath('out/best.onnx'), PosixPath('out/best.session.json'))
    """
    path = Path(path)
    explicit = Path(session) if session is not None else None
    if not path.is_dir():
        return path, explicit
    model = path / BEST_MODEL
    if not model.is_file():
        raise UsageError(
            f"{path}: a folder without {BEST_MODEL}",
            hint="give an .onnx file, or an output folder of `deployopt optimize` "
            "(it holds best.onnx when a variant was chosen)",
        )
    found = path / BEST_SESSION
    return model, explicit if explicit is not None else (found if found.is_file() else None)
