"""Pruning: a model in, a smaller model folder out (``OUT`` itself, which ``deployopt optimize``
takes as is), with ``OUT/prune_report.json``.

What is removed: attention heads, FFN neurons and whole layers of BERT-family transformers;
channels of CNNs (Torch-Pruning's dependency graph); single weights (unstructured, zeros).
How much: a ratio per component, or ``target_params`` (the fraction of parameters to keep; one
ratio for heads and FFN, or for channels, found by bisection).
When: one shot, or ``steps`` rounds of prune -> recover. Recovery fine-tunes with the
distillation code (the same tasks and training loop), by default with knowledge distillation
from the unpruned model.
"""

from __future__ import annotations

import copy
import io
import json
import shutil
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deployopt.errors import ConfigError, DataError
from deployopt.stages.distill import (
    _params,
    classifier_task,
    embedding_task,
    save_model_folder,
    task_size,
    unwrap,
)
from deployopt.torchside import pruning as pr
from deployopt.torchside import students as st
from deployopt.torchside.data import ImageData, TextData, load_data
from deployopt.torchside.device import (
    check_precision,
    describe,
    resolve_device,
    synchronize,
    to_device,
)
from deployopt.torchside.tasks import EmbeddingTask, mean_pool
from deployopt.torchside.train import TrainConfig, Trainer, task_defaults
from deployopt.workspace import TMP_PREFIX, write_json

DENSE_NOTE = (
    "unstructured pruning writes zeros into dense tensors: a dense runtime (onnxruntime CPU or "
    "CUDA) runs them exactly as fast as before. Only the compressed size falls (see "
    "compressed_bytes); structured pruning (heads, FFN, layers, channels) is what makes a model "
    "faster."
)


@dataclass
class PruneResult:
    out: Path
    report: Path
    params_before: int
    params_after: int
    removed: dict[str, Any]
    metrics: dict[str, dict] = field(default_factory=dict)  # original / pruned / recovered
    history: list[dict] = field(default_factory=list)
    model: nn.Module | None = None  # the pruned module, in memory


@dataclass
class _Job:
    """What one prune run works with: the model pair, the data and the task builders."""

    src: Any
    original: nn.Module
    model: nn.Module
    data: TextData | ImageData | None
    kind: str  # "transformer" | "module"
    max_length: int
    importance_examples: int
    seed: int
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))


def prune(
    model: Any,
    out: str | Path,
    *,
    heads: float | None = None,
    ffn: float | None = None,
    drop_layers: str | Sequence[int] | None = None,
    channels: float | None = None,
    unstructured: float | None = None,
    target_params: float | None = None,
    target_latency: float | None = None,
    importance: str | None = None,
    scope: str = "layer",
    data: str | Path | None = None,
    labels_column: str | None = None,
    text_column: str = "text",
    input_shape: dict[str, Sequence[int]] | None = None,
    weights: str | Path | None = None,
    max_examples: int | None = None,
    importance_examples: int = 256,
    max_length: int = 128,
    steps: int = 1,
    recover_epochs: int = 0,
    recover_kd: bool = True,
    train: TrainConfig | None = None,
    device: str = "auto",
    log: Callable[[str], None] = print,
    progress: bool = True,
) -> PruneResult:
    """Prune ``model`` (an HF folder, ``"minilm"``, ``"pkg.mod:factory"`` with ``input_shape``,
    a module, or a folder written by deployopt; ``weights`` for a factory) and write the
    pruned model folder ``out``.

    ``heads``/``ffn`` (transformers), ``channels`` (CNNs) and ``unstructured``: the fraction to
    remove, each in (0, 1). ``drop_layers``: layer indices to delete. ``target_params``: the
    fraction of parameters to keep instead of ratios; ``target_latency``: the fraction of the
    PyTorch latency to keep (batch 1, x seq 128 for text, timed interleaved with the original).
    ``importance``: ``gradient`` (needs ``data``; the default when data is given) or
    ``magnitude``. ``steps`` > 1 prunes iteratively, recovering after each step;
    ``recover_epochs`` fine-tunes on ``data``, by default with KD from the unpruned model
    (``recover_kd=False``: labels only). ``device``: where the importance passes, the latency
    target's timing and recovery run (``auto``: CUDA when available); ``train.precision``:
    recovery's precision.
    """
    from deployopt.sources import load_source

    t0 = time.perf_counter()
    out = Path(out)
    cfg = train or TrainConfig(epochs=max(1, recover_epochs))
    dev = resolve_device(device)
    check_precision(cfg.precision, dev)
    _check_args(heads, ffn, channels, unstructured, target_params, steps, recover_epochs, data)
    if target_latency is not None:
        pr.check_ratio(target_latency, "target-latency")
    importance = importance or ("gradient" if data is not None else "magnitude")
    if importance not in ("gradient", "magnitude"):
        raise ConfigError(f"unknown importance {importance!r}", hint="magnitude or gradient")
    if importance == "gradient" and data is None:
        raise ConfigError(
            "gradient importance needs a data sample", hint="pass --data, or --importance magnitude"
        )
    shapes = {k: tuple(v) for k, v in (input_shape or {}).items()}
    src = load_source(model, input_shapes=shapes, weights=Path(weights) if weights else None)
    original = unwrap(src.module)
    original.to(dev).eval()
    kind = "transformer" if hasattr(original, "config") else "module"
    if kind == "module" and (heads or ffn or drop_layers is not None):
        raise ConfigError(
            f"{src.label}: --heads, --ffn and --drop-layers need a BERT-family transformer",
            hint="use --channels for CNNs, --unstructured for any model",
        )
    if kind == "transformer" and channels:
        raise ConfigError(
            f"{src.label}: --channels is for CNNs", hint="use --heads, --ffn or --drop-layers"
        )
    dataset = load_data(data, labels_column, text_column) if data is not None else None
    if dataset is not None and max_examples:
        from deployopt.stages.distill import _head

        dataset = _head(dataset, max_examples)
    job = _Job(
        src, original, copy.deepcopy(original), dataset, kind, max_length,
        importance_examples, cfg.seed, dev,
    )  # fmt: skip
    for p in job.original.parameters():
        p.requires_grad_(False)
    before = _params(original)
    removed: dict[str, Any] = {"importance": importance, "scope": scope}
    if target_params is not None or target_latency is not None:
        if target_params is not None and target_latency is not None:
            raise ConfigError("give --target-params or --target-latency, not both")
        target = {"params": target_params} if target_params else {"latency": target_latency}
        (heads, ffn, channels), removed["target"] = _ratios_for_target(
            job, target, heads, ffn, channels, log
        )
    history: list[dict] = []
    recovery_stats: dict = {}
    metrics: dict[str, dict] = {}
    task = _task(job, recover_kd, cfg, progress) if dataset is not None else None
    cfg = task_defaults(cfg, isinstance(task, EmbeddingTask), recovery=True)
    if task is not None:
        metrics["original"] = task.evaluate(job.original)
    work = out.parent / (TMP_PREFIX + out.name + ".work")
    shutil.rmtree(work, ignore_errors=True)
    if drop_layers is not None:
        total = st.num_layers(job.model)
        gone = st.parse_layers(drop_layers, total)
        if len(gone) >= total:
            raise ConfigError(f"--drop-layers {drop_layers} would remove all {total} layers")
        job.model = st.select_layers(job.model, [i for i in range(total) if i not in gone])
        removed["layers"] = gone
        log(f"prune: dropped layers {gone} of {total}")
    masks_on = False
    try:
        for step in range(1, steps + 1):
            frac = step / steps
            if heads or ffn:
                _step_transformer(job, heads, ffn, frac, importance, scope, removed, log)
            if channels:
                _step_channels(job, channels, frac, importance, removed, log)
            if unstructured and step == steps:
                masks_on = _unstructured(
                    job.model, unstructured, scope, removed, log, recover_epochs
                )
            if task is not None and step == 1:
                metrics["pruned"] = task.evaluate(job.model)
            if recover_epochs and task is not None:
                epochs = max(1, round(recover_epochs / steps))
                hist, recovery_stats = _recover(
                    job, task, cfg, epochs, work / f"step{step}", log, progress
                )
                history += hist
        if masks_on:
            from torch.nn.utils import prune as tprune

            for m, n in pr.prunable_weights(job.model):
                tprune.remove(m, n)  # the masks become plain zeros
            removed["unstructured"] = pr.sparsity(job.model)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if task is not None and recover_epochs:
        metrics["recovered"] = task.evaluate(job.model)
    after = _params(job.model)
    for k in [k for k in removed if k.startswith("_")]:  # step bookkeeping
        removed.pop(k)
    removed["summary"] = _summary(removed, before, after)
    log(f"prune: {before:,} -> {after:,} parameters ({after / before:.3f}); {removed['summary']}")
    lineage = [{"stage": "prune", "from": src.label, "params_before": before,
                "params_after": after, **removed}]  # fmt: skip
    job.model.to("cpu")  # the saved model and the returned one are device-independent
    job.original.to("cpu")
    to_save, extra, readme = _saved_form(job, out, removed, _factory(model, src))
    report = _report_doc(job, before, after, removed, metrics, history, data, cfg, t0)
    report["device"] = describe(dev)
    if history:
        report["recovery"].update(recovery_stats, losses=dict(task.losses))
        if isinstance(task, EmbeddingTask):
            report["recovery"]["window_overlap"] = task.window_overlap
    save_model_folder(
        to_save, src, out, factory=_factory(model, src), lineage=lineage, config_extra=extra,
        extra_files={"prune_report.json": _json_bytes(report), "README.md": readme.encode()},
    )  # fmt: skip
    write_json(out / "prune_report.json", _with_sizes(report, out))
    return PruneResult(
        out=out, report=out / "prune_report.json", params_before=before, params_after=after,
        removed=removed, metrics=metrics, history=history, model=job.model,
    )  # fmt: skip


# ------------------------------------------------------------------ checks and targets


def _check_args(heads, ffn, channels, unstructured, target, steps, recover_epochs, data):
    for name, r in (("heads", heads), ("ffn", ffn), ("channels", channels),
                    ("unstructured", unstructured), ("target-params", target)):  # fmt: skip
        if r is not None:
            pr.check_ratio(r, name)
    if steps < 1:
        raise ConfigError(f"--steps {steps}: need at least one step")
    if recover_epochs < 0:
        raise ConfigError(f"--recover-epochs {recover_epochs}: must be >= 0")
    if recover_epochs and data is None:
        raise ConfigError("recovery fine-tuning needs data", hint="pass --data FILE or a name")


def bisect_ratio(measure: Callable[[float], float], goal: float, hi: float, iters: int = 12):
    """The smallest pruning ratio r in (0, hi] with ``measure(r) <= goal``, for a ``measure``
    that falls as r grows (the share of parameters or of latency left). Returns (r, measured);
    raises when even ``hi`` does not reach the goal."""
    at_hi = measure(hi)
    if at_hi > goal:
        raise ValueError(at_hi)
    lo, best = 0.0, (hi, at_hi)
    for _ in range(iters):
        mid = (lo + hi) / 2
        m = measure(mid)
        if m > goal:
            lo = mid
        else:
            hi, best = mid, (mid, m)
    return best


def _pruned_copy(job: _Job, r: float) -> nn.Module:
    """The original pruned by ``r`` (heads and FFN, or channels) by magnitude: for sizing only
    (the count removed does not depend on which units go)."""
    m = copy.deepcopy(job.original)  # on the job's device, as the original is
    if job.kind == "transformer":
        bl = pr.blocks(m)
        hs, fs = pr.magnitude_importance(bl)
        pr.prune_heads(m, pr.plan_removal(hs, r, "heads"))
        pr.prune_ffn(m, pr.plan_removal(fs, r, "ffn"))
    else:
        pr.prune_channels(m, job.src.example_inputs[0][:1], r)
    return m


def _timing_inputs(job: _Job, seq: int = 128) -> dict | tuple:
    """Batch 1 (x seq 128 for text): the shape the latency target is measured at."""
    if job.kind == "transformer" and job.src.tokenizer is not None:
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(1000, 2000, (1, seq), generator=g)
        feats = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if "token_type_ids" in job.src.input_names:
            feats["token_type_ids"] = torch.zeros_like(ids)
        return to_device(feats, job.device)
    return tuple(t[:1].to(job.device) for t in job.src.example_inputs)


def latency_ratio(model: nn.Module, ref: nn.Module, inputs, rounds: int = 15) -> float:
    """Median over interleaved pairs of (model time / ref time), PyTorch eager on the models'
    device (``inputs`` there too): machine drift hits both sides of a pair alike. On a GPU each
    run waits for its kernels (CUDA launches are asynchronous)."""
    import statistics

    first = next(ref.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")

    def run(m) -> float:
        synchronize(device)
        t = time.perf_counter()
        if isinstance(inputs, dict):
            m(**inputs)
        else:
            m(*inputs)
        synchronize(device)
        return time.perf_counter() - t

    with torch.no_grad():
        for _ in range(3):
            run(model)
            run(ref)
        pairs = []
        for i in range(rounds):  # alternate which goes first
            if i % 2:
                a, b = run(model), run(ref)
            else:
                b = run(ref)
                a = run(model)
            pairs.append(a / b)
    return statistics.median(pairs)


def _ratios_for_target(job: _Job, target: dict, heads, ffn, channels, log):
    """One ratio (for heads and FFN together, or for channels) that leaves ``target["params"]``
    of the parameters or ``target["latency"]`` of the PyTorch latency (batch 1, x seq 128 for
    text), by bisection."""
    if heads or ffn or channels:
        raise ConfigError("give either a target or ratios, not both")
    if job.kind == "transformer":
        units = [n for b in pr.blocks(job.original) for n in (b.heads, b.ffn)]
        hi = min(0.95, min((n - 0.5) / n for n in units) - 1e-6)  # never empty a layer
    else:
        hi = 0.95
    total = _params(job.original)
    what, goal = next(iter(target.items()))
    if what == "params":

        def measure(r):  # noqa: E306
            return _params(_pruned_copy(job, r)) / total
    else:
        inputs = _timing_inputs(job)

        def measure(r):  # noqa: E306
            return latency_ratio(_pruned_copy(job, r).eval(), job.original, inputs)

    try:
        r, got = bisect_ratio(measure, goal, hi)
    except ValueError as e:
        raise ConfigError(
            f"--target-{what} {goal}: even the largest ratio ({hi:.2f}) leaves "
            f"{float(e.args[0]):.2f} of the {what}",
            hint="embeddings and other unprunable parts set a floor; aim higher",
        ) from None
    log(f"prune: target {what} {goal:.2f} -> ratio {r:.3f} (measured {got:.3f})")
    return ((r, r, None) if job.kind == "transformer" else (None, None, r)), {
        what: goal,
        "ratio": r,
        "measured": got,
    }


# ------------------------------------------------------------------ one pruning step


def _step_ratio(orig: int, current: int, ratio: float, frac: float) -> int:
    """How many units to remove now so that after this step ``ratio * frac`` of ``orig`` are
    gone."""
    target_left = orig - int(round(ratio * frac * orig))
    return max(0, current - target_left)


def _step_transformer(job, heads, ffn, frac, importance, scope, removed, log):
    bl = pr.blocks(job.model)
    if importance == "gradient":
        h_imp, f_imp = pr.gradient_importance(job.model, bl, _grad_batches(job), _grad_loss(job))
    else:
        h_imp, f_imp = pr.magnitude_importance(bl)
    orig = removed.setdefault("_orig", {"heads": [b.heads for b in bl], "ffn": [b.ffn for b in bl]})
    for what, ratio, scores, fn in (("heads", heads, h_imp, pr.prune_heads),
                                    ("ffn", ffn, f_imp, pr.prune_ffn)):  # fmt: skip
        if not ratio:
            continue
        n_orig = orig[what][0]
        current = len(scores[0])
        n = _step_ratio(n_orig, current, ratio, frac)
        if n == 0:
            continue
        if n >= current:
            raise ConfigError(
                f"--{what} {ratio} would remove all {current} {what} of each layer",
                hint="lower the ratio, or drop layers with --drop-layers",
            )
        plan = pr.plan_removal(scores, n / current, what, scope)
        fn(job.model, plan)
        log(f"prune: removed {sum(map(len, plan))} {what} ({importance} importance)")
    bl = pr.blocks(job.model)
    removed["heads_per_layer"] = [b.heads for b in bl]
    removed["ffn_per_layer"] = [b.ffn for b in bl]
    removed["heads_ratio"], removed["ffn_ratio"] = heads, ffn


def _step_channels(job, ratio, frac, importance, removed, log):
    orig = removed.setdefault("_orig_params", _params(job.model))
    before = pr.conv_channels(job.model)
    removed.setdefault("channels_before", before)
    prev = removed.get("_frac_done", 0.0)
    # torch-pruning takes a share of the current channels: after this step ratio * frac of the
    # original ones are gone
    step_ratio = 1 - (1 - ratio * frac) / (1 - ratio * prev)
    example = job.src.example_inputs[0][:1]
    gone = pr.prune_channels(
        job.model, example, step_ratio, importance,
        _grad_batches(job) if importance == "gradient" else None,
        _grad_loss(job) if importance == "gradient" else None,
    )  # fmt: skip
    removed["_frac_done"] = frac
    removed["channels_ratio"] = ratio
    removed["channels_after"] = pr.conv_channels(job.model)
    log(f"prune: channels {before} -> {removed['channels_after']} ({gone:,} params of {orig:,})")


def _unstructured(model, ratio, scope, removed, log, recover_epochs) -> bool:
    """Prune single weights; keep the masks during recovery (so zeros stay zeros)."""
    from torch.nn.utils import prune as tprune

    if recover_epochs:
        params = pr.prunable_weights(model)
        if scope == "global":
            tprune.global_unstructured(params, pruning_method=tprune.L1Unstructured, amount=ratio)
        else:
            for m, n in params:
                tprune.l1_unstructured(m, n, amount=ratio)
        removed["unstructured"] = {"ratio": ratio}
        log(f"prune: masked {ratio:.0%} of weights ({scope}); recovering with the mask on")
        return True
    removed["unstructured"] = pr.prune_unstructured(model, ratio, scope)
    log(f"prune: {removed['unstructured']['sparsity']:.1%} of weights are zero ({scope})")
    return False


# ------------------------------------------------------------------ importance data


def _grad_batches(job: _Job, batch: int = 16):
    d = job.data
    n = min(job.importance_examples, len(d.labels if isinstance(d, ImageData) else d.texts))
    if isinstance(d, ImageData):
        x, y = torch.from_numpy(d.images[:n]), torch.from_numpy(d.labels[:n])
        return [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]
    tok = job.src.tokenizer
    if tok is None:
        raise DataError(f"{d.source}: text data needs a text model with a tokenizer")
    out = []
    for i in range(0, n, batch):
        enc = tok(d.texts[i : i + batch], truncation=True, max_length=job.max_length,
                  padding=True, return_tensors="pt")  # fmt: skip
        y = torch.tensor(d.labels[i : i + batch]) if d.labels else None
        out.append((dict(enc), y))
    return out


def _grad_loss(job: _Job):
    """The loss whose gradient scores units, summed over examples: cross-entropy on labels
    (or on the model's own predictions when there are none); for sentence encoders, a random
    projection u . e(x) of the pooled embedding, so |dL/dgate| averages the embedding's
    sensitivity to each unit over random directions."""
    g = torch.Generator().manual_seed(job.seed)

    def loss(model, batch):
        x, y = to_device(batch[0], job.device), to_device(batch[1], job.device)
        out = model(**x) if isinstance(x, dict) else model(x)
        if hasattr(out, "last_hidden_state") and not hasattr(out, "logits"):
            emb = mean_pool(out.last_hidden_state, x["attention_mask"])
            u = torch.randn(emb.shape, generator=g).to(emb.device)  # the same on every device
            return (emb * u).sum()
        logits = out.logits if hasattr(out, "logits") else out
        target = y if y is not None else logits.argmax(-1).detach()
        return nn.functional.cross_entropy(logits, target, reduction="sum")

    return loss


# ------------------------------------------------------------------ recovery

# A pruned sentence encoder recovers by distillation from the unpruned model with these losses
# (hidden states at equal weight: the pruned model starts close to its teacher, unlike a
# layer-dropped student) and half-overlapping windows, measured by
# benchmarks/defaults_minilm.py: heads 0.33 + FFN 0.5 recovered for 1 epoch on 3,000 posts to a
# held-out cosine of 0.914, over the 0.85 target; distillation's denser windows would cost 1.7x
# the recovery time for a figure already met.
RECOVERY_LOSSES = "cosine,hidden"
RECOVERY_WINDOW_OVERLAP = 0.5


def _task(job: _Job, kd: bool, cfg: TrainConfig, progress: bool = False):
    """The distillation task that scores the model (and trains it in recovery): the unpruned
    model is the teacher."""
    d = job.data
    if isinstance(d, TextData) and job.src.meta.task == "feature-extraction":
        if not kd:
            raise ConfigError("a sentence encoder recovers only by distillation (drop --no-kd)")
        task, _, _ = embedding_task(
            job.original, job.model, job.src, d, None, RECOVERY_LOSSES, "", job.max_length, 0.1,
            cfg, progress, device=job.device, window_overlap=RECOVERY_WINDOW_OVERLAP,
        )  # fmt: skip
        return task
    if not kd and isinstance(d, TextData) and d.labels is None:
        raise DataError(f"{d.source}: recovery without KD needs labels (--labels-column)")
    task, _, _ = classifier_task(
        job.original, job.model, job.src, d, None, "kd" if kd else "ce", job.max_length, 0.1,
        cfg, 4.0, 0.5, progress, device=job.device,
    )  # fmt: skip
    return task


def _recover(job, task, cfg, epochs, work, log, progress) -> tuple[list[dict], dict]:
    c = replace(cfg, epochs=epochs)
    for p in job.model.parameters():
        p.requires_grad_(True)
    job.model.train()
    log(f"prune: recovering for {epochs} epoch(s) on {task_size(task)} examples")
    trainer = Trainer(job.model, task.loss, task_size(task), task.evaluate, c, work,
                      log=log, progress=progress, device=job.device)  # fmt: skip
    state = trainer.fit()
    job.model.eval()
    return state.history, trainer.stats


# ------------------------------------------------------------------ output


def _factory(model, src) -> str | None:
    if isinstance(model, str) and ":" in model and not Path(model).exists():
        return model
    folder = Path(src.label)
    if (folder / "module.json").is_file():
        return json.loads((folder / "module.json").read_text()).get("factory")
    return None


def _saved_form(job: _Job, out: Path, removed: dict, factory: str | None):
    """(model to save, config.json extras, README.md text). A pruned transformer is saved as
    deployopt's registered pruned class (per-layer sizes in its config, loaded by the Auto
    classes after ``import deployopt.torchside.hf_pruned``), or as its plain architecture when
    the sizes still fit one; an architecture without a pruned class keeps the module shapes in
    ``deployopt_pruning``, which only deployopt reads back (sources._pruned_hf)."""
    if job.kind != "transformer":
        return job.model, None, _module_readme(out, factory, removed)
    from deployopt.torchside import hf_pruned

    to_save, form = hf_pruned.for_saving(job.model)
    extra = None
    if form == "unsupported":
        extra = {"deployopt_pruning": {**pr.transformer_shape(job.model), "modules": _resized(job)}}
    st_folder = (Path(job.src.label) / "modules.json").is_file()
    text = hf_pruned.readme(
        to_save, form, out, sentence_transformers=st_folder, summary=removed["summary"]
    )
    return to_save, extra, text


def _module_readme(out: Path, factory: str | None, removed: dict) -> str:
    """README.md of a pruned module (not HF) folder: only deployopt rebuilds it from
    module.json (the factory, then the recorded shapes) and model.safetensors."""
    folder = json.dumps(str(Path(out).resolve()))
    lines = [f"# {Path(out).name}: a model pruned by deployopt", "",
             f"Written by `deployopt prune` ({removed['summary']}); `prune_report.json` says "
             "what was removed.", "", "## Load it", ""]  # fmt: skip
    if factory:
        lines += [
            f"deployopt rebuilds the module with its factory `{factory}` (it must be importable "
            "where you load it), gives it the shapes recorded in module.json, and loads "
            "model.safetensors:", "",
            "```python", "from deployopt.sources import load_source", "",
            f"folder = {folder}  # this folder; change it if you move the folder",
            "model = load_source(folder).module.model  # the pruned torch.nn.Module", "```", "",
            "`deployopt optimize FOLDER` exports and optimises it.", "",
        ]  # fmt: skip
    else:
        lines += ["module.json names no factory (the model was given as an object): build the "
                  "module yourself, resize it as module.json's `shapes` say, and load "
                  "model.safetensors.", ""]  # fmt: skip
    if "channels_ratio" in removed:
        lines += ["## What does not load it", "",
                  "- `load_state_dict` of model.safetensors into a module fresh from the factory: "
                  "its layers have the unpruned channel counts (a size mismatch).", ""]  # fmt: skip
    return "\n".join(lines)


def _resized(job: _Job) -> dict:
    """The modules whose shapes differ from what the config builds."""
    fresh = pr.module_shapes(job.original)
    now = pr.module_shapes(job.model)
    return {k: v for k, v in now.items() if fresh.get(k) != v}


def _summary(removed: dict, before: int, after: int) -> str:
    parts = []
    if "layers" in removed:
        parts.append(f"layers {removed['layers']} dropped")
    if removed.get("heads_ratio"):
        parts.append(f"heads {removed['heads_per_layer']} left")
    if removed.get("ffn_ratio"):
        parts.append(f"FFN {removed['ffn_per_layer']} left")
    if removed.get("channels_ratio"):
        parts.append(f"channels {removed['channels_before']} -> {removed['channels_after']}")
    if "unstructured" in removed:
        parts.append(f"{removed['unstructured'].get('sparsity', 0):.0%} weights zero")
    parts.append(f"{removed['importance']} importance")
    parts.append(f"params {after / before:.2f}x")
    return ", ".join(parts)


def _report_doc(job, before, after, removed, metrics, history, data, cfg, t0) -> dict:
    return {
        "schema": "deployopt.prune/1",
        "source": job.src.label,
        "params_before": before,
        "params_after": after,
        "params_ratio": after / before,
        "removed": removed,
        "data": getattr(job.data, "source", str(data)) if job.data is not None else None,
        "metrics": metrics,
        "recovery": {"history": history, "train": cfg.__dict__} if history else None,
        "note": DENSE_NOTE if "unstructured" in removed else None,
        "seconds": time.perf_counter() - t0,
    }


def _with_sizes(report: dict, out: Path) -> dict:
    """Weight-file bytes, raw and compressed (deflate): zeros compress, so unstructured pruning
    shows here and nowhere else."""
    weights = sorted(out.glob("*.safetensors"))
    raw = sum(f.stat().st_size for f in weights)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for f in weights:
            z.write(f, f.name)
    return {**report, "weights_bytes": raw, "compressed_bytes": len(buf.getvalue())}


def _json_bytes(doc: dict) -> bytes:
    return (json.dumps(doc, indent=2, default=str) + "\n").encode()
