"""Fused ghost op (ghost_ext, impl="ext") vs its plain-PyTorch reference (impl="torch") at the 32
GhostModule shapes of the reference GhostNet at 227 px.

    python benchmarks/bench_op.py                          # CPU, batch 32, float32 + bfloat16
    python benchmarks/bench_op.py --device cuda            # batch 64 and 256
    python benchmarks/bench_op.py --quick                  # fewer repeats (smoke test)

For every shape: training forward, training forward+backward, eval forward; median times of both
implementations, their ratio, and the memory-traffic floor (bytes that must be read and written,
over the bandwidth of a large tensor copy measured in the same run). On CUDA two times per case:
GPU time from CUDA-graph replays (compare it with the floor; eager timing, flagged in the notes,
where a capture fails) and the eager time of back-to-back Python calls (host overhead included). Also, on CPU, the peak
memory (max RSS, in fresh subprocesses) of one ghostnet training step at batch 32 with each impl.
Writes bench_op_<device>.json and .md into $OUT when set, else benchmarks/results/.
"""
import argparse
import datetime
import functools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import ghost_ext  # noqa: E402
from ghost_ext.autotune import time_call  # noqa: E402
from common import cpu_name  # noqa: E402

try:
    from tqdm import tqdm
except ImportError:  # tqdm is a requirement, but keep the benchmark usable without it
    def tqdm(x, **_):
        return x

# GhostNet 1.0 (Han et al. 2020; timm's cfgs): per bottleneck (kernel, mid channels, out channels, stride).
BOTTLENECKS = [
    (3, 16, 16, 1), (3, 48, 24, 2), (3, 72, 24, 1), (5, 72, 40, 2), (5, 120, 40, 1),
    (3, 240, 80, 2), (3, 200, 80, 1), (3, 184, 80, 1), (3, 184, 80, 1), (3, 480, 112, 1), (3, 672, 112, 1),
    (5, 672, 160, 2), (5, 960, 160, 1), (5, 960, 160, 1), (5, 960, 160, 1), (5, 960, 160, 1),
]


def ghost_shapes(img: int = 227) -> list[dict]:
    """The op's shapes: each bottleneck's ghost1 (-> mid) at its input size and ghost2 (-> out) after
    its stride. x of the op has C = ceil(out / 2) channels; the cheap conv is 3x3 (dw_size)."""
    hw = (img + 2 - 3) // 2 + 1  # stem: 3x3 conv, stride 2, padding 1 -> 114 at 227
    shapes = []
    for i, (_k, mid, out, s) in enumerate(BOTTLENECKS):
        shapes.append(dict(name=f"b{i + 1}.ghost1", C=math.ceil(mid / 2), out=mid, H=hw, W=hw, k=3))
        if s == 2:
            hw = (hw + 2 * (_k // 2) - _k) // 2 + 1
        shapes.append(dict(name=f"b{i + 1}.ghost2", C=math.ceil(out / 2), out=out, H=hw, W=hw, k=3))
    return shapes


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timeit(fn, device: str, repeat: int, warmup: int) -> float:
    """Median seconds of fn() (device events on CUDA, perf_counter on CPU): auto's own timer."""
    return time_call(fn, device, reps=repeat, warmup=warmup)


def copy_bandwidth(device: str, nbytes: int = 256 << 20) -> float:
    """Bytes per second of a large tensor copy, counting bytes read plus bytes written."""
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    t = timeit(lambda: dst.copy_(src), device, repeat=10, warmup=2)
    return 2 * nbytes / t


def _make_set(sh: dict, batch: int, dtype: torch.dtype, device: str, seed: int) -> dict:
    """One set of random (never zero) inputs drawn on the device; float32 params, as under autocast."""
    torch.manual_seed(seed)
    C, OC, H, W, k = sh["C"], sh["out"], sh["H"], sh["W"], sh["k"]
    t = {"x": torch.randn(batch, C, H, W, device=device).to(dtype),
         "w": torch.randn(C, 1, k, k, device=device) / k,
         "g": torch.rand(C, device=device) + 0.5,
         "b": torch.randn(C, device=device),
         "rm": torch.zeros(C, device=device), "rv": torch.ones(C, device=device),
         "gout": torch.randn(batch, OC, H, W, device=device).to(dtype)}
    t["leaves"] = [t[n].clone().requires_grad_() for n in ("x", "w", "g", "b")]
    return t


# "compile": torch.compile (inductor) of the reference composition, the bar a hand-written fused op must
# clear in 2026: inductor fuses BatchNorm, ReLU and the concat by itself (the depthwise conv stays an aten
# call). Default options, as a user writes it (dynamo then recompiles for most new shapes: seconds each on CPU).
IMPLS = ("ext", "torch", "compile")
_compiled = None


def _op(impl: str):
    global _compiled
    if impl == "compile":
        if _compiled is None:
            # shapes x modes x dtypes: past the limit dynamo would quietly run the rest eagerly
            torch._dynamo.config.recompile_limit = 4096
            torch._dynamo.config.accumulated_recompile_limit = 8192
            # ghost_ext's reference entry: it casts float32 weights to a bf16/fp16 x, as autocast would
            _compiled = torch.compile(ghost_ext._reference)
        return _compiled
    return functools.partial(ghost_ext.ghost_concat, impl=impl)


def _calls(impl: str, oc: int) -> dict:
    """mode -> fn(input set). fwd+bwd returns the grads (autograd.grad: nothing accumulates), so the
    same function runs eagerly and inside a CUDA graph with static inputs."""
    op = _op(impl)

    def fwd_train(t):
        with torch.no_grad():
            return op(t["x"], t["w"], t["g"], t["b"], t["rm"], t["rv"], True, 0.1, 1e-5, True, oc)

    def fwd_bwd_train(t):
        out = op(*t["leaves"], t["rm"], t["rv"], True, 0.1, 1e-5, True, oc)
        return torch.autograd.grad(out, t["leaves"], t["gout"])

    def fwd_eval(t):
        with torch.no_grad():
            return op(t["x"], t["w"], t["g"], t["b"], t["rm"], t["rv"], False, 0.1, 1e-5, True, oc)

    return {"train_fwd": fwd_train, "train_fwd_bwd": fwd_bwd_train, "eval_fwd": fwd_eval}


def _passes(repeat: int, n_sets: int) -> int:
    """Passes over the input sets per timing round: about repeat / 3 calls per round, 3 rounds."""
    return max(1, math.ceil(repeat / (3 * n_sets)))


def eager_loop_time(fn, sets: list, repeat: int, warmup: int) -> float:
    """CUDA: seconds per call of back-to-back eager calls (what a Python training loop sees: host
    overhead and launch gaps included), timed with events around passes over the input sets;
    median of 3 rounds of about repeat / 3 calls."""
    for _ in range(warmup):
        for t in sets:
            fn(t)
    torch.cuda.synchronize()
    def one_pass():
        for t in sets:
            fn(t)
    return _event_time(one_pass, _passes(repeat, len(sets)), len(sets))


def _event_time(one_pass, passes: int, calls_per_pass: int) -> float:
    """CUDA: seconds per call, from CUDA events around `passes` runs of one_pass(); median of 3 rounds."""
    times = []
    for _ in range(3):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(passes):
            one_pass()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3 / (passes * calls_per_pass))
    return statistics.median(times)


def graph_time(fn, sets: list, repeat: int) -> tuple[float | None, str]:
    """CUDA: seconds per call of GPU time: one call per input set captured into a CUDA graph (after
    a warm-up on a side stream), replays timed with events, median of 3 rounds of about repeat / 3
    calls. Launch gaps and host overhead vanish, so this is what compares with the floor.
    (None, why) when the capture fails (e.g. a host sync in the op): the caller uses eager timing."""
    graph = None
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for t in sets:
                fn(t)
        torch.cuda.current_stream().wait_stream(s)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for t in sets:
                fn(t)
        graph.replay()
        torch.cuda.synchronize()
        seconds = _event_time(graph.replay, _passes(repeat, len(sets)), len(sets))
        return seconds, ""
    except Exception as e:  # capture refused: report it and time eagerly instead
        torch.cuda.synchronize()
        return None, f"graph capture failed ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})"
    finally:
        del graph


def bench_shape(sh: dict, batch: int, dtype: torch.dtype, device: str, repeat: int, warmup: int,
                impls: tuple[str, ...] = IMPLS) -> dict:
    C, OC, H, W = sh["C"], sh["out"], sh["H"], sh["W"]
    es = torch.tensor([], dtype=dtype).element_size()
    nx, nout = batch * C * H * W * es, batch * OC * H * W * es
    n_sets = 1
    if device == "cuda":
        # rotate among enough input sets that they do not all sit in L2 (else replays time the cache)
        l2 = getattr(torch.cuda.get_device_properties(torch.cuda.current_device()), "L2_cache_size", 50 << 20)
        n_sets = max(1, min(8, math.ceil(2 * l2 / (nx + 2 * nout))))
    sets = [_make_set(sh, batch, dtype, device, seed) for seed in range(n_sets)]
    res, notes = {}, []
    for impl in impls:
        for mode, fn in _calls(impl, OC).items():
            if device == "cuda":
                e = eager_loop_time(fn, sets, repeat, warmup)  # first: its warm-up also initialises lazily
                g, why = graph_time(fn, sets, repeat)
                if why:
                    notes.append(f"{sh['name']} {impl} {mode}: {why}; eager time used")
                res.setdefault(mode, {})[impl] = g if g is not None else e
                res[mode][impl + "_eager"] = e
            else:
                res.setdefault(mode, {})[impl] = timeit(lambda: fn(sets[0]), device, repeat, warmup)
    # floor: x read once + out written once; backward adds grad_out read, x read, grad_x written
    res["bytes"] = {"train_fwd": nx + nout, "train_fwd_bwd": 2 * (nx + nout) + nx, "eval_fwd": nx + nout}
    res["notes"] = notes
    sets.clear()  # free the inputs before the cache is emptied
    if device == "cuda":
        torch.cuda.empty_cache()
    return res


def peak_memory_step(impl: str, batch: int, img: int) -> dict:
    """Max RSS of a fresh process running one ghostnet training step (CPU, float32)."""
    code = f"""
import resource, sys, json, torch
sys.path.insert(0, {str(REPO)!r})
import model
torch.manual_seed(0)
m = model.build_model("ghostnet", 196, ghost_op={impl!r}).train()
x = torch.randn({batch}, 3, {img}, {img}); y = torch.randint(0, 196, ({batch},))
opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
loss = torch.nn.functional.cross_entropy(m(x), y); loss.backward(); opt.step()
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"maxrss_before_MiB": before / 1024, "maxrss_peak_MiB": after / 1024, "step_MiB": (after - before) / 1024}}))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    if r.returncode != 0:
        return {"error": r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit {r.returncode}"}
    return json.loads(r.stdout.strip().splitlines()[-1])


def parse_for_device(ap: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """ap's arguments; exits with one line and status 2 when the op has no kernel on --device."""
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.exit(2, "error: --device cuda but no CUDA device is available; use --device cpu\n")
    if not ghost_ext.has_kernel(args.device):
        ap.exit(2, f"error: ghost_ext has no {args.device} kernel; build it with `pip install --no-build-isolation -e .`\n")
    return args


def machine_info(device: str) -> dict:
    cpu = cpu_name()
    info = {"host": platform.node(), "cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "platform": platform.platform()}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--batch", type=int, nargs="+", help="default: 32 on CPU, 64 256 on CUDA")
    ap.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--img", type=int, default=227)
    ap.add_argument("--repeat", type=int, help="timed calls per case (default 7 CPU, 50 CUDA; --quick: 2 / 10); "
                    "CUDA: 3 rounds of about repeat / 3 calls, for the graph replays and for eager")
    ap.add_argument("--quick", action="store_true", help="few repeats; a smoke test, not a measurement")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses (CPU)")
    ap.add_argument("--no-compile", action="store_true",
                    help="skip the torch.compile baseline (its first call per shape and mode compiles: minutes)")
    ap.add_argument("--note", default="", help="free text stored with the results (e.g. machine load)")
    ap.add_argument("--out", help="output folder (default: $OUT, else benchmarks/results)")
    args = parse_for_device(ap, argv)
    batches = args.batch or ([32] if args.device == "cpu" else [64, 256])
    repeat = args.repeat or ((2 if args.quick else 7) if args.device == "cpu" else (10 if args.quick else 50))
    warmup = 1 if args.device == "cpu" else 2
    out_dir = Path(args.out or os.environ.get("OUT") or REPO / "benchmarks" / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    shapes = ghost_shapes(args.img)
    impls = tuple(i for i in IMPLS if not (i == "compile" and args.no_compile))

    bw = copy_bandwidth(args.device)
    result = {"command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "device": args.device, "machine": machine_info(args.device), "repeat": repeat, "warmup": warmup,
              "copy_bandwidth_GBps": bw / 1e9, "note": args.note, "notes": [], "runs": []}
    if args.device == "cuda":
        result["timing"] = ("ext_ms/torch_ms = GPU time per call from CUDA-graph replays (eager time where the "
                            "capture failed: see notes); *_eager_ms = back-to-back eager calls (host overhead included)")
    modes = ("train_fwd", "train_fwd_bwd", "eval_fwd")
    for batch in batches:
        for dt in args.dtype:
            dtype = getattr(torch, dt)
            rows = []
            for sh in tqdm(shapes, desc=f"{args.device} batch {batch} {dt}"):
                r = bench_shape(sh, batch, dtype, args.device, repeat, warmup, impls)
                row = {**sh, **{m: {"ext_ms": r[m]["ext"] * 1e3, "torch_ms": r[m]["torch"] * 1e3,
                                    "speedup": r[m]["torch"] / r[m]["ext"],
                                    "floor_ms": r["bytes"][m] / bw * 1e3} for m in modes}}
                for m in modes:
                    if "compile" in impls:
                        row[m]["compile_ms"] = r[m]["compile"] * 1e3
                        row[m]["speedup_vs_compile"] = r[m]["compile"] / r[m]["ext"]
                    if args.device == "cuda":
                        for impl in impls:
                            row[m][f"{impl}_eager_ms"] = r[m][f"{impl}_eager"] * 1e3
                row["notes"] = r["notes"]
                result["notes"] += r["notes"]
                rows.append(row)
            totals = {}
            for m in modes:
                e = sum(r[m]["ext_ms"] for r in rows)
                t = sum(r[m]["torch_ms"] for r in rows)
                f = sum(r[m]["floor_ms"] for r in rows)
                totals[m] = {"ext_ms": e, "torch_ms": t, "speedup": t / e, "floor_ms": f, "ext_over_floor": e / f}
                if "compile" in impls:
                    c = sum(r[m]["compile_ms"] for r in rows)
                    totals[m].update(compile_ms=c, speedup_vs_compile=c / e,
                                     shapes_ext_slower_than_compile=sum(r[m]["compile_ms"] < r[m]["ext_ms"] for r in rows))
                if args.device == "cuda":
                    ee = sum(r[m]["ext_eager_ms"] for r in rows)
                    te = sum(r[m]["torch_eager_ms"] for r in rows)
                    totals[m].update(ext_eager_ms=ee, torch_eager_ms=te, eager_speedup=te / ee)
            result["runs"].append({"batch": batch, "dtype": dt, "shapes": rows, "totals": totals})
            print(f"batch {batch} {dt}: " + ", ".join(f"{m} {totals[m]['speedup']:.2f}x" for m in modes)
                  + ("; against torch.compile: " + ", ".join(f"{m} {totals[m]['speedup_vs_compile']:.2f}x" for m in modes)
                     if "compile" in impls else ""), flush=True)
            write(result, out_dir)  # after every run: a time limit that cuts the benchmark keeps what it measured

    if args.device == "cpu" and not args.no_memory:
        if (REPO / "model.py").exists():
            print("peak memory of one ghostnet training step (subprocesses)...", flush=True)
            result["memory"] = {"batch": 32, "img": args.img,
                                "ext": peak_memory_step("ext", 32, args.img),
                                "torch": peak_memory_step("torch", 32, args.img)}
        else:
            result["memory"] = {"error": "model.py not found"}

    write(result, out_dir)
    print(summary(result))
    print(f"wrote {out_dir / f'bench_op_{args.device}.json'} and .md")
    return 0


def write(result: dict, out_dir: Path) -> None:
    tag = result["device"]
    (out_dir / f"bench_op_{tag}.json").write_text(json.dumps(result, indent=1))
    (out_dir / f"bench_op_{tag}.md").write_text(to_markdown(result))


def summary(res: dict) -> str:
    cuda = res["device"] == "cuda"
    head = "graph ms" if cuda else "ms"
    lines = [f"{'batch':>5} {'dtype':>8} | {'mode':<14} {'ext ' + head:>13} {'torch ' + head:>14} {'speedup':>7} {'floor ms':>9}"
             f" | {'compile ' + head:>16} {'ext vs compile':>14}"
             + (f" | {'ext eager':>9} {'torch eager':>11} {'speedup':>7}" if cuda else "")]
    for run in res["runs"]:
        for m, t in run["totals"].items():
            line = (f"{run['batch']:>5} {run['dtype']:>8} | {m:<14} {t['ext_ms']:13.2f} {t['torch_ms']:14.2f} "
                    f"{t['speedup']:6.2f}x {t['floor_ms']:9.2f} | "
                    + (f"{t['compile_ms']:16.2f} {t['speedup_vs_compile']:13.2f}x" if "compile_ms" in t else f"{'-':>16} {'-':>14}"))
            if cuda:
                line += f" | {t['ext_eager_ms']:9.2f} {t['torch_eager_ms']:11.2f} {t['eager_speedup']:6.2f}x"
            lines.append(line)
    for n in res.get("notes", [])[:10]:
        lines.append(f"note: {n}")
    mem = res.get("memory")
    if mem and "ext" in mem:
        for impl in ("ext", "torch"):
            v = mem[impl]
            lines.append(f"peak RSS one training step ({impl}): " +
                         (f"{v['maxrss_peak_MiB']:.0f} MiB (step +{v['step_MiB']:.0f} MiB)" if "error" not in v else v["error"]))
    return "\n".join(lines)


def to_markdown(res: dict) -> str:
    m = res["machine"]
    out = [f"# bench_op ({res['device']})", "",
           f"- date: {res['date']}; command: `{res['command']}`",
           f"- machine: {m['cpu']}, {m['cores']} cores, torch threads {m['threads']}" + (f", {m['gpu']}" if "gpu" in m else ""),
           f"- versions: python {m['python']}, torch {m['torch']} (CUDA {m['cuda']})",
           (f"- GPU time: one call per input set (enough sets to exceed 2x L2) captured in a CUDA graph, "
            f"replays timed with events, median of 3 rounds of about {res['repeat']} // 3 calls; eager: the same calls back "
            f"to back from Python after {res['warmup']} warm-up passes (median of 3 rounds, host overhead included)"
            if res["device"] == "cuda" else f"- median of {res['repeat']} runs after {res['warmup']} warm-up")
           + f"; copy bandwidth {res['copy_bandwidth_GBps']:.1f} GB/s (read + write), used for the floor",
           "- ext = ghost_ext kernels, torch = reference.py (conv2d + batch_norm + relu + cat), compile = "
           "torch.compile (inductor, default options) of reference.py, timed after its first call compiled;"
           " float32 weights/BN tensors for every x dtype (as under autocast)"]
    if res.get("note"):
        out.append(f"- note: {res['note']}")
    out.append("")
    cuda = res["device"] == "cuda"
    if res.get("notes"):
        out += ["", "Notes (graph capture failures fall back to eager timing):", ""] + [f"- {n}" for n in res["notes"]]
        out.append("")
    g = "GPU (graph) " if cuda else ""
    for run in res["runs"]:
        comp = "compile_ms" in run["totals"]["train_fwd"]
        out += [f"## batch {run['batch']}, {run['dtype']}", "",
                f"| mode | ext {g}ms | torch {g}ms | speedup | floor ms | ext / floor |"
                + (f" compile {g}ms | ext vs compile | shapes where compile beats ext |" if comp else "")
                + (" ext eager ms | torch eager ms | eager speedup |" if cuda else ""),
                "|---|---:|---:|---:|---:|---:|" + ("---:|---:|---:|" if comp else "") + ("---:|---:|---:|" if cuda else "")]
        for mode, t in run["totals"].items():
            out.append(f"| {mode} (sum of 32) | {t['ext_ms']:.2f} | {t['torch_ms']:.2f} | {t['speedup']:.2f}x | "
                       f"{t['floor_ms']:.2f} | {t['ext_over_floor']:.1f} |"
                       + (f" {t['compile_ms']:.2f} | {t['speedup_vs_compile']:.2f}x | "
                          f"{t['shapes_ext_slower_than_compile']} of 32 |" if comp else "")
                       + (f" {t['ext_eager_ms']:.2f} | {t['torch_eager_ms']:.2f} | {t['eager_speedup']:.2f}x |" if cuda else ""))
        trio = "/compile" if comp else ""
        out += ["", f"| shape | C | out | HxW | train fwd ext/torch{trio} {g}ms | train fwd+bwd ext/torch{trio} {g}ms | "
                f"eval fwd ext/torch{trio} {g}ms |" + (" train fwd+bwd eager ext/torch ms |" if cuda else ""),
                "|---|---:|---:|---|---|---|---|" + ("---|" if cuda else "")]
        for r in run["shapes"]:
            cells = [f"{r[mo]['ext_ms']:.3f} / {r[mo]['torch_ms']:.3f}"
                     + (f" / {r[mo]['compile_ms']:.3f}" if comp else "") + f" ({r[mo]['speedup']:.2f}x"
                     + (f", {r[mo]['speedup_vs_compile']:.2f}x" if comp else "") + ")"
                     for mo in ("train_fwd", "train_fwd_bwd", "eval_fwd")]
            if cuda:
                fb = r["train_fwd_bwd"]
                cells.append(f"{fb['ext_eager_ms']:.3f} / {fb['torch_eager_ms']:.3f}")
            out.append(f"| {r['name']} | {r['C']} | {r['out']} | {r['H']}x{r['W']} | " + " | ".join(cells) + " |")
        out.append("")
    mem = res.get("memory")
    if mem:
        out += ["## peak memory, one ghostnet training step (CPU, float32, max RSS of a fresh process)", ""]
        if "error" in mem:
            out.append(f"not measured: {mem['error']}")
        else:
            out += ["| impl | peak RSS MiB | growth during the step MiB |", "|---|---:|---:|"]
            for impl in ("ext", "torch"):
                v = mem[impl]
                out.append(f"| {impl} | " + (f"{v['maxrss_peak_MiB']:.0f} | {v['step_MiB']:.0f} |"
                                             if "error" not in v else f"error: {v['error']} | |"))
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
