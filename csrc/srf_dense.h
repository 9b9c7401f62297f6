// The dense path of dcn_fast::srf_dense_conv2d, shared by the CPU and CUDA
// kernels: the per-(output, input channel) filter arithmetic (host and device)
// and the convolution around it (at::convolution: oneDNN on CPU, cuDNN on CUDA).
//
// Filter of one pair (o, i) from its 1-D taps b_n [N+1][K] and α[f, i, o]:
//   W[a][c] = Σ_f α_f b_l(f)[a] b_m(f)[c] = Σ_l b_l[a] u_l[c],
//   u_l[c] = Σ_(m <= N-l) α_f(l,m) b_m[c],
// (N+1)·K² + F·K multiply-adds instead of F·K². Pairs are in the published
// order: f(l, m) = l(N+1) - l(l-1)/2 + (N-l-m) (l = 0..N, m = N-l..0).
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <tuple>

#ifdef __CUDACC__
#define DCN_HOST_DEVICE __host__ __device__
#else
#define DCN_HOST_DEVICE
#endif

namespace dcn_fast {

// Largest kernel size any backend accepts (dcn_fast.basis.MAX_RADIUS = 64).
constexpr int64_t kMaxKernel = 129;

DCN_HOST_DEVICE inline int64_t pair_index(int64_t l, int64_t m, int64_t order) {
  return l * (order + 1) - l * (l - 1) / 2 + (order - l - m);
}

// u[c] = Σ_(m <= N-l) α_f(l,m) b_m[c] for one row tap l.
template <typename acc_t, typename scalar_t>
DCN_HOST_DEVICE inline void column_mix(const scalar_t* taps, const scalar_t* alpha, int64_t alpha_step,
                                       int64_t order, int64_t k, int64_t l, acc_t* u) {
  for (int64_t c = 0; c < k; ++c) u[c] = acc_t(0);
  for (int64_t m = 0; m <= order - l; ++m) {
    const acc_t a = static_cast<acc_t>(alpha[pair_index(l, m, order) * alpha_step]);
    for (int64_t c = 0; c < k; ++c) u[c] += a * static_cast<acc_t>(taps[m * k + c]);
  }
}

// W [K][K] of one pair. taps: [N+1][K] of that pair; alpha: α[0, i, o] with
// alpha_step between basis functions; u: scratch of K.
template <typename acc_t, typename scalar_t>
DCN_HOST_DEVICE inline void pair_filter(const scalar_t* taps, const scalar_t* alpha, int64_t alpha_step,
                                        int64_t order, int64_t k, acc_t* u, scalar_t* filter) {
  for (int64_t j = 0; j < k * k; ++j) filter[j] = scalar_t(0);
  for (int64_t l = 0; l <= order; ++l) {
    column_mix(taps, alpha, alpha_step, order, k, l, u);
    for (int64_t a = 0; a < k; ++a) {
      const acc_t row = static_cast<acc_t>(taps[l * k + a]);
      for (int64_t c = 0; c < k; ++c)
        filter[a * k + c] = static_cast<scalar_t>(static_cast<acc_t>(filter[a * k + c]) + row * u[c]);
    }
  }
}

// Gradients of one pair's filter: grad_alpha[f·alpha_step] = Σ_(a,c) gW[a][c] b_l[a] b_m[c] (written, if
// not null); grad_taps [N+1][K] += the pair's tap gradient (if not null):
//   row role    Σ_c gW[a][c] u_l[c]             for b_l[a],
//   column role Σ_(l <= N-m) α_f(l,m) p_l[c]    for b_m[c], p_l[c] = Σ_a b_l[a] gW[a][c].
// u and p: scratch of K each.
template <typename acc_t, typename scalar_t>
DCN_HOST_DEVICE inline void pair_filter_backward(const scalar_t* grad_filter, const scalar_t* taps,
                                                 const scalar_t* alpha, int64_t alpha_step, int64_t order, int64_t k,
                                                 acc_t* u, acc_t* p, scalar_t* grad_alpha, acc_t* grad_taps) {
  for (int64_t l = 0; l <= order; ++l) {
    for (int64_t c = 0; c < k; ++c) p[c] = acc_t(0);
    for (int64_t a = 0; a < k; ++a) {
      const acc_t row = static_cast<acc_t>(taps[l * k + a]);
      for (int64_t c = 0; c < k; ++c) p[c] += row * static_cast<acc_t>(grad_filter[a * k + c]);
    }
    for (int64_t m = 0; m <= order - l; ++m) {
      const int64_t f = pair_index(l, m, order);
      if (grad_alpha != nullptr) {
        acc_t sum = 0;
        for (int64_t c = 0; c < k; ++c) sum += p[c] * static_cast<acc_t>(taps[m * k + c]);
        grad_alpha[f * alpha_step] = static_cast<scalar_t>(sum);
      }
      if (grad_taps != nullptr) {
        const acc_t a = static_cast<acc_t>(alpha[f * alpha_step]);
        for (int64_t c = 0; c < k; ++c) grad_taps[m * k + c] += a * p[c];
      }
    }
    if (grad_taps != nullptr) {
      column_mix(taps, alpha, alpha_step, order, k, l, u);
      for (int64_t a = 0; a < k; ++a) {
        acc_t sum = 0;
        for (int64_t c = 0; c < k; ++c) sum += static_cast<acc_t>(grad_filter[a * k + c]) * u[c];
        grad_taps[l * k + a] += sum;
      }
    }
  }
}

// Shapes of one dense call. taps: [T_o, T_i, N+1, K], T_o in {1, C_out}, T_i in {1, C_in/groups}
// (one σ per layer, per output channel or per pair); alpha: [F, C_in/groups, C_out].
struct DenseShape {
  int64_t c_out, c_in_g, taps_out, taps_in, order, k;
  DCN_HOST_DEVICE int64_t taps_of(int64_t o, int64_t i) const {
    return ((taps_out == 1 ? 0 : o) * taps_in + (taps_in == 1 ? 0 : i)) * (order + 1) * k;
  }
};

inline DenseShape dense_shape(const at::Tensor& taps, const at::Tensor& alpha) {
  TORCH_CHECK(taps.dim() == 4 && taps.size(3) % 2 == 1 && taps.size(3) <= kMaxKernel,
              "srf_dense: taps must be [T_o, T_i, order+1, K] with K odd and <= ", kMaxKernel, ", got ",
              taps.sizes());
  TORCH_CHECK(alpha.dim() == 3, "srf_dense: alpha must be [F, C_in/groups, C_out], got ", alpha.sizes());
  TORCH_CHECK(taps.scalar_type() == alpha.scalar_type(), "srf_dense: taps and alpha must share one dtype, got ",
              taps.scalar_type(), " and ", alpha.scalar_type());
  TORCH_CHECK(taps.device() == alpha.device(), "srf_dense: taps and alpha must be on one device");
  DenseShape s{alpha.size(2), alpha.size(1), taps.size(0), taps.size(1), taps.size(2) - 1, taps.size(3)};
  TORCH_CHECK(alpha.size(0) == (s.order + 1) * (s.order + 2) / 2, "srf_dense: alpha.size(0) must be F = ",
              (s.order + 1) * (s.order + 2) / 2, " for ", s.order + 1, " tap rows, got ", alpha.size(0));
  TORCH_CHECK(s.taps_out == 1 || s.taps_out == s.c_out, "srf_dense: taps.size(0) must be 1 or C_out = ", s.c_out,
              ", got ", s.taps_out);
  TORCH_CHECK(s.taps_in == 1 || s.taps_in == s.c_in_g, "srf_dense: taps.size(1) must be 1 or C_in/groups = ",
              s.c_in_g, ", got ", s.taps_in);
  return s;
}

// The filter step, implemented per device (csrc/cpu/srf_dense_kernel.cpp, csrc/cuda/srf_dense_kernel.cu):
// [C_out, C_in/groups, K, K] from taps and alpha (contiguous).
using FilterFn = at::Tensor (*)(const at::Tensor& taps, const at::Tensor& alpha);
// (grad_taps [T_o, T_i, N+1, K], grad_alpha) from the filter's gradient; undefined where not asked.
using FilterBackwardFn = std::tuple<at::Tensor, at::Tensor> (*)(const at::Tensor& grad_filter, const at::Tensor& taps,
                                                                const at::Tensor& alpha, bool need_taps,
                                                                bool need_alpha);

inline void check_conv_args(const at::Tensor& input, const at::Tensor& taps, const at::Tensor& alpha,
                            at::IntArrayRef stride, at::IntArrayRef padding, int64_t groups) {
  TORCH_CHECK(input.dim() == 4, "srf_dense_conv2d: input must be 4-D [B, C_in, H, W], got ", input.sizes());
  TORCH_CHECK(input.scalar_type() == taps.scalar_type(), "srf_dense_conv2d: input, taps and alpha must share one "
              "dtype, got ", input.scalar_type(), " and ", taps.scalar_type());
  TORCH_CHECK(groups >= 1 && alpha.dim() == 3 && alpha.size(1) * groups == input.size(1) &&
                  alpha.size(2) % groups == 0,
              "srf_dense_conv2d: alpha [F, C_in/groups, C_out] = ", alpha.sizes(), " does not fit ", input.size(1),
              " input channels in ", groups, " groups");
  TORCH_CHECK(stride.size() == 2 && stride[0] >= 1 && stride[1] >= 1, "srf_dense_conv2d: stride must be >= 1");
  TORCH_CHECK(padding.size() == 2 && padding[0] >= 0 && padding[1] >= 0, "srf_dense_conv2d: padding must be >= 0");
}

// Forward: filter, then one convolution (bias fused into it).
inline at::Tensor dense_conv2d(FilterFn make_filter, const at::Tensor& input, const at::Tensor& taps,
                               const at::Tensor& alpha, const c10::optional<at::Tensor>& bias,
                               at::IntArrayRef stride, at::IntArrayRef padding, int64_t groups) {
  check_conv_args(input, taps, alpha, stride, padding, groups);
  const at::Tensor filter = make_filter(taps.contiguous(), alpha.contiguous());
  return at::convolution(input, filter, bias, stride, padding, /*dilation=*/{1, 1}, /*transposed=*/false,
                         /*output_padding=*/{0, 0}, groups);
}

// Backward: the filter again (cheaper than keeping it), at::convolution_backward for the gradients
// asked for, then the filter-gradient kernel. output_mask: (input, taps, alpha).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> dense_conv2d_backward(
    FilterFn make_filter, FilterBackwardFn filter_backward, const at::Tensor& grad_output, const at::Tensor& input,
    const at::Tensor& taps_, const at::Tensor& alpha_, at::IntArrayRef stride, at::IntArrayRef padding,
    int64_t groups, std::array<bool, 3> output_mask) {
  check_conv_args(input, taps_, alpha_, stride, padding, groups);
  const auto [need_input, need_taps, need_alpha] = output_mask;
  const at::Tensor taps = taps_.contiguous(), alpha = alpha_.contiguous();
  const at::Tensor filter = make_filter(taps, alpha);
  const bool need_filter = need_taps || need_alpha;
  auto [grad_input, grad_filter, unused_bias] = at::convolution_backward(
      grad_output, input, filter, /*bias_sizes=*/c10::nullopt, stride, padding, /*dilation=*/{1, 1},
      /*transposed=*/false, /*output_padding=*/{0, 0}, groups, {need_input, need_filter, false});
  at::Tensor grad_taps, grad_alpha;
  if (need_filter) std::tie(grad_taps, grad_alpha) = filter_backward(grad_filter.contiguous(), taps, alpha,
                                                                     need_taps, need_alpha);
  return {need_input ? grad_input : at::Tensor(), grad_taps, grad_alpha};
}

}  // namespace dcn_fast
