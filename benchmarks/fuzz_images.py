"""Fuzz the image decoder that every untrusted image goes through (images.load_image: predict.py, serve.py and the
dataset cache all call it) with mutated JPEG, PNG, WebP, GIF, TIFF and BMP files.

    python benchmarks/fuzz_images.py                      # 20,000 inputs, results/fuzz_images.{md,json}
    python benchmarks/fuzz_images.py --inputs 500 --no-write

Each input is a valid image (a real photo from ../shared/data when present, else a drawn one) in one of six
formats, then mutated: bytes flipped, inserted or deleted, chunks duplicated, the file cut short, or the
declared width/height set huge (decompression bombs). The contract: load_image returns a uint8 image or raises
ImageError with one line naming the file; anything else (another exception, a crash, an input over --max-seconds)
is a failure. The slowest input's time and the process's peak memory are recorded.
"""
from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import platform
import random
import resource
import struct
import sys
import tempfile
import time
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import images  # noqa: E402
from common import cpu_name  # noqa: E402

FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "TIFF", "BMP")
SUFFIX = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif", "TIFF": ".tif", "BMP": ".bmp"}
MUTATIONS = ("flip_bytes", "insert", "delete", "duplicate", "truncate", "huge_size")


def seed_images(photo: Path | None = None) -> dict[str, bytes]:
    """One valid file per format: the photo (or a drawn car-like picture), in several pixel modes."""
    if photo is not None and photo.is_file():
        img = Image.open(photo).convert("RGB").resize((96, 72))
    else:
        yy, xx = np.mgrid[0:72, 0:96]
        arr = np.stack([xx * 255 // 95, yy * 255 // 71, np.full_like(xx, 120)], -1).astype(np.uint8)
        arr[24:48, 24:72] = (30, 30, 160)
        img = Image.fromarray(arr)
    out = {}
    for fmt in FORMATS:
        buf = io.BytesIO()
        src = img.convert("P") if fmt == "GIF" else img
        src.save(buf, format=fmt)
        out[fmt] = buf.getvalue()
    for mode in ("L", "RGBA", "CMYK", "I;16"):  # other pixel modes the decoder must convert or refuse
        buf = io.BytesIO()
        fmt = "JPEG" if mode in ("L", "CMYK") else "PNG" if mode != "I;16" else "TIFF"
        (img.convert(mode) if mode != "I;16" else Image.fromarray(np.asarray(img.convert("L"), np.uint16) * 257)
         ).save(buf, format=fmt)
        out[f"{fmt}-{mode}"] = buf.getvalue()
    return out


def _set_huge_size(b: bytearray, fmt: str, rng: random.Random) -> None:
    """Overwrite the declared width/height where each format keeps them (a bomb: tiny file, huge image)."""
    side = rng.choice([65_535, 100_000, 2**24, 2**31 - 1])
    try:
        if fmt.startswith("PNG") and len(b) >= 33:
            b[16:24] = struct.pack(">II", min(side, 2**31 - 1), min(side, 2**31 - 1))
            b[29:33] = struct.pack(">I", zlib.crc32(bytes(b[12:29])))  # a valid IHDR: the bomb gets past the CRC
        elif fmt.startswith("GIF") and len(b) >= 10:
            b[6:10] = struct.pack("<HH", min(side, 65_535), min(side, 65_535))
        elif fmt.startswith("BMP") and len(b) >= 26:
            b[18:26] = struct.pack("<ii", min(side, 2**31 - 1), min(side, 2**31 - 1))
        elif fmt.startswith("JPEG"):
            i = b.find(b"\xff\xc0")  # baseline SOF0: precision, height, width
            if i >= 0 and len(b) >= i + 9:
                b[i + 5:i + 9] = struct.pack(">HH", min(side, 65_535), min(side, 65_535))
        elif len(b) >= 8:  # WebP / TIFF: somewhere in the header
            j = rng.randrange(0, min(len(b) - 4, 64))
            b[j:j + 4] = struct.pack("<I", side)
    except struct.error:
        pass


def mutate(src: bytes, fmt: str, rng: random.Random) -> tuple[bytes, list[str]]:
    """1-4 random mutations of a valid file; returns the bytes and the mutations' names."""
    b = bytearray(src)
    names = []
    for _ in range(rng.randint(1, 4)):
        m = rng.choice(MUTATIONS)
        names.append(m)
        n = len(b)
        if n == 0:
            break
        if m == "flip_bytes":
            for _ in range(rng.randint(1, 16)):
                # headers matter most: half of the flips land in the first 64 bytes
                i = rng.randrange(min(n, 64)) if rng.random() < 0.5 else rng.randrange(n)
                b[i] = rng.randrange(256)
        elif m == "insert":
            i = rng.randrange(n + 1)
            b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
        elif m == "delete":
            i = rng.randrange(n)
            del b[i:i + rng.randint(1, 64)]
        elif m == "duplicate":
            i = rng.randrange(n)
            b[i:i] = b[i:i + rng.randint(1, 256)]
        elif m == "truncate":
            del b[rng.randrange(n):]
        else:
            _set_huge_size(b, fmt, rng)
    return bytes(b), names


@dataclass
class Outcome:
    kind: str  # "ok", "error" (ImageError, one line), "failure" (anything else)
    seconds: float
    message: str = ""


def decode_one(path: Path, prep: images.Preprocess) -> Outcome:
    t0 = time.perf_counter()
    # a warning would be an extra line on a user's screen; recorded under the filters a user has (images.py's)
    with warnings.catch_warnings(record=True) as seen:
        try:
            img = images.load_image(path, prep)
            ok = img.dtype == torch.uint8 and tuple(img.shape[1:]) == prep.hw
            out = Outcome("ok" if ok else "failure", 0.0, "" if ok else f"bad output {img.dtype} {tuple(img.shape)}")
        except images.ImageError as e:
            msg = str(e)
            one_line = "\n" not in msg and msg.startswith(str(path))
            out = Outcome("error" if one_line else "failure", 0.0, msg)
        except Exception as e:  # the contract is broken: a message a user would see as a traceback
            out = Outcome("failure", 0.0, f"{type(e).__name__}: {e}")
    out.seconds = time.perf_counter() - t0
    if seen and out.kind != "failure":
        out = Outcome("failure", out.seconds, f"a warning escaped: {seen[0].category.__name__}: {seen[0].message}")
    return out


@dataclass
class Report:
    inputs: int = 0
    counts: dict = field(default_factory=lambda: {"ok": 0, "error": 0, "failure": 0})
    by_format: dict = field(default_factory=dict)
    slowest: tuple = (0.0, "", [])
    failures: list = field(default_factory=list)
    over_time: list = field(default_factory=list)


def fuzz(n: int, seed: int, max_seconds: float, photo: Path | None, img_size: int = 96,
         progress: bool = True) -> Report:
    seeds = seed_images(photo)
    prep = images.Preprocess(img_size=img_size)
    rng = random.Random(seed)
    rep = Report()
    with tempfile.TemporaryDirectory(prefix="fuzz-images-") as tmp:
        for k in tqdm(range(n), desc="fuzz", disable=not progress, mininterval=2):
            fmt = rng.choice(sorted(seeds))
            payload, muts = mutate(seeds[fmt], fmt, rng)
            path = Path(tmp) / f"input{SUFFIX[fmt.split('-')[0]]}"
            path.write_bytes(payload)
            out = decode_one(path, prep)
            rep.inputs += 1
            rep.counts[out.kind] += 1
            rep.by_format.setdefault(fmt, {"ok": 0, "error": 0, "failure": 0})[out.kind] += 1
            if out.seconds > rep.slowest[0]:
                rep.slowest = (out.seconds, fmt, muts)
            if out.kind == "failure" and len(rep.failures) < 20:
                rep.failures.append({"input": k, "format": fmt, "mutations": muts, "message": out.message[:300]})
            if out.seconds > max_seconds:
                rep.over_time.append({"input": k, "format": fmt, "mutations": muts, "seconds": out.seconds})
    return rep


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--inputs", type=int, default=20_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-seconds", type=float, default=2.0, help="an input slower than this is a failure")
    ap.add_argument("--photo", type=Path, default=None,
                    help="the seed photo (default: the first of ../shared/data/stanford_cars/cars_train)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out-dir", type=Path, default=REPO / "benchmarks" / "results")
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    photo = args.photo
    if photo is None:
        photos = sorted((REPO.parent / "shared" / "data" / "stanford_cars" / "cars_train").glob("*.jpg"))[:1]
        photo = photos[0] if photos else None
    rss0 = peak_rss_mb()
    t0 = time.perf_counter()
    rep = fuzz(args.inputs, args.seed, args.max_seconds, photo)
    wall = time.perf_counter() - t0
    result = {
        "command": " ".join(["python", "benchmarks/fuzz_images.py", *(argv if argv is not None else sys.argv[1:])]),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "threads": args.threads,
                    "load_avg_at_end": os.getloadavg()[0], "platform": platform.platform()},
        "versions": {"python": platform.python_version(), "pillow": Image.__version__, "torch": torch.__version__},
        "seed_photo": str(photo) if photo else "drawn", "inputs": rep.inputs, "counts": rep.counts,
        "by_format": rep.by_format, "failures": rep.failures, "over_max_seconds": rep.over_time,
        "max_seconds": args.max_seconds, "slowest_seconds": rep.slowest[0],
        "slowest_input": {"format": rep.slowest[1], "mutations": rep.slowest[2]},
        "peak_rss_mb": peak_rss_mb(), "peak_rss_mb_before": rss0, "wall_seconds": wall,
    }
    verdict = "PASS" if rep.counts["failure"] == 0 and not rep.over_time else "FAIL"
    lines = [
        "# Fuzzing the image decoder (images.load_image: predict.py, serve.py, the dataset cache)", "",
        f"`{result['command']}` on {result['date']}: {cpu_name()}, {args.threads} torch thread, load average "
        f"{result['machine']['load_avg_at_end']:.1f} at the end; Pillow {Image.__version__}, Python "
        f"{platform.python_version()}. Seed photo: {Path(result['seed_photo']).name}.", "",
        f"**{verdict}**: {rep.inputs} mutated inputs, {rep.counts['ok']} decoded, {rep.counts['error']} refused with "
        f"one `ImageError` line, **{rep.counts['failure']} failures** (any other exception or output). Slowest input "
        f"{rep.slowest[0] * 1e3:.0f} ms ({rep.slowest[1]}, {'+'.join(rep.slowest[2])}; limit {args.max_seconds:g} s, "
        f"{len(rep.over_time)} over); peak memory of the whole process {result['peak_rss_mb']:.0f} MB "
        f"(torch and Pillow loaded: {rss0:.0f} MB before the first input); {wall:.0f} s in all.", "",
        "| seed format (mode) | inputs | decoded | refused (one line) | failures |", "|---|---|---|---|---|",
    ]
    for fmt, c in sorted(rep.by_format.items()):
        lines.append(f"| {fmt} | {sum(c.values())} | {c['ok']} | {c['error']} | {c['failure']} |")
    for f in rep.failures:
        lines.append(f"\n- failure at input {f['input']} ({f['format']}, {'+'.join(f['mutations'])}): {f['message']}")
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        (args.out_dir / "fuzz_images.json").write_text(json.dumps(result, indent=2) + "\n")
        (args.out_dir / "fuzz_images.md").write_text(text)
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
