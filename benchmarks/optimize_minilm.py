"""Wall time of `deployopt optimize minilm` with every variant built from scratch.

Usage:  python benchmarks/optimize_minilm.py [OUT]   (default: a temporary folder)

Prints the machine and versions, each variant's build time and parity, and the total.
The issue target: all four variants in under 5 minutes on a 2-core machine.
"""

from __future__ import annotations

import os
import platform
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import deployopt  # noqa: E402
from deployopt.benchmark import fingerprint  # noqa: E402


def main() -> None:
    out = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="deployopt-bench-")
    t0 = time.perf_counter()
    res = deployopt.optimize("minilm", out, force=True)
    total = time.perf_counter() - t0
    env = fingerprint()
    print(
        f"machine: {env.get('cpu')}, {env['cores']} cores; python {platform.python_version()}, "
        f"torch {env.get('torch')}, onnxruntime {env.get('onnxruntime')}, onnx {env.get('onnx')}"
    )
    print(
        f"{'variant':14s} {'status':8s} {'build s':>8s} {'MB':>6s} {'mean cos':>9s} {'min cos':>9s}"
    )
    for v in res.variants:
        p = v.parity or {}
        size = v.metrics.get("size_bytes")
        print(
            f"{v.name:14s} {v.status:8s} {v.metrics.get('build_s', 0):8.1f} "
            f"{(size or 0) / 1e6:6.1f} {p.get('mean_cosine', float('nan')):9.5f} "
            f"{p.get('min_cosine', float('nan')):9.5f}"
        )
    print(
        f"total wall time: {total:.1f} s (load, export, 4 variants, parity on "
        f"{res.by_name('fp32').parity['samples']} samples each)"
    )


if __name__ == "__main__":
    main()
