"""The published layers and models, re-implemented faithfully for side-by-side timing and checks.

``PublishedSRFLayer`` follows the published ``Srf_layer_shared`` and
``gaussian_basis_filters_shared`` step by step: σ = 2^scales, the radius read
back to the host, a Gaussian on that grid normalised by its sum, and for
every basis pair (i, j) both 1-D derivative vectors rebuilt from explicit
Hermite polynomials, their outer product, a stack, an einsum with α, then one
dense ``F.conv2d``. ``ConcatSRF`` concatenates the constant t channel as the
published ``ConcatConv2d``. ``published_dcn_ode`` has the architecture,
initialisation and parameter count of ``build("dcn-ode")``.

``official_model(name)`` rebuilds the ten CIFAR-10 models of the official
scripts (github.com/ntomen/Deep-Continuous-Networks, ``experiments/cifar10_*.py``
and ``meta_param_*.py``) with their module structure, so their state dicts
carry the official key names: an ``nn.Sequential`` of stem, ODE block (or
ResBlock), downsampling (GN, act, conv), ..., head; the σ^ji layer
(``Srf_layer_ind``, scales ``[C_in, C_out]``) and the meta layers
(``Srf_layer_shared_lin`` / ``_quad`` / ``Srf_layer_alpha_sigma_lin``) included.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dcn_fast.basis import num_basis
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
    return published_filters_at(sigma, alphas, order, init_k)


def published_filters_at(sigma: torch.Tensor, alphas: torch.Tensor, order: int, init_k: float = 2.0) -> torch.Tensor:
    """``gaussian_basis_filters_shared`` for σ (``[1]``)."""
    scales = sigma
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
    """DCN-ODE with the published SRF layers, initialised like ``build("dcn-ode")`` with seed 0,
    solved by torchdiffeq as the official code is (unless ``solver=`` says otherwise)."""
    torch.manual_seed(0)
    model = build("dcn-ode", **{"solver": "torchdiffeq", **solver})
    for func in [m for m in model.modules() if isinstance(m, ODEFunc)]:
        for name in ("conv1", "conv2"):
            ours = getattr(func, name).layer
            setattr(func, name, ConcatSRF(PublishedSRFLayer(ours.alpha, ours.scale)))
    return model


def published_filters_ind(scales: torch.Tensor, alphas: torch.Tensor, order: int, k_size: int) -> torch.Tensor:
    """``gaussian_basis_filters_ind``: one σ per (input, output) pair, ``scales`` ``[C_in, C_out]``, offsets ±k_size."""
    in_c, out_c = alphas.shape[1], alphas.shape[2]
    sigma = torch.pow(torch.tensor([2.0], device=scales.device), scales).reshape(in_c * out_c)
    x = torch.arange(start=-float(k_size), end=float(k_size) + 1, step=1, device=scales.device, dtype=scales.dtype)
    gauss = torch.exp(torch.div(x * x, (-2.0 * sigma * sigma)[None, :].T)) * torch.div(
        1.0, (math.sqrt(2.0 * math.pi) * sigma)
    )[None, :].T
    gauss = gauss / torch.sum(gauss, axis=1)[None, :].T
    s = sigma[None, :].T

    def derivative(n):
        return _HERMITE[n](torch.div(x, math.sqrt(2.0) * s)) * torch.pow(torch.div(-1.0, math.sqrt(2.0) * s), n) * gauss

    basis = []
    for i in range(order + 1):
        basis_x = torch.pow(sigma, i)[None, :].T * derivative(i)
        for j in range(order - i, -1, -1):
            basis_y = torch.pow(sigma, j)[None, :].T * derivative(j)
            basis.append(torch.einsum("si,sj->sij", basis_x, basis_y))
    basis = torch.stack(basis, dim=0)
    basis = basis.reshape(basis.shape[0], in_c, out_c, basis.shape[2], basis.shape[3])
    return torch.einsum("fck,fckhw->kchw", alphas, basis)


def _param(*shape, std=0.0):
    return nn.Parameter(torch.randn(*shape) * std)


class OfficialSrfShared(nn.Module):
    """``Srf_layer_shared``: ``alphas`` ``[F, C_in, C_out]``, ``scales`` ``[1]``, padding = radius."""

    def __init__(self, in_c: int, out_c: int, stride: int = 1) -> None:
        super().__init__()
        self.alphas, self.scales, self.stride = _param(num_basis(2), in_c, out_c, std=0.1), _param(1, std=2 / 3), stride

    def forward(self, data):
        filters = published_filters(self.scales, self.alphas, 2)
        return F.conv2d(data, filters, stride=self.stride, padding=int(filters.shape[2] / 2))


class OfficialSrfInd(nn.Module):
    """``Srf_layer_ind`` (σ^ji): ``scales`` ``[C_in, C_out]``, k_size 3 (7x7 filters)."""

    def __init__(self, in_c: int, out_c: int) -> None:
        super().__init__()
        self.alphas, self.scales = _param(num_basis(2), in_c, out_c, std=0.1), _param(in_c, out_c, std=2 / 3)

    def forward(self, data, renew_filters=True):
        filters = published_filters_ind(self.scales, self.alphas, 2, 3)
        return F.conv2d(data, filters, padding=int(filters.shape[2] / 2))


class OfficialSrfMeta(nn.Module):
    """``Srf_layer_shared_lin`` / ``_quad`` / ``Srf_layer_alpha_sigma_lin``: σ (and α) functions of t."""

    def __init__(self, in_c: int, out_c: int, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.alphas = _param(num_basis(2), in_c, out_c, std=0.1)
        if kind == "sigma_alpha_t":
            self.alphas_bias = _param(num_basis(2), in_c, out_c, std=0.05)
        if kind == "sigma_t2":
            self.scales_square = _param(1, std=2 / 3)
        self.scales, self.scale_bias = _param(1, std=2 / 3), _param(1, std=0.1)

    def forward(self, data, t):
        if self.kind == "sigma_t2":
            sigma = 2.0 ** (self.scales_square * t**2 + self.scales * t + self.scale_bias)
        else:
            sigma = 2.0 ** (self.scales * t + self.scale_bias)
        alphas = self.alphas * t + self.alphas_bias if self.kind == "sigma_alpha_t" else self.alphas
        filters = published_filters_at(sigma, alphas, 2)
        return F.conv2d(data, filters, padding=int(filters.shape[2] / 2))


class OfficialConcatConv2d(nn.Module):
    """``ConcatConv2d``: ``_layer`` over ``cat[t·1, x]``; meta layers get t clipped to [-0.5, 2.5], times 0.5."""

    def __init__(self, layer: nn.Module, meta: bool) -> None:
        super().__init__()
        self._layer, self.meta = layer, meta

    def forward(self, t, x):
        tt = torch.ones_like(x[:, :1, :, :]) * t
        ttx = torch.cat([tt, x], 1)
        if not self.meta:
            return self._layer(ttx)
        return self._layer(ttx, 0.5 * t.clamp(-0.5, 2.5))


class OfficialODEfunc(nn.Module):
    def __init__(self, dim: int, make_conv, act, norm) -> None:
        super().__init__()
        self.norm1, self.relu, self.conv1 = norm(dim), act(), make_conv(dim)
        self.norm2, self.conv2, self.norm3 = norm(dim), make_conv(dim), norm(dim)
        self.nfe = 0

    def forward(self, t, x):
        self.nfe += 1
        out = self.conv1(t, self.relu(self.norm1(x)))
        return self.norm3(self.conv2(t, self.relu(self.norm2(out))))


class OfficialODEBlock(nn.Module):
    def __init__(self, odefunc: nn.Module, T: float, tol: float, method: str) -> None:
        super().__init__()
        self.odefunc, self.integration_time, self.tol, self.method = odefunc, torch.tensor([0.0, T]), tol, method

    def forward(self, x):
        import torchdiffeq

        t = self.integration_time.type_as(x)
        return torchdiffeq.odeint(self.odefunc, x, t, rtol=self.tol, atol=self.tol, method=self.method)[1]


class OfficialResBlock(nn.Module):
    def __init__(self, dim: int, make_conv, act, norm) -> None:
        super().__init__()
        self.norm1, self.relu, self.conv1 = norm(dim), act(), make_conv(dim, dim)
        self.norm2, self.conv2 = norm(dim), make_conv(dim, dim)

    def forward(self, x):
        out = self.conv2(self.relu(self.norm2(self.conv1(self.relu(self.norm1(x))))))
        return out + x


def official_model(name: str, tol: float = 1e-3, method: str = "dopri5") -> nn.Sequential:
    """The official script's ``model`` for one of ``dcn_fast.models.MODELS`` (T = 2 in every ODE block,
    ODE-Net included, as the official scripts integrate; the official solver is dopri5)."""
    ode_kind = {
        "odenet": "conv", "dcn-ode": "srf", "dcn-full": "srf", "dcn-sigma-ji": "srf_pair",
        "dcn-sigma-t": "sigma_t", "dcn-sigma-t2": "sigma_t2", "dcn-sigma-alpha-t": "sigma_alpha_t",
    }.get(name)
    relu = name in ("odenet", "resnet-blocks", "resnet-srf-blocks", "resnet-srf-full")
    act = nn.ReLU if relu else nn.CELU
    everywhere = name in ("dcn-full", "resnet-srf-full")
    norm = (lambda dim: nn.GroupNorm(dim, dim)) if name == "dcn-full" else (lambda dim: nn.GroupNorm(min(32, dim), dim))

    def ode_conv(dim):
        if ode_kind == "conv":
            return OfficialConcatConv2d(nn.Conv2d(dim + 1, dim, 3, 1, 1), meta=False)
        if ode_kind == "srf":
            return OfficialConcatConv2d(OfficialSrfShared(dim + 1, dim), meta=False)
        if ode_kind == "srf_pair":
            return OfficialConcatConv2d(OfficialSrfInd(dim + 1, dim), meta=False)
        return OfficialConcatConv2d(OfficialSrfMeta(dim + 1, dim, ode_kind), meta=True)

    def res_conv(c_in, c_out):
        if name == "resnet-blocks":
            return nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        return OfficialSrfShared(c_in, c_out)

    def stage(dim):
        if ode_kind is None:
            return OfficialResBlock(dim, res_conv, act, norm)
        return OfficialODEBlock(OfficialODEfunc(dim, ode_conv, act, norm), 2.0, tol, method)

    def down(c_in, c_out):
        conv = OfficialSrfShared(c_in, c_out, stride=2) if everywhere else nn.Conv2d(c_in, c_out, 4, 2, 1)
        return [norm(c_in), act(), conv]

    stem = OfficialSrfShared(3, 32) if everywhere else nn.Conv2d(3, 32, 3, 1)
    head = [norm(128), act(), nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(), nn.Linear(128, 10)]
    return nn.Sequential(stem, stage(32), *down(32, 64), stage(64), *down(64, 128), stage(128), *head)
