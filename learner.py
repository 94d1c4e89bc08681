"""What the training steps change, and how: the optimizer and its parameter groups, the learning-rate
schedule, the weight average (EMA), the loss and the mixed-precision settings. bench_train.py builds its
steps from these too, so a benchmark measures what train.py runs."""
from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

import runs
from common import UsageError
from config import Config, TrainConfig
from model import build_model, convert_sync_batchnorm, zero_init_residual

if TYPE_CHECKING:
    from distributed import Setup


@dataclass
class Learner:
    """What the steps change: the model, its optimiser and schedule, the weight average, the loss."""
    model: nn.Module  # plain state_dict names (checkpoints)
    train_model: nn.Module  # what runs the steps: the model, wrapped by DDP and/or torch.compile
    model_options: dict
    optimizer: torch.optim.Optimizer
    scheduler: Any
    per_step: bool  # the scheduler steps per optimizer step (else per epoch)
    ema: torch.optim.swa_utils.AveragedModel | None
    criterion: nn.Module
    base_lr: float

    def eval_model(self) -> nn.Module:  # validated and saved for use: the average when --ema is on
        return self.ema.module if self.ema is not None else self.train_model


def precision(device: torch.device, amp: bool | None, amp_dtype: str
              ) -> tuple[torch.dtype | None, torch.amp.GradScaler | None]:
    """(autocast dtype or None for no autocast, GradScaler or None). amp None: on for CUDA, off for a CPU;
    amp_dtype auto: bfloat16 on a CPU and on CUDA that supports it, else float16, whose narrow range needs
    the loss scaled (bfloat16 has float32's range: no scaler)."""
    use_amp = amp if amp is not None else device.type == "cuda"
    if not use_amp:
        return None, None
    if amp_dtype == "auto":
        amp_dtype = "bfloat16" if device.type == "cpu" or torch.cuda.is_bf16_supported() else "float16"
    dtype = getattr(torch, amp_dtype)
    return dtype, (torch.amp.GradScaler(device.type) if dtype == torch.float16 else None)


def autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()


def make_optimizer(model: nn.Module, t: TrainConfig, lr: float) -> torch.optim.Optimizer:
    groups = param_groups(model, t.wd, t.wd_norm_bias)
    if t.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    if t.optimizer == "adam":
        return torch.optim.Adam(groups, lr=lr)
    return torch.optim.SGD(groups, lr=lr, momentum=t.momentum)




def lr_factor(step: int, total_steps: int, warmup_steps: int, shape: str, floor: float = 0.0) -> float:
    """The per-step schedule: the LR of optimizer step `step` (0-based) as a fraction of --lr. A linear
    warm-up from 1/warmup_steps to 1 over the first warmup_steps steps, then `shape` (cosine, linear or none)
    from 1 down towards `floor` (min_lr / lr), which the step after the last one would reach."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if shape == "none":
        return 1.0
    p = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    f = 0.5 * (1.0 + math.cos(math.pi * p)) if shape == "cosine" else 1.0 - p
    return floor + (1.0 - floor) * f


def make_scheduler(t: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
    """(scheduler, per_step). Per-epoch schedules are the study's; cosine/linear/none-with-warm-up follow the
    optimizer steps of this very run (--epochs x steps per epoch), so they fit any length."""
    if t.scheduler == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=t.milestones, gamma=t.gamma), False
    if t.scheduler == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=t.plateau_factor,
                                                          patience=t.plateau_patience, min_lr=t.min_lr), False
    if t.scheduler == "exponential":
        return torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=t.exp_base), False
    warmup = int(round(t.warmup_epochs * steps_per_epoch))
    if t.scheduler == "none" and warmup == 0:
        return None, False
    total, floor = t.epochs * steps_per_epoch, t.min_lr / t.lr if t.lr > 0 else 0.0
    shape = t.scheduler
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total, warmup, shape, floor)), True


def param_groups(model: nn.Module, wd: float, wd_norm_bias: bool) -> list[dict]:
    """One group with weight decay on everything (the study), or two: no decay on the 1-d parameters
    (BatchNorm weights and biases, Linear/conv biases), which decay only pulls towards zero without
    regularising anything a scale-invariant BN layer computes (as in timm and "ResNet strikes back")."""
    params = [p for p in model.parameters() if p.requires_grad]
    if wd_norm_bias or wd == 0:
        return [{"params": params, "weight_decay": wd}]
    return [{"params": [p for p in params if p.ndim > 1], "weight_decay": wd},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]


def make_ema(model: nn.Module, decay: float) -> torch.optim.swa_utils.AveragedModel:
    """An exponential moving average of `model`'s parameters and buffers (BatchNorm running statistics
    included, so the averaged weights are evaluated with statistics of the same average, as timm's ModelEma
    does). The decay ramps up as min(decay, (1 + n) / (10 + n)) after n updates, so the average is not
    dominated by the random initial weights in a short run. Integer buffers (BN's num_batches_tracked)
    are copied."""
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged: torch.Tensor) -> None:
        if not averaged[0].is_floating_point():
            torch._foreach_copy_(averaged, current)
            return
        n = float(num_averaged)
        torch._foreach_lerp_(averaged, current, 1.0 - min(decay, (1.0 + n) / (10.0 + n)))
    return torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=update, use_buffers=True)


def init_from(model: nn.Module, path: str) -> str:
    """Load every weight of checkpoint `path` whose name and shape match (fine-tuning); a classifier
    of another class count stays freshly initialised. Returns a one-line summary."""
    ckpt = runs.load_checkpoint(path)
    own = model.state_dict()
    matched = {k: v for k, v in ckpt["model"].items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(matched, strict=False)
    fresh = [k for k in own if k not in matched and not k.endswith("num_batches_tracked")]
    note = f"init-from {path}: loaded {len(matched)}/{len(own)} tensors"
    if fresh:
        note += f"; new: {', '.join(fresh[:4])}{' ...' if len(fresh) > 4 else ''}"
    return note


def optimizer_step(loss: torch.Tensor, learner: Learner, scaler: torch.amp.GradScaler | None) -> None:
    """Backward, step (through the GradScaler with float16), the weight average, a per-step schedule."""
    learner.optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(learner.optimizer)
        scaler.update()
    else:
        loss.backward()
        learner.optimizer.step()
    if learner.ema is not None:
        learner.ema.update_parameters(learner.model)
    if learner.per_step:
        learner.scheduler.step()


def build(cfg: Config, env: Setup, num_classes: int, in_channels: int, steps_per_epoch: int) -> Learner:
    """The model (with --zero-init-residual / --init-from), optimizer, schedule, EMA and loss."""
    m, t = cfg.model, cfg.train
    model_options = dict(out_channels=m.out_channels, dropout=m.dropout, in_channels=in_channels, width=m.width)
    try:
        model = build_model(m.arch, num_classes, ghost_op=env.ghost_op, **model_options)
    except ValueError as e:  # e.g. an out-channels or width that the architecture can't take
        raise UsageError(f"{e}; fix the model options (see python train.py --help)") from None
    if m.zero_init_residual and zero_init_residual(model) == 0:
        raise UsageError(f"--zero-init-residual needs a GhostNet (--arch ghostnet or ghostnet_official), not {m.arch}")
    if cfg.run.init_from and not cfg.run.resume:
        print(init_from(model, cfg.run.init_from))
    model.to(env.device)
    if t.channels_last:
        model.to(memory_format=torch.channels_last)
    if t.sync_bn and env.ddp:
        model = convert_sync_batchnorm(model)
    # the learning rate is the one given, whatever the world size, unless --scale-lr (linear scaling rule)
    base_lr = t.lr * env.world if t.scale_lr else t.lr
    optimizer = make_optimizer(model, t, base_lr)
    scheduler, per_step = make_scheduler(t, optimizer, steps_per_epoch)
    ema = make_ema(model, t.ema) if t.ema else None
    train_model = model
    if env.ddp:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    if t.compile:
        train_model = torch.compile(train_model)
    return Learner(model, train_model, model_options, optimizer, scheduler, per_step, ema,
                     nn.CrossEntropyLoss(label_smoothing=t.label_smoothing), base_lr)


def state(learner: Learner, scaler: torch.amp.GradScaler | None, cuda_rng: bool) -> dict[str, Any]:
    """What last.pt needs beyond the weights for an exact resume: optimizer, schedule, scaler, EMA, RNG."""
    return {
        "optimizer": learner.optimizer.state_dict(),
        "scheduler": learner.scheduler.state_dict() if learner.scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "ema": learner.ema.state_dict() if learner.ema is not None else None,
        "rng": {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if cuda_rng else None},
    }


def load_state(ckpt: dict, learner: Learner, scaler: torch.amp.GradScaler | None, cuda_rng: bool) -> None:
    """The weights and state() of a last.pt, back into the learner (and the global RNG)."""
    learner.model.load_state_dict(ckpt["model"])
    learner.optimizer.load_state_dict(ckpt["optimizer"])
    if learner.scheduler is not None and ckpt.get("scheduler") is not None:
        learner.scheduler.load_state_dict(ckpt["scheduler"])
    if scaler is not None and ckpt.get("scaler") is not None:
        scaler.load_state_dict(ckpt["scaler"])
    if learner.ema is not None:
        learner.ema.load_state_dict(ckpt["ema"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    if ckpt["rng"].get("cuda") is not None and cuda_rng:
        torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])


def rescale_lr(learner: Learner, ratio: float) -> None:
    """--scale-lr after a change of world size: the saved learning rates belong to the old one."""
    for g in learner.optimizer.param_groups:
        g["lr"] *= ratio
        if "initial_lr" in g:
            g["initial_lr"] *= ratio
    if hasattr(learner.scheduler, "base_lrs"):
        learner.scheduler.base_lrs = [x * ratio for x in learner.scheduler.base_lrs]
        learner.scheduler._last_lr = [g["lr"] for g in learner.optimizer.param_groups]
