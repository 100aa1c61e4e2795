"""The one training loop (distillation now, pruning recovery later).

AdamW, linear warm-up then linear decay, gradient clipping, evaluation after every epoch with
early stopping on the task's score, fixed seeds, a progress bar with the loss, checkpoints
(weights as safetensors, optimizer/scheduler/RNG state beside them) every ``checkpoint_every``
steps and at each epoch end, and exact resumption after an interruption: the data order of an
epoch comes from ``seed + epoch``, so a resumed run skips the batches it already did.

Under ``torchrun`` (``WORLD_SIZE`` > 1) the model is wrapped in DistributedDataParallel over
gloo (CPU) or NCCL (CUDA), each rank takes its shard of every epoch's order, and rank 0 writes
checkpoints.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

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


# Defaults when the caller gives none, measured by benchmarks/defaults_minilm.py. Distilling a
# sentence encoder learns pooled embeddings and hidden states (dense targets): with them, lr
# 5e-4 at batch 16 gave a held-out cosine of 0.746 where the earlier embedding losses at 2e-4
# and batch 32 gave 0.669, 1e-3 trailed 5e-4 in loss when its run was stopped, and batch 8 beat
# 16 on a 3,000-text corpus (0.769 against 0.761 after one epoch). Recovering a
# pruned model starts close to its teacher: batch 32. A classifier's soft labels follow the
# fine-tuning convention, 5e-5 and 32.
SENTENCE_LR = 5e-4
SENTENCE_BATCH = 8
CLASSIFIER_LR = 5e-5
BATCH = 32


def task_defaults(cfg: TrainConfig, sentence_encoder: bool, recovery: bool = False) -> TrainConfig:
    """``cfg`` with the learning rate and batch size the caller left None filled in."""
    lr = SENTENCE_LR if sentence_encoder else CLASSIFIER_LR
    batch = SENTENCE_BATCH if sentence_encoder and not recovery else BATCH
    return replace(
        cfg,
        lr=cfg.lr if cfg.lr is not None else lr,
        batch_size=cfg.batch_size if cfg.batch_size is not None else batch,
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


class Interrupted(Exception):
    """Raised by a ``stop_after`` hook: simulates a kill after a checkpoint (tests, demos)."""


def dist_info() -> tuple[int, int]:
    """(rank, world size) under torchrun, else (0, 1)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _setup_ddp(model: nn.Module) -> tuple[nn.Module, int, int]:
    rank, world = dist_info()
    if world == 1:
        return model, 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    # find_unused_parameters: a pooled-embedding student never uses its pooler, for one
    return nn.parallel.DistributedDataParallel(model, find_unused_parameters=True), rank, world


def _save_weights(model: nn.Module, path: Path) -> None:
    from safetensors.torch import save_model

    save_model(model, str(path))


def _load_weights(model: nn.Module, path: Path) -> None:
    from safetensors.torch import load_model

    load_model(model, str(path))


class Trainer:
    """Train ``modules`` (the student and any learned projections) to minimise
    ``loss_fn(model, indices)`` over ``n_examples`` examples; ``evaluate()`` returns metrics
    with a ``score`` (higher is better) after every epoch.

    ``loss_fn`` receives the (possibly DDP-wrapped) student and a 1-D tensor of example
    indices; the task owns its data, its teacher and its teacher cache.
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
    ):
        self.student, self.loss_fn, self.n = student, loss_fn, n_examples
        self.evaluate, self.cfg, self.log = evaluate, cfg, log
        self.extra = nn.ModuleList(list(extra_modules))
        self.work = Path(work_dir)
        self.ckpt = self.work / "checkpoint"
        self.progress = progress
        self.stop_after_steps = stop_after_steps

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
            torch.save(
                {
                    "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(),
                    "rng": torch.get_rng_state(),
                },
                tmp / "trainer_state.pt",
            )
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
        extra = torch.load(self.ckpt / "trainer_state.pt", weights_only=True)
        opt.load_state_dict(extra["optimizer"])
        sched.load_state_dict(extra["scheduler"])
        torch.set_rng_state(extra["rng"])
        state = TrainState(**json.loads((self.ckpt / "state.json").read_text()))
        self.log(f"distill: resumed at epoch {state.epoch + 1}, batch {state.batch}")
        return state

    # ------------------------------------------------------------ the loop

    def _order(self, epoch: int, rank: int, world: int) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(self.cfg.seed + epoch)
        order = torch.randperm(self.n, generator=g)[rank::world]
        return list(order.split(self.cfg.batch_size))

    def fit(self) -> TrainState:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        model, rank, world = _setup_ddp(self.student)
        params = [p for p in self.student.parameters() if p.requires_grad]
        params += [p for p in self.extra.parameters() if p.requires_grad]
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]  # biases and norms: no weight decay
        if cfg.lr is None or cfg.batch_size is None:
            raise ValueError("TrainConfig has no lr or batch size: fill them with task_defaults()")
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

        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
        state = self._resume(opt, sched)
        self.work.mkdir(parents=True, exist_ok=True)
        best = self.work / "best.safetensors"
        for epoch in range(state.epoch, cfg.epochs):
            if state.stopped_early:
                break
            batches = self._order(epoch, rank, world)
            model.train()
            self.extra.train()
            bar = self._bar(epoch, len(batches), state.batch, rank)
            for i in range(state.batch, len(batches)):
                loss = self.loss_fn(model, batches[i])
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"loss is {loss.item()} at epoch {epoch + 1} step {i}")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if world > 1:
                    self._sync_extra(world)
                if cfg.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                opt.step()
                sched.step()
                state.step += 1
                state.batch = i + 1
                state.losses.append(float(loss.detach()))
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss.item():.4f}")
                if state.step % cfg.checkpoint_every == 0:
                    self._save(state, opt, sched)
                if self.stop_after_steps is not None and state.step >= self.stop_after_steps:
                    self._save(state, opt, sched)
                    raise Interrupted(f"stopped after step {state.step}")
            if bar is not None:
                bar.close()
            model.eval()
            self.extra.eval()
            with torch.no_grad():
                metrics = self.evaluate(self.student)
            mean_loss = sum(state.losses) / max(1, len(state.losses))
            row = {"epoch": epoch + 1, "train_loss": mean_loss, **metrics}
            state.history.append(row)
            self.log(
                f"distill: epoch {epoch + 1}/{cfg.epochs} loss {mean_loss:.4f} "
                + " ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
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
            state.epoch, state.batch, state.losses = epoch + 1, 0, []
            self._save(state, opt, sched)
        if world > 1:
            import torch.distributed as dist

            dist.barrier()
        if best.exists():
            _load_weights(self.student, best)  # the best epoch's weights, not the last
        return state

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
