"""Separable-basis SRF convolution in plain PyTorch, with analytic gradients.

``y_o = Σ_i Σ_f α[f,i,o] (x_i ⋆ B_f)`` with ``B_(l,m) = b_l ⊗ b_m``: one 1-D
pass along H with b_0..b_N, one pass along W per basis pair, then one GEMM
(a 1x1 convolution) with α (DESIGN.md §2), each a single grouped convolution.
The backward recomputes the basis responses rather than saving them: the op
keeps only ``input``, ``taps`` (derived from σ) and ``alpha``. This is the
``separable`` algorithm of ``dcn_fast::srf_conv2d`` (one σ per layer), the
portable one: it runs wherever PyTorch's convolutions do, in any dtype.
:func:`dense_filters` builds dense filters with PyTorch ops (the ``dense``
algorithm's fallback and the modules' filter export).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.grad import conv2d_input, conv2d_weight

from . import ops
from .basis import basis_from_taps, pair_index

__all__ = ["dense_filters"]


class _Weights:
    """The three convolution weights of the separable algorithm, from taps and α.

    All passes run along the last (contiguous) dimension, where grouped
    convolutions are fastest: the H pass on the transposed padded input, then
    the W pass on its transposed output, then a 1x1 convolution with α.
    """

    def __init__(self, taps, alpha, order, channels, groups):
        order1, k = taps.shape
        n_basis, c_in_g, c_out = alpha.shape
        self.rows, self.cols = pair_index(order, taps.device)
        # H pass: every channel against b_0..b_N (output channel c*(N+1) + l).
        self.along_h = taps.repeat(channels, 1).reshape(channels * order1, 1, 1, k)
        # W pass: basis f = (l, m) takes H-pass output l and applies b_m
        # (output channel c*F + f), a grouped conv over each channel's N+1 maps.
        pick = taps.new_zeros(n_basis, order1, k)
        pick[torch.arange(n_basis, device=taps.device), self.rows] = taps[self.cols]
        self.along_w = pick.repeat(channels, 1, 1).reshape(channels * n_basis, order1, 1, k)
        # Mixing: out[o] = Σ_(i,f) α[f, i, o] · responses[i*F + f].
        self.mix = alpha.permute(2, 1, 0).reshape(c_out, c_in_g * n_basis, 1, 1)
        self.channels, self.groups = channels, groups


def _passes(x, weights, stride, padding):
    """Padded-transposed input, H-pass output (transposed back) and responses [B, C*F, Ho, Wo]."""
    ph, pw = padding
    xp_t = F.pad(x, (pw, pw, ph, ph)).transpose(-1, -2).contiguous()
    along_h = F.conv2d(xp_t, weights.along_h, stride=(1, stride[0]), groups=weights.channels)
    along_h = along_h.transpose(-1, -2).contiguous()  # [B, C*(N+1), Ho, Wp]
    responses = F.conv2d(along_h, weights.along_w, stride=(1, stride[1]), groups=weights.channels)
    return xp_t, along_h, responses


def _pass_shapes(shape, order1, n_basis, k, stride, padding):
    """Shapes of what :func:`_passes` returns (as empty meta tensors, only ``.shape`` is read)."""
    batch, channels, height, width = shape
    hp, wp = height + 2 * padding[0], width + 2 * padding[1]
    ho, wo = (hp - k) // stride[0] + 1, (wp - k) // stride[1] + 1
    meta = lambda *size: torch.empty(size, device="meta")  # noqa: E731
    return meta(batch, channels, wp, hp), meta(batch, channels * order1, ho, wp), meta(batch, channels * n_basis, ho, wo)


def _forward(input, taps, alpha, bias, shift, stride, padding, groups):
    taps = taps[0, 0]
    weights = _Weights(taps, alpha, taps.shape[0] - 1, input.shape[1], groups)
    _, _, responses = _passes(input, weights, stride, padding)
    return ops.add_shift(F.conv2d(responses, weights.mix, bias, groups=groups), shift)


def _backward(grad_out, input, taps, alpha, stride, padding, groups, mask):
    need_input, need_taps, need_alpha = mask
    grad_input = grad_taps = grad_alpha = None
    taps = taps[0, 0]
    order1, k = taps.shape
    channels = input.shape[1]
    weights = _Weights(taps, alpha, order1 - 1, channels, groups)
    ph, pw = padding
    if need_alpha or need_taps:
        xp_t, along_h, responses = _passes(input, weights, stride, padding)
    else:  # the input gradient needs the passes' shapes only (input may be a shape-only placeholder)
        xp_t, along_h, responses = _pass_shapes(input.shape, order1, alpha.shape[0], k, stride, padding)

    if need_alpha:
        grad_mix = conv2d_weight(responses, weights.mix.shape, grad_out, groups=groups)
        grad_alpha = grad_mix.reshape(alpha.shape[2], alpha.shape[1], alpha.shape[0]).permute(2, 1, 0).contiguous()
    if not (need_input or need_taps):
        return grad_input, grad_taps, grad_alpha

    grad_resp = conv2d_input(responses.shape, weights.mix, grad_out, groups=groups)
    grad_along_h = conv2d_input(along_h.shape, weights.along_w, grad_resp, stride=(1, stride[1]), groups=channels)
    grad_along_h_t = grad_along_h.transpose(-1, -2).contiguous()
    if need_taps:
        grad_pick = conv2d_weight(
            along_h, weights.along_w.shape, grad_resp, stride=(1, stride[1]), groups=channels
        ).reshape(channels, -1, order1, k).sum(0)
        grad_h = conv2d_weight(
            xp_t, weights.along_h.shape, grad_along_h_t, stride=(1, stride[0]), groups=channels
        ).reshape(channels, order1, k).sum(0)
        n_basis = weights.rows.numel()
        grad_w = grad_pick[torch.arange(n_basis, device=taps.device), weights.rows]
        grad_taps = grad_h.index_add(0, weights.cols, grad_w)[None, None]
    if need_input:
        grad_xp_t = conv2d_input(xp_t.shape, weights.along_h, grad_along_h_t, stride=(1, stride[0]), groups=channels)
        wp, hp = xp_t.shape[-2:]
        grad_input = grad_xp_t.transpose(-1, -2)[:, :, ph : hp - ph, pw : wp - pw].contiguous()
    return grad_input, grad_taps, grad_alpha


ops.register_algorithm("separable", ops.Algorithm(_forward, _backward, devices=("cpu", "cuda"), any_taps=False))


def dense_filters(taps: torch.Tensor, alpha: torch.Tensor, order: int) -> torch.Tensor:
    """Dense filters ``[C_out, C_in/groups, K, K]`` from taps and α.

    ``taps`` is ``[order+1, K]`` (one basis) or ``[C_out, 1 or C_in/groups, order+1, K]``;
    ``W[o,i] = Σ_f α[f,i,o] B_f^(o,i)``, differentiable in both.
    """
    if taps.dim() == 2:
        return torch.einsum("fio,fhw->oihw", alpha, basis_from_taps(taps, order))
    basis = basis_from_taps(taps, order)  # [C_out, 1|C_in_g, F, K, K]
    basis = basis.expand(alpha.shape[2], alpha.shape[1], *basis.shape[2:])
    return torch.einsum("fio,oifhw->oihw", alpha, basis)
