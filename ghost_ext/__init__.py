"""ghost_ext: the cheap branch + concat of a GhostModule as one op.

    out = ghost_ext.ghost_concat(x, dw.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                                 training, bn.momentum, bn.eps, relu, out_channels, impl="auto")

computes cat([x, relu?(bn(depthwise_conv(x)))], 1)[:, :out_channels] (see reference.py) with the
compiled kernels in csrc/ when they are built (`pip install --no-build-isolation -e .`), else with
the plain-PyTorch reference. impl: "auto" = the extension when built and it has a kernel for x's
device, else the reference with one warning; on CUDA, per call signature, whichever of the two was
faster at that shape after the kernels passed a check there (autotune.py, like cudnn.benchmark);
"ext" = the extension's kernels, always (RuntimeError when missing; no check, so tests see the
kernels themselves); "torch" = the reference. Every path returns out_channels channels in x's memory
format (channels_last for channels_last x, else contiguous).

This package is the one place that decides which path runs (_kernels_chosen); its callers only name an
impl. Entries: ghost_concat (training and eval), ghost_concat_folded (inference with the cheap branch's
BatchNorm already folded into the weights, see model._fuse_ghost_module), require_kernels (fail early
where impl="ext" cannot run), has_extension / has_kernel.
"""
import warnings

import torch

from . import autotune, reference

__all__ = ["IMPLS", "ghost_concat", "ghost_concat_folded", "has_extension", "has_kernel", "require_kernels"]

# the values of every entry's impl argument
IMPLS: tuple[str, ...] = ("auto", "ext", "torch")

try:
    from . import _C  # noqa: F401  (loading the library registers torch.ops.ghost_ext.*)
    from . import ops  # noqa: F401  (fake kernels + autograd)
    _EXT_ERROR = None
except ImportError as e:  # not built, or built against another torch
    _EXT_ERROR = str(e)

_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_warned: set[str] = set()
# device types where "auto" times the kernels against the reference per signature (autotune.py); on the
# CPU the rule is fixed and measured (_use_ext: float32/64 NCHW the kernels; bfloat16/float16 or
# channels_last the reference)
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


def require_kernels(impl: str, device: torch.device | str) -> None:
    """Fail before any work where impl="ext" cannot run: RuntimeError (one line, naming the fix) when the
    build has no kernels for device's type. "auto" and "torch" always run ("auto" falls back to the
    reference), so they pass; an unknown impl is a ValueError."""
    if impl not in IMPLS:
        raise ValueError(f"ghost op impl={impl!r}; choose one of: {', '.join(IMPLS)}")
    if impl == "ext" and not has_kernel(device):
        dev_type = (device if isinstance(device, str) else device.type).split(":")[0]
        how = " with nvcc and a CUDA build of torch present" if dev_type == "cuda" else ""
        raise RuntimeError(f"ghost op 'ext', but the ghost_ext extension has no {dev_type} kernels here; build it "
                           f"with `pip install --no-build-isolation -e .`{how} or use the ghost op 'auto'")


def _warn_once(key: str, msg: str) -> None:
    if key not in _warned and not torch.compiler.is_compiling():
        _warned.add(key)
        warnings.warn(msg, stacklevel=3)


def _use_ext(impl: str, x: torch.Tensor) -> bool:
    if impl == "torch":
        return False
    if impl not in ("auto", "ext"):
        raise ValueError(f"ghost_concat: impl={impl!r}; choose one of: {', '.join(IMPLS)}")
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


# Dispatch decisions already taken: (impl, device, dtype, channels_last) -> True (the kernels, after the
# CUDA self-check) or False (the reference). The hot path is then one dict lookup. Nothing is cached
# while the extension is missing (tests monkeypatch _EXT_ERROR), nor while tracing or capturing.
_use_ext_cache: dict[tuple, bool] = {}


def _kernels_chosen(impl: str, args: tuple) -> bool:
    """THE dispatch of every entry: True = the extension's kernels, False = the reference. args are
    ghost_concat's positional arguments (x first); on CUDA "auto" asks the autotuner per signature."""
    x = args[0]
    key = (impl, x.device, x.dtype, _channels_last(x))
    use = None if _EXT_ERROR is not None else _use_ext_cache.get(key)
    if use is None:
        use = _use_ext(impl, x)  # raises for an unknown impl, or "ext" without kernels
        if _EXT_ERROR is None and not torch.compiler.is_compiling() \
                and not (x.is_cuda and torch.cuda.is_current_stream_capturing()):
            _use_ext_cache[key] = use
    if use and impl == "auto" and x.device.type in _AUTOTUNE_DEVICES:
        return _autotuned_ext(args)
    return use


def _kernels(x, weight, bn_weight, bn_bias, running_mean, running_var, training, momentum, eps, relu,
             out_channels):
    """The extension's op, with nn.BatchNorm2d's argument checks and its running-statistics update."""
    c = x.shape[1]
    reference.check_out_channels(c, out_channels)
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


def ghost_concat(x: torch.Tensor, weight: torch.Tensor, bn_weight: torch.Tensor, bn_bias: torch.Tensor,
                 running_mean: torch.Tensor, running_var: torch.Tensor, training: bool, momentum: float,
                 eps: float, relu: bool, out_channels: int, impl: str = "auto") -> torch.Tensor:
    """cat([x, relu?(bn(depthwise_conv(x)))], 1)[:, :out_channels] in x's memory format; in training
    the batch statistics normalise and running_mean / running_var are updated in place, as
    nn.BatchNorm2d does.

    impl: "auto" (extension when built for x's device, else the reference with one warning; on CPU
    bfloat16/float16 or channels_last input takes the reference, which is faster there; on CUDA the faster
    of the two at this signature, see autotune.py), "ext" (the extension, error when missing) or "torch"
    (the reference)."""
    args = (x, weight, bn_weight, bn_bias, running_mean, running_var, training, momentum, eps, relu, out_channels)
    if _kernels_chosen(impl, args):
        return _kernels(*args)
    return _reference(*args)


def ghost_concat_folded(x: torch.Tensor, weight: torch.Tensor, bn_weight: torch.Tensor, bn_bias: torch.Tensor,
                        running_mean: torch.Tensor, running_var: torch.Tensor, eps: float, relu: bool,
                        out_channels: int, impl: str = "auto") -> torch.Tensor:
    """Inference (eval statistics, no autograd needed) after the cheap branch's BatchNorm was folded
    into weight and bn_bias, leaving an identity BN: bn_weight 1, running_mean 0, running_var 1 - eps
    (model._fuse_ghost_module). Computes cat([x, relu?(depthwise_conv(x, weight) + bn_bias)], 1)
    [:, :out_channels] in x's memory format, on the path ghost_concat would take for the same impl: the
    kernels apply the identity BN as they would any eval BN; the reference skips that identity
    batch_norm pass (the same numbers up to rounding, one pass fewer)."""
    args = (x, weight, bn_weight, bn_bias, running_mean, running_var, False, 0.0, eps, relu, out_channels)
    if _kernels_chosen(impl, args):
        return _kernels(*args)
    if weight.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
        weight, bn_bias = weight.to(x.dtype), bn_bias.to(x.dtype)  # as _reference does
    return reference.ghost_concat_folded(x, weight, bn_bias, relu, out_channels)
