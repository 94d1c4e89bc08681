"""The on-device page against predict.py on every photo of a split: the page's JavaScript decodes and
preprocesses each photo in headless Chromium and runs the model with onnxruntime-web (offline, as on a phone);
predict.py's path (Pillow + PyTorch, BN folded) gives the reference logits.

    python benchmarks/web_parity.py --checkpoint runs/<name>/final.pt [--data ../shared/data/crops] [--limit N]

Reports top-1 agreement, top-5 overlap, the largest softmax-probability difference, and both top-1 accuracies,
into --out (web_parity.json / .md). Needs chromium and playwright (as tests/test_webapp.py) and `npm ci` in web/.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import platform
import os
import shlex
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import data  # noqa: E402
import export  # noqa: E402
import images  # noqa: E402
import model as M  # noqa: E402
import runs  # noqa: E402
import serve  # noqa: E402
import webapp  # noqa: E402
from common import cpu_name  # noqa: E402


def torch_logits(ckpt: dict, paths: list[str], batch: int = 64) -> torch.Tensor:
    prep = images.Preprocess.from_dict(ckpt["preprocess"])
    net = M.fuse_for_inference(runs.model_from_checkpoint(ckpt))
    out = []
    with torch.inference_mode():
        for i in tqdm(range(0, len(paths), batch), desc="predict.py's logits", leave=False):
            x = torch.stack([images.load_image(p, prep) for p in paths[i:i + batch]])
            out.append(net(prep.to_model_input(x)).float())
    return torch.cat(out)


@contextlib.contextmanager
def open_page(site: Path, chromium: str):
    """The exported page served from loopback (serve.py --on-device) in headless Chromium at a phone's width,
    loaded and ready; yields (browser, context, page). Shuts both down after."""
    from playwright.sync_api import sync_playwright
    s = serve.Server(("127.0.0.1", 0), None, max_bytes=2**20, quiet=True, site=serve.site_files(site))
    threading.Thread(target=s.serve_forever, daemon=True).start()
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            context = browser.new_context(viewport={"width": 390, "height": 844}, device_scale_factor=2,
                                          is_mobile=True, has_touch=True)  # a phone's screen
            page = context.new_page()
            page.goto(f"http://127.0.0.1:{s.server_address[1]}/")
            page.wait_for_function("document.getElementById('status').textContent === 'Ready.'", timeout=120_000)
            yield browser, context, page
            browser.close()
    finally:
        s.shutdown()
        s.server_close()


def page_logits(site: Path, paths: list[str], chromium: str, screenshot: Path | None = None
                ) -> tuple[torch.Tensor, dict]:
    out = []
    with open_page(site, chromium) as (browser, context, page):
        info = {"browser": f"Chromium {browser.version} (headless)"}
        page.evaluate("navigator.serviceWorker.ready.then(() => true)")
        info["threads"] = page.evaluate("ort.env.wasm.numThreads")
        context.set_offline(True)  # as on a phone after the first load: nothing leaves the page
        t0 = time.perf_counter()
        for p in tqdm(paths, desc="the page's logits", leave=False):
            page.set_input_files("#file", p)
            page.wait_for_function(f"document.getElementById('status').textContent === {json.dumps(Path(p).name)}",
                                   timeout=60_000)
            out.append(torch.tensor(json.loads(page.inner_text("#logits"))))
        info["seconds_per_photo"] = (time.perf_counter() - t0) / max(1, len(paths))
        if screenshot is not None:  # the page as the last photo left it
            page.screenshot(path=str(screenshot), full_page=True)
    return torch.stack(out), info


def compare(web: torch.Tensor, ref: torch.Tensor, labels: torch.Tensor) -> dict:
    pw, pr = web.softmax(1), ref.softmax(1)
    t5w, t5r = web.topk(5, 1).indices, ref.topk(5, 1).indices
    overlap = torch.tensor([len(set(a.tolist()) & set(b.tolist())) / 5 for a, b in zip(t5w, t5r)])
    return {"photos": len(labels), "top1_agree": (web.argmax(1) == ref.argmax(1)).float().mean().item(),
            "top5_overlap": overlap.mean().item(), "max_prob_diff": (pw - pr).abs().max().item(),
            "max_logit_diff": (web - ref).abs().max().item(),
            "top1_page": (web.argmax(1) == labels).float().mean().item(),
            "top1_predict": (ref.argmax(1) == labels).float().mean().item()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "crops"))
    ap.add_argument("--split", default="test", choices=["test", "val", "train"])
    ap.add_argument("--limit", type=int, help="the first N photos only (a smoke run)")
    ap.add_argument("--site", type=Path, help="an exported page (default: export the checkpoint into a temp folder)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "web_parity")
    ap.add_argument("--screenshot", type=Path, help="a phone-width screenshot of the page after the last photo")
    args = ap.parse_args(argv)
    exe = os.environ.get("GHOSTCARS_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        print("error: no chromium on PATH (apt-get install chromium; pip install playwright)", file=sys.stderr)
        return 2
    ckpt = runs.load_checkpoint(args.checkpoint)
    records = data.make_splits(data.find_dataset(args.data))[args.split][:args.limit]
    paths, labels = [r.path for r in records], torch.tensor([r.label for r in records])
    site = args.site
    if site is None:
        site = Path(tempfile.mkdtemp()) / "web"
        export.export(args.checkpoint, "web", site, verify=False, log=lambda s: None)
    ref = torch_logits(ckpt, paths)
    web, info = page_logits(site, paths, exe, args.screenshot)
    res = {"metrics": compare(web, ref, labels), **info, "checkpoint": str(args.checkpoint), "data": args.data,
           "split": args.split,
           "command": shlex.join(["python", "benchmarks/web_parity.py", *(sys.argv[1:] if argv is None else argv)]),
           "machine": f"{cpu_name()}, {platform.machine()}", "torch": torch.__version__,
           "onnxruntime_web": webapp.ort_version(), "date": datetime.datetime.now().isoformat(timespec="seconds")}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "web_parity.json").write_text(json.dumps(res, indent=2) + "\n")
    m = res["metrics"]
    md = [f"# The on-device page against predict.py ({m['photos']} photos of {args.split} in {args.data})", "",
          f"- {res['date']}; {res['machine']}; {info['browser']}, onnxruntime-web {res['onnxruntime_web']} "
          f"(WebAssembly, {info['threads']} threads), torch {res['torch']}; command: `{res['command']}`", "",
          "| top-1 agreement | top-5 overlap | largest softmax difference | largest logit difference | "
          "top-1 (page) | top-1 (predict.py) | s per photo in the page |", "|---:|---:|---:|---:|---:|---:|---:|",
          f"| {100 * m['top1_agree']:.2f} % | {100 * m['top5_overlap']:.2f} % | {m['max_prob_diff']:.2e} | "
          f"{m['max_logit_diff']:.2e} | {100 * m['top1_page']:.2f} % | {100 * m['top1_predict']:.2f} % | "
          f"{info['seconds_per_photo']:.3f} |", ""]
    (args.out / "web_parity.md").write_text("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
