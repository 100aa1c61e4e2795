"""The distillation losses by name, and ``--loss`` parsing. Imports neither torch nor pydantic:
the option models (deployopt.options) and the torch-side stages both read it."""

from __future__ import annotations

from collections.abc import Sequence

from deployopt.errors import ConfigError

LOSSES = ("embedding", "cosine", "kd", "ce", "hidden", "attention")


def parse_losses(text: str | Sequence[str] | dict) -> dict[str, float]:
    """``"embedding,hidden:0.5"`` -> {"embedding": 1.0, "hidden": 0.5}."""
    if isinstance(text, dict):
        items = list(text.items())
    else:
        parts = text.split(",") if isinstance(text, str) else list(text)
        items = []
        for p in (x.strip() for x in parts if str(x).strip()):
            name, _, w = p.partition(":")
            try:
                items.append((name, float(w) if w else 1.0))
            except ValueError:
                raise ConfigError(
                    f"bad loss weight in {p!r}", hint="write e.g. kd,hidden:0.5"
                ) from None
    bad = [n for n, _ in items if n not in LOSSES]
    if bad or not items:
        raise ConfigError(
            f"unknown loss(es) {', '.join(bad) or '(none)'}",
            hint="choose from " + ", ".join(LOSSES),
        )
    return dict(items)
