// Interface between the host entry points (ghost_cuda_host.cpp, compiled by the C++ compiler with ATen)
// and the kernels (ghost_cuda.cu, compiled by nvcc without ATen headers, to keep nvcc quick).
#pragma once

#if !defined(GHOST_CUDA_EMULATE)
#include <cuda_runtime_api.h>
#endif

#include <algorithm>
#include <cstdint>

#include "../ghost_math.h"

namespace ghost {

// Two kernel families.
//
// Tiled (NCHW input, k in {1, 3, 5, 7}, sizes that fit 32-bit offsets): a block of 256 threads owns one
// channel c and a tile of `tp` consecutive planes (n) x `th` rows x all W columns; it stages the tile
// and its zero-padded halo in shared memory (one coalesced read of x per pass), then computes every
// k x k tap from shared memory with k a template parameter (weights in registers, no bounds checks).
// Small maps pack several planes into a tile, so an 8x8 layer still fills the GPU. grid = (G tiles per
// channel, channels). The backward recomputes the BN gradient dy on the tile and its halo in shared
// memory instead of storing it: one launch and two passes over a float tensor fewer.
//
// Generic (channels_last, or anything the tiled kernels do not take): a block is (bx, by) = 256
// threads, bx lanes over channels, by over pixels (p = n*HW + h*W + w). NCHW uses bx = 1 (a warp reads
// 32 consecutive pixels of a plane); channels_last uses bx up to 32 (a warp reads consecutive channels
// of a pixel). Each thread covers `iters` pixels: grid.x = G chunks of by*iters pixels, grid.y =
// channel groups. The halo is read through L1.
//
// Either way every per-channel reduction leaves one partial per (channel, tile or chunk) in a row of
// length G, combined in a fixed order: bitwise reproducible results. Fused (tiled with G <=
// kFusedMaxTiles): the kernel that needs a row merges it itself, so the training forward is two
// launches and the backward two (plus one tile counter per channel, see ghost_cuda.cu); otherwise a
// small kernel merges each set of rows (forward three launches, backward four).
struct LaunchCfg {
  bool tiled;
  bool fused;
  int bx, by, iters;  // generic kernels
  int th, tp;         // tiled kernels: rows per tile, planes per tile
  int64_t bands;      // tiled: tiles down a plane (ceil(H / th))
  int64_t G;          // tiles (tiled) or pixel chunks (generic) per channel: the length of every partial row
  int64_t groups;     // generic: ceil(C / bx)
  int64_t smem_fwd, smem_bwd;  // tiled: dynamic shared memory bytes of the forward and backward kernels
};

constexpr int kTileThreads = 256;
// Up to this many tiles per channel, each consumer block merges its channel's partial row itself:
// 3 * 64 loads from L2 against the 2048-output tile it computes, and a launch (~2-4 us) saved.
// Longer rows (big maps: kernels of hundreds of microseconds) keep the merging kernels.
constexpr int64_t kFusedMaxTiles = 64;
constexpr int64_t kTileSmemLimit = 44 * 1024;  // under the 48 KB default per-block limit (no opt-in), leaving room for static smem

inline int64_t tile_smem_forward(int64_t tp, int64_t th, int64_t W, int P, int64_t acc_bytes) {
  return tp * (th + 2 * P) * (W + 2 * P) * acc_bytes;
}
inline int64_t tile_smem_backward(int64_t tp, int64_t th, int64_t W, int P, int64_t acc_bytes) {
  return tp * ((th + 4 * P) * (W + 4 * P) + (th + 2 * P) * (W + 2 * P)) * acc_bytes;  // x + 2P halo, dy + P halo
}

inline LaunchCfg make_cfg(const Geom& g, bool channels_last, int64_t acc_bytes, bool allow_tiled = true,
                          int64_t fused_max_tiles = kFusedMaxTiles) {
  LaunchCfg c{};
  const bool k_ok = g.K == 1 || g.K == 3 || g.K == 5 || g.K == 7;
  const bool fits32 = g.N * (g.C + g.OC) * g.HW < (int64_t(1) << 31) && g.C <= 65535;
  if (allow_tiled && !channels_last && k_ok && fits32 && g.NHW > 0) {
    // Outputs per tile: 2048 (8 per thread), halved while the grid would have under 1024 blocks
    // (about 8 per SM of an H100), down to 256.
    for (int64_t target = 2048; target >= 256; target /= 2) {
      const int64_t th = std::min<int64_t>(g.H, std::max<int64_t>(1, target / g.W));
      const int64_t tp = th == g.H ? std::min<int64_t>(g.N, std::max<int64_t>(1, target / (g.H * g.W))) : 1;
      const int64_t bands = (g.H + th - 1) / th;
      const int64_t G = (g.N + tp - 1) / tp * bands;
      const int64_t sf = tile_smem_forward(tp, th, g.W, g.P, acc_bytes);
      const int64_t sb = tile_smem_backward(tp, th, g.W, g.P, acc_bytes);
      if (sb > kTileSmemLimit || G > 0x7fffffff) continue;
      c.tiled = true;
      c.th = static_cast<int>(th);
      c.tp = static_cast<int>(tp);
      c.bands = bands;
      c.G = G;
      c.smem_fwd = sf;
      c.smem_bwd = sb;
      if (G * g.C >= 1024) break;
    }
    if (c.tiled) {
      c.fused = c.G <= fused_max_tiles;
      return c;
    }
  }
  c.bx = 1;
  if (channels_last) {
    while (c.bx < 32 && c.bx < g.C) c.bx *= 2;
  }
  c.by = 256 / c.bx;
  c.iters = 16;  // a multiple of 8 (the stats kernel works in register tiles of 8)
  const int64_t chunk = static_cast<int64_t>(c.by) * c.iters;
  c.G = (g.NHW + chunk - 1) / chunk;
  c.groups = (g.C + c.bx - 1) / c.bx;
  return c;
}

// All launchers return cudaGetLastError() after their launches (no synchronisation).
// acc_t is float for float/half/bfloat16 and double for double.
// Forward: training reads nothing but x/w/gamma/beta (running_mean/var may be null) and writes the
// batch mean, invstd and UNBIASED var (for the running update); eval folds running_mean/var in
// the apply kernel and writes (mean, invstd, var) = (running_mean, 1/sqrt(running_var+eps), running_var).
template <typename scalar_t, typename acc_t>
cudaError_t launch_forward(const Geom& g, const LaunchCfg& cfg, const scalar_t* x, const acc_t* w,
                           const acc_t* gamma, const acc_t* beta, const acc_t* running_mean,
                           const acc_t* running_var, bool training, acc_t eps, bool relu, scalar_t* out,
                           acc_t* mean, acc_t* invstd, acc_t* var, acc_t* workspace, cudaStream_t stream);

// Backward: writes every element of grad_x, grad_w (C*K*K), grad_gamma (C), grad_beta (C).
template <typename scalar_t, typename acc_t>
cudaError_t launch_backward(const Geom& g, const LaunchCfg& cfg, const scalar_t* gout, const scalar_t* x,
                            const acc_t* w, const acc_t* gamma, const acc_t* beta, const acc_t* mean,
                            const acc_t* invstd, bool training, bool relu, scalar_t* grad_x, acc_t* grad_w,
                            acc_t* grad_gamma, acc_t* grad_beta, acc_t* dy, acc_t* workspace, cudaStream_t stream);

// Workspace sizes in acc_t elements.
inline int64_t forward_workspace(const Geom& g, const LaunchCfg& cfg) { return 3 * cfg.G * g.C; }
inline int64_t backward_workspace(const Geom& g, const LaunchCfg& cfg) {
  const int64_t a = 2 * cfg.G * g.NY, b = static_cast<int64_t>(g.K) * g.K * cfg.G * g.NY;
  if (cfg.fused) return a + b + g.NY;  // side by side, then NY tile counters (unsigned, 4 bytes <= acc_t)
  return a > b ? a : b;
}

}  // namespace ghost
