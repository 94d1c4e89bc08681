"""train.py with faults a test asks for, put in through train.main's public Hooks, so train.py itself
carries no test code:

    python tests/train_hooks.py [--step-sleep S] [--nan-from-step N] [--late-rank-on-restart R] <train.py arguments>

--step-sleep S: every optimizer step takes S seconds longer, so a test can kill or signal a run inside an
epoch. --nan-from-step N (N >= 2): the weights turn NaN after global optimizer step N - 1, so the training
loss is NaN from step N on (counted as train.py counts them, resumed runs included), to reach the
non-finite-loss path. --late-rank-on-restart R: after a torchrun restart, rank R starts 3 s after the
others, so the others reach the process group's set-up first (the order that once read a dead attempt's
addresses). Under torchrun give this file in place of train.py."""
import argparse
import hashlib
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train  # noqa: E402


def state_hash(state: dict) -> str:
    """sha256 of every tensor of a state_dict (keys sorted): equal hashes = bit-identical weights and buffers."""
    h = hashlib.sha256()
    for k, v in sorted(state.items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class Faults(train.Hooks):
    def __init__(self, step_sleep: float, nan_from_step: int | None) -> None:
        if nan_from_step is not None and nan_from_step < 2:
            raise SystemExit("--nan-from-step takes 2 or more (the weights turn NaN after the step before)")
        self.step_sleep, self.nan_from_step = step_sleep, nan_from_step

    def after_step(self, prog, learner) -> None:
        if self.nan_from_step is not None and prog.step + 1 == self.nan_from_step:
            with torch.no_grad():
                next(learner.model.parameters()).fill_(float("nan"))
        if self.step_sleep:
            time.sleep(self.step_sleep)


def main() -> int:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--step-sleep", type=float, default=0.0)
    p.add_argument("--nan-from-step", type=int, default=None)
    p.add_argument("--late-rank-on-restart", type=int, default=None)
    hooks, rest = p.parse_known_args(sys.argv[1:])
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
    if restarted and hooks.late_rank_on_restart == int(os.environ.get("RANK", "-1")):
        time.sleep(3.0)
    return train.main(rest, hooks=Faults(hooks.step_sleep, hooks.nan_from_step))


if __name__ == "__main__":
    sys.exit(main())
