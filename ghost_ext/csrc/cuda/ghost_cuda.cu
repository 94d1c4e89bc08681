// CUDA kernels of ghost_ext::ghost_concat. The per-element math is ghost_math.h (shared with the
// CPU kernels); this file only maps it onto threads (ghost_cuda.h describes the two kernel families:
// shared-memory tiles for NCHW, a generic per-pixel mapping for the rest). Every reduction writes one
// partial per (channel, tile or chunk), combined in a fixed order (by a second kernel, or by the
// consumer itself), so the results are bitwise reproducible for a given shape.
//
// Training forward: stats (Welford partials; the tiled kernel also writes the identity half)
//                   -> finalize (mean, var, invstd) -> apply (conv recomputed, BN, ReLU).
// Eval forward:     apply only (the running statistics are folded per channel in the kernel).
// Backward, tiled:  reduce sum(g), sum(g*yhat) -> sum partials (= grad_bn_bias, grad_bn_weight)
//                   -> grad_x (= grad_out + conv_transpose(dy), dy recomputed in shared memory) and
//                   grad_w partials -> sum partials. Four launches.
// Tiled and fused (a channel has at most kFusedMaxTiles tiles, the usual case): the consumers merge
//                   the partials themselves, so training forward = stats -> apply and backward =
//                   reduce -> dx/dw, whose last tile per channel sums grad_w (a tile counter; the
//                   only atomic, and it does not change the summation order).
// Backward, generic: as tiled, with dy written to a float workspace by a launch of its own (five).
// No fills: zero rows are written in-kernel. Reading x twice instead of storing the depthwise output
// keeps the forward at one write of the output.
//
// tests/test_cuda_emu.py runs this file on the CPU through cuda_emu.h: every launch goes through
// launch() and dynamic shared memory through GHOST_DYNAMIC_SMEM for that reason.

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#if defined(GHOST_CUDA_EMULATE)  // tests/test_cuda_emu.py: these kernels on the CPU
#include "cuda_emu.h"  // tests/cuda_emu/, on the include path of that build
#else
#include <cuda_runtime.h>
#define GHOST_DYNAMIC_SMEM(type, name)                                 \
  extern __shared__ __align__(16) unsigned char ghost_dynamic_smem[]; \
  type* name = reinterpret_cast<type*>(ghost_dynamic_smem)
#endif

#include <type_traits>

#include "ghost_cuda.h"

namespace ghost {
namespace {

// Every launch goes through here, so the CPU emulator can stand in for the GPU.
template <typename... KArgs, typename... Args>
void launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem_bytes, cudaStream_t stream, Args... args) {
#if defined(GHOST_CUDA_EMULATE)
  (void)stream;
  emu::launch(grid, block, smem_bytes, [&] { kernel(args...); });
#else
  kernel<<<grid, block, smem_bytes, stream>>>(args...);
#endif
}

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

// Welford triples of a 1-D block of kThreads threads merged in a fixed order (lanes, then warps); the
// result is returned to every thread. red: kBlockMomentsSmem elements of shared memory, free for reuse
// after the caller's next barrier.
constexpr int kBlockMomentsSmem = 3 * kWarps + 3;
template <typename T>
__device__ Moments<T> block_moments(Moments<T> m, T* red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int off = 16; off > 0; off >>= 1) m = moments_merge(m, shfl_down_moments(m, off));
  if (lane == 0) {
    red[warp] = m.n;
    red[kWarps + warp] = m.mean;
    red[2 * kWarps + warp] = m.m2;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    Moments<T> r{T(0), T(0), T(0)};
    for (int j = 0; j < kWarps; ++j) r = moments_merge(r, Moments<T>{red[j], red[kWarps + j], red[2 * kWarps + j]});
    red[3 * kWarps] = r.n;
    red[3 * kWarps + 1] = r.mean;
    red[3 * kWarps + 2] = r.m2;
  }
  __syncthreads();
  return Moments<T>{red[3 * kWarps], red[3 * kWarps + 1], red[3 * kWarps + 2]};
}

// Row c of the Welford partials part[{n, mean, m2} * stride + c * G + j], j < G, merged in a fixed
// order (so every block that merges a row gets the same bits); returned to every thread.
template <typename T>
__device__ Moments<T> merge_partials(const T* __restrict__ part, int64_t stride, int64_t c, int64_t G, T* red) {
  Moments<T> m{T(0), T(0), T(0)};
  const T* row = part + c * G;
  for (int64_t j = threadIdx.x; j < G; j += kThreads)
    m = moments_merge(m, Moments<T>{row[j], row[stride + j], row[2 * stride + j]});
  return block_moments(m, red);
}

// The op's statistics of a channel: batch mean, invstd of the biased variance (what BN normalises
// with) and the unbiased variance (for the running update).
template <typename T>
struct Stats {
  T mean, invstd, var;
};
template <typename T>
__device__ Stats<T> stats_of(const Moments<T>& r, T eps) {
  return Stats<T>{r.mean, invstd_of(r.n > T(0) ? r.m2 / r.n : T(0), eps), r.n > T(1) ? r.m2 / (r.n - T(1)) : T(0)};
}
template <typename T>
__device__ void write_stats(const Stats<T>& st, int64_t c, T* mean, T* invstd, T* var) {
  mean[c] = st.mean;
  invstd[c] = st.invstd;
  var[c] = st.var;
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
      // the valid values are v[0, cnt): pixels grow with j
      if (cnt > 0) acc = moments_merge(acc, batch_moments(v, cnt, s));
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
  __shared__ acc_t red[kBlockMomentsSmem];
  const Moments<acc_t> r = merge_partials(part, C * G, static_cast<int64_t>(blockIdx.x), G, red);
  if (threadIdx.x == 0) write_stats(stats_of(r, eps), static_cast<int64_t>(blockIdx.x), mean, invstd, var);
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

// ---- tiled kernels (NCHW, k in {1, 3, 5, 7}) ----------------------------------------------------
// See ghost_cuda.h for the tiling. All offsets are 32-bit (make_cfg checks that they fit). Shared
// memory holds acc_t, so every tap is read in the accumulation type once staged.

constexpr int kTileWarps = kTileThreads / 32;
// For k <= 3 in float (GhostNet's cheap kernels), the apply and dx/dw kernels ask for 5 resident blocks
// per SM: 48 registers a thread, what they used before they merged partials, and ptxas reports no
// spills there. Larger k and double keep their registers (a cap spilled kilobytes there). Unmeasured on
// a GPU: revisit with benchmarks/profile_op.py.
constexpr int kTileMinBlocks = 5;
template <typename acc_t, int K>
constexpr int tile_min_blocks() {
  return K <= 3 && sizeof(acc_t) == 4 ? kTileMinBlocks : 1;
}
static_assert(kTileThreads == kThreads, "block_moments and merge_partials assume one block size");

struct Tile {  // the part of the tensor one block owns
  int c, n0, tp, h0, th;
};

__device__ __forceinline__ int imin(int a, int b) { return a < b ? a : b; }

__device__ __forceinline__ Tile tile_of(const Geom& g, const LaunchCfg& cfg) {
  Tile t;
  t.c = static_cast<int>(blockIdx.y);
  const int bands = static_cast<int>(cfg.bands);
  const int item = static_cast<int>(blockIdx.x);
  const int grp = item / bands, band = item - grp * bands;
  t.n0 = grp * cfg.tp;
  t.tp = imin(cfg.tp, static_cast<int>(g.N) - t.n0);
  t.h0 = band * cfg.th;
  t.th = imin(cfg.th, static_cast<int>(g.H) - t.h0);
  return t;
}

// s[p][r][col] = x[n0 + p, c, h0 - hp + r, col - hp], zero outside the image: the tile with a halo of
// hp rows/columns, rows of W + 2 hp. Consecutive threads read consecutive columns (coalesced).
template <typename scalar_t, typename acc_t>
__device__ void stage_tile(const Geom& g, const Tile& t, int hp, const scalar_t* __restrict__ x, acc_t* __restrict__ s) {
  const int H = static_cast<int>(g.H), W = static_cast<int>(g.W);
  const int CS = W + 2 * hp, PS = (t.th + 2 * hp) * CS, total = t.tp * PS;
  const scalar_t* xc = x + t.n0 * static_cast<int>(g.xsN) + t.c * static_cast<int>(g.xsC);
  const int sN = static_cast<int>(g.xsN), sH = static_cast<int>(g.xsH);
  for (int e = threadIdx.x; e < total; e += kTileThreads) {
    const int p = e / PS, rem = e - p * PS, r = rem / CS, col = rem - r * CS;
    const int h = t.h0 - hp + r, w = col - hp;
    s[e] = (h >= 0 && h < H && w >= 0 && w < W) ? static_cast<acc_t>(xc[p * sN + h * sH + w]) : acc_t(0);
  }
}

// The K x K window sum whose top-left tap is s[0] (rows CS apart); a-major, b-minor as dw_conv_point.
template <int K, typename acc_t>
__device__ __forceinline__ acc_t window(const acc_t* s, int CS, const acc_t (&wr)[K * K]) {
  acc_t acc = acc_t(0);
#pragma unroll
  for (int a = 0; a < K; ++a)
#pragma unroll
    for (int b = 0; b < K; ++b) acc += wr[a * K + b] * s[a * CS + b];
  return acc;
}

template <int K, typename acc_t>
__device__ __forceinline__ void load_taps(const acc_t* __restrict__ w, int c, acc_t (&wr)[K * K]) {
#pragma unroll
  for (int i = 0; i < K * K; ++i) wr[i] = w[c * K * K + i];
}

// Output q of a tile (q < tp * th * W) -> plane p, tile row hl, column w.
struct Out {
  int p, hl, w;
};
__device__ __forceinline__ Out out_of(int q, int per_plane, int W) {
  Out o;
  o.p = q / per_plane;
  const int rem = q - o.p * per_plane;
  o.hl = rem / W;
  o.w = rem - o.hl * W;
  return o;
}

// Sums of M values over the block (256 threads, fixed order); valid in threads tid < M, each
// holding the sum of value tid. red: M * kTileWarps elements of shared memory.
template <int M, typename acc_t>
__device__ acc_t block_sums(acc_t (&v)[M], acc_t* red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int i = 0; i < M; ++i)
    for (int off = 16; off > 0; off >>= 1) v[i] += __shfl_down_sync(0xffffffffu, v[i], off);
  if (lane == 0)
#pragma unroll
    for (int i = 0; i < M; ++i) red[i * kTileWarps + warp] = v[i];
  __syncthreads();
  acc_t r = acc_t(0);
  if (static_cast<int>(threadIdx.x) < M)
    for (int j = 0; j < kTileWarps; ++j) r += red[threadIdx.x * kTileWarps + j];
  return r;
}

// A load from L2, past this SM's L1: for partials other blocks may have written during this launch.
template <typename T>
__device__ __forceinline__ T load_l2(const T* p) {
#if defined(GHOST_CUDA_EMULATE)
  return *p;
#else
  return __ldcg(p);
#endif
}

// M rows of G partial sums, rows[i * row_stride + j], each summed over j in a fixed order; thread
// tid < M gets row tid's sum. red: M * kTileWarps elements of shared memory (block_sums).
template <int M, typename acc_t>
__device__ acc_t sum_rows_in_block(const acc_t* __restrict__ rows, int64_t row_stride, int64_t G, acc_t* red) {
  acc_t v[M];
#pragma unroll
  for (int i = 0; i < M; ++i) v[i] = acc_t(0);
  for (int64_t j = threadIdx.x; j < G; j += kTileThreads)
#pragma unroll
    for (int i = 0; i < M; ++i) v[i] += load_l2(rows + i * row_stride + j);
  return block_sums<M>(v, red);
}

// Training forward, pass 1: Welford partials of the depthwise output per (channel, tile) in
// part[{n, mean, m2}][c * G + tile], and the identity half out[:, c] = x[:, c]. grid.y = C.
template <typename scalar_t, typename acc_t, int K>
__global__ void __launch_bounds__(kTileThreads) tiled_fwd_stats_kernel(Geom g, LaunchCfg cfg, const scalar_t* __restrict__ x,
                                                                       const acc_t* __restrict__ w, scalar_t* __restrict__ out,
                                                                       acc_t* __restrict__ part) {
  constexpr int P = K / 2;
  GHOST_DYNAMIC_SMEM(acc_t, s);
  __shared__ acc_t red[kBlockMomentsSmem];
  const Tile t = tile_of(g, cfg);
  const int W = static_cast<int>(g.W), CS = W + 2 * P, PS = (t.th + 2 * P) * CS;
  const int per_plane = t.th * W, total = t.tp * per_plane;
  acc_t wr[K * K];
  load_taps<K>(w, t.c, wr);
  stage_tile(g, t, P, x, s);
  __syncthreads();
  scalar_t* oc = out + t.n0 * static_cast<int>(g.osN) + t.c * static_cast<int>(g.osC) + t.h0 * static_cast<int>(g.osH);
  Moments<acc_t> acc{acc_t(0), acc_t(0), acc_t(0)};
  for (int q0 = threadIdx.x; q0 < total; q0 += 8 * kTileThreads) {
    acc_t v[8];
    int cnt = 0;
    acc_t sum = acc_t(0);
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const int q = q0 + j * kTileThreads;
      v[j] = acc_t(0);
      if (q < total) {
        const Out o = out_of(q, per_plane, W);
        const acc_t* sp = s + o.p * PS + o.hl * CS + o.w;
        v[j] = window<K>(sp, CS, wr);
        sum += v[j];
        ++cnt;
        oc[o.p * static_cast<int>(g.osN) + o.hl * static_cast<int>(g.osH) + o.w] = static_cast<scalar_t>(sp[P * CS + P]);
      }
    }
    if (cnt > 0) acc = moments_merge(acc, batch_moments(v, cnt, sum));  // v[0, cnt) are valid
  }
  const Moments<acc_t> r = block_moments(acc, red);
  if (threadIdx.x == 0) {
    const int64_t slot = static_cast<int64_t>(t.c) * cfg.G + blockIdx.x, stride = g.C * cfg.G;
    part[slot] = r.n;
    part[stride + slot] = r.mean;
    part[2 * stride + slot] = r.m2;
  }
}

// out[:, C + c] = relu?(bn(conv(x)[:, c])). Training, cfg.fused: every block merges its channel's
// Welford partials `part` itself (the same bits in every block; no finalize launch), tile 0 of each
// channel writes the op's (mean, invstd, var), grid.y = C. Training, otherwise: stats = (mean,
// invstd) from fwd_finalize_kernel, grid.y = NY. Eval: stats = (running_mean, running_var) folded
// here, grid.y = C, and this kernel also writes the identity half and the op's (mean, invstd, var).
template <typename scalar_t, typename acc_t, int K>
__global__ void __launch_bounds__(kTileThreads, (tile_min_blocks<acc_t, K>())) tiled_fwd_apply_kernel(Geom g, LaunchCfg cfg, const scalar_t* __restrict__ x,
                                                                       const acc_t* __restrict__ w, bool training,
                                                                       const acc_t* __restrict__ part,
                                                                       const acc_t* __restrict__ stat0, const acc_t* __restrict__ stat1,
                                                                       acc_t eps, const acc_t* __restrict__ gamma,
                                                                       const acc_t* __restrict__ beta, bool relu, scalar_t* __restrict__ out,
                                                                       acc_t* __restrict__ mean_out, acc_t* __restrict__ invstd_out,
                                                                       acc_t* __restrict__ var_out) {
  constexpr int P = K / 2;
  GHOST_DYNAMIC_SMEM(acc_t, s);
  const Tile t = tile_of(g, cfg);
  const int W = static_cast<int>(g.W), CS = W + 2 * P, PS = (t.th + 2 * P) * CS;
  const int per_plane = t.th * W, total = t.tp * per_plane;
  const int osN = static_cast<int>(g.osN), osH = static_cast<int>(g.osH);
  acc_t m, is;
  if (training && cfg.fused) {
    if (t.c >= g.NY && blockIdx.x != 0) return;  // block-uniform: only tile 0 writes this channel's stats
    __shared__ acc_t red[kBlockMomentsSmem];
    const Stats<acc_t> st = stats_of(merge_partials(part, g.C * cfg.G, t.c, cfg.G, red), eps);
    m = st.mean;
    is = st.invstd;
    if (blockIdx.x == 0 && threadIdx.x == 0) write_stats(st, t.c, mean_out, invstd_out, var_out);
    if (t.c >= g.NY) return;  // block-uniform: the stats kernel wrote this channel's identity half
  } else if (training) {
    m = stat0[t.c];
    is = stat1[t.c];
  } else {
    m = stat0[t.c];
    is = invstd_of(stat1[t.c], eps);
    if (blockIdx.x == 0 && threadIdx.x == 0) {
      mean_out[t.c] = m;
      invstd_out[t.c] = is;
      var_out[t.c] = stat1[t.c];
    }
  }
  scalar_t* oid = out + t.n0 * osN + t.c * static_cast<int>(g.osC) + t.h0 * osH;
  if (t.c >= g.NY) {  // block-uniform: no cheap output for this channel (eval only reaches here)
    const scalar_t* xc = x + t.n0 * static_cast<int>(g.xsN) + t.c * static_cast<int>(g.xsC) + t.h0 * static_cast<int>(g.xsH);
    for (int q = threadIdx.x; q < total; q += kTileThreads) {
      const Out o = out_of(q, per_plane, W);
      oid[o.p * osN + o.hl * osH + o.w] = xc[o.p * static_cast<int>(g.xsN) + o.hl * static_cast<int>(g.xsH) + o.w];
    }
    return;
  }
  acc_t wr[K * K];
  load_taps<K>(w, t.c, wr);
  acc_t scale, shift;
  bn_fold(m, is, gamma[t.c], beta[t.c], scale, shift);
  stage_tile(g, t, P, x, s);
  __syncthreads();
  scalar_t* ocheap = oid + g.C * static_cast<int>(g.osC);
  for (int q = threadIdx.x; q < total; q += kTileThreads) {
    const Out o = out_of(q, per_plane, W);
    const acc_t* sp = s + o.p * PS + o.hl * CS + o.w;
    const int off = o.p * osN + o.hl * osH + o.w;
    ocheap[off] = static_cast<scalar_t>(bn_act(window<K>(sp, CS, wr), scale, shift, relu));
    if (!training) oid[off] = static_cast<scalar_t>(sp[P * CS + P]);
  }
}

// Backward, pass 1: partials of sum(g) and sum(g * yhat) per (channel < NY, tile):
// part[{0, 1}][c * G + tile]. grid.y = NY. cfg.fused: also zeroes the per-channel tile counters of
// tiled_bwd_dx_dw_kernel (which runs after it on the stream).
template <typename scalar_t, typename acc_t, int K>
__global__ void __launch_bounds__(kTileThreads) tiled_bwd_reduce_kernel(Geom g, LaunchCfg cfg, const scalar_t* __restrict__ gout,
                                                                        const scalar_t* __restrict__ x, const acc_t* __restrict__ w,
                                                                        const acc_t* __restrict__ mean, const acc_t* __restrict__ invstd,
                                                                        const acc_t* __restrict__ gamma, const acc_t* __restrict__ beta,
                                                                        bool relu, acc_t* __restrict__ part,
                                                                        unsigned* __restrict__ counters) {
  constexpr int P = K / 2;
  GHOST_DYNAMIC_SMEM(acc_t, s);
  __shared__ acc_t red[2 * kTileWarps];
  const Tile t = tile_of(g, cfg);
  if (cfg.fused && blockIdx.x == 0 && threadIdx.x == 0) counters[t.c] = 0u;
  const int W = static_cast<int>(g.W), CS = W + 2 * P, PS = (t.th + 2 * P) * CS;
  const int per_plane = t.th * W, total = t.tp * per_plane;
  const int osN = static_cast<int>(g.osN), osH = static_cast<int>(g.osH);
  acc_t wr[K * K];
  load_taps<K>(w, t.c, wr);
  const acc_t m = mean[t.c], is = invstd[t.c];
  acc_t scale, shift;
  bn_fold(m, is, gamma[t.c], beta[t.c], scale, shift);
  stage_tile(g, t, P, x, s);
  __syncthreads();
  const scalar_t* gc = gout + t.n0 * osN + (g.C + t.c) * static_cast<int>(g.osC) + t.h0 * osH;
  acc_t v[2] = {acc_t(0), acc_t(0)};
  for (int q = threadIdx.x; q < total; q += kTileThreads) {
    const Out o = out_of(q, per_plane, W);
    const acc_t y = window<K>(s + o.p * PS + o.hl * CS + o.w, CS, wr);
    const acc_t gm = act_grad(static_cast<acc_t>(gc[o.p * osN + o.hl * osH + o.w]), y, scale, shift, relu);
    v[0] += gm;
    v[1] += gm * ((y - m) * is);
  }
  const acc_t r = block_sums<2>(v, red);
  if (threadIdx.x < 2) part[threadIdx.x * g.NY * cfg.G + static_cast<int64_t>(t.c) * cfg.G + blockIdx.x] = r;
}

// Backward, pass 2: grad_x for every channel, and per-tap partials of grad_w for channels < NY in
// part[(c * K*K + tap) * G + tile]. The BN gradient dy is computed on the tile plus a K/2 halo into
// shared memory (from x staged with a K-1 halo), so it never goes to device memory. grid.y = C.
// cfg.fused: every block sums its channel's reduce partials itself
// (tile 0 writes grad_beta / grad_gamma), and the last tile of a channel to finish (counted in
// `counters`) sums the channel's grad_w partials into grad_w, in a fixed order; zero rows for
// channels >= NY are written here too. So the backward is two launches. Otherwise grad_beta /
// grad_gamma come from sum_rows_kernel and another sum_rows_kernel turns `part` into grad_w.
template <typename scalar_t, typename acc_t, int K>
__global__ void __launch_bounds__(kTileThreads, (tile_min_blocks<acc_t, K>())) tiled_bwd_dx_dw_kernel(Geom g, LaunchCfg cfg, const scalar_t* __restrict__ gout,
                                                                       const scalar_t* __restrict__ x, const acc_t* __restrict__ w,
                                                                       const acc_t* __restrict__ mean, const acc_t* __restrict__ invstd,
                                                                       const acc_t* __restrict__ gamma, const acc_t* __restrict__ beta,
                                                                       const acc_t* __restrict__ red_part, acc_t* grad_beta,
                                                                       acc_t* grad_gamma, bool training, bool relu,
                                                                       scalar_t* __restrict__ grad_x, acc_t* __restrict__ part,
                                                                       unsigned* __restrict__ counters, acc_t* __restrict__ grad_w) {
  constexpr int P = K / 2, KK = K * K;
  GHOST_DYNAMIC_SMEM(acc_t, s);
  __shared__ acc_t red[(KK > 3 ? KK : 3) * kTileWarps];  // block_sums<KK>; sum_rows_in_block<2> + 2 sums
  const Tile t = tile_of(g, cfg);
  const int H = static_cast<int>(g.H), W = static_cast<int>(g.W);
  const int per_plane = t.th * W, total = t.tp * per_plane;
  const int osN = static_cast<int>(g.osN), osC = static_cast<int>(g.osC), osH = static_cast<int>(g.osH);
  const int xsN = static_cast<int>(g.xsN), xsH = static_cast<int>(g.xsH);
  const scalar_t* gid = gout + t.n0 * osN + t.c * osC + t.h0 * osH;
  scalar_t* gx = grad_x + t.n0 * xsN + t.c * static_cast<int>(g.xsC) + t.h0 * xsH;
  if (t.c >= g.NY) {  // block-uniform: grad_x = grad_out's identity half
    for (int q = threadIdx.x; q < total; q += kTileThreads) {
      const Out o = out_of(q, per_plane, W);
      gx[o.p * xsN + o.hl * xsH + o.w] = gid[o.p * osN + o.hl * osH + o.w];
    }
    if (cfg.fused && blockIdx.x == 0) {  // no sum_rows launch writes the zero rows
      if (static_cast<int>(threadIdx.x) < KK) grad_w[static_cast<int64_t>(t.c) * KK + threadIdx.x] = acc_t(0);
      if (threadIdx.x == 0) grad_beta[t.c] = grad_gamma[t.c] = acc_t(0);
    }
    return;
  }
  // x with a 2P halo, then dy with a P halo
  const int XCS = W + 4 * P, XPS = (t.th + 4 * P) * XCS;
  const int DCS = W + 2 * P, DPS = (t.th + 2 * P) * DCS;
  acc_t* xs = s;
  acc_t* ds = s + t.tp * XPS;
  acc_t wr[KK];
  load_taps<K>(w, t.c, wr);
  const acc_t m = mean[t.c], is = invstd[t.c], gm = gamma[t.c];
  acc_t scale, shift;
  bn_fold(m, is, gm, beta[t.c], scale, shift);
  acc_t sums[2];  // sum(g), sum(g * yhat) of the channel
  if (cfg.fused) {
    const acc_t r = sum_rows_in_block<2>(red_part + static_cast<int64_t>(t.c) * cfg.G, g.NY * cfg.G, cfg.G, red);
    if (threadIdx.x < 2) red[2 * kTileWarps + threadIdx.x] = r;  // to every thread
    __syncthreads();
    sums[0] = red[2 * kTileWarps];
    sums[1] = red[2 * kTileWarps + 1];
    if (blockIdx.x == 0 && threadIdx.x == 0) {
      grad_beta[t.c] = sums[0];
      grad_gamma[t.c] = sums[1];
    }
  } else {
    sums[0] = grad_beta[t.c];
    sums[1] = grad_gamma[t.c];
  }
  const acc_t inv_count = acc_t(1) / static_cast<acc_t>(g.NHW);
  const acc_t mean_g = sums[0] * inv_count, mean_gy = sums[1] * inv_count;
  stage_tile(g, t, 2 * P, x, xs);
  __syncthreads();
  const scalar_t* gc = gout + t.n0 * osN + (g.C + t.c) * osC;
  for (int e = threadIdx.x; e < t.tp * DPS; e += kTileThreads) {
    const int p = e / DPS, rem = e - p * DPS, r = rem / DCS, col = rem - r * DCS;
    const int h = t.h0 - P + r, ww = col - P;
    acc_t d = acc_t(0);
    if (h >= 0 && h < H && ww >= 0 && ww < W) {
      const acc_t y = window<K>(xs + p * XPS + r * XCS + col, XCS, wr);
      const acc_t go = static_cast<acc_t>(gc[p * osN + h * osH + ww]);
      d = bn_dy(act_grad(go, y, scale, shift, relu), y, m, is, gm, mean_g, mean_gy, training);
    }
    ds[e] = d;
  }
  __syncthreads();
  acc_t tap[KK];
#pragma unroll
  for (int i = 0; i < KK; ++i) tap[i] = acc_t(0);
  for (int q = threadIdx.x; q < total; q += kTileThreads) {
    const Out o = out_of(q, per_plane, W);
    const acc_t* dp = ds + o.p * DPS + o.hl * DCS + o.w;          // dy rows h - P .. h + P
    const acc_t* xp = xs + o.p * XPS + (o.hl + P) * XCS + o.w + P;  // x rows h - P .. h + P
    const acc_t d = dp[P * DCS + P];
    acc_t v = static_cast<acc_t>(gid[o.p * osN + o.hl * osH + o.w]);
#pragma unroll
    for (int a = 0; a < K; ++a)
#pragma unroll
      for (int b = 0; b < K; ++b) {
        v += wr[a * K + b] * dp[(2 * P - a) * DCS + (2 * P - b)];
        tap[a * K + b] += d * xp[a * XCS + b];
      }
    gx[o.p * xsN + o.hl * xsH + o.w] = static_cast<scalar_t>(v);
  }
  const acc_t r = block_sums<KK>(tap, red);
  if (static_cast<int>(threadIdx.x) < KK) part[(static_cast<int64_t>(t.c) * KK + threadIdx.x) * cfg.G + blockIdx.x] = r;
  if (!cfg.fused) return;
  // The last tile of the channel to get here sums the G partials (the threadFenceReduction pattern of
  // the CUDA samples): each writer fences its partial before thread 0 counts the tile done, and the
  // last block reads the partials from L2. The summation order does not depend on which block is last.
  __shared__ unsigned done_before;
  if (static_cast<int>(threadIdx.x) < KK) __threadfence();  // the writers of the partials
  __syncthreads();
  if (threadIdx.x == 0) done_before = atomicAdd(&counters[t.c], 1u);
  __syncthreads();
  if (done_before != static_cast<unsigned>(cfg.G - 1)) return;  // block-uniform
  __threadfence();
  const acc_t total_w = sum_rows_in_block<KK>(part + static_cast<int64_t>(t.c) * KK * cfg.G, cfg.G, cfg.G, red);
  if (static_cast<int>(threadIdx.x) < KK) grad_w[static_cast<int64_t>(t.c) * KK + threadIdx.x] = total_w;
}

// Calls f(std::integral_constant<int, K>) for the kernel sizes the tiled kernels are built for.
template <typename F>
void with_k(int K, F&& f) {
  switch (K) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;
    default: f(std::integral_constant<int, 7>{}); break;  // make_cfg tiles only k in {1, 3, 5, 7}
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
  if (cfg.tiled) {  // training: stats -> [finalize ->] apply (fused: apply merges the stats); eval: apply
    const auto G = static_cast<unsigned>(cfg.G);
    with_k(g.K, [&](auto k) {
      constexpr int K = decltype(k)::value;
      const auto apply = &tiled_fwd_apply_kernel<scalar_t, acc_t, K>;
      if (training) {
        launch(&tiled_fwd_stats_kernel<scalar_t, acc_t, K>, dim3(G, static_cast<unsigned>(g.C)), kTileThreads,
               cfg.smem_fwd, stream, g, cfg, x, w, out, workspace);
        if (cfg.fused) {
          launch(apply, dim3(G, static_cast<unsigned>(g.C)), kTileThreads, cfg.smem_fwd, stream, g, cfg, x, w, true,
                 static_cast<const acc_t*>(workspace), nullptr, nullptr, eps, gamma, beta, relu, out, mean, invstd, var);
        } else {
          launch(&fwd_finalize_kernel<acc_t>, static_cast<unsigned>(g.C), kThreads, 0, stream, g.C, cfg.G, workspace,
                 eps, mean, invstd, var);
          if (g.NY > 0)
            launch(apply, dim3(G, static_cast<unsigned>(g.NY)), kTileThreads, cfg.smem_fwd, stream, g, cfg, x, w, true,
                   nullptr, mean, invstd, eps, gamma, beta, relu, out, nullptr, nullptr, nullptr);
        }
      } else {
        launch(apply, dim3(G, static_cast<unsigned>(g.C)), kTileThreads, cfg.smem_fwd, stream, g, cfg, x, w, false,
               nullptr, running_mean, running_var, eps, gamma, beta, relu, out, mean, invstd, var);
      }
    });
    return cudaGetLastError();
  }
  const dim3 block(cfg.bx, cfg.by);
  if (training) {
    launch(&fwd_stats_kernel<scalar_t, acc_t>, grid_of(cfg, g.C), block, 0, stream, g, cfg.iters, cfg.G, x, w, workspace);
    launch(&fwd_finalize_kernel<acc_t>, static_cast<unsigned>(g.C), kThreads, 0, stream, g.C, cfg.G, workspace, eps, mean, invstd, var);
    launch(&fwd_apply_kernel<scalar_t, acc_t>, grid_of(cfg, g.C), block, 0, stream, 
        g, cfg.iters, x, w, true, mean, invstd, eps, gamma, beta, relu, out, nullptr, nullptr, nullptr);
  } else {
    launch(&fwd_apply_kernel<scalar_t, acc_t>, grid_of(cfg, g.C), block, 0, stream, 
        g, cfg.iters, x, w, false, running_mean, running_var, eps, gamma, beta, relu, out, mean, invstd, var);
  }
  return cudaGetLastError();
}

// No fills: grad_bn_bias / grad_bn_weight / grad_w rows of channels >= NY are zeroed by
// sum_rows_kernel itself. Tiled: four launches, no dy workspace; generic: five.
template <typename scalar_t, typename acc_t>
cudaError_t launch_backward(const Geom& g, const LaunchCfg& cfg, const scalar_t* gout, const scalar_t* x,
                            const acc_t* w, const acc_t* gamma, const acc_t* beta, const acc_t* mean,
                            const acc_t* invstd, bool training, bool relu, scalar_t* grad_x, acc_t* grad_w,
                            acc_t* grad_gamma, acc_t* grad_beta, acc_t* dy, acc_t* workspace, cudaStream_t stream) {
  const int64_t KK = static_cast<int64_t>(g.K) * g.K;
  if (cfg.tiled) {  // reduce -> [sums ->] dx/dw (dy recomputed in shared memory) [-> grad_w sums]
    // Workspace (see backward_workspace): fused, the reduce partials, the grad_w partials and the tile
    // counters side by side (dx/dw reads the first while it writes the second); else the grad_w
    // partials reuse the reduce partials' space once sum_rows has consumed them.
    const auto G = static_cast<unsigned>(cfg.G);
    acc_t* red_part = workspace;
    acc_t* w_part = cfg.fused ? workspace + 2 * cfg.G * g.NY : workspace;
    unsigned* counters = cfg.fused ? reinterpret_cast<unsigned*>(w_part + KK * cfg.G * g.NY) : nullptr;
    with_k(g.K, [&](auto k) {
      constexpr int K = decltype(k)::value;
      if (g.NY > 0)
        launch(&tiled_bwd_reduce_kernel<scalar_t, acc_t, K>, dim3(G, static_cast<unsigned>(g.NY)), kTileThreads,
               cfg.smem_fwd, stream, g, cfg, gout, x, w, mean, invstd, gamma, beta, relu, red_part, counters);
      if (!cfg.fused)
        launch(&sum_rows_kernel<acc_t>, dim3(static_cast<unsigned>(g.C), 2), kThreads, 0, stream, cfg.G, g.NY, red_part,
               g.NY * cfg.G, grad_beta, grad_gamma);
      launch(&tiled_bwd_dx_dw_kernel<scalar_t, acc_t, K>, dim3(G, static_cast<unsigned>(g.C)), kTileThreads,
             cfg.smem_bwd, stream, g, cfg, gout, x, w, mean, invstd, gamma, beta,
             static_cast<const acc_t*>(red_part), grad_beta, grad_gamma, training, relu, grad_x,
             w_part, counters, grad_w);
    });
    if (!cfg.fused)
      launch(&sum_rows_kernel<acc_t>, dim3(static_cast<unsigned>(g.C * KK), 1), kThreads, 0, stream, cfg.G, g.NY * KK,
             w_part, 0, grad_w, nullptr);
    return cudaGetLastError();
  }
  const dim3 block(cfg.bx, cfg.by);
  if (g.NY > 0) {
    launch(&bwd_reduce_kernel<scalar_t, acc_t>, grid_of(cfg, g.NY), block, 0, stream, g, cfg.iters, cfg.G, gout, x, w, mean,
                                                                                invstd, gamma, beta, relu, workspace);
  }
  // grad_beta[c] = sum g (row set 0), grad_gamma[c] = sum g*yhat (row set 1); zeros for c >= NY
  launch(&sum_rows_kernel<acc_t>, dim3(static_cast<unsigned>(g.C), 2), kThreads, 0, stream, 
      cfg.G, g.NY, workspace, g.NY * cfg.G, grad_beta, grad_gamma);
  if (g.NY > 0) {
    launch(&bwd_dy_kernel<scalar_t, acc_t>, grid_of(cfg, g.NY), block, 0, stream, g, cfg.iters, gout, x, w, mean, invstd, gamma,
                                                                            beta, grad_beta, grad_gamma, training, relu, dy);
  }
  launch(&bwd_dx_dw_kernel<scalar_t, acc_t>, grid_of(cfg, g.C), block, 0, stream, g, cfg.iters, cfg.G, gout, x, w, dy, grad_x,
                                                                             workspace);
  launch(&sum_rows_kernel<acc_t>, dim3(static_cast<unsigned>(g.C * KK), 1), kThreads, 0, stream, 
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
