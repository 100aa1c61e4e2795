"""Variant records: one model artefact, how it was made, and what was measured on it."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from deployopt.workspace import canonical_json

STATUS_OK = "ok"
STATUS_FAILED = "failed"
STATUS_SKIPPED = "skipped"


def variant_id(
    parent: str | None, stage: str, stage_version: int, params: Mapping[str, Any]
) -> str:
    """Content address of a variant: same parent, stage, stage version and params -> same id.

    >>> a = variant_id("abc", "fuse", 1, {"opt_level": 2})
    >>> a == variant_id("abc", "fuse", 1, {"opt_level": 2})
    True
    """
    key = canonical_json({"parent": parent, "stage": stage, "v": stage_version, "params": params})
    return hashlib.sha256(key.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Variant:
    """One model artefact and how it was made.

    ``path`` is None for failed and skipped variants; ``parity`` holds the numbers measured
    against the reference (PyTorch for the export, the fp32 graph for the others).
    """

    id: str
    name: str
    stage: str
    parent: str | None
    params: Mapping[str, Any]
    status: str = STATUS_OK
    reason: str = ""
    path: Path | None = None
    sha256: str | None = None
    metrics: Mapping[str, Any] = field(default_factory=dict)
    parity: Mapping[str, Any] | None = None
    warnings: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.status == STATUS_OK

    def to_json(self, relative_to: Path | None = None) -> dict[str, Any]:
        d = asdict(self)
        d["params"] = dict(self.params)
        d["metrics"] = dict(self.metrics)
        d["warnings"] = list(self.warnings)
        if self.path is not None:
            p = Path(self.path)
            d["path"] = str(p.relative_to(relative_to)) if relative_to else str(p)
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any], base: Path | None = None) -> Variant:
        path = d.get("path")
        if path is not None and base is not None:
            path = base / path
        return cls(
            id=d["id"],
            name=d["name"],
            stage=d["stage"],
            parent=d.get("parent"),
            params=d.get("params", {}),
            status=d.get("status", STATUS_OK),
            reason=d.get("reason", ""),
            path=Path(path) if path is not None else None,
            sha256=d.get("sha256"),
            metrics=d.get("metrics", {}),
            parity=d.get("parity"),
            warnings=tuple(d.get("warnings", ())),
        )
