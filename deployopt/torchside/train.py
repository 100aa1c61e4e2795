"""The one training loop (distillation now, pruning recovery later).

AdamW, linear warm-up then linear decay, gradient clipping, evaluation after every epoch with
early stopping on the task's score, fixed seeds, a progress bar with the loss, checkpoints
(weights as safetensors, optimizer/scheduler/RNG state beside them) every ``checkpoint_every``
steps and at each epoch end, and exact resumption after an interruption: the data order of an
epoch comes from ``seed + epoch``, so a resumed run skips the batches it already did.

Under ``torchrun`` (``WORLD_SIZE`` > 1) the model is wrapped in DistributedDataParallel over
gloo (CPU) or NCCL (CUDA, one process per GPU: ``device_ids=[local rank]``), each rank takes its
shard of every epoch's order, and rank 0 writes checkpoints.

Device and precision (deployopt.torchside.device): the student and the projections train on the
given device; the forward pass runs under autocast for bf16/fp16 (a GradScaler for fp16) while
the weights stay fp32. A step whose loss is not finite is skipped (no update: the weights are
never touched by it) and counted; an epoch in which every step was skipped stops the run with a
NonFiniteLossError. Checkpoints hold CPU tensors and load with ``map_location="cpu"``, so a run
started on a GPU resumes on the CPU and the other way round.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from deployopt.errors import StageError
from deployopt.torchside.device import (
    Precision,
    describe,
    peak_memory,
    reset_peak_memory,
    synchronize,
)
from deployopt.workspace import TMP_PREFIX, normal_permissions


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 3
    batch_size: int | None = None  # None: the task's default (see task_defaults)
    lr: float | None = None  # None: the task's default (see task_defaults)
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    patience: int = 2  # epochs without a better eval score before stopping
    seed: int = 0
    checkpoint_every: int = 100  # steps
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast; GradScaler for fp16)
    dropout: float | None = None  # the student's dropout while training; None: the model's own


# Defaults when the caller gives none, measured by benchmarks/defaults_minilm.py. Distilling a
# sentence encoder learns pooled embeddings and hidden states (dense targets): with them, lr
# 5e-4 at batch 16 gave a held-out cosine of 0.746 where the earlier embedding losses at 2e-4
# and batch 32 gave 0.669, 1e-3 trailed 5e-4 in loss when its run was stopped, and batch 8 beat
# 16 on a 3,000-text corpus (0.769 against 0.761 after one epoch). Recovering a
# pruned model starts close to its teacher: batch 32. A classifier's soft labels follow the
# fine-tuning convention, 5e-5 and 32.
SENTENCE_LR = 5e-4
SENTENCE_BATCH = 8
# A sentence-encoder student trains without dropout: it regresses onto the teacher's embeddings
# and hidden states, a deterministic target, so dropout's noise only slows the fit. Measured by
# benchmarks/defaults_minilm.py --texts 600 --held-out 300 --score-each-epoch: 0.7465
# held-out cosine without dropout against 0.7383 with the model's 0.1. The saved student's
# config keeps its own dropout, for whoever fine-tunes it next.
SENTENCE_DROPOUT = 0.0
CLASSIFIER_LR = 5e-5
BATCH = 32


def task_defaults(cfg: TrainConfig, sentence_encoder: bool, recovery: bool = False) -> TrainConfig:
    """``cfg`` with the learning rate, batch size and dropout the caller left None filled in
    (dropout stays None, the model's own, where no default is measured)."""
    lr = SENTENCE_LR if sentence_encoder else CLASSIFIER_LR
    distilling_sentences = sentence_encoder and not recovery
    batch = SENTENCE_BATCH if distilling_sentences else BATCH
    dropout = SENTENCE_DROPOUT if distilling_sentences else None
    return replace(
        cfg,
        lr=cfg.lr if cfg.lr is not None else lr,
        batch_size=cfg.batch_size if cfg.batch_size is not None else batch,
        dropout=cfg.dropout if cfg.dropout is not None else dropout,
    )


@dataclass
class TrainState:
    epoch: int = 0  # epochs finished
    batch: int = 0  # batches finished in the current epoch
    step: int = 0  # optimizer steps in all
    best_score: float = -math.inf
    bad_epochs: int = 0
    history: list[dict] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)  # this epoch's, for its mean
    stopped_early: bool = False
    skipped: int = 0  # steps skipped for a non-finite loss, in all
    epoch_skipped: int = 0  # ... in the current epoch
    overflow: int = 0  # fp16: steps the GradScaler skipped for inf/NaN gradients


class NonFiniteLossError(StageError):
    """Every step of an epoch had a NaN or infinite loss: training diverged."""

    default_hint = (
        "lower --lr, or train with --precision bf16 or fp32 (fp16 overflows where bf16 does not)"
    )


class Interrupted(Exception):
    """Raised by a ``stop_after`` hook: simulates a kill after a checkpoint (tests, demos)."""


@contextmanager
def dropout_set(model: nn.Module, p: float | None):
    """Every dropout layer of ``model`` at probability ``p`` inside the block (None: as it is),
    then back to its own."""
    layers = [m for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
    old = [m.p for m in layers]
    if p is not None:
        for m in layers:
            m.p = p
    try:
        yield
    finally:
        for m, q in zip(layers, old):
            m.p = q


def dist_info() -> tuple[int, int]:
    """(rank, world size) under torchrun, else (0, 1)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def backend_for(device: torch.device) -> str:
    """The process group's backend: NCCL for GPUs, gloo on the CPU."""
    return "nccl" if device.type == "cuda" else "gloo"


def launched_by_torchrun() -> bool:
    """Whether torchrun (torch.distributed.run) started this process, even as its only one."""
    return "TORCHELASTIC_RUN_ID" in os.environ


def _setup_ddp(model: nn.Module, device: torch.device) -> tuple[nn.Module, int, int]:
    """``model`` in DistributedDataParallel under torchrun (also with one process: on a one-GPU
    machine ``torchrun --nproc_per_node 1`` runs the NCCL path), else as it is."""
    rank, world = dist_info()
    if world == 1 and not launched_by_torchrun():
        return model, 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend_for(device))
    # one process per GPU: DDP replicates onto (and reduces from) this process's GPU only
    kw = {}
    if device.type == "cuda":
        kw = {"device_ids": [device.index], "output_device": device.index}
    # find_unused_parameters: a pooled-embedding student never uses its pooler, for one
    ddp = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True, **kw)
    return ddp, rank, world


def barrier(device: torch.device) -> None:
    """A barrier of the process group (NCCL needs to know this process's GPU)."""
    import torch.distributed as dist

    if device.type == "cuda":
        dist.barrier(device_ids=[device.index])
    else:
        dist.barrier()


def _save_weights(model: nn.Module, path: Path) -> None:
    from safetensors.torch import save_model

    save_model(model, str(path))  # safetensors copies device tensors to the CPU to write them


def _load_weights(model: nn.Module, path: Path) -> None:
    from safetensors.torch import load_model

    first = next(model.parameters(), None)
    device = str(first.device) if first is not None else "cpu"
    load_model(model, str(path), device=device)


def _cpu(obj):
    """``obj`` (nested dicts, lists, tensors) with every tensor on the CPU: a checkpoint
    written on a GPU loads where there is none."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu(v) for v in obj)
    return obj


class Trainer:
    """Train ``modules`` (the student and any learned projections) to minimise
    ``loss_fn(model, indices)`` over ``n_examples`` examples; ``evaluate()`` returns metrics
    with a ``score`` (higher is better) after every epoch.

    ``loss_fn`` receives the (possibly DDP-wrapped) student and a 1-D tensor of example
    indices; the task owns its data, its teacher and its teacher cache, on ``device`` (the
    trainer moves the student and the extra modules there).
    """

    def __init__(
        self,
        student: nn.Module,
        loss_fn: Callable[[nn.Module, torch.Tensor], torch.Tensor],
        n_examples: int,
        evaluate: Callable[[nn.Module], dict],
        cfg: TrainConfig,
        work_dir: Path,
        extra_modules: Iterable[nn.Module] = (),
        log: Callable[[str], None] = print,
        progress: bool = True,
        stop_after_steps: int | None = None,
        device: torch.device | str = "cpu",
    ):
        self.student, self.loss_fn, self.n = student, loss_fn, n_examples
        self.evaluate, self.cfg, self.log = evaluate, cfg, log
        self.extra = nn.ModuleList(list(extra_modules))
        self.work = Path(work_dir)
        self.ckpt = self.work / "checkpoint"
        self.progress = progress
        self.stop_after_steps = stop_after_steps
        self.device = torch.device(device)
        self.amp = Precision(cfg.precision, self.device)
        self.student.to(self.device)
        self.extra.to(self.device)
        self.stats: dict = {}  # device, precision, peak memory, skipped steps: see fit()

    # ------------------------------------------------------------ checkpoints

    def _save(self, state: TrainState, opt, sched) -> None:
        rank, _ = dist_info()
        if rank != 0:
            return
        self.work.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX + "ckpt.", dir=self.work))
        try:
            _save_weights(self.student, tmp / "student.safetensors")
            if len(self.extra):
                _save_weights(self.extra, tmp / "extra.safetensors")
            extra = {
                "optimizer": _cpu(opt.state_dict()),
                "scheduler": sched.state_dict(),
                "rng": torch.get_rng_state(),
            }
            if self.amp.scaler.is_enabled():
                extra["scaler"] = _cpu(self.amp.scaler.state_dict())
            if self.device.type == "cuda":
                extra["cuda_rng"] = torch.cuda.get_rng_state(self.device)
            torch.save(extra, tmp / "trainer_state.pt")
            (tmp / "state.json").write_text(json.dumps(asdict(state)))
            normal_permissions(tmp)
            old = self.work / (TMP_PREFIX + "ckpt-old")
            if self.ckpt.exists():
                os.replace(self.ckpt, old)
            os.replace(tmp, self.ckpt)
            shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _resume(self, opt, sched) -> TrainState:
        if not (self.ckpt / "state.json").exists():
            return TrainState()
        _load_weights(self.student, self.ckpt / "student.safetensors")
        if len(self.extra):
            _load_weights(self.extra, self.ckpt / "extra.safetensors")
        # map_location: a checkpoint written on a GPU loads on the CPU; the optimizer moves its
        # state to its parameters' device in load_state_dict
        extra = torch.load(self.ckpt / "trainer_state.pt", map_location="cpu", weights_only=True)
        opt.load_state_dict(extra["optimizer"])
        sched.load_state_dict(extra["scheduler"])
        torch.set_rng_state(extra["rng"])
        if "scaler" in extra and self.amp.scaler.is_enabled():
            self.amp.scaler.load_state_dict(extra["scaler"])
        if "cuda_rng" in extra and self.device.type == "cuda":
            torch.cuda.set_rng_state(extra["cuda_rng"], self.device)
        state = TrainState(**json.loads((self.ckpt / "state.json").read_text()))
        self.log(f"distill: resumed at epoch {state.epoch + 1}, batch {state.batch}")
        return state

    # ------------------------------------------------------------ the loop

    def _order(self, epoch: int, rank: int, world: int) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(self.cfg.seed + epoch)
        order = torch.randperm(self.n, generator=g)[rank::world]
        return list(order.split(self.cfg.batch_size))

    def _optimizer(self, params: list[nn.Parameter], rank: int, world: int):
        cfg = self.cfg
        if cfg.lr is None or cfg.batch_size is None:
            raise ValueError("TrainConfig has no lr or batch size: fill them with task_defaults()")
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]  # biases and norms: no weight decay
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay},
             {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr,
        )  # fmt: skip
        per_epoch = len(self._order(0, rank, world))
        total = max(1, per_epoch * cfg.epochs)
        warm = int(total * cfg.warmup_ratio)

        def lr_lambda(step: int) -> float:
            if step < warm:
                return (step + 1) / max(1, warm)
            return max(0.0, (total - step) / max(1, total - warm))

        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)

    def _finite(self, loss: torch.Tensor, world: int) -> bool:
        """Whether the loss is finite on every rank (all skip together: a rank that skipped
        its backward pass alone would leave the others waiting in DDP's all-reduce)."""
        bad = (~torch.isfinite(loss.detach())).float().reshape(1)
        if world > 1:
            import torch.distributed as dist

            dist.all_reduce(bad)
        return not bool(bad.item())

    def _step(self, model, idx, opt, sched, params, state, world) -> float | None:
        """One optimizer step on batch ``idx``; None when the loss was not finite (skipped)."""
        cfg, scaler = self.cfg, self.amp.scaler
        with self.amp.autocast():
            loss = self.loss_fn(model, idx)
        loss = loss.float()  # the KD losses compute in fp32 (deployopt.torchside.losses)
        if not self._finite(loss, world):
            opt.zero_grad(set_to_none=True)
            state.skipped += 1
            state.epoch_skipped += 1
            return None
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if world > 1:
            self._sync_extra(world)
        scaler.unscale_(opt)  # clip the true gradients, not the scaled ones
        if cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        scale = scaler.get_scale() if scaler.is_enabled() else None
        scaler.step(opt)  # fp16: skipped when a gradient is inf/NaN
        scaler.update()
        if scale is not None and scaler.get_scale() < scale:
            state.overflow += 1  # the scaler found inf/NaN gradients: no update this step
        else:
            sched.step()
        return float(loss.detach())

    def fit(self) -> TrainState:
        with dropout_set(self.student, self.cfg.dropout):
            return self._fit()

    def _fit(self) -> TrainState:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        model, rank, world = _setup_ddp(self.student, self.device)
        ddp = f"{backend_for(self.device)} x{world}" if model is not self.student else None
        params = [p for p in self.student.parameters() if p.requires_grad]
        params += [p for p in self.extra.parameters() if p.requires_grad]
        opt, sched = self._optimizer(params, rank, world)
        state = self._resume(opt, sched)
        self.work.mkdir(parents=True, exist_ok=True)
        best = self.work / "best.safetensors"
        reset_peak_memory(self.device)
        for epoch in range(state.epoch, cfg.epochs):
            if state.stopped_early:
                break
            batches = self._order(epoch, rank, world)
            model.train()
            self.extra.train()
            bar = self._bar(epoch, len(batches), state.batch, rank)
            t0 = time.perf_counter()
            for i in range(state.batch, len(batches)):
                loss = self._step(model, batches[i], opt, sched, params, state, world)
                state.batch = i + 1
                if loss is not None:
                    state.step += 1
                    state.losses.append(loss)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss="skipped" if loss is None else f"{loss:.4f}")
                if loss is not None and state.step % cfg.checkpoint_every == 0:
                    self._save(state, opt, sched)
                if self.stop_after_steps is not None and state.step >= self.stop_after_steps:
                    self._save(state, opt, sched)
                    raise Interrupted(f"stopped after step {state.step}")
            if bar is not None:
                bar.close()
            synchronize(self.device)
            seconds = time.perf_counter() - t0
            if batches and not state.losses:
                raise NonFiniteLossError(
                    f"distill: every step of epoch {epoch + 1} had a non-finite loss "
                    f"({state.epoch_skipped} of {len(batches)} skipped) at precision "
                    f"{cfg.precision} on {self.device}"
                )
            self._end_epoch(model, epoch, seconds, state, best, rank)
            self._save(state, opt, sched)
        if world > 1:
            barrier(self.device)
        if best.exists():
            _load_weights(self.student, best)  # the best epoch's weights, not the last
        self.stats = {
            "device": describe(self.device),
            "precision": cfg.precision,
            **peak_memory(self.device),
            "skipped_steps": state.skipped,
            "overflow_steps": state.overflow,
        }
        if ddp:
            self.stats["ddp"] = ddp
        return state

    def _end_epoch(self, model, epoch: int, seconds: float, state: TrainState, best, rank):
        """Evaluate, record the epoch's row, keep the best weights, decide early stopping."""
        cfg = self.cfg
        model.eval()
        self.extra.eval()
        with torch.no_grad():
            metrics = self.evaluate(self.student)
        mean_loss = sum(state.losses) / max(1, len(state.losses))
        row = {"epoch": epoch + 1, "train_loss": mean_loss, **metrics, "seconds": seconds}
        if state.epoch_skipped:
            row["skipped_steps"] = state.epoch_skipped
        state.history.append(row)
        self.log(
            f"distill: epoch {epoch + 1}/{cfg.epochs} loss {mean_loss:.4f} "
            + " ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
            + (f" ({state.epoch_skipped} non-finite steps skipped)" if state.epoch_skipped else "")
        )
        if metrics["score"] > state.best_score:
            state.best_score, state.bad_epochs = metrics["score"], 0
            if rank == 0:
                _save_weights(self.student, best)
        else:
            state.bad_epochs += 1
            if state.bad_epochs >= cfg.patience:
                state.stopped_early = True
                self.log(f"distill: no better score for {cfg.patience} epochs: stopping")
        state.epoch, state.batch, state.losses, state.epoch_skipped = epoch + 1, 0, [], 0

    def _sync_extra(self, world: int) -> None:
        """Average the gradients of modules outside the DDP-wrapped student (projections)."""
        import torch.distributed as dist

        for p in self.extra.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= world

    def _bar(self, epoch: int, total: int, done: int, rank: int):
        if not self.progress or rank != 0:
            return None
        from tqdm.auto import tqdm

        return tqdm(
            total=total, initial=done, desc=f"epoch {epoch + 1}/{self.cfg.epochs}", leave=False
        )
