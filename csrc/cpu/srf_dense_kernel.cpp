// CPU kernels of dcn_fast::srf_dense_conv2d: the dense filter from taps and α,
// its gradient back to them (csrc/srf_dense.h), and the op's CPU registration.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../srf_dense.h"

namespace dcn_fast {
namespace {

at::Tensor dense_filter_cpu(const at::Tensor& taps, const at::Tensor& alpha) {
  const DenseShape s = dense_shape(taps, alpha);
  at::Tensor filter = at::empty({s.c_out, s.c_in_g, s.k, s.k}, taps.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, taps.scalar_type(), "srf_dense_filter_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* t = taps.const_data_ptr<scalar_t>();
    const scalar_t* a = alpha.const_data_ptr<scalar_t>();
    scalar_t* w = filter.mutable_data_ptr<scalar_t>();
    const int64_t alpha_step = s.c_in_g * s.c_out;
    at::parallel_for(0, s.c_out * s.c_in_g, 16, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> u(s.k);
      for (int64_t pair = begin; pair < end; ++pair) {
        const int64_t o = pair / s.c_in_g, i = pair % s.c_in_g;
        pair_filter<acc_t>(t + s.taps_of(o, i), a + i * s.c_out + o, alpha_step, s.order, s.k, u.data(),
                           w + pair * s.k * s.k);
      }
    });
  });
  return filter;
}

// Each tap set's gradient is summed over its pairs in pair order, whatever the
// thread count: parallel over tap sets (for taps shared by the layer, over the
// output channels, then a sequential sum over them).
std::tuple<at::Tensor, at::Tensor> dense_filter_backward_cpu(const at::Tensor& grad_filter, const at::Tensor& taps,
                                                             const at::Tensor& alpha, bool need_taps,
                                                             bool need_alpha) {
  const DenseShape s = dense_shape(taps, alpha);
  TORCH_CHECK(grad_filter.sizes() == at::IntArrayRef({s.c_out, s.c_in_g, s.k, s.k}),
              "srf_dense_filter_backward: grad_filter has shape ", grad_filter.sizes());
  at::Tensor grad_alpha = need_alpha ? at::empty_like(alpha) : at::Tensor();
  at::Tensor grad_taps = need_taps ? at::empty_like(taps) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, taps.scalar_type(), "srf_dense_filter_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gw = grad_filter.const_data_ptr<scalar_t>();
    const scalar_t* t = taps.const_data_ptr<scalar_t>();
    const scalar_t* a = alpha.const_data_ptr<scalar_t>();
    scalar_t* ga = need_alpha ? grad_alpha.mutable_data_ptr<scalar_t>() : nullptr;
    const int64_t alpha_step = s.c_in_g * s.c_out, tap_size = (s.order + 1) * s.k;
    // Per output channel, the tap gradient of its pairs ([T_i, N+1, K]).
    const int64_t per_out = need_taps ? s.taps_in * tap_size : 0;
    std::vector<acc_t> partial(s.c_out * per_out, acc_t(0));
    at::parallel_for(0, s.c_out, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> u(s.k), p(s.k);
      for (int64_t o = begin; o < end; ++o)
        for (int64_t i = 0; i < s.c_in_g; ++i)
          pair_filter_backward<acc_t>(gw + (o * s.c_in_g + i) * s.k * s.k, t + s.taps_of(o, i),
                                      a + i * s.c_out + o, alpha_step, s.order, s.k, u.data(), p.data(),
                                      ga == nullptr ? nullptr : ga + i * s.c_out + o,
                                      need_taps ? partial.data() + o * per_out + (s.taps_in == 1 ? 0 : i) * tap_size
                                                : nullptr);
    });
    if (need_taps) {
      scalar_t* gt = grad_taps.mutable_data_ptr<scalar_t>();
      if (s.taps_out == s.c_out) {
        for (int64_t j = 0; j < s.c_out * per_out; ++j) gt[j] = static_cast<scalar_t>(partial[j]);
      } else {
        for (int64_t j = 0; j < per_out; ++j) {
          acc_t sum = 0;
          for (int64_t o = 0; o < s.c_out; ++o) sum += partial[o * per_out + j];
          gt[j] = static_cast<scalar_t>(sum);
        }
      }
    }
  });
  return {grad_taps, grad_alpha};
}

at::Tensor srf_dense_conv2d_cpu(const at::Tensor& input, const at::Tensor& taps, const at::Tensor& alpha,
                                const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                at::IntArrayRef padding, int64_t groups) {
  return dense_conv2d(&dense_filter_cpu, input, taps, alpha, bias, stride, padding, groups);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> srf_dense_conv2d_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& taps, const at::Tensor& alpha,
    at::IntArrayRef stride, at::IntArrayRef padding, int64_t groups, std::array<bool, 3> output_mask) {
  return dense_conv2d_backward(&dense_filter_cpu, &dense_filter_backward_cpu, grad_output, input, taps, alpha, stride,
                               padding, groups, output_mask);
}

std::tuple<at::Tensor, at::Tensor> srf_dense_filter_backward_cpu(const at::Tensor& grad_filter,
                                                                 const at::Tensor& taps, const at::Tensor& alpha,
                                                                 std::array<bool, 2> output_mask) {
  return dense_filter_backward_cpu(grad_filter.contiguous(), taps.contiguous(), alpha.contiguous(), output_mask[0],
                                   output_mask[1]);
}

at::Tensor srf_dense_filter_cpu(const at::Tensor& taps, const at::Tensor& alpha) {
  return dense_filter_cpu(taps.contiguous(), alpha.contiguous());
}

}  // namespace

TORCH_LIBRARY_IMPL(dcn_fast, CPU, m) {
  m.impl("srf_dense_filter", &srf_dense_filter_cpu);
  m.impl("srf_dense_filter_backward", &srf_dense_filter_backward_cpu);
  m.impl("srf_dense_conv2d", &srf_dense_conv2d_cpu);
  m.impl("srf_dense_conv2d_backward", &srf_dense_conv2d_backward_cpu);
}

}  // namespace dcn_fast
