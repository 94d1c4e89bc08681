"""predict.py: top-k output, checkpoint discovery, every bad input of the issue, refused checkpoints, ONNX."""
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import augment
import runs
import images
import model as M
import predict

REPO = Path(__file__).resolve().parents[1]
ENV1 = {**os.environ, "OMP_NUM_THREADS": "1"}  # see one_thread()
IMG = 64
CLASSES = [f"Synthetic car {i}" for i in range(7)]  # 7 > topk, so top-5 really cuts


pytestmark = pytest.mark.usefixtures("one_thread")


def make_checkpoint(path: Path, class_names: list[str] = CLASSES, img_size: int = IMG, seed: int = 0,
                    **prep_options) -> Path:
    """A checkpoint in the shared format, written directly (random weights; no training needed)."""
    prep = images.Preprocess(img_size=img_size, **prep_options)
    torch.manual_seed(seed)
    net = M.build_model("ghostnet", len(class_names), in_channels=prep.channels)
    ckpt = {"format": "ghostcars-v1", "arch": "ghostnet", "num_classes": len(class_names),
            "class_names": list(class_names),
            "model_options": {"out_channels": 320, "dropout": 0.2, "in_channels": prep.channels, "width": 1.0},
            "preprocess": prep.to_dict(), "model": net.state_dict(), "epoch": 1,
            "best": {"val_acc": 0.5, "epoch": 1, "min_val_loss": 1.5, "min_val_loss_epoch": 1}, "config": {}}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, path)
    return path


def car_image(path: Path, size=(160, 120), mode="RGB", **save) -> Path:
    """A small photo-like image: a coloured gradient with a dark box."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    rgb = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), np.full_like(xx, 128)], -1).astype(np.uint8)
    rgb[h // 3: 2 * h // 3, w // 4: 3 * w // 4] = (30, 30, 160)
    Image.fromarray(rgb).convert(mode).save(path, **save)
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("run") / "best.pt")


@pytest.fixture
def good(tmp_path) -> Path:
    return car_image(tmp_path / "good.jpg")


def run_main(argv, capsys):
    rc = predict.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


# ---------------------------------------------------------------------------------------------- output

def test_top5_one_image(ckpt, good, capsys):
    rc, out, err = run_main([good, "--checkpoint", ckpt], capsys)
    assert rc == 0 and "error" not in err
    lines = out.strip().splitlines()
    assert lines[0] == str(good) and len(lines) == 6
    probs = []
    for i, line in enumerate(lines[1:], 1):
        rank, rest = line.strip().split(". ", 1)
        name, pct = rest.rsplit("  ", 1)
        assert int(rank) == i and name in CLASSES and pct.endswith("%")
        probs.append(float(pct[:-1]) / 100)
    assert probs == sorted(probs, reverse=True)
    assert sum(probs) <= 1 + 5e-3  # printed with 0.1% rounding


def test_json_matches_model(ckpt, good, capsys):
    rc, out, _ = run_main([good, "--checkpoint", ckpt, "--json", "--topk", "3"], capsys)
    assert rc == 0
    res = json.loads(out)
    assert res["model"] == str(ckpt) and res["errors"] == []
    (r,) = res["predictions"]
    top = r["top"]
    assert len(top) == 3 and all(t["class"] == CLASSES[t["index"]] for t in top)
    assert sum(t["probability"] for t in top) <= 1 + 1e-6
    # identical to the unfused checkpoint model fed by load_image (the training preprocessing)
    c = runs.load_checkpoint(ckpt)
    prep = images.Preprocess.from_dict(c["preprocess"])
    x = augment.BatchTransform(prep, None, None)(images.load_image(str(good), prep)[None], train=False)
    with torch.no_grad():
        p = runs.model_from_checkpoint(c)(x).softmax(1)[0]
    assert [t["index"] for t in top] == p.topk(3).indices.tolist()
    assert [t["probability"] for t in top] == pytest.approx(p.topk(3).values.tolist(), abs=1e-4)


def test_folder_and_topk_larger_than_classes(ckpt, tmp_path, capsys):
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    car_image(folder / "a.jpg")
    car_image(folder / "sub" / "b.png")
    (folder / "notes.txt").write_text("not an image")
    rc, out, err = run_main([folder, "--checkpoint", ckpt, "--json", "--topk", "50"], capsys)
    assert rc == 0, err
    preds = json.loads(out)["predictions"]
    assert sorted(Path(p["file"]).name for p in preds) == ["a.jpg", "b.png"]
    assert all(len(p["top"]) == len(CLASSES) for p in preds)
    assert all(sum(t["probability"] for t in p["top"]) == pytest.approx(1, abs=1e-4) for p in preds)


def test_newest_checkpoint_used(tmp_path, good, capsys, monkeypatch):
    old = make_checkpoint(tmp_path / "runs" / "old" / "best.pt", seed=1)
    make_checkpoint(tmp_path / "runs" / "new" / "best.pt", seed=2)
    os.utime(old, (1e9, 1e9))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(runs, "REPO", tmp_path)
    rc, out, err = run_main([good], capsys)
    assert rc == 0 and "runs/new/best.pt" in err and "old" not in err


def test_no_checkpoint_says_how_to_train(tmp_path, good, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(runs, "REPO", tmp_path)
    rc, out, err = run_main([good], capsys)
    assert rc == 2 and out == ""
    assert err.startswith("error:") and "train.py" in err and len(err.strip().splitlines()) == 1


def test_bbox_crops_first(tmp_path, capsys):
    """--bbox on a crop-trained model equals predicting the cropped image itself."""
    ck = make_checkpoint(tmp_path / "crop.pt", crop_bbox=True)
    big = car_image(tmp_path / "big.png", size=(200, 150))
    Image.open(big).crop((40, 30, 160, 120)).save(tmp_path / "crop.png")
    rc, out, _ = run_main([big, "--checkpoint", ck, "--bbox", "40,30,160,120", "--json"], capsys)
    assert rc == 0
    with_box = json.loads(out)["predictions"][0]["top"]
    rc, out, err = run_main([tmp_path / "crop.png", "--checkpoint", ck, "--json"], capsys)
    assert rc == 0 and "--bbox" in err  # reminded that a crop model wants a box
    cropped = json.loads(out)["predictions"][0]["top"]
    assert [t["index"] for t in with_box] == [t["index"] for t in cropped]
    assert [t["probability"] for t in with_box] == pytest.approx([t["probability"] for t in cropped], abs=2e-2)


def test_the_checkpoints_test_crop_is_applied(tmp_path, capsys):
    """A model trained with --test-crop 0.5 sees the central half of each side: predicting a photo equals
    predicting that centre, cut out beforehand, with a whole-image model of the same weights."""
    centre_model = make_checkpoint(tmp_path / "centre.pt", test_crop=0.5)
    whole_model = make_checkpoint(tmp_path / "whole.pt")
    big = car_image(tmp_path / "big.png", size=(128, 128))
    Image.open(big).crop((32, 32, 96, 96)).save(tmp_path / "centre.png")
    tops = []
    for image, model in ((big, centre_model), (tmp_path / "centre.png", whole_model), (big, whole_model)):
        rc, out, err = run_main([image, "--checkpoint", model, "--json", "--topk", "7"], capsys)
        assert rc == 0, err
        tops.append({t["index"]: t["probability"] for t in json.loads(out)["predictions"][0]["top"]})
    # (a random model's probabilities are all near 1/7, so the gap is compared, not the values)
    same = max(abs(tops[0][k] - tops[1][k]) for k in tops[0])
    other = max(abs(tops[0][k] - tops[2][k]) for k in tops[0])  # the whole photo is another input
    assert same < 1e-6 and other > 100 * max(same, 1e-7), (same, other)


@pytest.mark.parametrize("bad", ["1,2,3", "a,b,c,d", "10,10,5,20"])
def test_bad_bbox_option(ckpt, good, capsys, bad):
    rc, out, err = run_main([good, "--checkpoint", ckpt, "--bbox", bad], capsys)
    assert rc == 2 and err.startswith("error: --bbox") and out == ""


# ---------------------------------------------------------------------------------------------- bad inputs

def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def bomb_png(path: Path, side: int = 100_000) -> Path:
    """A valid PNG header announcing side x side pixels (1e10: far beyond any photo) with a tiny body."""
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)  # 8-bit grayscale
    body = zlib.compress(b"\x00" * (side + 1))  # one scanline; a decoder would want side of them
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", body)
                     + _png_chunk(b"IEND", b""))
    return path


def make_bad(kind: str, tmp: Path) -> Path:
    if kind == "missing":
        return tmp / "does_not_exist.jpg"
    if kind == "empty_dir":
        d = tmp / "no_images"
        d.mkdir()
        (d / "readme.txt").write_text("nothing here")
        return d
    if kind == "text_as_jpg":
        p = tmp / "text.jpg"
        p.write_text("this is not a JPEG\n" * 20)
        return p
    if kind == "truncated_jpeg":
        full = car_image(tmp / "full.jpg", size=(320, 240), quality=95).read_bytes()
        p = tmp / "truncated.jpg"
        p.write_bytes(full[: len(full) // 2])
        (tmp / "full.jpg").unlink()
        return p
    if kind == "one_pixel":
        p = tmp / "one.png"
        Image.new("RGB", (1, 1), (200, 10, 10)).save(p)
        return p
    if kind == "png16":
        p = tmp / "deep.png"
        arr = (np.arange(120 * 160, dtype=np.uint32).reshape(120, 160) * 3 % 65536).astype(np.uint16)
        Image.fromarray(arr).save(p)
        assert Image.open(p).mode.startswith("I")
        return p
    if kind == "cmyk_jpeg":
        return car_image(tmp / "cmyk.jpg", mode="CMYK")
    if kind == "alpha_png":
        p = car_image(tmp / "alpha.png", mode="RGBA")
        assert Image.open(p).mode == "RGBA"
        return p
    if kind == "bomb":
        return bomb_png(tmp / "bomb.png")
    raise AssertionError(kind)


MUST_FAIL = ["missing", "empty_dir", "text_as_jpg", "truncated_jpeg", "bomb"]
EITHER = ["one_pixel", "png16", "cmyk_jpeg", "alpha_png"]  # a prediction is as good as a clear error


def check_outcome(kind: str, bad: Path, res: dict, err: str) -> None:
    err_lines = [line for line in err.splitlines() if line.startswith(f"error: {bad}: ")]
    predicted = [p for p in res["predictions"] if p["file"] == str(bad)]
    assert "Traceback" not in err
    if kind in MUST_FAIL:
        assert len(err_lines) == 1 and not predicted, (kind, err)
        assert len(err_lines[0]) > len(f"error: {bad}: ") + 3  # a reason is given
    else:
        assert len(err_lines) + len(predicted) == 1, (kind, err, predicted)
        if predicted:
            assert all(t["class"] in CLASSES for t in predicted[0]["top"])


@pytest.mark.parametrize("kind", MUST_FAIL + EITHER)
def test_bad_input_spares_the_others(kind, ckpt, tmp_path, capsys):
    good_a = car_image(tmp_path / "a.jpg")
    bad = make_bad(kind, tmp_path)
    good_b = car_image(tmp_path / "b.png")
    rc, out, err = run_main([good_a, bad, good_b, "--checkpoint", ckpt, "--json"], capsys)
    res = json.loads(out)
    assert {p["file"] for p in res["predictions"]} >= {str(good_a), str(good_b)}
    check_outcome(kind, bad, res, err)
    assert rc == (2 if res["errors"] else 0)


def test_all_bad_inputs_cli(ckpt, tmp_path):
    """The real command line: one error line per bad file, no traceback, exit status 2, good ones printed."""
    bads = {}
    for kind in MUST_FAIL + EITHER:
        d = tmp_path / kind
        d.mkdir()
        bads[kind] = make_bad(kind, d)
    good = car_image(tmp_path / "good.jpg")
    p = subprocess.run([sys.executable, str(REPO / "predict.py"), str(good), *map(str, bads.values()),
                        "--checkpoint", str(ckpt), "--json"], capture_output=True, text=True, env=ENV1,
                       timeout=120)
    assert p.returncode == 2, p.stderr
    res = json.loads(p.stdout)
    assert str(good) in {r["file"] for r in res["predictions"]}
    for kind, bad in bads.items():
        check_outcome(kind, bad, res, p.stderr)
    stray = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(stray) == len(res["errors"])


# ---------------------------------------------------------------------------------------------- checkpoints

class Payload:
    """Unpickling this calls open(marker, 'w'): the marker file appears if code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_checkpoint_refused(tmp_path, good):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"format": "ghostcars-v1", "arch": "ghostnet", "model": Payload(marker)}, evil)
    torch.load(evil, weights_only=False)  # the payload is real: without weights_only it runs
    assert marker.exists()
    marker.unlink()
    p = subprocess.run([sys.executable, str(REPO / "predict.py"), str(good), "--checkpoint", str(evil)],
                       capture_output=True, text=True, env=ENV1, timeout=120)
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.startswith("error:") and "Traceback" not in p.stderr
    assert "weights_only" in p.stderr or "refus" in p.stderr.lower()
    assert not marker.exists(), "the checkpoint's payload ran"


@pytest.mark.parametrize("case", ["arch", "classes", "preprocess", "not_a_checkpoint"])
def test_unfitting_checkpoint_refused(case, tmp_path, good, capsys):
    path = make_checkpoint(tmp_path / "c.pt")
    c = torch.load(path, weights_only=True)
    if case == "arch":
        c["arch"] = "no_such_net"
    elif case == "classes":
        c["num_classes"] = len(CLASSES) + 1
        c["class_names"] = CLASSES + ["extra"]
    elif case == "preprocess":
        del c["preprocess"]["mean"]
    torch.save(c, path)
    if case == "not_a_checkpoint":
        path.write_text("hello")
    rc, out, err = run_main([good, "--checkpoint", path], capsys)
    assert rc == 2 and out == "" and err.startswith("error:") and len(err.strip().splitlines()) == 1
    assert str(path) in err
    expect = {"arch": "no_such_net", "classes": "class", "preprocess": "mean", "not_a_checkpoint": "checkpoint"}
    assert expect[case] in err


# ---------------------------------------------------------------------------------------------- ONNX

def _tiny_onnx(path: Path, meta: dict[str, str] | None) -> Path:
    """A tiny exported classifier with the metadata contract of export.py (7 classes, 64 px)."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=4), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(8, len(CLASSES))).eval()
    import contextlib
    import io
    import warnings
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(net, (torch.zeros(1, 3, IMG, IMG),), dynamo=True, input_names=["images"],
                                 output_names=["logits"], external_data=False, verbose=False)
    proto = prog.model_proto
    if meta:
        onnx.helper.set_model_props(proto, meta)
    onnx.save(proto, str(path))
    return path


def test_onnx_model(tmp_path, good, capsys):
    pytest.importorskip("onnxruntime")
    prep = images.Preprocess(img_size=IMG)
    meta = {"class_names": json.dumps(CLASSES), "preprocess": json.dumps(prep.to_dict()), "arch": "tiny"}
    f = _tiny_onnx(tmp_path / "m.onnx", meta)
    rc, out, err = run_main([good, good, "--model", f, "--json"], capsys)
    assert rc == 0, err
    preds = json.loads(out)["predictions"]
    assert len(preds) == 2 and all(len(p["top"]) == 5 and p["top"][0]["class"] in CLASSES for p in preds)
    assert sum(t["probability"] for t in preds[0]["top"]) <= 1 + 1e-6
    # metadata missing -> one clear line
    bare = _tiny_onnx(tmp_path / "bare.onnx", None)
    rc, out, err = run_main([good, "--model", bare], capsys)
    assert rc == 2 and err.startswith("error:") and "metadata" in err


def test_onnx_without_onnxruntime(tmp_path, good, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    rc, out, err = run_main([good, "--model", tmp_path / "m.onnx"], capsys)
    assert rc == 2 and "pip install onnxruntime" in err and len(err.strip().splitlines()) == 1
