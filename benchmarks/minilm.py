"""The headline table on all-MiniLM-L6-v2: PyTorch eager fp32 and every deployopt variant.

Usage:  python benchmarks/minilm.py [OUT] [--threads 2] [--batches 1,32] [--seq 128]

1. ``deployopt.optimize("minilm", OUT)`` on a 2-thread CPU target (skipped when OUT already
   holds a finished run): variants, parity, benchmark and the chosen ``best.onnx``.
2. One interleaved run of PyTorch eager fp32 and every variant at each batch size, through
   deployopt's own harness (one worker process per model, same inputs, same timing loop).
3. The same run again, back to back: the p50 of each model in both runs, to show the harness
   is repeatable (target: within 10%). Then ``--pairs`` short back-to-back measurements of the
   chosen model alone. Each model's drift (how far its rounds' medians lie apart) shows how
   much the machine itself moved while it was measured.

Targets checked and printed: the chosen variant's p50 <= 0.45x PyTorch eager fp32 at batch 1,
at mean cosine >= 0.99 vs fp32.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import deployopt  # noqa: E402
from deployopt.benchmark import (  # noqa: E402
    BenchSpec,
    bench_feeds,
    bench_models,
    fingerprint,
    send_error,
    serve_requests,
)
from deployopt.presets import Target  # noqa: E402

TORCH = "pytorch-eager-fp32"


def serve_torch(conn, path, target, spec):
    """Worker main for the PyTorch reference: the same inputs the ONNX variants get."""
    try:
        import torch

        from deployopt.inputs import specs_from_onnx
        from deployopt.sources import load_source

        if target.threads:
            torch.set_num_threads(target.threads)
        t0 = time.perf_counter()
        src = load_source("minilm")
        feeds = bench_feeds(specs_from_onnx(Path(path)), spec)
        args = tuple(torch.from_numpy(feeds[n]) for n in src.input_names)
        module = src.module.eval()

        def run():
            with torch.inference_mode():
                return module(*args)

        run()
        info = {
            "shapes": {k: list(v.shape) for k, v in feeds.items()},
            "invalid": [],
            "cold_ms": (time.perf_counter() - t0) * 1e3,
            "providers": [f"torch {torch.__version__} eager"],
        }
        serve_requests(conn, run, info)
    except Exception as e:
        send_error(conn, e)
    finally:
        conn.close()


def spec_for(batch: int, seq: int, rounds: int) -> BenchSpec:
    # large batches take long per run: fewer samples, a longer minimum duration
    if batch == 1:
        return BenchSpec(batch=1, seq=seq, min_samples=90, min_seconds=4.0, rounds=rounds)
    return BenchSpec(batch=batch, seq=seq, min_samples=15, min_seconds=6.0, rounds=rounds)


def one_run(models, serves, target, batches, seq, rounds):
    out = {}
    for b in batches:
        spec = spec_for(b, seq, rounds)
        res = bench_models(models, target, spec, serves=serves, timeout_s=900)
        for name, r in res.items():
            out[(name, b)] = r
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("out", type=Path, nargs="?", help="output folder (default: a temporary one)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=6, help="interleaved rounds per run")
    ap.add_argument("--pairs", type=int, default=5, help="back-to-back pairs of the chosen model")
    args = ap.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="deployopt-minilm-"))
    batches = [int(b) for b in args.batches.split(",")]

    t0 = time.perf_counter()
    res = deployopt.optimize("minilm", out, threads=args.threads, log=print)
    print(f"optimize: {time.perf_counter() - t0:.1f} s -> {out}")
    if res.choice is None or res.choice.winner is None:
        print("no variant chosen:", res.choice.rejected if res.choice else "no benchmark")
        return 1
    chosen = res.choice.winner.name

    target = Target(name=f"cpu-{args.threads}t", ep="cpu", threads=args.threads)
    fp32 = res.by_name("fp32").path
    models = {TORCH: str(fp32)}
    models.update({v.name: str(v.path) for v in res.variants if v.ok})
    serves = {TORCH: serve_torch}
    runs = []
    for i in (1, 2):
        t1 = time.perf_counter()
        runs.append(one_run(models, serves, target, batches, args.seq, args.rounds))
        print(f"measurement run {i}: {time.perf_counter() - t1:.1f} s")

    env = fingerprint(target)
    print()
    print(
        f"machine: {env.get('cpu')} ({env.get('cpu_flags')}), {env.get('cores')} cores, "
        f"threads={args.threads}; python {env.get('python')}, torch {env.get('torch')}, "
        f"onnxruntime {env.get('onnxruntime')}, onnx {env.get('onnx')}"
    )
    cos = {v.name: (v.parity or {}).get("mean_cosine") for v in res.variants}
    size = {v.name: v.metrics.get("size_bytes") for v in res.variants}
    first, second = runs
    ok = True
    for b in batches:
        base = first[(TORCH, b)].stats.p50_ms
        print(f"\nbatch {b} x seq {args.seq}, one interleaved run ({args.rounds} rounds)")
        print(
            f"{'model':20s} {'p50 ms':>8s} {'p90 ms':>8s} {'p99 ms':>8s} {'vs torch':>9s} "
            f"{'items/s':>8s} {'MB':>6s} {'mean cos':>9s} {'drift':>6s} {'run 2 p50':>10s} "
            f"{'diff':>6s} {'run 2 vs torch':>14s}"
        )
        for name in models:
            r, r2 = first[(name, b)], second[(name, b)]
            if not r.valid or not r2.valid:
                print(f"{name:20s} INVALID: {'; '.join(r.invalid or r2.invalid)}")
                ok = False
                continue
            st = r.stats
            diff = r2.stats.p50_ms / st.p50_ms - 1
            mb = f"{size[name] / 1e6:6.1f}" if size.get(name) else "     -"
            c = f"{cos[name]:9.5f}" if cos.get(name) is not None else "        -"
            mark = " <- chosen" if name == chosen else ""
            base2 = second[(TORCH, b)].stats.p50_ms
            print(
                f"{name:20s} {st.p50_ms:8.2f} {st.p90_ms:8.2f} {st.p99_ms:8.2f} "
                f"{st.p50_ms / base:8.2f}x {r.throughput:8.1f} {mb} {c} {r.drift:6.1%} "
                f"{r2.stats.p50_ms:10.2f} {diff:+6.1%} {r2.stats.p50_ms / base2:13.2f}x{mark}"
            )
            if abs(diff) > 0.10:
                ok = False
    b1 = batches[0]
    ratio = first[(chosen, b1)].stats.p50_ms / first[(TORCH, b1)].stats.p50_ms
    c = cos[chosen] if cos.get(chosen) is not None else 1.0
    print(
        f"\nchosen: {chosen}; p50 {ratio:.2f}x PyTorch eager at batch {b1} (target <= 0.45x), "
        f"mean cosine {c:.5f} (target >= 0.99)"
    )
    worst = max(
        abs(second[k].stats.p50_ms / first[k].stats.p50_ms - 1)
        for k in first
        if first[k].valid and second[k].valid
    )
    print(f"repeatability: largest p50 difference between the two runs {worst:.1%} (target <= 10%)")
    if args.pairs:
        spec = spec_for(batches[0], args.seq, args.rounds)
        diffs = []
        for _ in range(args.pairs):
            a, b2 = (bench_models({chosen: models[chosen]}, target, spec)[chosen] for _ in range(2))
            diffs.append(b2.stats.p50_ms / a.stats.p50_ms - 1)
            print(
                f"  {chosen} alone, back to back: p50 {a.stats.p50_ms:.2f} then "
                f"{b2.stats.p50_ms:.2f} ms ({diffs[-1]:+.1%}; drift {a.drift:.0%}, {b2.drift:.0%})"
            )
        within = sum(abs(d) <= 0.10 for d in diffs)
        print(f"  {within}/{len(diffs)} back-to-back pairs within 10% on p50")
    ok = ok and ratio <= 0.45 and c >= 0.99
    print("targets met" if ok else "TARGETS MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
