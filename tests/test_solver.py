"""dcn_fast's Runge–Kutta solver (dcn_fast/solver.py) against torchdiffeq, decision for decision.

In float64 it must evaluate the ODE function at the same times (the same accepted
and rejected steps, the same NFE) as ``torchdiffeq.odeint`` and return the same
``y(T)`` to 1e-12; its fused stage arithmetic (``dcn_fast::rk_combine`` /
``dcn_fast::rk_error_ratio``) must equal the plain PyTorch references.
"""

import pytest
import torch
import torchdiffeq
from torch import nn

from conftest import rel_err

from dcn_fast import ops, solver
from dcn_fast.models import MODELS, build
from dcn_fast.ode import ODEBlock, ODEFunc
from dcn_fast.solver import METHODS, RungeKutta, solve


class Recorded(nn.Module):
    """``dy/dt = A·y`` (a random linear ODE, exact solution ``matrix_exp(t·A)·y0``), recording each ``t``."""

    def __init__(self, size=5, seed=0, dtype=torch.float64):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        a = torch.randn(size, size, generator=g, dtype=dtype)
        # Eigenvalues with real parts in [-2, 0.2]: a mix of decay and slow rotation.
        self.A = nn.Parameter(0.6 * (a - a.T) - torch.diag(torch.rand(size, generator=g, dtype=dtype) * 2 - 0.2))
        self.times = []

    def forward(self, t, y):
        self.times.append(float(t))
        return y @ self.A.T


class RecordedBlock(nn.Module):
    """An ODEFunc (the DCN block's function) recording each evaluation time."""

    def __init__(self, func):
        super().__init__()
        self.func, self.times = func, []

    def forward(self, t, y):
        self.times.append(float(t))
        return self.func(t, y)


def _torchdiffeq(func, y0, T, **kwargs):
    return torchdiffeq.odeint(func, y0, torch.tensor([0.0, T], dtype=y0.dtype), **kwargs)[1]


def _same_solve(func, y0, T, tol=1e-12, **kwargs):
    """Solve with both solvers; assert the same evaluation times and y(T); return y(T)."""
    func.times = []
    want = _torchdiffeq(func, y0, T, **kwargs)
    want_times, func.times = func.times, []
    got = solve(func, y0, T, **kwargs)
    assert len(func.times) == len(want_times)  # the same NFE ...
    # ... at the same times: equal up to the rounding of the error estimate, a small sum of
    # large terms (dt·Σ c_j·k_j ≈ tol while each term ≈ dt·|k|) that the two solvers add in
    # different orders; that rounding (≲ 1e-16·|dt·k|/tol, relative) reaches the next step size.
    assert func.times == pytest.approx(want_times, rel=1e-8, abs=1e-15)
    # y(T) to ``tol`` of the solution's scale, max(|y0|, |y(T)|): where y decays (the stiff test
    # below ends at ~1/200 of |y0|), rounding at the scale of y0 is all that separates the two.
    scale = torch.maximum(y0.abs().max(), want.abs().max())
    assert float((got - want).abs().max() / scale) < tol
    return got


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("tol", [1e-3, 1e-7])
def test_linear_ode_same_steps_as_torchdiffeq_and_matrix_exp(method, tol):
    func = Recorded()
    y0 = torch.randn(3, 5, dtype=torch.float64)
    T = 2.5
    with torch.no_grad():
        got = _same_solve(func, y0, T, rtol=tol, atol=tol, method=method)
        exact = y0 @ torch.linalg.matrix_exp(T * func.A).T
    assert len(func.times) > 10
    if tol < 1e-6:  # global error ~ tolerance × a problem- and method-dependent factor (fehlberg2's ~1e3)
        assert rel_err(got, exact) < 2000 * tol


@pytest.mark.parametrize("options", [
    dict(first_step=0.05), dict(safety=0.8, ifactor=5.0, dfactor=0.3), dict(max_step=0.1), dict(min_step=0.2),
])
def test_step_options_as_torchdiffeq(options):
    func = Recorded(seed=3)
    y0 = torch.randn(2, 5, dtype=torch.float64)
    with torch.no_grad():
        _same_solve(func, y0, 1.7, rtol=1e-4, atol=1e-5, method="dopri5", options=options)


def test_rejected_steps_are_repeated_as_torchdiffeq_does():
    """A stiff-ish problem at a loose tolerance rejects steps; both solvers reject the same ones."""
    func = Recorded(seed=5)
    with torch.no_grad():
        func.A.mul_(8.0)
    y0 = torch.randn(2, 5, dtype=torch.float64)
    steps = []
    rk = RungeKutta(func, y0, method="dopri5", rtol=1e-2, atol=1e-2)
    with torch.no_grad():
        rk.integrate(y0, [0.0, 2.0], on_accept=steps.append)
        attempts = (len(func.times) - 2) // 6  # f0, the initial-step probe, then six per attempt
        assert attempts > len(steps)  # some were rejected
        _same_solve(func, y0, 2.0, rtol=1e-2, atol=1e-2, method="dopri5")


@pytest.mark.parametrize("method", ["dopri5", "bosh3"])
@pytest.mark.parametrize("kind", ["srf", "sigma_t2", "conv"])
def test_dcn_block_same_steps_as_torchdiffeq(method, kind):
    torch.manual_seed(0)
    func = RecordedBlock(ODEFunc(6, kind, norm_groups=2, backend="reference").double())
    y0 = torch.randn(2, 6, 7, 9, dtype=torch.float64)
    with torch.no_grad():
        _same_solve(func, y0, 2.0, rtol=1e-5, atol=1e-5, method=method)
    assert len(func.times) > 12


def test_trajectory_equals_torchdiffeq_at_every_time():
    torch.manual_seed(0)
    func = ODEFunc(4, "srf", norm_groups=2, backend="reference").double()
    x = torch.randn(1, 4, 6, 6, dtype=torch.float64)
    times = torch.tensor([0.0, 0.3, 1.1, 2.0], dtype=torch.float64)
    got = ODEBlock(func, solver="dcn_fast", rtol=1e-6, atol=1e-6).trajectory(x, times)
    want = ODEBlock(func, solver="torchdiffeq", rtol=1e-6, atol=1e-6).trajectory(x, times)
    assert rel_err(got, want) < 1e-12


@pytest.mark.parametrize("name", [n for n, spec in MODELS.items() if spec.stage == "ode"])
def test_every_ode_model_same_outputs_on_both_solvers(name):
    images = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    outputs = []
    for which in ("dcn_fast", "torchdiffeq"):
        torch.manual_seed(0)
        model = build(name, backend="reference", solver=which, gradient="backprop", rtol=1e-4, atol=1e-4).double()
        with torch.no_grad():
            outputs.append(model(images))
        nfe = [b.nfe_forward for b in model.ode_blocks()]
        outputs.append(nfe)
    assert outputs[1] == outputs[3]
    assert rel_err(outputs[0], outputs[2]) < 1e-12


def test_default_solver_follows_the_method():
    func = ODEFunc(4, "srf", norm_groups=2)
    assert ODEBlock(func).solver == "dcn_fast"
    assert ODEBlock(func, method="rk4").solver == "torchdiffeq"
    assert ODEBlock(func, options={"step_size": 0.1}, method="rk4").solver == "torchdiffeq"
    with pytest.raises(ValueError, match="method='rk4'.*solver='torchdiffeq'"):
        ODEBlock(func, method="rk4", solver="dcn_fast")
    with pytest.raises(ValueError, match="solver must be one of"):
        ODEBlock(func, solver="scipy")


def test_float32_solve_close_to_torchdiffeq():
    func = Recorded(dtype=torch.float32)
    y0 = torch.randn(4, 5)
    with torch.no_grad():
        got = solve(func, y0, 2.0, rtol=1e-4, atol=1e-4)
        want = _torchdiffeq(func, y0, 2.0, rtol=1e-4, atol=1e-4)
    assert got.dtype == torch.float32
    assert rel_err(got, want) < 1e-5


# --- gradients ------------------------------------------------------------------------------------

@pytest.mark.parametrize("replay", ["step", "stage"])
@pytest.mark.parametrize("method", list(METHODS))
def test_checkpoint_equals_backprop_on_the_linear_ode(method, replay):
    func = Recorded(seed=2)
    y0 = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    cotangent = torch.randn(3, 5, dtype=torch.float64)
    grads = []
    for gradient in ("backprop", "checkpoint"):
        out = solve(func, y0, 1.5, rtol=1e-4, atol=1e-4, method=method, gradient=gradient,
                    params=list(func.parameters()), replay=replay)
        grads.append(torch.autograd.grad(out, [y0, func.A], cotangent))
    for got, want in zip(grads[1], grads[0]):
        assert rel_err(got, want) < 1e-12


def test_backprop_through_a_fixed_step_sequence_is_the_exact_derivative():
    """With every step accepted at a fixed size the solve is a polynomial in y0: gradcheck applies."""
    func = Recorded(seed=4)
    options = dict(first_step=0.25, min_step=0.25, max_step=0.25)  # every attempt accepted, dt = 0.25
    for gradient in ("backprop", "checkpoint"):
        torch.autograd.gradcheck(
            lambda y, a: solve(lambda t, v: v @ a.T, y, 1.0, rtol=1e-3, atol=1e-3, options=options,
                               gradient=gradient, params=[a]),
            (torch.randn(2, 5, dtype=torch.float64, requires_grad=True), func.A.detach().clone().requires_grad_()))


# --- the sync-free solve --------------------------------------------------------------------------

@pytest.mark.parametrize("method", list(METHODS))
def test_budget_gives_the_synced_result(method):
    func = Recorded(seed=1)
    y0 = torch.randn(3, 5, dtype=torch.float64)
    steps = []
    with torch.no_grad():
        want = RungeKutta(func, y0, method=method, rtol=1e-4, atol=1e-4).integrate(
            y0, [0.0, 2.0], on_accept=steps.append)[0]
        attempts = (len(func.times) - 2 + (not METHODS[method].fsal)) // (METHODS[method].stages - 1)
        for budget in (attempts, attempts + 7):
            got = solve(func, y0, 2.0, rtol=1e-4, atol=1e-4, method=method, budget=budget)
            assert torch.equal(got, want), budget
        with pytest.raises(RuntimeError, match="did not reach T=2 within budget"):
            solve(func, y0, 2.0, rtol=1e-4, atol=1e-4, method=method, budget=len(steps) - 1)


def test_budget_backprop_equals_synced_backprop():
    func = Recorded(seed=6)
    y0 = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    grads = [torch.autograd.grad(solve(func, y0, 1.0, rtol=1e-4, atol=1e-4, budget=budget).square().sum(),
                                 [y0, func.A]) for budget in (None, 60)]
    for got, want in zip(*grads):
        assert rel_err(got, want) < 1e-12


def test_budget_rejects_checkpoint():
    func = Recorded()
    with pytest.raises(ValueError, match="budget"):
        solve(func, torch.randn(1, 5, dtype=torch.float64, requires_grad=True), 1.0, rtol=1e-3, atol=1e-3,
              gradient="checkpoint", budget=10)
    with pytest.raises(ValueError, match="budget"):
        ODEBlock(ODEFunc(4, "srf", norm_groups=2), gradient="checkpoint", budget=10)


# --- bad input --------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    (dict(method="rk4"), "method='rk4' is not one of"),
    (dict(options={"step_size": 0.1}), "not supported by dcn_fast's solver"),
    (dict(options={"safety": -1.0}), r"options\['safety'\] must be a number >= 0"),
    (dict(options={"first_step": 0.0}), r"options\['first_step'\] must be a finite number > 0"),
    (dict(options={"max_num_steps": 0}), r"options\['max_num_steps'\] must be an int >= 1"),
    (dict(budget=0), "budget must be an int >= 1"),
    (dict(rtol=0.0), "rtol must be a number > 0"),
    (dict(gradient="adjoint"), "gradient must be one of"),
    (dict(replay="all"), "replay must be one of"),
])
def test_bad_arguments_are_named(kwargs, message):
    args = {**dict(rtol=1e-3, atol=1e-3), **kwargs}
    with pytest.raises(ValueError, match=message):
        solve(Recorded(), torch.randn(1, 5, dtype=torch.float64), 1.0, **args)
    with pytest.raises(ValueError, match="T must be"):
        solve(Recorded(), torch.randn(1, 5, dtype=torch.float64), -1.0, rtol=1e-3, atol=1e-3)


def test_too_many_steps_and_divergence_are_clear_errors():
    func = Recorded()
    y0 = torch.randn(1, 5, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="max_num_steps=3"):
        solve(func, y0, 5.0, rtol=1e-9, atol=1e-9, options={"max_num_steps": 3})
    with pytest.raises(RuntimeError, match="non-finite"):
        solve(lambda t, y: y * float("nan"), y0, 1.0, rtol=1e-3, atol=1e-3, options={"first_step": 0.1})


# --- the fused stage arithmetic ---------------------------------------------------------------------

def _terms(n, shape=(2, 3, 5, 7), dtype=torch.float64):
    return [torch.randn(shape, dtype=dtype) for _ in range(n)]


@pytest.mark.parametrize("device_op", ["cpu", "reference"])
@pytest.mark.parametrize("with_base", [True, False])
@pytest.mark.parametrize("n", [1, 3, 7])
def test_combine_equals_its_reference(device_op, with_base, n, request):
    if device_op == "cpu":
        request.getfixturevalue("cpu_kernel")
    base = torch.randn(2, 3, 5, 7, dtype=torch.float64) if with_base else None
    terms = _terms(n)
    coeffs = torch.randn(n, dtype=torch.float64)
    want = ops.rk_combine_reference(base, terms, coeffs)
    got = torch.ops.dcn_fast.rk_combine(base, terms, coeffs) if device_op == "cpu" else solver.combine(
        base, terms, coeffs)
    assert rel_err(got, want) < 1e-15


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_error_ratio_equals_its_reference(dtype, cpu_kernel):
    y0, y1 = _terms(2, dtype=dtype)
    terms = _terms(4, dtype=dtype)
    coeffs = torch.randn(4, dtype=torch.float64)
    want = ops.rk_error_ratio_reference(y0, y1, terms, coeffs, 1e-3, 1e-4)
    got = torch.ops.dcn_fast.rk_error_ratio(y0, y1, terms, coeffs, 1e-3, 1e-4)
    assert got.dtype == torch.float64 and got.shape == ()
    assert rel_err(got, want) < (1e-12 if dtype == torch.float64 else 1e-5)


def test_combine_opcheck_and_gradcheck(cpu_kernel):
    base = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    terms = [t.requires_grad_() for t in _terms(3, shape=(2, 3, 4, 5))]
    coeffs = torch.randn(3, dtype=torch.float64)
    torch.library.opcheck(torch.ops.dcn_fast.rk_combine.default, (base, terms, coeffs))
    torch.library.opcheck(torch.ops.dcn_fast.rk_combine.default, (None, terms, coeffs))
    torch.autograd.gradcheck(lambda b, *ts: torch.ops.dcn_fast.rk_combine(b, list(ts), coeffs), (base, *terms))
    y0, y1 = _terms(2, shape=(2, 3, 4, 5))
    torch.library.opcheck(torch.ops.dcn_fast.rk_error_ratio.default,
                          (y0, y1, [t.detach() for t in terms], coeffs, 1e-3, 1e-4))


def test_combine_bad_input_is_named(cpu_kernel):
    terms = _terms(2)
    with pytest.raises(RuntimeError, match=r"coeffs must be a float64 CPU tensor \[2\], got \[3\]"):
        torch.ops.dcn_fast.rk_combine(None, terms, torch.ones(3, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="shaped"):
        torch.ops.dcn_fast.rk_combine(None, [terms[0], terms[1][:, :2]], torch.ones(2, dtype=torch.float64))
