"""The paper's models, ODE blocks and the time channel without concatenation."""

import pytest
import torch

from dcn_fast import srf_conv2d
from dcn_fast.models import MODELS, PARAMETER_COUNTS, build
from dcn_fast.ode import META_KINDS, TAU, ODEBlock, ODEFunc, TimeConv


@pytest.mark.parametrize("name", list(MODELS))
def test_parameter_counts_of_table_1(name):
    assert build(name).num_parameters() == PARAMETER_COUNTS[name]


@pytest.mark.parametrize("name", list(MODELS))
def test_forward_backward_shapes(name):
    # Loose tolerances keep the solver short; the shapes and the gradient flow are what is tested.
    model = build(name, rtol=0.5, atol=0.5, gradient="adjoint" if name == "dcn-ode" else "backprop", num_classes=7)
    x = torch.randn(2, 3, 32, 32)
    logits = model(x)
    assert logits.shape == (2, 7)
    logits.square().sum().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert not missing, missing
    if MODELS[name].stage == "ode":
        assert all(block.nfe_forward > 0 and block.count_backward() >= 0 for block in model.ode_blocks())


def test_build_rejects_unknown_model():
    with pytest.raises(ValueError, match="unknown model 'dcn'; choose one of: odenet, resnet-blocks"):
        build("dcn")


def explicit_concat(conv: TimeConv, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The published ConcatConv2d: convolve cat[t·1, x]."""
    tx = torch.cat([torch.ones_like(x[:, :1]) * t, x], 1)
    if conv.kind == "conv":
        return conv.layer(tx)
    if conv.kind in ("srf", "srf_pair"):
        return conv.layer(tx)
    scale, alpha = conv.meta_weights(t)
    return srf_conv2d(tx, scale, alpha, backend="reference")


@pytest.mark.parametrize("kind", ["conv", "srf", "srf_pair", *META_KINDS])
@pytest.mark.parametrize("t", [0.0, 0.7, 2.9])
def test_time_channel_without_concatenation_is_exact(kind, t):
    conv = TimeConv(3, 4, kind).double()
    x = torch.randn(2, 3, 9, 8, dtype=torch.float64)
    tt = torch.tensor(t, dtype=torch.float64)
    expected = explicit_concat(conv, tt, x)
    torch.testing.assert_close(conv(tt, x), expected, rtol=1e-10, atol=1e-12)
    conv.begin_solve()  # taps and M reused within a solve
    torch.testing.assert_close(conv(tt, x), expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(conv(tt, 2 * x), explicit_concat(conv, tt, 2 * x), rtol=1e-10, atol=1e-12)
    conv.end_solve()


def test_meta_laws_clip_and_scale_time():
    conv = TimeConv(2, 2, "sigma_t2")
    a, b, c = conv.scale_t2.item(), conv.scale_t.item(), conv.layer.scale.item()
    for t, s in [(1.0, TAU * 1.0), (9.0, TAU * 2.5), (-3.0, TAU * -0.5)]:
        scale, _ = conv.meta_weights(torch.tensor(t))
        assert scale.item() == pytest.approx(a * s * s + b * s + c, rel=1e-6)


def test_adjoint_gradients_match_backprop_through_the_solver():
    torch.manual_seed(0)
    func = ODEFunc(3, "srf", norm_groups=1).double()
    x = torch.randn(1, 3, 5, 5, dtype=torch.float64)
    grads = {}
    for gradient in ("backprop", "adjoint"):
        block = ODEBlock(func, T=0.5, rtol=1e-10, atol=1e-10, gradient=gradient)
        func.zero_grad()
        xi = x.clone().requires_grad_()
        block(xi).sin().sum().backward()
        grads[gradient] = [xi.grad] + [p.grad.clone() for p in func.parameters()]
    # Both are solver approximations of the same gradient; at tolerance 1e-10
    # they agree to ~1e-5 of the largest entry (1e-3 at tolerance 1e-6).
    for direct, adjoint in zip(grads["backprop"], grads["adjoint"]):
        assert float((adjoint - direct).abs().max() / direct.abs().max()) < 1e-4


def test_ode_block_errors():
    with pytest.raises(ValueError, match="T must be a finite number > 0"):
        ODEBlock(ODEFunc(4), T=0)
    with pytest.raises(ValueError, match="rtol must be > 0"):
        ODEBlock(ODEFunc(4), rtol=0)
    with pytest.raises(ValueError, match="kind must be"):
        TimeConv(2, 2, "dense")


def test_seminorm_adjoint_gives_the_same_gradients_with_fewer_steps():
    torch.manual_seed(0)
    func = ODEFunc(3, "srf", norm_groups=1).double()
    x = torch.randn(1, 3, 5, 5, dtype=torch.float64)
    results = {}
    for options in (None, {"norm": "seminorm"}):
        block = ODEBlock(func, T=0.5, rtol=1e-8, atol=1e-8, gradient="adjoint", adjoint_options=options)
        func.zero_grad()
        block(x).sin().sum().backward()
        results[options is None] = ([p.grad.clone() for p in func.parameters()], block.count_backward())
    (plain, nfe_plain), (semi, nfe_semi) = results[True], results[False]
    assert nfe_semi <= nfe_plain
    for a, b in zip(semi, plain):
        assert float((a - b).abs().max() / b.abs().max()) < 1e-4


@pytest.mark.parametrize("kind", META_KINDS)
def test_sigma_t_taps_use_a_radius_bound_read_once_per_update(kind, monkeypatch):
    """σ(t) layers lay taps out at the largest radius over t (exact: zeros past σ(t)'s own) and read the
    coefficients back only after they changed."""
    import dcn_fast.ode as ode
    from dcn_fast.functional import truncation_radius

    reads = []
    real = ode.checked_radius
    monkeypatch.setattr(ode, "checked_radius", lambda *a: reads.append(1) or real(*a))
    torch.manual_seed(0)
    conv = TimeConv(3, 4, kind).double()
    x = torch.randn(2, 3, 9, 8, dtype=torch.float64)
    ts = torch.linspace(-1.0, 3.0, 9, dtype=torch.float64)
    own = [truncation_radius(conv.meta_weights(t)[0], conv.layer.truncate) for t in ts]
    for t in ts:
        torch.testing.assert_close(conv(t, x), explicit_concat(conv, t, x), rtol=1e-10, atol=1e-12)
    assert len(reads) == 1 and max(own) <= conv.radius_bound() <= max(own) + 1  # samples may miss a vertex
    with torch.no_grad():
        conv.layer.scale.add_(0.5)  # σ grows at every t
    t = torch.tensor(2.0, dtype=torch.float64)
    torch.testing.assert_close(conv(t, x), explicit_concat(conv, t, x), rtol=1e-10, atol=1e-12)
    assert len(reads) == 2


@pytest.mark.parametrize("name", ["dcn-sigma-t", "dcn-sigma-t2", "dcn-sigma-alpha-t", "dcn-sigma-ji", "dcn-full"])
def test_every_cpu_backend_gives_the_same_model_outputs(name):
    """σ(t) taps are laid out at a radius bound; the reference rebuilds the filter at σ(t)'s own radius
    (it crashed on the size mismatch). RK4 evaluates the meta laws at t = 0, 2/3, 4/3 and 2."""
    torch.manual_seed(0)
    x = torch.rand(2, 3, 12, 12, dtype=torch.float64)
    reference = build(name, backend="reference", method="rk4").double()
    with torch.no_grad():
        want = reference(x)
        # σ^ji (one σ per pair) runs on dense only: the one-σ backends refuse it.
        for backend in ("dense",) if name == "dcn-sigma-ji" else ("cpu", "separable", "dense"):
            model = build(name, backend=backend, method="rk4").double()
            model.load_state_dict(reference.state_dict())
            torch.testing.assert_close(model(x), want, rtol=1e-10, atol=1e-12)


def test_sigma_t2_inits_as_the_official_code():
    """Srf_layer_shared_quad: t² and t coefficients of log2 σ ~ N(0, (2/3)²), intercept ~ N(0, 0.1²)."""
    convs = [TimeConv(1, 1, "sigma_t2") for _ in range(300)]
    for name, std in (("scale_t2", 2 / 3), ("scale_t", 2 / 3)):
        values = torch.cat([getattr(c, name).detach() for c in convs])
        assert abs(values.std().item() - std) < 0.08, name
    intercepts = torch.cat([c.layer.scale.detach() for c in convs])
    assert abs(intercepts.std().item() - 0.1) < 0.02


def test_odenet_end_time_and_activation_are_options():
    """Table A.1's controls: the official ODE-Net integrates to T = 2; a CELU ODE-Net."""
    from torch import nn

    model = build("odenet", T=2.0, activation="celu")
    assert [block.T for block in model.ode_blocks()] == [2.0, 2.0, 2.0]
    assert not any(isinstance(m, nn.ReLU) for m in model.modules())
    assert any(isinstance(m, nn.CELU) for m in model.modules())
    assert model.num_parameters() == PARAMETER_COUNTS["odenet"]
    assert [b.T for b in build("odenet").ode_blocks()] == [1.0] * 3
    assert build("resnet-blocks", activation="celu").stage1.act.__class__ is nn.CELU


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(name="odenet", T=0.0), "T must be a finite number > 0, got 0.0"),
        (dict(name="odenet", T=float("nan")), "T must be a finite number > 0"),
        (dict(name="odenet", T=True), "T must be a finite number > 0"),
        (dict(name="resnet-blocks", T=2.0), "T applies to ODE blocks; resnet-blocks has none"),
        (dict(name="dcn-ode", activation="tanh"), "activation must be one of 'relu', 'celu', got 'tanh'"),
    ],
)
def test_build_option_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build(kwargs.pop("name"), **kwargs)


@pytest.mark.parametrize("kind, intercept, slope, square", [
    ("sigma_t", -7.9, -20.0, None),  # the hostile review's case: σ(t) down to 2^-27.9 passed unchecked
    ("sigma_t2", -7.8, 0.0, 4.0),  # convex: -6.95 and -4.55 at the ends, -8.16 at the vertex
])
def test_sigma_t_below_min_scale_anywhere_on_the_interval_is_refused(kind, intercept, slope, square):
    conv = TimeConv(2, 3, kind)
    with torch.no_grad():
        conv.layer.scale.fill_(intercept)
        conv.scale_t.fill_(slope)
        if square is not None:
            conv.scale_t2.fill_(square)
            conv.scale_t.fill_(-2 * square * 0.3)  # vertex at s = 0.3, inside [-0.25, 1.25]
    with pytest.raises(ValueError, match="scale too small"):
        conv(torch.tensor(1.0), torch.randn(1, 2, 5, 5))


@pytest.mark.parametrize("kind", ["srf", "sigma_t"])
def test_trajectory_ends_at_the_forward_output(kind):
    """h(t) on a grid in one solve: h(0) is the input, h(T) the forward's output, NFE counted."""
    block = ODEBlock(ODEFunc(4, kind), T=1.5, rtol=1e-4, atol=1e-4).double()
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64)
    with torch.no_grad():
        out = block(x)
        times = torch.linspace(0, 1.5, 7)
        path = block.trajectory(x, times)
    assert path.shape == (7, 2, 4, 9, 9)
    assert torch.equal(path[0], x)
    assert torch.allclose(path[-1], out, rtol=1e-12, atol=1e-12)
    assert block.nfe_forward > 0
    # Interior points lie between: neither the start nor the end.
    assert (path[3] - x).abs().max() > 0 and (path[3] - out).abs().max() > 0


@pytest.mark.parametrize("times", [[0.5, 1.0], [0.0, 1.0, 0.5], [0.0, 2.0], [0.0]])
def test_trajectory_refuses_times_outside_the_interval(times):
    block = ODEBlock(ODEFunc(4), T=1.0)
    with pytest.raises(ValueError, match="times must increase from 0 to at most T=1.0"):
        block.trajectory(torch.randn(1, 4, 5, 5), torch.tensor(times))
