"""The run folder, runs/<name>/: the only code that writes and reads its files.

    config.json    the resolved configuration (config.py's schema) and a record of when, where and with what
    metrics.csv    one row per completed epoch (METRIC_FIELDS)
    last.pt        everything an exact resume needs, after every epoch (or at a stop inside one)
    best.pt        the model of the best validation accuracy so far (model only: a third of last.pt)
    final.pt       the model at the end of a completed run
    curves.png     learning rate, loss and accuracy per epoch
    events.out.tfevents.*   TensorBoard (tracking.py)

Checkpoints hold plain types only, so torch.load(weights_only=True) reads them: a file that would run code
while unpickling is refused, never executed. Their "config" is config.Config.to_dict(); checkpoints of
older code (format version 1) kept argparse's flat names, and config_of() reads both.
"""
from __future__ import annotations

import csv
import datetime
import platform
import subprocess
import json
import pickle
import sys
from pathlib import Path
from typing import Any

import torch

import config as C
from common import atomic_save, atomic_write, atomic_write_text
from model import ARCHS, build_model

CHECKPOINT_FORMAT = "ghostcars-v1"  # the family: every version below reads as this format
CHECKPOINT_VERSION = 2  # 1: config as argparse's flat names; 2: config.Config.to_dict() (nested by section)
METRIC_FIELDS = ["epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "val_top5", "seconds", "img_per_s"]
TIMING_FIELDS = ("seconds", "img_per_s")
_REQUIRED_KEYS = ("format", "arch", "num_classes", "class_names", "model_options", "preprocess", "model")
_PREPROCESS_KEYS = ("img_size", "grayscale", "normalize", "mean", "std", "crop_bbox", "bbox_margin",
                    "erase_background")
REPO = Path(__file__).resolve().parent


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message is one line naming the file and the fix."""


class RunFolder:
    """One run's folder and the names of its files."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.config_json = self.path / "config.json"
        self.metrics_csv = self.path / "metrics.csv"
        self.curves_png = self.path / "curves.png"
        self.last, self.best, self.final = (self.path / n for n in ("last.pt", "best.pt", "final.pt"))

    def __str__(self) -> str:
        return str(self.path)

    def write_config(self, cfg: C.Config, record: dict[str, Any]) -> None:
        atomic_write_text(json.dumps({"config": cfg.to_dict(), **record}, indent=2) + "\n", self.config_json)

    def read_config(self) -> tuple[C.Config, dict[str, Any]]:
        """(configuration, record) of this code's config.json or of an older one (flat "options")."""
        return read_config_json(self.config_json)

    def read_metrics(self) -> list[dict]:
        return read_metrics(self.metrics_csv)

    def write_metrics(self, rows: list[dict]) -> None:
        lines = [",".join(METRIC_FIELDS)]
        for r in rows:
            lines.append(",".join(str(r[k]) if k == "epoch" else f"{r[k]:.6g}" for k in METRIC_FIELDS))
        atomic_write_text("\n".join(lines) + "\n", self.metrics_csv)

    def save(self, ckpt: dict, path: Path) -> None:
        atomic_save(ckpt, path)


def read_config_json(path: Path) -> tuple[C.Config, dict[str, Any]]:
    doc = json.loads(Path(path).read_text())
    if isinstance(doc.get("config"), dict):
        return C.from_saved(doc["config"], str(path)), {k: v for k, v in doc.items() if k != "config"}
    return C.from_saved(doc.get("options") or {}, str(path)), {k: v for k, v in doc.items() if k != "options"}


def read_metrics(path: str | Path) -> list[dict]:
    """metrics.csv's rows ({} of a missing file): epoch as int, every other column as float."""
    path = Path(path)
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return [{k: (int(v) if k == "epoch" else float(v)) for k, v in row.items() if v not in (None, "")}
                for row in csv.DictReader(f)]


# ----------------------------------------------------------------------------------------------------------
# checkpoints

def model_file(ckpt: dict, ema_state: dict | None = None) -> dict:
    """best.pt / final.pt from last.pt's dict: what inference needs (a third of last.pt), the averaged
    weights when given (--ema)."""
    out = {k: v for k, v in ckpt.items() if k not in ("optimizer", "scheduler", "scaler", "rng", "early_stop", "ema")}
    if ema_state is not None:
        out["model"] = ema_state
    return out


def config_of(ckpt: dict) -> C.Config:
    """The training configuration a checkpoint carries (nested: version 2; flat: version 1)."""
    return C.from_saved(ckpt.get("config") or {}, "checkpoint config")


def load_checkpoint(path: str | Path) -> dict:
    """Read and validate a checkpoint written by train.py, on the CPU with weights_only=True. Raises
    CheckpointError."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file; pass the best.pt / last.pt of a run folder (runs/<name>/)")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a file; pass the best.pt / last.pt inside the run folder")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # weights_only refuses globals / calls it does not allow (what a code-running pickle needs);
        # other unpickling errors mean a damaged or foreign file
        if any(k in str(e) for k in ("Unsupported global", "GLOBAL", "not an allowed global", "reduce",
                                     "Unsupported class")):
            raise CheckpointError(f"refusing to load {path}: it holds a pickled object that could run code "
                                  f"(weights_only); use a checkpoint written by train.py") from None
        raise CheckpointError(f"{path}: not a checkpoint or corrupt ({_first_line(e)}); "
                              f"use a best.pt / last.pt written by train.py") from None
    except Exception as e:  # torch raises RuntimeError, EOFError, ValueError... for damaged files
        raise CheckpointError(f"{path}: not a checkpoint or corrupt ({_first_line(e)}); "
                              f"use a best.pt / last.pt written by train.py") from None
    _validate(ckpt, path)
    return ckpt


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:160]}" if text else type(e).__name__


def _validate(ckpt: object, path: Path) -> None:
    fix = "use a checkpoint written by train.py"
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a {CHECKPOINT_FORMAT} checkpoint; {fix}")
    if int(ckpt.get("version", 1)) > CHECKPOINT_VERSION:
        raise CheckpointError(f"{path}: checkpoint version {ckpt['version']} is newer than this code's "
                              f"{CHECKPOINT_VERSION}; update the code (git pull)")
    missing = [k for k in _REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {', '.join(missing)}; {fix}")
    arch = ckpt["arch"]
    if arch not in ARCHS:
        raise CheckpointError(f"{path}: unknown arch '{arch}' (known: {', '.join(ARCHS)}); {fix}")
    n, names = ckpt["num_classes"], ckpt["class_names"]
    if not isinstance(n, int) or n < 1:
        raise CheckpointError(f"{path}: num_classes {n!r} is not a positive integer; {fix}")
    if not isinstance(names, list) or len(names) != n:
        got = len(names) if isinstance(names, list) else type(names).__name__
        raise CheckpointError(f"{path}: {got} class_names for num_classes={n}; {fix}")
    prep = ckpt["preprocess"]
    missing = [k for k in _PREPROCESS_KEYS if not isinstance(prep, dict) or k not in prep]
    if missing:
        raise CheckpointError(f"{path}: preprocess lacks {', '.join(missing)}; {fix}")
    opts = ckpt["model_options"]
    if not isinstance(opts, dict) or not isinstance(ckpt["model"], dict):
        raise CheckpointError(f"{path}: model_options / model must be dicts; {fix}")
    _validate_weights(ckpt, path, fix)


def _validate_weights(ckpt: dict, path: Path, fix: str) -> None:
    """Shapes against the architecture built on the meta device (no memory, no init cost); finite values."""
    arch, n = ckpt["arch"], ckpt["num_classes"]
    try:
        with torch.device("meta"):
            ref = build_model(arch, n, **_model_options(ckpt["model_options"]))
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: bad model_options {ckpt['model_options']} ({e}); {fix}") from None
    want, got = ref.state_dict(), ckpt["model"]
    miss = [k for k in want if k not in got]
    extra = [k for k in got if k not in want]
    if miss or extra:
        raise CheckpointError(f"{path}: weights do not fit {arch} ({len(miss)} missing, e.g. {miss[:1]}; "
                              f"{len(extra)} unexpected, e.g. {extra[:1]}); {fix}")
    for k, v in want.items():
        g = got[k]
        if not isinstance(g, torch.Tensor) or g.shape != v.shape:
            shape = tuple(g.shape) if isinstance(g, torch.Tensor) else type(g).__name__
            if k == _classifier_key(want):
                raise CheckpointError(f"{path}: classifier {k} has shape {shape}, which does not fit "
                                      f"num_classes={n} ({len(ckpt['class_names'])} class_names); {fix}")
            raise CheckpointError(f"{path}: {k} has shape {shape}, expected {tuple(v.shape)}; {fix}")
        if g.is_floating_point() and not bool(torch.isfinite(g).all()):
            raise CheckpointError(f"{path}: {k} holds NaN or inf values (saved from a diverged run?); "
                                  f"use an earlier checkpoint")


def _classifier_key(state_dict: dict) -> str:
    """The weight of the last layer (the one whose first dimension is num_classes)."""
    return [k for k in state_dict if k.endswith("weight")][-1]


def _model_options(opts: dict) -> dict:
    keep = ("out_channels", "dropout", "in_channels", "width")
    return {k: opts[k] for k in keep if k in opts}


def model_from_checkpoint(ckpt: dict, ghost_op: str = "auto") -> torch.nn.Module:
    """The checkpoint's model with its weights loaded, in eval mode, on the CPU."""
    model = build_model(ckpt["arch"], ckpt["num_classes"], **_model_options(ckpt["model_options"]), ghost_op=ghost_op)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise CheckpointError(f"weights do not fit {ckpt['arch']} ({_first_line(e)}); "
                              f"use a checkpoint written by train.py") from None
    return model.eval()


def newest_checkpoint(name: str = "best.pt") -> Path | None:
    """The most recently written runs/*/<name> (in the working directory, else next to this file)."""
    found: list[Path] = []
    for runs in dict.fromkeys([Path("runs").resolve(), REPO / "runs"]):
        found += runs.glob(f"*/{name}")
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


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


def machine_record() -> dict[str, Any]:
    """When, where and with what a run started: for config.json."""
    import ghost_ext
    return {"versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "torchvision": version_of("torchvision"), "numpy": version_of("numpy"),
                         "ghost_ext_compiled": ghost_ext.has_extension()},
            "git_commit": git_commit(), "platform": platform.platform(),
            "started": datetime.datetime.now().isoformat(timespec="seconds")}


def version_of(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except ImportError:
        return None


# ----------------------------------------------------------------------------------------------------------
# curves.png

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
