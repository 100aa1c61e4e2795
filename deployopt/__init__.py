"""deployopt: make a model smaller and faster for deployment, and prove it is still right."""

from deployopt import errors
from deployopt.variant import Variant

__version__ = "0.1.0"
__all__ = ["optimize", "bench", "gate", "distill", "prune", "Variant", "errors", "__version__"]


def __getattr__(name: str):
    # Heavy runtimes (torch, onnxruntime) load only when the API is used.
    if name in ("optimize", "bench", "gate", "distill", "prune"):
        from deployopt import api

        return getattr(api, name)
    raise AttributeError(name)
