"""Typed progress events. Runners emit them through an ``on_event`` callback; the CLI renders
them (and never parses log text). Records only: no behaviour, no heavy imports."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class VariantsPlanned:
    """The variants ``optimize`` will build, in order (known once fusion is done)."""

    names: tuple[str, ...]


@dataclass(frozen=True)
class VariantStarted:
    name: str


@dataclass(frozen=True)
class VariantFinished:
    name: str
    status: str  # ok | failed | skipped | reused
    reason: str = ""


@dataclass(frozen=True)
class BenchRound:
    """One interleaved benchmark round finished (``done`` of ``total`` for this measurement)."""

    done: int
    total: int


@dataclass(frozen=True)
class Shipped:
    """``optimize`` finished: the chosen variant (None when nothing qualified)."""

    winner: str | None


# recipe runs (deployopt.pipeline)
@dataclass(frozen=True)
class StageStarted:
    stage: str
    id: str


@dataclass(frozen=True)
class StageCached:
    stage: str
    id: str


@dataclass(frozen=True)
class StageDone:
    stage: str
    id: str
    seconds: float
    summary: str = ""


@dataclass(frozen=True)
class StageLog:
    """A line of a stage's own log (what it is doing)."""

    stage: str
    message: str


@dataclass(frozen=True)
class StageFailed:
    stage: str
    id: str
    error: str


# searches (deployopt.search)
@dataclass(frozen=True)
class TrialStarted:
    number: int
    chain: str  # "student_layers=[0, 5], heads=0.5, variants=['int8-dynamic']"


@dataclass(frozen=True)
class TrialFinished:
    number: int
    status: str  # ok | over budget | no variant | stopped early | dominated | failed
    summary: str = ""


Event = (
    VariantsPlanned | VariantStarted | VariantFinished | BenchRound | Shipped
    | StageStarted | StageCached | StageDone | StageLog | StageFailed
    | TrialStarted | TrialFinished
)  # fmt: skip
