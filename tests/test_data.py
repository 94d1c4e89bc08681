"""data.py (layouts, splits, the stats and cache commands), images.py (decode-once cache, bad images, loaders)
and augment.py (batched augmentation vs torchvision)."""
import json
import os
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
import torchvision
from PIL import Image

import augment
import data
import batches
import images

REPO = Path(__file__).resolve().parents[1]

# class names with a '/', as the official "Ram C/V Cargo Van Minivan 2012"
NAMES = ["Alpha Sedan 2010", "Ram C/V Cargo Van Minivan 2012", "Gamma Coupe 2009"]


# ----------------------------------------------------------------------------------------------------------
# fixture writers: the same struct layout as the official .mat files (checked against ../shared/data)

def _annos(rows, all_in_one=False):
    """rows: (bbox, class_1based, name[, test]) -> (1, N) struct array like cars_train_annos.mat / cars_annos.mat."""
    if all_in_one:
        dt = [("relative_im_path", "O"), ("bbox_x1", "O"), ("bbox_y1", "O"), ("bbox_x2", "O"), ("bbox_y2", "O"),
              ("class", "O"), ("test", "O")]
    else:
        dt = [("bbox_x1", "O"), ("bbox_y1", "O"), ("bbox_x2", "O"), ("bbox_y2", "O"), ("class", "O"), ("fname", "O")]
    a = np.zeros((1, len(rows)), dtype=dt)
    for i, row in enumerate(rows):
        box = tuple(np.array([[v]], dtype=np.uint16) for v in row[0])
        cls = np.array([[row[1]]], dtype=np.uint8)
        if all_in_one:
            a[0, i] = (np.array([row[2]]),) + box + (cls, np.array([[row[3]]], dtype=np.uint8))
        else:
            a[0, i] = box + (cls, np.array([row[2]]))
    return a


def _meta(names):
    return {"class_names": np.array([names], dtype=object)}


def _img(path, size, colour, box=None, box_colour=(255, 0, 0)):
    """Solid image; with box, a rectangle of box_colour at x1, y1, x2, y2 (exclusive)."""
    a = np.zeros((size[1], size[0], 3), np.uint8)
    a[:] = colour
    if box:
        a[box[1]:box[3], box[0]:box[2]] = box_colour
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(path, quality=95) if str(path).endswith(".jpg") else Image.fromarray(a).save(path)


def make_devkit(root: Path):
    base = root / "stanford_cars"
    rows = {"train": [], "test": []}
    k = 0
    for split, per in (("train", 3), ("test", 2)):
        for c in range(len(NAMES)):
            for j in range(per):
                k += 1
                size = (40 + 8 * k, 30 + 4 * k)  # every image a different size
                box = (2 + k % 5, 3, 20 + k % 7, 25)
                name = f"{k:05d}.jpg"
                _img(base / f"cars_{split}" / name, size, (30 * c, 80, 160), box)
                rows[split].append((box, c + 1, name))
    rows["train"] = rows["train"][::-1]  # .mat order differs from the sorted file order (the reference's bug)
    (base / "devkit").mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(base / "devkit" / "cars_meta.mat", _meta(NAMES))
    scipy.io.savemat(base / "devkit" / "cars_train_annos.mat", {"annotations": _annos(rows["train"])})
    scipy.io.savemat(base / "cars_test_annos_withlabels.mat", {"annotations": _annos(rows["test"])})
    return root, rows


@pytest.fixture(scope="module")
def devkit(tmp_path_factory):
    return make_devkit(tmp_path_factory.mktemp("devkit"))


def _labels(records):
    return [(Path(r.path).name, r.label, r.bbox) for r in records]


# ----------------------------------------------------------------------------------------------------------
# layouts

def test_devkit_layout_matches_annotations_and_torchvision(devkit):
    root, rows = devkit
    spec = data.find_dataset(root)  # DIR/stanford_cars
    assert spec.layout == "devkit" and spec.class_names == NAMES
    assert data.find_dataset(root / "stanford_cars").root == spec.root  # DIR itself
    for split, recs in (("train", spec.train), ("test", spec.test)):
        assert _labels(recs) == [(n, c - 1, b) for b, c, n in rows[split]]
        tv = torchvision.datasets.StanfordCars(root, split=split, download=False)
        assert tv.classes == spec.class_names
        assert [(str(p), t) for p, t in tv._samples] == [(r.path, r.label) for r in recs]


def test_all_in_one_layout(tmp_path):
    rows = []
    for i in range(8):
        box = (1, 2, 10 + i, 12)
        name = f"car_ims/{i + 1:06d}.jpg"
        _img(tmp_path / name, (30 + i, 20 + i), (10, 20, 30))
        rows.append((box, i % 3 + 1, name, i % 2))
    scipy.io.savemat(tmp_path / "cars_annos.mat", {"annotations": _annos(rows, all_in_one=True), **_meta(NAMES)})
    scipy.io.savemat(tmp_path / "cars_meta.mat", _meta(NAMES))
    spec = data.find_dataset(tmp_path)
    assert spec.layout == "all-in-one" and spec.class_names == NAMES
    assert [(Path(r.path).name, r.label, r.bbox) for r in spec.train] == \
        [(Path(n).name, c - 1, b) for b, c, n, t in rows if not t]
    assert [Path(r.path).name for r in spec.test] == [Path(n).name for b, c, n, t in rows if t]


def test_class_folder_layout_names_csv_and_anno_csv(tmp_path):
    # folder names as the mirror writes them: '/' -> '-'; names.csv has the official order (not sorted order)
    official = ["Zeta Truck 2011", "Ram C/V Cargo Van Minivan 2012", "Alpha Sedan 2010"]
    (tmp_path / "names.csv").write_text("\n".join(official) + "\n")
    lines = {"train": [], "test": ["fname,x1,y1,x2,y2,class"]}  # with and without a header row
    k = 0
    for split in ("train", "test"):
        for cid, name in enumerate(official, 1):
            for _ in range(2):
                k += 1
                fname = f"{k:05d}.jpg"
                _img(tmp_path / split / name.replace("/", "-") / fname, (32, 24), (cid * 50, 0, 0))
                lines[split].append(f"{fname},{k},{k + 1},{k + 20},{k + 15},{cid}")
    for split in lines:
        (tmp_path / f"anno_{split}.csv").write_text("\n".join(lines[split]) + "\n")
    spec = data.find_dataset(tmp_path)
    assert spec.layout == "class-folder" and spec.class_names == official
    for r in spec.train + spec.test:
        k = int(Path(r.path).stem)
        assert r.bbox == (k, k + 1, k + 20, k + 15)  # matched by file name
        assert official[r.label].replace("/", "-") == Path(r.path).parent.name
    assert len(spec.train) == len(spec.test) == 6
    # the Kaggle mirror nests the folders: DIR/car_data/car_data/{train,test}, CSVs in DIR
    nested = tmp_path / "kaggle"
    (nested / "car_data").mkdir(parents=True)
    os.rename(tmp_path / "train", nested / "car_data" / "train")
    os.rename(tmp_path / "test", nested / "car_data" / "test")
    os.rename(nested / "car_data", tmp_path / "car_data")
    (nested / "car_data").mkdir()
    os.rename(tmp_path / "car_data", nested / "car_data" / "car_data")
    for f in ("names.csv", "anno_train.csv", "anno_test.csv"):
        os.rename(tmp_path / f, nested / f)
    spec2 = data.find_dataset(nested)
    assert spec2.layout == "class-folder" and spec2.class_names == official
    assert [(r.label, r.bbox) for r in spec2.train] == [(r.label, r.bbox) for r in spec.train]


def test_imagefolder_layouts_and_val_split(tmp_path):
    for split, per in (("train", 10), ("val", 2)):
        for c in ("cat_b", "cat_a"):
            for i in range(per):
                _img(tmp_path / "a" / split / c / f"{i}.png", (16, 16), (i, 0, 0))
    spec = data.find_dataset(tmp_path / "a")
    assert spec.layout == "imagefolder" and spec.class_names == ["cat_a", "cat_b"]
    assert len(spec.train) == 20 and len(spec.test) == 4
    s = data.make_splits(spec)
    assert s["val"] == s["test"] == spec.test
    s1, s2 = data.make_splits(spec, 0.2, seed=1), data.make_splits(spec, 0.2, seed=1)
    assert s1 == s2 and s1["test"] == spec.test  # seeded; the official test split stays untouched
    assert sorted(r.label for r in s1["val"]) == [0, 0, 1, 1]  # stratified
    assert set(s1["val"]).isdisjoint(s1["train"]) and len(s1["train"]) + len(s1["val"]) == 20
    assert data.make_splits(spec, 0.2, seed=2)["val"] != s1["val"]
    # one folder of classes: needs --val-split
    for c in ("x", "y"):
        for i in range(4):
            _img(tmp_path / "b" / c / f"{i}.jpg", (16, 16), (0, i, 0))
    spec = data.find_dataset(tmp_path / "b")
    assert spec.layout == "imagefolder" and not spec.test
    with pytest.raises(data.DataError, match="--val-split"):
        data.make_splits(spec)
    assert len(data.make_splits(spec, 0.25)["val"]) == 2


def test_unknown_layout_error_lists_layouts(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(data.DataError) as e:
        data.find_dataset(tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path) in msg
    for word in ("devkit", "cars_meta.mat", "all-in-one", "cars_annos.mat", "class folders", "image folders"):
        assert word in msg
    with pytest.raises(data.DataError, match="does not exist"):
        data.find_dataset(tmp_path / "nope")


def test_partial_devkit_names_missing_file(tmp_path):
    (tmp_path / "cars_train").mkdir()
    (tmp_path / "devkit").mkdir()
    with pytest.raises(data.DataError, match="cars_test_annos_withlabels.mat"):
        data.find_dataset(tmp_path)
    (tmp_path / "x" / "car_ims").mkdir(parents=True)
    _img(tmp_path / "x" / "car_ims" / "000001.jpg", (16, 16), (0, 0, 0))
    with pytest.raises(data.DataError, match="no cars_annos.mat"):
        data.find_dataset(tmp_path / "x")


# ----------------------------------------------------------------------------------------------------------
# bounding boxes

def test_bbox_crop_uses_the_box_of_its_own_image(devkit, tmp_path):
    root, rows = devkit
    spec = data.find_dataset(root)
    # plant a box that fits only image A: a green rectangle there; B (listed next to A) has other sizes
    a = spec.train[0]
    with Image.open(a.path) as im:
        w, h = im.size
    box = (w - 20, h - 14, w - 4, h - 2)
    _img(tmp_path / "a.png", (w, h), (0, 0, 255), box, (0, 255, 0))
    prep = images.Preprocess(img_size=16, crop_bbox=True)
    x = images.load_image(tmp_path / "a.png", prep, box)
    assert x.shape == (3, 16, 16) and (x[1] == 255).all() and (x[0] == 0).all() and (x[2] == 0).all()
    # the decoded training set: each crop shows the red box of its own image only (JPEG: tolerance)
    dec = images.decode_cached(spec.train, prep, tmp_path / "cache", desc="t")
    red = torch.tensor([255, 0, 0]).view(1, 3, 1, 1)
    inner = torch.from_numpy(np.array(dec.images)).int()[:, :, 3:-3, 3:-3]  # JPEG chroma blurs the box edges
    frac = float(((inner - red).abs().amax(1) < 60).float().mean())
    assert frac > 0.97, frac
    # margin grows the box, clamped to the image
    m = images.load_image(tmp_path / "a.png", images.Preprocess(img_size=16, crop_bbox=True, bbox_margin=5.0), box)
    assert (m[2] == 255).any()


def test_erase_background_and_box_outside_image(tmp_path):
    _img(tmp_path / "i.png", (40, 40), (0, 0, 200), (10, 10, 30, 30), (0, 200, 0))
    prep = images.Preprocess(img_size=40, erase_background=True)
    x = images.load_image(tmp_path / "i.png", prep, (10, 10, 30, 30))
    assert (x[:, :8].sum() == 0) and (x[1, 12:28, 12:28] == 200).all()
    # the real data's boxes are in full-size pixels: a box past the image is ignored, never a crash
    recs = [data.Record(str(tmp_path / "i.png"), 0, (100, 100, 900, 700))]
    with pytest.warns(UserWarning, match="outside"):
        dec = images.decode_cached(recs, images.Preprocess(img_size=8, crop_bbox=True), tmp_path / "c")
    assert len(dec) == 1
    # partly outside: clamped
    y = images.load_image(tmp_path / "i.png", images.Preprocess(img_size=8, crop_bbox=True), (20, 20, 500, 500))
    assert y.shape == (3, 8, 8)


def test_test_crop_keeps_the_centre_and_training_images_stay_whole(tmp_path):
    # blue 40x40 with a green square over 8..32: the central half of each side (10..30) is all green
    _img(tmp_path / "i.png", (40, 40), (0, 0, 200), (8, 8, 32, 32), (0, 200, 0))
    whole, centre = images.Preprocess(img_size=20), images.Preprocess(img_size=20, test_crop=0.5)
    x = images.load_image(tmp_path / "i.png", centre)
    assert (x[1] == 200).all() and (x[2] == 0).all()
    assert (images.load_image(tmp_path / "i.png", whole)[2, 0] == 200).all()  # the blue border is in the whole image
    assert centre.for_training() == whole and images.Preprocess.from_dict(centre.to_dict()) == centre
    # caches of whole images keep their names; a crop is part of the key
    assert "test_crop" not in whole.cache_key() and centre.cache_key()["test_crop"] == 0.5
    dec = images.decode_cached([data.Record(str(tmp_path / "i.png"), 0, None)], centre, tmp_path / "c")
    assert torch.equal(torch.as_tensor(np.array(dec.images[0])), x)
    with pytest.raises(data.DataError, match="--test-crop 1.5 is outside"):
        images.Preprocess(img_size=20, test_crop=1.5)


# ----------------------------------------------------------------------------------------------------------
# bad images, modes, cache

def _bad_set(d: Path):
    d.mkdir(parents=True, exist_ok=True)
    recs = []
    good = d / "good.jpg"
    _img(good, (40, 30), (10, 200, 30))
    raw = good.read_bytes()
    (d / "truncated.jpg").write_bytes(raw[: len(raw) // 2])
    corrupt = bytearray(raw)
    corrupt[200:600] = os.urandom(400)
    (d / "corrupt.jpg").write_bytes(bytes(corrupt[:300]))
    (d / "empty.jpg").write_bytes(b"")
    (d / "text.jpg").write_text("this is not a jpeg\n")
    Image.new("CMYK", (30, 20), (0, 255, 255, 0)).save(d / "cmyk.jpg")  # red in CMYK
    rgba = Image.new("RGBA", (30, 20), (255, 0, 0, 255))
    rgba.paste((0, 0, 255, 0), (0, 0, 15, 20))  # left half fully transparent blue
    rgba.save(d / "alpha.png")
    Image.fromarray(np.full((20, 30), 65535, np.uint16)).save(d / "sixteen.png")  # 16-bit white
    Image.new("P", (30, 20), 3).save(d / "palette.png")
    Image.new("L", (2, 2)).save(d / "tiny.png")
    names = ["good.jpg", "truncated.jpg", "corrupt.jpg", "empty.jpg", "text.jpg", "cmyk.jpg", "alpha.png",
             "sixteen.png", "palette.png", "tiny.png", "missing.jpg"]
    recs = [data.Record(str(d / n), i, None) for i, n in enumerate(names)]
    return recs


def test_bad_images_reported_by_name_and_modes_become_rgb(tmp_path):
    recs = _bad_set(tmp_path / "imgs")
    prep = images.Preprocess(img_size=12)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        dec = images.decode_cached(recs, prep, tmp_path / "cache", desc="bad")
    msgs = [str(x.message) for x in w if "skipped" in str(x.message)]
    assert len(msgs) == 1, msgs  # one warning, with the count and every name
    bad = ["truncated.jpg", "corrupt.jpg", "empty.jpg", "text.jpg", "tiny.png", "missing.jpg"]
    assert f"skipped {len(bad)} of {len(recs)}" in msgs[0]
    for n in bad:
        assert n in msgs[0]
    assert sorted(Path(p).name for p, _ in dec.skipped) == sorted(bad)
    kept = [Path(p).name for p in dec.paths]
    assert kept == ["good.jpg", "cmyk.jpg", "alpha.png", "sixteen.png", "palette.png"]
    assert dec.labels.tolist() == [0, 5, 6, 7, 8] and dec.images.shape == (5, 3, 12, 12)
    imgs = torch.from_numpy(np.array(dec.images)).int()
    assert (imgs[1, 0] > 200).all() and (imgs[1, 1:] < 60).all()  # CMYK red -> RGB red
    assert (imgs[2, :, :, :4] > 240).all() and (imgs[2, 0, :, -4:] > 240).all()  # transparent -> white
    assert (imgs[2, 2, :, -4:] < 20).all()
    assert (imgs[3] > 250).all()  # 16-bit white scaled, not clipped garbage
    with pytest.warns(UserWarning, match="skipped 6"):
        g = images.decode_cached(recs, images.Preprocess(img_size=12, grayscale=True), tmp_path / "cache", desc="bad")
    assert g.images.shape == (5, 1, 12, 12)
    for n, reason in (("empty.jpg", "not an image"), ("text.jpg", "not an image"), ("missing.jpg", "missing"),
                      ("tiny.png", "too small")):
        with pytest.raises(images.ImageError, match=reason):
            images.load_image(tmp_path / "imgs" / n, prep)
    with pytest.raises(images.ImageError, match="truncated|unreadable"):
        images.load_image(tmp_path / "imgs" / "truncated.jpg", prep)


def test_cache_hit_and_invalidation(tmp_path, monkeypatch):
    d = tmp_path / "i"
    recs = []
    for i in range(6):
        _img(d / f"{i}.png", (20, 20), (i * 40, 0, 0))
        recs.append(data.Record(str(d / f"{i}.png"), i % 2, None))
    prep = images.Preprocess(img_size=10)
    first = images.decode_cached(recs, prep, tmp_path / "c")
    calls = []
    real = images._load
    monkeypatch.setattr(images, "_load", lambda *a: calls.append(a) or real(*a))
    again = images.decode_cached(recs, prep, tmp_path / "c")
    assert calls == [] and np.array_equal(np.array(first.images), np.array(again.images))
    assert isinstance(again.images, np.memmap) and not again.images.flags.writeable
    # changing one image (content and mtime) invalidates the cache
    time.sleep(0.01)
    _img(d / "3.png", (20, 20), (0, 255, 0))
    changed = images.decode_cached(recs, prep, tmp_path / "c")
    assert len(calls) == 6 and changed.images[3, 1].min() == 255
    # other preprocessing -> another cache; normalization options do not matter
    calls.clear()
    images.decode_cached(recs, images.Preprocess(img_size=10, normalize=False, mean=(0, 0, 0)), tmp_path / "c")
    assert calls == []
    images.decode_cached(recs, images.Preprocess(img_size=12), tmp_path / "c")
    assert len(calls) == 6


def test_cache_removes_superseded_and_orphaned_entries(tmp_path, capsys):
    """Old entries were never deleted. A build now removes the entries it supersedes (the same files and
    preprocessing, decoded before a file changed) and those whose images' folder is gone; other sizes of
    the same images stay. `data.py cache` lists the entries and --clear deletes them."""
    cache = tmp_path / "c"

    def four_images(folder):
        recs = []
        for i in range(4):
            _img(folder / f"{i}.png", (20, 20), (i * 50, 0, 0))
            recs.append(data.Record(str(folder / f"{i}.png"), i % 2, None))
        return recs

    recs = four_images(tmp_path / "a")
    names = lambda: sorted(e["name"] for e in images.cache_entries(cache))  # noqa: E731
    images.decode_cached(recs, images.Preprocess(img_size=10), cache, desc="a")
    images.decode_cached(recs, images.Preprocess(img_size=12), cache, desc="a")
    assert len(names()) == 2
    before = names()
    time.sleep(0.01)
    _img(tmp_path / "a" / "1.png", (20, 20), (0, 255, 0))  # new content and mtime
    images.decode_cached(recs, images.Preprocess(img_size=10), cache, desc="a")
    after = names()
    assert len(after) == 2 and [n for n in before if "-12-" in n] == [n for n in after if "-12-" in n]
    assert [n for n in before if "-10-" in n] != [n for n in after if "-10-" in n]
    assert not list(cache.glob("*.tmp*")) and len(list(cache.glob("*.npy"))) == 2

    other = four_images(tmp_path / "b")  # folder a is deleted: its entries go with the next build
    shutil.rmtree(tmp_path / "a")
    assert data.main(["cache", "--cache-dir", str(cache)]) == 0
    out = capsys.readouterr().out
    assert out.count("(its images are gone)") == 2 and "total: 2 entries" in out
    images.decode_cached(other, images.Preprocess(img_size=10), cache, desc="b")
    assert len(names()) == 1 and names()[0].startswith("b-")

    assert data.main(["cache", "--cache-dir", str(cache), "--clear"]) == 0
    assert "deleted: 1 entries" in capsys.readouterr().out
    assert names() == [] and not list(cache.glob("*.npy"))


def test_two_runs_building_one_cache_at_once_both_read_it(tmp_path, monkeypatch):
    """Regression (a CI failure of a side-by-side campaign test): run B started building the same cache while
    run A built it, and B's build removed the marker just after A wrote it; A then failed with "could not be
    read back". A now waits for B's marker. Simulated: right after A's build, "B" removes the marker and writes
    it back 0.5 s later."""
    import threading
    d = tmp_path / "i"
    recs = [data.Record(str(d / f"{i}.png"), 0, None) for i in range(4)]
    for r in recs:
        _img(r.path, (20, 20), (100, 50, 0))
    prep, cache = images.Preprocess(img_size=8), tmp_path / "c"
    real_build = images._build_cache

    def build_then_other_run_rebuilds(records, prep, cache_dir, name, *a, **k):
        real_build(records, prep, cache_dir, name, *a, **k)
        marker = cache_dir / f"{name}.json"
        text = marker.read_text()
        marker.unlink()  # what the other run's _build_cache does first
        threading.Timer(0.5, marker.write_text, [text]).start()  # ... and its marker, once its array is in place
    monkeypatch.setattr(images, "_build_cache", build_then_other_run_rebuilds)
    out = images.decode_cached(recs, prep, cache)
    assert len(out.images) == 4


def test_half_written_cache_is_rebuilt(tmp_path):
    d = tmp_path / "i"
    recs = [data.Record(str(d / f"{i}.png"), 0, None) for i in range(4)]
    for r in recs:
        _img(r.path, (20, 20), (100, 50, 0))
    prep = images.Preprocess(img_size=8)
    cache = tmp_path / "c"
    good = np.array(images.decode_cached(recs, prep, cache).images)
    name = next(cache.glob("*.json")).name[:-5]
    arr, meta = cache / f"{name}.npy", cache / f"{name}.json"
    # 1) array truncated after the marker was written (disk trouble): rebuilt
    arr.write_bytes(arr.read_bytes()[:200])
    assert np.array_equal(np.array(images.decode_cached(recs, prep, cache).images), good)
    # 2) killed before the marker: array present, no marker -> rebuilt, never trusted
    meta.unlink()
    arr.write_bytes(arr.read_bytes()[:-50])
    assert np.array_equal(np.array(images.decode_cached(recs, prep, cache).images), good)
    # 3) a marker that is not complete, plus a temp file of a dead process -> removed and rebuilt
    m = json.loads(meta.read_text())
    m["complete"] = False
    meta.write_text(json.dumps(m))
    stale = cache / f"{name}.npy.tmp999999999-abc"
    stale.write_bytes(b"partial")
    assert np.array_equal(np.array(images.decode_cached(recs, prep, cache).images), good)
    assert not stale.exists()


@pytest.mark.slow
def test_killed_build_subprocess_then_restart(tmp_path):
    d = tmp_path / "i"
    recs = [data.Record(str(d / f"{i}.png"), 0, None) for i in range(40)]
    for r in recs:
        _img(r.path, (20, 20), (0, 80, 160))
    cache = tmp_path / "c"
    script = (f"import sys, time; sys.path.insert(0, {str(REPO)!r}); import data, images\n"
              "real = images._load\n"
              "images._load = lambda *a: (time.sleep(0.2), real(*a))[1]\n"
              f"recs = [data.Record({str(d)!r} + f'/{{i}}.png', 0, None) for i in range(40)]\n"
              f"images.decode_cached(recs, images.Preprocess(img_size=8), {str(cache)!r}, workers=1)\n")
    p = subprocess.Popen([sys.executable, "-c", script])
    try:
        t0 = time.time()
        while not list(cache.glob("*.tmp*")) and time.time() - t0 < 60:
            time.sleep(0.1)
        assert list(cache.glob("*.tmp*")), "the build never started"
        time.sleep(0.5)
    finally:
        p.kill()
        p.wait()
    assert not list(cache.glob("*.json"))  # no completion marker from the killed build
    dec = images.decode_cached(recs, images.Preprocess(img_size=8), cache)
    assert len(dec) == 40 and not list(cache.glob("*.tmp*"))


# ----------------------------------------------------------------------------------------------------------
# loader

def test_batch_loader_order_and_alignment():
    n = 23
    imgs = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
    dec = images.Decoded(imgs.numpy(), torch.arange(n), [str(i) for i in range(n)])
    bl = batches.BatchLoader(dec, 5, shuffle=True, drop_last=False, device="cpu", seed=3)
    assert len(bl) == 5

    def epoch(loader, e):
        loader.set_epoch(e)
        out = [(x, y) for x, y in loader]
        for x, y in out:
            assert x.dtype == torch.uint8 and torch.equal(x[:, 0, 0, 0].long(), y)  # images stay with labels
        return torch.cat([y for _, y in out]).tolist()

    e0 = epoch(bl, 0)
    assert sorted(e0) == list(range(n)) and e0 != list(range(n))
    assert epoch(bl, 0) == e0 and epoch(bl, 1) != e0
    bl2 = batches.BatchLoader(dec, 5, shuffle=True, drop_last=False, device="cpu", seed=3)
    assert epoch(bl2, 1) == epoch(bl, 1)  # order depends only on (seed, epoch)
    dl = batches.BatchLoader(dec, 5, shuffle=False, drop_last=True)
    assert len(dl) == 4 and epoch(dl, 0) == list(range(20))
    td = images.Decoded(imgs, torch.arange(n), [str(i) for i in range(n)])  # tensor images work too
    assert epoch(batches.BatchLoader(td, 7, False, False), 0) == list(range(n))


def test_config_to_preprocess_and_augment_dicts():
    import config

    def parse(*argv):
        return config.from_command_line(list(argv)).cfg

    aug, er = augment.augment_from_config(parse().augment)
    assert list(aug) == ["flip", "affine", "jitter"] and er is None
    assert aug["affine"]["degrees"] == 25 and aug["affine"]["translate"] == (0.1, 0.1)
    assert aug["affine"]["scale"] == (0.9, 1.1) and aug["affine"]["shear"] == 8
    assert aug["jitter"] == {"brightness": 0.2, "contrast": 0.2, "saturation": 0.2, "hue": 0.1}
    assert aug["flip"] == {"p": 0.5} and augment.BatchTransform(images.Preprocess(), aug).mode == "nearest"
    json.dumps(aug)
    assert augment.resolve_augment(["flip", "affine", "jitter"]) == aug  # the defaults are written once
    assert augment.augment_from_config(parse("--augment", "none").augment)[0] is None
    aug, er = augment.augment_from_config(parse("--augment", "perspective", "resized_crop", "--erase").augment)
    assert augment.BatchTransform(images.Preprocess(), aug, er).mode == "bilinear" and er["p"] == 0.5
    with pytest.raises(data.DataError, match="unknown augmentation 'blur'"):
        augment.augment_from_config(parse("--augment", "flip", "blur").augment)
    prep = images.preprocess_of(parse().data)
    assert prep == images.Preprocess() and prep.mean == (0.4707, 0.4602, 0.455) and prep.img_size == 227
    assert images.Preprocess.from_dict(prep.to_dict()) == prep
    json.dumps(prep.to_dict())
    g = images.preprocess_of(parse("--grayscale", "--crop-bbox", "--bbox-margin", "0.1").data)
    assert g.channels == 1 and g.mean == images.GRAY_MEAN and g.crop_bbox and g.bbox_margin == 0.1
    assert images.preprocess_of(parse("--img-size", "128x96").data).img_size == (96, 128)
    assert images.Preprocess(grayscale=True).mean == images.GRAY_MEAN  # RGB defaults -> gray defaults
    with pytest.raises(data.DataError, match="--mean"):
        images.Preprocess(grayscale=True, mean=(0.1, 0.2, 0.3), std=(1, 1, 1))


def test_make_demo_dataset_and_stats_cli(tmp_path, capsys):
    root = data.make_demo_dataset(tmp_path, num_classes=3, train_per_class=4, test_per_class=2)
    spec = data.find_dataset(root)
    assert spec.layout == "devkit" and len(spec.train) == 12 and len(spec.test) == 6
    assert all(n.startswith("Synthetic ") for n in spec.class_names) and len(set(spec.class_names)) == 3
    tv = torchvision.datasets.StanfordCars(root, split="train")
    assert [t for _, t in tv._samples] == [r.label for r in spec.train]
    # the stored box really is the car: cropping removes most of the noisy background
    r = spec.train[0]
    with Image.open(r.path) as im:
        assert 0 <= r.bbox[0] < r.bbox[2] <= im.size[0] + 1 and 0 <= r.bbox[1] < r.bbox[3] <= im.size[1] + 1
    assert data.main(["stats", "--data", str(root), "--img-size", "16", "--cache-dir", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    mean = [float(v) for v in out.split("mean:")[1].split("\n")[0].split()]
    assert len(mean) == 3 and all(0 < m < 1 for m in mean) and "--std" in out
    # with a hold-out, the statistics are those of the images train.py trains on: its --val-seed draw
    def stats_line(*opts):
        assert data.main(["stats", "--data", str(root), "--img-size", "16", "--cache-dir", str(tmp_path / "c"),
                          "--val-split", "0.5", *opts]) == 0
        return capsys.readouterr().out.split("mean:")[1].split("\n")[0]
    assert stats_line("--seed", "3", "--val-seed", "5") == stats_line("--seed", "5") != stats_line("--seed", "3")
    assert data.main(["stats", "--data", str(tmp_path / "none")]) == 2
    assert "error:" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------
# real data (../shared/data, skipped when absent)

def test_real_data_devkit_matches_torchvision(real_data):
    spec = data.find_dataset(real_data.parent)
    assert spec.layout == "devkit" and len(spec.class_names) == 196
    assert len(spec.train) == 5366 and len(spec.test) == 1798
    for split, recs in (("train", spec.train), ("test", spec.test)):
        tv = torchvision.datasets.StanfordCars(real_data.parent, split=split, download=False)
        assert tv.classes == spec.class_names
        assert [t for _, t in tv._samples] == [r.label for r in recs]
        assert [Path(p).name for p, _ in tv._samples] == [Path(r.path).name for r in recs]
    assert {r.label for r in spec.train} == set(range(196))
    assert all(r.bbox is not None for r in spec.train)


def test_real_data_decodes_with_bbox_crop(real_data, tmp_path):
    spec = data.find_dataset(real_data)
    recs = spec.test[:40]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the real boxes are in full-size pixels: many fall outside
        dec = images.decode_cached(recs, images.Preprocess(img_size=32, crop_bbox=True, bbox_margin=0.1), tmp_path)
    assert dec.images.shape == (40, 3, 32, 32) and not dec.skipped



# ----------------------------------------------------------------------------------------------------------
# folders holding more than one layout (as people download them)

def _all_in_one(root: Path) -> None:
    rows = []
    for i in range(6):
        name = f"car_ims/{i + 1:06d}.jpg"
        _img(root / name, (30, 20), (10, 20, 30))
        rows.append(((1, 2, 10, 12), i % 3 + 1, name, i % 2))
    scipy.io.savemat(root / "cars_annos.mat", {"annotations": _annos(rows, all_in_one=True), **_meta(NAMES)})


def test_all_in_one_beside_the_devkit_folder_is_found(tmp_path):
    """car_ims/ + cars_annos.mat with car_devkit.tgz's devkit/ unpacked beside them: once refused as an
    incomplete devkit layout; now the complete all-in-one layout is used, and the note says why."""
    _all_in_one(tmp_path)
    (tmp_path / "devkit").mkdir()
    scipy.io.savemat(tmp_path / "devkit" / "cars_meta.mat", _meta(NAMES))
    scipy.io.savemat(tmp_path / "devkit" / "cars_train_annos.mat", {"annotations": _annos([((1, 2, 3, 4), 1, "x.jpg")])})
    spec = data.find_dataset(tmp_path)
    assert spec.layout == "all-in-one" and len(spec.train) == 3 and len(spec.test) == 3
    assert "chose the complete all-in-one layout" in spec.note and "devkit layout but lacks" in spec.note


def test_class_folder_copy_beside_devkit_files_is_found(tmp_path):
    for split in ("train", "test"):
        for c, name in enumerate(NAMES):
            _img(tmp_path / split / name.replace("/", "-") / f"{split}{c}.jpg", (20, 16), (c * 40, 0, 0))
    (tmp_path / "names.csv").write_text("\n".join(NAMES) + "\n")
    (tmp_path / "devkit").mkdir()
    scipy.io.savemat(tmp_path / "devkit" / "cars_meta.mat", _meta(NAMES))
    spec = data.find_dataset(tmp_path)
    assert spec.layout == "class-folder" and spec.class_names == NAMES and len(spec.train) == 3
    assert "devkit" in spec.note


def test_no_complete_layout_names_what_each_lacks(tmp_path):
    (tmp_path / "cars_train").mkdir()
    _img(tmp_path / "cars_train" / "00001.jpg", (20, 16), (0, 0, 0))
    _img(tmp_path / "cars_test" / "00001.jpg", (20, 16), (0, 0, 0))
    (tmp_path / "car_ims").mkdir()
    with pytest.raises(data.DataError) as e:
        data.find_dataset(tmp_path)
    msg = str(e.value)  # both candidates, each with what it lacks; cars_train/ and cars_test/ are not two classes
    assert "no complete dataset layout" in msg and "(1)" in msg and "(2)" in msg
    assert "cars_test_annos_withlabels.mat" in msg and "no cars_annos.mat" in msg and "\n" not in msg
