"""export.py: ONNX and torch.export (.pt2) files reproduce the PyTorch model, carry their preprocessing
and labels, run without the ghost_ext extension, and predict.py accepts the ONNX file.

Checkpoints are made here directly (build_model + a few SGD steps so BN statistics are not trivial) at
64 px, so every test stays a few seconds. ONNX tests skip without the [export] extra."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import augment
import data
import images
import export
import model as M
import predict
import runs

REPO = Path(__file__).resolve().parents[1]
IMG = 64
CLASSES = [f"Test Car {i} 2012" for i in range(7)]


def _has_onnx() -> bool:
    try:
        export.require_onnx()
        return True
    except export.ExportError:
        return False


needs_onnx = pytest.mark.skipif(not _has_onnx(), reason="needs the [export] extra: pip install onnx onnxscript onnxruntime")


@pytest.fixture(scope="module")
def image_dir(request, tmp_path_factory) -> Path:
    """A folder of a few images: real Stanford Cars photos when ../shared/data has them, else synthetic."""
    out = tmp_path_factory.mktemp("images")
    try:
        root = request.getfixturevalue("real_data")
        photos = sorted((root / "cars_test").glob("*.jpg"))[:6] or sorted(root.rglob("*.jpg"))[:6]
    except pytest.skip.Exception:
        photos = []
    if photos:
        for p in photos:
            (out / p.name).symlink_to(p)
        return out
    from PIL import Image
    g = torch.Generator().manual_seed(1)
    for i in range(6):
        low = torch.randint(0, 256, (3, 6, 8), generator=g, dtype=torch.uint8)
        arr = torch.nn.functional.interpolate(low[None].float(), size=(96, 128), mode="bilinear")[0]
        Image.fromarray(arr.clamp(0, 255).byte().permute(1, 2, 0).numpy()).save(out / f"synthetic_{i}.png")
    return out


def make_checkpoint(path: Path, arch: str, image_dir: Path, width: float = 1.0) -> Path:
    """A checkpoint in the contract's format after a few SGD steps on the test images (BN stats move)."""
    torch.manual_seed(0)
    opts = {"out_channels": 320, "dropout": 0.2, "in_channels": 3, "width": width}
    net = M.build_model(arch, len(CLASSES), ghost_op="torch", **opts)
    prep = images.Preprocess(img_size=IMG)
    files = sorted(image_dir.iterdir())
    u8 = torch.stack([images.load_image(str(f), prep) for f in files])
    x = augment.BatchTransform(prep, None, None)(u8, train=False)
    y = torch.arange(len(x)) % len(CLASSES)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    net.train()
    for _ in range(4):
        loss = torch.nn.functional.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    ckpt = {"format": "ghostcars-v1", "arch": arch, "num_classes": len(CLASSES), "class_names": CLASSES,
            "model_options": opts, "preprocess": prep.to_dict(), "model": net.state_dict(), "epoch": 1,
            "best": {"val_acc": 0.0, "epoch": 1, "min_val_loss": float(loss.detach()), "min_val_loss_epoch": 1},
            "config": {"arch": arch, "img_size": IMG}}
    torch.save(ckpt, path)
    return path


class _Checkpoints(dict):
    """arch -> checkpoint path, made on first use (a fast run never trains the mobilenet)."""

    def __init__(self, folder: Path, image_dir: Path):
        super().__init__()
        self.folder, self.image_dir = folder, image_dir

    def __missing__(self, arch: str) -> Path:
        width = 0.5 if arch == "ghostnet" else 1.0     # a small ghostnet: the test is about the export
        self[arch] = make_checkpoint(self.folder / f"{arch}.pt", arch, self.image_dir, width=width)
        return self[arch]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, image_dir) -> dict[str, Path]:
    return _Checkpoints(tmp_path_factory.mktemp("ckpt"), image_dir)


def reference_logits(ckpt_path: Path, image_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(normalized inputs, logits of the unfused float32 PyTorch model) on the test images."""
    ckpt = runs.load_checkpoint(ckpt_path)
    x, _ = export.verify_inputs(ckpt["preprocess"], [str(image_dir)], 8)
    with torch.no_grad():
        return x, runs.model_from_checkpoint(ckpt, ghost_op="torch").eval()(x)


def max_rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float(((got - ref).abs().amax(1) / ref.abs().amax(1)).max())


def check_metadata(meta: dict, ckpt_path: Path) -> None:
    ckpt = runs.load_checkpoint(ckpt_path)
    assert meta["class_names"] == ckpt["class_names"]
    assert meta["preprocess"] == ckpt["preprocess"]
    assert meta["arch"] == ckpt["arch"]
    assert int(meta["num_classes"]) == ckpt["num_classes"]


# ---------------------------------------------------------------------------------------------------- ONNX


@pytest.fixture(scope="module")
def ghost_onnx(ckpts, image_dir, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("onnx") / "ghostnet.onnx"
    info = export.export(ckpts["ghostnet"], "onnx", out, images=[str(image_dir)], runs=5, log=lambda s: None)
    return out, info


@needs_onnx
def test_ghostnet_onnx_matches_pytorch(ghost_onnx, ckpts, image_dir):
    import onnxruntime as ort
    out, info = ghost_onnx
    assert info["verify"]["ok"] and info["verify"]["max_rel"] <= export.TOL_FP32
    assert set(info["latency_ms"]) == {"pytorch", "onnxruntime", "threads"}
    x, ref = reference_logits(ckpts["ghostnet"], image_dir)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["images"] and [o.name for o in sess.get_outputs()] == ["logits"]
    got = torch.from_numpy(sess.run(["logits"], {"images": x.numpy()})[0])
    assert max_rel(got, ref) <= 1e-4
    assert torch.equal(got.argmax(1), ref.argmax(1))
    # metadata round trip, both through onnx and through onnxruntime (what an app sees)
    check_metadata(export.read_metadata(out), ckpts["ghostnet"])
    custom = sess.get_modelmeta().custom_metadata_map
    assert json.loads(custom["class_names"]) == CLASSES and custom["precision"] == "float32"


@needs_onnx
def test_ghostnet_onnx_standard_ops_without_extension(ghost_onnx, image_dir):
    """Only default-domain operators, and onnxruntime runs it in a process where neither ghost_ext nor
    torch can be imported."""
    import onnx
    out, _ = ghost_onnx
    proto = onnx.load(str(out))
    onnx.checker.check_model(proto, full_check=True)
    assert {n.domain for n in proto.graph.node} <= {"", "ai.onnx"}
    assert len(proto.functions) == 0
    assert {o.domain for o in proto.opset_import} <= {"", "ai.onnx"}
    ops = {n.op_type for n in proto.graph.node}
    assert "Conv" in ops and "Concat" in ops          # the ghost op became Conv + Concat (+ Slice)
    code = ("import sys; sys.modules['ghost_ext'] = None; sys.modules['torch'] = None\n"
            "import numpy as np, onnxruntime as ort\n"
            f"s = ort.InferenceSession({str(out)!r}, providers=['CPUExecutionProvider'])\n"
            f"y = s.run(['logits'], {{'images': np.zeros((3, 3, {IMG}, {IMG}), np.float32)}})[0]\n"
            "assert y.shape == (3, %d) and np.isfinite(y).all(); print('ok')" % len(CLASSES))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=out.parent, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


@needs_onnx
@pytest.mark.slow
def test_mobilenet_onnx_matches_pytorch(ckpts, image_dir, tmp_path):
    out = tmp_path / "mnv3.onnx"
    assert export.main([str(ckpts["mobilenet_v3_small"]), "--format", "onnx", "--out", str(out),
                        "--images", str(image_dir), "--runs", "5"]) == 0
    import onnxruntime as ort
    x, ref = reference_logits(ckpts["mobilenet_v3_small"], image_dir)
    got = torch.from_numpy(ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
                           .run(["logits"], {"images": x.numpy()})[0])
    assert max_rel(got, ref) <= 1e-4 and torch.equal(got.argmax(1), ref.argmax(1))
    check_metadata(export.read_metadata(out), ckpts["mobilenet_v3_small"])


@needs_onnx
@pytest.mark.slow
def test_onnx_fp16_batch1(ckpts, image_dir, tmp_path, capsys):
    """--fp16 halves the file, keeps float32 at the edges, stays within the stated fp16 tolerance;
    --batch 1 fixes the batch dimension."""
    import onnx
    out = tmp_path / "g16.onnx"
    assert export.main([str(ckpts["ghostnet"]), "--out", str(out), "--fp16", "--batch", "1",
                        "--images", str(image_dir), "--runs", "5"]) == 0
    assert "OK" in capsys.readouterr().out
    proto = onnx.load(str(out))
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_value == 1 and proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert proto.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in proto.graph.initializer)
    assert export.read_metadata(out)["precision"] == "float16"


def test_onnx_missing_extra_is_one_line(ckpts, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxscript", None)   # import of a None entry raises ImportError
    assert export.main([str(ckpts["ghostnet"]), "--format", "onnx"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "pip install onnx onnxscript onnxruntime" in err


@pytest.mark.parametrize("content", [None, b"not a checkpoint at all", b"PK\x03\x04truncated"])
def test_bad_checkpoint_is_one_line(tmp_path, capsys, content):
    path = tmp_path / "best.pt"
    if content is not None:
        path.write_bytes(content)
    assert export.main([str(path), "--format", "pt2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err


# ---------------------------------------------------------------------------------------------------- pt2


@pytest.mark.parametrize("arch", ["ghostnet", pytest.param("mobilenet_v3_small", marks=pytest.mark.slow)])
def test_pt2_matches_pytorch_and_loads_without_extension(arch, ckpts, image_dir, tmp_path):
    out = tmp_path / f"{arch}.pt2"
    info = export.export(ckpts[arch], "pt2", out, images=[str(image_dir)], runs=5, log=lambda s: None)
    assert info["verify"]["ok"]
    assert not any("ghost_ext" in t for t in info["op_types"])
    x, ref = reference_logits(ckpts[arch], image_dir)
    with torch.no_grad():
        got = torch.export.load(str(out)).module()(x)
    assert max_rel(got, ref) <= 1e-4 and torch.equal(got.argmax(1), ref.argmax(1))
    # metadata: the sidecar, and the copy inside the archive when the sidecar is gone
    check_metadata(export.read_metadata(out), ckpts[arch])
    export.sidecar_path(out).unlink()
    check_metadata(export.read_metadata(out), ckpts[arch])
    if arch == "ghostnet":                  # loads where ghost_ext (and this repo) cannot be imported
        code = ("import sys; sys.modules['ghost_ext'] = None; sys.modules['model'] = None\n"
                f"import torch; m = torch.export.load({str(out)!r}).module()\n"
                f"y = m(torch.zeros(2, 3, {IMG}, {IMG})); assert y.shape == (2, {len(CLASSES)}); print('ok')")
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
        assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_pte_matches_pytorch_and_predicts(ckpts, image_dir, tmp_path, capsys):
    """An ExecuTorch program lowered to XNNPACK: logits within 1e-4 relative of PyTorch's on real photos,
    standard operators only, and predict.py --model FILE.pte gives the checkpoint's answers."""
    import importlib.util
    if importlib.util.find_spec("executorch") is None:
        msg = "executorch is not installed (pip install executorch==1.5.1 with a constraint keeping torch)"
        print(f"skipped: {msg}")
        pytest.skip(msg)
    out = tmp_path / "ghostnet.pte"
    info = export.export(ckpts["ghostnet"], "pte", out, images=[str(image_dir)], runs=3, log=lambda s: None)
    assert info["verify"]["ok"] and info["verify"]["max_rel"] <= 1e-4
    assert not any("ghost_ext" in t for t in info["op_types"])
    check_metadata(export.read_metadata(out), ckpts["ghostnet"])
    x, ref = reference_logits(ckpts["ghostnet"], image_dir)
    got = export.load_runner(out, "pte", threads=1)(x)
    assert max_rel(got, ref) <= 1e-4 and torch.equal(got.argmax(1), ref.argmax(1))
    photo = sorted(image_dir.glob("*"))[0]
    assert predict.main([str(photo), "--model", str(out), "--json"]) == 0
    pte = json.loads(capsys.readouterr().out)["predictions"][0]["top"]
    assert predict.main([str(photo), "--checkpoint", str(ckpts["ghostnet"]), "--json"]) == 0
    pt = json.loads(capsys.readouterr().out)["predictions"][0]["top"]
    assert [t["class"] for t in pte] == [t["class"] for t in pt]
    assert all(abs(a["probability"] - b["probability"]) < 1e-4 for a, b in zip(pte, pt))


# ---------------------------------------------------------------------------------------------------- predict.py




@needs_onnx
def test_predict_onnx_same_top5_as_checkpoint(ghost_onnx, ckpts, image_dir, capsys):
    import predict
    files = [str(p) for p in sorted(image_dir.iterdir())[:4]]
    assert predict.main(files + ["--checkpoint", str(ckpts["ghostnet"]), "--device", "cpu", "--json"]) == 0
    a = json.loads(capsys.readouterr().out)
    assert predict.main(files + ["--model", str(ghost_onnx[0]), "--json"]) == 0
    b = json.loads(capsys.readouterr().out)
    assert len(a["predictions"]) == len(files) == len(b["predictions"])
    for ra, rb in zip(a["predictions"], b["predictions"]):
        assert [t["class"] for t in ra["top"]] == [t["class"] for t in rb["top"]]
        assert len(ra["top"]) == 5
        for ta, tb in zip(ra["top"], rb["top"]):
            assert abs(ta["probability"] - tb["probability"]) < 1e-4
    # and the text output an app user reads is the same too
    assert predict.main(files[:1] + ["--checkpoint", str(ckpts["ghostnet"]), "--device", "cpu"]) == 0
    text_ckpt = capsys.readouterr().out
    assert predict.main(files[:1] + ["--model", str(ghost_onnx[0])]) == 0
    assert capsys.readouterr().out == text_ckpt


@needs_onnx
@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_predict_corrupt_onnx_is_one_line(damage, ghost_onnx, image_dir, tmp_path):
    good = ghost_onnx[0].read_bytes()
    bad = tmp_path / "bad.onnx"
    bad.write_bytes({"truncated": good[: len(good) // 2], "garbage": b"\x08\x07garbage" * 50, "empty": b""}[damage])
    img = str(sorted(image_dir.iterdir())[0])
    if damage == "truncated":              # the real command line, so a traceback would show
        r = subprocess.run([sys.executable, "predict.py", img, "--model", str(bad)], capture_output=True,
                           text=True, cwd=REPO, timeout=300)
        rc, err = r.returncode, r.stderr.strip()
    else:
        import contextlib
        import io
        import predict
        buf = io.StringIO()
        with contextlib.redirect_stderr(buf):
            rc = predict.main([img, "--model", str(bad)])
        err = buf.getvalue().strip()
    assert rc == 2
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err


@needs_onnx
def test_onnx_timing_session_does_not_spin():
    # a spinning onnxruntime pool steals the cores from the PyTorch call timed after it (round robin)
    so = export.onnx_session_options(2)
    assert so.intra_op_num_threads == 2
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == "0"


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["onnx", "pte"])
def test_int8_is_a_quarter_of_the_file_and_keeps_the_answers(fmt, tmp_path, real_data):
    """--int8 on a run of the real photos (calibrated on its training images): at most a third of the float32
    file, and on real photos no real top-1 change against float32: an untrained net's logits are close
    together, so only flips of near-ties (top-2 margin within twice the int8 error) are allowed; the accuracy
    cost on a trained model is bench_mobile.py's to measure."""
    import importlib.util
    if fmt == "pte" and importlib.util.find_spec("executorch") is None:
        pytest.skip("executorch is not installed (pip install executorch==1.5.1 with a constraint keeping torch)")
    if fmt == "onnx" and importlib.util.find_spec("onnxruntime") is None:
        pytest.skip("onnxruntime is not installed")
    import test_predict
    ck = test_predict.make_checkpoint(tmp_path / "best.pt", class_names=data.find_dataset(real_data).class_names,
                                      img_size=64)
    c = torch.load(ck, weights_only=True)
    c["config"] = {"run": {"data": str(real_data)}}  # the run whose training images calibrate
    torch.save(c, ck)
    f32 = export.export(ck, fmt, tmp_path / f"m.{fmt}", verify=False, log=lambda s: None)
    q = export.export(ck, fmt, tmp_path / f"m.int8.{fmt}", int8=True, calib_count=16, images=[str(real_data)],
                      runs=2, log=lambda s: None)
    assert q["size_mb"] <= f32["size_mb"] / 3
    assert q["verify"]["ok"] and q["verify"]["real_flips"] == 0 and q["verify"]["max_rel"] <= export.TOL_INT8
