"""ghost_ext: the cheap branch + concat of a GhostModule as one op.

    out = ghost_ext.ghost_concat(x, dw.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                                 training, bn.momentum, bn.eps, relu, out_channels, impl="auto")

computes cat([x, relu?(bn(depthwise_conv(x)))], 1)[:, :out_channels] (see reference.py) with the
compiled kernels in csrc/ when they are built (`pip install --no-build-isolation -e .`), else with
the plain-PyTorch reference. impl: "auto" = the extension when built and it has a kernel for x's
device, else the reference with one warning; on CUDA, per call signature, whichever of the two was
faster at that shape after the kernels passed a check there (autotune.py, like cudnn.benchmark);
"ext" = the extension's kernels, always (RuntimeError when missing; no check, so tests see the
kernels themselves); "torch" = the reference.
"""
import warnings

import torch

from . import autotune, reference

__all__ = ["ghost_concat", "has_extension"]

try:
    from . import _C  # noqa: F401  (loading the library registers torch.ops.ghost_ext.*)
    from . import ops  # noqa: F401  (fake kernels + autograd)
    _EXT_ERROR = None
except ImportError as e:  # not built, or built against another torch
    _EXT_ERROR = str(e)

_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_warned: set[str] = set()
# device types where "auto" times the kernels against the reference per signature (autotune.py); on the
# CPU the rule is fixed and measured (float32/64: the kernels; bfloat16/float16: the reference)
_AUTOTUNE_DEVICES = {"cuda"}


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
    if impl == "auto" and x.device.type == "cpu" and _channels_last(x):
        # Measured (benchmarks/results/train_channels_last_cpu/): a channels_last training step is 1.3x
        # faster through the reference, whose depthwise conv is oneDNN's, than through these kernels.
        return False
    return True


def _channels_last(x: torch.Tensor) -> bool:
    """4-d and laid out NHWC (a tensor with C == 1 or H == W == 1 counts as NCHW, its plain layout)."""
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _run(impl: str, args: tuple) -> torch.Tensor:
    return ghost_concat(*args, impl=impl)


_chooser = autotune.Chooser(_run)


def _autotuned_ext(args: tuple) -> bool:
    """auto's choice for this call signature: True = the kernels (see autotune.py)."""
    x, weight, training, relu, out_channels = args[0], args[1], args[6], args[9], args[10]
    sig = autotune.signature(x, training, relu, out_channels, weight)
    hit = _chooser.decisions.get(sig)
    if hit is not None:
        return hit == "ext"
    if torch.compiler.is_compiling() or (x.is_cuda and torch.cuda.is_current_stream_capturing()):
        return True  # nothing can be timed while tracing or capturing: the kernels; an eager call decides
    return _chooser.choose(sig, args) == "ext"


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
    bfloat16/float16 input takes the reference, which is faster there; on CUDA the faster of the two at
    this signature, see autotune.py), "ext" (the extension, error when missing) or "torch" (the reference)."""
    key = (impl, x.device, x.dtype, _channels_last(x))
    args = (x, weight, bn_weight, bn_bias, running_mean, running_var, training, momentum, eps, relu, out_channels)
    if _EXT_ERROR is not None or key not in _use_ext_cache:  # _EXT_ERROR: tests monkeypatch it
        if not _use_ext(impl, x):
            return _reference(*args)
        if not torch.compiler.is_compiling() and not (x.is_cuda and torch.cuda.is_current_stream_capturing()):
            _use_ext_cache[key] = True
    if impl == "auto" and x.device.type in _AUTOTUNE_DEVICES and not _autotuned_ext(args):
        return _reference(*args)
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
