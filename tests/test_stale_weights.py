"""Weights changed behind autograd's back (``param.data``, ``no_grad``) after a forward: the cached
kernel size and σ(t) radius bound follow, or the result is NaN, never silently wrong."""

import pytest
import torch
from conftest import rel_err

from dcn_fast import SRFConv2d, srf_conv2d
from dcn_fast.basis import HostReadback, srf_taps
from dcn_fast.models import build
from dcn_fast.ode import META_KINDS, TimeConv


def test_host_readback_recomputes_after_every_kind_of_write():
    p = torch.nn.Parameter(torch.zeros(3))
    cache, calls = HostReadback(), []

    def read(param):
        calls.append(1)
        return float(param.detach().sum())

    assert cache.get((p,), read) == 0.0 and cache.get((p,), read) == 0.0 and len(calls) == 1
    with torch.no_grad():
        p.add_(1.0)  # version counter
    assert cache.get((p,), read) == 3.0
    p.data.mul_(2.0)  # .data: no version bump; seen by the value comparison on the CPU
    assert cache.get((p,), read) == 6.0
    p.data = torch.ones(3)  # new storage
    assert cache.get((p,), read) == 3.0
    assert len(calls) == 4


# One σ per output channel runs on dense (and the reference) only: the one-σ backends refuse it.
@pytest.mark.parametrize("sharing, backend", [("layer", "cpu"), ("layer", "separable"), ("layer", "dense"),
                                              ("layer", "reference"), ("channel", "dense"),
                                              ("channel", "reference")])
def test_scale_grown_through_data_after_a_forward(backend, sharing):
    """The issue's case: scale.data.clamp_(min=2.0) left K at the old σ (126 % / 197 % error)."""
    layer = SRFConv2d(3, 4, scale_sharing=sharing, backend=backend).double()
    x = torch.randn(2, 3, 23, 21, dtype=torch.float64)
    layer(x)
    layer.scale.data.clamp_(min=2.0)  # σ ≥ 4: K ≥ 19
    want = srf_conv2d(x, layer.scale, layer.alpha, backend="reference")
    assert rel_err(layer(x), want) < 1e-10


@pytest.mark.parametrize("padding", ["same", "valid", (1, 2)])
def test_scale_shrunk_through_data_keeps_the_published_output(padding):
    layer = SRFConv2d(3, 4, init_scale=1.0, learn_scale=False, padding=padding, stride=2).double()
    x = torch.randn(1, 3, 17, 16, dtype=torch.float64)
    layer(x)
    layer.scale.data.fill_(-1.0)  # K 11 → 5: the output size changes unless padding="same"
    want = srf_conv2d(x, layer.scale, layer.alpha, padding=padding, stride=2, backend="reference")
    out = layer(x)
    assert out.shape == want.shape and rel_err(out, want) < 1e-10


def test_nan_written_through_data_after_a_forward_raises():
    layer = SRFConv2d(3, 4)
    x = torch.randn(1, 3, 8, 8)
    layer(x)
    layer.scale.data.fill_(float("nan"))
    with pytest.raises(ValueError, match="scale .* must be finite"):
        layer(x)


def test_taps_of_a_sigma_wider_than_their_layout_are_nan():
    """The device-side backstop: a radius read before σ grew cannot truncate the taps silently."""
    scale = torch.tensor([0.0, 1.0], dtype=torch.float64)  # radii 3 and 5
    assert torch.isnan(srf_taps(scale, 2, 4, 2.0)[1]).all() and not torch.isnan(srf_taps(scale, 2, 4, 2.0)[0]).any()
    assert not torch.isnan(srf_taps(scale, 2, 5, 2.0)).any()
    assert not torch.isnan(srf_taps(scale, 2, 3, None)).any()  # fixed kernel size: no truncation to outgrow


@pytest.mark.parametrize("kind", META_KINDS)
def test_sigma_t_coefficients_written_through_data(kind):
    torch.manual_seed(0)
    conv = TimeConv(3, 4, kind).double()
    x = torch.randn(2, 3, 9, 8, dtype=torch.float64)
    t = torch.tensor(2.0, dtype=torch.float64)
    conv(t, x)
    conv.layer.scale.data.add_(1.5)  # σ(t) 2.8x larger at every t: past the cached radius bound
    conv.scale_t.data.add_(0.5)
    tx = torch.cat([torch.ones_like(x[:, :1]) * t, x], 1)
    scale, alpha = conv.meta_weights(t)
    want = srf_conv2d(tx, scale, alpha, backend="reference")
    assert rel_err(conv(t, x), want) < 1e-10


def test_dcn_ode_after_a_data_write_equals_a_fresh_copy():
    """The issue's case: logits moved by 0.7 against a fresh copy with the same weights."""
    torch.manual_seed(0)
    model = build("dcn-ode", method="rk4").double()
    x = torch.rand(2, 3, 12, 12, dtype=torch.float64)
    with torch.no_grad():
        model(x)
        for layer in model.modules():
            if isinstance(layer, SRFConv2d):
                layer.scale.data.clamp_(min=1.0)
        fresh = build("dcn-ode", method="rk4").double()
        fresh.load_state_dict(model.state_dict())
        torch.testing.assert_close(model(x), fresh(x), rtol=1e-10, atol=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the accelerator path needs CUDA")
@pytest.mark.parametrize("backend", ["separable", "triton"])
def test_on_cuda_a_grown_scale_gives_nan_and_a_shrunk_one_stays_exact(backend):
    """No host read per call on CUDA: a .data write is not seen, but cannot give a wrong filter."""
    layer = SRFConv2d(3, 4, init_scale=0.0, learn_scale=False, backend=backend).cuda()
    x = torch.randn(2, 3, 16, 16, device="cuda")
    layer(x)
    layer.scale.data.fill_(-1.0)
    want = srf_conv2d(x.double(), layer.scale.double(), layer.alpha.double(), backend="reference")
    assert rel_err(layer(x), want) < 1e-4
    layer.scale.data.fill_(2.0)
    assert torch.isnan(layer(x)).all()
