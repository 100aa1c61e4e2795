"""Where training runs and in which precision: ``--device`` and ``--precision``.

- :func:`resolve_device`: ``auto`` (CUDA when this torch has a usable GPU, else the CPU),
  ``cpu``, ``cuda`` or ``cuda:N``. Under ``torchrun`` on GPUs every process takes the GPU of
  its ``LOCAL_RANK`` (one process per GPU).
- :class:`Precision`: ``fp32``, ``bf16`` or ``fp16`` through ``torch.autocast`` on the
  device; fp16 adds a ``GradScaler`` (its gradients underflow without loss scaling). The
  weights stay fp32 (autocast casts per op, the master weights are never converted).
  fp16 also runs on the CPU (torch's CPU autocast and GradScaler support it), but most CPUs
  have no fp16 arithmetic, so it is slow there: it is a way to check the fp16 path, not a
  speed-up; bf16 is the CPU's mixed precision.
- :func:`peak_memory`: the peak device memory of a run (``torch.cuda.max_memory_allocated``
  on CUDA; on the CPU the process's peak resident set size, which is what there is).

Only the standard library and torch are imported, so the torch-side path runs where the CLI's
libraries are not installed (benchmarks/gpu_check.py).
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass

import torch

from deployopt.errors import ConfigError, RuntimeUnavailableError

DEVICES = "auto, cpu, cuda or cuda:N"
PRECISIONS = ("fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_SPEC = re.compile(r"^(auto|cpu|cuda)(?::(\d+))?$")


def _local_rank() -> tuple[int, int]:
    return int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _cuda_unavailable(spec: str) -> RuntimeUnavailableError:
    build = torch.__version__
    why = (
        "this torch build has no CUDA support"
        if torch.version.cuda is None
        else f"torch (CUDA {torch.version.cuda}) sees no usable GPU"
    )
    return RuntimeUnavailableError(
        f"--device {spec}: {why} (torch {build}); available here: cpu",
        hint="use --device cpu (or auto), or install a CUDA build of torch on a machine with a GPU",
    )


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """The torch device for ``--device`` ``spec``.

    ``auto``: CUDA when available, else the CPU. ``cuda`` / ``cuda:N`` on a torch without a
    usable GPU, or ``N`` past the last GPU, raise RuntimeUnavailableError (exit 4) naming what
    is available. Under torchrun with several processes on CUDA each process takes
    ``cuda:LOCAL_RANK`` and makes it its current device.

    >>> resolve_device("cpu")
    device(type='cpu')
    """
    if isinstance(spec, torch.device):
        spec = str(spec)
    text = (spec or "auto").strip().lower()
    m = _SPEC.match(text)
    if m is None or (m[1] != "cuda" and m[2] is not None):
        raise ConfigError(f"--device {spec!r}: not a device", hint=f"use {DEVICES}")
    kind, index = m[1], m[2]
    if kind == "cpu" or (kind == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise _cuda_unavailable(text)
    count = torch.cuda.device_count()
    local, world = _local_rank()
    if world > 1:  # torchrun: one process per GPU, the one of its LOCAL_RANK
        if index is not None and int(index) != local:
            raise ConfigError(
                f"--device {spec}: under torchrun each process takes the GPU of its LOCAL_RANK "
                f"(this one: cuda:{local})",
                hint="pass --device cuda (or auto) with torchrun --nproc_per_node N",
            )
        index = str(local)
    i = int(index or 0)
    if i >= count:
        names = ", ".join(f"cuda:{k}" for k in range(count))
        raise RuntimeUnavailableError(
            f"--device {spec}: there is no GPU {i}; available here: cpu, {names}",
            hint="pick one of the GPUs listed (nvidia-smi shows them)",
        )
    device = torch.device("cuda", i)
    if world > 1:
        torch.cuda.set_device(device)  # before any allocation: NCCL binds to it
    return device


def check_precision(precision: str, device: torch.device) -> str:
    """``precision`` checked against ``device``: a ConfigError for an unknown name, a
    RuntimeUnavailableError for bf16 on a GPU without bf16 support."""
    if precision not in PRECISIONS:
        raise ConfigError(
            f"--precision {precision!r}: not a precision", hint="use " + ", ".join(PRECISIONS)
        )
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise RuntimeUnavailableError(
            f"--precision bf16: {torch.cuda.get_device_name(device)} has no bf16 support",
            hint="use --precision fp16 (with loss scaling) or fp32",
        )
    return precision


@dataclass
class Precision:
    """Autocast and loss scaling for one training run. ``fp32``: neither."""

    name: str
    device: torch.device

    def __post_init__(self):
        check_precision(self.name, self.device)
        self.dtype = _DTYPES.get(self.name)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.name == "fp16")

    def autocast(self):
        """The forward pass's context: autocast to bf16/fp16 on the device, or nothing."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (timings on CUDA are asynchronous otherwise)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> dict:
    """``{"peak_memory_mb": x, "peak_memory_kind": what x is}``: CUDA's peak allocated
    memory since :func:`reset_peak_memory`, or on the CPU the process's peak resident set size
    (getrusage: since the process started, so it includes loading the models)."""
    if device.type == "cuda":
        mb = torch.cuda.max_memory_allocated(device) / 2**20
        return {"peak_memory_mb": round(mb, 1), "peak_memory_kind": "cuda max_memory_allocated"}
    import resource

    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"peak_memory_mb": round(kb / 1024, 1), "peak_memory_kind": "process peak RSS (CPU)"}


def describe(device: torch.device) -> str:
    """``cuda:0 (NVIDIA H100 80GB HBM3)`` or ``cpu``."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def to_device(x, device: torch.device):
    """A tensor, or a dict of tensors (a tokenizer's batch), on ``device``."""
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, dict) or hasattr(x, "items"):
        return {k: to_device(v, device) for k, v in x.items()}
    return x
