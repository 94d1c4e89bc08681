"""mixup (--mixup A): the images and targets it makes, the same draws from the same generator, and exact resume
of a run that uses it."""
import math

import pytest
import torch
import torch.nn as nn

import augment
from test_train import TIMING, kill_inside_epoch_2, read_rows, run_train


def test_mixup_blends_images_and_targets_by_one_weight():
    g = torch.Generator().manual_seed(0)
    x, labels = torch.randn(6, 3, 8, 10), torch.tensor([0, 1, 2, 3, 4, 5])
    mix = augment.mixup(x, labels, 0.2, g)
    assert 0.0 <= mix.lam <= 1.0
    torch.testing.assert_close(mix.images, mix.lam * x + (1 - mix.lam) * x.roll(1, 0))
    assert mix.labels_b.tolist() == [5, 0, 1, 2, 3, 4]
    # the loss equals cross entropy against the blended, label-smoothed target distribution
    logits = torch.randn(6, 7)
    ce = nn.CrossEntropyLoss(label_smoothing=0.1)
    target = mix.lam * nn.functional.one_hot(labels, 7).float() + (1 - mix.lam) * nn.functional.one_hot(
        mix.labels_b, 7).float()
    torch.testing.assert_close(augment.mixed_loss(ce, logits, labels, mix), ce(logits, target))
    assert augment.mixed_loss(ce, logits, labels, None) == ce(logits, labels)
    # the same generator state draws the same weight; Beta(0.2, 0.2) puts most weight near 0 and 1
    again = augment.mixup(x, labels, 0.2, torch.Generator().manual_seed(0))
    assert again.lam == mix.lam
    lams = [augment.mixup(x, labels, 0.2, g).lam for _ in range(2000)]
    assert abs(sum(lams) / len(lams) - 0.5) < 0.03
    assert sum(1 for v in lams if v < 0.1 or v > 0.9) / len(lams) > 0.5


@pytest.mark.slow
def test_mixup_resumes_exactly_after_sigkill(tmp_path, tiny_data, cache_dir):
    common = ["--data", tiny_data, "--out", tmp_path, "--cache-dir", cache_dir, "--img-size", 32, "--batch-size", 8,
              "--epochs", 3, "--deterministic", "--device", "cpu", "--seed", 3, "--recipe", "fast", "--no-validate",
              "--mixup", 0.2]
    full = run_train(*common, "--name", "full")
    assert full.returncode == 0, full.stderr
    kill_inside_epoch_2(common, tmp_path / "cut")
    resumed = run_train("--resume", tmp_path / "cut")
    assert resumed.returncode == 0, resumed.stderr
    strip = lambda rows: [{k: v for k, v in r.items() if k not in TIMING} for r in rows]  # noqa: E731
    rows = strip(read_rows(tmp_path / "full"))
    assert strip(read_rows(tmp_path / "cut")) == rows and all(math.isfinite(r["train_loss"]) for r in rows)
    a = torch.load(tmp_path / "full" / "final.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "cut" / "final.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
