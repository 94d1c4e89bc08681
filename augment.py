"""Batched augmentation: whole uint8 batches on the training device, each image with its own random
parameters, in one vectorised pass. Every op is the same math as torchvision.transforms.v2.functional
(tests/test_augment.py compares them image by image); BatchTransform also scales and normalises, with the
very tensors of images.Preprocess.scale_shift that inference uses (Preprocess.to_model_input): evaluate.py,
predict.py and export.py never import this module.

    BatchTransform(prep, augment, erase)(uint8 (B, C, S, S), train=True, generator=g) -> float32 batch
    BatchTransform(prep, augment, erase, out_hw=(s, s))(uint8 (B, C, S, S), ...) -> (B, C, s, s): training photos
        decoded larger than the input (--train-decode-scale), the resized crop resampling each box down to s x s

augment_from_config turns the augment section of a run's configuration (config.AugmentConfig, where every
default lives) into the parameters BatchTransform takes.
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from config import AUG_NAMES, AugmentConfig
from data import DataError
from images import Preprocess


GEOMETRIC = ("flip", "affine", "rotation", "perspective", "resized_crop")  # applied in this order
# torchvision's defaults: NEAREST for affine/rotation, BILINEAR for perspective/resized crop; fill 0
INTERPOLATION = {"affine": "nearest", "rotation": "nearest", "perspective": "bilinear", "resized_crop": "bilinear"}


def _range(v: Any, center: float = 0.0, lo: float | None = None) -> tuple[float, float]:
    """torchvision's convention: a number d means (center - d, center + d), a pair is taken as is."""
    if isinstance(v, (int, float)):
        a, b = center - float(v), center + float(v)
        return (max(lo, a) if lo is not None else a), b
    return float(v[0]), float(v[1])


def resolve_augment(augment: dict | Sequence[str] | None) -> dict[str, dict]:
    """Fill in config.AugmentConfig's defaults: {"flip": {}} -> {"flip": {"p": 0.5}}; a list of names takes
    all defaults."""
    if not augment:
        return {}
    defaults, _ = augment_from_config(AugmentConfig(augment=list(augment)))  # unknown names fail here
    if not isinstance(augment, dict):
        return defaults
    return {name: {**defaults[name], **(params or {})} for name, params in augment.items()}


def affine_inverse_matrices(angle: torch.Tensor, tx: torch.Tensor, ty: torch.Tensor, scale: torch.Tensor,
                            shear_x: torch.Tensor, shear_y: torch.Tensor) -> torch.Tensor:
    """(B, 3, 3) float64 maps output -> input pixel coordinates centred on the image centre, for
    F.affine(img, angle, (tx, ty), scale, (shear_x, shear_y)) about the centre.

    The forward map is T(translate) . Rot(angle) . Scale . ShearY . ShearX (PIL / torchvision convention);
    its rotation-shear part has determinant 1, so the inverse is the adjugate divided by the scale."""
    rot, sx, sy = torch.deg2rad(angle), torch.deg2rad(shear_x), torch.deg2rad(shear_y)
    a = torch.cos(rot - sy) / torch.cos(sy)
    b = -(a * torch.tan(sx) + torch.sin(rot))
    c = torch.sin(rot - sy) / torch.cos(sy)
    d = torch.cos(rot) - c * torch.tan(sx)
    m = torch.zeros(angle.shape[0], 3, 3, dtype=torch.float64)
    m[:, 0, 0], m[:, 0, 1] = d / scale, -b / scale
    m[:, 1, 0], m[:, 1, 1] = -c / scale, a / scale
    m[:, 0, 2] = -m[:, 0, 0] * tx - m[:, 0, 1] * ty
    m[:, 1, 2] = -m[:, 1, 0] * tx - m[:, 1, 1] * ty
    m[:, 2, 2] = 1.0
    return m


def perspective_coefficients(startpoints: torch.Tensor, endpoints: torch.Tensor) -> torch.Tensor:
    """(B, 8) homography coefficients mapping endpoints -> startpoints (both (B, 4, 2)), like torchvision's
    _get_perspective_coeffs but as one batched exact 8x8 solve in float64."""
    B = startpoints.shape[0]
    e, s = endpoints.to(torch.float64), startpoints.to(torch.float64)
    A = torch.zeros(B, 8, 8, dtype=torch.float64)
    ex, ey, sx, sy = e[..., 0], e[..., 1], s[..., 0], s[..., 1]
    A[:, 0::2, 0], A[:, 0::2, 1], A[:, 0::2, 2] = ex, ey, 1.0
    A[:, 1::2, 3], A[:, 1::2, 4], A[:, 1::2, 5] = ex, ey, 1.0
    A[:, 0::2, 6], A[:, 0::2, 7] = -sx * ex, -sx * ey
    A[:, 1::2, 6], A[:, 1::2, 7] = -sy * ex, -sy * ey
    rhs = s.reshape(B, 8)
    return torch.linalg.solve(A, rhs).to(torch.float32)


def perspective_matrices(coeffs: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """(B, 3, 3) float64 in centred coordinates from torchvision's coefficients, which act on pixel-edge
    coordinates (x + 0.5): conjugate by the shift between the two frames."""
    B = coeffs.shape[0]
    P = torch.ones(B, 9, dtype=torch.float64)
    P[:, :8] = coeffs.to(torch.float64)
    P = P.view(B, 3, 3)
    to_edge = torch.tensor([[1, 0, W / 2], [0, 1, H / 2], [0, 0, 1]], dtype=torch.float64)
    from_edge = torch.tensor([[1, 0, -W / 2], [0, 1, -H / 2], [0, 0, 1]], dtype=torch.float64)
    return from_edge @ P @ to_edge


def warp(images: torch.Tensor, M: torch.Tensor, mode: str = "nearest",
         crop: torch.Tensor | None = None, out_hw: tuple[int, int] | None = None) -> torch.Tensor:
    """One grid_sample for a whole batch. images float (B, C, H, W); M (B, 3, 3) maps output -> input centred
    pixel coordinates (projective). crop (B, 4) = top, left, height, width of a resized crop applied last: the
    output is first mapped into the crop (clamped to it, as F.interpolate does at its edges), then through M.
    out_hw: the output's (height, width), other than the input's only with a crop (which is resampled to it).
    Out-of-image pixels are 0; bilinear also multiplies by the warped coverage mask, like torchvision's fill."""
    B, C, H, W = images.shape
    Ho, Wo = out_hw or (H, W)
    if (Ho, Wo) != (H, W) and crop is None:
        raise ValueError(f"warp: an output of {Ho}x{Wo} from {H}x{W} images needs a resized crop")
    dev = images.device
    M = M.to(torch.float64)
    xs = torch.linspace((1 - Wo) * 0.5, (Wo - 1) * 0.5, Wo, device=dev).expand(B, Wo)
    ys = torch.linspace((1 - Ho) * 0.5, (Ho - 1) * 0.5, Ho, device=dev).expand(B, Ho)
    if crop is not None:
        top, left, ch, cw = (crop[:, k].to(dev, torch.float32)[:, None] for k in range(4))
        # output centred -> crop-local pixel (F.interpolate, align_corners=False): (x + Wo/2) * cw/Wo - 0.5;
        # separable, so the clamp to the crop is done on the 1-D coordinate vectors
        xs = torch.minimum(((xs + Wo / 2) * (cw / Wo) - 0.5).clamp_min(0), cw - 1)
        ys = torch.minimum(((ys + Ho / 2) * (ch / Ho) - 0.5).clamp_min(0), ch - 1)
        # crop-local -> centred coordinates of the image before the crop, folded into M
        shift = torch.eye(3, dtype=torch.float64).repeat(B, 1, 1)
        shift[:, 0, 2] = crop[:, 1].to(torch.float64) - (W - 1) / 2
        shift[:, 1, 2] = crop[:, 0].to(torch.float64) - (H - 1) / 2
        M = M @ shift
    projective = bool((M[:, 2, :2] != 0).any())
    # torchvision divides the matrix by (W/2, H/2) before applying it; the same order keeps float rounding equal
    if not projective:
        M = M * torch.tensor([2.0 / W, 2.0 / H, 1.0], dtype=torch.float64)[:, None]
    m = M.to(dev, torch.float32)
    xs, ys = xs[:, None, :], ys[:, :, None]  # (B, 1, W), (B, H, 1): the grid is a broadcast sum, no bmm

    def row(k: int) -> torch.Tensor:
        return (m[:, k, 0, None, None] * xs + m[:, k, 2, None, None]) + m[:, k, 1, None, None] * ys

    grid = torch.empty(B, Ho, Wo, 2, device=dev)
    if projective:
        z = row(2)
        torch.div(row(0), z, out=grid[..., 0]).mul_(2.0 / W)
        torch.div(row(1), z, out=grid[..., 1]).mul_(2.0 / H)
    else:
        grid[..., 0] = row(0)
        grid[..., 1] = row(1)
    if mode == "bilinear":
        x = torch.cat([images, torch.ones_like(images[:, :1])], 1)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        return x[:, :C] * x[:, C:]
    return F.grid_sample(images, grid, mode=mode, padding_mode="zeros", align_corners=False)


_GRAY_W = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights


def _gray(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    return (r * _GRAY_W[0]).add_(g, alpha=_GRAY_W[1]).add_(b, alpha=_GRAY_W[2]).unsqueeze(1)


# The colour ops work on float images in [0, 1] and clamp like torchvision's float kernels. CPU note: in-place
# ops and no torch.where / remainder / bool-multiplies (several times slower than plain arithmetic on CPU).

def adjust_brightness(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return (x * f.view(-1, 1, 1, 1)).clamp_(0, 1)


def adjust_contrast(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    ch_mean = x.mean(dim=(2, 3))  # the mean of the gray image is the gray of the channel means (linear)
    if x.shape[1] == 3:
        mean = ch_mean[:, 0] * _GRAY_W[0] + ch_mean[:, 1] * _GRAY_W[1] + ch_mean[:, 2] * _GRAY_W[2]
    else:
        mean = ch_mean[:, 0]
    f = f.view(-1)
    return (x * f.view(-1, 1, 1, 1)).add_((mean * (1 - f)).view(-1, 1, 1, 1)).clamp_(0, 1)


def adjust_saturation(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 1:
        return x  # as torchvision (and PIL): no saturation in a gray image
    f = f.view(-1, 1, 1, 1)
    return (x * f).add_(_gray(x).mul_(1 - f)).clamp_(0, 1)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the HSV hue by `shift` (fraction of a turn, in [-0.5, 0.5]) per sample, as torchvision's
    RGB->HSV->RGB, in closed form: S and V do not change, so with k = (6 h' + 5) mod 6 (h' the new hue) the
    channels are max - (max - min) * trapezoid(k - n), trapezoid(u) = clamp(min(u, 4 - u), 0, 1) for the
    period-6 hue wheel (red n = 0, green n = 2, blue n = 4). Only arithmetic: on the CPU comparisons, where and
    remainder are several times slower than a multiply, and this op dominates the colour jitter."""
    if x.shape[1] == 1:
        return x  # as torchvision (and PIL): a gray image has no hue
    r, g, b = x.unbind(1)
    maxc = torch.maximum(torch.maximum(r, g), b)
    minc = torch.minimum(torch.minimum(r, g), b)
    delta = maxc - minc
    # which channel holds the max, as 0/1 floats; ties go to r, then g (torchvision's order). sign(0) = 0
    not_r = torch.sign(maxc - r)
    is_r = 1.0 - not_r
    is_g = (1.0 - torch.sign(maxc - g)).mul_(not_r)
    is_b = not_r - is_g
    # hue in sixths of a turn times delta: (g - b) if r is max, (b - r) + 2 delta if g, (r - g) + 4 delta if b
    h = (g - b).mul_(is_r)
    h.add_((b - r).add_(delta, alpha=2.0).mul_(is_g))
    h.add_((r - g).add_(delta, alpha=4.0).mul_(is_b))
    # gray pixels (delta 0) have h = 0 here; any hue then gives max = min, as in torchvision
    h.div_(delta.clamp_min(1e-12))
    h.add_(6.0 * shift.view(-1, 1, 1).to(x.dtype) + 5.0)
    k = h.sub_(torch.floor(h * (1.0 / 6.0)).mul_(6.0))  # (6 h' + 5) mod 6, in [0, 6)
    out = torch.empty_like(x)
    tr = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0).mul_(delta)
    torch.sub(maxc, tr, out=out[:, 0])
    kg = k - 2.0  # in [-2, 4): the trapezoid formula holds on [-2, 6) without another mod
    tg = torch.minimum(kg, 4.0 - kg).clamp_(0.0, 1.0).mul_(delta)
    torch.sub(maxc, tg, out=out[:, 1])
    # blue: k - 4 lies in [-4, 2); use the wheel's symmetry about 2 instead: distance to 2 is min(6 - k, k)
    tb = torch.minimum(6.0 - k, k).neg_().add_(2.0).clamp_(0.0, 1.0).mul_(delta)
    torch.sub(maxc, tb, out=out[:, 2])
    return out


_JITTER_FNS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def color_jitter(x: torch.Tensor, factors: torch.Tensor, order: torch.Tensor,
                 per_image: bool | None = None) -> torch.Tensor:
    """factors (B, 4) = brightness, contrast, saturation, hue; order (B, 4) a permutation of 0..3 per sample
    (torchvision's ColorJitter draws one per call). Slot by slot, each op runs once on the samples that have
    it in that slot, so the work is that of a fixed order. per_image (default: on the CPU) loops over images
    instead, which keeps each image's passes in cache."""
    x = x.clone()
    order_cpu = order.cpu()
    if per_image if per_image is not None else x.device.type == "cpu":
        # CPU: one image at a time in its own order (an image's passes stay in cache; no gather/scatter)
        for k in range(x.shape[0]):
            xk = x[k:k + 1]
            for op in order_cpu[k].tolist():
                xk = _JITTER_FNS[op](xk, factors[k:k + 1, op])
            x[k:k + 1] = xk
        return x
    for slot in range(4):
        for op in range(4):
            sel = order_cpu[:, slot] == op
            if bool(sel.all()):
                x = _JITTER_FNS[op](x, factors[:, op])
            elif bool(sel.any()):
                idx = sel.nonzero().flatten().to(x.device)
                x.index_copy_(0, idx, _JITTER_FNS[op](x.index_select(0, idx), factors[idx, op]))
    return x


def erase(x: torch.Tensor, boxes: torch.Tensor, value: float = 0.0) -> torch.Tensor:
    """boxes (B, 4) = i, j, h, w (h = 0: nothing erased) -> the rectangle set to `value`, per sample."""
    B, C, H, W = x.shape
    i, j, h, w = (boxes[:, k].to(x.device).view(B, 1) for k in range(4))
    ys = torch.arange(H, device=x.device).view(1, H)
    xs = torch.arange(W, device=x.device).view(1, W)
    rows = (ys >= i) & (ys < i + h)
    cols = (xs >= j) & (xs < j + w)
    m = rows[:, :, None] & cols[:, None, :]
    return x.masked_fill(m.unsqueeze(1), value)


def _uniform(n: int, lo: float, hi: float, g: torch.Generator | None) -> torch.Tensor:
    return torch.rand(n, generator=g, dtype=torch.float64) * (hi - lo) + lo


def _randint(lo: torch.Tensor, hi: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
    """Per-sample integer uniform in [lo, hi) (hi > lo)."""
    return lo + (torch.rand(lo.shape, generator=g, dtype=torch.float64) * (hi - lo)).floor().long()


def _sample_box(n: int, H: int, W: int, scale: Sequence[float], ratio: Sequence[float], g, tries: int = 10,
                erase_rule: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """torchvision's RandomResizedCrop / RandomErasing box search, vectorised: up to `tries` candidates per
    sample, the first that fits wins. -> (h, w, found)."""
    area = H * W
    lr = (math.log(ratio[0]), math.log(ratio[1]))
    t_area = area * (torch.rand(n, tries, generator=g, dtype=torch.float64) * (scale[1] - scale[0]) + scale[0])
    aspect = torch.exp(torch.rand(n, tries, generator=g, dtype=torch.float64) * (lr[1] - lr[0]) + lr[0])
    if erase_rule:  # RandomErasing: h from area*ratio
        h, w = torch.sqrt(t_area * aspect).round().long(), torch.sqrt(t_area / aspect).round().long()
        fits = (h < H) & (w < W)
    else:
        w, h = torch.sqrt(t_area * aspect).round().long(), torch.sqrt(t_area / aspect).round().long()
        fits = (w > 0) & (w <= W) & (h > 0) & (h <= H)
    found = fits.any(1)
    first = fits.float().argmax(1)
    return h.gather(1, first[:, None])[:, 0], w.gather(1, first[:, None])[:, 0], found


class BatchTransform:
    """uint8 (B, C, H, W) on any device -> float32 normalized (B, C, H, W); augments only when train=True.

    Order: geometric (flip, affine, rotation, perspective, resized crop: composed into ONE per-sample matrix and
    one grid_sample, so the image is resampled once), colour jitter (per-sample random order of the four ops,
    as torchvision), /255 and normalization, then random erasing (on the normalized tensor like the reference,
    so value 0 is the mean colour). The composite uses bilinear if any enabled geometric op asks for it,
    else nearest (the reference's flip+affine are nearest, torchvision's RandomAffine default)."""

    def __init__(self, prep: Preprocess, augment: dict | Sequence[str] | None = None,
                 erase: dict | None = None, out_hw: tuple[int, int] | None = None) -> None:
        """out_hw: the (height, width) of the batches made; None keeps each input's. Training images decoded
        larger than out_hw (--train-decode-scale) are brought to it by the resized crop."""
        self.prep = prep
        self.out_hw = tuple(out_hw) if out_hw is not None else None
        self.augment = resolve_augment(augment)
        self.erase = {**_erase_params(AugmentConfig()), **erase} if erase is not None else None
        geo = [n for n in GEOMETRIC if n in self.augment and n != "flip"]
        self.mode = ("bilinear" if any(self.augment[n].get("interpolation") == "bilinear" for n in geo)
                     else "nearest")
        self.cpu_chunk = 4  # images per CPU work item (see __call__)
        self.threads: int | None = None  # CPU worker threads; None: torch.get_num_threads() at call time
        self._pool: ThreadPoolExecutor | None = None

    # parameters ------------------------------------------------------------------------------------------
    def sample_params(self, B: int, H: int, W: int, g: torch.Generator | None = None,
                      out_hw: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
        """All random parameters of one batch, drawn on the CPU from `g` (reproducible from seed and epoch).
        H, W: the input images' size (the geometric ops act on it); out_hw: the output's, where erasing acts."""
        a, p = self.augment, {}
        if "flip" in a:
            p["flip"] = torch.rand(B, generator=g, dtype=torch.float64) < a["flip"]["p"]
        if "affine" in a:
            c = a["affine"]
            lo, hi = _range(c["degrees"])
            tr = c.get("translate") or (0.0, 0.0)
            tr = (tr, tr) if isinstance(tr, (int, float)) else tr
            sc = c.get("scale") or (1.0, 1.0)
            sh = c.get("shear") or 0.0
            sh = [-float(sh), float(sh)] if isinstance(sh, (int, float)) else [float(v) for v in sh]
            if len(sh) == 1:
                sh = [-sh[0], sh[0]]
            max_dx, max_dy = float(tr[0] * W), float(tr[1] * H)
            p["affine"] = torch.stack([
                _uniform(B, lo, hi, g),
                _uniform(B, -max_dx, max_dx, g).round(),  # torchvision rounds translations to whole pixels
                _uniform(B, -max_dy, max_dy, g).round(),
                _uniform(B, float(sc[0]), float(sc[1]), g),
                _uniform(B, sh[0], sh[1], g),
                _uniform(B, sh[2], sh[3], g) if len(sh) == 4 else torch.zeros(B, dtype=torch.float64),
            ], 1)
        if "rotation" in a:
            lo, hi = _range(a["rotation"]["degrees"])
            p["rotation"] = _uniform(B, lo, hi, g)
        if "perspective" in a:
            c = a["perspective"]
            d = float(c["distortion_scale"])
            bh, bw = int(d * (H // 2)) + 1, int(d * (W // 2)) + 1
            z = torch.zeros(B, dtype=torch.long)

            def ri(lo: int, hi: int) -> torch.Tensor:
                return _randint(z + lo, z + hi, g)

            end = torch.stack([torch.stack([ri(0, bw), ri(0, bh)], 1),
                               torch.stack([ri(W - bw, W), ri(0, bh)], 1),
                               torch.stack([ri(W - bw, W), ri(H - bh, H)], 1),
                               torch.stack([ri(0, bw), ri(H - bh, H)], 1)], 1)
            start = torch.tensor([[0, 0], [W - 1, 0], [W - 1, H - 1], [0, H - 1]]).expand(B, 4, 2)
            on = torch.rand(B, generator=g, dtype=torch.float64) < c["p"]
            end = torch.where(on[:, None, None], end, start)  # off: identity homography
            p["perspective"] = perspective_coefficients(start, end)
        if "resized_crop" in a:
            c = a["resized_crop"]
            # The aspect range is relative to the images' own shape (torchvision's is absolute; for a square
            # the two are the same). A box of ratio 1 then has the image's proportions, and is resized to them
            # unstretched: with absolute ratios, 4:3 images saw their cars stretched 4/3 wide on average in
            # training but not at test, and validation loss trailed the square runs' (4.89 against 4.65 at
            # epoch 20, docs/recipes.md).
            ratio = (c["ratio"][0] * (W / H), c["ratio"][1] * (W / H))
            h, w, found = _sample_box(B, H, W, c["scale"], ratio, g)
            # fallback (no candidate fitted): centre crop clamped to the ratio range
            in_ratio = W / H
            if in_ratio < min(ratio):
                fw, fh = W, int(round(W / min(ratio)))
            elif in_ratio > max(ratio):
                fw, fh = int(round(H * max(ratio))), H
            else:
                fw, fh = W, H
            h, w = torch.where(found, h, fh), torch.where(found, w, fw)
            top = torch.where(found, _randint(torch.zeros_like(h), H - h + 1, g), (H - h) // 2)
            left = torch.where(found, _randint(torch.zeros_like(w), W - w + 1, g), (W - w) // 2)
            p["resized_crop"] = torch.stack([top, left, h, w], 1)
        if "jitter" in a:
            c = a["jitter"]
            cols = []
            for k, name in enumerate(("brightness", "contrast", "saturation", "hue")):
                v = c.get(name) or 0.0
                lo, hi = _range(v, 0.0) if name == "hue" else _range(v, 1.0, lo=0.0)
                cols.append(_uniform(B, lo, hi, g))
            p["jitter"] = torch.stack(cols, 1).float()
            p["jitter_order"] = torch.argsort(torch.rand(B, 4, generator=g), 1)
        if self.erase is not None:
            c = self.erase
            Ho, Wo = out_hw or (H, W)
            h, w, found = _sample_box(B, Ho, Wo, c["scale"], c["ratio"], g, erase_rule=True)
            i = _randint(torch.zeros_like(h), (Ho - h + 1).clamp_min(1), g)
            j = _randint(torch.zeros_like(w), (Wo - w + 1).clamp_min(1), g)
            on = found & (torch.rand(B, generator=g, dtype=torch.float64) < c["p"])
            p["erase"] = torch.stack([i, j, torch.where(on, h, 0), torch.where(on, w, 0)], 1)
        return p

    def matrices(self, p: dict[str, torch.Tensor], B: int, H: int, W: int) -> torch.Tensor | None:
        """Compose the geometric ops into one (B, 3, 3) output->input map (None when there are none)."""
        Ms = []  # in the order the ops are applied; the inverse map is their product in the same order
        if "flip" in p:
            f = torch.eye(3, dtype=torch.float64).repeat(B, 1, 1)
            f[:, 0, 0] = torch.where(p["flip"], -1.0, 1.0)
            Ms.append(f)
        if "affine" in p:
            q = p["affine"]
            Ms.append(affine_inverse_matrices(q[:, 0], q[:, 1], q[:, 2], q[:, 3], q[:, 4], q[:, 5]))
        if "rotation" in p:
            z = torch.zeros(B, dtype=torch.float64)
            # F.rotate(angle) is F.affine(-angle) (torchvision's two conventions differ in sign)
            Ms.append(affine_inverse_matrices(-p["rotation"], z, z, z + 1, z, z))
        if "perspective" in p:
            Ms.append(perspective_matrices(p["perspective"], H, W))
        if not Ms and "resized_crop" not in p:
            return None
        M = torch.eye(3, dtype=torch.float64).repeat(B, 1, 1)
        for m in Ms:
            M = M @ m
        return M

    # apply -----------------------------------------------------------------------------------------------
    def __call__(self, images: torch.Tensor, train: bool, generator: torch.Generator | None = None) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise DataError(f"BatchTransform expects uint8 (B, C, H, W) images, got {images.dtype} "
                            f"{tuple(images.shape)}")
        B, C, H, W = images.shape
        Ho, Wo = self.out_hw or (H, W)
        if (Ho, Wo) != (H, W) and not (train and "resized_crop" in self.augment):
            raise DataError(f"BatchTransform: {W}x{H} images, {Wo}x{Ho} wanted: only the training resized crop "
                            f"changes the size (images decoded with --train-decode-scale go through it)")
        dev = images.device
        p = self.sample_params(B, H, W, generator, (Ho, Wo)) if train and (self.augment or self.erase) else {}
        M = self.matrices(p, B, H, W) if p else None
        out = torch.empty(B, C, Ho, Wo, device=dev)
        scale, shift = self.prep.scale_shift(dev)

        # Grad and inference mode are thread-local: the pool's threads must run in the caller's, or `out`,
        # an inference tensor when made under torch.inference_mode (evaluate.py), refuses their in-place writes.
        inference, grad = torch.is_inference_mode_enabled(), torch.is_grad_enabled()

        def run(sl: slice) -> None:
            with torch.inference_mode(inference), torch.set_grad_enabled(grad):
                transform_chunk(sl)

        def transform_chunk(sl: slice) -> None:
            x = images[sl].to(torch.float32)
            if M is not None or "jitter" in p:
                x = x.mul_(1.0 / 255)  # the colour ops clamp to [0, 1] like torchvision's float kernels
                if M is not None:
                    crop = p["resized_crop"][sl] if "resized_crop" in p else None
                    x = warp(x, M[sl], self.mode, crop, (Ho, Wo))
                if "jitter" in p:
                    x = color_jitter(x, p["jitter"][sl].to(dev), p["jitter_order"][sl])
                x = x.mul_(255.0)
            torch.mul(x, scale, out=out[sl]).add_(shift)  # (x / 255 - mean) / std
            if "erase" in p:
                out[sl] = erase(out[sl], p["erase"][sl], float(self.erase["value"]))

        if dev.type != "cpu":
            run(slice(0, B))  # on an accelerator the whole batch is one set of kernels
            return out
        # CPU: a 227 px float batch (40 MB at B=64) does not fit in cache, so a few images at a time keep every pass
        # in cache, and chunks run on a thread pool (torch ops release the GIL) with single-threaded ops: OpenMP
        # teams inside small ops cost more than they bring, and stall badly when the cores are shared.
        chunks = [slice(s, min(B, s + self.cpu_chunk)) for s in range(0, B, self.cpu_chunk)]
        threads = min(self.threads or torch.get_num_threads(), len(chunks))
        if threads <= 1:
            for sl in chunks:
                run(sl)
            return out
        if self._pool is None or self._pool._max_workers != threads:
            self._pool = ThreadPoolExecutor(threads, thread_name_prefix="BatchTransform")
        prev = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            list(self._pool.map(run, chunks))
        finally:
            torch.set_num_threads(prev)
        return out

# ----------------------------------------------------------------------------------------------------------
# A run's augment options -> BatchTransform's parameters

def augment_from_config(a: AugmentConfig) -> tuple[dict | None, dict | None]:
    """(augment, erase): each named augmentation with its parameters, random erasing's or None. Raises
    DataError for an unknown name or a parameter that can't work."""
    names = [n.lower().replace("-", "_") for n in (a.augment or [])]
    if "none" in names:
        if len(names) > 1:
            raise DataError(f"--augment none cannot be combined with {' '.join(n for n in names if n != 'none')}")
        names = []
    bad = [n for n in names if n not in AUG_NAMES]
    if bad:
        raise DataError(f"unknown augmentation '{bad[0]}'; choose from: {' '.join(AUG_NAMES)} (or none)")
    tr = list(a.translate)
    if len(tr) not in (1, 2):
        raise DataError(f"--translate takes 1 or 2 values, got {len(tr)}")
    if len(a.shear) not in (1, 2, 4):
        raise DataError(f"--shear takes 1, 2 or 4 values, got {len(a.shear)}")
    params = {
        "flip": {"p": a.flip_p},
        "affine": {"degrees": a.degrees, "translate": (tr[0], tr[-1]), "scale": tuple(a.scale),
                   "shear": a.shear[0] if len(a.shear) == 1 else tuple(a.shear)},
        "jitter": dict(zip(("brightness", "contrast", "saturation", "hue"), a.jitter)),
        "rotation": {"degrees": a.rotation_degrees},
        "perspective": {"p": a.perspective_p, "distortion_scale": a.perspective_scale},
        "resized_crop": {"scale": tuple(a.crop_scale), "ratio": tuple(a.crop_ratio)},
    }
    augment = {}
    for n in names:
        augment[n] = dict(params[n])
        if n in INTERPOLATION:
            augment[n]["interpolation"] = INTERPOLATION[n] if a.interpolation == "auto" else a.interpolation
    if not 0 <= a.jitter[3] <= 0.5:
        raise DataError(f"--jitter hue {a.jitter[3]} must be in [0, 0.5]")
    return (augment or None), (_erase_params(a) if a.erase else None)


def _erase_params(a: AugmentConfig) -> dict:
    return {"p": a.erase_p, "scale": tuple(a.erase_scale), "ratio": tuple(a.erase_ratio), "value": a.erase_value}
