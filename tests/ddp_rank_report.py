"""train.py, plus one thing for tests/test_ddp.py: after each epoch every rank writes ddp_rank<r>.json into the run
folder (its weights' hash, the step, the validation images it saw), so a test can check that all ranks agree.

    python -m torch.distributed.run --nproc_per_node 2 tests/ddp_rank_report.py <train.py arguments>

It reports through train.main's public Hooks; train.py itself carries no test code."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import train  # noqa: E402
from train_hooks import state_hash  # noqa: E402


class RankReport(train.Hooks):
    def after_epoch(self, env, d, learner, prog, val, run) -> None:
        report = {"rank": env.rank, "world_size": env.world, "epoch": prog.epoch, "step": prog.step,
                  "train_steps": len(d.train_loader), "val_seen_rank": val["seen_rank"],
                  "val_seen": val["seen"], "val_acc": val["val_acc"], "val_loss": val["val_loss"],
                  "state_sha256": state_hash(learner.model.state_dict())}
        (run.path / f"ddp_rank{env.rank}.json").write_text(json.dumps(report) + "\n")


if __name__ == "__main__":
    sys.exit(train.main(hooks=RankReport()))
