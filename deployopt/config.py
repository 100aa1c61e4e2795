"""Validated run configuration: the CLI compiles its flags into these models, the API builds
them from keyword arguments, so both paths are checked by the same rules."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from deployopt.errors import ConfigError

VARIANTS = ("fuse", "int8-dynamic", "int8-static", "fp16")
DEFAULT_VARIANTS = VARIANTS


class OptimizeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    variants: tuple[str, ...] = DEFAULT_VARIANTS
    opset: int = Field(18, ge=14, le=23)
    calibration: Path | None = None
    evaluation: Path | None = None
    calibration_samples: int = Field(64, ge=1, le=4096)
    eval_samples: int | None = Field(None, ge=1)
    max_length: int = Field(128, ge=8, le=8192)
    batch_size: int = Field(8, ge=1, le=1024)
    threads: int | None = Field(None, ge=1)
    pooling: str | None = None
    trust_remote_code: bool = False
    per_channel: bool = True
    calibration_methods: tuple[str, ...] = ("minmax", "entropy", "percentile")
    fp16_op_block_list: tuple[str, ...] = ()
    worker_timeout_s: float = Field(600.0, gt=0)
    # benchmark, selection and report
    bench: bool = True
    target: str | None = None
    ep: str | None = None
    config_file: Path | None = None
    bench_batches: tuple[int, ...] = (1,)
    bench_seq: int = Field(128, ge=1)
    bench_min_samples: int = Field(60, ge=1)
    bench_min_seconds: float = Field(3.0, ge=0)
    bench_rounds: int = Field(3, ge=1, le=100)
    min_cosine: float = Field(0.99, ge=-1, le=1)
    min_min_cosine: float | None = Field(None, ge=-1, le=1)  # the worst sample's cosine
    max_accuracy_drop: float | None = Field(None, ge=0)
    max_size_mb: float | None = Field(None, gt=0)
    max_latency_ms: float | None = Field(None, gt=0)
    metric: str = Field("p50", pattern="^(p50|p90|p95|p99)$")
    prefer: str = Field("fastest", pattern="^(fastest|smallest)$")
    tune_session: bool = True  # search session settings for the winner and runners-up
    # candidate space and measurement effort: quick | default | exhaustive (deployopt.candidates)
    search: str = "default"
    # folders of images: (pixel / 255 - mean) / std per channel (deployopt.images)
    image_mean: tuple[float, ...] | None = None
    image_std: tuple[float, ...] | None = None

    @field_validator("image_mean", "image_std")
    @classmethod
    def _per_channel(cls, v: tuple[float, ...] | None) -> tuple[float, ...] | None:
        if v is not None and len(v) not in (1, 3, 4):
            raise ValueError("give 1 value (all channels) or one per channel (3, or 4)")
        return v

    @field_validator("variants")
    @classmethod
    def _known_variants(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        bad = [x for x in v if x not in VARIANTS]
        if bad:
            raise ValueError(
                f"unknown variant(s) {', '.join(bad)}; choose from {', '.join(VARIANTS)}"
            )
        return tuple(dict.fromkeys(v))

    @field_validator("calibration_methods")
    @classmethod
    def _methods(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        bad = [m for m in v if m not in ("minmax", "entropy", "percentile")]
        if bad or not v:
            raise ValueError(
                f"calibration methods must be minmax, entropy or percentile, got {bad or 'none'}"
            )
        return v

    @field_validator("bench_batches")
    @classmethod
    def _batches(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if not v or any(b < 1 for b in v):
            raise ValueError("batch sizes must be positive integers")
        return v

    @field_validator("search")
    @classmethod
    def _search(cls, v: str) -> str:
        if v not in ("quick", "default", "exhaustive"):
            raise ValueError(f"must be quick, default or exhaustive, not {v!r}")
        return v

    @field_validator("pooling")
    @classmethod
    def _pooling(cls, v: str | None) -> str | None:
        if v is not None and v not in ("mean", "cls", "none"):
            raise ValueError("pooling must be mean, cls or none")
        return v


def read_toml(path: Path, what: str = "config file") -> dict[str, Any]:
    """A TOML file as a dict; a missing or malformed file is a ConfigError naming it."""
    import tomllib

    try:
        return tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such {what}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None


def first_error(e: ValidationError) -> str:
    """A pydantic error as one line: ``field: message``."""
    err = e.errors()[0]
    where = ".".join(str(x) for x in err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    return f"{where}: {msg}" if where else msg


def make_config(**kwargs: Any) -> OptimizeConfig:
    """Build an OptimizeConfig, turning validation errors into one-line ConfigErrors."""
    try:
        return OptimizeConfig(**{k: v for k, v in kwargs.items() if v is not None})
    except ValidationError as e:
        raise ConfigError(first_error(e)) from None
