"""Tests of the fused ghost op (ghost_ext) against its plain-PyTorch reference.

Tests that need the compiled extension skip when it is not built; the CUDA ones (marked `cuda`)
skip without a GPU or without CUDA kernels in the build. Tolerances: float64 and float32 are
compared with a float64 reference by relative norm error (||a - b|| / ||b||) below 1e-9 and 2e-5;
float16/bfloat16 inputs (with float32 weights, as autocast hands them over) below 1e-2 against the
float64 reference on the same (rounded) inputs.
"""
import math
import random
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import ghost_ext

HAS_EXT = ghost_ext.has_extension()
needs_ext = pytest.mark.skipif(not HAS_EXT, reason="ghost_ext._C is not built: run `pip install --no-build-isolation -e .`")
HAS_CUDA = HAS_EXT and torch.cuda.is_available() and ghost_ext.has_kernel("cuda")
needs_cuda = [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device and the extension's CUDA kernels")]

DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]
TOL = {torch.float64: 1e-9, torch.float32: 2e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


@pytest.fixture(autouse=True)
def no_tf32():
    """Full float32 in every comparison: on CUDA, cuDNN/cuBLAS may run float32 convolutions and
    matmuls in TF32 by default (allow_tf32), which makes a float32 *reference* only ~1e-3 accurate
    and its roundings grow through a whole network. Restored after each test."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def rel_err(a: torch.Tensor, b: torch.Tensor, floor: float = 0.0) -> float:
    """||a - b|| / max(||b||, floor * sqrt(numel)); the floor keeps quantities that are analytically
    zero (e.g. grad of a 1x1 depthwise weight under batch-statistics BN) from comparing noise to noise."""
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all(), "non-finite values"
    den = max(b.norm().item(), floor * math.sqrt(b.numel()), 1e-30)
    return (a - b).norm().item() / den


def make_inputs(n, c, h, w, k, dtype=torch.float32, device="cpu", channels_last=False, seed=0, param_dtype=None):
    """x in `dtype`; weight and BN tensors in param_dtype (default: float64 for float64 x, else float32)."""
    g = torch.Generator().manual_seed(seed)
    pd = param_dtype or (torch.float64 if dtype == torch.float64 else torch.float32)
    x = (torch.randn(n, c, h, w, generator=g) * 1.5 + 0.3).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = (torch.randn(c, 1, k, k, generator=g) / k).to(pd)
    bn_w = (torch.rand(c, generator=g) + 0.5).to(pd)
    bn_b = (torch.randn(c, generator=g) * 0.5).to(pd)
    rm = (torch.randn(c, generator=g) * 0.1).to(pd)
    rv = (torch.rand(c, generator=g) + 0.5).to(pd)
    return [t.to(device) for t in (x, weight, bn_w, bn_b, rm, rv)]


def run(impl, x, weight, bn_w, bn_b, rm, rv, training, relu, oc, gout, momentum=0.1, eps=1e-5):
    """Forward + backward; returns (out, grad_x, grad_w, grad_bn_w, grad_bn_b, running_mean, running_var)."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, weight, bn_w, bn_b)]
    rm, rv = rm.clone(), rv.clone()
    out = ghost_ext.ghost_concat(*leaves, rm, rv, training, momentum, eps, relu, oc, impl=impl)
    grads = torch.autograd.grad(out, leaves, gout)
    return [out, *grads, rm, rv]


def compare(x, weight, bn_w, bn_b, rm, rv, training, relu, oc, seed=0, tol=None):
    """The extension on the given tensors vs the reference in float64 on the same values."""
    g = torch.Generator().manual_seed(seed + 1)
    n, c, h, w = x.shape
    gout = torch.randn(n, oc, h, w, generator=g).to(x.dtype).to(x.device)
    got = run("ext", x, weight, bn_w, bn_b, rm, rv, training, relu, oc, gout)
    d = lambda t: t.detach().double()  # noqa: E731
    want = run("torch", d(x), d(weight), d(bn_w), d(bn_b), d(rm), d(rv), training, relu, oc, d(gout))
    tol = tol or TOL[x.dtype]
    names = ["out", "grad_x", "grad_weight", "grad_bn_weight", "grad_bn_bias", "running_mean", "running_var"]
    assert got[0].dtype == x.dtype and got[0].shape == (n, oc, h, w)
    assert got[1].dtype == x.dtype and got[2].dtype == weight.dtype and got[3].dtype == bn_w.dtype
    ref32 = None
    for i, (name, a, b) in enumerate(zip(names, got, want)):
        e = rel_err(a, b, floor=1.0)  # inputs and grad_out are O(1)
        ill_conditioned = name == "grad_weight" and weight.shape[-1] == 1 and training
        if e >= tol and x.dtype == torch.float32 and ill_conditioned:
            # Some quantities are ill-conditioned in float32 whatever computes them: the grad of a
            # k=1 depthwise weight under batch-statistics BN is analytically ~0 (BN undoes the
            # scale), a cancellation of N*H*W terms of size ~invstd. There the bar is the float32
            # reference's own error (full float32, no TF32) on the same inputs, within 4x. That error
            # varies with the summation order, so take the larger of two samples: the reference on
            # x's device and on the CPU.
            if ref32 is None:
                ref32 = [run("torch", *[t.to(dev) for t in (x, weight, bn_w, bn_b, rm, rv)], training, relu, oc,
                             gout.to(dev)) for dev in {x.device, torch.device("cpu")}]
            e32 = max(rel_err(r[i].to(b.device), b, floor=1.0) for r in ref32)
            assert e < 4 * e32, f"{name}: relative error {e:.3g} >= {tol:g} and >= 4x the float32 reference's {e32:.3g}"
            continue
        assert e < tol, f"{name}: relative error {e:.3g} >= {tol:g}"
    return got


# ---- correctness against the reference ------------------------------------------------------

CASES = [  # (N, C, H, W, k, out_channels)
    (2, 4, 6, 6, 3, 8),
    (3, 5, 7, 4, 3, 9),      # odd out_channels, non-square
    (2, 6, 5, 5, 1, 7),      # k = 1
    (2, 3, 9, 8, 5, 5),      # k = 5
    (1, 4, 5, 7, 3, 6),      # N = 1
    (4, 6, 1, 1, 3, 12),     # 1x1 maps (training still has N values per channel)
    (2, 8, 3, 5, 3, 8),      # out_channels == C: the cheap branch is cut off entirely
]


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("case", CASES)
def test_matches_reference(device, channels_last, training, case):
    n, c, h, w, k, oc = case
    for dtype in (torch.float64, torch.float32):
        for relu in (True, False):
            t = make_inputs(n, c, h, w, k, dtype, device, channels_last, seed=hash(case) % 1000)
            got = compare(*t, training, relu, oc)
            if channels_last and c > 1 and h * w > 1:
                assert got[0].is_contiguous(memory_format=torch.channels_last)
                assert got[1].is_contiguous(memory_format=torch.channels_last)


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_half_types_mixed_precision(device, dtype, channels_last):
    """bf16/fp16 x with float32 weight and BN tensors (what autocast produces), no casts by the caller."""
    for training in (True, False):
        for k, oc in ((3, 14), (5, 9)):
            t = make_inputs(4, 8, 9, 11, k, dtype, device, channels_last, seed=k + oc)
            compare(*t, training, True, oc)
    # parameters in the half type too (a model moved with .to(bfloat16))
    t = make_inputs(3, 6, 7, 7, 3, dtype, device, channels_last, param_dtype=dtype)
    compare(*t, True, True, 10)


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_bfloat16_close_to_float32_reference(device):
    """Stated tolerance: bf16 output within 1e-2 relative (norm) of the float32 reference."""
    x, w, gb, bb, rm, rv = make_inputs(8, 16, 12, 12, 3, torch.float32, device)
    ref = ghost_ext.ghost_concat(x, w, gb, bb, rm.clone(), rv.clone(), True, 0.1, 1e-5, True, 24, impl="torch")
    out = ghost_ext.ghost_concat(x.bfloat16(), w, gb, bb, rm.clone(), rv.clone(), True, 0.1, 1e-5, True, 24, impl="ext")
    assert out.dtype == torch.bfloat16
    assert rel_err(out, ref) < 1e-2


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_seeded_random_shapes(device):
    rng = random.Random(1234)
    for i in range(12):
        n, c = rng.randint(1, 4), rng.randint(1, 12)
        h, w = rng.randint(1, 13), rng.randint(1, 13)
        k = rng.choice([1, 3, 5, 7])
        oc = rng.randint(c, 2 * c)
        training = n * h * w > 1 and rng.random() < 0.7
        dtype = rng.choice([torch.float32, torch.float64])
        t = make_inputs(n, c, h, w, k, dtype, device, rng.random() < 0.5, seed=i)
        compare(*t, training, rng.random() < 0.5, oc, seed=i)


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_k1_grad_weight_float32_bar(device):
    """k=1, training, large N*H*W: grad_weight is a cancellation (analytically ~0); the extension
    must be as accurate as the float32 reference itself (the tolerance rule in compare())."""
    t = make_inputs(8, 8, 57, 57, 1, torch.float32, device, seed=9)
    compare(*t, True, True, 16)


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_larger_maps_many_blocks(device, channels_last):
    """Sizes where the CUDA kernels split a channel over many blocks (the partial-sum paths)."""
    for (n, c, h, w, oc) in ((4, 8, 40, 40, 16), (3, 40, 29, 29, 70), (16, 12, 15, 15, 23)):
        for dtype in (torch.float32, torch.bfloat16):
            t = make_inputs(n, c, h, w, 3, dtype, device, channels_last, seed=n * c)
            compare(*t, True, True, oc)
            compare(*t, False, True, oc)


# ---- autograd, registration ------------------------------------------------------------------

@needs_ext
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("shape", [(2, 3, 4, 5, 3, 5), (1, 2, 3, 3, 1, 3), (3, 2, 1, 1, 5, 4), (2, 2, 5, 3, 5, 4)])
def test_gradcheck(training, relu, shape):
    n, c, h, w, k, oc = shape
    x, wt, gb, bb, rm, rv = make_inputs(n, c, h, w, k, torch.float64)
    if relu:  # keep pre-activations away from the kink, where finite differences disagree
        bb = bb + 0.3 * torch.sign(bb)

    def f(x, wt, gb, bb):
        return ghost_ext.ghost_concat(x, wt, gb, bb, rm.clone(), rv.clone(), training, 0.1, 1e-5, relu, oc, impl="ext")

    inputs = [t.clone().requires_grad_() for t in (x, wt, gb, bb)]
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


def _op_args(device, channels_last, training, dtype=torch.float32):
    x, w, gb, bb, rm, rv = make_inputs(2, 4, 5, 6, 3, dtype, device, channels_last)
    x.requires_grad_()
    w.requires_grad_()
    gb.requires_grad_()
    bb.requires_grad_()
    return (x, w, gb, bb, rm, rv, training, 1e-5, True, 7)


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("training", [True, False])
def test_opcheck(device, channels_last, training):
    torch.library.opcheck(torch.ops.ghost_ext.ghost_concat.default, _op_args(device, channels_last, training))


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_backward_op(device):
    x, w, gb, bb, rm, rv = make_inputs(2, 4, 5, 6, 3, torch.float32, device)
    _out, mean, invstd, _var = torch.ops.ghost_ext.ghost_concat(x, w, gb, bb, rm, rv, True, 1e-5, True, 7)
    gout = torch.randn(2, 7, 5, 6, device=device)
    torch.library.opcheck(torch.ops.ghost_ext.ghost_concat_backward.default,
                          (gout, x, w, gb, bb, mean, invstd, True, True, 7),
                          test_utils=("test_schema", "test_faketensor"))


class Cheap(nn.Module):
    """The cheap branch of a GhostModule, as model.py's GhostModule wires it."""

    def __init__(self, c: int, oc: int, impl: str):
        super().__init__()
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.oc, self.impl = oc, impl

    def forward(self, x):
        bn = self.bn
        return ghost_ext.ghost_concat(x, self.dw.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                                      self.training, bn.momentum, bn.eps, True, self.oc, impl=self.impl)


class Plain(Cheap):
    def forward(self, x):
        return torch.cat([x, F.relu(self.bn(self.dw(x)))], 1)[:, :self.oc]


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_running_stats_match_batchnorm(device):
    torch.manual_seed(0)
    ours, plain = Cheap(6, 11, "ext").to(device), Plain(6, 11, "torch").to(device)
    plain.load_state_dict(ours.state_dict())
    for step in range(5):
        x = torch.randn(4, 6, 7, 9, device=device) * (step + 1) + step
        a, b = ours(x), plain(x)
        a.square().sum().backward()
        b.square().sum().backward()
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours.bn.running_mean, plain.bn.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.bn.running_var, plain.bn.running_var, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.dw.weight.grad, plain.dw.weight.grad, rtol=1e-4, atol=1e-4)
    ours.eval()
    plain.eval()
    x = torch.randn(2, 6, 7, 9, device=device)
    torch.testing.assert_close(ours(x), plain(x), rtol=1e-5, atol=1e-5)


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_deterministic(device):
    t = make_inputs(8, 12, 20, 20, 3, torch.float32, device, seed=3)
    gout = torch.randn(8, 20, 20, 20, device=device)
    a = run("ext", *t, True, True, 20, gout)
    b = run("ext", *t, True, True, 20, gout)
    for u, v in zip(a, b):
        assert torch.equal(u, v)


@needs_ext
def test_autocast_cpu_bfloat16():
    """Under autocast the 1x1 conv outputs bf16; the op takes it with the float32 BN tensors."""
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 6, 1, bias=False)
    m = Cheap(6, 12, "ext")
    x = torch.randn(2, 8, 9, 9)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = conv(x)
        assert y.dtype == torch.bfloat16
        out = m(y)
    assert out.dtype == torch.bfloat16 and m.bn.running_mean.dtype == torch.float32
    out.float().sum().backward()
    assert m.dw.weight.grad.dtype == torch.float32 and conv.weight.grad is not None


def test_bad_arguments():
    t = make_inputs(2, 4, 5, 5, 3)
    with pytest.raises(ValueError, match="out_channels"):
        ghost_ext.ghost_concat(*t, True, 0.1, 1e-5, True, 9, impl="auto")
    with pytest.raises(ValueError, match="impl"):
        ghost_ext.ghost_concat(*t, True, 0.1, 1e-5, True, 6, impl="cuda")


# ---- fallback, compile, export ----------------------------------------------------------------

def test_reference_path_when_extension_missing(monkeypatch):
    monkeypatch.setattr(ghost_ext, "_EXT_ERROR", "No module named 'ghost_ext._C'")
    monkeypatch.setattr(ghost_ext, "_warned", set())
    assert not ghost_ext.has_extension()
    t = make_inputs(2, 4, 5, 5, 3)
    want = ghost_ext.reference.ghost_concat(*[u.clone() for u in t], True, 0.1, 1e-5, True, 7)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        out = ghost_ext.ghost_concat(*[u.clone() for u in t], True, 0.1, 1e-5, True, 7)
        ghost_ext.ghost_concat(*[u.clone() for u in t], True, 0.1, 1e-5, True, 7)
    assert sum("not built" in str(m.message) for m in w) == 1  # one warning, not one per call
    torch.testing.assert_close(out, want)
    with pytest.raises(RuntimeError, match="not built"):
        ghost_ext.ghost_concat(*t, True, 0.1, 1e-5, True, 7, impl="ext")


def test_require_kernels(monkeypatch):
    """The early check train.py makes for --ghost-op ext: a one-line RuntimeError naming the fix where the
    build has no kernels for the device type; "auto" and "torch" always pass."""
    for impl in ("auto", "torch"):
        for device in ("cpu", "cuda", torch.device("cuda:1")):
            ghost_ext.require_kernels(impl, device)
    with pytest.raises(ValueError, match="impl"):
        ghost_ext.require_kernels("fast", "cpu")
    if ghost_ext.has_kernel("cpu"):
        ghost_ext.require_kernels("ext", torch.device("cpu"))
    monkeypatch.setitem(ghost_ext._KERNELS, "cuda", False)
    for device in ("cuda", torch.device("cuda:0")):
        with pytest.raises(RuntimeError, match=r"no cuda kernels here; build it with `pip install") as e:
            ghost_ext.require_kernels("ext", device)
        assert "\n" not in str(e.value) and "'auto'" in str(e.value)
    monkeypatch.setattr(ghost_ext, "_EXT_ERROR", "No module named 'ghost_ext._C'")
    with pytest.raises(RuntimeError, match="no cpu kernels"):
        ghost_ext.require_kernels("ext", "cpu")


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("impl", ["auto", "ext", "torch"])
def test_folded_entry_takes_the_op_dispatch(monkeypatch, channels_last, impl):
    """ghost_concat_folded runs wherever ghost_concat would (one dispatch, _kernels_chosen); where that is
    the reference it skips the identity BatchNorm (reference.ghost_concat_folded), same numbers."""
    if impl == "ext" and not ghost_ext.has_kernel("cpu"):
        pytest.skip("needs the extension's CPU kernels")
    x, w, _gb, bias, _rm, _rv = make_inputs(2, 4, 5, 5, 3, channels_last=channels_last)
    ones, zeros, var = torch.ones(4), torch.zeros(4), torch.full((4,), 1.0 - 1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want_kernels = ghost_ext._kernels_chosen(impl, (x, w, ones, bias, zeros, var, False, 0.0, 1e-5, True, 7))
    calls = []
    real = ghost_ext.reference.ghost_concat_folded
    monkeypatch.setattr(ghost_ext.reference, "ghost_concat_folded", lambda *a: calls.append(1) or real(*a))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = ghost_ext.ghost_concat_folded(x, w, ones, bias, zeros, var, 1e-5, True, 7, impl=impl)
        want = ghost_ext.ghost_concat(x, w, ones, bias, zeros, var, False, 0.0, 1e-5, True, 7, impl="torch")
    assert bool(calls) == (not want_kernels)
    assert want_kernels == (impl == "ext" or (impl == "auto" and HAS_EXT and not channels_last))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_reference_path_mixed_dtypes():
    """impl='torch' with bf16 x and float32 weights outside autocast works too."""
    x, w, gb, bb, rm, rv = make_inputs(2, 4, 5, 5, 3, torch.bfloat16)
    out = ghost_ext.ghost_concat(x, w, gb, bb, rm, rv, True, 0.1, 1e-5, True, 7, impl="torch")
    assert out.dtype == torch.bfloat16


@needs_ext
@pytest.mark.slow
def test_torch_compile_fullgraph():
    torch.manual_seed(0)
    m = Cheap(6, 10, "ext")
    ref = Cheap(6, 10, "ext")
    ref.load_state_dict(m.state_dict())

    def step(mod, x):
        return mod(x).relu().sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    x = torch.randn(3, 6, 8, 8)
    loss_c = compiled(m, x)
    loss_c.backward()
    loss_e = step(ref, x)
    loss_e.backward()
    torch.testing.assert_close(loss_c, loss_e)
    torch.testing.assert_close(m.dw.weight.grad, ref.dw.weight.grad)
    torch.testing.assert_close(m.bn.running_mean, ref.bn.running_mean)
    torch.testing.assert_close(m.bn.running_var, ref.bn.running_var)


@needs_ext
@pytest.mark.slow
def test_torch_compile_inductor():
    m = Cheap(4, 7, "ext").eval()
    x = torch.randn(2, 4, 6, 6)
    torch.testing.assert_close(torch.compile(m, fullgraph=True)(x), m(x))


@needs_ext
@pytest.mark.slow
def test_torch_export():
    m = Cheap(4, 7, "ext")
    x = torch.randn(2, 4, 6, 6)
    for train in (False, True):
        m.train(train)
        ep = torch.export.export(m, (x,))
        assert "ghost_ext.ghost_concat" in str(ep.graph)
        torch.testing.assert_close(ep.module()(x), m(x))


# ---- the whole model ---------------------------------------------------------------------------



@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_whole_model_ext_matches_torch(device):
    # float64: in float32 this comparison is ill-posed. Training-mode BatchNorm over a batch of 4
    # makes the network's gradients move by ~1e-2 when the input moves by 1e-6 (measured), so two
    # correct float32 implementations can differ by more than any useful tolerance (the first H100
    # run failed that way at 7.7e-3). In float64 both paths agree to ~1e-13.
    import model
    torch.manual_seed(0)
    a = model.build_model("ghostnet", 10, dropout=0.0, ghost_op="ext").to(device, torch.float64)
    b = model.build_model("ghostnet", 10, dropout=0.0, ghost_op="torch").to(device, torch.float64)
    b.load_state_dict(a.state_dict())
    x = torch.randn(4, 3, 64, 64, device=device, dtype=torch.float64)
    la, lb = a(x), b(x)
    torch.testing.assert_close(la, lb, rtol=1e-9, atol=1e-9)
    la.square().mean().backward()
    lb.square().mean().backward()
    ga = dict(a.named_parameters())
    # some gradients are analytically zero (a bias right before a batch-statistics BN): compare
    # each against the network's gradient scale, not only its own norm
    scale = torch.cat([p.grad.flatten() for p in b.parameters() if p.grad is not None]).pow(2).mean().sqrt().item()
    for name, p in b.named_parameters():
        if p.grad is None:
            continue
        e = rel_err(ga[name].grad, p.grad, floor=scale)
        assert e < 1e-8, f"{name}: grad relative error {e:.3g}"
    sa = a.state_dict()
    for name, t in b.state_dict().items():
        if t.is_floating_point():
            torch.testing.assert_close(sa[name], t, rtol=1e-10, atol=1e-12, msg=lambda m: f"{name}: {m}")
        else:
            assert torch.equal(sa[name], t), name
    a.eval()
    b.eval()
    torch.testing.assert_close(a(x), b(x), rtol=1e-9, atol=1e-9)


# ---- CUDA only -----------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device and the extension's CUDA kernels")
def test_cuda_auto_checks_and_times_each_signature_once():
    ghost_ext._chooser.decisions.clear()
    t = make_inputs(2, 4, 5, 5, 3, device="cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning
        ghost_ext.ghost_concat(*t, True, 0.1, 1e-5, True, 7, impl="auto")
    assert list(ghost_ext._chooser.decisions.values())[0] in ("ext", "torch")
    assert len(ghost_ext._chooser.timings) == 1  # the kernels passed the check at this shape and were timed


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device and the extension's CUDA kernels")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("k", [1, 3, 5, 7])
def test_cuda_network_shapes(dtype, channels_last, k):
    """A few GhostNet-like shapes at batch 8: many blocks per channel, idle channel lanes."""
    for (c, hw, oc) in ((8, 57, 16), (36, 29, 72), (60, 15, 120), (480, 8, 960), (20, 8, 39)):
        t = make_inputs(8, c, hw, hw, k, dtype, "cuda", channels_last, seed=c + k)
        for training in (True, False):
            compare(*t, training, True, oc)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device and the extension's CUDA kernels")
def test_cuda_noncurrent_stream_and_autocast():
    t = make_inputs(4, 16, 14, 14, 3, device="cuda")
    s = torch.cuda.Stream()
    gout = torch.randn(4, 30, 14, 14, device="cuda")
    want = run("ext", *t, True, True, 30, gout)
    with torch.cuda.stream(s):
        got = run("ext", *t, True, True, 30, gout)
    torch.cuda.synchronize()
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    conv = nn.Conv2d(8, 16, 1, bias=False).cuda()
    m = Cheap(16, 30, "ext").cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = m(conv(torch.randn(4, 8, 14, 14, device="cuda")))
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device and the extension's CUDA kernels")
def test_cuda_poisoned_outputs_fully_written():
    """Every output element is written: fill the caching allocator's blocks with NaN first."""
    t = make_inputs(6, 24, 23, 23, 3, device="cuda", channels_last=True)
    for _ in range(3):
        junk = torch.full((6 * 48 * 23 * 23 * 4,), float("nan"), device="cuda")
        del junk
        compare(*t, True, True, 41)


def _graph_capture(fn):
    """Warm fn up on a side stream (as torch.cuda.graphs documents), then capture it; returns
    (graph, static outputs)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = fn()
    return graph, static


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device and the extension's CUDA kernels")
@pytest.mark.parametrize("channels_last", [False, True])
def test_cuda_graph_capture_matches_eager(channels_last):
    """The op (forward + autograd backward + running-stat update, and eval) is CUDA-graph
    capturable: no host sync, no per-call host tensors; replays give the eager results bitwise."""
    x, w, gb, bb, rm0, rv0 = make_inputs(4, 16, 14, 14, 3, device="cuda", channels_last=channels_last, seed=5)
    gout = torch.randn(4, 30, 14, 14, device="cuda")
    leaves = [t.clone().requires_grad_() for t in (x, w, gb, bb)]
    rm, rv = rm0.clone(), rv0.clone()

    def train_step():
        out = ghost_ext.ghost_concat(*leaves, rm, rv, True, 0.1, 1e-5, True, 30, impl="ext")
        return [out, *torch.autograd.grad(out, leaves, gout)]

    def eval_step():
        with torch.no_grad():
            return [ghost_ext.ghost_concat(x, w, gb, bb, rm, rv, False, 0.1, 1e-5, True, 30, impl="ext")]

    graph, static = _graph_capture(train_step)
    want = run("ext", x, w, gb, bb, rm0, rv0, True, True, 30, gout)
    for step in range(2):  # replays update the running stats like eager steps
        rm.copy_(rm0)
        rv.copy_(rv0)
        graph.replay()
        torch.cuda.synchronize()
        for name, a, b in zip(["out", "grad_x", "grad_w", "grad_bn_w", "grad_bn_b"], static, want):
            assert torch.equal(a, b), f"{name} differs after replay {step}"
        assert torch.equal(rm, want[5]) and torch.equal(rv, want[6])
    graph_e, static_e = _graph_capture(eval_step)
    graph_e.replay()
    torch.cuda.synchronize()
    assert torch.equal(static_e[0], eval_step()[0])


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_no_running_stats(device):
    """track_running_stats=False hands None for the running statistics (batch statistics always)."""
    x, w, gb, bb, _rm, _rv = make_inputs(3, 4, 5, 6, 3, device=device)
    got = ghost_ext.ghost_concat(x, w, gb, bb, None, None, True, 0.1, 1e-5, True, 7, impl="ext")
    want = ghost_ext.ghost_concat(x, w, gb, bb, None, None, True, 0.1, 1e-5, True, 7, impl="torch")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@needs_ext
def test_auto_keeps_cpu_half_precision_on_the_reference(monkeypatch):
    # bench_op measured the CPU kernels slower than the reference in bfloat16: "auto" must not pick them
    calls = []
    monkeypatch.setattr(ghost_ext, "_reference", lambda *a: calls.append(a[0].dtype) or a[0])
    ghost_ext._use_ext_cache.clear()
    t = make_inputs(2, 4, 5, 5, 3, torch.bfloat16, "cpu")
    ghost_ext.ghost_concat(*t, False, 0.1, 1e-5, True, 7, impl="auto")
    assert calls == [torch.bfloat16]
    t = make_inputs(2, 4, 5, 5, 3, torch.float32, "cpu")
    ghost_ext.ghost_concat(*t, False, 0.1, 1e-5, True, 7, impl="auto")
    assert calls == [torch.bfloat16]  # float32 went to the kernels


@needs_ext
def test_auto_sends_cpu_channels_last_to_the_reference(monkeypatch):
    # bench_train measured a channels_last training step 1.3x faster through the reference (oneDNN's depthwise
    # conv) than through the CPU kernels: "auto" picks the reference for NHWC input, the kernels for NCHW
    calls = []
    monkeypatch.setattr(ghost_ext, "_reference", lambda *a: calls.append(a[0].is_contiguous()) or a[0])
    ghost_ext._use_ext_cache.clear()
    x, *rest = make_inputs(2, 4, 5, 5, 3, torch.float32, "cpu")
    ghost_ext.ghost_concat(x.contiguous(memory_format=torch.channels_last), *rest, False, 0.1, 1e-5, True, 7)
    assert calls == [False]
    out = ghost_ext.ghost_concat(x, *rest, False, 0.1, 1e-5, True, 7)  # cached per layout: NCHW is not affected
    assert calls == [False] and out.shape == (2, 7, 5, 5)
    ghost_ext.ghost_concat(x.contiguous(memory_format=torch.channels_last), *rest, False, 0.1, 1e-5, True, 7,
                           impl="ext")  # "ext" still forces the kernels
    assert calls == [False]


def test_profile_op_kernel_names():
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from profile_op import short_name
    assert short_name("void ghost::(anonymous namespace)::tiled_fwd_stats_kernel<float, float, 3>"
                      "(ghost::Geom, ghost::LaunchCfg, float const*)") == "tiled_fwd_stats_kernel<float, float, 3>"
    assert short_name("void at::native::(anonymous namespace)::conv_depthwise2d_forward_kernel<3, float, int>"
                      "(at::GenericPackedTensorAccessor<float const, 4ul>, int)") == "conv_depthwise2d_forward_kernel<3, float, int>"
    assert short_name("aten::convolution_backward") == "convolution_backward"


@needs_ext
def test_profile_op_runs_on_cpu(tmp_path):
    """profile_op.py end to end on CPU (on CUDA it profiles kernels; gpu_check.sh runs it there)."""
    import json
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import profile_op
    assert profile_op.main(["--device", "cpu", "--quick", "--img", "48", "--calls", "1", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "profile_op_cpu.json").read_text())
    assert len(res["shapes"]) == 4 and res["batch"] == 32
    for impl in ("ext", "torch"):
        assert res["summary"][impl]["busy_us"] > 0 and res["totals"][impl]
    assert "ghost_concat" in res["totals"]["ext"] and "ghost_concat" not in res["totals"]["torch"]
    assert "| impl | wall ms (sum of 4)" in (tmp_path / "profile_op_cpu.md").read_text()


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_backward_fills_nothing(device):
    """The statistics outputs never get a gradient. Autograd used to materialise zeros for all three
    before every backward: three extra kernel launches per GhostModule on CUDA."""
    x, w, gb, bb, rm, rv = make_inputs(2, 4, 5, 5, 3, device=device)
    leaves = [t.requires_grad_() for t in (x, w, gb, bb)]
    out = ghost_ext.ghost_concat(*leaves, rm, rv, True, 0.1, 1e-5, True, 7, impl="ext")
    gout = torch.randn_like(out)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        grads = torch.autograd.grad(out, leaves, gout)
    names = {e.key for e in prof.key_averages()}
    assert "ghost_ext::ghost_concat_backward" in names, names
    assert not names & {"aten::zeros", "aten::zeros_like", "aten::zero_", "aten::fill_"}, names
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
