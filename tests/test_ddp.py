"""train.py under torchrun (DistributedDataParallel, gloo on the CPU): one run folder, identical weights on every
rank, each validation image counted once, resume with another world size, 2 ranks x 16 == 1 process x 32;
launch errors; BatchLoader sharding; --sync-bn's GhostModule path. Tiny images and data: well under a minute."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from train_hooks import state_hash

REPO = Path(__file__).resolve().parents[1]
# one OpenMP thread per rank (two ranks share the CI's cores)
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
for _k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
    ENV.pop(_k, None)

needs_gloo = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")


def torchrun(nproc: int, *args, timeout: float = 300) -> subprocess.CompletedProcess:
    """train.py under torchrun, through tests/ddp_rank_report.py: every rank reports its weights' hash."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           str(REPO / "tests" / "ddp_rank_report.py"), *map(str, args)]
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def rows(run_dir: Path) -> list[dict]:
    import runs
    return runs.read_metrics(run_dir / "metrics.csv")  # the one reader of metrics.csv


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    import data
    root = tmp_path_factory.mktemp("ddp")
    # 3 classes: 36 train (18 per rank), 15 val: shards of 8 and 7, so padding would double count one image
    return Path(data.make_demo_dataset(root / "demo", num_classes=3, train_per_class=12, test_per_class=5, seed=0))


@needs_gloo
def test_two_ranks_then_resume_on_one(tmp_path, tiny):
    from runs import load_checkpoint
    out = tmp_path / "runs"
    common = ["--cache-dir", tmp_path / "cache", "--device", "cpu", "--threads", 1]
    proc = torchrun(2, "--data", tiny, "--out", out, *common, "--img-size", 32, "--batch-size", 7, "--epochs", 2,
                    "--width", 0.25, "--augment", "flip", "--scheduler", "none")
    runs = [p for p in out.iterdir() if p.is_dir()]
    assert len(runs) == 1, runs  # no --name: rank 0's timestamped name, broadcast to the other rank
    run = runs[0]
    assert proc.stdout.count("run: ") == 1 and proc.stdout.count("done: ") == 1  # only rank 0 logs
    for f in ("config.json", "metrics.csv", "last.pt", "best.pt"):
        assert (run / f).exists(), f

    info = json.loads((run / "config.json").read_text())["distributed"]
    assert (info["world_size"], info["backend"], info["per_rank_batch"], info["global_batch"]) == (2, "gloo", 7, 14)
    reports = [json.loads((run / f"ddp_rank{r}.json").read_text()) for r in range(2)]
    assert [r["epoch"] for r in reports] == [2, 2]
    assert reports[0]["state_sha256"] == reports[1]["state_sha256"]  # identical weights and buffers on all ranks
    ckpt = load_checkpoint(run / "last.pt")
    assert state_hash(ckpt["model"]) == reports[0]["state_sha256"]  # rank 0 saved what every rank holds
    # validation: 8 + 7 images (2 batches on rank 0, 1 on rank 1), each counted once, the sums agree everywhere
    assert sorted(r["val_seen_rank"] for r in reports) == [7, 8]
    assert all(r["val_seen"] == 15 for r in reports)
    assert reports[0]["val_loss"] == reports[1]["val_loss"] and reports[0]["val_acc"] == reports[1]["val_acc"]
    assert all(r["train_steps"] == 2 and r["step"] == 4 for r in reports)  # 36 // 2 // 7 steps per epoch
    first = rows(run)
    assert [r["epoch"] for r in first] == [1, 2] and ckpt["epoch"] == 2 and ckpt["world_size"] == 2

    # resume under torchrun with another world size: continues with epoch 3, the first two rows untouched
    proc = torchrun(1, "--resume", run, "--epochs", 3)
    assert "resuming" in proc.stdout and "after epoch 2" in proc.stdout
    again = rows(run)
    assert [r["epoch"] for r in again] == [1, 2, 3]
    assert again[:2] == first
    ckpt = load_checkpoint(run / "last.pt")
    assert ckpt["epoch"] == 3 and ckpt["world_size"] == 1 and ckpt["step"] == 4 + 5  # then 36 // 7 = 5 steps
    assert json.loads((run / "config.json").read_text())["distributed"]["world_size"] == 1


@needs_gloo
def test_two_ranks_of_16_equal_one_process_of_32(tmp_path, tiny):
    """DDP averages the gradients of the two halves of the global batch: without BatchNorm (squeezenet),
    dropout or augmentation, that is one process's step on the whole batch, to float rounding."""
    from runs import load_checkpoint
    common = ["--data", tiny, "--out", tmp_path, "--cache-dir", tmp_path / "cache", "--device", "cpu",
              "--img-size", 32, "--epochs", 2, "--arch", "squeezenet1_1", "--dropout", 0, "--augment", "none",
              "--optimizer", "sgd", "--momentum", 0.9, "--wd", 0, "--lr", 0.05, "--label-smoothing", 0,
              "--scheduler", "none", "--threads", 1]
    torchrun(2, *common, "--name", "two", "--batch-size", 16)
    one = subprocess.run([sys.executable, str(REPO / "train.py"), *map(str, [*common, "--name", "one",
                          "--batch-size", 32])], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = load_checkpoint(tmp_path / "two" / "last.pt"), load_checkpoint(tmp_path / "one" / "last.pt")
    # 36 images: one global batch of 32 per epoch, the same 32 (rank r takes positions r::2 of them)
    assert a["step"] == b["step"] == 2
    for k, v in a["model"].items():
        torch.testing.assert_close(v, b["model"][k], rtol=1e-5, atol=1e-6, msg=k)
    ra, rb = rows(tmp_path / "two")[-1], rows(tmp_path / "one")[-1]
    for k in ("train_loss", "train_acc", "val_loss", "val_acc"):  # training numbers reduced over the ranks
        assert float(ra[k]) == pytest.approx(float(rb[k]), rel=1e-5, abs=1e-6), k


@pytest.mark.parametrize("env, words", [
    ({"RANK": "0", "WORLD_SIZE": "2"}, ["LOCAL_RANK", "MASTER_ADDR", "torchrun"]),
    ({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "localhost", "MASTER_PORT": "29500"},
     ["RANK=2", "WORLD_SIZE=2"]),
])
def test_launch_errors_are_one_line(monkeypatch, capsys, tmp_path, env, words):
    import train
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert train.main(["--demo", "--out", str(tmp_path), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:"), err
    for w in words:
        assert w in err[0], err[0]
    assert not list(tmp_path.iterdir())  # failed before anything was written


def test_sync_bn_on_cpu_is_refused(monkeypatch, capsys, tmp_path):
    import train
    for k, v in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "localhost",
                 "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(k, v)
    assert train.main(["--demo", "--out", str(tmp_path), "--device", "cpu", "--sync-bn"]) == 2
    assert "--sync-bn needs CUDA" in capsys.readouterr().err


def test_batch_loader_shards():
    import batches
    import data
    import images
    n = 37
    d = images.Decoded(images=torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1), labels=torch.arange(n),
                       paths=[str(i) for i in range(n)], skipped=[])
    for drop_last in (True, False):
        whole = batches.BatchLoader(d, 4, shuffle=True, drop_last=drop_last, seed=3)
        whole.set_epoch(2)
        got = []
        for r in range(3):
            shard = batches.BatchLoader(d, 4, shuffle=True, drop_last=drop_last, seed=3, rank=r, world_size=3)
            shard.set_epoch(2)
            labels = [y for _, y in shard]
            assert len(labels) == len(shard)
            got.append(torch.cat(labels).tolist())
        flat = sum(got, [])
        assert len(flat) == len(set(flat))  # no image on two ranks, none twice
        if drop_last:  # equal steps on every rank: 37 // 3 = 12 images each, 3 full batches
            assert [len(g) for g in got] == [12, 12, 12]
        else:  # every image exactly once, no padding
            assert sorted(flat) == list(range(n)) and [len(g) for g in got] == [13, 12, 12]
    # one rank of one is the unsharded loader
    a = batches.BatchLoader(d, 5, True, False, seed=1)
    b = batches.BatchLoader(d, 5, True, False, seed=1, rank=0, world_size=1)
    assert [y.tolist() for _, y in a] == [y.tolist() for _, y in b] and len(a) == len(b)
    with pytest.raises(data.DataError):
        batches.BatchLoader(d, 4, True, False, rank=3, world_size=3)


def test_sync_bn_ghost_modules_route_through_their_bn_modules():
    """--sync-bn: GhostModules run their cheap branch through the (Sync)BatchNorm module, with the plain path's
    math and state (outside a process group SyncBatchNorm computes what BatchNorm2d does)."""
    import copy
    from model import GhostModule, build_model, convert_sync_batchnorm
    torch.manual_seed(0)
    plain = build_model("ghostnet", 3, width=0.25, dropout=0.0, ghost_op="torch").train()  # no dropout: same output
    synced = convert_sync_batchnorm(copy.deepcopy(plain))
    ghosts = [m for m in synced.modules() if isinstance(m, GhostModule)]
    assert ghosts and all(m.path == "modules" for m in ghosts)
    assert isinstance(next(m for m in synced.modules() if isinstance(m, GhostModule)).cheap_operation[1],
                      torch.nn.SyncBatchNorm)
    x = torch.randn(4, 3, 32, 32)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a shared CPU, spinning OpenMP threads make this tiny forward take seconds
    try:
        torch.testing.assert_close(synced(x), plain(x))
    finally:
        torch.set_num_threads(threads)
    sa, sb = synced.state_dict(), plain.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], msg=k)


def _pids_of_rank(marker: str, rank: int) -> list[int]:
    """Processes whose command line holds `marker` and whose environment says RANK=<rank> (torchrun's workers)."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            env = (d / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if marker in cmd and ("train.py" in cmd or "train_hooks.py" in cmd) and f"RANK={rank}".encode() in env:
            found.append(int(d.name))
    return found


@needs_gloo
@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the worker through /proc")
def test_elastic_restart_after_a_dead_rank_resumes_by_itself(tmp_path, tiny):
    """torchrun --max-restarts, one rank SIGKILLed inside epoch 2: torchrun restarts the group with the same
    command, --resume-if-exists continues the run folder from last.pt (epoch 1), and the final weights equal an
    uninterrupted 2-rank run's. --dist-timeout bounds a restarted group's set-up, so a hung attempt fails and is
    restarted instead of waiting forever. The killed rank comes back 3 s late: rank 0 then reaches the set-up
    first, which used to read rank 1's address from the dead attempt out of torchrun's store and fail with
    "Connection refused" on every restart (train.restart_safe_store)."""
    import signal
    import time
    common = ["--data", tiny, "--cache-dir", tmp_path / "cache", "--device", "cpu", "--threads", 1, "--img-size", 32,
              "--batch-size", 6, "--epochs", 3, "--width", 0.25, "--augment", "flip", "--scheduler", "none",
              "--deterministic", "--dist-timeout", 20]
    torchrun(2, *common, "--out", tmp_path / "plain", "--name", "run")

    out = tmp_path / "elastic"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--max-restarts", "3", "--nproc_per_node",
           "2", str(REPO / "tests" / "train_hooks.py"), "--step-sleep", "0.3", "--late-rank-on-restart", "1",
           *map(str, common), "--out", str(out), "--name", "run", "--resume-if-exists"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while not (out / "run" / "curves.png").exists():  # epoch 1's last file: epoch 2 begins
            assert proc.poll() is None and time.time() < deadline, "the run ended or stalled before epoch 2"
            time.sleep(0.05)
        time.sleep(1.0)  # inside epoch 2 (3 steps of 0.3 s)
        victims = _pids_of_rank(str(out), 1)
        assert len(victims) == 1, victims
        os.kill(victims[0], signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=400)
    finally:
        proc.kill()
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    assert "resuming" in stdout and "after epoch 1" in stdout, stdout[-3000:]
    a = torch.load(tmp_path / "plain" / "run" / "last.pt", weights_only=True)
    b = torch.load(out / "run" / "last.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 3 and a["step"] == b["step"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert [r["val_loss"] for r in rows(out / "run")] == [r["val_loss"] for r in rows(tmp_path / "plain" / "run")]


def test_resume_if_exists_needs_a_name(tmp_path, tiny):
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), "--data", str(tiny), "--out", str(tmp_path),
                           "--resume-if-exists"], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--resume-if-exists needs --name" in proc.stderr


def test_resume_if_exists_runs_the_same_command_twice(tmp_path, tiny):
    """The command a restarted job repeats as it is: the first start trains, the second continues the folder."""
    cmd = [sys.executable, str(REPO / "train.py"), "--data", str(tiny), "--out", str(tmp_path), "--name", "run",
           "--resume-if-exists", "--img-size", "32", "--batch-size", "6", "--width", "0.25", "--augment", "flip",
           "--cache-dir", str(tmp_path / "cache"), "--threads", "1"]
    first = subprocess.run(cmd + ["--epochs", "1"], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0 and "resuming" not in first.stdout, first.stderr
    again = subprocess.run(cmd + ["--epochs", "2"], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert f"resuming {tmp_path / 'run'} after epoch 1" in again.stdout
    assert [r["epoch"] for r in rows(tmp_path / "run")] == [1, 2]
