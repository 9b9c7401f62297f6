"""dcn_fast::group_norm_act (GroupNorm → CELU/ReLU/identity as one op) against its PyTorch reference."""

import pytest
import torch
from torch import nn

from conftest import rel_err

from dcn_fast import ops
from dcn_fast.ode import ODEFunc, norm_act

pytestmark = pytest.mark.usefixtures("cpu_kernel")

# (shape, groups): odd spatial sizes, one channel per group, several, one group; a 3-D input.
CASES = [((3, 6, 5, 7), 3), ((2, 4, 9, 9), 4), ((2, 8, 3, 5), 1), ((3, 6, 11), 2)]
ACTIVATIONS = [("celu", 1.0), ("celu", 0.7), ("relu", 1.0), ("identity", 1.0)]


def _operands(shape, affine=True, dtype=torch.float64, requires_grad=False, loc=0.3, scale=1.7):
    # Shifted, scaled input: the statistics are not those of a unit normal.
    x = (torch.randn(shape, dtype=dtype) * scale + loc).requires_grad_(requires_grad)
    if not affine:
        return x, None, None
    w = (torch.randn(shape[1], dtype=dtype) + 1).requires_grad_(requires_grad)
    b = torch.randn(shape[1], dtype=dtype).requires_grad_(requires_grad)
    return x, w, b


@pytest.mark.parametrize("activation,alpha", ACTIVATIONS)
@pytest.mark.parametrize("shape,groups", CASES)
@pytest.mark.parametrize("affine", [True, False])
def test_equals_reference_in_float64(shape, groups, activation, alpha, affine):
    x, w, b = _operands(shape, affine, requires_grad=True)
    grad = torch.randn(shape, dtype=torch.float64)
    want = ops.group_norm_act_reference(x, w, b, groups, 1e-5, activation, alpha)
    got = ops.group_norm_act(x, w, b, groups, 1e-5, activation, alpha)
    assert rel_err(got, want) < 1e-13
    operands = [t for t in (x, w, b) if t is not None]
    want_grads = torch.autograd.grad(want, operands, grad)
    got_grads = torch.autograd.grad(got, operands, grad)
    for g, r in zip(got_grads, want_grads):
        assert rel_err(g, r) < 1e-12


@pytest.mark.parametrize("activation,alpha", ACTIVATIONS)
def test_float32_close_to_reference(activation, alpha):
    x, w, b = _operands((4, 8, 13, 13), dtype=torch.float32, requires_grad=True, loc=5.0, scale=0.1)
    grad = torch.randn_like(x)
    want = ops.group_norm_act_reference(x, w, b, 4, 1e-5, activation, alpha)
    got = ops.group_norm_act(x, w, b, 4, 1e-5, activation, alpha)
    assert rel_err(got, want) < 1e-5
    for g, r in zip(torch.autograd.grad(got, (x, w, b), grad), torch.autograd.grad(want, (x, w, b), grad)):
        assert rel_err(g, r) < 1e-4


@pytest.mark.parametrize("activation,alpha", ACTIVATIONS)
def test_non_finite_values_propagate_as_in_the_reference(activation, alpha):
    """NaN in, NaN out (relu(NaN) read as 0 once hid a model's NaN weights from the solver's check)."""
    x, w, b = _operands((2, 6, 5, 7))
    x[0, 0, 1, 2] = float("nan")  # group 0 of image 0
    x[1, 3, 0, 0] = float("inf")  # group 1 of image 1
    w[5] = float("nan")  # one channel of group 2
    want = ops.group_norm_act_reference(x, w, b, 3, 1e-5, activation, alpha)
    got = ops.group_norm_act(x, w, b, 3, 1e-5, activation, alpha)
    assert want.isnan().any(dim=(2, 3)).sum() == 2 * 2 + 2  # the two groups' channels, channel 5 twice
    torch.testing.assert_close(got, want, equal_nan=True, rtol=1e-13, atol=0)


# floor: where exp underflows the kernel clamps its argument (-700 / -87) and returns exp of that.
@pytest.mark.parametrize("dtype,ulps,floor", [(torch.float64, 8, 1e-303), (torch.float32, 4, 2e-38)])
def test_celu_exp_to_a_few_ulp_over_the_whole_range(dtype, ulps, floor):
    # The kernel's own exp/expm1 where it is hardest: exp underflowing against 1 (the clamp),
    # tiny arguments (expm1 ≈ x), both signs. Element by element against torch.expm1 / exp of
    # the same z (the identity activation's output: the same arithmetic up to the activation),
    # a weight of 300 mapping the normalised values (|x̂| ≤ 3) onto z in [-900, 900].
    values = torch.tensor([-800.0, -90.0, -30.0, -3.0, -1.0, -0.3, -1e-3, -1e-7, 0.0, 1e-7, 2.0], dtype=dtype)
    grid = torch.linspace(-3, 3, 4001, dtype=dtype)  # the forward also on a fine grid of z
    x = torch.stack([torch.cat([values, -values]), grid[:22]])[:, None]
    w = torch.full((1,), 300.0, dtype=dtype)
    b = torch.zeros(1, dtype=dtype, requires_grad=True)
    z = ops.group_norm_act(x, w, b, 1, 0.0, "identity").detach()
    eps = torch.finfo(dtype).eps
    for alpha in (1.0, 0.25):
        for inputs in (x, grid.view(1, 1, -1)):
            z_in = ops.group_norm_act(inputs, w, b, 1, 0.0, "identity").detach()
            got = ops.group_norm_act(inputs, w, b, 1, 0.0, "celu", alpha).detach()
            want = torch.where(z_in > 0, z_in, alpha * torch.expm1(z_in.clamp(max=0) / alpha))
            torch.testing.assert_close(got, want, rtol=ulps * eps, atol=floor)
        got = ops.group_norm_act(x, w, b, 1, 0.0, "celu", alpha)
        # act'(z) through the bias gradient of a one-hot output gradient.
        slope = torch.stack([torch.autograd.grad(got.flatten()[i], b, retain_graph=True)[0][0]
                             for i in range(got.numel())]).view_as(z)
        want = torch.where(z > 0, torch.ones_like(z), torch.exp(z.clamp(max=0) / alpha))
        torch.testing.assert_close(slope, want, rtol=ulps * eps, atol=floor)


@pytest.mark.parametrize("activation,alpha", [("celu", 0.7), ("relu", 1.0), ("identity", 1.0)])
def test_gradcheck_and_gradgradcheck(activation, alpha):
    x, w, b = _operands((2, 4, 3, 5), requires_grad=True)
    fn = lambda x, w, b: ops.group_norm_act(x, w, b, 2, 1e-5, activation, alpha)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, b))
    assert torch.autograd.gradgradcheck(fn, (x, w, b))


def test_opcheck():
    x, w, b = _operands((2, 4, 3, 5), requires_grad=True)
    torch.library.opcheck(torch.ops.dcn_fast.group_norm_act.default, (x, w, b, 2, 1e-5, "celu", 1.0))
    torch.library.opcheck(torch.ops.dcn_fast.group_norm_act.default, (x.detach(), None, None, 4, 1e-5, "relu", 1.0))


def test_bad_arguments_are_named():
    x, w, b = _operands((2, 4, 3, 5))
    with pytest.raises(ValueError, match="activation must be one of 'identity', 'relu', 'celu', got 'gelu'"):
        ops.group_norm_act(x, w, b, 2, 1e-5, "gelu")
    with pytest.raises(ValueError, match="alpha must not be 0"):
        ops.group_norm_act(x, w, b, 2, 1e-5, "celu", 0.0)
    with pytest.raises(RuntimeError, match="groups must divide the 4 channels, got 3"):
        ops.group_norm_act(x, w, b, 3, 1e-5, "relu")
    with pytest.raises(RuntimeError, match=r"weight and bias must be \[4\]"):
        ops.group_norm_act(x, w[:3], b, 2, 1e-5, "relu")


@pytest.mark.parametrize("activation,fused_calls", [(nn.CELU, 2), (lambda: nn.CELU(0.5), 2), (nn.ReLU, 2),
                                                     (nn.Tanh, 0)])
def test_ode_function_equals_its_modules(activation, fused_calls, monkeypatch):
    # ODEFunc runs GN → act through norm_act; the modules composed by hand are the reference.
    # The fused op runs for GN → CELU/ReLU (norm1, norm2), not for nn.Tanh nor for norm3 alone.
    torch.manual_seed(0)
    func = ODEFunc(8, activation=activation).double()
    h = torch.randn(2, 8, 7, 7, dtype=torch.float64)
    t = torch.tensor(0.3, dtype=torch.float64)
    calls = []
    fused = ops.group_norm_act
    monkeypatch.setattr(ops, "group_norm_act", lambda *args: calls.append(args[-2]) or fused(*args))
    got = func(t, h)
    assert len(calls) == fused_calls
    out = func.conv1(t, func.act(func.norm1(h)))
    want = func.norm3(func.conv2(t, func.act(func.norm2(out))))
    assert rel_err(got, want) < 1e-12
