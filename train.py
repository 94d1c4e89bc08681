"""Train a car-model classifier (GhostNet by default) on Stanford Cars, or on synthetic demo data.

    python train.py --demo                                   # synthetic data, about a minute on a CPU
    python train.py --data data                              # the study's best recipe (83.79 %), recipes/study.yaml
    python train.py --data data --recipe fast --epochs 40    # the best model a short budget makes, recipes/fast.yaml
    python train.py --config my.yaml --lr 3e-3               # a YAML recipe; flags given explicitly still win
    python train.py --config runs/<name>/config.json         # replay a run with the same options
    python train.py --resume runs/<name>                     # continue an interrupted run exactly
    python train.py --print-config                           # the resolved configuration, as YAML

Every option, its default and its help live in config.py. Everything of a run lands in one folder,
runs/<name>/ (runs.py): config.json, metrics.csv, last.pt, best.pt, final.pt, curves.png and TensorBoard
event files (tracking.py). The loop is train() and train_epoch() below; what is not the loop lives in
learner.py (optimizer, schedule, EMA, precision), distributed.py (torchrun, device), loaders.py (the decoded
splits as device batches; data.py, images.py, batches.py, augment.py below it) and runs.py (the files).
Exit status: 0 done, 1 training diverged (non-finite loss), 2 a usage or data error, 130 Ctrl-C.
"""
from __future__ import annotations

import datetime
import math
import os
import shlex
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

import config as C
import data
import distributed
import images
import learner as L
import runs
from common import StopSignals, UsageError, WriteError, device_name
from distributed import Setup
from loaders import Data, load_data
from model import count_params
from runs import CheckpointError, RunFolder
from tracking import Tracker

TrainError = UsageError  # a problem with train.py's options: one line naming the fix, exit 2
LOG_EVERY = 5  # steps between looks at the loss (progress bar, non-finite check): the only host syncs of a step
# Options that may differ on --resume (given explicitly on the command line); everything else comes from
# the run's saved config so that the resumed run is the same run.
RESUME_OVERRIDABLE = ("epochs", "patience", "workers", "threads", "device", "compile", "cache_dir", "tensorboard")
NOT_INHERITED = ("max_steps",)  # the smoke-run step limit applies to one invocation only


class NonFiniteLoss(Exception):
    pass


class Hooks:
    """Two points where a caller can look at (or disturb) a run without patching train.py: tools and
    tests (tests/train_hooks.py) subclass this and pass it to main()."""

    def after_step(self, prog: Progress, learner: L.Learner) -> None:
        pass

    def after_epoch(self, env: Setup, d: Data, learner: L.Learner, prog: Progress, val: dict,
                    run: RunFolder) -> None:
        pass


@dataclass
class Progress:
    """Where the run is, and what early stopping and best.pt remember: what last.pt restores."""
    epoch: int = 0  # completed epochs
    step: int = 0  # optimizer steps in all
    best: dict = field(default_factory=lambda: {"val_acc": -1.0, "epoch": 0, "min_val_loss": float("inf"),
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


# ----------------------------------------------------------------------------------------------------
# the loop

def train(cfg: C.Config, explicit: set[str] = frozenset(), hooks: Hooks | None = None) -> int:
    hooks = hooks or Hooks()
    cfg, resume_ckpt = resume_config(cfg, explicit)
    C.check(cfg)
    env = distributed.set_up(cfg)
    d = load_data(cfg, env)
    learner = L.build(cfg, env, len(d.spec.class_names), d.prep.channels, len(d.train_loader))
    prog = restore(resume_ckpt, cfg, env, learner) if resume_ckpt is not None else Progress()
    run, rows = open_run_folder(cfg, env, d, learner, prog, resumed=resume_ckpt is not None)

    def checkpoint() -> dict:
        return make_checkpoint(cfg, env, d, learner, prog)

    with Tracker(run.path if cfg.run.tensorboard and env.is_main else None,
                 resume_step=prog.step if resume_ckpt is not None else None) as tracker:
        stop_reason, stopped_inside = None, 0
        # what last.pt holds beyond its completed epochs, for the message of a Ctrl-C
        held_partial = (prog.partial["epoch"], prog.partial["batches"]) if prog.partial else None
        signals = StopSignals(install=not env.ddp)
        try:
            for epoch in range(prog.epoch + 1, cfg.train.epochs + 1):
                stats = train_epoch(cfg, env, d, learner, prog, epoch, signals, tracker, hooks)
                stop_reason = stats.stop_why
                if stats.stopped_inside:
                    stopped_inside = stats.stopped_inside
                    if not env.ddp:  # torchrun's last.pt stays at the last completed epoch (no per-rank RNG state)
                        save_partial(checkpoint(), stats, epoch, run)
                    break
                if env.ddp:
                    sync_ranks(env, learner, stats)
                val = validate(env, d, learner, cfg.train.channels_last)
                stop_reason = end_epoch(cfg.train, learner, prog, epoch, val) or stop_reason
                hooks.after_epoch(env, d, learner, prog, val, run)
                if env.is_main:
                    save_epoch(checkpoint(), learner, run, val["is_best"])
                held_partial = None
                rows.append(metrics_row(epoch, stats, val))
                report_epoch(rows, run, cfg.train.epochs, env.is_main, val["is_best"])
                tracker.epoch(prog.step, rows[-1])
                if signals.received and not stop_reason:  # arrived during validation or saving
                    stop_reason = f"{signals.received.name} received"
                if stop_reason:
                    break
        except KeyboardInterrupt:
            return interrupted(rows, held_partial, run, env.is_main)
        except (WriteError, NonFiniteLoss) as e:
            return failed(e, rows, run)
        finally:
            signals.restore()
        code = finish(cfg, env, d, learner, prog, run, checkpoint, stop_reason, stopped_inside, signals.received)
        if code == 0 and rows and not stopped_inside:
            tracker.hparams(cfg.flat(), {k: rows[-1][k] for k in ("val_acc", "val_top5", "val_loss", "train_acc")},
                            prog.step)
        return code


def train_epoch(cfg: C.Config, env: Setup, d: Data, learner: L.Learner, prog: Progress, epoch: int,
                signals: StopSignals, tracker: Tracker, hooks: Hooks) -> EpochStats:
    """One pass over the training shard (from a saved step on, when resuming inside this epoch); it ends
    early, after a complete step, at --max-steps or on a stop signal."""
    t0 = time.perf_counter()
    learner.train_model.train()
    part, prog.partial = (prog.partial if prog.partial and prog.partial["epoch"] == epoch else None), None
    resume_at = part["batches"] if part else 0
    d.train_loader.set_epoch(epoch, start_batch=resume_at)  # the same batch order from the saved step on
    s = epoch_stats(cfg.run.seed, epoch, env, learner, part)
    # The step never waits on the device: the loss is summed there, and a non-finite loss is remembered there
    # (its step and value) and looked at only at the log points, every LOG_EVERY steps, as nanoGPT does.
    # Reading loss.item() each step would sync the host with an accelerator once per step.
    loss_sum = torch.tensor(s.loss_sum, dtype=torch.float64, device=env.device)
    bad_step = torch.full((), -1, dtype=torch.long, device=env.device)  # the epoch's first non-finite step
    bad_loss = torch.zeros((), device=env.device)
    prior_seconds, n_steps, max_steps = s.seconds, len(d.train_loader), cfg.run.max_steps
    bar = tqdm(d.train_loader, desc=f"epoch {epoch}/{cfg.train.epochs}", leave=False, dynamic_ncols=True,
               disable=not env.is_main, initial=resume_at)
    for i, (images_, labels) in enumerate(bar, resume_at + 1):
        x = to_input(d, images_, True, s.aug_gen, cfg.train.channels_last)
        with env.autocast():
            logits = learner.train_model(x)
            loss = learner.criterion(logits.float(), labels)
        prog.step += 1
        first_bad = (bad_step < 0) & ~torch.isfinite(loss.detach())
        bad_step = torch.where(first_bad, i, bad_step)
        bad_loss = torch.where(first_bad, loss.detach(), bad_loss)
        L.optimizer_step(loss, learner, env.scaler)
        hooks.after_step(prog, learner)
        n = labels.shape[0]
        loss_sum += loss.detach().double() * n
        s.correct += (logits.argmax(1) == labels).sum()
        s.seen += n
        stop_why = (f"--max-steps {max_steps} reached" if max_steps is not None and prog.step >= max_steps
                    else f"{signals.received.name} received" if signals.received else None)
        if i % LOG_EVERY == 0 or i == n_steps or stop_why:
            b = int(bad_step.item())
            if b >= 0:  # the steps since went on with the bad values, but last.pt on disk predates them all
                raise NonFiniteLoss(f"loss became {bad_loss.item()} at epoch {epoch}, step {b} "
                                    f"(global step {prog.step - (i - b)})")
            mean_loss = loss_sum.item() / s.seen
            bar.set_postfix(loss=f"{mean_loss:.3f}", acc=f"{100 * s.correct.item() / s.seen:.1f}%",
                            img_s=f"{s.seen / (time.perf_counter() - t0 + prior_seconds):.0f}")
            tracker.step(prog.step, mean_loss, learner.optimizer.param_groups[0]["lr"])
        if stop_why:
            s.stop_why, s.stopped_inside = stop_why, (i if i < n_steps else 0)
            break
    s.loss_sum = loss_sum.item()
    bar.close()
    s.seconds = time.perf_counter() - t0 + prior_seconds
    return s


def epoch_stats(seed: int, epoch: int, env: Setup, learner: L.Learner, part: dict | None) -> EpochStats:
    """The epoch's running sums and augmentation generator: fresh, or as a stop inside it left them.
    Augmentation randomness comes from (seed, epoch) alone, so a resumed epoch sees the same images; under
    torchrun also from the rank (other images, other draws), and the same for dropout, so a resume with any
    world size is reproducible without per-rank RNG state in the checkpoint."""
    rank_seed = seed * 1_000_003 + epoch + 7_919 * env.rank
    aug_gen = torch.Generator().manual_seed(rank_seed)
    if env.ddp:
        torch.manual_seed(rank_seed)
    s = EpochStats(learner.optimizer.param_groups[0]["lr"], 0.0,
                   torch.zeros((), dtype=torch.long, device=env.device), 0, 0.0, aug_gen)
    if part:
        aug_gen.set_state(part["aug_gen"])
        s.loss_sum, s.seen, s.seconds = part["loss_sum"], part["seen"], part["seconds"]
        s.correct += part["correct"]
    return s


def to_input(d: Data, images_: torch.Tensor, train: bool, generator: torch.Generator | None,
             channels_last: bool) -> torch.Tensor:
    x = d.transform(images_, train=train, generator=generator)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def validate(env: Setup, d: Data, learner: L.Learner, channels_last: bool) -> dict:
    """The same loss as training (as the study), top-1 and top-5, of the model used for inference."""
    if not d.val.paths:  # --no-validate: nothing held out is looked at
        nan = float("nan")
        return {"val_loss": nan, "val_acc": nan, "val_top5": nan, "seen": 0, "seen_rank": 0, "is_best": False}
    net = learner.eval_model()
    net.eval()
    loss, top1, top5, seen = 0.0, 0, 0, 0
    k = min(5, len(d.spec.class_names))
    with torch.no_grad(), env.autocast():
        for images_, labels in d.val_loader:
            logits = net(to_input(d, images_, False, None, channels_last)).float()
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


def end_epoch(t: C.TrainConfig, learner: L.Learner, prog: Progress, epoch: int, val: dict) -> str | None:
    """A per-epoch schedule's step, the best-so-far record, early stopping; returns why to stop, if so."""
    if val["seen"] == 0:  # --no-validate: the schedule goes on, nothing is chosen (config.check: no plateau)
        if learner.scheduler is not None and not learner.per_step:
            learner.scheduler.step()
        prog.epoch = epoch
        return None
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
    progress = lower_loss if t.early_stop_on == "val_loss" else val["is_best"]
    prog.bad_epochs = 0 if progress else prog.bad_epochs + 1
    prog.epoch = epoch
    if not (t.patience and prog.bad_epochs >= t.patience):
        return None
    if t.early_stop_on == "val_loss":
        return (f"early stopping: no lower val loss for {t.patience} epochs "
                f"(min {best['min_val_loss']:.4f} at epoch {best['min_val_loss_epoch']})")
    return (f"early stopping: no higher val accuracy for {t.patience} epochs "
            f"(best {100 * best['val_acc']:.2f}% at epoch {best['epoch']})")


def sync_ranks(env: Setup, learner: L.Learner, s: EpochStats) -> None:
    """Under torchrun: the logged training numbers cover every rank's images; BN running statistics
    (buffers) become rank 0's everywhere, so all ranks validate (and rank 0 saves) the very same model."""
    t = torch.tensor([s.loss_sum, s.correct.item(), s.seen], dtype=torch.float64, device=env.device)
    dist.all_reduce(t)
    s.loss_sum, s.correct, s.seen = t[0].item(), t[1].long(), int(t[2].item())
    ema_buffers = list(learner.ema.module.buffers()) if learner.ema is not None else []
    for b in [*learner.model.buffers(), *ema_buffers]:
        dist.broadcast(b, 0)


# ----------------------------------------------------------------------------------------------------
# before the loop: options, data, model; after it: the run folder's files

def resume_config(cfg: C.Config, explicit: set[str]) -> tuple[C.Config, dict | None]:
    """--resume: the run's own saved configuration, but for the few options that may change (given
    explicitly). --resume-if-exists: the same for <out>/<name> when it holds last.pt, else a new run of that
    name: the one command a restarted job (torchrun --max-restarts, a requeued cluster job) can repeat."""
    r = cfg.run
    if r.resume_if_exists and not r.resume:
        if not r.name:
            raise TrainError("--resume-if-exists needs --name (the run folder to continue when it exists)")
        if RunFolder(Path(r.out) / r.name).last.exists():
            r.resume = str(Path(r.out) / r.name)
    if not r.resume:
        return cfg, None
    run = RunFolder(r.resume)
    if not run.last.exists():
        raise TrainError(f"{run.last} not found; --resume takes a run folder holding last.pt "
                         f"(written after each completed epoch)")
    try:
        ckpt = runs.load_checkpoint(run.last)
    except CheckpointError as e:
        try:
            runs.load_checkpoint(run.best)
        except CheckpointError:
            raise e from None
        raise TrainError(f"{e}. {run.best} is intact: start a new run from its weights with --init-from "
                         f"{run.best} (the optimizer state and position are in last.pt only)") from None
    given = cfg.flat()
    keep = {k: given[k] for k in RESUME_OVERRIDABLE if k in explicit}
    keep.update({k: given[k] for k in NOT_INHERITED}, resume=r.resume)
    return runs.config_of(ckpt).updated(keep), ckpt


def restore(ckpt: dict, cfg: C.Config, env: Setup, learner: L.Learner) -> Progress:
    """Load last.pt's weights, optimizer, schedule, scaler, EMA and RNG; return where the run was."""
    run_dir = Path(cfg.run.resume)
    partial = ckpt.get("partial")
    if partial is not None and env.ddp:
        raise TrainError(f"{run_dir / 'last.pt'} ends inside epoch {partial['epoch']} (a --max-steps stop of a "
                         f"one-process run); resume it without torchrun until that epoch completes")
    if learner.ema is not None and ckpt.get("ema") is None:
        raise TrainError(f"{run_dir / 'last.pt'} holds no --ema state; resume it without --ema")
    L.load_state(ckpt, learner, env.scaler, cuda_rng=env.device.type == "cuda" and not env.ddp)
    saved_world = int(ckpt.get("world_size", 1))
    if cfg.train.scale_lr and saved_world != env.world:
        L.rescale_lr(learner, env.world / saved_world)
        print(f"--scale-lr: world size {saved_world} -> {env.world}, learning rates x{env.world / saved_world:g}")
    prog = Progress(epoch=ckpt["epoch"], step=ckpt.get("step", 0), best=dict(ckpt["best"]),
                    bad_epochs=ckpt["early_stop"]["bad_epochs"], partial=partial)
    print(f"resuming {run_dir} after epoch {prog.epoch}"
          + (f" and {partial['batches']} steps of epoch {partial['epoch']}" if partial else "")
          + (f" with {env.world} ranks (was {saved_world})" if saved_world != env.world else ""))
    if prog.epoch >= cfg.train.epochs:
        print(f"note: the run already has {prog.epoch} epochs (--epochs {cfg.train.epochs}); pass a larger "
              f"--epochs to train on")
    return prog


def open_run_folder(cfg: C.Config, env: Setup, d: Data, learner: L.Learner, prog: Progress,
                    resumed: bool) -> tuple[RunFolder, list[dict]]:
    """(run folder, metrics rows so far): a new folder, or the resumed one; config.json written."""
    r = cfg.run
    if resumed:
        run = RunFolder(r.resume)
    else:
        name = r.name or f"{datetime.datetime.now():%Y%m%d-%H%M%S}-{'demo' if r.demo else cfg.model.arch}"
        if env.ddp:  # one name for all ranks: rank 0's clock
            obj = [name]
            dist.broadcast_object_list(obj, src=0)
            name = obj[0]
        run = RunFolder(Path(r.out) / name)
        if run.last.exists():
            raise TrainError(f"{run} already holds a run; continue it with --resume {run} or pick another --name")
        if env.is_main:
            run.path.mkdir(parents=True, exist_ok=True)
    # metrics.csv may hold a row for an epoch whose last.pt never landed (killed in between): drop it
    rows = [row for row in run.read_metrics() if row["epoch"] <= prog.epoch]
    r.data = str(Path(r.data).resolve())  # so --resume and a replay work from any working directory
    n_params = count_params(learner.model)
    dev = {"type": env.device.type, "name": device_name(env.device), "threads": torch.get_num_threads()}
    if env.is_main:
        run.write_config(cfg, run_record(cfg, env, d, learner, run, n_params, dev, prog.epoch if resumed else None))
    amp = str(env.amp_dtype).removeprefix("torch.") if env.amp_dtype else "off"
    batch = cfg.train.batch_size
    print(f"run: {run}  arch {cfg.model.arch} ({n_params / 1e6:.2f} M params)  device {env.device} ({dev['name']})  "
          f"amp {amp}  img {images.ImageSize.of(cfg.data.img_size).text}  batch {batch}"
          + (f" per rank x {env.world} ranks ({env.backend}) = {batch * env.world}" if env.ddp else ""))
    return run, rows


def run_record(cfg: C.Config, env: Setup, d: Data, learner: L.Learner, run: RunFolder, n_params: int, dev: dict,
               resumed_after: int | None) -> dict:
    """config.json beside the configuration: the command, the data, the model, the machine and versions."""
    return {
        "command": shlex.join([sys.executable, *sys.argv]), "run_dir": str(run),
        "num_classes": len(d.spec.class_names), "class_names": d.spec.class_names,
        "dataset": {"root": str(d.spec.root), "layout": d.spec.layout, "train": len(d.train.labels),
                    "val": len(d.val.labels), "skipped": len(d.train.skipped) + len(d.val.skipped)},
        "preprocess": d.prep.to_dict(), "augment": C.jsonable(d.augment), "erase": C.jsonable(d.erase),
        "model_options": learner.model_options, "num_params": n_params,
        "amp": {"enabled": env.amp_dtype is not None, "dtype": str(env.amp_dtype).removeprefix("torch."),
                "grad_scaler": env.scaler is not None},
        "device": dev,
        **runs.machine_record(), "resumed_after_epoch": resumed_after,
        # --batch-size is per rank: the optimizer step sees batch_size x world_size images
        "distributed": {"world_size": env.world, "backend": env.backend, "per_rank_batch": cfg.train.batch_size,
                        "global_batch": cfg.train.batch_size * env.world, "lr": learner.base_lr,
                        "scale_lr": cfg.train.scale_lr, "sync_bn": bool(cfg.train.sync_bn and env.ddp),
                        "ghost_op": env.ghost_op},
    }


def make_checkpoint(cfg: C.Config, env: Setup, d: Data, learner: L.Learner, prog: Progress) -> dict:
    """last.pt: the model and everything an exact resume needs, after prog.epoch completed epochs."""
    return {
        "format": runs.CHECKPOINT_FORMAT, "version": runs.CHECKPOINT_VERSION, "arch": cfg.model.arch,
        "num_classes": len(d.spec.class_names), "class_names": list(d.spec.class_names),
        "model_options": learner.model_options, "preprocess": d.prep.to_dict(), "model": learner.model.state_dict(),
        "epoch": prog.epoch, "step": prog.step, "best": dict(prog.best), "config": cfg.to_dict(),
        **L.state(learner, env.scaler, cuda_rng=env.device.type == "cuda"),
        "early_stop": {"bad_epochs": prog.bad_epochs}, "world_size": env.world,
    }


def save_partial(ckpt: dict, s: EpochStats, epoch: int, run: RunFolder) -> None:
    """A stop inside an epoch: no validation, schedule or best.pt for a partial epoch (a run that goes on
    never had them there). last.pt keeps the completed epochs' record plus this epoch's progress, so
    --resume continues from this very step."""
    ckpt["partial"] = {"epoch": epoch, "batches": s.stopped_inside, "aug_gen": s.aug_gen.get_state(),
                       "loss_sum": s.loss_sum, "correct": int(s.correct.item()), "seen": s.seen,
                       "seconds": s.seconds}
    run.save(ckpt, run.last)


def save_epoch(ckpt: dict, learner: L.Learner, run: RunFolder, is_best: bool) -> None:
    """best.pt before last.pt: a kill between the two then replays this epoch on --resume and writes best.pt
    again; the other order would leave a best.pt older than last.pt's record."""
    if is_best:
        run.save(runs.model_file(ckpt, learner.ema.module.state_dict() if learner.ema else None), run.best)
    run.save(ckpt, run.last)


def metrics_row(epoch: int, s: EpochStats, val: dict) -> dict:
    return dict(epoch=epoch, lr=s.lr, train_loss=s.loss_sum / max(s.seen, 1), train_acc=s.correct.item() / max(s.seen, 1),
                val_loss=val["val_loss"], val_acc=val["val_acc"], val_top5=val["val_top5"], seconds=s.seconds,
                img_per_s=s.seen / s.seconds)


def report_epoch(rows: list[dict], run: RunFolder, epochs: int, is_main: bool, is_best: bool) -> None:
    """metrics.csv, curves.png (rank 0) and the epoch's line."""
    if is_main:
        run.write_metrics(rows)
        runs.plot_curves(rows, run.curves_png)
    r = rows[-1]
    print(f"epoch {r['epoch']:3d}/{epochs}  lr {r['lr']:.2e}  train loss {r['train_loss']:.4f} "
          f"acc {100 * r['train_acc']:5.1f}%  val loss {r['val_loss']:.4f} acc {100 * r['val_acc']:5.1f}% "
          f"top5 {100 * r['val_top5']:5.1f}%  {r['seconds']:5.1f}s {r['img_per_s']:6.0f} img/s"
          f"{'  *best' if is_best else ''}", flush=True)


def failed(e: Exception, rows: list[dict], run: RunFolder) -> int:
    """A write that failed (full disk, read-only folder: exit 2) or a loss that diverged (exit 1): one line
    saying what the run folder still holds, which stays loadable."""
    if isinstance(e, WriteError):
        kept = (f"continue with: python train.py --resume {run}" if run.last.exists()
                else "no checkpoint was written yet")
        print(f"error: {e}; {kept}", file=sys.stderr)
        return 2
    done = rows[-1]["epoch"] if rows else 0
    kept = (f"{run.last} (epoch {done}) and best.pt are kept" if done
            else "no epoch had completed, so there is no checkpoint")
    print(f"error: {e}; stopped, {kept}; try a lower --lr (or --no-amp)", file=sys.stderr)
    return 1


def interrupted(rows: list[dict], held_partial: tuple[int, int] | None, run: RunFolder, is_main: bool) -> int:
    """Ctrl-C: say what last.pt holds and how to go on."""
    done = rows[-1]["epoch"] if rows else 0
    if not is_main:
        pass
    elif held_partial:
        print(f"\ninterrupted in epoch {held_partial[0]}: {run.last} holds epoch {done} and "
              f"{held_partial[1]} steps of epoch {held_partial[0]}, where the run was resumed (the steps since "
              f"are discarded).\nresume with: python train.py --resume {run}", file=sys.stderr)
    elif done:
        print(f"\ninterrupted in epoch {done + 1}: {run.last} holds epoch {done}, the last completed "
              f"one (the partial epoch is discarded).\nresume with: python train.py --resume {run}",
              file=sys.stderr)
    else:
        print("\ninterrupted before the first epoch completed; nothing to resume", file=sys.stderr)
    return 130


def finish(cfg: C.Config, env: Setup, d: Data, learner: L.Learner, prog: Progress, run: RunFolder,
           checkpoint, stop_reason: str | None, stopped_inside: int, stop_signal: signal.Signals | None) -> int:
    """final.pt (a completed run's model, with no checkpoint chosen on validation images) and the summary;
    after a stop signal, what last.pt holds and the resume command (exit 128 + the signal)."""
    if stop_reason:
        print(stop_reason)
    if stop_signal is not None:
        held = (f"epoch {prog.epoch} and {stopped_inside} steps of epoch {prog.epoch + 1}" if stopped_inside
                else f"epoch {prog.epoch}")
        print(f"{stop_signal.name}: {run.last} holds {held}; resume with: python train.py --resume {run}",
              file=sys.stderr, flush=True)
        return 128 + int(stop_signal)
    if stopped_inside:
        where = (f"{run.last} holds that point" if not env.ddp else
                 f"under torchrun {run.last} stays at epoch {prog.epoch}, the last completed one")
        print(f"stopped inside epoch {prog.epoch + 1} after {stopped_inside} of {len(d.train_loader)} steps; "
              f"{where}; continue with: python train.py --resume {run}")
    best = prog.best
    if prog.epoch == 0:
        print(f"no epoch completed, so there is no best.pt yet; files in {run}")
        return 0
    if not stopped_inside and env.is_main:
        run.save(runs.model_file(checkpoint(), learner.ema.module.state_dict() if learner.ema else None), run.final)
    if best["epoch"] == 0:  # --no-validate
        print(f"done: {prog.epoch} epochs, nothing held out was looked at; files in {run}")
    else:
        print(f"done: best val acc {100 * best['val_acc']:.2f}% at epoch {best['epoch']}, min val loss "
              f"{best['min_val_loss']:.4f} at epoch {best['min_val_loss_epoch']}; files in {run}")
    if cfg.run.demo:
        example = d.val.paths[0] if d.val.paths else "<an image>"
        print("next, try:\n"
              f"  python evaluate.py --checkpoint {run.best} --data {cfg.run.data}\n"
              f"  python predict.py {example} --checkpoint {run.best}")
    return 0


def main(argv: list[str] | None = None, hooks: Hooks | None = None) -> int:
    stdout = sys.stdout  # train() silences ranks other than 0 under torchrun
    try:
        cl = C.from_command_line(argv, description=__doc__.split("\n")[0])
        if cl.print_config:
            print(C.to_yaml(cl.cfg), end="")
            return 0
        return train(cl.cfg, cl.explicit, hooks)
    except (UsageError, data.DataError, CheckpointError, WriteError) as e:
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
