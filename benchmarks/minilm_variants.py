"""Latency of every variant of all-MiniLM-L6-v2 vs PyTorch eager, batch 1 x seq 128.

Usage:  python benchmarks/minilm_variants.py OUT_DIR_OF_deployopt_optimize [--threads 2]

Rounds are interleaved (every model once per round) so machine drift hits all alike.
Prints the machine and versions with the table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402

from deployopt.benchmark import LatencyStats, measure  # noqa: E402
from deployopt.runtime.session import create_session  # noqa: E402
from deployopt.sources import load_source  # noqa: E402


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("out", type=Path)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    manifest = json.loads((args.out / "manifest.json").read_text())
    src = load_source("minilm")
    enc = src.tokenizer(
        ["word " * 200] * args.batch,
        truncation=True,
        max_length=args.seq,
        padding="max_length",
        return_tensors="np",
    )
    feeds = {n: enc[n].astype(np.int64) for n in src.input_names}
    targs = tuple(torch.from_numpy(feeds[n]) for n in src.input_names)

    runners = {}
    with torch.inference_mode():
        runners["pytorch-eager-fp32"] = lambda: src.module(*targs)
    for v in manifest["variants"]:
        if v["status"] == "ok":
            s = create_session(args.out / v["path"], threads=args.threads)
            runners[v["name"]] = lambda s=s: s.run(None, feeds)
    samples: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(args.rounds):
        for name, fn in runners.items():
            with torch.inference_mode():
                samples[name] += measure(fn, warmup=3, min_samples=20, min_seconds=0.5)
    print(
        f"machine: {cpu_model()}, {os.cpu_count()} cores, threads={args.threads}; "
        f"python {platform.python_version()}, torch {torch.__version__}, "
        f"onnxruntime {ort.__version__}"
    )
    print(f"batch {args.batch} x seq {args.seq}, {args.rounds} interleaved rounds")
    base = LatencyStats.from_samples(samples["pytorch-eager-fp32"]).p50_ms
    sizes = {v["name"]: v.get("size_bytes") for v in manifest["variants"]}
    cos = {v["name"]: (v["parity"] or {}).get("mean_cosine") for v in manifest["variants"]}
    print(
        f"{'model':20s} {'p50 ms':>8s} {'p90 ms':>8s} {'p99 ms':>8s} {'vs torch':>9s} "
        f"{'MB':>6s} {'mean cos':>9s}"
    )
    for name, s in samples.items():
        st = LatencyStats.from_samples(s)
        mb = f"{sizes[name] / 1e6:6.1f}" if sizes.get(name) else "     -"
        c = f"{cos[name]:9.5f}" if cos.get(name) is not None else "        -"
        print(
            f"{name:20s} {st.p50_ms:8.2f} {st.p90_ms:8.2f} {st.p99_ms:8.2f} "
            f"{st.p50_ms / base:8.2f}x {mb} {c}"
        )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
