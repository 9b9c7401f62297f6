"""SRFConv2d: construction, parameters, round trips, export, errors."""

import math

import pytest
import torch
from torch import nn

from dcn_fast import SRFConv2d, srf_conv2d


def test_forward_matches_functional_reference():
    layer = SRFConv2d(5, 7, order=3, stride=2, groups=1, bias=True).double()
    with torch.no_grad():
        layer.bias.normal_()
    x = torch.randn(2, 5, 11, 9, dtype=torch.float64)
    expected = srf_conv2d(x, layer.scale, layer.alpha, order=3, stride=2, bias=layer.bias, backend="reference")
    torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-12)


def test_parameters_and_published_init():
    layer = SRFConv2d(64, 64, order=2, init_scale=0.5)
    assert layer.alpha.shape == (6, 64, 64) and layer.scale.shape == (1,) and layer.bias is None
    assert abs(layer.alpha.std().item() - 0.1) < 0.005
    scales = torch.cat([SRFConv2d(1, 1, init_scale=0.5).scale.detach() for _ in range(400)])
    assert abs(scales.mean().item() - 0.5) < 0.15 and abs(scales.std().item() - 2 / 3) < 0.1
    fixed = SRFConv2d(3, 4, init_scale=1.0, learn_scale=False)
    assert fixed.scale.item() == 1.0 and not fixed.scale.requires_grad
    assert SRFConv2d(3, 4, scale_sharing="channel").scale.shape == (4,)
    assert SRFConv2d(4, 6, scale_sharing="pair", kernel_size=7, groups=2).scale.shape == (6, 2)


def test_sigma_and_kernel_size():
    layer = SRFConv2d(2, 2, init_scale=1.0, learn_scale=False)
    assert layer.sigma.item() == 2.0 and layer.kernel_size == (11, 11)
    with torch.no_grad():
        layer.scale.fill_(-1.0)
    assert layer.kernel_size == (5, 5)
    assert SRFConv2d(2, 2, kernel_size=7).kernel_size == (7, 7)


def test_gradients_reach_scale_and_alpha():
    layer = SRFConv2d(3, 4)
    layer(torch.randn(2, 3, 8, 8)).square().sum().backward()
    assert layer.alpha.grad.abs().sum() > 0 and layer.scale.grad.abs().sum() > 0
    frozen = SRFConv2d(3, 4, learn_scale=False)
    frozen(torch.randn(2, 3, 8, 8)).sum().backward()
    assert frozen.scale.grad is None


@pytest.mark.parametrize(
    "kwargs", [dict(), dict(stride=2, padding="valid", bias=True), dict(scale_sharing="pair", kernel_size=7, groups=2)]
)
def test_filters_and_to_conv2d(kwargs):
    layer = SRFConv2d(4, 6, **kwargs).double()
    if layer.bias is not None:
        with torch.no_grad():
            layer.bias.normal_()
    x = torch.randn(2, 4, 12, 13, dtype=torch.float64)
    from dcn_fast import srf_filters_reference

    torch.testing.assert_close(
        layer.filters(),
        srf_filters_reference(layer.scale, layer.alpha, layer.order, layer.truncate, layer.fixed_kernel_size),
        rtol=1e-10,
        atol=1e-14,
    )
    conv = layer.to_conv2d()
    assert isinstance(conv, nn.Conv2d) and not any(p.requires_grad for p in conv.parameters())
    torch.testing.assert_close(conv(x), layer(x), rtol=1e-10, atol=1e-12)


def test_state_dict_round_trip():
    layer = SRFConv2d(3, 5, bias=True)
    other = SRFConv2d(3, 5, bias=True)
    other.load_state_dict(layer.state_dict())
    x = torch.randn(1, 3, 9, 9)
    torch.testing.assert_close(other(x), layer(x))


def test_loads_published_state_dict():
    """Srf_layer_shared stores alphas [F, C_in/groups, C_out] and scales [1]."""
    published = {"alphas": torch.randn(6, 3, 5), "scales": torch.tensor([0.37])}
    net = nn.Sequential(SRFConv2d(3, 5))
    net.load_state_dict({f"0.{k}": v for k, v in published.items()})
    torch.testing.assert_close(net[0].alpha.data, published["alphas"])
    assert net[0].scale.item() == pytest.approx(0.37)


def test_extra_repr_and_repr():
    text = repr(SRFConv2d(3, 8, init_scale=0.0, learn_scale=False, stride=2, groups=1))
    assert "SRFConv2d(3, 8, order=2" in text and "sigma=1" in text and "kernel_size=(7, 7)" in text
    assert "stride=(2, 2)" in text
    assert "scale_sharing='pair'" in repr(SRFConv2d(2, 2, scale_sharing="pair", kernel_size=7))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(in_channels=0), "in_channels must be an int >= 1"),
        (dict(out_channels=2.5), "out_channels must be an int >= 1"),
        (dict(groups=2), "groups=2 must divide in_channels"),
        (dict(order=-2), "order must be an int >= 0"),
        (dict(truncate=-1.0), "truncate must be a finite number > 0"),
        (dict(scale_sharing="pixel"), "scale_sharing must be one of"),
        (dict(scale_sharing="pair"), "needs a fixed kernel_size"),
        (dict(backend="fast"), "backend must be one of"),
        (dict(init_scale=math.inf), "init_scale must be a finite number"),
        (dict(kernel_size=6), "kernel_size must be None or an odd int"),
        (dict(padding="circular"), "padding must be 'same', 'valid'"),
    ],
)
def test_constructor_errors(kwargs, match):
    args = dict(in_channels=3, out_channels=4)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        SRFConv2d(args.pop("in_channels"), args.pop("out_channels"), **args)


def test_forward_errors_name_the_argument():
    layer = SRFConv2d(3, 4)
    with pytest.raises(ValueError, match=r"alpha must have shape .* 2 input channels"):
        layer(torch.randn(1, 2, 8, 8))
    with torch.no_grad():
        layer.scale.fill_(float("nan"))
    with pytest.raises(ValueError, match="scale .* must be finite"):
        layer(torch.randn(1, 3, 8, 8))


def test_scale_is_read_back_only_after_it_changed(monkeypatch):
    """Between updates of σ a forward reuses the radius (no host sync); an in-place step refreshes it."""
    import dcn_fast.modules as modules

    reads = []
    real = modules.checked_radius
    monkeypatch.setattr(modules, "checked_radius", lambda *a, **k: reads.append(1) or real(*a, **k))
    torch.manual_seed(0)
    layer = SRFConv2d(3, 4, init_scale=0.0, learn_scale=True)
    x = torch.randn(2, 3, 20, 20)
    layer(x), layer(x)
    assert len(reads) == 1
    with torch.no_grad():
        layer.scale.add_(1.3)  # σ grows: a larger kernel
    out = layer(x)
    assert len(reads) == 2
    want = srf_conv2d(x, layer.scale, layer.alpha, backend="reference")
    assert out.shape == want.shape
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
