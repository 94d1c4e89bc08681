"""ghost_ext: the cheap branch + concat of a GhostModule as one op.

    out = ghost_ext.ghost_concat(x, dw.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                                 training, bn.momentum, bn.eps, relu, out_channels, impl="auto")

computes cat([x, relu?(bn(depthwise_conv(x)))], 1)[:, :out_channels] (see reference.py) with the
compiled kernels in csrc/ when they are built (`pip install --no-build-isolation -e .`), else with
the plain-PyTorch reference. impl: "auto" = the extension when built and it has a kernel for x's
device (on CUDA after a one-off self-check against the reference), else the reference with one
warning; "ext" = the extension's kernels, always (RuntimeError when missing; no self-check, so
tests see the kernels themselves); "torch" = the reference.
"""
import warnings

import torch

from . import reference

__all__ = ["ghost_concat", "has_extension"]

try:
    from . import _C  # noqa: F401  (loading the library registers torch.ops.ghost_ext.*)
    from . import ops  # noqa: F401  (fake kernels + autograd)
    _EXT_ERROR = None
except ImportError as e:  # not built, or built against another torch
    _EXT_ERROR = str(e)

_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_warned: set[str] = set()
_cuda_ok: dict[int, bool] = {}  # self-check result per CUDA device index


def has_extension() -> bool:
    """True when the compiled extension ghost_ext._C is importable."""
    return _EXT_ERROR is None


# Which device types the build has kernels for; looked up once (a dict lookup traces under dynamo).
_KERNELS = {t: _EXT_ERROR is None and torch._C._dispatch_has_kernel_for_dispatch_key("ghost_ext::ghost_concat", key)
            for t, key in (("cpu", "CPU"), ("cuda", "CUDA"))}


def has_kernel(device: torch.device | str) -> bool:
    """True when the extension is built and has kernels for this device type (cpu, cuda)."""
    dev_type = device if isinstance(device, str) else device.type
    return has_extension() and _KERNELS.get(dev_type.split(":")[0], False)


def _warn_once(key: str, msg: str) -> None:
    if key not in _warned and not torch.compiler.is_compiling():
        _warned.add(key)
        warnings.warn(msg, stacklevel=3)


def _use_ext(impl: str, x: torch.Tensor) -> bool:
    if impl == "torch":
        return False
    if impl not in ("auto", "ext"):
        raise ValueError(f"ghost_concat: impl={impl!r}; choose one of: auto, ext, torch")
    if not has_extension():
        if impl == "ext":
            raise RuntimeError("ghost_ext: the C++ extension is not built; run `pip install --no-build-isolation -e .` "
                               f"in the repository root ({_EXT_ERROR})")
        _warn_once("missing", "ghost_ext: C++ extension not built, using the plain-PyTorch reference")
        return False
    if not has_kernel(x.device) or x.dtype not in _DTYPES:
        if impl == "ext":
            raise RuntimeError(f"ghost_ext: the extension has no kernel for {x.device.type} / {x.dtype}; "
                               "rebuild with nvcc present (GHOST_EXT_CUDA=1) or use impl='torch'")
        _warn_once(f"nokernel-{x.device.type}-{x.dtype}",
                   f"ghost_ext: C++ extension has no kernel for {x.device.type} / {x.dtype}, "
                   "using the plain-PyTorch reference")
        return False
    if impl == "auto" and x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16):
        # Measured (benchmarks/results/bench_op_cpu.md): the CPU kernels are 0.7-0.9x the reference in
        # bfloat16, whose oneDNN convolutions are fast on AVX-512 CPUs; "ext" still forces them.
        return False
    if impl == "auto" and x.is_cuda and not _cuda_self_check(x.device):
        return False
    return True


def _cuda_self_check(device: torch.device) -> bool:
    """First use on each CUDA device: compare the kernels with the reference on a small random input
    (forward and backward, training and eval; a few ms). On mismatch warn once and use the reference."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx in _cuda_ok:
        return _cuda_ok[idx]
    if torch.compiler.is_compiling() or torch.cuda.is_current_stream_capturing():
        return True  # cannot run eagerly here; the first eager call checks
    ok, why = True, ""
    # Compare in full float32: with TF32 allowed (cuDNN's default) the reference itself is only
    # ~1e-3 accurate. Restored in finally.
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.inference_mode(False), torch.enable_grad():
            g = torch.Generator(device="cpu").manual_seed(1234)
            dev = torch.device("cuda", idx)
            x = torch.randn(3, 6, 5, 7, generator=g).to(dev)
            w = torch.randn(6, 1, 3, 3, generator=g).to(dev)
            gam = (torch.rand(6, generator=g) + 0.5).to(dev)
            bet = torch.randn(6, generator=g).to(dev)
            gout = torch.randn(3, 11, 5, 7, generator=g).to(dev)
            for training in (True, False):
                outs = []
                for use in ("ext", "torch"):
                    ts = [t.clone().requires_grad_() for t in (x, w, gam, bet)]
                    rm, rv = torch.zeros(6, device=dev), torch.ones(6, device=dev)
                    out = ghost_concat(*ts, rm, rv, training, 0.1, 1e-5, True, 11, impl=use)
                    grads = torch.autograd.grad(out, ts, gout)
                    outs.append([out, *grads, rm, rv])
                for a, b in zip(*outs):
                    if not torch.allclose(a, b, rtol=1e-3, atol=1e-3):
                        ok, why = False, f"max abs diff {(a - b).abs().max().item():.3g} (training={training})"
                        break
    except Exception as e:  # a kernel that does not run is a failed check, not a crash
        ok, why = False, f"{type(e).__name__}: {e}"
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    if not ok:
        warnings.warn(f"ghost_ext: CUDA kernels disagree with the reference on cuda:{idx} ({why}); "
                      "using the plain-PyTorch reference on this device", stacklevel=3)
    _cuda_ok[idx] = ok
    return ok


def _reference(x, weight, bn_weight, bn_bias, running_mean, running_var, training, momentum, eps, relu,
               out_channels):
    # Outside autocast, bf16/fp16 x with float32 weights (what autocast hands the op) would make
    # F.conv2d fail on mixed dtypes; cast the weight, as autocast itself would.
    if weight.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
        weight = weight.to(x.dtype)
    return reference.ghost_concat(x, weight, bn_weight, bn_bias, running_mean, running_var, training,
                                  momentum, eps, relu, out_channels)


# Dispatch decisions already taken: (impl, device, dtype) -> True once the extension was chosen
# (after the CUDA self-check). The hot path is then one dict lookup; a negative decision is not
# cached so its checks (and one-time warning) run as before.
_use_ext_cache: dict = {}


def ghost_concat(x: torch.Tensor, weight: torch.Tensor, bn_weight: torch.Tensor, bn_bias: torch.Tensor,
                 running_mean: torch.Tensor, running_var: torch.Tensor, training: bool, momentum: float,
                 eps: float, relu: bool, out_channels: int, impl: str = "auto") -> torch.Tensor:
    """cat([x, relu?(bn(depthwise_conv(x)))], 1)[:, :out_channels]; in training the batch statistics
    normalise and running_mean / running_var are updated in place, as nn.BatchNorm2d does.

    impl: "auto" (extension when built for x's device, else the reference with one warning; on CPU
    bfloat16/float16 input takes the reference, which is faster there), "ext" (the extension, error
    when missing) or "torch" (the reference)."""
    key = (impl, x.device, x.dtype)
    if _EXT_ERROR is not None or key not in _use_ext_cache:  # _EXT_ERROR: tests monkeypatch it
        if not _use_ext(impl, x):
            return _reference(x, weight, bn_weight, bn_bias, running_mean, running_var, training, momentum,
                              eps, relu, out_channels)
        if not torch.compiler.is_compiling() and not (x.is_cuda and torch.cuda.is_current_stream_capturing()):
            _use_ext_cache[key] = True
    c = x.shape[1]
    if not c <= out_channels <= 2 * c:
        raise ValueError(f"ghost_concat: out_channels={out_channels} must lie in [C, 2C] = [{c}, {2 * c}]")
    if training and c and x.numel() == c:  # nn.BatchNorm2d's check (F._verify_batch_size), minus its Python loop
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {x.size()}")
    # No autocast kernel is registered, so under autocast the op receives x (bf16/fp16, from the
    # autocast 1x1 conv) and the float32 parameters untouched; the kernels read both in float.
    out, mean, _invstd, var = torch.ops.ghost_ext.ghost_concat(
        x, weight, bn_weight, bn_bias, running_mean, running_var, training, eps, relu, out_channels)
    if training and running_mean is not None and running_var is not None:
        # The op is functional (see csrc/ghost.cpp) and returns the UNBIASED batch variance, so the
        # update running = (1 - momentum) * running + momentum * batch is one lerp of both buffers:
        # one fused launch on CUDA, traced like nn.BatchNorm2d's own in-place buffer update.
        with torch.no_grad():
            if running_mean.dtype == mean.dtype and running_var.dtype == mean.dtype:
                torch._foreach_lerp_((running_mean, running_var), (mean, var), momentum)
            else:  # e.g. a model moved to bfloat16: stats in the buffers' dtype
                running_mean.lerp_(mean.to(running_mean.dtype), momentum)
                running_var.lerp_(var.to(running_var.dtype), momentum)
    return out
