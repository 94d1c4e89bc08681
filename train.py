"""Train a car-model classifier (GhostNet by default) on Stanford Cars, or on synthetic demo data.

    python train.py --demo                                   # synthetic data, about a minute on a CPU
    python train.py --data data                              # the reference work's best recipe (83.79%)
    python train.py --resume runs/<name>                     # continue an interrupted run exactly

Defaults are the reference work's best settings ("Best Model settings", C-50 in
../shared/seed/000_7bc5232a39019ce3.txt): 227 px RGB, normalized, flip + affine + colour jitter,
batch 64, AdamW lr 1e-3 weight decay 0.6, label smoothing, dropout 0.2, 320 output channels,
MultiStepLR at epochs 67 82 95 107, early stopping after 15 epochs without a lower validation loss.

    python train.py --recipe fast --epochs 40 --img-size 96         # the best model 40 short epochs make
    python train.py --recipe fast --epochs 32 --img-size 128        # the same CPU time, better (README 'Recipes')

Everything of a run lands in one folder, runs/<name>/: config.json, metrics.csv, last.pt (every
epoch), best.pt (best validation accuracy), final.pt (the model at the end), curves.png. The loop below
is deliberately flat.
Exit status: 0 done, 1 training diverged (non-finite loss), 2 a usage or data error, 130 Ctrl-C.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import os
import platform
import random
import shlex
import signal
import subprocess
import sys
import threading
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

import data
from augment import BatchTransform, add_augment_args, augment_from_args
from common import WriteError, atomic_save, atomic_write, atomic_write_text, device_name, pick_device
from model import (ARCHS, CHECKPOINT_FORMAT, CheckpointError, build_model, convert_sync_batchnorm, count_params,
                   load_checkpoint, zero_init_residual)

REPO = Path(__file__).resolve().parent
METRIC_FIELDS = ["epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "val_top5", "seconds", "img_per_s"]
TIMING_FIELDS = ("seconds", "img_per_s")
LOG_EVERY = 5  # steps between looks at the loss (progress bar, non-finite check): the only host syncs of a step
# Options that may differ on --resume (given explicitly on the command line); everything else comes from
# the run's saved config so that the resumed run is the same run.
RESUME_OVERRIDABLE = ("epochs", "patience", "workers", "threads", "device", "compile", "cache_dir")
# debugging aids and the smoke-run step limit apply to one invocation only
NOT_INHERITED = ("max_steps",)
# --demo's settings (any flag given explicitly still wins): small images, a short schedule, mild
# regularisation, so the synthetic set is learned in about a minute on two CPU cores.
# One CPU thread: 64-px batches of 16 gain little from a second one, and one thread stays fast on a CPU
# that other processes share (two spinning OpenMP threads then slow down many times over).
DEMO_DEFAULTS = dict(img_size=64, batch_size=16, epochs=16, lr=3e-3, wd=0.05, scheduler="cosine",
                     patience=0, label_smoothing=0.1, augment=["flip"], threads=1)
# --recipe: named sets of defaults. "study" is the parser's own defaults (the study's C-50, made for about
# 130 epochs at 227 px). "fast" makes the best model it can in the --epochs it is given: every value was
# chosen on a validation split of the real photos (README 'Recipes' has the evidence for each).
RECIPES: dict[str, dict] = {
    "study": {},
    "fast": dict(scheduler="cosine", warmup_epochs=2.0, lr=5e-3, wd=0.05, wd_norm_bias=False, ema=0.999,
                 zero_init_residual=True, dropout=0.1, patience=0, batch_size=64,
                 augment=["flip", "resized_crop"], crop_scale=[0.35, 1.0], channels_last=True, test_crop=0.8),
}
DEMO_DATA = dict(num_classes=4, train_per_class=60, test_per_class=25)  # 240 train, 100 val images
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class TrainError(Exception):
    """A user-facing problem in train.py's own options (one line, names the fix)."""


class NonFiniteLoss(Exception):
    pass


class StopSignals:
    """SIGTERM and SIGUSR1, a cluster's notice before it reclaims the node (SLURM sends SIGUSR1 ahead of time
    with --signal, Kubernetes and spot instances SIGTERM): the loop finishes the step it is in, saves last.pt
    at that step, prints the resume command and exits 128 + the signal (143 for SIGTERM). Installed for
    one-process runs; under torchrun the ranks would stop at different steps, so there a signal ends the
    processes as usual and torchrun's restart resumes from the last completed epoch (README 'Reliability')."""
    NAMES = ("SIGTERM", "SIGUSR1")

    def __init__(self, install: bool = True) -> None:
        self.received: signal.Signals | None = None
        self._previous: dict = {}
        if install and threading.current_thread() is threading.main_thread():  # handlers live in the main thread
            for name in self.NAMES:
                sig = getattr(signal, name)
                self._previous[sig] = signal.signal(sig, self._note)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _note(self, signum: int, frame) -> None:
        self.received = signal.Signals(signum)


# ----------------------------------------------------------------------------------------------------
# command line

class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except None/False ones (their help says what happens)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False:
            return action.help or ""
        return super()._get_help_string(action)


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train a car-model classifier; defaults = the reference work's best "
                                "recipe (GhostNet from scratch, 83.79% on Stanford Cars).",
                                formatter_class=_HelpFormatter)
    g = p.add_argument_group("run")
    g.add_argument("--data", default="data", help="dataset folder (DIR or DIR/stanford_cars); see README")
    g.add_argument("--out", default="runs", help="parent folder of run folders")
    g.add_argument("--name", default=None, help="run folder name (default: <date>-<time>-<arch>)")
    g.add_argument("--demo", action="store_true", help="train on synthetic demo data (made under --out) in ~1 min")
    g.add_argument("--resume", metavar="RUN_DIR", default=None, help="continue the run in RUN_DIR from its last.pt")
    g.add_argument("--init-from", metavar="CKPT", default=None,
                   help="fine-tune: start from CKPT's matching weights (new classifier if class count differs)")
    g.add_argument("--recipe", default="study", choices=sorted(RECIPES),
                   help="preset of defaults: study = the study's C-50 (about 130 epochs at 227 px); fast = the "
                        "best model in --epochs epochs (README: 'Recipes'); flags given explicitly still win")
    g.add_argument("--resume-if-exists", action="store_true",
                   help="continue <out>/<name> when it holds last.pt, else start it: the same command works for a "
                        "first start and for every restart (torchrun --max-restarts, requeued jobs)")
    g.add_argument("--seed", type=int, default=0, help="seeds model init, shuffling, augmentation, splits")
    g.add_argument("--deterministic", action="store_true",
                   help="deterministic algorithms (bit-exact reruns on the same machine; slower on CUDA)")
    g.add_argument("--device", default="auto", help="auto (cuda when present, else cpu), cpu, cuda, cuda:1, ...")
    g.add_argument("--workers", type=int, default=None, help="image decoding processes (default: CPU count)")
    g.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's, one per core; the demo uses 1)")
    g.add_argument("--max-steps", type=int, default=None,
                   help="stop after this many optimizer steps in all (smoke runs); a stop inside an epoch saves "
                        "last.pt there, and --resume continues exactly from that step")

    g = p.add_argument_group("several GPUs or machines (launch with torchrun; see README)")
    g.add_argument("--sync-bn", action="store_true",
                   help="under torchrun: BatchNorm statistics over the global batch (SyncBatchNorm; CUDA only); "
                        "GhostModules then run the plain PyTorch path")
    g.add_argument("--dist-timeout", type=float, default=600, metavar="SECONDS",
                   help="under torchrun: how long a rank waits for the others (set-up, each all-reduce) before it "
                        "fails, so that torchrun --max-restarts can restart the group")
    g.add_argument("--scale-lr", action="store_true",
                   help="under torchrun: multiply --lr by the world size (linear scaling); default: lr unchanged")

    g = p.add_argument_group("model")
    g.add_argument("--arch", default="ghostnet", help="one of: " + ", ".join(ARCHS))
    g.add_argument("--dropout", type=float, default=0.2, help="dropout before the classifier")
    g.add_argument("--out-channels", type=int, default=320, help="width of the last feature layer")
    g.add_argument("--width", type=float, default=1.0, help="channel multiplier (ghostnet)")
    g.add_argument("--zero-init-residual", action="store_true",
                   help="start each GhostBottleneck as the identity (its last BN scales zero); ghostnet archs")
    g.add_argument("--ghost-op", default="auto", choices=["auto", "ext", "torch"],
                   help="GhostModule implementation: fused C++/CUDA op (ext), plain PyTorch (torch), or auto")

    g = p.add_argument_group("optimisation")
    g.add_argument("--img-size", type=data.parse_img_size, default=227,
                   help="input size: S (S x S pixels) or WIDTHxHEIGHT, e.g. 128x96 to keep 4:3 photos' shape")
    g.add_argument("--batch-size", type=int, default=64,
                   help="images per optimizer step; under torchrun PER RANK (global batch = this x world size)")
    g.add_argument("--epochs", type=int, default=200, help="maximum epochs (early stopping may end sooner)")
    g.add_argument("--lr", type=float, default=1e-3, help="initial learning rate")
    g.add_argument("--optimizer", default="adamw", choices=["adamw", "adam", "sgd"], help="optimizer")
    g.add_argument("--wd", type=float, default=0.6, help="weight decay (decoupled for adamw, L2 for adam/sgd)")
    g.add_argument("--momentum", type=float, default=0.9, help="sgd momentum")
    g.add_argument("--label-smoothing", type=float, default=0.1, help="0 = plain cross entropy")
    g.add_argument("--scheduler", default="multistep",
                   choices=["multistep", "plateau", "exponential", "cosine", "linear", "none"],
                   help="LR schedule. multistep, plateau (the study's 'automatic' one) and exponential step once "
                        "per epoch; cosine and linear step per optimizer step, after --warmup-epochs, down to "
                        "--min-lr at the last step of --epochs; none = constant (after any warm-up)")
    g.add_argument("--milestones", type=int, nargs="+", default=[67, 82, 95, 107], help="multistep epochs")
    g.add_argument("--gamma", type=float, default=0.1, help="multistep LR factor")
    g.add_argument("--exp-base", type=float, default=0.975, help="exponential: lr *= base each epoch (0.955..0.98)")
    g.add_argument("--plateau-factor", type=float, default=0.1, help="plateau: LR factor on a val-loss plateau")
    g.add_argument("--plateau-patience", type=int, default=10, help="plateau: epochs without val-loss progress")
    g.add_argument("--min-lr", type=float, default=0.0, help="lowest LR of cosine/linear decay; plateau min_lr")
    g.add_argument("--warmup-epochs", type=float, default=0.0,
                   help="linear LR warm-up from ~0 over this many epochs (fractions allowed; per-step schedules)")
    g.add_argument("--ema", type=float, default=0.0, metavar="DECAY",
                   help="exponential moving average of the weights (and BN statistics) with this decay per step, "
                        "e.g. 0.999; validation, best.pt and final.pt use it. 0 = off")
    g.add_argument("--wd-norm-bias", action=argparse.BooleanOptionalAction, default=True,
                   help="weight decay also on BatchNorm weights and biases (the study's choice)")
    g.add_argument("--patience", type=int, default=15,
                   help="early stopping: epochs without progress in --early-stop-on (0=off)")
    # the reference watches the loss; on short budgets the loss can rise (overconfidence) while accuracy
    # still climbs, and val_acc then stops later
    g.add_argument("--early-stop-on", default="val_loss", choices=["val_loss", "val_acc"],
                   help="early stopping watches a lower val loss (the reference) or a higher val accuracy")

    g = p.add_argument_group("speed")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="mixed precision autocast (default: on for CUDA, off for CPU)")
    g.add_argument("--amp-dtype", default="auto", choices=["auto", "float16", "bfloat16"],
                   help="auto: bfloat16 on CPU and on CUDA that supports it, else float16 (with GradScaler)")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=False,
                   help="NHWC memory format for model and batches (on a CPU: 1.3x faster training steps)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")

    data.add_data_args(p)  # --grayscale, --crop-bbox, --val-split, --cache-dir, ...
    add_augment_args(p)  # --augment/--erase and their parameters

    # hidden options for tests and debugging
    p.add_argument("--limit-train", type=int, default=None, help=argparse.SUPPRESS)  # seeded subset of train
    p.add_argument("--limit-val", type=int, default=None, help=argparse.SUPPRESS)
    return p


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, set[str]]:
    """Parse; --recipe and then --demo swap in their defaults (explicit flags still win). Also returns the
    options given explicitly (differing from the defaults), which --resume may override."""
    parser = get_parser()
    args = parser.parse_args(argv)
    if args.recipe != "study" or args.demo:
        parser.set_defaults(**RECIPES[args.recipe])
        if args.demo:
            parser.set_defaults(**DEMO_DEFAULTS)
        args = parser.parse_args(argv)
    # the options on the command line: parse again with every default suppressed
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    parser._defaults.clear()  # set_defaults' values (the demo's) would otherwise count as given
    explicit = set(vars(parser.parse_args(argv)))
    return args, explicit


# ----------------------------------------------------------------------------------------------------
# small helpers

def write_metrics(rows: list[dict], path: Path) -> None:
    lines = [",".join(METRIC_FIELDS)]
    for r in rows:
        lines.append(",".join(str(r[k]) if k == "epoch" else f"{r[k]:.6g}" for k in METRIC_FIELDS))
    atomic_write_text("\n".join(lines) + "\n", path)


def read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path) as f:
        return [{k: (int(v) if k == "epoch" else float(v)) for k, v in row.items()} for row in csv.DictReader(f)]


_warned_no_matplotlib = False


def plot_curves(rows: list[dict], path: Path) -> None:
    """curves.png: learning rate, loss and accuracy per epoch (skipped, with one note, without matplotlib)."""
    global _warned_no_matplotlib
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        if not _warned_no_matplotlib:
            print("note: matplotlib is not installed, so no curves.png (pip install matplotlib)", file=sys.stderr)
            _warned_no_matplotlib = True
        return
    ep = [r["epoch"] for r in rows]
    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    ax[0].plot(ep, [r["lr"] for r in rows])
    if all(r["lr"] > 0 for r in rows):
        ax[0].set_yscale("log")
    ax[0].set_title("learning rate")
    ax[1].plot(ep, [r["train_loss"] for r in rows], label="train")
    ax[1].plot(ep, [r["val_loss"] for r in rows], label="val")
    ax[1].set_title("loss")
    ax[1].legend()
    ax[2].plot(ep, [100 * r["train_acc"] for r in rows], label="train")
    ax[2].plot(ep, [100 * r["val_acc"] for r in rows], label="val top-1")
    ax[2].plot(ep, [100 * r["val_top5"] for r in rows], label="val top-5")
    ax[2].set_title("accuracy (%)")
    ax[2].legend()
    for a in ax:
        a.set_xlabel("epoch")
        a.grid(alpha=0.3)
    fig.tight_layout()
    try:
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=80))
    finally:
        plt.close(fig)


def git_commit() -> str | None:
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return rev.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def resolve_device(name: str) -> torch.device:
    try:
        return pick_device(name)
    except ValueError as e:
        raise TrainError(str(e)) from None


def check_options(args: argparse.Namespace) -> None:
    """Fail fast, before any data is decoded, on options that can't work."""
    if args.arch not in ARCHS:
        raise TrainError(f"unknown arch {args.arch!r}; choose one of: {', '.join(ARCHS)}")
    for k in ("batch_size", "epochs"):
        if getattr(args, k) < 1:
            raise TrainError(f"--{k.replace('_', '-')} must be at least 1 (got {getattr(args, k)})")
    if not 0 <= args.label_smoothing < 1:
        raise TrainError(f"--label-smoothing must lie in [0, 1) (got {args.label_smoothing})")
    if not 0 <= args.dropout < 1:
        raise TrainError(f"--dropout must lie in [0, 1) (got {args.dropout})")
    if not 0 <= args.ema < 1:
        raise TrainError(f"--ema must lie in [0, 1), e.g. 0.999 (got {args.ema}); 0 turns it off")
    if args.warmup_epochs < 0 or (args.warmup_epochs and args.scheduler in PER_EPOCH_SCHEDULES):
        raise TrainError(f"--warmup-epochs {args.warmup_epochs:g} needs a per-step --scheduler (cosine, linear or "
                         f"none), not {args.scheduler}, and must not be negative")


def jsonable(v):
    if isinstance(v, Path):
        return str(v)
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    return v


def subset(records: list, n: int | None, seed: int) -> list:
    """A seeded random subset of n records (in their original order), for quick runs."""
    if n is None or n >= len(records):
        return records
    g = torch.Generator().manual_seed(seed)
    keep = sorted(torch.randperm(len(records), generator=g)[:n].tolist())
    return [records[i] for i in keep]


PER_EPOCH_SCHEDULES = ("multistep", "plateau", "exponential")  # the study's: stepped after each epoch


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


def make_scheduler(args: argparse.Namespace, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
    """(scheduler, per_step). Per-epoch schedules are the study's; cosine/linear/none-with-warm-up follow the
    optimizer steps of this very run (--epochs x steps per epoch), so they fit any length."""
    if args.scheduler == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=args.milestones, gamma=args.gamma), False
    if args.scheduler == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=args.plateau_factor,
                                                          patience=args.plateau_patience, min_lr=args.min_lr), False
    if args.scheduler == "exponential":
        return torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=args.exp_base), False
    warmup = int(round(args.warmup_epochs * steps_per_epoch))
    if args.scheduler == "none" and warmup == 0:
        return None, False
    total, floor = args.epochs * steps_per_epoch, args.min_lr / args.lr if args.lr > 0 else 0.0
    shape = args.scheduler
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
    ckpt = load_checkpoint(path)
    own = model.state_dict()
    matched = {k: v for k, v in ckpt["model"].items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(matched, strict=False)
    fresh = [k for k in own if k not in matched and not k.endswith("num_batches_tracked")]
    note = f"init-from {path}: loaded {len(matched)}/{len(own)} tensors"
    if fresh:
        note += f"; new: {', '.join(fresh[:4])}{' ...' if len(fresh) > 4 else ''}"
    return note


# ----------------------------------------------------------------------------------------------------
# several processes (torchrun): DistributedDataParallel, as in PyTorch's DDP tutorial and torchvision's
# classification reference

def distributed_env() -> dict | None:
    """torchrun's rendezvous variables as {"rank", "world_size", "local_rank"}, or None when not launched by
    torchrun (none of RANK / WORLD_SIZE / LOCAL_RANK set). A partial or inconsistent set is a TrainError."""
    if not any(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")):
        return None
    missing = [k for k in TORCHRUN_VARS if not os.environ.get(k)]
    if missing:
        raise TrainError(f"distributed launch without {', '.join(missing)} in the environment; start several "
                         f"processes with `torchrun --nproc_per_node N train.py ...`, which sets {', '.join(TORCHRUN_VARS)}")
    try:
        rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    except ValueError:
        raise TrainError("RANK, WORLD_SIZE and LOCAL_RANK must be integers; launch with torchrun") from None
    if world < 1 or not 0 <= rank < world or local < 0 or local > rank:
        raise TrainError(f"inconsistent launch: RANK={rank} WORLD_SIZE={world} LOCAL_RANK={local}; "
                         f"launch every process with the same torchrun command (--nnodes, --nproc_per_node)")
    local_world = os.environ.get("LOCAL_WORLD_SIZE")
    if local_world is not None and local_world.isdigit() and not local < int(local_world) <= world:
        raise TrainError(f"inconsistent launch: LOCAL_RANK={local} LOCAL_WORLD_SIZE={local_world} "
                         f"WORLD_SIZE={world}; launch every process with the same torchrun command")
    return {"rank": rank, "world_size": world, "local_rank": local}


def distributed_device(name: str, local_rank: int) -> torch.device:
    """One device per rank: cuda:LOCAL_RANK when CUDA is used, else the CPU."""
    device = resolve_device(name)
    if device.type != "cuda":
        return device
    if name not in ("auto", "cuda"):
        raise TrainError(f"--device {name} under torchrun: every rank uses cuda:LOCAL_RANK; pass --device cuda "
                         f"(or auto) and pick GPUs with CUDA_VISIBLE_DEVICES")
    n = torch.cuda.device_count()
    if local_rank >= n:
        raise TrainError(f"LOCAL_RANK {local_rank} but only {n} CUDA device(s) visible on this machine; "
                         f"use torchrun --nproc_per_node {n} (or fewer)")
    return torch.device("cuda", local_rank)


def restart_safe_store(env: dict, timeout: datetime.timedelta) -> dict:
    """init_process_group's store arguments. Under torchrun the agent's store outlives a restart, and the
    ranks' addresses from the attempt before are still in it: a rank that arrives first in the restarted
    group read its late peer's old address and failed with "Connection refused" (seen with --max-restarts).
    Each attempt therefore gets its own key prefix. Outside torchrun: {}, i.e. the usual env:// set-up."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return {}
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    agent_store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), env["world_size"],
                                is_master=False, timeout=timeout)
    return {"store": dist.PrefixStore(f"ghostcars/attempt_{attempt}", agent_store),
            "rank": env["rank"], "world_size": env["world_size"]}


def init_distributed(env: dict, device: torch.device, timeout_s: float) -> str:
    """nccl on CUDA, gloo on the CPU. Returns the backend's name. timeout_s bounds the set-up and every
    collective: a rank that waits longer for a dead peer fails, so torchrun can restart the group."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(seconds=timeout_s)
    try:
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None, timeout=timeout,
                                **restart_safe_store(env, timeout))
    except (RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TrainError(f"torch.distributed ({backend}) did not start: {first}; check MASTER_ADDR/MASTER_PORT "
                         f"and that every process was launched with the same WORLD_SIZE") from None
    if dist.get_world_size() != env["world_size"]:
        raise TrainError(f"WORLD_SIZE={env['world_size']} but the process group has {dist.get_world_size()} "
                         f"ranks; launch every process with the same torchrun command")
    return backend


def state_hash(state: dict) -> str:
    """sha256 of every tensor of a state_dict (keys sorted): equal hashes = bit-identical weights and buffers."""
    import hashlib
    h = hashlib.sha256()
    for k, v in sorted(state.items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------
# training: the spine (train) and its steps, in the order they run

@dataclass
class Setup:
    """Where and how the steps run: one process or torchrun's several, the device, the precision."""
    rank: int
    world: int
    local_rank: int
    ddp: bool
    device: torch.device
    backend: str | None
    ghost_op: str  # the GhostModules' implementation (torch under --sync-bn with several processes)
    amp_dtype: torch.dtype | None  # None: no autocast
    scaler: torch.amp.GradScaler | None

    @property
    def is_main(self) -> bool:  # only rank 0 writes the run folder, logs and progress bars
        return self.rank == 0

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype else nullcontext()


@dataclass
class Data:
    """The decoded splits, their loaders and the batch transform (augmentation, normalisation)."""
    spec: data.DatasetSpec
    prep: data.Preprocess
    augment: dict | None
    erase: dict | None
    train: data.Decoded
    val: data.Decoded
    train_loader: data.BatchLoader
    val_loader: data.BatchLoader
    transform: BatchTransform


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


@dataclass
class Progress:
    """Where the run is, and what early stopping and best.pt remember: what last.pt restores."""
    epoch: int = 0  # completed epochs
    step: int = 0  # optimizer steps in all
    best: dict = field(default_factory=lambda: {"val_acc": -1.0, "epoch": 0, "min_val_loss": math.inf,
                                                "min_val_loss_epoch": 0})
    bad_epochs: int = 0
    partial: dict | None = None  # a stop inside an epoch: that epoch's position, generator and sums so far


@dataclass
class EpochStats:
    lr: float  # the learning rate at the epoch's first step
    loss_sum: float
    correct: torch.Tensor  # on the device: counting it needs no sync per step
    seen: int
    seconds: float
    aug_gen: torch.Generator
    stop_why: str | None = None  # --max-steps reached or a stop signal received in this epoch
    stopped_inside: int = 0  # ... before its last step: the steps done (the epoch is not complete)


def train(args: argparse.Namespace, explicit: set[str]) -> int:
    args, resume_ckpt = resume_options(args, explicit)
    check_options(args)
    env = set_up(args)
    d = load_data(args, env)
    learner = build_learner(args, env, d)
    prog = restore(resume_ckpt, args, env, learner) if resume_ckpt is not None else Progress()
    run_dir, rows, config = open_run_folder(args, env, d, learner, prog, resumed=resume_ckpt is not None)

    def checkpoint() -> dict:
        return make_checkpoint(args, env, d, learner, prog, config)

    stop_reason, stopped_inside = None, 0
    # what last.pt holds beyond its completed epochs, for the message of a Ctrl-C
    held_partial = (prog.partial["epoch"], prog.partial["batches"]) if prog.partial else None
    signals = StopSignals(install=not env.ddp)
    try:
        for epoch in range(prog.epoch + 1, args.epochs + 1):
            stats = train_epoch(args, env, d, learner, prog, epoch, signals)
            stop_reason = stats.stop_why
            if stats.stopped_inside:
                stopped_inside = stats.stopped_inside
                if not env.ddp:  # torchrun's last.pt stays at the last completed epoch (no per-rank RNG state)
                    save_partial(checkpoint(), stats, epoch, run_dir)
                break
            if env.ddp:
                sync_ranks(env, learner, stats)
            val = validate(env, d, learner, args.channels_last)
            stop_reason = end_epoch(args, learner, prog, epoch, val) or stop_reason
            if env.is_main:
                save_epoch(checkpoint(), learner, run_dir, val["is_best"])
            held_partial = None
            rows.append(metrics_row(epoch, stats, val))
            report_epoch(rows, run_dir, args.epochs, env.is_main, val["is_best"])
            if signals.received and not stop_reason:  # arrived during validation or saving
                stop_reason = f"{signals.received.name} received"
            if stop_reason:
                break
    except KeyboardInterrupt:
        return interrupted(rows, held_partial, run_dir, env.is_main)
    except (WriteError, NonFiniteLoss) as e:
        return failed(e, rows, run_dir)
    finally:
        signals.restore()
    return finish(args, env, d, learner, prog, run_dir, checkpoint, stop_reason, stopped_inside, signals.received)


def resume_options(args: argparse.Namespace, explicit: set[str]) -> tuple[argparse.Namespace, dict | None]:
    """--resume: the run's own saved options, but for the few that may change (given explicitly).
    --resume-if-exists: the same for <out>/<name> when it holds last.pt, else a new run of that name: the one
    command a restarted job (torchrun --max-restarts, a requeued cluster job) can repeat as it is."""
    if args.resume_if_exists and not args.resume:
        if not args.name:
            raise TrainError("--resume-if-exists needs --name (the run folder to continue when it exists)")
        if (Path(args.out) / args.name / "last.pt").exists():
            args.resume = str(Path(args.out) / args.name)
    if not args.resume:
        return args, None
    last = Path(args.resume) / "last.pt"
    if not last.exists():
        raise TrainError(f"{last} not found; --resume takes a run folder holding last.pt "
                         f"(written after each completed epoch)")
    try:
        ckpt = load_checkpoint(last)
    except CheckpointError as e:
        best = last.with_name("best.pt")
        try:
            load_checkpoint(best)
        except CheckpointError:
            raise e from None
        raise TrainError(f"{e}. {best} is intact: start a new run from its weights with --init-from {best} "
                         f"(the optimizer state and position are in last.pt only)") from None
    saved = dict(ckpt["config"])
    for k in RESUME_OVERRIDABLE:
        if k in explicit:
            saved[k] = getattr(args, k)
    for k in NOT_INHERITED:
        saved[k] = getattr(args, k)
    saved["resume"] = args.resume
    return argparse.Namespace(**{**vars(args), **saved}), ckpt


def set_up(args: argparse.Namespace) -> Setup:
    """Processes (torchrun or one), device, threads, determinism, seeds and precision."""
    denv = distributed_env()
    ddp = denv is not None
    rank, world, local_rank = (denv["rank"], denv["world_size"], denv["local_rank"]) if ddp else (0, 1, 0)
    device = distributed_device(args.device, local_rank) if ddp else resolve_device(args.device)
    if args.sync_bn and ddp and device.type != "cuda":
        raise TrainError("--sync-bn needs CUDA (SyncBatchNorm has no CPU kernel); drop --sync-bn for CPU (gloo) runs")
    backend = init_distributed(denv, device, args.dist_timeout) if ddp else None
    if ddp and rank != 0:
        sys.stdout = open(os.devnull, "w")  # main() restores it; errors still reach stderr
        warnings.filterwarnings("ignore")  # one copy of each warning (rank 0's) is enough
    if args.sync_bn and not ddp:
        print("note: --sync-bn only matters under torchrun (several processes); ignored", file=sys.stderr)
    ghost_op = args.ghost_op
    if args.sync_bn and ddp and args.arch.startswith("ghostnet"):
        # the fused op normalises the cheap branch with this rank's statistics only; the plain path runs the
        # GhostModules' BNs as (Sync)BatchNorm modules (model.convert_sync_batchnorm), so every BN is synchronised
        if ghost_op != "torch" and rank == 0:
            print(f"warning: --sync-bn: the fused ghost_ext op uses per-rank BatchNorm statistics, so the "
                  f"GhostModules run the plain PyTorch path (--ghost-op torch instead of {ghost_op}) with "
                  f"SyncBatchNorm", file=sys.stderr)
        ghost_op = "torch"

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.ghost_op == "ext" and args.arch.startswith("ghostnet"):
        import ghost_ext
        has_kernel = getattr(ghost_ext, "has_kernel", lambda d: ghost_ext.has_extension())
        if not has_kernel(device):
            raise TrainError(f"--ghost-op ext, but the ghost_ext extension has no {device.type} kernels here; build "
                             f"it with `pip install --no-build-isolation -e .` or use --ghost-op auto")
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick its fastest kernels
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    use_amp = args.amp if args.amp is not None else device.type == "cuda"
    amp_dtype = args.amp_dtype
    if amp_dtype == "auto":
        amp_dtype = "bfloat16" if device.type == "cpu" or torch.cuda.is_bf16_supported() else "float16"
    amp_dtype = getattr(torch, amp_dtype) if use_amp else None
    # float16 has too little range for gradients: scale the loss (bfloat16 has float32's range, no need)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    return Setup(rank, world, local_rank, ddp, device, backend, ghost_op, amp_dtype, scaler)


def load_data(args: argparse.Namespace, env: Setup) -> Data:
    """Decode each split once into uint8 tensors (cached); batches are augmented on the training device.
    Under torchrun each machine's local rank 0 makes the demo data and builds the decoded cache while the
    other ranks wait at the barrier; they then find everything in place and just open the cache."""
    augment, erase = augment_from_args(args)  # unknown augmentation names fail here, before decoding
    prep = data.preprocess_from_args(args)
    if env.ddp and env.local_rank != 0:
        dist.barrier()
    if args.demo and not args.resume:
        demo_root = Path(args.out) / "demo_data"
        if env.local_rank == 0:
            print(f"demo: making SYNTHETIC data (car-like drawings, not photos) in {demo_root}")
            args.data = str(data.make_demo_dataset(demo_root, seed=args.seed, **DEMO_DATA))
        else:
            args.data = str(demo_root)
    try:
        spec = data.find_dataset(args.data)
    except data.DataError as e:  # say where Stanford Cars goes, and that the demo needs no download
        raise TrainError(f"{e}. Put Stanford Cars there (README: 'Getting Stanford Cars'), "
                         f"or try: python train.py --demo") from None
    splits = data.make_splits(spec, val_split=args.val_split, seed=data.holdout_seed(vars(args)))
    train_records = subset(splits["train"], args.limit_train, args.seed)
    val_records = subset(splits["val"], args.limit_val, args.seed + 1)
    val_name = "val (held out of train)" if args.val_split else "val (= the official test split)"
    if spec.note:
        print(f"data: {spec.note}")
    print(f"data: {spec.root} ({spec.layout}), {len(spec.class_names)} classes, "
          f"{len(train_records)} train, {len(val_records)} {val_name}")
    train_data = data.decode_cached(train_records, prep.for_training(), cache_dir=args.cache_dir, workers=args.workers,
                                    desc="train")
    val_data = data.decode_cached(val_records, prep, cache_dir=args.cache_dir, workers=args.workers, desc="val")
    if env.ddp and env.local_rank == 0:
        dist.barrier()
    if len(train_data.labels) == 0 or len(val_data.labels) == 0:
        raise TrainError(f"{args.data}: no readable training or validation images; check the dataset folder")
    drop_last = len(train_data.labels) > args.batch_size  # a last batch of 1 would break BatchNorm
    if env.ddp:
        # every rank must make the same number of steps (each step all-reduces gradients): always drop the tail
        drop_last = True
        if len(train_data.labels) // env.world < args.batch_size:
            raise TrainError(f"{len(train_data.labels)} training images give each of the {env.world} ranks fewer "
                             f"than --batch-size {args.batch_size} (a per-rank batch); lower --batch-size")
    # under torchrun each rank reads its own shard: the same (seed, epoch) permutation, positions rank::world;
    # validation is sharded without padding, and its sums are all-reduced, so each image counts once
    shard = dict(device=env.device, seed=args.seed, rank=env.rank, world_size=env.world)
    train_loader = data.BatchLoader(train_data, args.batch_size, shuffle=True, drop_last=drop_last, **shard)
    val_loader = data.BatchLoader(val_data, args.batch_size, shuffle=False, drop_last=False, **shard)
    return Data(spec, prep, augment, erase, train_data, val_data, train_loader, val_loader,
                BatchTransform(prep, augment, erase))


def build_learner(args: argparse.Namespace, env: Setup, d: Data) -> Learner:
    """The model (with --zero-init-residual / --init-from), optimizer, schedule, EMA and loss."""
    model_options = dict(out_channels=args.out_channels, dropout=args.dropout, in_channels=d.prep.channels,
                         width=args.width)
    try:
        model = build_model(args.arch, len(d.spec.class_names), ghost_op=env.ghost_op, **model_options)
    except ValueError as e:  # e.g. an out-channels or width that the architecture can't take
        raise TrainError(f"{e}; fix the model options (see python train.py --help)") from None
    if args.zero_init_residual and zero_init_residual(model) == 0:
        raise TrainError(f"--zero-init-residual needs a GhostNet (--arch ghostnet or ghostnet_official), "
                         f"not {args.arch}")
    if args.init_from and not args.resume:
        print(init_from(model, args.init_from))
    model.to(env.device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    if args.sync_bn and env.ddp:
        model = convert_sync_batchnorm(model)
    # the learning rate is the one given, whatever the world size, unless --scale-lr (linear scaling rule)
    base_lr = args.lr * env.world if args.scale_lr else args.lr
    groups = param_groups(model, args.wd, args.wd_norm_bias)
    if args.optimizer == "adamw":
        optimizer = torch.optim.AdamW(groups, lr=base_lr)
    elif args.optimizer == "adam":
        optimizer = torch.optim.Adam(groups, lr=base_lr)
    else:
        optimizer = torch.optim.SGD(groups, lr=base_lr, momentum=args.momentum)
    scheduler, per_step = make_scheduler(args, optimizer, len(d.train_loader))
    ema = make_ema(model, args.ema) if args.ema else None
    train_model = model
    if env.ddp:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    if args.compile:
        train_model = torch.compile(train_model)
    return Learner(model, train_model, model_options, optimizer, scheduler, per_step, ema,
                   nn.CrossEntropyLoss(label_smoothing=args.label_smoothing), base_lr)


def restore(ckpt: dict, args: argparse.Namespace, env: Setup, learner: Learner) -> Progress:
    """Load last.pt's weights, optimizer, schedule, scaler, EMA and RNG; return where the run was."""
    run_dir = Path(args.resume)
    partial = ckpt.get("partial")
    if partial is not None and env.ddp:
        raise TrainError(f"{run_dir / 'last.pt'} ends inside epoch {partial['epoch']} (a --max-steps stop of a "
                         f"one-process run); resume it without torchrun until that epoch completes")
    learner.model.load_state_dict(ckpt["model"])
    learner.optimizer.load_state_dict(ckpt["optimizer"])
    if learner.scheduler is not None and ckpt.get("scheduler") is not None:
        learner.scheduler.load_state_dict(ckpt["scheduler"])
    if env.scaler is not None and ckpt.get("scaler") is not None:
        env.scaler.load_state_dict(ckpt["scaler"])
    if learner.ema is not None:
        if ckpt.get("ema") is None:
            raise TrainError(f"{run_dir / 'last.pt'} holds no --ema state; resume it without --ema")
        learner.ema.load_state_dict(ckpt["ema"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    if ckpt["rng"].get("cuda") is not None and env.device.type == "cuda" and not env.ddp:
        torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
    saved_world = int(ckpt.get("world_size", 1))
    if args.scale_lr and saved_world != env.world:
        # --scale-lr: the saved learning rates belong to the old world size; rescale them to this one
        ratio = env.world / saved_world
        for g in learner.optimizer.param_groups:
            g["lr"] *= ratio
            if "initial_lr" in g:
                g["initial_lr"] *= ratio
        if hasattr(learner.scheduler, "base_lrs"):
            learner.scheduler.base_lrs = [x * ratio for x in learner.scheduler.base_lrs]
            learner.scheduler._last_lr = [g["lr"] for g in learner.optimizer.param_groups]
        print(f"--scale-lr: world size {saved_world} -> {env.world}, learning rates x{ratio:g}")
    prog = Progress(epoch=ckpt["epoch"], step=ckpt.get("step", 0), best=dict(ckpt["best"]),
                    bad_epochs=ckpt["early_stop"]["bad_epochs"], partial=partial)
    print(f"resuming {run_dir} after epoch {prog.epoch}"
          + (f" and {partial['batches']} steps of epoch {partial['epoch']}" if partial else "")
          + (f" with {env.world} ranks (was {saved_world})" if saved_world != env.world else ""))
    if prog.epoch >= args.epochs:
        print(f"note: the run already has {prog.epoch} epochs (--epochs {args.epochs}); pass a larger "
              f"--epochs to train on")
    return prog


def open_run_folder(args: argparse.Namespace, env: Setup, d: Data, learner: Learner, prog: Progress,
                    resumed: bool) -> tuple[Path, list[dict], dict]:
    """(run folder, metrics rows so far, config): a new folder, or the resumed one; config.json written."""
    if resumed:
        run_dir = Path(args.resume)
    else:
        name = args.name or f"{datetime.datetime.now():%Y%m%d-%H%M%S}-{'demo' if args.demo else args.arch}"
        if env.ddp:  # one name for all ranks: rank 0's clock
            obj = [name]
            dist.broadcast_object_list(obj, src=0)
            name = obj[0]
        run_dir = Path(args.out) / name
        if (run_dir / "last.pt").exists():
            raise TrainError(f"{run_dir} already holds a run; continue it with --resume {run_dir} "
                             f"or pick another --name")
        if env.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
    # metrics.csv may hold a row for an epoch whose last.pt never landed (killed in between): drop it
    rows = [r for r in read_metrics(run_dir / "metrics.csv") if r["epoch"] <= prog.epoch]
    config = {k: jsonable(v) for k, v in vars(args).items()}
    config["data"] = str(Path(args.data).resolve())  # so --resume works from any working directory
    n_params = count_params(learner.model)
    dev = {"type": env.device.type, "name": device_name(env.device), "threads": torch.get_num_threads()}
    amp = str(env.amp_dtype).removeprefix("torch.")
    run_info = {
        "options": config, "command": shlex.join([sys.executable, *sys.argv]),
        "run_dir": str(run_dir), "num_classes": len(d.spec.class_names), "class_names": d.spec.class_names,
        "dataset": {"root": str(d.spec.root), "layout": d.spec.layout, "train": len(d.train.labels),
                    "val": len(d.val.labels), "skipped": len(d.train.skipped) + len(d.val.skipped)},
        "preprocess": d.prep.to_dict(), "augment": jsonable(d.augment), "erase": jsonable(d.erase),
        "model_options": learner.model_options, "num_params": n_params,
        "amp": {"enabled": env.amp_dtype is not None, "dtype": amp, "grad_scaler": env.scaler is not None},
        "device": dev,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "torchvision": _version("torchvision"), "numpy": _version("numpy"),
                     "ghost_ext_compiled": _ghost_ext_compiled()},
        "git_commit": git_commit(), "platform": platform.platform(),
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "resumed_after_epoch": prog.epoch if resumed else None,
        # --batch-size is per rank: the optimizer step sees batch_size x world_size images
        "distributed": {"world_size": env.world, "backend": env.backend, "per_rank_batch": args.batch_size,
                        "global_batch": args.batch_size * env.world, "lr": learner.base_lr,
                        "scale_lr": bool(args.scale_lr), "sync_bn": bool(args.sync_bn and env.ddp),
                        "ghost_op": env.ghost_op},
    }
    if env.is_main:
        atomic_write_text(json.dumps(run_info, indent=2) + "\n", run_dir / "config.json")
    print(f"run: {run_dir}  arch {args.arch} ({n_params / 1e6:.2f} M params)  device {env.device} "
          f"({dev['name']})  amp {amp if env.amp_dtype else 'off'}  img {data.size_text(args.img_size)}  batch {args.batch_size}"
          + (f" per rank x {env.world} ranks ({env.backend}) = {args.batch_size * env.world}" if env.ddp else ""))
    return run_dir, rows, config


def make_checkpoint(args: argparse.Namespace, env: Setup, d: Data, learner: Learner, prog: Progress,
                    config: dict) -> dict:
    """last.pt: the model and everything an exact resume needs, after prog.epoch completed epochs."""
    return {
        "format": CHECKPOINT_FORMAT, "arch": args.arch, "num_classes": len(d.spec.class_names),
        "class_names": list(d.spec.class_names), "model_options": learner.model_options,
        "preprocess": d.prep.to_dict(), "model": learner.model.state_dict(), "epoch": prog.epoch, "step": prog.step,
        "best": dict(prog.best), "config": config,
        "optimizer": learner.optimizer.state_dict(),
        "scheduler": learner.scheduler.state_dict() if learner.scheduler is not None else None,
        "scaler": env.scaler.state_dict() if env.scaler is not None else None,
        "ema": learner.ema.state_dict() if learner.ema is not None else None,
        "rng": {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if env.device.type == "cuda" else None},
        "early_stop": {"bad_epochs": prog.bad_epochs},
        "world_size": env.world,
    }


def model_file(ckpt: dict, learner: Learner) -> dict:
    """best.pt / final.pt: what inference needs (a third of last.pt), the averaged weights with --ema."""
    out = {k: v for k, v in ckpt.items() if k not in ("optimizer", "scheduler", "scaler", "rng", "early_stop", "ema")}
    if learner.ema is not None:
        out["model"] = learner.ema.module.state_dict()
    return out


def to_input(d: Data, images: torch.Tensor, train: bool, generator: torch.Generator | None,
             channels_last: bool) -> torch.Tensor:
    x = d.transform(images, train=train, generator=generator)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def train_epoch(args: argparse.Namespace, env: Setup, d: Data, learner: Learner, prog: Progress,
                epoch: int, signals: StopSignals) -> EpochStats:
    """One pass over the training shard (from a saved step on, when resuming inside this epoch); it ends
    early, after a complete step, at --max-steps or on a stop signal."""
    t0 = time.perf_counter()
    learner.train_model.train()
    part, prog.partial = (prog.partial if prog.partial and prog.partial["epoch"] == epoch else None), None
    resume_at = part["batches"] if part else 0
    d.train_loader.set_epoch(epoch, start_batch=resume_at)  # the same batch order from the saved step on
    # augmentation randomness from (seed, epoch) alone, so a resumed epoch sees the same images; under torchrun
    # also from the rank (other images, other draws) and the same for dropout, so a resume with any world
    # size is reproducible without per-rank RNG state in the checkpoint
    seed = args.seed * 1_000_003 + epoch + 7_919 * env.rank
    aug_gen = torch.Generator().manual_seed(seed)
    if env.ddp:
        torch.manual_seed(seed)
    s = EpochStats(learner.optimizer.param_groups[0]["lr"], 0.0,
                   torch.zeros((), dtype=torch.long, device=env.device), 0, 0.0, aug_gen)
    if part:  # the partial epoch's generator and running sums, as the stop left them
        aug_gen.set_state(part["aug_gen"])
        s.loss_sum, s.seen, s.seconds = part["loss_sum"], part["seen"], part["seconds"]
        s.correct += part["correct"]
    # The step never waits on the device: the loss is summed there, and a non-finite loss is remembered there
    # (its step and value) and looked at only at the log points, every LOG_EVERY steps, as nanoGPT does.
    # Reading loss.item() each step would sync the host with an accelerator once per step.
    loss_sum = torch.tensor(s.loss_sum, dtype=torch.float64, device=env.device)
    bad_step = torch.full((), -1, dtype=torch.long, device=env.device)  # the epoch's first non-finite step
    bad_loss = torch.zeros((), device=env.device)
    prior_seconds = s.seconds
    n_steps = len(d.train_loader)
    bar = tqdm(d.train_loader, desc=f"epoch {epoch}/{args.epochs}", leave=False, dynamic_ncols=True,
               disable=not env.is_main, initial=resume_at)
    for i, (images, labels) in enumerate(bar, resume_at + 1):
        x = to_input(d, images, True, aug_gen, args.channels_last)
        with env.autocast():
            logits = learner.train_model(x)
            loss = learner.criterion(logits.float(), labels)
        prog.step += 1
        first_bad = (bad_step < 0) & ~torch.isfinite(loss.detach())
        bad_step = torch.where(first_bad, i, bad_step)
        bad_loss = torch.where(first_bad, loss.detach(), bad_loss)
        optimizer_step(loss, learner, env.scaler)
        n = labels.shape[0]
        loss_sum += loss.detach().double() * n
        s.correct += (logits.argmax(1) == labels).sum()
        s.seen += n
        stop_why = (f"--max-steps {args.max_steps} reached" if args.max_steps is not None and
                    prog.step >= args.max_steps else f"{signals.received.name} received" if signals.received else None)
        if i % LOG_EVERY == 0 or i == n_steps or stop_why:
            b = int(bad_step.item())
            if b >= 0:  # the steps since went on with the bad values, but last.pt on disk predates them all
                raise NonFiniteLoss(f"loss became {bad_loss.item()} at epoch {epoch}, step {b} "
                                    f"(global step {prog.step - (i - b)})")
            bar.set_postfix(loss=f"{loss_sum.item() / s.seen:.3f}", acc=f"{100 * s.correct.item() / s.seen:.1f}%",
                            img_s=f"{s.seen / (time.perf_counter() - t0 + prior_seconds):.0f}")
        if stop_why:
            s.stop_why, s.stopped_inside = stop_why, (i if i < n_steps else 0)
            break
    s.loss_sum = loss_sum.item()
    bar.close()
    s.seconds = time.perf_counter() - t0 + prior_seconds
    return s


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


def save_partial(ckpt: dict, s: EpochStats, epoch: int, run_dir: Path) -> None:
    """A stop inside an epoch: no validation, schedule or best.pt for a partial epoch (a run that goes on
    never had them there). last.pt keeps the completed epochs' record plus this epoch's progress, so
    --resume continues from this very step."""
    ckpt["partial"] = {"epoch": epoch, "batches": s.stopped_inside, "aug_gen": s.aug_gen.get_state(),
                       "loss_sum": s.loss_sum, "correct": int(s.correct.item()), "seen": s.seen,
                       "seconds": s.seconds}
    atomic_save(ckpt, run_dir / "last.pt")


def sync_ranks(env: Setup, learner: Learner, s: EpochStats) -> None:
    """Under torchrun: the logged training numbers cover every rank's images; BN running statistics
    (buffers) become rank 0's everywhere, so all ranks validate (and rank 0 saves) the very same model."""
    t = torch.tensor([s.loss_sum, s.correct.item(), s.seen], dtype=torch.float64, device=env.device)
    dist.all_reduce(t)
    s.loss_sum, s.correct, s.seen = t[0].item(), t[1].long(), int(t[2].item())
    ema_buffers = list(learner.ema.module.buffers()) if learner.ema is not None else []
    for b in [*learner.model.buffers(), *ema_buffers]:
        dist.broadcast(b, 0)


def validate(env: Setup, d: Data, learner: Learner, channels_last: bool) -> dict:
    """The same loss as training (as the reference), top-1 and top-5, of the model used for inference."""
    net = learner.eval_model()
    net.eval()
    loss, top1, top5, seen = 0.0, 0, 0, 0
    k = min(5, len(d.spec.class_names))
    with torch.no_grad(), env.autocast():
        for images, labels in d.val_loader:
            logits = net(to_input(d, images, False, None, channels_last)).float()
            loss += learner.criterion(logits, labels).item() * labels.shape[0]
            topk = logits.topk(k, 1).indices
            top1 += (topk[:, 0] == labels).sum().item()
            top5 += (topk == labels[:, None]).any(1).sum().item()
            seen += labels.shape[0]
    seen_rank = seen
    if env.ddp:  # each rank validated its own unpadded shard: sum, so each image counts exactly once
        t = torch.tensor([loss, top1, top5, seen], dtype=torch.float64, device=env.device)
        dist.all_reduce(t)
        loss, top1, top5, seen = t[0].item(), int(t[1].item()), int(t[2].item()), int(t[3].item())
    return {"val_loss": loss / seen, "val_acc": top1 / seen, "val_top5": top5 / seen, "seen": seen,
            "seen_rank": seen_rank, "is_best": False}


def end_epoch(args: argparse.Namespace, learner: Learner, prog: Progress, epoch: int, val: dict) -> str | None:
    """A per-epoch schedule's step, the best-so-far record, early stopping; returns why to stop, if so."""
    if not math.isfinite(val["val_loss"]):
        raise NonFiniteLoss(f"validation loss became {val['val_loss']} after epoch {epoch} (global step {prog.step})")
    if isinstance(learner.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        learner.scheduler.step(val["val_loss"])
    elif learner.scheduler is not None and not learner.per_step:
        learner.scheduler.step()
    best = prog.best
    val["is_best"] = val["val_acc"] > best["val_acc"]
    if val["is_best"]:
        best["val_acc"], best["epoch"] = val["val_acc"], epoch
    lower_loss = val["val_loss"] < best["min_val_loss"]
    if lower_loss:
        best["min_val_loss"], best["min_val_loss_epoch"] = val["val_loss"], epoch
    progress = lower_loss if args.early_stop_on == "val_loss" else val["is_best"]
    prog.bad_epochs = 0 if progress else prog.bad_epochs + 1
    prog.epoch = epoch
    if not (args.patience and prog.bad_epochs >= args.patience):
        return None
    if args.early_stop_on == "val_loss":
        return (f"early stopping: no lower val loss for {args.patience} epochs "
                f"(min {best['min_val_loss']:.4f} at epoch {best['min_val_loss_epoch']})")
    return (f"early stopping: no higher val accuracy for {args.patience} epochs "
            f"(best {100 * best['val_acc']:.2f}% at epoch {best['epoch']})")


def save_epoch(ckpt: dict, learner: Learner, run_dir: Path, is_best: bool) -> None:
    """best.pt before last.pt: a kill between the two then replays this epoch on --resume and writes best.pt
    again; the other order would leave a best.pt older than last.pt's record."""
    if is_best:
        atomic_save(model_file(ckpt, learner), run_dir / "best.pt")
    atomic_save(ckpt, run_dir / "last.pt")


def metrics_row(epoch: int, s: EpochStats, val: dict) -> dict:
    return dict(epoch=epoch, lr=s.lr, train_loss=s.loss_sum / max(s.seen, 1), train_acc=s.correct.item() / max(s.seen, 1),
                val_loss=val["val_loss"], val_acc=val["val_acc"], val_top5=val["val_top5"], seconds=s.seconds,
                img_per_s=s.seen / s.seconds)


def report_epoch(rows: list[dict], run_dir: Path, epochs: int, is_main: bool, is_best: bool) -> None:
    """metrics.csv, curves.png (rank 0) and the epoch's line."""
    if is_main:
        write_metrics(rows, run_dir / "metrics.csv")
        plot_curves(rows, run_dir / "curves.png")
    r = rows[-1]
    print(f"epoch {r['epoch']:3d}/{epochs}  lr {r['lr']:.2e}  train loss {r['train_loss']:.4f} "
          f"acc {100 * r['train_acc']:5.1f}%  val loss {r['val_loss']:.4f} acc {100 * r['val_acc']:5.1f}% "
          f"top5 {100 * r['val_top5']:5.1f}%  {r['seconds']:5.1f}s {r['img_per_s']:6.0f} img/s"
          f"{'  *best' if is_best else ''}", flush=True)


def failed(e: Exception, rows: list[dict], run_dir: Path) -> int:
    """A write that failed (full disk, read-only folder: exit 2) or a loss that diverged (exit 1): one line
    saying what the run folder still holds, which stays loadable."""
    if isinstance(e, WriteError):
        kept = (f"continue with: python train.py --resume {run_dir}" if (run_dir / "last.pt").exists()
                else "no checkpoint was written yet")
        print(f"error: {e}; {kept}", file=sys.stderr)
        return 2
    done = rows[-1]["epoch"] if rows else 0
    kept = (f"{run_dir / 'last.pt'} (epoch {done}) and best.pt are kept" if done
            else "no epoch had completed, so there is no checkpoint")
    print(f"error: {e}; stopped, {kept}; try a lower --lr (or --no-amp)", file=sys.stderr)
    return 1


def interrupted(rows: list[dict], held_partial: tuple[int, int] | None, run_dir: Path, is_main: bool) -> int:
    """Ctrl-C: say what last.pt holds and how to go on."""
    done = rows[-1]["epoch"] if rows else 0
    if not is_main:
        pass
    elif held_partial:
        print(f"\ninterrupted in epoch {held_partial[0]}: {run_dir / 'last.pt'} holds epoch {done} and "
              f"{held_partial[1]} steps of epoch {held_partial[0]}, where the run was resumed (the steps since "
              f"are discarded).\nresume with: python train.py --resume {run_dir}", file=sys.stderr)
    elif done:
        print(f"\ninterrupted in epoch {done + 1}: {run_dir / 'last.pt'} holds epoch {done}, the last completed "
              f"one (the partial epoch is discarded).\nresume with: python train.py --resume {run_dir}",
              file=sys.stderr)
    else:
        print("\ninterrupted before the first epoch completed; nothing to resume", file=sys.stderr)
    return 130


def finish(args: argparse.Namespace, env: Setup, d: Data, learner: Learner, prog: Progress, run_dir: Path,
           checkpoint: Callable[[], dict], stop_reason: str | None, stopped_inside: int,
           stop_signal: signal.Signals | None) -> int:
    """final.pt (a completed run's model, with no checkpoint chosen on validation images) and the summary;
    after a stop signal, what last.pt holds and the resume command (exit 128 + the signal)."""
    if stop_reason:
        print(stop_reason)
    if stop_signal is not None:
        held = (f"epoch {prog.epoch} and {stopped_inside} steps of epoch {prog.epoch + 1}" if stopped_inside
                else f"epoch {prog.epoch}")
        print(f"{stop_signal.name}: {run_dir / 'last.pt'} holds {held}; resume with: python train.py --resume "
              f"{run_dir}", file=sys.stderr, flush=True)
        return 128 + int(stop_signal)
    if stopped_inside:
        where = (f"{run_dir / 'last.pt'} holds that point" if not env.ddp else
                 f"under torchrun {run_dir / 'last.pt'} stays at epoch {prog.epoch}, the last completed one")
        print(f"stopped inside epoch {prog.epoch + 1} after {stopped_inside} of {len(d.train_loader)} steps; "
              f"{where}; continue with: python train.py --resume {run_dir}")
    best = prog.best
    if best["epoch"] == 0:
        print(f"no epoch completed, so there is no best.pt yet; files in {run_dir}")
        return 0
    if not stopped_inside and env.is_main:
        atomic_save(model_file(checkpoint(), learner), run_dir / "final.pt")
    print(f"done: best val acc {100 * best['val_acc']:.2f}% at epoch {best['epoch']}, min val loss "
          f"{best['min_val_loss']:.4f} at epoch {best['min_val_loss_epoch']}; files in {run_dir}")
    if args.demo:
        example = d.val.paths[0] if d.val.paths else "<an image>"
        print("next, try:\n"
              f"  python evaluate.py --checkpoint {run_dir / 'best.pt'} --data {args.data}\n"
              f"  python predict.py {example} --checkpoint {run_dir / 'best.pt'}")
    return 0


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except ImportError:
        return None


def _ghost_ext_compiled() -> bool | None:
    try:
        import ghost_ext
        return bool(ghost_ext.has_extension())
    except ImportError:
        return None


def main(argv: list[str] | None = None) -> int:
    args, explicit = parse_args(argv)
    stdout = sys.stdout  # train() silences ranks other than 0 under torchrun
    try:
        return train(args, explicit)
    except (TrainError, data.DataError, CheckpointError, WriteError) as e:
        rank = os.environ.get("RANK")
        print(f"error: {'[rank ' + rank + '] ' if rank not in (None, '0') else ''}{e}", file=sys.stderr)
        return 2
    finally:
        if sys.stdout is not stdout:
            sys.stdout.close()
            sys.stdout = stdout
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
