"""Separable-basis SRF convolution in plain PyTorch, with analytic gradients.

``y_o = Σ_i Σ_f α[f,i,o] (x_i ⋆ B_f)`` with ``B_(l,m) = b_l ⊗ b_m``: one 1-D
pass along H with b_0..b_N, one pass along W per basis pair, then one GEMM
(a 1x1 convolution) with α (DESIGN.md §2), each a single grouped convolution.
The backward recomputes the basis responses rather than saving them: the op
keeps only ``input``, ``taps`` (derived from σ, ``[N+1, K]``) and ``alpha``.
This is the portable fallback of the compiled backends; ``dense_srf_conv2d``
here serves the scale layouts whose basis is not shared (one σ per output
channel, σ^ji).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.grad import conv2d_input, conv2d_weight

from .basis import basis_from_taps, pair_index

__all__ = ["separable_srf_conv2d", "dense_srf_conv2d", "dense_filters"]


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


class _SeparableSRFConv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, taps, alpha, order, stride, padding, groups):
        weights = _Weights(taps, alpha, order, input.shape[1], groups)
        _, _, responses = _passes(input, weights, stride, padding)
        ctx.save_for_backward(input, taps, alpha)
        ctx.geometry = (order, stride, padding, groups)
        return F.conv2d(responses, weights.mix, groups=groups)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        input, taps, alpha = ctx.saved_tensors
        order, stride, (ph, pw), groups = ctx.geometry
        need_input, need_taps, need_alpha = ctx.needs_input_grad[:3]
        grad_input = grad_taps = grad_alpha = None
        channels = input.shape[1]
        weights = _Weights(taps, alpha, order, channels, groups)
        xp_t, along_h, responses = _passes(input, weights, stride, padding=(ph, pw))

        if need_alpha:
            grad_mix = conv2d_weight(responses, weights.mix.shape, grad_out, groups=groups)
            grad_alpha = grad_mix.reshape(alpha.shape[2], alpha.shape[1], alpha.shape[0]).permute(2, 1, 0)
        if not (need_input or need_taps):
            return grad_input, grad_taps, grad_alpha, None, None, None, None

        grad_resp = conv2d_input(responses.shape, weights.mix, grad_out, groups=groups)
        grad_along_h = conv2d_input(along_h.shape, weights.along_w, grad_resp, stride=(1, stride[1]), groups=channels)
        grad_along_h_t = grad_along_h.transpose(-1, -2).contiguous()
        if need_taps:
            order1, k = taps.shape
            grad_pick = conv2d_weight(
                along_h, weights.along_w.shape, grad_resp, stride=(1, stride[1]), groups=channels
            ).reshape(channels, -1, order1, k).sum(0)
            grad_h = conv2d_weight(
                xp_t, weights.along_h.shape, grad_along_h_t, stride=(1, stride[0]), groups=channels
            ).reshape(channels, order1, k).sum(0)
            n_basis = weights.rows.numel()
            grad_w = grad_pick[torch.arange(n_basis, device=taps.device), weights.rows]
            grad_taps = grad_h.index_add(0, weights.cols, grad_w)
        if need_input:
            grad_xp_t = conv2d_input(
                xp_t.shape, weights.along_h, grad_along_h_t, stride=(1, stride[0]), groups=channels
            )
            wp, hp = xp_t.shape[-2:]
            grad_input = grad_xp_t.transpose(-1, -2)[:, :, ph : hp - ph, pw : wp - pw].contiguous()
        return grad_input, grad_taps, grad_alpha, None, None, None, None


def separable_srf_conv2d(
    input: torch.Tensor,
    taps: torch.Tensor,
    alpha: torch.Tensor,
    order: int,
    stride: tuple[int, int],
    padding: tuple[int, int],
    groups: int,
) -> torch.Tensor:
    """Separable SRF convolution with one shared basis.

    Args:
        input: ``[B, C_in, H, W]``.
        taps: 1-D taps ``[order+1, K]`` (see :func:`dcn_fast.basis.srf_taps`).
        alpha: ``[F, C_in/groups, C_out]``.
    Returns:
        ``[B, C_out, Ho, Wo]``, cross-correlation with zero padding ``padding``.
    """
    return _SeparableSRFConv2d.apply(input, taps, alpha, order, stride, padding, groups)


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


def dense_srf_conv2d(
    input: torch.Tensor,
    taps: torch.Tensor,
    alpha: torch.Tensor,
    order: int,
    stride: tuple[int, int],
    padding: tuple[int, int],
    groups: int,
) -> torch.Tensor:
    """SRF convolution through the dense filter, for taps that differ per channel.

    ``taps`` is ``[C_out, 1 or C_in/groups, order+1, K]``; the filter is built
    by :func:`dense_filters` and convolved densely. Gradients of x and α come
    from ``conv2d``/``einsum``, the σ gradient from the analytic tap gradient.
    """
    return F.conv2d(input, dense_filters(taps, alpha, order), stride=stride, padding=padding, groups=groups)
