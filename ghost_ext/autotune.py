"""impl="auto" on CUDA: per call signature, the faster of the fused kernels and the reference, as
torch.backends.cudnn.benchmark picks a convolution algorithm.

On the first call with a new signature (shape, dtype, memory format, training, relu, out_channels, device) the
kernels are checked against the reference at that very shape (forward, and backward when training); if they
pass, both are timed on the device and the faster is kept for the process. The extension must win by more
than `noise` (a relative margin): within the timing noise the reference, what PyTorch already does, stays.
A family that fails the check at a shape is never used there. The cost is a few milliseconds per
signature, once (GhostNet has 32 GhostModule shapes). Under torch.use_deterministic_algorithms the choice
must not depend on a timing, so it is fixed: the kernels wherever they pass the check (they are bitwise
reproducible), the reference elsewhere.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

Signature = tuple


def signature(x: torch.Tensor, training: bool, relu: bool, out_channels: int, weight: torch.Tensor) -> Signature:
    fmt = "nhwc" if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() \
        else "nchw"
    return (x.device, x.dtype, tuple(x.shape), fmt, tuple(weight.shape), bool(training), bool(relu), int(out_channels))


def time_call(fn: Callable[[], object], device: torch.device | str, reps: int = 5, warmup: int = 1) -> float:
    """Median seconds of fn() after `warmup` calls; CUDA events on a GPU (no host timing of async work).
    Also the op benchmark's timer (benchmarks/bench_op.py)."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


class Chooser:
    """Keeps one decision ("ext" or "torch") per signature. `check(impl_fn_args) -> bool` and
    `timer(fn, device) -> seconds` are injectable (the tests use fakes)."""

    def __init__(self, run: Callable, check: Callable | None = None, timer: Callable | None = None,
                 noise: float = 0.05):
        self.run = run  # run(impl, args) -> output, the op itself (with autograd when training)
        self.check = check or self._check
        self.timer = timer or time_call
        self.noise = noise
        self.decisions: dict[Signature, str] = {}
        self.timings: dict[Signature, tuple[float, float]] = {}  # (ext, torch) seconds, for the benchmarks

    def choose(self, sig: Signature, args: tuple) -> str:
        hit = self.decisions.get(sig)
        if hit is not None:
            return hit
        decision = self._decide(sig, args)
        self.decisions[sig] = decision
        return decision

    def _decide(self, sig: Signature, args: tuple) -> str:
        try:
            if not self.check(args):
                return "torch"
        except Exception:  # a kernel that does not run at this shape is a failed check, not a crash
            return "torch"
        if torch.are_deterministic_algorithms_enabled():
            return "ext"
        device = args[0].device
        t_ext = self.timer(lambda: self._step("ext", args), device)
        t_ref = self.timer(lambda: self._step("torch", args), device)
        self.timings[sig] = (t_ext, t_ref)
        return "ext" if t_ext < t_ref * (1.0 - self.noise) else "torch"

    def _step(self, impl: str, args: tuple) -> None:
        """What a training step or an inference call costs: forward, and backward when training."""
        x, weight, bn_w, bn_b, rm, rv, training = args[:7]
        if not training:
            with torch.no_grad():
                self.run(impl, (x, weight, bn_w, bn_b, None if rm is None else rm.clone(),
                                None if rv is None else rv.clone(), *args[6:]))
            return
        leaves = [t.detach().requires_grad_() for t in (x, weight, bn_w, bn_b)]
        out = self.run(impl, (*leaves, None if rm is None else rm.clone(), None if rv is None else rv.clone(),
                              *args[6:]))
        out.backward(torch.ones_like(out))

    def _check(self, args: tuple) -> bool:
        """The kernels against the reference at this shape: outputs (and gradients when training) within a
        relative error that fits the dtype (float32 accumulation in both)."""
        x, weight, bn_w, bn_b, rm, rv, training = args[:7]
        tol = 2e-2 if x.dtype in (torch.float16, torch.bfloat16) else 1e-3
        g = torch.Generator(device="cpu").manual_seed(0)
        gout = None
        results = []
        for impl in ("ext", "torch"):
            leaves = [t.detach().clone().requires_grad_(bool(training)) for t in (x, weight, bn_w, bn_b)]
            r_m = None if rm is None else rm.clone()
            r_v = None if rv is None else rv.clone()
            with torch.enable_grad():
                out = self.run(impl, (*leaves, r_m, r_v, *args[6:]))
                got = [out.detach()]
                if training:
                    if gout is None:
                        gout = torch.randn(out.shape, generator=g).to(out.device, out.dtype)
                    got += [t.detach() for t in torch.autograd.grad(out, leaves, gout)]
            results.append(got)
        for a, b in zip(*results):
            a, b = a.double(), b.double()
            if not torch.isfinite(a).all() or (a - b).norm() > tol * b.norm().clamp_min(1e-6):
                return False
        return True
