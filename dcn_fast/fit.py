"""Fitting the SRF parameters (σ, α) to given dense filters (e.g. a trained ``nn.Conv2d``).

For a fixed σ the best α is linear least squares on the basis ``B_f(σ)``
(closed form, every filter at once); what is left is a 1-D problem in
s = log2 σ per σ of the layer (one, one per output channel, or one per pair,
as ``scale_sharing`` says), solved by a grid over s followed by a
golden-section search around the grid's best local minima.

Each σ's objective is the sum of squared residuals of the filters that share
it, ``φ(s) = Σ_w ||(I - P(s)) w||²`` with ``P(s)`` the orthogonal projection
onto the basis' span. The filters of a group enter only through a factor
``T`` of their Gram matrix (``TᵀT = Σ w wᵀ``, at most K² rows: the R of a QR
decomposition), and φ is formed from the residual ``T - T·U·Uᵀ`` itself, not
as a difference of norms, so a filter that is exactly in the basis drives φ
to rounding level and σ is recovered to ~1e-10 (float64).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .basis import MAX_RADIUS, SCALE_SHARING, basis_from_taps, srf_taps
from .functional import MIN_SCALE

__all__ = ["SRFFit", "fit_srf", "filter_error", "default_scale_range", "FIXED_FROM_WEIGHT"]

#: ``kernel_size`` value meaning: the SRF keeps the weight's (the conv's) own fixed K×K support.
FIXED_FROM_WEIGHT = "conv"

#: Smallest σ searched by default (log2): σ = 0.25 is already a near-delta (exp(-8) at x = ±1).
DEFAULT_MIN_SCALE = -2.0

_INV_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0

#: QR pivots this far below the largest mark a basis as (nearly) rank-deficient: the SVD decides.
_QR_PIVOT_RATIO = 1e-6

#: Below this many σ searched at once (groups x starts), a fit runs on one thread.
_THREADED_GROUPS = 4096

#: Elements of one batched residual evaluation (bounds the memory of the grid stage).
_CHUNK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class SRFFit:
    """The result of :func:`fit_srf` (float64, on the CPU).

    Attributes:
        scale: log2 σ, ``[1]`` (layer), ``[C_out]`` (channel) or ``[C_out, C_in/groups]`` (pair).
        alpha: ``[F, C_in/groups, C_out]``, the published layout of ``SRFConv2d.alpha``.
        error: ``[C_out]`` relative L2 error of the fitted filter per output channel,
            ``||Ŵ_o - W_o|| / ||W_o||`` over all its input channels and taps (0 where ``W_o = 0``).
        kernel_size: the SRF's fixed kernel size, or ``None`` for the σ-dependent size.
    """

    scale: torch.Tensor
    alpha: torch.Tensor
    error: torch.Tensor
    kernel_size: int | None


def _centre(filters: torch.Tensor, size: int) -> torch.Tensor:
    """Zero-pad square odd filters ``[..., k, k]`` to ``[..., size, size]`` around their centre."""
    pad = (size - filters.shape[-1]) // 2
    return F.pad(filters, (pad,) * 4) if pad else filters


def filter_error(approx: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Relative L2 error per output channel, ``||approx_o - target_o|| / ||target_o||``, in float64.

    Args:
        approx, target: ``[C_out, n, Ka, Ka]`` and ``[C_out, n, Kt, Kt]`` with odd
            sizes; both are compared on the larger support, centred (a filter is
            zero outside its own support).

    Returns:
        ``[C_out]`` on the CPU; 0 for an output channel whose target and approximation are both zero.
    """
    size = max(approx.shape[-1], target.shape[-1])
    approx = _centre(approx.detach().to("cpu", torch.float64), size)
    target = _centre(target.detach().to("cpu", torch.float64), size)
    diff = (approx - target).flatten(1).norm(dim=1)
    norm = target.flatten(1).norm(dim=1)
    return torch.where(norm > 0, diff / norm.clamp_min(torch.finfo(torch.float64).tiny), diff)


def _published_radius(scale: float, truncate: float) -> int:
    # The arithmetic of functional._radius_tensor (the taps' own truncation), so both agree.
    return int(torch.ceil(truncate * torch.exp2(torch.tensor(scale, dtype=torch.float64)) + 0.5))


def default_scale_range(weight_size: int, kernel_size: int | None) -> tuple[float, float]:
    """The log2 σ interval :func:`fit_srf` searches unless told otherwise.

    From σ = 0.25 (a near-delta) up to σ = K for a fixed K×K support (beyond,
    the Gaussian is flat on it), or up to σ = K_w / 2 for the σ-dependent size
    (whose support, about 4σ + 3 taps at ``truncate=2``, then is about twice
    the weight's K_w; the weight is zero outside K_w, so larger σ only lose).
    """
    if kernel_size is None:
        return DEFAULT_MIN_SCALE, max(math.log2(weight_size / 2), DEFAULT_MIN_SCALE + 1.0)
    return DEFAULT_MIN_SCALE, max(math.log2(kernel_size), DEFAULT_MIN_SCALE + 1.0)


class _Basis:
    """The orthonormalised SRF basis on a ``size × size`` grid for a batch of scales."""

    def __init__(self, order: int, radius: int, tap_radius: int, truncate: float | None) -> None:
        self.order, self.radius, self.tap_radius, self.truncate = order, radius, tap_radius, truncate

    def matrix(self, scale: torch.Tensor) -> torch.Tensor:
        """``[M, S², F]``: column f is ``B_f`` (flattened, rows then columns) at each of ``scale [M]``."""
        taps = srf_taps(scale, self.order, self.tap_radius, self.truncate)
        if self.radius > self.tap_radius:
            taps = F.pad(taps, (self.radius - self.tap_radius,) * 2)
        return basis_from_taps(taps, self.order).flatten(-2).transpose(-1, -2)

    def span(self, scale: torch.Tensor) -> torch.Tensor:
        """An orthonormal basis ``[M, S², F]`` of the span of :meth:`matrix` (zero columns where it
        is rank-deficient). Householder QR (~5x cheaper than the SVD) where the basis is well
        conditioned; the σ whose R has a tiny pivot (numerically dependent columns, e.g. F > S²
        or a σ so small that fewer than order + 1 taps are nonzero) take :meth:`svd`, whose
        rank cut decides which directions exist."""
        q, r = torch.linalg.qr(self.matrix(scale))
        pivots = r.diagonal(dim1=-2, dim2=-1).abs()
        shaky = pivots.min(-1).values <= pivots.max(-1).values * _QR_PIVOT_RATIO
        if bool(shaky.any()):
            q = q.clone()
            q[shaky] = self.svd(scale[shaky])[0]
        return q

    def svd(self, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``U [M, S², F]`` (columns of the numerical null space zeroed), inverse singular
        values ``[M, F]`` (0 there) and ``Vh [M, F, F]`` of :meth:`matrix`."""
        u, sv, vh = torch.linalg.svd(self.matrix(scale), full_matrices=False)
        # Rank-deficient bases (F > K², or more orders than taps) keep the minimum-norm α.
        rows, cols = u.shape[-2:]
        keep = sv > sv[..., :1] * max(rows, cols) * torch.finfo(sv.dtype).eps
        inv = torch.where(keep, 1.0 / torch.where(keep, sv, torch.ones_like(sv)), torch.zeros_like(sv))
        return u * keep[..., None, :].to(u.dtype), inv, vh


def _residual(targets: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``||T - T U Uᵀ||²`` per batch entry: ``targets [..., n, S²]``, ``u [..., S², F]`` → ``[...]``."""
    return (targets - (targets @ u) @ u.transpose(-1, -2)).square().sum((-1, -2))


def _golden_section(
    objective: Callable[[torch.Tensor], torch.Tensor], low: torch.Tensor, high: torch.Tensor, tol: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched golden-section minimisation on ``[low, high]``; returns (argmin, min) per entry."""
    c = high - _INV_GOLDEN * (high - low)
    d = low + _INV_GOLDEN * (high - low)
    fc, fd = objective(torch.cat([c, d])).chunk(2)
    # Each step shrinks the bracket by the golden ratio: the count is known in advance.
    width = float((high - low).max())
    steps = max(0, math.ceil(math.log(max(width, tol) / tol) / -math.log(_INV_GOLDEN)))
    for _ in range(steps):
        left = fc <= fd  # the minimum lies in [low, d]
        low, high = torch.where(left, low, c), torch.where(left, d, high)
        new_c = torch.where(left, high - _INV_GOLDEN * (high - low), d)
        new_d = torch.where(left, c, low + _INV_GOLDEN * (high - low))
        fx = objective(torch.where(left, new_c, new_d))
        fc, fd = torch.where(left, fx, fd), torch.where(left, fc, fx)
        c, d = new_c, new_d
    first = fc <= fd
    return torch.where(first, c, d), torch.where(first, fc, fd)


def _check_fit_options(weight, order, scale_sharing, kernel_size, truncate, scale_range, grid_step, starts, tol):
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        got = f"a {weight.dtype} tensor" if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise TypeError(f"weight must be a floating-point torch.Tensor, got {got}")
    if weight.is_meta:
        raise ValueError("weight is on the meta device (no values to fit): use fit=False, or materialise it first")
    if weight.dim() != 4 or weight.shape[-1] != weight.shape[-2] or weight.shape[-1] % 2 == 0:
        raise ValueError(
            "weight must be [C_out, C_in/groups, K, K] with an odd K (the SRF basis is centred), "
            f"got shape {tuple(weight.shape)}"
        )
    if weight.numel() == 0:
        raise ValueError(f"weight must not be empty, got shape {tuple(weight.shape)}")
    if not bool(torch.isfinite(weight).all()):
        raise ValueError("weight must be finite, got NaN or inf")
    if not isinstance(order, int) or isinstance(order, bool) or order < 0:
        raise ValueError(f"order must be an int >= 0, got {order!r}")
    if scale_sharing not in SCALE_SHARING:
        raise ValueError(f"scale_sharing must be one of {SCALE_SHARING}, got {scale_sharing!r}")
    if kernel_size is not None and kernel_size != FIXED_FROM_WEIGHT:
        if not isinstance(kernel_size, int) or isinstance(kernel_size, bool) or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be {FIXED_FROM_WEIGHT!r}, None or an odd int >= 1, got {kernel_size!r}")
        if kernel_size > 2 * MAX_RADIUS + 1:
            raise ValueError(f"kernel_size must be <= {2 * MAX_RADIUS + 1}, got {kernel_size}")
    if kernel_size is None and scale_sharing == "pair":
        raise ValueError("scale_sharing='pair' needs a fixed kernel_size (the conv's: 'conv', or an odd int)")
    if isinstance(truncate, bool) or not (isinstance(truncate, (int, float)) and math.isfinite(truncate) and truncate > 0):
        raise ValueError(f"truncate must be a finite number > 0, got {truncate!r}")
    if scale_range is not None:
        ok = (
            isinstance(scale_range, (tuple, list))
            and len(scale_range) == 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in scale_range)
        )
        if not ok or not MIN_SCALE <= scale_range[0] < scale_range[1]:
            raise ValueError(
                f"scale_range must be (low, high) in log2 σ with {MIN_SCALE:g} <= low < high, got {scale_range!r}"
            )
        if kernel_size is None and _published_radius(float(scale_range[1]), truncate) > MAX_RADIUS:
            raise ValueError(
                f"scale_range's high end {scale_range[1]!r} gives σ-dependent kernels past the cap of "
                f"{2 * MAX_RADIUS + 1} taps (truncate={truncate})"
            )
    if isinstance(grid_step, bool) or not (isinstance(grid_step, (int, float)) and 0 < grid_step <= 1):
        raise ValueError(f"grid_step must be a number in (0, 1] (log2 σ), got {grid_step!r}")
    if not isinstance(starts, int) or isinstance(starts, bool) or starts < 1:
        raise ValueError(f"starts must be an int >= 1, got {starts!r}")
    if isinstance(tol, bool) or not (isinstance(tol, (int, float)) and 0 < tol < 1):
        raise ValueError(f"tol must be a number in (0, 1) (log2 σ), got {tol!r}")


def fit_srf(
    weight: torch.Tensor,
    *,
    order: int = 2,
    scale_sharing: str = "layer",
    kernel_size: int | str | None = FIXED_FROM_WEIGHT,
    truncate: float = 2.0,
    scale_range: tuple[float, float] | None = None,
    grid_step: float = 0.125,
    starts: int = 3,
    tol: float = 1e-10,
) -> SRFFit:
    """Fit σ and α of an SRF layer to dense filters ``weight`` (least squares).

    α is the least-squares solution on the basis for a given σ (closed form,
    batched; minimum-norm where the basis is rank-deficient, e.g. F > K²); σ
    minimises the summed squared residual of the filters that share it: a grid
    over log2 σ (step ``grid_step`` on ``scale_range``), then a golden-section
    search (to ``tol`` in log2 σ) in the brackets of the ``starts`` best local
    minima of the grid; the result is never worse than the grid's best point.

    Args:
        weight: ``[C_out, C_in/groups, K, K]`` (odd K), e.g. ``conv.weight``.
        order: highest derivative order N of the basis.
        scale_sharing: ``"layer"`` (one σ), ``"channel"`` (one per output
            channel) or ``"pair"`` (one per (output, input) pair).
        kernel_size: the SRF's support: ``"conv"`` (default) the weight's own
            fixed K×K (taps over all of it, normalised there, as σ^ji);
            an odd int: another fixed size; ``None``: the σ-dependent size
            ``2·ceil(truncate·σ + 0.5) + 1`` (not with ``"pair"``). The fit is
            measured on the larger of the two supports (the weight is zero
            outside its K×K, an SRF filter outside its own).
        truncate: ``k`` of the σ-dependent radius (``kernel_size=None`` only).
        scale_range: (low, high) of log2 σ searched; default
            :func:`default_scale_range`.
        grid_step: grid spacing in log2 σ.
        starts: how many local minima of the grid are refined.
        tol: final bracket width of the golden-section search, in log2 σ.

    Returns:
        :class:`SRFFit` (float64, CPU) with ``scale``, ``alpha`` and the relative
        error per output channel.

    Example:
        >>> weight = torch.randn(16, 3, 7, 7)
        >>> fit = fit_srf(weight, order=2)
        >>> fit.scale.shape, fit.alpha.shape, fit.error.shape
        (torch.Size([1]), torch.Size([6, 3, 16]), torch.Size([16]))
    """
    _check_fit_options(weight, order, scale_sharing, kernel_size, truncate, scale_range, grid_step, starts, tol)
    # A fit is a few hundred operations on small tensors (the filters enter only through
    # S² x S² factors), where the intra-op thread pool costs more than it gives: 3-20x
    # slower with 2 threads on a loaded 2-core machine (ResNet-18: 1 s with one thread).
    # Only many σ (one per pair of a large layer) have enough work per operation.
    threads = torch.get_num_threads()
    n_scales = {"layer": 1, "channel": weight.shape[0], "pair": weight.shape[0] * weight.shape[1]}[scale_sharing]
    small = n_scales * starts < _THREADED_GROUPS
    if small and threads > 1:
        torch.set_num_threads(1)
    try:
        return _fit(weight, order, scale_sharing, kernel_size, truncate, scale_range, grid_step, starts, tol)
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


def _fit(weight, order, scale_sharing, kernel_size, truncate, scale_range, grid_step, starts, tol) -> SRFFit:
    c_out, c_in, k_w, _ = weight.shape
    fixed = k_w if kernel_size == FIXED_FROM_WEIGHT else kernel_size
    low, high = default_scale_range(k_w, fixed) if scale_range is None else map(float, scale_range)
    tap_radius = fixed // 2 if fixed is not None else _published_radius(high, truncate)
    radius = max(k_w // 2, tap_radius)
    size = 2 * radius + 1
    basis = _Basis(order, radius, tap_radius, None if fixed is not None else float(truncate))

    # Filters of each σ group: [J, m, S²], J groups of m filters, in (output, input) order.
    filters = _centre(weight.detach().to("cpu", torch.float64), size).reshape(c_out, c_in, size * size)
    groups = {"layer": filters.reshape(1, c_out * c_in, -1), "channel": filters, "pair": filters.reshape(-1, 1, size * size)}
    grouped = groups[scale_sharing]
    # Gram factor T (TᵀT = Σ w wᵀ): at most S² rows, whatever the number of filters.
    targets = torch.linalg.qr(grouped, mode="r").R if grouped.shape[1] > size * size else grouped
    n_groups = targets.shape[0]

    # Grid stage: one basis per grid point, shared by all groups.
    points = max(2, math.ceil((high - low) / grid_step - 1e-9) + 1)
    grid = torch.linspace(low, high, points, dtype=torch.float64)
    u_grid = basis.span(grid)
    chunk = max(1, _CHUNK_ELEMENTS // max(1, targets.numel()))
    values = torch.cat(
        [_residual(targets[None], u_grid[i : i + chunk, None]) for i in range(0, points, chunk)]
    )  # [G, J]

    # Local minima of the grid curve per group, best first (padded with the best one).
    padded = F.pad(values.t()[:, None], (1, 1), mode="replicate")[:, 0]  # [J, G + 2]
    is_min = (values.t() <= padded[:, :-2]) & (values.t() <= padded[:, 2:])
    ranked = torch.where(is_min, values.t(), torch.full_like(values.t(), math.inf))
    k = min(starts, points)
    order_idx = ranked.topk(k, dim=1, largest=False).indices  # [J, k]
    best_idx = values.argmin(0)  # [J]
    valid = torch.isfinite(ranked.gather(1, order_idx))
    order_idx = torch.where(valid, order_idx, best_idx[:, None])
    lo = grid[(order_idx - 1).clamp_min(0)].reshape(-1)
    hi = grid[(order_idx + 1).clamp_max(points - 1)].reshape(-1)
    repeated = targets.repeat_interleave(k, 0)

    def objective(scale: torch.Tensor) -> torch.Tensor:
        halves = scale.shape[0] // repeated.shape[0]
        return _residual(repeated.repeat(halves, 1, 1), basis.span(scale))

    refined, refined_value = _golden_section(objective, lo, hi, tol)
    refined, refined_value = refined.reshape(n_groups, k), refined_value.reshape(n_groups, k)
    pick = refined_value.argmin(1, keepdim=True)
    scale, value = refined.gather(1, pick)[:, 0], refined_value.gather(1, pick)[:, 0]
    grid_value = values.gather(0, best_idx[None])[0]
    scale = torch.where(value <= grid_value, scale, grid[best_idx])  # [J]

    # α = pinv(A(σ)) w per filter; reconstruction Ŵ = A α.
    u, inv, vh = basis.svd(scale)
    coeffs = grouped @ u * inv[:, None, :] @ vh  # [J, m, F]
    alpha = coeffs.reshape(c_out, c_in, -1).permute(2, 1, 0).contiguous()
    approx = (coeffs @ basis.matrix(scale).transpose(-1, -2)).reshape(c_out, c_in, size, size)
    shapes = {"layer": (1,), "channel": (c_out,), "pair": (c_out, c_in)}
    return SRFFit(
        scale=scale.reshape(shapes[scale_sharing]),
        alpha=alpha,
        error=filter_error(approx, weight),
        kernel_size=fixed,
    )
