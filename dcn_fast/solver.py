"""dcn_fast's adaptive explicit Runge–Kutta solver: torchdiffeq's semantics, fused stage arithmetic.

``solve(func, y0, T, ...)`` integrates ``dy/dt = func(t, y)`` from 0 to T as
``torchdiffeq.odeint(func, y0, [0, T], method=...)`` does, decision for
decision: the same initial step selection (Hairer's rule), the RMS error norm
over ``atol + rtol·max(|y₀|, |y₁|)``, the step-size controller (safety,
ifactor, dfactor, min/max step), first-same-as-last, and the quartic dense
output at T from the step that passed it. In float64 it takes the same
accepted and rejected steps and the same number of evaluations, with outputs
equal to float rounding. What differs is the arithmetic around the
evaluations: the stages are separate contiguous tensors, and each stage input
``y₀ + Σ_j (β_ij·dt)·k_j``, the solution, the dense output and the error ratio
are one pass each over memory (``dcn_fast::rk_combine`` /
``dcn_fast::rk_error_ratio``: C++ on the CPU, plain PyTorch elsewhere),
where torchdiffeq forms a full-size temporary and a strided reduction over a
trailing stage dimension for each.

Gradients (step sizes are constants, as torchdiffeq treats every step size
but the first):

- ``gradient="backprop"``: autograd through the evaluations and the
  (linear) stage combinations;
- ``gradient="checkpoint"``: the forward keeps no graph, only each accepted
  step's start; the backward replays the accepted steps last to first, each
  stage's vector–Jacobian product by autograd through one evaluation and the
  linear stage arithmetic by hand with the same fused combinations
  (``replay="step"`` keeps the step's evaluation graphs, ``"stage"`` one at
  a time). Exact: equal to backprop to float rounding.

``budget=N`` solves without host synchronisation: N step attempts, each
accepted or rejected on the device with masked updates, so a whole solve (and
its checkpointed replay) can be captured in one CUDA graph. With a budget that
suffices it gives the synced solver's result; :func:`solve` then checks once,
at the end, that T was reached (skipped while a CUDA graph is being captured).

Methods: the adaptive Runge–Kutta tableaus of torchdiffeq 0.2.5 below
(:data:`METHODS`); the others (fixed-grid, dopri8, adams, scipy) stay on
torchdiffeq (``ODEBlock(solver="torchdiffeq")``).
"""

from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch

from . import ops

__all__ = ["Tableau", "METHODS", "OPTIONS", "RungeKutta", "SolveConstants", "solve", "check_solver_arguments"]


@dataclass(frozen=True)
class Tableau:
    """An embedded explicit Runge–Kutta pair with a dense-output midpoint.

    Stage 0 is f(t₀, y₀); stage i ≥ 1 is evaluated at ``t₀ + alpha[i-1]·dt`` on
    ``y₀ + dt·Σ_j beta[i-1][j]·k_j``. ``c_sol`` gives the solution, ``c_error``
    the error estimate, ``mid`` the state at the step's midpoint (for the
    quartic dense output), all over the ``len(alpha) + 1`` stages; ``order`` is
    the exponent the step-size controller uses (torchdiffeq's ``order``).
    """

    alpha: tuple[float, ...]
    beta: tuple[tuple[float, ...], ...]
    c_sol: tuple[float, ...]
    c_error: tuple[float, ...]
    mid: tuple[float, ...]
    order: int

    @property
    def stages(self) -> int:
        return len(self.alpha) + 1

    @property
    def fsal(self) -> bool:
        """The solution is the last stage's input (first-same-as-last): no extra combination."""
        return self.c_sol[-1] == 0 and tuple(self.c_sol[:-1]) == tuple(self.beta[-1])


# The coefficients of torchdiffeq 0.2.5 (dopri5.py, bosh3.py, fehlberg2.py, adaptive_heun.py), as
# the same Python expressions, so they are the same doubles.
METHODS: dict[str, Tableau] = {
    "dopri5": Tableau(
        alpha=(1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0),
        beta=(
            (1 / 5,),
            (3 / 40, 9 / 40),
            (44 / 45, -56 / 15, 32 / 9),
            (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
            (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
            (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
        ),
        c_sol=(35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0),
        c_error=(35 / 384 - 1951 / 21600, 0.0, 500 / 1113 - 22642 / 50085, 125 / 192 - 451 / 720,
                 -2187 / 6784 - -12231 / 42400, 11 / 84 - 649 / 6300, -1.0 / 60.0),
        mid=(6025192743 / 30085553152 / 2, 0.0, 51252292925 / 65400821598 / 2, -2691868925 / 45128329728 / 2,
             187940372067 / 1594534317056 / 2, -1776094331 / 19743644256 / 2, 11237099 / 235043384 / 2),
        order=5,
    ),
    "bosh3": Tableau(
        alpha=(1 / 2, 3 / 4, 1.0),
        beta=((1 / 2,), (0.0, 3 / 4), (2 / 9, 1 / 3, 4 / 9)),
        c_sol=(2 / 9, 1 / 3, 4 / 9, 0.0),
        c_error=(2 / 9 - 7 / 24, 1 / 3 - 1 / 4, 4 / 9 - 1 / 3, -1 / 8),
        mid=(0.0, 0.5, 0.0, 0.0),
        order=3,
    ),
    "fehlberg2": Tableau(
        alpha=(1 / 2, 1.0),
        beta=((1 / 2,), (1 / 256, 255 / 256)),
        c_sol=(1 / 512, 255 / 256, 1 / 512),
        c_error=(-1 / 512, 0.0, 1 / 512),
        mid=(0.0, 0.5, 0.0),
        order=2,
    ),
    "adaptive_heun": Tableau(
        alpha=(1.0,),
        beta=((1.0,),),
        c_sol=(0.5, 0.5),
        c_error=(0.5, -0.5),
        mid=(0.5, 0.0),
        order=2,
    ),
}

#: Solver options (torchdiffeq's names and defaults) this solver takes.
OPTIONS = {"first_step": None, "safety": 0.9, "ifactor": 10.0, "dfactor": 0.2, "min_step": 0.0,
           "max_step": math.inf, "max_num_steps": 2**31 - 1}

GRADIENTS = ("backprop", "checkpoint")
REPLAYS = ("step", "stage")


def check_solver_arguments(method: str, options: dict | None, budget: int | None = None) -> dict:
    """Validate ``method``, ``options`` and ``budget``; return the options with defaults filled in."""
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not one of dcn_fast's solver methods ({', '.join(METHODS)}); "
                         f"solver='torchdiffeq' runs torchdiffeq's other methods")
    unknown = set(options or {}) - set(OPTIONS)
    if unknown:
        raise ValueError(f"options {sorted(unknown)} are not supported by dcn_fast's solver (it takes "
                         f"{', '.join(OPTIONS)}); solver='torchdiffeq' takes torchdiffeq's others")
    merged = {**OPTIONS, **(options or {})}
    for name in ("safety", "ifactor", "dfactor", "min_step", "max_step"):
        value = merged[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or value < 0:
            raise ValueError(f"options[{name!r}] must be a number >= 0, got {value!r}")
    if merged["first_step"] is not None:
        value = merged["first_step"]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"options['first_step'] must be a finite number > 0, got {value!r}")
    steps = merged["max_num_steps"]
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"options['max_num_steps'] must be an int >= 1, got {steps!r}")
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 1):
        raise ValueError(f"budget must be an int >= 1 (step attempts) or None, got {budget!r}")
    return merged


# --- the fused stage arithmetic -----------------------------------------------------------------

def combine(base: torch.Tensor | None, terms: Sequence[torch.Tensor], coeffs: torch.Tensor) -> torch.Tensor:
    """``base + Σ_j coeffs[j]·terms[j]`` in one pass (``base`` None: 0); ``coeffs`` float64 ``[len(terms)]``.

    Differentiable in ``base`` and ``terms``. The C++ kernel on the CPU, plain
    PyTorch elsewhere (and where no compiler is available).
    """
    like = base if base is not None else terms[0]
    if like.device.type == "cpu" and ops.cpu_kernel_available() and like.dtype in (torch.float32, torch.float64):
        return torch.ops.dcn_fast.rk_combine(base, [t.contiguous() for t in terms], coeffs)
    return ops.rk_combine_reference(base, terms, coeffs)


@torch.no_grad()
def error_ratio(y0: torch.Tensor, y1: torch.Tensor, terms: Sequence[torch.Tensor], coeffs: torch.Tensor,
                rtol: float, atol: float) -> torch.Tensor:
    """torchdiffeq's RMS error ratio of the estimate ``Σ_j coeffs[j]·terms[j]``, a 0-d float64 tensor."""
    if y0.device.type == "cpu" and ops.cpu_kernel_available() and y0.dtype in (torch.float32, torch.float64):
        return torch.ops.dcn_fast.rk_error_ratio(y0, y1, [t.contiguous() for t in terms], coeffs, rtol, atol)
    return ops.rk_error_ratio_reference(y0, y1, terms, coeffs, rtol, atol)


def _rms(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.abs().pow(2).mean().sqrt()


class RungeKutta:
    """One configured solve: ``func``, a method of :data:`METHODS`, tolerances and options.

    Time-like values (t, dt, the controller's factors) are 0-d float64 tensors
    (or wider, as the state asks) on ``time_device``: the CPU for the synced
    solver, the state's device for the sync-free one. Stage times reach
    ``func`` in the state's real dtype, as torchdiffeq passes them.
    """

    def __init__(self, func: Callable, y0: torch.Tensor, *, method: str, rtol: float, atol: float,
                 options: dict | None = None, time_device: torch.device | None = None) -> None:
        options = check_solver_arguments(method, options)
        self.func, self.tableau = func, METHODS[method]
        self.rtol, self.atol = float(rtol), float(atol)
        self.real = y0.abs().dtype if y0.is_complex() else y0.dtype
        self.dtype = torch.promote_types(torch.float64, self.real)
        self.time_device = torch.device("cpu") if time_device is None else time_device
        time = dict(dtype=self.dtype, device=self.time_device)
        self.first_step = None if options["first_step"] is None else torch.tensor(options["first_step"], **time)
        self.safety, self.ifactor, self.dfactor, self.min_step, self.max_step = (
            torch.tensor(float(options[name]), **time) for name in ("safety", "ifactor", "dfactor", "min_step",
                                                                    "max_step"))
        self.max_num_steps = options["max_num_steps"]
        # The tableau in the state's dtype (as torchdiffeq casts it), with each combination's
        # zero coefficients left out: they are zeros of the tableau, whatever dt.
        state = dict(dtype=y0.dtype, device=self.time_device)
        t = self.tableau
        self._alpha = torch.tensor(t.alpha, dtype=torch.float64).to(**state)
        self._stage_rows = [self._row(b, state) for b in t.beta]
        self._solution_row = self._row(t.c_sol, state)
        self._error_row = self._row(t.c_error, state)
        self._c_sol = torch.tensor(t.c_sol, dtype=torch.float64).to(**state)
        self._mid = torch.tensor(t.mid, dtype=torch.float64).to(**state)
        self._exponent = torch.tensor(t.order, **time).reciprocal()

    @staticmethod
    def _row(coefficients: Sequence[float], state: dict) -> tuple[list[int], torch.Tensor]:
        used = [j for j, c in enumerate(coefficients) if c != 0]
        return used, torch.tensor([coefficients[j] for j in used], dtype=torch.float64).to(**state)

    def _weights(self, row: tuple[list[int], torch.Tensor], dt: torch.Tensor, terms: Sequence[torch.Tensor]):
        """The terms of a tableau row and their coefficients ``row·dt``, formed in the state's dtype."""
        used, coefficients = row
        return [terms[j] for j in used], (coefficients * dt).to(torch.float64)

    def stage_time(self, i: int, t0: torch.Tensor, dt: torch.Tensor, t1: torch.Tensor) -> torch.Tensor:
        """Time of stage i ≥ 1 in the state's dtype; a node at 1 is nudged just before t₁ (torchdiffeq's ``PREV``)."""
        t0, dt, t1 = (v.to(self.real) for v in (t0, dt, t1))
        if self.tableau.alpha[i - 1] == 1.0:
            return torch.nextafter(t1, t1 - 1)
        return t0 + self._alpha[i - 1].to(self.real) * dt

    def stage_input(self, i: int, y0: torch.Tensor, ks: Sequence[torch.Tensor], dt: torch.Tensor) -> torch.Tensor:
        terms, coefficients = self._weights(self._stage_rows[i - 1], dt.to(self.real), ks)
        return combine(y0, terms, coefficients)

    def attempt(self, t0: torch.Tensor, dt: torch.Tensor, y0: torch.Tensor, f0: torch.Tensor):
        """One step attempt: ``(y₁, stages k, error ratio (0-d float64), t₁)``."""
        t1 = t0 + dt
        ks = [f0]
        y = y0
        for i in range(1, self.tableau.stages):
            y = self.stage_input(i, y0, ks, dt)
            ks.append(self.func(self.stage_time(i, t0, dt, t1), y))
        dt_state = dt.to(self.real)
        if not self.tableau.fsal:
            y = combine(y0, *self._weights(self._solution_row, dt_state, ks))
        terms, coefficients = self._weights(self._error_row, dt_state, ks)
        return y, ks, error_ratio(y0, y, terms, coefficients, self.rtol, self.atol), t1

    @torch.no_grad()
    def initial_step(self, t0: torch.Tensor, y0: torch.Tensor, f0: torch.Tensor) -> torch.Tensor:
        """torchdiffeq's ``_select_initial_step`` (Hairer, Nørsett, Wanner II.4), without a graph."""
        if self.first_step is not None:
            return self.first_step
        rtol, atol = (torch.tensor(v, dtype=self.dtype, device=y0.device) for v in (self.rtol, self.atol))
        scale = atol + torch.abs(y0) * rtol
        d0, d1 = _rms(y0 / scale).abs(), _rms(f0 / scale).abs()
        # torchdiffeq's branches as torch.where: no host read (the sync-free solve starts here).
        tiny = torch.tensor(1e-6, dtype=y0.dtype, device=y0.device)
        h0 = torch.where((d0 < 1e-5) | (d1 < 1e-5), tiny, (0.01 * d0 / d1).abs())
        f1 = self.func((t0.to(y0.device) + h0).to(self.real), y0 + h0 * f0)
        d2 = torch.abs(_rms((f1 - f0) / scale) / h0)
        h1 = torch.where((d1 <= 1e-15) & (d2 <= 1e-15), torch.max(tiny, h0 * 1e-3),
                         (0.01 / torch.maximum(d1, d2)) ** (1.0 / float(self.tableau.order)))
        return torch.min(100 * h0, h1.abs()).to(**dict(dtype=self.dtype, device=self.time_device))

    def next_step(self, dt: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
        """torchdiffeq's ``_optimal_step_size`` then the min/max clamp, branch-free (tensors throughout)."""
        ratio = ratio.to(dt)
        dfactor = torch.where(ratio < 1, torch.ones_like(self.dfactor), self.dfactor)
        factor = torch.min(self.ifactor, torch.max(self.safety / ratio ** self._exponent, dfactor))
        dt_next = torch.where(ratio == 0, dt * self.ifactor, dt * factor)
        return dt_next.clamp(self.min_step, self.max_step)

    def clamp_step(self, dt: torch.Tensor) -> torch.Tensor:
        return torch.where(torch.isfinite(dt), dt, self.min_step).clamp(self.min_step, self.max_step)

    def accepts(self, dt: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
        return ((ratio.to(dt) <= 1) & (dt <= self.max_step)) | (dt <= self.min_step)

    def dense_weights(self, t0: torch.Tensor, t1: torch.Tensor, dt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Coefficients w, float64 ``[stages]``, with ``y(t) = y₀ + Σ_j w_j·k_j`` in the step [t₀, t₁].

        torchdiffeq's quartic ``p(x) = e + d·x + c·x² + b·x³ + a·x⁴`` through y₀,
        y₁, the midpoint state and f₀, f₁, written as one linear combination:
        its y₀ weights sum to 1, so y₁ and y_mid enter as ``y₁ − y₀ = dt·Σ c_sol·k``
        and ``y_mid − y₀ = dt·Σ mid·k``.
        """
        x = ((t - t0) / (t1 - t0)).to(self._c_sol.dtype)
        x2 = x * x
        x3, x4 = x2 * x, x2 * x2
        to_y1 = -5 * x2 + 14 * x3 - 8 * x4
        to_mid = 16 * x2 - 32 * x3 + 16 * x4
        dt = dt.to(self._c_sol.dtype)
        weights = dt * (to_y1 * self._c_sol + to_mid * self._mid)
        ends = torch.zeros_like(weights)
        ends[0] = dt * (x - 4 * x2 + 5 * x3 - 2 * x4)
        ends[-1] = dt * (x2 - 3 * x3 + 2 * x4)
        return (weights + ends).to(torch.float64)

    def dense_output(self, step: "_Step", t: torch.Tensor) -> torch.Tensor:
        return combine(step.y0, step.ks, self.dense_weights(step.t0, step.t1, step.dt, t))

    # --- synced solve ------------------------------------------------------------------------

    def integrate(self, y0: torch.Tensor, times: Sequence[float],
                  on_accept: Callable[["_Step"], None] | None = None) -> list[torch.Tensor]:
        """``y`` at each of ``times[1:]`` (``times[0] = 0``, increasing), reading each step's decision on the host."""
        time = dict(dtype=self.dtype, device=self.time_device)
        t = torch.zeros((), **time)
        f = self.func(t.to(self.real), y0)
        dt = self.initial_step(t, y0, f)
        y, last, outputs = y0, None, []
        for end in times[1:]:
            end = torch.tensor(float(end), **time)
            attempts = 0
            while end > t:
                if attempts >= self.max_num_steps:
                    raise RuntimeError(f"the ODE solve took more than max_num_steps={self.max_num_steps} step "
                                       f"attempts to reach t={float(end):g} (at t={float(t):g})")
                attempts += 1
                dt = self.clamp_step(dt)
                if not t + dt > t:
                    raise RuntimeError(f"the ODE solve's step size underflowed at t={float(t):g} (dt={float(dt):g}): "
                                       f"the solution is changing too fast for rtol={self.rtol:g}, atol={self.atol:g}")
                y1, ks, ratio, t1 = self.attempt(t, dt, y, f)
                if torch.isnan(ratio):
                    raise RuntimeError(f"the ODE solve produced non-finite values at t={float(t):g} "
                                       f"(dt={float(dt):g}): the state or its derivative diverged")
                if self.accepts(dt, ratio):
                    last = _Step(t, t1, dt, y, ks)
                    if on_accept is not None:
                        on_accept(last)
                    t, y, f = t1, y1, ks[-1]
                dt = self.next_step(dt, ratio)
            outputs.append(self.dense_output(last, end))
        return outputs

    # --- sync-free solve ----------------------------------------------------------------------

    def integrate_budget(self, y0: torch.Tensor, end: float, budget: int,
                         on_attempt: Callable[["_Step", torch.Tensor, torch.Tensor], None] | None = None):
        """``(y(end), reached)`` in exactly ``budget`` step attempts, without reading anything back.

        Each attempt is taken whatever happened before; ``torch.where`` keeps an
        accepted one (and the dense output of the one that passes ``end``) and
        drops the rest, so the result equals :meth:`integrate`'s when ``budget``
        covers its attempts. ``reached`` is a 0-d bool tensor on the device; a
        non-finite error ratio leaves it false. ``on_attempt(step, accepted,
        finished)`` sees each attempt with its two masks.
        """
        time = dict(dtype=self.dtype, device=self.time_device)
        t = torch.zeros((), **time)
        end = torch.tensor(float(end), **time)
        f = self.func(t.to(self.real), y0)
        dt = self.initial_step(t, y0, f)
        y, out = y0, torch.zeros_like(y0)
        done = torch.zeros((), dtype=torch.bool, device=self.time_device)
        failed = torch.zeros_like(done)
        for _ in range(budget):
            dt = self.clamp_step(dt)
            # A finished solve keeps attempting a harmless step (dt unchanged) whose result is dropped.
            y1, ks, ratio, t1 = self.attempt(t, dt, y, f)
            failed = failed | (torch.isnan(ratio) & ~done)
            accepted = self.accepts(dt, ratio) & ~done & ~failed & (t + dt > t)
            finished = accepted & (t1 >= end)
            step = _Step(t, t1, dt, y, ks)
            if on_attempt is not None:
                on_attempt(step, accepted, finished)
            out = torch.where(finished.to(y0.device), self.dense_output(step, torch.minimum(end, t1)), out)
            keep = accepted.to(y0.device)
            y, f = torch.where(keep, y1, y), torch.where(keep, ks[-1], f)
            t = torch.where(accepted, t1, t)
            dt = torch.where(done, dt, self.next_step(dt, ratio))
            done = done | finished
        return out, done & ~failed


@dataclass
class _Step:
    """A step attempt: its start and end time, size, initial state and stage derivatives."""

    t0: torch.Tensor
    t1: torch.Tensor
    dt: torch.Tensor
    y0: torch.Tensor
    ks: list


# --- gradients by replaying accepted steps ----------------------------------------------------

def _accumulate(total: list, found: Sequence[torch.Tensor | None]) -> None:
    total.extend([None] * (len(found) - len(total)))  # the replay's inputs grow (SolveConstants)
    for i, g in enumerate(found):
        if g is not None:
            total[i] = g if total[i] is None else total[i] + g


class SolveConstants:
    """Tensors an ODE function builds once per solve from its parameters (filters, time maps).

    A checkpointed replay differentiates every evaluation on its own. Were such a
    tensor shared with its graph, each evaluation's vector–Jacobian product would
    run the tensor's whole construction backwards again (for an SRF layer: the
    taps, the dense time filter, the time map: ~a third of a DCN-ODE step). In
    the replay the ODE function hands them instead to :meth:`leaf`, which
    returns a detached leaf and appends it to :attr:`inputs`: the replay
    differentiates against that list as it grows (``[*params, *leaves]``), the
    leaves' gradients add up over every step, and :meth:`backward` sends them
    through each construction once, as backprop through the solve does.
    """

    def __init__(self, params: Sequence[torch.Tensor]) -> None:
        self.num_params = len(params)
        self.inputs: list[torch.Tensor] = list(params)
        self._sources: list[torch.Tensor] = []

    def leaf(self, tensor: torch.Tensor) -> torch.Tensor:
        """A leaf standing for ``tensor`` in the replay's evaluations (``tensor`` itself without a graph)."""
        if not tensor.requires_grad:
            return tensor
        leaf = tensor.detach().requires_grad_()
        self._sources.append(tensor)
        self.inputs.append(leaf)
        return leaf

    def backward(self, grads: list) -> list:
        """The parameters' gradients: ``grads`` (over :attr:`inputs`) with the leaves' sent through their sources."""
        grads = grads + [None] * (len(self.inputs) - len(grads))
        params, leaves = grads[: self.num_params], grads[self.num_params:]
        used = [(s, g) for s, g in zip(self._sources, leaves) if g is not None]
        if used:
            sources, cotangents = zip(*used)
            found = torch.autograd.grad(sources, self.inputs[: self.num_params], cotangents, allow_unused=True)
            _accumulate(params, found)
        return params


@contextmanager
def _autocast_as(state):
    device_type, enabled, dtype = state
    with torch.autocast(device_type, dtype=dtype, enabled=enabled):
        yield


def _replay(rk: RungeKutta, step: _Step, weights: torch.Tensor, g_y: torch.Tensor, g_f: torch.Tensor | None,
            first: bool, params: Sequence[torch.Tensor], by_stage: bool, grads_params: list):
    """Vector–Jacobian product of one accepted step ``(y₀, f₀) → (y₀ + Σ_j w_j·k_j, k_last)``.

    ``weights`` are the step's output weights, float64 ``[stages]`` (``dt·c_sol``,
    or the dense output at T for the last step), ``g_y`` / ``g_f`` the cotangents
    of the two outputs (``g_f`` None for the last step). The stages' derivatives
    are recomputed (with their evaluations' graphs unless ``by_stage``); the
    cotangent of stage i is ``w_i·g_y (+ g_f for the last) + Σ_(m>i) β_mi·dt·g_(y_m)``,
    one fused combination, and its evaluation's vector–Jacobian product gives
    g_(y_i); g_y₀ is ``g_y + Σ_i g_(y_i)``. Returns ``(g_y₀, g_f₀)``. ``first``: f₀
    is the solve's first evaluation, recomputed here, and its product is folded
    into g_y₀ (g_f₀ is then None). Parameter gradients accumulate in ``grads_params``.
    """
    t = rk.tableau
    stages = t.stages
    t0, dt, t1 = step.t0, step.dt, step.t1
    dt_state = dt.to(rk.real)
    y0 = step.y0.detach()

    def evaluate(i: int, y: torch.Tensor, with_graph: bool) -> torch.Tensor:
        time = t0.to(rk.real) if i == 0 else rk.stage_time(i, t0, dt, t1)
        with torch.enable_grad() if with_graph else torch.no_grad():
            return rk.func(time, y)

    # Stage states (leaves of their evaluations' graphs) and derivatives, as the forward formed them.
    leaves = [y0.detach().requires_grad_() if first and not by_stage else y0] + [None] * (stages - 1)
    ks = [evaluate(0, leaves[0], not by_stage) if first else step.ks[0].detach()] + [None] * (stages - 1)
    for i in range(1, stages):
        with torch.no_grad():
            y_i = rk.stage_input(i, y0, [k.detach() for k in ks[:i]], dt)
        leaves[i] = y_i if by_stage else y_i.requires_grad_()
        ks[i] = evaluate(i, leaves[i], not by_stage)

    g_stage: dict[int, torch.Tensor] = {}

    def stage_cotangent(i: int) -> torch.Tensor | None:
        terms, coefficients = [], []
        if weights[i] != 0:
            terms.append(g_y)
            coefficients.append(weights[i])
        if i == stages - 1 and g_f is not None:
            terms.append(g_f)
            coefficients.append(weights.new_ones(()))
        for m in range(i + 1, stages):
            beta = t.beta[m - 1][i] if i < len(t.beta[m - 1]) else 0.0
            if beta != 0 and m in g_stage:  # as the forward: β in the state's dtype times dt
                terms.append(g_stage[m])
                coefficients.append((torch.tensor(beta, dtype=torch.float64).to(rk.real) * dt_state).double())
        return combine(None, terms, torch.stack(coefficients)) if terms else None

    def vjp(i: int, cotangent: torch.Tensor) -> torch.Tensor:
        if by_stage:  # this evaluation's graph only, now
            y = leaves[i].detach().requires_grad_()
            k = evaluate(i, y, True)
        else:
            y, k = leaves[i], ks[i]
        # retain_graph: an ODE function's own per-solve tensors (not handed to SolveConstants)
        # may be shared by every evaluation; each evaluation's own graph goes with its outputs.
        found = torch.autograd.grad(k, [y, *params], cotangent, retain_graph=True, allow_unused=True)
        _accumulate(grads_params, found[1:])
        return found[0]

    for i in reversed(range(1, stages)):
        cotangent = stage_cotangent(i)
        if cotangent is not None:
            g_stage[i] = vjp(i, cotangent)
    g_f0 = stage_cotangent(0)
    g_terms = [g_y, *g_stage.values()]
    g_y0 = combine(None, g_terms, weights.new_ones(len(g_terms)))
    if first:
        if g_f0 is not None:
            g_y0 = g_y0 + vjp(0, g_f0)
        return g_y0, None
    return g_y0, g_f0


class _CheckpointedSolve(torch.autograd.Function):
    @staticmethod
    def forward(ctx, solve: dict, y0: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        rk: RungeKutta = solve["rk"]
        steps: list[_Step] = []
        out = rk.integrate(y0, [0.0, solve["T"]], on_accept=steps.append)[0]
        last = steps[-1]
        ctx.final_weights = rk.dense_weights(last.t0, last.t1, last.dt,
                                             torch.tensor(solve["T"], dtype=rk.dtype, device=rk.time_device))
        ctx.solve = solve
        ctx.times = [(s.t0, s.t1, s.dt) for s in steps]
        device_type = y0.device.type
        ctx.autocast = (device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
        ctx.y0_requires_grad = y0.requires_grad
        ctx.num_params = len(params)
        # Saved like any tensor autograd keeps (saved-tensor hooks apply): the parameters, each
        # accepted step's y₀ and, past the first, its f₀ (the previous step's last stage).
        ctx.save_for_backward(*params, *(s.y0 for s in steps), *(s.ks[0] for s in steps[1:]))
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        solve, times = ctx.solve, ctx.times
        rk: RungeKutta = solve["rk"]
        saved = ctx.saved_tensors
        params, saved = saved[: ctx.num_params], saved[ctx.num_params:]
        states, derivatives = saved[: len(times)], (None, *saved[len(times):])
        constants = SolveConstants(params)
        grads_params: list[torch.Tensor | None] = [None] * len(params)
        g_y, g_f = grad_out, None
        with _autocast_as(ctx.autocast), solve["scope"](constants):
            for n in reversed(range(len(times))):
                t0, t1, dt = times[n]
                step = _Step(t0, t1, dt, states[n], [derivatives[n]])
                if n == len(times) - 1:
                    weights = ctx.final_weights
                else:
                    used, row = rk._solution_row
                    weights = torch.zeros(rk.tableau.stages, dtype=torch.float64, device=rk.time_device)
                    weights[used] = (row * dt.to(rk.real)).to(torch.float64)
                g_y, g_f = _replay(rk, step, weights, g_y, g_f, n == 0, constants.inputs,
                                   solve["replay"] == "stage", grads_params)
            grads_params = constants.backward(grads_params)
        return (None, g_y if ctx.y0_requires_grad else None, *grads_params)


def solve(
    func: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    y0: torch.Tensor,
    T: float,
    *,
    rtol: float,
    atol: float,
    method: str = "dopri5",
    options: dict | None = None,
    gradient: str = "backprop",
    params: Iterable[torch.Tensor] = (),
    replay: str = "step",
    scope: Callable[[], object] | None = None,
    budget: int | None = None,
) -> torch.Tensor:
    """``y(T)`` of ``dy/dt = func(t, y)``, ``y(0) = y0``, as ``torchdiffeq.odeint(func, y0, [0, T])[1]``.

    Args:
        func: ``(t, y) -> dy/dt``; ``t`` a 0-d tensor in ``y``'s dtype, ``y`` and
            the result shaped like ``y0``.
        y0: the initial state, any shape, float32 or float64.
        T: end time, a Python number > 0.
        rtol, atol: tolerances (> 0).
        method: one of :data:`METHODS`.
        options: torchdiffeq's step options :data:`OPTIONS` (``first_step``,
            ``safety``, ``ifactor``, ``dfactor``, ``min_step``, ``max_step``,
            ``max_num_steps``).
        gradient: ``"backprop"`` (autograd through the solve; also the mode
            without gradients) or ``"checkpoint"`` (replay of the accepted steps).
        params: with ``"checkpoint"``: the tensors ``func`` depends on that need
            gradients (its parameters).
        replay: with ``"checkpoint"``: ``"step"`` (one step's evaluation graphs
            alive at a time) or ``"stage"`` (one evaluation's, recomputing the
            step's stages without a graph first).
        scope: a context manager factory entered around the checkpointed replay,
            called with the replay's :class:`SolveConstants`.
        budget: solve without host syncs in exactly this many step attempts
            (``gradient="backprop"`` or no gradient only); raises RuntimeError
            after the solve if T was not reached (or a step was non-finite).

    Returns:
        ``y(T)``, shaped like ``y0``.

    With ``"checkpoint"`` the backward evaluates ``func`` again: it must be a
    deterministic function of ``(t, y)`` and ``params`` (no dropout, no state
    updates), and the result's gradient is not differentiable again.
    """
    if gradient not in GRADIENTS:
        raise ValueError(f"gradient must be one of {', '.join(map(repr, GRADIENTS))}, got {gradient!r}")
    if replay not in REPLAYS:
        raise ValueError(f"replay must be one of {', '.join(map(repr, REPLAYS))}, got {replay!r}")
    if isinstance(T, bool) or not isinstance(T, (int, float)) or not math.isfinite(T) or T <= 0:
        raise ValueError(f"T must be a finite number > 0 (a Python number: no gradient reaches it), got {T!r}")
    for name, tol in (("rtol", rtol), ("atol", atol)):
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol > 0:
            raise ValueError(f"{name} must be a number > 0, got {tol!r}")
    check_solver_arguments(method, options, budget)
    if not y0.is_floating_point():
        raise TypeError(f"y0 must be a floating-point tensor, got {y0.dtype}")
    if budget is not None:
        if gradient == "checkpoint" and torch.is_grad_enabled():
            raise ValueError("budget (the sync-free solve) takes gradient='backprop' or no gradient, "
                             "not gradient='checkpoint'")
        rk = RungeKutta(func, y0, method=method, rtol=rtol, atol=atol, options=options, time_device=y0.device)
        out, reached = rk.integrate_budget(y0, T, budget)
        capturing = y0.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        if not capturing and not bool(reached):
            raise RuntimeError(f"the sync-free ODE solve did not reach T={T:g} within budget={budget} step attempts "
                               f"(or a step was non-finite): raise the budget, or solve with budget=None")
        return out
    rk = RungeKutta(func, y0, method=method, rtol=rtol, atol=atol, options=options)
    params = tuple({id(p): p for p in params if p.requires_grad}.values())
    if gradient == "checkpoint" and torch.is_grad_enabled() and (y0.requires_grad or params):
        state = dict(rk=rk, T=float(T), replay=replay, scope=scope or nullcontext)
        return _CheckpointedSolve.apply(state, y0, *params)
    return rk.integrate(y0, [0.0, float(T)])[0]
