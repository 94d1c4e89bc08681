"""Data: dataset layouts -> records (path, label, bbox), train/val/test splits, the synthetic demo set, the CLI.

The records go to images.py, which decodes them once into the uint8 cache and batches them (images.py's
docstring has the whole pipeline). This module decodes no image: it reads folders and annotation files (and
draws the demo set); its `stats` and `cache` commands call into images.py.

CLI:  python data.py stats --data DIR      # mean/std of the train split, for --mean/--std
      python data.py info --data DIR       # which layout was found, counts, classes
      python data.py cache [--clear]       # the decode cache's entries and sizes; --clear deletes them
      python data.py demo OUT_DIR          # synthetic devkit-layout demo set (make_demo_dataset)
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

if TYPE_CHECKING:
    from images import Decoded

# the file endings taken as images wherever a folder is searched (dataset folders, predict.py, export.py)
IMAGE_EXTS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"})


class DataError(Exception):
    """A dataset / option problem the user can fix; the message is one line naming the path and the fix."""


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


def subset(records: list, n: int | None, seed: int) -> list:
    """A seeded random subset of n records (in their original order), for quick runs."""
    if n is None or n >= len(records):
        return records
    g = torch.Generator().manual_seed(seed)
    keep = sorted(torch.randperm(len(records), generator=g)[:n].tolist())
    return [records[i] for i in keep]


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
# Command-line options (train.py; the augmentation options are augment.py's)

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


def _cli_parser() -> argparse.ArgumentParser:
    from images import ImageSize

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    st = sub.add_parser("stats", help="mean/std of the train split (for --mean/--std)")
    st.add_argument("--data", required=True)
    st.add_argument("--img-size", type=ImageSize.parse, default=227, help="S or WIDTHxHEIGHT")
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
    return ap


def _cache_command(args: argparse.Namespace) -> None:
    import images

    cache_dir = Path(args.cache_dir).expanduser() if args.cache_dir else images.default_cache_dir()
    entries = images.cache_entries(cache_dir) if cache_dir.is_dir() else []
    for e in entries:
        print(f"{e['bytes'] / 1e6:9.1f} MB  {e['created']}  {e['name']}"
              + ("  (its images are gone)" if images.cache_entry_orphaned(e) else ""))
        if args.clear:
            images.remove_cache_entry(cache_dir, e["name"])
    total = sum(e["bytes"] for e in entries) / 1e6
    print(f"{'deleted' if args.clear else 'total'}: {len(entries)} entries, {total:.1f} MB in {cache_dir}")


def _stats_command(args: argparse.Namespace, spec: DatasetSpec) -> None:
    import images

    prep = images.Preprocess(img_size=args.img_size, grayscale=args.grayscale, crop_bbox=args.crop_bbox,
                             bbox_margin=args.bbox_margin, erase_background=args.erase_background)
    train = make_splits(spec, args.val_split, holdout_seed(vars(args)))["train"]  # the images train.py trains on
    dec = images.decode_cached(train, prep, args.cache_dir, desc="train")
    mean, std = compute_stats(dec)
    print(f"{len(dec)} train images of {spec.root} at {prep.size.text}{' grayscale' if args.grayscale else ''}")
    print("mean: " + " ".join(f"{v:.4f}" for v in mean))
    print("std:  " + " ".join(f"{v:.4f}" for v in std))
    print("use:  --mean " + " ".join(f"{v:.4f}" for v in mean) + " --std " + " ".join(f"{v:.4f}" for v in std))


def main(argv: list[str] | None = None) -> int:
    # images.py is imported inside the commands, not at the top: it imports this module (DataError, Record)
    from images import ImageError

    args = _cli_parser().parse_args(argv)
    try:
        if args.cmd == "demo":
            print(make_demo_dataset(args.out, num_classes=args.num_classes, seed=args.seed))
        elif args.cmd == "cache":
            _cache_command(args)
        else:
            spec = find_dataset(args.data)
            if args.cmd == "info":
                print(f"layout: {spec.layout}\nroot: {spec.root}\nclasses: {len(spec.class_names)}\n"
                      f"train: {len(spec.train)}\ntest: {len(spec.test)}\n"
                      f"boxes: {sum(r.bbox is not None for r in spec.train + spec.test)}")
                print("first classes: " + "; ".join(spec.class_names[:5]))
            else:
                _stats_command(args, spec)
        return 0
    except (DataError, ImageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    # Run the `data` module's main, not this file's second copy as __main__: images.py raises data.DataError,
    # which __main__.DataError in main's except clause would not catch.
    import data

    sys.exit(data.main())
