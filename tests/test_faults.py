"""The faults a real run meets, each injected: a stop signal from a cluster scheduler (SIGTERM, SIGUSR1), and a
write that fails (full disk, I/O error, read-only folder) while a checkpoint is saved."""
import errno
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from test_train import ENV, REPO, assert_one_line_error, read_rows, run_train, train_cmd


def common_args(data: Path, out: Path, cache: Path) -> list:
    return ["--data", data, "--out", out, "--cache-dir", cache, "--img-size", 32, "--batch-size", 8, "--epochs", 3,
            "--deterministic", "--device", "cpu", "--seed", 3, "--scheduler", "multistep", "--milestones", 2,
            "--augment", "flip", "affine", "jitter"]


def same_weights(a: Path, b: Path) -> None:
    x, y = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    assert x["epoch"] == y["epoch"] and x["step"] == y["step"]
    for k in x["model"]:
        assert torch.equal(x["model"][k], y["model"][k]), k


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_stop_signal_saves_the_step_and_resumes_bit_identically(sig, tmp_path, tiny_data, cache_dir):
    """A scheduler's SIGTERM (or SLURM's early SIGUSR1) inside epoch 2: the step in flight completes, last.pt
    holds that very step, the resume command is printed, exit 128 + signal; the resumed run ends with the
    uninterrupted run's weights and metrics, bit for bit."""
    common = common_args(tiny_data, tmp_path, cache_dir)
    full = run_train(*common, "--name", "full")
    assert full.returncode == 0, full.stderr
    run_dir = tmp_path / "cut"
    proc = subprocess.Popen(train_cmd(*common, "--name", "cut", step_sleep=0.3), cwd=REPO, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (run_dir / "curves.png").exists():  # the last file of epoch 1: epoch 2's steps begin
        assert proc.poll() is None and time.time() < deadline, "the run to stop ended or stalled"
        time.sleep(0.05)
    time.sleep(0.5)  # a step or two into epoch 2 (0.3 s each)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + int(sig), err
    assert "Traceback" not in err
    assert f"{sig.name}: {run_dir / 'last.pt'} holds epoch 1 and" in err, err
    assert f"resume with: python train.py --resume {run_dir}" in err, err
    ck = torch.load(run_dir / "last.pt", weights_only=True)
    assert ck["epoch"] == 1 and ck["partial"]["epoch"] == 2 and ck["partial"]["batches"] >= 1
    assert not (run_dir / "final.pt").exists()  # a preempted run is not a finished one

    resumed = run_train("--resume", run_dir)
    assert resumed.returncode == 0, resumed.stderr
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("seconds", "img_per_s")} for r in rows]  # noqa: E731
    assert strip(read_rows(run_dir)) == strip(read_rows(tmp_path / "full"))
    same_weights(run_dir / "last.pt", tmp_path / "full" / "last.pt")


# A run whose torch.save fails while writing epoch 2's last.pt, after writing part of it (a torn temp file)
FAIL_ON_SAVE = """
import errno, os, sys, torch, train
real_save = torch.save
def failing_save(obj, f, *a, **k):
    if isinstance(obj, dict) and obj.get("epoch") == 2 and "optimizer" in obj:  # last.pt of epoch 2
        f.write(b"half a checkpoint")
        raise OSError(errno.{name}, os.strerror(errno.{name}))
    return real_save(obj, f, *a, **k)
torch.save = failing_save
sys.exit(train.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("name", ["ENOSPC", "EIO", "EROFS"])
def test_failed_write_keeps_the_previous_checkpoints(name, tmp_path, tiny_data, cache_dir):
    """A full disk, an I/O error or a read-only folder while last.pt is written: one line naming the file and
    the cause, exit 2, no temp file left, and last.pt / best.pt still the previous, loadable ones; --resume
    then finishes the run."""
    common = common_args(tiny_data, tmp_path, cache_dir)
    proc = subprocess.run([sys.executable, "-c", FAIL_ON_SAVE.format(name=name), *map(str, common), "--name", "run"],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    line = assert_one_line_error(proc, str(tmp_path / "run" / "last.pt"), "cannot write",
                                 "the previous last.pt is unchanged", f"--resume {tmp_path / 'run'}")
    assert f"({__import__('os').strerror(getattr(errno, name))})" in line
    run_dir = tmp_path / "run"
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith(".")) == []  # no temp file left
    assert torch.load(run_dir / "last.pt", weights_only=True)["epoch"] == 1
    assert torch.load(run_dir / "best.pt", weights_only=True)["epoch"] in (1, 2)  # written before last.pt
    resumed = run_train("--resume", run_dir)
    assert resumed.returncode == 0, resumed.stderr
    assert torch.load(run_dir / "last.pt", weights_only=True)["epoch"] == 3


def test_atomic_write_cleans_up_and_names_the_file(tmp_path):
    import common
    target = tmp_path / "x.txt"
    target.write_text("old")

    def boom(f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(common.WriteError, match=r"x\.txt: cannot write \(No space left on device\); free some disk"):
        common.atomic_write(target, boom)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["x.txt"]
    with pytest.raises(KeyboardInterrupt):  # not an OSError: passed through, but the temp file still goes
        common.atomic_write(target, lambda f: (_ for _ in ()).throw(KeyboardInterrupt()))
    assert [p.name for p in tmp_path.iterdir()] == ["x.txt"]


# ---------------------------------------------------------------------------------------------- damaged checkpoints

def damage(path: Path, how: str) -> None:
    if how == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "foreign":
        torch.save({"state_dict": {"w": torch.zeros(3)}}, path)  # a loadable file, but not ours
    else:
        raise AssertionError(how)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_data, cache_dir) -> Path:
    out = tmp_path_factory.mktemp("runs")
    proc = run_train(*common_args(tiny_data, out, cache_dir)[:-4], "--epochs", 1, "--name", "done")
    assert proc.returncode == 0, proc.stderr
    return out / "done"


@pytest.mark.parametrize("how", ["truncated", "empty", "foreign"])
def test_resume_from_damaged_last_pt_points_at_intact_best_pt(how, finished_run, tmp_path):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    damage(run / "last.pt", how)
    proc = run_train("--resume", run)
    assert proc.returncode == 2
    assert_one_line_error(proc, str(run / "last.pt"), f"{run / 'best.pt'} is intact", f"--init-from {run / 'best.pt'}")
    damage(run / "best.pt", how)  # both damaged: the reason for last.pt alone, no false hope
    proc = run_train("--resume", run)
    line = assert_one_line_error(proc, str(run / "last.pt"))
    assert "intact" not in line


@pytest.mark.parametrize("how", ["truncated", "empty", "foreign"])
def test_init_from_a_damaged_file_is_one_line(how, finished_run, tmp_path, tiny_data, cache_dir):
    bad = tmp_path / "weights.pt"
    bad.write_bytes((finished_run / "best.pt").read_bytes())
    damage(bad, how)
    proc = run_train(*common_args(tiny_data, tmp_path, cache_dir), "--init-from", bad, "--name", "ft")
    assert_one_line_error(proc, str(bad))


@pytest.mark.parametrize("case", ["nan", "inf", "shape", "pickled_code"])
def test_unsafe_or_broken_weights_are_refused_with_the_reason(case, finished_run, tmp_path):
    import runs
    ckpt = torch.load(finished_run / "best.pt", weights_only=True)
    key = next(k for k, v in ckpt["model"].items() if v.is_floating_point() and v.ndim == 4)
    if case == "nan":
        ckpt["model"][key] = ckpt["model"][key].clone().fill_(float("nan"))
    elif case == "inf":
        ckpt["model"][key] = ckpt["model"][key].clone().fill_(float("inf"))
    elif case == "shape":
        ckpt["model"][key] = ckpt["model"][key][:1].clone()
    else:
        ckpt["extra"] = Path("pathlib objects are pickled as code")  # a global weights_only does not allow
    path = tmp_path / "best.pt"
    torch.save(ckpt, path)
    want = {"nan": "NaN or inf", "inf": "NaN or inf", "shape": "has shape", "pickled_code": "could run code"}[case]
    with pytest.raises(runs.CheckpointError, match=want):
        runs.load_checkpoint(path)
