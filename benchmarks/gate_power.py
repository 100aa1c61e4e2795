"""The regression gate's own statistics, measured on this machine.

Usage:  python benchmarks/gate_power.py [--trials 20] [--threads 2] [--max-slowdown 0.05]

Builds two ONNX models in a temporary folder: a chain of 10 MatMul+Relu layers (batch 64 x
512), and the same chain with 13 layers (30% more work). Each trial runs the real gate,
``deployopt.gate(new, baseline=old, max_slowdown=5%)``: both models interleaved in 3 pairs of
worker processes, the ratio of medians judged on paired rounds.

Targets: the model against itself passes in >= 95% of trials; the 30% slower model fails in
>= 95%.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import deployopt
from deployopt.benchmark import fingerprint
from deployopt.presets import Target


def chain(layers: int, width: int = 512) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for i in range(layers):
        w = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [f"m{i}"]))
        nodes.append(helper.make_node("Relu", [f"m{i}"], [f"r{i}"]))
        x = f"r{i}"
    graph = helper.make_graph(
        nodes,
        f"chain{layers}",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["batch", width])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-slowdown", type=float, default=0.05)
    ap.add_argument("--min-seconds", type=float, default=1.0, help="per model and process")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="deployopt-gate-power-"))
    base, slow = tmp / "base.onnx", tmp / "slow.onnx"
    onnx.save(chain(10), base)
    onnx.save(chain(13), slow)
    cfg = tmp / "targets.toml"
    cfg.write_text(f'[targets.power]\nep = "cpu"\nthreads = {args.threads}\n')
    env = fingerprint(Target(name="power", ep="cpu", threads=args.threads))
    print(
        f"machine: {env.get('cpu')} ({env.get('cpu_flags')}), {env.get('cores')} cores, "
        f"threads={args.threads}; onnxruntime {env.get('onnxruntime')}, python {env.get('python')}"
    )
    print(
        f"gate: max slowdown {args.max_slowdown:.0%}, 3 process pairs x 10 rounds (ABBA order), "
        f">= {args.min_seconds:g} s per model and process, batch 64 x 512"
    )
    outcomes: dict[str, list] = {}
    for label, new in (("same model", base), ("30% slower", slow)):
        verdicts, ratios = [], []
        t0 = time.perf_counter()
        for t in range(args.trials):
            g = deployopt.gate(
                new,
                baseline=base,
                max_slowdown=args.max_slowdown,
                target="power",
                config=cfg,
                batch=64,
                min_samples=30,
                min_seconds=args.min_seconds,
                processes=3,
                history=False,
            )
            (c,) = g.checks
            verdicts.append(c.verdict.value)
            ratios.append(c.measured if c.measured is not None else float("nan"))
            print(
                f"  {label} trial {t + 1:2d}: {c.verdict.value:12s} "
                f"ratio {c.measured or float('nan'):.3f} "
                f"(90% CI {c.ci[0] if c.ci else float('nan'):.3f}-"
                f"{c.ci[1] if c.ci else float('nan'):.3f})",
                flush=True,
            )
        outcomes[label] = [verdicts, ratios, time.perf_counter() - t0]
    print()
    ok = True
    for label, (verdicts, ratios, secs) in outcomes.items():
        counts = Counter(verdicts)
        n = len(verdicts)
        want = "PASS" if label == "same model" else "FAIL"
        rate = counts[want] / n
        ok = ok and rate >= 0.95
        print(
            f"{label:11s}: {want} in {counts[want]}/{n} = {rate:.0%} (target >= 95%); "
            f"all verdicts {dict(counts)}; ratio mean {np.nanmean(ratios):.3f}, "
            f"min {np.nanmin(ratios):.3f}, max {np.nanmax(ratios):.3f}; {secs / n:.1f} s/trial"
        )
    print("targets met" if ok else "TARGETS MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
