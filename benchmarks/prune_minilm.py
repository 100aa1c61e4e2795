"""all-MiniLM-L6-v2: a third of the attention heads and half the FFN neurons pruned, recovered
with knowledge distillation from the unpruned model on unlabelled packaged text.

Usage:  python benchmarks/prune_minilm.py [--out DIR] [--recover-epochs 2] [--max-examples 4000]
                                          [--importance gradient] [--threads 2]
        python benchmarks/prune_minilm.py --out DIR --measure-only   # step 4 again, on DIR

1. Prunes with gradient importance (Michel et al. 2019) scored on 256 texts of 20 Newsgroups +
   BBC News: 4 of 12 heads and 768 of 1536 FFN neurons in every layer. Once without recovery,
   once with ``--recover-epochs`` of embedding distillation from the unpruned model.
2. Measures on Reuters R8 (never seen in pruning or training): the mean cosine of each model's
   embeddings to the original's on R8-test, and a logistic-regression probe trained on
   R8-train embeddings, scored on R8-test.
3. Puts the original and the recovered model through ``deployopt optimize`` (2 threads) and
   measures both chosen ``best.onnx`` in one interleaved run, batch 1 x seq 128.
4. Measures the latency ratio of the two ``best.onnx`` as the release gate measures a
   regression: 3 pairs of fresh worker processes, 10 interleaved rounds each, the ratio of
   per-round p50s with a 90% two-stage bootstrap interval. On a machine whose speed drifts by
   tens of percent between runs, one interleaved run's p50 ratio moves by several points;
   this is the figure the target is judged on. Measured twice: with onnxruntime's default
   session, and with the session settings ``optimize`` recommended for both models
   (``best.session.json``: SkipLayerNormFusion off, see the README, "Targets").

Targets: the pruned best variant's p50 <= 0.75x the unpruned best variant's (step 4's
estimate, each shipped as ``optimize`` recommends: with its best.session.json settings);
probe accuracy within 2 points of the original's.
"""

from __future__ import annotations

import argparse
import json
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
from _probe import embed, machine_line, mean_cosine, paired_ratio, probe  # noqa: E402

from deployopt.benchmark import BenchSpec, bench_models  # noqa: E402
from deployopt.presets import Target  # noqa: E402
from deployopt.torchside.data import bbc_news, orange_tab  # noqa: E402
from deployopt.torchside.train import TrainConfig  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--heads", type=float, default=1 / 3)
    ap.add_argument("--ffn", type=float, default=0.5)
    ap.add_argument("--recover-epochs", type=int, default=2)
    ap.add_argument("--max-examples", type=int, default=4000)
    ap.add_argument("--importance", default="gradient")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--measure-only",
        action="store_true",
        help="only measure the latency ratio (step 4) of an earlier run's --out",
    )
    args = ap.parse_args()
    if args.measure_only:
        if args.out is None:
            ap.error("--measure-only needs --out of an earlier run")
        return measure(args.out, args.threads)
    out = args.out or Path(tempfile.mkdtemp(prefix="deployopt-prune-minilm-"))
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)

    corpus = orange_tab("20newsgroups").texts + bbc_news().texts
    rng = np.random.default_rng(1)
    corpus = [corpus[i] for i in rng.permutation(len(corpus))[: args.max_examples]]
    data = out / "corpus.txt"
    data.write_text("\n".join(" ".join(t.split()) for t in corpus if t.strip()))
    common = dict(heads=args.heads, ffn=args.ffn, data=data, importance=args.importance)

    t0 = time.perf_counter()
    deployopt.prune("minilm", out / "pruned-no-recovery", **common)
    t1 = time.perf_counter()
    res = deployopt.prune(
        "minilm", out / "pruned", **common, recover_epochs=args.recover_epochs,
        train=TrainConfig(epochs=args.recover_epochs, batch_size=32, lr=1e-4, patience=2),
    )  # fmt: skip
    prune_s, recover_s = t1 - t0, time.perf_counter() - t1

    r8, r8t = orange_tab("reuters-r8"), orange_tab("reuters-r8-test")
    models = {
        "original": "minilm",
        "pruned": out / "pruned-no-recovery",
        "recovered": out / "pruned",
    }
    emb = {n: (embed(f, r8.texts), embed(f, r8t.texts)) for n, f in models.items()}
    cos = {n: mean_cosine(e[1], emb["original"][1]) for n, e in emb.items()}
    acc = {n: probe(e[0], r8.labels, e[1], r8t.labels) for n, e in emb.items()}

    t2 = time.perf_counter()
    opt = {
        n: deployopt.optimize(str(models[n]), out / f"opt-{n}", threads=args.threads)
        for n in ("original", "recovered")
    }
    optimize_s = time.perf_counter() - t2
    target = Target(name=f"cpu-{args.threads}t", ep="cpu", threads=args.threads)
    spec = BenchSpec(batch=1, seq=128, min_samples=90, min_seconds=4.0, rounds=6)
    bench = bench_models({n: str(r.best) for n, r in opt.items()}, target, spec)

    print()
    print(machine_line(target))
    print(
        f"pruning: heads {args.heads:.3f}, FFN {args.ffn:.2f}, {args.importance} importance; "
        f"{res.removed['summary']}"
    )
    print(
        f"params {res.params_before / 1e6:.2f}M -> {res.params_after / 1e6:.2f}M; one-shot "
        f"{prune_s:.0f} s; with {args.recover_epochs} recovery epochs on {len(corpus)} texts "
        f"{recover_s:.0f} s; optimize both {optimize_s:.0f} s"
    )
    for h in res.history:
        print(f"  recovery epoch {h['epoch']}: loss {h['train_loss']:.5f}, held-out cosine "
              f"{h['mean_cosine']:.4f}")  # fmt: skip
    print(f"Reuters R8 test ({len(r8t.texts)} texts), R8 train probe ({len(r8.texts)} texts):")
    for n in models:
        print(
            f"  {n:9s}: mean cosine to original {cos[n]:.4f}, probe accuracy {acc[n]:.4f} "
            f"({(acc[n] - acc['original']) * 100:+.2f} points)"
        )
    for n, r in bench.items():
        ch = opt[n].choice.winner
        fp32 = opt[n].by_name("fp32")
        fused = opt[n].by_name("fuse").metrics.get("fused", {})
        print(
            f"{n}: best {ch.name}, p50 {r.stats.p50_ms:.2f} ms (drift {r.drift:.0%}), "
            f"{ch.size_mb:.1f} MB (fp32 ONNX {fp32.metrics['size_bytes'] / 1e6:.1f} MB); "
            f"fused {fused}"
        )
    one_run = bench["recovered"].stats.p50_ms / bench["original"].stats.p50_ms
    print(f"pruned best / unpruned best p50, this interleaved run: {one_run:.3f}x")
    ratios = paired(out, args.threads)
    probe_ok = acc["original"] - acc["recovered"] <= 0.02
    print(f"probe within 2 points: {'yes' if probe_ok else 'NO'}")
    ok = judged(ratios) <= 0.75 and probe_ok
    print("targets met" if ok else "TARGETS MISSED")
    return 0 if ok else 1


def paired(out: Path, threads: int) -> dict[str, float]:
    """Step 4: the gate's paired latency ratio of the two chosen best.onnx, with onnxruntime's
    default session and with the session settings ``optimize`` recommended for them
    (``best.session.json``; measured only when both got the same)."""
    new, base = out / "opt-recovered" / "best.onnx", out / "opt-original" / "best.onnx"
    recommended = {
        p: json.loads(s.read_text())["session_config"] if s.exists() else {}
        for p in (new, base)
        for s in [p.with_name("best.session.json")]
    }
    settings = {"onnxruntime defaults": {}}
    if recommended[new] == recommended[base] and recommended[new]:
        settings["recommended (best.session.json)"] = recommended[new]
    elif recommended[new] != recommended[base]:
        print(f"the two best.session.json differ ({recommended}): measured with defaults only")
    ratios = {}
    for label, cfg in settings.items():
        target = Target(name=f"cpu-{threads}t", ep="cpu", threads=threads, session_config=cfg)
        est, low, high, res = paired_ratio(new, base, target)
        p50 = {r.name: round(r.stats.p50_ms, 2) for r in res if r.stats is not None}
        print(
            f"[{label}{' ' + str(cfg) if cfg else ''}] pruned best / unpruned best p50, "
            f"3 process pairs x 10 rounds: {est:.3f}x (90% CI {low:.3f}-{high:.3f}; target "
            "<= 0.75x"
            + ("" if high <= 0.75 or est > 0.75 else ", the interval reaches past it")
            + f"); last pair p50 {p50}"
        )
        ratios[label] = est
    return ratios


def judged(ratios: dict[str, float]) -> float:
    """The ratio the target is judged on: with the recommended settings when there are any."""
    return ratios.get("recommended (best.session.json)", ratios["onnxruntime defaults"])


def measure(out: Path, threads: int) -> int:
    print(machine_line(Target(name=f"cpu-{threads}t", ep="cpu", threads=threads)))
    ratio = judged(paired(out, threads))
    print("latency target met" if ratio <= 0.75 else "LATENCY TARGET MISSED")
    return 0 if ratio <= 0.75 else 1


if __name__ == "__main__":
    sys.exit(main())
