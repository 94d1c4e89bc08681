"""Models: GhostNet (the reference work's variant and the official Huawei / timm layout), the
torchvision peers it is compared against, BN folding for inference and size/cost counters (checkpoints:
runs.py).

GhostNet: Han et al., "GhostNet: More Features from Cheap Operations", CVPR 2020
(https://arxiv.org/abs/1911.11907). Part names follow timm's models/ghostnet.py (conv_stem, bn1,
blocks.<stage>.<block>.ghost1.primary_conv..., conv_head, classifier), so an official-layout
state_dict has exactly timm's keys and shapes.

Every GhostModule hands its cheap branch + concat to ghost_ext.ghost_concat (the fused C++/CUDA op,
or its plain-PyTorch reference), passing the tensors of its own nn.BatchNorm2d: the parameters and
buffers live in ordinary modules, so state_dicts are identical whichever ghost_op runs them.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torch.fx.experimental.optimization import fuse as fx_fuse, remove_dropout
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_conv_bn_weights, fuse_linear_bn_eval

import ghost_ext

__all__ = ["ARCHS", "GHOST_OPS", "build_model", "set_ghost_op", "fuse_for_inference", "count_params",
           "count_macs",
           "GhostNet", "GhostModule", "GhostBottleneck"]

ARCHS: tuple[str, ...] = ("ghostnet", "ghostnet_official", "mobilenet_v2", "mobilenet_v3_small",
                          "mobilenet_v3_large", "shufflenet_v2_x1_0", "efficientnet_b0", "mnasnet1_0",
                          "squeezenet1_1", "resnet18")
GHOST_OPS: tuple[str, ...] = ghost_ext.IMPLS  # the op decides which paths exist
# torchvision peers whose constructor takes a `dropout` argument (the others have no dropout)
_PEERS_WITH_DROPOUT = ("mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0",
                       "mnasnet1_0", "squeezenet1_1")

# GhostNet layer table (paper Table 1 / the reference talk), grouped into stages as timm does so the
# block names (blocks.<stage>.<index>) match timm's: kernel, expansion, out, SE, stride
_GHOSTNET_CFGS = [
    [[3, 16, 16, 0, 1]],
    [[3, 48, 24, 0, 2]],
    [[3, 72, 24, 0, 1]],
    [[5, 72, 40, 1, 2]],
    [[5, 120, 40, 1, 1]],
    [[3, 240, 80, 0, 2]],
    [[3, 200, 80, 0, 1], [3, 184, 80, 0, 1], [3, 184, 80, 0, 1], [3, 480, 112, 1, 1], [3, 672, 112, 1, 1]],
    [[5, 672, 160, 1, 2]],
    [[5, 960, 160, 0, 1], [5, 960, 160, 1, 1], [5, 960, 160, 0, 1], [5, 960, 160, 1, 1]],
]


def make_divisible(v: float, divisor: int = 4) -> int:
    """Round v to the nearest multiple of divisor, never more than 10% down (MobileNet/GhostNet rule)."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


def _check_ghost_op(ghost_op: str) -> None:
    if ghost_op not in GHOST_OPS:
        raise ValueError(f"unknown ghost_op '{ghost_op}'; choose one of: {', '.join(GHOST_OPS)}")


# ----------------------------------------------------------------------------------------------
# GhostNet


class GhostModule(nn.Module):
    """A 1x1 primary conv makes ceil(out/2) maps; a depthwise conv (the "cheap operation") makes as
    many again; both are concatenated and cut to `out_chs`. The cheap branch, its BN, the optional
    ReLU and the concat are one ghost_ext.ghost_concat call (ratio 2 is what that op computes).

    One switch, `path`, picks how forward runs (ghost_ext alone picks the op's kernels or its reference
    from `ghost_op`):
      "op"      the default: ghost_ext.ghost_concat on the cheap branch's conv and BN tensors;
      "modules" set by convert_sync_batchnorm: through the submodules, so that a SyncBatchNorm in
                cheap_operation really synchronises (forward_modules);
      "fused"   set by fuse_for_inference once the BNs are folded, eval only (forward_fused).
    """

    PATHS: tuple[str, ...] = ("op", "modules", "fused")

    def __init__(self, in_chs: int, out_chs: int, relu: bool = True, dw_size: int = 3, ghost_op: str = "auto"):
        super().__init__()
        _check_ghost_op(ghost_op)
        self.out_chs = out_chs
        self.relu = relu
        self.ghost_op = ghost_op
        self.path = "op"  # how forward runs (see PATHS); convert_sync_batchnorm and fuse_for_inference set it
        init_chs = math.ceil(out_chs / 2)
        self.primary_conv = nn.Sequential(
            nn.Conv2d(in_chs, init_chs, 1, bias=False),
            nn.BatchNorm2d(init_chs),
            nn.ReLU(inplace=True) if relu else nn.Identity(),
        )
        # no activation module here: the op applies the ReLU (same keys as timm's Sequential)
        self.cheap_operation = nn.Sequential(
            nn.Conv2d(init_chs, init_chs, dw_size, 1, dw_size // 2, groups=init_chs, bias=False),
            nn.BatchNorm2d(init_chs),
        )

    # The two flags `path` replaced, kept as views of it for callers that still set or read them.
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        path = self.path
        if path == "fused":
            return self.forward_fused(x)
        if path == "modules":
            return self.forward_modules(x)
        x = self.primary_conv(x)
        conv, bn = self.cheap_operation[0], self.cheap_operation[1]
        momentum = bn.momentum
        if bn.training and bn.track_running_stats:
            # ghost_concat updates running_mean / running_var; the counter is ours to keep, as
            # nn.BatchNorm2d would (momentum None = cumulative average, like nn.BatchNorm2d)
            bn.num_batches_tracked.add_(1)
            if momentum is None:
                momentum = 1.0 / float(bn.num_batches_tracked)
        return ghost_ext.ghost_concat(x, conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                                      bn.training or not bn.track_running_stats, momentum or 0.0, bn.eps,
                                      self.relu, self.out_chs, impl=self.ghost_op)

    def forward_modules(self, x: torch.Tensor) -> torch.Tensor:
        """Through the submodules instead of the functional ghost_concat, so that a SyncBatchNorm in
        cheap_operation really synchronises (ghost_concat only borrows the BN's tensors and normalises with
        this process's statistics). Same math as ghost_ext.reference.ghost_concat."""
        x = self.primary_conv(x)
        y = self.cheap_operation(x)
        if self.relu:
            y = F.relu(y)
        return ghost_ext.reference.concat(x, y, self.out_chs)  # laid out like x, not a strided view

    def forward_fused(self, x: torch.Tensor) -> torch.Tensor:
        """Inference after fuse_for_inference: plain functional calls on the folded tensors (no
        submodule calls: at batch 1 on a CPU the per-call overhead is a sizeable part of the time)."""
        pconv, conv, bn = self._refs
        x = F.conv2d(x, pconv.weight, pconv.bias)
        if self.relu:
            x = x.relu_()
        # ghost_ext picks the path; its reference skips the identity BN that (w', bn.bias) already contain
        return ghost_ext.ghost_concat_folded(x, conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                                             bn.eps, self.relu, self.out_chs, impl=self.ghost_op)


class SqueezeExciteLinear(nn.Module):
    """The reference work's SE: Linear(c, c//4) -> ReLU -> Linear(c//4, c) -> clamp(0, 1) on the
    pooled vector (no rounding of c//4, no hard-sigmoid)."""

    def __init__(self, chs: int):
        super().__init__()
        self.fc1 = nn.Linear(chs, chs // 4)
        self.fc2 = nn.Linear(chs // 4, chs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.fc2(F.relu(self.fc1(x.mean((2, 3))), inplace=True)).clamp(0.0, 1.0)
        return x * s[:, :, None, None]

    def forward_fused(self, x: torch.Tensor) -> torch.Tensor:
        f1, f2 = self.fc1, self.fc2
        s = F.linear(F.linear(x.mean((2, 3)), f1.weight, f1.bias).relu_(), f2.weight, f2.bias).clamp_(0.0, 1.0)
        return x * s[:, :, None, None]


class SqueezeExcite(nn.Module):
    """Official GhostNet SE (timm naming): 1x1 conv reduce (make_divisible(c/4, 4)), ReLU, 1x1 conv
    expand, hard-sigmoid gate. The 1x1 convs act on a 1x1 map, so they run as F.linear on the pooled
    vector: same numbers, fewer dispatches."""

    def __init__(self, chs: int):
        super().__init__()
        rd = make_divisible(chs * 0.25, 4)
        self.conv_reduce = nn.Conv2d(chs, rd, 1, bias=True)
        self.conv_expand = nn.Conv2d(rd, chs, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r, e = self.conv_reduce, self.conv_expand
        s = F.linear(x.mean((2, 3)), r.weight.view(r.out_channels, -1), r.bias)
        s = F.linear(F.relu(s, inplace=True), e.weight.view(e.out_channels, -1), e.bias)
        return x * F.hardsigmoid(s)[:, :, None, None]

    forward_fused = forward  # already functional


class ConvBnAct(nn.Module):
    """1x1 conv + BN + ReLU (the last features stage; timm's ConvBnAct keys: conv, bn1)."""

    def __init__(self, in_chs: int, out_chs: int):
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_chs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn1(self.conv(x)), inplace=True)

    def forward_fused(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.conv.weight, self.conv.bias).relu_()


class GhostBottleneck(nn.Module):
    """ghost1 (ReLU) -> [depthwise kxk stride 2 + BN] -> [SE] -> ghost2 (no ReLU) + shortcut.
    The shortcut of a block that changes shape is depthwise kxk/stride + BN + 1x1 conv + BN."""

    def __init__(self, in_chs: int, mid_chs: int, out_chs: int, kernel: int, stride: int, se: bool,
                 official: bool, ghost_op: str = "auto"):
        super().__init__()
        self.ghost1 = GhostModule(in_chs, mid_chs, relu=True, ghost_op=ghost_op)
        if stride > 1:
            self.conv_dw = nn.Conv2d(mid_chs, mid_chs, kernel, stride, kernel // 2, groups=mid_chs, bias=False)
            self.bn_dw = nn.BatchNorm2d(mid_chs)
        else:
            self.conv_dw = None
            self.bn_dw = None
        self.se = (SqueezeExcite(mid_chs) if official else SqueezeExciteLinear(mid_chs)) if se else None
        self.ghost2 = GhostModule(mid_chs, out_chs, relu=False, ghost_op=ghost_op)
        if in_chs == out_chs and stride == 1:
            self.shortcut = nn.Sequential()
        else:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_chs, in_chs, kernel, stride, kernel // 2, groups=in_chs, bias=False),
                nn.BatchNorm2d(in_chs),
                nn.Conv2d(in_chs, out_chs, 1, bias=False),
                nn.BatchNorm2d(out_chs),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = self.shortcut(x)
        x = self.ghost1(x)
        if self.conv_dw is not None:
            x = self.conv_dw(x)
            if self.bn_dw is not None:  # None once folded into conv_dw
                x = self.bn_dw(x)
        if self.se is not None:
            x = self.se(x)
        x = self.ghost2(x)
        return x + shortcut  # not in place: autograd may need ghost2's output

    def forward_fused(self, x: torch.Tensor) -> torch.Tensor:
        """Inference after fuse_for_inference (BN folded into every conv): functional calls only."""
        if len(self.shortcut):
            dw, pw = self.shortcut[0], self.shortcut[1]
            shortcut = F.conv2d(F.conv2d(x, dw.weight, dw.bias, dw.stride, dw.padding, 1, dw.groups), pw.weight, pw.bias)
        else:
            shortcut = x
        x = self.ghost1.forward_fused(x)
        dw = self.conv_dw
        if dw is not None:
            x = F.conv2d(x, dw.weight, dw.bias, dw.stride, dw.padding, 1, dw.groups)
        if self.se is not None:
            x = self.se.forward_fused(x)
        return self.ghost2.forward_fused(x).add_(shortcut)  # eval only: in place is safe


class GhostNet(nn.Module):
    """GhostNet 1.0 layer table. official=False: the reference work's variant (pchaberski/cars):
    Linear SE with clamp, classifier Linear(960, out_channels, bias=False) -> BN1d -> ReLU ->
    Dropout -> Linear. official=True: Huawei / timm layout: hard-sigmoid SE with channels rounded to
    multiples of 4, conv_head 960 -> 1280 (bias) -> ReLU -> Dropout -> Linear."""

    def __init__(self, num_classes: int, *, official: bool = False, out_channels: int = 320, dropout: float = 0.2,
                 in_channels: int = 3, width: float = 1.0, ghost_op: str = "auto"):
        super().__init__()
        self.official = official
        self.fused = False
        stem_chs = make_divisible(16 * width, 4)
        self.conv_stem = nn.Conv2d(in_channels, stem_chs, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_chs)
        prev = stem_chs
        stages = []
        for cfg in _GHOSTNET_CFGS:
            layers = []
            for k, exp, c, se, s in cfg:
                out, mid = make_divisible(c * width, 4), make_divisible(exp * width, 4)
                layers.append(GhostBottleneck(prev, mid, out, k, s, bool(se), official, ghost_op))
                prev = out
            stages.append(nn.Sequential(*layers))
        feat_chs = make_divisible(960 * width, 4)
        stages.append(nn.Sequential(ConvBnAct(prev, feat_chs)))
        self.blocks = nn.Sequential(*stages)
        if official:
            self.conv_head = nn.Conv2d(feat_chs, 1280, 1, bias=True)
            self.dropout = nn.Dropout(dropout)
            self.classifier = nn.Linear(1280, num_classes)
        else:
            self.classifier = nn.Sequential(
                nn.Linear(feat_chs, out_channels, bias=False),
                nn.BatchNorm1d(out_channels),
                nn.ReLU(inplace=True),
                nn.Dropout(dropout),
                nn.Linear(out_channels, num_classes),
            )
        # the reference work's init (kaiming-normal fan_out convs, BN 1/0; Linear keeps PyTorch's)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv_stem(x)), inplace=True)
        return self.blocks(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return self._forward_fused(x)
        x = self.forward_features(x).mean((2, 3))  # global average pool
        if self.official:
            # conv_head acts on a 1x1 map: a Linear on the pooled vector, same numbers
            h = self.conv_head
            x = F.relu(F.linear(x, h.weight.view(h.out_channels, -1), h.bias), inplace=True)
            return self.classifier(self.dropout(x))
        return self.classifier(x)

    def _forward_fused(self, x: torch.Tensor) -> torch.Tensor:
        # the same network as forward() once _fuse() has folded every BN; functional calls only
        c = self.conv_stem
        x = F.conv2d(x, c.weight, c.bias, c.stride, c.padding).relu_()
        for block in self._flat_blocks:
            x = block.forward_fused(x)
        x = x.mean((2, 3))
        if self.official:
            h = self.conv_head
            x = F.linear(x, h.weight.view(h.out_channels, -1), h.bias).relu_()
            return F.linear(x, self.classifier.weight, self.classifier.bias)
        l1, l2 = self.classifier[0], self.classifier[2]
        return F.linear(F.linear(x, l1.weight, l1.bias).relu_(), l2.weight, l2.bias)

    def train(self, mode: bool = True) -> GhostNet:
        if mode and self.fused:
            raise RuntimeError("this GhostNet was made by fuse_for_inference and is eval-only; train the original model")
        return super().train(mode)

    @torch.no_grad()
    def _fuse(self) -> None:
        """Fold every BatchNorm into the layer before it (eval statistics). In place; see fuse_for_inference."""
        self.conv_stem = fuse_conv_bn_eval(self.conv_stem, self.bn1)
        self.bn1 = nn.Identity()
        for m in list(self.modules()):
            if isinstance(m, GhostModule):
                _fuse_ghost_module(m)
            elif isinstance(m, GhostBottleneck):
                if m.conv_dw is not None:
                    m.conv_dw, m.bn_dw = fuse_conv_bn_eval(m.conv_dw, m.bn_dw), None
                if len(m.shortcut):
                    sc = m.shortcut
                    m.shortcut = nn.Sequential(fuse_conv_bn_eval(sc[0], sc[1]), fuse_conv_bn_eval(sc[2], sc[3]))
            elif isinstance(m, ConvBnAct):
                m.conv, m.bn1 = fuse_conv_bn_eval(m.conv, m.bn1), nn.Identity()
        if not self.official:
            c = self.classifier
            # Dropout is the identity in eval: drop the module rather than call it
            self.classifier = nn.Sequential(fuse_linear_bn_eval(c[0], c[1]), c[2], c[4])
        # a plain list (not registered: the modules stay where they are in the state_dict)
        self._flat_blocks = [block for stage in self.blocks for block in stage]
        self.fused = True


@torch.no_grad()
def _fuse_ghost_module(m: GhostModule) -> None:
    """Fold a GhostModule's two BNs.

    primary_conv: conv + BN -> conv with bias (ordinary folding).
    cheap_operation: ghost_concat takes no bias, only BN tensors, and in eval it applies
    y = conv(x, w) * g / sqrt(v + eps) + (b - mean * g / sqrt(v + eps)). So the fold goes into the
    depthwise weight (w' = w * s, s = gamma / sqrt(var + eps)) and the BN is kept as an identity that
    carries the bias: weight 1, bias b' = beta - mean * s, running_mean 0, running_var 1 - eps, so the
    op's own eval fold computes exactly y = conv(x, w') + b'. The plain-PyTorch fused path
    (ghost_ext.ghost_concat_folded) reads (w', bn.bias) directly and skips the identity batch_norm.
    """
    p = m.primary_conv
    m.primary_conv = nn.Sequential(fuse_conv_bn_eval(p[0], p[1]), p[2])
    m._refs = (m.primary_conv[0], m.cheap_operation[0], m.cheap_operation[1])  # plain tuple: not registered
    conv, bn = m.cheap_operation[0], m.cheap_operation[1]
    w, b = fuse_conv_bn_weights(conv.weight, None, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias)
    conv.weight.copy_(w)
    bn.weight.fill_(1.0)
    bn.bias.copy_(b)
    bn.running_mean.zero_()
    bn.running_var.fill_(1.0 - bn.eps)
    m.path = "fused"


# ----------------------------------------------------------------------------------------------
# Building


def _replace_first_conv(model: nn.Module, in_channels: int) -> None:
    """Swap the first Conv2d (the stem of every torchvision peer) for one taking in_channels."""
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.Conv2d) and child.groups == 1:
                new = nn.Conv2d(in_channels, child.out_channels, child.kernel_size, child.stride, child.padding,
                                child.dilation, 1, child.bias is not None, child.padding_mode)
                nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")
                if new.bias is not None:
                    nn.init.zeros_(new.bias)
                setattr(parent, name, new)
                return
    raise ValueError(f"{type(model).__name__}: no Conv2d found to take {in_channels} input channels")


def build_model(arch: str, num_classes: int, *, out_channels: int = 320, dropout: float = 0.2, in_channels: int = 3,
                width: float = 1.0, ghost_op: str = "auto") -> nn.Module:
    """A freshly initialised model (never pretrained weights). Options an arch doesn't have are ignored:
    out_channels is the reference ghostnet's classifier width, width the ghostnet multiplier, ghost_op
    the GhostModule implementation ("auto": the extension when built, else plain PyTorch; "ext"; "torch")."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch '{arch}'; choose one of: {', '.join(ARCHS)}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if in_channels < 1:
        raise ValueError(f"in_channels must be >= 1 (1 grayscale, 3 RGB), got {in_channels}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
    _check_ghost_op(ghost_op)
    if arch in ("ghostnet", "ghostnet_official"):
        if width <= 0:
            raise ValueError(f"width must be > 0, got {width}")
        if out_channels < 1:
            raise ValueError(f"out_channels must be >= 1, got {out_channels}")
        return GhostNet(num_classes, official=arch == "ghostnet_official", out_channels=out_channels,
                        dropout=dropout, in_channels=in_channels, width=width, ghost_op=ghost_op)
    kwargs = {"dropout": dropout} if arch in _PEERS_WITH_DROPOUT else {}
    model = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes, **kwargs)
    if in_channels != 3:
        _replace_first_conv(model, in_channels)
    return model


@torch.no_grad()
def zero_init_residual(model: nn.Module) -> int:
    """Start every residual GhostBottleneck as the identity: its last GhostModule's BatchNorm scales
    (primary and cheap branch) set to zero, so the block's output is its shortcut until training moves
    them (Goyal et al. 2017, "Accurate, Large Minibatch SGD"; torchvision's zero_init_residual). The network
    then trains as a shallow one first. Returns the number of blocks changed."""
    n = 0
    for m in model.modules():
        if isinstance(m, GhostBottleneck):
            nn.init.zeros_(m.ghost2.primary_conv[1].weight)
            nn.init.zeros_(m.ghost2.cheap_operation[1].weight)
            n += 1
    return n


def convert_sync_batchnorm(model: nn.Module) -> nn.Module:
    """Every BatchNorm as a SyncBatchNorm (torchrun --sync-bn: statistics over the global batch), with the same
    parameters and state_dict keys. GhostModules then run through their submodules (forward_modules): the
    fused op cannot reach a SyncBatchNorm's all-reduce. Returns the converted model."""
    model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for m in model.modules():
        if isinstance(m, GhostModule) and m.path == "op":  # a folded (eval-only) module keeps its fused path
            m.path = "modules"
    return model


def set_ghost_op(model: nn.Module, ghost_op: str) -> None:
    """Switch every GhostModule in model to ghost_op ("auto", "ext" or "torch"); no-op for other archs."""
    _check_ghost_op(ghost_op)
    for m in model.modules():
        if isinstance(m, GhostModule):
            m.ghost_op = ghost_op


def fuse_for_inference(model: nn.Module) -> nn.Module:
    """An eval-only deep copy with every BatchNorm folded into the conv / linear layer before it, dropout
    removed, parameters frozen (requires_grad False, so no autograd graph is built even without
    torch.no_grad()) and 4-D weights in channels_last. Same outputs as model.eval() up to float rounding
    (relative error ~1e-6 in float32). GhostNet is folded by hand (see _fuse_ghost_module for the cheap
    branch) and then runs a functional forward (forward_fused: no submodule calls, ReLU and the residual
    add in place), because at batch 1 on a CPU per-call overhead is a large share of GhostNet's time;
    the peers go through torch.fx's conv/linear + BN fusion and dropout removal."""
    fused = copy.deepcopy(model).eval()
    if isinstance(fused, GhostNet):
        if not fused.fused:
            fused._fuse()
    else:
        fused = remove_dropout(fx_fuse(fused, inplace=True)).eval()
    for p in fused.parameters():
        p.requires_grad_(False)
    # channels_last weights: oneDNN's fast CPU path is NHWC, and a conv with a channels_last weight
    # returns channels_last even for an NCHW input, so the whole network runs NHWC without the
    # per-layer reorders NCHW costs (about 1.7x faster at batch 1 on CPU, the same for every arch)
    return fused.to(memory_format=torch.channels_last)


def count_params(model: nn.Module) -> int:
    """Number of parameters (each shared tensor once); buffers such as BN running stats not included."""
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, img_size: int | tuple[int, int], in_channels: int = 3) -> int:
    """Multiply-accumulates of one forward pass at batch 1 on an img_size input (S: S x S; or (height, width)),
    in eval mode, on a copy.

    Counted by torch.utils.flop_counter.FlopCounterMode, which counts FLOPs = 2 x multiply-adds of
    convolutions and matrix products (elementwise ops, pooling and BN are not counted); this returns
    FLOPs // 2, i.e. MACs, the unit papers quote as "FLOPs" (GhostNet 1.0: 0.142 G). GhostModules are
    switched to the plain-PyTorch op in the copy so their depthwise convs are seen by the counter.
    """
    from torch.utils.flop_counter import FlopCounterMode

    # on the meta device: shapes only, so counting costs no arithmetic and no memory
    m = copy.deepcopy(model).eval().to("meta")
    set_ghost_op(m, "torch")
    h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
    x = torch.zeros(1, in_channels, h, w, device="meta", dtype=next(m.parameters()).dtype)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        m(x)
    return counter.get_total_flops() // 2
