// Interface between the host entry points (ghost_cuda_host.cpp, compiled by the C++ compiler with ATen)
// and the kernels (ghost_cuda.cu, compiled by nvcc without ATen headers, to keep nvcc quick).
#pragma once

#include <cuda_runtime_api.h>

#include "ghost_math.h"

namespace ghost {

// Launch shape shared by every per-element kernel. A block is (bx, by) = 256 threads: bx lanes
// over channels, by over pixels (p = n*HW + h*W + w). NCHW uses bx = 1, so a warp reads 32
// consecutive pixels of one plane; channels_last uses bx = up to 32 channels, so a warp reads
// consecutive channels of a pixel. Either way the warp's loads are coalesced. Each block covers
// `iters` pixels per thread: grid.x = G chunks of by*iters pixels, grid.y = channel groups.
struct LaunchCfg {
  int bx, by, iters;
  int64_t G;        // pixel chunks (the length of every per-channel partial-result row)
  int64_t groups;   // ceil(C / bx)
};

inline LaunchCfg make_cfg(const Geom& g, bool channels_last) {
  LaunchCfg c;
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
  return a > b ? a : b;
}

}  // namespace ghost
