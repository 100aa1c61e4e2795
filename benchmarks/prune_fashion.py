"""Fashion-MNIST CNN: half of the channels pruned (dependency-aware, Torch-Pruning), recovered
with knowledge distillation from the unpruned network.

Usage:  python benchmarks/prune_fashion.py [--out DIR] [--teacher-weights FILE]
                                           [--channels 0.5] [--recover-epochs 2] [--threads 2]

1. The CNN (``deployopt.demos.fashion:teacher``, 0.87M params) is trained here (about 10 min on
   2 cores) unless ``--teacher-weights`` gives its safetensors (e.g. from
   benchmarks/distill_fashion.py: OUT/teacher/best.safetensors).
2. ``deployopt.prune``: ``--channels`` of every conv layer removed by gradient (Taylor)
   importance on 256 training images; once without recovery, once with ``--recover-epochs``
   of KD from the unpruned CNN on the 60,000 training images.
3. Reports parameters and test accuracy (10,000 images) before and after recovery, then puts the
   original and the recovered CNN through ``deployopt optimize`` and measures the fp32 and the
   chosen ONNX files of each at batch 1 in one interleaved run.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

import deployopt

sys.path.insert(0, str(Path(__file__).parent))
from _probe import machine_line  # noqa: E402

from deployopt.benchmark import BenchSpec, bench_models
from deployopt.demos.fashion import train_teacher
from deployopt.presets import Target
from deployopt.sources import load_source
from deployopt.torchside.data import fashion_mnist
from deployopt.torchside.train import TrainConfig

FACTORY = "deployopt.demos.fashion:teacher"
SHAPE = {"x": (1, 1, 28, 28)}


def test_accuracy(folder_or_factory, weights=None) -> tuple[float, int]:
    src = load_source(str(folder_or_factory), input_shapes=SHAPE, weights=weights)
    model = src.module.model.eval()
    test = fashion_mnist("test")
    x, y = torch.from_numpy(test.images), torch.from_numpy(test.labels)
    with torch.no_grad():
        pred = torch.cat([model(x[i : i + 1000]).argmax(-1) for i in range(0, len(x), 1000)])
    return float((pred == y).float().mean()), sum(p.numel() for p in model.parameters())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--teacher-weights", type=Path, default=None)
    ap.add_argument("--channels", type=float, default=0.5)
    ap.add_argument("--recover-epochs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="deployopt-prune-fashion-"))
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)

    weights = args.teacher_weights
    if weights is None:
        t = time.perf_counter()
        train_teacher(out / "teacher", log=lambda s: None)
        weights = out / "teacher" / "best.safetensors"
        print(f"trained the CNN in {time.perf_counter() - t:.0f} s", flush=True)
    common = dict(channels=args.channels, data="fashion-mnist", importance="gradient",
                  input_shape=SHAPE, weights=weights)  # fmt: skip
    t0 = time.perf_counter()
    deployopt.prune(FACTORY, out / "pruned-no-recovery", **common)
    t1 = time.perf_counter()
    res = deployopt.prune(
        FACTORY, out / "pruned", **common, recover_epochs=args.recover_epochs,
        train=TrainConfig(epochs=args.recover_epochs, batch_size=128, lr=1e-3,
                          weight_decay=1e-4, patience=2, checkpoint_every=10**9),
    )  # fmt: skip
    prune_s, recover_s = t1 - t0, time.perf_counter() - t1

    acc = {
        "original": test_accuracy(FACTORY, weights),
        "pruned": test_accuracy(out / "pruned-no-recovery"),
        "recovered": test_accuracy(out / "pruned"),
    }
    t2 = time.perf_counter()
    opt = {
        "original": deployopt.optimize(FACTORY, out / "opt-original", input_shapes=SHAPE,
                                       weights=weights, threads=args.threads),
        "recovered": deployopt.optimize(str(out / "pruned"), out / "opt-recovered",
                                        threads=args.threads),
    }  # fmt: skip
    optimize_s = time.perf_counter() - t2
    target = Target(name=f"cpu-{args.threads}t", ep="cpu", threads=args.threads)
    files = {}
    for n, r in opt.items():
        files[f"{n} fp32"] = str(r.by_name("fp32").path)
        files[f"{n} best ({r.choice.winner.name})"] = str(r.best)
    bench = bench_models(files, target, BenchSpec(batch=1, min_samples=200, min_seconds=3.0))

    print()
    print(machine_line(target))
    print(f"pruning: {res.removed['summary']}")
    print(
        f"one-shot {prune_s:.0f} s; with {args.recover_epochs} KD recovery epochs {recover_s:.0f} "
        f"s; optimize both {optimize_s:.0f} s"
    )
    for h in res.history:
        print(f"  recovery epoch {h['epoch']}: loss {h['train_loss']:.4f}, "
              f"held-out accuracy {h['accuracy']:.4f}")  # fmt: skip
    for n, (a, p) in acc.items():
        print(f"  {n:9s}: {p:,} params, test accuracy {a:.4f}")
    for n, r in bench.items():
        size = Path(files[n]).stat().st_size
        print(f"  {n:28s}: ONNX {size / 1e6:.2f} MB, p50 {r.stats.p50_ms:.3f} ms, "
              f"p99 {r.stats.p99_ms:.3f} ms (drift {r.drift:.0%})")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
