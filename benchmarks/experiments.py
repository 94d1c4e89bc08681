"""The study's ablation ladder and architecture comparison, run with train.py and evaluate.py.

    python benchmarks/experiments.py --list                  # the experiments and their flags
    python benchmarks/experiments.py --dry-run               # the exact commands, nothing run
    python benchmarks/experiments.py --estimate              # measure img/s, project the campaign's wall time
    python benchmarks/experiments.py --skip-done             # run everything (resumable across sessions)
    python benchmarks/experiments.py --only c7_augment d_c50_best --skip-done

Each experiment is `train.py` (run folder <out>/<name>/) followed by `evaluate.py --checkpoint
<out>/<name>/best.pt --split test --json <out>/<name>/evaluate_test.json`, both as subprocesses with the
same --epochs, --img-size and --seed (the (f) repeats add 1 and 2 to the seed). After every experiment
<out>/results.md and <out>/results.json are rewritten from all run folders found under <out>.

Defaults fit a 2-core CPU: 96 px, 40 epochs. The study ran ~130 epochs (MultiStepLR milestones
67 82 95 107, ReduceLROnPlateau patience 10, early stopping patience 15); every epoch count is scaled by
epochs/130 and rounded (round(m * 40 / 130): milestones 21 25 29 33, plateau patience 3, early-stop
patience 5). Validation (model selection, plateau, early stopping) uses a stratified 10% of cars_train
(--val-split 0.1), so cars_test is touched only by evaluate.py.

Resuming: with --skip-done a run folder whose evaluate JSON exists (and whose recorded train command is
the one this invocation would run) is reused; a folder with last.pt but no finished-training record is
continued with train.py --resume; a finished training without its evaluate JSON is only evaluated.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import runs  # noqa: E402  (the run folder's files: config.json and metrics.csv are read through it)
DEFAULT_DATA = REPO.parent / "shared" / "data"
DEFAULT_OUT = REPO / "benchmarks" / "results" / "real_copy"
EVAL_JSON = "evaluate_test.json"
RECORD = "experiment.json"  # this runner's record in each run folder: commands, wall times, return codes

# the study's schedule, in its own epochs
REF_EPOCHS = 130
REF_MILESTONES = (67, 82, 95, 107)
REF_PLATEAU_PATIENCE = 10
REF_PATIENCE = 15
STUDY_BEST = "83.79%"

GITIGNORE = """\
# written by benchmarks/experiments.py: checkpoints and per-image outputs stay out of git; config.json,
# metrics.csv, curves.png, train.log, evaluate_test.json, experiment.json, results.* and confusion.csv are kept
# (confusion.csv, ~90 KB at 196 classes, is what benchmarks/model_card.py counts the confused pairs from)
*.pt
*.tmp*
predictions.csv
"""


def scale_epochs(m: float, epochs: int) -> int:
    """An epoch count of the study's ~130-epoch schedule, scaled to a run of `epochs` (at least 1)."""
    return max(1, int(round(m * epochs / REF_EPOCHS)))


def scaled_milestones(epochs: int) -> list[int]:
    out: list[int] = []
    for m in REF_MILESTONES:  # strictly increasing even for very short runs
        out.append(max(scale_epochs(m, epochs), out[-1] + 1 if out else 1))
    return out


@dataclass
class Experiment:
    name: str
    study: str  # the study's experiment id
    groups: tuple[str, ...]  # "ladder", "comparison"
    step: str  # ladder step (a)..(f), or the comparison's architecture
    what: str
    flags: list[str] = field(default_factory=list)
    seed_offset: int = 0
    checkpoint: str = "best.pt"  # what evaluate.py scores: best.pt (chosen on validation) or final.pt
    eval_flags: list[str] = field(default_factory=list)


def experiments(epochs: int) -> list[Experiment]:
    """The registry. Flags are spelled out in full (also where they equal train.py's defaults), so the
    tables do not depend on future default changes."""
    ms = [str(m) for m in scaled_milestones(epochs)]
    # (a)-(c): the study's early settings: Adam without weight decay, no scheduler, and (as issue 9 lists
    # dropout 0.2 / out_channels 320 as part of step (d)) no dropout and the official 1280-wide last layer
    early = ["--arch", "ghostnet", "--optimizer", "adam", "--wd", "0", "--scheduler", "none",
             "--dropout", "0", "--out-channels", "1280"]
    plain = ["--label-smoothing", "0", "--no-normalize", "--augment", "none"]
    smooth_norm = ["--label-smoothing", "0.1", "--augment", "none"]
    aug = ["--label-smoothing", "0.1", "--augment", "flip", "affine", "jitter"]
    best_common = ["--optimizer", "adamw", "--wd", "0.6", "--dropout", "0.2", "--out-channels", "320",
                   "--label-smoothing", "0.1", "--augment", "flip", "affine", "jitter"]
    multistep = ["--scheduler", "multistep", "--milestones", *ms, "--gamma", "0.1"]
    plateau = ["--scheduler", "plateau", "--plateau-factor", "0.1",
               "--plateau-patience", str(scale_epochs(REF_PLATEAU_PATIENCE, epochs))]
    best = best_common + multistep
    L, C = ("ladder",), ("comparison",)
    exps = [
        Experiment("a_c1_plain", "C-1", L, "(a)", "plain cross-entropy, no normalization, no augmentation",
                   early + plain),
        Experiment("b_c3_smooth_norm", "C-3", L, "(b)", "+ label smoothing 0.1 + RGB normalization",
                   early + smooth_norm),
        Experiment("c_c7_augment", "C-7", L, "(c)", "+ flip, affine, colour jitter", early + aug),
        Experiment("d_c50_best", "C-50", L + C, "(d)",
                   "+ AdamW wd 0.6, dropout 0.2, out_channels 320, MultiStepLR (best recipe)",
                   ["--arch", "ghostnet"] + best),
        Experiment("e_c50_plateau", "C-50 with C-26..29's schedule", L, "(e)",
                   "best recipe with ReduceLROnPlateau ('automatic')", ["--arch", "ghostnet"] + best_common + plateau),
        Experiment("f_c50_best_seed1", "C-50", L, "(f)", "best recipe, seed + 1", ["--arch", "ghostnet"] + best,
                   seed_offset=1),
        Experiment("f_c50_best_seed2", "C-50", L, "(f)", "best recipe, seed + 2", ["--arch", "ghostnet"] + best,
                   seed_offset=2),
    ]
    for arch in ("ghostnet_official", "mobilenet_v3_large", "mobilenet_v3_small", "shufflenet_v2_x1_0",
                 "efficientnet_b0", "resnet18"):
        exps.append(Experiment(f"cmp_{arch}", "C-50 recipe", C, arch, f"{arch} at the best recipe",
                               ["--arch", arch] + best))
    return exps


# The recipes campaign (--campaign recipes): the study's recipe against --recipe fast at one length, each
# trained on all of cars_train for exactly --epochs (no early stopping, no validation split, and with
# --no-validate no per-epoch look at cars_test either), scoring final.pt on cars_test once, so nothing is
# chosen on the images that are reported.
RECIPE_SEEDS = 3
# the fast recipe's evaluation flags: none. On the validation split flip TTA moved top-1 by less than one image
# in a hundred and a larger test size (112 px after training at 96) lost 3.8 points (docs/recipes.md)
FAST_EVAL: list[str] = []


def recipe_experiments(epochs: int, seeds: int = RECIPE_SEEDS, fast_args: Sequence[str] = ()) -> list[Experiment]:
    """The study's recipe and --recipe fast, `seeds` runs each; fast_args go to the fast runs only (after the
    common flags, so they win): e.g. another input size and the epochs that fit the same wall time."""
    ms = [str(m) for m in scaled_milestones(epochs)]
    study = ["--recipe", "study", "--scheduler", "multistep", "--milestones", *ms, "--gamma", "0.1", "--no-validate"]
    exps = []
    for k in range(seeds):
        exps.append(Experiment(f"study_s{k}", "C-50", ("recipes",), "study",
                               f"the study's recipe, milestones scaled to {epochs} epochs, seed + {k}",
                               study, seed_offset=k, checkpoint="final.pt"))
        exps.append(Experiment(f"fast_s{k}", "--recipe fast", ("recipes",), "fast", f"--recipe fast, seed + {k}",
                               ["--recipe", "fast", "--no-validate", *fast_args], seed_offset=k,
                               checkpoint="final.pt", eval_flags=list(FAST_EVAL)))
    return exps


def batches(plans: list[Plan], jobs: int) -> list[list[Plan]]:
    """The campaign's side-by-side batches: `jobs` consecutive plans at a time, in order."""
    return [plans[i:i + jobs] for i in range(0, len(plans), jobs)]


def unpaired_batches(plans: list[Plan], jobs: int) -> list[str]:
    """The side-by-side batches of a recipes campaign that will train two runs of one recipe together (e.g.
    `--only fast_s1 fast_s2`): their times are then no budget measurement, which results.md's table says after
    the fact; said here before the hours are spent."""
    notes = []
    for batch in batches(plans, jobs):
        todo = [p for p in batch if state(p) != "done"]
        if len(todo) > 1 and len({p.exp.step for p in todo}) == 1:
            names = " and ".join(p.exp.name for p in todo)
            notes.append(f"{names} train side by side, two runs of one recipe: their times will be no budget "
                         f"measurement (pair each fast seed with its study twin, e.g. --only study_s1 fast_s1)")
    return notes


# ------------------------------------------------------------------------------------------------ commands
def show_path(p: Path) -> str:
    """A path as written in commands and tables: relative to the repository when it lies near it."""
    p = Path(p).resolve()
    try:
        rel = os.path.relpath(p, REPO)
    except ValueError:
        return str(p)
    return rel if not rel.startswith("../..") else str(p)


@dataclass
class Plan:
    exp: Experiment
    run_dir: Path
    train: list[str]  # argv after the interpreter
    evaluate: list[str]


def drop_overridden(argv: list[str]) -> list[str]:
    """argv without each --option (and its values) that is given again later, e.g. plan()'s --img-size after
    --fast-args set another: argparse keeps the last one anyway (train.py has no append options), so the
    command shows only what the run used."""
    out, i = [], 0
    while i < len(argv):
        end = i + 1
        while end < len(argv) and not argv[end].startswith("--"):
            end += 1  # the option's values ("-8" of --shear is one too)
        if not (argv[i].startswith("--") and argv[i] in argv[end:]):
            out += argv[i:end]
        i = end
    return out


def without_out(argv: list[str]) -> list[str]:
    """argv less its --out folder: a finished run folder moved elsewhere (trained in a scratch folder, then
    committed under benchmarks/results/) is still the run its command describes."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] == "--out":
            i += 2
            continue
        out.append(argv[i])
        i += 1
    return out


def plan(exp: Experiment, args: argparse.Namespace) -> Plan:
    run_dir = args.out / exp.name
    common = ["--data", show_path(args.data), "--out", show_path(args.out), "--name", exp.name,
              "--img-size", str(args.img_size), "--epochs", str(args.epochs),
              "--seed", str(args.seed + exp.seed_offset), "--val-split", str(args.val_split),
              "--patience", str(args.patience)]
    if args.batch_size:
        common += ["--batch-size", str(args.batch_size)]
    if args.threads:
        common += ["--threads", str(args.threads)]
    if args.device:
        common += ["--device", args.device]
    train = drop_overridden([args.train_script, *common, *exp.flags, *shlex.split(args.train_args)])
    ev = ["evaluate.py", "--checkpoint", show_path(run_dir / exp.checkpoint), "--data", show_path(args.data),
          "--split", "test", "--json", show_path(run_dir / EVAL_JSON), "--runs", str(args.eval_runs),
          *exp.eval_flags]
    if args.threads:
        ev += ["--threads", str(args.threads)]
    if args.device:
        ev += ["--device", args.device]
    ev += shlex.split(args.eval_args)
    return Plan(exp, run_dir, train, ev)


def display(argv: list[str]) -> str:
    return shlex.join(["python", *argv])


# ----------------------------------------------------------------------------------------------- running
def read_json(p: Path) -> dict | None:
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def write_json(obj, p: Path) -> None:
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, p)


def state(pl: Plan) -> str:
    """'done', 'trained' (evaluate missing), 'partial' (last.pt, training unfinished), 'other' (the folder
    holds a run of different settings), 'empty'."""
    rec = read_json(pl.run_dir / RECORD)
    if rec is not None:  # commands recorded before drop_overridden() list an overridden option twice
        recorded = drop_overridden(shlex.split(rec.get("train_command") or "")[1:])
        if display(without_out(recorded)) != display(without_out(pl.train)):
            return "other"
    if rec and rec.get("train_rc") == 0:
        ev = read_json(pl.run_dir / EVAL_JSON)
        return "done" if ev and "metrics" in ev and rec.get("eval_rc") == 0 else "trained"
    if (pl.run_dir / "last.pt").exists():
        return "partial" if rec is not None else "other"
    return "empty"


BAR = re.compile(r"\d+%\||\d+/\d+ \[\d|it/s\]|s/it\]")  # a tqdm progress-bar redraw of a subprocess
ECHO = ("data:", "run:", "epoch", "early stopping", "done:", "error", "interrupted", "  top-1", "  CPU", "wrote")


_LIVE: set = set()  # the train/evaluate processes running now (two at a time under --jobs 2)


def run_logged(argv: list[str], log: Path, env: dict, tqdm_write) -> tuple[int, float]:
    """Run `python argv` in the repository, its output (progress-bar redraws dropped) appended to `log`
    and its key lines echoed; returns (exit status, wall seconds)."""
    t0 = time.perf_counter()
    with open(log, "a") as f:
        f.write(f"$ {display(argv)}\n")
        f.flush()
        proc = subprocess.Popen([sys.executable, *argv], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, errors="replace", bufsize=1)
        _LIVE.add(proc)
        try:
            for line in proc.stdout:
                line = line.rstrip("\n").split("\r")[-1]
                if not line.strip() or BAR.search(line):
                    continue
                f.write(line + "\n")
                if line.lstrip().startswith(ECHO) or line.startswith(ECHO):
                    tqdm_write(f"  {line}")
            rc = proc.wait()
        except KeyboardInterrupt:
            proc.wait()  # train.py keeps last.pt and exits 130 on Ctrl-C (same process group)
            raise
        finally:
            if proc.poll() is None:  # the runner is being stopped otherwise (SIGTERM): stop the child too
                proc.terminate()
                proc.wait()
            _LIVE.discard(proc)
        f.write(f"# exit {rc} after {time.perf_counter() - t0:.1f} s\n")
    return rc, time.perf_counter() - t0


def run_one(pl: Plan, args: argparse.Namespace, env: dict, tqdm_write) -> bool:
    st = state(pl)
    if st == "other":
        tqdm_write(f"{pl.exp.name}: {pl.run_dir} holds a run of other settings (see its {RECORD} / config.json); "
                   f"skipped: use another --out or remove the folder")
        return False
    if st != "empty" and not args.skip_done:
        tqdm_write(f"{pl.exp.name}: {pl.run_dir} exists ({st}); pass --skip-done to reuse/continue it, "
                   f"or remove it")
        return False
    if st == "done":
        tqdm_write(f"{pl.exp.name}: done before, reused")
        return True
    pl.run_dir.mkdir(parents=True, exist_ok=True)
    rec = read_json(pl.run_dir / RECORD) or {
        "name": pl.exp.name, "study": pl.exp.study, "train_command": display(pl.train),
        "eval_command": display(pl.evaluate), "train_wall_s": 0.0, "train_sessions": 0, "train_rc": None,
        "eval_wall_s": None, "eval_rc": None, "host": platform.node()}
    if st in ("empty", "partial"):
        argv = pl.train if st == "empty" else [pl.train[0], "--resume", show_path(pl.run_dir)]
        tqdm_write(f"{pl.exp.name}: {'continuing' if st == 'partial' else 'training'}: {display(argv)}")
        rec["started"] = rec.get("started") or datetime.datetime.now().isoformat(timespec="seconds")
        rec["train_sessions"] += 1
        rec["train_rc"] = None
        write_json(rec, pl.run_dir / RECORD)
        t0 = time.perf_counter()
        try:
            rc, wall = run_logged(argv, pl.run_dir / "train.log", env, tqdm_write)
        except (KeyboardInterrupt, SystemExit) as e:  # Ctrl-C / SIGTERM: keep this session's wall time
            rec["train_rc"] = 130 if isinstance(e, KeyboardInterrupt) else e.code
            rec["train_wall_s"] += time.perf_counter() - t0
            write_json(rec, pl.run_dir / RECORD)
            raise
        rec["train_wall_s"] += wall
        rec["train_rc"] = rc
        write_json(rec, pl.run_dir / RECORD)
        if rc != 0:
            tqdm_write(f"{pl.exp.name}: train.py exited {rc}; see {pl.run_dir / 'train.log'}")
            return False
    tqdm_write(f"{pl.exp.name}: evaluating: {display(pl.evaluate)}")
    rc, wall = run_logged(pl.evaluate, pl.run_dir / "evaluate.log", env, tqdm_write)
    rec.update(eval_rc=rc, eval_wall_s=wall, finished=datetime.datetime.now().isoformat(timespec="seconds"))
    write_json(rec, pl.run_dir / RECORD)
    if rc != 0:
        tqdm_write(f"{pl.exp.name}: evaluate.py exited {rc}; see {pl.run_dir / 'evaluate.log'}")
    return rc == 0


# ----------------------------------------------------------------------------------------------- results
def read_metrics_csv(p: Path) -> list[dict]:
    try:
        return runs.read_metrics(p)
    except (OSError, ValueError):
        return []


def read_record(run_dir: Path) -> dict:
    """config.json's record (dataset, device, versions, commit), of this code's schema or an older one."""
    try:
        return runs.read_config_json(run_dir / "config.json")[1]
    except (OSError, ValueError, runs.C.ConfigError):
        return {}


def read_options(run_dir: Path) -> dict:
    """The flat options of a run's config.json, of this code's schema or an older one; a run of an option since
    removed (a measurement that was left out, e.g. mixup) keeps its raw values, the removed one included."""
    try:
        return runs.read_config_json(run_dir / "config.json")[0].flat()
    except runs.C.ConfigError:
        nested = (read_json(run_dir / "config.json") or {}).get("config", {})
        return {k: v for section in nested.values() if isinstance(section, dict) for k, v in section.items()}
    except (OSError, ValueError):
        return {}


def collect(pl: Plan) -> dict:
    rec = read_json(pl.run_dir / RECORD) or {}
    row = {"name": pl.exp.name, "study": pl.exp.study, "step": pl.exp.step, "what": pl.exp.what,
           "groups": list(pl.exp.groups), "seed_offset": pl.exp.seed_offset, "run_dir": show_path(pl.run_dir),
           "train_command": display(pl.train), "eval_command": display(pl.evaluate), "state": state(pl)}
    if row["state"] == "other":
        return row
    cfg = read_record(pl.run_dir)
    rows = read_metrics_csv(pl.run_dir / "metrics.csv")
    ev = read_json(pl.run_dir / EVAL_JSON) or {}
    m, eff = ev.get("metrics") or {}, ev.get("efficiency") or {}
    row.update(
        epochs_run=len(rows) or None,
        final_train_acc=float(rows[-1]["train_acc"]) if rows else None,
        best_epoch=m.get("epoch"),
        val_top1=max((float(r["val_acc"]) for r in rows), default=None),
        train_img_per_s=statistics.median(float(r["img_per_s"]) for r in rows) if rows else None,
        epoch_s_median=statistics.median(float(r["seconds"]) for r in rows) if rows else None,
        epochs_s_sum=sum(float(r["seconds"]) for r in rows) if rows else None,
        test_top1=m.get("top1"), test_top5=m.get("top5"), test_mean_class=m.get("mean_class_acc"),
        test_images=m.get("images"), params=eff.get("params"), macs=eff.get("macs"),
        cpu_latency_ms=(eff.get("cpu") or {}).get("latency_ms"), latency_threads=eff.get("threads"),
        train_wall_s=rec.get("train_wall_s"), train_sessions=rec.get("train_sessions"),
        eval_wall_s=rec.get("eval_wall_s"), train_rc=rec.get("train_rc"), eval_rc=rec.get("eval_rc"),
        dataset=cfg.get("dataset"), device=cfg.get("device"), versions=cfg.get("versions"),
        git_commit=cfg.get("git_commit"), started=rec.get("started"), finished=rec.get("finished"),
    )
    return row


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.2f}"


def _dur(s) -> str:
    if s is None:
        return "–"
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


LADDER_BASE = {"b_c3_smooth_norm": "a_c1_plain", "c_c7_augment": "b_c3_smooth_norm", "d_c50_best": "c_c7_augment",
               "e_c50_plateau": "d_c50_best"}


def _effect(r: dict, rows: list[dict], sd: float | None) -> str:
    """The ladder step's change in test top-1 (points) against the step it builds on, labelled."""
    if r["name"].startswith("f_"):
        return "repeat of (d)"
    base = next((b for b in rows if b["name"] == LADDER_BASE.get(r["name"])), None)
    if base is None or r.get("test_top1") is None or base.get("test_top1") is None:
        return "–"
    d = 100 * (r["test_top1"] - base["test_top1"])
    if sd is None:  # without the (d)+(f) seed repeats the noise is unknown: a sign alone says nothing
        return f"{d:+.2f} (noise unknown: no seed repeats)"
    return f"{d:+.2f} ({'within noise' if abs(d) < 2 * sd else ('helps' if d > 0 else 'hurts')})"


def _sec(s) -> str:
    return "–" if s is None else f"{s:.1f} s"


def _status(r: dict) -> str:
    return {"done": "", "trained": " (not evaluated)", "partial": " (unfinished)", "empty": " (not run)",
            "other": " (folder holds other settings)"}[r["state"]] + (
        f" (train exit {r['train_rc']})" if r.get("train_rc") not in (None, 0) else "")


THUMBNAILS = "128x96 copy"  # what the folders written before the crops existed trained on


@functools.lru_cache(maxsize=None)
def describe_data(data: Path) -> str:
    """Which copy of Stanford Cars a campaign used, from one training photo's size: the 128x96 thumbnails,
    or the full-resolution crops (each photo cropped to its car, at most 384 px a side)."""
    try:
        from PIL import Image
        import data as datasets  # the layout train.py itself finds in that folder
        with Image.open(datasets.find_dataset(data).train[0].path) as im:
            w, h = im.size
    except Exception:  # noqa: BLE001 - a description only; train.py reports a bad folder itself
        return "copy unknown"
    if (w, h) == (128, 96):
        return THUMBNAILS
    return "full-resolution crops (each photo cropped to its car)" if max(w, h) > 128 else f"{w}x{h} photos"


# This copy's cars_test is the data README's held-out quarter of the official *train* split, not the official
# test set: the tables' headers say both names so neither reads as the official test accuracy.
CARS_TEST = "cars_test (a held-out part of the official train split, not the official test set)"


def label(args: argparse.Namespace) -> str:
    fast = args.fast_args if args.campaign == "recipes" else ""
    budget = f"{args.epochs} epochs at {args.img_size} px" + (f" (fast runs: `{fast}`)" if fast else "")
    return (f"{CARS_TEST}, {describe_data(args.data)}, {budget}: "
            f"not comparable to the study's {STUDY_BEST} at 227 px after its full training")


def environment(args: argparse.Namespace) -> dict:
    try:
        sys.path.insert(0, str(REPO))
        from common import cpu_name
        cpu = cpu_name()
    except Exception:  # noqa: BLE001 - a description only
        cpu = platform.processor() or platform.machine()
    import torch
    import torchvision
    info = {"cpu": cpu, "cores": os.cpu_count(), "threads": args.threads or torch.get_num_threads(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "platform": platform.platform(),
            "host": platform.node(), "python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__}
    if str(args.device or "").startswith("cuda") and torch.cuda.is_available():  # the runs' own accelerator
        info["gpu"] = torch.cuda.get_device_name(torch.device(args.device))
    return info


def write_results(plans: list[Plan], args: argparse.Namespace, env_info: dict) -> Path:
    rows = [collect(p) for p in plans]
    ms = " ".join(map(str, scaled_milestones(args.epochs)))
    settings = {"epochs": args.epochs, "img_size": args.img_size, "seed": args.seed, "val_split": args.val_split,
                "patience": args.patience, "milestones": scaled_milestones(args.epochs),
                "plateau_patience": scale_epochs(REF_PLATEAU_PATIENCE, args.epochs),
                "data": show_path(args.data), "data_desc": describe_data(args.data), "label": label(args)}
    write_json({"settings": settings, "environment": env_info, "experiments": rows}, args.out / "results.json")
    ds = next((r["dataset"] for r in rows if r.get("dataset")), None)
    L = [f"# Experiments on the real-photo copy ({args.epochs} epochs, {args.img_size} px)", "",
         f"**{label(args)}.**", "",
         f"- data: `{show_path(args.data)}`" + (f" ({ds['train']} train / {ds['val']} val images per run; test = "
                                               f"its cars_test)" if ds else ""),
         f"- machine: {env_info['cpu']}, {env_info['cores']} cores, {env_info['threads']} torch "
         f"thread{'s' if env_info['threads'] != 1 else ''} "
         f"(OMP_NUM_THREADS={env_info['OMP_NUM_THREADS']}); {env_info['platform']}",
         f"- versions: Python {env_info['python']}, torch {env_info['torch']}, torchvision {env_info['torchvision']}",
         f"- tables written {env_info['date']}; seed {args.seed} ((f): seed + 1, + 2)",
         f"- schedule scaled from the study's ~{REF_EPOCHS} epochs by round(m * {args.epochs} / {REF_EPOCHS}): "
         f"milestones {' '.join(map(str, REF_MILESTONES))} -> {ms}, plateau patience {REF_PLATEAU_PATIENCE} -> "
         f"{settings['plateau_patience']}, early-stopping patience {REF_PATIENCE} -> {args.patience}",
         f"- validation (best.pt, plateau, early stopping): a stratified {args.val_split:g} of cars_train "
         f"(`--val-split`); test top-1/top-5: evaluate.py on cars_test "
         f"({next((r['test_images'] for r in rows if r.get('test_images')), '?')} images)",
         "- latency: evaluate.py's CPU figure, BN-folded model, batch 1, median of "
         f"{args.eval_runs} runs, on a CPU shared with other jobs (noisy)",
         "- wall time: train.py (all sessions, if resumed) + evaluate.py, on this machine; s/epoch: the median "
         "epoch (training + validation) from metrics.csv, which other jobs on the machine disturb less than the "
         "total", "",
         "## Ablation ladder (GhostNet)", "",
         "| step | study | experiment | change | epochs run (best) | val top-1 % | test top-1 % | effect "
         "| test top-5 % | train wall | s/epoch | eval wall |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    seeds = [r for r in rows if r["name"].startswith(("d_c50_best", "f_c50_best")) and r.get("test_top1") is not None]
    sd = statistics.stdev(100 * r["test_top1"] for r in seeds) if len(seeds) >= 2 else None
    for r in rows:
        if "ladder" in r["groups"]:
            L.append(f"| {r['step']} | {r['study']} | `{r['name']}`{_status(r)} | {r['what']} | "
                     f"{r.get('epochs_run') or '–'} ({r.get('best_epoch') or '–'}) | {_pct(r.get('val_top1'))} | "
                     f"{_pct(r.get('test_top1'))} | {_effect(r, rows, sd)} | {_pct(r.get('test_top5'))} | "
                     f"{_dur(r.get('train_wall_s'))} | {_sec(r.get('epoch_s_median'))} | {_dur(r.get('eval_wall_s'))} |")
    if len(seeds) >= 2:
        t1 = [100 * r["test_top1"] for r in seeds]
        t5 = [100 * r["test_top5"] for r in seeds]
        L.append(f"| (d)+(f) | C-50 | mean ± sd over {len(seeds)} seeds | | | | {statistics.mean(t1):.2f} ± "
                 f"{statistics.stdev(t1):.2f} | | {statistics.mean(t5):.2f} ± {statistics.stdev(t5):.2f} | | | |")
        L += ["", f"effect: the change in test top-1 against the step it builds on ((b) on (a), (c) on (b), (d) on (c), "
                  f"(e) on (d)); 'within noise' when it is under twice the seed spread of (d)+(f) "
                  f"(sd {sd:.2f} points)."]
    L += ["", "## Architectures at the best recipe (C-50 flags)", "",
          "| model | test top-1 % | test top-5 % | params (M) | MMACs | CPU ms (b1) | epochs run (best) "
          "| train wall | s/epoch | train img/s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "comparison" in r["groups"]:
            arch = "ghostnet" if r["name"] == "d_c50_best" else r["step"]
            p, mac, lat = r.get("params"), r.get("macs"), r.get("cpu_latency_ms")
            ips = "–" if r.get("train_img_per_s") is None else f"{r['train_img_per_s']:.0f}"
            L.append(f"| {arch} (`{r['name']}`){_status(r)} | {_pct(r.get('test_top1'))} | "
                     f"{_pct(r.get('test_top5'))} | "
                     f"{'–' if p is None else f'{p / 1e6:.2f}'} | {'–' if mac is None else f'{mac / 1e6:.0f}'} | "
                     f"{'–' if lat is None else f'{lat:.2f}'} | {r.get('epochs_run') or '–'} "
                     f"({r.get('best_epoch') or '–'}) | {_dur(r.get('train_wall_s'))} | {_sec(r.get('epoch_s_median'))} | "
                     f"{ips} |")
    L += ["", "## Commands", "", "Run from the repository root (`python benchmarks/experiments.py "
          f"--epochs {args.epochs} --img-size {args.img_size} --seed {args.seed} --skip-done` runs them all):", "",
          "```"]
    return write_md(L, rows, args.out, with_study=True)


def write_md(lines: list[str], rows: list[dict], out: Path, with_study: bool = False) -> Path:
    """results.md: the tables above, then every run's train and evaluate command."""
    for r in rows:
        lines += [f"# {r['name']}" + (f" ({r['study']})" if with_study else ""), r["train_command"], r["eval_command"]]
    lines += ["```", ""]
    p = out / "results.md"
    p.write_text("\n".join(lines))
    return p


def _mean_sd(xs: list[float]) -> str:
    if not xs:
        return "–"
    return f"{statistics.mean(xs):.2f} ± {statistics.stdev(xs):.2f}" if len(xs) >= 2 else f"{xs[0]:.2f}"


def recipe_summary(rows: list[dict]) -> dict[str, dict]:
    """Per recipe: the finished runs' cars_test top-1/top-5 (%) and training wall time (minutes)."""
    out = {}
    for recipe in ("study", "fast"):
        done = [r for r in rows if r["step"] == recipe and r.get("test_top1") is not None]
        out[recipe] = {"runs": len(done), "top1": [100 * r["test_top1"] for r in done],
                       "top5": [100 * r["test_top5"] for r in done],
                       "train_min": [r["train_wall_s"] / 60 for r in done if r.get("train_wall_s")]}
    return out


def write_recipe_results(plans: list[Plan], args: argparse.Namespace, env_info: dict) -> Path:
    rows = [collect(p) for p in plans]
    summary = recipe_summary(rows)
    settings = {"campaign": "recipes", "epochs": args.epochs, "img_size": args.img_size, "seed": args.seed,
                "fast_args": args.fast_args,
                "seeds": args.seeds, "jobs": args.jobs, "milestones": scaled_milestones(args.epochs),
                "data": show_path(args.data), "data_desc": describe_data(args.data), "label": label(args)}
    write_json({"settings": settings, "environment": env_info, "summary": summary, "experiments": rows},
               args.out / "results.json")
    st, fa = summary["study"], summary["fast"]
    # what the runs recorded, not what today's commands would pass: older campaigns validated on cars_test
    trained = [read_options(p.run_dir) for p in plans if (p.run_dir / "config.json").exists()]
    blind = bool(trained) and all(o.get("validate") is False for o in trained)
    fast_budget = f"; fast: `{args.fast_args}`" if args.fast_args else ""
    L = [f"# The study's recipe against --recipe fast (study: {args.epochs} epochs at {args.img_size} px{fast_budget})",
         "",
         f"**{label(args)}.**", "",
         "- each run trains on all of cars_train for exactly the epochs given (no early stopping, no validation "
         "split; " + ("with `--no-validate` nothing is evaluated during training, so metrics.csv's 'val' columns "
                      "are empty" if blind else
                      "the per-epoch 'val' columns of metrics.csv are cars_test, logged and never used to choose")
         + "); the reported figure is evaluate.py on the final model (`final.pt`, the EMA weights for fast), "
         "scored on cars_test once",
         f"- the study's MultiStepLR milestones scaled by round(m * {args.epochs} / {REF_EPOCHS}): "
         f"{' '.join(map(str, scaled_milestones(args.epochs)))}; fast: recipes/fast.yaml"
         + (f" with `{args.fast_args}`" if args.fast_args else "") + ", evaluated with "
         f"{' '.join(FAST_EVAL) or 'no extra flags'}",
         f"- machine: {env_info['cpu']}, {env_info['cores']} cores"
         + (f", GPU {env_info['gpu']}" if env_info.get("gpu") else "") + f"; {args.jobs} run(s) at a time, "
         f"{env_info['threads']} torch thread(s) each (OMP_NUM_THREADS={env_info['OMP_NUM_THREADS']}); "
         f"{'the two recipes of a seed ran side by side, so their wall times share the same machine load' if args.jobs == 2 else 'one run after the other'}",
         f"- versions: Python {env_info['python']}, torch {env_info['torch']}, torchvision {env_info['torchvision']}; "
         f"table written {env_info['date']}", "",
         "| recipe | runs | test top-1 % (mean ± sd) | test top-5 % | train wall, min (mean) |", "|---|---|---|---|---|"]
    for name, r in (("study", st), ("fast", fa)):
        wall = f"{statistics.mean(r['train_min']):.1f}" if r["train_min"] else "–"
        L.append(f"| {name} | {r['runs']} | {_mean_sd(r['top1'])} | {_mean_sd(r['top5'])} | {wall} |")
    if st["top1"] and fa["top1"] and st["train_min"] and fa["train_min"]:
        L += ["", f"fast / study: top-1 x{statistics.mean(fa['top1']) / max(statistics.mean(st['top1']), 1e-9):.2f}, "
                  f"training wall time x{statistics.mean(fa['train_min']) / statistics.mean(st['train_min']):.2f}"]
    L += ["", "| run | seed | test top-1 % | test top-5 % | final train acc % | train wall | s/epoch |",
          "|---|---|---|---|---|---|---|"]
    for r in rows:
        tr = "–" if r.get("final_train_acc") is None else f"{100 * r['final_train_acc']:.1f}"
        L.append(f"| `{r['name']}`{_status(r)} | {args.seed + r['seed_offset']} | {_pct(r.get('test_top1'))} | "
                 f"{_pct(r.get('test_top5'))} | {tr} | {_dur(r.get('train_wall_s'))} | {_sec(r.get('epoch_s_median'))} |")
    L += _budget_pairs(rows, args.seed)
    L += ["", "## Commands", "", "```"]
    return write_md(L, rows, args.out)


BUDGET_TOLERANCE = 0.10  # the fast recipe may train within ±10 % of the study recipe's time (issue #32)


def side_by_side(a: dict, b: dict) -> bool | None:
    """Whether two runs trained at the same time (their started-finished spans overlap for at least 90 % of the
    shorter one), so that their times share the machine's load; None when a span is unrecorded. A campaign
    resumed with --only, or a run copied from another campaign, pairs a run with something else."""
    try:
        (s1, f1), (s2, f2) = [(datetime.datetime.fromisoformat(r["started"]),
                               datetime.datetime.fromisoformat(r["finished"])) for r in (a, b)]
    except (KeyError, TypeError, ValueError):
        return None
    overlap = (min(f1, f2) - max(s1, s2)).total_seconds()
    return overlap >= 0.9 * min((f1 - s1).total_seconds(), (f2 - s2).total_seconds())


def _budget_pairs(rows: list[dict], seed: int) -> list[str]:
    """Each seed's fast run against its study twin: training wall time (the process, start to exit) and the
    sum of metrics.csv's per-epoch seconds (the training loop alone), and whether the fast run kept within the
    budget's ±10 % of the study run's time. A budget measurement only where the twins ran side by side (--jobs
    2): the table says for each pair whether they did."""
    runs_by = {(r["step"], r["seed_offset"]): r for r in rows}
    L = ["", f"Budget: each fast run's training time against its study twin's (allowed: ±{BUDGET_TOLERANCE:.0%}).",
         "", "| seed | study: wall / epochs' sum | fast: wall / epochs' sum | fast / study (wall) | "
         "fast / study (epochs' sum) | twins side by side | within |", "|---|---|---|---|---|---|---|"]
    apart = False
    for k in sorted({o for _, o in runs_by}):
        st, fa = runs_by.get(("study", k)), runs_by.get(("fast", k))
        if not (st and fa and st.get("train_wall_s") and fa.get("train_wall_s")
                and st.get("epochs_s_sum") and fa.get("epochs_s_sum")):
            continue
        wall, loop = fa["train_wall_s"] / st["train_wall_s"], fa["epochs_s_sum"] / st["epochs_s_sum"]
        ok = all(abs(x - 1) <= BUDGET_TOLERANCE for x in (wall, loop))
        together = side_by_side(st, fa)
        apart |= together is not True
        L.append(f"| {seed + k} | {_dur(st['train_wall_s'])} / {_dur(st['epochs_s_sum'])} | "
                 f"{_dur(fa['train_wall_s'])} / {_dur(fa['epochs_s_sum'])} | x{wall:.3f} | x{loop:.3f} | "
                 f"{ {True: 'yes', False: 'no', None: 'unrecorded'}[together]} | {'yes' if ok else 'NO'} |")
    if len(L) <= 5:
        return []  # a table only when a pair finished
    if apart:
        L += ["", "Where the twins did not run side by side, their ratio compares two different pairings on a "
                  "machine whose speed varies by day and neighbour: it is not a budget measurement."]
    return L


def budget_curve(folders: list[Path], out: Path) -> int:
    """budget_curve.png and .md from the results.json of recipes campaigns at several lengths: cars_test
    top-1 against training minutes, one point per run, the mean per recipe and length joined. A campaign run
    with --fast-args (the fast runs at another size or length in the study's time) is a series of its own:
    its study runs ran beside those fast runs, maybe on another machine, and are not pooled with the rest."""
    points, machines, copies = [], [], set()
    for d in folders:
        res = read_json(Path(d) / "results.json")
        if not res or res.get("settings", {}).get("campaign") != "recipes":
            print(f"error: {d}: no recipes-campaign results.json; run --campaign recipes --out {d} first",
                  file=sys.stderr)
            return 2
        copies.add(res["settings"].get("data_desc", THUMBNAILS))  # folders written before it: thumbnails
        env = res.get("environment") or {}  # minutes are only comparable on one machine: say which
        machines.append(f"`{show_path(Path(d))}`: {env.get('cpu', '?')}, {res['settings'].get('jobs', 1)} run(s) "
                        f"at a time, table of {str(env.get('date', '?'))[:10]}")
        for r in res["experiments"]:
            if r.get("test_top1") is not None and r.get("train_wall_s"):
                points.append({"recipe": r["step"], "epochs": res["settings"]["epochs"], "run": r["name"],
                               "fast_args": res["settings"].get("fast_args") or "",
                               "folder": show_path(Path(d)), "minutes": r["train_wall_s"] / 60,
                               "top1": 100 * r["test_top1"], "top5": 100 * r["test_top5"]})
    if not points:
        print("error: no finished runs in those folders", file=sys.stderr)
        return 2
    groups: dict[tuple[str, str, int], list[dict]] = {}
    for p in points:
        groups.setdefault((p["fast_args"], p["recipe"], p["epochs"]), []).append(p)
    rows = sorted({(v, e) for v, _, e in groups})  # plain campaigns ("" sorts first), then by length
    L = ["# Budget curve: cars_test top-1 against training time", "",
         f"**{CARS_TEST}, {' + '.join(sorted(copies))}; each point trains on all of "
         "cars_train and scores the final model.** Where the folders' machines differ, their minutes are not "
         "comparable (the same run's speed differs up to 3x between machines and days). 'epochs' is the "
         "study recipe's length at the campaign's input size; a row with fast flags ran the fast recipe with "
         "them beside its own study runs.", "",
         *[f"- {m}" for m in machines], "",
         "| epochs | study: runs | study: minutes | study: top-1 % | fast: runs | fast: minutes | fast: top-1 % | ahead |",
         "|---|---|---|---|---|---|---|---|"]
    for v, e in rows:
        cells, means = [], {}
        for recipe in ("study", "fast"):
            g = groups.get((v, recipe, e), [])
            t1 = [p["top1"] for p in g]
            means[recipe] = statistics.mean(t1) if t1 else None
            cells += [str(len(g)), f"{statistics.mean(p['minutes'] for p in g):.1f}" if g else "–", _mean_sd(t1)]
        ahead = "–" if None in means.values() else (
            "fast" if means["fast"] > means["study"] else "study" if means["study"] > means["fast"] else "tie")
        L.append(f"| {e}" + (f" (fast: `{v}`)" if v else "") + " | " + " | ".join(cells) + f" | {ahead} |")
    (out / "budget_curve.md").write_text("\n".join(L) + "\n")
    write_json(points, out / "budget_curve.json")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed, so no budget_curve.png", file=sys.stderr)
        return 0
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    variants = sorted({v for v, _ in rows})
    for recipe, colour in (("study", "tab:blue"), ("fast", "tab:orange")):
        for i, v in enumerate(variants):
            lengths = [e for w, e in rows if w == v and (v, recipe, e) in groups]
            if not lengths:
                continue
            pts = [p for e in lengths for p in groups[(v, recipe, e)]]
            marker = "os^D"[i % 4]
            ax.scatter([p["minutes"] for p in pts], [p["top1"] for p in pts], color=colour, alpha=0.4, s=18,
                       marker=marker)
            mean = [(statistics.mean(p["minutes"] for p in groups[(v, recipe, e)]),
                     statistics.mean(p["top1"] for p in groups[(v, recipe, e)])) for e in lengths]
            name = f"--recipe {recipe}" + ((f" {v}" if recipe == "fast" else f" (beside fast {v})") if v else "")
            ax.plot(*zip(*mean), marker=marker, linestyle="-" if not v else ":", color=colour, label=name)
            for (x, y), e in zip(mean, lengths):
                ax.annotate(f"{e}-ep budget" if v else f"{e} ep", (x, y), textcoords="offset points",
                            xytext=(4, 5) if v else (4, -10), fontsize=7, color=colour)  # apart at one length
    ax.set_xlabel("training wall time (minutes; each folder's machine in budget_curve.md)")
    ax.set_ylabel("cars_test top-1 (%)")
    ax.set_title(f"GhostNet from scratch, Stanford Cars {' + '.join(sorted(copies))}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "budget_curve.png", dpi=110)
    plt.close(fig)
    print(f"wrote {out / 'budget_curve.png'}, {out / 'budget_curve.md'}")
    return 0


def search_table(folder: Path) -> int:
    """results.md for a folder of train.py run folders on a validation split (the runs a recipe was chosen
    from): each run's options that differ from the first run's, and validation top-1 / top-5 / loss at a
    few shared epochs and at its last epoch, from metrics.csv and config.json."""
    run_dirs = [d for d in Path(folder).iterdir() if (d / "metrics.csv").exists() and (d / "config.json").exists()]
    # in the order they started: the first run is the one the others are compared with
    run_dirs.sort(key=lambda d: ((read_json(d / "config.json") or {}).get("started") or "", d.name))
    if not run_dirs:
        print(f"error: {folder}: no run folders (metrics.csv + config.json)", file=sys.stderr)
        return 2
    opts = {d.name: read_options(d) for d in run_dirs}
    ignore = {"name", "out", "resume", "command", "data", "cache_dir", "dist_timeout", "resume_if_exists",
              "workers"}  # no effect on a run
    base = opts[run_dirs[0].name]
    marks = (4, 8, 12, 20)
    L = [f"# Choosing --recipe fast on the validation split ({show_path(Path(folder))})", "",
         "Validation = a stratified 10 % of cars_train (555 images, `--val-split 0.1`, seed 0); cars_test was not "
         "looked at. With one seed a top-1 difference under about 1.5 points (8 images) is noise; the "
         "validation loss is the steadier signal. Runs stopped early (to free the core for the next) end before "
         "their --epochs. Runs named `<candidate>_s<k>` are seeds of one candidate: their means are below the "
         "table.", "",
         "| run | options (against the first run's) | epochs run / planned | "
         + " | ".join(f"ep {m}: top-1 / top-5 / loss" for m in marks) + " | last: top-1 / top-5 / loss | train acc (last) |",
         "|---|---|---|" + "---|" * (len(marks) + 2)]
    for d in run_dirs:
        o = opts[d.name]
        diff = ", ".join(f"{k}={o[k]}" for k in sorted(o) if k not in ignore and o.get(k) != base.get(k)
                         and not (k not in base and not o[k])) or "–"  # a since-removed option, off, is no change
        if (d / "NOTE.md").exists():  # a run of code that is not in train.py (a prototype): config.json can't say
            diff += f"; **not train.py as it is: see [NOTE.md]({d.name}/NOTE.md)**"
        rows = read_metrics_csv(d / "metrics.csv")
        by = {int(r["epoch"]): r for r in rows}
        cell = lambda r: (f"{100 * float(r['val_acc']):.1f} / {100 * float(r['val_top5']):.1f} / "  # noqa: E731
                          f"{float(r['val_loss']):.3f}") if r else "–"
        L.append(f"| `{d.name}` | {diff} | {len(rows)} / {o.get('epochs')} | "
                 + " | ".join(cell(by.get(m)) for m in marks) + f" | {cell(rows[-1])} | "
                 f"{100 * float(rows[-1]['train_acc']):.1f} |")
    L += seed_means(run_dirs, opts)
    L += ["", f"Written by `python benchmarks/experiments.py --search-table {show_path(Path(folder))}`.", ""]
    (Path(folder) / "results.md").write_text("\n".join(L))
    print(f"wrote {Path(folder) / 'results.md'}")
    return 0


# ---------------------------------------------------------------------------------------------- estimate
def seed_means(run_dirs: list[Path], opts: dict[str, dict]) -> list[str]:
    """Runs named <candidate>_s<k> grouped by candidate: the last epoch's validation figures per seed and their
    mean (the score docs/recipes_crops.md decides on), with the training time."""
    groups: dict[str, list[Path]] = {}
    for d in run_dirs:
        m = re.fullmatch(r"(.+)_s(\d+)", d.name)
        if m:
            groups.setdefault(m.group(1), []).append(d)
    if not groups:
        return []
    L = ["", "## Means over seeds (last epoch)", "",
         "| candidate | seeds | top-1 per seed | mean top-1 | mean top-5 | mean loss | mean train acc | "
         "training min (mean) |", "|---|---|---|---|---|---|---|---|"]
    for name, dirs in groups.items():
        rows = [read_metrics_csv(d / "metrics.csv") for d in dirs]
        last = [r[-1] for r in rows]
        done = [len(r) == opts[d.name].get("epochs") for r, d in zip(rows, dirs)]
        mean = lambda k: statistics.fmean(float(r[k]) for r in last)  # noqa: E731
        minutes = statistics.fmean(sum(float(e["seconds"]) for e in r) for r in rows) / 60
        per_seed = ", ".join(f"{100 * float(r['val_acc']):.1f}" + ("" if ok else " (unfinished)")
                             for r, ok in zip(last, done))
        L.append(f"| `{name}` | {len(dirs)} | {per_seed} | {100 * mean('val_acc'):.2f} | "
                 f"{100 * mean('val_top5'):.2f} | {mean('val_loss'):.3f} | {100 * mean('train_acc'):.1f} | "
                 f"{minutes:.1f} |")
    return L


def estimate(plans: list[Plan], args: argparse.Namespace, env: dict) -> int:
    """2 epochs of each distinct architecture at the best recipe on --estimate-images training images (the
    second epoch's speed counts: no warm-up); projects the campaign's wall time (an upper bound: early
    stopping is not foreseen; on a CPU shared with other jobs, a pessimistic one)."""
    sys.path.insert(0, str(REPO))
    import data
    spec = data.find_dataset(str(args.data))
    sizes = {}
    for off in sorted({p.exp.seed_offset for p in plans}):
        s = data.make_splits(spec, val_split=args.val_split, seed=args.seed + off)
        sizes[off] = (len(s["train"]), len(s["val"]), len(s["test"]))
    best = next(e for e in experiments(args.epochs) if e.name == "d_c50_best")
    archs = []
    for p in plans:
        a = p.exp.flags[p.exp.flags.index("--arch") + 1]
        if a not in archs:
            archs.append(a)
    speed = {}
    tmp = Path(tempfile.mkdtemp(prefix="experiments-estimate-"))
    try:
        for a in archs:
            flags = list(best.flags)
            flags[flags.index("--arch") + 1] = a
            argv = [args.train_script, "--data", str(args.data), "--out", str(tmp), "--name", a, "--img-size",
                    str(args.img_size), "--epochs", "2", "--seed", str(args.seed), "--val-split", str(args.val_split),
                    "--limit-train", str(args.estimate_images), "--limit-val", str(args.estimate_images // 2),
                    *(["--threads", str(args.threads)] if args.threads else []),
                    *(["--batch-size", str(args.batch_size)] if args.batch_size else []),
                    *(["--device", args.device] if args.device else []), *flags]
            argv[1:1] = shlex.split(args.train_args)  # before --limit-train etc., which win
            proc = subprocess.Popen([sys.executable, *argv], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
            try:
                _, err = proc.communicate()
            finally:
                if proc.poll() is None:
                    proc.terminate()
                    proc.wait()
            rows = read_metrics_csv(tmp / a / "metrics.csv")
            if proc.returncode != 0 or len(rows) < 2:
                print(f"estimate: {a}: train.py exited {proc.returncode}\n{err[-2000:]}", file=sys.stderr)
                return 1
            row = rows[-1]  # epoch 2: past the first steps' warm-up
            n_tr, secs, ips = min(args.estimate_images, sizes[0][0]), float(row["seconds"]), float(row["img_per_s"])
            n_va = min(args.estimate_images // 2, sizes[0][1])
            val_s = max(secs - n_tr / ips, 1e-3)
            speed[a] = (ips, n_va / val_s)
            print(f"estimate: {a}: train {ips:.0f} img/s, validation {n_va / val_s:.0f} img/s "
                  f"({n_tr} + {n_va} images, {args.img_size} px)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    total = 0.0
    print(f"\nprojected wall time, {args.epochs} epochs each, no early stop (an upper bound):")
    for p in plans:
        a = p.exp.flags[p.exp.flags.index("--arch") + 1]
        tr, va, te = sizes[p.exp.seed_offset]
        ips, vps = speed[a]
        secs = args.epochs * (tr / ips + va / vps) + te / vps + 30  # + ~30 s evaluate.py timing/start-up
        total += secs
        print(f"  {p.exp.name:24s} {a:20s} {_dur(secs):>8s}")
    print(f"estimate: the whole campaign ({len(plans)} runs) projects to {_dur(total)} ({total / 3600:.1f} h) on "
          f"this machine ({os.cpu_count()} cores, threads {args.threads or 'torch default'})")
    return 0


# ------------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--campaign", default="study", choices=["study", "recipes"],
                    help="study: the ablation ladder and architectures; recipes: the study's recipe against "
                         "--recipe fast, --seeds seeds each, on all of cars_train, final model scored")
    ap.add_argument("--seeds", type=int, default=RECIPE_SEEDS, help="recipes campaign: seeds per recipe")
    ap.add_argument("--fast-args", default="",
                    help="recipes campaign: extra train.py arguments for the fast runs only (one string), e.g. "
                         "'--img-size 128x96 --epochs 34' to spend the same wall time at another input size")
    ap.add_argument("--jobs", type=int, default=1, choices=[1, 2],
                    help="runs at a time; 2 runs the two recipes of a seed side by side, one thread each "
                         "(same machine load for both, ~1.2x the throughput of one 2-thread run on 2 cores)")
    ap.add_argument("--budget-curve", nargs="+", type=Path, metavar="DIR",
                    help="plot cars_test top-1 against training minutes from recipes campaigns' folders; "
                         "writes budget_curve.png/.md/.json into --out")
    ap.add_argument("--search-table", type=Path, metavar="DIR",
                    help="write DIR/results.md: a table of the train.py run folders in DIR (a recipe search)")
    ap.add_argument("--only", nargs="+", metavar="NAME", help="run only these experiments (see --list)")
    ap.add_argument("--list", action="store_true", help="list the experiments and their flags")
    ap.add_argument("--dry-run", action="store_true", help="print the exact commands, run nothing")
    ap.add_argument("--estimate", action="store_true",
                    help="2 short epochs per architecture (--estimate-images images); prints the projected wall time")
    ap.add_argument("--estimate-images", type=int, default=512)
    ap.add_argument("--epochs", type=int, default=40, help="epochs per run (default: 40)")
    ap.add_argument("--img-size", type=int, default=96, help="input size in px (default: 96)")
    ap.add_argument("--seed", type=int, default=0, help="seed of every run; (f) adds 1 and 2 (default: 0)")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help=f"dataset (default: {show_path(DEFAULT_DATA)})")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"run folders (default: {show_path(DEFAULT_OUT)})")
    ap.add_argument("--skip-done", action="store_true",
                    help="reuse finished run folders, continue unfinished ones (resume a campaign)")
    ap.add_argument("--val-split", type=float, default=0.1,
                    help="validation = this stratified fraction of cars_train (0: the test split, as the study)")
    ap.add_argument("--patience", type=int, default=None,
                    help=f"early stopping (default: the study's {REF_PATIENCE} scaled to --epochs; 0 = off)")
    ap.add_argument("--batch-size", type=int, default=None, help="default: train.py's (64)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads for train.py and evaluate.py")
    ap.add_argument("--device", default=None, help="train/evaluate --device (default: theirs, auto)")
    ap.add_argument("--eval-runs", type=int, default=30, help="evaluate.py --runs (latency timing)")
    ap.add_argument("--train-args", default="", help="extra train.py arguments (one string), e.g. for smoke runs")
    ap.add_argument("--train-script", default="train.py",
                    help="run this script in train.py's place, with the same arguments (a wrapper that sets up "
                         "a cluster's environment, or tests/train_hooks.py)")
    ap.add_argument("--eval-args", default="", help="extra evaluate.py arguments (one string)")
    return ap


def _terminated(signum, frame):
    # Under --jobs 2 the runs are waited on in worker threads, which SystemExit in the main thread does not
    # reach: stop the children here, so each keeps its last.pt and exits, and their threads return.
    for proc in list(_LIVE):
        if proc.poll() is None:
            proc.terminate()
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.epochs < 1 or args.img_size < 8:
        print("error: --epochs must be >= 1 and --img-size >= 8", file=sys.stderr)
        return 2
    args.data, args.out = args.data.resolve(), args.out.resolve()
    if args.search_table:
        return search_table(args.search_table)
    if args.budget_curve:
        args.out.mkdir(parents=True, exist_ok=True)
        return budget_curve(args.budget_curve, args.out)
    if args.campaign == "recipes":
        # fixed-length runs on all of cars_train: nothing may be chosen on the reported images
        args.val_split, args.patience = 0.0, 0
        if args.out == DEFAULT_OUT.resolve():
            args.out = (DEFAULT_OUT.parent / f"recipes_{args.epochs}ep").resolve()
    if args.jobs > 1 and not args.threads:
        args.threads = 1  # two runs on two cores: one OpenMP thread each, or they thrash
    if args.patience is None:
        args.patience = scale_epochs(REF_PATIENCE, args.epochs)
    registry = (experiments(args.epochs) if args.campaign == "study" else
                recipe_experiments(args.epochs, args.seeds, shlex.split(args.fast_args)))
    names = [e.name for e in registry]
    if args.only:
        unknown = [n for n in args.only if n not in names]
        if unknown:
            print(f"error: unknown experiment(s) {', '.join(unknown)}; choose from: {', '.join(names)}",
                  file=sys.stderr)
            return 2
    all_plans = [plan(e, args) for e in registry]
    plans = [p for p in all_plans if not args.only or p.exp.name in args.only]

    if args.list:
        print(f"{len(registry)} experiments ({args.epochs} epochs, milestones "
              f"{' '.join(map(str, scaled_milestones(args.epochs)))} = round(m * {args.epochs} / {REF_EPOCHS}) of "
              f"{' '.join(map(str, REF_MILESTONES))}):")
        for e in registry:
            print(f"{e.name:24s} {e.study:30s} {'+'.join(e.groups):18s} {e.step:6s} {e.what}\n"
                  f"{'':24s} seed+{e.seed_offset} {shlex.join(e.flags)}")
        return 0
    if args.dry_run:
        for p in plans:
            note = f"  # {state(p)}" if (p.run_dir.exists()) else ""
            print(f"# {p.exp.name} ({p.exp.study}){note}\n{display(p.train)}\n{display(p.evaluate)}")
        return 0

    env = dict(os.environ, PYTHONUNBUFFERED="1")  # the subprocesses' lines arrive as they are printed
    if args.jobs > 1:
        env["OMP_NUM_THREADS"] = os.environ["OMP_NUM_THREADS"] = str(args.threads)  # recorded by environment()
    if args.estimate:
        return estimate(plans, args, env)

    from tqdm import tqdm
    args.out.mkdir(parents=True, exist_ok=True)
    gi = args.out / ".gitignore"
    if not gi.exists():
        gi.write_text(GITIGNORE)
    if not args.skip_done:  # fail before hours of work, not in the middle
        busy = [p.exp.name for p in plans if state(p) != "empty"]
        if busy:
            print(f"error: run folder(s) already present under {args.out}: {', '.join(busy)}; pass --skip-done "
                  f"to reuse finished runs and continue unfinished ones, or remove them", file=sys.stderr)
            return 2
    env_info = environment(args)
    write_tables = write_results if args.campaign == "study" else write_recipe_results

    def write() -> Path:  # the tables say when they were written, not when the campaign started
        now = datetime.datetime.now().isoformat(timespec="seconds")
        return write_tables(all_plans, args, {**env_info, "date": now})
    if args.campaign == "recipes" and args.jobs > 1:
        for w in unpaired_batches(plans, args.jobs):
            print(f"note: {w}", file=sys.stderr)
    failed = []
    t0 = time.perf_counter()
    bar = tqdm(total=len(plans), desc="experiments", unit="run", dynamic_ncols=True)
    try:
        for batch in batches(plans, args.jobs):
            bar.set_postfix_str(" + ".join(p.exp.name for p in batch))
            if len(batch) == 1:
                ok = [run_one(batch[0], args, env, tqdm.write)]
            else:  # side by side: each a subprocess, so threads here only wait on them
                from concurrent.futures import ThreadPoolExecutor
                with ThreadPoolExecutor(len(batch)) as pool:
                    ok = list(pool.map(lambda p: run_one(p, args, env, tqdm.write), batch))
            failed += [p.exp.name for p, good in zip(batch, ok) if not good]
            bar.update(len(batch))
            write()
    except KeyboardInterrupt:
        write()
        print("\ninterrupted; finished runs are kept; continue with the same command plus --skip-done",
              file=sys.stderr)
        return 130
    finally:
        bar.close()
    res = write()
    print(f"{len(plans) - len(failed)}/{len(plans)} experiments done in {_dur(time.perf_counter() - t0)}; wrote {res} "
          f"and {args.out / 'results.json'}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _terminated)  # cleanup (children, temp folders) runs on `kill` too
    sys.exit(main())
