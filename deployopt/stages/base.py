"""The stage contract: read one variant, write one model into a fresh folder, never mutate input.

Stages have a class-level ``name`` (the stage) and a ``label`` (the variant they produce; one
stage can produce several candidates, e.g. ``int8-dynamic`` and ``int8-dynamic/fused``)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

from deployopt.inputs import Batch, InputSpec
from deployopt.parity import Tolerance
from deployopt.sources import ModelMeta

MODEL_FILE = "model.onnx"
EXTERNAL_DATA_FILE = "model.onnx.data"
# protobuf's 2 GiB limit, with room for the graph itself
EXTERNAL_DATA_THRESHOLD = 1_800_000_000


@dataclass
class Context:
    """What every stage of one run may read. Stages never write to it."""

    meta: ModelMeta
    specs: list[InputSpec]
    calibration: list[Batch]
    evaluation: list[Batch]
    threads: int | None = None
    log: Callable[[str], None] = print
    extra: dict[str, Any] = field(default_factory=dict)
    # derived data several stages share (e.g. a MatMul error ranking), computed once per run
    cache: dict[Any, Any] = field(default_factory=dict)
    timeout_s: float = 600.0  # for work in a worker process (isolated)

    def isolated(self, fn: Callable[..., Any], *args: Any, label: str, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` in a spawned worker process with the run's time limit: every
        onnxruntime session on a model of the run goes through here (or the parity and bench
        workers), so a native crash or hang fails one variant, never the run. ``fn`` must be a
        module-level function; a crash raises a StageError naming ``label``."""
        from deployopt.runtime.worker import run_in_worker

        return run_in_worker(fn, *args, timeout_s=self.timeout_s, label=label, **kwargs)


@dataclass
class StageOutput:
    metrics: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    # params chosen by the stage itself (e.g. the static-quantization search's winner)
    chosen: dict[str, Any] = field(default_factory=dict)


class Stage(Protocol):
    name: ClassVar[str]  # the stage, e.g. "int8-dynamic"
    label: str  # the variant name it produces, e.g. "int8-dynamic/fused"
    version: ClassVar[int]
    tolerance: ClassVar[Tolerance]
    parent: Sequence[str]  # preferred parents, first available wins

    def params(self) -> dict[str, Any]: ...
    def skip_reason(self, src: Path, ctx: Context) -> str | None: ...
    def apply(self, src: Path, out_dir: Path, ctx: Context) -> StageOutput: ...


def save_model(model, out_dir: Path) -> Path:
    """Save ``model`` as ``out_dir/model.onnx``, weights in ``model.onnx.data`` past 1.8 GB."""
    import onnx

    path = out_dir / MODEL_FILE
    big = model.ByteSize() > EXTERNAL_DATA_THRESHOLD if _can_size(model) else True
    if big:
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=EXTERNAL_DATA_FILE,
            size_threshold=1024,
        )
    else:
        onnx.save_model(model, str(path))
    return path


def _can_size(model) -> bool:
    try:
        model.ByteSize()
        return True
    except Exception:  # protobuf refuses to size messages past 2 GiB
        return False


def op_counts(model) -> Counter:
    return Counter(n.op_type for n in model.graph.node)


def model_files(model_path: Path) -> list[Path]:
    """The model file and its external data file, when present."""
    files = [model_path]
    data = model_path.with_name(EXTERNAL_DATA_FILE)
    if data.exists():
        files.append(data)
    return files


def size_bytes(model_path: Path) -> int:
    return sum(p.stat().st_size for p in model_files(model_path))
