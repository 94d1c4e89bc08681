"""The ghost op in plain PyTorch: the fallback when the C++/CUDA extension is missing, and the
oracle that the extension's tests compare against. Its behaviour is the op's contract
(../shared/DESIGN.md, "The fused op")."""
import torch
import torch.nn.functional as F


def ghost_concat(x: torch.Tensor, weight: torch.Tensor, bn_weight: torch.Tensor, bn_bias: torch.Tensor,
                 running_mean: torch.Tensor, running_var: torch.Tensor, training: bool, momentum: float,
                 eps: float, relu: bool, out_channels: int) -> torch.Tensor:
    """cat([x, relu?(bn(depthwise_conv(x)))], dim=1)[:, :out_channels].

    x (N, C, H, W); weight (C, 1, k, k) with k odd; BN tensors (C,). In training mode the batch
    statistics normalise and running_mean / running_var are updated in place, as nn.BatchNorm2d does.
    """
    c = x.shape[1]
    if not c <= out_channels <= 2 * c:
        raise ValueError(f"ghost_concat: out_channels={out_channels} must lie in [C, 2C] = [{c}, {2 * c}]")
    y = F.conv2d(x, weight, padding=weight.shape[-1] // 2, groups=c)
    y = F.batch_norm(y, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps)
    if relu:
        y = F.relu(y)
    return torch.cat([x, y], 1)[:, :out_channels]
