"""Score checkpoints on their own validation split at several --test-crop fractions (the centre of each side kept).

    python benchmarks/test_crop_sweep.py RUN_DIR [RUN_DIR ...] --crops 1 0.9 0.85 0.8 0.75 0.7 --out DIR

Each RUN_DIR holds a final.pt trained with --val-split; the sweep writes test_crop.json and test_crop.md to --out:
top-1, top-5 and loss per run and crop, and the mean change against the whole image (crop 1). The per-run
changes are paired (same weights, same images), so they are far steadier than differences between runs.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def sweep(runs: list[Path], crops: list[float], data_dir: str | None, threads: int) -> dict[str, dict[str, dict]]:
    """evaluate.py on each run's validation split at each crop, as a subprocess (the benchmarks never import the
    evaluation script)."""
    out: dict[str, dict[str, dict]] = {}
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    with tempfile.TemporaryDirectory() as tmp:
        for run in runs:
            out[run.name] = {}
            for crop in crops:
                js = Path(tmp) / "ev.json"
                cmd = [sys.executable, str(REPO / "evaluate.py"), "--checkpoint", str(run / "final.pt"), "--split",
                       "val", "--test-crop", f"{crop:g}", "--no-efficiency", "--workers", "1", "--out-dir", tmp,
                       "--json", str(js)] + (["--data", data_dir] if data_dir else [])
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
                if proc.returncode != 0:
                    raise SystemExit(f"{run}: evaluate.py failed: {proc.stderr.strip().splitlines()[-1:]}")
                s = json.loads(js.read_text())["metrics"]
                out[run.name][f"{crop:g}"] = {k: s[k] for k in ("top1", "top5", "loss", "images")}
                print(f"{run.name} crop {crop:g}: top-1 {s['top1']:.2%} top-5 {s['top5']:.2%} loss {s['loss']:.4f}",
                      flush=True)
    return out


def table(res: dict[str, dict[str, dict]], crops: list[float]) -> list[str]:
    keys = [f"{c:g}" for c in crops]
    lines = ["| run | " + " | ".join(f"crop {k}: top-1 / top-5 / loss" for k in keys) + " |",
             "|---|" + "---|" * len(keys)]
    for run, row in res.items():
        lines.append(f"| `{run}` | " + " | ".join(
            f"{row[k]['top1']:.2%} / {row[k]['top5']:.2%} / {row[k]['loss']:.3f}" for k in keys) + " |")
    base = keys[0]
    for metric, scale, unit in (("top1", 100, " pt"), ("top5", 100, " pt"), ("loss", 1, "")):
        cells = []
        for k in keys:
            d = [(row[k][metric] - row[base][metric]) * scale for row in res.values()]
            sd = statistics.stdev(d) if len(d) > 1 else 0.0
            cells.append(f"{statistics.mean(d):+.2f} ± {sd:.2f}{unit}")
        lines.append(f"| mean change of {metric} against crop {base} (± sd over runs) | " + " | ".join(cells) + " |")
    return lines


def holdout_size(res: dict[str, dict[str, dict]]) -> str:
    """The hold-outs' image count as the table's reader needs it: what one image is worth in points."""
    sizes = sorted({c["images"] for row in res.values() for c in row.values()})
    if len(sizes) == 1:
        return f"{sizes[0]} images; one image is {100 / sizes[0]:.2f} points"
    return f"{sizes[0]}-{sizes[-1]} images per run"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path, help="run folders with final.pt (trained with --val-split)")
    ap.add_argument("--crops", nargs="+", type=float, default=[1.0, 0.9, 0.85, 0.8, 0.75, 0.7])
    ap.add_argument("--data", default=None, help="dataset (default: each checkpoint's)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    res = sweep(args.runs, args.crops, args.data, args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"command": "python benchmarks/test_crop_sweep.py " + " ".join(sys.argv[1:]), "started": started,
            "machine": platform.processor() or platform.machine(), "threads": args.threads,
            "torch": torch.__version__, "python": platform.python_version()}
    (args.out / "test_crop.json").write_text(json.dumps({"meta": meta, "results": res}, indent=1) + "\n")
    md = ["# Test-time centre crop on the validation split", "",
          f"`{meta['command']}`  ",
          f"{started}, {meta['machine']}, {args.threads} thread(s), torch {meta['torch']}. Each run is scored on its "
          f"own --val-split hold-out ({holdout_size(res)}).", "", *table(res, args.crops), ""]
    (args.out / "test_crop.md").write_text("\n".join(md))
    print(f"wrote {args.out / 'test_crop.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
