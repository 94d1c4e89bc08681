// ghost_ext::ghost_concat: the cheap branch of a GhostModule (depthwise conv -> BN -> ReLU) and the
// concat with its input as one op. Schema, registration and the CPU kernels live here; the CUDA
// kernels in ghost_cuda.cu (launched from ghost_cuda_host.cpp).
//
// Why the op is functional (returns the batch statistics) instead of mutating the running
// statistics in place (`Tensor(a!)`): AOTAutograd, torch.compile and torch.export handle a
// functional op with no extra machinery, whereas a mutable custom op gets wrapped in
// auto_functionalized and re-aliased, and autograd of an op that both mutates inputs and has a
// backward is the least exercised corner of torch.library. The Python wrapper
// (ghost_ext/__init__.py) updates running_mean / running_var with in-place ATen ops under
// no_grad, which every tracer already understands (nn.BatchNorm2d's buffer update is traced the
// same way). The cost is one fused foreach launch per training call.
//
// Returns (out, mean, invstd, var): mean/invstd are what the forward normalised with (batch
// statistics in training, running statistics in eval) and all backward needs besides x; var is
// the UNBIASED batch variance (running_var in eval), so the running update is one lerp:
// torch._foreach_lerp_([running_mean, running_var], [mean, var], momentum).

#include <Python.h>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "ghost_host.h"
#include "ghost_cpu_nhwc.h"  // eval forward on channels_last x, no layout conversion

namespace ghost {
namespace {

using at::Tensor;

// Sums with 8 independent lanes so the compiler can vectorise without -ffast-math; the order is
// fixed, so results do not depend on the thread count.
template <typename T>
inline T lane_sum(const T* v, int64_t n) {
  T l[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) l[j] += v[i + j];
  T s = 0;
  for (; i < n; ++i) s += v[i];
  return s + ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));
}

template <typename T>
inline T lane_sqdev(const T* v, int64_t n, T mean) {
  T l[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) {
      const T d = v[i + j] - mean;
      l[j] += d * d;
    }
  T s = 0;
  for (; i < n; ++i) s += (v[i] - mean) * (v[i] - mean);
  return s + ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));
}

template <typename T>
inline T lane_dot(const T* a, const T* b, int64_t n) {
  T l[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) l[j] += a[i + j] * b[i + j];
  T s = 0;
  for (; i < n; ++i) s += a[i] * b[i];
  return s + ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));
}

// One (n, c) plane as acc_t: the input itself when the types agree, else converted into buf.
template <typename scalar_t, typename acc_t>
inline const acc_t* plane_as_acc(const scalar_t* src, acc_t* buf, int64_t HW) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return src;
  } else {
    for (int64_t i = 0; i < HW; ++i) buf[i] = static_cast<acc_t>(src[i]);
    return buf;
  }
}

// Valid output columns [w0, w1) for horizontal tap offset off (input column w + off in [0, W)).
inline void tap_range(int64_t W, int64_t off, int64_t& w0, int64_t& w1) {
  w0 = std::max<int64_t>(0, -off);
  w1 = std::min<int64_t>(W, W - off);
}

// Depthwise conv of one output row h, generic K: one pass per tap over the row. Same tap order
// (a-major, b-minor) as dw_conv_point.
template <typename acc_t>
inline void conv_row_generic(const acc_t* xp, const acc_t* wk, int64_t H, int64_t W, int K, int64_t h, acc_t* yrow) {
  const int P = K / 2;
  std::fill(yrow, yrow + W, acc_t(0));
  for (int a = 0; a < K; ++a) {
    const int64_t hh = h + a - P;
    if (hh < 0 || hh >= H) continue;
    const acc_t* xrow = xp + hh * W;
    for (int b = 0; b < K; ++b) {
      const int64_t off = b - P;
      int64_t w0, w1;
      tap_range(W, off, w0, w1);
      const acc_t wv = wk[a * K + b];
      for (int64_t w = w0; w < w1; ++w) yrow[w] += wv * xrow[w + off];
    }
  }
}

// Compile-time K: all K*K taps of an interior output in one pass (the w loop vectorises; rows
// outside the map point at a zero row), the P border columns through the shared point function.
template <typename acc_t, int K>
inline void conv_row_k(const acc_t* xp, const acc_t* wk, int64_t H, int64_t W, int64_t h, const acc_t* zero,
                       acc_t* __restrict__ yrow) {
  constexpr int P = K / 2;
  if (W <= 2 * P) {
    for (int64_t w = 0; w < W; ++w) yrow[w] = dw_conv_point<acc_t, acc_t>(xp, W, 1, H, W, h, w, wk, K);
    return;
  }
  const acc_t* rows[K];
  for (int a = 0; a < K; ++a) {
    const int64_t hh = h + a - P;
    rows[a] = (hh < 0 || hh >= H) ? zero : xp + hh * W;
  }
  acc_t wr[K * K];
  for (int t = 0; t < K * K; ++t) wr[t] = wk[t];
  for (int64_t w = P; w < W - P; ++w) {
    acc_t acc = acc_t(0);
    for (int a = 0; a < K; ++a)
      for (int b = 0; b < K; ++b) acc += wr[a * K + b] * rows[a][w + b - P];
    yrow[w] = acc;
  }
  for (int64_t w = 0; w < P; ++w) yrow[w] = dw_conv_point<acc_t, acc_t>(xp, W, 1, H, W, h, w, wk, K);
  for (int64_t w = W - P; w < W; ++w) yrow[w] = dw_conv_point<acc_t, acc_t>(xp, W, 1, H, W, h, w, wk, K);
}

// y row h of the depthwise conv of plane xp (H x W, dense). zero: >= W zeros.
template <typename acc_t>
inline void conv_row(const acc_t* xp, const acc_t* wk, int64_t H, int64_t W, int K, int64_t h, const acc_t* zero,
                     acc_t* yrow) {
  switch (K) {
    case 1: conv_row_k<acc_t, 1>(xp, wk, H, W, h, zero, yrow); break;
    case 3: conv_row_k<acc_t, 3>(xp, wk, H, W, h, zero, yrow); break;
    case 5: conv_row_k<acc_t, 5>(xp, wk, H, W, h, zero, yrow); break;
    case 7: conv_row_k<acc_t, 7>(xp, wk, H, W, h, zero, yrow); break;
    default: conv_row_generic(xp, wk, H, W, K, h, yrow);
  }
}

// ---------------------------------------------------------------------------------------------
// Forward. x is NCHW-contiguous here (channels_last input is converted by the caller); each
// channel is independent, so threads split the channels and every reduction has a fixed order.
template <typename scalar_t, typename acc_t>
void forward_cpu_kernel(const Tensor& x, const Tensor& wacc, const Tensor& gamma, const Tensor& beta,
                        bool training, acc_t eps, bool relu, Tensor& out, Tensor& mean_t,
                        Tensor& invstd_t, Tensor& var_t) {
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), HW = H * W;
  const int64_t OC = out.size(1), NY = OC - C;
  const int K = static_cast<int>(wacc.size(2));  // wacc is (C, K, K)
  const scalar_t* xd = x.const_data_ptr<scalar_t>();
  scalar_t* od = out.mutable_data_ptr<scalar_t>();
  const acc_t* wd = wacc.const_data_ptr<acc_t>();
  const acc_t* gd = gamma.const_data_ptr<acc_t>();
  const acc_t* bd = beta.const_data_ptr<acc_t>();
  acc_t* md = mean_t.mutable_data_ptr<acc_t>();
  acc_t* isd = invstd_t.mutable_data_ptr<acc_t>();
  acc_t* vd = var_t.mutable_data_ptr<acc_t>();

  // work-based grain: small maps (the late stages at batch 1) stay on the calling thread
  at::parallel_for(0, C, nhwc::grain_for(N * HW * (1 + K * K)), [&](int64_t c0, int64_t c1) {
    std::vector<acc_t> xbuf(std::is_same_v<scalar_t, acc_t> ? 0 : HW);
    // training keeps the whole channel's conv output (N*HW) so the statistics need no recompute
    std::vector<acc_t> ybuf(training ? N * HW : W);
    const std::vector<acc_t> zero(W, acc_t(0));
    for (int64_t c = c0; c < c1; ++c) {
      const acc_t* wk = wd + c * K * K;
      if (training) {
        for (int64_t n = 0; n < N; ++n) {
          const scalar_t* xs = xd + (n * C + c) * HW;
          std::memcpy(od + (n * OC + c) * HW, xs, HW * sizeof(scalar_t));
          const acc_t* xp = plane_as_acc<scalar_t, acc_t>(xs, xbuf.data(), HW);
          for (int64_t h = 0; h < H; ++h) conv_row(xp, wk, H, W, K, h, zero.data(), ybuf.data() + n * HW + h * W);
        }
        // two passes over the buffer: mean, then squared deviations (no cancellation)
        double s = 0;
        for (int64_t n = 0; n < N; ++n) s += static_cast<double>(lane_sum(ybuf.data() + n * HW, HW));
        const acc_t mean = static_cast<acc_t>(s / static_cast<double>(N * HW));
        double s2 = 0;
        for (int64_t n = 0; n < N; ++n) s2 += static_cast<double>(lane_sqdev(ybuf.data() + n * HW, HW, mean));
        const acc_t var = static_cast<acc_t>(s2 / static_cast<double>(N * HW));
        const acc_t invstd = invstd_of(var, eps);
        md[c] = mean;
        // the op's var output is the unbiased variance (what the running update wants)
        vd[c] = N * HW > 1 ? static_cast<acc_t>(s2 / static_cast<double>(N * HW - 1)) : acc_t(0);
        isd[c] = invstd;
        if (c < NY) {
          acc_t scale, shift;
          bn_fold(mean, invstd, gd[c], bd[c], scale, shift);
          for (int64_t n = 0; n < N; ++n) {
            const acc_t* yp = ybuf.data() + n * HW;
            scalar_t* op = od + (n * OC + C + c) * HW;
            for (int64_t i = 0; i < HW; ++i) op[i] = static_cast<scalar_t>(bn_act(yp[i], scale, shift, relu));
          }
        }
      } else {
        acc_t scale = 0, shift = 0;
        if (c < NY) bn_fold(md[c], isd[c], gd[c], bd[c], scale, shift);
        for (int64_t n = 0; n < N; ++n) {
          const scalar_t* xs = xd + (n * C + c) * HW;
          std::memcpy(od + (n * OC + c) * HW, xs, HW * sizeof(scalar_t));
          if (c >= NY) continue;
          const acc_t* xp = plane_as_acc<scalar_t, acc_t>(xs, xbuf.data(), HW);
          scalar_t* op = od + (n * OC + C + c) * HW;
          for (int64_t h = 0; h < H; ++h) {
            conv_row(xp, wk, H, W, K, h, zero.data(), ybuf.data());
            for (int64_t w = 0; w < W; ++w) op[h * W + w] = static_cast<scalar_t>(bn_act(ybuf[w], scale, shift, relu));
          }
        }
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Backward, per channel: recompute y from x, reduce sum(g) and sum(g * yhat), turn the buffer
// into dy, then grad_x = grad_out[:, c] + conv_transpose(dy) and grad_w[a, b] = sum dy * x_shift.
template <typename scalar_t, typename acc_t>
void backward_cpu_kernel(const Tensor& gout, const Tensor& x, const Tensor& wacc, const Tensor& gamma,
                         const Tensor& beta, const Tensor& mean_t, const Tensor& invstd_t, bool training,
                         bool relu, Tensor& gx, Tensor& gw, Tensor& ggamma, Tensor& gbeta) {
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), HW = H * W;
  const int64_t OC = gout.size(1), NY = OC - C;
  const int K = static_cast<int>(wacc.size(2));  // wacc is (C, K, K)
  const int P = K / 2;
  const scalar_t* xd = x.const_data_ptr<scalar_t>();
  const scalar_t* god = gout.const_data_ptr<scalar_t>();
  scalar_t* gxd = gx.mutable_data_ptr<scalar_t>();
  const acc_t* wd = wacc.const_data_ptr<acc_t>();
  const acc_t* gd = gamma.const_data_ptr<acc_t>();
  const acc_t* bd = beta.const_data_ptr<acc_t>();
  const acc_t* md = mean_t.const_data_ptr<acc_t>();
  const acc_t* isd = invstd_t.const_data_ptr<acc_t>();
  acc_t* gwd = gw.mutable_data_ptr<acc_t>();
  acc_t* ggd = ggamma.mutable_data_ptr<acc_t>();
  acc_t* gbd = gbeta.mutable_data_ptr<acc_t>();
  const double M = static_cast<double>(N * HW);

  at::parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) {
    std::vector<acc_t> xbuf(std::is_same_v<scalar_t, acc_t> ? 0 : HW);
    std::vector<acc_t> ybuf;
    std::vector<acc_t> rowbuf(W), wflip(K * K);
    const std::vector<acc_t> zero(W, acc_t(0));
    for (int64_t c = c0; c < c1; ++c) {
      if (c >= NY) {  // channel never reached the output: grad_x is the identity part only
        for (int64_t n = 0; n < N; ++n) {
          const scalar_t* gs = god + (n * OC + c) * HW;
          std::memcpy(gxd + (n * C + c) * HW, gs, HW * sizeof(scalar_t));
        }
        for (int t = 0; t < K * K; ++t) gwd[c * K * K + t] = 0;
        ggd[c] = 0;
        gbd[c] = 0;
        continue;
      }
      ybuf.resize(N * HW);
      const acc_t* wk = wd + c * K * K;
      const acc_t mean = md[c], invstd = isd[c];
      acc_t scale, shift;
      bn_fold(mean, invstd, gd[c], bd[c], scale, shift);
      // pass 1: y, and the two per-channel sums
      double sg = 0, sgy = 0;
      for (int64_t n = 0; n < N; ++n) {
        const acc_t* xp = plane_as_acc<scalar_t, acc_t>(xd + (n * C + c) * HW, xbuf.data(), HW);
        acc_t* yp = ybuf.data() + n * HW;
        for (int64_t h = 0; h < H; ++h) conv_row(xp, wk, H, W, K, h, zero.data(), yp + h * W);
        const scalar_t* gs = god + (n * OC + C + c) * HW;
        acc_t l_g = 0, l_gy = 0;
        for (int64_t i = 0; i < HW; ++i) {
          const acc_t g = act_grad(static_cast<acc_t>(gs[i]), yp[i], scale, shift, relu);
          l_g += g;
          l_gy += g * ((yp[i] - mean) * invstd);
        }
        sg += static_cast<double>(l_g);
        sgy += static_cast<double>(l_gy);
      }
      ggd[c] = static_cast<acc_t>(sgy);
      gbd[c] = static_cast<acc_t>(sg);
      const acc_t mean_g = static_cast<acc_t>(sg / M), mean_gy = static_cast<acc_t>(sgy / M);
      // pass 2: y -> dy in place
      for (int64_t n = 0; n < N; ++n) {
        const scalar_t* gs = god + (n * OC + C + c) * HW;
        acc_t* yp = ybuf.data() + n * HW;
        for (int64_t i = 0; i < HW; ++i) {
          const acc_t g = act_grad(static_cast<acc_t>(gs[i]), yp[i], scale, shift, relu);
          yp[i] = bn_dy(g, yp[i], mean, invstd, gd[c], mean_g, mean_gy, training);
        }
      }
      // pass 3: grad_x = grad_out[:, c] + conv_transpose(dy), which is the conv of dy with the
      // kernel flipped in both axes; grad_w[a, b] = sum over rows of dot(dy row, shifted x row).
      for (int t = 0; t < K * K; ++t) wflip[t] = wk[K * K - 1 - t];
      std::vector<double> gwsum(K * K, 0.0);
      for (int64_t n = 0; n < N; ++n) {
        const acc_t* xp = plane_as_acc<scalar_t, acc_t>(xd + (n * C + c) * HW, xbuf.data(), HW);
        const acc_t* dyp = ybuf.data() + n * HW;
        const scalar_t* gs = god + (n * OC + c) * HW;
        scalar_t* gxp = gxd + (n * C + c) * HW;
        for (int64_t h = 0; h < H; ++h) {
          conv_row(dyp, wflip.data(), H, W, K, h, zero.data(), rowbuf.data());
          for (int64_t w = 0; w < W; ++w) gxp[h * W + w] = static_cast<scalar_t>(static_cast<acc_t>(gs[h * W + w]) + rowbuf[w]);
          const acc_t* dyrow = dyp + h * W;
          for (int a = 0; a < K; ++a) {
            const int64_t hh = h + a - P;
            if (hh < 0 || hh >= H) continue;
            const acc_t* xrow = xp + hh * W;
            for (int b = 0; b < K; ++b) {
              const int64_t off = b - P;
              int64_t w0, w1;
              tap_range(W, off, w0, w1);
              if (w1 > w0) gwsum[a * K + b] += static_cast<double>(lane_dot(dyrow + w0, xrow + w0 + off, w1 - w0));
            }
          }
        }
      }
      for (int t = 0; t < K * K; ++t) gwd[c * K * K + t] = static_cast<acc_t>(gwsum[t]);
    }
  });
}

// Per-channel parameters as contiguous acc_t tensors (weight may be float32 while x is bf16,
// as autocast produces; the kernels never see mixed types).
Tensor as_acc(const Tensor& t, at::ScalarType acc) { return t.to(acc).contiguous(); }

std::tuple<Tensor, Tensor, Tensor, Tensor> ghost_concat_cpu(
    const Tensor& x_in, const Tensor& weight, const Tensor& bn_weight, const Tensor& bn_bias,
    const std::optional<Tensor>& running_mean, const std::optional<Tensor>& running_var, bool training,
    double eps, bool relu,
    int64_t out_channels) {
  check_args(x_in, weight, bn_weight, bn_bias, out_channels);
  const auto acc = acc_type(x_in);
  const auto fmt = out_format(x_in);
  const int64_t C = x_in.size(1);
  const int64_t K = weight.size(2);
  // The NCHW kernel below works on (n, c) planes: channels_last input is converted here and the
  // output converted back (two extra copies), except in eval, where nhwc::forward_eval
  // (ghost_cpu_nhwc.h) reads and writes channels_last directly (the BN-folded inference path).
  const bool nhwc_eval = !training && fmt == at::MemoryFormat::ChannelsLast;
  const Tensor x = nhwc_eval ? x_in : x_in.contiguous();
  const Tensor wacc = as_acc(weight, acc).view({C, K, K});
  const Tensor gamma = as_acc(bn_weight, acc).view({C});
  const Tensor beta = as_acc(bn_bias, acc).view({C});
  Tensor out = nhwc_eval ? Tensor() : at::empty({x.size(0), out_channels, x.size(2), x.size(3)}, x.options());
  Tensor mean, invstd, var;
  if (training) {
    mean = at::empty({C}, x.options().dtype(acc));
    invstd = at::empty({C}, x.options().dtype(acc));
    var = at::empty({C}, x.options().dtype(acc));
  } else {
    TORCH_CHECK(running_mean.has_value() && running_var.has_value() && running_mean->numel() == C &&
                    running_var->numel() == C,
                "ghost_concat: eval mode needs running_mean/running_var with C=", C, " elements");
    // one small host loop instead of clone/clone/add/rsqrt (per-call overhead)
    const Tensor rm = as_acc(*running_mean, acc), rv = as_acc(*running_var, acc);
    mean = at::empty({C}, x.options().dtype(acc));
    invstd = at::empty({C}, x.options().dtype(acc));
    var = at::empty({C}, x.options().dtype(acc));
    AT_DISPATCH_FLOATING_TYPES(acc, "ghost_concat_cpu_eval_stats", [&] {
      const scalar_t* rmd = rm.const_data_ptr<scalar_t>();
      const scalar_t* rvd = rv.const_data_ptr<scalar_t>();
      scalar_t* md = mean.mutable_data_ptr<scalar_t>();
      scalar_t* isd = invstd.mutable_data_ptr<scalar_t>();
      scalar_t* vd = var.mutable_data_ptr<scalar_t>();
      for (int64_t c = 0; c < C; ++c) {
        md[c] = rmd[c];
        vd[c] = rvd[c];
        isd[c] = invstd_of(rvd[c], static_cast<scalar_t>(eps));
      }
    });
  }
  if (nhwc_eval) return {nhwc::forward_eval(x, wacc, gamma, beta, mean, invstd, relu, out_channels), mean, invstd, var};
  if (training && x.numel() == 0) {  // nothing to normalise: the running statistics (the update is a no-op), else NaN
    empty_batch_stats(running_mean, running_var, eps, mean, invstd, var);
  }
  if (x.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ghost_concat_cpu", [&] {
      using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
      forward_cpu_kernel<scalar_t, acc_t>(x, wacc, gamma, beta, training, static_cast<acc_t>(eps), relu, out,
                                          mean, invstd, var);
    });
  }
  if (fmt == at::MemoryFormat::ChannelsLast) out = out.contiguous(at::MemoryFormat::ChannelsLast);
  return {out, mean, invstd, var};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> ghost_concat_backward_cpu(
    const Tensor& grad_out, const Tensor& x_in, const Tensor& weight, const Tensor& bn_weight,
    const Tensor& bn_bias, const Tensor& mean, const Tensor& invstd, bool training, bool relu,
    int64_t out_channels) {
  check_args(x_in, weight, bn_weight, bn_bias, out_channels);
  const auto acc = acc_type(x_in);
  const auto fmt = out_format(x_in);
  const int64_t C = x_in.size(1);
  const int64_t K = weight.size(2);
  TORCH_CHECK(grad_out.dim() == 4 && grad_out.size(0) == x_in.size(0) && grad_out.size(1) == out_channels &&
                  grad_out.size(2) == x_in.size(2) && grad_out.size(3) == x_in.size(3),
              "ghost_concat_backward: grad_out has shape ", grad_out.sizes());
  const Tensor x = x_in.contiguous();
  const Tensor gout = grad_out.to(x.scalar_type()).contiguous();
  const Tensor wacc = as_acc(weight, acc).view({C, K, K});
  const Tensor gamma = as_acc(bn_weight, acc).view({C});
  const Tensor beta = as_acc(bn_bias, acc).view({C});
  const Tensor m = as_acc(mean, acc).view({C});
  const Tensor is = as_acc(invstd, acc).view({C});
  Tensor gx = at::empty_like(x, at::MemoryFormat::Contiguous);
  // the kernel writes every channel's gradients (zeros for channels >= NY); zeros only when it does not run
  const auto alloc = [&](at::IntArrayRef size) {
    return x.numel() > 0 ? at::empty(size, x.options().dtype(acc)) : at::zeros(size, x.options().dtype(acc));
  };
  Tensor gw = alloc({C, K * K});
  Tensor gg = alloc({C});
  Tensor gb = alloc({C});
  if (x.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ghost_concat_backward_cpu", [&] {
      using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
      backward_cpu_kernel<scalar_t, acc_t>(gout, x, wacc, gamma, beta, m, is, training, relu, gx, gw, gg, gb);
    });
  }
  if (fmt == at::MemoryFormat::ChannelsLast) gx = gx.contiguous(at::MemoryFormat::ChannelsLast);
  return {gx, gw.view(weight.sizes()).to(weight.scalar_type()), gg.to(bn_weight.scalar_type()),
          gb.to(bn_bias.scalar_type())};
}

// ---------------------------------------------------------------------------------------------
// Autograd, in C++ (for both devices: it only redispatches to the ops). A Python autograd
// registration (torch.library.register_autograd) costs tens of microseconds of host time per
// call in forward and again in backward; this path keeps the per-call host overhead at the
// dispatcher's. Saved for backward: x, the parameters and the per-channel statistics only;
// backward recomputes the depthwise output from x. torch.compile / torch.export trace through
// it with the fake kernels (ghost_ext/ops.py).
class GhostConcatFunction : public torch::autograd::Function<GhostConcatFunction> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const Tensor& x,
                                                const Tensor& weight, const Tensor& bn_weight, const Tensor& bn_bias,
                                                const std::optional<Tensor>& running_mean,
                                                const std::optional<Tensor>& running_var, bool training, double eps,
                                                bool relu, int64_t out_channels) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("ghost_ext::ghost_concat", "")
                         .typed<std::tuple<Tensor, Tensor, Tensor, Tensor>(
                             const Tensor&, const Tensor&, const Tensor&, const Tensor&, const std::optional<Tensor>&,
                             const std::optional<Tensor>&, bool, double, bool, int64_t)>();
    at::AutoDispatchBelowADInplaceOrView below;
    auto [out, mean, invstd, var] =
        op.call(x, weight, bn_weight, bn_bias, running_mean, running_var, training, eps, relu, out_channels);
    ctx->save_for_backward({x, weight, bn_weight, bn_bias, mean, invstd});
    ctx->saved_data["training"] = training;
    ctx->saved_data["relu"] = relu;
    ctx->saved_data["out_channels"] = out_channels;
    ctx->mark_non_differentiable({mean, invstd, var});
    // The statistics never get a gradient; without this, autograd would fill three zero tensors for
    // them before every backward (three extra kernel launches per GhostModule on CUDA).
    ctx->set_materialize_grads(false);
    return {out, mean, invstd, var};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("ghost_ext::ghost_concat_backward", "")
                         .typed<std::tuple<Tensor, Tensor, Tensor, Tensor>(
                             const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                             const Tensor&, const Tensor&, bool, bool, int64_t)>();
    torch::autograd::variable_list result(10);  // one per forward argument; undefined = no gradient
    if (!grads[0].defined()) return result;     // the output itself was not used
    const auto saved = ctx->get_saved_variables();
    auto [gx, gw, gg, gb] = op.call(grads[0], saved[0], saved[1], saved[2], saved[3], saved[4], saved[5],
                                    ctx->saved_data["training"].toBool(), ctx->saved_data["relu"].toBool(),
                                    ctx->saved_data["out_channels"].toInt());
    result[0] = gx;
    result[1] = gw;
    result[2] = gg;
    result[3] = gb;
    return result;
  }
};

std::tuple<Tensor, Tensor, Tensor, Tensor> ghost_concat_autograd(
    const Tensor& x, const Tensor& weight, const Tensor& bn_weight, const Tensor& bn_bias,
    const std::optional<Tensor>& running_mean, const std::optional<Tensor>& running_var, bool training,
    double eps, bool relu, int64_t out_channels) {
  auto r = GhostConcatFunction::apply(x, weight, bn_weight, bn_bias, running_mean, running_var, training, eps, relu,
                                      out_channels);
  return {r[0], r[1], r[2], r[3]};
}

}  // namespace
}  // namespace ghost

TORCH_LIBRARY(ghost_ext, m) {
  m.def(
      "ghost_concat(Tensor x, Tensor weight, Tensor bn_weight, Tensor bn_bias, Tensor? running_mean, "
      "Tensor? running_var, bool training, float eps, bool relu, int out_channels) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "ghost_concat_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor bn_weight, Tensor bn_bias, "
      "Tensor mean, Tensor invstd, bool training, bool relu, int out_channels) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(ghost_ext, Autograd, m) {
  m.impl("ghost_concat", &ghost::ghost_concat_autograd);
}

TORCH_LIBRARY_IMPL(ghost_ext, CPU, m) {
  m.impl("ghost_concat", &ghost::ghost_concat_cpu);
  m.impl("ghost_concat_backward", &ghost::ghost_concat_backward_cpu);
}

// `import ghost_ext._C` loads this library, which runs the registrations above. The module itself
// is empty: everything is reached through torch.ops.ghost_ext.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
