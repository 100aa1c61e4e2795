"""Optimum's dynamic int8 recipe for MiniLM, run by ``peers_minilm.py`` in ``.venv-peers``.

Usage:  .venv-peers/bin/python benchmarks/_optimum_peer.py MODEL_FOLDER OUT_DIR --isa avx512_vnni

Exports the Hugging Face folder with ``ORTModelForFeatureExtraction.from_pretrained(...,
export=True)`` and quantizes it with ``ORTQuantizer`` and the ``AutoQuantizationConfig`` preset
for ``--isa`` (``avx512_vnni``, ``avx512`` or ``avx2``), dynamic, the preset's own per-channel
default: what Optimum's documentation tells a user to do. Imports nothing from deployopt (this
venv has none); the last line it prints is JSON naming the quantized file.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("model", type=Path, help="Hugging Face model folder (with tokenizer)")
    ap.add_argument("out", type=Path, help="output folder")
    ap.add_argument("--isa", choices=("avx512_vnni", "avx512", "avx2"), default="avx2")
    args = ap.parse_args()

    import optimum.version
    from optimum.onnxruntime import ORTModelForFeatureExtraction, ORTQuantizer
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    exported = args.out / "exported"
    model = ORTModelForFeatureExtraction.from_pretrained(args.model, export=True)
    model.save_pretrained(exported)
    preset = getattr(AutoQuantizationConfig, args.isa)
    per_channel = inspect.signature(preset).parameters["per_channel"].default
    qconfig = preset(is_static=False)
    quantizer = ORTQuantizer.from_pretrained(exported)
    quantizer.quantize(save_dir=args.out / "quantized", quantization_config=qconfig)
    files = sorted((args.out / "quantized").glob("*.onnx"))
    if len(files) != 1:
        print(f"expected one quantized .onnx file, found {[f.name for f in files]}")
        return 1
    print(
        json.dumps(
            {
                "path": str(files[0]),
                "optimum": optimum.version.__version__,
                "isa": args.isa,
                "per_channel": per_channel,
                "is_static": False,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
