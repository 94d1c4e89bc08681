"""train.py with faults a test asks for, put in from outside, so train.py itself carries no test hook:

    python tests/train_hooks.py [--step-sleep S] [--nan-from-step N] [--late-rank-on-restart R] <train.py arguments>

--step-sleep S: every optimizer step takes S seconds longer, so a test can kill or signal a run inside an
epoch. --nan-from-step N: the training loss is NaN from global optimizer step N on (counted as train.py
counts them, resumed runs included), to reach the non-finite-loss path. --late-rank-on-restart R: after a
torchrun restart, rank R starts 3 s after the others, so the others reach the process group's set-up first
(the order that once read a dead attempt's addresses). Under torchrun give this file in place of train.py."""
import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train  # noqa: E402


class NanFromStep(torch.nn.Module):
    """Wraps the training criterion: NaN once the step being taken (prog.step + 1) reaches `first`. Only
    training calls count; validation runs without autograd."""

    def __init__(self, criterion: torch.nn.Module, prog, first: int) -> None:
        super().__init__()
        self.criterion, self.prog, self.first = criterion, prog, first

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        loss = self.criterion(logits, labels)
        if torch.is_grad_enabled() and self.prog.step + 1 >= self.first:
            loss = loss * float("nan")
        return loss


def install(step_sleep: float, nan_from_step: int | None) -> None:
    if step_sleep:
        optimizer_step = train.optimizer_step

        def slow_step(*args, **kwargs):
            optimizer_step(*args, **kwargs)
            time.sleep(step_sleep)
        train.optimizer_step = slow_step
    if nan_from_step is not None:
        train_epoch = train.train_epoch

        def epoch_with_nan(args, env, d, learner, prog, *rest, **kwargs):
            if not isinstance(learner.criterion, NanFromStep):
                learner.criterion = NanFromStep(learner.criterion, prog, nan_from_step)
            return train_epoch(args, env, d, learner, prog, *rest, **kwargs)
        train.train_epoch = epoch_with_nan


def main() -> int:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--step-sleep", type=float, default=0.0)
    p.add_argument("--nan-from-step", type=int, default=None)
    p.add_argument("--late-rank-on-restart", type=int, default=None)
    hooks, rest = p.parse_known_args(sys.argv[1:])
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
    if restarted and hooks.late_rank_on_restart == int(os.environ.get("RANK", "-1")):
        time.sleep(3.0)
    install(hooks.step_sleep, hooks.nan_from_step)
    return train.main(rest)


if __name__ == "__main__":
    sys.exit(main())
