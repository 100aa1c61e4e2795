"""Third-party OCR models through `deployopt optimize` with default settings: the PP-OCRv4 text
detector (dynamic height and width) and recogniser (dynamic width) that `rapidocr-onnxruntime`
ships (`pip install --no-deps rapidocr-onnxruntime`; nobody on this project wrote them).

Usage:  python benchmarks/ocr_rapidocr.py [--out DIR] [--images 32] [--models det,rec]

Calibration and evaluation data are images of printed text rendered here
(deployopt.demos.text_images): pages for the detector, single lines for the recogniser, two
disjoint seeded sets. PaddleOCR's own normalisation is passed as flags: ImageNet mean/std for
the detector, (x - 0.5) / 0.5 for the recogniser. Each run is the CLI as a user types it, so the
figures are what a user gets; the table lists every variant with its status and reason.

Target (issue 12): each model ends with at least one int8 variant that passed parity.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MODELS = {  # name: (file in rapidocr_onnxruntime/models, image kind, mean, std)
    "det": ("ch_PP-OCRv4_det_infer.onnx", "page", "0.485,0.456,0.406", "0.229,0.224,0.225"),
    "rec": ("ch_PP-OCRv4_rec_infer.onnx", "line", "0.5", "0.5"),
}


def model_dir() -> Path:
    from deployopt.demos.text_images import rapidocr_models

    folder = rapidocr_models()
    if folder is None:
        sys.exit("needs rapidocr-onnxruntime: pip install --no-deps rapidocr-onnxruntime")
    return folder


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--images", type=int, default=32, help="images in each of the two sets")
    ap.add_argument("--models", default="det,rec")
    args = ap.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="deployopt-ocr-"))
    from deployopt.demos.text_images import write_text_images

    ok_all = True
    lines = []
    for name in args.models.split(","):
        file, kind, mean, std = MODELS[name]
        calib = out / f"{kind}-calibration"
        evald = out / f"{kind}-evaluation"
        write_text_images(calib, args.images, kind, seed=0)
        write_text_images(evald, args.images, kind, seed=1)
        argv = ["optimize", str(model_dir() / file), "-o", str(out / name),
                "--calibration", str(calib), "--eval", str(evald),
                "--image-mean", mean, "--image-std", std]  # fmt: skip
        print("$ deployopt", " ".join(argv), flush=True)
        t0 = time.perf_counter()
        rc = subprocess.run([sys.executable, "-m", "deployopt", *argv]).returncode
        secs = time.perf_counter() - t0
        report = json.loads((out / name / "report.json").read_text())
        int8_ok = [
            v["name"]
            for v in report["variants"]
            if v["stage"].startswith("int8") and v["status"] == "ok"
        ]
        ok_all &= rc == 0 and bool(int8_ok)
        lines.append(
            f"{name} ({file}): exit {rc}, {secs:.0f} s, shipped {report['choice'].get('winner')}"
            f"; int8 variants that passed parity: {', '.join(int8_ok) or 'NONE'}"
        )
        for v in report["variants"]:
            p = v.get("parity") or {}
            cos = f"mean cos {p['mean_cosine']:.5f}" if p.get("mean_cosine") is not None else ""
            lines.append(f"    {v['name']:<34} {v['status']:<8} {cos} {v.get('reason') or ''}")

    from deployopt.benchmark import fingerprint
    from deployopt.presets import Target

    env = fingerprint(Target(name="cpu", ep="cpu"))
    print()
    print(f"machine: {env.get('cpu')} ({env.get('cpu_flags')}), {env.get('cores')} cores; "
          f"onnxruntime {env.get('onnxruntime')}, onnx {env.get('onnx')}")  # fmt: skip
    print("\n".join(lines))
    print("targets met" if ok_all else "TARGETS MISSED")
    return 0 if ok_all else 1


if __name__ == "__main__":
    sys.exit(main())
