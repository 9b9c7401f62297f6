// Schemas of the dcn_fast SRF convolution. Backends register kernels under
// these names: csrc/cpu/srf_conv2d_kernel.cpp (CPU); the fake kernel and the
// autograd formula are registered from dcn_fast/ops.py.
#include <torch/library.h>

TORCH_LIBRARY(dcn_fast, m) {
  // input [B, C_in, H, W], taps [N+1, K] (1-D Gaussian-derivative taps),
  // alpha [F, C_in/groups, C_out] -> [B, C_out, Ho, Wo].
  m.def(
      "srf_conv2d(Tensor input, Tensor taps, Tensor alpha, int[2] stride, "
      "int[2] padding, int groups) -> Tensor");
  // Gradients of (input, taps, alpha); an entry whose mask is false is
  // returned undefined (None), as in aten::convolution_backward.
  m.def(
      "srf_conv2d_backward(Tensor grad_output, Tensor input, Tensor taps, "
      "Tensor alpha, int[2] stride, int[2] padding, int groups, bool[3] "
      "output_mask) -> (Tensor, Tensor, Tensor)");
}
