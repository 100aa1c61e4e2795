"""Validated run configuration, declared once.

Each option is a pydantic field with its name, type, default, bounds and help text. The CLI
flags are derived from these fields (deployopt.flags), a recipe table holds the same keys
(deployopt.recipe), and the API builds the same models from keyword arguments, so all three
paths are checked by the same rules. A field's key in a recipe is its alias when it has one,
and its flag is ``--`` + that key with dashes (``json_schema_extra["flag"]`` overrides it,
e.g. ``--per-channel/--per-tensor``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from deployopt.errors import ConfigError

VARIANTS = ("fuse", "int8-dynamic", "int8-static", "fp16")
DEFAULT_VARIANTS = VARIANTS
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")

# measurement effort, shared by optimize, bench and gate
MIN_SAMPLES = 60
MIN_SECONDS = 3.0
ROUNDS = 3
TIMEOUT_S = 600.0
MIN_COSINE = 0.99
CALIBRATION_SAMPLES = 64

BENCH = "Benchmark and selection"  # a help panel


def split_list(value: Any) -> Any:
    """``"a, b"`` -> ``["a", "b"]``: a comma-separated flag value as a list (lists pass)."""
    if isinstance(value, str):
        return [x.strip() for x in value.split(",") if x.strip()]
    return value


def parse_shapes(value: Any) -> Any:
    """``["x=1x3x32x32", "y=1,8"]`` (flags) or ``{x = [1, 3, 32, 32]}`` (TOML) as a dict."""
    if isinstance(value, str):
        value = [value]
    if isinstance(value, (list, tuple)):
        out: dict[str, Any] = {}
        for item in value:
            name, sep, dims = str(item).partition("=")
            if not sep or not name.strip():
                raise ValueError(f"bad shape {item!r}: write NAME=DIMS, e.g. x=1x3x32x32")
            try:
                out[name.strip()] = [int(d) for d in dims.replace(",", "x").split("x") if d.strip()]
            except ValueError:
                raise ValueError(f"bad shape {item!r}: write NAME=DIMS, e.g. x=1x3x32x32") from None
        return out
    if isinstance(value, dict):
        return {k: v.replace(",", "x").split("x") if isinstance(v, str) else v
                for k, v in value.items()}  # fmt: skip
    return value


def parse_percent(value: Any) -> Any:
    """``"5%"`` -> 0.05; numbers pass."""
    if isinstance(value, str):
        t = value.strip()
        try:
            return float(t[:-1]) / 100 if t.endswith("%") else float(t)
        except ValueError:
            raise ValueError(f"bad percentage {value!r}: write e.g. 5% or 0.05") from None
    return value


Csv = BeforeValidator(split_list)
Shapes = Annotated[dict[str, tuple[int, ...]], BeforeValidator(parse_shapes)]
Percent = Annotated[float, BeforeValidator(parse_percent), Field(ge=0, lt=10)]


def opt(
    default: Any = None,
    help: str = "",
    *,
    flag: str | None = None,
    panel: str | None = None,
    data: bool = False,
    output: bool = False,
    repeat: bool = False,
    **kw: Any,
) -> Any:
    """A field declared once for the model, the CLI and the recipe.

    ``flag``: the flag's declaration when it is not ``--key`` (``--key/--no-key`` for
    booleans); ``panel``: the ``--help`` section; ``data``: a path whose content feeds the
    stage's cache id (deployopt.pipeline); ``output``: a path written, resolved against the
    run's output folder in a recipe; ``repeat``: a flag given once per item (NAME=DIMS)."""
    extra = {k: v for k, v in (("flag", flag), ("panel", panel), ("data", data),
                               ("output", output), ("repeat", repeat)) if v}  # fmt: skip
    return Field(default, description=help, json_schema_extra=extra or None, **kw)


class Options(BaseModel):
    """Base of every option model: unknown keys refused, values frozen, keys or names."""

    model_config = ConfigDict(
        extra="forbid", frozen=True, validate_by_name=True, validate_by_alias=True
    )


class OptimizeConfig(Options):
    """``deployopt optimize``: variants, data, benchmark and the choice."""

    variants: Annotated[tuple[str, ...], Csv] = opt(
        DEFAULT_VARIANTS, "Variants to build, comma-separated: " + ",".join(VARIANTS) + "."
    )
    opset: int = opt(18, "ONNX opset for the export.", ge=14, le=23)
    calibration: Path | None = opt(
        None,
        "Calibration data: text file (one example a line), .jsonl/.csv with 'text', .npz, or "
        "a folder of images (resized to the model's input, normalised as "
        "preprocessor_config.json or --image-mean/--image-std say).",
        data=True,
    )
    evaluation: Path | None = opt(
        None,
        "Evaluation data for parity (same formats). Default: bundled sentences for text "
        "models, seeded synthetic inputs otherwise (the report warns when an image model was "
        "judged on noise).",
        alias="eval",
        data=True,
    )
    calibration_samples: int = opt(
        CALIBRATION_SAMPLES, "Most samples used to calibrate static INT8.", ge=1, le=4096
    )
    eval_samples: int | None = opt(None, "Most evaluation samples (default: all).", ge=1)
    labels_column: str | None = opt(
        None,
        "Label column/field of .csv/.jsonl evaluation data (an array of an .npz; 'folder' for "
        "an image folder laid out FOLDER/<class>/<image>): task metrics (accuracy, macro-F1, "
        "kNN accuracy, Spearman) are measured for every variant and --max-accuracy-drop judges "
        "them. Labels are class indexes, or class names (config.json's id2label, else sorted).",
    )
    text_column: str = opt("text", "Text column/field of .csv/.jsonl data.")
    text_pair_column: str | None = opt(
        None,
        "Second text column/field of .csv/.jsonl data (sentence pairs): a classifier reads the "
        "two together; a sentence encoder embeds each, and with a float label (a similarity "
        "score) is judged by the Spearman correlation of the pair's cosine with it.",
    )
    max_length: int = opt(128, "Token limit for text data.", ge=8, le=8192)
    batch_size: int = opt(8, "Samples per batch of the parity and calibration data.", ge=1,
                          le=1024)  # fmt: skip
    threads: int | None = opt(
        None, "onnxruntime intra-op threads for parity and the benchmark (default: all cores).",
        ge=1,
    )  # fmt: skip
    pooling: str | None = opt(
        None,
        "Feature extractors: mean, cls or none (default: read from a sentence-transformers "
        "folder, else none).",
    )
    trust_remote_code: bool = opt(
        False, "Allow a model folder's own Python code to run.", flag="--trust-remote-code"
    )
    per_channel: bool = opt(
        True, "INT8 weight scales per output channel (default) or per tensor.",
        flag="--per-channel/--per-tensor",
    )  # fmt: skip
    calibration_methods: Annotated[tuple[str, ...], Csv] = opt(
        CALIBRATION_METHODS,
        "Static INT8 calibration methods the search may use: " + ",".join(CALIBRATION_METHODS),
    )
    fp16_op_block_list: Annotated[tuple[str, ...], Csv] = opt(
        (),
        "Op types to keep in fp32 in the fp16 variant, comma-separated (added to "
        "onnxruntime's default block list).",
        alias="fp16_block_ops",
    )
    worker_timeout_s: float = opt(
        TIMEOUT_S, "Seconds before a hung worker (parity, probe) is killed.", gt=0,
        alias="timeout",
    )  # fmt: skip
    image_mean: Annotated[tuple[float, ...] | None, Csv] = opt(
        None,
        "Per-channel mean for image folders, after scaling pixels to [0, 1], e.g. "
        "0.485,0.456,0.406 (default: preprocessor_config.json beside the model, else 0).",
    )
    image_std: Annotated[tuple[float, ...] | None, Csv] = opt(
        None, "Per-channel std for image folders, e.g. 0.229,0.224,0.225 (default 1)."
    )
    # benchmark, selection and report
    bench: bool = opt(
        True,
        "Benchmark the variants, choose one, write best.onnx (default), or stop after "
        "building them.",
        panel=BENCH,
    )
    target: str | None = opt(
        None, "Named target to benchmark on: cpu (all cores), cpu-1t, cuda, or one from "
        "--config.", panel=BENCH,
    )  # fmt: skip
    ep: str | None = opt(
        None, "Execution provider for an ad-hoc target (with --threads): cpu, cuda, ...",
        panel=BENCH,
    )  # fmt: skip
    config_file: Path | None = opt(
        None, "TOML file with [targets.NAME] tables.", alias="config", panel=BENCH, data=True
    )
    bench_batches: Annotated[tuple[int, ...], Csv] = opt(
        (1,), "Batch sizes to benchmark, comma-separated; the first one decides the choice.",
        alias="batch", panel=BENCH,
    )  # fmt: skip
    bench_seq: int = opt(128, "Sequence length for text models' benchmark inputs.", ge=1,
                         alias="seq", panel=BENCH)  # fmt: skip
    bench_min_samples: int = opt(
        MIN_SAMPLES, "Least timed runs per variant and batch size.", ge=1,
        alias="bench_samples", panel=BENCH,
    )  # fmt: skip
    bench_min_seconds: float = opt(
        MIN_SECONDS, "Least timed seconds per variant and batch size.", ge=0,
        alias="bench_seconds", panel=BENCH,
    )  # fmt: skip
    bench_rounds: int = opt(ROUNDS, "Interleaved rounds the samples are spread over.", ge=1,
                            le=100, alias="rounds", panel=BENCH)  # fmt: skip
    min_cosine: float = opt(
        MIN_COSINE, "Least mean cosine to the fp32 reference a variant must keep.", ge=-1, le=1,
        panel=BENCH,
    )  # fmt: skip
    min_min_cosine: float | None = opt(
        None,
        "Least cosine of the WORST evaluation sample a variant must keep (a worst-case bound; "
        "mixed-precision candidates, which keep the most error-prone MatMuls fp32, can meet it "
        "where plain INT8 cannot).",
        ge=-1, le=1, panel=BENCH,
    )  # fmt: skip
    max_accuracy_drop: float | None = opt(
        None,
        "Most task-metric drop allowed vs the original, in points (0.5 = half a percentage "
        "point of accuracy); needs --labels-column.",
        ge=0, panel=BENCH,
    )  # fmt: skip
    max_size_mb: float | None = opt(None, "Largest file size (MB) allowed.", gt=0, panel=BENCH)
    max_latency_ms: float | None = opt(
        None, "Latency budget (ms) on --metric at the first batch size.", gt=0, panel=BENCH
    )
    metric: str = opt(
        "p50", "Latency percentile the choice minimises: p50, p90, p95 or p99.",
        pattern="^(p50|p90|p95|p99)$", panel=BENCH,
    )  # fmt: skip
    prefer: str = opt(
        "fastest",
        "Among the variants that meet every constraint: the fastest on --metric, or the "
        "smallest file.",
        pattern="^(fastest|smallest)$", panel=BENCH,
    )  # fmt: skip
    tune_session: bool = opt(
        True,
        "CPU: search onnxruntime session settings (intra-op threads, spinning, "
        "SkipLayerNormFusion, graph optimization level) for the winner and close runners-up, "
        "measured interleaved; write the fastest to OUT/best.session.json.",
        panel=BENCH,
    )
    search: str = opt(
        "default",
        "Search effort. quick: one INT8 recipe per kind (the safe one for this CPU), no "
        "screening, winner-only session search. default: recipes derived from the CPU (fused "
        "parent, reduce-range and u8u8 where the CPU lacks VNNI, mixed precision), a short "
        "screening run, the 3 fastest measured in full, session search for the winner and a "
        "close runner-up. exhaustive: every recipe combination, the 5 fastest measured in full.",
        panel=BENCH,
    )

    @field_validator("image_mean", "image_std")
    @classmethod
    def _per_channel(cls, v: tuple[float, ...] | None) -> tuple[float, ...] | None:
        if v is not None and len(v) not in (1, 3, 4):
            raise ValueError("give 1 value (all channels) or one per channel (3, or 4)")
        return v

    @field_validator("labels_column", "text_pair_column")
    @classmethod
    def _needs_eval(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is not None and info.data.get("evaluation") is None:
            raise ValueError(
                "needs labelled evaluation data: give --eval FILE.csv/.jsonl (or an image folder)"
            )
        return v

    @field_validator("max_accuracy_drop")
    @classmethod
    def _needs_labels(cls, v: float | None, info: ValidationInfo) -> float | None:
        if v is not None and info.data.get("labels_column") is None:
            raise ValueError(
                "needs task metrics, measured on labelled evaluation data: give --labels-column "
                "with --eval"
            )
        return v

    @field_validator("variants")
    @classmethod
    def _known_variants(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        bad = [x for x in v if x not in VARIANTS]
        if bad:
            raise ValueError(
                f"unknown variant(s) {', '.join(bad)}; choose from {', '.join(VARIANTS)}"
            )
        return tuple(dict.fromkeys(v))  # none: only the exported fp32 model

    @field_validator("calibration_methods")
    @classmethod
    def _methods(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        bad = [m for m in v if m not in CALIBRATION_METHODS]
        if bad or not v:
            raise ValueError(
                f"calibration methods must be minmax, entropy or percentile, got {bad or 'none'}"
            )
        return v

    @field_validator("bench_batches")
    @classmethod
    def _batches(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if not v or any(b < 1 for b in v):
            raise ValueError("batch sizes must be positive integers, e.g. 1,8,32")
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
    except IsADirectoryError:
        raise ConfigError(f"{path}: a folder, not a {what}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None


def first_error(e: ValidationError, prefix: str = "") -> str:
    """A pydantic error as one line: ``field: message (got VALUE)``."""
    err = e.errors()[0]
    where = ".".join(str(x) for x in (prefix, *err["loc"]) if x != "")
    msg = err["msg"].removeprefix("Value error, ")
    if err.get("type") not in ("missing", "extra_forbidden") and "input" in err:
        value = err["input"]
        if not isinstance(value, (dict, list)) or len(repr(value)) < 60:
            msg += f" (got {value!r})"
    return f"{where}: {msg}" if where else msg


def make_config(**kwargs: Any) -> OptimizeConfig:
    """Build an OptimizeConfig, turning validation errors into one-line ConfigErrors."""
    try:
        return OptimizeConfig(**{k: v for k, v in kwargs.items() if v is not None})
    except ValidationError as e:
        raise ConfigError(first_error(e)) from None
