"""The typed configuration (config.py), the run folder (runs.py) and TensorBoard tracking: recipes as YAML,
one-line errors for a misspelled key or a wrong type, a run replayed from its config.json, training bit for
bit as the code before the configuration existed, and event files that hold metrics.csv's numbers."""
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

import config as C
import data
import runs
from test_train import ENV, REPO, assert_one_line_error, old_tree, read_rows, run_train

# The last commit before config.py: train.py's argparse flags and --recipe overlays, as they trained.
BEFORE_CONFIG = "37873305d5996ecb24500609b287855dfd6dc1bd"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("config")
    return data.make_demo_dataset(root / "demo", num_classes=3, train_per_class=12, test_per_class=4, seed=0)


def test_study_yaml_is_the_defaults_and_every_recipe_file_reads():
    study = C.Config().updated(C.read_file(C.RECIPES_DIR / "study.yaml"))
    assert study == C.Config()
    assert set(C.recipe_names()) >= {"study", "fast", "demo"}
    fast = C.Config().updated(C.read_file(C.RECIPES_DIR / "fast.yaml"))
    assert (fast.train.scheduler, fast.train.lr, fast.data.test_crop, fast.augment.augment) == \
        ("cosine", 0.0025, 0.8, ["flip", "resized_crop"])


def test_order_defaults_recipe_demo_files_flags(tmp_path):
    mine = tmp_path / "mine.yaml"
    mine.write_text("train:\n  lr: 5e-3\n  epochs: 7\ndata:\n  img_size: 160x80\n")
    cl = C.from_command_line(["--recipe", "fast", "--demo", "--config", str(mine), "--epochs", "3"])
    cfg = cl.cfg
    assert cfg.train.ema == 0.999  # the recipe's
    assert cfg.train.batch_size == 16 and cfg.run.demo  # the demo's, over the recipe's
    assert cfg.train.lr == 0.005 and cfg.data.img_size == [80, 160]  # the file's over the recipe's 2.5e-3 (YAML's 5e-3 is a string)
    assert cfg.train.epochs == 3  # the flag's, over the file's
    assert cl.explicit == {"recipe", "demo", "epochs"} and cl.config_files == [str(mine)]


def test_print_config_prints_the_resolved_yaml():
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), "--recipe", "fast", "--lr", "0.01",
                           "--img-size", "160x80", "--print-config"],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    printed = yaml.safe_load(proc.stdout)
    assert printed["train"]["lr"] == 0.01 and printed["train"]["scheduler"] == "cosine"
    # WIDTHxHEIGHT as --img-size and the recipe files take it; it printed JSON's [80, 160] before (height first)
    assert printed["data"]["img_size"] == "160x80"
    loaded = C.from_saved(printed, "printed").to_dict()  # what --config of the printed file would give
    assert loaded["data"]["img_size"] == [80, 160]
    assert {**loaded, "data": {**loaded["data"], "img_size": "160x80"}} == printed


@pytest.mark.parametrize("text, words", [
    ("train:\n  learning_rate: 0.01\n", ["bad.yaml", "learning_rate", "did you mean"]),
    ("train:\n  wd_norm_bais: false\n", ["bad.yaml", "wd_norm_bais", "wd_norm_bias"]),
    ("trian:\n  lr: 0.01\n", ["bad.yaml", "trian", "train"]),
    ("model:\n  lr: 0.01\n", ["bad.yaml", "model.lr", "section 'train'"]),
    ("train:\n  epochs: ten\n", ["bad.yaml", "train.epochs", "expected int"]),
    ("train:\n  epochs: 2.5\n", ["bad.yaml", "train.epochs", "expected int"]),
    ("train:\n  milestones: 30\n", ["bad.yaml", "train.milestones", "list of int"]),
    ("train:\n  scheduler: cosin\n", ["bad.yaml", "train.scheduler", "cosine"]),
    ("data:\n  img_size: big\n", ["bad.yaml", "img_size", "WIDTHxHEIGHT"]),
    ("train: [lr\n", ["bad.yaml", "yaml"]),
])
def test_a_bad_yaml_file_is_one_line_naming_file_key_and_fix(tmp_path, text, words):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    proc = run_train("--config", bad, "--out", tmp_path, timeout=120)
    assert proc.returncode == 2
    assert_one_line_error(proc, *words)
    assert not any((tmp_path / d).is_dir() for d in os.listdir(tmp_path) if d != "bad.yaml")  # no run folder


def test_a_missing_config_file_is_one_line(tmp_path):
    proc = run_train("--config", tmp_path / "nope.yaml", timeout=120)
    assert proc.returncode == 2
    assert_one_line_error(proc, "nope.yaml", "no such config file")


def test_older_config_json_and_checkpoints_still_read(tmp_path):
    """Run folders committed under benchmarks/results keep argparse's flat "options"; version-1 checkpoints
    keep the same flat names in "config"."""
    old = REPO / "benchmarks" / "results" / "recipes_40ep_128px" / "fast_s0" / "config.json"
    cfg, record = runs.read_config_json(old)
    assert (cfg.train.scheduler, cfg.data.img_size, cfg.run.recipe) == ("cosine", 128, "fast")
    assert "command" in record
    flat = json.loads(old.read_text())["options"]
    assert runs.config_of({"config": flat}).train.ema == flat["ema"]
    replay = C.read_file(old)  # an older config.json replays too
    assert "name" not in replay and replay["epochs"] == flat["epochs"]


def test_replay_from_config_json_gives_the_same_options(tmp_path, tiny):
    common = ["--data", tiny, "--out", tmp_path, "--img-size", 32, "--batch-size", 8, "--epochs", 1, "--device",
              "cpu", "--workers", 0, "--recipe", "fast", "--lr", "0.004", "--no-tensorboard"]
    first = run_train(*common, "--name", "first")
    assert first.returncode == 0, first.stderr
    second = run_train("--config", tmp_path / "first" / "config.json", "--name", "second")
    assert second.returncode == 0, second.stderr
    a, _ = runs.RunFolder(tmp_path / "first").read_config()
    b, _ = runs.RunFolder(tmp_path / "second").read_config()
    assert a.updated({"name": None}) == b.updated({"name": None})
    assert b.train.lr == 0.004 and b.run.name == "second"
    ckpt = runs.load_checkpoint(tmp_path / "second" / "final.pt")  # weights_only load of the typed config
    assert ckpt["version"] == runs.CHECKPOINT_VERSION and runs.config_of(ckpt) == b


def test_tensorboard_events_hold_the_metrics(tmp_path, tiny):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    proc = run_train("--data", tiny, "--out", tmp_path, "--name", "tb", "--img-size", 32, "--batch-size", 8,
                     "--epochs", 2, "--device", "cpu", "--workers", 0, "--scheduler", "cosine")
    assert proc.returncode == 0, proc.stderr
    run = tmp_path / "tb"
    assert list(run.glob("events.out.tfevents.*"))
    acc = EventAccumulator(str(run))
    acc.Reload()
    rows = read_rows(run)
    for key in ("lr", "train_loss", "train_acc", "val_loss", "val_acc", "val_top5", "img_per_s"):
        got = [e.value for e in acc.Scalars(f"epoch/{key}")]
        # metrics.csv keeps 6 significant digits (%.6g), the event file float32: equal to the csv's precision
        assert got == pytest.approx([float(r[key]) for r in rows], rel=1e-5), key
    steps = [e.step for e in acc.Scalars("step/loss")]
    assert steps == sorted(steps) and steps[-1] == [e.step for e in acc.Scalars("epoch/val_acc")][-1]
    assert [e.value for e in acc.Scalars("hparam/val_acc")] == pytest.approx([float(rows[-1]["val_acc"])], rel=1e-5)
    assert len(list(run.glob("events.out.tfevents.*"))) == 1  # one event file a session


def test_no_tensorboard_writes_no_events(tmp_path, tiny):
    proc = run_train("--data", tiny, "--out", tmp_path, "--name", "quiet", "--img-size", 32, "--batch-size", 8,
                     "--epochs", 1, "--device", "cpu", "--workers", 0, "--no-tensorboard")
    assert proc.returncode == 0, proc.stderr
    assert not list((tmp_path / "quiet").rglob("events.out.tfevents.*"))


@pytest.mark.slow
# the fast variant pins the learning rate and weight decay the old code's fast recipe had (version 7 halved the
# rate to 2.5e-3, version 8 raised the decay to 0.2; version 10's decode scale, which the old code lacked, is set back
# to 1 for today's code only): the test is about the configuration code, not the recipe's values (size and length
# are pinned by `common` below)
@pytest.mark.parametrize("variant", [[], ["--config", "recipes/study.yaml"],
                                     ["--recipe", "fast", "--lr", "0.005", "--wd", "0.05"], ["--demo"]],
                         ids=["study", "study.yaml", "fast", "demo"])
def test_training_is_bit_for_bit_as_before_the_configuration(tmp_path, tiny, variant):
    """One epoch on a fixed seed, trained by today's code and by the code of BEFORE_CONFIG side by side on
    this machine: the same metrics.csv (but its timing) and bit-identical weights. The config file is given
    to today's code only (the old code had none; its study recipe was its defaults). One thread and the
    plain PyTorch GhostModule (the old tree has no built kernels), so both sum in the same order."""
    old = old_tree(tmp_path, BEFORE_CONFIG)
    common = ["--out", tmp_path, "--epochs", 1, "--deterministic", "--device", "cpu", "--seed", 3, "--threads", 1,
              "--ghost-op", "torch", "--workers", 0]
    if "--demo" not in variant:
        common += ["--data", tiny, "--img-size", 32, "--batch-size", 8]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name, tree in (("before", old), ("now", REPO)):
        given = [] if tree == old and variant[:1] == ["--config"] else variant
        given = [str(tree / g) if g.startswith("recipes/") else g for g in given]
        if tree == REPO and "fast" in given:
            given += ["--train-decode-scale", "1"]
        proc = subprocess.run([sys.executable, str(tree / "train.py"), *map(str, common), *given, "--name", name,
                               "--cache-dir", str(tmp_path / f"cache_{name}")], cwd=tree, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"{name}: {proc.stderr[-2000:]}"
    before, now = read_rows(tmp_path / "before"), read_rows(tmp_path / "now")
    assert len(now) == len(before) == 1
    for key in ("lr", "train_loss", "train_acc", "val_loss", "val_acc", "val_top5"):
        assert now[0][key] == before[0][key], (key, now, before)
    w_before = torch.load(tmp_path / "before" / "last.pt", map_location="cpu", weights_only=False)["model"]
    w_now = torch.load(tmp_path / "now" / "last.pt", map_location="cpu", weights_only=False)["model"]
    assert w_before.keys() == w_now.keys()
    assert all(torch.equal(w_before[k], w_now[k]) for k in w_now), "the weights after one epoch differ"
