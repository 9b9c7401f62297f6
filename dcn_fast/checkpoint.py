"""Exact gradients of an adaptive ODE solve with one step's graph in memory.

``checkpointed_odeint`` solves ``dy/dt = func(t, y)`` from 0 to T with a
torchdiffeq Runge–Kutta solver and differentiates the solution exactly as
backpropagation through that solver would (DESIGN.md §3; ACA, Zhuang et al.
2020), without keeping the solver's graph:

- the forward solve builds no graph; per *accepted* step it keeps the step's
  start (t₀, y₀, dt) and the derivative f₀ = func(t₀, y₀) that the step reused
  from the previous one (first-same-as-last), so memory grows with
  accepted steps × state size;
- the backward replays the accepted steps last to first under autograd with
  torchdiffeq's own step function and tableau (rejected steps never), each
  step a function ``(y₀, f₀) → (y₁, f₁)`` — the last one ending in the dense
  output at T that the forward returned — and backpropagates through it, so
  one step's graph is alive at a time.

Step sizes are solver decisions, not functions of the inputs: no gradient
flows through them here, as in torchdiffeq for every step size but the first
(``ODEBlock(gradient="backprop")`` chooses the first one without a gradient too,
so the two modes agree to float rounding).

torchdiffeq exports only ``odeint``; the step function, tableaus and dense
output used to replay a step are its internals (stable since 0.2.0), imported
here by name and checked at import: a torchdiffeq without them makes
``gradient="checkpoint"`` raise with the reason, the other modes unaffected.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Callable, Iterable

import torch
from torch import nn

from .solver import SolveConstants, _accumulate, _autocast_as

try:
    from torchdiffeq._impl.interp import _interp_evaluate, _interp_fit
    from torchdiffeq._impl.misc import Perturb
    from torchdiffeq._impl.odeint import SOLVERS
    from torchdiffeq._impl.rk_common import RKAdaptiveStepsizeODESolver, _runge_kutta_step
except ImportError as exc:  # pragma: no cover - depends on the installed torchdiffeq
    _MISSING: Exception | None = exc
else:
    _MISSING = None

__all__ = ["checkpointed_odeint", "CHECKPOINT_METHODS", "REPLAYS"]

#: Solvers whose accepted steps can be replayed: torchdiffeq's adaptive Runge–Kutta methods.
CHECKPOINT_METHODS = tuple(
    name for name, solver in (SOLVERS.items() if _MISSING is None else ())
    if issubclass(solver, RKAdaptiveStepsizeODESolver)
)


def check_method(method: str, options: dict | None) -> None:
    """Raise unless ``checkpointed_odeint`` can replay ``method`` with ``options``."""
    if _MISSING is not None:
        raise RuntimeError(
            f"gradient='checkpoint' replays torchdiffeq's Runge-Kutta steps, and this torchdiffeq lacks them "
            f"({_MISSING}); use gradient='adjoint' or 'backprop', or torchdiffeq 0.2.3-0.2.5"
        )
    if method not in CHECKPOINT_METHODS:
        raise ValueError(
            f"gradient='checkpoint' needs an adaptive Runge-Kutta method ({', '.join(CHECKPOINT_METHODS)}), "
            f"got method={method!r}"
        )
    unsupported = {"step_t", "jump_t"} & set(options or {})
    if unsupported:
        raise ValueError(f"gradient='checkpoint' does not support the solver options {sorted(unsupported)}")


class _Recorder:
    """``func`` as torchdiffeq calls it during the graph-free forward, recording what a replay needs.

    torchdiffeq evaluates f(t₀, y₀) first and hands each step the last stage
    of the previous accepted one as its f₀; on acceptance it calls
    ``callback_accept_step(t₀, y₀, dt)`` after the step's evaluations.
    """

    def __init__(self, func: Callable) -> None:
        self.func = func
        self.steps: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.f_start: torch.Tensor | None = None  # f₀ of the step being attempted
        self.f_last: torch.Tensor | None = None

    def __call__(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        f = self.func(t, y)
        if self.f_start is None:
            self.f_start = f
        self.f_last = f
        return f

    def callback_accept_step(self, t0: torch.Tensor, y0: torch.Tensor, dt: torch.Tensor) -> None:
        self.steps.append((t0, y0, dt, self.f_start))
        self.f_start = self.f_last  # rejected steps leave f₀ as it was


class _Perturbed(nn.Module):
    """``func`` with the time nudged by one float as torchdiffeq's solvers ask (``perturb=``)."""

    def __init__(self, func: Callable) -> None:
        super().__init__()
        self.func = func

    def forward(self, t: torch.Tensor, y: torch.Tensor, *, perturb=None) -> torch.Tensor:
        t = t.to(y.abs().dtype)  # as torchdiffeq: the nudge is one float of the state's dtype
        if perturb is Perturb.NEXT:
            t = torch.nextafter(t, t + 1)
        elif perturb is Perturb.PREV:
            t = torch.nextafter(t, t - 1)
        return self.func(t, y)


def _tableau(method: str, like: torch.Tensor):
    """The solver's Butcher tableau and dense-output weights in the state's dtype, as its constructor casts them."""
    solver = SOLVERS[method]
    t = solver.tableau
    cast = dict(device=like.device, dtype=like.dtype)
    tableau = type(t)(alpha=t.alpha.to(**cast), beta=[b.to(**cast) for b in t.beta],
                      c_sol=t.c_sol.to(**cast), c_error=t.c_error.to(**cast))
    return tableau, solver.mid.to(**cast)


def _step_outputs(y0, y1, k, dt, mid, t0, t1, end):
    """What a replayed step hands on: (y₁, f₁), or for the last step the dense output at T.

    The dense output is torchdiffeq's quartic interpolation of the step that passed T.
    """
    if end is None:
        return [y1, k[..., -1]]
    dt_y = dt.type_as(y0)
    y_mid = y0 + torch.sum(k * (dt_y * mid), dim=-1).view_as(y0)
    coefficients = _interp_fit(y0, y1, y_mid, k[..., 0], k[..., -1], dt_y)
    return [_interp_evaluate(coefficients, t0, t1, end)]


def _grad(outputs, inputs, cotangents, retain_graph=False):
    """``torch.autograd.grad`` over the (output, cotangent) pairs that carry a cotangent."""
    pairs = [(o, c) for o, c in zip(outputs, cotangents) if c is not None]
    return torch.autograd.grad([o for o, _ in pairs], inputs, [c for _, c in pairs], retain_graph=retain_graph,
                               allow_unused=True)


def _replay_step(func, tableau, mid, t0, dt, y0, f0, params, cotangents, end):
    """One accepted step's vector–Jacobian product, by autograd through the whole step.

    Returns the gradients of y₀, of f₀ (None when f₀ is the solve's first
    evaluation, recomputed here) and of ``params``.
    """
    t1 = t0 + dt  # as the solver computed the step's end
    y0 = y0.detach().requires_grad_()
    first = f0 is None
    f0 = func(t0, y0) if first else f0.detach().requires_grad_()
    y1, _, _, k = _runge_kutta_step(func, y0, f0, t0, dt, t1, tableau)
    inputs = [y0] if first else [y0, f0]
    # retain_graph: an ODE function's own per-solve tensors (not handed to SolveConstants)
    # may be shared by every step; this step's own graph goes with its outputs on return.
    found = _grad(_step_outputs(y0, y1, k, dt, mid, t0, t1, end), inputs + list(params), cotangents, True)
    return found[0], None if first else found[1], found[len(inputs):]


def _replay_by_stage(func, tableau, mid, t0, dt, y0, f0, params, cotangents, end):
    """As :func:`_replay_step`, with one evaluation's graph alive at a time.

    The stages' derivatives k are recomputed without a graph; the step's outputs
    are linear in (y₀, k), so their cotangents come from autograd on that linear
    part alone; then the stages are visited last to first, each evaluation
    rebuilt with a graph for its vector–Jacobian product, whose input cotangent
    flows linearly back to y₀ and the earlier k (``y_i = y₀ + Σ_j β_ij·dt·k_j``).
    """
    t1 = t0 + dt
    first = f0 is None
    with torch.no_grad():
        if first:
            f0 = func(t0, y0)
        y1, _, _, k = _runge_kutta_step(func, y0, f0, t0, dt, t1, tableau)
    y0_leaf, k_leaf, y1_leaf = (v.detach().requires_grad_() for v in (y0, k, y1))
    # y₁ as torchdiffeq forms it: the last stage's input, or the solution weights (same linear map).
    t_dtype = y0.abs().dtype
    dt_y = dt.to(t_dtype)
    y1_linear = y0_leaf + torch.sum(k_leaf * (dt_y * tableau.c_sol), dim=-1).view_as(y0)
    outputs = _step_outputs(y0_leaf, y1_leaf, k_leaf, dt, mid, t0, t1, end)
    grad_y0, grad_k, grad_y1 = _grad(outputs, [y0_leaf, k_leaf, y1_leaf], cotangents)
    if grad_y1 is not None:
        more_y0, more_k = torch.autograd.grad(y1_linear, [y0_leaf, k_leaf], grad_y1)
        grad_y0 = more_y0 if grad_y0 is None else grad_y0 + more_y0
        grad_k = more_k if grad_k is None else grad_k + more_k
    grad_y0 = torch.zeros_like(y0) if grad_y0 is None else grad_y0
    grad_k = torch.zeros_like(k) if grad_k is None else grad_k.clone()
    grads_params: list[torch.Tensor | None] = [None] * len(params)

    def vjp(t, y, cotangent, perturb=None):
        y = y.detach().requires_grad_()
        found = torch.autograd.grad(func(t, y, perturb=perturb), [y, *params], cotangent, retain_graph=True,
                                    allow_unused=True)
        _accumulate(grads_params, found[1:])
        return found[0]

    t0_y, t1_y = t0.to(t_dtype), t1.to(t_dtype)
    for i in reversed(range(len(tableau.alpha))):
        alpha, weights = tableau.alpha[i], tableau.beta[i] * dt_y
        with torch.no_grad():  # the stage's input, exactly as the forward formed it
            y_i = y0 + torch.sum(k[..., : i + 1] * weights, dim=-1).view_as(y0)
        if alpha == 1.0:
            t_i, perturb = t1_y, Perturb.PREV
        else:
            t_i, perturb = t0_y + alpha * dt_y, Perturb.NONE
        grad_y_i = vjp(t_i, y_i, grad_k[..., i + 1], perturb)
        grad_y0 += grad_y_i
        grad_k[..., : i + 1] += grad_y_i.unsqueeze(-1) * weights
    if first:
        grad_y0 += vjp(t0, y0, grad_k[..., 0])
        return grad_y0, None, grads_params
    return grad_y0, grad_k[..., 0], grads_params


#: Replay granularities: the graph of one step, or of one evaluation (stage) at a time.
REPLAYS = {"step": _replay_step, "stage": _replay_by_stage}


class _CheckpointedSolve(torch.autograd.Function):
    @staticmethod
    def forward(ctx, solve: dict, y0: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        import torchdiffeq

        recorder = _Recorder(solve["func"])
        t = torch.tensor([0.0, solve["T"]], dtype=y0.dtype, device=y0.device)  # as ODEBlock's other modes
        y = torchdiffeq.odeint(recorder, y0, t, rtol=solve["rtol"], atol=solve["atol"], method=solve["method"],
                               options=solve["options"])
        # The end time as the solver held it (float64 or wider) for the dense output.
        ctx.end = t[1].to(torch.promote_types(torch.float64, y0.abs().dtype))
        ctx.solve = solve
        ctx.times = [(t0, dt) for t0, _, dt, _ in recorder.steps]
        device_type = y0.device.type
        ctx.autocast = (device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
        ctx.y0_requires_grad = y0.requires_grad
        # Saved like any tensor autograd keeps (so saved-tensor hooks, e.g. save_on_cpu, apply to
        # them too): the parameters, then each accepted step's y₀ and, past the first, its f₀.
        states = [y for _, y, _, _ in recorder.steps]
        derivatives = [f for _, _, _, f in recorder.steps[1:]]
        ctx.num_params = len(params)
        ctx.save_for_backward(*params, *states, *derivatives)
        # A tensor of its own, not a view of the solver's [2, ...] buffer (which would keep
        # the initial state alive and refuse in-place use of the result).
        return y[1].clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        solve, times = ctx.solve, ctx.times
        saved = ctx.saved_tensors
        params, saved = saved[: ctx.num_params], saved[ctx.num_params:]
        states, derivatives = saved[: len(times)], (None, *saved[len(times):])
        func = _Perturbed(solve["func"])
        tableau, mid = _tableau(solve["method"], grad_out)
        replay = REPLAYS[solve["replay"]]
        constants = SolveConstants(params)
        grads_params: list[torch.Tensor | None] = [None] * len(params)
        cotangents = [grad_out]
        with torch.enable_grad(), _autocast_as(ctx.autocast), solve["scope"](constants):
            for n in reversed(range(len(times))):
                (t0, dt), y0, f0 = times[n], states[n], derivatives[n]
                end = ctx.end if n == len(times) - 1 else None
                grad_y0, grad_f0, found = replay(func, tableau, mid, t0, dt, y0, f0, constants.inputs, cotangents,
                                                 end)
                _accumulate(grads_params, found)
                cotangents = [grad_y0, grad_f0]  # for the previous step's (y₁, f₁)
            grads_params = constants.backward(grads_params)
        return (None, grad_y0 if ctx.y0_requires_grad else None, *grads_params)


def checkpointed_odeint(
    func: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    y0: torch.Tensor,
    T: float,
    *,
    params: Iterable[torch.Tensor],
    rtol: float,
    atol: float,
    method: str = "dopri5",
    options: dict | None = None,
    replay: str = "step",
    scope: Callable[[], object] | None = None,
) -> torch.Tensor:
    """``y(T)`` of ``dy/dt = func(t, y)``, ``y(0) = y0``, differentiated by replaying accepted steps.

    Args:
        func: ``(t, y) -> dy/dt``; ``y`` and the result shaped like ``y0``.
        y0: the initial state (any shape).
        T: end time (> 0).
        params: the tensors ``func`` depends on that need gradients (its parameters).
        rtol, atol, method, options: as ``torchdiffeq.odeint`` (an adaptive
            Runge–Kutta ``method``, see :data:`CHECKPOINT_METHODS`).
        replay: ``"step"`` keeps one accepted step's graph alive at a time;
            ``"stage"`` one evaluation's, recomputing the step's stage
            derivatives without a graph first (less memory, one more forward
            evaluation per replayed evaluation).
        scope: a context manager factory entered around the backward's replay,
            called with the replay's :class:`~dcn_fast.solver.SolveConstants`
            (e.g. to build per-solve weights once while it runs).

    Returns:
        ``y(T)``, shaped like ``y0``; its backward gives ``y0`` and ``params``
        the gradients of backpropagation through the same solve.

    The backward evaluates ``func`` again, so ``func`` must be a deterministic
    function of ``(t, y)`` and ``params``: random draws (dropout) would differ
    from the forward's, state it updates (BatchNorm's running statistics)
    would be updated again, and tensors it uses that are not in ``params``
    get no gradient. The result's gradient is not differentiable again
    (``create_graph=True`` gives one that raises when differentiated).
    """
    check_method(method, options)
    if replay not in REPLAYS:
        raise ValueError(f"replay must be one of {', '.join(map(repr, REPLAYS))}, got {replay!r}")
    if isinstance(T, bool) or not isinstance(T, (int, float)) or not math.isfinite(T) or T <= 0:
        raise ValueError(f"T must be a finite number > 0 (a Python number: no gradient reaches it), got {T!r}")
    # Each tensor once (as Module.parameters() gives them), or its gradient would count twice.
    params = tuple({id(p): p for p in params if p.requires_grad}.values())
    solve = dict(func=func, T=float(T), rtol=rtol, atol=atol, method=method, options=options,
                 replay=replay, scope=scope or nullcontext)
    return _CheckpointedSolve.apply(solve, y0, *params)
