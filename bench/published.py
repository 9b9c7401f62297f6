"""The published DCN-ODE layer stack, re-implemented faithfully for side-by-side timing.

``PublishedSRFLayer`` follows the published ``Srf_layer_shared`` and
``gaussian_basis_filters_shared`` step by step: σ = 2^scales, the radius read
back to the host, a Gaussian on that grid normalised by its sum, and for
every basis pair (i, j) both 1-D derivative vectors rebuilt from explicit
Hermite polynomials, their outer product, a stack, an einsum with α, then one
dense ``F.conv2d``. ``ConcatSRF`` concatenates the constant t channel as the
published ``ConcatConv2d``. ``published_dcn_ode`` has the architecture,
initialisation and parameter count of ``build("dcn-ode")``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dcn_fast.models import build
from dcn_fast.ode import ODEFunc

# Explicit physicists' Hermite polynomials, as the published code spells them out.
_HERMITE = {
    0: lambda u: u * 0.0 + 1.0,
    1: lambda u: 2.0 * u,
    2: lambda u: 4.0 * torch.pow(u, 2.0) - 2.0,
    3: lambda u: 8.0 * torch.pow(u, 3.0) - 12.0 * u,
    4: lambda u: 16.0 * torch.pow(u, 4.0) - 48.0 * torch.pow(u, 2.0) + 12.0,
}


def _derivative(x, order, gauss, sigma):
    u = torch.div(x, math.sqrt(2.0) * sigma)
    return torch.pow(sigma, order) * torch.pow(torch.div(-1.0, math.sqrt(2.0) * sigma), order) * _HERMITE[order](u) * gauss


def published_filters(scales: torch.Tensor, alphas: torch.Tensor, order: int, init_k: float = 2.0) -> torch.Tensor:
    sigma = torch.pow(torch.tensor([2.0], device=scales.device), scales)
    filtersize = torch.ceil(init_k * sigma[0] + 0.5)
    size = filtersize.detach().cpu().float()  # the host sync of every call
    x = torch.arange(start=-size.item(), end=size.item() + 1, step=1, device=scales.device, dtype=scales.dtype)
    gauss = torch.div(1.0, math.sqrt(2.0 * math.pi) * sigma[0]) * torch.exp(torch.div(x * x, -2.0 * sigma[0] * sigma[0]))
    gauss = gauss / torch.sum(gauss)
    basis = []
    for i in range(order + 1):
        basis_x = _derivative(x, i, gauss, sigma[0])
        for j in range(order - i, -1, -1):
            basis_y = _derivative(x, j, gauss, sigma[0])
            basis.append(torch.einsum("i,j->ij", basis_x, basis_y))
    return torch.einsum("fck,fhw->kchw", alphas, torch.stack(basis, dim=0))


class PublishedSRFLayer(nn.Module):
    """``Srf_layer_shared``: parameters ``alphas`` [F, C_in, C_out] and ``scales`` [1]."""

    def __init__(self, alphas: torch.Tensor, scales: torch.Tensor, order: int = 2) -> None:
        super().__init__()
        self.alphas = nn.Parameter(alphas.detach().clone())
        self.scales = nn.Parameter(scales.detach().clone())
        self.order = order

    def forward(self, data: torch.Tensor) -> torch.Tensor:
        filters = published_filters(self.scales, self.alphas, self.order)
        return F.conv2d(data, filters, padding=int(filters.shape[2] / 2))


class ConcatSRF(nn.Module):
    """``Srf_layer_shared`` over ``cat[t·1, x]`` (the published ``ConcatConv2d``)."""

    def __init__(self, layer: PublishedSRFLayer) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        tt = torch.ones_like(x[:, :1, :, :]) * t
        return self.layer(torch.cat([tt, x], 1))


def published_dcn_ode(**solver) -> nn.Module:
    """DCN-ODE with the published SRF layers, initialised like ``build("dcn-ode")`` with seed 0."""
    torch.manual_seed(0)
    model = build("dcn-ode", **solver)
    for func in [m for m in model.modules() if isinstance(m, ODEFunc)]:
        for name in ("conv1", "conv2"):
            ours = getattr(func, name).layer
            setattr(func, name, ConcatSRF(PublishedSRFLayer(ours.alpha, ours.scale)))
    return model
