"""The deployopt error hierarchy.

Every error a user can cause is a :class:`DeployoptError` with a one-line message that names the
file, stage or tensor concerned, a ``hint`` that says how to fix it, and an ``exit_code``.
``deployopt.cli`` is the only place that turns these into exit codes.
"""

from __future__ import annotations

from typing import Any

EXIT_OK = 0
EXIT_GATE_FAIL = 1
EXIT_USAGE = 2
EXIT_INCONCLUSIVE = 3
EXIT_INVALID_RUN = 4
EXIT_INPUT_REJECTED = 5
EXIT_NO_VARIANT = 6
EXIT_UNSAFE_INPUT = 7
EXIT_PARITY = 8
EXIT_INTERNAL = 70


class DeployoptError(Exception):
    """Base class: a problem the user can act on."""

    exit_code: int = EXIT_USAGE
    default_hint: str = ""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint if hint is not None else self.default_hint

    def __str__(self) -> str:
        return self.message


class UsageError(DeployoptError):
    """Bad flags, bad config values."""

    exit_code = EXIT_USAGE
    default_hint = "run `deployopt COMMAND --help` for the accepted values"


class ConfigError(UsageError):
    """A config file or option that fails validation."""


class DataError(UsageError):
    """A calibration or evaluation data file that cannot be read."""

    default_hint = "give one example per line (text), or an .npz with one array per model input"


class InputModelError(DeployoptError):
    """The input model cannot be loaded: missing, empty, truncated, not ONNX, wrong folder."""

    exit_code = EXIT_INPUT_REJECTED
    default_hint = (
        "check the path points at a Hugging Face model folder, an .onnx file or pkg.mod:factory"
    )


class UnsafeInputError(DeployoptError):
    """The input would run code or read files outside its folder: refused before loading."""

    exit_code = EXIT_UNSAFE_INPUT
    default_hint = "convert the weights to safetensors, or keep external data beside the model"


class StageError(DeployoptError):
    """A stage failed for one variant; within a run this marks the variant failed."""

    exit_code = EXIT_NO_VARIANT


class ParityError(StageError):
    """A model's outputs do not match its reference within tolerance.

    ``failures`` lists every failing output with its measured numbers.
    """

    exit_code = EXIT_PARITY
    default_hint = (
        "the exported graph computes something else than PyTorch: try another --opset, "
        "or report the model; loosen the tolerance only if you know why"
    )

    def __init__(self, message: str, failures: list[dict] | None = None, hint: str | None = None):
        super().__init__(message, hint)
        self.failures = failures or []


class NoViableVariantError(DeployoptError):
    """No variant met the constraints.

    ``result``: the run's :class:`~deployopt.runner.OptimizeResult` (variants, choice with every
    rejection, reports) when ``deployopt.optimize`` raises it, else None.
    """

    exit_code = EXIT_NO_VARIANT
    default_hint = "see the manifest for each variant's reason; relax a constraint or add variants"

    def __init__(self, message: str, hint: str | None = None, result: Any = None):
        super().__init__(message, hint)
        self.result = result


class RuntimeUnavailableError(DeployoptError):
    """onnxruntime (or an execution provider) is not installed or not usable."""

    exit_code = EXIT_INVALID_RUN
    default_hint = "install deployopt[cpu] (or deployopt[gpu] for CUDA)"


class OutputError(DeployoptError):
    """The output folder cannot hold the results: not writable, a read-only file system, or a
    full disk. Checked before any work, and raised (never cached as a failed variant) when a
    write fails mid-run."""

    exit_code = EXIT_INVALID_RUN
    default_hint = "choose an output folder on a writable file system with free space (-o DIR)"


class InputShapeError(UsageError):
    """The model's inputs could not be given concrete shapes or values that the model runs on."""

    default_hint = (
        "give real inputs with --eval and --calibration FILE.npz (one array per model input, "
        "samples first)"
    )
