"""The ghost op's output layout on every path: out_channels channels in x's memory format (channels_last
for channels_last x, else contiguous), never a strided view of a wider concatenation, with the values of
the reference.

Seeded random shapes (odd and even C, C == 1 and 1x1 maps included, out_channels anywhere in [C, 2C],
kernels 1/3/5), contiguous and channels_last x, float32/float64/bfloat16/float16 on the CPU, training and
eval, every impl this build runs; then GhostModule's three paths (op, modules, fused). Values are checked
against an independent oracle: the op's defining formula, cat([x, y], 1)[:, :out_channels], in float64.
"""
import copy
import math
import random
import warnings

import pytest
import torch
import torch.nn.functional as F

import ghost_ext
import model as M

pytestmark = pytest.mark.usefixtures("one_thread")

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# relative norm error against the float64 oracle on the same (rounded) inputs, as in test_op.py
TOL = {torch.float64: 1e-9, torch.float32: 2e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
IMPLS = ["torch", "auto"] + (["ext"] if ghost_ext.has_kernel("cpu") else [])


def expected_format(x: torch.Tensor) -> torch.memory_format:
    """x's layout as the op defines it: channels_last only when x is NHWC and not also plain-contiguous
    (C == 1 or H == W == 1 are both, and count as NCHW)."""
    nhwc = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if nhwc else torch.contiguous_format


def oracle(x, weight, bn_w, bn_b, rm, rv, training, relu, oc):
    """The op's defining formula in float64: (output, running_mean, running_var)."""
    x, weight, bn_w, bn_b = (t.double() for t in (x, weight, bn_w, bn_b))
    rm, rv = rm.double().clone(), rv.double().clone()  # updated in training; .double() of float64 is no copy
    y = F.batch_norm(F.conv2d(x, weight, padding=weight.shape[-1] // 2, groups=x.shape[1]), rm, rv, bn_w, bn_b,
                     training, 0.1, 1e-5)
    return torch.cat([x, F.relu(y) if relu else y], 1)[:, :oc], rm, rv


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return (a - b).norm().item() / max(b.norm().item(), math.sqrt(b.numel()), 1e-30)


def random_cases(seed: int, count: int = 12):
    """(n, c, h, w, k, oc): small shapes, every C parity, oc over the whole range [C, 2C]."""
    rng = random.Random(seed)
    cases = []
    for i in range(count):
        c = rng.choice([1, 2, 3, 4, 5, 6, 7, 8, 9])
        oc = [c, 2 * c, rng.randint(c, 2 * c)][i % 3]  # both ends of the range, and anywhere between
        cases.append((rng.randint(2, 3), c, rng.randint(1, 6), rng.randint(1, 6), rng.choice([1, 3, 5]), oc))
    return cases


def make_inputs(n, c, h, w, k, dtype, channels_last, seed):
    """x in dtype; the parameters in float32 (float64 for float64 x), as autocast hands them to the op."""
    g = torch.Generator().manual_seed(seed)
    pd = torch.float64 if dtype == torch.float64 else torch.float32
    x = (torch.randn(n, c, h, w, generator=g, dtype=torch.float64) * 1.5 + 0.3).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = (torch.randn(c, 1, k, k, generator=g, dtype=torch.float64) / k).to(pd)
    bn_w = (torch.rand(c, generator=g, dtype=torch.float64) + 0.5).to(pd)
    bn_b = (torch.randn(c, generator=g, dtype=torch.float64) * 0.5).to(pd)
    rm = (torch.randn(c, generator=g, dtype=torch.float64) * 0.1).to(pd)
    rv = (torch.rand(c, generator=g, dtype=torch.float64) + 0.5).to(pd)
    return x, weight, bn_w, bn_b, rm, rv


def check_layout(out: torch.Tensor, x: torch.Tensor, oc: int, what: str) -> None:
    n, c, h, w = x.shape
    assert out.shape == (n, oc, h, w) and out.dtype == x.dtype, what
    fmt = expected_format(x)
    assert out.is_contiguous(memory_format=fmt), f"{what}: strides {out.stride()}, want {fmt}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_op_output_in_x_memory_format(dtype, channels_last):
    for i, (n, c, h, w, k, oc) in enumerate(random_cases(seed=DTYPES.index(dtype) * 2 + channels_last)):
        t = make_inputs(n, c, h, w, k, dtype, channels_last, seed=i)
        for training in (True, False):
            relu = (i + training) % 2 == 0
            want, want_rm, want_rv = oracle(*t, training, relu, oc)
            for impl in IMPLS:
                x, weight, bn_w, bn_b, rm, rv = (u.clone() for u in t)
                what = f"impl={impl} training={training} shape={(n, c, h, w)} k={k} oc={oc}"
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # "auto" without the extension says so once
                    out = ghost_ext.ghost_concat(x, weight, bn_w, bn_b, rm, rv, training, 0.1, 1e-5, relu, oc,
                                                 impl=impl)
                check_layout(out, x, oc, what)
                assert torch.equal(out[:, :c], x), f"{what}: the pass-through channels are x, bit for bit"
                assert rel_err(out, want) < TOL[dtype], what
                assert rel_err(rm, want_rm) < TOL[dtype] and rel_err(rv, want_rv) < TOL[dtype], what


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_folded_op_output_in_x_memory_format(dtype, channels_last):
    """ghost_concat_folded (inference after the BN fold): an identity BN carrying the bias."""
    for i, (n, c, h, w, k, oc) in enumerate(random_cases(seed=100 + DTYPES.index(dtype) * 2 + channels_last, count=6)):
        x, weight, _, bias, _, _ = make_inputs(n, c, h, w, k, dtype, channels_last, seed=i)
        ones, zeros, var = torch.ones_like(bias), torch.zeros_like(bias), torch.full_like(bias, 1.0 - 1e-5)
        relu = i % 2 == 0
        want, _, _ = oracle(x, weight, ones, bias, zeros, var, False, relu, oc)
        for impl in IMPLS:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out = ghost_ext.ghost_concat_folded(x, weight, ones, bias, zeros, var, 1e-5, relu, oc, impl=impl)
            what = f"impl={impl} shape={(n, c, h, w)} k={k} oc={oc}"
            check_layout(out, x, oc, what)
            assert torch.equal(out[:, :c], x), what
            assert rel_err(out, want) < TOL[dtype], what


def test_reference_concat_is_a_fresh_tensor_in_x_layout():
    """The issue's case: out_channels < 2C used to return a strided view of cat([x, y], 1)."""
    for channels_last in (False, True):
        x = torch.randn(2, 5, 4, 3)
        y = torch.randn(2, 5, 4, 3)
        if channels_last:
            x, y = (t.contiguous(memory_format=torch.channels_last) for t in (x, y))
        for oc in range(5, 11):
            out = ghost_ext.reference.concat(x, y, oc)
            check_layout(out, x, oc, f"oc={oc} channels_last={channels_last}")
            assert torch.equal(out, torch.cat([x, y], 1)[:, :oc])
            assert out.data_ptr() not in (x.data_ptr(), y.data_ptr())


def test_reference_keeps_the_cheap_branch_in_the_graph_when_cut_off():
    """out_channels == C: the output is x's values, but the weights still get (zero) gradients, as the
    kernels give them, so autograd.grad over all inputs works on every path."""
    for channels_last in (False, True):
        x, weight, bn_w, bn_b, rm, rv = make_inputs(2, 4, 3, 3, 3, torch.float64, channels_last, seed=0)
        leaves = [t.requires_grad_() for t in (x, weight, bn_w, bn_b)]
        out = ghost_ext.ghost_concat(*leaves, rm, rv, True, 0.1, 1e-5, True, 4, impl="torch")
        check_layout(out, x, 4, f"channels_last={channels_last}")
        grads = torch.autograd.grad(out, leaves, torch.ones_like(out))
        assert torch.equal(grads[0], torch.ones_like(x)) and all(not g.any() for g in grads[1:])


# ---- GhostModule's three paths --------------------------------------------------------------------

def module_oracle(gm: M.GhostModule, x: torch.Tensor) -> torch.Tensor:
    """The module's output through its submodules in float64, with the old cat-then-cut formula."""
    ref = copy.deepcopy(gm).double()
    x1 = ref.primary_conv(x.double())
    y = ref.cheap_operation(x1)
    return torch.cat([x1, F.relu(y) if gm.relu else y], 1)[:, :gm.out_chs]


def ghost_modules(dtype: torch.dtype):
    """Seeded GhostModules with odd and even out_chs (odd: the op cuts one channel), eval statistics set."""
    rng = random.Random(7)
    for i in range(4):
        out_chs = [7, 10, 5, 12][i]
        gm = M.GhostModule(rng.randint(2, 6), out_chs, relu=i % 2 == 0, dw_size=[1, 3, 5, 3][i])
        with torch.no_grad():
            for bn in (gm.primary_conv[1], gm.cheap_operation[1]):
                bn.running_mean.uniform_(-0.2, 0.2)
                bn.running_var.uniform_(0.5, 1.5)
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-0.5, 0.5)
        yield gm.to(dtype)


def module_input(gm: M.GhostModule, dtype: torch.dtype, channels_last: bool, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, gm.primary_conv[0].in_channels, 5, 4, generator=g).to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def run_module(gm: M.GhostModule, x: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return gm(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_ghost_module_paths_keep_x_memory_format(dtype, channels_last):
    tol = 1e-4 if dtype == torch.float32 else TOL[dtype] * 2
    for i, base in enumerate(ghost_modules(dtype)):
        x = module_input(base, dtype, channels_last, seed=i)
        for ghost_op in IMPLS:
            for path in ("op", "modules"):
                for training in (True, False):
                    gm = copy.deepcopy(base).train(training)
                    gm.ghost_op, gm.path = ghost_op, path
                    want = module_oracle(gm, x)  # before the forward: training updates the running statistics
                    out = run_module(gm, x)
                    what = f"path={path} ghost_op={ghost_op} training={training} out_chs={gm.out_chs}"
                    check_layout(out, x, gm.out_chs, what)
                    assert rel_err(out, want) < tol, what
            # fused: BN folded, as fuse_for_inference does (there with channels_last weights, see below)
            gm = copy.deepcopy(base).eval()
            gm.ghost_op = ghost_op
            want = module_oracle(gm, x)
            M._fuse_ghost_module(gm)
            assert gm.path == "fused"
            with torch.no_grad():
                out = run_module(gm, x)
            check_layout(out, x, gm.out_chs, f"path=fused ghost_op={ghost_op}")
            assert rel_err(out, want) < tol, f"path=fused ghost_op={ghost_op} out_chs={gm.out_chs}"


def test_fused_ghostnet_module_outputs_are_channels_last():
    """fuse_for_inference stores 4-d weights channels_last, so every GhostModule's op sees NHWC input and
    its output must be NHWC, not a strided view, on every path."""
    net = M.build_model("ghostnet", 5, width=0.25, dropout=0.0).eval()
    for ghost_op in IMPLS:
        fused = M.fuse_for_inference(net)
        M.set_ghost_op(fused, ghost_op)
        seen = []
        for m in fused.modules():
            if isinstance(m, M.GhostModule):
                m.register_forward_hook(lambda _m, _inp, out: seen.append(out))
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fused.blocks(torch.randn(1, fused.conv_stem.out_channels, 16, 16))  # the blocks call each forward()
        assert seen and all(o.is_contiguous(memory_format=torch.channels_last) for o in seen), ghost_op
