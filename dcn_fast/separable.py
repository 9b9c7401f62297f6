"""Separable-basis SRF convolution in plain PyTorch, with analytic gradients.

``y_o = Σ_i Σ_f α[f,i,o] (x_i ⋆ B_f)`` with ``B_(l,m) = b_l ⊗ b_m``: one 1-D
pass along W with b_0..b_N, one pass along H per basis pair, then one GEMM
(DESIGN.md §2). The backward recomputes the basis responses rather than saving
them: the op keeps only ``input``, ``taps`` (derived from σ, ``[N+1, K]``) and
``alpha``. This is the portable fallback of the compiled backends, and the
``dense`` helper here serves the scale layouts whose basis is not shared
(one σ per output channel, σ^ji).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.grad import conv2d_input, conv2d_weight

from .basis import basis_from_taps, basis_pairs

__all__ = ["separable_srf_conv2d", "dense_srf_conv2d"]


def _pair_index(order: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    pairs = basis_pairs(order)
    rows = torch.tensor([l for l, _ in pairs], device=device)
    cols = torch.tensor([m for _, m in pairs], device=device)
    return rows, cols


def _passes(xp, taps, order, stride):
    """Basis responses of the padded input.

    Returns the W-pass outputs selected per basis function ``[B*C, F, Hp, Wo]``
    and the responses ``[B*C, F, Ho, Wo]``.
    """
    batch, channels, hp, wp = xp.shape
    order1, k = taps.shape
    rows, cols = _pair_index(order, taps.device)
    along_w = F.conv2d(xp.reshape(batch * channels, 1, hp, wp), taps.reshape(order1, 1, 1, k), stride=(1, stride[1]))
    selected = along_w.index_select(1, cols)
    responses = F.conv2d(selected, taps[rows].reshape(-1, 1, k, 1), stride=(stride[0], 1), groups=rows.numel())
    return selected, responses


class _SeparableSRFConv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, taps, alpha, order, stride, padding, groups):
        ph, pw = padding
        xp = F.pad(input, (pw, pw, ph, ph))
        _, responses = _passes(xp, taps, order, stride)
        batch, c_in = input.shape[:2]
        n_basis, c_in_g, c_out = alpha.shape
        ho, wo = responses.shape[-2:]
        responses = responses.reshape(batch, groups, c_in_g, n_basis, ho * wo)
        a = alpha.reshape(n_basis, c_in_g, groups, c_out // groups)
        out = torch.einsum("bgifp,figo->bgop", responses, a)
        ctx.save_for_backward(input, taps, alpha)
        ctx.geometry = (order, stride, padding, groups)
        return out.reshape(batch, c_out, ho, wo)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        input, taps, alpha = ctx.saved_tensors
        order, stride, (ph, pw), groups = ctx.geometry
        need_input, need_taps, need_alpha = ctx.needs_input_grad[:3]
        grad_input = grad_taps = grad_alpha = None

        xp = F.pad(input, (pw, pw, ph, ph))
        selected, responses = _passes(xp, taps, order, stride)
        batch, c_in, hp, wp = xp.shape
        n_basis, c_in_g, c_out = alpha.shape
        order1, k = taps.shape
        ho, wo = responses.shape[-2:]
        gy = grad_out.reshape(batch, groups, c_out // groups, ho * wo)
        a = alpha.reshape(n_basis, c_in_g, groups, c_out // groups)

        if need_alpha:
            grad_alpha = torch.einsum(
                "bgop,bgifp->figo", gy, responses.reshape(batch, groups, c_in_g, n_basis, ho * wo)
            ).reshape(alpha.shape)
        if need_input or need_taps:
            rows, cols = _pair_index(order, taps.device)
            grad_resp = torch.einsum("figo,bgop->bgifp", a, gy).reshape(batch * c_in, n_basis, ho, wo)
            w_h = taps[rows].reshape(n_basis, 1, k, 1)
            grad_selected = conv2d_input(selected.shape, w_h, grad_resp, stride=(stride[0], 1), groups=n_basis)
            grad_along_w = grad_selected.new_zeros(batch * c_in, order1, hp, wo).index_add_(1, cols, grad_selected)
            w_w = taps.reshape(order1, 1, 1, k)
            if need_taps:
                grad_h = conv2d_weight(selected, w_h.shape, grad_resp, stride=(stride[0], 1), groups=n_basis)
                grad_w = conv2d_weight(xp.reshape(-1, 1, hp, wp), w_w.shape, grad_along_w, stride=(1, stride[1]))
                grad_taps = grad_w.reshape(order1, k).index_add(0, rows, grad_h.reshape(n_basis, k))
            if need_input:
                grad_xp = conv2d_input((batch * c_in, 1, hp, wp), w_w, grad_along_w, stride=(1, stride[1]))
                grad_input = grad_xp.reshape(batch, c_in, hp, wp)[:, :, ph : hp - ph, pw : wp - pw]
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

    ``taps`` is ``[C_out, 1 or C_in/groups, order+1, K]``; the filter
    ``W[o,i] = Σ_f α[f,i,o] B_f^(o,i)`` is built by one einsum and convolved
    densely. Gradients of x and α come from ``conv2d``/``einsum``, the σ
    gradient from the analytic tap gradient.
    """
    basis = basis_from_taps(taps, order)  # [C_out, 1|C_in_g, F, K, K]
    basis = basis.expand(alpha.shape[2], alpha.shape[1], *basis.shape[2:])
    weight = torch.einsum("fio,oifhw->oihw", alpha, basis)
    return F.conv2d(input, weight, stride=stride, padding=padding, groups=groups)
