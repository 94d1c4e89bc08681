"""The CUDA kernels, run on the CPU through the emulator in tests/cuda_emu/cuda_emu.h.

CI builds the CUDA kernels but has no GPU to run them on; this test compiles ghost_cuda.cu and its
host code ghost_cuda_host.cpp for the emulator (one OS thread per CUDA thread, real barriers, warp
shuffles by exchange) and compares them with the extension's CPU kernels, in float64 to 1e-10 and
in the half types as autocast hands them over. Every output buffer starts as NaN, so an element the
kernels never write fails the comparison. The build (about 30 s) is cached by torch under
$TORCH_EXTENSIONS_DIR.
"""
import os
from pathlib import Path

import pytest
import torch

import ghost_ext
from test_op import make_inputs  # noqa: E402 (tests/ is on sys.path under pytest)

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not ghost_ext.has_extension(), reason="ghost_ext._C is not built (the oracle)")


@pytest.fixture(scope="module")
def emu():
    from torch.utils.cpp_extension import load

    os.environ.setdefault("MAX_JOBS", "2")
    return load(name="ghost_cuda_emu", sources=[str(REPO / "tests" / "cuda_emu" / "emu_module.cpp")],
                extra_cflags=["-O2", "-pthread"], extra_ldflags=["-pthread"],
                extra_include_paths=[str(REPO / "tests" / "cuda_emu")], verbose=False)


def inputs(n, c, h, w, k, dtype, channels_last, seed):
    return make_inputs(n, c, h, w, k, dtype, "cpu", channels_last, seed)


def rel(a, b):
    a, b = a.double(), b.double()
    assert not torch.isnan(a).any(), "an output element was never written (NaN poison) or is NaN"
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def check(emu, shape, dtype, channels_last, training, relu, seed=0, tol=1e-10):
    n, c, h, w, k, oc = shape
    x, weight, bn_w, bn_b, rm, rv = inputs(n, c, h, w, k, dtype, channels_last, seed)
    cpu = torch.ops.ghost_ext.ghost_concat.default
    want = cpu(x, weight, bn_w, bn_b, rm, rv, training, 1e-5, relu, oc)
    got = emu.forward(x, weight, bn_w, bn_b, rm, rv, training, 1e-5, relu, oc)
    names = ("out", "mean", "invstd", "var")
    for name, a, b in zip(names, got, want):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert rel(a, b) < tol, f"forward {name}: {rel(a, b):.3g}"
    assert got[0].is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    gout = torch.randn(n, oc, h, w, generator=torch.Generator().manual_seed(seed + 7)).to(dtype)
    if channels_last:
        gout = gout.contiguous(memory_format=torch.channels_last)
    mean, invstd = want[1], want[2]
    bwd = torch.ops.ghost_ext.ghost_concat_backward.default
    want_b = bwd(gout, x, weight, bn_w, bn_b, mean, invstd, training, relu, oc)
    got_b = emu.backward(gout, x, weight, bn_w, bn_b, mean, invstd, training, relu, oc)
    for name, a, b in zip(("grad_x", "grad_weight", "grad_bn_weight", "grad_bn_bias"), got_b, want_b):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        # grad of a k=1 weight under batch-statistics BN is analytically ~0: compare to the scale of x
        e = (a.double() - b.double()).norm().item() / max(b.double().norm().item(), 1e-3 * b.numel() ** 0.5)
        assert not torch.isnan(a).any(), f"{name}: an element was never written (NaN poison)"
        assert e < tol, f"backward {name}: {e:.3g}"


SHAPES = [  # (N, C, H, W, k, out_channels)
    (2, 4, 6, 6, 3, 8),
    (3, 5, 7, 4, 3, 9),      # odd out_channels, non-square
    (2, 6, 5, 5, 1, 7),      # k = 1
    (2, 3, 9, 8, 5, 5),      # k = 5, a narrow cheap half
    (1, 4, 5, 7, 7, 6),      # N = 1, k = 7 (the largest the CUDA kernels take)
    (4, 6, 1, 1, 3, 12),     # 1x1 maps
    (2, 8, 3, 5, 3, 8),      # out_channels == C: no cheap branch at all
    (3, 36, 23, 29, 3, 72),  # several pixel chunks and channel groups (the partial-sum paths)
    (2, 3, 70, 40, 3, 6),    # tiled: several bands down a plane, the last one short
    (5, 4, 8, 8, 5, 8),      # tiled: several planes per tile, the last group short
    (2, 2, 3, 300, 3, 3),    # tiled: a row wider than the block, one row per tile
]


@pytest.fixture
def fused_max_tiles(emu):
    """Set the fused path's tile limit for one test (0: the three/four-launch tiled path), then restore it."""
    saved = emu.get_fused_max_tiles()
    yield emu.set_fused_max_tiles
    emu.set_fused_max_tiles(saved)


def test_launch_config(emu):
    """NCHW takes the tiled kernels (with the tiles the shapes above are meant to exercise), channels_last
    and k = 9 the generic ones; the tiled backward's shared memory stays under the default 48 KB; the
    fused path takes channels of at most 64 tiles (GhostNet's maps up to 29x29 at batch 64)."""
    def cfg(shape, cl=False, dtype=torch.float64):
        x = torch.empty(shape[:4], dtype=dtype)  # only the shape and strides matter
        return emu.launch_config(x.contiguous(memory_format=torch.channels_last) if cl else x, shape[4], shape[5])

    assert cfg(SHAPES[8])["tiled"] and cfg(SHAPES[8])["bands"] > 1 and 70 % cfg(SHAPES[8])["th"] != 0
    c = cfg(SHAPES[9])
    assert c["tiled"] and c["th"] == 8 and 1 < c["tp"] < 5 and 5 % c["tp"] != 0
    assert cfg(SHAPES[10])["tiled"] and cfg(SHAPES[10])["th"] == 1
    assert not cfg(SHAPES[0], cl=True)["tiled"]
    assert not cfg((2, 4, 12, 12, 9, 8))["tiled"]
    assert cfg(SHAPES[8])["fused"] and cfg(SHAPES[8])["G"] > 1 and cfg(SHAPES[5])["G"] == 1
    for n, c, hw, fused in [(64, 80, 8, True), (64, 336, 15, True), (64, 20, 29, True), (64, 36, 57, False),
                            (64, 8, 114, False), (256, 480, 8, True)]:
        d = cfg((n, c, hw, hw, 3, 2 * c), dtype=torch.float32)
        assert d["tiled"] and d["fused"] == fused and (d["G"] <= 64) == fused, (n, c, hw, d)
    for n, c, hw in [(64, 8, 114), (64, 80, 8), (256, 24, 114), (1, 3, 2000)]:
        for k in (1, 3, 5, 7):
            for dtype in (torch.float32, torch.float64):
                d = cfg((n, c, hw, hw, k, 2 * c), dtype=dtype)
                assert not d["tiled"] or d["smem_bwd"] <= 44 * 1024, (n, c, hw, k, dtype, d)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_emulated_cuda_kernels_float64(emu, shape, channels_last, training):
    check(emu, shape, torch.float64, channels_last, training, relu=True, seed=sum(shape))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", [SHAPES[i] for i in (1, 4, 5, 6, 8, 9, 10)], ids=lambda s: "x".join(map(str, s)))
def test_emulated_tiled_kernels_unfused(emu, fused_max_tiles, shape, training):
    """The tiled kernels with the separate merging launches (what channels of over 64 tiles get)."""
    fused_max_tiles(0)
    x = torch.empty(shape[:4], dtype=torch.float64)
    assert emu.launch_config(x, shape[4], shape[5])["fused"] is False
    check(emu, shape, torch.float64, False, training, relu=True, seed=sum(shape) + 1)


def test_emulated_fused_rows_longer_than_a_block(emu, fused_max_tiles):
    """Fused with 300 tiles per channel: every strided merge loop (stats, reduce sums, the last tile's
    grad_w sum) runs past one block of 256 threads."""
    fused_max_tiles(1000)
    shape = (3, 1, 600, 40, 3, 2)
    d = emu.launch_config(torch.empty(shape[:4], dtype=torch.float64), 3, 2)
    assert d["fused"] and d["G"] > 256, d
    check(emu, shape, torch.float64, False, True, relu=True, seed=5)


@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[7]], ids=["small", "chunks"])
def test_emulated_cuda_kernels_no_relu(emu, shape):
    check(emu, shape, torch.float64, False, True, relu=False, seed=3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_emulated_cuda_kernels_low_precision(emu, dtype, channels_last):
    """Half types against the CPU kernels on the same inputs (both accumulate in float32); the output
    rounding of the half type sets the bar."""
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    check(emu, (3, 12, 19, 23, 3, 24), dtype, channels_last, True, True, seed=11, tol=tol)
