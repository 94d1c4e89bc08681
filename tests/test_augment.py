"""augment.py: the batched ops against torchvision one image at a time, the whole BatchTransform, its CPU
thread pool, and inference's normalisation (images.Preprocess.to_model_input)."""
import math

import pytest
import torch
import torchvision.transforms.v2.functional as TF

import augment
from config import AugmentConfig
import data
import batches
import images


# ----------------------------------------------------------------------------------------------------------
# batched ops == torchvision.transforms.v2.functional on one sample with the same parameters

def _imgs(B=6, C=3, H=37, W=45, seed=0):
    g = torch.Generator().manual_seed(seed)
    # smooth + noise, so nearest-neighbour mismatches show up and hue has every sector
    yy, xx = torch.meshgrid(torch.linspace(0, 1, H), torch.linspace(0, 1, W), indexing="ij")
    base = torch.stack([xx, yy, (xx + yy) / 2])[:C]
    return (base + 0.3 * torch.rand(B, C, H, W, generator=g)).clamp(0, 1)


def _close_nearest(a, b, frac=0.005):
    """Nearest sampling: a float ulp can flip a pixel exactly between two; allow a few such pixels."""
    diff = (a - b).abs().amax(1)
    assert (diff > 1e-5).float().mean() <= frac, (diff > 1e-5).float().mean()


def test_flip_affine_rotation_match_torchvision():
    x = _imgs()
    B, C, H, W = x.shape
    bt = augment.BatchTransform(images.Preprocess(), {"flip": {}, "affine": {}, "rotation": {}})
    p = bt.sample_params(B, H, W, torch.Generator().manual_seed(1))
    assert p["flip"].any() and not p["flip"].all()
    for op in ("flip", "affine", "rotation"):
        M = bt.matrices({op: p[op]}, B, H, W)
        out = augment.warp(x, M, "nearest")
        for k in range(B):
            if op == "flip":
                ref = TF.horizontal_flip(x[k]) if p["flip"][k] else x[k]
                assert torch.equal(out[k], ref)
            elif op == "affine":
                a, tx, ty, s, shx, shy = p["affine"][k].tolist()
                assert tx == round(tx) and abs(a) <= 25 and 0.9 <= s <= 1.1 and abs(shx) <= 8 and shy == 0
                ref = TF.affine(x[k], angle=a, translate=[int(tx), int(ty)], scale=s, shear=[shx, shy],
                                interpolation=TF.InterpolationMode.NEAREST, fill=0)
                _close_nearest(out[k:k + 1], ref[None])
            else:
                ref = TF.rotate(x[k], p["rotation"][k].item(), fill=0)
                _close_nearest(out[k:k + 1], ref[None])
    # bilinear, with a 4-value shear, and flip composed into the same matrix
    bt = augment.BatchTransform(images.Preprocess(), {"flip": {"p": 1.0}, "affine": {"shear": (-5, 5, -3, 3)}})
    p = bt.sample_params(B, H, W, torch.Generator().manual_seed(2))
    out = augment.warp(x, bt.matrices(p, B, H, W), "bilinear")
    for k in range(B):
        a, tx, ty, s, shx, shy = p["affine"][k].tolist()
        ref = TF.affine(TF.horizontal_flip(x[k]), angle=a, translate=[int(tx), int(ty)], scale=s,
                        shear=[shx, shy], interpolation=TF.InterpolationMode.BILINEAR, fill=0)
        torch.testing.assert_close(out[k], ref, atol=2e-4, rtol=0)


def test_perspective_and_resized_crop_match_torchvision():
    x = _imgs(B=5)
    B, C, H, W = x.shape
    bt = augment.BatchTransform(images.Preprocess(), {"perspective": {"p": 1.0}, "resized_crop": {}})
    p = bt.sample_params(B, H, W, torch.Generator().manual_seed(3))
    out = augment.warp(x, bt.matrices({"perspective": p["perspective"]}, B, H, W), "bilinear")
    for k in range(B):
        ref = TF.perspective(x[k], None, None, coefficients=p["perspective"][k].tolist(), fill=0)
        torch.testing.assert_close(out[k], ref, atol=2e-4, rtol=0)
    # coefficients equal torchvision's solver for the same corners
    start = [[0, 0], [W - 1, 0], [W - 1, H - 1], [0, H - 1]]
    end = [[3, 2], [W - 5, 1], [W - 2, H - 4], [1, H - 2]]
    from torchvision.transforms.functional import _get_perspective_coeffs
    mine = augment.perspective_coefficients(torch.tensor([start]), torch.tensor([end]))[0]
    torch.testing.assert_close(mine, torch.tensor(_get_perspective_coeffs(start, end)), atol=1e-5, rtol=1e-5)
    crop = p["resized_crop"]
    eye = torch.eye(3, dtype=torch.float64).repeat(B, 1, 1)
    out = augment.warp(x, eye, "bilinear", crop)
    for k in range(B):
        t, l, h, w = crop[k].tolist()
        assert 0 <= t and t + h <= H and 0 <= l and l + w <= W
        ref = TF.resized_crop(x[k], t, l, h, w, [H, W], antialias=True)
        torch.testing.assert_close(out[k], ref, atol=2e-4, rtol=0)


@pytest.mark.parametrize("H, W", [(30, 30), (30, 40), (40, 30)])
def test_resized_crop_ratio_is_relative_to_the_image_shape(H, W):
    """A 4:3 image's crops have its proportions on average (box ratio 1 x W/H), so resizing them back to the
    image's shape stretches nothing on average, as at test time; for a square this is torchvision's rule."""
    bt = augment.BatchTransform(images.Preprocess(), {"resized_crop": {"scale": (0.35, 1.0)}})
    crop = bt.sample_params(4000, H, W, torch.Generator().manual_seed(0))["resized_crop"].double()
    log_ratio = torch.log(crop[:, 3] / crop[:, 2])  # log(w / h)
    assert abs(log_ratio.mean().item() - math.log(W / H)) < 0.03
    assert log_ratio.min().item() >= math.log(3 / 4 * W / H) - 0.1
    assert log_ratio.max().item() <= math.log(4 / 3 * W / H) + 0.1


@pytest.mark.parametrize("C", [3, 1])
def test_color_ops_match_torchvision(C):
    x = _imgs(C=C)
    B = x.shape[0]
    g = torch.Generator().manual_seed(4)
    f = torch.rand(B, generator=g) * 1.2 + 0.2
    hue = torch.rand(B, generator=g) - 0.5
    hue[0], hue[1] = 0.5, -0.5
    pairs = [(augment.adjust_brightness, TF.adjust_brightness, f), (augment.adjust_contrast, TF.adjust_contrast, f),
             (augment.adjust_saturation, TF.adjust_saturation, f), (augment.adjust_hue, TF.adjust_hue, hue)]
    gray_px = x.clone()
    if C == 3:
        gray_px[:, :, :3, :3] = 0.5  # r == g == b: hue undefined, must stay gray
        gray_px[:, 1, 3:5, :] = gray_px[:, 0, 3:5, :]  # ties between channels
    for mine, ref, fac in pairs:
        out = mine(gray_px, fac)
        for k in range(B):
            torch.testing.assert_close(out[k], ref(gray_px[k], fac[k].item()), atol=2e-5, rtol=0)


def test_color_jitter_per_sample_order_and_defaults():
    x = _imgs(B=16)
    B, C, H, W = x.shape
    bt = augment.BatchTransform(images.Preprocess(), ["jitter"])
    p = bt.sample_params(B, H, W, torch.Generator().manual_seed(5))
    fac, order = p["jitter"], p["jitter_order"]
    assert ((fac[:, :3] >= 0.8) & (fac[:, :3] <= 1.2)).all() and (fac[:, 3].abs() <= 0.1).all()
    assert len({tuple(o) for o in order.tolist()}) > 4  # a random order per sample
    out = augment.color_jitter(x, fac, order)
    fns = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    for k in range(B):
        ref = x[k]
        for op in order[k].tolist():
            ref = fns[op](ref, fac[k, op].item())
        torch.testing.assert_close(out[k], ref, atol=5e-5, rtol=0)
    # the vectorised path (used on accelerators) gives the same result as the CPU per-image path
    torch.testing.assert_close(augment.color_jitter(x, fac, order, per_image=False), out, atol=1e-6, rtol=0)


@pytest.mark.cuda
def test_cuda_pipeline_matches_cpu():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    n = 40
    u8 = (_imgs(B=n, H=64, W=64) * 255).round().to(torch.uint8)
    dec = images.Decoded(u8.numpy(), torch.arange(n), [str(i) for i in range(n)])
    loader = batches.BatchLoader(dec, 16, shuffle=True, drop_last=False, device="cuda", seed=1)
    bt = augment.BatchTransform(images.Preprocess(img_size=64), list(augment.AUG_NAMES), {})
    for x, y in loader:
        assert x.is_cuda and y.is_cuda and x.dtype == torch.uint8
        gpu = bt(x, True, torch.Generator().manual_seed(int(y[0])))
        cpu = bt(x.cpu(), True, torch.Generator().manual_seed(int(y[0])))
        assert gpu.is_cuda
        diff = (gpu.cpu() - cpu).abs().amax(1)
        assert (diff > 1e-3).float().mean() < 0.01  # float differences may move a few resampled pixels
        assert torch.equal(x.cpu(), u8[y.cpu()])
    f, o = torch.rand(8, 4) * 0.2 + 0.9, torch.stack([torch.randperm(4) for _ in range(8)])
    f[:, 3] -= 1.0
    xs = _imgs(B=8)
    torch.testing.assert_close(augment.color_jitter(xs.cuda(), f.cuda(), o).cpu(), augment.color_jitter(xs, f, o),
                               atol=1e-5, rtol=0)


def test_erase_matches_torchvision_and_whole_transform():
    x = _imgs(B=8)
    B, C, H, W = x.shape
    prep = images.Preprocess()
    bt = augment.BatchTransform(prep, None, {"p": 0.7})
    p = bt.sample_params(B, H, W, torch.Generator().manual_seed(6))
    out = augment.erase(x, p["erase"], 0.0)
    assert (p["erase"][:, 2] > 0).any() and (p["erase"][:, 2] == 0).any()
    for k in range(B):
        i, j, h, w = p["erase"][k].tolist()
        ref = TF.erase(x[k], i, j, h, w, torch.tensor(0.0)) if h else x[k]
        assert torch.equal(out[k], ref)
    # eval path: exactly /255 then normalize
    u8 = (x * 255).round().to(torch.uint8)
    ev = bt(u8, train=False)
    ref = TF.normalize(u8.float() / 255, list(prep.mean), list(prep.std))
    torch.testing.assert_close(ev, ref, atol=1e-5, rtol=0)
    # reference augmentations: reproducible from the generator, different without
    full = augment.BatchTransform(prep, AugmentConfig().augment, {})
    a = full(u8, True, torch.Generator().manual_seed(7))
    b = full(u8, True, torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and a.dtype == torch.float32 and a.shape == u8.shape
    assert not torch.equal(a, full(u8, True, torch.Generator().manual_seed(8)))
    # chunked CPU path == one chunk
    full.cpu_chunk = B
    torch.testing.assert_close(full(u8, True, torch.Generator().manual_seed(7)), a, atol=1e-5, rtol=0)
    # grayscale batches and no normalization
    gray = augment.BatchTransform(images.Preprocess(grayscale=True, normalize=False), list(augment.AUG_NAMES), {})
    y = gray(u8[:, :1], True, torch.Generator().manual_seed(9))
    assert y.shape == (B, 1, H, W) and 0 <= y.min() and y.max() <= 1


# ----------------------------------------------------------------------------------------------------------
# options, preprocess, demo set, stats


@pytest.mark.parametrize("names", [None, ["flip", "affine", "jitter"]], ids=["eval", "augment"])
def test_batch_transform_thread_pool_under_inference_mode(names):
    """Regression: evaluate.py transforms under torch.inference_mode, and the CPU pool's threads do not
    inherit that thread-local mode, so with 2+ threads and several chunks their in-place writes into the
    (inference) output tensor raised "Inplace update to inference tensor outside InferenceMode"."""
    u8 = (_imgs(B=12, H=32, W=32) * 255).round().to(torch.uint8)
    bt = augment.BatchTransform(images.Preprocess(img_size=32), names)
    bt.threads = 2  # 12 images = 3 chunks of 4 on 2 pool threads
    want = bt(u8, train=names is not None, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        got = bt(u8, train=names is not None, generator=torch.Generator().manual_seed(0))
    assert got.is_inference()
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(bt(u8, train=False), bt(u8, train=False))


# ----------------------------------------------------------------------------------------------------------
# inference's normalisation is training's, bit for bit

@pytest.mark.parametrize("options", [{}, {"grayscale": True}, {"normalize": False},
                                     {"mean": (0.5, 0.4, 0.3), "std": (0.2, 0.3, 0.25)}])
def test_to_model_input_equals_the_training_transform_without_augmentation(options):
    prep = images.Preprocess(img_size=16, **options)
    u8 = torch.randint(0, 256, (9, prep.channels, 16, 16), dtype=torch.uint8)
    bt = augment.BatchTransform(prep, None, None)
    bt.threads = 2  # the chunked CPU path too
    assert torch.equal(prep.to_model_input(u8), bt(u8, train=False))
    with pytest.raises(data.DataError, match="uint8"):
        prep.to_model_input(u8.float())
