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
import torch.nn.functional as F

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


def ghost_concat(x: torch.Tensor, weight: torch.Tensor, bn_weight: torch.Tensor, bn_bias: torch.Tensor,
                 running_mean: torch.Tensor, running_var: torch.Tensor, training: bool, momentum: float,
                 eps: float, relu: bool, out_channels: int, impl: str = "auto") -> torch.Tensor:
    """cat([x, relu?(bn(depthwise_conv(x)))], 1)[:, :out_channels]; in training the batch statistics
    normalise and running_mean / running_var are updated in place, as nn.BatchNorm2d does.

    impl: "auto" (extension when built for x's device, else the reference with one warning),
    "ext" (the extension, error when missing) or "torch" (the reference)."""
    if not _use_ext(impl, x):
        return _reference(x, weight, bn_weight, bn_bias, running_mean, running_var, training, momentum,
                          eps, relu, out_channels)
    c = x.shape[1]
    if not c <= out_channels <= 2 * c:
        raise ValueError(f"ghost_concat: out_channels={out_channels} must lie in [C, 2C] = [{c}, {2 * c}]")
    if training:
        F._verify_batch_size(x.size())  # same error as nn.BatchNorm2d for one value per channel
    # No autocast kernel is registered, so under autocast the op receives x (bf16/fp16, from the
    # autocast 1x1 conv) and the float32 parameters untouched; the kernels read both in float.
    out, mean, _invstd, var = torch.ops.ghost_ext.ghost_concat(
        x, weight, bn_weight, bn_bias, running_mean, running_var, training, eps, relu, out_channels)
    if training and running_mean is not None and running_var is not None:
        # The op is functional (see csrc/ghost.cpp); the running update is two in-place ops, traced
        # like nn.BatchNorm2d's own. running_var uses the unbiased variance, as BatchNorm does.
        m = x.numel() // c
        with torch.no_grad():
            running_mean.mul_(1.0 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
            running_var.mul_(1.0 - momentum).add_(var.to(running_var.dtype), alpha=momentum * m / (m - 1))
    return out
