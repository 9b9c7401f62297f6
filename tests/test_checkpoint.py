"""gradient="checkpoint": exact gradients from replayed accepted steps (dcn_fast/checkpoint.py)."""

import os

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    # The triton case runs under the interpreter; set before the kernels are imported (lazily).
    os.environ["TRITON_INTERPRET"] = "1"

from conftest import rel_err  # noqa: E402

from dcn_fast.checkpoint import CHECKPOINT_METHODS, checkpointed_odeint  # noqa: E402
from dcn_fast.models import build  # noqa: E402
from dcn_fast.ode import GRADIENTS, ODEBlock, ODEFunc  # noqa: E402


def _loss_weights(out: torch.Tensor) -> torch.Tensor:
    """A fixed, non-uniform cotangent (a plain sum would hide sign and position errors)."""
    return torch.linspace(-1.0, 2.0, out.numel(), dtype=out.dtype, device=out.device).view_as(out)


def _model_gradients(name, gradient, images, labels, tol, replay=None, solver=None):
    torch.manual_seed(0)
    model = build(name, gradient=gradient, rtol=tol, atol=tol, replay=replay, solver=solver)
    model.double()
    x = images.clone().requires_grad_()
    logits = model(x)
    F.cross_entropy(logits, labels).backward()
    grads = {"input": x.grad}
    grads.update({n: p.grad for n, p in model.named_parameters()})
    nfe = [(b.nfe_forward, b.count_backward()) for b in model.ode_blocks()]
    return logits.detach(), grads, nfe


# Both solvers' replays (dcn_fast.solver and, with solver="torchdiffeq", dcn_fast.checkpoint).
_SOLVES = [(1e-2, "step", "dcn_fast"), (1e-3, "step", "dcn_fast"), (1e-2, "stage", "dcn_fast"),
           (1e-3, "stage", "dcn_fast"), (1e-3, "step", "torchdiffeq"), (1e-2, "stage", "torchdiffeq")]


@pytest.mark.parametrize("tol, replay, solver", _SOLVES)
@pytest.mark.parametrize("name", ["dcn-ode", "dcn-sigma-t", "odenet"])
def test_model_gradients_equal_backprop_through_the_same_solve(name, tol, replay, solver):
    """float64: the input, every parameter and every σ, at two tolerances, either replay."""
    images = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    labels = torch.tensor([3, 7])
    want_out, want, want_nfe = _model_gradients(name, "backprop", images, labels, tol, solver=solver)
    got_out, got, got_nfe = _model_gradients(name, "checkpoint", images, labels, tol, replay, solver)
    assert torch.equal(got_out, want_out)
    assert got.keys() == want.keys()
    assert any("scale" in n for n in got) == ("dcn" in name)  # every σ is among the compared gradients
    # Relative to each tensor's own scale, plus an absolute floor for gradients that vanish
    # analytically (the stem's bias before GroupNorm): theirs is rounding noise of sums of terms
    # of the size of the whole gradient, so the floor is 16 float64 ulps of the whole gradient's
    # norm (torch 2.11, dcn-ode at 1e-2: 2.5e-12 on the stem's bias, 0.2 ulp of the norm 5.9e4).
    # Every tensor larger than the floor is still held to 1e-9 of its own size.
    whole = float(torch.cat([w.reshape(-1) for w in want.values()]).norm())
    for n in got:
        assert got[n] is not None and want[n] is not None, n
        bound = 1e-9 * float(want[n].abs().max()) + 16 * torch.finfo(torch.float64).eps * whole
        assert float((got[n] - want[n]).abs().max()) < bound, n
    for (fwd, bwd), (fwd_bp, _) in zip(got_nfe, want_nfe):
        # torchdiffeq's backprop chooses its first step apart (one evaluation more; dcn_fast's
        # solver shares the probe's evaluation); the replay repeats only the accepted steps: at
        # most the forward's evaluations less the step-size probe (twice per stage replay: once
        # without a graph, once with).
        assert fwd == fwd_bp - (solver == "torchdiffeq")
        assert 0 < bwd <= (fwd - 1) * (2 if replay == "stage" else 1)


def _ode_func(kind="srf", backend="reference", channels=4):
    torch.manual_seed(1)
    return ODEFunc(channels, kind, norm_groups=2, backend=backend)


def _block_grads(func, gradient, x, **kwargs):
    """The output and the gradients of the input and of every parameter, and the block."""
    block = ODEBlock(func, gradient=gradient, **kwargs)
    xi = x.clone().requires_grad_()
    func.zero_grad()
    out = block(xi)
    (out * _loss_weights(out)).sum().backward()
    return out.detach(), [xi.grad] + [p.grad.clone() for p in func.parameters()], block


# σ^ji (one σ per pair) runs on the dense-capable backends only; the others refuse it.
_KINDS_BACKENDS = [(kind, backend) for kind in ("srf", "srf_pair", "sigma_t2", "sigma_alpha_t", "conv")
                   for backend in ("reference", "dense", "separable", "cpu", "auto")
                   if not (kind == "srf_pair" and backend in ("separable", "cpu"))]


@pytest.mark.parametrize("kind, backend", _KINDS_BACKENDS)
def test_every_backend_and_kind(kind, backend, request):
    if backend == "cpu":
        request.getfixturevalue("cpu_kernel")
    func = _ode_func(kind, backend).double()
    x = torch.randn(2, 4, 7, 9, dtype=torch.float64)
    replay = "stage" if backend == "separable" else "step"  # both replays across the kinds
    want_out, want, _ = _block_grads(func, "backprop", x, T=1.5, rtol=1e-3, atol=1e-3)
    got_out, got, _ = _block_grads(func, "checkpoint", x, T=1.5, rtol=1e-3, atol=1e-3, replay=replay)
    assert torch.equal(got_out, want_out)
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-9


@pytest.mark.parametrize("replay", ["step", "stage"])
@pytest.mark.parametrize("solver", ["dcn_fast", "torchdiffeq"])
def test_per_solve_weights_are_differentiated_once_per_replay(solver, replay, monkeypatch):
    """The taps and time maps an ODE function builds once per solve enter the replayed evaluations as
    leaves (SolveConstants): their construction runs backwards once per solve, as under backprop, not
    once per evaluation (which was a third of a DCN-ODE step); the gradients stay exact."""
    from dcn_fast.ode import TimeConv

    backwards = []
    time_map = TimeConv._time_map

    def counted(self, *args):
        m = time_map(self, *args)
        if m.requires_grad:
            m.register_hook(lambda g: backwards.append(g))
        return m

    monkeypatch.setattr(TimeConv, "_time_map", counted)
    func = _ode_func("srf").double()
    x = torch.randn(2, 4, 7, 9, dtype=torch.float64)
    _, want, _ = _block_grads(func, "backprop", x, T=1.5, rtol=1e-3, atol=1e-3)
    assert len(backwards) == 2  # one per TimeConv
    backwards.clear()
    _, got, block = _block_grads(func, "checkpoint", x, T=1.5, rtol=1e-3, atol=1e-3, replay=replay, solver=solver)
    assert block.count_backward() > 10
    assert len(backwards) == 2
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-9


def test_triton_backend():
    pytest.importorskip("triton", reason="the triton backend needs the triton package")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    func = _ode_func("srf", "triton", channels=2).to(device)
    x = torch.randn(1, 2, 5, 6, device=device)
    want_out, want, _ = _block_grads(func, "backprop", x, T=0.3, rtol=0.5, atol=0.5)
    got_out, got, block = _block_grads(func, "checkpoint", x, T=0.3, rtol=0.5, atol=0.5)
    assert block.nfe_forward > 0
    assert rel_err(got_out, want_out) < 1e-6
    for g, w in zip(got, want):
        # float32: the replay repeats the forward's arithmetic, but sums each parameter's
        # gradient step by step (backprop: in one graph's order) — rounding of order 1e-5.
        assert rel_err(g, w) < 1e-4


def test_only_the_input_or_only_the_parameters():
    func = _ode_func().double()
    x = torch.randn(1, 4, 6, 6, dtype=torch.float64)
    _, want, _ = _block_grads(func, "backprop", x, rtol=1e-2, atol=1e-2)
    for p in func.parameters():
        p.requires_grad_(False)
    block = ODEBlock(func, gradient="checkpoint", rtol=1e-2, atol=1e-2)
    xi = x.clone().requires_grad_()
    out = block(xi)
    (out * _loss_weights(out)).sum().backward()
    assert rel_err(xi.grad, want[0]) < 1e-9
    for p in func.parameters():
        p.requires_grad_(True)
    func.zero_grad()
    out = block(x)  # the input needs no gradient: the parameters still get theirs
    (out * _loss_weights(out)).sum().backward()
    for p, w in zip(func.parameters(), want[1:]):
        assert rel_err(p.grad, w) < 1e-9


def test_no_grad_and_eval_run_a_plain_solve():
    func = _ode_func().double()
    block = ODEBlock(func, gradient="checkpoint")
    x = torch.randn(1, 4, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        out = block(x)
    assert out.grad_fn is None and block.nfe_forward > 0


class _SavedBytes:
    """Bytes autograd saves for backward while active, and the most alive at once."""

    def __init__(self):
        self.total = self.alive = self.peak = 0

    def pack(self, tensor):
        size = tensor.untyped_storage().nbytes()
        self.total += size
        self.alive += size
        self.peak = max(self.peak, self.alive)
        # Detached: holding the tensor itself would tie a saved output to its own grad_fn in a
        # cycle that Python's collector cannot see, and keep every retained graph alive.
        return _Held(tensor.detach(), size, self)

    @staticmethod
    def unpack(held):
        return held.tensor


class _Held:
    def __init__(self, tensor, size, owner):
        self.tensor, self.size, self.owner = tensor, size, owner

    def __del__(self):
        self.owner.alive -= self.size


def test_memory_grows_with_accepted_steps_times_state_not_with_evaluations():
    """What the forward keeps: the parameters and, per accepted step, its start state and f₀;
    what the backward holds at once: one step's graph ("step") or one evaluation's ("stage")."""
    func = _ode_func(channels=8).double()
    x = torch.randn(2, 8, 12, 12, dtype=torch.float64, requires_grad=True)
    param_bytes = sum(p.untyped_storage().nbytes() for p in func.parameters())
    state_bytes = x.numel() * x.element_size()

    kept, peak = {}, {}
    for gradient, replay in (("backprop", None), ("checkpoint", "step"), ("checkpoint", "stage")):
        block = ODEBlock(func, gradient=gradient, rtol=1e-5, atol=1e-5, replay=replay)
        saved = _SavedBytes()
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
            out = block(x)
        kept[gradient] = saved.total
        if gradient == "checkpoint":
            steps = len(out.grad_fn.times)  # accepted steps
            # No graph: the parameters, and per accepted step its y₀ and (past the first) f₀.
            assert saved.total == param_bytes + (2 * steps - 1) * state_bytes
            with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
                saved.total = saved.alive = saved.peak = 0
                (out * _loss_weights(out)).sum().backward()
            # Counted from the backward's start (the checkpoints aside): about one step's share
            # of what backprop kept for all of them, or one evaluation's.
            peak[replay] = saved.peak
            assert saved.peak < 2.5 * kept["backprop"] / steps
        del out
    assert kept["checkpoint"] < kept["backprop"] / 4
    assert peak["stage"] < peak["step"] / 2.5


def test_autocast_bf16_matches_backprop_under_the_same_autocast():
    func = _ode_func("srf", "auto")
    x = torch.randn(2, 4, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want_out, want, _ = _block_grads(func, "backprop", x, rtol=1e-2, atol=1e-2)
        got_out, got, _ = _block_grads(func, "checkpoint", x, rtol=1e-2, atol=1e-2)
    assert torch.equal(got_out, want_out)  # the replay repeats the forward's bf16 arithmetic
    for g, w in zip(got, want):
        # Backprop sums a weight's gradients over all steps in bf16 (autocast casts it once);
        # the replay adds each step's in float32: a few bf16 roundings (2^-8) apart.
        assert rel_err(g, w) < 2e-2


def test_functional_entry_on_a_linear_ode():
    """dy/dt = A y on its own: the replay differentiates any function of (t, y) and its parameters."""
    a = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    y0 = torch.randn(3, dtype=torch.float64, requires_grad=True)
    out = checkpointed_odeint(lambda t, y: a @ y, y0, 1.0, params=[a], rtol=1e-10, atol=1e-10)
    exact = torch.linalg.matrix_exp(a) @ y0
    assert rel_err(out, exact) < 1e-8
    got = torch.autograd.grad(out.sum(), (y0, a))
    want = torch.autograd.grad(exact.sum(), (y0, a))
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-7


def test_a_parameter_listed_twice_counts_once():
    a = (0.5 * torch.randn(3, 3, dtype=torch.float64)).requires_grad_()
    y0 = torch.randn(3, dtype=torch.float64)
    grads = []
    for params in ([a], [a, a]):
        out = checkpointed_odeint(lambda t, y: a @ y, y0, 1.0, params=params, rtol=1e-8, atol=1e-8)
        grads.append(torch.autograd.grad(out.sum(), a)[0])
    assert torch.equal(grads[0], grads[1])


def test_the_result_is_its_own_tensor():
    """Not a view of the solver's buffer: in-place use works as with backprop."""
    func = _ode_func().double()
    x = torch.randn(1, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    out = ODEBlock(func, gradient="checkpoint", rtol=1e-2, atol=1e-2)(x)
    assert out._base is None
    out.relu_().sum().backward()
    assert x.grad is not None


def test_errors_name_the_argument():
    func = _ode_func()
    with pytest.raises(ValueError, match="gradient must be one of 'checkpoint', 'adjoint', 'backprop'"):
        ODEBlock(func, gradient="exact")
    with pytest.raises(ValueError, match="adaptive Runge-Kutta method"):
        ODEBlock(func, gradient="checkpoint", method="rk4")
    with pytest.raises(ValueError, match="step_t"):
        ODEBlock(func, gradient="checkpoint", options={"step_t": [0.5]})
    with pytest.raises(ValueError, match="gradient must be one of"):
        build("dcn-ode", gradient="none")
    with pytest.raises(ValueError, match="replay must be one of 'step', 'stage'"):
        ODEBlock(func, gradient="checkpoint", replay="evaluation")
    with pytest.raises(ValueError, match="replay applies to gradient='checkpoint' only"):
        ODEBlock(func, gradient="backprop", replay="stage")
    for T in (-0.7, 0.0, float("inf"), float("nan"), torch.tensor(1.0), True):
        with pytest.raises(ValueError, match="T must be a finite number > 0"):
            checkpointed_odeint(lambda t, y: -y, torch.ones(2), T, params=[], rtol=1e-3, atol=1e-3)
    assert GRADIENTS == ("checkpoint", "adjoint", "backprop")
    assert "dopri5" in CHECKPOINT_METHODS and "rk4" not in CHECKPOINT_METHODS


def test_double_backward_is_refused():
    func = _ode_func().double()
    x = torch.randn(1, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    out = ODEBlock(func, gradient="checkpoint", rtol=1e-2, atol=1e-2)(x)
    (g,) = torch.autograd.grad(out.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|second time|does not require grad"):
        g.sum().backward()


def _ddp_images():
    torch.manual_seed(3)
    return torch.rand(2, 3, 6, 6, dtype=torch.float64), torch.tensor([1, 8])


def _ddp_model():
    torch.manual_seed(0)
    return build("dcn-ode", gradient="checkpoint", rtol=1e-2, atol=1e-2).double()


def _ddp_worker(rank: int, init_file: str, out_file: str) -> None:
    torch.set_num_threads(1)  # two processes on a small machine
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        model = torch.nn.parallel.DistributedDataParallel(_ddp_model())
        images, labels = _ddp_images()
        F.cross_entropy(model(images[rank::2]), labels[rank::2]).backward()
        if rank == 0:
            torch.save({n: p.grad for n, p in model.module.named_parameters()}, out_file)
    finally:
        dist.destroy_process_group()


def test_distributed_data_parallel_gives_the_single_process_gradients(tmp_path):
    """gloo, 2 processes, one image each: DDP's gradients are the mean of the two shards' gradients.

    (Each process solves its own shard with its own adaptive steps, so the reference is the
    shards solved one by one in this process, not the two images solved as one batch.)
    """
    out_file = str(tmp_path / "grads.pt")
    mp.spawn(_ddp_worker, args=(str(tmp_path / "init"), out_file), nprocs=2)
    got = torch.load(out_file, weights_only=True)
    model = _ddp_model()
    images, labels = _ddp_images()
    for rank in range(2):
        (F.cross_entropy(model(images[rank::2]), labels[rank::2]) / 2).backward()
    # Each parameter to 1e-9 of its own gradient's size, or of the model's largest where its own
    # is zero up to rounding (the stem's bias feeds a GroupNorm: its gradient is ~1e-14 noise).
    floor = max(float(p.grad.abs().max()) for p in model.parameters())
    for n, p in model.named_parameters():
        scale = max(float(p.grad.abs().max()), 1e-3 * floor)
        assert float((got[n] - p.grad).abs().max()) < 1e-9 * scale, n


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (verified by bench/gpu_check.sh)")
@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_cuda_dcn_ode_gradients_and_peak_memory(backend, batch_size=32):
    """On the GPU: the checkpointed gradients are backprop's, at a fraction of its peak memory."""
    images = torch.rand(batch_size, 3, 32, 32, device="cuda")
    labels = torch.arange(batch_size, device="cuda") % 10
    grads, peak = {}, {}
    for gradient in ("backprop", "checkpoint"):
        torch.manual_seed(0)
        model = build("dcn-ode", gradient=gradient, backend=backend).cuda()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        F.cross_entropy(model(images), labels).backward()
        torch.cuda.synchronize()
        peak[gradient] = torch.cuda.max_memory_allocated() - base
        grads[gradient] = {n: p.grad for n, p in model.named_parameters()}
    for n, g in grads["checkpoint"].items():
        # float32 (TF32 convolutions): the replay repeats the forward's arithmetic on the same inputs.
        assert rel_err(g, grads["backprop"][n]) < 1e-3, n
    assert peak["checkpoint"] < peak["backprop"] / 3, peak
