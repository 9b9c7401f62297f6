"""The ``dense`` algorithm: the dense filter from taps and α, then one convolution.

``W[o, i] = Σ_f α[f, i, o] · b_l(f) ⊗ b_m(f)`` (``[C_out, C_in/groups, K, K]``)
is built in one launch by the C++/CUDA kernel (``csrc/srf_dense.h``,
``csrc/cpu/srf_dense_kernel.cpp``, ``csrc/cuda/srf_dense_kernel.cu``) and
convolved by ``at::convolution`` (oneDNN on CPU, cuDNN on CUDA); the backward
is ``at::convolution_backward`` for the gradients asked for, then one kernel
from the filter's gradient to α's and the taps' (deterministic). It takes
taps per layer, per output channel or per (output, input) pair alike, so it
is also the algorithm of per-channel σ and σ^ji.

Where the kernels cannot be built (no compiler, no nvcc) the same algorithm
runs with the filter built by PyTorch ops (:func:`dense_filters`, one
warning from :mod:`dcn_fast.ops`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import ops
from .separable import dense_filters

__all__ = ["dense_filter"]


def _compiled(device: torch.device) -> bool:
    if device.type == "cpu":
        return ops.cpu_kernel_available()
    return device.type == "cuda" and ops.cuda_kernel_available()


def dense_filter(taps: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Filter ``[C_out, C_in/groups, K, K]`` from ``taps [T_o, T_i, N+1, K]`` and ``alpha [F, C_in/groups, C_out]``.

    Not differentiable (the op's autograd formula covers the whole convolution).
    """
    if _compiled(taps.device):
        return torch.ops.dcn_fast.srf_dense_filter(taps, alpha)
    return dense_filters(taps, alpha, taps.shape[2] - 1)


def _forward(input, taps, alpha, bias, stride, padding, groups):
    input = input.contiguous()
    if _compiled(input.device):
        return torch.ops.dcn_fast.srf_dense_conv2d(input, taps, alpha, bias, stride, padding, groups)
    return F.conv2d(input, dense_filter(taps, alpha), bias, stride=stride, padding=padding, groups=groups)


def _backward(grad_output, input, taps, alpha, stride, padding, groups, mask):
    need_input, need_taps, need_alpha = mask
    if _compiled(input.device):
        return torch.ops.dcn_fast.srf_dense_conv2d_backward(
            grad_output, input, taps, alpha, stride, padding, groups, list(mask)
        )
    with torch.enable_grad():  # the PyTorch filter's own autograd carries the filter gradient back
        leaves = [taps.detach().requires_grad_(need_taps), alpha.detach().requires_grad_(need_alpha)]
        filter = dense_filters(*leaves, taps.shape[2] - 1)
        grad_input, grad_filter, _ = torch.ops.aten.convolution_backward(
            grad_output, input, filter.detach(), None, stride, padding, [1, 1], False, [0, 0], groups,
            [need_input, need_taps or need_alpha, False],
        )
        wanted = [leaf for leaf in leaves if leaf.requires_grad]
        grads = iter(torch.autograd.grad(filter, wanted, grad_filter) if wanted else ())
    return grad_input, next(grads) if need_taps else None, next(grads) if need_alpha else None


ops.register_algorithm("dense", ops.Algorithm(_forward, _backward, devices=("cpu", "cuda"), any_taps=True))
