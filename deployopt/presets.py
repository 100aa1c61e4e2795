"""Named hardware targets: an execution provider, a thread count and session options.

Built-ins: ``cpu`` (all cores), ``cpu-1t`` (one core, edge-like), ``cuda``. More come from a
TOML config file::

    [targets.edge-2t]
    ep = "cpu"
    threads = 2
    graph_optimization = "all"
    session_config = { "session.intra_op.allow_spinning" = "0" }
"""

from __future__ import annotations

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
    graph_optimization: str = Field("all", pattern="^(all|basic|disable)$")
    io_binding: bool = True  # device-resident inputs/outputs on GPU EPs: copies not timed
    include_copies: bool = False  # time host<->device copies too
    # onnxruntime session config entries, e.g. {"session.intra_op.allow_spinning" = "0"}
    session_config: dict[str, str] = Field(default_factory=dict)

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
