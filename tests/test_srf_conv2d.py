"""srf_conv2d: every backend against the published reference, gradients, the custom op."""

import math
import warnings

import pytest
import torch

from conftest import rel_err

from dcn_fast import ops
from dcn_fast.basis import num_basis, srf_taps
from dcn_fast.functional import srf_conv2d

FAST = ["separable", "cpu"]

# (batch, c_in, c_out, height, width, order, scale, stride, padding, groups, bias)
CASES = [
    (2, 3, 4, 9, 11, 2, 0.0, 1, "same", 1, False),  # σ = 1, odd sizes
    (1, 4, 6, 13, 12, 3, 0.6, 2, "valid", 2, True),  # batch 1, stride 2, groups, bias
    (2, 2, 3, 7, 7, 0, -1.74, 1, 1, 1, False),  # order 0, σ ≈ 0.3, int padding
    (2, 4, 4, 8, 9, 4, 0.7, (2, 1), "same", 4, True),  # order 4, depthwise, mixed stride
    (1, 3, 2, 5, 6, 1, 2.585, 2, "same", 1, False),  # σ ≈ 6: kernel (27) larger than the map
    (3, 5, 7, 10, 10, 2, 1.0, 2, (1, 2), 1, True),  # σ = 2, padding pair
]


def make(case, dtype, requires_grad=False):
    batch, c_in, c_out, h, w, order, scale, stride, padding, groups, bias = case
    x = torch.randn(batch, c_in, h, w, dtype=dtype)
    s = torch.tensor([scale], dtype=dtype)
    a = torch.randn(num_basis(order), c_in // groups, c_out, dtype=dtype)
    b = torch.randn(c_out, dtype=dtype) if bias else None
    tensors = [t.requires_grad_(requires_grad) if t is not None else None for t in (x, s, a, b)]
    kwargs = dict(order=order, stride=stride, padding=padding, groups=groups)
    return tensors, kwargs


def run(backend, tensors, kwargs):
    x, s, a, b = tensors
    return srf_conv2d(x, s, a, bias=b, backend=backend, **kwargs)


@pytest.fixture(params=FAST)
def backend(request):
    if request.param == "cpu":
        from conftest import cpu_kernel_or_skip

        cpu_kernel_or_skip()
    return request.param


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("case", CASES)
def test_forward_and_gradients_match_reference(backend, case, dtype, tol):
    tensors, kwargs = make(case, dtype, requires_grad=True)
    expected = run("reference", tensors, kwargs)
    actual = run(backend, tensors, kwargs)
    assert actual.shape == expected.shape and actual.dtype == dtype
    assert rel_err(actual, expected) < tol
    grad = torch.randn_like(expected)
    inputs = [t for t in tensors if t is not None]
    expected_grads = torch.autograd.grad(expected, inputs, grad)
    actual_grads = torch.autograd.grad(actual, inputs, grad)
    for name, g, e in zip("x scale alpha bias".split(), actual_grads, expected_grads):
        assert rel_err(g, e) < tol, name


def test_non_contiguous_input(backend):
    x = torch.randn(2, 9, 11, 4, dtype=torch.float64).permute(0, 3, 1, 2)  # [2, 4, 9, 11], channels-last strides
    assert not x.is_contiguous()
    s = torch.tensor([0.3], dtype=torch.float64)
    a = torch.randn(6, 4, 5, dtype=torch.float64)
    expected = srf_conv2d(x.contiguous(), s, a, backend="reference")
    assert rel_err(srf_conv2d(x, s, a, backend=backend), expected) < 1e-10


def test_gradients_of_one_input_only(backend):
    """Each gradient alone (the autograd formula saves and computes only what is asked)."""
    tensors, kwargs = make(CASES[1], torch.float64)
    x, s, a, b = tensors
    grad = None
    for i in range(3):
        inputs = [x.clone(), s.clone(), a.clone()]
        inputs[i].requires_grad_()
        out = srf_conv2d(*inputs, bias=b, backend=backend, **kwargs)
        ref = srf_conv2d(*inputs, bias=b, backend="reference", **kwargs)
        grad = torch.randn_like(out) if grad is None else grad
        (g,) = torch.autograd.grad(out, inputs[i], grad)
        (e,) = torch.autograd.grad(ref, inputs[i], grad)
        assert rel_err(g, e) < 1e-10


@pytest.mark.parametrize("case", [CASES[0], CASES[1], CASES[3]])
def test_gradcheck(backend, case):
    batch, c_in, c_out, h, w, order, scale, stride, padding, groups, bias = case
    # Small enough for numerical Jacobians, still odd sizes / stride / groups.
    case = (1, c_in, min(c_out, 4), min(h, 10), min(w, 9), order, scale, stride, padding, groups, bias)
    (x, s, a, b), kwargs = make(case, torch.float64, requires_grad=True)
    inputs = (x, s, a) if b is None else (x, s, a, b)
    fn = lambda *t: srf_conv2d(*t[:3], bias=t[3] if len(t) > 3 else None, backend=backend, **kwargs)  # noqa: E731
    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("sharing", ["channel", "pair"])
@pytest.mark.parametrize("backend_name", ["separable", "cpu"])
def test_per_channel_and_sigma_ji(sharing, backend_name):
    c_in, c_out, groups = 4, 6, 2
    shape = (c_out,) if sharing == "channel" else (c_out, c_in // groups)
    scale = torch.linspace(-1.5, 1.2, math.prod(shape), dtype=torch.float64).reshape(shape)
    kernel_size = 7 if sharing == "pair" else None
    x = torch.randn(2, c_in, 9, 8, dtype=torch.float64)
    a = torch.randn(6, c_in // groups, c_out, dtype=torch.float64)
    kwargs = dict(groups=groups, kernel_size=kernel_size, stride=2)
    expected = srf_conv2d(x, scale, a, backend="reference", **kwargs)
    assert rel_err(srf_conv2d(x, scale, a, backend=backend_name, **kwargs), expected) < 1e-10
    inputs = (x[:1].clone().requires_grad_(), scale.clone().requires_grad_(), a.clone().requires_grad_())
    assert torch.autograd.gradcheck(lambda *t: srf_conv2d(*t, backend=backend_name, **kwargs), inputs)


def test_reference_sigma_ji_normalises_each_pair():
    """σ^ji: fixed 7 taps, each pair's filter equals a one-σ layer at that σ with kernel_size 7."""
    scale = torch.tensor([[-0.5, 0.4]], dtype=torch.float64)
    a = torch.randn(6, 2, 1, dtype=torch.float64)
    x = torch.randn(1, 2, 8, 8, dtype=torch.float64)
    out = srf_conv2d(x, scale, a, kernel_size=7, backend="reference")
    parts = [
        srf_conv2d(x[:, i : i + 1], scale[0, i : i + 1], a[:, i : i + 1], kernel_size=7, backend="reference")
        for i in range(2)
    ]
    assert rel_err(out, parts[0] + parts[1]) < 1e-12


def test_batch_zero(backend):
    x = torch.randn(0, 3, 8, 8)
    out = srf_conv2d(x, torch.zeros(1), torch.randn(6, 3, 4), backend=backend)
    assert out.shape == (0, 4, 8, 8)


def test_auto_picks_cpu_kernel(cpu_kernel):
    from dcn_fast.functional import resolve_backend

    assert resolve_backend("auto", torch.zeros(1)) == "cpu"


def test_cpu_falls_back_with_one_warning(monkeypatch):
    def broken_build():
        raise OSError("no compiler")

    monkeypatch.setattr(ops, "_state", {})
    monkeypatch.setattr(ops, "_build", broken_build)
    x, s, a = torch.randn(1, 2, 6, 6, dtype=torch.float64), torch.zeros(1, dtype=torch.float64), None
    a = torch.randn(6, 2, 3, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="could not be built.*no compiler.*separable"):
        out = srf_conv2d(x, s, a, backend="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        srf_conv2d(x, s, a, backend="cpu")  # warned once only
        srf_conv2d(x, s, a)
    assert rel_err(out, srf_conv2d(x, s, a, backend="reference")) < 1e-10


# --- the custom op itself -------------------------------------------------


def op_samples(requires_grad):
    out = []
    for stride, padding, groups, order in [((1, 1), (3, 3), 1, 2), ((2, 1), (0, 1), 2, 3), ((2, 2), (2, 2), 1, 1)]:
        taps = srf_taps(torch.tensor([0.0], dtype=torch.float64), order, 3, 2.0)[0]
        x = torch.randn(2, 4, 9, 8, dtype=torch.float64, requires_grad=requires_grad)
        a = torch.randn(num_basis(order), 4 // groups, 6, dtype=torch.float64, requires_grad=requires_grad)
        out.append((x, taps.detach().requires_grad_(requires_grad), a, list(stride), list(padding), groups))
    return out


@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(cpu_kernel, requires_grad):
    for args in op_samples(requires_grad):
        torch.library.opcheck(torch.ops.dcn_fast.srf_conv2d.default, args)


def test_op_under_torch_compile(cpu_kernel):
    x, taps, a, stride, padding, groups = op_samples(False)[0]

    def f(x, taps, a):
        return torch.ops.dcn_fast.srf_conv2d(x, taps, a, stride, padding, groups).relu()

    expected = f(x, taps, a)
    torch.testing.assert_close(torch.compile(f, fullgraph=True, backend="aot_eager")(x, taps, a), expected)


def test_op_checks_its_arguments(cpu_kernel):
    x, taps, a, stride, padding, groups = op_samples(False)[0]
    with pytest.raises(RuntimeError, match="alpha.size\\(0\\) must be F = 6"):
        torch.ops.dcn_fast.srf_conv2d(x, taps, a[:5], stride, padding, groups)
    with pytest.raises(RuntimeError, match="share one dtype"):
        torch.ops.dcn_fast.srf_conv2d(x.float(), taps, a, stride, padding, groups)


def test_cpu_backward_is_deterministic(cpu_kernel):
    (x, s, a, _), kwargs = make(CASES[5], torch.float32, requires_grad=True)
    grads = []
    for _ in range(2):
        out = srf_conv2d(x, s, a, backend="cpu", **kwargs)
        grads.append(torch.autograd.grad(out.square().sum(), (x, s, a)))
    for g1, g2 in zip(*grads):
        assert torch.equal(g1, g2)


# --- argument errors ------------------------------------------------------

X = torch.randn(1, 3, 8, 8)
S = torch.zeros(1)
A = torch.randn(6, 3, 4)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(input=torch.randn(3, 8, 8)), ValueError, "input must be 4-D"),
        (dict(input=torch.randn(1, 2, 8, 8)), ValueError, r"alpha must have shape \[F, C_in/groups, C_out\]"),
        (dict(input=X.long()), TypeError, "input must be a floating-point tensor"),
        (dict(alpha=[1.0]), TypeError, "alpha must be a torch.Tensor"),
        (dict(order=-1), ValueError, "order must be an int >= 0"),
        (dict(order=3), ValueError, r"\[10, 3, C_out\] for order=3"),
        (dict(truncate=0.0), ValueError, "truncate must be a finite number > 0"),
        (dict(truncate=float("nan")), ValueError, "truncate must be a finite number > 0"),
        (dict(stride=0), ValueError, "stride must be >= 1"),
        (dict(stride=(1, 2, 3)), TypeError, "stride must be an int or a pair"),
        (dict(padding="full"), ValueError, "padding must be 'same', 'valid'"),
        (dict(padding=-1), ValueError, "padding must be >= 0"),
        (dict(groups=2), ValueError, "groups=2 must divide the input channels"),
        (dict(groups=0), ValueError, "groups must be an int >= 1"),
        (dict(bias=torch.zeros(3)), ValueError, r"bias must be None or a tensor of shape \[4\]"),
        (dict(scale=torch.tensor([float("nan")])), ValueError, "scale .* must be finite"),
        (dict(scale=torch.tensor([float("inf")])), ValueError, "scale .* must be finite"),
        (dict(scale=torch.zeros(2)), ValueError, r"scale must have shape \[1\]"),
        (dict(scale=torch.tensor([6.0])), ValueError, r"scale too large: .* 259 taps; the cap is 129 \(scale <= 4\.989\)"),
        (dict(scale=torch.tensor([1000.0])), ValueError, r"scale too large: .* infinitely many taps"),
        (dict(scale=torch.zeros(4, 3)), ValueError, "needs a fixed kernel_size"),
        (dict(kernel_size=4), ValueError, "kernel_size must be None or an odd int"),
        (dict(kernel_size=131), ValueError, "kernel_size must be <= 129"),
        (dict(padding="valid", scale=torch.tensor([1.5])), ValueError, "smaller than the 15x15 kernel"),
        (dict(backend="cuda"), ValueError, "backend must be one of 'auto', 'reference', 'separable', 'cpu', 'triton'"),
    ],
)
def test_errors(kwargs, error, match):
    args = dict(input=X, scale=S, alpha=A)
    args.update(kwargs)
    positional = [args.pop(k) for k in ("input", "scale", "alpha")]
    with pytest.raises(error, match=match):
        srf_conv2d(*positional, **args)


@pytest.mark.parametrize("backend_name", ["reference", "separable", "cpu"])
def test_precomputed_taps(backend_name):
    """srf_taps_for + taps= gives the same result and gradients as building the taps in the call."""
    from dcn_fast.functional import srf_taps_for

    x = torch.randn(2, 4, 9, 8, dtype=torch.float64)
    a = torch.randn(6, 4, 3, dtype=torch.float64, requires_grad=True)
    s = torch.tensor([0.4], dtype=torch.float64, requires_grad=True)
    taps = srf_taps_for(s, order=2)
    assert taps.shape == (1, 3, 2 * math.ceil(2 * 2**0.4 + 0.5) + 1)
    shared = srf_conv2d(x, s, a, taps=taps, backend=backend_name, stride=2)
    fresh = srf_conv2d(x, s, a, backend="reference", stride=2)
    assert rel_err(shared, fresh) < 1e-10
    g = torch.randn_like(fresh)
    for got, want in zip(torch.autograd.grad(shared, (s, a), g), torch.autograd.grad(fresh, (s, a), g)):
        assert rel_err(got, want) < 1e-10
    with pytest.raises(ValueError, match="taps must come from srf_taps_for"):
        srf_conv2d(x, s, a, taps=taps[:, :2], backend=backend_name)  # order 1 taps, order 2 call
    with pytest.raises(ValueError, match="scale .* must be finite"):
        srf_taps_for(torch.tensor([float("-inf")]))


def test_low_precision_input_on_cpu():
    """bf16 (e.g. a model under autocast) runs through separable; the C++ kernel refuses it clearly."""
    x = torch.randn(1, 3, 8, 8).bfloat16()
    s, a = torch.zeros(1), torch.randn(6, 3, 4).bfloat16()
    out = srf_conv2d(x, s, a)
    assert out.dtype == torch.bfloat16
    assert rel_err(out.float(), srf_conv2d(x.float(), s, a.float(), backend="reference")) < 2e-2
    with pytest.raises(ValueError, match="backend='cpu' computes in float32 or float64"):
        srf_conv2d(x, s, a, backend="cpu")


@pytest.mark.parametrize("backend_name", ["separable", "cpu"])
def test_under_cpu_autocast(backend_name):
    """Under autocast the op computes in its inputs' promoted dtype (float32 here) and matches the reference."""
    x = torch.randn(2, 4, 9, 9)
    s, a = torch.zeros(1), torch.randn(6, 4, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = srf_conv2d(x.bfloat16(), s, a, backend=backend_name)
    assert out.dtype == torch.float32
    assert rel_err(out, srf_conv2d(x.bfloat16().float(), s, a, backend="reference")) < 1e-5


def test_auto_rule_for_cuda_as_measured(monkeypatch):
    """CUDA: triton where its kernels take the call, else separable (a CUDA-typed meta tensor stands in)."""
    from dcn_fast import functional

    class CudaLike:
        def __init__(self, shape, dtype):
            self.shape, self.dtype, self.device = torch.Size(shape), dtype, torch.device("cuda")

    monkeypatch.setattr(functional, "triton_available", lambda: True)
    x = CudaLike((8, 33, 30, 30), torch.float32)
    assert functional.resolve_backend("auto", x, torch.float32, torch.empty(6, 33, 32)) == "triton"
    assert functional.resolve_backend("auto", x, torch.bfloat16, torch.empty(6, 33, 32)) == "triton"
    assert functional.resolve_backend("auto", x, torch.float64, torch.empty(6, 33, 32)) == "separable"
    assert functional.resolve_backend("auto", x, torch.float32, torch.empty(6, 11, 32), groups=3) == "separable"
    assert functional.resolve_backend("auto", x, torch.float32, torch.empty(6, 33, 512)) == "separable"
    monkeypatch.setattr(functional, "triton_available", lambda: False)
    assert functional.resolve_backend("auto", x, torch.float32, torch.empty(6, 33, 32)) == "separable"
