// CUDA kernels of dcn_fast::srf_dense_conv2d: the dense filter from taps and α
// in one launch (a thread per (output, input channel) pair), its gradient in
// one launch plus a fixed-order sum over the output channels (deterministic),
// then cuDNN through at::convolution (csrc/srf_dense.h).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../srf_dense.h"

namespace dcn_fast {
namespace {

constexpr int kThreads = 128;

int64_t blocks_for(int64_t n) { return (n + kThreads - 1) / kThreads; }

template <typename scalar_t>
__global__ void dense_filter_kernel(const scalar_t* __restrict__ taps, const scalar_t* __restrict__ alpha,
                                    scalar_t* __restrict__ filter, DenseShape s) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t pair = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (pair >= s.c_out * s.c_in_g) return;
  const int64_t o = pair / s.c_in_g, i = pair % s.c_in_g;
  acc_t u[kMaxKernel];
  pair_filter<acc_t>(taps + s.taps_of(o, i), alpha + i * s.c_out + o, s.c_in_g * s.c_out, s.order, s.k, u,
                     filter + pair * s.k * s.k);
}

// partial [C_out, T_i, N+1, K]: output channel o's share of the tap gradient (zero-initialised).
template <typename scalar_t>
__global__ void dense_filter_backward_kernel(const scalar_t* __restrict__ grad_filter,
                                             const scalar_t* __restrict__ taps, const scalar_t* __restrict__ alpha,
                                             scalar_t* __restrict__ grad_alpha,
                                             at::opmath_type<scalar_t>* __restrict__ partial, DenseShape s) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t pair = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (pair >= s.c_out * s.c_in_g) return;
  const int64_t o = pair / s.c_in_g, i = pair % s.c_in_g;
  const int64_t tap_size = (s.order + 1) * s.k;
  acc_t u[kMaxKernel], p[kMaxKernel];
  // With taps shared across input channels, the pairs of one output channel add into one
  // partial: only the pair i = 0 thread does it, over i in order (no atomics).
  if (partial != nullptr && s.taps_in == 1) {
    if (i == 0)
      for (int64_t j = 0; j < s.c_in_g; ++j)
        pair_filter_backward<acc_t>(grad_filter + (o * s.c_in_g + j) * s.k * s.k, taps + s.taps_of(o, j),
                                    alpha + j * s.c_out + o, s.c_in_g * s.c_out, s.order, s.k, u, p,
                                    (scalar_t*)nullptr, partial + o * tap_size);
    if (grad_alpha == nullptr) return;
    partial = nullptr;
  }
  pair_filter_backward<acc_t>(grad_filter + pair * s.k * s.k, taps + s.taps_of(o, i), alpha + i * s.c_out + o,
                              s.c_in_g * s.c_out, s.order, s.k, u, p,
                              grad_alpha == nullptr ? nullptr : grad_alpha + i * s.c_out + o,
                              partial == nullptr ? nullptr : partial + (o * s.taps_in + i) * tap_size);
}

at::Tensor dense_filter_cuda(const at::Tensor& taps, const at::Tensor& alpha) {
  const DenseShape s = dense_shape(taps, alpha);
  const c10::cuda::CUDAGuard guard(taps.device());
  at::Tensor filter = at::empty({s.c_out, s.c_in_g, s.k, s.k}, taps.options());
  const int64_t pairs = s.c_out * s.c_in_g;
  if (pairs == 0) return filter;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, taps.scalar_type(), "srf_dense_filter_cuda", [&] {
    dense_filter_kernel<scalar_t><<<blocks_for(pairs), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        taps.const_data_ptr<scalar_t>(), alpha.const_data_ptr<scalar_t>(), filter.mutable_data_ptr<scalar_t>(), s);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return filter;
}

std::tuple<at::Tensor, at::Tensor> dense_filter_backward_cuda(const at::Tensor& grad_filter, const at::Tensor& taps,
                                                              const at::Tensor& alpha, bool need_taps,
                                                              bool need_alpha) {
  const DenseShape s = dense_shape(taps, alpha);
  TORCH_CHECK(grad_filter.sizes() == at::IntArrayRef({s.c_out, s.c_in_g, s.k, s.k}),
              "srf_dense_filter_backward: grad_filter has shape ", grad_filter.sizes());
  const c10::cuda::CUDAGuard guard(taps.device());
  at::Tensor grad_alpha = need_alpha ? at::empty_like(alpha) : at::Tensor();
  at::Tensor grad_taps;
  const int64_t pairs = s.c_out * s.c_in_g;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, taps.scalar_type(), "srf_dense_filter_backward_cuda",
                                  [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::Tensor partial;
    if (need_taps)
      partial = at::zeros({s.c_out, s.taps_in, s.order + 1, s.k},
                          taps.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    if (pairs > 0) {
      dense_filter_backward_kernel<scalar_t><<<blocks_for(pairs), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          grad_filter.const_data_ptr<scalar_t>(), taps.const_data_ptr<scalar_t>(), alpha.const_data_ptr<scalar_t>(),
          need_alpha ? grad_alpha.mutable_data_ptr<scalar_t>() : nullptr,
          need_taps ? partial.mutable_data_ptr<acc_t>() : nullptr, s);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    // PyTorch's CUDA sum reduces in a fixed order for a given shape: run to run identical.
    if (need_taps) grad_taps = (s.taps_out == 1 ? partial.sum(0, /*keepdim=*/true) : partial).to(taps.scalar_type());
  });
  return {grad_taps, grad_alpha};
}

at::Tensor srf_dense_filter_cuda(const at::Tensor& taps, const at::Tensor& alpha) {
  return dense_filter_cuda(taps.contiguous(), alpha.contiguous());
}

std::tuple<at::Tensor, at::Tensor> srf_dense_filter_backward_cuda(const at::Tensor& grad_filter,
                                                                  const at::Tensor& taps, const at::Tensor& alpha,
                                                                  std::array<bool, 2> output_mask) {
  return dense_filter_backward_cuda(grad_filter.contiguous(), taps.contiguous(), alpha.contiguous(), output_mask[0],
                                    output_mask[1]);
}

at::Tensor srf_dense_conv2d_cuda(const at::Tensor& input, const at::Tensor& taps, const at::Tensor& alpha,
                                 const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                 at::IntArrayRef padding, int64_t groups) {
  return dense_conv2d(&dense_filter_cuda, input, taps, alpha, bias, stride, padding, groups);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> srf_dense_conv2d_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& taps, const at::Tensor& alpha,
    at::IntArrayRef stride, at::IntArrayRef padding, int64_t groups, std::array<bool, 3> output_mask) {
  return dense_conv2d_backward(&dense_filter_cuda, &dense_filter_backward_cuda, grad_output, input, taps, alpha,
                               stride, padding, groups, output_mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(dcn_fast, CUDA, m) {
  m.impl("srf_dense_filter", &srf_dense_filter_cuda);
  m.impl("srf_dense_filter_backward", &srf_dense_filter_backward_cuda);
  m.impl("srf_dense_conv2d", &srf_dense_conv2d_cuda);
  m.impl("srf_dense_conv2d_backward", &srf_dense_conv2d_backward_cuda);
}

}  // namespace dcn_fast
