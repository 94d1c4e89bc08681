"""train.py, plus one thing for tests/test_ddp.py: after each epoch every rank writes ddp_rank<r>.json into the run
folder (its weights' hash, the step, the validation images it saw), so a test can check that all ranks agree.

    python -m torch.distributed.run --nproc_per_node 2 tests/ddp_rank_report.py <train.py arguments>

It wraps three of train.py's functions from outside; train.py itself carries no test hook."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train  # noqa: E402

_validate, _end_epoch, _report_epoch = train.validate, train.end_epoch, train.report_epoch
seen: dict = {}  # this epoch's pieces, gathered from the calls train() makes in order


def validate(env, d, learner, channels_last):
    val = _validate(env, d, learner, channels_last)
    seen.update(env=env, d=d, learner=learner, val=val)
    return val


def end_epoch(args, learner, prog, epoch, val):
    seen["prog"] = prog
    return _end_epoch(args, learner, prog, epoch, val)


def report_epoch(rows, run_dir, epochs, is_main, is_best):
    _report_epoch(rows, run_dir, epochs, is_main, is_best)
    env, val, prog = seen["env"], seen["val"], seen["prog"]
    report = {"rank": env.rank, "world_size": env.world, "epoch": prog.epoch, "step": prog.step,
              "train_steps": len(seen["d"].train_loader), "val_seen_rank": val["seen_rank"],
              "val_seen": val["seen"], "val_acc": val["val_acc"], "val_loss": val["val_loss"],
              "state_sha256": train.state_hash(seen["learner"].model.state_dict())}
    (Path(run_dir) / f"ddp_rank{env.rank}.json").write_text(json.dumps(report) + "\n")


train.validate, train.end_epoch, train.report_epoch = validate, end_epoch, report_epoch

if __name__ == "__main__":
    sys.exit(train.main())
