// Eval-mode CPU forward of the ghost op on channels_last (NHWC) input, written for batch-1
// inference of a BN-folded network (model.fuse_for_inference keeps every activation NHWC).
//
// Why a separate kernel: the NCHW kernel in ghost.cpp works on (n, c) planes, so an NHWC x would
// have to be converted to NCHW and the output back (two extra copies of small maps per call,
// more than the op's own arithmetic at 227 px). Here one pass reads x once and writes the output
// in its final layout: for each pixel, the C input channels are copied, then the out_channels - C
// depthwise outputs (BN folded to scale/shift from the running statistics, optional ReLU) are
// written after them. The inner loops run over contiguous channels, so they vectorise:
//  - interior pixels, float32 (the inference case): 8- and 4-channel blocks in GCC vector types,
//    the block's K*K weights held in registers across a row's pixels;
//  - other dtypes, leftover channels and border pixels (zero padding = skipped taps): plain loops
//    over channels that the compiler vectorises; every dtype accumulates in float (double for
//    float64), with taps in dw_conv_point's order and BN + ReLU from ghost_math.h;
//  - everything is also compiled for AVX2 + FMA and picked at run time when the CPU has them.
// Rows (N*H) are split across threads only when a call has enough work (grain_for): at batch 1
// the small late-stage maps run on the calling thread.
//
// Used by ghost_concat_cpu (ghost.cpp) for `!training && x is channels_last`; the function takes
// tensors only and knows nothing of the op's schema.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "ghost_math.h"

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define GHOST_NHWC_X86 1
#define GHOST_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define GHOST_NHWC_X86 0
#define GHOST_ALWAYS_INLINE inline
#endif

namespace ghost {
namespace nhwc {

// Below about this many multiply-adds (roughly 30 us of work on one core) a parallel region costs
// more than it saves (waking the second thread is a few microseconds, and on a busy machine much
// more): such calls run on the calling thread. At 227 px and batch 1, GhostNet's 15x15 and 8x8
// calls (and the thin 57x57 / 29x29 ones) stay on one thread; the 114x114 calls, 57x57 with C=36
// and 29x29 with C=120 split in two (measured on a 2-core EPYC: about halves those calls).
constexpr int64_t kMinParallelWork = 800000;

// Rows (or channels) per parallel chunk so that a chunk holds at least kMinParallelWork. When the
// whole range is at most one grain, at::parallel_for runs it inline without a parallel region.
inline int64_t grain_for(int64_t work_per_unit) {
  const int64_t w = std::max<int64_t>(work_per_unit, 1);
  return std::max<int64_t>(1, (kMinParallelWork + w - 1) / w);
}

// Everything the row kernel needs; pointers into contiguous buffers.
template <typename scalar_t, typename acc_t>
struct Args {
  const scalar_t* x;    // (N, H, W, C)
  scalar_t* out;        // (N, H, W, OC)
  const acc_t* wt;      // (K*K, NY): tap-major, so the loop over channels reads contiguous weights
  const acc_t* scale;   // (NY) BN folded: z = y * scale + shift
  const acc_t* shift;   // (NY)
  int64_t H, W, C, OC, NY;
  int K;
};

#if defined(__GNUC__) && !defined(__clang__)
#define GHOST_NHWC_VEC 1
// GCC vector extensions (the vector ?: below is GCC's; other compilers take the generic loops) for the float32 interior: explicit vectors keep the block's weights
// in registers and the BN + ReLU epilogue vectorised (the auto-vectoriser scalarised that part).
typedef float vf8 __attribute__((vector_size(32)));
typedef float vf4 __attribute__((vector_size(16)));

// Loads and stores at any float address through memcpy (unaligned vmovups; no aliasing issue).
// (out-parameter rather than a return value: no vector-ABI question for the baseline build)
template <typename V>
GHOST_ALWAYS_INLINE void vload(V& v, const float* p) {
  __builtin_memcpy(&v, p, sizeof(V));
}

template <typename V>
GHOST_ALWAYS_INLINE void vstore(float* p, const V& v) {
  __builtin_memcpy(p, &v, sizeof(V));
}

// Interior pixels (all K*K taps inside the map) of one row, KC fixed, float32, B channels at a
// time (V = the B-wide vector): the block's weights for all taps are loaded once per row, and every
// tap is a constant offset from base (top-left tap of the first pixel, at the block's first
// channel). Copies the block's input channels too. Taps are summed a-major, b-minor, as
// dw_conv_point does.
template <typename V, int KC, bool RELU>
GHOST_ALWAYS_INLINE void block_interior_f32(const float* base, int64_t row_stride, int64_t C, int64_t OC,
                                            int64_t n_pix, const float* wt, int64_t NY, const float* scale,
                                            const float* shift, float* op) {
  constexpr int P = KC / 2;
  V wl[KC * KC];
  V sc, sh;
  for (int t = 0; t < KC * KC; ++t) vload(wl[t], wt + t * NY);
  vload(sc, scale);
  vload(sh, shift);
  const V zero = {};
  for (int64_t p = 0; p < n_pix; ++p) {
    const float* xb = base + p * C;
    float* o = op + p * OC;
    V s = zero, xv;
    for (int a = 0; a < KC; ++a)
      for (int b = 0; b < KC; ++b) {
        vload(xv, xb + a * row_stride + b * C);
        s += wl[a * KC + b] * xv;
      }
    vload(xv, xb + P * row_stride + P * C);
    vstore(o, xv);
    V z = s * sc + sh;
    if constexpr (RELU) z = z < zero ? zero : z;  // NaN compares false and passes, as in bn_act
    vstore(o + C, z);
  }
}
#else
#define GHOST_NHWC_VEC 0
#endif

// One interior pixel, channels [c_begin, NY) of y and [c_begin, C) of the copy (what the blocks
// above left over); base is the pixel's top-left tap at channel 0.
template <typename scalar_t, typename acc_t, int KC, bool RELU>
GHOST_ALWAYS_INLINE void pixel_interior(const scalar_t* __restrict__ base, int64_t row_stride, int64_t C,
                                        const acc_t* __restrict__ wt, const acc_t* __restrict__ scale,
                                        const acc_t* __restrict__ shift, int64_t NY, int64_t c_begin,
                                        scalar_t* __restrict__ op) {
  constexpr int P = KC / 2;
  const scalar_t* __restrict__ centre = base + P * row_stride + P * C;
  for (int64_t c = c_begin; c < NY; ++c) {
    acc_t s = acc_t(0);
    for (int a = 0; a < KC; ++a)
      for (int b = 0; b < KC; ++b)
        s += wt[(a * KC + b) * NY + c] * static_cast<acc_t>(base[a * row_stride + b * C + c]);
    op[c] = centre[c];
    op[C + c] = static_cast<scalar_t>(bn_act(s, scale[c], shift[c], RELU));
  }
  for (int64_t c = NY; c < C; ++c) op[c] = centre[c];
}

// Any output pixel, any K: one pass per valid tap over an acc_t buffer of NY channels (zero
// padding = skipped taps), same tap order and the same result as pixel_interior.
template <typename scalar_t, typename acc_t, bool RELU>
GHOST_ALWAYS_INLINE void pixel_border(const scalar_t* ximg, int64_t h, int64_t w, int64_t H, int64_t W, int64_t C,
                                      int K, const acc_t* __restrict__ wt, const acc_t* __restrict__ scale,
                                      const acc_t* __restrict__ shift, int64_t NY, int64_t c_begin,
                                      acc_t* __restrict__ acc, scalar_t* __restrict__ op) {
  const int P = K / 2;
  std::fill(acc + c_begin, acc + NY, acc_t(0));
  for (int a = 0; a < K; ++a) {
    const int64_t hh = h + a - P;
    if (hh < 0 || hh >= H) continue;
    for (int b = 0; b < K; ++b) {
      const int64_t ww = w + b - P;
      if (ww < 0 || ww >= W) continue;
      const scalar_t* __restrict__ xt = ximg + (hh * W + ww) * C;
      const acc_t* __restrict__ wtt = wt + (a * K + b) * NY;
      for (int64_t c = c_begin; c < NY; ++c) acc[c] += wtt[c] * static_cast<acc_t>(xt[c]);
    }
  }
  const scalar_t* __restrict__ centre = ximg + (h * W + w) * C;
  for (int64_t c = c_begin; c < NY; ++c) {
    op[c] = centre[c];
    op[C + c] = static_cast<scalar_t>(bn_act(acc[c], scale[c], shift[c], RELU));
  }
  for (int64_t c = NY; c < C; ++c) op[c] = centre[c];
}

#if GHOST_NHWC_VEC
// One border pixel (some taps outside the map), KC fixed, float32, channels [c0, c0 + B): like
// block_interior_f32 over the valid taps only, in the same order (so the same sums as
// pixel_border); the weights come from memory (L1) here.
template <typename V, int KC, bool RELU>
GHOST_ALWAYS_INLINE void block_border_f32(const float* ximg, int64_t h, int64_t w, int64_t H, int64_t W, int64_t C,
                                          const float* wt, int64_t NY, const float* scale, const float* shift,
                                          int64_t c0, float* op) {
  constexpr int P = KC / 2;
  const int a0 = static_cast<int>(std::max<int64_t>(0, P - h)), a1 = static_cast<int>(std::min<int64_t>(KC, H - h + P));
  const int b0 = static_cast<int>(std::max<int64_t>(0, P - w)), b1 = static_cast<int>(std::min<int64_t>(KC, W - w + P));
  const V zero = {};
  V s = zero, xv, wv, sc, sh;
  for (int a = a0; a < a1; ++a)
    for (int b = b0; b < b1; ++b) {
      vload(xv, ximg + ((h + a - P) * W + (w + b - P)) * C + c0);
      vload(wv, wt + (a * KC + b) * NY + c0);
      s += wv * xv;
    }
  vload(xv, ximg + (h * W + w) * C + c0);
  vstore(op + c0, xv);
  vload(sc, scale + c0);
  vload(sh, shift + c0);
  V z = s * sc + sh;
  if constexpr (RELU) z = z < zero ? zero : z;
  vstore(op + C + c0, z);
}
#endif

// Any border pixel. Few channels (NY <= 16): float32 channel blocks (pixel_border's per-tap passes
// over a short buffer cost more than the arithmetic there); more channels: pixel_border's long
// per-tap loops are faster (measured at 227 px, C 8..480).
template <typename scalar_t, typename acc_t, int KC, bool RELU>
GHOST_ALWAYS_INLINE void border_any(const Args<scalar_t, acc_t>& a, const scalar_t* ximg, int64_t h, int64_t w,
                                    int K, acc_t* acc, scalar_t* op) {
  int64_t c0 = 0;
#if GHOST_NHWC_VEC
  if constexpr (KC > 0 && std::is_same_v<scalar_t, float> && std::is_same_v<acc_t, float>) if (a.NY <= 16) {
    for (; c0 + 8 <= a.NY; c0 += 8)
      block_border_f32<vf8, KC, RELU>(ximg, h, w, a.H, a.W, a.C, a.wt, a.NY, a.scale, a.shift, c0, op);
    for (; c0 + 4 <= a.NY; c0 += 4)
      block_border_f32<vf4, KC, RELU>(ximg, h, w, a.H, a.W, a.C, a.wt, a.NY, a.scale, a.shift, c0, op);
  }
#endif
  if (c0 < a.C)
    pixel_border<scalar_t, acc_t, RELU>(ximg, h, w, a.H, a.W, a.C, K, a.wt, a.scale, a.shift, a.NY, c0, acc, op);
}

// Output rows [r0, r1) of the flattened (N*H) row index. KC: compile-time kernel size, or 0 for
// any K (every pixel through pixel_border; slower, for kernel sizes GhostNet does not use).
template <typename scalar_t, typename acc_t, int KC, bool RELU>
GHOST_ALWAYS_INLINE void rows_impl(const Args<scalar_t, acc_t>& a, int64_t r0, int64_t r1) {
  const int K = KC > 0 ? KC : a.K;
  const int64_t P = K / 2;
  const int64_t H = a.H, W = a.W, C = a.C, OC = a.OC, NY = a.NY;
  std::vector<acc_t> acc(NY);
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t n = r / H, h = r % H;
    const scalar_t* ximg = a.x + n * H * W * C;
    scalar_t* orow = a.out + r * W * OC;
    // the input channels pass through inside the pixel functions (in the same channel loop as y:
    // a separate per-pixel memcpy call costs more than the copy at small C)
    // interior columns [w0, w1) of an interior row take the fixed-K path
    const bool row_inside = KC > 0 && h >= P && h < H - P;
    const int64_t w0 = row_inside ? std::min(P, W) : W;
    const int64_t w1 = row_inside ? std::max(W - P, w0) : W;
    for (int64_t w = 0; w < w0; ++w) border_any<scalar_t, acc_t, KC, RELU>(a, ximg, h, w, K, acc.data(), orow + w * OC);
    if constexpr (KC > 0) {
      if (w1 > w0) {
        const scalar_t* base = ximg + ((h - P) * W - P) * C + w0 * C;  // top-left tap of pixel w0
        scalar_t* obase = orow + w0 * OC;
        int64_t c0 = 0;
#if GHOST_NHWC_VEC
        if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<acc_t, float>) {
          for (; c0 + 8 <= NY; c0 += 8)
            block_interior_f32<vf8, KC, RELU>(base + c0, W * C, C, OC, w1 - w0, a.wt + c0, NY, a.scale + c0,
                                              a.shift + c0, obase + c0);
          for (; c0 + 4 <= NY; c0 += 4)
            block_interior_f32<vf4, KC, RELU>(base + c0, W * C, C, OC, w1 - w0, a.wt + c0, NY, a.scale + c0,
                                              a.shift + c0, obase + c0);
        }
#endif
        if (c0 < C)
          for (int64_t w = 0; w < w1 - w0; ++w)
            pixel_interior<scalar_t, acc_t, KC, RELU>(base + w * C, W * C, C, a.wt, a.scale, a.shift, NY, c0,
                                                      obase + w * OC);
      }
    }
    for (int64_t w = w1; w < W; ++w) border_any<scalar_t, acc_t, KC, RELU>(a, ximg, h, w, K, acc.data(), orow + w * OC);
  }
}

template <typename scalar_t, typename acc_t, int KC, bool RELU>
void rows_generic(const Args<scalar_t, acc_t>& a, int64_t r0, int64_t r1) {
  rows_impl<scalar_t, acc_t, KC, RELU>(a, r0, r1);
}

#if GHOST_NHWC_X86
// The same code compiled for AVX2 + FMA (the extension is built for the x86-64 baseline, i.e.
// 4-wide SSE2), chosen at run time when the CPU has them: 2-3x faster channel loops.
template <typename scalar_t, typename acc_t, int KC, bool RELU>
__attribute__((target("avx2,fma"))) void rows_avx2(const Args<scalar_t, acc_t>& a, int64_t r0, int64_t r1) {
  rows_impl<scalar_t, acc_t, KC, RELU>(a, r0, r1);
}

inline bool cpu_has_avx2_fma() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}
#endif

template <typename scalar_t, typename acc_t, int KC, bool RELU>
void run_rows(const Args<scalar_t, acc_t>& a, int64_t rows, int64_t grain) {
  using Fn = void (*)(const Args<scalar_t, acc_t>&, int64_t, int64_t);
  Fn fn = &rows_generic<scalar_t, acc_t, KC, RELU>;
#if GHOST_NHWC_X86
  if (cpu_has_avx2_fma()) fn = &rows_avx2<scalar_t, acc_t, KC, RELU>;
#endif
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) { fn(a, r0, r1); });
}

template <typename scalar_t, typename acc_t, bool RELU>
void run_k(const Args<scalar_t, acc_t>& a, int64_t rows, int64_t grain) {
  switch (a.K) {
    case 1: run_rows<scalar_t, acc_t, 1, RELU>(a, rows, grain); break;
    case 3: run_rows<scalar_t, acc_t, 3, RELU>(a, rows, grain); break;
    case 5: run_rows<scalar_t, acc_t, 5, RELU>(a, rows, grain); break;
    case 7: run_rows<scalar_t, acc_t, 7, RELU>(a, rows, grain); break;
    default: run_rows<scalar_t, acc_t, 0, RELU>(a, rows, grain);
  }
}

// out (N, out_channels, H, W), channels_last = cat([x, relu?(dw(x) * scale + shift)], 1)[:, :out_channels]
// with scale/shift folded from (mean, invstd, gamma, beta) by bn_fold.
//   x: (N, C, H, W) channels_last-contiguous, float32/float64/float16/bfloat16
//   wacc: (C, K, K) and gamma, beta, mean, invstd: (C), all contiguous in the accumulation type
//   (float64 for float64 x, float32 otherwise).
inline at::Tensor forward_eval(const at::Tensor& x, const at::Tensor& wacc, const at::Tensor& gamma,
                               const at::Tensor& beta, const at::Tensor& mean, const at::Tensor& invstd, bool relu,
                               int64_t out_channels) {
  TORCH_CHECK(x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast),
              "ghost_cpu_nhwc.h: forward_eval needs a channels_last-contiguous 4-D x");
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t OC = out_channels, NY = OC - C;
  const int K = static_cast<int>(wacc.size(-1));
  at::Tensor out = at::empty({N, OC, H, W}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ghost_concat_cpu_nhwc", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    TORCH_CHECK(wacc.scalar_type() == c10::CppTypeToScalarType<acc_t>::value,
                "ghost_cpu_nhwc.h: parameters must be in the accumulation type");
    const acc_t* wd = wacc.const_data_ptr<acc_t>();
    const acc_t* gd = gamma.const_data_ptr<acc_t>();
    const acc_t* bd = beta.const_data_ptr<acc_t>();
    const acc_t* md = mean.const_data_ptr<acc_t>();
    const acc_t* isd = invstd.const_data_ptr<acc_t>();
    // Per-call setup is O(C * K * K): transpose the weights tap-major and fold BN per channel.
    std::vector<acc_t> wt(static_cast<size_t>(K) * K * NY), scale(NY), shift(NY);
    for (int64_t c = 0; c < NY; ++c) {
      for (int t = 0; t < K * K; ++t) wt[t * NY + c] = wd[c * K * K + t];
      bn_fold(md[c], isd[c], gd[c], bd[c], scale[c], shift[c]);
    }
    Args<scalar_t, acc_t> a{x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), wt.data(), scale.data(),
                            shift.data(), H, W, C, OC, NY, K};
    const int64_t grain = grain_for(W * (C + NY * K * K));
    if (relu)
      run_k<scalar_t, acc_t, true>(a, N * H, grain);
    else
      run_k<scalar_t, acc_t, false>(a, N * H, grain);
  });
  return out;
}

}  // namespace nhwc
}  // namespace ghost
