"""benchmarks/experiments.py: the experiment registry, its commands, and one tiny real run on synthetic data."""
import importlib.util
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import experiments as X  # noqa: E402

SCRIPT = REPO / "benchmarks" / "experiments.py"
LADDER = {"a_c1_plain": "C-1", "b_c3_smooth_norm": "C-3", "c_c7_augment": "C-7", "d_c50_best": "C-50",
          "e_c50_plateau": "C-50", "f_c50_best_seed1": "C-50", "f_c50_best_seed2": "C-50"}
ARCHS = ["ghostnet_official", "mobilenet_v3_large", "mobilenet_v3_small", "shufflenet_v2_x1_0",
         "efficientnet_b0", "resnet18"]


def cli(*args) -> subprocess.CompletedProcess:
    # the timeout only stops a hung run; --estimate trains a few steps and took over 60 s on a loaded 2-core box
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def opts(argv: list[str]) -> dict[str, list[str]]:
    """--flag value... of a command line as {flag: [values]} (a bare flag maps to [])."""
    out, key = {}, None
    for tok in argv:
        if tok.startswith("--"):
            key = tok
            out[key] = []
        elif key is not None:
            out[key].append(tok)
    return out


def test_schedule_scaling():
    assert X.scaled_milestones(130) == [67, 82, 95, 107]
    assert X.scaled_milestones(40) == [21, 25, 29, 33]  # round(m * 40 / 130)
    ms = X.scaled_milestones(1)
    assert ms == sorted(set(ms)) and ms[0] >= 1  # still strictly increasing
    assert X.scale_epochs(X.REF_PATIENCE, 40) == 5 and X.scale_epochs(X.REF_PLATEAU_PATIENCE, 40) == 3


def test_list_names_every_experiment():
    r = cli("--list")
    assert r.returncode == 0, r.stderr
    for name, study in LADDER.items():
        assert name in r.stdout and study in r.stdout
    for arch in ARCHS:
        assert f"cmp_{arch}" in r.stdout and f"--arch {arch}" in r.stdout
    assert "21 25 29 33" in r.stdout


def test_dry_run_commands_have_the_right_flags(tmp_path):
    r = cli("--dry-run", "--epochs", 40, "--img-size", 96, "--seed", 7, "--out", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    train = {opts(shlex.split(ln))["--name"][0]: opts(shlex.split(ln)) for ln in lines
             if ln.startswith("python train.py")}
    evals = [ln for ln in lines if ln.startswith("python evaluate.py")]
    assert set(train) == set(LADDER) | {f"cmp_{a}" for a in ARCHS}
    assert len(evals) == len(train)
    for name, o in train.items():
        assert o["--epochs"] == ["40"] and o["--img-size"] == ["96"] and o["--val-split"] == ["0.1"]
        assert o["--data"][0].endswith("shared/data")
        assert any(f"{name}/best.pt" in e and f"{name}/{X.EVAL_JSON}" in e and "--split test" in e for e in evals)
    seeds = {n: o["--seed"] for n, o in train.items()}
    assert seeds["f_c50_best_seed1"] == ["8"] and seeds["f_c50_best_seed2"] == ["9"]
    assert all(s == ["7"] for n, s in seeds.items() if not n.startswith("f_"))
    a, b, c = train["a_c1_plain"], train["b_c3_smooth_norm"], train["c_c7_augment"]
    for o in (a, b, c):  # the study's early settings: Adam, no weight decay, no schedule
        assert o["--optimizer"] == ["adam"] and o["--wd"] == ["0"] and o["--scheduler"] == ["none"]
        assert o["--arch"] == ["ghostnet"]
    assert a["--label-smoothing"] == ["0"] and "--no-normalize" in a and a["--augment"] == ["none"]
    assert b["--label-smoothing"] == ["0.1"] and "--no-normalize" not in b and b["--augment"] == ["none"]
    assert c["--augment"] == ["flip", "affine", "jitter"] and "--no-normalize" not in c
    best = ["--optimizer", "--wd", "--dropout", "--out-channels", "--label-smoothing", "--augment"]
    for name in ["d_c50_best", "e_c50_plateau", "f_c50_best_seed1", "f_c50_best_seed2"] + [f"cmp_{x}" for x in ARCHS]:
        o = train[name]
        assert [o[k] for k in best] == [["adamw"], ["0.6"], ["0.2"], ["320"], ["0.1"], ["flip", "affine", "jitter"]]
        assert "--no-normalize" not in o
        if name == "e_c50_plateau":
            assert o["--scheduler"] == ["plateau"] and o["--plateau-patience"] == ["3"]
        else:
            assert o["--scheduler"] == ["multistep"] and o["--milestones"] == ["21", "25", "29", "33"]
    for arch in ARCHS:
        assert train[f"cmp_{arch}"]["--arch"] == [arch]
    assert train["d_c50_best"]["--arch"] == ["ghostnet"]


def test_unknown_name_is_refused():
    r = cli("--only", "nope", "--dry-run")
    assert r.returncode == 2 and "nope" in r.stderr and "d_c50_best" in r.stderr


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    import data
    root = tmp_path_factory.mktemp("exp")
    demo = Path(data.make_demo_dataset(root / "demo", num_classes=3, train_per_class=12, test_per_class=4, seed=0))
    out = root / "out"
    argv = ["--only", "d_c50_best", "--epochs", "1", "--img-size", "32", "--data", str(demo), "--out", str(out),
            "--device", "cpu", "--threads", "1", "--batch-size", "8", "--eval-runs", "1", "--val-split", "0.25",
            "--train-args", f"--workers 1 --cache-dir {root / 'cache'}"]
    rc = X.main(argv)
    return rc, out, argv


def test_smoke_run_writes_tables(smoke):
    rc, out, _ = smoke
    assert rc == 0
    run = out / "d_c50_best"
    for f in ("config.json", "metrics.csv", X.EVAL_JSON, X.RECORD, "train.log", "best.pt"):
        assert (run / f).exists(), f
    ignored = [ln for ln in (out / ".gitignore").read_text().splitlines() if not ln.startswith("#")]
    # checkpoints stay out of git; curves.png and confusion.csv (the model card's source) are committed
    assert "*.pt" in ignored and "*.png" not in ignored and "confusion.csv" not in ignored
    assert (run / "curves.png").exists() or importlib.util.find_spec("matplotlib") is None
    md = (out / "results.md").read_text()
    assert "cars_test (a held-out part of the official train split, not the official test set), 96x64 photos, " \
           "1 epochs at 32 px: not comparable to the study's 83.79% at 227 px after its full training" in md
    assert "## Ablation ladder" in md and "## Architectures at the best recipe" in md
    row = next(ln for ln in md.splitlines() if ln.startswith("| (d) |"))
    assert "`d_c50_best`" in row and "not run" not in row
    ev = json.loads((run / X.EVAL_JSON).read_text())
    assert f"{100 * ev['metrics']['top1']:.2f}" in row
    cmp_row = next(ln for ln in md.splitlines() if ln.startswith("| ghostnet (`d_c50_best`)"))
    assert f"{ev['efficiency']['macs'] / 1e6:.0f}" in cmp_row
    assert "| (a) |" in md and "(not run)" in md  # the rest of the ladder is listed, marked not run
    assert "python train.py" in md and "--name d_c50_best" in md and "python evaluate.py" in md
    res = json.loads((out / "results.json").read_text())
    d = next(r for r in res["experiments"] if r["name"] == "d_c50_best")
    assert d["state"] == "done" and d["test_top1"] == ev["metrics"]["top1"] and d["train_wall_s"] > 0
    assert d["epochs_run"] == 1 and d["params"] > 0 and d["cpu_latency_ms"] > 0
    assert res["environment"]["torch"] and res["settings"]["milestones"] == X.scaled_milestones(1)


def test_rerun_needs_skip_done_and_then_reuses(smoke):
    _, out, argv = smoke
    assert X.main(argv) == 2  # a present run folder is not silently overwritten
    before = json.loads((out / "d_c50_best" / X.RECORD).read_text())
    assert X.main(argv + ["--skip-done"]) == 0  # reused: nothing retrained
    assert json.loads((out / "d_c50_best" / X.RECORD).read_text()) == before
    r = cli(*argv[:-2], "--train-args", argv[-1], "--dry-run")
    assert "# done" in r.stdout


def test_estimate_projects_wall_time(smoke, tmp_path):
    _, out, argv = smoke
    demo = argv[argv.index("--data") + 1]
    r = cli("--estimate", "--only", "d_c50_best", "--data", demo, "--img-size", 32, "--epochs", 40,
            "--estimate-images", 16, "--batch-size", 8, "--threads", 1, "--device", "cpu", "--val-split", 0.25,
            "--train-args", f"--workers 1 --cache-dir {tmp_path / 'cache'}")
    assert r.returncode == 0, r.stderr
    assert "estimate: ghostnet: train" in r.stdout and "projects to" in r.stdout and "d_c50_best" in r.stdout


def sigterm_campaign_once(args: list, runs: list[Path], timeout: float) -> int:
    """Start experiments.py with `args`, SIGTERM it once every run in `runs` has finished an epoch (its
    metrics.csv exists), and return its exit status; it must exit within 30 s of the signal."""
    import signal
    import time
    proc = subprocess.Popen([sys.executable, str(SCRIPT), *map(str, args)], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + timeout
        while not all((r / "metrics.csv").exists() for r in runs) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert proc.poll() is None, "the campaign ended before every run had an epoch"
        proc.send_signal(signal.SIGTERM)
        return proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_sigterm_then_skip_done_resumes(smoke, tmp_path):
    """A campaign stopped mid-run (SIGTERM) leaves no child behind; --skip-done continues with --resume."""
    _, _, argv = smoke
    demo = argv[argv.index("--data") + 1]
    args = ["--only", "a_c1_plain", "--epochs", 2, "--img-size", 32, "--data", demo, "--out", tmp_path / "out",
            "--device", "cpu", "--threads", 1, "--batch-size", 8, "--eval-runs", 1, "--val-split", 0.25,
            "--patience", 0, "--train-args", f"--workers 1 --cache-dir {tmp_path / 'cache'} --step-sleep 0.4",
            "--train-script", "tests/train_hooks.py"]
    run = tmp_path / "out" / "a_c1_plain"
    # metrics.csv is written after last.pt and best.pt: epoch 1 is complete, epoch 2 under way
    assert sigterm_campaign_once(args, [run], timeout=60) != 0
    assert (run / "best.pt").exists()
    rec = json.loads((run / X.RECORD).read_text())
    assert rec["train_rc"] not in (None, 0) and rec["train_sessions"] == 1
    assert X.main([str(a) for a in args]) == 2  # present folder, no --skip-done
    assert X.main([str(a) for a in args] + ["--skip-done"]) == 0
    rec = json.loads((run / X.RECORD).read_text())
    assert rec["train_rc"] == 0 and rec["train_sessions"] == 2 and rec["eval_rc"] == 0
    assert f"tests/train_hooks.py --resume {run}" in (run / "train.log").read_text()
    assert len(X.read_metrics_csv(run / "metrics.csv")) == 2


def test_sigterm_stops_both_runs_of_a_two_job_campaign(smoke, tmp_path):
    """--jobs 2 waits on its runs in worker threads: SIGTERM used to end nothing until both runs had
    finished on their own. Now both children get the signal, keep their last.pt and the campaign exits."""
    _, _, argv = smoke
    demo = argv[argv.index("--data") + 1]
    args = ["--campaign", "recipes", "--seeds", 1, "--jobs", 2, "--epochs", 40, "--img-size", 32, "--data", demo,
            "--out", tmp_path / "out", "--device", "cpu", "--threads", 1, "--batch-size", 8, "--eval-runs", 1,
            "--train-args", f"--workers 1 --cache-dir {tmp_path / 'cache'} --step-sleep 0.3",
            "--train-script", "tests/train_hooks.py"]
    runs = [tmp_path / "out" / n for n in ("study_s0", "fast_s0")]
    assert sigterm_campaign_once(args, runs, timeout=90) != 0  # 40 slowed epochs would take minutes more
    for r in runs:
        assert json.loads((r / X.RECORD).read_text())["train_rc"] == 143, r.name
        assert (r / "last.pt").exists()


def test_effect_label_needs_the_seed_spread():
    """A ladder step's effect is judged against the (d)+(f) seed spread; without those runs (a campaign of
    only (a)-(c)) it said "hurts" for a -0.06 point change, which no one can tell from noise."""
    rows = [{"name": "a_c1_plain", "test_top1": 0.0133}, {"name": "b_c3_smooth_norm", "test_top1": 0.0128}]
    assert X._effect(rows[1], rows, None) == "-0.05 (noise unknown: no seed repeats)"
    assert X._effect(rows[1], rows, 0.53) == "-0.05 (within noise)"
    assert X._effect(rows[1], rows, 0.01) == "-0.05 (hurts)"
    assert X._effect(rows[0], rows, 0.53) == "–"


def test_recipes_campaign_commands():
    r = cli("--campaign", "recipes", "--dry-run", "--epochs", 40, "--jobs", 2)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    train = {opts(shlex.split(ln))["--name"][0]: opts(shlex.split(ln)) for ln in lines
             if ln.startswith("python train.py")}
    assert set(train) == {f"{r}_s{k}" for r in ("study", "fast") for k in range(3)}
    for name, o in train.items():
        # all of cars_train, a fixed length, nothing chosen on the reported split; one thread per side-by-side run
        assert o["--val-split"] == ["0.0"] and o["--patience"] == ["0"] and o["--epochs"] == ["40"]
        assert o["--threads"] == ["1"] and o["--seed"] == [name[-1]]
        assert "--no-validate" in o  # not even a per-epoch look at cars_test (val-split 0 would validate on it)
        assert o["--out"][0].endswith("recipes_40ep")
        if name.startswith("study"):
            assert o["--recipe"] == ["study"] and o["--milestones"] == ["21", "25", "29", "33"]
        else:
            assert o["--recipe"] == ["fast"] and "--milestones" not in o
    evals = [ln for ln in lines if ln.startswith("python evaluate.py")]
    assert len(evals) == 6 and all("/final.pt" in e for e in evals)
    assert all(X.FAST_EVAL == [] or (" ".join(X.FAST_EVAL) in e) == ("/fast_s" in e) for e in evals)


def test_recipes_campaign_fast_args_reach_the_fast_runs_only():
    # the same wall time spent at another input size: the fast runs' own flags come last, so they win
    r = cli("--campaign", "recipes", "--dry-run", "--epochs", 40, "--seeds", 1, "--fast-args",
            "--img-size 128x96 --epochs 34")
    assert r.returncode == 0, r.stderr
    train = {opts(shlex.split(ln))["--name"][0]: shlex.split(ln) for ln in r.stdout.splitlines()
             if ln.startswith("python train.py")}
    study, fast = train["study_s0"], train["fast_s0"]
    assert "128x96" not in study and study[study.index("--epochs") + 1] == "40"
    assert fast[-4:] == ["--img-size", "128x96", "--epochs", "34"]
    assert fast.count("--img-size") == 1 and fast.count("--epochs") == 1  # the command shows what ran, once
    cfg = __import__("config").from_command_line(fast[2:]).cfg
    assert cfg.data.img_size == [96, 128] and cfg.train.epochs == 34
    import argparse
    campaign = argparse.Namespace(campaign="recipes", epochs=40, img_size=96, fast_args="--img-size 128x96 --epochs 34",
                                  data=Path("no_such_folder"))
    assert "40 epochs at 96 px (fast runs: `--img-size 128x96 --epochs 34`)" in X.label(campaign)


def test_a_record_that_lists_an_overridden_option_twice_is_the_same_run(tmp_path):
    """Run folders recorded before the commands dropped overridden options (`--img-size 96 ... --img-size 128`)
    are the same runs as the new one-value commands: --skip-done continues them instead of calling them
    another run's folder; a record of really other settings still is one."""
    fast = "--img-size 128 --epochs 32"
    r = cli("--campaign", "recipes", "--dry-run", "--seeds", 1, "--out", tmp_path, "--fast-args", fast)
    new = [ln for ln in r.stdout.splitlines() if ln.startswith("python train.py") and "fast_s0" in ln][0]
    argv = shlex.split(new)
    old = argv[:argv.index("--seed")] + ["--img-size", "96", "--epochs", "40"] + argv[argv.index("--seed"):]
    (tmp_path / "fast_s0").mkdir()
    record = {"name": "fast_s0", "train_command": shlex.join(old), "train_rc": 0}
    (tmp_path / "fast_s0" / "experiment.json").write_text(json.dumps(record))
    assert X.drop_overridden(old[1:]) == argv[1:]
    r = cli("--campaign", "recipes", "--dry-run", "--seeds", 1, "--out", tmp_path, "--fast-args", fast)
    assert "# fast_s0 (--recipe fast)  # trained" in r.stdout, r.stdout
    # trained in a scratch folder and moved here (its --out names the scratch folder): still this run
    record["train_command"] = shlex.join(old).replace(f"--out {tmp_path}", "--out ../exp_runs/scratch")
    assert "../exp_runs/scratch" in record["train_command"]
    (tmp_path / "fast_s0" / "experiment.json").write_text(json.dumps(record))
    r = cli("--campaign", "recipes", "--dry-run", "--seeds", 1, "--out", tmp_path, "--fast-args", fast)
    assert "# fast_s0 (--recipe fast)  # trained" in r.stdout, r.stdout
    record["train_command"] = new.replace("--epochs 32", "--epochs 31")  # really another run
    (tmp_path / "fast_s0" / "experiment.json").write_text(json.dumps(record))
    r = cli("--campaign", "recipes", "--dry-run", "--seeds", 1, "--out", tmp_path, "--fast-args", fast)
    assert "# fast_s0 (--recipe fast)  # other" in r.stdout, r.stdout


@pytest.mark.slow
def test_recipes_campaign_side_by_side_and_budget_curve(smoke, tmp_path):
    """Two seeds' worth of study/fast runs, two at a time, on the tiny synthetic set: the tables, the mean and
    sd per recipe, and a budget curve over two lengths."""
    _, _, argv = smoke
    demo = argv[argv.index("--data") + 1]
    folders = []
    for epochs in (1, 2):
        out = tmp_path / f"r{epochs}"
        rc = X.main(["--campaign", "recipes", "--seeds", "2" if epochs == 1 else "1", "--jobs", "2",
                     "--epochs", str(epochs), "--img-size", "32", "--data", demo, "--out", str(out),
                     "--device", "cpu", "--batch-size", "8", "--eval-runs", "1",
                     "--train-args", f"--workers 1 --cache-dir {tmp_path / 'cache'}"])
        assert rc == 0
        folders.append(out)
    res = json.loads((folders[0] / "results.json").read_text())
    assert res["settings"]["campaign"] == "recipes" and res["summary"]["fast"]["runs"] == 2
    import datetime
    last_file = max((folders[0] / r["name"] / "final.pt").stat().st_mtime for r in res["experiments"])
    assert res["environment"]["date"] >= datetime.datetime.fromtimestamp(last_file).isoformat(timespec="seconds")
    for r in res["experiments"]:
        assert r["state"] == "done" and r["train_wall_s"] > 0
        assert (tmp_path / "r1" / r["name"] / "final.pt").exists()
        assert json.loads((tmp_path / "r1" / r["name"] / "config.json").read_text())["config"]["data"]["val_split"] == 0.0
    md = (folders[0] / "results.md").read_text()
    t1 = [100 * r["test_top1"] for r in res["experiments"] if r["step"] == "fast"]
    import statistics
    assert f"| fast | 2 | {statistics.mean(t1):.2f} ± {statistics.stdev(t1):.2f} |" in md
    assert "side by side" in md
    assert "with `--no-validate` nothing is evaluated during training" in md
    budget = [ln for ln in md.splitlines() if ln.startswith("| ") and ln.endswith(("| yes |", "| NO |"))]
    assert len(budget) == 2  # one line per seed: the fast run's time against its study twin's
    assert res["settings"]["data_desc"] == "96x64 photos"
    assert X.main(["--budget-curve", *map(str, folders), "--out", str(tmp_path)]) == 0
    curve = (tmp_path / "budget_curve.md").read_text()
    assert "| 1 | 2 |" in curve and "| 2 | 1 |" in curve
    assert sum(line.startswith("- `") and "2 run(s) at a time" in line for line in curve.splitlines()) == 2  # machines
    assert len(json.loads((tmp_path / "budget_curve.json").read_text())) == 6
    assert (tmp_path / "budget_curve.png").exists() or importlib.util.find_spec("matplotlib") is None


def test_search_table_marks_runs_of_code_train_py_does_not_have(tmp_path):
    """A run folder with NOTE.md ran a prototype (a patch config.json cannot record): its row says so, the
    others don't, and the options column still lists what differs from the first run."""
    header = "epoch,lr,train_loss,train_acc,val_loss,val_acc,val_top5,seconds,img_per_s\n"
    for name, lr in (("a_base", 0.005), ("b_proto", 0.005), ("c_lr", 0.01)):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"options": {"lr": lr, "epochs": 2, "name": name}}))
        (d / "metrics.csv").write_text(header + "1,0.1,5,0.01,5.2,0.02,0.1,10,100\n2,0.1,4.9,0.03,5.1,0.04,0.12,10,100\n")
    (tmp_path / "b_proto" / "NOTE.md").write_text("prototype\n")
    assert X.search_table(tmp_path) == 0
    rows = {line.split("`")[1]: line for line in (tmp_path / "results.md").read_text().splitlines()
            if line.startswith("| `")}
    assert "NOTE.md](b_proto/NOTE.md)" in rows["b_proto"]
    assert "NOTE.md" not in rows["a_base"] and "NOTE.md" not in rows["c_lr"]
    assert "lr=0.01" in rows["c_lr"] and "4.0 / 12.0 / 5.100" in rows["c_lr"]


def test_search_table_means_over_seeds_and_runs_of_a_removed_option(tmp_path):
    """Runs named <candidate>_s<k> get one row of means over their seeds (the score docs/recipes_crops.md
    decides on); a run of an option this code no longer has (a measurement left out) still shows that option;
    runs are compared with the one that started first, whatever their names."""
    header = "epoch,lr,train_loss,train_acc,val_loss,val_acc,val_top5,seconds,img_per_s\n"
    runs = (("base_s0", "2026-01-01T00:00:00", {}, 0.10), ("base_s1", "2026-01-01T00:00:01", {}, 0.20),
            ("a_mix_s0", "2026-01-02T00:00:00", {"mixup": 0.2}, 0.30), ("a_mix_s1", "2026-01-02T00:00:01",
                                                                      {"mixup": 0.2}, 0.50))
    for name, started, extra, acc in runs:
        d = tmp_path / name
        d.mkdir()
        cfg = {"run": {"name": name, "seed": int(name[-1])}, "train": {"epochs": 2, **extra}}
        (d / "config.json").write_text(json.dumps({"config": cfg, "started": started}))
        (d / "metrics.csv").write_text(header + f"1,0.1,5,0.01,5.2,0.02,0.1,10,100\n2,0.1,4.9,0.25,4.0,{acc},0.6,20,100\n")
    assert X.search_table(tmp_path) == 0
    text = (tmp_path / "results.md").read_text()
    rows = {line.split("`")[1]: line for line in text.splitlines() if line.startswith("| `")}
    assert text.index("| `base_s0`") < text.index("| `a_mix_s0`")  # the first started is the reference
    assert "mixup=0.2" in rows["a_mix_s1"] and rows["base_s0"].split(" | ")[1] == "–"
    assert rows["base"].startswith("| `base` | 2 | 10.0, 20.0 | 15.00 | 60.00 | 4.000 | 25.0 | 0.5 |")
    assert rows["a_mix"].startswith("| `a_mix` | 2 | 30.0, 50.0 | 40.00 |")


def test_budget_curve_keeps_a_fast_args_campaign_as_its_own_series(tmp_path):
    """A campaign whose fast runs had their own flags (another size in the study's time) is its own row and
    series: its study runs are not pooled with another folder's study runs of the same length."""
    def campaign(name: str, epochs: int, fast_args: str, study_top1: float, fast_top1: float) -> Path:
        d = tmp_path / name
        d.mkdir()
        runs = [{"name": f"{r}_s0", "step": r, "test_top1": t / 100, "test_top5": 2 * t / 100,
                 "train_wall_s": 60.0 * epochs} for r, t in (("study", study_top1), ("fast", fast_top1))]
        (d / "results.json").write_text(json.dumps({
            "settings": {"campaign": "recipes", "epochs": epochs, "fast_args": fast_args, "jobs": 2},
            "environment": {"cpu": "test cpu", "date": "2026-12-03T00:00:00"}, "experiments": runs}))
        return d
    folders = [campaign("r20", 20, "", 3.0, 7.0), campaign("r40", 40, "", 6.0, 9.0),
               campaign("r40_128", 40, "--img-size 128 --epochs 32", 7.0, 11.0)]
    assert X.budget_curve(folders, tmp_path) == 0
    rows = [ln for ln in (tmp_path / "budget_curve.md").read_text().splitlines() if ln.startswith("| ")][1:]
    assert [r.split(" | ")[0] for r in rows] == ["| 20", "| 40", "| 40 (fast: `--img-size 128 --epochs 32`)"]
    assert "| 6.00 |" in rows[1] and "| 7.00 |" in rows[2]  # the two 40-epoch study runs are not pooled
    points = json.loads((tmp_path / "budget_curve.json").read_text())
    assert {p["fast_args"] for p in points} == {"", "--img-size 128 --epochs 32"} and len(points) == 6


def test_environment_names_the_gpu_of_cuda_runs_only(monkeypatch):
    import argparse
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU 80GB")
    assert X.environment(argparse.Namespace(device="cuda", threads=1))["gpu"] == "Fake GPU 80GB"
    assert "gpu" not in X.environment(argparse.Namespace(device="cpu", threads=1))
    assert "gpu" not in X.environment(argparse.Namespace(device=None, threads=1))  # auto: the record stays a CPU's


def test_gpu_recipes_script_runs_on_cpu_and_bundles_without_checkpoints(smoke, tmp_path):
    """benchmarks/gpu_recipes.sh (the GPU comparison at 227 px) end to end on the CPU with tiny settings: both
    recipes' run folders, their tables, and the bundle a device machine hands back, without weights."""
    import tarfile
    _, _, argv = smoke
    demo = argv[argv.index("--data") + 1]
    out, res = tmp_path / "out", tmp_path / "res"
    out.mkdir()
    env = {**os.environ, "DEVICE": "cpu", "EPOCHS": "1", "IMG": "32", "SEED": "3", "GHOSTCARS_DATA": demo,
           "OUT": str(out), "RESULTS_DIR": str(res), "GHOSTCARS_CACHE": str(tmp_path / "cache"),
           "TRAIN_ARGS": "--batch-size 8 --workers 1"}
    r = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_recipes.sh")], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    campaign = res / "recipes_32px_1ep_gpu_seed3"
    results = json.loads((campaign / "results.json").read_text())
    assert results["settings"]["seed"] == 3 and results["settings"]["jobs"] == 2
    assert sorted(e["name"] for e in results["experiments"]) == ["fast_s0", "study_s0"]
    assert all(e["state"] == "done" for e in results["experiments"])
    with tarfile.open(out / "recipes_gpu.tar.gz") as tar:
        names = tar.getnames()
    for run in ("study_s0", "fast_s0"):
        for f in ("metrics.csv", "config.json", "evaluate_test.json"):
            assert f"recipes_32px_1ep_gpu_seed3/{run}/{f}" in names
    assert "recipes_32px_1ep_gpu_seed3/results.md" in names and "recipes_32px_1ep_gpu_seed3/environment.txt" in names
    assert not [n for n in names if n.endswith(".pt")]


def test_budget_pairs_say_whether_each_fast_run_kept_within_the_study_twins_time():
    """The ±10 % budget of the recipes campaign, per seed, on both the process wall time and the training
    loop's summed epoch seconds: 1.04x passes, 1.11x (the fast recipe's 48 epochs side by side) fails."""
    rows = [{"step": "study", "seed_offset": 0, "train_wall_s": 1900.0, "epochs_s_sum": 1832.0},
            {"step": "fast", "seed_offset": 0, "train_wall_s": 1980.0, "epochs_s_sum": 1912.5},
            {"step": "study", "seed_offset": 1, "train_wall_s": 1900.0, "epochs_s_sum": 1832.0},
            {"step": "fast", "seed_offset": 1, "train_wall_s": 2110.0, "epochs_s_sum": 2040.0},
            {"step": "study", "seed_offset": 2, "train_wall_s": 1900.0, "epochs_s_sum": 1832.0}]  # twin unfinished
    lines = [ln for ln in X._budget_pairs(rows, seed=0) if ln.startswith("| ") and "x" in ln.split("|")[4]]
    assert len(lines) == 2
    assert lines[0].startswith("| 0 |") and "x1.044" in lines[0] and lines[0].endswith("| yes |")
    assert lines[1].startswith("| 1 |") and "x1.114" in lines[1] and lines[1].endswith("| NO |")
    assert X._budget_pairs(rows[:1], seed=0) == []  # no pair: no table
    assert "| unrecorded | yes |" in lines[0]  # no start and end times: cannot say whether they shared the load
    assert any("not a budget measurement" in ln for ln in X._budget_pairs(rows, seed=0))


def test_budget_pairs_say_whether_the_twins_ran_side_by_side():
    """A campaign resumed with --only (or with a study run copied from another campaign) can time a fast run
    beside another fast run: the table says which pairs shared the machine (a bug: it compared them silently)."""
    def run(step, k, start, end):
        return {"step": step, "seed_offset": k, "train_wall_s": 1900.0, "epochs_s_sum": 1832.0,
                "started": f"2026-12-07T{start}", "finished": f"2026-12-07T{end}"}
    rows = [run("study", 0, "10:00:00", "10:32:00"), run("fast", 0, "10:00:02", "10:33:10"),  # together
            run("study", 1, "08:00:00", "08:32:00"), run("fast", 1, "10:40:00", "11:12:00")]  # hours apart
    table = X._budget_pairs(rows, seed=0)
    lines = [ln for ln in table if ln.startswith("| 0 |") or ln.startswith("| 1 |")]
    assert lines[0].endswith("| yes | yes |") and lines[1].endswith("| no | yes |")
    assert table[-1].startswith("Where the twins did not run side by side")
    assert X.side_by_side(rows[0], rows[1]) and not X.side_by_side(rows[2], rows[3])
    assert not any("not a budget measurement" in ln for ln in X._budget_pairs(rows[:2], seed=0))


def test_describe_data_tells_the_thumbnails_from_the_crops(real_data):
    """Campaign tables name the copy they trained on, measured from a training photo: before this, every
    table said "128x96 copy", the crops' campaign too."""
    crops = real_data.parent / "crops"
    assert X.describe_data(real_data) == "128x96 copy"
    if (crops / "stanford_cars" / "devkit").exists():
        assert X.describe_data(crops).startswith("full-resolution crops")
    assert X.describe_data(real_data / "nothing_here") == "copy unknown"


def test_two_runs_of_one_recipe_side_by_side_are_announced(tmp_path, monkeypatch):
    """`--only fast_s1 fast_s2 --jobs 2` trains two fast runs together: a note says before the run that their
    times will be no budget measurement; a seed's study and fast twins, or a batch with one run left, are fine."""
    exps = {e.name: e for e in X.recipe_experiments(40)}
    plans = lambda *names: [X.Plan(exps[n], tmp_path / n, [], []) for n in names]  # noqa: E731
    monkeypatch.setattr(X, "state", lambda p: "done" if p.exp.name == "study_s2" else "empty")
    notes = X.unpaired_batches(plans("fast_s1", "fast_s2"), 2)
    assert len(notes) == 1 and "fast_s1 and fast_s2" in notes[0] and "no budget measurement" in notes[0]
    assert X.unpaired_batches(plans("study_s0", "fast_s0", "study_s1", "fast_s1"), 2) == []
    assert X.unpaired_batches(plans("study_s1", "study_s2"), 2) == []  # study_s2 is done: study_s1 runs alone
