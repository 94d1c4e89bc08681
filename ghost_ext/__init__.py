"""ghost_ext: the cheap branch + concat of a GhostModule as one op.

Placeholder dispatch until the C++/CUDA extension lands: always the plain-PyTorch reference.
"""
import warnings

import torch

from . import reference

__all__ = ["ghost_concat", "has_extension"]


def has_extension() -> bool:
    """True when the compiled extension ghost_ext._C is importable."""
    return False


_warned = False


def ghost_concat(x: torch.Tensor, weight: torch.Tensor, bn_weight: torch.Tensor, bn_bias: torch.Tensor,
                 running_mean: torch.Tensor, running_var: torch.Tensor, training: bool, momentum: float,
                 eps: float, relu: bool, out_channels: int, impl: str = "auto") -> torch.Tensor:
    """impl: "auto" (extension when built for x's device, else the reference with one warning),
    "ext" (the extension, error when missing) or "torch" (the reference)."""
    global _warned
    if impl == "ext":
        raise RuntimeError("ghost_ext: the C++ extension is not built; run `pip install --no-build-isolation -e .`")
    if impl == "auto" and not _warned:
        warnings.warn("ghost_ext: C++ extension not built, using the plain-PyTorch reference", stacklevel=2)
        _warned = True
    return reference.ghost_concat(x, weight, bn_weight, bn_bias, running_mean, running_var,
                                  training, momentum, eps, relu, out_channels)
