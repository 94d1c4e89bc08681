// CUDA kernels of ghost_ext::ghost_concat. The per-element math is ghost_math.h (shared with the
// CPU kernels); this file only maps it onto threads. No atomics: every reduction writes one
// partial per (channel, pixel chunk) and a second kernel combines them in a fixed order, so the
// results are bitwise reproducible for a given shape.
//
// Training forward: stats (conv recomputed, Welford partials) -> finalize (mean, var, invstd)
//                   -> apply (conv recomputed, BN, ReLU, both halves of the output written once).
// Eval forward:     apply only (the running statistics are folded per channel in the kernel).
// Backward:         reduce sum(g), sum(g*yhat) -> sum partials (= grad_bn_bias, grad_bn_weight)
//                   -> dy (float workspace) -> grad_x (= grad_out + conv_transpose(dy)) and grad_w
//                   partials -> sum partials. Five launches; no fills (zero rows written in-kernel).
// Reading x twice instead of storing the depthwise output keeps the forward at one write of the
// output; the recomputed k*k taps hit L1/L2.

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>

#include "ghost_cuda.h"

namespace ghost {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

// Sum of v over threadIdx.y for each threadIdx.x, in a fixed order; the result is valid in the
// threads with threadIdx.y == 0. Block = 256 threads with blockDim.x a power of two <= 32.
template <typename T>
__device__ T reduce_over_ty(T v, T* smem) {
  const int bx = blockDim.x;
  const int tid = threadIdx.y * bx + threadIdx.x;
  const int lane = tid & 31, warp = tid >> 5;
  for (int off = 16; off >= bx; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  __syncthreads();  // smem may still be read by the previous call
  if (lane < bx) smem[warp * bx + lane] = v;
  __syncthreads();
  T r = T(0);
  if (threadIdx.y == 0)
    for (int i = 0; i < kWarps; ++i) r += smem[i * bx + threadIdx.x];
  return r;
}

template <typename T>
__device__ Moments<T> shfl_down_moments(Moments<T> m, int off) {
  Moments<T> o;
  o.n = __shfl_down_sync(0xffffffffu, m.n, off);
  o.mean = __shfl_down_sync(0xffffffffu, m.mean, off);
  o.m2 = __shfl_down_sync(0xffffffffu, m.m2, off);
  return o;
}

// Same pattern as reduce_over_ty for Welford triples.
template <typename T>
__device__ Moments<T> merge_over_ty(Moments<T> v, T* sn, T* smean, T* sm2) {
  const int bx = blockDim.x;
  const int tid = threadIdx.y * bx + threadIdx.x;
  const int lane = tid & 31, warp = tid >> 5;
  for (int off = 16; off >= bx; off >>= 1) v = moments_merge(v, shfl_down_moments(v, off));
  if (lane < bx) {
    sn[warp * bx + lane] = v.n;
    smean[warp * bx + lane] = v.mean;
    sm2[warp * bx + lane] = v.m2;
  }
  __syncthreads();
  Moments<T> r{T(0), T(0), T(0)};
  if (threadIdx.y == 0)
    for (int i = 0; i < kWarps; ++i) {
      const int j = i * bx + threadIdx.x;
      r = moments_merge(r, Moments<T>{sn[j], smean[j], sm2[j]});
    }
  return r;
}

struct Pix {
  int64_t n, h, w;
};
// p = n*HW + h*W + w -> (n, h, w); 32-bit division (much cheaper on the GPU) whenever it fits.
__device__ __forceinline__ Pix pixel(const Geom& g, int64_t p) {
  Pix q;
  if (g.NHW <= 0x7fffffff) {
    const unsigned pp = static_cast<unsigned>(p), HW = static_cast<unsigned>(g.HW), W = static_cast<unsigned>(g.W);
    const unsigned n = pp / HW, hw = pp - n * HW, h = hw / W;
    q.n = n;
    q.h = h;
    q.w = hw - h * W;
    return q;
  }
  q.n = p / g.HW;
  const int64_t hw = p - q.n * g.HW;
  q.h = hw / g.W;
  q.w = hw - q.h * g.W;
  return q;
}

// ---- forward ---------------------------------------------------------------------------------

// Welford partials of the depthwise output per (channel, chunk): part[{n, mean, m2}][c * G + chunk].
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) fwd_stats_kernel(Geom g, int iters, int64_t G, const scalar_t* __restrict__ x,
                                                             const acc_t* __restrict__ w, acc_t* __restrict__ part) {
  __shared__ acc_t sn[kThreads], smean[kThreads], sm2[kThreads];
  const int64_t c = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  const int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.y * iters + threadIdx.y;
  Moments<acc_t> acc{acc_t(0), acc_t(0), acc_t(0)};
  if (c < g.C) {
    const acc_t* wk = w + c * g.K * g.K;
    for (int i0 = 0; i0 < iters; i0 += 8) {
      acc_t v[8];
      int cnt = 0;
      acc_t s = acc_t(0);
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const int64_t p = base + static_cast<int64_t>(i0 + j) * blockDim.y;
        v[j] = acc_t(0);
        if (p < g.NHW) {
          const Pix q = pixel(g, p);
          v[j] = dw_conv_point<scalar_t, acc_t>(x + q.n * g.xsN + c * g.xsC, g.xsH, g.xsW, g.H, g.W, q.h, q.w, wk, g.K);
          s += v[j];
          ++cnt;
        }
      }
      if (cnt == 0) continue;
      // exact two-pass moments of the 8-value register tile, then Chan's merge
      Moments<acc_t> t;
      t.n = acc_t(cnt);
      t.mean = s / acc_t(cnt);
      t.m2 = acc_t(0);
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const int64_t p = base + static_cast<int64_t>(i0 + j) * blockDim.y;
        if (p < g.NHW) t.m2 += (v[j] - t.mean) * (v[j] - t.mean);
      }
      acc = moments_merge(acc, t);
    }
  }
  const Moments<acc_t> r = merge_over_ty(acc, sn, smean, sm2);
  if (threadIdx.y == 0 && c < g.C) {
    const int64_t slot = c * G + blockIdx.x;
    const int64_t stride = g.C * G;
    part[slot] = r.n;
    part[stride + slot] = r.mean;
    part[2 * stride + slot] = r.m2;
  }
}

// One block per channel: merge the G partials (fixed order), write mean, unbiased var, invstd.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) fwd_finalize_kernel(int64_t C, int64_t G, const acc_t* __restrict__ part,
                                                                acc_t eps, acc_t* mean, acc_t* invstd, acc_t* var) {
  __shared__ acc_t sn[kThreads], smean[kThreads], sm2[kThreads];
  const int64_t c = blockIdx.x;
  const int64_t stride = C * G;
  Moments<acc_t> m{acc_t(0), acc_t(0), acc_t(0)};
  for (int64_t j = threadIdx.x; j < G; j += kThreads)
    m = moments_merge(m, Moments<acc_t>{part[c * G + j], part[stride + c * G + j], part[2 * stride + c * G + j]});
  sn[threadIdx.x] = m.n;
  smean[threadIdx.x] = m.mean;
  sm2[threadIdx.x] = m.m2;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) {
      const Moments<acc_t> r = moments_merge(Moments<acc_t>{sn[threadIdx.x], smean[threadIdx.x], sm2[threadIdx.x]},
                                             Moments<acc_t>{sn[threadIdx.x + s], smean[threadIdx.x + s], sm2[threadIdx.x + s]});
      sn[threadIdx.x] = r.n;
      smean[threadIdx.x] = r.mean;
      sm2[threadIdx.x] = r.m2;
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    const acc_t v = sn[0] > acc_t(0) ? sm2[0] / sn[0] : acc_t(0);  // biased: what BN normalises with
    mean[c] = smean[0];
    var[c] = sn[0] > acc_t(1) ? sm2[0] / (sn[0] - acc_t(1)) : acc_t(0);  // unbiased: for the running update
    invstd[c] = invstd_of(v, eps);
  }
}

// out[:, c] = x[:, c]; out[:, C + c] = relu?(bn(conv(x)[:, c])) for c < NY.
// Training: stats = (mean, invstd) written by fwd_finalize_kernel. Eval: stats = (running_mean,
// running_var), folded here, and the blocks of chunk 0 also write the op's (mean, invstd, var)
// outputs, so eval needs no other launch.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) fwd_apply_kernel(Geom g, int iters, const scalar_t* __restrict__ x,
                                                             const acc_t* __restrict__ w, bool training,
                                                             const acc_t* __restrict__ stat0, const acc_t* __restrict__ stat1,
                                                             acc_t eps, const acc_t* __restrict__ gamma,
                                                             const acc_t* __restrict__ beta, bool relu, scalar_t* __restrict__ out,
                                                             acc_t* __restrict__ mean_out, acc_t* __restrict__ invstd_out,
                                                             acc_t* __restrict__ var_out) {
  const int64_t c = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (c >= g.C) return;
  const int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.y * iters + threadIdx.y;
  const bool cheap = c < g.NY;
  const acc_t m = stat0[c];
  acc_t is;
  if (training) {
    is = stat1[c];
  } else {
    const acc_t v = stat1[c];
    is = invstd_of(v, eps);
    if (blockIdx.x == 0 && threadIdx.y == 0) {
      mean_out[c] = m;
      invstd_out[c] = is;
      var_out[c] = v;
    }
  }
  acc_t scale = acc_t(0), shift = acc_t(0);
  if (cheap) bn_fold(m, is, gamma[c], beta[c], scale, shift);
  const acc_t* wk = w + c * g.K * g.K;
  for (int i = 0; i < iters; ++i) {
    const int64_t p = base + static_cast<int64_t>(i) * blockDim.y;
    if (p >= g.NHW) break;
    const Pix q = pixel(g, p);
    const scalar_t* xc = x + q.n * g.xsN + c * g.xsC;
    scalar_t* oc = out + q.n * g.osN + q.h * g.osH + q.w * g.osW;
    oc[c * g.osC] = xc[q.h * g.xsH + q.w * g.xsW];
    if (cheap) {
      const acc_t y = dw_conv_point<scalar_t, acc_t>(xc, g.xsH, g.xsW, g.H, g.W, q.h, q.w, wk, g.K);
      oc[(g.C + c) * g.osC] = static_cast<scalar_t>(bn_act(y, scale, shift, relu));
    }
  }
}

// ---- backward --------------------------------------------------------------------------------

// Partials of sum(g) and sum(g * yhat) per (channel < NY, chunk): part[{0,1}][c * G + chunk].
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) bwd_reduce_kernel(Geom g, int iters, int64_t G, const scalar_t* __restrict__ gout,
                                                              const scalar_t* __restrict__ x, const acc_t* __restrict__ w,
                                                              const acc_t* __restrict__ mean, const acc_t* __restrict__ invstd,
                                                              const acc_t* __restrict__ gamma, const acc_t* __restrict__ beta,
                                                              bool relu, acc_t* __restrict__ part) {
  __shared__ acc_t smem[kThreads];
  const int64_t c = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  const int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.y * iters + threadIdx.y;
  acc_t sg = acc_t(0), sgy = acc_t(0);
  if (c < g.NY) {
    acc_t scale, shift;
    const acc_t m = mean[c], is = invstd[c];
    bn_fold(m, is, gamma[c], beta[c], scale, shift);
    const acc_t* wk = w + c * g.K * g.K;
    for (int i = 0; i < iters; ++i) {
      const int64_t p = base + static_cast<int64_t>(i) * blockDim.y;
      if (p >= g.NHW) break;
      const Pix q = pixel(g, p);
      const acc_t y = dw_conv_point<scalar_t, acc_t>(x + q.n * g.xsN + c * g.xsC, g.xsH, g.xsW, g.H, g.W, q.h, q.w, wk, g.K);
      const acc_t go = static_cast<acc_t>(gout[q.n * g.osN + (g.C + c) * g.osC + q.h * g.osH + q.w * g.osW]);
      const acc_t gm = act_grad(go, y, scale, shift, relu);
      sg += gm;
      sgy += gm * ((y - m) * is);
    }
  }
  sg = reduce_over_ty(sg, smem);
  sgy = reduce_over_ty(sgy, smem);
  if (threadIdx.y == 0 && c < g.NY) {
    part[c * G + blockIdx.x] = sg;
    part[g.NY * G + c * G + blockIdx.x] = sgy;
  }
}

// out[r] = sum_j part[r * G + j] for r < valid, 0 for valid <= r < gridDim.x; one block per row,
// fixed order. blockIdx.y picks one of two row sets: (part, out0) or (part + set_stride, out1).
// Writing the zero rows here saves a fill launch per output.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) sum_rows_kernel(int64_t G, int64_t valid, const acc_t* __restrict__ part,
                                                            int64_t set_stride, acc_t* __restrict__ out0,
                                                            acc_t* __restrict__ out1) {
  __shared__ acc_t s[kThreads];
  const int64_t r = blockIdx.x;
  acc_t* __restrict__ out = blockIdx.y == 0 ? out0 : out1;
  if (r >= valid) {  // block-uniform: the whole block leaves before any barrier
    if (threadIdx.x == 0) out[r] = acc_t(0);
    return;
  }
  const acc_t* pr = part + static_cast<int64_t>(blockIdx.y) * set_stride + r * G;
  acc_t v = acc_t(0);
  for (int64_t j = threadIdx.x; j < G; j += kThreads) v += pr[j];
  s[threadIdx.x] = v;
  __syncthreads();
  for (int k = kThreads / 2; k > 0; k >>= 1) {
    if (threadIdx.x < k) s[threadIdx.x] += s[threadIdx.x + k];
    __syncthreads();
  }
  if (threadIdx.x == 0) out[r] = s[0];
}

// dy (acc_t workspace in x's layout) for channels < NY. sum_g = grad_bn_bias, sum_gy = grad_bn_weight.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) bwd_dy_kernel(Geom g, int iters, const scalar_t* __restrict__ gout,
                                                          const scalar_t* __restrict__ x, const acc_t* __restrict__ w,
                                                          const acc_t* __restrict__ mean, const acc_t* __restrict__ invstd,
                                                          const acc_t* __restrict__ gamma, const acc_t* __restrict__ beta,
                                                          const acc_t* __restrict__ sum_g, const acc_t* __restrict__ sum_gy,
                                                          bool training, bool relu, acc_t* __restrict__ dy) {
  const int64_t c = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (c >= g.NY) return;
  const int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.y * iters + threadIdx.y;
  acc_t scale, shift;
  const acc_t m = mean[c], is = invstd[c], gm = gamma[c];
  bn_fold(m, is, gm, beta[c], scale, shift);
  const acc_t inv_count = acc_t(1) / static_cast<acc_t>(g.NHW);
  const acc_t mean_g = sum_g[c] * inv_count, mean_gy = sum_gy[c] * inv_count;
  const acc_t* wk = w + c * g.K * g.K;
  for (int i = 0; i < iters; ++i) {
    const int64_t p = base + static_cast<int64_t>(i) * blockDim.y;
    if (p >= g.NHW) break;
    const Pix q = pixel(g, p);
    const int64_t xo = q.n * g.xsN + c * g.xsC;
    const acc_t y = dw_conv_point<scalar_t, acc_t>(x + xo, g.xsH, g.xsW, g.H, g.W, q.h, q.w, wk, g.K);
    const acc_t go = static_cast<acc_t>(gout[q.n * g.osN + (g.C + c) * g.osC + q.h * g.osH + q.w * g.osW]);
    dy[xo + q.h * g.xsH + q.w * g.xsW] = bn_dy(act_grad(go, y, scale, shift, relu), y, m, is, gm, mean_g, mean_gy, training);
  }
}

// grad_x for all channels, and per-tap partials of grad_w for channels < NY:
// part[(c * K*K + t) * G + chunk]. Tap accumulators sit in registers, indexed by unrolled loops
// over kMaxK x kMaxK with the real K as a (block-uniform) guard.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) bwd_dx_dw_kernel(Geom g, int iters, int64_t G, const scalar_t* __restrict__ gout,
                                                             const scalar_t* __restrict__ x, const acc_t* __restrict__ w,
                                                             const acc_t* __restrict__ dy, scalar_t* __restrict__ grad_x,
                                                             acc_t* __restrict__ part) {
  __shared__ acc_t smem[kThreads];
  const int64_t c = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  const int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.y * iters + threadIdx.y;
  const int K = g.K, P = g.P;
  const bool cheap = c < g.NY;
  acc_t tap[kMaxK * kMaxK];
#pragma unroll
  for (int t = 0; t < kMaxK * kMaxK; ++t) tap[t] = acc_t(0);
  if (c < g.C) {
    const acc_t* wk = w + c * K * K;
    for (int i = 0; i < iters; ++i) {
      const int64_t p = base + static_cast<int64_t>(i) * blockDim.y;
      if (p >= g.NHW) break;
      const Pix q = pixel(g, p);
      const int64_t xo = q.n * g.xsN + c * g.xsC;
      acc_t gx = static_cast<acc_t>(gout[q.n * g.osN + c * g.osC + q.h * g.osH + q.w * g.osW]);
      if (cheap) {
        gx += dw_conv_t_point<acc_t>(dy + xo, g.xsH, g.xsW, g.H, g.W, q.h, q.w, wk, K);
        const acc_t d = dy[xo + q.h * g.xsH + q.w * g.xsW];
        const scalar_t* xc = x + xo;
#pragma unroll
        for (int a = 0; a < kMaxK; ++a) {
          if (a >= K) break;
          const int64_t hh = q.h + a - P;
          const bool hok = hh >= 0 && hh < g.H;
#pragma unroll
          for (int b = 0; b < kMaxK; ++b) {
            if (b >= K) break;
            const int64_t ww = q.w + b - P;
            if (hok && ww >= 0 && ww < g.W) tap[a * kMaxK + b] += d * static_cast<acc_t>(xc[hh * g.xsH + ww * g.xsW]);
          }
        }
      }
      grad_x[xo + q.h * g.xsH + q.w * g.xsW] = static_cast<scalar_t>(gx);
    }
  }
  if (static_cast<int64_t>(blockIdx.y) * blockDim.x >= g.NY) return;  // block-uniform: no channel needs grad_w
#pragma unroll
  for (int a = 0; a < kMaxK; ++a) {
    if (a >= K) break;
#pragma unroll
    for (int b = 0; b < kMaxK; ++b) {
      if (b >= K) break;
      const acc_t r = reduce_over_ty(tap[a * kMaxK + b], smem);
      if (threadIdx.y == 0 && cheap) part[(c * K * K + a * K + b) * G + blockIdx.x] = r;
    }
  }
}

inline dim3 grid_of(const LaunchCfg& cfg, int64_t channels) {
  return dim3(static_cast<unsigned>(cfg.G), static_cast<unsigned>((channels + cfg.bx - 1) / cfg.bx));
}

}  // namespace

template <typename scalar_t, typename acc_t>
cudaError_t launch_forward(const Geom& g, const LaunchCfg& cfg, const scalar_t* x, const acc_t* w,
                           const acc_t* gamma, const acc_t* beta, const acc_t* running_mean,
                           const acc_t* running_var, bool training, acc_t eps, bool relu, scalar_t* out,
                           acc_t* mean, acc_t* invstd, acc_t* var, acc_t* workspace, cudaStream_t stream) {
  const dim3 block(cfg.bx, cfg.by);
  if (training) {
    fwd_stats_kernel<scalar_t, acc_t><<<grid_of(cfg, g.C), block, 0, stream>>>(g, cfg.iters, cfg.G, x, w, workspace);
    fwd_finalize_kernel<acc_t><<<static_cast<unsigned>(g.C), kThreads, 0, stream>>>(g.C, cfg.G, workspace, eps, mean, invstd, var);
    fwd_apply_kernel<scalar_t, acc_t><<<grid_of(cfg, g.C), block, 0, stream>>>(
        g, cfg.iters, x, w, true, mean, invstd, eps, gamma, beta, relu, out, nullptr, nullptr, nullptr);
  } else {
    fwd_apply_kernel<scalar_t, acc_t><<<grid_of(cfg, g.C), block, 0, stream>>>(
        g, cfg.iters, x, w, false, running_mean, running_var, eps, gamma, beta, relu, out, mean, invstd, var);
  }
  return cudaGetLastError();
}

// Five launches, no fills: grad_bn_bias / grad_bn_weight / grad_w rows of channels >= NY are
// zeroed by sum_rows_kernel itself.
template <typename scalar_t, typename acc_t>
cudaError_t launch_backward(const Geom& g, const LaunchCfg& cfg, const scalar_t* gout, const scalar_t* x,
                            const acc_t* w, const acc_t* gamma, const acc_t* beta, const acc_t* mean,
                            const acc_t* invstd, bool training, bool relu, scalar_t* grad_x, acc_t* grad_w,
                            acc_t* grad_gamma, acc_t* grad_beta, acc_t* dy, acc_t* workspace, cudaStream_t stream) {
  const dim3 block(cfg.bx, cfg.by);
  const int64_t KK = static_cast<int64_t>(g.K) * g.K;
  if (g.NY > 0) {
    bwd_reduce_kernel<scalar_t, acc_t><<<grid_of(cfg, g.NY), block, 0, stream>>>(g, cfg.iters, cfg.G, gout, x, w, mean,
                                                                                invstd, gamma, beta, relu, workspace);
  }
  // grad_beta[c] = sum g (row set 0), grad_gamma[c] = sum g*yhat (row set 1); zeros for c >= NY
  sum_rows_kernel<acc_t><<<dim3(static_cast<unsigned>(g.C), 2), kThreads, 0, stream>>>(
      cfg.G, g.NY, workspace, g.NY * cfg.G, grad_beta, grad_gamma);
  if (g.NY > 0) {
    bwd_dy_kernel<scalar_t, acc_t><<<grid_of(cfg, g.NY), block, 0, stream>>>(g, cfg.iters, gout, x, w, mean, invstd, gamma,
                                                                            beta, grad_beta, grad_gamma, training, relu, dy);
  }
  bwd_dx_dw_kernel<scalar_t, acc_t><<<grid_of(cfg, g.C), block, 0, stream>>>(g, cfg.iters, cfg.G, gout, x, w, dy, grad_x,
                                                                             workspace);
  sum_rows_kernel<acc_t><<<dim3(static_cast<unsigned>(g.C * KK), 1), kThreads, 0, stream>>>(
      cfg.G, g.NY * KK, workspace, 0, grad_w, nullptr);
  return cudaGetLastError();
}

#define GHOST_INSTANTIATE(scalar_t, acc_t)                                                                        \
  template cudaError_t launch_forward<scalar_t, acc_t>(const Geom&, const LaunchCfg&, const scalar_t*, const acc_t*,  \
                                                       const acc_t*, const acc_t*, const acc_t*, const acc_t*, bool,  \
                                                       acc_t, bool, scalar_t*, acc_t*, acc_t*, acc_t*, acc_t*,        \
                                                       cudaStream_t);                                                 \
  template cudaError_t launch_backward<scalar_t, acc_t>(const Geom&, const LaunchCfg&, const scalar_t*,               \
                                                        const scalar_t*, const acc_t*, const acc_t*, const acc_t*,    \
                                                        const acc_t*, const acc_t*, bool, bool, scalar_t*, acc_t*,    \
                                                        acc_t*, acc_t*, acc_t*, acc_t*, cudaStream_t);

GHOST_INSTANTIATE(float, float)
GHOST_INSTANTIATE(double, double)
GHOST_INSTANTIATE(c10::Half, float)
GHOST_INSTANTIATE(c10::BFloat16, float)

}  // namespace ghost
