"""The published SRF construction: dense filters, then one ``F.conv2d``.

This is the oracle every other backend is tested against, and the ``reference``
backend. It follows the published ``gaussian_basis_filters_shared`` step by
step (Gaussian on integer offsets, normalised by its discrete sum, Hermite
polynomials, outer products, einsum with α) and relies on plain autograd. It
deliberately shares no code with the fast paths.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .basis import RADIUS_SLACK
from .geometry import resolve_padding

__all__ = ["srf_filters_reference", "srf_conv2d_reference"]


def srf_filters_reference(
    scale: torch.Tensor,
    alpha: torch.Tensor,
    order: int,
    truncate: float = 2.0,
    kernel_size: int | None = None,
    radius: int | None = None,
) -> torch.Tensor:
    """Dense SRF filters ``[C_out, C_in/groups, K, K]``, published construction.

    Args:
        scale: log2 σ; ``[1]`` (one σ per layer), ``[C_out]`` or
            ``[C_out, C_in/groups]`` (σ^ji).
        alpha: coefficients ``[F, C_in/groups, C_out]``.
        order: N-jet order N, ``F = (N+1)(N+2)/2``.
        truncate: radius ``ceil(truncate * σ + 0.5)`` when ``kernel_size`` is None.
        kernel_size: fixed odd K (offsets ``-(K//2)..K//2``, no truncation).
        radius: with ``kernel_size`` None, lay the filters out at this radius
            instead of reading σ's back to the host (the published code's
            ``.item()``, a graph break under ``torch.compile``): each σ is
            zeroed past its own radius, so the filters are the published ones
            with a rim of zeros; a σ whose radius exceeds it gives NaN.
    """
    sigma = 2.0**scale
    bounded = kernel_size is None and radius is not None
    if kernel_size is not None:
        radius = kernel_size // 2
    elif radius is None:
        # The published code reads the radius back to the host here.
        radius = int(torch.ceil(truncate * sigma.max() + 0.5).item())
    x = torch.arange(-radius, radius + 1, dtype=scale.dtype, device=scale.device)
    s = sigma[..., None]
    gauss = torch.exp(-(x * x) / (2.0 * s * s)) / (math.sqrt(2.0 * math.pi) * s)
    if kernel_size is None and (scale.numel() > 1 or bounded):
        gauss = gauss * (x.abs() <= torch.ceil(truncate * s + 0.5))
    if bounded:
        gauss = gauss.masked_fill(truncate * s + 0.5 > radius + RADIUS_SLACK, math.nan)
    gauss = gauss / gauss.sum(-1, keepdim=True)

    u = x / (math.sqrt(2.0) * s)
    hermite = [torch.ones_like(u), 2.0 * u]
    for n in range(2, order + 1):
        hermite.append(2.0 * u * hermite[n - 1] - 2.0 * (n - 1) * hermite[n - 2])
    taps = [(-1.0 / math.sqrt(2.0)) ** n * hermite[n] * gauss for n in range(order + 1)]

    basis = torch.stack(
        [taps[l][..., :, None] * taps[m][..., None, :] for l in range(order + 1) for m in range(order - l, -1, -1)],
        dim=-3,
    )  # [*scale.shape, F, K, K]
    if scale.numel() == 1:
        return torch.einsum("fck,fhw->kchw", alpha, basis.reshape(basis.shape[-3:]))
    c_out, c_in = alpha.shape[2], alpha.shape[1]
    basis = basis.reshape(c_out, -1, *basis.shape[-3:]).expand(c_out, c_in, *basis.shape[-3:])
    return torch.einsum("fio,oifhw->oihw", alpha, basis)


def srf_conv2d_reference(
    input: torch.Tensor,
    scale: torch.Tensor,
    alpha: torch.Tensor,
    order: int,
    truncate: float,
    stride: tuple[int, int],
    padding: str | tuple[int, int],
    groups: int,
    bias: torch.Tensor | None,
    kernel_size: int | None,
    radius: int | None = None,
) -> torch.Tensor:
    """Published SRF convolution; arguments as in :func:`dcn_fast.functional.srf_conv2d`,
    already validated (``padding`` is ``"same"``, ``"valid"`` or a pair); ``radius`` as in
    :func:`srf_filters_reference`."""
    weight = srf_filters_reference(scale, alpha, order, truncate, kernel_size, radius)
    pad = resolve_padding(padding, weight.shape[-1] // 2)
    return F.conv2d(input, weight, bias, stride=stride, padding=pad, groups=groups)
