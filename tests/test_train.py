"""train.py: defaults, one-line errors, exact resume after SIGKILL, the demo's accuracy, a real-data run,
and bench_train.py. Training runs as a subprocess, the way users run it."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
RUN_FILES = ("config.json", "metrics.csv", "last.pt", "best.pt", "curves.png")
TIMING = ("seconds", "img_per_s")


# One OpenMP thread per training process: on a CPU shared with other jobs (CI runners, parallel test
# sessions) two spinning OpenMP threads per process can run 5-10x slower than one; results don't change.
ENV = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}


def train_cmd(*args, step_sleep: float = 0.0, nan_from_step: int | None = None) -> list[str]:
    """train.py's command line; with a fault asked for, through tests/train_hooks.py (train.py has no hooks)."""
    hooks = (["--step-sleep", step_sleep] if step_sleep else []) + \
        (["--nan-from-step", nan_from_step] if nan_from_step is not None else [])
    script = REPO / "tests" / "train_hooks.py" if hooks else REPO / "train.py"
    return [sys.executable, str(script), *map(str, hooks), *map(str, args)]


def run_train(*args, timeout: float = 300, **hooks) -> subprocess.CompletedProcess:
    return subprocess.run(train_cmd(*args, **hooks), cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=timeout)


def read_rows(run_dir: Path) -> list[dict]:
    import runs
    return runs.read_metrics(run_dir / "metrics.csv")  # the one reader of metrics.csv


def old_tree(tmp_path: Path, commit: str) -> Path:
    """The repository as it was at `commit` (git archive), for side-by-side runs of old and new code; skips
    where the history is missing (a shallow clone or a source copy)."""
    import io
    import tarfile
    old = tmp_path / f"tree_{commit[:7]}"
    old.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", commit], capture_output=True)
    if archive.returncode != 0:
        pytest.skip(f"no git history holding {commit[:7]} (a shallow clone or a source copy): "
                    f"{archive.stderr.decode(errors='replace').strip()[:200]}")
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(old, filter="data")
    return old


def assert_one_line_error(proc: subprocess.CompletedProcess, *words: str) -> str:
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], proc.stderr
    for w in words:
        assert w.lower() in errors[0].lower(), errors[0]
    return errors[0]


def kill_inside_epoch_2(common: list, run_dir: Path) -> None:
    """Start the run `common --name <run_dir.name>` slowed down, SIGKILL it inside epoch 2 (after epoch 1's
    files landed), and check that the kill did land there."""
    proc = subprocess.Popen(train_cmd(*common, "--name", run_dir.name, step_sleep=0.4), cwd=REPO,
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not ((run_dir / "metrics.csv").exists() and len(read_rows(run_dir)) >= 1):
        assert proc.poll() is None and time.time() < deadline, "the run to interrupt ended or stalled"
        time.sleep(0.05)
    time.sleep(0.6)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len(read_rows(run_dir)) == 1, "the kill should have landed in epoch 2"


def parse(argv: list[str]):
    """(flat resolved options as a namespace, the options given as flags): what train.main resolves."""
    import argparse

    import config
    cl = config.from_command_line(argv)
    return argparse.Namespace(**cl.cfg.flat()), cl.explicit


def test_defaults_are_the_reference_recipe():
    args, explicit = parse([])
    assert explicit == set()
    assert (args.arch, args.img_size, args.batch_size, args.epochs) == ("ghostnet", 227, 64, 200)
    assert (args.optimizer, args.lr, args.wd, args.dropout, args.out_channels) == ("adamw", 1e-3, 0.6, 0.2, 320)
    assert (args.scheduler, args.milestones, args.gamma) == ("multistep", [67, 82, 95, 107], 0.1)
    assert (args.label_smoothing, args.patience, args.grayscale, args.no_normalize) == (0.1, 15, False, False)
    demo, explicit = parse(["--demo", "--epochs", "3"])
    assert demo.img_size == 64 and demo.epochs == 3 and demo.threads == 1 and explicit == {"demo", "epochs"}


def test_one_line_errors(tmp_path, tiny_data, cache_dir):
    base = ["--out", tmp_path, "--cache-dir", cache_dir, "--device", "cpu", "--img-size", 32]
    assert_one_line_error(run_train("--data", tmp_path / "nowhere", *base), "stanford")
    assert_one_line_error(run_train("--data", tiny_data, "--arch", "nonet", *base), "unknown arch")
    assert_one_line_error(run_train("--data", tiny_data, "--augment", "flip", "wobble", *base), "wobble")
    assert_one_line_error(run_train("--resume", tmp_path / "no_run", *base), "last.pt")
    # a loss that turns NaN in epoch 2: exit 1, epoch and step named, epoch 1's checkpoint kept
    proc = run_train("--data", tiny_data, *base, "--batch-size", 8, "--epochs", 3, "--name", "nan",
                     nan_from_step=6)
    line = assert_one_line_error(proc, "nan", "epoch 2", "step 2")
    assert proc.returncode == 1, line
    ckpt = torch.load(tmp_path / "nan" / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and len(read_rows(tmp_path / "nan")) == 1


@pytest.mark.slow
def test_resume_after_sigkill_is_exact(tmp_path, tiny_data, cache_dir):
    common = ["--data", tiny_data, "--out", tmp_path, "--cache-dir", cache_dir, "--img-size", 32,
              "--batch-size", 8, "--epochs", 3, "--deterministic", "--device", "cpu", "--seed", 3,
              "--scheduler", "multistep", "--milestones", 2, "--erase"]
    full = run_train(*common, "--name", "full")
    assert full.returncode == 0, full.stderr

    kill_inside_epoch_2(common, tmp_path / "cut")
    resumed = run_train("--resume", tmp_path / "cut")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout

    strip = lambda rows: [{k: v for k, v in r.items() if k not in TIMING} for r in rows]  # noqa: E731
    assert strip(read_rows(tmp_path / "cut")) == strip(read_rows(tmp_path / "full"))
    a = torch.load(tmp_path / "full" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 3
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_no_validate_looks_at_no_held_out_image(tmp_path, tiny_data, cache_dir):
    """--no-validate (a campaign that scores the test split once, at the end): nothing held out is decoded or
    scored while training, the metrics' val columns are empty (nan), no best.pt, final.pt at the end; early
    stopping or a plateau schedule with it is a one-line error."""
    base = ["--data", tiny_data, "--out", tmp_path, "--cache-dir", cache_dir, "--img-size", 32, "--batch-size", 8,
            "--device", "cpu", "--no-validate", "--scheduler", "multistep", "--milestones", 1]
    assert_one_line_error(run_train(*base, "--epochs", 2), "--no-validate", "--patience 0")
    assert_one_line_error(run_train(*base, "--patience", 0, "--scheduler", "plateau"), "--no-validate", "plateau")
    proc = run_train(*base, "--patience", 0, "--epochs", 2, "--name", "blind", "--deterministic")
    assert proc.returncode == 0, proc.stderr
    assert "0 val (--no-validate)" in proc.stdout and "nothing held out was looked at" in proc.stdout
    run = tmp_path / "blind"
    rows = read_rows(run)
    assert [r["epoch"] for r in rows] == [1, 2] and rows[1]["lr"] == pytest.approx(1e-4)  # the schedule went on
    assert all(math.isnan(r[k]) for r in rows for k in ("val_loss", "val_acc", "val_top5"))
    assert (run / "final.pt").exists() and not (run / "best.pt").exists()
    import runs
    assert runs.config_of(runs.load_checkpoint(run / "final.pt")).data.validate is False
    # validating draws no random number and changes no weight: the same run validating trains the same weights
    # (so campaigns run before --no-validate existed still describe their training)
    seen = run_train(*[a for a in base if a != "--no-validate"], "--patience", 0, "--epochs", 2, "--name", "seen",
                     "--deterministic")
    assert seen.returncode == 0, seen.stderr
    a = torch.load(tmp_path / "seen" / "last.pt", weights_only=True)["model"]
    b = torch.load(run / "last.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_no_validate_resumes_exactly_after_sigkill(tmp_path, tiny_data, cache_dir):
    # with --train-decode-scale too: the random boxes are drawn on the larger photos, from the same generator
    common = ["--data", tiny_data, "--out", tmp_path, "--cache-dir", cache_dir, "--img-size", 32, "--batch-size", 8,
              "--epochs", 3, "--deterministic", "--device", "cpu", "--seed", 3, "--recipe", "fast", "--no-validate",
              "--train-decode-scale", 1.5]
    full = run_train(*common, "--name", "full")
    assert full.returncode == 0, full.stderr
    kill_inside_epoch_2(common, tmp_path / "cut")
    resumed = run_train("--resume", tmp_path / "cut")
    assert resumed.returncode == 0, resumed.stderr
    train_cols = ("epoch", "lr", "train_loss", "train_acc")
    assert [[r[k] for k in train_cols] for r in read_rows(tmp_path / "cut")] == \
        [[r[k] for k in train_cols] for r in read_rows(tmp_path / "full")]
    a = torch.load(tmp_path / "full" / "final.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "cut" / "final.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_max_steps_inside_an_epoch_resumes_exactly(tmp_path, tiny_data, cache_dir):
    """--max-steps that ends a run inside an epoch saves that step in last.pt (it once saved the partial epoch
    as complete, so --resume skipped the epoch's other batches); resuming, stopping inside the same epoch
    again, and resuming to the end gives the uninterrupted run's metrics and weights bit for bit."""
    common = ["--data", tiny_data, "--out", tmp_path, "--cache-dir", cache_dir, "--img-size", 32,
              "--batch-size", 8, "--epochs", 3, "--deterministic", "--device", "cpu", "--seed", 3,
              "--scheduler", "multistep", "--milestones", 2, "--erase", "--augment", "flip", "affine", "jitter"]
    full = run_train(*common, "--name", "full")
    assert full.returncode == 0, full.stderr
    steps_per_epoch = torch.load(tmp_path / "full" / "last.pt", weights_only=True)["step"] // 3
    assert steps_per_epoch >= 3

    first = run_train(*common, "--name", "cut", "--max-steps", steps_per_epoch + 1)  # 1 step into epoch 2
    assert first.returncode == 0, first.stderr
    assert f"stopped inside epoch 2 after 1 of {steps_per_epoch} steps" in first.stdout, first.stdout
    ck = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    assert ck["epoch"] == 1 and ck["partial"]["epoch"] == 2 and ck["partial"]["batches"] == 1
    assert len(read_rows(tmp_path / "cut")) == 1  # no metrics row for a partial epoch

    second = run_train("--resume", tmp_path / "cut", "--max-steps", steps_per_epoch + 2)  # stops inside again
    assert second.returncode == 0, second.stderr
    assert "after epoch 1 and 1 steps of epoch 2" in second.stdout, second.stdout
    assert torch.load(tmp_path / "cut" / "last.pt", weights_only=True)["partial"]["batches"] == 2

    last = run_train("--resume", tmp_path / "cut")  # --max-steps is not inherited: on to the end
    assert last.returncode == 0, last.stderr
    strip = lambda rows: [{k: v for k, v in r.items() if k not in TIMING} for r in rows]  # noqa: E731
    assert strip(read_rows(tmp_path / "cut")) == strip(read_rows(tmp_path / "full"))
    a = torch.load(tmp_path / "full" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 3 and "partial" not in b and a["step"] == b["step"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


@pytest.mark.slow
@pytest.mark.parametrize("watch", ["val_loss", "val_acc"])
def test_early_stopping_follows_the_watched_metric(tmp_path, tiny_data, cache_dir, watch):
    """The run ends at the first epoch after `patience` epochs without progress in the watched metric,
    recounted from metrics.csv (lower val_loss, or higher val_acc), or runs all epochs."""
    patience, epochs = 2, 10
    proc = run_train("--data", tiny_data, "--out", tmp_path, "--name", "run", "--cache-dir", cache_dir,
                     "--img-size", 32, "--batch-size", 8, "--epochs", epochs, "--device", "cpu", "--lr", 0.01,
                     "--patience", patience, "--early-stop-on", watch)
    assert proc.returncode == 0, proc.stderr
    rows = read_rows(tmp_path / "run")
    best, bad, want = None, 0, epochs
    for r in rows:
        v = float(r[watch]) * (1 if watch == "val_loss" else -1)  # lower is better
        bad = 0 if best is None or v < best else bad + 1
        best = v if best is None or v < best else best
        if bad >= patience:
            want = int(r["epoch"])
            break
    assert int(rows[-1]["epoch"]) == want, (rows, proc.stdout)
    if want < epochs:
        what = "no lower val loss" if watch == "val_loss" else "no higher val accuracy"
        assert f"early stopping: {what} for {patience} epochs" in proc.stdout, proc.stdout


def test_kill_between_checkpoint_writes_keeps_best_pt_current(tmp_path, cache_dir):
    # Regression: last.pt used to be written before best.pt, so a kill between the two left best.pt
    # an epoch behind last.pt's record of the best epoch, and --resume never rewrote it.
    import data
    demo = data.make_demo_dataset(tmp_path / "demo", seed=0)  # learnable within 5 epochs at 48 px
    last_epoch = 5
    common = ["--data", demo, "--out", tmp_path, "--cache-dir", cache_dir, "--img-size", 48, "--batch-size", 16,
              "--epochs", last_epoch, "--deterministic", "--device", "cpu", "--seed", 3, "--scheduler", "none",
              "--lr", 3e-3, "--wd", 0]
    full = run_train(*common, "--name", "full")
    assert full.returncode == 0, full.stderr
    full_best = torch.load(tmp_path / "full" / "best.pt", weights_only=True)
    assert full_best["epoch"] == last_epoch, "precondition: the last epoch must be the best for this test to bite"

    # the same run, killed (os._exit, no clean-up) right after the first checkpoint file of the last epoch lands
    kill_after_first_save = (
        "import os, sys, runs, train\n"
        "save = runs.RunFolder.save\n"
        "def save_then_die(self, obj, path):\n"
        "    save(self, obj, path)\n"
        f"    if isinstance(obj, dict) and obj.get('epoch') == {last_epoch}:\n"
        "        os._exit(9)\n"
        "runs.RunFolder.save = save_then_die  # the run folder's one writer of checkpoints\n"
        "sys.exit(train.main(sys.argv[1:]))\n")
    cut = subprocess.run([sys.executable, "-c", kill_after_first_save, *map(str, common), "--name", "cut"],
                         cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert cut.returncode == 9, cut.stderr
    resumed = run_train("--resume", tmp_path / "cut")
    assert resumed.returncode == 0, resumed.stderr
    best = torch.load(tmp_path / "cut" / "best.pt", weights_only=True)
    last = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    assert best["epoch"] == last["best"]["epoch"] == last_epoch
    for k in full_best["model"]:
        assert torch.equal(best["model"][k], full_best["model"][k]), k


def test_ctrl_c_keeps_last_completed_epoch(tmp_path, tiny_data, cache_dir):
    # SIGINT back to its default in the child, even when this test runs in a background job (SIG_IGN)
    proc = subprocess.Popen(train_cmd("--data", tiny_data, "--out", tmp_path, "--name", "int", "--cache-dir",
                                      cache_dir, "--img-size", 32, "--batch-size", 8, "--epochs", 4,
                                      step_sleep=0.3),
                            cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while not (tmp_path / "int" / "metrics.csv").exists():
        assert proc.poll() is None and time.time() < deadline, "the run to interrupt ended or stalled"
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert "last.pt holds epoch 1, the last completed" in err and f"--resume {tmp_path / 'int'}" in err, err
    assert torch.load(tmp_path / "int" / "last.pt", weights_only=True)["epoch"] == 1


@pytest.mark.slow
def test_demo_reaches_90_percent(tmp_path):
    t0 = time.time()
    proc = run_train("--demo", "--out", tmp_path, "--name", "demo", timeout=600)
    seconds = time.time() - t0
    assert proc.returncode == 0, proc.stderr
    rows = read_rows(tmp_path / "demo")
    best = max(float(r["val_acc"]) for r in rows)
    print(f"demo: best val acc {100 * best:.1f}% in {seconds:.0f} s ({len(rows)} epochs)")
    assert best >= 0.90, rows
    assert "python evaluate.py --checkpoint" in proc.stdout and "python predict.py" in proc.stdout
    assert (tmp_path / "demo_data").is_dir()


@pytest.mark.slow
def test_two_real_epochs(tmp_path, real_data, cache_dir):
    proc = run_train("--data", real_data, "--out", tmp_path, "--name", "real", "--cache-dir", cache_dir,
                     "--img-size", 64, "--epochs", 2, "--device", "cpu", "--limit-train", 1024,
                     "--limit-val", 256, timeout=600)
    assert proc.returncode == 0, proc.stderr
    run = tmp_path / "real"
    for name in RUN_FILES:
        assert (run / name).is_file(), name
    rows = read_rows(run)
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert list(rows[0]) == ["epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "val_top5",
                             "seconds", "img_per_s"]
    assert float(rows[1]["train_loss"]) < float(rows[0]["train_loss"]), rows
    config = json.loads((run / "config.json").read_text())
    for key in ("config", "versions", "git_commit", "device", "preprocess", "num_classes"):
        assert key in config, key
    assert config["num_classes"] == 196 and config["config"]["train"]["wd"] == 0.6

    from runs import load_checkpoint, model_from_checkpoint
    best = load_checkpoint(run / "best.pt")  # weights_only=True
    assert best["format"] == "ghostcars-v1" and best["preprocess"]["img_size"] == 64
    assert len(best["class_names"]) == 196 and best["best"]["epoch"] in (1, 2)
    model = model_from_checkpoint(best, ghost_op="torch")
    assert model(torch.zeros(2, 3, 64, 64)).shape == (2, 196)
    last = load_checkpoint(run / "last.pt")
    assert last["epoch"] == 2 and {"optimizer", "scheduler", "rng", "early_stop"} <= set(last)


def test_bench_train_runs_and_results_are_committed(tmp_path):
    sys.path.insert(0, str(REPO / "benchmarks"))
    import bench_train
    argv = ["--device", "cpu", "--img-size", "32", "--batch-size", "2", "--steps", "1", "--warmup", "1",
            "--no-timm", "--out-dir", str(tmp_path)]
    assert bench_train.main(argv) == 0
    report = json.loads((tmp_path / "bench_train_cpu.json").read_text())
    assert report["results"][0]["model"] == "ghostnet (ghost_op=torch)" and report["results"][0]["img_per_s"] > 0
    # the gradient check runs in float64, where the two ops agree to rounding
    rels = [r["max_rel_grad_diff_vs_torch"] for r in report["results"] if r["max_rel_grad_diff_vs_torch"] is not None]
    assert len(rels) >= 1 and max(rels) < 1e-6, report["results"]
    committed = json.loads((REPO / "benchmarks" / "results" / "bench_train_cpu.json").read_text())
    assert committed["settings"]["img_size"] == 227 and committed["results"]
    assert {"machine", "threads", "versions", "date", "command"} <= set(committed)
    # every row's gradient sanity check passed (a step that skips backward work would look fast)
    assert all(r["params_without_grad"] == 0 for r in committed["results"]), committed["results"]
