"""mixup (--mixup A) and TrivialAugment (--augment ... trivial): the images and targets they make, the same
draws from the same generator, and exact resume of a run that uses them."""
import math

import pytest
import torch
import torch.nn as nn
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF

import augment
import images
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


@pytest.mark.parametrize("op", augment.TRIVIAL_OPS)
def test_trivial_ops_are_torchvisions_at_the_same_magnitude(op):
    """Each op at each of a few magnitudes == torchvision's TrivialAugmentWide op (its
    _apply_image_or_video_transform) on a 224-wide image, where the translation in pixels is the same."""
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (3, 32, 224), generator=g, dtype=torch.uint8)
    tvs = T.TrivialAugmentWide()
    names = {"identity": "Identity", "shear_x": "ShearX", "shear_y": "ShearY", "translate_x": "TranslateX",
             "translate_y": "TranslateY", "rotate": "Rotate", "brightness": "Brightness", "color": "Color",
             "contrast": "Contrast", "sharpness": "Sharpness", "posterize": "Posterize", "solarize": "Solarize",
             "autocontrast": "AutoContrast", "equalize": "Equalize"}
    fn, signed = tvs._AUGMENTATION_SPACE[names[op]]
    mags = fn(31, 32, 224)
    for b in (0, 7, 30):
        for neg in ((0, 1) if signed else (0,)):
            m = 0.0 if mags is None else float(mags[b]) * (-1 if neg else 1)
            if op == "translate_y":
                m = m * 32 / 224  # ours: a fraction of the side (32 px at 224 px), the image is 32 high
            ref = tvs._apply_image_or_video_transform(x.float() / 255, names[op], m, interpolation=tvs.interpolation,
                                                      fill={type(x): None, torch.Tensor: None})
            ours = augment.trivial_augment(x[None].float() / 255, torch.tensor([[augment.TRIVIAL_OPS.index(op), b, neg]]),
                                           31)[0]
            if op in ("posterize", "equalize"):  # ours round through uint8, as torchvision's uint8 path
                ref = tvs._apply_image_or_video_transform(x, names[op], m, interpolation=tvs.interpolation,
                                                          fill={type(x): None, torch.Tensor: None}).float() / 255
            torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0, msg=f"{op} bin {b} negated {neg}")


def test_trivial_draws_one_op_per_image_from_the_generator():
    bt = augment.BatchTransform(images.Preprocess(), ["trivial"])
    x = torch.randint(0, 256, (64, 3, 16, 32), dtype=torch.uint8)
    p = bt.sample_params(64, 16, 32, torch.Generator().manual_seed(3))["trivial"]
    assert p.shape == (64, 3) and set(p[:, 0].tolist()) <= set(range(len(augment.TRIVIAL_OPS)))
    assert len(set(p[:, 0].tolist())) > 8 and p[:, 1].max() <= 30 and set(p[:, 2].tolist()) == {0, 1}
    a = bt(x, train=True, generator=torch.Generator().manual_seed(3))
    b = bt(x, train=True, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert torch.equal(bt(x, train=False), bt(x, train=False))  # evaluation: no op at all
    same = [torch.equal(a[k], bt(x[k:k + 1], train=False)[0]) for k in range(64)]
    assert not all(same)


@pytest.mark.slow
def test_mixup_and_trivial_resume_exactly_after_sigkill(tmp_path, tiny_data, cache_dir):
    common = ["--data", tiny_data, "--out", tmp_path, "--cache-dir", cache_dir, "--img-size", 32, "--batch-size", 8,
              "--epochs", 3, "--deterministic", "--device", "cpu", "--seed", 3, "--recipe", "fast", "--no-validate",
              "--mixup", 0.2, "--augment", "flip", "resized_crop", "trivial"]
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
