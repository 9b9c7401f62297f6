"""The 1-D Gaussian-derivative taps of the SRF basis, with analytic gradients.

Every fast backend consumes the same taps ``b_n(x)`` (n = 0..order, x = -R..R)
and hands back ``dL/db_n(x)``; this module turns σ into taps and those tap
gradients into the gradient of the log2-scale, using the closed form of
DESIGN.md §2 rather than autograd through the construction.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Sequence, TypeVar

import torch

__all__ = [
    "MAX_RADIUS",
    "MIN_SCALE",
    "num_basis",
    "basis_pairs",
    "pair_index",
    "srf_taps",
    "basis_from_taps",
    "HostReadback",
    "constant_while_tracing",
    "SCALE_SHARING",
]

#: Largest tap radius any backend accepts (kernel size ``2 * MAX_RADIUS + 1``).
#: At the default ``truncate=2`` this is reached at σ ≈ 31.7 (scale ≈ 4.99).
MAX_RADIUS = 64

#: How many σ a layer learns: one, one per output channel, or one per (output, input) pair.
SCALE_SHARING = ("layer", "channel", "pair")

#: How far (in taps) σ's published reach ``truncate·σ + 0.5`` may pass the radius the taps
#: are laid out at before they turn into NaN: σ(t)'s bound and the host's radius are
#: computed by different float operations, which may disagree by a few ulps at a boundary.
RADIUS_SLACK = 1e-3

#: Smallest scale (log2 σ) any backend accepts: below about -5.3 the taps are already
#: a discrete delta, and the σ gradient overflows.
MIN_SCALE = -8.0

_Value = TypeVar("_Value")


def num_basis(order: int) -> int:
    """Number F of 2-D basis functions of an N-jet of ``order`` N: (N+1)(N+2)/2."""
    return (order + 1) * (order + 2) // 2


def basis_pairs(order: int) -> list[tuple[int, int]]:
    """The published order of the 2-D basis: ``(l, m)`` for l in 0..N, m in N-l..0.

    ``B_(l,m)(p, q) = b_l(p) * b_m(q)`` with p along H (rows), q along W.
    """
    return [(l, m) for l in range(order + 1) for m in range(order - l, -1, -1)]


@functools.lru_cache(maxsize=None)
def pair_index(order: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(l, m)`` of each basis function as two int64 tensors on ``device``.

    Cached: built (and copied to the device) once per process, so a call that
    uses them needs no host-to-device transfer (CUDA-graph capturable).
    """
    pairs = basis_pairs(order)
    rows = torch.tensor([l for l, _ in pairs]).to(device)
    cols = torch.tensor([m for _, m in pairs]).to(device)
    return rows, cols


def _hermite(u: torch.Tensor, order: int) -> list[torch.Tensor]:
    """Physicists' Hermite polynomials H_0..H_order at u (one more for the gradient)."""
    polys = [torch.ones_like(u), 2 * u]
    for n in range(2, order + 1):
        polys.append(2 * u * polys[n - 1] - 2 * (n - 1) * polys[n - 2])
    return polys[: order + 1]


def _taps_forward(scale: torch.Tensor, order: int, radius: int, truncate: float | None):
    """Taps [..., order+1, 2*radius+1] plus what the analytic backward needs."""
    compiled_on_cpu = torch.compiler.is_compiling() and scale.device.type == "cpu"
    if compiled_on_cpu:
        # Eager checks the scale where it reads σ back (checked_radius); a compiled graph
        # reads it once, while tracing, so it checks in the graph. (Accelerators: see below.)
        torch._assert_async((scale.isfinite() & (scale >= MIN_SCALE)).all(), SCALE_RANGE_ERROR)
    sigma = torch.exp2(scale)[..., None]  # [..., 1]
    x = torch.arange(-radius, radius + 1, dtype=scale.dtype, device=scale.device)
    g = torch.exp(-(x * x) / (2 * sigma * sigma))
    if truncate is not None:
        # Taps past each σ's own radius are zero, so one launch serves every σ
        # (per-channel scales, or a radius bound larger than needed).
        reach = truncate * sigma + 0.5
        g = torch.where(x.abs() <= torch.ceil(reach), g, torch.zeros_like(g))
        # A σ wider than the layout (a radius read before σ changed) would lose its outer
        # taps without a trace; NaN taps make that visible instead.
        g = g.masked_fill(reach > radius + RADIUS_SLACK, math.nan)
        if compiled_on_cpu:
            # A compiled graph holds the radius it was traced with (HostReadback): say so
            # rather than return NaN. (On an accelerator this assertion would be a device-side
            # assert, which leaves the device unusable: NaN taps there.)
            torch._assert_async((reach <= radius + RADIUS_SLACK).all(), OUTGROWN_RADIUS_ERROR)
    g_hat = g / g.sum(-1, keepdim=True)
    u = x / (math.sqrt(2.0) * sigma)
    hermite = _hermite(u, order)
    sign = [(-1.0 / math.sqrt(2.0)) ** n for n in range(order + 1)]
    taps = torch.stack([sign[n] * hermite[n] * g_hat for n in range(order + 1)], -2)
    return taps, sigma, x, g_hat, u, hermite, sign


#: A compiled graph's σ outgrew the tap radius it was traced with (CPU; NaN taps on accelerators).
OUTGROWN_RADIUS_ERROR = (
    "dcn_fast: σ outgrew the tap radius this torch.compile graph was traced with (a compiled SRF layer reads "
    "its radius once, when the graph is traced); retrace it (torch.compiler.reset(), then call it again) or "
    "run the layer eagerly"
)

#: A compiled graph met a scale outside [MIN_SCALE, ∞) or not finite (CPU; eager raises ValueError).
SCALE_RANGE_ERROR = (
    f"dcn_fast: a scale (log2 σ) in this torch.compile graph is NaN, inf or below {MIN_SCALE:g}; the allowed "
    f"range is finite scale >= {MIN_SCALE:g} (run the layer eagerly for the value)"
)

#: The one error of every fast path asked for a gradient of a gradient.
DOUBLE_BACKWARD_ERROR = (
    "dcn_fast.srf_conv2d: double backward (a gradient of a gradient, e.g. create_graph=True) is not supported "
    "by the fast backends; use backend='reference', whose plain autograd supports it"
)


class _SRFTaps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scale, order, radius, truncate):
        taps, *_ = _taps_forward(scale, order, radius, truncate)
        ctx.save_for_backward(scale)
        ctx.order, ctx.radius, ctx.truncate = order, radius, truncate
        return taps

    @staticmethod
    def backward(ctx, grad_taps):
        # create_graph=True: the closed form below is not differentiable again, and a
        # second derivative through σ would silently come out as zero.
        if torch.is_grad_enabled():
            raise RuntimeError(DOUBLE_BACKWARD_ERROR)
        (scale,) = ctx.saved_tensors
        _, sigma, x, g_hat, u, hermite, sign = _taps_forward(scale, ctx.order, ctx.radius, ctx.truncate)
        energy = (g_hat * x * x).sum(-1, keepdim=True)  # E = Σ ĝ x²
        d_g_hat = g_hat * (x * x - energy) / sigma**3
        grad_sigma = torch.zeros_like(scale)
        for n in range(ctx.order + 1):
            d_tap = hermite[n] * d_g_hat
            if n > 0:
                d_tap = d_tap - 2 * n * hermite[n - 1] * (u / sigma) * g_hat
            grad_sigma = grad_sigma + sign[n] * (grad_taps[..., n, :] * d_tap).sum(-1)
        return grad_sigma * sigma[..., 0] * math.log(2.0), None, None, None


def srf_taps(scale: torch.Tensor, order: int, radius: int, truncate: float | None) -> torch.Tensor:
    """1-D scale-normalised Gaussian-derivative taps, published normalisation.

    Args:
        scale: log2 σ, any shape ``S``.
        order: highest derivative order N (≥ 0).
        radius: taps are laid out at offsets ``-radius..radius``.
        truncate: ``k`` of the published radius ``ceil(k σ + 0.5)``; taps past
            that radius are zero and excluded from the normalisation. ``None``
            keeps every offset (fixed ``kernel_size``, the σ^ji variant).
            Every σ's published radius must fit in ``radius``: the taps of a
            σ that does not are NaN (so a stale radius cannot truncate silently).

    Returns:
        ``[*S, order + 1, 2 * radius + 1]``, ``b_n(x) = (-1/√2)^n H_n(x/(√2σ)) ĝ(x)``.
        Differentiable in ``scale`` through the closed-form tap gradient.

    A float32 ``scale`` on CUDA takes one Triton launch (``kernels/srf_taps.py``)
    instead of ~45 small PyTorch kernels; float64 and CPU stay here.
    """
    if scale.is_cuda and scale.dtype == torch.float32:
        try:
            from .kernels.srf_taps import srf_taps_triton
        except ImportError:  # no Triton: the PyTorch construction below serves
            pass
        else:
            return srf_taps_triton(scale, order, radius, truncate)
    return _SRFTaps.apply(scale, order, radius, truncate)


def basis_from_taps(taps: torch.Tensor, order: int) -> torch.Tensor:
    """2-D basis ``[..., F, K, K]`` from 1-D taps ``[..., order+1, K]``."""
    pairs = basis_pairs(order)
    rows = taps[..., [l for l, _ in pairs], :]
    cols = taps[..., [m for _, m in pairs], :]
    return rows[..., :, None] * cols[..., None, :]


def constant_while_tracing(fn: Callable[..., _Value]) -> Callable[..., _Value]:
    """``torch.compiler.assume_constant_result(fn)``: dynamo calls ``fn`` while it traces
    (tensor arguments as their real values) and keeps the result as a constant of the graph.

    That decorator imports ``torch._dynamo``, which imports Triton, and Triton reads
    ``TRITON_INTERPRET`` when it is first imported: importing dcn_fast must not do that
    (tests/test_compile.py checks both), so this sets the decorator's one mark itself.
    """
    fn._dynamo_marked_constant = True  # what assume_constant_result does (torch 2.11 to 2.15)
    return fn


@constant_while_tracing
def _read_while_tracing(compute: Callable[..., _Value], *params: torch.Tensor, **options) -> _Value:
    # Dynamo calls this with the real parameters while it traces and keeps the result
    # as a constant of the graph (no guard on the parameters' values).
    return compute(*params, **options)


class HostReadback:
    """A host value derived from parameters (a tap radius), recomputed only after they change.

    Reading a parameter on an accelerator stalls it, so a change is detected
    from what the host already knows: the version counters (bumped by optimizer
    steps, in-place writes under ``no_grad``, ``load_state_dict``) and storage
    addresses (``param.data = ...``, ``.to()``). Writes through ``param.data``
    bypass the version counter: on the CPU, where a read costs no device sync,
    the values are also compared with those last read, so such writes are seen
    as well; on an accelerator :func:`srf_taps` turns the taps of a σ that
    outgrew the radius into NaN, and a σ that shrank keeps exact taps (zeros
    past its own radius) under ``"same"`` padding.

    Under ``torch.compile`` the value is read from the parameters when the graph
    is traced and is a constant of that graph (no graph break, no host read per
    call): the compiled graph is specialised on it. A σ that later outgrows it
    gives NaN taps, on the CPU a RuntimeError (:func:`srf_taps`); one that
    shrank keeps exact taps under ``"same"`` padding.
    """

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._values: tuple[torch.Tensor | None, ...] = ()
        self._value = None

    def get(self, params: Sequence[torch.Tensor], compute: Callable[..., _Value], **options) -> _Value:
        """``compute(*params, **options)`` if any of ``params`` changed since the last call, else its cached
        result; while torch.compile traces, the parameters' value at that moment."""
        if torch.compiler.is_compiling():
            return _read_while_tracing(compute, *params, **options)
        key = tuple((p._version, p.data_ptr(), p.device) for p in params)
        unchanged = key == self._key and all(
            p.device.type != "cpu" or torch.equal(p.detach(), seen) for p, seen in zip(params, self._values)
        )
        if not unchanged:
            self._value = compute(*params, **options)  # raises (and caches nothing) for an invalid scale
            self._key = key
            self._values = tuple(p.detach().clone() if p.device.type == "cpu" else None for p in params)
        return self._value
