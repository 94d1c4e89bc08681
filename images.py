"""Images -> tensors: the input size, per-image preprocessing, the decode-once cache and the loader.

    records (path, label, bbox)  --decode_cached-->  uint8 (N,C,H,W) memmap  --BatchLoader-->  uint8 batch on device
        --augment.BatchTransform-->  float32 normalized batch (augmented in one batched pass when training)

Why this shape: decoding a JPEG costs far more than training a small net on it, so every image is decoded,
preprocessed (squash-resize, grayscale, bbox crop) once into a cache file; each epoch then only reads uint8
arrays, and augment.py augments whole batches on the training device with per-sample random parameters.
Inference (predict.py, serve.py, export.py) decodes single images with the same code (load_image).

The records come from data.py (dataset layouts and splits); `python data.py stats|cache` is the CLI.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import operator
import os
import time
import warnings
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps
from tqdm import tqdm

from data import DataError, Record

# The reference work's best settings ("Best Model settings" of the study).
RGB_MEAN = (0.4707, 0.4602, 0.455)
RGB_STD = (0.2594, 0.2585, 0.2635)
# Gray defaults: the reference had none (norm_params_gray: None). The mean is the ITU-R 601 luma of RGB_MEAN
# (exact, luma is linear); the std is the same luma mix of RGB_STD, which slightly overestimates the gray std
# (channels are correlated, not independent) -- run `python data.py stats --data DIR --grayscale` for exact values.
GRAY_MEAN = (round(0.299 * RGB_MEAN[0] + 0.587 * RGB_MEAN[1] + 0.114 * RGB_MEAN[2], 4),)
GRAY_STD = (round(0.299 * RGB_STD[0] + 0.587 * RGB_STD[1] + 0.114 * RGB_STD[2], 4),)

MIN_SIDE = 4  # smaller images are rejected as "too small": nothing recognisable survives the resize
CACHE_VERSION = 1  # bump when the preprocessing code changes what a cached pixel is


class ImageError(Exception):
    """One image could not be used (missing, unreadable, truncated, not an image, bomb, too small)."""


# ----------------------------------------------------------------------------------------------------------
# Input size

@dataclass(frozen=True)
class ImageSize:
    """An input size, height x width pixels. Not a tuple on purpose: its JSON form keeps a square as the
    single S (configs, checkpoints and cache names of square runs read as they always did), so it must be
    written with .json(), never serialized as a pair by accident."""
    height: int
    width: int

    def __post_init__(self) -> None:
        for side in (self.height, self.width):
            if isinstance(side, bool) or not isinstance(side, int):
                raise TypeError(f"image size sides must be ints, got {side!r}")
        if min(self.height, self.width) < 1:
            raise ValueError(f"image size {self.text}: sides must be at least 1 pixel")

    @classmethod
    def parse(cls, text: str) -> ImageSize:
        """argparse type of --img-size: "227" -> a 227 x 227 square; "128x96" -> 96 high, 128 wide, i.e.
        WIDTHxHEIGHT as photos are described."""
        parts = str(text).lower().replace(" ", "").split("x")
        try:
            sizes = [int(v) for v in parts]
        except ValueError:
            sizes = []
        if len(sizes) not in (1, 2) or min(sizes) < 1:
            raise argparse.ArgumentTypeError(f"{text!r} is not an image size: give S (S x S pixels) or "
                                             f"WIDTHxHEIGHT, e.g. 227 or 128x96")
        return cls(sizes[0], sizes[0]) if len(sizes) == 1 else cls(sizes[1], sizes[0])

    @classmethod
    def of(cls, value: int | Sequence[int] | ImageSize) -> ImageSize:
        """From what config.json, checkpoints and Preprocess hold: S, or (height, width) / [height, width].
        TypeError or ValueError (with a message for the user) on anything else."""
        if isinstance(value, ImageSize):
            return value
        if isinstance(value, (list, tuple)):
            if len(value) != 2:
                raise ValueError(f"image size {list(value)} is neither S nor (height, width)")
            return cls(*(_side(v, value) for v in value))
        side = _side(value, value)
        return cls(side, side)

    @property
    def hw(self) -> tuple[int, int]:
        """(height, width), torch's order."""
        return self.height, self.width

    @property
    def square(self) -> bool:
        return self.height == self.width

    @property
    def text(self) -> str:
        """WIDTHxHEIGHT, the way --img-size takes it and photos are described: 227x227, 128x96."""
        return f"{self.width}x{self.height}"

    @property
    def words(self) -> str:
        """For tables and messages: "227 px" for a square, "128x96" otherwise."""
        return f"{self.height} px" if self.square else self.text

    def json(self) -> int | list[int]:
        """JSON's form, as config.json and checkpoints keep it: S for a square, else [height, width]."""
        return self.height if self.square else [self.height, self.width]


def _side(v: Any, whole: Any) -> int:
    if isinstance(v, bool):
        raise TypeError(f"image size {whole!r} is neither S nor (height, width)")
    try:
        return operator.index(v)  # ints, numpy ints; not floats or strings
    except TypeError:
        raise TypeError(f"image size {whole!r} is neither S nor (height, width)") from None


# ----------------------------------------------------------------------------------------------------------
# Per-image preprocessing (shared by the cache and predict.py)

@dataclass
class Preprocess:
    # S (square, S x S) or (height, width), as ImageSize.of takes them (an ImageSize too); a square is always
    # kept as the int, so configs and cache names of square runs read as they always did
    img_size: int | tuple[int, int] = 227
    grayscale: bool = False
    crop_bbox: bool = False
    bbox_margin: float = 0.0  # fraction of the box's width/height added on each side
    erase_background: bool = False
    # fraction of each side kept around the image's centre before the resize, at evaluation and prediction only
    # (training decodes whole images: its random resized crops zoom in, and a test crop of about the crops'
    # mean side shows the car at the size training saw it; see --test-crop)
    test_crop: float = 1.0
    normalize: bool = True
    mean: tuple[float, ...] = RGB_MEAN
    std: tuple[float, ...] = RGB_STD

    def __post_init__(self) -> None:
        self.mean, self.std = tuple(float(v) for v in self.mean), tuple(float(v) for v in self.std)
        if self.grayscale and self.mean == RGB_MEAN and self.std == RGB_STD:
            self.mean, self.std = GRAY_MEAN, GRAY_STD  # the RGB defaults make no sense for one channel
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise DataError(f"--mean/--std need {self.channels} value(s) each for "
                            f"{'grayscale' if self.grayscale else 'RGB'} images, got {len(self.mean)}/{len(self.std)}")
        if any(s <= 0 for s in self.std):
            raise DataError(f"--std values must be positive, got {list(self.std)}")
        try:
            size = ImageSize.of(self.img_size)
        except (TypeError, ValueError) as e:
            raise DataError(str(e)) from None
        self.img_size = size.height if size.square else size.hw
        if min(size.hw) < MIN_SIDE:
            raise DataError(f"image size {size.text} is too small; use at least {MIN_SIDE}")
        self.test_crop = float(self.test_crop)
        if not 0.2 <= self.test_crop <= 1.0:
            raise DataError(f"--test-crop {self.test_crop:g} is outside 0.2..1 (the fraction of each side kept; "
                            f"1 = the whole image)")

    @property
    def size(self) -> ImageSize:
        """img_size as an ImageSize (the field keeps the plain S or (height, width) that to_dict writes)."""
        return ImageSize.of(self.img_size)

    @property
    def hw(self) -> tuple[int, int]:
        """(height, width) of every image this preprocessing makes."""
        return self.size.hw

    @property
    def channels(self) -> int:
        return 1 if self.grayscale else 3

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        d["img_size"] = self.size.json()  # JSON's form, so a dict read back from a file compares equal
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocess":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    def scale_shift(self, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, shift), each (1, C, 1, 1) float32: u8 * scale + shift = (u8 / 255 - mean) / std (or u8 / 255
        without normalization) in one multiply-add. Training (augment.BatchTransform) and inference
        (to_model_input) use these very tensors, so both compute bit-identical inputs."""
        if not self.normalize:
            return (torch.full((1, 1, 1, 1), 1 / 255, device=device), torch.zeros(1, 1, 1, 1, device=device))
        mean = torch.tensor(self.mean, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(1, -1, 1, 1)
        return (1.0 / (255.0 * std)).to(device), (-mean / std).to(device)

    def to_model_input(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, H, W) as load_image and the cache give them -> the float32 batch the model takes."""
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise DataError(f"expected uint8 (B, C, H, W) images, got {images.dtype} {tuple(images.shape)}")
        scale, shift = self.scale_shift(images.device)
        return torch.mul(images.to(torch.float32), scale).add_(shift)

    def cache_key(self) -> dict:
        """Only what changes the cached pixels (normalization happens later, per batch)."""
        return {"img_size": self.size.json(), "grayscale": self.grayscale, "crop_bbox": self.crop_bbox,
                "bbox_margin": self.bbox_margin if (self.crop_bbox or self.erase_background) else 0.0,
                "erase_background": self.erase_background,
                # the key only where it changes pixels, so whole-image caches keep their names
                **({"test_crop": self.test_crop} if self.test_crop != 1.0 else {})}

    def for_training(self, decode_scale: float = 1.0) -> "Preprocess":
        """The preprocessing of training images: whole images (the random crops come later, per batch), decoded at
        decode_scale x the input size, so that a random resized crop cut from them is resampled down to the input
        size rather than up (see --train-decode-scale)."""
        h, w = (round(side * decode_scale) for side in self.hw)
        return replace(self, test_crop=1.0, img_size=(h, w))  # __post_init__ keeps a square as its int


def preprocess_of(d) -> Preprocess:
    """The Preprocess of a run's data options (config.DataConfig, or a checkpoint's config.data)."""
    gray = bool(d.grayscale)
    mean = d.mean or (GRAY_MEAN if gray else RGB_MEAN)
    std = d.std or (GRAY_STD if gray else RGB_STD)
    size = ImageSize.of(d.img_size)
    return Preprocess(img_size=size.height if size.square else size.hw, grayscale=gray, crop_bbox=bool(d.crop_bbox),
                      bbox_margin=float(d.bbox_margin), erase_background=bool(d.erase_background),
                      normalize=not d.no_normalize, mean=tuple(mean), std=tuple(std), test_crop=d.test_crop)


# ----------------------------------------------------------------------------------------------------------
# Decoding one image

def _to_mode(img: Image.Image, gray: bool) -> Image.Image:
    """Any PIL mode -> 'RGB' or 'L' (CMYK, palette, 16-bit, float, 1-bit, alpha)."""
    if img.mode.startswith("I") or img.mode == "F":
        a = np.asarray(img).astype(np.float64)
        if img.mode.startswith("I;16") or a.max(initial=0) > 255:
            a = a / 257.0  # 16-bit -> 8-bit (65535 -> 255); convert("L") would clip instead of scale
        img = Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (img.mode == "P" and "transparency" in img.info):
        # transparent pixels become white (as a viewer shows them) rather than whatever colour hides under alpha=0
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, rgba)
    want = "L" if gray else "RGB"
    return img if img.mode == want else img.convert(want)


def _clamp_box(bbox: Sequence[float], margin: float, w: int, h: int) -> tuple[int, int, int, int] | None:
    x1, y1, x2, y2 = (float(v) for v in bbox)
    if x2 < x1:
        x1, x2 = x2, x1
    if y2 < y1:
        y1, y2 = y2, y1
    mx, my = (x2 - x1) * margin, (y2 - y1) * margin
    x1, y1 = max(0, int(math.floor(x1 - mx))), max(0, int(math.floor(y1 - my)))
    x2, y2 = min(w, int(math.ceil(x2 + mx))), min(h, int(math.ceil(y2 + my)))
    if x2 - x1 < 2 or y2 - y1 < 2:
        return None  # the box does not overlap this image
    return x1, y1, x2, y2


# Pillow warns about damaged metadata it skips ("Truncated File Read", "Corrupt EXIF data"); the image is then
# decoded or refused all the same, and a user should see one line either way. Filtered once here, not with
# warnings.catch_warnings around each decode: that swaps process-wide state and is not thread-safe (the cache
# decodes on a thread pool, and a thread restoring another's filters once hid the cache's own warning).
# A decompression bomb's warning is filtered too: _load checks the declared size itself and refuses it.
# Added on each decode when missing, since test runners and callers' catch_warnings blocks reset the list.
_PILLOW_FILTERS = (("ignore", UserWarning, r"PIL\."), ("ignore", Image.DecompressionBombWarning, ""))


def _quiet_pillow() -> None:
    for action, category, module in _PILLOW_FILTERS:
        if not any(f[0] == action and f[2] is category and getattr(f[3], "pattern", f[3] or "") == module
                   for f in warnings.filters):
            warnings.filterwarnings(action, category=category, module=module)


def _load(path: str, prep: Preprocess, bbox: Sequence[float] | None = None) -> tuple[np.ndarray, str]:
    """-> (uint8 array (H, W) or (H, W, 3), note); note is "" or why the box was ignored. Raises ImageError."""
    _quiet_pillow()
    (H, W), note = prep.hw, ""
    use_box = bbox is not None and (prep.crop_bbox or prep.erase_background)
    try:
        src = Image.open(path)  # reads the header only; DecompressionBombError beyond 2x MAX_IMAGE_PIXELS
        with src:  # everything happens inside: closing the file also frees the decoded pixels
            w0, h0 = src.size
            if Image.MAX_IMAGE_PIXELS and w0 * h0 > Image.MAX_IMAGE_PIXELS:
                raise ImageError(f"{path}: decompression bomb ({w0}x{h0} = {w0 * h0} pixels declared, "
                                 f"more than the {Image.MAX_IMAGE_PIXELS} allowed)")
            if min(w0, h0) < MIN_SIDE:
                raise ImageError(f"{path}: too small ({w0}x{h0} pixels, need at least {MIN_SIDE}x{MIN_SIDE})")
            box = _clamp_box(bbox, prep.bbox_margin, w0, h0) if use_box else None
            if use_box and box is None:
                note = f"box {tuple(bbox)} lies outside the {w0}x{h0} image"
            # JPEG DCT scaling: decode big photos at 1/2, 1/4, 1/8 size while still >= the needed resolution
            if src.format == "JPEG":
                bw, bh = (box[2] - box[0], box[3] - box[1]) if (box and prep.crop_bbox) else (w0, h0)
                bw, bh = bw * prep.test_crop, bh * prep.test_crop
                src.draft(None, (max(1, math.ceil(W * w0 / bw)), max(1, math.ceil(H * h0 / bh))))
            src.load()
            sx, sy = src.size[0] / w0, src.size[1] / h0
            img = src
            if not use_box:
                img = ImageOps.exif_transpose(img)  # phone photos; boxes refer to the stored orientation
            img = _to_mode(img, prep.grayscale)
            if box is not None:
                bx = (int(box[0] * sx), int(box[1] * sy))
                box_s = bx + (max(bx[0] + 1, round(box[2] * sx)), max(bx[1] + 1, round(box[3] * sy)))
                if prep.crop_bbox:
                    img = img.crop(box_s)
                else:  # erase_background: the car stays where it is, on a plain black canvas
                    canvas = Image.new(img.mode, img.size, 0)
                    canvas.paste(img.crop(box_s), box_s[:2])
                    img = canvas
            if prep.test_crop < 1.0:  # the centre, cut with sub-pixel edges by resize's box
                cw, ch = img.size[0] * prep.test_crop, img.size[1] * prep.test_crop
                x0, y0 = (img.size[0] - cw) / 2, (img.size[1] - ch) / 2
                img = img.resize((W, H), Image.BILINEAR, box=(x0, y0, x0 + cw, y0 + ch))
            else:
                # squash to W x H (aspect not kept), as the reference did with transforms.Resize((227, 227))
                img = img.resize((W, H), Image.BILINEAR)
            out = np.asarray(img, dtype=np.uint8).copy()
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError(f"{path}: missing") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"{path}: decompression bomb ({e})") from None
    except Image.UnidentifiedImageError:
        raise ImageError(f"{path}: not an image (empty, text or unknown format)") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, MemoryError) as e:
        msg = str(e) or type(e).__name__
        raise ImageError(f"{path}: unreadable ({'truncated' if 'truncat' in msg.lower() else msg})") from None
    return out, note


def load_image(path: str | os.PathLike, prep: Preprocess, bbox: Sequence[float] | None = None) -> torch.Tensor:
    """Decode one image exactly as training saw it: uint8 (C, height, width). Raises ImageError."""
    a, _ = _load(str(path), prep, bbox)
    t = torch.from_numpy(a)
    return t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1).contiguous()


# ----------------------------------------------------------------------------------------------------------
# Decode once, cache as a uint8 memmap

@dataclass
class Decoded:
    images: Any  # (N, C, H, W) uint8: numpy memmap (read-only) or torch tensor
    labels: torch.Tensor
    paths: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)

    def __len__(self) -> int:
        return len(self.paths)


def default_cache_dir() -> Path:
    """$GHOSTCARS_CACHE, else $XDG_CACHE_HOME/ghostcars, else ~/.cache/ghostcars.

    A per-user cache rather than <data>/.cache: the data folder is often read-only or shared, and the same
    images are then decoded once per machine, not once per copy of the repo."""
    if os.environ.get("GHOSTCARS_CACHE"):
        return Path(os.environ["GHOSTCARS_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "ghostcars"


def _cache_name(records: Sequence[Record], prep: Preprocess, desc: str) -> tuple[str, str]:
    """The cache entry's name, and its lineage: a digest of the image paths and the preprocessing
    alone. An entry of the same lineage under another name decoded the same files before they changed
    (or before CACHE_VERSION changed), so a new build supersedes it."""
    files = []
    use_box = prep.crop_bbox or prep.erase_background
    for r in records:
        try:
            st = os.stat(r.path)
            size, mtime = st.st_size, st.st_mtime_ns
        except OSError:
            size, mtime = -1, -1
        files.append([os.path.abspath(r.path), size, mtime, list(r.bbox) if (use_box and r.bbox) else None])
    key = {"version": CACHE_VERSION, "prep": prep.cache_key(), "files": files}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    lineage = {"prep": prep.cache_key(), "paths": [f[0] for f in files]}
    lineage_digest = hashlib.sha256(json.dumps(lineage, sort_keys=True).encode()).hexdigest()[:20]
    tag = "".join(c if c.isalnum() else "-" for c in desc)[:24] or "images"
    size = str(prep.size.height) if prep.size.square else prep.size.text
    return f"{tag}-{len(records)}-{size}{'g' if prep.grayscale else ''}-{digest}", lineage_digest


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_temps(cache_dir: Path, name: str) -> None:
    """Temp files of builds that were killed (their pid is gone) are deleted; a live build is left alone."""
    for p in cache_dir.glob(f"{name}.*.tmp*"):
        try:
            pid = int(p.name.rsplit(".tmp", 1)[1].split("-")[0])
        except (ValueError, IndexError):
            pid = -1
        if pid != os.getpid() and not _pid_alive(pid):
            p.unlink(missing_ok=True)


def cache_entries(cache_dir: Path) -> list[dict]:
    """The finished entries in cache_dir: name, bytes (array + marker), created, lineage (None for entries
    written before lineages were recorded)."""
    entries = []
    for meta_p in sorted(Path(cache_dir).glob("*.json")):
        arr_p = meta_p.with_suffix(".npy")
        try:
            meta = json.loads(meta_p.read_text())
            size = arr_p.stat().st_size + meta_p.stat().st_size
        except (OSError, ValueError):
            continue
        if isinstance(meta, dict) and meta.get("complete") is True:
            entries.append({"name": meta_p.stem, "bytes": size, "created": meta.get("created", "?"),
                            "lineage": meta.get("lineage"), "root": meta.get("root")})
    return entries


def cache_entry_orphaned(entry: dict) -> bool:
    """Its images' folder is gone (a deleted dataset, or demo data in a removed temp folder)."""
    return entry["root"] is not None and not os.path.exists(entry["root"])


def remove_cache_entry(cache_dir: Path, name: str) -> None:
    """Marker first: a reader never finds a marker without its array (an open memmap keeps its data)."""
    (Path(cache_dir) / f"{name}.json").unlink(missing_ok=True)
    (Path(cache_dir) / f"{name}.npy").unlink(missing_ok=True)


def _remove_superseded(cache_dir: Path, name: str, lineage: str) -> None:
    """After a build, delete the entries nothing can hit again (at 227 px a train split is ~0.8 GB): those
    that decoded the same files with the same preprocessing before the files (or the cache format)
    changed, and those whose images' folder is gone. Entries from before these records are kept."""
    for e in cache_entries(cache_dir):
        if e["name"] != name and (e["lineage"] == lineage or cache_entry_orphaned(e)):
            try:
                remove_cache_entry(cache_dir, e["name"])
            except OSError:  # e.g. open in another process on Windows: left for next time
                pass


def _read_cache(cache_dir: Path, name: str, n_records: int) -> tuple[np.ndarray, dict] | None:
    meta_p, arr_p = cache_dir / f"{name}.json", cache_dir / f"{name}.npy"
    if not (meta_p.exists() and arr_p.exists()):
        return None
    try:
        meta = json.loads(meta_p.read_text())
        arr = np.load(arr_p, mmap_mode="r")
    except (OSError, ValueError, json.JSONDecodeError):
        return None
    if (meta.get("complete") is not True or meta.get("n_records") != n_records
            or list(arr.shape) != meta.get("shape") or arr.dtype != np.uint8):
        return None
    return arr, meta


def _read_back(cache_dir: Path, name: str, n_records: int, wait_s: float) -> tuple[np.ndarray, dict] | None:
    """The cache just built. Two runs started side by side on the same photos build the same cache at once, and
    the later build removes the marker before writing its own (so that no stale marker vouches for its array):
    the earlier one then finds no marker for a moment. Wait for the other build's marker rather than fail."""
    deadline = time.monotonic() + wait_s
    while (hit := _read_cache(cache_dir, name, n_records)) is None and time.monotonic() < deadline:
        time.sleep(0.2)
    return hit


def _warn_skipped(skipped: list[tuple[str, str]], n: int, desc: str) -> None:
    if not skipped:
        return
    shown = "; ".join(reason if reason.startswith(p) else f"{p}: {reason}" for p, reason in skipped[:20])
    more = f"; ... and {len(skipped) - 20} more" if len(skipped) > 20 else ""
    warnings.warn(f"{desc or 'images'}: skipped {len(skipped)} of {n} images that cannot be used: {shown}{more}",
                  stacklevel=3)


def decode_cached(records: Sequence[Record], prep: Preprocess, cache_dir: str | os.PathLike | None = None,
                  workers: int | None = None, desc: str = "") -> Decoded:
    """Decode every record once (all cores, tqdm) into a uint8 memmap cache; later calls just open it.

    Keyed by file list, sizes, mtimes, boxes and the pixel-changing preprocessing options. The array is written
    to a temp file and renamed; the .json marker (with "complete": true) is written last, so a build killed at any
    point is never read: it is rebuilt, and its temp files are removed once its process is gone."""
    records = list(records)
    if not records:
        raise DataError(f"no images to decode{' for ' + desc if desc else ''}; check the dataset folder")
    cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create cache folder {cache_dir} ({e.strerror}); pass --cache-dir to a writable folder")
    name, lineage = _cache_name(records, prep, desc)
    hit = _read_cache(cache_dir, name, len(records))
    if hit is None:
        _remove_stale_temps(cache_dir, name)
        built = time.monotonic()
        _build_cache(records, prep, cache_dir, name, lineage, workers, desc)
        # another build of the same cache started before this one ended, so it ends within about as long
        hit = _read_back(cache_dir, name, len(records), wait_s=10 + 1.5 * (time.monotonic() - built))
        if hit is None:
            raise DataError(f"cache {cache_dir / name}.npy could not be read back; check free space in {cache_dir}")
        _remove_superseded(cache_dir, name, lineage)
    arr, meta = hit
    kept = meta["kept"]
    skipped = [tuple(s) for s in meta["skipped"]]
    _warn_skipped(skipped, len(records), desc)
    if not kept:
        raise DataError(f"none of the {len(records)} images{' of ' + desc if desc else ''} could be read "
                        f"(first: {skipped[0][1]}); check the dataset folder")
    labels = torch.tensor([records[i].label for i in kept], dtype=torch.long)
    return Decoded(arr, labels, [records[i].path for i in kept], skipped)


def _build_cache(records: list[Record], prep: Preprocess, cache_dir: Path, name: str, lineage: str,
                 workers: int | None, desc: str) -> None:
    n, (H, W), C = len(records), prep.hw, prep.channels
    tmp_tag = f".tmp{os.getpid()}-{os.urandom(3).hex()}"
    tmp_arr = cache_dir / f"{name}.npy{tmp_tag}"
    arr_p, meta_p = cache_dir / f"{name}.npy", cache_dir / f"{name}.json"
    meta_p.unlink(missing_ok=True)  # a stale marker must never vouch for a new array
    try:
        out = np.lib.format.open_memmap(tmp_arr, mode="w+", dtype=np.uint8, shape=(n, C, H, W))
    except OSError as e:
        raise DataError(f"cannot write cache {tmp_arr} ({e.strerror}); pass --cache-dir to a folder with "
                        f"{n * C * H * W / 1e9:.1f} GB free")
    ok = np.zeros(n, dtype=bool)
    errors: dict[int, str] = {}
    notes: list[int] = []  # list.append is atomic across threads; `+=` on an int is not

    def work(i: int) -> None:
        r = records[i]
        try:
            a, note = _load(r.path, prep, r.bbox)
        except ImageError as e:
            errors[i] = str(e)
            return
        if note:
            notes.append(i)
        out[i] = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
        ok[i] = True

    # threads suffice: PIL releases the GIL while decoding and resizing, and they write straight into the memmap
    workers = workers or os.cpu_count() or 1
    try:
        with ThreadPoolExecutor(workers) as ex:
            futs = [ex.submit(work, i) for i in range(n)]
            for f in tqdm(as_completed(futs), total=n, desc=f"decoding {desc or 'images'} -> cache",
                          unit="img", leave=False, disable=n < 200):
                f.result()
        kept = np.flatnonzero(ok)
        if len(kept) < n:  # leave the bad ones out: compact into a second temp file
            tmp2 = cache_dir / f"{name}.npy{tmp_tag}-c"
            out2 = np.lib.format.open_memmap(tmp2, mode="w+", dtype=np.uint8, shape=(len(kept), C, H, W))
            for s in range(0, len(kept), 256):
                out2[s:s + 256] = out[kept[s:s + 256]]
            out2.flush()
            del out2, out
            tmp_arr.unlink()
            tmp_arr = tmp2
        else:
            out.flush()
            del out
        os.replace(tmp_arr, arr_p)
        meta = {"complete": True, "n_records": n, "shape": [int(len(kept)), C, H, W], "kept": kept.tolist(),
                "skipped": [[records[i].path, errors[i]] for i in sorted(errors)], "preprocess": prep.cache_key(),
                "boxes_outside": len(notes), "created": time.strftime("%Y-%m-%d %H:%M:%S"), "lineage": lineage,
                "root": os.path.commonpath([os.path.abspath(r.path) for r in records])}
        tmp_meta = cache_dir / f"{name}.json{tmp_tag}"
        tmp_meta.write_text(json.dumps(meta))
        os.replace(tmp_meta, meta_p)  # the completion marker, written last
    finally:
        for p in cache_dir.glob(f"{name}.*{tmp_tag}*"):
            p.unlink(missing_ok=True)
    if notes:
        warnings.warn(f"{desc or 'images'}: {len(notes)} bounding boxes lie outside their image; "
                      "the whole image was used", stacklevel=3)
