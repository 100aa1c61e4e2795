"""The options of distill, prune, bench and gate, and of a model source, declared once.

``deployopt optimize``'s options are :class:`deployopt.config.OptimizeConfig`. The CLI derives
each command's flags from these models (deployopt.flags); a recipe's tables hold the same keys
(deployopt.recipe). Help text, bounds and defaults live here and nowhere else.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from pydantic import BeforeValidator, ValidationError, field_validator

from deployopt.config import (
    MIN_SAMPLES,
    MIN_SECONDS,
    ROUNDS,
    TIMEOUT_S,
    Csv,
    Options,
    Percent,
    Shapes,
    first_error,
    opt,
)
from deployopt.errors import ConfigError
from deployopt.judge import Budget
from deployopt.torchside.lossnames import LOSSES, parse_losses  # noqa: F401 (re-exported)

PACKAGED = (
    "fashion-mnist, fashion-mnist-test, reuters-r8, reuters-r8-test, reuters-r52, "
    "reuters-r52-test, 20newsgroups, 20newsgroups-test, bbc-news"
)
DATA_HELP = (
    "a text file (one example a line), .csv, .jsonl, an image folder (FOLDER/<class>/<image>), "
    "or a packaged dataset: " + PACKAGED
)
TRAIN = "Training"  # a help panel
SIZE_KEYS = {"layers": "num_hidden_layers", "heads": "num_attention_heads",
             "hidden": "hidden_size", "ffn": "intermediate_size"}  # fmt: skip


class SourceOptions(Options):
    """The model a run starts from (``[source]`` in a recipe)."""

    path: str = opt(
        ..., "HF model folder, .onnx file, pkg.module:factory, or 'minilm' (bundled).", data=True
    )
    input_shape: Shapes = opt(
        {},
        "NAME=DIMS, repeat per input. Required for a PyTorch factory (x=1x3x32x32). For an "
        ".onnx file it settles symbolic dims (the first, the batch, comes from the batch "
        "options); without it an image input's symbolic height/width is the size in the "
        "model's metadata, else the first of 224, 256, 320, 384, 448, 512, 640 the model runs at.",
        repeat=True,
    )
    weights: Path | None = opt(
        None,
        "State dict for a factory's module: .safetensors, or a tensors-only torch pickle.",
        data=True,
    )


def _student_size(value: Any) -> Any:
    """``layers=3,heads=4`` (flag) or ``{layers = 3}`` (TOML) as a dict (keys: SIZE_KEYS)."""
    if isinstance(value, (list, tuple)):
        value = ",".join(map(str, value))
    if isinstance(value, str):
        out = {}
        for part in (p for p in value.split(",") if p.strip()):
            k, _, v = part.partition("=")
            if not v.strip().isdigit():
                raise ValueError(f"bad part {part!r}: write e.g. layers=3,heads=4")
            out[k.strip()] = int(v)
        value = out
    if isinstance(value, dict):
        bad = [k for k in value if k not in SIZE_KEYS]
        if bad:
            raise ValueError(f"unknown key(s) {', '.join(bad)}: use {', '.join(SIZE_KEYS)}")
        return dict(value)
    return value


class TrainOptions(Options):
    """Optimiser settings shared by distillation and pruning recovery."""

    lr: float | None = opt(
        None,
        "AdamW learning rate. Default: 5e-4 for sentence encoders, 5e-5 for classifiers.",
        gt=0, panel=TRAIN,
    )  # fmt: skip
    batch_size: int | None = opt(
        None,
        "Examples per step (per process under torchrun). Default: 8 for distilling sentence "
        "encoders (more steps on a small corpus), 32 otherwise.",
        ge=1, panel=TRAIN,
    )  # fmt: skip
    max_length: int = opt(128, "Token limit for text.", ge=8, le=8192)
    labels_column: str | None = opt(None, "Label column/field in .csv/.jsonl data.")
    text_column: str = opt("text", "Text column/field in .csv/.jsonl data.")
    max_examples: int | None = opt(None, "Use at most this many training examples.", ge=1)
    seed: int = opt(0, "Seed for initialisation, data order and dropout.")
    device: str = opt(
        "auto",
        "Where the teacher and student run: auto (CUDA when available), cpu, cuda or cuda:N. "
        "Under torchrun each process takes the GPU of its LOCAL_RANK.",
        pattern=r"^(auto|cpu|cuda(:\d+)?)$", panel=TRAIN,
    )  # fmt: skip
    precision: str = opt(
        "fp32",
        "Training precision: fp32, bf16 or fp16 (autocast, fp16 with loss scaling); the weights "
        "stay fp32 and the KD losses compute in fp32. bf16 also runs on the CPU; fp16 there is "
        "slow (for checking only).",
        pattern="^(fp32|bf16|fp16)$", panel=TRAIN,
    )  # fmt: skip


class DistillOptions(TrainOptions):
    """``deployopt distill`` (``[distill]``): the teacher is the source."""

    data: str = opt(..., "Training data: " + DATA_HELP + ".", data=True)
    student_layers: Annotated[tuple[int, ...] | None, Csv] = opt(
        None, "Keep these teacher layers, weights copied (e.g. 0,2,4). Default: half, evenly "
        "spread."
    )  # fmt: skip
    student: str | None = opt(None, "Your own student: HF folder or pkg.module:factory.",
                              data=True)  # fmt: skip
    student_size: Annotated[dict[str, int] | None, BeforeValidator(_student_size)] = opt(
        None,
        "A smaller config of the teacher's architecture, fresh weights: "
        "layers=3,heads=4,hidden=256,ffn=1024 (any subset).",
    )
    loss: str | None = opt(
        None,
        "Losses with weights: embedding (MSE), cosine (1 - cos), kd, ce, hidden, attention "
        "(e.g. embedding,hidden:0.5). Default: cosine,hidden:3 for sentence encoders (hidden "
        "alone for a narrower student), kd for classifiers.",
    )
    epochs: int = opt(3, "Training epochs.", ge=1, panel=TRAIN)
    weight_decay: float = opt(0.01, "AdamW weight decay (not on biases and norms).", ge=0,
                              panel=TRAIN)  # fmt: skip
    warmup: float = opt(0.1, "Fraction of steps for linear warm-up.", ge=0, lt=1, panel=TRAIN)
    max_grad_norm: float = opt(1.0, "Gradient clipping norm (0: off).", ge=0, panel=TRAIN)
    dropout: float | None = opt(
        None,
        "The student's dropout while training (its saved config keeps its own). Default: 0 for "
        "sentence encoders, which regress onto the teacher's outputs; the model's own for "
        "classifiers.",
        ge=0, lt=1, panel=TRAIN,
    )  # fmt: skip
    patience: int = opt(2, "Epochs without a better eval score before stopping.", ge=1,
                        panel=TRAIN)  # fmt: skip
    temperature: float = opt(4.0, "KD softmax temperature T.", gt=0)
    alpha: float = opt(0.9, "KD: weight of the soft loss vs hard labels.", ge=0, le=1)
    eval_data: str | None = opt(
        None, "Evaluation data (same forms as --data). Default: 10% held out.", data=True
    )
    windows: bool = opt(
        True,
        "Sentence encoders: a text longer than --max-length trains as several windows, so all "
        "of it teaches the student (--no-windows: its first window only).",
    )
    freeze_embeddings: bool = opt(
        False, "Transformers: keep the token-embedding table as the teacher's.",
        flag="--freeze-embeddings/--train-embeddings",
    )  # fmt: skip
    checkpoint_every: int = opt(100, "Steps between checkpoints.", ge=1, panel=TRAIN)

    @field_validator("loss")
    @classmethod
    def _losses(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                parse_losses(v)
            except ConfigError as e:
                raise ValueError(f"{e.message}; {e.hint}") from None
        return v


class PruneOptions(TrainOptions):
    """``deployopt prune`` (``[prune]``)."""

    heads: float | None = opt(None, "Fraction of attention heads to remove, in each layer.",
                              gt=0, lt=1)  # fmt: skip
    ffn: float | None = opt(None, "Fraction of FFN (intermediate) neurons to remove.", gt=0,
                            lt=1)  # fmt: skip
    drop_layers: Annotated[tuple[int, ...] | None, Csv] = opt(
        None, "Transformer layers to delete, e.g. 1,3."
    )
    channels: float | None = opt(
        None, "CNNs: fraction of channels to remove (dependency-aware).", gt=0, lt=1
    )
    unstructured: float | None = opt(
        None,
        "Fraction of single weights to zero (size after compression only; a dense runtime is "
        "not faster).",
        gt=0, lt=1,
    )  # fmt: skip
    target_params: float | None = opt(
        None,
        "Instead of ratios: keep this fraction of the parameters (one ratio for heads and FFN, "
        "or for channels, found by search).",
        gt=0, lt=1,
    )  # fmt: skip
    target_latency: float | None = opt(
        None,
        "Instead of ratios: keep this fraction of the PyTorch latency (batch 1, x seq 128 for "
        "text; timed on this machine, interleaved with the original).",
        gt=0, lt=1,
    )  # fmt: skip
    importance: str | None = opt(
        None,
        "gradient (Michel et al. 2019; needs --data) or magnitude. Default: gradient when "
        "--data is given.",
        pattern="^(gradient|magnitude)$",
    )  # fmt: skip
    scope: str = opt(
        "layer",
        "layer: the same share from every layer (uniform shapes); global: rank all layers "
        "together.",
        pattern="^(layer|global)$",
    )  # fmt: skip
    data: str | None = opt(None, "Data for importance and recovery: " + DATA_HELP + ".",
                           data=True)  # fmt: skip
    importance_examples: int = opt(256, "Examples used to score heads/neurons/channels.", ge=1)
    steps: int = opt(1, "Iterative pruning: prune -> recover this many times.", ge=1)
    recover_epochs: int = opt(
        0,
        "Fine-tuning epochs after pruning (split across steps). One epoch brought MiniLM with "
        "a third of its heads and half its FFN pruned back to a held-out cosine of 0.91 on "
        "3,000 texts (0.67 before recovery).",
        ge=0, panel=TRAIN,
    )  # fmt: skip
    kd: bool = opt(True, "Recover with knowledge distillation from the unpruned model.",
                   panel=TRAIN)  # fmt: skip

    def prunes(self) -> bool:
        """Whether the options remove anything."""
        what = (self.heads, self.ffn, self.drop_layers, self.channels, self.unstructured,
                self.target_params, self.target_latency)  # fmt: skip
        return any(w is not None for w in what)


class MeasureOptions(Options):
    """Where and how long a measurement runs (bench and gate)."""

    target: str | None = opt(None, "Named target: cpu, cpu-1t, cuda, or one from --config.")
    config: Path | None = opt(None, "TOML file with [targets.NAME] tables.", data=True)
    session: Path | None = opt(
        None,
        "Session file (OUT/best.session.json of optimize): its threads, graph optimization and "
        "session config replace the target's (default: the folder's, for a MODEL folder).",
    )
    seq: int = opt(128, "Length for a symbolic sequence dim.", ge=1)
    min_samples: int = opt(MIN_SAMPLES, "Least timed runs per measurement.", ge=1)
    min_seconds: float = opt(MIN_SECONDS, "Least timed seconds per measurement.", ge=0)
    rounds: int = opt(ROUNDS, "Interleaved rounds the samples are spread over.", ge=1, le=100)
    timeout: float = opt(TIMEOUT_S, "Seconds before a hung measurement is killed.", gt=0)
    history: str | None = opt(
        None,
        "Results database: a path, sqlite:///PATH or postgresql://USER@HOST/DB (default "
        ".deployopt/history.sqlite or $DEPLOYOPT_HISTORY).",
    )
    no_history: bool = opt(False, "Do not record the results.", flag="--no-history")
    json_out: Path | None = opt(None, "Write the results as JSON to this file.", alias="json",
                                output=True)  # fmt: skip
    cluster: str | None = opt(
        None,
        "Measure on a Ray cluster: auto (the one RAY_ADDRESS names or that runs on this "
        "machine) or HOST:PORT (the head's GCS; ray:// Ray Client addresses are refused). Each "
        "target runs as one task on a node with "
        "its ray_labels, the targets in parallel; no cluster found is an error (exit 4).",
    )
    schedule_timeout: float = opt(
        60.0,
        "With --cluster: seconds a target's task may wait for a node with its labels before "
        "its results are INVALID (no node for target).",
        gt=0,
    )


class BenchOptions(MeasureOptions):
    """``deployopt bench`` (``[bench]``): the models are the source (and ``compare``)."""

    compare: Annotated[tuple[Path, ...], Csv] = opt(
        (), "More .onnx models measured in the same interleaved rounds, comma-separated.",
        data=True,
    )  # fmt: skip
    ep: str | None = opt(
        None, "Execution provider for an ad-hoc target: cpu, cuda, tensorrt, openvino, ..."
    )
    threads: int | None = opt(None, "Intra-op threads (default: all cores).", ge=1)
    batch: Annotated[tuple[int, ...], Csv] = opt(
        (1,), "Batch sizes for the symbolic batch dim, comma-separated."
    )
    shape: Shapes = opt(
        {}, "NAME=DIMS to set one input's shape exactly (repeat per input).", repeat=True
    )
    include_copies: bool = opt(
        False,
        "GPU EPs: time host<->device copies too (default: IO binding, copies not timed).",
        flag="--include-copies",
    )
    targets: Annotated[tuple[str, ...], Csv] = opt(
        (),
        "With --cluster: targets to measure on, comma-separated (each one's [targets.NAME] "
        "table in --config names its node with ray_labels).",
    )


def _budget(value: Any) -> Any:
    """A budget file's path, or ``[[gate.budget]]`` tables inline in a recipe."""
    if isinstance(value, list):
        return [Budget(**b) if isinstance(b, dict) else b for b in value]
    return value


class GateOptions(MeasureOptions):
    """``deployopt gate`` (``[gate]``)."""

    budget: Annotated[Path | list[Budget] | None, BeforeValidator(_budget)] = opt(
        None,
        "TOML budget file ([[budgets]] tables); in a recipe also [[gate.budget]] tables.",
        data=True,
    )
    report: Path | None = opt(
        None, "Judge the results recorded in this report.json instead of measuring.", data=True
    )
    variant: str | None = opt(None, "With --report: the variant to judge (default: the chosen).")
    p50_ms: float | None = Budget.model_fields["p50_ms"]
    p90_ms: float | None = Budget.model_fields["p90_ms"]
    p95_ms: float | None = Budget.model_fields["p95_ms"]
    p99_ms: float | None = Budget.model_fields["p99_ms"]
    min_throughput: float | None = Budget.model_fields["min_throughput"]
    max_size_mb: float | None = Budget.model_fields["max_size_mb"]
    min_cosine: float | None = Budget.model_fields["min_cosine"]
    min_min_cosine: float | None = Budget.model_fields["min_min_cosine"]
    batch: int = opt(1, "Batch size of the flag limits and --baseline.", ge=1)
    reference: Path | None = opt(None, "Reference .onnx for --min-cosine when measuring.",
                                 data=True)  # fmt: skip
    baseline: str | None = opt(
        None,
        "OLD.onnx (or an optimize output folder: its best.onnx) measured in the same job, "
        "interleaved, or 'last-pass' (the last passing gate result of this model on this "
        "target, from the history).",
    )
    max_slowdown: Percent = opt(0.05, "Slowdown vs --baseline that fails, e.g. 5%.")
    processes: int = opt(3, "Worker process pairs for --baseline (order alternating).", ge=1)
    junit: Path | None = opt(None, "Write JUnit XML (one testcase per check).", output=True)
    markdown: Path | None = opt(
        None, 'Write a Markdown summary (e.g. "$GITHUB_STEP_SUMMARY").', output=True
    )
    name: str | None = opt(None, "Model name in the history (default: from the file).")
    allow_version_mismatch: bool = opt(
        False,
        "With --cluster: judge a target whose node runs another onnxruntime or deployopt "
        "version than this machine (default: its checks are INVALID).",
        flag="--allow-version-mismatch",
    )

    def limits(self) -> dict[str, float]:
        """The limits given as options (one budget on target/batch/seq)."""
        keys = ("p50_ms", "p90_ms", "p95_ms", "p99_ms", "min_throughput", "max_size_mb",
                "min_cosine", "min_min_cosine")  # fmt: skip
        return {k: getattr(self, k) for k in keys if getattr(self, k) is not None}


SESSION_KEYS = {"threads", "graph_optimization", "session_config"}


class SearchOptions(Options):
    """``[search]`` of a recipe (``deployopt search``): the choices each dimension may take.
    A trial is one choice per dimension; the fastest trial within the accuracy budget wins."""

    student_layers: list[list[int] | str] = opt(
        [], 'Students to try: teacher layers kept, or "none" for no distillation.'
    )
    heads: list[float] = opt([], "Attention-head prune ratios to try (0: none).")
    ffn: list[float] = opt([], "FFN prune ratios to try (0: none).")
    channels: list[float] = opt([], "CNN channel prune ratios to try (0: none).")
    variants: list[list[str]] = opt([], "Optimize variant lists to try.")
    sessions: list[str | dict[str, Any]] = opt(
        [],
        'onnxruntime session settings to try: "tuned" (optimize searches them), "default" (the '
        "target's as they are), or a table of threads, graph_optimization and session_config.",
    )
    max_accuracy_drop: float = opt(
        1.0, "Most task-metric drop (points) from the original on the evaluation set.", ge=0
    )
    objective: str = opt(
        "latency",
        "latency: the fastest trial within the budget. pareto: task metric against latency, "
        "two objectives (NSGA-II past a grid); the winner is still the fastest within budget.",
        pattern="^(latency|pareto)$",
    )
    prune_dominated: bool = opt(
        True,
        "objective latency: skip a trial that keeps at least the layers and heads of a trial "
        "already within budget, under the same variants and session (it cannot be faster). "
        "Grid points run smallest first.",
    )
    max_trials: int = opt(20, "Most trials.", ge=1)
    max_minutes: float = opt(60.0, "Most minutes for new trials.", gt=0)
    sampler: str = opt(
        "auto",
        "auto (grid when the space fits max_trials, else TPE, or NSGA-II for pareto), grid, "
        "tpe or nsga2.",
        pattern="^(auto|grid|tpe|nsga2)$",
    )  # fmt: skip
    seed: int = opt(0, "Seed of the sampler.")

    @field_validator("student_layers")
    @classmethod
    def _students(cls, v: list) -> list:
        bad = [x for x in v if isinstance(x, str) and x != "none"]
        if bad:
            raise ValueError(f'a student is a list of layers or "none", not {bad[0]!r}')
        return v

    @field_validator("sessions")
    @classmethod
    def _sessions(cls, v: list) -> list:
        from deployopt.presets import Target

        for x in v:
            if isinstance(x, str):
                if x not in ("tuned", "default"):
                    raise ValueError(f'a session is "tuned", "default" or a table, not {x!r}')
                continue
            extra = set(x) - SESSION_KEYS
            if extra:
                raise ValueError(
                    f"a session table takes {', '.join(sorted(SESSION_KEYS))}, not "
                    f"{', '.join(sorted(extra))}"
                )
            try:
                Target(name="session", **x)
            except ValidationError as e:
                raise ValueError(f"session {x}: {first_error(e)}") from None
        return v

    @field_validator("heads", "ffn", "channels")
    @classmethod
    def _ratios(cls, v: list[float]) -> list[float]:
        bad = [x for x in v if not 0 <= x < 1]
        if bad:
            raise ValueError(f"prune ratios are in [0, 1), not {bad[0]}")
        return v
