"""Size, batch-1 latency and accuracy of every form the model ships in, side by side in one run: PyTorch eager
(BN folded), ONNX float32 and int8 (onnxruntime), ExecuTorch float32 and int8 (XNNPACK), and the in-browser
model (onnxruntime-web, WebAssembly, in headless Chromium).

    python benchmarks/bench_mobile.py --checkpoint runs/<name>/final.pt [--data ../shared/data/crops] [--threads 2]

Accuracy: top-1 / top-5 on the split's photos, decoded once with the checkpoint's preprocessing (the browser
row decodes them itself, in its JavaScript); latency: the median of --runs batch-1 calls, interleaved across
the CPU runtimes (common.time_models); in the browser, session.run timed by the page's clock. int8 files are
calibrated on --calib-count training images of the checkpoint's run (export.py --int8).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import data  # noqa: E402
import export  # noqa: E402
import images  # noqa: E402
import model as M  # noqa: E402
import runs  # noqa: E402
import web_parity  # noqa: E402  (benchmarks/: the browser's logits)
from common import cpu_name, load_average, time_models  # noqa: E402

FORMS = [("ONNX fp32", "onnx", False), ("ONNX int8", "onnx", True), ("ExecuTorch fp32", "pte", False),
         ("ExecuTorch int8", "pte", True)]


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    top5 = logits.topk(5, 1).indices
    return (top5[:, 0] == labels).float().mean().item(), (top5 == labels[:, None]).any(1).float().mean().item()


def browser_latency(site: Path, exe: str, runs_: int) -> float:
    """Median ms of session.run on one input, in the page (its own performance.now clock)."""
    with web_parity.open_page(site, exe) as (_, _, page):
        times = page.evaluate("""async (n) => {
            const p = model.info.preprocess, s = Array.isArray(p.img_size) ? p.img_size : [p.img_size, p.img_size];
            const c = p.grayscale ? 1 : 3, x = new ort.Tensor("float32", new Float32Array(c * s[0] * s[1]), [1, c, s[0], s[1]]);
            const feed = {[model.session.inputNames[0]]: x}, t = [];
            for (let i = 0; i < 3; i++) await model.session.run(feed);
            for (let i = 0; i < n; i++) { const t0 = performance.now(); await model.session.run(feed); t.push(performance.now() - t0); }
            return t; }""", runs_)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "crops"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--calib-count", type=int, default=200)
    ap.add_argument("--limit", type=int, help="the first N test photos only (a smoke run)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "mobile_cpu")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    load_before = load_average()
    ckpt = runs.load_checkpoint(args.checkpoint)
    prep = images.Preprocess.from_dict(ckpt["preprocess"])
    records = data.make_splits(data.find_dataset(args.data))["test"][:args.limit]
    labels = torch.tensor([r.label for r in records])
    x = torch.stack([prep.to_model_input(images.load_image(r.path, prep)[None])[0] for r in records])
    work = Path(tempfile.mkdtemp())
    runners, sizes = {}, {}
    fused = M.fuse_for_inference(runs.model_from_checkpoint(ckpt))
    runners["PyTorch eager (BN folded)"] = lambda b: fused(b)
    sizes["PyTorch eager (BN folded)"] = args.checkpoint.stat().st_size / 2**20
    for name, fmt, int8 in FORMS:
        out = work / f"model{'.int8' if int8 else ''}.{fmt}"
        export.export(args.checkpoint, fmt, out, verify=False, int8=int8, calib_count=args.calib_count,
                      threads=args.threads, log=lambda s: None)
        runners[name], sizes[name] = export.load_runner(out, fmt, args.threads), out.stat().st_size / 2**20
    with torch.inference_mode():
        times = time_models(runners, {n: x[:1] for n in runners}, args.runs, warmup=5, desc="latency")
        rows = []
        for name, run in runners.items():
            logits = torch.cat([run(b) for b in x.split(1)]).float()
            top1, top5 = accuracy(logits, labels)
            rows.append({"form": name, "size_mb": sizes[name], "latency_ms": 1e3 * statistics.median(times[name]),
                         "top1": top1, "top5": top5})
    exe = os.environ.get("GHOSTCARS_CHROMIUM") or shutil.which("chromium")
    if exe:
        site = work / "web"
        export.export(args.checkpoint, "web", site, verify=False, log=lambda s: None)
        web, info = web_parity.page_logits(site, [r.path for r in records], exe)
        top1, top5 = accuracy(web, labels)
        rows.append({"form": f"in the browser (onnxruntime-web, WASM, {info['threads']} threads)",
                     "size_mb": sum(f.stat().st_size for f in site.iterdir()) / 2**20,
                     "latency_ms": browser_latency(site, exe, args.runs), "top1": top1, "top5": top5})
    res = {"rows": rows, "photos": len(records), "threads": args.threads, "machine": f"{cpu_name()}, {platform.machine()}",
           "load_before": load_before, "load_after": load_average(), "torch": torch.__version__,
           "checkpoint": str(args.checkpoint),
           "command": shlex.join(["python", "benchmarks/bench_mobile.py", *(sys.argv[1:] if argv is None else argv)]),
           "date": datetime.datetime.now().isoformat(timespec="seconds")}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_mobile.json").write_text(json.dumps(res, indent=2) + "\n")
    md = [f"# Size, latency and accuracy of each shipped form ({len(records)} photos of cars_test, {args.data})", "",
          f"- {res['date']}; {res['machine']}; {args.threads} threads; load (1 min) {load_before} before, "
          f"{res['load_after']} after; torch {res['torch']}; command: `{res['command']}`",
          "- size: the file(s) a device needs (the browser row: the whole exported folder, runtime included);"
          " latency: batch 1 at the trained size, median", "",
          "| form | size MB | latency ms | top-1 % | top-5 % |", "|---|---:|---:|---:|---:|"]
    md += [f"| {r['form']} | {r['size_mb']:.2f} | {r['latency_ms']:.2f} | {100 * r['top1']:.2f} | {100 * r['top5']:.2f} |"
           for r in rows]
    (args.out / "bench_mobile.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
