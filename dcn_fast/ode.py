"""ODE blocks of DCNs and ODE-Nets (DESIGN.md §3).

The published ODE function is
``f(t, h) = GN(conv2(t, CELU(GN(conv1(t, CELU(GN(h)))))))`` where ``conv(t, x)``
convolves ``cat[t·1, x]``. Here the time channel is never materialised: by
linearity ``conv(cat[t·1, x]) = conv_x(x) + t·M`` with ``M = conv_t(1)`` (a
``[1, C_out, Ho, Wo]`` map whose borders carry the zero padding), exact to
float rounding. With static weights M is computed once per solve.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .basis import HostReadback
from . import ops, solver as rk_solver
from .checkpoint import REPLAYS, check_method, checkpointed_odeint
from .functional import checked_radius
from .modules import SRFConv2d

__all__ = ["TimeConv", "ODEFunc", "ODEBlock", "META_KINDS", "TIME_CONV_KINDS", "GRADIENTS", "SOLVERS"]

#: How an ODE block differentiates its solve (see :class:`ODEBlock`).
GRADIENTS = ("checkpoint", "adjoint", "backprop")

#: Which solver integrates an ODE block: dcn_fast's own (:mod:`dcn_fast.solver`) or torchdiffeq's.
SOLVERS = ("dcn_fast", "torchdiffeq")

#: Meta-parametrised scale/coefficient laws of the paper's Table 4.
META_KINDS = ("sigma_t", "sigma_t2", "sigma_alpha_t")

#: Every kind of :class:`TimeConv`.
TIME_CONV_KINDS = ("conv", "srf", "srf_pair", *META_KINDS)

#: t is clipped to [T_MIN, T_MAX] and scaled by TAU before entering a meta law.
T_MIN, T_MAX, TAU = -0.5, 2.5, 0.5


class TimeConv(nn.Module):
    """``conv(t, x)``: a convolution of ``cat[t·1, x]`` without the concatenation.

    Args:
        channels_in, channels_out: channels of ``x`` and of the result (the
            underlying layer sees ``channels_in + 1`` inputs, time first, as in
            the published ``ConcatConv2d``).
        kind: ``"conv"`` (3x3 ``nn.Conv2d`` with bias, as ODE-Net), ``"srf"``
            (``SRFConv2d``, one σ), ``"srf_pair"`` (σ^ji, fixed 7x7), or a
            meta law of :data:`META_KINDS` (σ and/or α functions of t).
        backend: SRF backend.

    ``layer`` is the ``nn.Conv2d`` or :class:`SRFConv2d` over all ``channels_in + 1``
    inputs. The meta laws (paper Table 4) use its ``scale`` and ``alpha`` as their
    values at s = 0, with s = τ·clip(t, T_MIN, T_MAX):
    ``scale(t) = layer.scale + scale_t·s (+ scale_t2·s²)``,
    ``alpha(t) = layer.alpha (+ alpha_t·s)``.
    """

    def __init__(self, channels_in: int, channels_out: int, kind: str = "srf", backend: str = "auto") -> None:
        super().__init__()
        if kind not in TIME_CONV_KINDS:
            raise ValueError(f"kind must be one of {', '.join(map(repr, TIME_CONV_KINDS))}, got {kind!r}")
        self.kind = kind
        c_in = channels_in + 1
        self._cache: dict | None = None
        self._constants: rk_solver.SolveConstants | None = None
        if kind == "conv":
            self.layer = nn.Conv2d(c_in, channels_out, 3, padding=1)
        elif kind == "srf_pair":
            self.layer = SRFConv2d(c_in, channels_out, scale_sharing="pair", kernel_size=7, backend=backend)
        else:
            self.layer = SRFConv2d(c_in, channels_out, backend=backend)
        if kind in META_KINDS:
            # Inits of the official code (srf/structured_conv_layer_*.py): every t coefficient of
            # log2 σ ~ N(0, (2/3)²), its intercept ~ N(0, 0.1²); α's slope ~ N(0, 0.1²), its
            # intercept ~ N(0, 0.05²). (The paper's table gives σ(t²)'s t coefficient 2/3N.)
            self.scale_t = nn.Parameter(torch.randn(1) * (2 / 3))
            if kind == "sigma_t2":
                self.scale_t2 = nn.Parameter(torch.randn(1) * (2 / 3))
            if kind == "sigma_alpha_t":
                self.alpha_t = nn.Parameter(torch.randn_like(self.layer.alpha) * 0.1)
            with torch.no_grad():
                self.layer.scale.normal_(0.0, 0.1)
                if kind == "sigma_alpha_t":
                    self.layer.alpha.normal_(0.0, 0.05)
            self._bound_readback = HostReadback()

    @property
    def time_dependent(self) -> bool:
        return self.kind in META_KINDS

    def begin_solve(self, constants: rk_solver.SolveConstants | None = None) -> None:
        """Start of a solve: its evaluations share the taps and M while the weights stay fixed.

        Only within one solve: a graph-carrying M must not outlive the backward
        pass that consumes it. (The adjoint's backward solve evaluates f
        outside this scope and rebuilds them per evaluation.) In a checkpointed
        replay (``constants`` given) the evaluations see them as leaves, whose
        gradients reach the parameters once per solve.
        """
        self._cache = None if self.time_dependent else {}
        self._constants = None if self.time_dependent else constants

    def end_solve(self) -> None:
        self._cache = self._constants = None

    def _shared(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` as the solve's evaluations share it: a leaf of the replay, or itself."""
        return tensor if self._constants is None else self._constants.leaf(tensor)

    def meta_weights(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale [1], alpha [F, C_in+1, C_out])`` of a meta law at time ``t``."""
        s = TAU * t.clamp(T_MIN, T_MAX)
        scale = self.layer.scale + self.scale_t * s
        if self.kind == "sigma_t2":
            scale = scale + self.scale_t2 * s * s
        alpha = self.layer.alpha + self.alpha_t * s if self.kind == "sigma_alpha_t" else self.layer.alpha
        return scale, alpha

    def _law_parameters(self) -> tuple[torch.Tensor, ...]:
        """The parameters of log2 σ(s): intercept, slope and, for σ(t²), the square's coefficient."""
        return (self.layer.scale, self.scale_t) + ((self.scale_t2,) if self.kind == "sigma_t2" else ())

    def radius_bound(self) -> int:
        """The largest tap radius σ(t) reaches for t in [T_MIN, T_MAX] (meta kinds).

        Taps laid out at this radius are exact at every t (zero past σ(t)'s own
        radius), so an evaluation reads nothing back to the host: the
        coefficients are read once after each change (:class:`HostReadback`).
        """
        return self._bound_readback.get(self._law_parameters(), _read_radius_bound, truncate=self.layer.truncate)

    def _weights(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(scale, alpha, taps) of the SRF kinds at time t."""
        if self.time_dependent:
            scale, alpha = self.meta_weights(t)
            return scale, alpha, self.layer.taps_at(scale, self.radius_bound())
        return self.layer.scale, self.layer.alpha, self.layer.taps()

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        # Entries made without a graph must not serve an evaluation that needs one
        # (a checkpointed replay recomputes stages without a graph, then with one).
        cache = {} if self._cache is None else self._cache.setdefault(torch.is_grad_enabled(), {})
        weights = None
        if self.kind != "conv":
            # "built": with their graph to the parameters (M is built from them); "weights": as used.
            if "built" not in cache:
                cache["built"] = self._weights(t)
                cache["weights"] = tuple(map(self._shared, cache["built"]))
            weights = cache["weights"]
        key = tuple(x.shape[-2:])
        m = cache.get(key)
        if m is None:
            m = cache[key] = self._shared(self._time_map(key, cache.get("built"), x))
        if self.kind == "conv":
            out = F.conv2d(x, self.layer.weight[:, 1:], self.layer.bias, padding=self.layer.padding)
            return out + t.to(out.dtype) * m
        # The SRF kernels add t·M as they write the output; its gradient is summed over
        # the batch before it meets t (not a batch-sized product per evaluation).
        # The convolution's arguments are checked once per solve (and state shape): see SRFCall.
        plan_key = ("plan", tuple(x.shape), x.dtype, x.device)
        call = cache.get(plan_key)
        if call is None:
            scale, alpha, taps = weights
            call = cache[plan_key] = self.layer.plan(x, taps, scale=scale, alpha=alpha, in_channels=slice(1, None))
        return call(x, t.to(m.dtype) * m[0])

    def _time_map(self, size: tuple[int, int], weights, like: torch.Tensor) -> torch.Tensor:
        """M = conv_t(1) ``[1, C_out, H, W]`` without a convolution.

        With a constant input, output pixel (h, w) sums the time filter over the
        taps that land inside the image: ``M[o,h,w] = Σ_(a,c) W_t[o,a,c]·in(h,a)·in(w,c)``,
        one einsum of the small dense time filter with two 0/1 masks.
        """
        if self.kind == "conv":
            w_t = self.layer.weight[:, 0]
        else:
            _, alpha, taps = weights
            w_t = self.layer.filters(taps, alpha=alpha, in_channels=slice(0, 1))[:, 0]
        radius = w_t.shape[-1] // 2
        offsets = torch.arange(-radius, radius + 1, device=like.device)

        def inside(n: int) -> torch.Tensor:
            pos = torch.arange(n, device=like.device)[:, None] + offsets
            return ((pos >= 0) & (pos < n)).to(w_t.dtype)

        return torch.einsum("oac,ha,wc->ohw", w_t, inside(size[0]), inside(size[1]))[None].to(like.dtype)


def _read_radius_bound(*law_parameters: torch.Tensor, truncate: float) -> int:
    """:meth:`TimeConv.radius_bound` from the law's parameters: one host read."""
    coeffs = torch.cat([p.detach().reshape(1) for p in law_parameters]).double().tolist()  # one read
    intercept, slope, square = coeffs + [0.0] * (3 - len(coeffs))
    ends = [TAU * T_MIN, TAU * T_MAX]
    # The vertex, clipped to the interval, may be the highest (concave) or lowest (convex) point.
    vertex = [min(max(-slope / (2 * square), ends[0]), ends[1])] if square else []
    values = [intercept + slope * s + square * s * s for s in ends + vertex]
    # Both ends of log2 σ(t) over the interval: the lowest is held to MIN_SCALE like any
    # scale; the highest sets the radius (the margin covers float32 rounding of σ(t) on
    # the device: the extra taps are zeros).
    span = torch.tensor([min(values), max(values) + 1e-6], dtype=torch.float64)
    return checked_radius(span, truncate, None)


def group_norm(channels: int, groups: int | None = None) -> nn.GroupNorm:
    """GroupNorm with min(32, C) groups (or ``groups``)."""
    return nn.GroupNorm(groups or min(32, channels), channels)


def _fused_activation(activation: nn.Module | None) -> tuple[str, float] | None:
    """``(name, alpha)`` of ``activation`` for :func:`dcn_fast.ops.group_norm_act`, None if it has none.

    None (no activation) is not fused: the op's ``"identity"`` variant is
    slower than ATen's ``group_norm`` (fwd+bwd 234 vs 200 µs at [8, 32, 30, 30],
    2-core CPU); the fusion pays only where it saves the activation's passes.
    """
    if type(activation) is nn.CELU:
        return "celu", float(activation.alpha)
    if type(activation) is nn.ReLU:
        return "relu", 1.0
    return None


def norm_act(norm: nn.Module, input: torch.Tensor, activation: nn.Module | None) -> torch.Tensor:
    """``activation(norm(input))`` (``norm(input)`` for None), as one fused op where there is one.

    An ``nn.GroupNorm`` followed by ``nn.CELU`` or ``nn.ReLU`` runs
    :func:`dcn_fast.ops.group_norm_act` on the CPU (one statistics pass, one
    normalise–affine–activate pass, a fused backward); anything else, and other
    devices, run the modules themselves.
    """
    fused = _fused_activation(activation) if type(norm) is nn.GroupNorm else None
    if fused is not None and ops.group_norm_act_is_fused(input):
        return ops.group_norm_act(input, norm.weight, norm.bias, norm.num_groups, norm.eps, *fused)
    out = norm(input)
    return out if activation is None else activation(out)


class ODEFunc(nn.Module):
    """``f(t, h) = GN(conv2(t, act(GN(conv1(t, act(GN(h)))))))``; counts its evaluations in ``nfe``."""

    def __init__(
        self,
        channels: int,
        kind: str = "srf",
        activation: Callable[[], nn.Module] = nn.CELU,
        norm_groups: int | None = None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.norm1 = group_norm(channels, norm_groups)
        self.conv1 = TimeConv(channels, channels, kind, backend)
        self.norm2 = group_norm(channels, norm_groups)
        self.conv2 = TimeConv(channels, channels, kind, backend)
        self.norm3 = group_norm(channels, norm_groups)
        self.act = activation()
        self.nfe = 0

    def forward(self, t: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        self.nfe += 1
        out = self.conv1(t, norm_act(self.norm1, h, self.act))
        out = self.conv2(t, norm_act(self.norm2, out, self.act))
        return self.norm3(out)


class ODEBlock(nn.Module):
    """``h(T)`` of ``dh/dt = func(t, h)``, ``h(0) = x``, with an adaptive Runge–Kutta solver.

    Args:
        func: the ODE function (an :class:`ODEFunc`, or any module ``(t, h) -> dh``
            with an ``nfe`` counter).
        T: end time (DCN: 2, ODE-Net: 1).
        method, rtol, atol, options: the solver's method, tolerances and step
            options, with torchdiffeq's names and meaning.
        solver: ``"dcn_fast"`` (:mod:`dcn_fast.solver`, torchdiffeq's
            semantics with fused stage arithmetic; methods ``dopri5``, ``bosh3``,
            ``fehlberg2``, ``adaptive_heun``), ``"torchdiffeq"`` (every
            torchdiffeq method and option), or None (the default): ``"dcn_fast"``
            where it covers ``method`` and ``options``, else ``"torchdiffeq"``
            (e.g. the fixed-grid ``rk4``). ``gradient="adjoint"`` always trains
            through torchdiffeq's ``odeint_adjoint``; the solves without a
            gradient then use ``solver``.
        gradient: how the solve is differentiated (step sizes count as
            constants in every mode):

            - ``"checkpoint"``: the forward keeps no graph, only each accepted
              step's start; the backward replays the accepted steps last to
              first under autograd, one step's graph at a time
              (:mod:`dcn_fast.solver`; :mod:`dcn_fast.checkpoint` with
              ``solver="torchdiffeq"``). Exact (equal to ``"backprop"`` to
              float rounding); memory ~ accepted steps × state size + one step;
              needs an adaptive Runge–Kutta ``method``.
            - ``"adjoint"``: solves the adjoint ODE backwards (torchdiffeq's
              ``odeint_adjoint``): memory O(1) in the number of steps, gradients
              only as exact as that second solve, ~1.5× the forward's evaluations.
            - ``"backprop"``: backpropagates through every operation of the
              solver: exact, memory grows with every evaluation.
        adjoint_options: e.g. ``{"norm": "seminorm"}`` (fewer backward steps).
        replay: with ``gradient="checkpoint"`` only, what one replay holds a
            graph of: ``"step"`` (one accepted step, the default: faster) or
            ``"stage"`` (one evaluation, after recomputing the step's stages
            without a graph: less memory for more time).
        budget: ``solver="dcn_fast"`` only: solve without host syncs in exactly
            this many step attempts (accept/reject decided on the device; see
            :mod:`dcn_fast.solver`), for CUDA-graph capture; with
            ``gradient="backprop"`` or without a gradient. None (default):
            one host read per step.

    With ``"checkpoint"`` the backward evaluates ``func`` again: it must be
    deterministic (no dropout) and update no state (no BatchNorm in training
    mode); like the adjoint, it differentiates the input and ``func``'s
    parameters only.

    ``nfe_forward`` / ``nfe_backward`` hold the evaluations of the last forward
    and of the backward that followed it (updated by :meth:`count_backward`).
    """

    def __init__(
        self,
        func: nn.Module,
        T: float = 2.0,
        method: str = "dopri5",
        rtol: float = 1e-3,
        atol: float = 1e-3,
        gradient: str = "adjoint",
        options: dict | None = None,
        adjoint_options: dict | None = None,
        replay: str | None = None,
        solver: str | None = None,
        budget: int | None = None,
    ) -> None:
        super().__init__()
        if not (isinstance(T, (int, float)) and math.isfinite(T) and T > 0):
            raise ValueError(f"T must be a finite number > 0, got {T!r}")
        for name, tol in (("rtol", rtol), ("atol", atol)):
            if not (isinstance(tol, (int, float)) and tol > 0):
                raise ValueError(f"{name} must be > 0, got {tol!r}")
        if gradient not in GRADIENTS:
            raise ValueError(f"gradient must be one of {', '.join(map(repr, GRADIENTS))}, got {gradient!r}")
        if solver is None:
            covered = method in rk_solver.METHODS and not set(options or {}) - set(rk_solver.OPTIONS)
            solver = "dcn_fast" if covered or budget is not None else "torchdiffeq"
        if solver not in SOLVERS:
            raise ValueError(f"solver must be one of {', '.join(map(repr, SOLVERS))}, got {solver!r}")
        if solver == "dcn_fast":
            rk_solver.check_solver_arguments(method, options, budget)
            if budget is not None and gradient == "checkpoint":
                raise ValueError("budget (the sync-free solve) takes gradient='backprop' or 'adjoint' "
                                 "(its solves without a gradient), not 'checkpoint'")
        elif budget is not None:
            raise ValueError(f"budget applies to solver='dcn_fast' only, got budget={budget!r} with solver={solver!r}")
        elif gradient == "checkpoint":
            check_method(method, options)
        if replay is not None and gradient != "checkpoint":
            raise ValueError(f"replay applies to gradient='checkpoint' only, got replay={replay!r} "
                             f"with gradient={gradient!r}")
        replay = replay or "step"
        if replay not in REPLAYS:
            raise ValueError(f"replay must be one of {', '.join(map(repr, REPLAYS))}, got {replay!r}")
        self.func, self.T, self.method = func, float(T), method
        self.rtol, self.atol, self.gradient = rtol, atol, gradient
        self.options, self.adjoint_options, self.replay = options, adjoint_options, replay
        self.solver, self.budget = solver, budget
        self.nfe_forward = 0
        self.nfe_backward = 0
        self._nfe_after_forward = 0

    def _time_convs(self):
        return [m for m in self.func.modules() if isinstance(m, TimeConv)]

    @contextmanager
    def _solve_scope(self, constants: rk_solver.SolveConstants | None = None):
        """The evaluations of one solve (or of its replay) share the layers' taps and time maps."""
        convs = self._time_convs()
        for conv in convs:
            conv.begin_solve(constants)
        try:
            yield
        finally:
            for conv in convs:
                conv.end_solve()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        start = self.func.nfe
        params = [p for p in self.func.parameters() if p.requires_grad]
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or bool(params))
        solver = dict(rtol=self.rtol, atol=self.atol, method=self.method)
        with self._solve_scope():
            if self.gradient == "adjoint" and needs_grad:
                import torchdiffeq

                t = torch.tensor([0.0, self.T], dtype=x.dtype, device=x.device)
                kwargs = {"adjoint_options": self.adjoint_options} if self.adjoint_options else {}
                out = torchdiffeq.odeint_adjoint(self.func, x, t, options=self.options,
                                                 adjoint_params=tuple(params), **solver, **kwargs)[1]
            elif self.solver == "dcn_fast":
                gradient = "checkpoint" if self.gradient == "checkpoint" else "backprop"
                out = rk_solver.solve(self.func, x, self.T, options=self.options, gradient=gradient, params=params,
                                      replay=self.replay, scope=self._solve_scope, budget=self.budget, **solver)
            elif self.gradient == "checkpoint" and needs_grad:
                out = checkpointed_odeint(self.func, x, self.T, params=params, options=self.options,
                                          replay=self.replay, scope=self._solve_scope, **solver)
            else:
                import torchdiffeq

                # Backprop's first step size chosen without a gradient, as every later one is
                # (and as the checkpointed replay and dcn_fast's solver treat it).
                options = self._backprop_options(x) if needs_grad else self.options
                t = torch.tensor([0.0, self.T], dtype=x.dtype, device=x.device)
                out = torchdiffeq.odeint(self.func, x, t, options=options, **solver)[1]
        self.nfe_forward = self.func.nfe - start
        self._nfe_after_forward = self.func.nfe
        return out

    @torch.no_grad()
    def trajectory(self, x: torch.Tensor, times: torch.Tensor) -> torch.Tensor:
        """``h(t)`` at each of ``times`` (increasing, from 0 to at most ``T``), ``[len(times), *x.shape]``.

        One solve with the block's solver, without a graph: dopri5 interpolates the
        extra output times inside its steps, so ``h(T)`` is the forward's.
        """
        import torchdiffeq

        times = torch.as_tensor(times, dtype=x.dtype, device=x.device)
        if times.ndim != 1 or times.numel() < 2 or bool(times[0] != 0) or bool((times.diff() <= 0).any()) \
                or float(times[-1]) > self.T * (1 + 1e-6):
            raise ValueError(f"times must increase from 0 to at most T={self.T}, got {times.tolist()}")
        start = self.func.nfe
        with self._solve_scope():
            if self.solver == "dcn_fast":
                rk = rk_solver.RungeKutta(self.func, x, method=self.method, rtol=self.rtol, atol=self.atol,
                                          options=self.options)
                out = torch.stack([x, *rk.integrate(x, times.tolist())])
            else:
                out = torchdiffeq.odeint(self.func, x, times, rtol=self.rtol, atol=self.atol, method=self.method,
                                         options=self.options)
        self.nfe_forward = self.func.nfe - start
        return out

    def _backprop_options(self, x: torch.Tensor) -> dict | None:
        """torchdiffeq's options with the first step size chosen without a gradient (as every later one is)."""
        options = self.options
        if self.method in rk_solver.METHODS and "first_step" not in (options or {}) \
                and not set(options or {}) - set(rk_solver.OPTIONS):
            rk = rk_solver.RungeKutta(self.func, x, method=self.method, rtol=self.rtol, atol=self.atol,
                                      options=options)
            with torch.no_grad():
                t0 = torch.zeros((), dtype=rk.dtype)
                first = rk.initial_step(t0, x, self.func(t0.to(rk.real), x))
            options = {**(options or {}), "first_step": float(first)}
        return options

    def count_backward(self) -> int:
        """Evaluations since the end of the last forward (call after ``backward()``)."""
        self.nfe_backward = self.func.nfe - self._nfe_after_forward
        return self.nfe_backward

    def extra_repr(self) -> str:
        replay = f", replay={self.replay!r}" if self.gradient == "checkpoint" else ""
        budget = f", budget={self.budget}" if self.budget is not None else ""
        return (f"T={self.T}, method={self.method!r}, rtol={self.rtol}, atol={self.atol}, "
                f"gradient={self.gradient!r}{replay}, solver={self.solver!r}{budget}")
