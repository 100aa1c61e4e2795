"""torch -> ONNX with the dynamo exporter, dynamic batch and sequence dims.

The legacy TorchScript exporter gives wrong BERT outputs with current torch and transformers, so
only the dynamo exporter is used; the runner proves every export against PyTorch on shapes other
than the traced ones.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import warnings
from pathlib import Path

import numpy as np
import torch

from deployopt.errors import StageError
from deployopt.inputs import Batch
from deployopt.sources import TorchSource
from deployopt.stages.base import EXTERNAL_DATA_THRESHOLD, MODEL_FILE

NAME = "fp32"
VERSION = 1
DEFAULT_OPSET = 18


def export(source: TorchSource, out_dir: Path, opset: int = DEFAULT_OPSET) -> Path:
    """Export ``source.module`` to ``out_dir/model.onnx``. Raises StageError on exporter failure."""
    dims: dict[str, torch.export.Dim] = {}

    def dim(name: str, max_: int | None):
        if name not in dims:
            dims[name] = torch.export.Dim(name, max=max_) if max_ else torch.export.Dim(name)
        return dims[name]

    dynamic = tuple(
        {axis: dim(n, mx) for axis, (n, mx) in source.dynamic_dims.get(name, {}).items()}
        for name in source.input_names
    )
    if any(
        p.kind is p.VAR_POSITIONAL
        for p in inspect.signature(source.module.forward).parameters.values()
    ):
        dynamic = (dynamic,)  # forward(*inputs): one parameter holding every input
    params_bytes = sum(p.numel() * p.element_size() for p in source.module.parameters())
    path = out_dir / MODEL_FILE
    log = io.StringIO()
    # The exporter prints progress and library warnings; keep them for the error message.
    with (
        contextlib.redirect_stdout(log),
        contextlib.redirect_stderr(log),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        logging.getLogger("torch._dynamo").setLevel(logging.ERROR)
        logging.getLogger("torch.export").setLevel(logging.ERROR)
        try:
            # Inputs go positionally in input_names order: passing a tokenizer's dict as
            # kwargs together with input_names renames graph inputs in the dict's order
            # (input_ids, token_type_ids, attention_mask) and silently swaps two of them.
            torch.onnx.export(
                source.module,
                source.example_inputs,
                str(path),
                dynamo=True,
                dynamic_shapes=dynamic,
                input_names=source.input_names,
                output_names=source.output_names,
                opset_version=opset,
                external_data=params_bytes > EXTERNAL_DATA_THRESHOLD,
                verbose=False,
            )
        except Exception as e:  # the exporter raises many internal types
            raise StageError(
                f"export of {source.label} failed: {_root_cause(e)}",
                hint="try another --opset, or check the model runs on the example shapes",
            ) from e
    return path


def torch_outputs(source: TorchSource, batches: list[Batch]) -> list[dict[str, np.ndarray]]:
    """PyTorch's outputs on ``batches``: the reference the export is proved against."""
    outs = []
    with torch.inference_mode():
        for b in batches:
            args = tuple(torch.from_numpy(np.ascontiguousarray(b[n])) for n in source.input_names)
            res = source.module(*args)
            if isinstance(res, torch.Tensor):
                res = (res,)
            outs.append({n: r.float().numpy() for n, r in zip(source.output_names, res)})
    return outs


def _root_cause(e: BaseException) -> str:
    """The innermost exception's first line, without terminal colour codes."""
    import re

    while e.__cause__ is not None:
        e = e.__cause__
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:400]}" if text else type(e).__name__
