"""Experiment tracking: TensorBoard event files in the run folder (`tensorboard --logdir runs`).

Every scalar is logged against the optimizer step, so a resumed run continues its curves: the writer
purges what an earlier session logged after the step last.pt holds (TensorBoard's purge_step), as
metrics.csv drops its rows past that epoch. Tags:
    step/loss, step/lr                        at the loop's log points (every few steps)
    epoch/train_loss, epoch/train_acc, epoch/val_loss, epoch/val_acc, epoch/val_top5, epoch/img_per_s, epoch/lr
    hparams                                   the configuration with the final metrics (end of a completed run)
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

EPOCH_TAGS = ("lr", "train_loss", "train_acc", "val_loss", "val_acc", "val_top5", "img_per_s")


class Tracker:
    """A SummaryWriter that does nothing when off (--no-tensorboard, ranks other than 0)."""

    def __init__(self, run_dir: Path | None, resume_step: int | None = None) -> None:
        self.writer = None
        if run_dir is not None:
            from torch.utils.tensorboard import SummaryWriter  # imported only when used: it is slow to import
            # purge_step: events of an earlier session at or after this step are dropped when read back
            self.writer = SummaryWriter(str(run_dir), purge_step=None if resume_step is None else resume_step + 1,
                                        flush_secs=30)

    def step(self, step: int, loss: float, lr: float) -> None:
        if self.writer:
            self.writer.add_scalar("step/loss", loss, step)
            self.writer.add_scalar("step/lr", lr, step)

    def epoch(self, step: int, row: dict[str, float]) -> None:
        """One metrics.csv row, at the step that ended its epoch."""
        if self.writer:
            for k in EPOCH_TAGS:
                self.writer.add_scalar(f"epoch/{k}", row[k], step)
            self.writer.flush()

    def hparams(self, options: dict[str, Any], final: dict[str, float], step: int) -> None:
        """The flat configuration (TensorBoard takes numbers, strings and booleans; others as text) with the
        final metrics, in this run's own event file (SummaryWriter.add_hparams would open another one)."""
        if not self.writer:
            return
        from torch.utils.tensorboard.summary import hparams
        hp = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in options.items()}
        metrics = {f"hparam/{k}": v for k, v in final.items()}
        for summary in hparams(hp, metrics):
            self.writer.file_writer.add_summary(summary)
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, step)

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.writer:
            self.writer.close()


def add_confusion_image(run_dir: Path, png: Path, step: int = 0) -> None:
    """evaluate.py's confusion-matrix picture, as an image in the run's TensorBoard."""
    import numpy as np
    from PIL import Image
    from torch.utils.tensorboard import SummaryWriter
    with Image.open(png) as im:
        arr = np.asarray(im.convert("RGB"))
    w = SummaryWriter(str(run_dir))
    w.add_image(f"evaluate/{png.stem}", arr, step, dataformats="HWC")
    w.close()
