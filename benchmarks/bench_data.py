"""Images per second delivered to the training loop: the plain torchvision way vs images.py's pipeline, on CPU.

(a) plain torchvision: decode every JPEG every epoch with PIL, per-sample v2 transforms (Resize 227, the
    reference's flip + affine + colour jitter, ToImage/ToDtype/Normalize), DataLoader(num_workers=2).
(b) images.py: decode once into the uint8 cache (its one-off build time is reported separately), then
    BatchLoader (memmap reads, prefetch thread) + BatchTransform (same augmentations, batched) on the CPU.
(c) between the two, to split the gain: the same cache, read per image by a DataLoader with the per-sample
    v2 transforms of (a) on the decoded tensors. (a) -> (c) is what decoding once buys, (c) -> (b) what
    the batched augmentation buys.

Both deliver normalized float32 (B, 3, 227, 227) batches with the same augmentation distribution.
Datasets: ../shared/data/stanford_cars/cars_test (real photos, 128x96 JPEGs) and a generated set of
full-size (about 600x400) photo-like JPEGs in a temp dir.

    python benchmarks/bench_data.py                  # both sets, writes benchmarks/results/bench_data.{json,md}
    python benchmarks/bench_data.py --quick          # fewer images, for a smoke test
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import PIL
import torch
import torchvision
import torchvision.transforms.v2 as v2
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import augment  # noqa: E402
from config import AugmentConfig  # noqa: E402
import data  # noqa: E402
import batches  # noqa: E402
import images  # noqa: E402
from common import cpu_name  # noqa: E402


def make_full_size_jpegs(out: Path, n: int, seed: int = 0) -> list[data.Record]:
    """Photo-like JPEGs around 600x400 (smooth gradients, shapes, sensor noise), 10 classes."""
    from PIL import ImageDraw, ImageFilter

    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    recs = []
    for i in range(n):
        w, h = int(rng.integers(560, 660)), int(rng.integers(370, 440))
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        t = (xx / w * rng.uniform(0.3, 1) + yy / h * rng.uniform(0.3, 1))[..., None] / 2
        arr = c0 * (1 - t) + c1 * t + rng.normal(0, 8, (h, w, 3))
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
        d = ImageDraw.Draw(img)
        for _ in range(6):
            x0, y0 = rng.integers(0, w - 60), rng.integers(0, h - 40)
            d.rectangle([x0, y0, x0 + rng.integers(20, 250), y0 + rng.integers(20, 150)],
                        fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        img = img.filter(ImageFilter.GaussianBlur(1.0))
        p = out / f"{i:05d}.jpg"
        img.save(p, quality=90)
        recs.append(data.Record(str(p), i % 10, None))
    return recs


class PlainDataset(torch.utils.data.Dataset):
    def __init__(self, records, transform):
        self.records, self.transform = records, transform

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        r = self.records[i]
        with Image.open(r.path) as im:
            img = im.convert("RGB")
        return self.transform(img), r.label


class CachedDataset(torch.utils.data.Dataset):
    """(c): the decoded uint8 cache, one image at a time, through per-sample transforms."""

    def __init__(self, dec: images.Decoded, transform):
        self.dec, self.transform = dec, transform

    def __len__(self):
        return len(self.dec)

    def __getitem__(self, i):
        return self.transform(torch.from_numpy(np.array(self.dec.images[i]))), int(self.dec.labels[i])


def plain_transform(size: int | None) -> v2.Compose:
    """The reference's per-sample pipeline; size None: the input is already at size (the cache's images)."""
    prep = images.Preprocess()
    return v2.Compose([
        *([v2.Resize((size, size))] if size else []),  # squash, as the reference
        v2.RandomHorizontalFlip(0.5),
        v2.RandomAffine(degrees=25, translate=(0.1, 0.1), scale=(0.9, 1.1), shear=8),
        v2.ColorJitter(0.2, 0.2, 0.2, 0.1),
        v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(list(prep.mean), list(prep.std)),
    ])


def measure(batches, min_images: int, min_seconds: float, max_seconds: float) -> dict:
    """Steady-state img/s: the clock starts after the first batch (worker start-up and warm-up excluded)."""
    n, t0, first = 0, None, None
    epochs = 0
    while True:
        for x, y in batches():
            if t0 is None:
                t0 = time.perf_counter()
                first = x.shape
                continue
            n += x.shape[0]
            el = time.perf_counter() - t0
            if (n >= min_images and el >= min_seconds) or el >= max_seconds:
                return {"images": n, "seconds": round(el, 3), "img_per_s": round(n / el, 1),
                        "batch_shape": list(first), "epochs_started": epochs + 1}
        epochs += 1


def run_set(name: str, records, args, cache_root: Path) -> dict:
    size, bs = args.img_size, args.batch_size
    res = {"dataset": name, "images": len(records)}
    # (a) plain torchvision
    ds = PlainDataset(records, plain_transform(size))
    dl = torch.utils.data.DataLoader(ds, batch_size=bs, shuffle=True, num_workers=args.workers, drop_last=True,
                                     persistent_workers=True)
    res["plain"] = measure(lambda dl=dl: iter(dl), args.min_images, args.min_seconds, args.max_seconds)
    del dl
    # (b) images.py + augment.py: cache build (one-off), then cache read + BatchLoader + BatchTransform
    prep = images.Preprocess(img_size=size)
    t = time.perf_counter()
    dec = images.decode_cached(records, prep, cache_root / name, desc=name)
    res["cache_build_s"] = round(time.perf_counter() - t, 2)
    t = time.perf_counter()
    dec = images.decode_cached(records, prep, cache_root / name, desc=name)
    res["cache_open_s"] = round(time.perf_counter() - t, 3)
    loader = batches.BatchLoader(dec, bs, shuffle=True, drop_last=True, device="cpu", seed=0)
    bt = augment.BatchTransform(prep, AugmentConfig().augment, None)
    g = torch.Generator().manual_seed(0)
    state = {"epoch": 0}

    def ours():
        loader.set_epoch(state["epoch"])
        state["epoch"] += 1
        for x, y in loader:
            yield bt(x, True, g), y

    res["ours"] = measure(ours, args.min_images, args.min_seconds, args.max_seconds)
    # (c) the same cache, per-sample transforms in DataLoader workers
    dl = torch.utils.data.DataLoader(CachedDataset(dec, plain_transform(None)), batch_size=bs, shuffle=True,
                                     num_workers=args.workers, drop_last=True, persistent_workers=True)
    res["cache_per_sample"] = measure(lambda dl=dl: iter(dl), args.min_images, args.min_seconds, args.max_seconds)
    del dl
    res["speedup"] = round(res["ours"]["img_per_s"] / res["plain"]["img_per_s"], 2)
    res["speedup_cache"] = round(res["cache_per_sample"]["img_per_s"] / res["plain"]["img_per_s"], 2)
    res["speedup_batched_aug"] = round(res["ours"]["img_per_s"] / res["cache_per_sample"]["img_per_s"], 2)
    return res


def machine() -> dict:
    cpu = cpu_name()
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "pillow": PIL.__version__, "numpy": np.__version__}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data"), help="folder with stanford_cars/")
    ap.add_argument("--full-size", type=int, default=320, help="number of generated ~600x400 JPEGs")
    ap.add_argument("--real-split", default="test", choices=["train", "test"])
    ap.add_argument("--img-size", type=int, default=227)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers of the plain way")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="torch threads of this process = BatchTransform CPU threads (the plain way: 1 per worker)")
    ap.add_argument("--min-images", type=int, default=640)
    ap.add_argument("--min-seconds", type=float, default=8.0)
    ap.add_argument("--max-seconds", type=float, default=40.0)
    ap.add_argument("--quick", action="store_true", help="small smoke run")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    if args.quick:
        args.full_size, args.min_images, args.min_seconds, args.max_seconds = 96, 128, 1.0, 10.0
    torch.set_num_threads(args.threads)
    start = time.time()
    load0 = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="bench_data_"))
    results = []
    try:
        full = make_full_size_jpegs(tmp / "full", args.full_size)
        print(f"generated {len(full)} full-size JPEGs in {time.time() - start:.1f}s", flush=True)
        results.append(run_set("generated-600x400", full, args, tmp / "cache"))
        print(json.dumps(results[-1]), flush=True)
        try:
            spec = data.find_dataset(args.data)
            recs = spec.test if args.real_split == "test" else spec.train
            results.append(run_set(f"stanford_cars-{args.real_split}-128x96", recs, args, tmp / "cache"))
            print(json.dumps(results[-1]), flush=True)
        except data.DataError as e:
            print(f"skipping real data: {e}", file=sys.stderr)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report = {
        "benchmark": "bench_data", "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": " ".join(["python", "benchmarks/bench_data.py"] + sys.argv[1:]),
        "machine": machine(), "torch_threads": args.threads, "dataloader_workers": args.workers,
        "img_size": args.img_size, "batch_size": args.batch_size, "augment": "flip 0.5, affine(25, 0.1, 0.9-1.1, 8), "
        "jitter(0.2, 0.2, 0.2, 0.1), normalize", "loadavg_start": [round(v, 2) for v in load0],
        "loadavg_end": [round(v, 2) for v in os.getloadavg()], "total_seconds": round(time.time() - start, 1),
        "results": results,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_data.json").write_text(json.dumps(report, indent=2) + "\n")
    m = report["machine"]
    lines = [
        "# bench_data: images/s delivered to the training loop (CPU)", "",
        f"{report['date']}; {m['cpu']}, {m['cores']} cores; torch {m['torch']}, torchvision {m['torchvision']}, "
        f"Pillow {m['pillow']}, Python {m['python']}; this process {args.threads} torch thread(s), plain way "
        f"DataLoader(num_workers={args.workers}); {args.img_size}x{args.img_size}, batch {args.batch_size}, "
        f"augmentations: {report['augment']}.", "",
        f"Load average at start {report['loadavg_start'][0]}, at end {report['loadavg_end'][0]} "
        "(all ways ran one after the other in this process, under the load stated).", "",
        "Ways: (a) plain torchvision: decode every epoch, per-sample transforms; (c) the decode-once cache, same "
        "per-sample transforms; (b) images.py: the cache and batched augmentation (BatchTransform). "
        "Gain of the cache = c / a, of the batched augmentation = b / c, total = b / a.", "",
        "| dataset | images | (a) plain img/s | (c) cache + per-sample img/s | (b) images.py img/s | cache gain "
        "| batched-aug gain | total | cache build (one-off) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(f"| {r['dataset']} | {r['images']} | {r['plain']['img_per_s']} | "
                     f"{r['cache_per_sample']['img_per_s']} | {r['ours']['img_per_s']} | {r['speedup_cache']}x | "
                     f"{r['speedup_batched_aug']}x | {r['speedup']}x | {r['cache_build_s']} s |")
    lines += ["", f"Command: `{report['command']}`", ""]
    (out / "bench_data.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
