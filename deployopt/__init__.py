"""deployopt: make a model smaller and faster for deployment, and prove it is still right."""

from deployopt import errors
from deployopt.variant import Variant

__version__ = "0.1.0"
__all__ = [
    "optimize", "bench", "gate", "distill", "prune", "run", "Variant", "errors", "__version__",
]  # fmt: skip


def __getattr__(name: str):
    # Heavy runtimes (torch, onnxruntime) load only when the API is used.
    if name in ("optimize", "bench", "gate", "distill", "prune"):
        from deployopt import api

        return getattr(api, name)
    if name == "run":  # a recipe file, dict or Recipe, run into an output folder
        from deployopt.pipeline import run_path

        return run_path
    raise AttributeError(name)
