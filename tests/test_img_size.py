"""Non-square input (--img-size WIDTHxHEIGHT, e.g. 128x96 for the copy's 4:3 photos): parsing, the decoder,
the cache, MACs, and a checkpoint trained at 4:3 through evaluate, predict and export. Square sizes keep
their old int form, so the study recipe's config.json and cache names do not change."""
import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
import images
import evaluate
import export
import model as M
import runs
import predict

REPO = Path(__file__).resolve().parents[1]
ENV1 = {**os.environ, "OMP_NUM_THREADS": "1"}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("text, size", [("227", 227), ("128x96", [96, 128]), ("96x96", 96), ("40X30", [30, 40]),
                                        (" 64 ", 64)])
def test_parse_img_size(text, size):
    parsed = images.ImageSize.parse(text)
    assert parsed.json() == size and images.ImageSize.of(size) == parsed  # JSON's form and back


@pytest.mark.parametrize("text", ["", "0", "12xx", "1x2x3", "-4", "96x0", "big"])
def test_parse_img_size_refuses(text):
    with pytest.raises(argparse.ArgumentTypeError, match="WIDTHxHEIGHT"):
        images.ImageSize.parse(text)


def test_image_size_forms():
    """.json() is what config.json and checkpoints hold (S for a square, else [height, width]); ImageSize.of
    reads each form back, Preprocess's (height, width) tuple too, and refuses anything else."""
    square, wide = images.ImageSize.of(227), images.ImageSize.of([96, 128])
    assert (square.hw, square.text, square.words, square.json()) == ((227, 227), "227x227", "227 px", 227)
    assert (wide.hw, wide.text, wide.words, wide.json()) == ((96, 128), "128x96", "128x96", [96, 128])
    assert images.ImageSize.of((96, 128)) == wide == images.ImageSize.of(wide)
    assert images.ImageSize.of([64, 64]).json() == 64 and images.ImageSize.of(np.int64(32)).hw == (32, 32)
    for bad in ([1, 2, 3], "96", 96.0, True, [0, 5], None):
        with pytest.raises((TypeError, ValueError)):
            images.ImageSize.of(bad)


def test_square_stays_an_int_and_pairs_round_trip():
    assert images.Preprocess(img_size=96).to_dict()["img_size"] == 96
    assert images.Preprocess(img_size=(64, 64)).img_size == 64  # a square pair is the int
    assert images.Preprocess(img_size=96).cache_key()["img_size"] == 96
    p = images.Preprocess(img_size=(96, 128))
    assert p.hw == (96, 128) and p.size.text == "128x96"
    back = images.Preprocess.from_dict(json.loads(json.dumps(p.to_dict())))  # as config.json / a checkpoint
    assert back == p and back.hw == (96, 128)
    with pytest.raises(data.DataError, match="too small"):
        images.Preprocess(img_size=(96, 2))
    with pytest.raises(data.DataError, match="height, width"):
        images.Preprocess(img_size=[1, 2, 3])


def halves(path: Path, size=(80, 60)) -> Path:
    """Left half red, right half blue: a swapped width and height would show."""
    w, h = size
    a = np.zeros((h, w, 3), np.uint8)
    a[:, : w // 2, 0] = 255
    a[:, w // 2:, 2] = 255
    Image.fromarray(a).save(path)
    return path


def test_load_image_makes_width_by_height(tmp_path):
    img = images.load_image(halves(tmp_path / "a.png"), images.Preprocess(img_size=(30, 40)))
    assert img.shape == (3, 30, 40) and img.dtype == torch.uint8
    assert (img[0, :, :18] == 255).all() and (img[2, :, :18] == 0).all()
    assert (img[2, :, 22:] == 255).all() and (img[0, :, 22:] == 0).all()
    # same size as the file: a plain copy of its pixels
    same = images.load_image(tmp_path / "a.png", images.Preprocess(img_size=(60, 80)))
    assert torch.equal(same, torch.from_numpy(np.array(Image.open(tmp_path / "a.png"))).permute(2, 0, 1))


def test_cache_holds_height_by_width(tmp_path):
    recs = [data.Record(str(halves(tmp_path / f"{i}.png")), i % 2, None) for i in range(3)]
    dec = images.decode_cached(recs, images.Preprocess(img_size=(30, 40)), tmp_path / "cache", workers=1)
    assert tuple(dec.images.shape) == (3, 3, 30, 40)
    assert any("40x30" in p.name for p in (tmp_path / "cache").iterdir())
    again = images.decode_cached(recs, images.Preprocess(img_size=(30, 40)), tmp_path / "cache", workers=1)
    assert np.array_equal(np.asarray(again.images), np.asarray(dec.images))
    square = images.decode_cached(recs, images.Preprocess(img_size=40), tmp_path / "cache", workers=1)
    assert tuple(square.images.shape) == (3, 3, 40, 40)  # another entry, not the 4:3 one


def test_count_macs_takes_height_and_width():
    net = M.build_model("ghostnet", 5, ghost_op="torch")
    wide, small, big = M.count_macs(net, (96, 128)), M.count_macs(net, 96), M.count_macs(net, 128)
    assert small < wide < big
    assert M.count_macs(net, (96, 96)) == small


@pytest.fixture(scope="module")
def run_4x3(tmp_path_factory, tiny_data, cache_dir) -> Path:
    """Two optimizer steps of train.py at 40x32 on the tiny synthetic set."""
    out = tmp_path_factory.mktemp("runs")
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), "--data", str(tiny_data), "--out", str(out),
                           "--name", "wide", "--cache-dir", str(cache_dir), "--device", "cpu", "--img-size", "40x32",
                           "--batch-size", "8", "--epochs", "1", "--max-steps", "2", "--threads", "1"],
                          cwd=REPO, env=ENV1, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out / "wide"


def test_train_records_the_pair_and_resumes_with_it(run_4x3, tmp_path):
    cfg = json.loads((run_4x3 / "config.json").read_text())
    assert cfg["config"]["data"]["img_size"] == [32, 40]
    ckpt = runs.load_checkpoint(run_4x3 / "last.pt")
    assert images.Preprocess.from_dict(ckpt["preprocess"]).hw == (32, 40)
    # a resumed run takes the size back from the checkpoint's config (a tuple there, a list in config.json)
    copy = tmp_path / "wide"
    shutil.copytree(run_4x3, copy)
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), "--resume", str(copy), "--max-steps", "3"],
                          cwd=REPO, env=ENV1, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    resumed = runs.load_checkpoint(copy / "last.pt")
    assert resumed["step"] == 3
    assert images.Preprocess.from_dict(resumed["preprocess"]).hw == (32, 40)


def test_evaluate_predict_export_use_the_trained_shape(run_4x3, tiny_data, tmp_path, capsys):
    ckpt = run_4x3 / "last.pt"
    ev = evaluate.evaluate_checkpoint(ckpt, str(tiny_data), out_dir=tmp_path, device="cpu")
    assert ev["summary"]["img_size"] == [32, 40] and ev["summary"]["images"] > 0
    # a test size above the training one keeps the shape's 4:3
    big = evaluate.evaluate_checkpoint(ckpt, str(tiny_data), out_dir=tmp_path, device="cpu",
                                       img_size=images.ImageSize.parse("48x36"))
    assert "at 48x36 (trained at 40x32)" in evaluate.format_metrics(big["summary"])
    photo = sorted(Path(tiny_data).rglob("*.jpg"))[0]
    assert predict.main([str(photo), "--checkpoint", str(ckpt), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert not got["errors"] and len(got["predictions"][0]["top"]) == 3  # 3 classes
    meta = export.metadata(runs.load_checkpoint(ckpt), ckpt, fp16=False)
    assert "(N, 3, 32, 40)" in meta["input"]
    x, _ = export.verify_inputs(json.loads(meta["preprocess"]), [], count=2)
    assert tuple(x.shape) == (2, 3, 32, 40)
    x, _ = export.verify_inputs(json.loads(meta["preprocess"]), [str(photo)], count=1)
    assert tuple(x.shape) == (1, 3, 32, 40)
