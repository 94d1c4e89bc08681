"""The op's channels_last eval kernel on CPU (csrc/ghost_cpu_nhwc.h: what a BN-folded network runs at
inference) against the plain-PyTorch reference in float64.

Covers dtypes, kernel sizes (1/3/5 fixed-size paths, 9 the any-K path), odd out_channels, relu on and
off, batch 1 and > 1, maps smaller than the kernel (1x1, 2x2: border path only) and non-square maps,
and that the output comes back channels_last. Tolerances as in test_op.py (relative norm error).
"""
import math

import pytest
import torch

import ghost_ext
from ghost_ext import reference

pytestmark = pytest.mark.skipif(not ghost_ext.has_kernel("cpu"),
                                reason="ghost_ext._C is not built: run `pip install --no-build-isolation -e .`")

TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def inputs(n: int, c: int, h: int, w: int, k: int, dtype: torch.dtype, seed: int = 0):
    """channels_last x in dtype; parameters in the accumulation type (float64 for float64 x, else
    float32, as autocast hands them over); eval statistics away from (0, 1) so the BN fold matters."""
    g = torch.Generator().manual_seed(seed)
    pd = torch.float64 if dtype == torch.float64 else torch.float32
    x = (torch.randn(n, c, h, w, generator=g, dtype=torch.float64) * 1.5 + 0.3).to(dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    weight = (torch.randn(c, 1, k, k, generator=g, dtype=torch.float64) / k).to(pd)
    bn_w = (torch.rand(c, generator=g, dtype=torch.float64) + 0.5).to(pd)
    bn_b = torch.randn(c, generator=g, dtype=torch.float64).to(pd)
    rm = (torch.randn(c, generator=g, dtype=torch.float64) * 0.5).to(pd)
    rv = (torch.rand(c, generator=g, dtype=torch.float64) + 0.5).to(pd)
    return x, weight, bn_w, bn_b, rm, rv


def check(n, c, h, w, k, oc, relu, dtype, seed=0):
    x, weight, bn_w, bn_b, rm, rv = inputs(n, c, h, w, k, dtype, seed)
    assert x.is_contiguous(memory_format=torch.channels_last)
    rm0, rv0 = rm.clone(), rv.clone()
    with torch.inference_mode():
        out = ghost_ext.ghost_concat(x, weight, bn_w, bn_b, rm, rv, False, 0.1, 1e-5, relu, oc, impl="ext")
    # the oracle in float64 on the same (rounded) inputs
    ref = reference.ghost_concat(x.double(), weight.double(), bn_w.double(), bn_b.double(), rm.double(),
                                 rv.double(), False, 0.1, 1e-5, relu, oc)
    assert out.shape == (n, oc, h, w) and out.dtype == dtype
    # out_format: channels_last unless x is also plain-contiguous (then both layouts are the same memory)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0), "eval must not touch the running statistics"
    # the pass-through channels are a copy, bit for bit
    assert torch.equal(out[:, :c], x)
    err = (out.double() - ref).norm().item() / max(ref.norm().item(), 1e-30)
    assert err < TOL[dtype], f"relative error {err:.2e} (dtype {dtype}, k {k}, shape {(n, c, h, w)}, oc {oc})"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k", [1, 3, 5, 9])
@pytest.mark.parametrize("relu", [True, False])
def test_matches_reference(dtype, k, relu):
    check(2, 6, 7, 9, k, 12, relu, dtype)


@pytest.mark.parametrize("shape", [(1, 8, 12, 12), (3, 5, 6, 11), (1, 7, 1, 1), (2, 4, 1, 6), (1, 6, 2, 2),
                                   (1, 12, 15, 15), (1, 20, 8, 8), (2, 3, 4, 13)])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_shapes(shape, k):
    n, c, h, w = shape
    check(n, c, h, w, k, 2 * c, True, torch.float32)


@pytest.mark.parametrize("oc_extra", [0, 1, 3, 13, "all-1"])
@pytest.mark.parametrize("c", [7, 19])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_out_channels(oc_extra, c, dtype):
    """out_channels anywhere in [C, 2C], odd included (a ghost module with an odd width); with
    C = 19 the float32 interior runs 8- and 4-channel blocks, then a per-channel tail."""
    if oc_extra == 13 and c < 13:
        pytest.skip("out_channels must be <= 2C")
    oc = 2 * c - 1 if oc_extra == "all-1" else c + oc_extra
    check(2, c, 5, 6, 3, oc, True, dtype)


def test_large_map_splits_across_threads():
    """A map big enough for the row split (at::parallel_for over N*H) gives the same result as one thread."""
    x, weight, bn_w, bn_b, rm, rv = inputs(2, 16, 64, 48, 3, torch.float32, seed=3)
    args = (x, weight, bn_w, bn_b, rm, rv, False, 0.1, 1e-5, True, 32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ghost_ext.ghost_concat(*args, impl="ext")
        torch.set_num_threads(max(2, threads))
        many = ghost_ext.ghost_concat(*args, impl="ext")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)  # rows are independent: no reduction whose order could change
    check(2, 16, 64, 48, 3, 32, True, torch.float32, seed=3)


def test_nan_and_negative_zero_pass_through():
    """The copied channels are the input bits (NaN, -0.0 kept); relu passes NaN as F.relu does."""
    x, weight, bn_w, bn_b, rm, rv = inputs(1, 4, 5, 5, 3, torch.float32)
    x[0, 1, 2, 2] = float("nan")
    x[0, 2, 0, 0] = -0.0
    out = ghost_ext.ghost_concat(x, weight, bn_w, bn_b, rm, rv, False, 0.1, 1e-5, True, 8, impl="ext")
    ref = reference.ghost_concat(x, weight, bn_w, bn_b, rm, rv, False, 0.1, 1e-5, True, 8)
    assert math.copysign(1.0, out[0, 2, 0, 0].item()) == -1.0
    assert torch.equal(out.isnan(), ref.isnan())
    finite = ~ref.isnan()
    torch.testing.assert_close(out[finite], ref[finite], rtol=1e-5, atol=1e-5)


def test_folded_ghostnet_matches_plain_op():
    """The case the kernel is for: a BN-folded ghostnet (channels_last throughout) gives the same
    logits with the extension as with the plain-PyTorch op."""
    import model  # the project's own module: an import error fails the test, never skips it
    torch.manual_seed(0)
    net = model.build_model("ghostnet", 10, width=0.5).eval()
    fused = model.fuse_for_inference(net)
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        model.set_ghost_op(fused, "ext")
        a = fused(x)
        model.set_ghost_op(fused, "torch")
        b = fused(x)
        c = net(x)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-4)
