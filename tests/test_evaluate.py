"""evaluate.py: metrics agree with a plain recount of predictions.csv, efficiency, --compare, refusals."""
import csv
import json
import math
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

import augment
import data
import images
import evaluate
import model as M
import runs

REPO = Path(__file__).resolve().parents[1]
ENV1 = {**os.environ, "OMP_NUM_THREADS": "1"}  # see one_thread()
IMG = 64  # small input: the whole file stays fast on 2 shared cores


pytestmark = pytest.mark.usefixtures("one_thread")


def make_checkpoint(path: Path, class_names: list[str], img_size: int = IMG, arch: str = "ghostnet",
                    config: dict | None = None, seed: int = 0, **prep_options) -> Path:
    """A checkpoint in the shared format, written directly (no training needed).

    Random weights, with the BN running statistics jittered so the predictions differ between
    images and classes instead of being nearly uniform.
    """
    prep = images.Preprocess(img_size=img_size, **prep_options)
    torch.manual_seed(seed)
    net = M.build_model(arch, len(class_names), in_channels=prep.channels)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    ckpt = {"format": "ghostcars-v1", "arch": arch, "num_classes": len(class_names),
            "class_names": list(class_names),
            "model_options": {"out_channels": 320, "dropout": 0.2, "in_channels": prep.channels, "width": 1.0},
            "preprocess": prep.to_dict(), "model": net.state_dict(), "epoch": 3,
            "best": {"val_acc": 0.5, "epoch": 2, "min_val_loss": 1.5, "min_val_loss_epoch": 2},
            "config": dict(config or {})}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, path)
    return path


class Payload:
    """Unpickling this calls open(marker, 'w'): proof that code ran if the marker file appears."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def make_malicious(path: Path, marker: Path) -> Path:
    torch.save({"format": "ghostcars-v1", "arch": "ghostnet", "model": Payload(marker)}, path)
    return path


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    return Path(data.make_demo_dataset(root / "cars", num_classes=6, train_per_class=6, test_per_class=5, seed=0))


@pytest.fixture(scope="module")
def ckpt(demo, tmp_path_factory) -> Path:
    spec = data.find_dataset(demo)
    run = tmp_path_factory.mktemp("runs") / "tiny"
    return make_checkpoint(run / "best.pt", spec.class_names, config={"val_split": 0.25, "seed": 3})


def read_predictions(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def read_confusion(path: Path) -> tuple[list[str], list[list[int]]]:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    names = rows[0][1:]
    assert [r[0] for r in rows[1:]] == names
    return names, [[int(v) for v in r[1:]] for r in rows[1:]]


def check_against_recount(out_dir: Path, m: dict, class_names: list[str], suffix: str = "") -> None:
    """Every figure of `m` recomputed from predictions.csv alone; confusion.csv and the worst list with it.
    suffix: "" for the test split, "_val" / "_train" for the others."""
    rows = read_predictions(out_dir / f"predictions{suffix}.csv")
    assert len(rows) == m["images"] > 0
    for r in rows:
        assert r["true"] in class_names and r["predicted"] in class_names
        assert 0 < float(r["probability"]) <= 1 + 1e-6
        assert float(r["true_probability"]) <= float(r["probability"]) + 1e-6
        assert (r["true"] == r["predicted"]) == (r["true_rank"] == "1")
    n = len(rows)
    assert m["top1"] == pytest.approx(sum(r["true"] == r["predicted"] for r in rows) / n)
    assert m["top5"] == pytest.approx(sum(int(r["true_rank"]) <= 5 for r in rows) / n)
    assert m["loss"] == pytest.approx(sum(-math.log(max(float(r["true_probability"]), 1e-12)) for r in rows) / n,
                                      rel=1e-4)
    pairs = Counter((r["true"], r["predicted"]) for r in rows)
    support = Counter(r["true"] for r in rows)
    acc = {c: pairs[(c, c)] / support[c] for c in support}
    assert m["mean_class_acc"] == pytest.approx(sum(acc.values()) / len(acc))

    names, conf = read_confusion(out_dir / f"confusion{suffix}.csv")
    assert names == class_names
    for i, t in enumerate(names):
        for j, p in enumerate(names):
            assert conf[i][j] == pairs[(t, p)], (t, p)

    worst = m["worst"]
    assert len(worst) == min(10, len(acc))
    assert [w["accuracy"] for w in worst] == sorted(w["accuracy"] for w in worst)
    listed = {w["class"] for w in worst}
    cutoff = max(w["accuracy"] for w in worst)
    assert all(a >= cutoff - 1e-12 for c, a in acc.items() if c not in listed)  # nothing worse was left out
    for w in worst:
        assert w["accuracy"] == pytest.approx(acc[w["class"]])
        assert w["support"] == support[w["class"]]
        others = {p: k for (t, p), k in pairs.items() if t == w["class"] and p != t}
        if others:
            assert w["confused_count"] == max(others.values())
            assert others[w["confused_with"]] == w["confused_count"]
        else:
            assert w["confused_with"] is None


def test_metrics_equal_recount(ckpt, demo, tmp_path, capsys):
    out = tmp_path / "eval.json"
    rc = evaluate.main(["--checkpoint", str(ckpt), "--data", str(demo), "--json", str(out), "--no-efficiency",
                        "--cache-dir", str(tmp_path / "cache")])
    assert rc == 0
    report = json.loads(out.read_text())
    m = report["metrics"]
    spec = data.find_dataset(demo)
    assert m["split"] == "test" and m["images"] == len(spec.test)
    check_against_recount(ckpt.parent, m, spec.class_names)
    text = capsys.readouterr().out
    assert "top-1" in text and "ten worst classes" in text and "confusion.csv" in text
    try:
        import matplotlib  # noqa: F401
        assert (ckpt.parent / "confusion.png").stat().st_size > 0
    except ImportError:
        pass


def test_val_split_follows_the_checkpoints_val_seed(demo, tmp_path):
    """A run with --val-seed drew its hold-out with that seed, not --seed: --split val draws the same one
    (runs of several seeds compared on one validation split)."""
    spec = data.find_dataset(demo)
    ck = make_checkpoint(tmp_path / "run" / "best.pt", spec.class_names,
                         config={"val_split": 0.25, "seed": 3, "val_seed": 5})
    out_dir = tmp_path / "out"
    rc = evaluate.main(["--checkpoint", str(ck), "--data", str(demo), "--split", "val", "--json",
                        str(tmp_path / "e.json"), "--no-efficiency", "--out-dir", str(out_dir),
                        "--cache-dir", str(tmp_path / "cache")])
    assert rc == 0
    names = lambda recs: sorted(Path(r.path).name for r in recs)  # noqa: E731
    want = names(data.make_splits(spec, val_split=0.25, seed=5)["val"])
    assert want != names(data.make_splits(spec, val_split=0.25, seed=3)["val"])  # the seeds draw differently
    assert sorted(Path(r["file"]).name for r in read_predictions(out_dir / "predictions_val.csv")) == want
    assert data.holdout_seed({"seed": 3}) == 3 and data.holdout_seed({"seed": 3, "val_seed": 0}) == 0


def test_val_split_is_the_checkpoints(ckpt, demo, tmp_path):
    """--split val uses the checkpoint's --val-split/--seed, so it is the hold-out the run selected on."""
    out_dir = tmp_path / "out"
    out = tmp_path / "eval.json"
    rc = evaluate.main(["--checkpoint", str(ckpt), "--data", str(demo), "--split", "val", "--json", str(out),
                        "--no-efficiency", "--out-dir", str(out_dir), "--cache-dir", str(tmp_path / "cache")])
    assert rc == 0
    m = json.loads(out.read_text())["metrics"]
    spec = data.find_dataset(demo)
    val = data.make_splits(spec, val_split=0.25, seed=3)["val"]
    assert m["images"] == len(val) and (m["val_split"], m["seed"]) == (0.25, 3)
    got = sorted(Path(r["file"]).name for r in read_predictions(out_dir / "predictions_val.csv"))
    assert got == sorted(Path(r.path).name for r in val)
    check_against_recount(out_dir, m, spec.class_names, suffix="_val")
    # the test split into the same folder keeps the val files (it once overwrote them)
    rc = evaluate.main(["--checkpoint", str(ckpt), "--data", str(demo), "--json", str(tmp_path / "test.json"),
                        "--no-efficiency", "--out-dir", str(out_dir), "--cache-dir", str(tmp_path / "cache")])
    assert rc == 0
    m_test = json.loads((tmp_path / "test.json").read_text())["metrics"]
    assert m_test["images"] == len(spec.test) != m["images"]
    check_against_recount(out_dir, m, spec.class_names, suffix="_val")
    check_against_recount(out_dir, m_test, spec.class_names)


def test_tta_averages_flipped(ckpt, demo, tmp_path):
    """--tta = mean of the softmax of the image and of its mirror image, from the BN-folded model."""
    out = tmp_path / "eval.json"
    rc = evaluate.main(["--checkpoint", str(ckpt), "--data", str(demo), "--tta", "--json", str(out),
                        "--no-efficiency", "--out-dir", str(tmp_path), "--cache-dir", str(tmp_path / "cache")])
    assert rc == 0
    m = json.loads(out.read_text())["metrics"]
    assert m["tta"] is True
    check_against_recount(tmp_path, m, data.find_dataset(demo).class_names)
    # recompute one image by hand
    c = runs.load_checkpoint(ckpt)
    prep = images.Preprocess.from_dict(c["preprocess"])
    net = M.fuse_for_inference(runs.model_from_checkpoint(c))
    row = read_predictions(tmp_path / "predictions.csv")[0]
    img = images.load_image(str(Path(data.find_dataset(demo).root) / row["file"]), prep)
    x = augment.BatchTransform(prep, None, None)(img[None], train=False)
    with torch.no_grad():
        p = (net(x).softmax(1) + net(x.flip(3)).softmax(1)) / 2
    assert float(row["probability"]) == pytest.approx(p.max().item(), abs=1e-4)
    assert row["predicted"] == c["class_names"][p.argmax().item()]


def test_efficiency_without_checkpoint(tmp_path, capsys):
    out = tmp_path / "eff.json"
    rc = evaluate.main(["--arch", "ghostnet", "--img-size", str(IMG), "--num-classes", "10", "--json", str(out)])
    assert rc == 0
    e = json.loads(out.read_text())["efficiency"]
    net = M.build_model("ghostnet", 10)
    assert e["params"] == M.count_params(net)
    assert e["macs"] == M.count_macs(net, IMG)
    # the BN-folded weights: about the trained parameters (BN scale folded away, conv biases added)
    assert e["size_mb_fp16"] == pytest.approx(e["size_mb_fp32"] / 2)
    assert e["size_mb_fp32"] == pytest.approx(e["params"] * 4 / 2**20, rel=0.05)
    assert e["cpu"]["runs"] >= 30 and e["cpu"]["latency_ms"] > 0 and e["cpu"]["throughput"] > 0
    assert e["threads"] == torch.get_num_threads()
    text = capsys.readouterr().out
    assert " thread" in text and "multiply-adds" in text and "MB float16" in text


def test_compare_table(ckpt, tmp_path, capsys):
    run = ckpt.parent
    with open(run / "metrics.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "val_top5", "seconds",
                    "img_per_s"])
        w.writerow([1, 1e-3, 2.0, 0.3, 2.1, 0.25, 0.8, 1.0, 10])
        w.writerow([2, 1e-3, 1.0, 0.6, 1.1, 0.625, 0.9, 1.0, 10])
    out = tmp_path / "table.md"
    rc = evaluate.main(["--compare", "ghostnet", "mobilenet_v3_small", str(run), "--img-size", str(IMG),
                        "--runs", "3", "--out", str(out)])
    assert rc == 0
    table = out.read_text()
    assert table.strip() in capsys.readouterr().out
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| model")]
    assert len(rows) == 3
    assert rows[0].startswith("| ghostnet |") and rows[1].startswith("| mobilenet_v3_small |")
    assert "62.50%" in rows[2] and rows[0].rstrip().endswith("| - |")


def test_malicious_checkpoint_refused(tmp_path):
    marker = tmp_path / "pwned"
    bad = make_malicious(tmp_path / "evil.pt", marker)
    # the payload is real: loading without weights_only would run it
    torch.load(bad, weights_only=False)
    assert marker.exists()
    marker.unlink()
    p = subprocess.run([sys.executable, str(REPO / "evaluate.py"), "--checkpoint", str(bad), "--data", str(tmp_path)],
                       capture_output=True, text=True, env=ENV1, cwd=tmp_path, timeout=120)
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr
    assert p.stderr.startswith("error:") and ("weights_only" in p.stderr or "refus" in p.stderr.lower())
    assert not marker.exists(), "the checkpoint's payload ran"
    # the --compare path loads checkpoints too
    assert evaluate.main(["--compare", str(bad)]) == 2
    assert not marker.exists(), "the checkpoint's payload ran"


@pytest.mark.parametrize("case", ["arch", "classes", "preprocess"])
def test_unfitting_checkpoint_refused(case, demo, tmp_path, capsys):
    spec = data.find_dataset(demo)
    path = make_checkpoint(tmp_path / "c.pt", spec.class_names)
    c = torch.load(path, weights_only=True)
    if case == "arch":
        c["arch"] = "no_such_net"
    elif case == "classes":
        c["class_names"] = c["class_names"][:-1]
    else:
        del c["preprocess"]["img_size"]
    torch.save(c, path)
    rc = evaluate.main(["--checkpoint", str(path), "--data", str(demo), "--no-efficiency"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error:") and str(path) in err and len(err.strip().splitlines()) == 1
    assert {"arch": "no_such_net", "classes": "class", "preprocess": "img_size"}[case] in err


def test_dataset_of_other_classes_refused(demo, tmp_path, capsys):
    path = make_checkpoint(tmp_path / "c.pt", [f"Other {i}" for i in range(6)])
    rc = evaluate.main(["--checkpoint", str(path), "--data", str(demo), "--no-efficiency"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error:") and "class names" in err


def test_nothing_to_do(capsys):
    assert evaluate.main([]) == 2
    assert "error:" in capsys.readouterr().err


@pytest.mark.slow
def test_real_data_recount(real_data, tmp_path):
    spec = data.find_dataset(real_data)
    ckpt = make_checkpoint(tmp_path / "run" / "best.pt", spec.class_names)
    out = tmp_path / "eval.json"
    rc = evaluate.main(["--checkpoint", str(ckpt), "--data", str(real_data), "--json", str(out), "--no-efficiency",
                        "--cache-dir", str(tmp_path / "cache")])
    assert rc == 0
    m = json.loads(out.read_text())["metrics"]
    assert m["images"] == len(spec.test) - len(m["skipped"]) > 1000
    check_against_recount(ckpt.parent, m, spec.class_names)
    names, conf = read_confusion(ckpt.parent / "confusion.csv")
    assert len(names) == 196 and sum(map(sum, conf)) == m["images"]
