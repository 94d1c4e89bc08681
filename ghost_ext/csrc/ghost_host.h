// Host-side helpers shared by the CPU (ghost.cpp) and CUDA (ghost_cuda_host.cpp) entry points:
// argument checks, the output memory-format rule and the geometry passed to the kernels.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/rsqrt.h>
#include <c10/util/Exception.h>

#include "ghost_math.h"

#include <limits>

namespace ghost {

// Output (and grad_x) layout. Must match _out_format() in ghost_ext/ops.py (the fake kernel):
// channels_last when x is channels_last-contiguous and not also plain-contiguous, else NCHW.
inline at::MemoryFormat out_format(const at::Tensor& x) {
  return (x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous())
             ? at::MemoryFormat::ChannelsLast
             : at::MemoryFormat::Contiguous;
}

// Statistics and accumulation: float64 for float64 x, float32 for everything else.
inline at::ScalarType acc_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_args(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bn_weight,
                       const at::Tensor& bn_bias, int64_t out_channels) {
  TORCH_CHECK(x.dim() == 4, "ghost_concat: x must be (N, C, H, W), got ", x.dim(), " dims");
  const int64_t C = x.size(1);
  TORCH_CHECK(C <= out_channels && out_channels <= 2 * C, "ghost_concat: out_channels=", out_channels,
              " must lie in [C, 2C] = [", C, ", ", 2 * C, "]");
  TORCH_CHECK(weight.dim() == 4 && weight.size(0) == C && weight.size(1) == 1 &&
                  weight.size(2) == weight.size(3) && weight.size(2) % 2 == 1,
              "ghost_concat: weight must be (C, 1, k, k) with k odd, got ", weight.sizes());
  TORCH_CHECK(bn_weight.numel() == C && bn_bias.numel() == C,
              "ghost_concat: bn_weight and bn_bias must have C=", C, " elements");
  const auto st = x.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16,
              "ghost_concat: x dtype ", st, " is not supported (float32/64, float16, bfloat16)");
}

inline Geom make_geom(const at::Tensor& x, const at::Tensor& out, int K, int64_t out_channels) {
  Geom g;
  g.N = x.size(0);
  g.C = x.size(1);
  g.H = x.size(2);
  g.W = x.size(3);
  g.HW = g.H * g.W;
  g.NHW = g.N * g.HW;
  g.OC = out_channels;
  g.NY = out_channels - g.C;
  g.K = K;
  g.P = K / 2;
  g.xsN = x.stride(0);
  g.xsC = x.stride(1);
  g.xsH = x.stride(2);
  g.xsW = x.stride(3);
  g.osN = out.stride(0);
  g.osC = out.stride(1);
  g.osH = out.stride(2);
  g.osW = out.stride(3);
  return g;
}

// Statistics of an empty batch (no kernel runs): the running statistics, so that the running update
// is a no-op, or NaN without them (as a reduction over nothing gives).
inline void empty_batch_stats(const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
                              double eps, at::Tensor& mean, at::Tensor& invstd, at::Tensor& var) {
  const int64_t C = mean.size(0);
  if (running_mean.has_value() && running_mean->defined() && running_var.has_value() && running_var->defined()) {
    mean.copy_(running_mean->view({C}));
    var.copy_(running_var->view({C}));
    invstd.copy_((var + eps).rsqrt());
  } else {
    mean.fill_(std::numeric_limits<double>::quiet_NaN());
    invstd.fill_(std::numeric_limits<double>::quiet_NaN());
    var.fill_(std::numeric_limits<double>::quiet_NaN());
  }
}

}  // namespace ghost
