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
from .basis import pair_index
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


def _forward(input, taps, alpha, bias, shift, stride, padding, groups):
    input = input.contiguous()
    if _compiled(input.device):
        out = torch.ops.dcn_fast.srf_dense_conv2d(input, taps, alpha, bias, stride, padding, groups)
    else:
        out = F.conv2d(input, dense_filter(taps, alpha), bias, stride=stride, padding=padding, groups=groups)
    return ops.add_shift(out, shift)


def _backward(grad_output, input, taps, alpha, stride, padding, groups, mask):
    need_input, need_taps, need_alpha = mask
    if _compiled(input.device):
        return torch.ops.dcn_fast.srf_dense_conv2d_backward(
            grad_output, input, taps, alpha, stride, padding, groups, list(mask)
        )
    grad_input, grad_filter, _ = torch.ops.aten.convolution_backward(
        grad_output, input, dense_filter(taps, alpha), None, stride, padding, [1, 1], False, [0, 0], groups,
        [need_input, need_taps or need_alpha, False],
    )
    if not (need_taps or need_alpha):
        return grad_input, None, None
    return (grad_input, *_filter_backward_torch(grad_filter, taps, alpha, need_taps, need_alpha))


def _filter_backward_torch(grad_filter, taps, alpha, need_taps, need_alpha):
    """(grad_taps, grad_alpha) of :func:`dense_filters` with PyTorch ops (the kernels' fallback; the op runs
    below autograd, so the filter's own autograd is not available here)."""
    order = taps.shape[2] - 1
    rows, cols = pair_index(order, taps.device)
    c_out, c_in_g = alpha.shape[2], alpha.shape[1]
    basis_rows, basis_cols = taps[..., rows, :], taps[..., cols, :]  # [T_o, T_i, F, K]
    grad_alpha = grad_taps = None
    if need_alpha:
        basis = (basis_rows[..., :, None] * basis_cols[..., None, :]).expand(c_out, c_in_g, *basis_rows.shape[2:],
                                                                             taps.shape[3])
        grad_alpha = torch.einsum("oiac,oifac->fio", grad_filter, basis)
    if need_taps:
        # Per pair and basis function: α[f, i, o] · gW[o, i], summed over the pairs that share a tap set.
        grad_basis = torch.einsum("fio,oiac->oifac", alpha, grad_filter)
        grad_basis = grad_basis.sum(0, keepdim=True) if taps.shape[0] == 1 else grad_basis
        grad_basis = grad_basis.sum(1, keepdim=True) if taps.shape[1] == 1 else grad_basis
        grad_rows = torch.einsum("...fac,...fc->...fa", grad_basis, basis_cols)
        grad_cols = torch.einsum("...fac,...fa->...fc", grad_basis, basis_rows)
        grad_taps = torch.zeros_like(taps).index_add_(2, rows, grad_rows).index_add_(2, cols, grad_cols)
    return grad_taps, grad_alpha


ops.register_algorithm("dense", ops.Algorithm(_forward, _backward, devices=("cpu", "cuda"), any_taps=True))
