"""Training throughput (images/s) of GhostNet with each ghost-op implementation, and timm's ghostnet_100.

    python benchmarks/bench_train.py                       # CPU (or CUDA when present), 227 px, batch 32
    python benchmarks/bench_train.py --device cuda --amp   # mixed precision on a GPU

One training step = forward, label-smoothed cross entropy, backward, AdamW step, on synthetic data
already on the device (so the figure is the model's speed, not the data pipeline's). Each model gets
--warmup untimed steps, then --steps timed ones in blocks of --steps-per-timing with one device sync per block
(as train.py reads the loss every few steps); all models run in this one process with the same thread count,
their timed blocks interleaved round robin. --compile adds torch.compile rows, --sync-row the cost of a host
sync after every step. Writes bench_train_<device>.json and .md
into benchmarks/results/ (or --out-dir, or $OUT).
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import images  # noqa: E402
import learner  # noqa: E402
import ghost_ext  # noqa: E402
from common import cpu_name, device_name, load_average, pick_device, sync  # noqa: E402
from model import build_model, count_params  # noqa: E402


class Trainer:
    """One model's training step on a fixed synthetic batch already on the device."""

    def __init__(self, model: nn.Module, args: argparse.Namespace, device: torch.device,
                 compiled: bool = False, item_each_step: bool = False,
                 img_size: int | tuple[int, int] | None = None):
        self.device = device
        self.model = model.to(device).train()
        if args.channels_last:
            self.model.to(memory_format=torch.channels_last)
        # the forward+backward through torch.compile (inductor); the gradient check below runs the eager module
        self.forward = torch.compile(self.model) if compiled else self.model
        # a host sync per step (what train.py did before it read the loss every LOG_EVERY steps)
        self.item_each_step = item_each_step
        self.block = args.steps_per_timing
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-3, weight_decay=0.6)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
        g = torch.Generator(device="cpu").manual_seed(0)
        height, width = images.ImageSize.of(img_size or args.img_size[0]).hw
        self.x = torch.randn(args.batch_size, 3, height, width, generator=g).to(device)
        if args.channels_last:
            self.x = self.x.contiguous(memory_format=torch.channels_last)
        self.y = torch.randint(0, args.num_classes, (args.batch_size,), generator=g).to(device)
        dtype, self.scaler = learner.precision(device, bool(args.amp), args.amp_dtype)  # as train.py chooses
        self.autocast = learner.autocast(device, dtype)
        self.times: list[float] = []

    def step(self, timed: bool) -> None:
        """`block` training steps back to back and one device sync after them, as train.py runs (it looks at
        the loss every LOG_EVERY steps); the time per step is the block's over its length."""
        t0 = time.perf_counter()
        for _ in range(self.block):
            with self.autocast:
                loss = self.criterion(self.forward(self.x).float(), self.y)
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                loss.backward()
                self.optimizer.step()
            if self.item_each_step:
                loss.item()
        sync(self.device)
        if timed:
            self.times.append((time.perf_counter() - t0) / self.block)

    def grads(self) -> list[torch.Tensor | None]:
        """Gradients of one forward/backward (no optimizer step) of a float64 copy of the model on 8 of the
        images, without autocast: a sanity check that the op under test really backpropagates (a step that
        skips part of the backward would look fast). float64 because in float32, and far more in bfloat16,
        training-mode BatchNorm over a batch amplifies rounding differences between two correct
        implementations into gradient differences of 1e-2 and more (see tests/test_op.py)."""
        model = copy.deepcopy(self.model).double()
        torch.manual_seed(0)  # the same dropout masks for every model
        self.criterion(model(self.x[:8].double()), self.y[:8]).backward()
        return [None if p.grad is None else p.grad.detach().clone() for p in model.parameters()]

    def summary(self, batch_size: int) -> dict:
        t = sorted(self.times)
        median = t[len(t) // 2] if len(t) % 2 else (t[len(t) // 2 - 1] + t[len(t) // 2]) / 2
        return {"img_per_s": round(batch_size * len(t) / sum(t), 2),  # over all timed steps
                "img_per_s_median": round(batch_size / median, 2),  # robust to a busy neighbour's bursts
                "ms_per_step_mean": round(1000 * sum(t) / len(t), 2), "ms_per_step_median": round(1000 * median, 2),
                "ms_per_step_min": round(1000 * t[0], 2), "params": count_params(self.model)}


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    p.add_argument("--img-size", type=images.ImageSize.parse, nargs="+", default=[227],
                   help="input size, S or WIDTHxHEIGHT; several: ghostnet (ghost_op=ext, else torch) again at each "
                        "further size")
    p.add_argument("--width", type=float, nargs="+", default=[1.0],
                   help="ghostnet channel multiplier; several: ghostnet again at each further width (and size)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-classes", type=int, default=196)
    p.add_argument("--steps", type=int, default=20, help="timed steps per model (whole blocks)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per model first")
    p.add_argument("--amp", action="store_true", help="autocast (bfloat16 on CPU; bf16 or fp16 on CUDA)")
    p.add_argument("--amp-dtype", default="auto", choices=["auto", "float16", "bfloat16"])
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-timm", action="store_true", help="skip timm's ghostnet_100")
    p.add_argument("--compile", action="store_true",
                   help="also ghostnet (both ops) and timm's ghostnet_100 through torch.compile (compiles first: minutes on CPU)")
    p.add_argument("--sync-row", action="store_true",
                   help="also ghostnet (ghost_op=ext) with loss.item() after every step: what a per-step host sync costs")
    p.add_argument("--steps-per-timing", type=int, default=5,
                   help="steps run back to back per timing (one device sync after them; train.py's LOG_EVERY)")
    p.add_argument("--note", default="", help="free text stored with the results (e.g. 'cores shared')")
    p.add_argument("--out-dir", default=None, help="default: $OUT when set, else benchmarks/results")
    return p


def candidates(args: argparse.Namespace, device: torch.device) -> list[tuple[str, Callable[[], nn.Module], dict]]:
    """(row name, model factory, Trainer options) of every row asked for."""
    w0 = args.width[0]

    def ghostnet(op: str, width: float = w0) -> Callable[[], nn.Module]:
        return lambda: build_model("ghostnet", args.num_classes, ghost_op=op, width=width)

    rows = [("ghostnet (ghost_op=torch)", ghostnet("torch"), {})]
    ops = ["torch"]
    if ghost_ext.has_kernel(device):
        ops.append("ext")
        rows.append(("ghostnet (ghost_op=ext)", ghostnet("ext"), {}))
        if device.type == "cuda":  # auto: per-shape choice between the kernels and the reference (autotune.py)
            ops.append("auto")
            rows.append(("ghostnet (ghost_op=auto)", ghostnet("auto"), {}))
        if args.sync_row:
            rows.append(("ghostnet (ghost_op=ext), loss.item() every step", ghostnet("ext"), {"item_each_step": True}))
    else:
        print(f"note: ghost_ext has no {device.type} kernels built, so no ghost_op=ext row "
              f"(pip install --no-build-isolation -e .)")
    if args.compile:
        for op in ops:
            rows.append((f"ghostnet (ghost_op={op}), torch.compile", ghostnet(op), {"compiled": True}))
    if not args.no_timm:
        try:
            import timm

            def make_timm() -> nn.Module:
                return timm.create_model("ghostnet_100", pretrained=False, num_classes=args.num_classes)
            rows.append(("timm ghostnet_100", make_timm, {}))
            if args.compile:
                rows.append(("timm ghostnet_100, torch.compile", make_timm, {"compiled": True}))
        except ImportError:
            print("note: timm not installed, so no timm ghostnet_100 row")
    # the training cost of another input size or width, measured in the same run
    op = "ext" if "ext" in ops else "torch"
    for width in args.width:
        for size in args.img_size:
            if (width, size) != (w0, args.img_size[0]):
                rows.append((f"ghostnet (ghost_op={op}) width {width:g} at {images.ImageSize.of(size).words}",
                             ghostnet(op, width), {"img_size": size}))
    return rows


def gradient_checks(trainers: list[tuple[str, Trainer]]) -> dict[str, dict]:
    """The ghostnet rows of the first row's shape start from the same weights (same seed), so their first
    gradients (float64) must agree: a missing gradient or a difference over 1e-6 marks that row as suspect."""
    ref = trainers[0][1].grads()
    checks = {}
    for name, tr in trainers:
        g = tr.grads() if tr is not trainers[0][1] else ref
        missing = sum(x is None for x in g)
        rel = None
        same_net = len(g) == len(ref) and all(a is None or b is None or a.shape == b.shape for a, b in zip(g, ref))
        if name.startswith("ghostnet") and same_net and tr.x.shape == trainers[0][1].x.shape:
            # relative to the largest gradient anywhere: some gradients are zero in exact arithmetic
            # (a bias right before a BatchNorm), so a per-tensor ratio would compare rounding noise
            scale = max(b.abs().max().item() for b in ref if b is not None) + 1e-12
            rel = max((a - b).abs().max().item() for a, b in zip(g, ref) if a is not None and b is not None) / scale
        checks[name] = {"params_without_grad": missing, "max_rel_grad_diff_vs_torch": rel}
        if missing or (rel is not None and rel > 1e-6):
            print(f"WARNING: {name}: {missing} parameters got no gradient, max relative gradient difference "
                  f"to ghost_op=torch {rel}: its throughput is not comparable", file=sys.stderr)
    return checks


def time_trainers(trainers: list[tuple[str, Trainer]], args: argparse.Namespace, device: torch.device) -> int:
    """Warm-up blocks, then timed blocks round robin (a change in machine load hits all alike); on CUDA each
    model's peak memory alone. Returns the number of timed blocks."""
    blocks = max(1, args.steps // args.steps_per_timing)
    for name, tr in trainers:
        for _ in range(-(-args.warmup // args.steps_per_timing)):  # whole blocks; a compiled model compiles here
            tr.step(timed=False)
    for _ in range(blocks):
        for name, tr in trainers:
            tr.step(timed=True)
    if device.type == "cuda":
        for name, tr in trainers:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            tr.step(timed=False)
            tr.peak = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return blocks


def markdown(report: dict, args: argparse.Namespace, blocks: int) -> str:
    cuda = report["machine"]["device"].startswith("cuda")
    m = report["machine"]
    lines = [f"# Training throughput ({m['device'].split(':')[0]})", "",
             f"{report['date']}, {m['device_name']}, {report['threads']} threads, load (1 min) "
             f"{m.get('load_1min_before')} before, {m.get('load_1min_after')} after, torch {torch.__version__}, "
             f"{images.ImageSize.of(args.img_size[0]).words} (rows marked otherwise at theirs), "
             f"batch {args.batch_size}, {args.warmup} "
             f"warm-up + {blocks} timed blocks of {args.steps_per_timing} steps (one device sync per block), "
             f"amp {'on' if args.amp else 'off'}{', channels_last' if args.channels_last else ''}.",
             f"Command: `{report['command']}`" + (f"  \nNote: {args.note}" if args.note else ""), "",
             "Timed steps run round robin across the models.", "",
             "| model | params | img/s (all steps) | img/s (median step) | ms/step median | ms/step min "
             "| grads vs ghost_op=torch |" + (" peak MiB | MiB per image |" if cuda else ""),
             "|---|---:|---:|---:|---:|---:|---|" + ("---:|---:|" if cuda else "")]
    for r in report["results"]:
        rel = r["max_rel_grad_diff_vs_torch"]
        check = (f"{r['params_without_grad']} params without grad!" if r["params_without_grad"]
                 else "-" if rel is None else f"max rel diff {rel:.1e}")
        lines.append(f"| {r['model']} | {r['params'] / 1e6:.2f} M | {r['img_per_s']:.1f} | {r['img_per_s_median']:.1f} "
                     f"| {r['ms_per_step_median']:.1f} | {r['ms_per_step_min']:.1f} | {check} |"
                     + (f" {r['peak_mem_mib']:.0f} | {r['peak_mem_mib_per_img']:.1f} |" if "peak_mem_mib" in r else ""))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = get_parser().parse_args(argv)
    try:
        device = pick_device(args.device)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cudnn.benchmark = True
    out_dir = Path(args.out_dir or os.environ.get("OUT") or REPO / "benchmarks" / "results")
    out_dir.mkdir(parents=True, exist_ok=True)

    trainers = []
    for name, make, opts in candidates(args, device):
        torch.manual_seed(0)
        trainers.append((name, Trainer(make(), args, device, **opts)))
    checks = gradient_checks(trainers)
    load_before = load_average()
    blocks = time_trainers(trainers, args, device)
    results = []
    for name, tr in trainers:
        r = {"model": name, **tr.summary(args.batch_size), **checks[name]}
        if device.type == "cuda":
            r["peak_mem_mib"] = tr.peak
            r["peak_mem_mib_per_img"] = round(tr.peak / args.batch_size, 2)
        results.append(r)
        print(f"{name:28s} {r['img_per_s']:9.1f} img/s  (median step {r['ms_per_step_median']:.1f} ms "
              f"= {r['img_per_s_median']:.1f} img/s)", flush=True)

    try:
        import timm
        timm_version = timm.__version__
    except ImportError:
        timm_version = None
    sizes = [images.ImageSize.of(s).json() for s in args.img_size]  # S or [height, width], as before
    report = {
        "benchmark": "train step (forward + backward + AdamW), synthetic data on device",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": shlex.join(["python", *sys.argv]) if argv is None else f"bench_train.main({argv!r})",
        "machine": {"device": str(device), "device_name": device_name(device), "cpu": cpu_name(),
                    "cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "load_1min_before": load_before, "load_1min_after": load_average()},
        "threads": torch.get_num_threads(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "timm": timm_version, "ghost_ext_compiled": ghost_ext.has_extension()},
        "settings": {"img_size": sizes[0], "more_img_sizes": sizes[1:], "width": args.width[0],
                     "more_widths": args.width[1:], "batch_size": args.batch_size, "num_classes": args.num_classes,
                     "steps": args.steps, "warmup": args.warmup, "amp": args.amp, "amp_dtype": args.amp_dtype,
                     "channels_last": args.channels_last, "steps_per_timing": args.steps_per_timing,
                     "compile": args.compile},
        "note": args.note,
        "results": results,
    }
    stem = f"bench_train_{device.type}"
    (out_dir / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / f"{stem}.md").write_text(markdown(report, args, blocks))
    print(f"wrote {out_dir / stem}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
