"""Python-side registrations of the compiled op ghost_ext::ghost_concat (defined in csrc/ghost.cpp):
fake (meta) kernels through torch.library, so torch.compile / torch.export can trace the op (and
its C++ autograd, csrc/ghost.cpp) without running it. Imported by ghost_ext/__init__.py only after
ghost_ext._C has loaded."""
import torch


def _out_format(x: torch.Tensor) -> torch.memory_format:
    """The kernels' output layout; must match ghost::out_format in csrc/ghost_host.h."""
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@torch.library.register_fake("ghost_ext::ghost_concat")
def _ghost_concat_fake(x, weight, bn_weight, bn_bias, running_mean, running_var, training, eps, relu,
                       out_channels):
    n, c, h, w = x.shape
    torch._check(c <= out_channels and out_channels <= 2 * c,
                 lambda: f"ghost_concat: out_channels={out_channels} must lie in [C, 2C]")
    out = x.new_empty((n, out_channels, h, w)).contiguous(memory_format=_out_format(x))
    stats = [x.new_empty((c,), dtype=_acc_dtype(x)) for _ in range(3)]
    return out, stats[0], stats[1], stats[2]


@torch.library.register_fake("ghost_ext::ghost_concat_backward")
def _ghost_concat_backward_fake(grad_out, x, weight, bn_weight, bn_bias, mean, invstd, training, relu,
                                out_channels):
    grad_x = x.new_empty(x.shape).contiguous(memory_format=_out_format(x))
    return grad_x, weight.new_empty(weight.shape), bn_weight.new_empty(bn_weight.shape), bn_bias.new_empty(bn_bias.shape)


# Autograd is registered in C++ (csrc/ghost.cpp, GhostConcatFunction): the Python path
# (torch.library.register_autograd) cost tens of microseconds of host time per call.
