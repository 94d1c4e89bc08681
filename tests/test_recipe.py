"""The short-budget recipe's parts in train.py: the per-step LR schedule with warm-up, the EMA of the
weights, parameter groups without weight decay on norms and biases, the --recipe presets, final.pt, and
exact resume with all of them after SIGKILL."""
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

import config
import distributed
import images
import learner
import loaders
from test_train import REPO, TIMING, kill_inside_epoch_2, old_tree, parse, read_rows, run_train


FAST = config.read_file(config.RECIPES_DIR / "fast.yaml")  # flat {option: value} of the recipe file
DEMO = config.read_file(config.RECIPES_DIR / "demo.yaml")


def test_lr_factor_warms_up_then_decays_to_about_zero():
    total, warmup = 100, 10
    f = [learner.lr_factor(s, total, warmup, "cosine") for s in range(total)]
    assert f[:warmup] == pytest.approx([(s + 1) / warmup for s in range(warmup)])  # linear from 1/10 to 1
    assert f[warmup] == 1.0 and all(a >= b for a, b in zip(f[warmup:], f[warmup + 1:]))  # monotone decay
    assert 0 < f[-1] < 1e-3  # the last step runs at about zero, not at zero (that step would be wasted)
    mid = warmup + (total - warmup) // 2
    assert f[mid] == pytest.approx(0.5, abs=1e-12)  # cosine: half way down at half the decay
    lin = [learner.lr_factor(s, total, 0, "linear") for s in range(total)]
    assert lin[0] == 1.0 and lin[-1] == pytest.approx(1 / total) and lin[50] == pytest.approx(0.5)
    assert [learner.lr_factor(s, total, 4, "none") for s in (0, 3, 4, 99)] == [0.25, 1.0, 1.0, 1.0]
    floor = [learner.lr_factor(s, total, 0, "cosine", floor=0.1) for s in (0, total - 1)]
    assert floor[0] == 1.0 and floor[1] == pytest.approx(0.1, abs=1e-3)


def _sched_args(**kw):
    base = dict(scheduler="cosine", warmup_epochs=0.5, epochs=4, lr=0.1, min_lr=0.0, milestones=[2], gamma=0.1,
                exp_base=0.9, plateau_factor=0.1, plateau_patience=1)
    return type("A", (), {**base, **kw})


def test_scheduler_steps_per_optimizer_step_and_resumes_to_the_same_values():
    """LR of every optimizer step over a 4-epoch run of 10 steps per epoch; a scheduler rebuilt from the
    state_dict saved after step 17 (inside epoch 2, as a --max-steps or SIGKILL resume does) continues with
    the very same values."""
    def run(stop=None, state=None):
        p = nn.Parameter(torch.zeros(1))
        opt = torch.optim.SGD([p], lr=0.1)
        sched, per_step = learner.make_scheduler(_sched_args(), opt, steps_per_epoch=10)
        assert per_step
        if state is not None:
            opt.load_state_dict(state[0])
            sched.load_state_dict(state[1])
        lrs = []
        for s in range(state[2] if state else 0, 40):
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
            if stop is not None and s + 1 == stop:
                return lrs, (opt.state_dict(), sched.state_dict(), stop)
        return lrs, None

    full, _ = run()
    assert full[:5] == pytest.approx([0.02, 0.04, 0.06, 0.08, 0.1])  # warm-up: 0.5 epochs = 5 steps
    assert full[-1] < 0.01 * 0.1  # about zero at the end
    assert all(a > b for a, b in zip(full[5:], full[6:]))  # after the peak, a lower value every step
    head, state = run(stop=17)
    tail, _ = run(state=state)
    assert head + tail == full


def test_per_epoch_schedules_are_unchanged_and_refuse_warmup():
    p = nn.Parameter(torch.zeros(1))
    sched, per_step = learner.make_scheduler(_sched_args(scheduler="multistep", warmup_epochs=0),
                                           torch.optim.SGD([p], lr=0.1), 10)
    assert isinstance(sched, torch.optim.lr_scheduler.MultiStepLR) and not per_step
    assert learner.make_scheduler(_sched_args(scheduler="none", warmup_epochs=0), torch.optim.SGD([p], lr=0.1),
                                10) == (None, False)
    cfg = config.from_command_line(["--warmup-epochs", "1"]).cfg  # multistep (the study's) + warm-up
    with pytest.raises(config.ConfigError, match="warmup-epochs"):
        config.check(cfg)


def test_ema_matches_a_hand_recount_including_batchnorm_statistics():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    decay = 0.9
    ema = learner.make_ema(net, decay)
    expect = {k: v.clone().double() for k, v in net.state_dict().items()}
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    for n in range(1, 30):  # the first update copies; then decay ramps up as min(decay, (1+n)/(10+n))
        net(torch.randn(8, 3)).pow(2).mean().backward()  # training mode: BN running stats move too
        opt.step()
        opt.zero_grad()
        ema.update_parameters(net)
        d = min(decay, (1 + (n - 1)) / (10 + (n - 1))) if n > 1 else 0.0
        for k, v in net.state_dict().items():
            if v.is_floating_point():
                expect[k] = expect[k] if n > 1 else v.double()
                expect[k] = d * expect[k] + (1 - d) * v.double()
            else:
                expect[k] = v.clone()  # num_batches_tracked: copied
    got = ema.module.state_dict()
    for k, v in expect.items():
        if v.is_floating_point():
            torch.testing.assert_close(got[k].double(), v, rtol=1e-5, atol=1e-6, msg=k)
        else:
            assert torch.equal(got[k], v), k
    assert not torch.equal(got["1.running_mean"], net.state_dict()["1.running_mean"])  # an average, not a copy


def test_param_groups_spare_norms_and_biases_only_when_asked():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    one = learner.param_groups(net, 0.6, wd_norm_bias=True)  # the study: decay on everything
    assert len(one) == 1 and one[0]["weight_decay"] == 0.6 and len(one[0]["params"]) == 6
    two = learner.param_groups(net, 0.05, wd_norm_bias=False)
    decayed, spared = two[0]["params"], two[1]["params"]
    assert two[0]["weight_decay"] == 0.05 and two[1]["weight_decay"] == 0.0
    assert {id(p) for p in decayed} == {id(net[0].weight), id(net[3].weight)}
    assert {id(p) for p in spared} == {id(net[0].bias), id(net[1].weight), id(net[1].bias), id(net[3].bias)}
    opt = torch.optim.AdamW(two, lr=1.0)
    bn, conv = net[1].weight.detach().clone(), net[0].weight.detach().clone()
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()  # zero gradients: only weight decay can move a parameter
    assert torch.equal(net[1].weight, bn)
    torch.testing.assert_close(net[0].weight.detach(), conv * (1 - 0.05))  # decoupled decay: w -= lr * wd * w


def test_recipe_presets_and_explicit_flags():
    study, _ = parse([])
    assert (study.recipe, study.scheduler, study.warmup_epochs, study.ema, study.wd_norm_bias) == \
        ("study", "multistep", 0.0, 0.0, True)
    fast, explicit = parse(["--recipe", "fast", "--lr", "0.01"])
    for k, v in FAST.items():
        assert getattr(fast, k) == (0.01 if k == "lr" else v), k
    assert explicit == {"recipe", "lr"}
    assert (fast.img_size, fast.epochs) == (96, 42)  # the budget's shape and length (docs/recipes_crops.md)
    assert parse(["--recipe", "fast", "--img-size", "128x64"])[0].img_size == [64, 128]  # the user's size still wins
    demo, _ = parse(["--recipe", "fast", "--demo"])
    assert demo.img_size == DEMO["img_size"] and demo.ema == FAST["ema"]
    config.check(config.from_command_line(["--recipe", "fast", "--demo"]).cfg)  # its flips need no decode scale


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import data
    root = tmp_path_factory.mktemp("recipe")
    return (data.make_demo_dataset(root / "demo", num_classes=3, train_per_class=12, test_per_class=4, seed=0),
            root / "cache")


def test_fast_recipe_writes_ema_weights_to_best_and_final(tmp_path, tiny):
    data_dir, cache = tiny
    proc = run_train("--data", data_dir, "--out", tmp_path, "--name", "f", "--cache-dir", cache, "--recipe", "fast",
                     "--img-size", 32, "--batch-size", 8, "--epochs", 2, "--device", "cpu", "--ema", "0.9")
    assert proc.returncode == 0, proc.stderr
    run = tmp_path / "f"
    last = torch.load(run / "last.pt", weights_only=True)
    final = torch.load(run / "final.pt", weights_only=True)
    assert last["ema"] is not None and "optimizer" not in final and "ema" not in final
    ema_weights = {k.removeprefix("module."): v for k, v in last["ema"].items() if k.startswith("module.")}
    for k, v in final["model"].items():  # final.pt = the averaged model, not the raw one
        assert torch.equal(v, ema_weights[k]), k
    assert any(not torch.equal(v, last["model"][k]) for k, v in final["model"].items() if v.is_floating_point())
    rows = read_rows(run)
    lrs = [float(r["lr"]) for r in rows]
    assert lrs[0] < lrs[1]  # warm-up (2 epochs): epoch 1 starts near zero
    import json

    import evaluate
    for size in ("32", "40"):  # the training size, and a larger test size (FixRes)
        assert evaluate.main(["--checkpoint", str(run / "final.pt"), "--data", str(data_dir), "--cache-dir",
                              str(cache), "--img-size", size, "--no-efficiency", "--tta",
                              "--json", str(tmp_path / f"ev{size}.json")]) == 0
    at32, at40 = (json.loads((tmp_path / f"ev{s}.json").read_text())["metrics"] for s in ("32", "40"))
    assert (at40["img_size"], at40["train_img_size"], at32["img_size"]) == (40, 32, 32)
    assert at40["loss"] != at32["loss"]  # other pixels went in
    # the fast recipe's test crop travels in the checkpoint: evaluation (and predict.py) use it unless told
    assert final["preprocess"]["test_crop"] == FAST["test_crop"] == at32["test_crop"]
    assert evaluate.main(["--checkpoint", str(run / "final.pt"), "--data", str(data_dir), "--cache-dir", str(cache),
                          "--test-crop", "1", "--no-efficiency", "--tta", "--json", str(tmp_path / "whole.json")]) == 0
    whole = json.loads((tmp_path / "whole.json").read_text())["metrics"]
    assert whole["test_crop"] == 1.0 and whole["loss"] != at32["loss"]


def test_a_test_crop_cuts_validation_images_and_leaves_training_images_whole(tiny):
    data_dir, cache = tiny
    cfg = config.from_command_line(["--data", str(data_dir), "--cache-dir", str(cache), "--img-size", "32",
                                    "--test-crop", "0.6"]).cfg
    env = distributed.Setup(rank=0, world=1, local_rank=0, ddp=False, device=torch.device("cpu"), backend=None,
                            ghost_op="torch", amp_dtype=None, scaler=None)
    d = loaders.load_data(cfg, env)
    assert d.prep.test_crop == 0.6
    first_train, first_val = d.train.paths[0], d.val.paths[0]
    whole, centre = d.prep.for_training(), d.prep
    assert torch.equal(torch.as_tensor(np.array(d.train.images[0])), images.load_image(first_train, whole))
    assert torch.equal(torch.as_tensor(np.array(d.val.images[0])), images.load_image(first_val, centre))
    assert not torch.equal(images.load_image(first_val, whole), images.load_image(first_val, centre))


def test_train_decode_scale_caches_larger_training_photos_and_crops_them_to_the_input_size(tiny):
    """--train-decode-scale 1.5: training photos are decoded at 48 px for a 32 px input (validation photos stay
    at 32, with their test crop), and each training batch comes out at 32 px, every image its random box of the
    48 px photo resampled down as F.interpolate would; without resized_crop the option is a one-line error."""
    import torch.nn.functional as F
    data_dir, cache = tiny
    args = ["--data", str(data_dir), "--cache-dir", str(cache), "--recipe", "fast", "--img-size", "32",
            "--train-decode-scale", "1.5"]
    cfg = config.from_command_line(args).cfg
    config.check(cfg)
    env = distributed.Setup(rank=0, world=1, local_rank=0, ddp=False, device=torch.device("cpu"), backend=None,
                            ghost_op="torch", amp_dtype=None, scaler=None)
    d = loaders.load_data(cfg, env)
    assert tuple(d.train.images.shape[2:]) == (48, 48) and tuple(d.val.images.shape[2:]) == (32, 32)
    assert torch.equal(torch.as_tensor(np.array(d.train.images[0])),
                       images.load_image(d.train.paths[0], d.prep.for_training(1.5)))
    assert torch.equal(torch.as_tensor(np.array(d.val.images[0])), images.load_image(d.val.paths[0], d.prep))

    u8 = torch.as_tensor(np.array(d.train.images[:6]))
    x = d.transform(u8, train=True, generator=torch.Generator().manual_seed(7))
    assert x.shape == (6, 3, 32, 32)
    box = d.transform.sample_params(6, 48, 48, torch.Generator().manual_seed(7), (32, 32))
    scale, shift = d.prep.scale_shift()
    for i in range(6):
        top, left, h, w = box["resized_crop"][i].tolist()
        photo = u8[i:i + 1].flip(-1) if box["flip"][i] else u8[i:i + 1]  # the box lies in the flipped photo
        ref = F.interpolate(photo[:, :, top:top + h, left:left + w].float(), size=(32, 32), mode="bilinear",
                            align_corners=False)
        assert torch.allclose(x[i:i + 1], ref * scale + shift, atol=1e-3), i
    with pytest.raises(images.DataError, match="train-decode-scale"):  # evaluation never resizes
        d.transform(u8, train=False)

    bad = config.from_command_line(args + ["--augment", "flip", "affine"]).cfg
    with pytest.raises(config.ConfigError, match="needs the resized_crop"):
        config.check(bad)
    with pytest.raises(config.ConfigError, match=r"\[1, 4\]"):
        config.check(config.from_command_line(args[:-1] + ["0.5"]).cfg)


@pytest.mark.slow
def test_resume_after_sigkill_is_exact_with_ema_and_per_step_schedule(tmp_path, tiny):
    data_dir, cache = tiny
    common = ["--data", data_dir, "--out", tmp_path, "--cache-dir", cache, "--img-size", 32, "--batch-size", 8,
              "--epochs", 3, "--deterministic", "--device", "cpu", "--seed", 4, "--recipe", "fast",
              "--warmup-epochs", 0.5, "--ema", 0.9]
    full = run_train(*common, "--name", "full")
    assert full.returncode == 0, full.stderr
    kill_inside_epoch_2(common, tmp_path / "cut")
    resumed = run_train("--resume", tmp_path / "cut")
    assert resumed.returncode == 0, resumed.stderr

    strip = lambda rows: [{k: v for k, v in r.items() if k not in TIMING} for r in rows]  # noqa: E731
    assert strip(read_rows(tmp_path / "cut")) == strip(read_rows(tmp_path / "full"))
    a = torch.load(tmp_path / "full" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    for part in ("model", "ema"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"] == a["step"]
    assert math.isclose(a["optimizer"]["param_groups"][0]["lr"], b["optimizer"]["param_groups"][0]["lr"])


def test_zero_init_residual_starts_every_residual_block_as_its_shortcut():
    import model as M
    torch.manual_seed(0)
    net = M.build_model("ghostnet", 5, ghost_op="torch")
    assert M.zero_init_residual(net) == 16  # every GhostBottleneck of GhostNet 1.0
    net.train()
    x = torch.randn(4, 16, 24, 24)
    block = net.blocks[0][0]  # 16 -> 16, stride 1: identity shortcut
    torch.testing.assert_close(block(x), x, rtol=0, atol=0)
    y = torch.randn(4, 16, 24, 24)
    down = net.blocks[1][0]  # 16 -> 24, stride 2: the output is the projection shortcut alone
    torch.testing.assert_close(down(y), down.shortcut(y), rtol=0, atol=0)
    assert M.zero_init_residual(M.build_model("resnet18", 5)) == 0


# The study's recipe (C-50), every value that shapes the training: a new flag has to state here what the study
# recipe does with it, so `python train.py --data data` keeps training exactly as the study's settings say.
STUDY_VALUES = dict(
    recipe="study", seed=0, deterministic=False, sync_bn=False, scale_lr=False, arch="ghostnet", dropout=0.2,
    out_channels=320, width=1.0, zero_init_residual=False, img_size=227, batch_size=64, epochs=200, lr=1e-3,
    optimizer="adamw", wd=0.6, momentum=0.9, label_smoothing=0.1, scheduler="multistep", milestones=[67, 82, 95, 107],
    gamma=0.1, exp_base=0.975, plateau_factor=0.1, plateau_patience=10, min_lr=0.0, warmup_epochs=0.0, ema=0.0,
    wd_norm_bias=True, patience=15, early_stop_on="val_loss", amp=None, amp_dtype="auto", channels_last=False,
    compile=False, crop_bbox=False, bbox_margin=0.0, erase_background=False, grayscale=False, no_normalize=False,
    mean=None, std=None, val_split=0.0, val_seed=None, validate=True, test_crop=1.0, train_decode_scale=1.0,
    augment=["flip", "affine", "jitter"], flip_p=0.5, degrees=25.0,
    translate=[0.1, 0.1], scale=[0.9, 1.1], shear=[8.0], jitter=[0.2, 0.2, 0.2, 0.1], rotation_degrees=15.0,
    perspective_scale=0.5, perspective_p=0.5, crop_scale=[0.08, 1.0], crop_ratio=[0.75, 4 / 3], interpolation="auto",
    erase=False, erase_p=0.5, erase_scale=[0.02, 0.33], erase_ratio=[0.3, 3.3], erase_value=0.0)
# where files go and how the machine runs them: no bearing on the weights a run learns
NOT_RECIPE = {"data", "out", "name", "demo", "resume", "init_from", "resume_if_exists", "device", "workers",
              "threads", "max_steps", "dist_timeout", "ghost_op", "cache_dir", "limit_train", "limit_val", "tensorboard"}


def test_study_recipe_values_are_pinned():
    study, explicit = parse([])
    got = {k: v for k, v in vars(study).items() if k not in NOT_RECIPE}
    assert got == STUDY_VALUES
    assert explicit == set()


# The last commit before --recipe fast (c410ea7) changed train.py: the study's recipe as it was then.
BEFORE_FAST = "4ada1b0f572f449c16168b39b91f2eb11330cd70"


def test_study_recipe_first_epoch_is_as_before(tmp_path, tiny):
    """One epoch of the study's recipe on a fixed seed, trained by today's code and by the code of BEFORE_FAST on
    this machine, gives the same metrics and bit-identical weights. Measured side by side rather than against
    recorded numbers: the same code's loss moves in the second decimal between CPUs (1.239 on an Intel Xeon,
    1.272 on an AMD EPYC with the same torch), as much as a different seed does. One thread and the plain
    PyTorch GhostModule (the old tree has no built kernels) so that both runs sum in the same order."""
    old = old_tree(tmp_path, BEFORE_FAST)
    data_dir, _ = tiny
    common = ["--data", data_dir, "--out", tmp_path, "--img-size", 32, "--batch-size", 8, "--epochs", 1,
              "--deterministic", "--device", "cpu", "--seed", 3, "--threads", 1, "--ghost-op", "torch",
              "--workers", 0]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name, tree in (("before", old), ("now", REPO)):
        proc = subprocess.run([sys.executable, str(tree / "train.py"), *map(str, common), "--name", name,
                               "--cache-dir", str(tmp_path / f"cache_{name}")], cwd=tree, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"{name}: {proc.stderr[-2000:]}"
    (before,), (now,) = read_rows(tmp_path / "before"), read_rows(tmp_path / "now")
    assert float(now["lr"]) == 1e-3
    for key in ("lr", "train_loss", "train_acc", "val_loss", "val_acc", "val_top5"):
        assert now[key] == before[key], (key, now, before)
    w_before = torch.load(tmp_path / "before" / "last.pt", map_location="cpu", weights_only=False)["model"]
    w_now = torch.load(tmp_path / "now" / "last.pt", map_location="cpu", weights_only=False)["model"]
    assert w_before.keys() == w_now.keys()
    assert all(torch.equal(w_before[k], w_now[k]) for k in w_now), "the weights after one epoch differ"
