"""Knowledge distillation on Fashion-MNIST (Debian ``dataset-fashion-mnist``).

Usage:  python benchmarks/distill_fashion.py [--epochs 6] [--student-epochs N] [--seeds 0,1,2]
                                             [--out DIR] [--teacher-weights FILE]

1. Trains the teacher CNN (``deployopt.demos.fashion:teacher``, 0.87M params) with deployopt's
   training loop on 55,000 training images (5,000 held out for early stopping).
2. For each seed, trains the student (``:student``, 55k params, 1/16 of the teacher) twice from
   the same initialisation and data order: with KD (soft labels at T = 4 mixed with hard labels,
   alpha = 0.9) and without (hard labels only).
3. Prints test accuracy (the 10,000 test images, never used for training or model choice) as
   mean +- std over seeds, with the machine and versions.

Targets: teacher >= 90% test accuracy; the KD student beats the no-KD student over the seeds.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from deployopt.demos.fashion import student as make_student
from deployopt.demos.fashion import train_teacher
from deployopt.torchside.data import fashion_mnist
from deployopt.torchside.tasks import ClassifierTask
from deployopt.torchside.train import TrainConfig, Trainer


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(x[i : i + 1000]).argmax(-1) for i in range(0, len(x), 1000)])
    return float((pred == y).float().mean())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--student-epochs", type=int, default=None, help="default: --epochs")
    ap.add_argument(
        "--teacher-weights", type=Path, default=None, help="reuse a trained teacher's safetensors"
    )
    args = ap.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="deployopt-fashion-"))
    seeds = [int(s) for s in args.seeds.split(",")]
    torch.set_num_threads(torch.get_num_threads())

    train, test = fashion_mnist("train"), fashion_mnist("test")
    x, y = torch.from_numpy(train.images), torch.from_numpy(train.labels)
    xt, yt = torch.from_numpy(test.images), torch.from_numpy(test.labels)
    xtr, ytr, xval, yval = x[:55000], y[:55000], x[55000:], y[55000:]

    t0 = time.perf_counter()
    if args.teacher_weights:
        from safetensors.torch import load_model

        from deployopt.demos.fashion import teacher as make_teacher

        teacher = make_teacher()
        load_model(teacher, str(args.teacher_weights))
        teacher.eval()
    else:
        teacher = train_teacher(out / "teacher", args.epochs)
    cfg = TrainConfig(epochs=args.epochs, batch_size=128, lr=2e-3, weight_decay=1e-4,
                      warmup_ratio=0.05, patience=2, seed=0, checkpoint_every=10**9)  # fmt: skip
    teacher_acc = accuracy(teacher, xt, yt)
    teacher_s = time.perf_counter() - t0
    print(f"teacher: test accuracy {teacher_acc:.4f} ({teacher_s:.0f} s)", flush=True)

    runs: dict[str, list[float]] = {"kd": [], "no-kd": []}
    for seed in seeds:
        for mode, losses in (("kd", {"kd": 1.0}), ("no-kd", {"ce": 1.0})):
            task = ClassifierTask(teacher, xtr, ytr, xval, yval, losses, temperature=4.0, alpha=0.9)
            torch.manual_seed(seed)
            student = make_student()
            scfg = replace(cfg, lr=3e-3, seed=seed, epochs=args.student_epochs or args.epochs)
            t1 = time.perf_counter()
            work = out / f"student-{mode}-{seed}"
            quiet = {"progress": False, "log": lambda s: None}
            Trainer(student, task.loss, task.n, task.evaluate, scfg, work, **quiet).fit()
            acc = accuracy(student, xt, yt)
            runs[mode].append(acc)
            print(
                f"student seed {seed} {mode:5s}: test accuracy {acc:.4f} "
                f"({time.perf_counter() - t1:.0f} s)",
                flush=True,
            )

    n_t = sum(p.numel() for p in teacher.parameters())
    n_s = sum(p.numel() for p in make_student().parameters())
    print()
    print(
        f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} "
        f"threads; python {platform.python_version()}, torch {torch.__version__}"
    )
    print(f"teacher {n_t:,} params, student {n_s:,} params ({n_s / n_t:.3f} of the teacher)")
    print(f"teacher test accuracy {teacher_acc:.4f} (target >= 0.90)")
    for mode, accs in runs.items():
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        print(
            f"student {mode:5s}: {statistics.mean(accs):.4f} +- {sd:.4f} over seeds {seeds}: "
            + ", ".join(f"{a:.4f}" for a in accs)
        )
    wins = sum(a > b for a, b in zip(runs["kd"], runs["no-kd"]))
    print(f"KD beats no-KD in {wins}/{len(seeds)} seeds")
    ok = teacher_acc >= 0.90 and statistics.mean(runs["kd"]) > statistics.mean(runs["no-kd"])
    print("targets met" if ok else "TARGETS MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
