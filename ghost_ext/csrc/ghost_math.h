// Per-element math of the ghost op, shared by the CPU kernels (ghost.cpp) and the CUDA kernels
// (ghost_cuda.cu). Everything here is __host__ __device__ so the CPU tests exercise the same
// formulas that run on the GPU. No ATen or CUDA headers: nvcc compiles this file quickly.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define GHOST_HD __host__ __device__ __forceinline__
#else
#define GHOST_HD inline
#endif

namespace ghost {

// The largest depthwise kernel the CUDA backward keeps per-tap accumulators in registers for.
// The CPU path has no limit; the CUDA launcher rejects larger k with a clear error.
constexpr int kMaxK = 7;

// Geometry of one call. Strides are in elements; "x" strides serve x, grad_x and the float dy
// workspace (same layout), "o" strides serve the output and grad_out (OC channels, same layout).
struct Geom {
  int64_t N, C, H, W, HW, NHW;
  int64_t OC;   // out_channels: C <= OC <= 2C
  int64_t NY;   // channels of the cheap branch that reach the output: OC - C
  int K, P;     // kernel size (odd) and padding K / 2
  int64_t xsN, xsC, xsH, xsW;
  int64_t osN, osC, osH, osW;
};

// Depthwise cross-correlation at one output point (h, w) of one (n, c) plane. xc points at
// x[n, c, 0, 0]; wk at the channel's K*K taps (already in acc_t). Zero padding. Taps are summed
// a-major, b-minor, the same order the CPU row kernels use.
template <typename scalar_t, typename acc_t>
GHOST_HD acc_t dw_conv_point(const scalar_t* xc, int64_t sH, int64_t sW, int64_t H, int64_t W,
                             int64_t h, int64_t w, const acc_t* wk, int K) {
  const int P = K / 2;
  acc_t acc = acc_t(0);
  for (int a = 0; a < K; ++a) {
    const int64_t hh = h + a - P;
    if (hh < 0 || hh >= H) continue;
    for (int b = 0; b < K; ++b) {
      const int64_t ww = w + b - P;
      if (ww < 0 || ww >= W) continue;
      acc += wk[a * K + b] * static_cast<acc_t>(xc[hh * sH + ww * sW]);
    }
  }
  return acc;
}

// Transposed depthwise conv at input point (h, w): sum over taps of dy[h - a + P, w - b + P] * w[a, b].
// dyc points at the (n, c) plane of dy (acc_t, x's layout).
template <typename acc_t>
GHOST_HD acc_t dw_conv_t_point(const acc_t* dyc, int64_t sH, int64_t sW, int64_t H, int64_t W,
                               int64_t h, int64_t w, const acc_t* wk, int K) {
  const int P = K / 2;
  acc_t acc = acc_t(0);
  for (int a = 0; a < K; ++a) {
    const int64_t hh = h - a + P;
    if (hh < 0 || hh >= H) continue;
    for (int b = 0; b < K; ++b) {
      const int64_t ww = w - b + P;
      if (ww < 0 || ww >= W) continue;
      acc += wk[a * K + b] * dyc[hh * sH + ww * sW];
    }
  }
  return acc;
}

// BN folded to one multiply-add: z = y * scale + shift.
template <typename acc_t>
GHOST_HD void bn_fold(acc_t mean, acc_t invstd, acc_t gamma, acc_t beta, acc_t& scale, acc_t& shift) {
  scale = gamma * invstd;
  shift = beta - mean * scale;
}

template <typename acc_t>
GHOST_HD acc_t invstd_of(acc_t var, acc_t eps) {
  return acc_t(1) / std::sqrt(var + eps);
}

// Forward of one cheap-branch element. NaN passes through relu, as F.relu does.
template <typename acc_t>
GHOST_HD acc_t bn_act(acc_t y, acc_t scale, acc_t shift, bool relu) {
  const acc_t z = y * scale + shift;
  return (relu && z < acc_t(0)) ? acc_t(0) : z;
}

// grad_out masked by relu'(z): torch's threshold_backward passes the gradient where out > 0.
template <typename acc_t>
GHOST_HD acc_t act_grad(acc_t g, acc_t y, acc_t scale, acc_t shift, bool relu) {
  if (!relu) return g;
  return (y * scale + shift > acc_t(0)) ? g : acc_t(0);
}

// Gradient w.r.t. the depthwise output y of one element.
// Training (batch statistics): dy = gamma * invstd * (g - mean(g) - yhat * mean(g * yhat)).
// Eval (running statistics are constants): dy = gamma * invstd * g.
template <typename acc_t>
GHOST_HD acc_t bn_dy(acc_t g, acc_t y, acc_t mean, acc_t invstd, acc_t gamma, acc_t mean_g,
                     acc_t mean_gyhat, bool training) {
  if (!training) return gamma * invstd * g;
  const acc_t yhat = (y - mean) * invstd;
  return gamma * invstd * (g - mean_g - yhat * mean_gyhat);
}

// Welford/Chan statistics: count, mean and sum of squared deviations. Merging two partial
// results in a fixed order keeps the reductions deterministic and free of the cancellation
// that E[y^2] - E[y]^2 suffers when |mean| >> std.
template <typename acc_t>
struct Moments {
  acc_t n, mean, m2;
};

template <typename acc_t>
GHOST_HD Moments<acc_t> moments_merge(Moments<acc_t> a, Moments<acc_t> b) {
  if (b.n == acc_t(0)) return a;
  if (a.n == acc_t(0)) return b;
  const acc_t n = a.n + b.n;
  const acc_t delta = b.mean - a.mean;
  const acc_t fb = b.n / n;
  Moments<acc_t> r;
  r.n = n;
  r.mean = a.mean + delta * fb;
  r.m2 = a.m2 + b.m2 + delta * delta * a.n * fb;
  return r;
}

// Exact two-pass moments of the first cnt (>= 1) of M register values whose sum is `sum`: the GPU
// kernels take their per-thread statistics in such batches and Chan-merge them (moments_merge).
template <int M, typename acc_t>
GHOST_HD Moments<acc_t> batch_moments(const acc_t (&v)[M], int cnt, acc_t sum) {
  Moments<acc_t> b;
  b.n = acc_t(cnt);
  b.mean = sum / acc_t(cnt);
  b.m2 = acc_t(0);
  for (int j = 0; j < M; ++j)
    if (j < cnt) b.m2 += (v[j] - b.mean) * (v[j] - b.mean);
  return b;
}

}  // namespace ghost
