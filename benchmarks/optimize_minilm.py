"""Wall time and outcome of `deployopt optimize minilm` with its defaults, built from scratch.

Usage:  python benchmarks/optimize_minilm.py [OUT]   (default: a temporary folder)

1. ``deployopt.optimize("minilm", OUT)`` as a new user runs it (no tuning flags, everything
   rebuilt): prints the machine and versions, every candidate with its build time, parity and
   p50 (or why it was screened out), the search funnel, the chosen variant and session settings,
   and the total wall time. Target: <= 180 s on a 2-core machine.
2. The same model with a worst-case bound, ``min_min_cosine=0.99``, into ``OUT-worst-case``
   (the variants of step 1 are copied over, so only measurement and choice run again): the
   fastest variant whose worst evaluation sample keeps cosine >= 0.99.

Both folders can then go to ``benchmarks/peers_minilm.py --deployopt-out OUT --also
OUT-worst-case`` for their latency against PyTorch eager and the peer recipes.
"""

from __future__ import annotations

import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import deployopt  # noqa: E402
from deployopt.benchmark import fingerprint  # noqa: E402
from deployopt.report import funnel_text  # noqa: E402

TARGET_S = 180.0


def print_run(res) -> None:
    print(f"{'variant':30s} {'status':8s} {'build s':>7s} {'MB':>5s} {'mean cos':>8s} "
          f"{'min cos':>8s} {'p50 ms':>7s}")  # fmt: skip
    rejected = res.choice.rejected if res.choice else {}
    for v in res.variants:
        p = v.parity or {}
        b = (res.bench.get(v.name) or [None])[0]
        p50 = f"{b.stats.p50_ms:7.2f}" if b is not None and b.stats else "      -"
        print(
            f"{v.name:30s} {v.status:8s} {v.metrics.get('build_s', 0):7.1f} "
            f"{(v.metrics.get('size_bytes') or 0) / 1e6:5.1f} "
            f"{p.get('mean_cosine', float('nan')):8.5f} {p.get('min_cosine', float('nan')):8.5f} "
            f"{p50}" + (f"  ({rejected[v.name]})" if v.name in rejected else "")
        )
    print(f"search: {funnel_text(res.funnel)}")
    winner = res.choice.winner.name if res.choice and res.choice.winner else None
    print(f"chosen: {winner}")
    if res.session:
        print(f"session: {res.session['chosen']} (p50 {res.session['p50_ms']})")


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="deployopt-bench-"))
    t0 = time.perf_counter()
    res = deployopt.optimize("minilm", out, force=True)
    total = time.perf_counter() - t0
    env = fingerprint()
    print(
        f"machine: {env.get('cpu')} ({env.get('cpu_flags')}), {env['cores']} cores; python "
        f"{platform.python_version()}, torch {env.get('torch')}, onnxruntime "
        f"{env.get('onnxruntime')}, onnx {env.get('onnx')}"
    )
    print_run(res)
    verdict = "MET" if total <= TARGET_S else "MISSED"
    print(f"total wall time: {total:.1f} s (target <= {TARGET_S:g} s): {verdict}")

    worst = out.with_name(out.name + "-worst-case")
    shutil.rmtree(worst, ignore_errors=True)
    worst.mkdir(parents=True)
    shutil.copytree(out / "variants", worst / "variants")
    t0 = time.perf_counter()
    res2 = deployopt.optimize("minilm", worst, min_min_cosine=0.99)
    print(f"\nwith min_min_cosine=0.99 ({time.perf_counter() - t0:.1f} s, variants reused):")
    print_run(res2)
    print(f"folders: {out} {worst}")


if __name__ == "__main__":
    main()
