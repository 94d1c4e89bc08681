// CUDA entry points of ghost_ext::ghost_concat: checks, allocation (caching allocator, no host
// synchronisation), the current stream, dtype dispatch; the kernels are in ghost_cuda.cu.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>
#if !defined(GHOST_CUDA_EMULATE)
#include <c10/cuda/CUDAStream.h>  // not ATen/cuda/CUDAContext.h: that pulls in cuSPARSE/cuBLAS headers
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#endif

#include <cstdlib>
#include <limits>
#include <string>
#include <type_traits>

#include "ghost_cuda.h"
#include "../ghost_host.h"

namespace ghost {
namespace {

using at::Tensor;

// The device-specific lines, so that tests/test_cuda_emu.py can compile this file against the CPU
// emulator (cuda_emu.h) with CPU tensors.
#if defined(GHOST_CUDA_EMULATE)
constexpr bool kOnGpu = false;
struct DeviceGuard {
  explicit DeviceGuard(at::Device) {}
};
inline cudaStream_t current_stream() { return nullptr; }
#define GHOST_CHECK_LAUNCH(expr) TORCH_CHECK((expr) == cudaSuccess, "ghost_concat (emulated CUDA): launch failed")
// Fresh buffers hold NaN, so a test sees any element the kernels fail to write.
inline Tensor fresh(Tensor t) { return t.is_floating_point() ? t.fill_(std::numeric_limits<double>::quiet_NaN()) : t; }
#else
constexpr bool kOnGpu = true;
using DeviceGuard = c10::cuda::CUDAGuard;
inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream(); }
#define GHOST_CHECK_LAUNCH(expr) C10_CUDA_CHECK(expr)
inline Tensor fresh(Tensor t) { return t; }
#endif

Tensor as_acc(const Tensor& t, at::ScalarType acc) { return t.to(acc).contiguous(); }

// GHOST_CUDA_TILES=0 in the environment (read once) turns the tiled NCHW kernels off, so that
// benchmarks/gpu_check.sh can time both kernel families on one machine.
bool tiles_enabled() {
  static const bool on = [] {
    const char* v = std::getenv("GHOST_CUDA_TILES");
    return !(v != nullptr && std::string(v) == "0");
  }();
  return on;
}

// The most tiles per channel for which the tiled kernels merge their partials in-kernel (see
// ghost_cuda.h); GHOST_CUDA_FUSED_MAX_TILES in the environment overrides it (0: never, for A/B
// timing in gpu_check.sh). A reference so that the emulator tests can set it.
int64_t& fused_max_tiles() {
  static int64_t v = [] {
    const char* e = std::getenv("GHOST_CUDA_FUSED_MAX_TILES");
    return e != nullptr ? std::strtoll(e, nullptr, 10) : kFusedMaxTiles;
  }();
  return v;
}

// The launch configuration both entry points (and the emulator tests) use, the environment overrides included.
LaunchCfg launch_cfg(const Geom& g, at::MemoryFormat fmt, at::ScalarType acc) {
  return make_cfg(g, fmt == at::MemoryFormat::ChannelsLast, c10::elementSize(acc), tiles_enabled(), fused_max_tiles());
}

void check_cuda(const Tensor& x, const Tensor& weight) {
  TORCH_CHECK(x.is_cuda() == kOnGpu, "ghost_concat (CUDA): x must be a CUDA tensor");
  TORCH_CHECK(weight.size(2) <= kMaxK, "ghost_concat (CUDA): kernel size ", weight.size(2),
              " > ", kMaxK, " is not supported by the CUDA kernels; use impl='torch'");
}

std::tuple<Tensor, Tensor, Tensor, Tensor> ghost_concat_cuda(
    const Tensor& x_in, const Tensor& weight, const Tensor& bn_weight, const Tensor& bn_bias,
    const std::optional<Tensor>& running_mean, const std::optional<Tensor>& running_var, bool training,
    double eps, bool relu,
    int64_t out_channels) {
  check_args(x_in, weight, bn_weight, bn_bias, out_channels);
  check_cuda(x_in, weight);
  const DeviceGuard guard(x_in.device());
  const auto acc = acc_type(x_in);
  const auto fmt = out_format(x_in);
  const Tensor x = x_in.contiguous(fmt);
  const int64_t C = x.size(1);
  const int K = static_cast<int>(weight.size(2));
  const Tensor wacc = as_acc(weight, acc);
  const Tensor gamma = as_acc(bn_weight, acc);
  const Tensor beta = as_acc(bn_bias, acc);
  Tensor out = fresh(at::empty({x.size(0), out_channels, x.size(2), x.size(3)}, x.options().memory_format(fmt)));
  const auto sopt = x.options().dtype(acc);
  // Eval: the apply kernel folds running_mean/var itself and writes the (mean, invstd, var)
  // outputs, so neither mode launches anything besides the kernels (as_acc is a no-op for the
  // usual float32 contiguous BN tensors).
  Tensor rm, rv;
  if (!training) {
    TORCH_CHECK(running_mean.has_value() && running_var.has_value() && running_mean->numel() == C &&
                    running_var->numel() == C,
                "ghost_concat: eval mode needs running_mean/running_var with C=", C, " elements");
    rm = as_acc(*running_mean, acc).view({C});
    rv = as_acc(*running_var, acc).view({C});
  }
  Tensor mean = fresh(at::empty({C}, sopt)), invstd = fresh(at::empty({C}, sopt)), var = fresh(at::empty({C}, sopt));
  if (x.numel() == 0) {  // no kernel runs: the running statistics (the running update is then a no-op), else NaN
    empty_batch_stats(running_mean, running_var, eps, mean, invstd, var);
    return {out, mean, invstd, var};
  }
  const Geom g = make_geom(x, out, K, out_channels);
  const LaunchCfg cfg = launch_cfg(g, fmt, acc);
  Tensor ws = fresh(at::empty({training ? forward_workspace(g, cfg) : 0}, sopt));
  const cudaStream_t stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ghost_concat_cuda", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    GHOST_CHECK_LAUNCH((launch_forward<scalar_t, acc_t>(
        g, cfg, x.const_data_ptr<scalar_t>(), wacc.const_data_ptr<acc_t>(), gamma.const_data_ptr<acc_t>(),
        beta.const_data_ptr<acc_t>(), training ? nullptr : rm.const_data_ptr<acc_t>(),
        training ? nullptr : rv.const_data_ptr<acc_t>(), training, static_cast<acc_t>(eps), relu,
        out.mutable_data_ptr<scalar_t>(), mean.mutable_data_ptr<acc_t>(), invstd.mutable_data_ptr<acc_t>(),
        var.mutable_data_ptr<acc_t>(), training ? ws.mutable_data_ptr<acc_t>() : nullptr, stream)));
  });
  return {out, mean, invstd, var};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> ghost_concat_backward_cuda(
    const Tensor& grad_out, const Tensor& x_in, const Tensor& weight, const Tensor& bn_weight,
    const Tensor& bn_bias, const Tensor& mean, const Tensor& invstd, bool training, bool relu,
    int64_t out_channels) {
  check_args(x_in, weight, bn_weight, bn_bias, out_channels);
  check_cuda(x_in, weight);
  TORCH_CHECK(grad_out.dim() == 4 && grad_out.size(0) == x_in.size(0) && grad_out.size(1) == out_channels &&
                  grad_out.size(2) == x_in.size(2) && grad_out.size(3) == x_in.size(3),
              "ghost_concat_backward: grad_out has shape ", grad_out.sizes());
  const DeviceGuard guard(x_in.device());
  const auto acc = acc_type(x_in);
  const auto fmt = out_format(x_in);
  const Tensor x = x_in.contiguous(fmt);
  const Tensor gout = grad_out.to(x.scalar_type()).contiguous(fmt);  // out's layout: the kernels use one stride set
  const int64_t C = x.size(1);
  const int K = static_cast<int>(weight.size(2));
  const Tensor wacc = as_acc(weight, acc);
  const Tensor gamma = as_acc(bn_weight, acc);
  const Tensor beta = as_acc(bn_bias, acc);
  const Tensor m = as_acc(mean, acc);
  const Tensor is = as_acc(invstd, acc);
  const auto sopt = x.options().dtype(acc);
  Tensor gx = fresh(at::empty(x.sizes(), x.options().memory_format(fmt)));
  if (x.numel() == 0) {
    return {gx, at::zeros(weight.sizes(), weight.options()), at::zeros({C}, bn_weight.options()),
            at::zeros({C}, bn_bias.options())};
  }
  // No fills: the kernels write every element of gw, gg, gb (zeros for channels >= NY).
  Tensor gw = fresh(at::empty({C * K * K}, sopt));
  Tensor gg = fresh(at::empty({C}, sopt));
  Tensor gb = fresh(at::empty({C}, sopt));
  const Geom g = make_geom(x, gout, K, out_channels);
  const LaunchCfg cfg = launch_cfg(g, fmt, acc);
  // dy in x's exact strides (x is dense in fmt here), float32 for the half types; the tiled kernels
  // keep dy in shared memory and need none
  Tensor dy = fresh(cfg.tiled ? at::empty({0}, sopt) : at::empty(x.sizes(), sopt.memory_format(fmt)));
  Tensor ws = fresh(at::empty({backward_workspace(g, cfg)}, sopt));
  const cudaStream_t stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ghost_concat_backward_cuda", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    GHOST_CHECK_LAUNCH((launch_backward<scalar_t, acc_t>(
        g, cfg, gout.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), wacc.const_data_ptr<acc_t>(),
        gamma.const_data_ptr<acc_t>(), beta.const_data_ptr<acc_t>(), m.const_data_ptr<acc_t>(),
        is.const_data_ptr<acc_t>(), training, relu, gx.mutable_data_ptr<scalar_t>(), gw.mutable_data_ptr<acc_t>(),
        gg.mutable_data_ptr<acc_t>(), gb.mutable_data_ptr<acc_t>(), cfg.tiled ? nullptr : dy.mutable_data_ptr<acc_t>(),
        ws.mutable_data_ptr<acc_t>(), stream)));
  });
  return {gx, gw.view(weight.sizes()).to(weight.scalar_type()), gg.to(bn_weight.scalar_type()),
          gb.to(bn_bias.scalar_type())};
}

}  // namespace
}  // namespace ghost

#if !defined(GHOST_CUDA_EMULATE)
TORCH_LIBRARY_IMPL(ghost_ext, CUDA, m) {
  m.impl("ghost_concat", &ghost::ghost_concat_cuda);
  m.impl("ghost_concat_backward", &ghost::ghost_concat_backward_cuda);
}
#endif
