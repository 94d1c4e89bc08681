"""Metrics of a checkpoint on a split, efficiency figures, and a table across architectures.

    python evaluate.py --checkpoint runs/<name>/best.pt --data data [--split test|val|train] [--tta] [--json FILE]
    python evaluate.py --arch ghostnet [--img-size 227]            # efficiency only, no checkpoint needed
    python evaluate.py --compare ghostnet mobilenet_v3_large runs/<name> [--out table.md]

Accuracy comes from the checkpoint's own preprocessing and, for "val", from the checkpoint's own
--val-split/--val-seed, so "val" here is the same hold-out the run was selected on. Efficiency is always
measured on the BN-folded model (model.fuse_for_inference), which is what prediction runs.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import data
import batches
import images
import model as M
import tracking
from runs import CheckpointError, config_of, load_checkpoint, model_from_checkpoint, read_metrics
from common import cpu_name, pick_device, time_models

DEFAULT_CLASSES = 196  # Stanford Cars; only used when an architecture is measured without a checkpoint


# ----------------------------------------------------------------------------------------------
# efficiency

def static_figures(net: torch.nn.Module, img_size: int | tuple[int, int] | images.ImageSize,
                   in_channels: int) -> dict[str, Any]:
    """Parameters (as trained), weight size of the BN-folded model and multiply-adds."""
    size = images.ImageSize.of(img_size)
    fused = M.fuse_for_inference(net)
    # size of what inference ships: the folded model's tensors (BN gone, its scale folded in the conv)
    n_fused = sum(t.numel() for t in fused.state_dict().values() if t.is_floating_point())
    return {
        "params": M.count_params(net),
        "size_mb_fp32": n_fused * 4 / 2**20,
        "size_mb_fp16": n_fused * 2 / 2**20,
        "macs": M.count_macs(net, size.hw, in_channels),
        "img_size": size.json(),  # S or [height, width], whichever form came in
        "in_channels": in_channels,
    }


def speed_figures(fused: dict[str, torch.nn.Module], img_size: dict[str, int | tuple[int, int] | images.ImageSize],
                  in_channels: dict[str, int],
                  device: torch.device, runs: int = 30, batch: int = 32, batch_runs: int | None = None,
                  desc: str = "") -> dict[str, dict[str, float]]:
    """Latency at batch 1 (median of `runs`) and throughput at `batch` for already-fused models on `device`."""
    batch_runs = batch_runs or max(5, runs // 3)
    mods = {n: m.to(device).eval() for n, m in fused.items()}
    hw = {n: images.ImageSize.of(img_size[n]).hw for n in mods}
    x1 = {n: torch.randn(1, in_channels[n], *hw[n], device=device) for n in mods}
    xb = {n: torch.randn(batch, in_channels[n], *hw[n], device=device) for n in mods}
    t1 = time_models(mods, x1, runs, desc=f"{desc} batch 1".strip())
    tb = time_models(mods, xb, batch_runs, warmup=2, desc=f"{desc} batch {batch}".strip())
    out = {}
    for n in mods:
        lat = statistics.median(t1[n])
        out[n] = {"latency_ms": lat * 1e3, "latency_ms_min": min(t1[n]) * 1e3, "runs": len(t1[n]),
                  "throughput": batch / statistics.median(tb[n]), "batch": batch, "batch_runs": len(tb[n])}
    return out


def efficiency(net: torch.nn.Module, img_size: int | tuple[int, int] | images.ImageSize, in_channels: int = 3,
               runs: int = 30, cuda: bool = True) -> dict[str, Any]:
    """Everything of point 2 for one model: static figures, CPU (and CUDA when present) speed."""
    fig = static_figures(net, img_size, in_channels)
    fused = M.fuse_for_inference(net)
    fig["threads"] = torch.get_num_threads()
    fig["cpu"] = speed_figures({"m": fused}, {"m": img_size}, {"m": in_channels}, torch.device("cpu"),
                               runs=runs, desc="cpu")["m"]
    if cuda and torch.cuda.is_available():
        fig["cuda_device"] = torch.cuda.get_device_name(0)
        fig["cuda"] = speed_figures({"m": M.fuse_for_inference(net)}, {"m": img_size}, {"m": in_channels},
                                    torch.device("cuda"), runs=max(runs, 50), desc="cuda")["m"]
    return fig


def _threads(n: int) -> str:
    return f"{n} thread{'s' if n != 1 else ''}"


def format_efficiency(name: str, fig: dict[str, Any]) -> str:
    lines = [f"efficiency of {name} at {images.ImageSize.of(fig['img_size']).text}x{fig['in_channels']} (BN folded):",
             f"  parameters        {fig['params']:,} ({fig['params'] / 1e6:.2f} M)",
             f"  weights           {fig['size_mb_fp32']:.2f} MB float32, {fig['size_mb_fp16']:.2f} MB float16",
             f"  multiply-adds     {fig['macs'] / 1e6:.1f} M"]
    c = fig["cpu"]
    lines.append(f"  CPU ({cpu_name()}, {_threads(fig['threads'])}) latency at batch 1: {c['latency_ms']:.2f} ms "
                 f"(median of {c['runs']}), throughput at batch {c['batch']}: {c['throughput']:.1f} img/s")
    if "cuda" in fig:
        g = fig["cuda"]
        lines.append(f"  CUDA ({fig['cuda_device']}) latency at batch 1: {g['latency_ms']:.2f} ms "
                     f"(median of {g['runs']}), throughput at batch {g['batch']}: {g['throughput']:.1f} img/s")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# accuracy

@torch.inference_mode()
def run_split(net: torch.nn.Module, decoded: "images.Decoded", prep: "images.Preprocess", device: torch.device,
              batch_size: int = 64, tta: bool = False) -> torch.Tensor:
    """Class probabilities (N, K) in decoded order; --tta averages them with the mirrored image's."""
    loader = batches.BatchLoader(decoded, batch_size, shuffle=False, drop_last=False, device=device)
    from tqdm import tqdm
    probs = []
    for u8, _ in tqdm(loader, desc="evaluate", leave=False, file=sys.stderr):
        x = prep.to_model_input(u8)
        p = F.softmax(net(x).float(), dim=1)
        if tta:
            p = (p + F.softmax(net(x.flip(3)).float(), dim=1)) / 2
        probs.append(p.cpu())
    return torch.cat(probs) if probs else torch.zeros(0, 0)


def metrics_from(probs: torch.Tensor, labels: torch.Tensor, class_names: list[str]) -> dict[str, Any]:
    """top-1/top-5, mean per-class accuracy, loss (plain cross-entropy of the probabilities, no label
    smoothing, so it can be recounted from predictions.csv), confusion matrix, ten worst classes."""
    k = len(class_names)
    n = len(labels)
    if n == 0:
        raise ValueError("no images to evaluate")
    # rank of the true class from a stable descending sort: rank 1 is exactly the argmax prediction,
    # so top-1, top-5 and predictions.csv agree even when probabilities tie
    order = torch.sort(probs, dim=1, descending=True, stable=True).indices
    pred = order[:, 0]
    rank = (order == labels[:, None]).int().argmax(1) + 1
    true_p = probs.gather(1, labels[:, None]).squeeze(1)
    conf = torch.zeros(k, k, dtype=torch.long)
    conf.index_put_((labels, pred), torch.ones_like(labels), accumulate=True)
    support = conf.sum(1)
    per_class = conf.diag().double() / support.clamp(min=1)
    present = support > 0
    worst = []
    for c in sorted(present.nonzero().flatten().tolist(), key=lambda c: (per_class[c].item(), c))[:10]:
        row = conf[c].clone()
        row[c] = -1
        other = int(row.argmax())
        worst.append({"class": class_names[c], "index": c, "accuracy": per_class[c].item(),
                      "support": int(support[c]), "confused_with": class_names[other] if row[other] > 0 else None,
                      "confused_count": max(int(row[other]), 0)})
    return {
        "images": n,
        "top1": (rank == 1).double().mean().item(),
        "top5": (rank <= 5).double().mean().item(),
        "mean_class_acc": per_class[present].mean().item(),
        "loss": (-true_p.double().clamp(min=1e-12).log()).mean().item(),
        "classes_present": int(present.sum()),
        "worst": worst,
        "confusion": conf,
        "pred": pred,
        "rank": rank,
        "true_p": true_p,
        "pred_p": probs.max(1).values,
    }


def write_outputs(out_dir: Path, res: dict[str, Any], files: list[str], labels: torch.Tensor,
                  class_names: list[str], split: str = "test") -> list[Path]:
    """predictions.csv, confusion.csv and (with matplotlib) confusion.png in out_dir for the test
    split; other splits add their name (predictions_val.csv, ...), so evaluating the hold-out after
    the test set, or before it, never overwrites the other's files."""
    out_dir.mkdir(parents=True, exist_ok=True)
    suffix = "" if split == "test" else f"_{split}"
    written = []
    p = out_dir / f"predictions{suffix}.csv"
    with open(p, "w", newline="") as f:
        w = csv.writer(f)
        # true_probability and true_rank are extra: they let top-5 and the loss be recounted from this file
        w.writerow(["file", "true", "predicted", "probability", "true_probability", "true_rank"])
        for i, path in enumerate(files):
            w.writerow([path, class_names[labels[i]], class_names[res["pred"][i]], f"{res['pred_p'][i].item():.6f}",
                        f"{res['true_p'][i].item():.6g}", int(res["rank"][i])])
    written.append(p)
    p = out_dir / f"confusion{suffix}.csv"
    conf = res["confusion"]
    with open(p, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["true \\ predicted"] + class_names)
        for i, name in enumerate(class_names):
            w.writerow([name] + conf[i].tolist())
    written.append(p)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return written
    k = len(class_names)
    norm = conf.double() / conf.sum(1, keepdim=True).clamp(min=1)
    side = min(4 + k * 0.12, 30)
    fig, ax = plt.subplots(figsize=(side, side))
    im = ax.imshow(norm.numpy(), cmap="viridis", vmin=0, vmax=1)
    if k <= 40:  # names are only readable for a few classes
        ax.set_xticks(range(k), class_names, rotation=90, fontsize=7)
        ax.set_yticks(range(k), class_names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"confusion on {split} (row-normalised), top-1 {res['top1']:.2%}")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    p = out_dir / f"confusion{suffix}.png"
    fig.savefig(p, dpi=100)
    plt.close(fig)
    written.append(p)
    return written


def evaluate_checkpoint(ckpt_path: Path, data_dir: str | None, split: str = "test", tta: bool = False,
                        batch_size: int = 64, device: str = "auto", cache_dir: str | None = None,
                        workers: int | None = None, out_dir: Path | None = None,
                        ghost_op: str = "auto", img_size: int | tuple[int, int] | images.ImageSize | None = None,
                        test_crop: float | None = None) -> dict[str, Any]:
    """Accuracy of a checkpoint on a split. img_size: decode the images at this size instead of the
    training size. test_crop: keep this fraction of each side around the centre instead of the checkpoint's
    own --test-crop. Both answer the same discrepancy (Touvron et al., "Fixing the train-test resolution
    discrepancy"): random resized crops show objects larger in training than whole test images do."""
    ckpt = load_checkpoint(ckpt_path)
    class_names = list(ckpt["class_names"])
    cfg = config_of(ckpt)
    data_dir = data_dir or cfg.run.data
    if not data_dir:
        raise data.DataError(f"{ckpt_path}: no --data given and the checkpoint's config names none; pass --data DIR")
    prep = images.Preprocess.from_dict(ckpt["preprocess"])
    train_size = prep.img_size
    if img_size is not None:
        prep = dataclasses.replace(prep, img_size=img_size)  # (a 4:3 model is tested at 4:3 sizes)
    if test_crop is not None:
        prep = dataclasses.replace(prep, test_crop=test_crop)
    spec = data.find_dataset(data_dir)
    if list(spec.class_names) != class_names:
        raise data.DataError(f"{spec.root}: its {len(spec.class_names)} class names differ from the checkpoint's "
                             f"{len(class_names)}; evaluate on the dataset the model was trained on")
    # the checkpoint's own hold-out, so "val" is the split the run was selected on
    val_split = cfg.data.val_split
    seed = data.holdout_seed(cfg.flat())
    splits = data.make_splits(spec, val_split=val_split, seed=seed)
    if split not in splits:
        raise ValueError(f"--split {split}: choose one of {', '.join(splits)}")
    records = splits[split]
    decoded = images.decode_cached(records, prep,
                                   cache_dir=cache_dir if cache_dir is not None else cfg.run.cache_dir,
                                   workers=workers, desc=f"decode {split}")
    dev = pick_device(device)
    net = model_from_checkpoint(ckpt, ghost_op=ghost_op)
    fused = M.fuse_for_inference(net).to(dev)
    probs = run_split(fused, decoded, prep, dev, batch_size=batch_size, tta=tta)
    labels = torch.as_tensor(decoded.labels).long()
    res = metrics_from(probs, labels, class_names)
    root = Path(spec.root)
    files = []
    for p in decoded.paths:
        try:
            files.append(str(Path(p).resolve().relative_to(root.resolve())))
        except ValueError:
            files.append(str(p))
    out_dir = out_dir or ckpt_path.parent
    written = write_outputs(out_dir, res, files, labels, class_names, split)
    png = [p for p in written if p.suffix == ".png"]
    if png and cfg.run.tensorboard:  # the picture beside the run's curves: tensorboard --logdir runs
        tracking.add_confusion_image(out_dir, png[0])
    summary = {k: v for k, v in res.items() if k not in ("confusion", "pred", "rank", "true_p", "pred_p")}
    summary.update(checkpoint=str(ckpt_path), arch=ckpt["arch"], data=str(spec.root), split=split, tta=tta,
                   img_size=prep.size.json(), train_img_size=images.ImageSize.of(train_size).json(),
                   test_crop=prep.test_crop, val_split=val_split, seed=seed, skipped=[list(s) for s in decoded.skipped],
                   files=[str(p) for p in written], epoch=ckpt.get("epoch"))
    return {"summary": summary, "net": net, "prep": prep, "ckpt": ckpt}


def format_metrics(s: dict[str, Any]) -> str:
    size = ""
    if s.get("img_size") != s.get("train_img_size"):
        at, trained = (images.ImageSize.of(s[k]).words for k in ("img_size", "train_img_size"))
        size = f" at {at} (trained at {trained})"
    if s.get("test_crop", 1.0) != 1.0:
        size += f", the central {s['test_crop']:g} of each side"
    lines = [f"{s['checkpoint']} ({s['arch']}, epoch {s.get('epoch')}) on {s['split']} of {s['data']}"
             f"{' with flip TTA' if s['tta'] else ''}{size}: {s['images']} images"
             + (f", {len(s['skipped'])} unreadable skipped" if s["skipped"] else ""),
             f"  top-1 {s['top1']:.2%}   top-5 {s['top5']:.2%}   mean per-class {s['mean_class_acc']:.2%}   "
             f"loss {s['loss']:.4f}",
             "  ten worst classes (accuracy, support -> most often taken for):"]
    for w in s["worst"]:
        other = f"{w['confused_with']} ({w['confused_count']}x)" if w["confused_with"] else "-"
        lines.append(f"    {w['accuracy']:6.1%} of {w['support']:3d}  {w['class']}  ->  {other}")
    lines.append("  wrote " + ", ".join(s["files"]))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# comparison table

def _run_accuracy(run_dir: Path, ckpt: dict[str, Any]) -> tuple[float | None, str]:
    """Best validation accuracy of a run: metrics.csv when present, else the checkpoint's 'best'."""
    try:
        rows = [r for r in read_metrics(run_dir / "metrics.csv") if "val_acc" in r]
    except (OSError, ValueError, KeyError):
        rows = []
    if rows:
        best = max(rows, key=lambda r: r["val_acc"])
        return best["val_acc"], f"metrics.csv epoch {best.get('epoch')}"
    best = ckpt.get("best") or {}
    if best.get("val_acc") is not None:
        return float(best["val_acc"]), f"best.pt epoch {best.get('epoch')}"
    return None, ""


def compare(items: list[str], img_size: int | images.ImageSize = 227, num_classes: int = DEFAULT_CLASSES,
            runs: int = 30, ghost_op: str = "auto") -> str:
    """One markdown table over architectures and run folders / checkpoints; CPU timings interleaved."""
    rows: list[dict[str, Any]] = []
    nets: dict[str, torch.nn.Module] = {}
    for item in items:
        if item in M.ARCHS:
            net = M.build_model(item, num_classes, ghost_op=ghost_op).eval()
            row = {"name": item, "arch": item, "img": img_size, "ch": 3, "acc": None, "acc_from": ""}
        else:
            p = Path(item)
            if p.is_dir():
                p = p / "best.pt"
            if not p.exists():
                raise ValueError(f"{item}: neither an architecture ({', '.join(M.ARCHS)}) nor a run folder "
                                 f"with best.pt / a checkpoint file")
            ckpt = load_checkpoint(p)
            net = model_from_checkpoint(ckpt, ghost_op=ghost_op)
            prep = ckpt["preprocess"]
            acc, src = _run_accuracy(p.parent, ckpt)
            row = {"name": str(p.parent.name if p.name == "best.pt" else p), "arch": ckpt["arch"],
                   "img": prep["img_size"], "ch": 1 if prep.get("grayscale") else 3,
                   "acc": acc, "acc_from": src}
        key = f"{len(rows)}:{row['name']}"
        row.update(static_figures(net, row["img"], row["ch"]))
        row["key"] = key
        nets[key] = M.fuse_for_inference(net)
        rows.append(row)
    speed = speed_figures(nets, {r["key"]: r["img"] for r in rows}, {r["key"]: r["ch"] for r in rows},
                          torch.device("cpu"), runs=runs, desc="compare")
    threads = torch.get_num_threads()
    out = [f"CPU: {cpu_name()}, {_threads(threads)}, torch {torch.__version__}; "
           f"BN folded; latency = median of {runs} interleaved runs at batch 1", "",
           "| model | arch | input | params (M) | fp32 MB | fp16 MB | MMACs | CPU ms (b1) | CPU img/s (b32) "
           "| accuracy |",
           "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        s = speed[r["key"]]
        acc = f"{r['acc']:.2%} ({r['acc_from']})" if r["acc"] is not None else "-"
        out.append(f"| {r['name']} | {r['arch']} | {images.ImageSize.of(r['img']).words} | {r['params'] / 1e6:.2f} | "
                   f"{r['size_mb_fp32']:.2f} | "
                   f"{r['size_mb_fp16']:.2f} | {r['macs'] / 1e6:.0f} | {s['latency_ms']:.2f} | "
                   f"{s['throughput']:.1f} | {acc} |")
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, help="a checkpoint (runs/<name>/best.pt)")
    ap.add_argument("--data", help="dataset folder (default: the one in the checkpoint's config)")
    ap.add_argument("--split", default="test", choices=["test", "val", "train"],
                    help="which split; 'val' uses the checkpoint's --val-split/--val-seed")
    ap.add_argument("--tta", action="store_true", help="average with the horizontally flipped image")
    ap.add_argument("--json", type=Path, help="also write all figures to this JSON file")
    ap.add_argument("--out-dir", type=Path,
                    help="where predictions.csv / confusion.* go (default: next to the checkpoint; "
                         "splits other than test add _<split> to the names)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda (evaluation; efficiency covers CPU and CUDA)")
    ap.add_argument("--cache-dir", help="decode cache folder (default: the checkpoint's)")
    ap.add_argument("--workers", type=int, help="decode processes")
    ap.add_argument("--arch", help=f"efficiency of an architecture without a checkpoint: {', '.join(M.ARCHS)}")
    ap.add_argument("--img-size", type=images.ImageSize.parse, default=None,
                    help="with --checkpoint: test at this size (default: the training size); "
                         "for --arch/--compare: the input size (default 227)")
    ap.add_argument("--test-crop", type=float, default=None, metavar="FRACTION",
                    help="with --checkpoint: keep this fraction of each side around the centre (default: the "
                         "checkpoint's --test-crop; 1 = the whole image)")
    ap.add_argument("--num-classes", type=int, default=DEFAULT_CLASSES, help="classifier size for --arch/--compare")
    ap.add_argument("--compare", nargs="+", metavar="ARCH_OR_RUN", help="table over architectures and run folders")
    ap.add_argument("--out", type=Path, help="with --compare: also write the table here")
    ap.add_argument("--runs", type=int, default=30, help="timed runs at batch 1 (after warm-up)")
    ap.add_argument("--threads", type=int, help="CPU threads for timing (default: torch's)")
    ap.add_argument("--ghost-op", default="auto", choices=["auto", "ext", "torch"], help="ghost op implementation")
    ap.add_argument("--no-efficiency", action="store_true", help="skip the timing part of an evaluation")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        if args.runs < 1:
            raise ValueError("--runs must be at least 1")
        if args.compare:
            table = compare(args.compare, args.img_size or 227, args.num_classes, args.runs, args.ghost_op)
            print(table)
            if args.out:
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(table)
                print(f"wrote {args.out}", file=sys.stderr)
            return 0
        if args.checkpoint is None and args.arch is None:
            raise ValueError("nothing to do: pass --checkpoint runs/<name>/best.pt --data DIR, --arch NAME, "
                             "or --compare ARCH_OR_RUN ...")
        report: dict[str, Any] = {}
        if args.checkpoint is not None:
            ev = evaluate_checkpoint(args.checkpoint, args.data, args.split, args.tta, args.batch_size, args.device,
                                     args.cache_dir, args.workers, args.out_dir, args.ghost_op, args.img_size,
                                     args.test_crop)
            report["metrics"] = ev["summary"]
            print(format_metrics(ev["summary"]))
            net, prep, name = ev["net"], ev["prep"], str(args.checkpoint)
            img, ch = prep.img_size, prep.channels
        else:
            net = M.build_model(args.arch, args.num_classes, ghost_op=args.ghost_op).eval()
            name, img, ch = args.arch, args.img_size or 227, 3
        if not args.no_efficiency:
            fig = efficiency(net, img, ch, runs=args.runs)
            report["efficiency"] = fig
            print(format_efficiency(name, fig))
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report, indent=2, default=str))
            print(f"wrote {args.json}", file=sys.stderr)
        return 0
    except (CheckpointError, data.DataError, images.ImageError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
