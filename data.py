"""Data: dataset layouts -> records, per-image preprocessing, the decode-once cache, the loader, statistics.

    records (path, label, bbox)  --decode_cached-->  uint8 (N,C,H,W) memmap  --BatchLoader-->  uint8 batch on device
        --augment.BatchTransform-->  float32 normalized batch (augmented in one batched pass when training)

Why this shape: decoding a JPEG costs far more than training a small net on it, so every image is decoded,
preprocessed (squash-resize, grayscale, bbox crop) once into a cache file; each epoch then only reads uint8
arrays, and augment.py augments whole batches on the training device with per-sample random parameters.

CLI:  python data.py stats --data DIR      # mean/std of the train split, for --mean/--std
      python data.py info --data DIR       # which layout was found, counts, classes
      python data.py cache [--clear]       # the decode cache's entries and sizes; --clear deletes them
      python data.py demo OUT_DIR          # synthetic devkit-layout demo set (make_demo_dataset)
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps
from tqdm import tqdm

# The reference work's best settings ("Best Model settings" of the study).
RGB_MEAN = (0.4707, 0.4602, 0.455)
RGB_STD = (0.2594, 0.2585, 0.2635)
# Gray defaults: the reference had none (norm_params_gray: None). The mean is the ITU-R 601 luma of RGB_MEAN
# (exact, luma is linear); the std is the same luma mix of RGB_STD, which slightly overestimates the gray std
# (channels are correlated, not independent) -- run `python data.py stats --data DIR --grayscale` for exact values.
GRAY_MEAN = (round(0.299 * RGB_MEAN[0] + 0.587 * RGB_MEAN[1] + 0.114 * RGB_MEAN[2], 4),)
GRAY_STD = (round(0.299 * RGB_STD[0] + 0.587 * RGB_STD[1] + 0.114 * RGB_STD[2], 4),)

# the file endings taken as images wherever a folder is searched (dataset folders, predict.py, export.py)
IMAGE_EXTS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"})
MIN_SIDE = 4  # smaller images are rejected as "too small": nothing recognisable survives the resize
CACHE_VERSION = 1  # bump when the preprocessing code changes what a cached pixel is


class DataError(Exception):
    """A dataset / option problem the user can fix; the message is one line naming the path and the fix."""


class ImageError(Exception):
    """One image could not be used (missing, unreadable, truncated, not an image, bomb, too small)."""


class Record(NamedTuple):
    path: str
    label: int
    bbox: tuple[int, int, int, int] | None  # x1, y1, x2, y2 in the original image's pixels


@dataclass
class DatasetSpec:
    layout: str  # "devkit" | "all-in-one" | "class-folder" | "imagefolder"
    root: Path
    class_names: list[str]
    train: list[Record]
    test: list[Record]
    note: str = ""  # why this layout was chosen, when the folder holds the start of others too


# ----------------------------------------------------------------------------------------------------------
# Layout detection

LAYOUTS_HELP = (
    "devkit (cars_train/, cars_test/, devkit/cars_meta.mat, devkit/cars_train_annos.mat, "
    "cars_test_annos_withlabels.mat); all-in-one (car_ims/, cars_annos.mat, cars_meta.mat); "
    "class folders (train/<class>/*.jpg, test/<class>/*.jpg, optional names.csv, anno_train.csv, anno_test.csv); "
    "image folders (train/ plus val/ or test/ with one subfolder per class, or <class>/ folders with --val-split)"
)


def _loadmat(path: Path) -> dict:
    import scipy.io

    try:
        return scipy.io.loadmat(str(path), squeeze_me=True)
    except Exception as e:  # scipy raises a zoo of types for bad files
        raise DataError(f"cannot read {path}: {type(e).__name__}: {e}; re-download or re-extract it") from None


def _mat_class_names(path: Path) -> list[str]:
    m = _loadmat(path)
    if "class_names" not in m:
        raise DataError(f"{path} has no 'class_names' field; expected the official cars_meta.mat")
    return [str(n) for n in np.atleast_1d(m["class_names"]).tolist()]


def _mat_annotations(path: Path) -> np.ndarray:
    m = _loadmat(path)
    if "annotations" not in m:
        raise DataError(f"{path} has no 'annotations' field; expected the official annotation .mat")
    return np.atleast_1d(m["annotations"])


def _field(a: Any, name: str, path: Path) -> Any:
    try:
        return a[name]
    except (ValueError, KeyError, IndexError):
        raise DataError(f"{path}: annotations have no field '{name}'; expected the official struct layout") from None


def _bbox_of(a: Any, path: Path) -> tuple[int, int, int, int] | None:
    names = a.dtype.names or ()
    if not all(k in names for k in ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2")):
        return None
    return tuple(int(_field(a, k, path)) for k in ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2"))  # type: ignore


def _check_labels(records: list[Record], n_classes: int, src: Path) -> None:
    bad = [r for r in records if not 0 <= r.label < n_classes]
    if bad:
        raise DataError(f"{src}: class id {bad[0].label + 1} of {Path(bad[0].path).name} is outside 1..{n_classes}; "
                        "the annotations do not match the class-name file")


def _devkit_records(root: Path, mat: Path, img_dir: Path) -> list[Record]:
    records = []
    for a in _mat_annotations(mat):
        fname = str(_field(a, "fname", mat))
        # labels are 1-based in the .mat (MATLAB), like torchvision we shift to 0-based
        records.append(Record(str(img_dir / fname), int(_field(a, "class", mat)) - 1, _bbox_of(a, mat)))
    return records


def _find_devkit(root: Path) -> DatasetSpec | None:
    if not ((root / "cars_train").is_dir() or (root / "devkit").is_dir()):
        return None
    need = {
        "cars_train/": root / "cars_train",
        "cars_test/": root / "cars_test",
    }
    meta = next((p for p in (root / "devkit" / "cars_meta.mat", root / "cars_meta.mat") if p.exists()), None)
    train_mat = next((p for p in (root / "devkit" / "cars_train_annos.mat", root / "cars_train_annos.mat")
                      if p.exists()), None)
    test_mat = next((p for p in (root / "cars_test_annos_withlabels.mat",
                                 root / "devkit" / "cars_test_annos_withlabels.mat") if p.exists()), None)
    missing = [k for k, p in need.items() if not p.is_dir()]
    missing += [k for k, p in (("devkit/cars_meta.mat", meta), ("devkit/cars_train_annos.mat", train_mat),
                               ("cars_test_annos_withlabels.mat", test_mat)) if p is None]
    if missing:
        hint = ""
        if test_mat is None and (root / "devkit" / "cars_test_annos.mat").exists():
            hint = " (devkit/cars_test_annos.mat has no labels; the labelled file is cars_test_annos_withlabels.mat)"
        raise DataError(f"{root} looks like the devkit layout but lacks {', '.join(missing)}{hint}; "
                        "add the missing files from the official release")
    names = _mat_class_names(meta)
    train = _devkit_records(root, train_mat, root / "cars_train")
    test = _devkit_records(root, test_mat, root / "cars_test")
    _check_labels(train, len(names), train_mat)
    _check_labels(test, len(names), test_mat)
    return DatasetSpec("devkit", root, names, train, test)


def _find_all_in_one(root: Path) -> DatasetSpec | None:
    annos = root / "cars_annos.mat"
    if not annos.exists():
        if (root / "car_ims").is_dir():
            raise DataError(f"{root} has car_ims/ but no cars_annos.mat (the all-in-one layout's labels and boxes); "
                            "add cars_annos.mat from the official release")
        return None
    m = _loadmat(annos)
    if "class_names" in m:
        names = [str(n) for n in np.atleast_1d(m["class_names"]).tolist()]
    elif (root / "cars_meta.mat").exists():
        names = _mat_class_names(root / "cars_meta.mat")
    elif (root / "devkit" / "cars_meta.mat").exists():
        names = _mat_class_names(root / "devkit" / "cars_meta.mat")
    else:
        raise DataError(f"{annos} has no class_names and {root / 'cars_meta.mat'} is missing; add cars_meta.mat")
    if "annotations" not in m:
        raise DataError(f"{annos} has no 'annotations' field; expected the official cars_annos.mat")
    train, test = [], []
    for a in np.atleast_1d(m["annotations"]):
        rel = str(_field(a, "relative_im_path", annos))
        r = Record(str(root / rel), int(_field(a, "class", annos)) - 1, _bbox_of(a, annos))
        (test if int(_field(a, "test", annos)) else train).append(r)
    _check_labels(train + test, len(names), annos)
    return DatasetSpec("all-in-one", root, names, train, test)


def _images_in(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS
                  and not p.name.startswith("."))


def _class_dirs(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))


def _read_csv_rows(path: Path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        return [row for row in csv.reader(f) if row and any(c.strip() for c in row)]


def _is_int(s: str) -> bool:
    try:
        int(s.strip())
        return True
    except ValueError:
        return False


def _read_names_csv(path: Path) -> list[str]:
    rows = _read_csv_rows(path)
    if rows and rows[0][0].strip().lower() in {"name", "names", "class", "class_name", "class_names", "label", "id"}:
        rows = rows[1:]
    # one column of names, or (id, name)
    return [(r[1] if len(r) >= 2 and _is_int(r[0]) else ",".join(r)).strip() for r in rows]


def _read_anno_csv(path: Path) -> dict[str, tuple[tuple[int, int, int, int], int]]:
    """fname -> (bbox, 1-based class id); the Kaggle mirror ships these without a header row."""
    out = {}
    for i, row in enumerate(_read_csv_rows(path)):
        if len(row) < 6 or not all(_is_int(c) for c in row[1:6]):
            if i == 0:
                continue  # header row
            raise DataError(f"{path}: line {i + 1} is not 'fname,x1,y1,x2,y2,class'; fix or remove the file")
        x1, y1, x2, y2, c = (int(v) for v in row[1:6])
        out[Path(row[0].strip()).name] = ((x1, y1, x2, y2), c)
    return out


def _folder_records(split_dir: Path, class_index: dict[str, int], annos: dict | None,
                    src: Path) -> tuple[list[Record], int]:
    records, mismatched = [], 0
    for d in _class_dirs(split_dir):
        if d.name not in class_index:
            raise DataError(f"{d} is not a known class (not in the train folders or names.csv); "
                            "rename or remove that folder")
        label = class_index[d.name]
        for p in _images_in(d):
            bbox = None
            if annos is not None and p.name in annos:
                bbox, cid = annos[p.name]
                mismatched += cid - 1 != label
            records.append(Record(str(p), label, bbox))
    return records, mismatched


def _find_class_folder(root: Path, top: Path | None = None) -> DatasetSpec | None:
    """The popular mirror (train/ test/ class folders + names.csv, anno_*.csv) or any ImageFolder-style set.
    The CSVs may sit above root, up to `top` (the Kaggle mirror: DIR/names.csv, DIR/car_data/car_data/train/)."""
    tr = root / "train"
    te = next((root / n for n in ("test", "val", "valid", "validation") if (root / n).is_dir()), None)
    search = [root] + [p for p in root.parents if top is not None and (p == top or top in p.parents)]

    def beside(name: str) -> Path:
        return next((d / name for d in search if (d / name).exists()), root / name)

    names_csv = beside("names.csv")
    if tr.is_dir():
        train_dir, has_split = tr, True
    elif _class_dirs(root) and any(_images_in(d) for d in _class_dirs(root)):
        train_dir, has_split, te = root, False, None  # one folder of classes: needs --val-split
    else:
        return None
    annos = {s: _read_anno_csv(beside(f"anno_{s}.csv")) for s in ("train", "test") if beside(f"anno_{s}.csv").exists()}
    mirror = names_csv.exists() or bool(annos)
    dirs = [d for d in _class_dirs(train_dir) if _images_in(d)]
    if not dirs:
        raise DataError(f"{train_dir} has no class subfolders with images; expected {train_dir}/<class>/*.jpg")
    if names_csv.exists():
        names = _read_names_csv(names_csv)
        # a '/' cannot be in a folder name: the mirror writes e.g. "Ram C/V Cargo Van Minivan 2012" as "Ram C-V ..."
        class_index = {}
        for i, n in enumerate(names):
            class_index.setdefault(n, i)
            class_index.setdefault(n.replace("/", "-"), i)
    elif "train" in annos:
        # no names.csv: the class ids in anno_train.csv give the official order of the folders
        votes: dict[str, dict[int, int]] = {}
        for d in dirs:
            for p in _images_in(d):
                if p.name in annos["train"]:
                    c = annos["train"][p.name][1]
                    votes.setdefault(d.name, {}).setdefault(c, 0)
                    votes[d.name][c] += 1
        ids = {n: max(v, key=v.get) for n, v in votes.items()}
        if len(ids) != len(dirs) or len(set(ids.values())) != len(ids):
            ids = {}
        if ids:
            order = sorted(ids, key=ids.get)
        else:
            order = [d.name for d in dirs]
        names = order
        class_index = {n: i for i, n in enumerate(names)}
    else:
        names = [d.name for d in dirs]  # ImageFolder convention: sorted folder names
        class_index = {n: i for i, n in enumerate(names)}
    layout = "class-folder" if mirror else "imagefolder"
    train, bad_train = _folder_records(train_dir, class_index, annos.get("train"), root)
    test, bad_test = [], 0
    if te is not None:
        test, bad_test = _folder_records(te, class_index, annos.get("test"), root)
    if bad_train + bad_test:
        warnings.warn(f"{root}: {bad_train + bad_test} images sit in a class folder other than their anno_*.csv "
                      "class id; the folder was used")
    spec = DatasetSpec(layout, root, names, train, test)
    if not has_split:
        spec.layout = "imagefolder"
    return spec


def find_dataset(data_dir: str | os.PathLike) -> DatasetSpec:
    """Detect the layout of DIR (or DIR/stanford_cars) and list its train/test records, classes in official order."""
    data_dir = Path(data_dir).expanduser()
    if not data_dir.is_dir():
        raise DataError(f"data folder {data_dir} does not exist; pass --data DIR (a folder in one of the layouts: "
                        f"{LAYOUTS_HELP})")
    candidates = [data_dir / "stanford_cars", data_dir, data_dir / "car_data", data_dir / "car_data" / "car_data"]
    finders = (("devkit", _find_devkit), ("all-in-one", _find_all_in_one),
               ("class-folder", lambda r: _find_class_folder(r, data_dir)))
    # Every layout of every candidate folder is tried, so a complete one is found whatever else lies beside it
    # (the devkit folder next to the all-in-one files, a class-folder copy next to devkit files). Layouts whose
    # start is there but which are incomplete are remembered for the message.
    incomplete: list[str] = []
    for root in dict.fromkeys(candidates):
        if not root.is_dir():
            continue
        started_here = False
        for name, finder in finders:
            try:
                spec = finder(root)
            except DataError as e:
                incomplete.append(str(e))
                started_here = True
                continue
            if spec is None:
                continue
            if started_here and spec.layout == "imagefolder" and not spec.test:
                # a bare folder of subfolders is the last guess: beside an incomplete layout it would take
                # e.g. cars_train/ and cars_test/ for two classes
                continue
            if not spec.train:
                incomplete.append(f"{root}: the {spec.layout} layout lists no training images; check the folder")
                continue
            if incomplete:
                spec.note = f"chose the complete {spec.layout} layout; not used: " + "; ".join(incomplete)
            return spec
    if len(incomplete) == 1:
        raise DataError(incomplete[0])
    if incomplete:
        raise DataError(f"no complete dataset layout in {data_dir}: " + "; ".join(
            f"({i + 1}) {m}" for i, m in enumerate(incomplete)))
    raise DataError(f"no dataset found in {data_dir} (looked in {data_dir} and {data_dir / 'stanford_cars'}); "
                    f"accepted layouts: {LAYOUTS_HELP}")


def holdout_seed(options: dict) -> int:
    """The seed of a run's --val-split draw from its options (args or config.json's): --val-seed, else --seed
    (runs from before --val-seed have only the latter)."""
    v = options.get("val_seed")
    return int(v) if v is not None else int(options.get("seed", 0) or 0)


def make_splits(spec: DatasetSpec, val_split: float = 0.0, seed: int = 0) -> dict[str, list[Record]]:
    """{"train", "val", "test"}: val is the official test split, or with val_split > 0 a stratified, seeded
    hold-out of train (so the official test split stays untouched until the end)."""
    if not 0.0 <= val_split < 1.0:
        raise DataError(f"--val-split {val_split} must be in [0, 1); e.g. --val-split 0.1")
    if val_split == 0.0:
        if not spec.test:
            raise DataError(f"{spec.root} has no test/val split; pass --val-split 0.1 to hold out part of train")
        return {"train": list(spec.train), "val": list(spec.test), "test": list(spec.test)}
    rng = np.random.default_rng(seed)
    by_class: dict[int, list[int]] = {}
    for i, r in enumerate(spec.train):
        by_class.setdefault(r.label, []).append(i)
    val_idx: set[int] = set()
    for label in sorted(by_class):
        idx = by_class[label]
        n_val = min(int(round(len(idx) * val_split)), len(idx) - 1)  # keep >= 1 train image per class
        val_idx.update(rng.permutation(idx)[:n_val].tolist())
    train = [r for i, r in enumerate(spec.train) if i not in val_idx]
    val = [r for i, r in enumerate(spec.train) if i in val_idx]
    if not val:
        raise DataError(f"--val-split {val_split} holds out no image of {spec.root}; use a larger fraction")
    return {"train": train, "val": val, "test": list(spec.test)}


# ----------------------------------------------------------------------------------------------------------
# Per-image preprocessing (shared by the cache and predict.py)

def parse_img_size(text: str) -> int | tuple[int, int]:
    """argparse type of --img-size: "227" -> 227 (a 227 x 227 square); "128x96" -> (96, 128), i.e. WIDTHxHEIGHT
    as photos are described, kept as (height, width) in torch's order. A square given as "96x96" is 96."""
    parts = str(text).lower().replace(" ", "").split("x")
    try:
        sizes = [int(v) for v in parts]
    except ValueError:
        sizes = []
    if len(sizes) not in (1, 2) or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not an image size: give S (S x S pixels) or WIDTHxHEIGHT, "
                                         f"e.g. 227 or 128x96")
    return sizes[0] if len(sizes) == 1 or sizes[0] == sizes[1] else (sizes[1], sizes[0])


def size_hw(img_size: int | Sequence[int]) -> tuple[int, int]:
    """An img_size (S, or (height, width) as Preprocess and config.json keep it) -> (height, width)."""
    if isinstance(img_size, (list, tuple)):
        return int(img_size[0]), int(img_size[1])
    return int(img_size), int(img_size)


def size_text(img_size: int | Sequence[int]) -> str:
    """WIDTHxHEIGHT, the way --img-size takes it and photos are described: 227x227, 128x96."""
    h, w = size_hw(img_size)
    return f"{w}x{h}"


def size_words(img_size: int | Sequence[int]) -> str:
    """For tables and messages: 227 -> "227 px"; (96, 128) -> "128x96"."""
    return f"{img_size} px" if isinstance(img_size, int) else size_text(img_size)


def size_json(img_size: int | Sequence[int]) -> int | list[int]:
    """JSON's form of an img_size, as config.json and checkpoints keep it: S, or [height, width]."""
    return img_size if isinstance(img_size, int) else [int(v) for v in img_size]


@dataclass
class Preprocess:
    # S (square, S x S) or (height, width); a square is always kept as the int, so configs and cache names
    # of square runs read as they always did
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
        if isinstance(self.img_size, (list, tuple)) and len(self.img_size) != 2:
            raise DataError(f"image size {list(self.img_size)} is neither S nor (height, width)")
        h, w = size_hw(self.img_size)
        self.img_size = h if h == w else (h, w)
        if min(h, w) < MIN_SIDE:
            raise DataError(f"image size {size_text(self.img_size)} is too small; use at least {MIN_SIDE}")
        self.test_crop = float(self.test_crop)
        if not 0.2 <= self.test_crop <= 1.0:
            raise DataError(f"--test-crop {self.test_crop:g} is outside 0.2..1 (the fraction of each side kept; "
                            f"1 = the whole image)")

    @property
    def hw(self) -> tuple[int, int]:
        """(height, width) of every image this preprocessing makes."""
        return size_hw(self.img_size)

    @property
    def channels(self) -> int:
        return 1 if self.grayscale else 3

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        d["img_size"] = size_json(self.img_size)  # JSON's form, so a dict read back from a file compares equal
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
        return {"img_size": size_json(self.img_size), "grayscale": self.grayscale, "crop_bbox": self.crop_bbox,
                "bbox_margin": self.bbox_margin if (self.crop_bbox or self.erase_background) else 0.0,
                "erase_background": self.erase_background,
                # the key only where it changes pixels, so whole-image caches keep their names
                **({"test_crop": self.test_crop} if self.test_crop != 1.0 else {})}

    def for_training(self) -> "Preprocess":
        """The preprocessing of training images: whole images (the random crops come later, per batch)."""
        return replace(self, test_crop=1.0)


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
    size = prep.img_size if isinstance(prep.img_size, int) else size_text(prep.img_size)
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


def _orphaned(entry: dict) -> bool:
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
        if e["name"] != name and (e["lineage"] == lineage or _orphaned(e)):
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
        _build_cache(records, prep, cache_dir, name, lineage, workers, desc)
        hit = _read_cache(cache_dir, name, len(records))
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


# ----------------------------------------------------------------------------------------------------------
# Loader

class BatchLoader:
    """Batches of uint8 images from a Decoded set, moved to `device`; the next batch is gathered in a background
    thread (into pinned memory on CUDA) while the current one trains. Order depends only on (seed, epoch)."""

    def __init__(self, decoded: Decoded, batch_size: int, shuffle: bool, drop_last: bool,
                 device: str | torch.device = "cpu", seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        """rank / world_size shard the set for DistributedDataParallel: every rank draws the same (seed, epoch)
        permutation and takes its positions rank::world_size. With drop_last the tail that doesn't split evenly
        is dropped first, so every rank makes the same number of steps; without it nothing is padded or
        repeated (ranks may differ by one image), so a distributed evaluation counts each image exactly once."""
        if batch_size < 1:
            raise DataError(f"batch size {batch_size} must be >= 1")
        if world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"BatchLoader: rank {rank} must lie in [0, world_size={world_size})")
        self.decoded, self.batch_size, self.shuffle, self.drop_last = decoded, batch_size, shuffle, drop_last
        self.device, self.seed, self.epoch, self.start_batch = torch.device(device), seed, 0, 0
        self.rank, self.world_size = rank, world_size
        self.pin = self.device.type == "cuda"

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """start_batch > 0 skips the epoch's first batches: the rest of the same order, for a run that
        resumes inside an epoch. len() stays the whole epoch's."""
        self.epoch, self.start_batch = epoch, start_batch

    def _shard_size(self) -> int:
        n, w = len(self.decoded), self.world_size
        if self.drop_last:
            return n // w
        return len(range(self.rank, n, w))

    def __len__(self) -> int:
        n = self._shard_size()
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def _order(self) -> np.ndarray:
        n = len(self.decoded)
        if not self.shuffle:
            order = np.arange(n)
        else:
            ss = np.random.SeedSequence([self.seed, self.epoch])
            order = np.random.default_rng(ss).permutation(n)
        if self.world_size > 1:  # the same permutation on every rank; each takes its own positions
            if self.drop_last:
                order = order[:(n // self.world_size) * self.world_size]
            order = order[self.rank::self.world_size]
        return order

    def _gather(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        idx = np.sort(idx)  # sequential reads from the memmap; the order inside a batch does not matter
        imgs = self.decoded.images
        if isinstance(imgs, torch.Tensor):
            x = imgs[torch.from_numpy(idx)]
        else:
            x = torch.from_numpy(np.ascontiguousarray(imgs[idx]))
        y = self.decoded.labels[torch.from_numpy(idx)]
        if self.pin:
            x, y = x.pin_memory(), y.pin_memory()
        return x, y

    def __iter__(self):
        order = self._order()
        bs, n = self.batch_size, len(order)
        stops = range(0, (n // bs) * bs if self.drop_last else n, bs)
        batches = [order[s:s + bs] for s in stops][self.start_batch:]
        if not batches:
            return
        with ThreadPoolExecutor(1) as ex:
            fut = ex.submit(self._gather, batches[0])
            for k in range(len(batches)):
                x, y = fut.result()
                if k + 1 < len(batches):
                    fut = ex.submit(self._gather, batches[k + 1])
                yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


# ----------------------------------------------------------------------------------------------------------
# Command-line options (train.py; the augmentation options are augment.py's)

def add_data_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("data")
    g.add_argument("--crop-bbox", action="store_true", help="crop each image to its car's bounding box")
    g.add_argument("--bbox-margin", type=float, default=0.0, help="box margin, fraction of box size per side")
    g.add_argument("--erase-background", action="store_true", help="black out everything outside the box")
    g.add_argument("--grayscale", action="store_true", help="one-channel images")
    g.add_argument("--no-normalize", action="store_true", help="only scale to [0, 1]")
    g.add_argument("--mean", type=float, nargs="+", default=None, help="normalization mean (default: reference's)")
    g.add_argument("--std", type=float, nargs="+", default=None, help="normalization std (default: reference's)")
    g.add_argument("--val-split", type=float, default=0.0,
                   help="hold out this stratified fraction of train as val (default 0: val = official test split)")
    g.add_argument("--val-seed", type=int, default=None,
                   help="seed of the --val-split draw (default: --seed); fix it to compare runs of several seeds "
                        "on the same held-out images")
    g.add_argument("--test-crop", type=float, default=1.0, metavar="FRACTION",
                   help="validation, evaluation and prediction keep this fraction of each side around the image's "
                        "centre (1 = the whole image, the study's); training images stay whole")
    g.add_argument("--cache-dir", default=None, help=f"decoded-image cache (default: {default_cache_dir()})")


def preprocess_from_args(args: argparse.Namespace) -> Preprocess:
    gray = bool(args.grayscale)
    mean = args.mean or (GRAY_MEAN if gray else RGB_MEAN)
    std = args.std or (GRAY_STD if gray else RGB_STD)
    return Preprocess(img_size=getattr(args, "img_size", 227) or 227, grayscale=gray,
                      crop_bbox=bool(args.crop_bbox), bbox_margin=float(args.bbox_margin),
                      erase_background=bool(args.erase_background), normalize=not args.no_normalize,
                      mean=tuple(mean), std=tuple(std), test_crop=getattr(args, "test_crop", 1.0))


# ----------------------------------------------------------------------------------------------------------
# Synthetic demo set

_SHAPES = ("sedan", "pickup", "van", "hatchback", "coupe", "bus")
_COLOURS = {"red": (220, 30, 30), "blue": (30, 70, 230), "green": (30, 170, 50), "yellow": (240, 210, 20),
            "purple": (140, 40, 180), "orange": (250, 130, 10), "cyan": (20, 200, 210), "white": (245, 245, 245)}


def _car_polygon(shape: str) -> list[tuple[float, float]]:
    """Side-view silhouette in a unit box (x right, y down), wheels drawn separately."""
    return {
        "sedan": [(0, .75), (0, .5), (.2, .45), (.3, .2), (.7, .2), (.8, .45), (1, .5), (1, .75)],
        "pickup": [(0, .75), (0, .45), (.35, .45), (.4, .1), (.6, .1), (.62, .45), (1, .45), (1, .75)],
        "van": [(0, .75), (0, .2), (.1, .05), (.95, .05), (1, .3), (1, .75)],
        "hatchback": [(0, .75), (0, .45), (.15, .4), (.3, .15), (.75, .15), (1, .45), (1, .75)],
        "coupe": [(0, .75), (0, .55), (.25, .5), (.45, .25), (.65, .25), (1, .55), (1, .75)],
        "bus": [(0, .8), (0, .0), (1, .0), (1, .8)],
    }[shape]


def make_demo_dataset(root: str | os.PathLike, num_classes: int = 4, train_per_class: int = 40,
                      test_per_class: int = 12, seed: int = 0, size: tuple[int, int] = (96, 64)) -> Path:
    """SYNTHETIC car-like drawings (class = body shape + colour, "Synthetic <shape> <colour>") with random
    position, scale, background and noise, in the devkit layout with real .mat files and true bounding boxes.
    Files go to root/stanford_cars/ (so torchvision.datasets.StanfordCars(root) reads it too); returns root,
    the folder to pass as --data."""
    import scipy.io
    from PIL import ImageDraw

    max_classes = min(len(_SHAPES), len(_COLOURS))
    if not 1 <= num_classes <= max_classes:
        raise DataError(f"make_demo_dataset: num_classes must be 1..{max_classes}, got {num_classes}")
    root = Path(root)
    base = root / "stanford_cars"
    colours = list(_COLOURS)
    classes = [(_SHAPES[k], colours[k]) for k in range(num_classes)]  # shape and colour both differ per class
    names = [f"Synthetic {s} {c}" for s, c in classes]
    rng = np.random.default_rng(seed)
    W, H = size
    for d in ("cars_train", "cars_test", "devkit"):
        (base / d).mkdir(parents=True, exist_ok=True)
    counter = 0
    splits = {}
    for split, per in (("train", train_per_class), ("test", test_per_class)):
        rows = []
        for _ in range(per):
            for label, (shape, colour) in enumerate(classes):
                counter += 1
                # noisy, random-coloured background so the net must find the car
                # grayish background with a random tint and noise: the car's colour stands out, its place does not
                bg = rng.integers(70, 190) + rng.integers(-25, 26, 3)
                arr = np.clip(bg + rng.normal(0, 20, (H, W, 3)), 0, 255).astype(np.uint8)
                img = Image.fromarray(arr)
                draw = ImageDraw.Draw(img)
                cw = rng.uniform(0.45, 0.8) * W
                chh = cw * rng.uniform(0.4, 0.55)
                x0 = rng.uniform(0, W - cw)
                y0 = rng.uniform(0, max(1.0, H - chh * 1.1))
                flip = rng.random() < 0.5
                pts = [((1 - px) if flip else px, py) for px, py in _car_polygon(shape)]
                col = tuple(int(np.clip(v + rng.integers(-25, 26), 0, 255)) for v in _COLOURS[colour])
                draw.polygon([(x0 + px * cw, y0 + py * chh) for px, py in pts], fill=col)
                wr = chh * 0.14
                for wx in (0.2, 0.8):
                    cx, cy = x0 + wx * cw, y0 + 0.78 * chh
                    draw.ellipse([cx - wr, cy - wr, cx + wr, cy + wr], fill=(20, 20, 20))
                fname = f"{counter:05d}.jpg"
                img.save(base / f"cars_{split}" / fname, quality=90)
                bbox = (int(x0), int(y0), int(math.ceil(x0 + cw)), int(math.ceil(y0 + 0.78 * chh + wr)))
                rows.append((bbox, label + 1, fname))
        splits[split] = rows

    def annos(rows: list) -> np.ndarray:
        dt = [("bbox_x1", "O"), ("bbox_y1", "O"), ("bbox_x2", "O"), ("bbox_y2", "O"), ("class", "O"), ("fname", "O")]
        a = np.zeros((1, len(rows)), dtype=dt)
        for i, (b, c, f) in enumerate(rows):
            a[0, i] = tuple(np.array([[v]], dtype=np.uint16) for v in b) + (np.array([[c]], dtype=np.uint8),
                                                                            np.array([f]))
        return a

    scipy.io.savemat(base / "devkit" / "cars_meta.mat", {"class_names": np.array([names], dtype=object)})
    scipy.io.savemat(base / "devkit" / "cars_train_annos.mat", {"annotations": annos(splits["train"])})
    scipy.io.savemat(base / "cars_test_annos_withlabels.mat", {"annotations": annos(splits["test"])})
    (base / "README.txt").write_text("SYNTHETIC demo data made by data.make_demo_dataset: drawn car-like shapes, "
                                     "not photographs. Class = body shape + colour.\n")
    return root


# ----------------------------------------------------------------------------------------------------------
# CLI

def compute_stats(decoded: Decoded, chunk: int = 256) -> tuple[list[float], list[float]]:
    """Per-channel mean/std of the cached uint8 images, in [0, 1] units (float64 sums)."""
    imgs = decoded.images
    C = imgs.shape[1]
    s, s2, n = np.zeros(C), np.zeros(C), 0
    for i in tqdm(range(0, len(imgs), chunk), desc="stats", leave=False, disable=len(imgs) < 10 * chunk):
        x = np.asarray(imgs[i:i + chunk], dtype=np.float64) / 255.0
        s += x.sum(axis=(0, 2, 3))
        s2 += (x * x).sum(axis=(0, 2, 3))
        n += x.shape[0] * x.shape[2] * x.shape[3]
    mean = s / n
    std = np.sqrt(np.maximum(s2 / n - mean ** 2, 0))
    return mean.tolist(), std.tolist()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    st = sub.add_parser("stats", help="mean/std of the train split (for --mean/--std)")
    st.add_argument("--data", required=True)
    st.add_argument("--img-size", type=parse_img_size, default=227, help="S or WIDTHxHEIGHT")
    st.add_argument("--grayscale", action="store_true")
    st.add_argument("--crop-bbox", action="store_true")
    st.add_argument("--bbox-margin", type=float, default=0.0)
    st.add_argument("--erase-background", action="store_true")
    st.add_argument("--val-split", type=float, default=0.0)
    st.add_argument("--seed", type=int, default=0)
    st.add_argument("--val-seed", type=int, default=None, help="seed of the --val-split draw (default: --seed)")
    st.add_argument("--cache-dir", default=None)
    info = sub.add_parser("info", help="which layout was found, counts and classes")
    info.add_argument("--data", required=True)
    cache = sub.add_parser("cache", help="list the decode cache's entries and their sizes; --clear deletes them")
    cache.add_argument("--cache-dir", default=None, help="default: $GHOSTCARS_CACHE, else ~/.cache/ghostcars")
    cache.add_argument("--clear", action="store_true", help="delete every entry (rebuilt on the next use)")
    demo = sub.add_parser("demo", help="write the synthetic demo set")
    demo.add_argument("out")
    demo.add_argument("--num-classes", type=int, default=4)
    demo.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        if args.cmd == "demo":
            print(make_demo_dataset(args.out, num_classes=args.num_classes, seed=args.seed))
            return 0
        if args.cmd == "cache":
            cache_dir = Path(args.cache_dir).expanduser() if args.cache_dir else default_cache_dir()
            entries = cache_entries(cache_dir) if cache_dir.is_dir() else []
            for e in entries:
                print(f"{e['bytes'] / 1e6:9.1f} MB  {e['created']}  {e['name']}"
                      + ("  (its images are gone)" if _orphaned(e) else ""))
                if args.clear:
                    remove_cache_entry(cache_dir, e["name"])
            total = sum(e["bytes"] for e in entries) / 1e6
            print(f"{'deleted' if args.clear else 'total'}: {len(entries)} entries, {total:.1f} MB in {cache_dir}")
            return 0
        spec = find_dataset(args.data)
        if args.cmd == "info":
            print(f"layout: {spec.layout}\nroot: {spec.root}\nclasses: {len(spec.class_names)}\n"
                  f"train: {len(spec.train)}\ntest: {len(spec.test)}\n"
                  f"boxes: {sum(r.bbox is not None for r in spec.train + spec.test)}")
            print("first classes: " + "; ".join(spec.class_names[:5]))
            return 0
        prep = Preprocess(img_size=args.img_size, grayscale=args.grayscale, crop_bbox=args.crop_bbox,
                          bbox_margin=args.bbox_margin, erase_background=args.erase_background)
        train = make_splits(spec, args.val_split, holdout_seed(vars(args)))["train"]  # the images train.py trains on
        dec = decode_cached(train, prep, args.cache_dir, desc="train")
        mean, std = compute_stats(dec)
        print(f"{len(dec)} train images of {spec.root} at {size_text(args.img_size)}"
              f"{' grayscale' if args.grayscale else ''}")
        print("mean: " + " ".join(f"{v:.4f}" for v in mean))
        print("std:  " + " ".join(f"{v:.4f}" for v in std))
        print("use:  --mean " + " ".join(f"{v:.4f}" for v in mean) + " --std " + " ".join(f"{v:.4f}" for v in std))
        return 0
    except (DataError, ImageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
