"""The ghost op in plain PyTorch: the fallback when the C++/CUDA extension is missing, and the
oracle that the extension's tests compare against. Its behaviour is the op's contract
(../shared/DESIGN.md, "The fused op"), output layout included: out_channels channels in x's memory
format (channels_last for channels_last x, else contiguous), a fresh tensor, never a strided view."""
import torch
import torch.nn.functional as F


def concat(x: torch.Tensor, y: torch.Tensor, out_channels: int) -> torch.Tensor:
    """cat([x, y], 1)[:, :out_channels] as one fresh tensor laid out like x.

    Slicing the full concatenation would return a strided view (neither contiguous nor channels_last)
    whenever out_channels < 2C; concatenating x with only the needed channels of y gives x's layout
    (torch.cat keeps channels_last when every part is channels_last, as y = conv(x) is) and writes
    fewer bytes. y's channels are a prefix, so y.narrow is a view of the same layout."""
    extra = out_channels - x.shape[1]
    if extra == y.shape[1]:
        return torch.cat([x, y], 1)
    if extra == 0:
        # Only x's values, but y stays in the autograd graph (zero gradients, as the kernels give). torch.cat
        # with an empty part returns NCHW even for channels_last x, so this rare case pays a relayout.
        return torch.cat([x, y.narrow(1, 0, 0)], 1).contiguous(memory_format=out_format(x))
    return torch.cat([x, y.narrow(1, 0, extra)], 1)


def out_format(x: torch.Tensor) -> torch.memory_format:
    """The op's output layout: channels_last for a 4-d x laid out NHWC, else contiguous (a tensor with
    C == 1 or H == W == 1 is both, and counts as NCHW). Matches ops._out_format and csrc's out_format."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def check_out_channels(c: int, out_channels: int) -> None:
    if not c <= out_channels <= 2 * c:
        raise ValueError(f"ghost_concat: out_channels={out_channels} must lie in [C, 2C] = [{c}, {2 * c}]")


def ghost_concat(x: torch.Tensor, weight: torch.Tensor, bn_weight: torch.Tensor, bn_bias: torch.Tensor,
                 running_mean: torch.Tensor, running_var: torch.Tensor, training: bool, momentum: float,
                 eps: float, relu: bool, out_channels: int) -> torch.Tensor:
    """cat([x, relu?(bn(depthwise_conv(x)))], dim=1)[:, :out_channels], laid out like x (see concat).

    x (N, C, H, W); weight (C, 1, k, k) with k odd; BN tensors (C,). In training mode the batch
    statistics normalise and running_mean / running_var are updated in place, as nn.BatchNorm2d does.
    """
    c = x.shape[1]
    check_out_channels(c, out_channels)
    y = F.conv2d(x, weight, padding=weight.shape[-1] // 2, groups=c)
    y = F.batch_norm(y, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps)
    if relu:
        y = F.relu(y)
    return concat(x, y, out_channels)


def ghost_concat_folded(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, relu: bool,
                        out_channels: int) -> torch.Tensor:
    """Inference with the cheap branch's BatchNorm already folded into (weight, bias):
    cat([x, relu?(depthwise_conv(x, weight) + bias)], 1)[:, :out_channels], laid out like x. The same
    numbers as ghost_concat in eval with an identity BN that carries the bias, one pass fewer."""
    c = x.shape[1]
    check_out_channels(c, out_channels)
    y = F.conv2d(x, weight, bias, 1, weight.shape[-1] // 2, 1, c)
    if relu:
        y = y.relu_()  # y is this call's own fresh tensor
    return concat(x, y, out_channels)
