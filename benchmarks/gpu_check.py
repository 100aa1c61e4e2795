"""The GPU-side check of deployopt's training (issue 16), sized to run in under 8 minutes on one
GPU. Run it through benchmarks/gpu_check.sh.

It needs only Python, torch (with CUDA), transformers and onnx: deployopt runs from the source
tree (PYTHONPATH), and its torch-side path imports none of the CLI's libraries (typer, rich,
pydantic, optuna, ...; tests/test_device.py holds it to that), so no wheel has to be carried.
The teacher is a MiniLM-shaped BERT (6 layers, hidden 384, 12 heads, FFN 1536, vocabulary
30,522) built here with random weights and a WordPiece tokenizer over a generated vocabulary,
or an HF folder given with --teacher. The data are generated sentences.

What it runs and checks:
1. distillation on the device (a fresh 3-layer student, seeded; cosine + hidden losses) in
   fp32, bf16 and fp16: time per epoch, peak memory, the student's held-out cosine
   to the teacher per precision; bf16 must be within 0.005 of fp32 (fp16 is reported);
2. a run (teacher layers 0,2,4 as the student) interrupted after a checkpoint on the device,
   resumed with --device cpu;
3. ``torchrun --nproc_per_node 1`` of the same distillation: DDP over NCCL (gloo on the CPU);
4. pruning (a third of the heads, half the FFN) with one epoch of recovery on the device.

``--device cpu`` (or DEVICE=cpu) is the smoke mode: tiny sizes, every step the same, so the
script's logic is proven where there is no GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # deployopt from the source tree (it is not installed there)
    sys.path.insert(0, str(ROOT))
SIZES = {  # teacher config, corpus and training sizes per mode
    "gpu": dict(hidden=384, layers=6, heads=12, ffn=1536, vocab=30522, texts=4096,
                max_length=128, batch=32, epochs=2, words=(12, 90)),
    "smoke": dict(hidden=32, layers=6, heads=4, ffn=64, vocab=400, texts=96,
                  max_length=32, batch=16, epochs=2, words=(4, 20)),
}  # fmt: skip
BF16_TOLERANCE = 0.005  # |cosine(bf16) - cosine(fp32)|, issue 16


def words(n: int = 2000) -> list[str]:
    """``n`` pronounceable pseudo-words (deterministic)."""
    cons, vows = "bcdfghklmnprstvz", "aeiou"
    syl = [c + v for c in cons for v in vows]
    rng = np.random.default_rng(1)
    out: dict[str, None] = {}
    while len(out) < n:
        out["".join(rng.choice(syl, size=rng.integers(1, 4)))] = None
    return list(out)


def build_teacher(folder: Path, size: dict) -> Path:
    """A BERT with the given sizes, random (seeded) weights and a WordPiece tokenizer whose
    vocabulary holds every generated word, saved as an HF folder."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"abcdefghijklmnopqrstuvwxyz.,"]
    vocab += ["##" + c for c in "abcdefghijklmnopqrstuvwxyz"]
    vocab += words(min(2000, size["vocab"] - len(vocab)))
    vocab += [f"[unused{i}]" for i in range(size["vocab"] - len(vocab))]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), do_lower_case=True)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=size["hidden"],
                     num_hidden_layers=size["layers"], num_attention_heads=size["heads"],
                     intermediate_size=size["ffn"], max_position_embeddings=512)  # fmt: skip
    torch.manual_seed(0)
    BertModel(cfg).eval().save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def corpus(path: Path, size: dict, vocab: list[str]) -> Path:
    """Generated sentences, Zipf-distributed words (a few common, many rare), one a line."""
    rng = np.random.default_rng(0)
    p = 1 / np.arange(1, len(vocab) + 1)
    p /= p.sum()
    lo, hi = size["words"]
    lines = [" ".join(rng.choice(vocab, size=rng.integers(lo, hi), p=p))
             for _ in range(size["texts"])]  # fmt: skip
    path.write_text("\n".join(lines) + "\n")
    return path


def train_config(size: dict, precision: str, epochs: int | None = None):
    from deployopt.torchside.train import TrainConfig

    return TrainConfig(epochs=epochs or size["epochs"], batch_size=size["batch"], lr=5e-4,
                       patience=9, seed=0, precision=precision)  # fmt: skip


def distill_once(teacher, data, out, size, device, precision, **kw):
    from deployopt.stages.distill import distill

    if "student_size" not in kw:
        kw["student_layers"] = "0,2,4"
    return distill(
        teacher, data, out, max_length=size["max_length"],
        train=train_config(size, precision, kw.pop("epochs", None)), device=device,
        progress=False, log=kw.pop("log", lambda s: None), **kw,
    )  # fmt: skip


def check_precisions(teacher, data, work, size, device, log) -> dict:
    rows = {}
    for prec in ("fp32", "bf16", "fp16"):
        t0 = time.perf_counter()
        # a fresh 3-layer student (seeded): its cosine starts low, so the comparison of the
        # precisions measures what each learned (copied teacher layers start near 1)
        res = distill_once(teacher, data, work / f"distill-{prec}", size, device, prec,
                           student_size={"num_hidden_layers": 3})  # fmt: skip
        epochs = [round(h["seconds"], 2) for h in res.history]
        rows[prec] = {
            "cosine": res.student["mean_cosine"], "epoch_seconds": epochs,
            "peak_memory_mb": res.extra["peak_memory_mb"],
            "peak_memory_kind": res.extra["peak_memory_kind"],
            "skipped_steps": res.extra["skipped_steps"],
            "overflow_steps": res.extra["overflow_steps"],
            "device": res.extra["device"], "wall_seconds": round(time.perf_counter() - t0, 1),
        }  # fmt: skip
        log(f"distill {prec}: cosine {rows[prec]['cosine']:.5f}, s/epoch {epochs}, peak "
            f"{rows[prec]['peak_memory_mb']} MB ({rows[prec]['peak_memory_kind']}), skipped "
            f"{rows[prec]['skipped_steps']}, overflow {rows[prec]['overflow_steps']}")  # fmt: skip
    return rows


def check_resume(teacher, data, work, size, device, log) -> dict:
    """Interrupted after 3 steps on ``device``, resumed on the CPU (1 epoch, a small corpus:
    the rest of the epoch runs on the CPU)."""
    from deployopt.torchside.train import Interrupted

    small = work / "resume.txt"
    small.write_text("\n".join(data.read_text().splitlines()[:96]) + "\n")
    out = work / "resume"
    try:
        distill_once(teacher, small, out, size, device, "bf16", epochs=1, stop_after_steps=3)
        raise AssertionError("the run was not interrupted")
    except Interrupted:
        pass
    saved = torch.load(out / "work" / "checkpoint" / "trainer_state.pt", weights_only=True)
    on_cpu = all(t.device.type == "cpu" for s in saved["optimizer"]["state"].values()
                 for t in s.values())  # fmt: skip
    logs: list[str] = []
    res = distill_once(teacher, small, out, size, "cpu", "bf16", epochs=1, log=logs.append)
    resumed = any("resumed at epoch 1, batch 3" in s for s in logs)
    log(f"resume: checkpoint written on {device} holds CPU tensors: {on_cpu}; resumed on "
        f"{res.extra['device']}: {resumed}; cosine {res.student['mean_cosine']:.5f}")  # fmt: skip
    return {"checkpoint_on_cpu": on_cpu, "resumed": resumed, "device": res.extra["device"],
            "cosine": res.student["mean_cosine"]}  # fmt: skip


def check_torchrun(teacher, data, work, size, device, log) -> dict:
    out = work / "torchrun"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1",
           "--master_port", "29517", str(Path(__file__).resolve()), "--ddp-child",
           "--teacher", str(teacher), "--data", str(data), "--out", str(out),
           "--device", device, "--size", "gpu" if device != "cpu" else "smoke"]  # fmt: skip
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ))
    rep = json.loads((out / "distill_report.json").read_text()) if r.returncode == 0 else {}
    row = {"returncode": r.returncode, "ddp": rep.get("ddp"), "device": rep.get("device"),
           "cosine": rep.get("student", {}).get("mean_cosine"),
           "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip
    if r.returncode:
        row["stderr"] = r.stderr[-2000:]
    log(f"torchrun --nproc_per_node 1: exit {r.returncode}, DDP {row['ddp']} on {row['device']}")
    return row


def ddp_child(args) -> None:
    """The process torchrun starts: the same distillation, one epoch, fp32."""
    size = SIZES[args.size]
    distill_once(args.teacher, Path(args.data), Path(args.out), size, args.device, "fp32",
                 epochs=1)  # fmt: skip


def check_prune(teacher, data, work, size, device, log) -> dict:
    from deployopt.stages.prune import prune

    t0 = time.perf_counter()
    res = prune(teacher, work / "pruned", heads=0.33, ffn=0.5, data=data, recover_epochs=1,
                max_length=size["max_length"], train=train_config(size, "bf16", 1),
                device=device, progress=False, log=lambda s: None)  # fmt: skip
    rep = json.loads(res.report.read_text())
    row = {"params_ratio": round(res.params_after / res.params_before, 3),
           "device": rep["device"], "cosine_pruned": res.metrics["pruned"]["mean_cosine"],
           "cosine_recovered": res.metrics["recovered"]["mean_cosine"],
           "peak_memory_mb": rep["recovery"]["peak_memory_mb"],
           "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip
    log(
        f"prune + recovery on {row['device']}: params x{row['params_ratio']}, cosine "
        f"{row['cosine_pruned']:.5f} -> {row['cosine_recovered']:.5f}, {row['seconds']} s"
    )
    return row


def environment(device: str) -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__,
           "cuda": torch.version.cuda, "device": device}  # fmt: skip
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["bf16_supported"] = torch.cuda.is_bf16_supported()
    import transformers

    env["transformers"] = transformers.__version__
    return env


def verdicts(res: dict) -> list[str]:
    """What failed (empty: all passed)."""
    bad = []
    p = res["precisions"]
    gap = abs(p["bf16"]["cosine"] - p["fp32"]["cosine"])
    if gap > BF16_TOLERANCE:
        bad.append(f"bf16 cosine {gap:.4f} from fp32's (limit {BF16_TOLERANCE})")
    bad += [f"{k}: {v['skipped_steps']} non-finite steps" for k, v in p.items()
            if v["skipped_steps"]]  # fmt: skip
    r = res["resume"]
    if not (r["checkpoint_on_cpu"] and r["resumed"] and r["device"] == "cpu"):
        bad.append(f"resume on the CPU: {r}")
    t = res["torchrun"]
    want = "nccl x1" if res["env"]["device"] != "cpu" else "gloo x1"
    if t["returncode"] or t["ddp"] != want:
        bad.append(f"torchrun: exit {t['returncode']}, ddp {t['ddp']} (want {want})")
    if not res["prune"]["params_ratio"] < 1:
        bad.append("prune removed nothing")
    return bad


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default=os.environ.get("DEVICE", "cuda"))
    ap.add_argument("--teacher", help="an HF BERT folder (default: built here, random weights)")
    ap.add_argument("--json", default=None, help="write the results here (default: $OUT/...)")
    ap.add_argument("--ddp-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--size", default="gpu", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.ddp_child:
        ddp_child(args)
        return 0
    t_start = time.perf_counter()
    size = SIZES["smoke" if args.device == "cpu" else "gpu"]

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:6.1f}s] {msg}", flush=True)

    res: dict = {"env": environment(args.device), "sizes": size}
    log("environment: " + json.dumps(res["env"]))
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        work = Path(tmp)
        teacher = Path(args.teacher) if args.teacher else build_teacher(work / "teacher", size)
        vocab = [w for w in (Path(teacher) / "vocab.txt").read_text().split() if w.isalpha()]
        data = corpus(work / "texts.txt", size, vocab)
        log(f"teacher {teacher} ({size['layers']} layers, hidden {size['hidden']}); "
            f"{size['texts']} texts")  # fmt: skip
        for name, fn in (("precisions", check_precisions), ("resume", check_resume),
                         ("torchrun", check_torchrun), ("prune", check_prune)):  # fmt: skip
            res[name] = fn(teacher, data, work, size, args.device, log)
    res["failures"] = verdicts(res)
    res["seconds"] = round(time.perf_counter() - t_start, 1)
    print_table(res)
    target = args.json or (os.path.join(os.environ["OUT"], "gpu_check.json")
                           if os.environ.get("OUT") else None)  # fmt: skip
    if target:
        Path(target).write_text(json.dumps(res, indent=2) + "\n")
    return 1 if res["failures"] else 0


def print_table(res: dict) -> None:
    env = res["env"]
    print(
        f"\n== gpu_check on {env.get('gpu', env['device'])}: torch {env['torch']} "
        f"(CUDA {env['cuda']}), transformers {env['transformers']}, python {env['python']}"
    )
    print(f"{'precision':<10}{'cosine':>10}{'s/epoch':>20}{'peak MB':>10}  memory is")
    for prec, r in res["precisions"].items():
        print(
            f"{prec:<10}{r['cosine']:>10.5f}{str(r['epoch_seconds']):>20}"
            f"{r['peak_memory_mb']:>10}  {r['peak_memory_kind']}"
        )
    gap = abs(res["precisions"]["bf16"]["cosine"] - res["precisions"]["fp32"]["cosine"])
    print(f"bf16 - fp32 cosine gap {gap:.5f} (limit {BF16_TOLERANCE})")
    print(f"resume on cpu: {res['resume']}")
    print(f"torchrun: {res['torchrun']}")
    print(f"prune: {res['prune']}")
    print(f"total {res['seconds']} s: " + ("PASS" if not res["failures"] else
                                           "FAIL: " + "; ".join(res["failures"])))  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
