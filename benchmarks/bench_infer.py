"""Inference speed of GhostNet against the usual mobile architectures, all treated alike.

    python benchmarks/bench_infer.py                       # CPU, torch's thread count, 227 px
    python benchmarks/bench_infer.py --threads 1 --runs 100 --img-size 224
    python benchmarks/bench_infer.py --device cuda

Every model is measured in the same best form: BatchNorm folded (model.fuse_for_inference; timm's
ghostnet_100 goes through the same function), eval, torch.inference_mode, contiguous float32 input,
the same --compile / --channels-last setting for all. ghostnet is timed twice, with the fused C++
ghost op (ghost_ext, impl "ext") and with the plain-PyTorch op, to show what the extension buys, and
once more with the fused op but through its submodules' forward() instead of the folded model's
functional forward_fused path, to show what that second forward path buys.
The timing rounds are interleaved (each round runs every model once, starting with a different model
each round), so a slow phase of a shared machine hits all models alike; figures are medians.
Results: benchmarks/results/infer_<device>.json and .md, with machine, threads, versions, date, command.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import shlex
import statistics
import sys
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import ghost_ext  # noqa: E402
import model as M  # noqa: E402
from common import cpu_name, load_average, time_models  # noqa: E402  (the same interleaved timer as evaluate.py)

PEERS = ("ghostnet_official", "mobilenet_v3_large", "mobilenet_v3_small", "shufflenet_v2_x1_0", "efficientnet_b0")
NUM_CLASSES = 196


def build_models(ghost_ops: list[str]) -> tuple[dict[str, torch.nn.Module], dict[str, str]]:
    """name -> unfused model (eval), name -> note."""
    models, notes = {}, {}
    for op in ghost_ops:
        models[f"ghostnet [{op}]"] = M.build_model("ghostnet", NUM_CLASSES, ghost_op=op)
        notes[f"ghostnet [{op}]"] = "reference-work GhostNet, out_channels 320"
    # the official variant has GhostModules too: give it the best op available, like ghostnet
    best_op = "ext" if "ext" in ghost_ops else "torch"
    for arch in PEERS:
        kw = {"ghost_op": best_op} if arch.startswith("ghostnet") else {}
        models[arch] = M.build_model(arch, NUM_CLASSES, **kw)
        notes[arch] = f"ghost op {best_op}" if kw else "torchvision"
    try:
        import timm
        models["timm ghostnet_100"] = timm.create_model("ghostnet_100", pretrained=False, num_classes=NUM_CLASSES)
        notes["timm ghostnet_100"] = f"timm {timm.__version__}"
    except ImportError:
        notes["timm ghostnet_100"] = "skipped: timm not installed"
    return {k: v.eval() for k, v in models.items()}, notes


def module_calls(folded: torch.nn.Module) -> torch.nn.Module:
    """The same BN-folded GhostNet, run through every submodule's forward() instead of the functional
    forward_fused path (same weights, same numbers): the row that shows what forward_fused buys."""
    variant = copy.deepcopy(folded)
    for m in variant.modules():
        if isinstance(m, M.GhostNet):
            m.fused = False
        elif isinstance(m, M.GhostModule):
            m.path = "op"
    return variant


def quartiles(v: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(v, n=4) if len(v) > 1 else [v[0]] * 3
    return q[0], statistics.median(v), q[2]


def markdown(result: dict, args: argparse.Namespace) -> list[str]:
    """The .md table of one run (result as written to the .json)."""
    machine, versions, threads, rows = result["machine"], result["versions"], result["threads"], result["rows"]
    has_ext, skipped = result["ghost_ext_built"], result["skipped"]
    md = [f"# Inference speed, {args.device.upper()}, {args.img_size} px, BN folded",
          "",
          f"{result['date']} · {machine['cpu']}" + (f" · {machine.get('gpu')}" if "gpu" in machine else "")
          + f" · {threads} threads · load (1 min) {machine.get('load_1min_before')} before, "
          f"{machine.get('load_1min_after')} after · torch {versions['torch']}, torchvision {versions.get('torchvision', '-')}, "
          f"timm {versions.get('timm', '-')} · ghost_ext built: {has_ext}",
          "",
          f"`{result['command']}`",
          "",
          f"Latency: median of {args.runs} runs at batch 1 (interquartile range in brackets); throughput: "
          f"batch {args.batch}, median of {args.batch_runs}. Rounds interleaved across models; eval, "
          f"inference_mode, compile={args.compile}, channels_last={args.channels_last} for all.",
          "",
          "| model | params (M) | MMACs | latency b1 (ms) | throughput b32 (img/s) | note |",
          "|---|---:|---:|---:|---:|---|"]
    for r in rows:
        md.append(f"| {r['model']} | {r['params'] / 1e6:.2f} | {r['macs'] / 1e6:.0f} | "
                  f"{r['latency_ms']:.2f} [{r['latency_ms_q1']:.2f}–{r['latency_ms_q3']:.2f}] | "
                  f"{r['throughput']:.1f} | {r['note']} |")
    for k, v in skipped.items():
        md.append(f"| {k} | | | | | {v} |")
    return md


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--img-size", type=int, default=227, help="the reference work's input size")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads for every model (default: torch's)")
    ap.add_argument("--runs", type=int, default=60, help="timed rounds at batch 1 (median reported)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--batch-runs", type=int, default=12, help="timed rounds at --batch")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--compile", action="store_true", help="torch.compile every model (same for all)")
    ap.add_argument("--channels-last", action="store_true", help="channels_last for every model and input")
    ap.add_argument("--only", nargs="+", help="subset of model names (substring match)")
    ap.add_argument("--out", type=Path, default=None,
                    help="output prefix (default: benchmarks/results/infer_<device>)")
    cli_args = list(argv if argv is not None else sys.argv[1:])
    args = ap.parse_args(cli_args)

    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda: CUDA is not available here", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    device = torch.device(args.device)
    warnings.filterwarnings("ignore", message="ghost_ext")

    has_ext = ghost_ext.has_extension()
    ghost_ops = ["ext", "torch"] if has_ext else ["torch"]
    models, notes = build_models(ghost_ops)
    if not has_ext:
        notes["ghostnet [ext]"] = "skipped: ghost_ext extension not built (pip install --no-build-isolation -e .)"
    if args.only:
        models = {k: v for k, v in models.items() if any(s in k for s in args.only)}

    static, fused = {}, {}
    for name, net in models.items():
        static[name] = {"params": M.count_params(net), "macs": M.count_macs(net, args.img_size)}
        f = M.fuse_for_inference(net)
        n_bn = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in f.modules())
        # the reference ghostnet keeps an identity BN per cheap branch on purpose (ghost_concat reads it)
        static[name]["bn_left"] = n_bn
        f = f.to(device)
        if args.channels_last:
            f = f.to(memory_format=torch.channels_last)
        if args.compile:
            f = torch.compile(f)
        fused[name] = f
    best = "ghostnet [ext]" if "ghostnet [ext]" in fused else "ghostnet [torch]" if "ghostnet [torch]" in fused else None
    if best is not None:
        name = f"{best}, module calls"
        fused[name], static[name] = module_calls(fused[best]), static[best]
        notes[name] = "BN folded, but submodule forward() calls instead of forward_fused"

    def inp(b: int) -> torch.Tensor:
        x = torch.randn(b, 3, args.img_size, args.img_size, device=device)
        return x.contiguous(memory_format=torch.channels_last) if args.channels_last else x

    x1, xb = inp(1), inp(args.batch)
    load_before = load_average()
    t1 = time_models(fused, {n: x1 for n in fused}, args.runs, args.warmup, "batch 1")
    tb = time_models(fused, {n: xb for n in fused}, args.batch_runs, max(1, args.warmup // 2), f"batch {args.batch}")

    rows = []
    for name in fused:
        q1, med, q3 = quartiles(t1[name])
        bq1, bmed, bq3 = quartiles(tb[name])
        rows.append({"model": name, "note": notes.get(name, ""), **static[name],
                     "latency_ms": med * 1e3, "latency_ms_q1": q1 * 1e3, "latency_ms_q3": q3 * 1e3,
                     "throughput": args.batch / bmed, "throughput_q1": args.batch / bq3,
                     "throughput_q3": args.batch / bq1})
    skipped = {k: v for k, v in notes.items() if v.startswith("skipped")}

    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("torchvision", "timm"):
        try:
            versions[mod] = __import__(mod).__version__
        except ImportError:
            pass
    machine = {"cpu": cpu_name(), "cores": os.cpu_count(), "platform": platform.platform(),
               "load_1min_before": load_before, "load_1min_after": load_average()}
    if device.type == "cuda":
        machine["gpu"] = torch.cuda.get_device_name(0)
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python " + " ".join(shlex.quote(a) for a in ["benchmarks/bench_infer.py", *cli_args]),
        "machine": machine, "device": args.device, "threads": threads, "versions": versions,
        "ghost_ext_built": has_ext,
        "settings": {"img_size": args.img_size, "num_classes": NUM_CLASSES, "runs_batch1": args.runs,
                     "batch": args.batch, "runs_batch": args.batch_runs, "warmup": args.warmup,
                     "compile": args.compile, "channels_last": args.channels_last, "bn_folded": True,
                     "interleaved": True, "inference_mode": True},
        "rows": rows, "skipped": skipped,
    }

    out = args.out or REPO / "benchmarks" / "results" / f"infer_{args.device}"
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(str(out) + ".json").write_text(json.dumps(result, indent=2) + "\n")
    md = markdown(result, args)
    Path(str(out) + ".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    print(f"\nwrote {out}.json and {out}.md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
