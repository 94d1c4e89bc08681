"""Where the fused ghost op's time goes: per-kernel device time of the op (impl="ext") and of its
plain-PyTorch reference (impl="torch") at the 32 GhostModule shapes, from torch.profiler.

    python benchmarks/profile_op.py --device cuda                 # batch 64, float32, train fwd+bwd
    python benchmarks/profile_op.py --device cuda --batch 256 --mode eval_fwd
    python benchmarks/profile_op.py --device cpu --quick          # CPU ops instead of kernels (smoke test)

bench_op.py says how fast; this says why. For every shape and impl: the kernels one call launches,
their summed device time ("busy"), and the eager wall time of one call, so that wall - busy is what
launch gaps and host overhead cost. The closing table sums each kernel over the network. Writes
profile_op_<device>.json and .md into $OUT when set, else benchmarks/results/.
"""
import argparse
import datetime
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_op import _calls, _make_set, ghost_shapes, machine_info, parse_for_device, REPO  # noqa: E402


def short_name(name: str) -> str:
    """A kernel's demangled name without its return type, namespaces and parameter list:
    'void ghost::(anonymous namespace)::tiled_fwd_stats_kernel<float, float, 3>(ghost::Geom, ...)'
    -> 'tiled_fwd_stats_kernel<float, float, 3>'."""
    name = re.sub(r"^void ", "", name.strip())
    depth, cut = 0, len(name)
    for i, ch in enumerate(name):  # the parameter list is the first '(' outside template brackets
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "(" and depth == 0 and not name.startswith("(anonymous", i):
            cut = i
            break
    name = name[:cut]
    name = re.sub(r"\(anonymous namespace\)::", "", name)
    name = re.sub(r"\b[A-Za-z_][A-Za-z0-9_]*::", "", name)  # namespaces, at any depth
    return name if len(name) <= 90 else name[:87] + "..."


def wall_time(fn, t: dict, device: str, calls: int) -> float:
    """Seconds per eager call, back to back (host overhead and launch gaps included)."""
    if device == "cuda":
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(calls):
            fn(t)
        b.record()
        b.synchronize()
        return a.elapsed_time(b) / 1e3 / calls
    start = time.perf_counter()
    for _ in range(calls):
        fn(t)
    return (time.perf_counter() - start) / calls


def profile_call(fn, t: dict, device: str, calls: int) -> dict:
    """Per-kernel device time of one call (CUDA: kernels; CPU: the self time of each aten op)."""
    activity = ProfilerActivity.CUDA if device == "cuda" else ProfilerActivity.CPU
    with profile(activities=[activity]) as prof:
        for _ in range(calls):
            fn(t)
        if device == "cuda":
            torch.cuda.synchronize()
    kernels = {}
    for e in prof.key_averages():
        if device == "cuda":
            # kernels, memsets and copies only: the runtime calls that launched them (cudaLaunchKernel, ...)
            # carry their kernels' time too
            if getattr(e, "device_type", DeviceType.CUDA) != DeviceType.CUDA or re.match(r"cu(da)?[A-Z]", e.key):
                continue
            us = e.self_device_time_total or e.device_time_total
        else:
            us = e.self_cpu_time_total
        if us <= 0:
            continue
        k = kernels.setdefault(short_name(e.key), {"us": 0.0, "count": 0.0})
        k["us"] += us / calls
        k["count"] += e.count / calls
    return kernels


def profile_shape(sh: dict, batch: int, dtype: torch.dtype, device: str, mode: str, calls: int) -> dict:
    t = _make_set(sh, batch, dtype, device, seed=0)
    res = {}
    for impl in ("ext", "torch"):
        fn = _calls(impl, sh["out"])[mode]
        for _ in range(3):  # warm-up: lazy initialisation, the op's self-check, the allocator
            fn(t)
        wall = statistics.median(wall_time(fn, t, device, calls) for _ in range(3))
        kernels = profile_call(fn, t, device, calls)
        busy = sum(k["us"] for k in kernels.values())
        res[impl] = {"wall_us": wall * 1e6, "busy_us": busy, "launches": sum(k["count"] for k in kernels.values()),
                     "kernels": dict(sorted(kernels.items(), key=lambda kv: -kv[1]["us"]))}
    del t
    if device == "cuda":
        torch.cuda.empty_cache()
    return res


def totals(rows: list[dict], impl: str) -> dict:
    """Each kernel's time summed over the shapes, largest first."""
    acc = {}
    for r in rows:
        for name, k in r[impl]["kernels"].items():
            a = acc.setdefault(name, {"us": 0.0, "count": 0.0})
            a["us"] += k["us"]
            a["count"] += k["count"]
    return dict(sorted(acc.items(), key=lambda kv: -kv[1]["us"]))


def to_markdown(res: dict) -> str:
    m = res["machine"]
    unit = "kernel" if res["device"] == "cuda" else "op (CPU self time)"
    out = [f"# profile_op ({res['device']}, batch {res['batch']}, {res['dtype']}, {res['mode']})", "",
           f"- date: {res['date']}; command: `{res['command']}`",
           f"- machine: {m['cpu']}, {m['cores']} cores, torch threads {m['threads']}" + (f", {m['gpu']}" if "gpu" in m else ""),
           f"- versions: python {m['python']}, torch {m['torch']} (CUDA {m['cuda']})",
           f"- per call, {res['calls']} calls profiled per shape and impl; busy = summed {unit} time; "
           "wall = eager back-to-back calls timed with events (median of 3), so wall - busy = launch gaps + host overhead",
           "", f"| impl | wall ms (sum of {len(res['shapes'])}) | busy ms | launches, all shapes |", "|---|---:|---:|---:|"]
    for impl in ("ext", "torch"):
        s = res["summary"][impl]
        out.append(f"| {impl} | {s['wall_us'] / 1e3:.3f} | {s['busy_us'] / 1e3:.3f} | {s['launches']:.0f} |")
    for impl in ("ext", "torch"):
        out += ["", f"## {impl}: each {unit} summed over the {len(res['shapes'])} shapes", "",
                "| name | ms | share | calls, all shapes |", "|---|---:|---:|---:|"]
        busy = res["summary"][impl]["busy_us"] or 1.0
        for name, k in res["totals"][impl].items():
            out.append(f"| `{name}` | {k['us'] / 1e3:.3f} | {100 * k['us'] / busy:.0f}% | {k['count']:.0f} |")
    out += ["", "## per shape (us per call)", "",
            "| shape | C | HxW | ext wall | ext busy | ext launches | ext top kernel | torch wall | torch busy |",
            "|---|---:|---|---:|---:|---:|---|---:|---:|"]
    for r in res["shapes"]:
        e, t = r["ext"], r["torch"]
        top = next(iter(e["kernels"].items()), ("-", {"us": 0.0}))
        out.append(f"| {r['name']} | {r['C']} | {r['H']}x{r['W']} | {e['wall_us']:.1f} | {e['busy_us']:.1f} | "
                   f"{e['launches']:.0f} | `{top[0]}` {top[1]['us']:.1f} | {t['wall_us']:.1f} | {t['busy_us']:.1f} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    ap.add_argument("--batch", type=int, help="default: 64 on CUDA, 32 on CPU")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--mode", default="train_fwd_bwd", choices=["train_fwd", "train_fwd_bwd", "eval_fwd"])
    ap.add_argument("--img", type=int, default=227)
    ap.add_argument("--calls", type=int, help="calls profiled per shape and impl (default 10; --quick 2)")
    ap.add_argument("--quick", action="store_true", help="fewer calls and only the first 4 shapes (smoke test)")
    ap.add_argument("--out", help="output folder (default: $OUT, else benchmarks/results)")
    args = parse_for_device(ap, argv)
    batch = args.batch or (64 if args.device == "cuda" else 32)
    calls = args.calls or (2 if args.quick else 10)
    shapes = ghost_shapes(args.img)[: 4 if args.quick else None]
    out_dir = Path(args.out or os.environ.get("OUT") or REPO / "benchmarks" / "results")
    out_dir.mkdir(parents=True, exist_ok=True)

    rows = []
    for sh in shapes:
        print(f"  {sh['name']} ...", end="", flush=True)
        rows.append({**sh, **profile_shape(sh, batch, getattr(torch, args.dtype), args.device, args.mode, calls)})
        print(f" ext {rows[-1]['ext']['wall_us']:.0f} us, torch {rows[-1]['torch']['wall_us']:.0f} us", flush=True)
    res = {"command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "device": args.device, "machine": machine_info(args.device), "batch": batch, "dtype": args.dtype,
           "mode": args.mode, "calls": calls, "shapes": rows,
           "summary": {impl: {key: sum(r[impl][key] for r in rows) for key in ("wall_us", "busy_us", "launches")}
                       for impl in ("ext", "torch")},
           "totals": {impl: totals(rows, impl) for impl in ("ext", "torch")}}
    name = f"profile_op_{args.device}"
    (out_dir / f"{name}.json").write_text(json.dumps(res, indent=1))
    (out_dir / f"{name}.md").write_text(to_markdown(res))
    for impl in ("ext", "torch"):
        s = res["summary"][impl]
        top = ", ".join(f"{n} {k['us'] / 1e3:.2f} ms" for n, k in list(res["totals"][impl].items())[:4])
        print(f"{impl:>5}: wall {s['wall_us'] / 1e3:.2f} ms, busy {s['busy_us'] / 1e3:.2f} ms, "
              f"{s['launches']:.0f} launches; top: {top}")
    print(f"wrote {out_dir / name}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
