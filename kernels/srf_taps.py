"""Triton kernel of the SRF taps: σ → taps and ∂taps/∂scale in one launch.

Built from σ by plain PyTorch the taps cost ~45 small kernels (and as many
launches) per layer call, the published construction's bottleneck. Here one
program per σ evaluates the whole column: the (truncated, normalised)
Gaussian, the Hermite recursion up to ``ORDER`` and, alongside, the
closed-form derivative of every tap with respect to the log2 scale
(``dcn_fast.basis``, DESIGN.md §2), so the backward is one product-sum.
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl

from dcn_fast.basis import DOUBLE_BACKWARD_ERROR, RADIUS_SLACK
from .srf_conv2d import _pow2

__all__ = ["srf_taps_triton"]


@triton.jit
def _srf_taps_kernel(
    scale_ptr,  # [S] float32: log2 σ
    taps_ptr,  # [S, ORDER+1, K] float32
    dtaps_ptr,  # [S, ORDER+1, K] float32: ∂taps/∂scale
    truncate,
    slack,  # dcn_fast.basis.RADIUS_SLACK
    RADIUS: tl.constexpr, K_PAD: tl.constexpr, ORDER: tl.constexpr, TRUNCATE: tl.constexpr,
):
    pid = tl.program_id(0)
    k: tl.constexpr = 2 * RADIUS + 1
    sigma = tl.exp2(tl.load(scale_ptr + pid).to(tl.float32))
    idx = tl.arange(0, K_PAD)
    inside = idx < k
    x = (idx - RADIUS).to(tl.float32)
    g = tl.exp(-(x * x) / (2 * sigma * sigma))
    if TRUNCATE:  # past σ's own radius the taps are zero (a radius bound larger than needed is exact)
        reach = truncate * sigma + 0.5
        inside = inside & (tl.abs(x) <= tl.ceil(reach))
        # A σ wider than the layout (a stale radius) gives NaN taps, never silently truncated ones.
        g = tl.where(reach > RADIUS + slack, float("nan"), g)
    g = tl.where(inside, g, 0.0)
    g_hat = g / tl.sum(g, axis=0)
    u = x / (1.4142135623730951 * sigma)
    d_g_hat = g_hat * (x * x - tl.sum(g_hat * x * x, axis=0)) / (sigma * sigma * sigma)
    to_scale = sigma * 0.6931471805599453  # dσ/dscale
    hermite_prev = tl.zeros_like(x)  # H_{n-1}
    hermite = tl.full((K_PAD,), 1.0, tl.float32)  # H_n
    sign = 1.0  # (-1/√2)^n
    out = pid * (ORDER + 1) * k + idx
    for n in tl.static_range(ORDER + 1):
        tl.store(taps_ptr + out + n * k, sign * hermite * g_hat, mask=idx < k)
        d_tap = hermite * d_g_hat - 2 * n * hermite_prev * (u / sigma) * g_hat
        tl.store(dtaps_ptr + out + n * k, sign * d_tap * to_scale, mask=idx < k)
        hermite, hermite_prev = 2 * u * hermite - 2 * n * hermite_prev, hermite
        sign = sign * -0.7071067811865476


class _SRFTapsTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scale, order, radius, truncate):
        flat = scale.detach().reshape(-1).contiguous()
        taps = torch.empty(flat.numel(), order + 1, 2 * radius + 1, device=scale.device, dtype=torch.float32)
        dtaps = torch.empty_like(taps)
        _srf_taps_kernel[(flat.numel(),)](
            flat, taps, dtaps, truncate if truncate is not None else 0.0, RADIUS_SLACK,
            RADIUS=radius, K_PAD=_pow2(2 * radius + 1), ORDER=order, TRUNCATE=truncate is not None,
        )
        ctx.save_for_backward(dtaps)
        ctx.scale_shape = scale.shape
        return taps.reshape(*scale.shape, order + 1, 2 * radius + 1)

    @staticmethod
    def backward(ctx, grad_taps):
        if torch.is_grad_enabled():  # as dcn_fast.basis: a second derivative in σ would silently be zero
            raise RuntimeError(DOUBLE_BACKWARD_ERROR)
        (dtaps,) = ctx.saved_tensors
        return (grad_taps.reshape(dtaps.shape) * dtaps).sum((1, 2)).reshape(ctx.scale_shape), None, None, None


def srf_taps_triton(scale: torch.Tensor, order: int, radius: int, truncate: float | None) -> torch.Tensor:
    """:func:`dcn_fast.basis.srf_taps` for float32 ``scale`` in one Triton launch (same contract)."""
    if scale.dtype != torch.float32:
        raise ValueError(f"srf_taps_triton computes in float32, got scale of dtype {scale.dtype}")
    return _SRFTapsTriton.apply(scale, order, radius, truncate)
